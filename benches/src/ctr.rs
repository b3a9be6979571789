//! Starting a container through containerd: wall time of
//! `ctr run --rm IMAGE ID true` with each runtime given (Capsa's shim, a
//! microVM per sandbox, next to io.containerd.runc.v2), same image, same
//! containerd, same run. What the Capsa shim spent on the root filesystem
//! (streamed to its guest, or written to a disk as an EROFS image) is
//! read off containerd's log, where the shim reports it.

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
    /// The shim's "root filesystem sent" lines: ms per run, and bytes.
    rootfs_send_ms: Option<Summary>,
    rootfs_bytes: Option<u64>,
    /// Its "root filesystem written to disk" lines: ms per run, and the
    /// EROFS image's bytes.
    rootfs_disk_ms: Option<Summary>,
    rootfs_disk_bytes: Option<u64>,
}

/// (bytes, ms) of each line of containerd's log where the shim reports
/// `what` ("root filesystem sent to the guest, B bytes in M ms", or
/// "root filesystem written to disk rootfsN, B bytes in M ms").
fn rootfs_lines(log: &str, what: &str) -> Vec<(u64, f64)> {
    log.lines()
        .filter_map(|line| {
            let rest = line.split(what).nth(1)?;
            let rest = rest.split_once(", ")?.1;
            let mut words = rest.split_whitespace();
            let bytes = words.next()?.parse().ok()?;
            let ms = words.nth(2)?.parse().ok()?;
            Some((bytes, ms))
        })
        .collect()
}

const SENT: &str = "root filesystem sent to the guest";
const WRITTEN: &str = "root filesystem written to disk";

pub fn run(args: &CtrArgs) -> Result<()> {
    // Only this run's lines count: the log may hold earlier ones.
    let log_start = args
        .containerd_log
        .as_ref()
        .and_then(|path| std::fs::metadata(path).ok())
        .map_or(0, |m| m.len() as usize);
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
    let log = args
        .containerd_log
        .as_ref()
        .and_then(|path| std::fs::read(path).ok())
        .map(|bytes| {
            String::from_utf8_lossy(bytes.get(log_start..).unwrap_or_default()).into_owned()
        })
        .unwrap_or_default();
    let sends = rootfs_lines(&log, SENT);
    let writes = rootfs_lines(&log, WRITTEN);
    let ms_of =
        |lines: &[(u64, f64)]| Summary::of(&lines.iter().map(|(_, ms)| *ms).collect::<Vec<_>>());
    let report = Report {
        runs: args.runs,
        image: args.image.clone(),
        rows,
        rootfs_send_ms: ms_of(&sends),
        rootfs_bytes: sends.first().map(|(bytes, _)| *bytes),
        rootfs_disk_ms: ms_of(&writes),
        rootfs_disk_bytes: writes.first().map(|(bytes, _)| *bytes),
    };

    println!(
        "`ctr run --rm {} ID true`, wall ms, median (min-max) of {} runs",
        args.image, args.runs
    );
    print_wall_table(&report.rows);
    if let Some(bytes) = report.rootfs_bytes {
        println!(
            "of which the Capsa shim spent {} ms streaming the {:.1} MiB root filesystem to the guest",
            cell(&report.rootfs_send_ms),
            bytes as f64 / (1024.0 * 1024.0)
        );
    }
    if let Some(bytes) = report.rootfs_disk_bytes {
        println!(
            "or {} ms writing it to a disk as a {:.1} MiB EROFS image",
            cell(&report.rootfs_disk_ms),
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
        assert_eq!(rootfs_lines(log, SENT), [(1234, 56.0), (1234, 60.0)]);
        let disk = "msg=\"task c: root filesystem written to disk rootfs0, 4096 bytes in 7 ms\"";
        assert_eq!(rootfs_lines(disk, WRITTEN), [(4096, 7.0)]);
        assert!(rootfs_lines(disk, SENT).is_empty());
    }
}
