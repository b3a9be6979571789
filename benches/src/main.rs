//! `capsa-bench`: Capsa's benchmarks. Each prints a table and writes JSON.
//!
//! `boot`: wall time from starting the VMM process to its exit after the
//! guest agent printed its ready line and powered off, and the guest's own
//! uptime at the ready line; for capsa-vmm and, in the same run, QEMU's
//! `microvm` machine booting the same kernel and initramfs.

mod boot;
mod stats;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "capsa-bench", about = "Capsa benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Boot to the agent's ready line and power off, N times per runner.
    Boot(boot::BootArgs),
}

fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::Boot(args) => boot::run(&args),
    }
}

/// Where a benchmark writes its JSON unless told otherwise.
pub fn default_json(name: &str) -> PathBuf {
    PathBuf::from(format!("target/capsa/bench-{name}.json"))
}
