//! Creating containers and exec'ing processes in them, through the
//! container-init helper (see init/).

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use oci_spec::runtime::{LinuxNamespaceType, LinuxSeccomp, Process, Spec};

use crate::cgroup::{Cgroup, CgroupError};
use crate::channel::{Channel, Message, HELPER_FD};
use crate::config::{InitConfig, Mode, RootfsLayout};
use crate::reaper::{ExitStatus, Reaper};
use crate::stdio::{self, ChildIo, ProcessIo, StdioRequest};

/// The terminal size when the spec gives none.
const DEFAULT_CONSOLE: (u16, u16) = (24, 80);

/// How long processes get to go when a container is destroyed.
const DESTROY_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid container id {0:?}: use 1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit")]
    InvalidId(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("container {id}: {what}: {source}")]
    Io {
        id: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("container {id}: {source}")]
    Cgroup {
        id: String,
        #[source]
        source: CgroupError,
    },
    #[error("container {id}: {message}")]
    Setup { id: String, message: String },
    #[error("container {id}: the container-init helper ended without saying why ({status:?})")]
    HelperVanished {
        id: String,
        status: Option<ExitStatus>,
    },
}

/// Where the runtime keeps things and how it starts its helper.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The executable that runs `init::main` when given `helper_args`
    /// (the agent's own binary).
    pub helper: PathBuf,
    pub helper_args: Vec<String>,
    /// Per-container writable layers live in `state_dir/<id>`.
    pub state_dir: PathBuf,
    /// Per-container cgroups are made under this cgroup v2 directory.
    pub cgroup_parent: PathBuf,
}

pub struct Runtime {
    config: RuntimeConfig,
}

/// A created container. Its process waits for `start`.
pub struct Container {
    id: String,
    bundle: PathBuf,
    cgroup: Cgroup,
    init_pid: i32,
    /// Its seccomp profile, which its execs get too.
    seccomp: Option<LinuxSeccomp>,
    waiting_start: Option<Channel>,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Self {
        // The helper's children are ours to reap from the start.
        Reaper::global();
        Runtime { config }
    }

    /// Sets up container `id` from `spec` on the image layers `lower`
    /// (topmost first), up to the point where only the exec is left.
    pub fn create(
        &self,
        id: &str,
        spec: Spec,
        lower: Vec<PathBuf>,
        stdio: StdioRequest,
    ) -> Result<(Container, ProcessIo), RuntimeError> {
        validate_id(id)?;
        let process = validate_spec(&spec)?;
        if lower.is_empty() {
            return Err(RuntimeError::InvalidSpec("the image has no layers".into()));
        }
        let bundle = self.config.state_dir.join(id);
        if bundle.exists() {
            return Err(RuntimeError::Exists(id.to_string()));
        }
        let layout = RootfsLayout {
            lower,
            upper: bundle.join("upper"),
            work: bundle.join("work"),
            target: bundle.join("rootfs"),
        };
        for dir in [&layout.upper, &layout.work, &layout.target] {
            fs::create_dir_all(dir).map_err(io_error(id, "creating its directories"))?;
        }
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let cgroup = match Cgroup::create(&self.config.cgroup_parent, id, resources) {
            Ok(cgroup) => cgroup,
            Err(source) => {
                let _ = fs::remove_dir_all(&bundle);
                return Err(RuntimeError::Cgroup {
                    id: id.to_string(),
                    source,
                });
            }
        };
        let created = (|| {
            let (child_io, io) = stdio::prepare(stdio, terminal_size(&process))
                .map_err(io_error(id, "setting up its stdio"))?;
            let config = InitConfig {
                mode: Mode::Create {
                    spec: Box::new(spec),
                    rootfs: layout,
                },
                cgroup: Some(cgroup.path().to_path_buf()),
                process,
                seccomp: seccomp.clone(),
            };
            let (channel, init_pid) = self.spawn(id, config, child_io)?;
            Ok((channel, init_pid, io))
        })();
        match created {
            Ok((channel, init_pid, io)) => Ok((
                Container {
                    id: id.to_string(),
                    bundle,
                    cgroup,
                    init_pid,
                    seccomp,
                    waiting_start: Some(channel),
                },
                io,
            )),
            Err(e) => {
                let _ = cgroup.destroy(DESTROY_PATIENCE);
                let _ = fs::remove_dir_all(&bundle);
                Err(e)
            }
        }
    }

    /// Starts one more process in the namespaces and cgroup of a running
    /// container and returns its PID.
    pub fn exec(
        &self,
        container: &Container,
        process: Process,
        stdio: StdioRequest,
    ) -> Result<(i32, ProcessIo), RuntimeError> {
        validate_process(&process)?;
        let id = &container.id;
        let (child_io, io) = stdio::prepare(stdio, terminal_size(&process))
            .map_err(io_error(id, "setting up the process's stdio"))?;
        let config = InitConfig {
            mode: Mode::Exec {
                init_pid: container.init_pid,
            },
            cgroup: Some(container.cgroup.path().to_path_buf()),
            process,
            seccomp: container.seccomp.clone(),
        };
        let (channel, pid) = self.spawn(id, config, child_io)?;
        start(id, channel)?;
        Ok((pid, io))
    }

    /// Runs the helper through to Ready; returns the channel (for Start)
    /// and the process's PID.
    fn spawn(
        &self,
        id: &str,
        config: InitConfig,
        child_io: ChildIo,
    ) -> Result<(Channel, i32), RuntimeError> {
        let (ours, theirs) =
            UnixStream::pair().map_err(io_error(id, "creating the helper's channel"))?;
        let theirs_fd = theirs.as_raw_fd();
        let mut command = Command::new(&self.config.helper);
        command
            .args(&self.config.helper_args)
            .env_clear()
            .stdin(Stdio::from(child_io.stdin))
            .stdout(Stdio::from(child_io.stdout))
            .stderr(Stdio::from(child_io.stderr));
        // SAFETY: the closure runs between fork and exec and calls only
        // dup2 and fcntl, which are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                let result = if theirs_fd == HELPER_FD {
                    // dup2 onto itself would keep close-on-exec set.
                    libc::fcntl(theirs_fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(theirs_fd, HELPER_FD)
                };
                if result < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let helper = command
            .spawn()
            .map_err(io_error(id, "starting the container-init helper"))?;
        let helper_pid = helper.id() as i32;
        // Our copies of the child's stdio and channel ends must go, or we
        // would never see end-of-file on them.
        drop(command);
        drop(theirs);
        let mut channel = Channel::new(ours);
        let reaper = Reaper::global();
        let vanished = |reaper: &Reaper, pid: i32| RuntimeError::HelperVanished {
            id: id.to_string(),
            status: reaper.wait_timeout(pid, Duration::from_secs(1)),
        };
        let talk = |e: io::Error| RuntimeError::Io {
            id: id.to_string(),
            what: "talking to the container-init helper",
            source: e,
        };
        channel
            .send(&Message::Config(Box::new(config)))
            .map_err(talk)?;
        let pid = match channel.receive().map_err(talk)? {
            Some(Message::Pid(pid)) => pid,
            Some(Message::Error(message)) => {
                reaper.wait(helper_pid);
                return Err(setup_error(id, message));
            }
            _ => return Err(vanished(reaper, helper_pid)),
        };
        // The helper exits as soon as it has told us; collect it.
        reaper.wait(helper_pid);
        match channel.receive().map_err(talk)? {
            Some(Message::Ready) => Ok((channel, pid)),
            Some(Message::Error(message)) => {
                reaper.wait(pid);
                Err(setup_error(id, message))
            }
            _ => Err(vanished(reaper, pid)),
        }
    }
}

impl Container {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's first process, in the agent's PID namespace.
    pub fn init_pid(&self) -> i32 {
        self.init_pid
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// Whether `start` is still to come.
    pub fn is_created(&self) -> bool {
        self.waiting_start.is_some()
    }

    /// Execs the container's process.
    pub fn start(&mut self) -> Result<(), RuntimeError> {
        let channel = self
            .waiting_start
            .take()
            .ok_or_else(|| setup_error(&self.id, "already started".into()))?;
        start(&self.id, channel)
    }

    /// The PIDs of the container's processes as the container sees them.
    pub fn processes(&self) -> Result<Vec<u32>, RuntimeError> {
        let pids = self.cgroup.pids().map_err(|source| RuntimeError::Cgroup {
            id: self.id.clone(),
            source,
        })?;
        Ok(pids.into_iter().filter_map(pid_in_container).collect())
    }

    /// Its processes with their users and command lines; one that ends
    /// meanwhile is left out.
    pub fn process_table(&self) -> Result<Vec<ProcessEntry>, RuntimeError> {
        let pids = self.cgroup.pids().map_err(|source| RuntimeError::Cgroup {
            id: self.id.clone(),
            source,
        })?;
        Ok(pids.into_iter().filter_map(process_entry).collect())
    }

    /// Kills every process of the container and removes its cgroup and
    /// writable layer.
    pub fn destroy(mut self) -> Result<(), RuntimeError> {
        // A container never started: its helper exits when this closes.
        self.waiting_start = None;
        self.cgroup
            .destroy(DESTROY_PATIENCE)
            .map_err(|source| RuntimeError::Cgroup {
                id: self.id.clone(),
                source,
            })?;
        fs::remove_dir_all(&self.bundle).map_err(io_error(&self.id, "removing its directories"))
    }
}

fn start(id: &str, mut channel: Channel) -> Result<(), RuntimeError> {
    let talk = |e: io::Error| RuntimeError::Io {
        id: id.to_string(),
        what: "starting the process",
        source: e,
    };
    channel.send(&Message::Start).map_err(talk)?;
    match channel.receive().map_err(talk)? {
        // The channel closed on exec.
        None => Ok(()),
        Some(Message::Error(message)) => Err(setup_error(id, message)),
        Some(other) => Err(setup_error(
            id,
            format!("unexpected {other:?} from the helper"),
        )),
    }
}

/// The last PID of /proc/<pid>/status's NSpid line: the innermost
/// namespace's.
/// One process of a container, as `top` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEntry {
    /// As the container sees it.
    pub pid: u32,
    pub uid: u32,
    /// The arguments joined by spaces, or the name in brackets.
    pub command: String,
}

/// The longest command line kept, in bytes.
pub const MAX_COMMAND_BYTES: usize = 4096;

fn process_entry(pid: i32) -> Option<ProcessEntry> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::split_whitespace)
    };
    let in_container = field("NSpid:")?.last()?.parse().ok()?;
    let uid = field("Uid:")?.next()?.parse().ok()?;
    let name = field("Name:")?.next().unwrap_or_default().to_string();
    let mut cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline.truncate(MAX_COMMAND_BYTES);
    let words: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let command = if words.is_empty() {
        format!("[{name}]")
    } else {
        words.join(" ")
    };
    Some(ProcessEntry {
        pid: in_container,
        uid,
        command,
    })
}

fn pid_in_container(pid: i32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

fn terminal_size(process: &Process) -> Option<(u16, u16)> {
    if !process.terminal().unwrap_or(false) {
        return None;
    }
    Some(
        process
            .console_size()
            .as_ref()
            .map_or(DEFAULT_CONSOLE, |size| {
                (
                    u16::try_from(size.height()).unwrap_or(u16::MAX),
                    u16::try_from(size.width()).unwrap_or(u16::MAX),
                )
            }),
    )
}

pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok && id.len() <= 128 {
        Ok(())
    } else {
        Err(RuntimeError::InvalidId(id.to_string()))
    }
}

/// What the runtime refuses up front, rather than half-way through setup.
fn validate_spec(spec: &Spec) -> Result<Process, RuntimeError> {
    let invalid = |m: &str| RuntimeError::InvalidSpec(m.to_string());
    let process = spec
        .process()
        .clone()
        .ok_or_else(|| invalid("no process"))?;
    validate_process(&process)?;
    if spec.hooks().is_some() {
        return Err(invalid("hooks are not supported"));
    }
    // Compiled here too, so a profile that cannot be honoured is refused
    // at create, naming what it asks for.
    if let Some(profile) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        crate::seccomp::compile(profile).map_err(|e| invalid(&e.to_string()))?;
    }
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for namespace in &namespaces {
        if matches!(
            namespace.typ(),
            LinuxNamespaceType::User | LinuxNamespaceType::Time
        ) {
            return Err(RuntimeError::InvalidSpec(format!(
                "{} namespaces are not supported",
                namespace.typ()
            )));
        }
    }
    for mount in spec.mounts().iter().flatten() {
        if !mount.destination().is_absolute() {
            return Err(RuntimeError::InvalidSpec(format!(
                "mount destination {} is not absolute",
                mount.destination().display()
            )));
        }
    }
    Ok(process)
}

fn validate_process(process: &Process) -> Result<(), RuntimeError> {
    let args = process.args().as_deref().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(RuntimeError::InvalidSpec("process.args is empty".into()));
    }
    if !process.cwd().is_absolute() {
        return Err(RuntimeError::InvalidSpec(format!(
            "process.cwd {} is not absolute",
            process.cwd().display()
        )));
    }
    Ok(())
}

fn setup_error(id: &str, message: String) -> RuntimeError {
    RuntimeError::Setup {
        id: id.to_string(),
        message,
    }
}

fn io_error<'a>(id: &'a str, what: &'static str) -> impl FnOnce(io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io {
        id: id.to_string(),
        what,
        source,
    }
}

/// Whether `path` is a usable cgroup v2 directory.
pub fn is_cgroup2(path: &Path) -> bool {
    path.join("cgroup.controllers").exists()
}
