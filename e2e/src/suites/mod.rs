//! Every suite, by name, in the order a full run takes them.

pub mod agent;
pub mod boot;
pub mod conformance;
pub mod cri;
pub mod daemon;
pub mod devices;
pub mod shim;
pub mod snapshot;

use crate::suite::Suite;
use crate::vm::Artifacts;

/// What a suite may be given besides the artifacts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes each way through the devices suite's bulk vsock stream.
    pub bulk_bytes: u64,
    /// microVMs of the cycles suite that may stop answering.
    pub allowed_hangs: u32,
    /// Where suites that an earlier run got partway through start again.
    pub resume: std::collections::HashMap<String, crate::report::Progress>,
}

/// The cycles suite comes last: with the most microVM boots it is the
/// likeliest to see the outer machine freeze, and a freeze keeps the
/// suites after it from starting.
pub const ALL: &[&str] = &[
    "boot",
    "agent",
    "snapshot",
    "devices",
    "daemon",
    "verbs",
    "hostile",
    "fake-agents",
    "templates",
    "images",
    "logs",
    "conformance",
    "networks",
    "shim",
    "cri",
    "cycles",
];

/// Seconds the outer machine gets for suite `name`.
pub fn budget_secs(name: &str) -> u64 {
    match name {
        "boot" | "snapshot" => 300,
        "agent" | "verbs" | "fake-agents" | "templates" | "shim" | "cri" | "logs"
        | "conformance" | "networks" => 600,
        "cycles" | "hostile" => 1500,
        _ => 900,
    }
}

/// About how long suite `name` takes nested with no fault (2026-12-07),
/// to share the suites among outer machines that run side by side.
pub fn usual_secs(name: &str) -> u64 {
    match name {
        "boot" => 10,
        "agent" => 15,
        "snapshot" => 40,
        "devices" => 100,
        "daemon" => 290,
        "verbs" => 110,
        "hostile" => 140,
        "fake-agents" => 170,
        "templates" => 120,
        "images" => 140,
        "logs" => 100,
        "conformance" => 50,
        "networks" => 240,
        "shim" => 120,
        "cri" => 35,
        "cycles" => 350,
        _ => 100,
    }
}

/// Runs suite `name` may have in all when emulation faults keep hitting
/// it: the nested outer machine freezes about once in 20 to 90 microVM
/// boots, and the cycles suite boots 52 (a run of it that a freeze stops
/// after it got further is not counted: the next picks up there).
pub fn runs_allowed(name: &str) -> u32 {
    match name {
        "cycles" => 5,
        _ => 4,
    }
}

/// Runs suite `name`; false when there is no such suite.
pub fn run(name: &str, suite: &mut Suite, artifacts: &Artifacts, options: &Options) -> bool {
    match name {
        "boot" => boot::run(suite, artifacts),
        "agent" => agent::run(suite, artifacts),
        "snapshot" => snapshot::run(suite, artifacts),
        "devices" => devices::run(suite, artifacts, options.bulk_bytes),
        "daemon" => daemon::run(suite, artifacts),
        "verbs" => daemon::run_verbs(suite, artifacts),
        "hostile" => daemon::run_hostile(suite, artifacts),
        "fake-agents" => daemon::run_fake_agents(suite, artifacts),
        "templates" => daemon::run_templates(suite, artifacts),
        "images" => daemon::run_images(suite, artifacts),
        "logs" => daemon::run_logs(suite, artifacts),
        "conformance" => conformance::run(suite, artifacts),
        "networks" => daemon::run_networks(suite, artifacts),
        "cycles" => daemon::run_cycles(
            suite,
            artifacts,
            options.allowed_hangs,
            options.resume.get("cycles").copied(),
        ),
        "shim" => shim::run(suite, artifacts),
        "cri" => cri::run(suite, artifacts),
        _ => return false,
    }
    true
}
