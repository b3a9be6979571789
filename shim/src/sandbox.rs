//! The microVM of one sandbox (pod): booted for its first container,
//! shared by the rest, shut down when containerd shuts the shim down.
//! Its files (vsock socket, console log, VMM PID) live in a directory
//! named after the namespace and sandbox id, so a later `shim delete`
//! finds and stops a VM whose shim died.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsa_guest_client::{Guest, GuestError};
use capsa_protocol::agent::SetupSandboxRequest;
use capsa_vm_process::{self as vm, VmSpec};
use sha2::{Digest, Sha256};

use crate::config::ShimConfig;

/// Where sandboxes' directories are made.
pub const STATE_ROOT: &str = "/run/capsa-shim";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("creating {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest kernel {} does not exist (set kernel in the shim's config)", .0.display())]
    NoKernel(PathBuf),
    #[error("the guest initramfs {} does not exist (set initrd in the shim's config)", .0.display())]
    NoInitrd(PathBuf),
    #[error(transparent)]
    Spawn(#[from] vm::VmError),
    #[error("the VM did not come up: {error}; its console ended with:\n{console}")]
    Boot { error: GuestError, console: String },
}

pub struct Sandbox {
    dir: PathBuf,
    vmm_pid: u32,
    guest: Guest,
    grace: Duration,
}

/// The directory of sandbox `id` in `namespace`: a digest, as ids may be
/// long and a Unix socket's path may not.
pub fn dir_for(namespace: &str, id: &str) -> PathBuf {
    let digest = Sha256::digest(format!("{namespace}/{id}").as_bytes());
    Path::new(STATE_ROOT).join(&hex::encode(digest)[..16])
}

impl Sandbox {
    pub fn boot(config: &ShimConfig, dir: PathBuf, hostname: &str) -> Result<Self, SandboxError> {
        if !config.kernel.is_file() {
            return Err(SandboxError::NoKernel(config.kernel.clone()));
        }
        if !config.initrd.is_file() {
            return Err(SandboxError::NoInitrd(config.initrd.clone()));
        }
        // A directory left by a shim that died: its VM must not linger.
        destroy(&dir);
        fs::create_dir_all(&dir).map_err(|source| SandboxError::Dir {
            path: dir.clone(),
            source,
        })?;
        let vsock = dir.join("vsock");
        let console = dir.join("console.log");
        let child = vm::spawn(
            &config.vm(),
            &VmSpec {
                cpus: config.cpus,
                memory_mib: config.memory_mib,
                net: None,
                disks: &[],
                vsock: &vsock,
                console: &console,
            },
        )?;
        let vmm_pid = child.id();
        // The shim's reaper collects the VMM when it exits.
        drop(child);
        let _ = fs::write(dir.join("vmm.pid"), vmm_pid.to_string());
        let sandbox = |guest| Sandbox {
            dir: dir.clone(),
            vmm_pid,
            guest,
            grace: Duration::from_secs(config.shutdown_grace_secs),
        };
        let booted = Guest::connect(&vsock, Duration::from_secs(config.boot_timeout_secs))
            .and_then(|guest| {
                let request = SetupSandboxRequest {
                    hostname: hostname.to_string(),
                    time_unix_ns: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_nanos() as i64)
                        .unwrap_or(0),
                    ..Default::default()
                };
                guest.setup_sandbox(&request)?;
                Ok(guest)
            });
        match booted {
            Ok(guest) => Ok(sandbox(guest)),
            Err(error) => {
                let console = vm::console_tail(&console);
                destroy(&dir);
                Err(SandboxError::Boot { error, console })
            }
        }
    }

    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    pub fn vmm_pid(&self) -> u32 {
        self.vmm_pid
    }

    /// Whether the VMM still runs (a guest that crashed, or a VMM that was
    /// killed, takes every container with it).
    pub fn is_alive(&self) -> bool {
        vm::is_our_vmm(self.vmm_pid, &self.dir.join("vsock"))
    }

    /// Stops the containers (SIGTERM, then SIGKILL after the grace), powers
    /// the VM off, and removes the sandbox's files.
    pub fn shutdown(&self) {
        if let Err(e) = self.guest.shutdown(self.grace) {
            log::warn!("asking the guest to shut down: {e}");
        }
        let vsock = self.dir.join("vsock");
        let deadline = Instant::now() + self.grace + Duration::from_secs(5);
        while vm::is_our_vmm(self.vmm_pid, &vsock) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        destroy(&self.dir);
    }
}

/// Kills the VM whose files are in `dir`, if it still runs, and removes
/// the directory.
pub fn destroy(dir: &Path) {
    let vsock = dir.join("vsock");
    if let Some(pid) = fs::read_to_string(dir.join("vmm.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        if vm::is_our_vmm(pid, &vsock) {
            log::warn!("killing the VMM {pid} of {}", dir.display());
            vm::kill(pid);
        }
    }
    let _ = fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_dirs_are_short_and_distinct() {
        let long = "f".repeat(64);
        let a = dir_for("k8s.io", &long);
        let b = dir_for("default", &long);
        assert_ne!(a, b);
        // Room for "/vsock" and the VMM's port suffix in a sun_path.
        assert!(
            a.join("vsock_1024").as_os_str().len() < 60,
            "{}",
            a.display()
        );
    }

    #[test]
    fn a_missing_kernel_is_named() {
        let config = ShimConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let err = Sandbox::boot(&config, dir.path().join("s"), "")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    }
}
