//! What PID 1 must do that no one else will: mount the kernel filesystems,
//! hold the console, reap orphans, and power the machine off.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::{dup2, sync};

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

/// PID 1 inherits every orphan; reap them so they do not pile up as zombies.
pub fn reap_forever() -> Result<()> {
    loop {
        match waitpid(None, Some(WaitPidFlag::__WALL)) {
            Ok(_) | Err(Errno::EINTR) => {}
            // No children right now: wait for a signal instead of spinning.
            Err(Errno::ECHILD) => nix::unistd::pause(),
            Err(e) => return Err(e).context("waitpid failed"),
        }
    }
}
