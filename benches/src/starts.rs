//! `starts`: a group's start through capsad, restored from a template and
//! booted cold: wall time of `capsa run --rm IMAGE true` from the template
//! of its shape, the same with `--cold-boot`, and the peers (crun, runc)
//! running the same root filesystem; then the host memory (PSS of every
//! VMM process) of N idle groups restored from the template next to N
//! booted cold.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::process;
use crate::stats::{print_wall_table, Summary, WallRow};

#[derive(clap::Args)]
pub struct StartsArgs {
    /// Timed starts per kind.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Idle groups of each kind whose memory is measured.
    #[arg(long, default_value_t = 20)]
    idle: usize,
    /// The capsa CLI (CAPSA_SOCKET names the daemon, which has templates).
    #[arg(long)]
    capsa: PathBuf,
    /// An image capsad has.
    #[arg(long, default_value = "busybox")]
    image: String,
    /// The image's root filesystem as an OCI bundle running `true`, for
    /// the peers.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Peers: NAME=PATH of an OCI runtime (crun, runc), run on the bundle.
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// More arguments for the peers' `run`.
    #[arg(long = "peer-run-arg", allow_hyphen_values = true)]
    peer_run_args: Vec<String>,
    /// How long the template's build may take.
    #[arg(long, default_value_t = 300)]
    template_timeout_secs: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct IdleRow {
    kind: String,
    groups: usize,
    /// The PSS of all of them together.
    total_pss_mib: f64,
    per_group_pss_mib: Option<Summary>,
}

#[derive(Serialize)]
struct Report {
    image: String,
    runs: usize,
    template: capsa_api::TemplateView,
    rows: Vec<WallRow>,
    idle: Vec<IdleRow>,
    template_over_cold: Option<f64>,
    template_over_peer: Option<(String, f64)>,
}

fn capsa(args: &StartsArgs, words: &[&str]) -> Command {
    let mut command = Command::new(&args.capsa);
    command.args(words);
    command
}

fn json<T: serde::de::DeserializeOwned>(args: &StartsArgs, words: &[&str]) -> Result<T> {
    let out = process::run(capsa(args, words), Duration::from_secs(120))?.success()?;
    serde_json::from_str(&out.stdout).with_context(|| format!("capsa {words:?}"))
}

/// Runs one group of the image's shape if need be, and waits for its
/// template.
fn template(args: &StartsArgs) -> Result<capsa_api::TemplateView> {
    let deadline = Instant::now() + Duration::from_secs(args.template_timeout_secs);
    let mut ran = false;
    loop {
        let info: capsa_api::SystemInfoView = json(args, &["--json", "system", "info"])?;
        let templates = info
            .templates
            .context("capsad shows no templates: is it running with --templates off?")?;
        if let Some(template) = templates.into_iter().next() {
            return Ok(template);
        }
        if !ran {
            process::timed_ms(capsa(args, &["run", "--rm", &args.image, "true"]))?;
            ran = true;
        }
        if Instant::now() > deadline {
            bail!("no template after {} s", args.template_timeout_secs);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn pss_mib(pid: u32) -> f64 {
    capsa_vm_process::vmm_processes(pid)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|text| {
            text.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .sum::<f64>()
        / 1024.0
}

/// Starts `args.idle` sleeping groups (cold or from the template), then
/// measures their VMMs' PSS together.
fn idle(args: &StartsArgs, cold: bool, template: &str) -> Result<IdleRow> {
    let kind = if cold { "cold" } else { "template" };
    let mut names = Vec::new();
    let measured = (|| {
        for n in 0..args.idle {
            let name = format!("bench-idle-{kind}-{n}");
            let mut words = vec!["run", "-d", "--name", &name];
            if cold {
                words.push("--cold-boot");
            }
            words.extend([args.image.as_str(), "sleep", "3600"]);
            process::timed_ms(capsa(args, &words))?;
            names.push(name.clone());
            let view: capsa_api::GroupView = json(args, &["inspect", &name])?;
            if view.template.as_deref() != (!cold).then_some(template) {
                bail!("{name} came from {:?}", view.template);
            }
        }
        // A moment for every guest to settle before its pages are counted.
        std::thread::sleep(Duration::from_secs(3));
        let mut pss = Vec::new();
        for name in &names {
            let view: capsa_api::GroupView = json(args, &["inspect", name])?;
            pss.push(pss_mib(view.vmm_pid.context("no VMM pid")?));
        }
        Ok(IdleRow {
            kind: format!("{} idle groups, {kind}", args.idle),
            groups: args.idle,
            total_pss_mib: pss.iter().sum(),
            per_group_pss_mib: Summary::of(&pss),
        })
    })();
    for name in &names {
        let _ = process::run(capsa(args, &["rm", name]), Duration::from_secs(120));
    }
    measured
}

pub fn run(args: &StartsArgs) -> Result<()> {
    let template = template(args)?;
    eprintln!(
        "template {} ({} vCPU, {} MiB)",
        template.id, template.cpus, template.memory_mib
    );
    let from_template = process::wall_samples("template", args.runs, |_| {
        capsa(args, &["run", "--rm", &args.image, "true"])
    });
    let cold = process::wall_samples("cold", args.runs, |_| {
        capsa(args, &["run", "--rm", "--cold-boot", &args.image, "true"])
    });
    let mut rows = vec![
        WallRow {
            runtime: "capsa run --rm, restored from the template".into(),
            wall_ms: Summary::of(&from_template),
        },
        WallRow {
            runtime: "capsa run --rm --cold-boot".into(),
            wall_ms: Summary::of(&cold),
        },
    ];
    for peer in &args.peers {
        let bundle = args
            .bundle
            .as_ref()
            .with_context(|| format!("--peer {peer} needs a --bundle"))?;
        let (name, samples) = process::peer_samples(peer, &args.peer_run_args, bundle, args.runs)?;
        rows.push(WallRow {
            runtime: format!("{name} run (same rootfs, no VM)"),
            wall_ms: Summary::of(&samples),
        });
    }
    let idle = vec![
        idle(args, false, &template.id)?,
        idle(args, true, &template.id)?,
    ];
    println!(
        "starting a container running `true`, wall ms, median (min-max) of {} runs",
        args.runs
    );
    print_wall_table(&rows);
    let median = |row: &WallRow| row.wall_ms.as_ref().map(|s| s.median);
    let template_over_cold = median(&rows[0]).zip(median(&rows[1])).map(|(t, c)| t / c);
    let template_over_peer = rows.get(2).and_then(|peer| {
        let (t, p) = median(&rows[0]).zip(median(peer))?;
        Some((peer.runtime.clone(), t / p))
    });
    if let Some(ratio) = template_over_cold {
        println!("from the template / cold: {ratio:.2}x");
    }
    if let Some((peer, ratio)) = &template_over_peer {
        println!("from the template / {peer}: {ratio:.2}x (target: at most 1.5x)");
    }
    println!(
        "{:<36} {:>16} {:>22}",
        "idle groups", "total PSS MiB", "per group MiB"
    );
    for row in &idle {
        println!(
            "{:<36} {:>16.1} {:>22}",
            row.kind,
            row.total_pss_mib,
            crate::stats::cell(&row.per_group_pss_mib)
        );
    }
    crate::write_json(
        args.json
            .as_deref()
            .unwrap_or(&crate::default_json("starts")),
        &Report {
            image: args.image.clone(),
            runs: args.runs,
            template,
            rows,
            idle,
            template_over_cold,
            template_over_peer,
        },
    )
}
