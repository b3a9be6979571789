//! Virtio device throughput: vsock both ways through one stream, and
//! virtio-blk sequential write/read and 4 KiB random reads, measured in the
//! guest by capsa-io-probe; the same probe measures the host's own Unix
//! socket pair and the disk's backing file as the reference.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::process;
use crate::stats::{cell, Summary};

const VSOCK_PORT: u32 = 5000;

#[derive(clap::Args)]
pub struct DevicesArgs {
    /// The capsa-vmm binary.
    #[arg(long)]
    vmm: PathBuf,
    #[arg(long)]
    kernel: PathBuf,
    /// An initramfs with capsa-io-probe at /bin/capsa-io-probe.
    #[arg(long)]
    initrd: PathBuf,
    /// The capsa-io-probe binary, for the host's end and the references.
    #[arg(long)]
    probe: PathBuf,
    /// Bytes through the vsock stream each way.
    #[arg(long, default_value_t = 256 << 20)]
    vsock_bytes: u64,
    /// Size of the disk and of the sequential passes, MiB.
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
    /// 4 KiB random reads per run.
    #[arg(long, default_value_t = 20_000)]
    random_reads: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = 2)]
    cpus: u8,
    #[arg(long, default_value_t = 512)]
    memory_mib: u64,
    /// Directory for the disk image and sockets (default: a new temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One measured quantity for the guest and for the host reference.
#[derive(Serialize)]
struct Metric {
    name: &'static str,
    unit: &'static str,
    guest: Option<Summary>,
    host_reference: Option<Summary>,
    reference: &'static str,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    vsock_bytes: u64,
    disk_mib: u64,
    random_reads: u64,
    cpus: u8,
    memory_mib: u64,
    runs: usize,
    metrics: Vec<Metric>,
}

/// `key=value` fields of a probe report line.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn probe_line<'a>(output: &'a str, prefix: &str) -> Result<&'a str> {
    output
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| l.starts_with(prefix))
        .with_context(|| format!("no {prefix:?} line in:\n{output}"))
}

struct Sample {
    guest: [f64; 5],
    host: [f64; 5],
}

fn spawn_quiet(command: &mut Command) -> Result<Child> {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {:?}", command.get_program()))
}

fn run_once(args: &DevicesArgs, dir: &Path) -> Result<Sample> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let image = dir.join("bench-disk.img");
    let file = std::fs::File::create(&image)?;
    file.set_len(args.disk_mib << 20)?;
    drop(file);

    // Host reference: the same probe code on a socketpair and on the file.
    eprintln!("devices: host reference");
    let mut bulk = Command::new(&args.probe);
    bulk.arg("bulk-unix").arg(args.vsock_bytes.to_string());
    let bulk = process::run(bulk, timeout)?.success()?.stdout;
    let bulk = probe_line(&bulk, "bulk-unix:")?;
    let mut disk = Command::new(&args.probe);
    disk.arg("blk-bench")
        .arg(&image)
        .arg(args.disk_mib.to_string())
        .arg(args.random_reads.to_string());
    let disk = process::run(disk, timeout)?.success()?.stdout;
    let disk = probe_line(&disk, "blk-bench:")?;

    // The guest: the host end serves the two bulk streams.
    eprintln!("devices: guest");
    let socket = dir.join("bench-vsock.sock");
    let mut server = spawn_quiet(
        Command::new(&args.probe)
            .arg("serve-unix")
            .arg(format!("{}_{VSOCK_PORT}", socket.display()))
            .arg("2"),
    )?;
    let steps = format!(
        "vsock-bulk={VSOCK_PORT}:{} blk-bench=vda:{}:{}",
        args.vsock_bytes, args.disk_mib, args.random_reads
    );
    let vm = capsa_vmm_config::VmmArgs {
        disks: vec![capsa_vmm_config::DiskConfig::at(image.clone(), false, None)],
        vsock: Some(capsa_vmm_config::VsockConfig::at(&socket)),
        cmdline: format!("quiet rdinit=/bin/capsa-io-probe -- {steps}"),
        ..process::vmm_args(&args.kernel, &args.initrd, args.cpus, args.memory_mib)
    };
    let vm = process::vmm_command(&args.vmm, &vm)?;
    let result = process::run(vm, timeout);
    let _ = server.kill();
    let _ = server.wait();
    let output = result?.success()?.stdout;
    if let Ok(failed) = probe_line(&output, "PROBE ") {
        if output.contains(" FAIL ") {
            bail!("a guest step failed ({failed}):\n{output}");
        }
    }
    let vsock = probe_line(&output, "PROBE vsock-bulk ok")?;
    let blk = probe_line(&output, "PROBE blk-bench ok")?;
    let get =
        |line: &str, key: &str| field(line, key).with_context(|| format!("no {key} in {line:?}"));
    Ok(Sample {
        guest: [
            get(vsock, "guest_to_host_mib_s")?,
            get(vsock, "host_to_guest_mib_s")?,
            get(blk, "seq_write_mib_s")?,
            get(blk, "seq_read_mib_s")?,
            get(blk, "rand_read_4k_iops")?,
        ],
        host: [
            get(bulk, "send_mib_s")?,
            get(bulk, "receive_mib_s")?,
            get(disk, "seq_write_mib_s")?,
            get(disk, "seq_read_mib_s")?,
            get(disk, "rand_read_4k_iops")?,
        ],
    })
}

pub fn run(args: &DevicesArgs) -> Result<()> {
    let (_temp, dir) = crate::workdir::scratch(&args.work_dir)?;
    let mut samples = Vec::with_capacity(args.runs);
    for run in 0..args.runs {
        let sample = run_once(args, &dir).with_context(|| format!("run {}", run + 1))?;
        eprintln!(
            "devices run {}: guest {:?}, host {:?}",
            run + 1,
            sample.guest,
            sample.host
        );
        samples.push(sample);
    }
    let column = |guest: bool, i: usize| {
        let values: Vec<f64> = samples
            .iter()
            .map(|s| if guest { s.guest[i] } else { s.host[i] })
            .collect();
        Summary::of(&values)
    };
    let names = [
        ("vsock guest to host", "MiB/s", "Unix socketpair, send"),
        ("vsock host to guest", "MiB/s", "Unix socketpair, receive"),
        (
            "virtio-blk sequential write (1 MiB, O_DIRECT)",
            "MiB/s",
            "backing file",
        ),
        (
            "virtio-blk sequential read (1 MiB, O_DIRECT)",
            "MiB/s",
            "backing file",
        ),
        (
            "virtio-blk random read 4 KiB (O_DIRECT, QD1)",
            "IOPS",
            "backing file",
        ),
    ];
    let metrics: Vec<Metric> = names
        .iter()
        .enumerate()
        .map(|(i, &(name, unit, reference))| Metric {
            name,
            unit,
            guest: column(true, i),
            host_reference: column(false, i),
            reference,
        })
        .collect();

    println!(
        "virtio devices, {} vCPU, {} MiB guest, vsock {} MiB each way, disk {} MiB, {} random reads; median (min-max) of {} runs",
        args.cpus,
        args.memory_mib,
        args.vsock_bytes >> 20,
        args.disk_mib,
        args.random_reads,
        args.runs
    );
    println!("| metric | unit | capsa guest | host reference | reference is |");
    println!("|---|---|---|---|---|");
    for m in &metrics {
        println!(
            "| {} | {} | {} | {} | {} |",
            m.name,
            m.unit,
            cell(&m.guest),
            cell(&m.host_reference),
            m.reference
        );
    }
    let report = Report {
        benchmark: "devices",
        vsock_bytes: args.vsock_bytes,
        disk_mib: args.disk_mib,
        random_reads: args.random_reads,
        cpus: args.cpus,
        memory_mib: args.memory_mib,
        runs: args.runs,
        metrics,
    };
    let path = args
        .json
        .clone()
        .unwrap_or_else(|| crate::default_json("devices"));
    crate::write_json(&path, &report)
}

/// A scratch directory removed when dropped.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_probe_fields() {
        let out = "noise\nPROBE blk-bench ok seq_write_mib_s=12.5 seq_read_mib_s=30.0 rand_read_4k_iops=900\n";
        let line = probe_line(out, "PROBE blk-bench ok").unwrap();
        assert_eq!(field(line, "seq_write_mib_s"), Some(12.5));
        assert_eq!(field(line, "rand_read_4k_iops"), Some(900.0));
        assert_eq!(field(line, "seq_read"), None);
        assert!(probe_line(out, "PROBE vsock").is_err());
    }
}
