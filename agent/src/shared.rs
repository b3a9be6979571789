//! Host directories shared by copy (SyncDirectory): each arrives as a whole
//! tar, in chunks, and is applied to `SHARED_DIRS_DIR/<name>`, which
//! containers bind-mount. Applying unpacks into a staging directory beside
//! it, then moves each entry into place with a rename, so a reader never
//! sees a half-written file; and kubelet's layout for configMaps and
//! secrets (`..data` a symlink to a timestamped directory, each key a
//! symlink through it) switches versions at the rename of `..data`, as on
//! a node. Entries the new tree lacks are removed last.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use capsa_protocol::agent::SyncDirectoryRequest;
use capsa_protocol::{MAX_SHARED_DIR_BYTES, SHARED_DIRS_DIR};

use crate::errors::ApiError;

/// A tar being received.
struct Incoming {
    file: File,
    len: u64,
}

pub struct SharedDirs {
    root: PathBuf,
    incoming: Mutex<HashMap<String, Incoming>>,
}

impl Default for SharedDirs {
    fn default() -> Self {
        SharedDirs::at(PathBuf::from(SHARED_DIRS_DIR))
    }
}

fn io_error(what: String) -> impl FnOnce(io::Error) -> ApiError {
    move |e| ApiError::internal(format!("{what}: {e}"))
}

impl SharedDirs {
    pub fn at(root: PathBuf) -> Self {
        SharedDirs {
            root,
            incoming: Mutex::new(HashMap::new()),
        }
    }

    pub fn sync(&self, request: &SyncDirectoryRequest) -> Result<(), ApiError> {
        let name = request.name.as_str();
        validate_name(name)?;
        let staging_root = self.root.join(".staging");
        let mut incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        if request.offset == 0 {
            fs::create_dir_all(&staging_root)
                .map_err(io_error(format!("creating {}", staging_root.display())))?;
            let path = staging_root.join(format!("{name}.tar"));
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io_error(format!("creating {}", path.display())))?;
            // Unlinked at once: nothing is left if the host never finishes.
            let _ = fs::remove_file(&path);
            incoming.insert(name.to_string(), Incoming { file, len: 0 });
        }
        let Some(tar) = incoming.get_mut(name) else {
            return Err(ApiError::precondition(format!(
                "shared directory {name}: a chunk at offset {} before one at 0",
                request.offset
            )));
        };
        if tar.len != request.offset {
            let len = tar.len;
            incoming.remove(name);
            return Err(ApiError::invalid(format!(
                "shared directory {name}: a chunk at offset {}, expected {len}",
                request.offset
            )));
        }
        let len = tar.len + request.data.len() as u64;
        if len > MAX_SHARED_DIR_BYTES {
            incoming.remove(name);
            return Err(ApiError::exhausted(format!(
                "shared directory {name}: over {MAX_SHARED_DIR_BYTES} bytes"
            )));
        }
        tar.file.write_all(&request.data).map_err(io_error(format!(
            "shared directory {name}: writing its tar"
        )))?;
        tar.len = len;
        if !request.last {
            return Ok(());
        }
        let Some(Incoming { mut file, .. }) = incoming.remove(name) else {
            return Ok(());
        };
        drop(incoming);
        file.rewind()
            .map_err(io_error(format!("shared directory {name}: its tar")))?;
        let staging = staging_root.join(name);
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging)
            .map_err(io_error(format!("creating {}", staging.display())))?;
        let applied = unpack(file, &staging).and_then(|()| {
            let target = self.root.join(name);
            fs::create_dir_all(&target)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(request.mode & 0o7777))?;
            std::os::unix::fs::lchown(&target, Some(request.uid), Some(request.gid))?;
            mirror(&staging, &target)
        });
        let _ = fs::remove_dir_all(&staging);
        applied.map_err(io_error(format!("shared directory {name}: applying it")))
    }
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{name:?} is not a shared directory name ([a-z0-9], 1 to 64)"
        )))
    }
}

fn unpack(tar: File, into: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(tar);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.unpack(into)
}

/// Every path under `root`, relative to it.
fn relative_paths(root: &Path) -> io::Result<HashSet<PathBuf>> {
    let mut found = HashSet::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        for entry in fs::read_dir(root.join(&relative))? {
            let entry = entry?;
            let path = relative.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                pending.push(path.clone());
            }
            found.insert(path);
        }
    }
    Ok(found)
}

fn sorted_names(dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    let mut names = fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<Vec<_>, _>>()?;
    names.sort();
    Ok(names)
}

/// Makes `target` hold what `staging` holds, moving entries out of
/// `staging` (same file system) in name order, then removing what only
/// `target` has.
fn mirror(staging: &Path, target: &Path) -> io::Result<()> {
    let keep = relative_paths(staging)?;
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let mut subdirs = Vec::new();
        for name in sorted_names(&staging.join(&relative))? {
            let path = relative.join(&name);
            let from = staging.join(&path);
            let to = target.join(&path);
            let from_meta = fs::symlink_metadata(&from)?;
            match fs::symlink_metadata(&to) {
                Ok(to_meta) if from_meta.is_dir() && to_meta.is_dir() => {
                    fs::set_permissions(&to, from_meta.permissions())?;
                    {
                        use std::os::unix::fs::MetadataExt;
                        std::os::unix::fs::lchown(
                            &to,
                            Some(from_meta.uid()),
                            Some(from_meta.gid()),
                        )?;
                    }
                    subdirs.push(path);
                    continue;
                }
                Ok(to_meta) if to_meta.is_dir() => fs::remove_dir_all(&to)?,
                Ok(_) if from_meta.is_dir() => fs::remove_file(&to)?,
                _ => {}
            }
            fs::rename(&from, &to)?;
        }
        pending.extend(subdirs.into_iter().rev());
    }
    // What the new tree lacks, deepest first.
    let mut stale: Vec<PathBuf> = relative_paths(target)?
        .into_iter()
        .filter(|path| !keep.contains(path))
        .collect();
    stale.sort_by_key(|path| std::cmp::Reverse(path.components().count()));
    for path in stale {
        let full = target.join(&path);
        match fs::symlink_metadata(&full) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&full)?,
            Ok(_) => fs::remove_file(&full)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A tar of the tree `build` makes, as the host packs one.
    fn tar_of(build: impl FnOnce(&Path)) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path());
        let mut builder = tar::Builder::new(Vec::new());
        builder.follow_symlinks(false);
        builder.append_dir_all(".", dir.path()).unwrap();
        builder.into_inner().unwrap()
    }

    fn send(shared: &SharedDirs, name: &str, tar: &[u8], chunk: usize) -> Result<(), ApiError> {
        let chunks: Vec<&[u8]> = tar.chunks(chunk).collect();
        for (i, data) in chunks.iter().enumerate() {
            shared.sync(&SyncDirectoryRequest {
                name: name.to_string(),
                offset: (i * chunk) as u64,
                data: data.to_vec(),
                last: i + 1 == chunks.len(),
                mode: 0o755,
                ..Default::default()
            })?;
        }
        Ok(())
    }

    /// kubelet's atomic writer: files in a timestamped directory, `..data`
    /// pointing at it, each key a symlink through `..data`.
    fn config_map(root: &Path, version: &str, keys: &[(&str, &str)]) {
        let dated = format!("..{version}");
        fs::create_dir(root.join(&dated)).unwrap();
        for (key, value) in keys {
            fs::write(root.join(&dated).join(key), value).unwrap();
            symlink(format!("..data/{key}"), root.join(key)).unwrap();
        }
        symlink(&dated, root.join("..data")).unwrap();
    }

    #[test]
    fn a_config_map_update_replaces_the_old_version() {
        let root = tempfile::tempdir().unwrap();
        let shared = SharedDirs::at(root.path().to_path_buf());
        let first = tar_of(|d| config_map(d, "v1", &[("color", "red"), ("size", "big")]));
        send(&shared, "cm", &first, 100).unwrap();
        let dir = root.path().join("cm");
        assert_eq!(fs::read_to_string(dir.join("color")).unwrap(), "red");
        let second = tar_of(|d| config_map(d, "v2", &[("color", "blue")]));
        send(&shared, "cm", &second, 1 << 20).unwrap();
        assert_eq!(fs::read_to_string(dir.join("color")).unwrap(), "blue");
        assert!(!dir.join("size").exists() && !dir.join("..v1").exists());
        assert_eq!(
            fs::read_link(dir.join("..data")).unwrap(),
            Path::new("..v2")
        );
        assert!(!root.path().join(".staging/cm").exists());
    }

    #[test]
    fn a_directory_and_a_file_may_trade_places() {
        let root = tempfile::tempdir().unwrap();
        let shared = SharedDirs::at(root.path().to_path_buf());
        let first = tar_of(|d| {
            fs::create_dir_all(d.join("a/b")).unwrap();
            fs::write(d.join("a/b/c"), "1").unwrap();
            fs::write(d.join("x"), "file").unwrap();
        });
        send(&shared, "t", &first, 512).unwrap();
        let second = tar_of(|d| {
            fs::write(d.join("a"), "now a file").unwrap();
            fs::create_dir(d.join("x")).unwrap();
            fs::write(d.join("x/y"), "2").unwrap();
        });
        send(&shared, "t", &second, 512).unwrap();
        let dir = root.path().join("t");
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "now a file");
        assert_eq!(fs::read_to_string(dir.join("x/y")).unwrap(), "2");
    }

    #[test]
    fn bad_names_offsets_and_sizes_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let shared = SharedDirs::at(root.path().to_path_buf());
        for name in ["", "../x", "A", &"a".repeat(65)] {
            assert!(send(&shared, name, b"x", 1).is_err(), "{name:?}");
        }
        let request = |offset| SyncDirectoryRequest {
            name: "n".into(),
            offset,
            data: vec![0; 10],
            ..Default::default()
        };
        assert!(shared.sync(&request(10)).is_err(), "no chunk at 0 yet");
        shared.sync(&request(0)).unwrap();
        assert!(shared.sync(&request(5)).is_err(), "a gap");
        assert!(shared.sync(&request(10)).is_err(), "forgotten after a gap");
        let huge = SyncDirectoryRequest {
            name: "n".into(),
            data: vec![0; 1 << 20],
            ..Default::default()
        };
        shared.sync(&huge).unwrap();
        let mut offset = 1 << 20;
        let refused = loop {
            let next = SyncDirectoryRequest {
                offset,
                ..huge.clone()
            };
            match shared.sync(&next) {
                Ok(()) => offset += 1 << 20,
                Err(e) => break e,
            }
        };
        assert!(offset <= MAX_SHARED_DIR_BYTES, "{refused:?}");
        let corrupt = SyncDirectoryRequest {
            name: "c".into(),
            data: vec![0xff; 1024],
            last: true,
            ..Default::default()
        };
        assert!(shared.sync(&corrupt).is_err());
    }
}
