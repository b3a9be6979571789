//! The microVM of one sandbox (pod): booted for its first container,
//! shared by the rest, shut down when containerd shuts the shim down.
//! Its files (vsock socket, console log, VMM PID) live in a directory
//! named after the namespace and sandbox id, so a later `shim delete`
//! finds and stops a VM whose shim died.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsa_guest_client::Guest;
use capsa_protocol::agent::{Interface, Route, SetupSandboxRequest};
use capsa_vm_process::sandbox::{self, BootError};
use capsa_vm_process::{self as vm, VmSpec};
use sha2::{Digest, Sha256};

use crate::config::ShimConfig;
use crate::pod_network::{self, PodNetworkError};
use crate::rootfs::FileCopy;
use crate::rootfs_disks::{self, Placed, RootfsDiskError, RootfsDisks};
use crate::shared_dirs::{SharedDirError, SharedDirs};
use crate::sizing::VmSize;
use crate::spec::Bind;

/// Where sandboxes' directories are made.
pub const STATE_ROOT: &str = "/run/capsa-shim";
/// Where the pods' cgroups (`linux.cgroupsPath`) are, cgroup v2.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long a VMM's cgroup may take to empty once it has exited.
const CGROUP_PATIENCE: Duration = Duration::from_secs(5);

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
    #[error("the VM did not come up: {0}")]
    Boot(#[from] BootError),
    #[error("the pod's network: {0}")]
    Network(#[from] PodNetworkError),
    #[error(transparent)]
    RootfsDisks(#[from] RootfsDiskError),
}

/// What a sandbox's VM is made with, from its first container's spec.
#[derive(Debug, Clone)]
pub struct Setup {
    pub hostname: String,
    pub size: VmSize,
    /// The pod's network namespace (CNI's), whose interface the VM takes.
    pub netns: Option<PathBuf>,
    /// The spec's `linux.cgroupsPath` (cgroupfs form, `/parent/name`):
    /// the VMM runs in that cgroup, held to the VM's size.
    pub cgroups_path: Option<PathBuf>,
}

/// The VMM's cgroup at `path` (under CGROUP_ROOT), made with the VM's
/// limits; None, with a warning, where the host cannot give one (no
/// cgroup v2 there, a systemd-style path).
fn pod_cgroup(path: &Path, size: VmSize) -> Option<capsa_cgroup::VmCgroup> {
    let relative = path.strip_prefix("/").unwrap_or(path);
    let (Some(parent), Some(name)) = (relative.parent(), relative.file_name()) else {
        log::warn!(
            "cgroupsPath {} is not /PARENT/NAME: the VMM runs in the shim's cgroup",
            path.display()
        );
        return None;
    };
    let made = capsa_cgroup::Hierarchy::open(&Path::new(CGROUP_ROOT).join(parent)).and_then(|h| {
        h.create(
            &name.to_string_lossy(),
            &capsa_cgroup::Limits::for_vm(size.cpus, size.memory_mib, f64::from(size.cpus)),
        )
    });
    match made {
        Ok(cgroup) => Some(cgroup),
        Err(e) => {
            log::warn!(
                "the VMM runs in the shim's cgroup, not {}: {e}",
                path.display()
            );
            None
        }
    }
}

pub struct Sandbox {
    dir: PathBuf,
    vm: sandbox::Sandbox,
    grace: Duration,
    shared: Arc<SharedDirs>,
    rootfs_disks: Option<RootfsDisks>,
}

/// The directory of sandbox `id` in `namespace`: a digest, as ids may be
/// long and a Unix socket's path may not.
pub fn dir_for(namespace: &str, id: &str) -> PathBuf {
    let digest = Sha256::digest(format!("{namespace}/{id}").as_bytes());
    Path::new(STATE_ROOT).join(&hex::encode(digest)[..16])
}

impl Sandbox {
    pub fn boot(config: &ShimConfig, dir: PathBuf, setup: &Setup) -> Result<Self, SandboxError> {
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
        let jail_root = dir.join("jail");
        let jail_id = match config.jail_claims() {
            Some(claims) => {
                let id = claims.claim(&dir).map_err(|source| SandboxError::Dir {
                    path: claims.dir.clone(),
                    source,
                })?;
                let _ = fs::write(dir.join("jail.id"), id.to_string());
                Some(id)
            }
            None => None,
        };
        // Held open until the VMM has its copy.
        let pod_net = match &setup.netns {
            Some(netns) => match pod_network::attach(netns) {
                Ok(pod_net) => Some(pod_net),
                Err(e) => {
                    destroy(&dir);
                    return Err(e.into());
                }
            },
            None => None,
        };
        let net = pod_net.as_ref().map(|p| capsa_vmm_config::NetConfig {
            tap: p.tap.name().to_string(),
            mac: capsa_vmm_config::MacAddr(p.nic.mac),
            bridge: None,
            fd: Some(std::os::fd::AsRawFd::as_raw_fd(&p.tap)),
            rate: None,
        });
        let cgroup = setup
            .cgroups_path
            .as_deref()
            .and_then(|path| pod_cgroup(path, setup.size));
        if let Some(cgroup) = &cgroup {
            let _ = fs::write(
                dir.join("cgroup"),
                cgroup.dir().as_os_str().as_encoded_bytes(),
            );
        }
        let (rootfs_disks, disks) = if config.rootfs_disks > 0 {
            let disk_dir = config.disk_dir.join(dir.file_name().unwrap_or_default());
            let made = fs::create_dir_all(&disk_dir)
                .map_err(|source| SandboxError::Dir {
                    path: disk_dir.clone(),
                    source,
                })
                .and_then(|()| {
                    let _ = fs::write(dir.join("disks"), disk_dir.as_os_str().as_encoded_bytes());
                    Ok(RootfsDisks::create(
                        &disk_dir,
                        config.rootfs_disks,
                        config.rootfs_disk_mib,
                    )?)
                });
            match made {
                Ok((slots, disks)) => (Some(slots), disks),
                Err(e) => {
                    destroy(&dir);
                    return Err(e);
                }
            }
        } else {
            (None, Vec::new())
        };
        let procs = cgroup.as_ref().map(|c| c.procs());
        let booted = sandbox::boot(
            &config.vm(),
            &VmSpec {
                cpus: setup.size.cpus,
                memory_mib: setup.size.memory_mib,
                net,
                disks: &disks,
                vsock: &vsock,
                console: &console,
                cgroup_procs: procs.as_deref(),
                jail: jail_id.map(|id| vm::JailSpec {
                    root: &jail_root,
                    uid: id,
                    gid: id,
                }),
                snapshot: vm::Snapshot::None,
            },
        );
        let (booting, child) = match booted {
            Ok(booted) => booted,
            Err(e) => {
                destroy(&dir);
                return Err(e.into());
            }
        };
        // The shim's reaper collects the VMM when it exits.
        drop(child);
        let (interfaces, routes) = match pod_net {
            Some(p) => (
                vec![Interface {
                    mac: p.nic.mac_string(),
                    name: p.nic.name.clone(),
                    addresses: p.nic.addresses.clone(),
                    mtu: p.nic.mtu,
                    ..Default::default()
                }],
                p.nic
                    .routes
                    .iter()
                    .map(|(destination, gateway)| Route {
                        destination: destination.clone(),
                        gateway: gateway.to_string(),
                        device: p.nic.name.clone(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let _ = fs::write(dir.join("vmm.pid"), booting.pid().to_string());
        let booted = booting
            .connect(Duration::from_secs(config.boot_timeout_secs))
            .and_then(|vm| {
                let request = SetupSandboxRequest {
                    hostname: setup.hostname.clone(),
                    interfaces,
                    routes,
                    time_unix_ns: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_nanos() as i64)
                        .unwrap_or(0),
                    ..Default::default()
                };
                match vm.guest().setup_sandbox(&request) {
                    Ok(()) => Ok(vm),
                    Err(e) => Err(vm.failure(e)),
                }
            });
        match booted {
            Ok(vm) => Ok(Sandbox {
                dir,
                vm,
                grace: Duration::from_secs(config.shutdown_grace_secs),
                shared: Arc::default(),
                rootfs_disks,
            }),
            Err(e) => {
                destroy(&dir);
                Err(e.into())
            }
        }
    }

    pub fn guest(&self) -> &Guest {
        self.vm.guest()
    }

    pub fn vmm_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// The last `lines` lines of the VM's console (the guest kernel's and
    /// the VMM's own messages), for the log when the VM is gone.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = fs::read(self.dir.join("console.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the VMM still runs (a guest that crashed, or a VMM that was
    /// killed, takes every container with it).
    pub fn is_alive(&self) -> bool {
        self.vm.is_alive()
    }

    /// Shares the host directory of `bind` with the VM (see shared_dirs);
    /// returns its path in the guest.
    pub fn share(&self, bind: &Bind) -> Result<PathBuf, SharedDirError> {
        let guest = self.guest();
        self.shared.share(guest, bind, || guest.reconnect())
    }

    /// Places a container's root filesystem (containerd's snapshot
    /// `mounts`, mounted at `root`, with `copies`) on one of the VM's
    /// root filesystem disks; None when the VM has none.
    pub fn place_rootfs(
        &self,
        mounts: &[containerd_shim::protos::api::Mount],
        root: &Path,
        copies: &[FileCopy],
    ) -> Option<Result<Placed, RootfsDiskError>> {
        let disks = self.rootfs_disks.as_ref()?;
        let identity = rootfs_disks::identity(mounts, copies);
        Some(disks.place(identity.as_deref(), root, copies))
    }

    /// Stops the containers (SIGTERM, then SIGKILL after the grace), powers
    /// the VM off (by force if it does not), and removes the sandbox's
    /// files.
    pub fn shutdown(&self) {
        self.shared.stop();
        if let Err(e) = self.vm.shutdown(self.grace) {
            log::warn!("asking the guest to shut down: {e}");
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
            sandbox::stop(pid, &vsock, Duration::ZERO);
        }
    }
    let jail_id = fs::read_to_string(dir.join("jail.id"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if let Ok(cgroup) = fs::read_to_string(dir.join("cgroup")) {
        let cgroup = capsa_cgroup::VmCgroup::at(PathBuf::from(cgroup));
        if let Err(e) = cgroup.remove(CGROUP_PATIENCE) {
            log::warn!("{e}");
        }
    }
    if let Ok(disks) = fs::read_to_string(dir.join("disks")) {
        let _ = fs::remove_dir_all(disks);
    }
    let _ = fs::remove_dir_all(dir);
    // After the directory: a claim whose holder is gone is free anyway.
    if let (Some(id), Some(claims)) = (jail_id, ShimConfig::default().jail_claims()) {
        claims.release(id);
    }
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
        let setup = Setup {
            hostname: String::new(),
            size: VmSize {
                cpus: 1,
                memory_mib: 256,
            },
            netns: None,
            cgroups_path: None,
        };
        let err = Sandbox::boot(&config, dir.path().join("s"), &setup)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    }
}
