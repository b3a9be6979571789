//! `cargo xtask e2e`: builds the static binaries and the artifacts, lays
//! them out as one payload, runs capsa-e2e's suites on this host's KVM or,
//! where that is PVM, in nested outer machines (two side by side by
//! default, each taking its share of the suites, as few boots as the
//! retries need), runs a suite that an emulation fault hit again on its
//! own, and prints a table of the suites (and writes it as JSON).

mod lanes;
mod outcome;
mod payload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use outcome::Outcomes;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs end-to-end suites (all by default).
    E2e(E2eArgs),
}

#[derive(clap::Args)]
pub struct E2eArgs {
    /// A suite to run (repeatable).
    #[arg(long = "suite", value_name = "NAME")]
    pub suites: Vec<String>,
    /// Only this check of the suites.
    #[arg(long)]
    pub check: Option<String>,
    /// The guest kernel (default: $CAPSA_KERNEL, else guest-kernel/build.sh).
    #[arg(long, env = "CAPSA_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// The agent's initramfs (default: $CAPSA_INITRD, else rootfs/build.sh).
    #[arg(long, env = "CAPSA_INITRD")]
    pub initrd: Option<PathBuf>,
    /// Bytes each way through the devices suite's bulk vsock stream.
    #[arg(long, env = "CAPSA_DEVICE_CHECK_BULK", default_value_t = 1 << 30)]
    pub bulk_bytes: u64,
    /// Runs of a suite that emulation faults keep hitting, in all (by
    /// default the suite's own figure: more for more microVM boots).
    #[arg(long)]
    pub attempts: Option<u32>,
    /// Seconds after the start during which a suite that a fault hit may
    /// be run again; none starts later, so that the whole run ends within
    /// CI's time (90 minutes, fmt, clippy, the unit tests and the
    /// containment bench included).
    #[arg(long, env = "CAPSA_E2E_RETRY_SECS", default_value_t = 4200)]
    pub retry_secs: u64,
    /// Starts SUITE's first run after its first DONE steps, as a run after
    /// a freeze does (`SUITE=DONE:HUNG`; repeatable).
    #[arg(long, value_name = "SUITE=DONE:HUNG")]
    pub resume: Vec<String>,
    /// Reports an emulation fault in this suite on its first run, to show
    /// that only that suite is run again.
    #[arg(long, value_name = "SUITE")]
    pub force_fault: Option<String>,
    /// Outer machines that run side by side where the suites run nested
    /// (on this host's own KVM they run one after another).
    #[arg(long, env = "CAPSA_E2E_LANES", default_value_t = 2)]
    pub lanes: usize,
    /// Where the report goes.
    #[arg(long, default_value = "target/e2e/report.json")]
    pub report: PathBuf,
}

fn main() -> ExitCode {
    let Command::E2e(args) = Cli::parse().command;
    match e2e(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask e2e: {e:#}");
            ExitCode::from(2)
        }
    }
}

impl E2eArgs {
    /// Whether suite `name` is among those to run (all, when none is named).
    pub fn wants_suite(&self, name: &str) -> bool {
        self.suites.is_empty() || self.suites.iter().any(|s| s == name)
    }
}

fn e2e(args: &E2eArgs) -> Result<bool> {
    let began = Instant::now();
    let suites: Vec<String> = if args.suites.is_empty() {
        capsa_e2e::suites::ALL
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        args.suites.clone()
    };
    if let Some(unknown) = suites
        .iter()
        .find(|s| !capsa_e2e::suites::ALL.contains(&s.as_str()))
    {
        bail!(
            "no suite {unknown:?} (there are: {})",
            capsa_e2e::suites::ALL.join(", ")
        );
    }
    let payload = payload::Payload::build(args)?;
    let outcomes = Outcomes::new(&suites, |name| {
        args.attempts
            .unwrap_or_else(|| capsa_e2e::suites::runs_allowed(name))
    })
    .retry_until(began + std::time::Duration::from_secs(args.retry_secs));
    let lanes = if payload.nested() { args.lanes } else { 1 };
    let first = lanes::first_batches(&suites, lanes, capsa_e2e::suites::usual_secs);
    // A forced fault hits its suite's first run only.
    let run_once = |number: u32, suites: &[String], first: bool, resume: &[_]| {
        let force = first.then_some(args.force_fault.as_deref()).flatten();
        payload.run(suites, args, force, resume, number)
    };
    let outcomes = lanes::run(outcomes, first, &run_once)?;
    let report = outcomes.report(began.elapsed());
    println!("{}", report.table());
    if let Some(dir) = args.report.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.report, serde_json::to_vec_pretty(&report)?)?;
    println!("report: {}", args.report.display());
    Ok(report.passed())
}
