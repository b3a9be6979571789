//! Root filesystems on disks. A sandbox's VM boots with a few empty
//! read-only virtio disks (sparse files, serials `rootfs0`, `rootfs1`...):
//! slots. A container's root filesystem (the snapshot's tree, and the host
//! files copied into it) is written into a free slot as an EROFS image by
//! capsa-layers' converter, in this process, from the same tar stream the
//! streamed path sends; the agent mounts it as the container's read-only
//! lower layer, under a writable layer of its own. Nothing is copied over
//! vsock or unpacked in the guest's memory, and containers of one image
//! in a pod share its slot. A slot is filled once and never reused while
//! the VM runs (the guest may have cached its blocks). With no slot free,
//! or a tree larger than a slot, the caller streams the tree instead.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use capsa_vmm_config::DiskConfig;
use containerd_shim::protos::api::Mount;
use sha2::{Digest, Sha256};

use crate::rootfs::{self, FileCopy};

#[derive(Debug, thiserror::Error)]
pub enum RootfsDiskError {
    #[error("creating the root filesystem disk {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no root filesystem disk is free (all {0} hold other images)")]
    NoneFree(usize),
    #[error("writing the root filesystem into disk {serial}: {message}")]
    Write { serial: String, message: String },
}

/// The serial of slot `index`.
fn serial(index: usize) -> String {
    format!("rootfs{index}")
}

struct Slot {
    path: PathBuf,
    /// What it holds, once filled: the image's identity (None: a tree
    /// that cannot be told apart from others, never shared).
    filled: Option<Option<String>>,
}

pub struct RootfsDisks {
    slot_bytes: u64,
    slots: Mutex<Vec<Slot>>,
}

/// One root filesystem placed on a disk.
#[derive(Debug)]
pub struct Placed {
    pub serial: String,
    /// The image's size; 0 when an earlier container's image was reused.
    pub bytes: u64,
    pub elapsed: Duration,
}

impl RootfsDisks {
    /// Makes `count` empty slots of `slot_mib` in `dir`; returns them and
    /// the disks the VM boots with.
    pub fn create(
        dir: &Path,
        count: usize,
        slot_mib: u64,
    ) -> Result<(Self, Vec<DiskConfig>), RootfsDiskError> {
        let slot_bytes = slot_mib << 20;
        let mut slots = Vec::new();
        let mut disks = Vec::new();
        for index in 0..count {
            let path = dir.join(format!("{}.erofs", serial(index)));
            let made = File::create(&path).and_then(|f| f.set_len(slot_bytes));
            if let Err(source) = made {
                return Err(RootfsDiskError::Create { path, source });
            }
            disks.push(DiskConfig::at(&path, true, Some(serial(index))));
            slots.push(Slot { path, filled: None });
        }
        Ok((
            RootfsDisks {
                slot_bytes,
                slots: Mutex::new(slots),
            },
            disks,
        ))
    }

    /// Places the tree at `root` with `copies` on a slot: the one that
    /// already holds the same image (`identity`), or a free one, filled.
    pub fn place(
        &self,
        identity: Option<&str>,
        root: &Path,
        copies: &[FileCopy],
    ) -> Result<Placed, RootfsDiskError> {
        let started = Instant::now();
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(identity) = identity {
            let same = slots
                .iter()
                .position(|s| matches!(&s.filled, Some(Some(held)) if held == identity));
            if let Some(index) = same {
                return Ok(Placed {
                    serial: serial(index),
                    bytes: 0,
                    elapsed: started.elapsed(),
                });
            }
        }
        let count = slots.len();
        let index = slots
            .iter()
            .position(|s| s.filled.is_none())
            .ok_or(RootfsDiskError::NoneFree(count))?;
        let slot = &mut slots[index];
        let write_error = |message: String| RootfsDiskError::Write {
            serial: serial(index),
            message,
        };
        let file = File::options()
            .write(true)
            .open(&slot.path)
            .map_err(|e| write_error(e.to_string()))?;
        let bounded = Bounded {
            file,
            position: 0,
            limit: self.slot_bytes,
        };
        let converted = std::thread::scope(|scope| {
            let (reader, writer) = io::pipe().map_err(|e| format!("a pipe: {e}"))?;
            let packer = scope.spawn(move || {
                let mut writer = writer;
                rootfs::pack(root, copies, &mut writer)
            });
            let converted = capsa_layers::erofs::convert(reader, bounded);
            let packed = packer
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the packing thread panicked")));
            match (converted, packed) {
                (Ok(summary), Ok(())) => Ok(summary),
                // A converter that stopped leaves the packer a broken pipe.
                (Err(e), Err(p)) if p.kind() == io::ErrorKind::BrokenPipe => Err(e.to_string()),
                // Else the packer's error explains a short stream better.
                (_, Err(p)) => Err(format!("packing {}: {p}", root.display())),
                (Err(e), Ok(())) => Err(e.to_string()),
            }
        });
        let summary = match converted {
            Ok(summary) => summary,
            Err(message) => {
                // Whatever was written is garbage: the slot stays spoilt.
                slot.filled = Some(None);
                return Err(write_error(message));
            }
        };
        slot.filled = Some(identity.map(str::to_string));
        Ok(Placed {
            serial: serial(index),
            bytes: summary.image_bytes,
            elapsed: started.elapsed(),
        })
    }
}

/// The identity of the image under containerd's snapshot `mounts`: its
/// overlay lower directories (one per layer, shared by every container
/// of the image), with `copies`' destinations and contents. None for a
/// snapshot that is not a plain overlay of layers.
pub fn identity(mounts: &[Mount], copies: &[FileCopy]) -> Option<String> {
    let [mount] = mounts else {
        return None;
    };
    if mount.type_ != "overlay" {
        return None;
    }
    let lower = mount
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))?;
    // The container's own upper layer must hold nothing yet.
    if let Some(upper) = mount
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
    {
        let empty = fs::read_dir(upper).ok()?.next().is_none();
        if !empty {
            return None;
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(lower.as_bytes());
    for copy in copies {
        hasher.update([0]);
        hasher.update(copy.destination.as_os_str().as_encoded_bytes());
        hasher.update([0]);
        hasher.update(fs::read(&copy.source).ok()?);
    }
    Some(hex::encode(hasher.finalize()))
}

/// A slot file, refused past its size: the guest sees only that much.
struct Bounded {
    file: File,
    position: u64,
    limit: u64,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.position + buf.len() as u64 > self.limit {
            return Err(io::Error::other(format!(
                "the image is larger than a root filesystem disk ({} MiB; rootfs_disk_mib in the shim's config)",
                self.limit >> 20
            )));
        }
        let n = self.file.write(buf)?;
        self.position += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for Bounded {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.position = self.file.seek(to)?;
        Ok(self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("bin")).unwrap();
        fs::write(dir.path().join("bin/hello"), "#!/bin/sh\necho hi\n").unwrap();
        dir
    }

    #[test]
    fn an_image_is_written_once_and_shared_by_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (disks, configs) = RootfsDisks::create(dir.path(), 2, 4).unwrap();
        assert_eq!(configs.len(), 2);
        assert!(configs.iter().all(|c| c.read_only));
        assert_eq!(configs[1].id.as_deref(), Some("rootfs1"));
        let root = tree();
        let first = disks.place(Some("img"), root.path(), &[]).unwrap();
        assert_eq!(first.serial, "rootfs0");
        assert!(first.bytes > 0);
        // An EROFS superblock at 1024, and the slot keeps its size.
        let image = fs::read(dir.path().join("rootfs0.erofs")).unwrap();
        assert_eq!(image.len() as u64, 4 << 20);
        assert_eq!(&image[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
        let again = disks.place(Some("img"), root.path(), &[]).unwrap();
        assert_eq!((again.serial.as_str(), again.bytes), ("rootfs0", 0));
        let other = disks.place(None, root.path(), &[]).unwrap();
        assert_eq!(other.serial, "rootfs1");
        let full = disks.place(Some("third"), root.path(), &[]).unwrap_err();
        assert!(full.to_string().contains("all 2"), "{full}");
    }

    #[test]
    fn a_tree_larger_than_a_slot_is_refused_and_spoils_only_that_slot() {
        let dir = tempfile::tempdir().unwrap();
        let (disks, _) = RootfsDisks::create(dir.path(), 2, 1).unwrap();
        let root = tree();
        fs::write(root.path().join("big"), vec![7u8; 2 << 20]).unwrap();
        let err = disks.place(Some("big"), root.path(), &[]).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        fs::remove_file(root.path().join("big")).unwrap();
        let placed = disks.place(Some("small"), root.path(), &[]).unwrap();
        assert_eq!(placed.serial, "rootfs1");
    }

    #[test]
    fn only_an_overlay_of_layers_over_an_empty_upper_has_an_identity() {
        let upper = tempfile::tempdir().unwrap();
        let overlay = |upper: &Path| Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "workdir=/w".into(),
                format!("upperdir={}", upper.display()),
                "lowerdir=/l/2:/l/1".into(),
            ],
            ..Default::default()
        };
        let a = identity(&[overlay(upper.path())], &[]).unwrap();
        assert_eq!(identity(&[overlay(upper.path())], &[]).unwrap(), a);
        fs::write(upper.path().join("x"), "").unwrap();
        assert!(identity(&[overlay(upper.path())], &[]).is_none());
        let bind = Mount {
            type_: "bind".into(),
            source: "/snap".into(),
            ..Default::default()
        };
        assert!(identity(&[bind], &[]).is_none());
    }
}
