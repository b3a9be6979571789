//! `capsa-e2e`: runs end-to-end suites against real microVMs (on this
//! machine's KVM: nested, the runner boots it inside the outer machine)
//! and prints one JSON line per check (see `capsa_e2e::report`).
//!
//!   capsa-e2e [--suite NAME]... [--check NAME] [--artifacts DIR]

use std::path::PathBuf;
use std::process::ExitCode;

use capsa_e2e::report::Progress;
use capsa_e2e::suite::Suite;
use capsa_e2e::suites::{self, Options};
use capsa_e2e::vm::Artifacts;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "capsa-e2e",
    about = "Capsa's end-to-end suites, one JSON line per check"
)]
struct Args {
    /// A suite to run (repeatable; all of them by default).
    #[arg(long = "suite", value_name = "NAME")]
    suites: Vec<String>,
    /// Only this check of the suites (what they set up still runs).
    #[arg(long)]
    check: Option<String>,
    /// Where the runner put the kernel, initramfs, binaries and images.
    #[arg(long, default_value = ".")]
    artifacts: PathBuf,
    /// iproute2's ip.
    #[arg(long, default_value = "ip")]
    ip: PathBuf,
    /// Bytes each way through the devices suite's bulk vsock stream.
    #[arg(long, default_value_t = 1 << 30)]
    bulk_bytes: u64,
    /// microVMs of the cycles suite that may stop answering (the nested
    /// emulation's; the runner passes 0 on real KVM).
    #[arg(long, default_value_t = 0)]
    allowed_hangs: u32,
    /// Pick SUITE up after the steps an earlier run did and checked
    /// (`SUITE=DONE:HUNG`, from that run's progress line; repeatable).
    #[arg(long, value_name = "SUITE=DONE:HUNG", value_parser = parse_resume)]
    resume: Vec<(String, Progress)>,
    /// Report an emulation fault in this suite before its checks, as the
    /// runner's retry is shown with (`xtask e2e --force-fault`).
    #[arg(long, value_name = "SUITE")]
    force_fault: Option<String>,
}

fn parse_resume(text: &str) -> Result<(String, Progress), String> {
    text.split_once('=')
        .and_then(|(suite, at)| Some((suite.to_string(), Progress::from_arg(at)?)))
        .ok_or_else(|| format!("{text:?} is not SUITE=DONE:HUNG"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let names: Vec<String> = if args.suites.is_empty() {
        suites::ALL.iter().map(|s| s.to_string()).collect()
    } else {
        args.suites.clone()
    };
    if let Some(unknown) = names.iter().find(|n| !suites::ALL.contains(&n.as_str())) {
        eprintln!(
            "capsa-e2e: no suite {unknown:?} (there are: {})",
            suites::ALL.join(", ")
        );
        return ExitCode::from(2);
    }
    let artifacts = Artifacts {
        dir: args.artifacts.clone(),
        ip: args.ip.clone(),
    };
    let options = Options {
        bulk_bytes: args.bulk_bytes,
        allowed_hangs: args.allowed_hangs,
        resume: args.resume.iter().cloned().collect(),
    };
    capsa_e2e::suite::spawn_heartbeat();
    let mut out = std::io::stdout();
    let mut failed = 0;
    for name in &names {
        let Some(&name) = suites::ALL.iter().find(|s| **s == name.as_str()) else {
            continue;
        };
        let mut suite = Suite::new(name, args.check.as_deref(), &mut out);
        if args.force_fault.as_deref() == Some(name) {
            suite.fault("forced by --force-fault".into());
        }
        suites::run(name, &mut suite, &artifacts, &options);
        failed += suite.end();
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
