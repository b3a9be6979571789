//! Running a child process to completion with a deadline, keeping its
//! output: every benchmark's runner goes through here.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Finished {
    pub wall: Duration,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The output, or an error with all of it when the process failed.
    pub fn success(self) -> Result<Self> {
        if !self.status.success() {
            bail!(
                "exited with {}: {}{}",
                self.status,
                self.stderr,
                self.stdout
            );
        }
        Ok(self)
    }
}

/// capsa-vmm booting `kernel` and `initrd` with `cpus` and `memory_mib`;
/// each benchmark adds its devices and command line to the arguments.
pub fn vmm_args(
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    cpus: u8,
    memory_mib: u64,
) -> capsa_vmm_config::VmmArgs {
    capsa_vmm_config::VmmArgs {
        initrd: Some(initrd.to_path_buf()),
        cpus,
        memory_mib,
        ..capsa_vmm_config::VmmArgs::new(kernel)
    }
}

/// The command that runs capsa-vmm (`vmm`) with `args`.
pub fn vmm_command(vmm: &std::path::Path, args: &capsa_vmm_config::VmmArgs) -> Result<Command> {
    let mut c = Command::new(vmm);
    c.args(args.to_args()?);
    Ok(c)
}

/// Wall milliseconds of `command` run to a successful end (5 minutes at
/// most).
pub fn timed_ms(command: Command) -> Result<f64> {
    let finished = run(command, Duration::from_secs(300))?.success()?;
    Ok(finished.wall.as_secs_f64() * 1000.0)
}

/// Wall milliseconds of `runs` runs of the commands `make` builds (given
/// the run's index), stopping at the first that fails; `label` names them
/// in what is printed to stderr.
pub fn wall_samples(label: &str, runs: usize, mut make: impl FnMut(usize) -> Command) -> Vec<f64> {
    let mut samples = Vec::new();
    for run in 0..runs {
        match timed_ms(make(run)) {
            Ok(ms) => samples.push(ms),
            Err(e) => {
                eprintln!("{label}: {e:#}");
                break;
            }
        }
    }
    eprintln!("{label}: {samples:.0?} ms");
    samples
}

/// `runs` runs of `peer` (NAME=PATH of an OCI runtime: runc, crun) on the
/// OCI bundle `bundle`, `run_args` before its `--bundle`: its name and its
/// wall samples.
pub fn peer_samples(
    peer: &str,
    run_args: &[String],
    bundle: &std::path::Path,
    runs: usize,
) -> Result<(String, Vec<f64>)> {
    let Some((name, path)) = peer.split_once('=') else {
        anyhow::bail!("--peer {peer}: expected NAME=PATH");
    };
    let samples = wall_samples(name, runs, |run| {
        let mut command = Command::new(path);
        command
            .arg("run")
            .args(run_args)
            .arg("--bundle")
            .arg(bundle)
            .arg(format!("bench-{}-{run}", std::process::id()));
        command
    });
    Ok((name.to_string(), samples))
}

/// Runs `command` to the end, killing it after `timeout`.
pub fn run(mut command: Command, timeout: Duration) -> Result<Finished> {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {:?}", command.get_program()))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    // Wait on a thread of its own rather than polling: a tight poll loop
    // competes for the CPUs the measured VM runs on.
    let pid = child.id();
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait());
    });
    let status = match exited.recv_timeout(timeout) {
        Ok(status) => status?,
        Err(_) => {
            // SAFETY: kill(2) on the child's pid, which is not reaped yet
            // (the waiting thread still holds it).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = exited.recv();
            bail!(
                "{:?} did not finish within {timeout:?}",
                command.get_program()
            );
        }
    };
    Ok(Finished {
        wall: start.elapsed(),
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}
