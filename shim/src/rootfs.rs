//! A container's root filesystem, from containerd's snapshot mounts into
//! the guest. The mounts are mounted on the bundle's rootfs/ (whatever the
//! snapshotter: overlay, bind, native), the tree is packed as one
//! uncompressed OCI layer and streamed to the agent, which verifies and
//! unpacks it like any image layer. The tree is read twice (once for its
//! digest, once to send), in a fixed order, so nothing is staged on disk
//! or in memory.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsa_guest_client::{Guest, GuestError, LayerBlob};
use containerd_shim::protos::api::Mount;
use sha2::{Digest, Sha256};

const MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("mounting the {kind} snapshot mount on {}: {message}", target.display())]
    Mount {
        kind: String,
        target: PathBuf,
        message: String,
    },
    #[error("packing the root filesystem {}: {source}", root.display())]
    Pack {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sending the root filesystem to the guest: {0}")]
    Send(#[from] GuestError),
}

/// What sending one root filesystem cost.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Mounts containerd's `mounts` in order on `target`; returns whether
/// anything was mounted (no mounts: the bundle's rootfs/ is the tree).
pub fn mount(mounts: &[Mount], target: &Path) -> Result<bool, RootfsError> {
    for m in mounts {
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        let kind = (!m.type_.is_empty()).then_some(m.type_.as_str());
        containerd_shim::mount::mount_rootfs(kind, source, &m.options, target).map_err(|e| {
            RootfsError::Mount {
                kind: m.type_.clone(),
                target: target.to_path_buf(),
                message: e.to_string(),
            }
        })?;
    }
    Ok(!mounts.is_empty())
}

/// Undoes `mount`; a target that is not mounted is no error.
pub fn unmount(target: &Path) {
    let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
}

/// A host file delivered inside the root filesystem at `destination`
/// (a bind mount of a file, such as CRI's /etc/hosts, which cannot be
/// mounted across the VM boundary). A copy: later changes on the host are
/// not seen.
#[derive(Debug, Clone)]
pub struct FileCopy {
    pub source: PathBuf,
    pub destination: PathBuf,
}

/// Host files larger than this are not copied into a root filesystem.
pub const MAX_FILE_COPY: u64 = 1 << 20;

/// Sends the tree at `root`, with `copies` added, as a base layer; returns
/// its chain id.
pub fn send(
    guest: &Guest,
    root: &Path,
    copies: &[FileCopy],
) -> Result<(String, Sent), RootfsError> {
    let started = Instant::now();
    let pack_error = |source| RootfsError::Pack {
        root: root.to_path_buf(),
        source,
    };
    let mut counter = HashingWriter::default();
    pack(root, copies, &mut counter).map_err(pack_error)?;
    let digest = format!("sha256:{}", hex::encode(counter.hasher.finalize()));
    let blob = LayerBlob {
        digest: &digest,
        diff_id: &digest,
        media_type: MEDIA_TYPE,
        size: counter.bytes,
    };
    let chain_id = std::thread::scope(|scope| {
        let (reader, writer) = io::pipe()?;
        let packer = scope.spawn(move || {
            let mut writer = writer;
            pack(root, copies, &mut writer)
        });
        let pushed = guest.push_layer_from(&blob, "", root, || Ok(reader));
        let packed = packer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the packing thread panicked")));
        match (pushed, packed) {
            (Ok(chain_id), _) => Ok(Ok(chain_id)),
            // The packer's error explains a short stream better.
            (Err(_), Err(e)) => Err(e),
            (Err(e), Ok(())) => Ok(Err(e)),
        }
    })
    .map_err(pack_error)??;
    Ok((
        chain_id,
        Sent {
            bytes: counter.bytes,
            elapsed: started.elapsed(),
        },
    ))
}

#[derive(Default)]
struct HashingWriter {
    hasher: Sha256,
    bytes: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the tree at `root` as a tar, a directory's entries in name
/// order before those of its subdirectories (parents first; and two
/// passes over an unchanged tree give the same bytes), symlinks as
/// symlinks, owners, modes and times kept; then `copies`, which replace
/// what the tree has at their destinations (a layer's later entry wins),
/// with any missing parent directories. Sockets cannot be archived and
/// mean nothing in a new VM; they are left out.
pub fn pack(root: &Path, copies: &[FileCopy], out: impl Write) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = root.join(&relative);
        let mut names: Vec<_> = fs::read_dir(&dir)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = relative.join(&name);
            let full = root.join(&path);
            let meta = fs::symlink_metadata(&full)?;
            let kind = meta.file_type();
            if kind.is_socket() {
                continue;
            }
            let appended = if kind.is_char_device() || kind.is_block_device() || kind.is_fifo() {
                append_special(&mut builder, &path, &meta)
            } else {
                builder.append_path_with_name(&full, &path)
            };
            appended.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            if kind.is_dir() {
                subdirs.push(path);
            }
        }
        // Pop takes the last: pushed reversed, subdirectories go in name order.
        pending.extend(subdirs.into_iter().rev());
    }
    for copy in copies {
        let relative = copy
            .destination
            .strip_prefix("/")
            .unwrap_or(&copy.destination);
        if relative.as_os_str().is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot copy {} onto /", copy.source.display()),
            ));
        }
        let ancestors: Vec<&Path> = relative.ancestors().skip(1).collect();
        for dir in ancestors.into_iter().rev() {
            if dir.as_os_str().is_empty() || root.join(dir).is_dir() {
                continue;
            }
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder.append_data(&mut header, dir, io::empty())?;
        }
        let mut file = fs::File::open(&copy.source)?;
        builder.append_file(relative, &mut file)?;
    }
    builder.into_inner()?.flush()
}

/// A device node or FIFO as a tar entry (tar's own append_path_with_name
/// names these by their host path, which an archive refuses).
fn append_special<W: Write>(
    builder: &mut tar::Builder<W>,
    name: &Path,
    meta: &fs::Metadata,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    let kind = meta.file_type();
    header.set_entry_type(if kind.is_char_device() {
        tar::EntryType::Char
    } else if kind.is_block_device() {
        tar::EntryType::Block
    } else {
        tar::EntryType::Fifo
    });
    let rdev = meta.rdev();
    header.set_device_major(nix::sys::stat::major(rdev) as u32)?;
    header.set_device_minor(nix::sys::stat::minor(rdev) as u32)?;
    header.set_size(0);
    builder.append_data(&mut header, name, io::empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn entries(tar_bytes: &[u8]) -> Vec<(String, tar::EntryType, u32)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let header = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    header.entry_type(),
                    header.mode().unwrap() & 0o7777,
                )
            })
            .collect()
    }

    #[test]
    fn a_tree_packs_in_name_order_and_the_same_twice() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("etc/ssl")).unwrap();
        fs::write(root.join("bin/busybox"), b"#!binary").unwrap();
        fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("busybox", root.join("bin/sh")).unwrap();
        symlink("/nonexistent", root.join("etc/dangling")).unwrap();
        fs::write(root.join("etc/hostname"), b"x\n").unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(root.join("etc/agent.sock")).unwrap();

        let mut first = Vec::new();
        pack(root, &[], &mut first).unwrap();
        let mut second = Vec::new();
        pack(root, &[], &mut second).unwrap();
        assert_eq!(first, second);

        let names: Vec<_> = entries(&first)
            .into_iter()
            .map(|(name, kind, mode)| format!("{name} {kind:?} {mode:o}"))
            .collect();
        assert_eq!(
            names,
            [
                "bin Directory 755",
                "etc Directory 755",
                "bin/busybox Regular 755",
                "bin/sh Symlink 777",
                "etc/dangling Symlink 777",
                "etc/hostname Regular 644",
                "etc/ssl Directory 755",
            ]
        );
    }

    #[test]
    fn device_nodes_and_fifos_are_entries_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("dev")).unwrap();
        nix::unistd::mkfifo(
            &root.join("dev/pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        // A real image's /dev/console; making one needs root, as the shim has.
        let console = nix::sys::stat::mknod(
            &root.join("dev/console"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(5, 1),
        );
        let mut tar = Vec::new();
        pack(root, &[], &mut tar).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let found: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                format!(
                    "{} {:?} {}:{}",
                    e.path().unwrap().display(),
                    h.entry_type(),
                    h.device_major().unwrap().unwrap_or(0),
                    h.device_minor().unwrap().unwrap_or(0)
                )
            })
            .collect();
        let mut wanted = vec!["dev Directory 0:0".to_string()];
        if console.is_ok() {
            wanted.push("dev/console Char 5:1".into());
        }
        wanted.push("dev/pipe Fifo 0:0".into());
        assert_eq!(found, wanted);
    }

    #[test]
    fn copied_files_come_last_with_their_missing_parents() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hosts"), b"from the image\n").unwrap();
        let hosts = dir.path().join("hosts");
        fs::write(&hosts, b"10.0.0.2 pod\n").unwrap();
        let copies = [
            FileCopy {
                source: hosts.clone(),
                destination: "/etc/hosts".into(),
            },
            FileCopy {
                source: hosts,
                destination: "/run/secrets/token".into(),
            },
        ];
        let mut bytes = Vec::new();
        pack(&root, &copies, &mut bytes).unwrap();
        let names: Vec<_> = entries(&bytes)
            .into_iter()
            .map(|(name, kind, _)| format!("{name} {kind:?}"))
            .collect();
        assert_eq!(
            names,
            [
                "etc Directory",
                "etc/hosts Regular",
                "etc/hosts Regular",
                "run Directory",
                "run/secrets Directory",
                "run/secrets/token Regular",
            ]
        );
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut last_hosts = String::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap() == Path::new("etc/hosts") {
                last_hosts.clear();
                io::Read::read_to_string(&mut entry, &mut last_hosts).unwrap();
            }
        }
        assert_eq!(last_hosts, "10.0.0.2 pod\n");
    }

    #[test]
    fn a_missing_copy_source_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let copies = [FileCopy {
            source: "/nonexistent/hosts".into(),
            destination: "/etc/hosts".into(),
        }];
        let err = pack(dir.path(), &copies, io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn an_unreadable_root_is_an_error() {
        let err = pack(Path::new("/nonexistent/rootfs"), &[], io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
