//! Capsa's end-to-end scenarios: the suites that capsa-e2e runs, and the
//! JSON lines it reports them in (which the runner, `xtask e2e`, reads).

pub mod registry;
pub mod report;
pub mod suite;
pub mod suites;
pub mod vm;
