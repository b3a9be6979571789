//! Named persistent volumes: `ROOT/NAME/disk.ext4`, an ext4 file system in
//! a sparse file, with `ROOT/NAME/volume.json` beside it. A group attaches
//! one as a virtio-blk disk; the volume outlives groups until removed.
//! Made with mkfs.ext4 (e2fsprogs) on a fresh file, the only file system
//! tool the host runs: growing a volume grows its file, and the guest's
//! kernel grows the file system online when the agent mounts it
//! (`capsa-agent`'s `disks::grow_ext4`). Nothing on the host parses what
//! a guest wrote.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

const IMAGE: &str = "disk.ext4";
const RECORD: &str = "volume.json";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("no volume {0:?} (capsa volume create {0} --size MIB)")]
    NotFound(String),
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("{0:?} is not a valid volume name")]
    InvalidName(String),
    #[error("volume {name:?}: {size_mib} MiB is {why}")]
    BadSize {
        name: String,
        size_mib: u64,
        why: &'static str,
    },
    #[error("volume {name:?}: {what}: {source}")]
    Io {
        name: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {name:?}: {tool} failed: {output}")]
    Tool {
        name: String,
        tool: &'static str,
        output: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    pub size_bytes: u64,
    /// Unix milliseconds.
    pub created_at: u64,
}

pub struct VolumeStore {
    root: PathBuf,
}

/// Smallest volume with room for an ext4 journal.
pub const MIN_MIB: u64 = 8;
/// Largest volume one request may ask for (1 TiB).
pub const MAX_MIB: u64 = 1 << 20;

impl VolumeStore {
    pub fn open(root: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(root)?;
        Ok(VolumeStore {
            root: root.to_path_buf(),
        })
    }

    /// The disk image a VMM attaches.
    pub fn image(&self, name: &str) -> Result<PathBuf, VolumeError> {
        let path = self.dir(name)?.join(IMAGE);
        if path.is_file() {
            Ok(path)
        } else {
            Err(VolumeError::NotFound(name.to_string()))
        }
    }

    pub fn get(&self, name: &str) -> Result<Volume, VolumeError> {
        let path = self.dir(name)?.join(RECORD);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VolumeError::NotFound(name.to_string()))
            }
            Err(source) => return Err(io(name, "reading its record", source)),
        };
        serde_json::from_slice(&text).map_err(|e| io(name, "reading its record", e.into()))
    }

    pub fn list(&self) -> Result<Vec<Volume>, VolumeError> {
        let entries = fs::read_dir(&self.root).map_err(|e| io("*", "listing volumes", e))?;
        let mut volumes: Vec<Volume> = entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| self.get(&entry.file_name().to_string_lossy()).ok())
            .collect();
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(volumes)
    }

    /// Makes an empty ext4 volume of `size_mib`. A half-made volume (say
    /// mkfs failed) leaves nothing behind.
    pub fn create(&self, name: &str, size_mib: u64) -> Result<Volume, VolumeError> {
        check_size(name, size_mib)?;
        let dir = self.dir(name)?;
        if dir.exists() {
            return Err(VolumeError::Exists(name.to_string()));
        }
        let staging = self.root.join(format!(".{name}.new"));
        let _ = fs::remove_dir_all(&staging);
        let made = (|| {
            fs::create_dir_all(&staging).map_err(|e| io(name, "creating its directory", e))?;
            make_ext4(name, &staging.join(IMAGE), size_mib)?;
            let volume = Volume {
                name: name.to_string(),
                size_bytes: size_mib << 20,
                created_at: now_ms(),
            };
            write_record(&staging, &volume)?;
            fs::rename(&staging, &dir).map_err(|e| io(name, "committing it", e))?;
            Ok(volume)
        })();
        if made.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        made
    }

    /// Grows a volume (not attached anywhere) to `size_mib`: its file;
    /// its file system follows at the next mount, in the guest. Shrinking
    /// is refused: data could be lost.
    pub fn grow(&self, name: &str, size_mib: u64) -> Result<Volume, VolumeError> {
        check_size(name, size_mib)?;
        let mut volume = self.get(name)?;
        let new_size = size_mib << 20;
        if new_size < volume.size_bytes {
            return Err(VolumeError::BadSize {
                name: name.to_string(),
                size_mib,
                why: "smaller than the volume: volumes only grow",
            });
        }
        let image = self.image(name)?;
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .map_err(|e| io(name, "opening its image", e))?;
        file.set_len(new_size)
            .map_err(|e| io(name, "growing its image", e))?;
        drop(file);
        volume.size_bytes = new_size;
        write_record(&self.dir(name)?, &volume)?;
        Ok(volume)
    }

    /// Deletes the volume and its data.
    pub fn remove(&self, name: &str) -> Result<(), VolumeError> {
        self.get(name)?;
        fs::remove_dir_all(self.dir(name)?).map_err(|e| io(name, "removing it", e))
    }

    fn dir(&self, name: &str) -> Result<PathBuf, VolumeError> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-');
        if !valid {
            return Err(VolumeError::InvalidName(name.to_string()));
        }
        Ok(self.root.join(name))
    }
}

fn check_size(name: &str, size_mib: u64) -> Result<(), VolumeError> {
    let why = if size_mib < MIN_MIB {
        "below the minimum of 8 MiB"
    } else if size_mib > MAX_MIB {
        "above the maximum of 1 TiB"
    } else {
        return Ok(());
    };
    Err(VolumeError::BadSize {
        name: name.to_string(),
        size_mib,
        why,
    })
}

fn write_record(dir: &Path, volume: &Volume) -> Result<(), VolumeError> {
    let text = serde_json::to_vec_pretty(volume)
        .map_err(|e| io(&volume.name, "writing its record", e.into()))?;
    let temp = dir.join(".volume.json.tmp");
    fs::write(&temp, text)
        .and_then(|()| fs::rename(&temp, dir.join(RECORD)))
        .map_err(|e| io(&volume.name, "writing its record", e))
}

fn run(name: &str, tool: &'static str, args: &[&str], image: &Path) -> Result<(), VolumeError> {
    let output = Command::new(tool)
        .args(args)
        .arg(image)
        .output()
        .map_err(|e| io(name, &format!("running {tool} (e2fsprogs)"), e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(VolumeError::Tool {
            name: name.to_string(),
            tool,
            output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

fn io(name: &str, what: &str, source: std::io::Error) -> VolumeError {
    VolumeError::Io {
        name: name.to_string(),
        what: what.to_string(),
        source,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
/// Makes `image` a sparse file of `size_mib` holding an empty ext4 file
/// system (owned by root, nothing reserved). `name` names it in errors.
/// Only ever run on an image nothing has written yet.
pub fn make_ext4(name: &str, image: &Path, size_mib: u64) -> Result<(), VolumeError> {
    let _ = fs::remove_file(image);
    let file = fs::File::create(image).map_err(|e| io(name, "creating its image", e))?;
    file.set_len(size_mib << 20)
        .map_err(|e| io(name, "sizing its image", e))?;
    drop(file);
    run(
        name,
        "mkfs.ext4",
        // Lazy init: a large sparse image is made in a moment and stays
        // sparse.
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-m",
            "0",
            "-E",
            "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1",
        ],
        image,
    )
}
