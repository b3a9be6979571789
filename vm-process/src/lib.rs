//! The VMM process of a microVM: started as a process of its own (its own
//! session, so neither a signal to its starter nor the starter's death
//! reaches it), found again by PID after a restart, and stopped.
//! capsad and the containerd shim both start their VMs here, and reach
//! their agents through [`sandbox`].
//!
//! The starter opens what the VM uses and hands the VMM descriptors: its
//! disk images, its tap (made and bridged here), its vsock socket (bound
//! here). With a [`JailSpec`] the VMM then confines itself (capsa-jail)
//! and never opens a host file again.

pub mod sandbox;

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub use capsa_vmm_config::Seccomp;
use capsa_vmm_config::{DiskConfig, JailConfig, NetConfig, VmmArgs, VsockConfig};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("creating the console log {}: {source}", path.display())]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM's command line: {0}")]
    Args(#[from] capsa_vmm_config::ArgError),
    #[error("opening disk image {}: {source}", path.display())]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM's tap: {0}")]
    Tap(#[from] capsa_tap::TapError),
    #[error("binding the VM's vsock socket {}: {source}", path.display())]
    Vsock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making the VM's jail {}: {source}", path.display())]
    Jail {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("joining the VM's cgroup ({}): {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handing the snapshot's files to the VMM: {0}")]
    Snapshot(#[source] std::io::Error),
    #[error("starting {}: {source}", vmm.display())]
    Spawn {
        vmm: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What every VM is booted from.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The VMM's seccomp filter (off only to measure what it costs).
    pub seccomp: capsa_vmm_config::Seccomp,
}

/// One VM's shape and its host-side endpoints.
#[derive(Debug, Clone)]
pub struct VmSpec<'a> {
    pub cpus: u8,
    pub memory_mib: u64,
    /// The VM's NIC (tap, MAC, bridge), when it has one.
    pub net: Option<NetConfig>,
    pub disks: &'a [DiskConfig],
    /// The Unix socket the VMM serves the guest's vsock on.
    pub vsock: &'a Path,
    /// Where the guest's console (and the VMM's own messages) go.
    pub console: &'a Path,
    /// The `cgroup.procs` of the cgroup the VMM runs in, if any: the
    /// VMM's process joins it before it executes.
    pub cgroup_procs: Option<&'a Path>,
    /// Where and as whom the VMM confines itself, if it does.
    pub jail: Option<JailSpec<'a>>,
    /// Whether the VM is booted, booted to be snapshotted, or restored.
    pub snapshot: Snapshot<'a>,
}

/// Where a VM's first state comes from, and where its last goes: the
/// snapshot's files are opened by the starter and handed over, so that a
/// jailed VMM never opens them by path.
#[derive(Debug, Clone, Copy, Default)]
pub enum Snapshot<'a> {
    /// Booted from the kernel.
    #[default]
    None,
    /// Booted, and snapshotted into `state` and `memory` (then ended) when
    /// a byte arrives on `control`, which then gets the VMM's answer.
    To {
        control: BorrowedFd<'a>,
        state: BorrowedFd<'a>,
        memory: BorrowedFd<'a>,
    },
    /// Restored from a snapshot's `state` and `memory` instead of booted.
    From {
        state: BorrowedFd<'a>,
        memory: BorrowedFd<'a>,
    },
}

/// A VMM's jail: an empty directory of its own (made here) and the
/// unprivileged ids it runs as.
#[derive(Debug, Clone, Copy)]
pub struct JailSpec<'a> {
    pub root: &'a Path,
    pub uid: u32,
    pub gid: u32,
}

/// What the VMM is handed, open: the descriptors stay open here until the
/// VMM has them.
struct Handed {
    fds: Vec<OwnedFd>,
}

impl Handed {
    /// Keeps `fd` for the VMM and returns the number it will have there
    /// (the same: it is inherited, above the standard streams).
    fn pass(&mut self, fd: OwnedFd) -> std::io::Result<i32> {
        let fd = if fd.as_raw_fd() < 3 {
            // SAFETY: F_DUPFD_CLOEXEC takes numbers only; the new
            // descriptor is owned at once.
            let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if copy < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `copy` was just made and nothing else owns it.
            unsafe { std::os::fd::FromRawFd::from_raw_fd(copy) }
        } else {
            fd
        };
        let number = fd.as_raw_fd();
        self.fds.push(fd);
        Ok(number)
    }

    fn disk(&mut self, disk: &DiskConfig) -> Result<DiskConfig, VmError> {
        let failed = |source| VmError::Disk {
            path: disk.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(failed)?;
        Ok(DiskConfig {
            fd: Some(self.pass(file.into()).map_err(failed)?),
            ..disk.clone()
        })
    }

    /// Makes the tap, bridges it and brings it up; the VMM only uses it.
    /// A tap the caller made already (`fd`, in a network namespace of its
    /// own, say) is handed on as a copy.
    fn net(&mut self, net: &NetConfig) -> Result<NetConfig, VmError> {
        let owned = match net.fd {
            // SAFETY: the caller keeps its tap open while the VMM starts
            // (NetConfig's contract); only a copy is kept here.
            Some(fd) => unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned(),
            None => {
                let tap = capsa_tap::Tap::open(&net.tap)?;
                if let Some(bridge) = &net.bridge {
                    tap.join_bridge(bridge)?;
                }
                tap.as_fd_owned()
            }
        };
        let fd =
            owned
                .and_then(|fd| self.pass(fd))
                .map_err(|source| capsa_tap::TapError::Attach {
                    name: net.tap.clone(),
                    source,
                })?;
        Ok(NetConfig {
            fd: Some(fd),
            bridge: None,
            ..net.clone()
        })
    }

    fn vsock(&mut self, path: &Path) -> Result<VsockConfig, VmError> {
        let failed = |source| VmError::Vsock {
            path: path.to_path_buf(),
            source,
        };
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(failed)?;
        Ok(VsockConfig {
            listener_fd: Some(self.pass(listener.into()).map_err(failed)?),
            ..VsockConfig::at(path)
        })
    }
}

/// A snapshot's file (state or memory) at `path`, made empty, readable by
/// its maker only: a VMM is handed it open ([`Snapshot`]).
pub fn snapshot_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// The jail's directory: made if missing, root's, empty.
fn make_jail_root(root: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |source| VmError::Jail {
        path: root.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(root).map_err(failed)?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).map_err(failed)
}

/// capsa-vmm beside the running binary, else whatever PATH finds.
pub fn default_vmm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("capsa-vmm")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("capsa-vmm"))
}

pub fn spawn(config: &VmConfig, vm: &VmSpec) -> Result<Child, VmError> {
    let console_error = |source| VmError::Console {
        path: vm.console.to_path_buf(),
        source,
    };
    let log = File::create(vm.console).map_err(console_error)?;
    let err = log.try_clone().map_err(console_error)?;
    let mut handed = Handed { fds: Vec::new() };
    let disks = vm
        .disks
        .iter()
        .map(|disk| handed.disk(disk))
        .collect::<Result<Vec<_>, _>>()?;
    let nets = vm
        .net
        .iter()
        .map(|net| handed.net(net))
        .collect::<Result<Vec<_>, _>>()?;
    let vsock = handed.vsock(vm.vsock)?;
    let jail = match vm.jail {
        Some(jail) => {
            make_jail_root(jail.root)?;
            Some(JailConfig {
                root: jail.root.to_path_buf(),
                uid: jail.uid,
                gid: jail.gid,
            })
        }
        None => None,
    };
    let mut pass = |fd: BorrowedFd| {
        fd.try_clone_to_owned()
            .and_then(|fd| handed.pass(fd))
            .map_err(VmError::Snapshot)
    };
    let (snapshot_to, restore_from) = match vm.snapshot {
        Snapshot::None => (None, None),
        Snapshot::To {
            control,
            state,
            memory,
        } => (
            Some(capsa_vmm_config::SnapshotTo {
                control: pass(control)?,
                state: pass(state)?,
                memory: pass(memory)?,
            }),
            None,
        ),
        Snapshot::From { state, memory } => (
            None,
            Some(capsa_vmm_config::RestoreFrom {
                state: pass(state)?,
                memory: pass(memory)?,
            }),
        ),
    };
    let args = VmmArgs {
        initrd: Some(config.initrd.clone()),
        snapshot_to,
        restore_from,
        cpus: vm.cpus,
        memory_mib: vm.memory_mib,
        disks,
        nets,
        vsock: Some(vsock),
        jail,
        seccomp: config.seccomp,
        ..VmmArgs::new(&config.kernel)
    };
    let mut command = Command::new(&config.vmm);
    command
        .args(args.to_args()?)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    // `handed` holds them open until the spawn returns.
    inherit_fds(
        &mut command,
        handed.fds.iter().map(|fd| fd.as_raw_fd()).collect(),
    );
    // SAFETY: setsid(2) is async-signal-safe and touches no memory. A
    // session of its own: neither a signal to its starter's group nor the
    // starter's death reaches the VMM (a stopped VMM in a process group
    // orphaned by that death would get SIGHUP).
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    // Open (close-on-exec) until the spawn returns.
    let cgroup = vm
        .cgroup_procs
        .map(|path| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|source| VmError::Cgroup {
                    path: path.to_path_buf(),
                    source,
                })
        })
        .transpose()?;
    if let Some(procs) = &cgroup {
        let fd = std::os::fd::AsRawFd::as_raw_fd(procs);
        // SAFETY: runs in the forked child before exec and only calls
        // write(2), which is async-signal-safe, on an fd that stays open
        // in the child until exec; "0" moves the calling process.
        unsafe {
            command.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let child = command.spawn().map_err(|source| VmError::Spawn {
        vmm: config.vmm.clone(),
        source,
    });
    // The VMM has its copies now (the tap lives as long as the VMM's).
    drop(handed);
    child
}

/// The processes of the VMM started as `pid`: that one and, when it is
/// jailed, the VMM itself, its child in the jail's PID namespace (`pid`
/// then only waits for it).
/// Has `command`'s child inherit `fds` (they lose close-on-exec there,
/// and only there). They must stay open until the spawn returns.
pub fn inherit_fds(command: &mut Command, fds: Vec<std::os::fd::RawFd>) {
    // SAFETY: runs in the forked child before exec and only calls
    // fcntl(2), which is async-signal-safe, on descriptors open in it.
    unsafe {
        command.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

pub fn vmm_processes(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

/// How a VMM process ended, in words: a SIGSYS is its seccomp filter's
/// doing.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(libc::SIGSYS)) => {
            "killed by its seccomp filter (SIGSYS): it made a system call it may not make"
                .to_string()
        }
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// Whether `pid` is a live capsa-vmm serving `vsock` (and not a process
/// that reused the PID after ours exited).
pub fn is_our_vmm(pid: u32, vsock: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let text = String::from_utf8_lossy(&cmdline);
    is_running(pid) && text.contains("capsa-vmm") && text.contains(&*vsock.to_string_lossy())
}

/// Whether process `pid` exists and is no zombie (a zombie has closed its
/// files already).
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

/// Kills the VMM started as `pid`: both its processes when it is jailed
/// (the jailed one would only notice its waiter's death a moment later).
pub fn kill(pid: u32) {
    for pid in vmm_processes(pid) {
        // SAFETY: kill(2) with a PID and a signal number touches no memory.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

/// Kills the VMM started as `pid` and waits up to `within` for its
/// processes to end, so that what it held (its tap, its disks' locks) is
/// free for the next VMM. Returns whether they ended in time.
pub fn kill_and_wait(pid: u32, within: std::time::Duration) -> bool {
    let processes = vmm_processes(pid);
    kill(pid);
    let deadline = std::time::Instant::now() + within;
    loop {
        if !processes.iter().any(|&p| is_running(p)) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The last lines of the VM's console, for a failure report.
pub fn console_tail(console: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    // Read from its end: the guest writes as much as it likes there.
    const TAIL_BYTES: u64 = 16 << 10;
    let Ok(mut file) = File::open(console) else {
        return String::new();
    };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut bytes = Vec::new();
    if file
        .seek(SeekFrom::Start(length.saturating_sub(TAIL_BYTES)))
        .is_err()
        || file.take(TAIL_BYTES).read_to_end(&mut bytes).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_told_in_words() {
        use std::os::unix::process::ExitStatusExt;
        let sigsys = std::process::ExitStatus::from_raw(libc::SIGSYS);
        assert!(describe_exit(sigsys).contains("seccomp"));
        let killed = std::process::ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(describe_exit(killed), "killed by signal 9");
        let exited = std::process::ExitStatus::from_raw(3 << 8);
        assert_eq!(describe_exit(exited), "exit code 3");
    }

    #[test]
    fn the_console_tail_is_read_from_the_end_of_a_huge_console() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let file = File::create(&console).unwrap();
        // A sparse 8 GiB of a guest's writing, then its last lines.
        file.set_len(8 << 30).unwrap();
        drop(file);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .unwrap();
        std::io::Write::write_all(&mut file, b"\nlast words\nthe end\n").unwrap();
        let tail = console_tail(&console);
        assert!(tail.ends_with("last words\nthe end"), "{tail:?}");
    }

    #[test]
    fn a_missing_vmm_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("capsa-vm-process-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = VmConfig {
            vmm: "/nonexistent/capsa-vmm".into(),
            kernel: "/nonexistent/vmlinux".into(),
            initrd: "/nonexistent/initrd".into(),
            seccomp: capsa_vmm_config::Seccomp::Kill,
        };
        let vsock = dir.join("vsock");
        let console = dir.join("console.log");
        let err = spawn(
            &config,
            &VmSpec {
                cpus: 1,
                memory_mib: 64,
                net: None,
                disks: &[],
                vsock: &vsock,
                console: &console,
                cgroup_procs: None,
                jail: None,
                snapshot: Snapshot::None,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/capsa-vmm"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_killed_process_is_waited_for_until_it_ended() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        // Reaped meanwhile, as capsad's watcher does.
        let reaper = std::thread::spawn(move || child.wait());
        assert!(kill_and_wait(pid, std::time::Duration::from_secs(10)));
        assert!(!reaper.join().unwrap().unwrap().success());
    }

    #[test]
    fn a_process_that_is_not_a_vmm_is_not_ours() {
        assert!(!is_our_vmm(std::process::id(), Path::new("/run/x/vsock")));
        assert!(!is_our_vmm(u32::MAX, Path::new("/run/x/vsock")));
    }
}
