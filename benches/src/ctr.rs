//! Starting a container through containerd: wall time of
//! `ctr run --rm IMAGE ID true` with each runtime given (Capsa's shim, a
//! microVM per sandbox, next to io.containerd.runc.v2), same image, same
//! containerd, same run. What the Capsa shim spent sending the root
//! filesystem to its guest is read off containerd's log, where the shim
//! reports it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::process;
use crate::stats::{cell, print_wall_table, Summary, WallRow};

#[derive(clap::Args)]
pub struct CtrArgs {
    /// Runs per runtime.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[arg(long, default_value = "ctr")]
    ctr: PathBuf,
    /// containerd's socket.
    #[arg(long)]
    address: PathBuf,
    /// The image, already imported.
    #[arg(long, default_value = "docker.io/library/busybox:latest")]
    image: String,
    /// LABEL=RUNTIME[ ARG...]: a runtime and more `ctr run` arguments
    /// (--runtime-config-path for Capsa, --no-pivot for runc on an
    /// initramfs root).
    #[arg(long = "runtime", required = true)]
    runtimes: Vec<String>,
    /// containerd's log, for the shim's root filesystem figures.
    #[arg(long)]
    containerd_log: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    runs: usize,
    image: String,
    rows: Vec<WallRow>,
    /// The shim's "root filesystem sent" lines: bytes and ms per run.
    rootfs_send_ms: Option<Summary>,
    rootfs_bytes: Option<u64>,
}

/// (bytes, ms) of each "root filesystem sent to the guest, B bytes in M ms"
/// line in containerd's log.
fn rootfs_sends(log: &str) -> Vec<(u64, f64)> {
    log.lines()
        .filter_map(|line| {
            let rest = line.split("root filesystem sent to the guest, ").nth(1)?;
            let mut words = rest.split_whitespace();
            let bytes = words.next()?.parse().ok()?;
            let ms = words.nth(2)?.parse().ok()?;
            Some((bytes, ms))
        })
        .collect()
}

pub fn run(args: &CtrArgs) -> Result<()> {
    let mut rows = Vec::new();
    for runtime in &args.runtimes {
        let Some((label, spec)) = runtime.split_once('=') else {
            bail!("--runtime {runtime}: expected LABEL=RUNTIME[ ARG...]");
        };
        let mut words = spec.split_whitespace();
        let Some(name) = words.next() else {
            bail!("--runtime {runtime}: no runtime named");
        };
        let extra: Vec<&str> = words.collect();
        let samples = process::wall_samples(label, args.runs, |run| {
            let mut command = Command::new(&args.ctr);
            command
                .arg("--address")
                .arg(&args.address)
                .args(["run", "--rm", "--runtime", name])
                .args(&extra)
                .arg(&args.image)
                .arg(format!("bench-{label}-{}-{run}", std::process::id()))
                .arg("true");
            command
        });
        rows.push(WallRow {
            runtime: format!("{label} ({name})"),
            wall_ms: Summary::of(&samples),
        });
    }
    let sends = args
        .containerd_log
        .as_ref()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .map(|log| rootfs_sends(&log))
        .unwrap_or_default();
    let send_ms: Vec<f64> = sends.iter().map(|(_, ms)| *ms).collect();
    let report = Report {
        runs: args.runs,
        image: args.image.clone(),
        rows,
        rootfs_send_ms: Summary::of(&send_ms),
        rootfs_bytes: sends.first().map(|(bytes, _)| *bytes),
    };

    println!(
        "`ctr run --rm {} ID true`, wall ms, median (min-max) of {} runs",
        args.image, args.runs
    );
    print_wall_table(&report.rows);
    if let Some(bytes) = report.rootfs_bytes {
        println!(
            "of which the Capsa shim spent {} ms sending the {:.1} MiB root filesystem to the guest",
            cell(&report.rootfs_send_ms),
            bytes as f64 / (1024.0 * 1024.0)
        );
    }
    crate::write_json(
        args.json.as_deref().unwrap_or(&crate::default_json("ctr")),
        &report,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shims_rootfs_lines_are_read() {
        let log = "time=\"x\" level=info msg=\"task a: root filesystem sent to the guest, 1234 bytes in 56 ms\"\n\
                   time=\"y\" level=info msg=\"something else\"\n\
                   time=\"z\" level=info msg=\"task b: root filesystem sent to the guest, 1234 bytes in 60 ms\"\n";
        assert_eq!(rootfs_sends(log), [(1234, 56.0), (1234, 60.0)]);
    }
}
