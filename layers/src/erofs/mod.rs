//! One layer's tar stream converted into an EROFS image that the guest
//! mounts read-only as an overlay lower layer: parsed and checked as
//! `unpack` checks it (the same refusals), laid out in memory as a tree,
//! and written as an image, all in this process. Nothing of the layer is
//! unpacked to a host filesystem or executed, so its device nodes and
//! set-id files are inert bytes here; only the guest's kernel, behind the
//! VM, ever mounts the image.

mod format;
mod tree;

use std::io::{self, Read, Seek, Write};
use std::path::Path;

use tar::EntryType;

use crate::unpack::{
    apply_error, confine, pax_xattrs, refused, UnpackError, OPAQUE_MARKER, OVERLAY_OPAQUE_XATTR,
    WHITEOUT_PREFIX,
};
use format::{Writer, BLOCK, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG};
use tree::{Data, Kind, Tree};

/// A layer with more entries than this is refused: the tree lives in
/// memory while the image is written.
pub const MAX_ENTRIES: u64 = 2_000_000;
/// Longest name EROFS holds.
const MAX_NAME: usize = 255;

/// What a conversion made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConvertSummary {
    pub entries: u64,
    pub file_bytes: u64,
    pub image_bytes: u64,
    /// Extended attributes of namespaces EROFS cannot hold (not `user.`,
    /// `trusted.`, `security.` or the POSIX ACLs), left out.
    pub xattrs_dropped: u64,
}

/// Converts the uncompressed tar stream `layer` into an EROFS image
/// written to `out` (from its start; it should be empty).
pub fn convert<R: Read, W: Write + Seek>(layer: R, out: W) -> Result<ConvertSummary, UnpackError> {
    let mut writer = Writer::new(out).map_err(|e| apply_error("", "writing the image", e))?;
    let mut tree = Tree::new();
    let mut summary = ConvertSummary::default();
    let mut archive = tar::Archive::new(layer);
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        summary.entries += 1;
        if summary.entries > MAX_ENTRIES {
            return Err(refused(
                &name,
                format!("the layer has more than {MAX_ENTRIES} entries"),
            ));
        }
        summary.file_bytes += add_entry(&mut entry, &name, &mut tree, &mut writer, &mut summary)?;
    }
    let blocks = writer
        .finish(&tree)
        .map_err(|e| apply_error("", "writing the image", e))?;
    summary.image_bytes = blocks * BLOCK;
    Ok(summary)
}

/// Converts the layer file `layer` (uncompressed tar) into `image`.
pub fn convert_file(layer: &Path, image: &Path) -> Result<ConvertSummary, UnpackError> {
    let input = std::fs::File::open(layer).map_err(UnpackError::Read)?;
    let output =
        std::fs::File::create(image).map_err(|e| apply_error("", "creating the image", e))?;
    convert(io::BufReader::new(input), io::BufWriter::new(output))
}

fn add_entry<R: Read, W: Write + Seek>(
    entry: &mut tar::Entry<R>,
    name: &str,
    tree: &mut Tree,
    writer: &mut Writer<W>,
    summary: &mut ConvertSummary,
) -> Result<u64, UnpackError> {
    let header = entry.header().clone();
    let kind = header.entry_type();
    if kind == EntryType::XGlobalHeader {
        return Ok(0);
    }
    let relative = confine(&entry.path().map_err(UnpackError::Read)?, name)?;
    let parts: Vec<Vec<u8>> = relative
        .components()
        .map(|c| std::os::unix::ffi::OsStrExt::as_bytes(c.as_os_str()).to_vec())
        .collect();
    if parts.iter().any(|p| p.len() > MAX_NAME) {
        return Err(refused(
            name,
            format!("a name longer than {MAX_NAME} bytes"),
        ));
    }
    let path: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let malformed = |e: io::Error| refused(name, format!("malformed header: {e}"));
    let permissions = header.mode().map_err(malformed)? & 0o7777;
    let id =
        |v: u64| u32::try_from(v).map_err(|_| refused(name, format!("owner {v} is out of range")));
    let uid = id(header.uid().map_err(malformed)?)?;
    let gid = id(header.gid().map_err(malformed)?)?;
    let mtime = header.mtime().map_err(malformed)?;
    let refusal = |r: tree::Refusal| refused(name, r.to_string());

    if let Some((last, parents)) = path.split_last() {
        if *last == OPAQUE_MARKER.as_bytes() {
            return tree
                .opaque(parents, OVERLAY_OPAQUE_XATTR)
                .map(|_| 0)
                .map_err(refusal);
        }
        if let Some(hidden) = last.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if hidden.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                return Ok(0);
            }
            if matches!(hidden, b"" | b"." | b"..") {
                return Err(refused(name, "whiteout of an invalid name".into()));
            }
            return tree.whiteout(parents, hidden).map(|_| 0).map_err(refusal);
        }
    }

    let mut xattrs = pax_xattrs(entry, name)?;
    let before = xattrs.len();
    xattrs.retain(|(key, _)| format::xattr_index(key).is_some());
    summary.xattrs_dropped += (before - xattrs.len()) as u64;
    if xattrs
        .iter()
        .any(|(k, v)| k.len() > 255 || v.len() > u16::MAX as usize)
    {
        return Err(refused(
            name,
            "an extended attribute too long for EROFS".into(),
        ));
    }
    let node = |mode: u32, kind: Kind, xattrs| {
        tree::node(mode | permissions, uid, gid, mtime, xattrs, kind)
    };
    let mut written = 0;
    let made = match kind {
        EntryType::Directory => node(S_IFDIR, Kind::Dir(Default::default()), xattrs),
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            let (data, size) = file_data(entry, name, writer)?;
            written = size;
            node(S_IFREG, Kind::File(data), xattrs)
        }
        EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| refused(name, "symlink without a target".into()))?
                .into_owned();
            if target.is_empty() || target.len() >= BLOCK as usize {
                return Err(refused(name, "symlink target empty or too long".into()));
            }
            // Stored as written: it resolves inside the container's root at
            // run time, and nothing here ever follows it.
            tree::node(
                S_IFLNK | 0o777,
                uid,
                gid,
                mtime,
                Vec::new(),
                Kind::Symlink(target),
            )
        }
        EntryType::Link => {
            let target = entry
                .link_name()
                .map_err(malformed)?
                .ok_or_else(|| refused(name, "hard link without a target".into()))?;
            let target_relative = confine(&target, name)?;
            if target_relative.as_os_str().is_empty() || target_relative == relative {
                return Err(refused(name, "hard link to itself or to the root".into()));
            }
            let target_parts: Vec<Vec<u8>> = target_relative
                .components()
                .map(|c| std::os::unix::ffi::OsStrExt::as_bytes(c.as_os_str()).to_vec())
                .collect();
            let target_path: Vec<&[u8]> = target_parts.iter().map(Vec::as_slice).collect();
            tree.hard_link(&path, &target_path).map_err(|r| {
                refused(name, format!("hard link target {}: {r}", target.display()))
            })?;
            return Ok(0);
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let major = header.device_major().map_err(malformed)?.unwrap_or(0);
            let minor = header.device_minor().map_err(malformed)?.unwrap_or(0);
            let file_type = match kind {
                EntryType::Char => S_IFCHR,
                EntryType::Block => S_IFBLK,
                _ => S_IFIFO,
            };
            // The kernel's new_encode_dev.
            let rdev = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
            node(file_type, Kind::Device { rdev }, xattrs)
        }
        other => return Err(refused(name, format!("unsupported entry type {other:?}"))),
    };
    tree.add(&path, made).map_err(refusal)?;
    Ok(written)
}

/// Reads a file's data: kept in memory when under a block, else written
/// to the image's blocks as it comes.
fn file_data<R: Read, W: Write + Seek>(
    entry: &mut tar::Entry<R>,
    name: &str,
    writer: &mut Writer<W>,
) -> Result<(Data, u64), UnpackError> {
    let read_error = |e: io::Error| {
        UnpackError::Read(io::Error::new(
            e.kind(),
            format!("in the data of {name:?}: {e}"),
        ))
    };
    let write_error = |e| apply_error(name, "writing the image", e);
    let mut buffer = vec![0u8; 128 * 1024];
    let mut small = Vec::new();
    let mut start = None;
    let mut size = 0u64;
    loop {
        let n = match entry.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(e)),
        };
        size += n as u64;
        match start {
            Some(_) => writer.append(&buffer[..n]).map_err(write_error)?,
            None if size < BLOCK => small.extend_from_slice(&buffer[..n]),
            None => {
                start = Some(writer.start_file().map_err(write_error)?);
                writer.append(&small).map_err(write_error)?;
                writer.append(&buffer[..n]).map_err(write_error)?;
                small = Vec::new();
            }
        }
    }
    match start {
        Some(blkaddr) => {
            writer.end_file(blkaddr, size).map_err(write_error)?;
            Ok((Data::Blocks { blkaddr, size }, size))
        }
        None => Ok((Data::Inline(small), size)),
    }
}

/// Converts one layer blob (compressed as `spec` says) into an EROFS
/// image written to `out`, verifying the blob's digest and the diff id as
/// an import does; returns the conversion's summary and the blob's size.
pub fn convert_layer<R: Read, W: Write + Seek>(
    spec: &crate::LayerSpec,
    blob: R,
    out: W,
) -> Result<(ConvertSummary, u64), crate::LayerError> {
    crate::store::verified(spec, blob, |tar| convert(tar, out))
}
