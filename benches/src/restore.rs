//! `restore`: a VM restored from a snapshot against the same VM booted
//! cold, each timed from starting capsa-vmm to its agent's first answer
//! (a ping over vsock), in one run; and the host memory (PSS) of idle
//! restored VMs against idle cold-booted ones.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use capsa_guest_client::Guest;
use capsa_vmm_config::{RestoreFrom, SnapshotTo, VmmArgs, VsockConfig};
use serde::Serialize;

use crate::stats::{cell, Summary};

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The capsa-vmm binary.
    #[arg(long)]
    vmm: PathBuf,
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: PathBuf,
    /// Starts per runner.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Idle VMs of each kind whose memory is measured.
    #[arg(long, default_value_t = 5)]
    idle: usize,
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Give up on one start after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Where to write the JSON results.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Runner {
    runner: String,
    runs: usize,
    to_agent_ms: Option<Summary>,
    /// Proportional set size of each idle VMM, in MiB.
    idle_pss_mib: Option<Summary>,
}

#[derive(Serialize)]
struct Report<'a> {
    benchmark: &'static str,
    kernel: &'a Path,
    cpus: u8,
    memory_mib: u64,
    snapshot_memory_mib_on_disk: f64,
    results: Vec<Runner>,
    restore_over_cold: Option<f64>,
}

/// A VMM started with `args` and `fds` open in it.
fn start(vmm: &Path, args: &VmmArgs, fds: Vec<i32>) -> Result<Child> {
    let mut command = Command::new(vmm);
    command
        .args(args.to_args()?)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    capsa_vm_process::inherit_fds(&mut command, fds);
    command.spawn().context("starting capsa-vmm")
}

/// Waits for the agent behind `socket` to answer a ping.
fn answered(socket: &Path, timeout: Duration) -> Result<Guest> {
    let guest = Guest::connect(socket, timeout)?;
    guest.ping()?;
    Ok(guest)
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The proportional set size of process `pid`, in MiB.
fn pss_mib(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no Pss line")?;
    Ok(kib / 1024.0)
}

fn private_file(path: &Path) -> Result<File> {
    capsa_vm_process::snapshot_file(path).with_context(|| format!("creating {}", path.display()))
}

struct Bench<'a> {
    args: &'a RestoreArgs,
    dir: &'a Path,
    timeout: Duration,
}

impl Bench<'_> {
    fn vm(&self, socket: &Path) -> VmmArgs {
        VmmArgs {
            vsock: Some(VsockConfig::at(socket)),
            ..crate::process::vmm_args(
                &self.args.kernel,
                &self.args.initrd,
                self.args.cpus,
                self.args.memory_mib,
            )
        }
    }

    /// Boots the template and snapshots it; returns the state's and the
    /// memory's paths.
    fn template(&self) -> Result<(PathBuf, PathBuf)> {
        let socket = self.dir.join("template.sock");
        let (state_path, memory_path) = (self.dir.join("state"), self.dir.join("memory"));
        let (mut control, theirs) = UnixStream::pair()?;
        let state = private_file(&state_path)?;
        let memory = private_file(&memory_path)?;
        let args = VmmArgs {
            snapshot_to: Some(SnapshotTo {
                control: theirs.as_raw_fd(),
                state: state.as_raw_fd(),
                memory: memory.as_raw_fd(),
            }),
            ..self.vm(&socket)
        };
        let fds = vec![theirs.as_raw_fd(), state.as_raw_fd(), memory.as_raw_fd()];
        let mut child = start(&self.args.vmm, &args, fds)?;
        drop((theirs, state, memory));
        drop(answered(&socket, self.timeout).context("the template's agent")?);
        control.write_all(b"s")?;
        control.set_read_timeout(Some(self.timeout))?;
        let mut answer = String::new();
        BufReader::new(&control).read_line(&mut answer)?;
        let status = child.wait()?;
        ensure!(
            answer.trim() == "ok" && status.success(),
            "the snapshot: {:?}, {status}",
            answer.trim()
        );
        Ok((state_path, memory_path))
    }

    fn restored(&self, n: usize, state: &Path, memory: &Path) -> Result<(Child, PathBuf)> {
        let socket = self.dir.join(format!("restored-{n}.sock"));
        let state = File::open(state)?;
        let memory = File::open(memory)?;
        let args = VmmArgs {
            restore_from: Some(RestoreFrom {
                state: state.as_raw_fd(),
                memory: memory.as_raw_fd(),
            }),
            ..self.vm(&socket)
        };
        let child = start(
            &self.args.vmm,
            &args,
            vec![state.as_raw_fd(), memory.as_raw_fd()],
        )?;
        Ok((child, socket))
    }

    fn cold(&self, n: usize) -> Result<(Child, PathBuf)> {
        let socket = self.dir.join(format!("cold-{n}.sock"));
        Ok((
            start(&self.args.vmm, &self.vm(&socket), Vec::new())?,
            socket,
        ))
    }

    /// Starts `runs` VMs one after another, timing each to its agent's
    /// answer, then `idle` at once, measuring their memory once all run.
    fn measure(
        &self,
        name: &str,
        start_one: impl Fn(usize) -> Result<(Child, PathBuf)>,
    ) -> Result<Runner> {
        let mut times = Vec::new();
        for n in 0..self.args.runs {
            let began = Instant::now();
            let (child, socket) = start_one(n)?;
            let result = answered(&socket, self.timeout);
            let took = began.elapsed();
            stop(child);
            result.with_context(|| format!("{name}, start {}", n + 1))?;
            times.push(took.as_secs_f64() * 1000.0);
        }
        let mut idle = Vec::new();
        for n in 0..self.args.idle {
            let (child, socket) = start_one(self.args.runs + n)?;
            idle.push(child);
            if let Err(e) = answered(&socket, self.timeout) {
                idle.into_iter().for_each(stop);
                bail!("{name}, idle VM {}: {e}", n + 1);
            }
        }
        // A moment for both kinds to settle before their pages are counted.
        std::thread::sleep(Duration::from_secs(2));
        let pss: Vec<f64> = idle.iter().filter_map(|c| pss_mib(c.id()).ok()).collect();
        idle.into_iter().for_each(stop);
        Ok(Runner {
            runner: name.to_string(),
            runs: self.args.runs,
            to_agent_ms: Summary::of(&times),
            idle_pss_mib: Summary::of(&pss),
        })
    }
}

pub fn run(args: &RestoreArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bench = Bench {
        args,
        dir: dir.path(),
        timeout: Duration::from_secs(args.timeout_secs),
    };
    let (state, memory) = bench.template()?;
    let on_disk = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&memory)?) as f64
        * 512.0
        / (1 << 20) as f64;
    let restored = bench.measure("capsa-vmm, restored from a snapshot", |n| {
        bench.restored(n, &state, &memory)
    })?;
    let cold = bench.measure("capsa-vmm, cold boot", |n| bench.cold(n))?;
    let ratio = match (&restored.to_agent_ms, &cold.to_agent_ms) {
        (Some(r), Some(c)) => Some(r.median / c.median),
        _ => None,
    };
    println!(
        "start to the agent's first answer, {} vCPU, {} MiB, {} runs each; PSS of {} idle VMMs each; median (min-max)",
        args.cpus, args.memory_mib, args.runs, args.idle
    );
    println!("| runner | to agent, ms | idle PSS, MiB |");
    println!("|---|---|---|");
    for r in [&restored, &cold] {
        println!(
            "| {} | {} | {} |",
            r.runner,
            cell(&r.to_agent_ms),
            cell(&r.idle_pss_mib)
        );
    }
    println!("snapshot memory file: {on_disk:.1} MiB on disk");
    if let Some(ratio) = ratio {
        println!("restored / cold: {ratio:.2}x (target: at most 0.1x)");
    }
    let report = Report {
        benchmark: "restore",
        kernel: &args.kernel,
        cpus: args.cpus,
        memory_mib: args.memory_mib,
        snapshot_memory_mib_on_disk: on_disk,
        results: vec![restored, cold],
        restore_over_cold: ratio,
    };
    let path = args
        .json
        .clone()
        .unwrap_or_else(|| crate::default_json("restore"));
    crate::write_json(&path, &report)
}
