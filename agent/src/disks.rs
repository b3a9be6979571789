//! The VM's virtio disks, found by serial (the VMM's id=), and the image
//! layers among them: EROFS images mounted read-only, once each, where
//! containers stack them as overlay lower layers.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, MsFlags};

use crate::errors::ApiError;

/// Where the containers' writable layers live (the runtime's state
/// directory); the scratch disk is mounted here.
pub const CONTAINERS_DIR: &str = "/run/capsa/containers";
/// Where layer disks are mounted, one directory per serial.
const LAYER_DISKS_DIR: &str = "/run/capsa/layer-disks";
/// How long a disk found empty gets to show its size.
const SIZE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest serial virtio-blk reports.
const MAX_SERIAL: usize = 20;

/// The /dev node of the virtio disk whose serial is `serial`.
pub fn find(serial: &str) -> Option<PathBuf> {
    for entry in fs::read_dir("/sys/block").ok()?.flatten() {
        let name = entry.file_name();
        let found = fs::read_to_string(entry.path().join("serial"))
            .map(|s| s.trim() == serial)
            .unwrap_or(false);
        if found {
            return Some(Path::new("/dev").join(name));
        }
    }
    None
}

/// The size in bytes of the disk `device` (/dev/vdX), from sysfs.
pub fn size_bytes(device: &Path) -> Option<u64> {
    let name = device.file_name()?;
    let sectors = fs::read_to_string(Path::new("/sys/class/block").join(name).join("size")).ok()?;
    sectors.trim().parse::<u64>().ok()?.checked_mul(512)
}

// EXT4_IOC_RESIZE_FS: grow a mounted ext4 to a block count.
nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

/// Grows the ext4 mounted at `target` to fill its disk `device`, online,
/// in the guest's kernel: when the host grew a volume's file, the file
/// system follows at the next mount, and no host tool ever reads what a
/// guest wrote. A file system that already fills its disk is left as is.
pub fn grow_ext4(device: &Path, target: &Path) -> Result<(), String> {
    let disk = size_bytes(device).ok_or("cannot read the disk's size")?;
    let stat = nix::sys::statvfs::statvfs(target).map_err(|e| format!("statvfs: {e}"))?;
    let block = stat.fragment_size().max(1);
    let blocks = disk / block;
    let dir = fs::File::open(target).map_err(|e| format!("opening it: {e}"))?;
    // SAFETY: the ioctl reads one u64 from a live stack value; the fd is
    // the mounted file system's root directory, open for the call.
    unsafe { ext4_resize_fs(std::os::fd::AsRawFd::as_raw_fd(&dir), &blocks) }
        .map(drop)
        .map_err(|e| format!("resizing to {blocks} blocks of {block} bytes: {e}"))
}

/// The layer disks mounted so far.
#[derive(Default)]
pub struct LayerDisks {
    mounted: Mutex<HashMap<String, PathBuf>>,
}

impl LayerDisks {
    /// The mount points of the layer disks `serials` (in their order),
    /// mounting those not mounted yet.
    pub fn lower_dirs(&self, serials: &[String]) -> Result<Vec<PathBuf>, ApiError> {
        let mut mounted = self.mounted.lock().unwrap_or_else(|e| e.into_inner());
        serials
            .iter()
            .map(|serial| {
                if let Some(dir) = mounted.get(serial) {
                    return Ok(dir.clone());
                }
                let dir = mount_layer(serial)?;
                mounted.insert(serial.clone(), dir.clone());
                Ok(dir)
            })
            .collect()
    }
}

fn disk(what: &str, serial: &str) -> Result<PathBuf, ApiError> {
    let valid = !serial.is_empty()
        && serial.len() <= MAX_SERIAL
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid {
        return Err(ApiError::invalid(format!(
            "{what} serial {serial:?}: use 1 to {MAX_SERIAL} letters, digits or '-'"
        )));
    }
    let device = find(serial).ok_or_else(|| {
        ApiError::not_found(format!("{what} {serial}: no virtio disk has that serial"))
    })?;
    sized(device).map_err(|e| ApiError::precondition(format!("{what} {serial}: {e}")))
}

/// `device`, once the kernel knows its size. In a VM restored from a
/// template a disk takes an empty slot, and the kernel learns its size from
/// the configuration interrupt the restore raised: moments, not more.
pub fn sized(device: PathBuf) -> Result<PathBuf, String> {
    let deadline = std::time::Instant::now() + SIZE_PATIENCE;
    while size_bytes(&device) == Some(0) {
        if std::time::Instant::now() > deadline {
            return Err(format!("{} is empty", device.display()));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(device)
}

/// Mounts the scratch disk (an empty ext4 the host made) where the
/// containers' writable layers go, so they take disk, not memory.
pub fn mount_scratch(serial: &str) -> Result<(), ApiError> {
    let device = disk("scratch disk", serial)?;
    fs::create_dir_all(CONTAINERS_DIR)
        .map_err(|e| ApiError::internal(format!("scratch disk: creating {CONTAINERS_DIR}: {e}")))?;
    // noinit_itable: the host's file stays sparse.
    mount(
        Some(&device),
        CONTAINERS_DIR,
        Some("ext4"),
        MsFlags::empty(),
        Some("noinit_itable"),
    )
    .map_err(|e| {
        ApiError::invalid(format!(
            "scratch disk {serial}: mounting {} (ext4): {e}",
            device.display()
        ))
    })
}

/// Without a scratch disk (the spec asked for none), the writable layers
/// go to a tmpfs: guest memory, bounded by half of it.
pub fn mount_scratch_in_memory() -> Result<(), ApiError> {
    fs::create_dir_all(CONTAINERS_DIR)
        .map_err(|e| ApiError::internal(format!("creating {CONTAINERS_DIR}: {e}")))?;
    mount(
        Some("tmpfs"),
        CONTAINERS_DIR,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .map_err(|e| ApiError::internal(format!("mounting a tmpfs on {CONTAINERS_DIR}: {e}")))
}

// BLKFLSBUF: write back and drop a block device's cached blocks.
nix::ioctl_none!(blkflsbuf, 0x12, 97);

/// Drops what the guest's kernel cached of `device`: a disk the host
/// attached empty and filled later (the containerd shim's root
/// filesystem disks) was read at boot, when it held zeros.
fn drop_cached_blocks(device: &Path) -> Result<(), String> {
    let file = fs::File::open(device).map_err(|e| format!("opening it: {e}"))?;
    // SAFETY: the ioctl takes no argument; the fd is the open block device.
    unsafe { blkflsbuf(std::os::fd::AsRawFd::as_raw_fd(&file)) }
        .map(drop)
        .map_err(|e| format!("dropping its cached blocks: {e}"))
}

fn mount_layer(serial: &str) -> Result<PathBuf, ApiError> {
    let device = disk("layer disk", serial)?;
    drop_cached_blocks(&device)
        .map_err(|e| ApiError::internal(format!("layer disk {serial}: {e}")))?;
    let dir = Path::new(LAYER_DISKS_DIR).join(serial);
    fs::create_dir_all(&dir).map_err(|e| {
        ApiError::internal(format!(
            "layer disk {serial}: creating {}: {e}",
            dir.display()
        ))
    })?;
    mount(
        Some(&device),
        &dir,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| {
        ApiError::invalid(format!(
            "layer disk {serial}: mounting {} (erofs): {e}",
            device.display()
        ))
    })?;
    Ok(dir)
}
