//! What PID 1 must do that no one else will: mount the kernel filesystems,
//! hold the console, reap orphans, and power the machine off.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::unistd::{chroot, dup2, sync};

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const BASIC_MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    // Terminals for containers (openpty) come from here.
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("ptmxmode=0666,mode=0620"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
    },
];

pub fn mount_basics() -> Result<()> {
    for m in BASIC_MOUNTS {
        std::fs::create_dir_all(m.target)
            .with_context(|| format!("cannot create mount point {}", m.target))?;
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            // Already mounted (the kernel may auto-mount devtmpfs).
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot mount {} on {}", m.fstype, m.target))
            }
        }
    }
    Ok(())
}

/// Makes /dev/console our stdin/stdout/stderr. The initramfs has no
/// /dev/console node, so the kernel could not give us one before devtmpfs.
pub fn attach_console() {
    if let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..=2 {
            let _ = dup2(console.as_raw_fd(), fd);
        }
    }
}

/// Waits until everything written to the console has left the UART.
pub fn drain_console() {
    let _ = nix::sys::termios::tcdrain(std::io::stdout());
}

pub fn power_off() -> Result<()> {
    sync();
    reboot(RebootMode::RB_POWER_OFF).context("reboot(RB_POWER_OFF) failed")?;
    Ok(())
}

/// Moves PID 1 off the kernel's initramfs (rootfs) onto a tmpfs of its
/// own, as switch_root does: pivot_root, which every container needs, is
/// refused while the namespace's root is rootfs. The initramfs files are
/// copied over and then removed to give their memory back.
pub fn leave_initramfs() -> Result<()> {
    const NEW_ROOT: &str = "/newroot";
    std::fs::create_dir_all(NEW_ROOT).context("cannot create /newroot")?;
    mount(
        Some("rootfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .context("cannot mount the new root's tmpfs")?;
    for entry in std::fs::read_dir("/").context("cannot list the initramfs")? {
        let entry = entry.context("cannot list the initramfs")?;
        if entry.file_name() == "newroot" {
            continue;
        }
        let source = entry.path();
        copy_tree(&source, &Path::new(NEW_ROOT).join(entry.file_name()))
            .with_context(|| format!("cannot copy {} to the new root", source.display()))?;
        remove_tree(&source)
            .with_context(|| format!("cannot remove {} from the initramfs", source.display()))?;
    }
    std::env::set_current_dir(NEW_ROOT).context("cannot enter the new root")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("cannot move the new root onto /")?;
    chroot(".").context("cannot chroot into the new root")?;
    std::env::set_current_dir("/").context("cannot enter /")?;
    Ok(())
}

fn copy_tree(source: &Path, target: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(source)?;
    let kind = meta.file_type();
    if kind.is_dir() {
        std::fs::create_dir(target)?;
        for entry in std::fs::read_dir(source)? {
            let entry = entry?;
            copy_tree(&entry.path(), &target.join(entry.file_name()))?;
        }
    } else if kind.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(source)?, target)?;
    } else if kind.is_file() {
        std::fs::copy(source, target)?;
    } else {
        // Device nodes (/dev/console, /dev/kmsg).
        let file_type = nix::sys::stat::SFlag::S_IFMT.bits() & meta.mode();
        let sflag = nix::sys::stat::SFlag::from_bits_truncate(file_type);
        nix::sys::stat::mknod(
            target,
            sflag,
            nix::sys::stat::Mode::from_bits_truncate(meta.mode()),
            meta.rdev(),
        )?;
    }
    std::fs::set_permissions(target, meta.permissions()).or_else(|e| {
        if kind.is_symlink() {
            Ok(())
        } else {
            Err(e)
        }
    })
}

fn remove_tree(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}
