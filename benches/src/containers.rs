//! Starting a container, per image: wall time of `capsa run --rm IMAGE
//! true` (a group in a microVM of its own: boot, layer disks, container,
//! exit, delete), the first time right after the import (which verifies
//! the blobs and converts the layers to disk images, timed too) and then
//! cached; next to runc and crun running the same root filesystem from an
//! OCI bundle. And a running container's memory: the guest's own use
//! (MemTotal - MemAvailable, read in the container) and its VMM's RSS and
//! PSS on the host.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::process;
use crate::stats::{print_wall_table, Summary, WallRow};

#[derive(clap::Args)]
pub struct ContainersArgs {
    /// Cached runs per image and runtime.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// The capsa CLI (CAPSA_SOCKET names the daemon).
    #[arg(long)]
    capsa: PathBuf,
    /// NAME,LAYOUT,BUNDLE: an image to import from the OCI layout as NAME,
    /// and the same root filesystem as an OCI bundle running `true` for
    /// the peers. Repeatable.
    #[arg(long = "image", value_parser = parse_image)]
    images: Vec<Image>,
    /// Peers: NAME=PATH of an OCI runtime (runc, crun), run on each bundle.
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// More arguments for the peers' `run` (`--no-pivot` where the root
    /// is an initramfs, which pivot_root refuses).
    #[arg(long = "peer-run-arg", allow_hyphen_values = true)]
    peer_run_args: Vec<String>,
    /// The socket of a second capsad whose VMMs run without their jail
    /// and seccomp filter (`--jail off --seccomp off`): the first image's
    /// cached run is measured there too, for what confinement costs.
    #[arg(long)]
    unconfined_socket: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct Image {
    name: String,
    layout: PathBuf,
    bundle: PathBuf,
}

fn parse_image(text: &str) -> Result<Image, String> {
    match text.split(',').collect::<Vec<_>>().as_slice() {
        [name, layout, bundle] => Ok(Image {
            name: name.to_string(),
            layout: layout.into(),
            bundle: bundle.into(),
        }),
        _ => Err(format!("{text}: expected NAME,LAYOUT,BUNDLE")),
    }
}

#[derive(Serialize)]
struct Memory {
    guest_used_kib: u64,
    guest_total_kib: u64,
    /// Both processes of a jailed VMM.
    vmm_rss_kib: u64,
    vmm_pss_kib: u64,
    /// The VMM's resident memory other than the guest's (capsad's stats).
    vmm_overhead_kib: u64,
}

#[derive(Serialize)]
struct ImageReport {
    image: String,
    /// `capsa image import`: verify the blobs, convert the layers.
    import_ms: f64,
    /// The first `capsa run --rm IMAGE true` after the import.
    first_run_ms: f64,
    rows: Vec<WallRow>,
    memory: Option<Memory>,
}

#[derive(Serialize)]
struct Report {
    runs: usize,
    images: Vec<ImageReport>,
}

/// A kib figure from a /proc status-like file.
fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn capsa(capsa: &PathBuf, args: &[&str]) -> Command {
    let mut command = Command::new(capsa);
    command.args(args);
    command
}

/// A container of `image` sleeping: the guest's memory in use as the
/// container reads it, and its VMM's on the host.
fn group_memory(cli: &PathBuf, image: &str) -> Result<Memory> {
    let name = format!("bench-mem-{}", std::process::id());
    process::timed_ms(capsa(
        cli,
        &["run", "-d", "--name", &name, image, "sleep", "120"],
    ))?;
    let measured = (|| {
        let view =
            process::run(capsa(cli, &["inspect", &name]), Duration::from_secs(60))?.success()?;
        let view: capsa_api::GroupView = serde_json::from_str(&view.stdout)?;
        let pid = view.vmm_pid.context("no VMM pid")?;
        // Let the guest settle after boot.
        std::thread::sleep(Duration::from_secs(2));
        let meminfo = process::run(
            capsa(cli, &["exec", &name, "cat", "/proc/meminfo"]),
            Duration::from_secs(60),
        )?
        .success()?
        .stdout;
        let total = field_kib(&meminfo, "MemTotal:").context("no MemTotal")?;
        let available = field_kib(&meminfo, "MemAvailable:").context("no MemAvailable")?;
        let (mut rss, mut pss) = (0, 0);
        for pid in capsa_vm_process::vmm_processes(pid) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let rollup =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            rss += field_kib(&status, "VmRSS:").unwrap_or(0);
            pss += field_kib(&rollup, "Pss:").unwrap_or(0);
        }
        let stats = process::run(
            capsa(cli, &["--json", "stats", &name]),
            Duration::from_secs(60),
        )?
        .success()?;
        let stats: capsa_api::GroupStats = serde_json::from_str(&stats.stdout)?;
        Ok(Memory {
            guest_used_kib: total.saturating_sub(available),
            guest_total_kib: total,
            vmm_rss_kib: rss,
            vmm_pss_kib: pss,
            vmm_overhead_kib: stats.vmm_overhead_kib,
        })
    })();
    process::timed_ms(capsa(cli, &["rm", &name]))?;
    measured
}

fn bench_image(args: &ContainersArgs, image: &Image, first: bool) -> Result<ImageReport> {
    let cli = &args.capsa;
    // From nothing: the image and its layer disks are gone after rm.
    let _ = process::run(
        capsa(cli, &["image", "rm", &image.name]),
        Duration::from_secs(60),
    );
    let layout = image.layout.to_string_lossy();
    let import_ms = process::timed_ms(capsa(
        cli,
        &["image", "import", &layout, "--name", &image.name],
    ))?;
    let first_run_ms = process::timed_ms(capsa(cli, &["run", "--rm", &image.name, "true"]))?;
    let mut cached = Vec::new();
    for _ in 0..args.runs {
        cached.push(process::timed_ms(capsa(
            cli,
            &["run", "--rm", &image.name, "true"],
        ))?);
    }
    eprintln!("{}: capsa run (cached): {cached:.0?} ms", image.name);
    let mut rows = vec![WallRow {
        runtime: format!("{}: capsa run --rm (microVM, cached disks)", image.name),
        wall_ms: Summary::of(&cached),
    }];
    if let (Some(socket), true) = (&args.unconfined_socket, first) {
        let unconfined = |words: &[&str]| {
            let mut command = capsa(cli, words);
            command.env("CAPSA_SOCKET", socket);
            command
        };
        process::timed_ms(unconfined(&[
            "image",
            "import",
            &layout,
            "--name",
            &image.name,
        ]))?;
        process::timed_ms(unconfined(&["run", "--rm", &image.name, "true"]))?;
        let samples = process::wall_samples("unconfined", args.runs, |_| {
            unconfined(&["run", "--rm", &image.name, "true"])
        });
        rows.push(WallRow {
            runtime: format!(
                "{}: capsa run --rm, VMM without jail and seccomp",
                image.name
            ),
            wall_ms: Summary::of(&samples),
        });
    }
    for peer in &args.peers {
        let (name, samples) =
            process::peer_samples(peer, &args.peer_run_args, &image.bundle, args.runs)?;
        rows.push(WallRow {
            runtime: format!("{}: {name} run (same rootfs, no VM)", image.name),
            wall_ms: Summary::of(&samples),
        });
    }
    let memory = group_memory(cli, &image.name)
        .map_err(|e| eprintln!("{}: memory: {e:#}", image.name))
        .ok();
    Ok(ImageReport {
        image: image.name.clone(),
        import_ms,
        first_run_ms,
        rows,
        memory,
    })
}

pub fn run(args: &ContainersArgs) -> Result<()> {
    if args.images.is_empty() {
        bail!("name at least one --image NAME,LAYOUT,BUNDLE");
    }
    let images = args
        .images
        .iter()
        .enumerate()
        .map(|(i, image)| bench_image(args, image, i == 0))
        .collect::<Result<Vec<_>>>()?;

    println!(
        "starting a container running `true`, wall ms, median (min-max) of {} runs",
        args.runs
    );
    let rows: Vec<WallRow> = images.iter().flat_map(|i| i.rows.clone()).collect();
    print_wall_table(&rows);
    println!(
        "{:<12} {:>12} {:>14} {:>16} {:>14} {:>14} {:>18}",
        "image",
        "import ms",
        "first run ms",
        "guest used MiB",
        "VMM RSS MiB",
        "VMM PSS MiB",
        "VMM overhead MiB"
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    for image in &images {
        let m = image.memory.as_ref();
        let show =
            |f: fn(&Memory) -> u64| m.map_or("-".to_string(), |m| format!("{:.1}", mib(f(m))));
        println!(
            "{:<12} {:>12.0} {:>14.0} {:>16} {:>14} {:>14} {:>18}",
            image.image,
            image.import_ms,
            image.first_run_ms,
            show(|m| m.guest_used_kib),
            show(|m| m.vmm_rss_kib),
            show(|m| m.vmm_pss_kib),
            show(|m| m.vmm_overhead_kib),
        );
    }
    if let [base, other, ..] = images.as_slice() {
        let median = |i: &ImageReport| i.rows[0].wall_ms.as_ref().map(|s| s.median);
        if let (Some(a), Some(b)) = (median(base), median(other)) {
            println!(
                "cached start, {} / {}: {:.2}x (target: at most 1.2x)",
                other.image,
                base.image,
                b / a
            );
        }
    }
    let report = Report {
        runs: args.runs,
        images,
    };
    crate::write_json(
        args.json
            .as_deref()
            .unwrap_or(&crate::default_json("containers")),
        &report,
    )
}
