//! Every suite, by name, in the order a full run takes them.

pub mod agent;
pub mod boot;
pub mod devices;

use crate::suite::Suite;
use crate::vm::Artifacts;

/// What a suite may be given besides the artifacts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes each way through the devices suite's bulk vsock stream.
    pub bulk_bytes: u64,
}

pub const ALL: &[&str] = &["boot", "agent", "devices"];

/// Runs suite `name`; false when there is no such suite.
pub fn run(name: &str, suite: &mut Suite, artifacts: &Artifacts, options: &Options) -> bool {
    match name {
        "boot" => boot::run(suite, artifacts),
        "agent" => agent::run(suite, artifacts),
        "devices" => devices::run(suite, artifacts, options.bulk_bytes),
        _ => return false,
    }
    true
}
