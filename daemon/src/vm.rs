//! The VMM process of a group: started as a process of its own (its own
//! process group, so neither a signal to the daemon nor the daemon's
//! death reaches it), watched while it runs, found again after a daemon
//! restart.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// `net`: the VMM's --net argument (tap, MAC, bridge), when the group has
/// an address.
pub fn spawn(
    config: &VmConfig,
    cpus: u8,
    memory_mib: u64,
    net: Option<String>,
    disks: &[String],
    vsock: &Path,
    console: &Path,
) -> Result<Child> {
    let _ = std::fs::remove_file(vsock);
    let log = File::create(console).with_context(|| format!("creating {}", console.display()))?;
    let err = log.try_clone()?;
    let mut command = Command::new(&config.vmm);
    if let Some(net) = net {
        command.arg("--net").arg(net);
    }
    for disk in disks {
        command.arg("--disk").arg(disk);
    }
    command
        .arg("--kernel")
        .arg(&config.kernel)
        .arg("--initrd")
        .arg(&config.initrd)
        .arg("--cpus")
        .arg(cpus.to_string())
        .arg("--memory-mib")
        .arg(memory_mib.to_string())
        .arg("--vsock")
        .arg(vsock)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", config.vmm.display()))
}

/// Whether `pid` is a live capsa-vmm (and not a process that reused the
/// PID after ours exited).
pub fn is_our_vmm(pid: u32, vsock: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let text = String::from_utf8_lossy(&cmdline);
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    !zombie && text.contains("capsa-vmm") && text.contains(&*vsock.to_string_lossy())
}

pub fn kill(pid: u32) {
    // SAFETY: kill(2) with a PID and a signal number touches no memory.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// The last lines of the VM's console, for a failure report.
pub fn console_tail(console: &Path) -> String {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}
