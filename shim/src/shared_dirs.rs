//! Host directories a container binds (Kubernetes volumes: configMap,
//! secret, downwardAPI, the projected service-account token, emptyDir)
//! shared with the sandbox's VM by copy: the tree is packed as a tar and
//! the agent makes its directory `SHARED_DIRS_DIR/<name>` match it
//! (SyncDirectory), which the container bind-mounts. One copy per host
//! directory and pod, whichever containers bind it.
//!
//! - A read-only bind is kept in step: a watcher thread looks at each one's
//!   metadata every POLL and sends the tree again when it changed, so a
//!   ConfigMap update or a token rotation reaches the container within
//!   about POLL plus the copy.
//! - A read-write bind of pod scratch space (an emptyDir, `/dev/shm`) is
//!   copied once and then belongs to the pod inside the VM, shared by its
//!   containers, gone with it, as on a node.
//! - A read-write bind of any other host directory is refused: the
//!   container's writes would never reach the host.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsa_guest_client::{Guest, GuestError};
use capsa_protocol::{MAX_SHARED_DIR_BYTES, SHARED_DIRS_DIR};
use sha2::{Digest, Sha256};

use crate::rootfs;
use crate::spec::Bind;

/// How often read-only shared directories are looked at.
pub const POLL: Duration = Duration::from_millis(400);
/// The most entries a shared directory may have.
pub const MAX_ENTRIES: usize = 100_000;
/// Where kubelet keeps a pod's emptyDir volumes (a path component).
const EMPTY_DIR_PLUGIN: &str = "kubernetes.io~empty-dir";

#[derive(Debug, thiserror::Error)]
pub enum SharedDirError {
    #[error(
        "{destination}: the host directory {source} is bound read-write, and Capsa shares host \
         directories with the VM by copy, host to guest, so the container's writes would never \
         reach the host; bind it read-only, or use pod scratch space (an emptyDir)",
        destination = .destination.display(),
        source = .host.display()
    )]
    Writable { host: PathBuf, destination: PathBuf },
    #[error("copying the host directory {}: {error}", .host.display())]
    Copy { host: PathBuf, error: io::Error },
    #[error("copying the host directory {} into the VM: {error}", .host.display())]
    Send { host: PathBuf, error: GuestError },
}

/// How a host directory is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Host to guest, again whenever the host's tree changes.
    Live,
    /// Copied once; the pod's own afterwards.
    PodLocal,
}

impl Sharing {
    pub fn of(bind: &Bind) -> Result<Sharing, SharedDirError> {
        if bind.read_only {
            return Ok(Sharing::Live);
        }
        let scratch = bind.destination == Path::new("/dev/shm")
            || bind
                .source
                .components()
                .any(|c| c.as_os_str() == EMPTY_DIR_PLUGIN);
        if scratch {
            Ok(Sharing::PodLocal)
        } else {
            Err(SharedDirError::Writable {
                host: bind.source.clone(),
                destination: bind.destination.clone(),
            })
        }
    }
}

struct Shared {
    name: String,
    sharing: Sharing,
    /// The tree's metadata as last sent.
    sent: [u8; 32],
    /// The last error the watcher logged, so each is logged once.
    failing: Option<String>,
}

/// The shared directories of one sandbox.
pub struct SharedDirs {
    dirs: Mutex<HashMap<PathBuf, Shared>>,
    /// Held while a tree is sent, so two sends of one directory do not
    /// interleave their chunks.
    sending: Mutex<()>,
    /// Dropped to stop the watcher.
    stop: Mutex<Option<Sender<()>>>,
}

impl Default for SharedDirs {
    fn default() -> Self {
        SharedDirs {
            dirs: Mutex::new(HashMap::new()),
            sending: Mutex::new(()),
            stop: Mutex::new(None),
        }
    }
}

/// The guest directory's name for host directory `source`.
fn name_for(source: &Path) -> String {
    let digest = Sha256::digest(source.as_os_str().as_encoded_bytes());
    hex::encode(digest)[..16].to_string()
}

impl SharedDirs {
    /// Copies the host directory of `bind` into the guest (unless this pod
    /// has it already) and returns where the container binds it from.
    /// `watcher` opens the watcher's own connection to the agent, the
    /// first time a directory is shared live.
    pub fn share(
        self: &Arc<Self>,
        guest: &Guest,
        bind: &Bind,
        watcher: impl FnOnce() -> Result<Guest, GuestError>,
    ) -> Result<PathBuf, SharedDirError> {
        let sharing = Sharing::of(bind)?;
        let source = &bind.source;
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = dirs.get_mut(source) {
            // Writes in the guest must not be overwritten by the host's tree.
            if sharing == Sharing::PodLocal {
                shared.sharing = Sharing::PodLocal;
            }
            return Ok(Path::new(SHARED_DIRS_DIR).join(&shared.name));
        }
        let name = name_for(source);
        let sent = self.send(guest, &name, source)?;
        dirs.insert(
            source.clone(),
            Shared {
                name: name.clone(),
                sharing,
                sent,
                failing: None,
            },
        );
        drop(dirs);
        if sharing == Sharing::Live {
            self.watch(watcher);
        }
        Ok(Path::new(SHARED_DIRS_DIR).join(name))
    }

    /// Sends the tree at `source` as shared directory `name`; returns the
    /// fingerprint it had before packing (a change during packing is
    /// caught by the next look).
    fn send(&self, guest: &Guest, name: &str, source: &Path) -> Result<[u8; 32], SharedDirError> {
        let copy_error = |error| SharedDirError::Copy {
            host: source.to_path_buf(),
            error,
        };
        let before = fingerprint(source).map_err(copy_error)?;
        let meta = fs::metadata(source).map_err(copy_error)?;
        let mut tree = Bounded::default();
        rootfs::pack(source, &[], &mut tree).map_err(copy_error)?;
        let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        guest
            .sync_directory(
                name,
                (meta.mode() & 0o7777, meta.uid(), meta.gid()),
                &tree.bytes,
            )
            .map_err(|error| SharedDirError::Send {
                host: source.to_path_buf(),
                error,
            })?;
        Ok(before)
    }

    /// Starts the watcher, unless it runs.
    fn watch(self: &Arc<Self>, connect: impl FnOnce() -> Result<Guest, GuestError>) {
        let mut stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        if stop.is_some() {
            return;
        }
        let guest = match connect() {
            Ok(guest) => guest,
            Err(e) => {
                log::warn!("shared directories will not follow the host's changes: {e}");
                return;
            }
        };
        let (sender, stopped) = mpsc::channel::<()>();
        *stop = Some(sender);
        let this = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("shared-dirs".into())
            .spawn(move || loop {
                match stopped.recv_timeout(POLL) {
                    Err(RecvTimeoutError::Timeout) => this.look(&guest),
                    _ => return,
                }
            });
        if let Err(e) = spawned {
            log::warn!("shared directories will not follow the host's changes: {e}");
            *stop = None;
        }
    }

    /// Sends again each live directory whose tree changed.
    fn look(&self, guest: &Guest) {
        let live: Vec<(PathBuf, String, [u8; 32])> = self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, s)| s.sharing == Sharing::Live)
            .map(|(source, s)| (source.clone(), s.name.clone(), s.sent))
            .collect();
        for (source, name, sent) in live {
            let outcome = match fingerprint(&source) {
                Ok(now) if now == sent => continue,
                Ok(_) => self.send(guest, &name, &source),
                Err(error) => Err(SharedDirError::Copy {
                    host: source.clone(),
                    error,
                }),
            };
            let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
            let Some(shared) = dirs.get_mut(&source) else {
                continue;
            };
            match outcome {
                Ok(fingerprint) => {
                    if shared.failing.take().is_some() {
                        log::info!("{} is copied into the VM again", source.display());
                    }
                    shared.sent = fingerprint;
                }
                Err(e) => {
                    let message = e.to_string();
                    if shared.failing.as_deref() != Some(&message) {
                        log::warn!("{message} (tried again every {} ms)", POLL.as_millis());
                        shared.failing = Some(message);
                    }
                }
            }
        }
    }

    /// Stops the watcher (the sandbox is going away).
    pub fn stop(&self) {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// A digest of the tree's metadata (names, kinds, modes, owners, sizes,
/// times, symlink targets) without reading its files: what changes when
/// anything in it is written, renamed, replaced or removed.
pub fn fingerprint(root: &Path) -> io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut entries = 0usize;
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = root.join(&relative);
        let meta = fs::symlink_metadata(&dir)?;
        hash_meta(&mut hasher, &relative, &meta);
        let mut names: Vec<_> = fs::read_dir(&dir)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(io::Error::other(format!("over {MAX_ENTRIES} entries")));
            }
            let path = relative.join(&name);
            let full = root.join(&path);
            let meta = fs::symlink_metadata(&full)?;
            if meta.is_dir() {
                pending.push(path);
                continue;
            }
            hash_meta(&mut hasher, &path, &meta);
            if meta.file_type().is_symlink() {
                hasher.update(fs::read_link(&full)?.as_os_str().as_encoded_bytes());
            }
        }
    }
    Ok(hasher.finalize().into())
}

fn hash_meta(hasher: &mut Sha256, path: &Path, meta: &fs::Metadata) {
    hasher.update(path.as_os_str().as_encoded_bytes());
    hasher.update([0]);
    for n in [
        u64::from(meta.mode()),
        u64::from(meta.uid()),
        u64::from(meta.gid()),
        meta.size(),
        meta.ino(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
        meta.ctime() as u64,
        meta.ctime_nsec() as u64,
    ] {
        hasher.update(n.to_le_bytes());
    }
}

/// A tar in memory, refused past MAX_SHARED_DIR_BYTES.
#[derive(Default)]
struct Bounded {
    bytes: Vec<u8>,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if (self.bytes.len() + buf.len()) as u64 > MAX_SHARED_DIR_BYTES {
            return Err(io::Error::other(format!(
                "over the {} MiB a shared directory may hold",
                MAX_SHARED_DIR_BYTES >> 20
            )));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn bind(source: &str, destination: &str, read_only: bool) -> Bind {
        Bind {
            source: source.into(),
            destination: destination.into(),
            read_only,
        }
    }

    #[test]
    fn read_only_binds_are_live_scratch_is_the_pods_and_other_writable_dirs_are_refused() {
        let config = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/cfg";
        assert_eq!(
            Sharing::of(&bind(config, "/cfg", true)).unwrap(),
            Sharing::Live
        );
        let scratch = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache";
        assert_eq!(
            Sharing::of(&bind(scratch, "/cache", false)).unwrap(),
            Sharing::PodLocal
        );
        let shm = "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/x/shm";
        assert_eq!(
            Sharing::of(&bind(shm, "/dev/shm", false)).unwrap(),
            Sharing::PodLocal
        );
        let refused = Sharing::of(&bind("/srv/data", "/data", false))
            .unwrap_err()
            .to_string();
        assert!(
            refused.starts_with("/data: the host directory /srv/data is bound read-write"),
            "{refused}"
        );
    }

    #[test]
    fn the_fingerprint_changes_with_any_change_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("..v1")).unwrap();
        fs::write(root.join("..v1/key"), "a").unwrap();
        symlink("..v1", root.join("..data")).unwrap();
        let first = fingerprint(root).unwrap();
        assert_eq!(fingerprint(root).unwrap(), first);
        // kubelet's update: a new version, ..data switched by a rename.
        fs::create_dir(root.join("..v2")).unwrap();
        fs::write(root.join("..v2/key"), "b").unwrap();
        symlink("..v2", root.join("..tmp")).unwrap();
        fs::rename(root.join("..tmp"), root.join("..data")).unwrap();
        let second = fingerprint(root).unwrap();
        assert_ne!(second, first);
        fs::remove_dir_all(root.join("..v1")).unwrap();
        assert_ne!(fingerprint(root).unwrap(), second);
    }

    #[test]
    fn a_tree_over_the_bound_is_refused() {
        let mut tree = Bounded::default();
        let chunk = vec![0u8; 1 << 20];
        let written = (0..=MAX_SHARED_DIR_BYTES >> 20).try_for_each(|_| tree.write_all(&chunk));
        assert!(written.is_err());
        assert!(tree.bytes.len() as u64 <= MAX_SHARED_DIR_BYTES);
    }
}
