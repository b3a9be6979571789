//! The container-init helper. The runtime starts it as a fresh process
//! (the agent's own binary, run again) with the channel on fd 3 and the
//! process's stdio on 0-2. Being single-threaded, it may do what a forked
//! child of the multi-threaded agent may not: join or create namespaces,
//! fork into a new PID namespace, mount, pivot_root, drop privileges.
//!
//! 1. read the config; join the cgroup; create (or, for exec, join) the
//!    namespaces;
//! 2. fork: the parent reports the child's PID and exits, the child is the
//!    container's process (PID 1 of a new PID namespace for a container);
//! 3. the child sets up the root filesystem and the process, reports Ready,
//!    waits for Start, takes on the process's identity and execs it. The
//!    channel is close-on-exec: the runtime reads end-of-file once the exec
//!    has happened, or an Error.

mod exec;
mod mounts;

use std::convert::Infallible;
use std::fmt::Display;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{fork, ForkResult};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::channel::{Channel, Message, HELPER_FD};
use crate::config::{InitConfig, Mode};

/// Errors here end as text in the runtime's error; each says what failed.
type Failure = String;

trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, Failure>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, Failure> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

/// The helper's entry point; never returns.
pub fn main() -> ! {
    // SAFETY: the runtime placed the channel on HELPER_FD for us, and
    // nothing else in this fresh process owns that descriptor.
    let stream = unsafe { UnixStream::from_raw_fd(HELPER_FD) };
    // The container must not inherit the channel; its closing on exec is
    // also how the runtime learns the exec happened.
    let _ = fcntl(stream.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    let mut channel = Channel::new(stream);
    let Err(failure) = run(&mut channel);
    let _ = channel.send(&Message::Error(failure));
    std::process::exit(1)
}

fn run(channel: &mut Channel) -> Result<Infallible, Failure> {
    let config: Box<InitConfig> = match channel.receive().context(|| "reading the config".into())? {
        Some(Message::Config(config)) => config,
        other => return Err(format!("expected the config, got {other:?}")),
    };
    if let Some(cgroup) = &config.cgroup {
        let procs = cgroup.join("cgroup.procs");
        fs::write(&procs, "0").context(|| format!("joining the cgroup {}", cgroup.display()))?;
    }
    match &config.mode {
        Mode::Create { spec, .. } => enter_new_namespaces(spec)?,
        Mode::Exec { init_pid } => join_namespaces(*init_pid)?,
    }
    // The child speaks on the channel only after we have, so the runtime
    // reads Pid first and the two writers never interleave.
    let (turn_read, turn_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).context(|| "creating a pipe".into())?;
    // SAFETY: this helper is single-threaded, so the child may run any code.
    match unsafe { fork() }.context(|| "forking the container process".into())? {
        ForkResult::Parent { child } => {
            let _ = channel.send(&Message::Pid(child.as_raw()));
            std::process::exit(0);
        }
        ForkResult::Child => {
            drop(turn_write);
            // End of file: the parent has sent the PID and is gone.
            let mut turn = File::from(turn_read);
            let _ = turn.read(&mut [0u8; 1]);
        }
    }
    if let Mode::Create { spec, rootfs } = &config.mode {
        mounts::prepare_root(spec, rootfs, config.process.terminal().unwrap_or(false))?;
        let own_uts = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|namespaces| {
                namespaces
                    .iter()
                    .any(|n| n.typ() == LinuxNamespaceType::Uts && n.path().is_none())
            });
        // Without a UTS namespace of its own it would rename the agent.
        if let Some(hostname) = spec.hostname().as_ref().filter(|_| own_uts) {
            nix::unistd::sethostname(hostname)
                .context(|| format!("setting the hostname {hostname:?}"))?;
        }
    }
    let process = exec::prepare(&config.process)?;
    let filters = config
        .seccomp
        .as_ref()
        .map(crate::seccomp::compile)
        .transpose()
        .map_err(|e| e.to_string())?;
    channel
        .send(&Message::Ready)
        .context(|| "reporting ready".into())?;
    match channel.receive().context(|| "waiting for start".into())? {
        Some(Message::Start) => {}
        // The runtime gave up on this container.
        None => std::process::exit(1),
        Some(other) => return Err(format!("expected start, got {other:?}")),
    }
    exec::become_process(&process, filters.as_ref())
}

/// New namespaces of the kinds the spec asks for (or joins those it gives
/// a path for). The network namespace is the group's: a container without
/// a path for it shares the VM's, with its fellow containers.
fn enter_new_namespaces(spec: &Spec) -> Result<(), Failure> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|linux| linux.namespaces().clone())
        .unwrap_or_default();
    // Our overlay and mounts must never reach the agent's view.
    let mut fresh = CloneFlags::CLONE_NEWNS;
    for namespace in &namespaces {
        let flag = match namespace.typ() {
            LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
            LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
            LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
            LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
            LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
            other => return Err(format!("{other} namespaces are not supported")),
        };
        match namespace.path() {
            Some(path) => {
                let file =
                    File::open(path).context(|| format!("opening namespace {}", path.display()))?;
                setns(file.as_fd(), flag)
                    .context(|| format!("joining namespace {}", path.display()))?;
            }
            None if flag == CloneFlags::CLONE_NEWNET => {}
            None => fresh |= flag,
        }
    }
    unshare(fresh).context(|| "creating namespaces".into())
}

/// Joins the namespaces of the container process `init_pid`, the mount
/// namespace last (after it, /proc/<pid> may no longer be reachable).
fn join_namespaces(init_pid: i32) -> Result<(), Failure> {
    let kinds = [
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let mut targets = Vec::new();
    for (kind, flag) in kinds {
        let theirs = format!("/proc/{init_pid}/ns/{kind}");
        let file = File::open(&theirs)
            .context(|| format!("opening {theirs} (has the container stopped?)"))?;
        let ours = fs::metadata(format!("/proc/self/ns/{kind}"))
            .map(|m| m.ino())
            .ok();
        let same = file
            .metadata()
            .map(|m| Some(m.ino()) == ours)
            .unwrap_or(false);
        if !same {
            targets.push((kind, flag, file));
        }
    }
    for (kind, flag, file) in targets {
        setns(file.as_fd(), flag)
            .context(|| format!("joining the container's {kind} namespace"))?;
    }
    Ok(())
}
