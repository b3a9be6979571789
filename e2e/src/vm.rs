//! The artifacts a run has (kernel, initramfs, binaries, images), and
//! microVMs run to their end or in the background, with what they
//! printed and how they ended.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use capsa_vmm_config::VmmArgs;
use serde::Deserialize;

use crate::suite::EmulationFault;

/// capsa-vmm's status when the guest triple-faulted.
pub const TRIPLE_FAULT_STATUS: i32 = 3;
/// What capsa-vmm prints when the guest triple-faulted (its
/// `GuestExit::describe`).
pub const TRIPLE_FAULT_TEXT: &str = "guest triple-faulted";
/// capsa-vmm's status when the guest kernel panicked.
pub const PANIC_STATUS: i32 = 2;

/// The directory of a run's artifacts, as the runner lays it out.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub dir: PathBuf,
    /// iproute2's `ip` (the outer machine's busybox has its own applet,
    /// without netns).
    pub ip: PathBuf,
}

impl Artifacts {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A host program: the payload's own copy (nested, the outer machine
    /// has busybox only), else whatever PATH finds.
    pub fn tool(&self, name: &str) -> PathBuf {
        let own = self.dir.join("bin").join(name);
        if own.exists() {
            own
        } else {
            PathBuf::from(name)
        }
    }

    pub fn vmm(&self) -> PathBuf {
        self.path("capsa-vmm")
    }

    /// A VM of `cpus` and `memory_mib` booting the guest kernel and the
    /// agent's initramfs.
    pub fn vm(&self, cpus: u8, memory_mib: u64) -> VmmArgs {
        VmmArgs {
            initrd: Some(self.path("initramfs.cpio")),
            cpus,
            memory_mib,
            ..VmmArgs::new(self.path("vmlinux"))
        }
    }

    /// `program` with `args`, run in network namespace `netns` when one
    /// is given.
    pub fn command_in(&self, netns: Option<&str>, program: &Path, args: &[OsString]) -> Command {
        match netns {
            Some(netns) => {
                let mut command = Command::new(&self.ip);
                command
                    .args(["netns", "exec", netns])
                    .arg(program)
                    .args(args);
                command
            }
            None => {
                let mut command = Command::new(program);
                command.args(args);
                command
            }
        }
    }

    /// Runs `ip ARGS`, failing with what it printed.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let output = Command::new(&self.ip)
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.ip.display()))?;
        anyhow::ensure!(
            output.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }
}

/// A network namespace with one tap in it, removed when dropped.
pub struct TapNamespace<'a> {
    artifacts: &'a Artifacts,
    pub name: String,
}

impl<'a> TapNamespace<'a> {
    /// Namespace `name` with tap `tap` up, the host's end at `address`
    /// (CIDR), and loopback up.
    pub fn new(artifacts: &'a Artifacts, name: &str, tap: &str, address: &str) -> Result<Self> {
        std::fs::create_dir_all("/run/netns").ok();
        // One left by an earlier run that died.
        let _ = artifacts.ip(&["netns", "delete", name]);
        artifacts.ip(&["netns", "add", name])?;
        let namespace = TapNamespace {
            artifacts,
            name: name.to_string(),
        };
        let in_ns = |args: &[&str]| {
            let mut all = vec!["-n", name];
            all.extend_from_slice(args);
            artifacts.ip(&all)
        };
        in_ns(&["tuntap", "add", tap, "mode", "tap"])?;
        in_ns(&["addr", "add", address, "dev", tap])?;
        in_ns(&["link", "set", tap, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }
}

impl Drop for TapNamespace<'_> {
    fn drop(&mut self) {
        let _ = self.artifacts.ip(&["netns", "delete", &self.name]);
    }
}

/// How a VMM run ended.
#[derive(Debug)]
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The emulation's faults, told apart from ours: a triple fault (the
    /// nested KVM's, never seen on real KVM).
    pub fn fault(&self) -> Option<EmulationFault> {
        (self.status == Some(TRIPLE_FAULT_STATUS))
            .then(|| EmulationFault("a microVM triple-faulted".into()))
    }

    /// The console's last lines, for a failure's detail.
    pub fn tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self.stdout.lines().chain(self.stderr.lines()).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The agent's ready line.
    pub fn ready(&self) -> Option<Ready> {
        self.stdout.lines().find_map(|l| {
            let json = l.trim_end_matches('\r').split_once("CAPSA_READY ")?.1;
            serde_json::from_str(json).ok()
        })
    }
}

/// What the agent reports once the guest is up.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Ready {
    pub cpus: u64,
    pub mem_total_kib: u64,
}

/// Keeps what `pipe` says, and shows each line on stderr as it comes (for
/// whoever watches the run: the nested runner takes a quiet console for a
/// frozen machine). stdout is the JSON lines' alone.
/// What a pipe's reader has collected so far, shared with the thread that
/// reads it (which may never see the pipe's end: see `wait_for`).
type Collected = std::sync::Arc<std::sync::Mutex<(String, bool)>>;

fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> Collected {
    let collected: Collected = Default::default();
    let text = collected.clone();
    std::thread::spawn(move || {
        if let Some(pipe) = pipe {
            for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).into_owned();
                // One write for the whole line, so that it stays whole.
                let _ = std::io::stderr().write_all(format!("  | {line}\n").as_bytes());
                let mut shared = text.lock().unwrap_or_else(|e| e.into_inner());
                shared.0.push_str(&line);
                shared.0.push('\n');
            }
        }
        text.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
    });
    collected
}

/// The text a reader collected, once it has seen its pipe's end or
/// `patience` has passed (a process stuck in the kernel, which even
/// SIGKILL does not end at once, holds its pipes open).
fn collected(text: &Collected, patience: Duration) -> String {
    let deadline = Instant::now() + patience;
    loop {
        let (text, ended) = text.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if ended || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A VMM (or any program) running in the background, its output kept.
pub struct Background {
    child: Child,
    stdout: Collected,
    stderr: Collected,
}

impl Background {
    pub fn spawn(command: Command) -> Result<Self> {
        Self::spawn_with(command, None)
    }

    /// `command`, with `stdin` written to it (and then closed) when given.
    pub fn spawn_with(mut command: Command, stdin: Option<&[u8]>) -> Result<Self> {
        let mut child = command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {:?}", command.get_program()))?;
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(bytes)
                .with_context(|| format!("writing to {:?}", command.get_program()))?;
        }
        Ok(Background {
            stdout: read_in_background(child.stdout.take()),
            stderr: read_in_background(child.stderr.take()),
            child,
        })
    }

    /// Waits up to `timeout`, killing a program still running then; says
    /// whether it had to.
    fn wait_for(mut self, timeout: Duration) -> Result<(Run, bool)> {
        let deadline = Instant::now() + timeout;
        let status: Option<ExitStatus> = loop {
            if let Some(status) = self.child.try_wait()? {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                // A process stuck in the kernel (a vCPU thread inside the
                // nested KVM) may not die at once: it is not waited for
                // long, so that the check fails and says so.
                let killed = Instant::now() + Duration::from_secs(10);
                while Instant::now() < killed && matches!(self.child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let patience = Duration::from_secs(if status.is_some() { 30 } else { 2 });
        let run = Run {
            status: status.and_then(|s| s.code()),
            stdout: collected(&self.stdout, patience),
            stderr: collected(&self.stderr, patience),
        };
        Ok((run, status.is_none()))
    }

    /// Waits up to `timeout`; a microVM (or its host end) still running
    /// then is killed, and that is an emulation fault (a guest that
    /// stopped answering).
    pub fn finish(self, timeout: Duration) -> Result<Run> {
        let (run, timed_out) = self.wait_for(timeout)?;
        if timed_out {
            return Err(EmulationFault(format!(
                "still running after {} s; its last lines:\n{}",
                timeout.as_secs(),
                run.tail(20)
            ))
            .into());
        }
        Ok(run)
    }

    /// Waits up to `timeout`; a program still running then is killed, and
    /// that is a failure of the check (a host program that hangs is ours:
    /// capsad and the shim bound their own waits on a guest).
    pub fn finish_or_fail(self, timeout: Duration) -> Result<Run> {
        let (run, timed_out) = self.wait_for(timeout)?;
        if timed_out {
            anyhow::bail!(
                "still running after {} s, killed; its last lines:\n{}",
                timeout.as_secs(),
                run.tail(20)
            );
        }
        Ok(run)
    }
}

/// Runs `command` to its end (at most `timeout`).
pub fn run(command: Command, timeout: Duration) -> Result<Run> {
    Background::spawn(command)?.finish(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_parse_from_the_console() {
        let run = Run {
            status: Some(0),
            stdout: "noise\r\nCAPSA_READY {\"cpus\":2,\"mem_total_kib\":1000,\"uptime_ms\":4}\r\n"
                .into(),
            stderr: String::new(),
        };
        let ready = run.ready().unwrap();
        assert_eq!((ready.cpus, ready.mem_total_kib), (2, 1000));
        assert!(run.fault().is_none());
    }

    #[test]
    fn a_triple_fault_is_the_emulations_and_a_hang_too() {
        let run = Run {
            status: Some(TRIPLE_FAULT_STATUS),
            stdout: String::new(),
            stderr: String::new(),
        };
        assert!(run.fault().is_some());
        let mut sleeper = Command::new("sleep");
        sleeper.arg("5");
        let err = self::run(sleeper, Duration::from_millis(100)).unwrap_err();
        assert!(err.downcast_ref::<EmulationFault>().is_some(), "{err:#}");
    }
}
