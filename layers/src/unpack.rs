//! Applies one layer's tar stream to a directory, in the form overlayfs
//! reads as a lower layer: OCI whiteouts (`.wh.NAME`) become overlay
//! whiteouts (0:0 character devices) and opaque markers (`.wh..wh..opq`)
//! become the `trusted.overlay.opaque` xattr.
//!
//! The tar crate parses the stream (long names, PAX records, sparse files);
//! everything that touches the filesystem is here, because the policy is
//! ours: an entry that would land outside the root (absolute paths, `..`,
//! writing through a symlink, hard links to anything outside this layer)
//! is refused with an error that names it, never skipped in silence.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::AtFlags;
use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};
use tar::EntryType;

pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";
pub(crate) const OPAQUE_MARKER: &str = ".wh..wh..opq";
pub(crate) const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// A layer that sets overlay's own xattrs could redirect lookups into other
/// layers; only we may set them.
const RESERVED_XATTR_PREFIX: &str = "trusted.overlay.";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {entry:?} refused: {reason}")]
    Refused { entry: String, reason: String },
    #[error("layer entry {entry:?}: {what}: {source}")]
    Apply {
        entry: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the layer (corrupt or truncated): {0}")]
    Read(#[source] io::Error),
}

/// What an unpack wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackSummary {
    pub entries: u64,
    pub file_bytes: u64,
}

/// Unpacks the uncompressed tar stream `layer` into the existing directory
/// `root`.
pub fn unpack<R: Read>(layer: R, root: &Path) -> Result<UnpackSummary, UnpackError> {
    let mut archive = tar::Archive::new(layer);
    let mut summary = UnpackSummary::default();
    let mut directory_times = Vec::new();
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let applied = apply_entry(&mut entry, &name, root, &mut directory_times)?;
        summary.entries += 1;
        summary.file_bytes += applied;
    }
    // Last, because creating entries in a directory moves its mtime.
    for (path, mtime, name) in directory_times {
        set_mtime(&path, mtime).map_err(|e| apply_error(&name, "setting its mtime", e))?;
    }
    Ok(summary)
}

/// Applies one entry and returns the file bytes it wrote.
fn apply_entry<R: Read>(
    entry: &mut tar::Entry<R>,
    name: &str,
    root: &Path,
    directory_times: &mut Vec<(PathBuf, u64, String)>,
) -> Result<u64, UnpackError> {
    // Owned: reading the entry's PAX records below needs it mutably.
    let header = entry.header().clone();
    let kind = header.entry_type();
    if kind == EntryType::XGlobalHeader {
        return Ok(0);
    }
    let relative = confine(&entry.path().map_err(UnpackError::Read)?, name)?;
    let malformed = |e: io::Error| refused(name, format!("malformed header: {e}"));
    let mode = header.mode().map_err(malformed)? & 0o7777;
    let uid = header.uid().map_err(malformed)?;
    let gid = header.gid().map_err(malformed)?;
    let mtime = header.mtime().map_err(malformed)?;

    if relative.as_os_str().is_empty() {
        // The layer's "./": only its metadata can apply.
        if kind != EntryType::Directory {
            return Err(refused(name, "entry would replace the root".into()));
        }
        set_owner_and_mode(root, name, uid, gid, mode)?;
        directory_times.push((root.to_path_buf(), mtime, name.to_string()));
        return Ok(0);
    }

    make_parents(root, &relative, name)?;
    let path = root.join(&relative);
    let file_name = relative.file_name().unwrap_or_default().as_bytes();
    if file_name == OPAQUE_MARKER.as_bytes() {
        let directory = path.parent().unwrap_or(root);
        xattr::set(directory, OVERLAY_OPAQUE_XATTR, b"y")
            .map_err(|e| apply_error(name, "marking its directory opaque", e))?;
        return Ok(0);
    }
    if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        if hidden.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            // Other `.wh..wh.` names are aufs bookkeeping with no meaning here.
            return Ok(0);
        }
        if matches!(hidden, b"" | b"." | b"..") {
            return Err(refused(name, "whiteout of an invalid name".into()));
        }
        let target = path.with_file_name(OsStr::from_bytes(hidden));
        clear(&target, false).map_err(|e| apply_error(name, "removing what it hides", e))?;
        mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
            .map_err(|e| apply_error(name, "creating the overlay whiteout", e.into()))?;
        return Ok(0);
    }

    let xattrs = pax_xattrs(entry, name)?;
    let mut written = 0;
    match kind {
        EntryType::Directory => {
            clear(&path, true).map_err(|e| apply_error(name, "replacing what was there", e))?;
            if !path.is_dir() {
                DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(|e| apply_error(name, "creating the directory", e))?;
            }
        }
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            clear(&path, false).map_err(|e| apply_error(name, "replacing what was there", e))?;
            written = write_file(entry, &path, name)?;
        }
        EntryType::Symlink => {
            let target = entry
                .link_name()
                .map_err(malformed)?
                .ok_or_else(|| refused(name, "symlink without a target".into()))?;
            clear(&path, false).map_err(|e| apply_error(name, "replacing what was there", e))?;
            // Stored as written: it resolves inside the container's root at
            // run time, and nothing here ever follows it.
            std::os::unix::fs::symlink(&target, &path)
                .map_err(|e| apply_error(name, "creating the symlink", e))?;
        }
        EntryType::Link => {
            let target = entry
                .link_name()
                .map_err(malformed)?
                .ok_or_else(|| refused(name, "hard link without a target".into()))?;
            link(root, &target, &relative, name)?;
            // The inode and its metadata belong to the target's entry.
            return Ok(0);
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let node_kind = match kind {
                EntryType::Char => SFlag::S_IFCHR,
                EntryType::Block => SFlag::S_IFBLK,
                _ => SFlag::S_IFIFO,
            };
            let major = header.device_major().map_err(malformed)?.unwrap_or(0);
            let minor = header.device_minor().map_err(malformed)?.unwrap_or(0);
            clear(&path, false).map_err(|e| apply_error(name, "replacing what was there", e))?;
            mknod(
                &path,
                node_kind,
                Mode::from_bits_truncate(mode),
                makedev(major.into(), minor.into()),
            )
            .map_err(|e| apply_error(name, "creating the device node", e.into()))?;
        }
        other => {
            return Err(refused(name, format!("unsupported entry type {other:?}")));
        }
    }

    if kind == EntryType::Symlink {
        chown(&path, uid, gid).map_err(|e| apply_error(name, "setting its owner", e))?;
    } else {
        // Owner first: chown clears set-id bits and security.capability.
        chown(&path, uid, gid).map_err(|e| apply_error(name, "setting its owner", e))?;
        for (key, value) in &xattrs {
            xattr::set(&path, key, value)
                .map_err(|e| apply_error(name, "setting an extended attribute", e))?;
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| apply_error(name, "setting its mode", e))?;
    }
    if kind == EntryType::Directory {
        directory_times.push((path, mtime, name.to_string()));
    } else {
        set_mtime(&path, mtime).map_err(|e| apply_error(name, "setting its mtime", e))?;
    }
    Ok(written)
}

/// The entry's path relative to the root, or a refusal when it would
/// leave it.
pub(crate) fn confine(raw: &Path, name: &str) -> Result<PathBuf, UnpackError> {
    let mut relative = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(name, "absolute path".into()))
            }
            Component::ParentDir => {
                return Err(refused(name, "'..' would climb out of the root".into()))
            }
        }
    }
    Ok(relative)
}

/// Creates the missing directories above `relative`, refusing to pass
/// through a symlink (which could point anywhere on the host).
fn make_parents(root: &Path, relative: &Path, name: &str) -> Result<(), UnpackError> {
    let Some(parent) = relative.parent() else {
        return Ok(());
    };
    let mut current = root.to_path_buf();
    for component in parent.components() {
        current.push(component);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(refused(
                    name,
                    format!(
                        "{} is a symlink, and writing through it could escape the root",
                        display_relative(root, &current)
                    ),
                ))
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(refused(
                    name,
                    format!("{} is not a directory", display_relative(root, &current)),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .mode(0o755)
                    .create(&current)
                    .map_err(|e| apply_error(name, "creating a parent directory", e))?;
            }
            Err(e) => return Err(apply_error(name, "inspecting a parent directory", e)),
        }
    }
    Ok(())
}

/// Links `relative` to `target`, which must be a non-directory this layer
/// has already unpacked.
fn link(root: &Path, target: &Path, relative: &Path, name: &str) -> Result<(), UnpackError> {
    let target_relative = confine(target, name).map_err(|e| match e {
        UnpackError::Refused { entry, reason } => UnpackError::Refused {
            entry,
            reason: format!("hard link target {}: {reason}", target.display()),
        },
        other => other,
    })?;
    if target_relative.as_os_str().is_empty() || target_relative == relative {
        return Err(refused(name, "hard link to itself or to the root".into()));
    }
    let mut current = root.to_path_buf();
    for component in target_relative.components() {
        let is_last = current.join(component) == root.join(&target_relative);
        current.push(component);
        match fs::symlink_metadata(&current) {
            Ok(meta) if !is_last && !meta.is_dir() => {
                return Err(refused(
                    name,
                    format!(
                        "hard link target {} passes through {}, which is not a directory",
                        target.display(),
                        display_relative(root, &current)
                    ),
                ))
            }
            Ok(meta) if is_last && meta.is_dir() => {
                return Err(refused(name, "hard link to a directory".into()))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(refused(
                    name,
                    format!("hard link target {} is not in this layer", target.display()),
                ))
            }
            Err(e) => return Err(apply_error(name, "inspecting the hard link target", e)),
        }
    }
    let path = root.join(relative);
    clear(&path, false).map_err(|e| apply_error(name, "replacing what was there", e))?;
    // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked itself,
    // never followed.
    fs::hard_link(&current, &path).map_err(|e| apply_error(name, "creating the hard link", e))
}

fn write_file<R: Read>(
    entry: &mut tar::Entry<R>,
    path: &Path,
    name: &str,
) -> Result<u64, UnpackError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| apply_error(name, "creating the file", e))?;
    let mut buffer = vec![0u8; 128 * 1024];
    let mut written = 0u64;
    loop {
        let n = match entry.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(UnpackError::Read(io::Error::new(
                    e.kind(),
                    format!("in the data of {name:?}: {e}"),
                )))
            }
        };
        file.write_all(&buffer[..n])
            .map_err(|e| apply_error(name, "writing the file", e))?;
        written += n as u64;
    }
    Ok(written)
}

pub(crate) fn pax_xattrs<R: Read>(
    entry: &mut tar::Entry<R>,
    name: &str,
) -> Result<Vec<(String, Vec<u8>)>, UnpackError> {
    let mut xattrs = Vec::new();
    let Some(extensions) = entry
        .pax_extensions()
        .map_err(|e| refused(name, format!("malformed PAX header: {e}")))?
    else {
        return Ok(xattrs);
    };
    for extension in extensions {
        let extension =
            extension.map_err(|e| refused(name, format!("malformed PAX record: {e}")))?;
        let Ok(key) = extension.key() else { continue };
        if let Some(attribute) = key.strip_prefix(PAX_XATTR_PREFIX) {
            if attribute.starts_with(RESERVED_XATTR_PREFIX) {
                return Err(refused(
                    name,
                    format!("sets the reserved extended attribute {attribute}"),
                ));
            }
            xattrs.push((attribute.to_string(), extension.value_bytes().to_vec()));
        }
    }
    Ok(xattrs)
}

/// Removes whatever is at `path` (keeping a directory when `keep_directory`),
/// so the entry can take its place as later layers' entries do.
fn clear(path: &Path, keep_directory: bool) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => {
            if keep_directory {
                Ok(())
            } else {
                fs::remove_dir_all(path)
            }
        }
        Ok(_) => fs::remove_file(path),
    }
}

fn chown(path: &Path, uid: u64, gid: u64) -> io::Result<()> {
    let to_id = |id: u64| {
        u32::try_from(id).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "id too large"))
    };
    fchownat(
        None,
        path,
        Some(Uid::from_raw(to_id(uid)?)),
        Some(Gid::from_raw(to_id(gid)?)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)
}

fn set_owner_and_mode(
    path: &Path,
    name: &str,
    uid: u64,
    gid: u64,
    mode: u32,
) -> Result<(), UnpackError> {
    chown(path, uid, gid).map_err(|e| apply_error(name, "setting its owner", e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| apply_error(name, "setting its mode", e))
}

fn set_mtime(path: &Path, mtime: u64) -> io::Result<()> {
    let seconds = i64::try_from(mtime).unwrap_or(i64::MAX);
    let time = TimeSpec::new(seconds, 0);
    utimensat(None, path, &time, &time, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

fn display_relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

pub(crate) fn refused(name: &str, reason: String) -> UnpackError {
    UnpackError::Refused {
        entry: name.to_string(),
        reason,
    }
}

pub(crate) fn apply_error(name: &str, what: &'static str, source: io::Error) -> UnpackError {
    UnpackError::Apply {
        entry: name.to_string(),
        what,
        source,
    }
}
