//! Every suite, by name, in the order a full run takes them.

pub mod agent;
pub mod boot;
pub mod daemon;
pub mod devices;
pub mod shim;

use crate::suite::Suite;
use crate::vm::Artifacts;

/// What a suite may be given besides the artifacts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes each way through the devices suite's bulk vsock stream.
    pub bulk_bytes: u64,
    /// microVMs of the cycles suite that may stop answering.
    pub allowed_hangs: u32,
}

pub const ALL: &[&str] = &["boot", "agent", "devices", "daemon", "cycles", "shim"];

/// Runs suite `name`; false when there is no such suite.
pub fn run(name: &str, suite: &mut Suite, artifacts: &Artifacts, options: &Options) -> bool {
    match name {
        "boot" => boot::run(suite, artifacts),
        "agent" => agent::run(suite, artifacts),
        "devices" => devices::run(suite, artifacts, options.bulk_bytes),
        "daemon" => daemon::run(suite, artifacts),
        "cycles" => daemon::run_cycles(suite, artifacts, options.allowed_hangs),
        "shim" => shim::run(suite, artifacts),
        _ => return false,
    }
    true
}
