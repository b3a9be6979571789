//! Starting a container: wall time of `capsa run --rm IMAGE true` (a group
//! in a microVM of its own: boot, image, container, exit, delete) next to
//! runc and crun running the same busybox rootfs from an OCI bundle; and a
//! running group's memory on the host (its VMM's RSS and PSS, which hold
//! the guest's memory too).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::process;
use crate::stats::{print_wall_table, Summary, WallRow};

#[derive(clap::Args)]
pub struct ContainersArgs {
    /// Runs per runtime.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// The capsa CLI (CAPSA_SOCKET names the daemon).
    #[arg(long)]
    capsa: PathBuf,
    /// The image, already imported.
    #[arg(long, default_value = "busybox")]
    image: String,
    /// Peers: NAME=PATH of an OCI runtime (runc, crun), run on --bundle.
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// An OCI bundle whose process is `true`.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// More arguments for the peers' `run` (`--no-pivot` where the root
    /// is an initramfs, which pivot_root refuses).
    #[arg(long = "peer-run-arg", allow_hyphen_values = true)]
    peer_run_args: Vec<String>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Memory {
    vmm_rss_kib: u64,
    vmm_pss_kib: u64,
    group_memory_mib: u64,
}

#[derive(Serialize)]
struct Report {
    runs: usize,
    rows: Vec<WallRow>,
    memory: Option<Memory>,
}

/// A kib figure from a /proc status-like file.
fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn group_memory(capsa: &PathBuf, image: &str) -> Result<Memory> {
    let name = format!("bench-mem-{}", std::process::id());
    let mut start = Command::new(capsa);
    start.args(["run", "-d", "--name", &name, image, "sleep", "60"]);
    process::timed_ms(start)?;
    let mut inspect = Command::new(capsa);
    inspect.args(["inspect", &name]);
    let view = process::run(inspect, Duration::from_secs(60))?.success()?;
    let view: serde_json::Value = serde_json::from_str(&view.stdout)?;
    let pid = view["vmm_pid"].as_u64().context("no VMM pid")?;
    let memory_mib = view["memory_mib"].as_u64().unwrap_or(0);
    // Let the guest settle after boot.
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let memory = Memory {
        vmm_rss_kib: field_kib(&status, "VmRSS:").unwrap_or(0),
        vmm_pss_kib: field_kib(&rollup, "Pss:").unwrap_or(0),
        group_memory_mib: memory_mib,
    };
    let mut remove = Command::new(capsa);
    remove.args(["rm", &name]);
    process::timed_ms(remove)?;
    Ok(memory)
}

pub fn run(args: &ContainersArgs) -> Result<()> {
    let mut rows = Vec::new();
    let mut capsa = Vec::new();
    for _ in 0..args.runs {
        let mut command = Command::new(&args.capsa);
        command.args(["run", "--rm", &args.image, "true"]);
        capsa.push(process::timed_ms(command)?);
    }
    eprintln!("capsa run: {capsa:.0?} ms");
    rows.push(WallRow {
        runtime: "capsa run --rm (microVM per group)".into(),
        wall_ms: Summary::of(&capsa),
    });
    for peer in &args.peers {
        let Some((name, path)) = peer.split_once('=') else {
            bail!("--peer {peer}: expected NAME=PATH");
        };
        let bundle = args.bundle.as_ref().context("peers need --bundle")?;
        let samples = process::wall_samples(name, args.runs, |run| {
            let mut command = Command::new(path);
            command
                .arg("run")
                .args(&args.peer_run_args)
                .arg("--bundle")
                .arg(bundle)
                .arg(format!("bench-{}-{run}", std::process::id()));
            command
        });
        rows.push(WallRow {
            runtime: format!("{name} run (same rootfs, no VM)"),
            wall_ms: Summary::of(&samples),
        });
    }
    let memory = group_memory(&args.capsa, &args.image)
        .map_err(|e| eprintln!("memory: {e:#}"))
        .ok();

    println!(
        "starting a container running `true`, wall ms, median (min-max) of {} runs",
        args.runs
    );
    print_wall_table(&rows);
    if let Some(m) = &memory {
        println!(
            "a running group (1 vCPU, {} MiB, busybox sleeping): VMM RSS {:.1} MiB, PSS {:.1} MiB",
            m.group_memory_mib,
            m.vmm_rss_kib as f64 / 1024.0,
            m.vmm_pss_kib as f64 / 1024.0
        );
    }
    let report = Report {
        runs: args.runs,
        rows,
        memory,
    };
    crate::write_json(
        args.json
            .as_deref()
            .unwrap_or(&crate::default_json("containers")),
        &report,
    )
}
