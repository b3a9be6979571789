//! A real capsad for the daemon suites: started in a network namespace of
//! the suite's own (its bridge and published ports live there), killed
//! and started again, reached through its API (`capsa_cli::client`, with
//! capsa-api's types) and through the real `capsa` binary where the CLI's
//! own behaviour is what is checked.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsa_api::{Event, GroupView};
use capsa_cli::client::Client;
use hyper::Method;

use crate::vm::{self, Artifacts};

pub const NETNS: &str = "capsa-e2e-daemon";
/// A cgroup v2 mount of the suites' own: `ip netns exec`, which starts
/// capsad in NETNS, mounts a fresh /sys, without /sys/fs/cgroup.
pub const CGROUP_MOUNT: &str = "/run/capsa-e2e-cgroup";

/// The parent of capsad's VM cgroups in the suites.
pub fn cgroup_parent() -> PathBuf {
    Path::new(CGROUP_MOUNT).join("capsa")
}

/// Mounts cgroup2 at CGROUP_MOUNT unless it is there already.
fn mount_cgroup2() -> Result<()> {
    let target = Path::new(CGROUP_MOUNT);
    if target.join("cgroup.controllers").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(target)?;
    // SAFETY: plain C strings that live across the call; no data pointer.
    let mounted = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/run/capsa-e2e-cgroup".as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if mounted != 0 {
        bail!(
            "mounting cgroup2 at {CGROUP_MOUNT}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
/// The longest a CLI (or ctr) command may take: a boot and a few calls to
/// a guest, each of which capsad and the shim bound themselves.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// What a `capsa` command did.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<vm::Run> for Output {
    fn from(run: vm::Run) -> Self {
        Output {
            code: run.status,
            stdout: run.stdout,
            stderr: run.stderr,
        }
    }
}

impl Output {
    pub fn describe(&self) -> String {
        let exit = self
            .code
            .map_or_else(|| "killed by a signal".to_string(), |c| format!("exit {c}"));
        format!(
            "{exit}; stdout: {}; stderr: {}",
            self.stdout.trim(),
            self.stderr.trim()
        )
    }

    /// Whether capsad said the guest gave no answer (its words for a call
    /// to the guest that timed out): the nested emulation's doing, as the
    /// suites count it (a suite it hits runs again; a failure in every
    /// run still counts).
    pub fn unanswered(&self) -> bool {
        self.stderr.contains("the guest is not responding")
            || self.stderr.contains("Receiver timeout")
    }

    /// Ok when it exited 0; an emulation fault when the guest gave no
    /// answer; else an error saying what it did.
    pub fn succeeded(&self, what: &str) -> Result<()> {
        match self.code {
            Some(0) => Ok(()),
            _ if self.unanswered() => Err(crate::suite::EmulationFault(format!(
                "{what}: the microVM stopped answering: {}",
                self.stderr.trim()
            ))
            .into()),
            _ => bail!("{what}: {}", self.describe()),
        }
    }

    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// Ok, saying what it did, when it exited `code` having printed
    /// exactly `lines` on stdout.
    pub fn exited_with(&self, code: i32, lines: &[&str]) -> Result<String> {
        if self.code != Some(code) || self.lines() != lines {
            bail!("wanted exit {code} and {lines:?}; got {}", self.describe());
        }
        Ok(self.describe())
    }
}

pub struct Capsad<'a> {
    pub artifacts: &'a Artifacts,
    pub work: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    /// The events seen by every daemon of the suite, in order.
    pub events: Arc<Mutex<Vec<Event>>>,
    /// More capsad arguments, for the suites' own settings.
    pub daemon_args: Vec<std::ffi::OsString>,
}

impl<'a> Capsad<'a> {
    pub fn new(artifacts: &'a Artifacts, name: &str) -> Result<Self> {
        let work = std::env::temp_dir().join(format!("capsa-e2e-{name}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all("/run/netns").ok();
        let _ = artifacts.ip(&["netns", "delete", NETNS]);
        artifacts.ip(&["netns", "add", NETNS])?;
        artifacts.ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
        // Where the host has no cgroup v2 capsad says so and runs VMs
        // without; the limits checks then fail, as they should.
        if let Err(e) = mount_cgroup2() {
            eprintln!("capsa-e2e: {e:#}");
        }
        Ok(Capsad {
            artifacts,
            socket: work.join("capsad.sock"),
            work,
            child: None,
            events: Arc::default(),
            daemon_args: Vec::new(),
        })
    }

    pub fn client(&self) -> Result<Client> {
        Client::new(&self.socket)
    }

    /// Starts capsad and waits until it answers; its events are followed.
    pub fn start(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.join("capsad.log"))?;
        let mut args: Vec<std::ffi::OsString> = vec![
            "--root".into(),
            self.work.join("root").into(),
            "--socket".into(),
            self.socket.clone().into(),
            "--kernel".into(),
            self.artifacts.path("vmlinux").into(),
            "--initrd".into(),
            self.artifacts.path("initramfs.cpio").into(),
            "--vmm".into(),
            self.artifacts.vmm().into(),
        ];
        args.extend(["--cgroup-parent".into(), cgroup_parent().into()]);
        args.extend(self.daemon_args.iter().cloned());
        // ip execs capsad: the child is capsad itself.
        let child = self
            .artifacts
            .command_in(Some(NETNS), &self.artifacts.path("capsad"), &args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting capsad")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answered = self
                .client()
                .and_then(|c| c.call::<Vec<GroupView>>(Method::GET, "/v1/groups", None));
            if answered.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("capsad did not answer within 30 s: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (socket, events) = (self.socket.clone(), self.events.clone());
        std::thread::spawn(move || {
            let Ok(client) = Client::new(&socket) else {
                return;
            };
            let mut pending = Vec::new();
            // Ends with the daemon.
            let _ = client.stream("/v1/events", |chunk| {
                pending.extend_from_slice(chunk);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    if let Ok(event) = serde_json::from_slice::<Event>(&line) {
                        events.lock().unwrap_or_else(|e| e.into_inner()).push(event);
                    }
                }
                Ok(())
            });
        });
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.work.join("capsad.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Runs the real `capsa` with `args` (and `stdin`), as a user would;
    /// one that hangs fails after [`COMMAND_TIMEOUT`].
    pub fn capsa_with(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
        self.capsa_in(args, stdin, &[])
    }

    /// As `capsa_with`, with more environment variables.
    pub fn capsa_in(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Output> {
        let mut command = Command::new(self.artifacts.path("capsa"));
        command.args(args).env("CAPSA_SOCKET", &self.socket);
        command.envs(env.iter().copied());
        let run = vm::Background::spawn_with(command, stdin)?.finish_or_fail(COMMAND_TIMEOUT)?;
        Ok(Output::from(run))
    }

    pub fn capsa(&self, args: &[&str]) -> Result<Output> {
        self.capsa_with(args, None)
    }

    /// `capsa image import` of the payload's busybox layout, as `busybox`.
    pub fn import_busybox(&self) -> Result<Output> {
        let layout = self.artifacts.path("busybox-oci");
        self.capsa(&[
            "image",
            "import",
            &layout.to_string_lossy(),
            "--name",
            "busybox",
        ])
    }

    pub fn fixture(&self, name: &str) -> PathBuf {
        self.artifacts.path("fixtures/daemon").join(name)
    }

    /// The events so far.
    pub fn seen(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `curl -sf URL` from inside the daemon's namespace.
    pub fn curl(&self, url: &str) -> Result<vm::Run> {
        let command = self.artifacts.command_in(
            Some(NETNS),
            &self.artifacts.tool("curl"),
            &["-sf".into(), "--max-time".into(), "5".into(), url.into()],
        );
        vm::run(command, Duration::from_secs(10))
    }

    pub fn root(&self) -> &Path {
        &self.work
    }
}

impl Drop for Capsad<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first: capsad leaves its groups' VMs running, and the
            // suite deletes its groups itself.
            // SAFETY: kill(2) with a PID and a signal number touches no memory.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.artifacts.ip(&["netns", "delete", NETNS]);
    }
}

/// Sends `signal` to process `pid` (a VMM, say).
pub fn send_signal(pid: u32, signal: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) takes no memory.
    let sent = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if sent != 0 {
        bail!("kill {signal} {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
