//! capsad and the capsa CLI end to end: the `daemon` suite (every feature
//! a user of the daemon meets), the `verbs` suite (the everyday verbs,
//! attached and interactive runs), the `hostile` suite (guests that
//! misbehave, and the host's limits on each VM), the `fake-agents` suite
//! (agents gone bad, adopted by a restarted capsad), the `images` suite (a real-size image from
//! cached layer disks), the `logs` suite (a daemon killed again
//! and again loses and doubles no line), the `networks` suite (tenant
//! networks: isolation, anti-spoofing, a closed host, egress; tenants over
//! the TLS listener), the `templates` suite (groups restored from
//! templates) and the `cycles` suite (50 groups
//! in a row leave nothing behind).

mod copies;
mod cycles;
mod fake_agents;
mod harness;
mod hostile;
mod images;
mod jail;
mod limits;
mod login;
mod logs;
pub use harness::{Capsad, Output, COMMAND_TIMEOUT};
mod main_checks;
mod metrics;
mod netns;
mod networks;
mod templates;
mod tenants;
mod verbs;

use crate::suite::Suite;
use crate::vm::Artifacts;

pub fn run(suite: &mut Suite, artifacts: &Artifacts) {
    with_capsad(suite, artifacts, "daemon", main_checks::run);
}

/// The everyday verbs, attached and interactive runs, cp, probes and
/// init containers: a suite of their own, so that a freeze of the outer
/// machine costs a rerun of these or of the daemon suite, not of both.
pub fn run_verbs(suite: &mut Suite, artifacts: &Artifacts) {
    with_capsad(suite, artifacts, "verbs", |s, d| {
        started_with_busybox(d)?;
        verbs::run(s, d)
    });
}

pub fn run_hostile(suite: &mut Suite, artifacts: &Artifacts) {
    with_capsad(suite, artifacts, "hostile", |s, d| {
        started_with_busybox(d)?;
        hostile::run(s, d)?;
        limits::run(s, d)
    });
}

/// Starts the suite's capsad and imports busybox into it.
fn started_with_busybox(d: &mut harness::Capsad) -> anyhow::Result<()> {
    d.start()?;
    let import = d.import_busybox()?;
    anyhow::ensure!(import.code == Some(0), "import: {}", import.describe());
    Ok(())
}

/// Agents gone bad, adopted by a restarted capsad: a suite of their own,
/// for the same reason as `verbs`.
pub fn run_fake_agents(suite: &mut Suite, artifacts: &Artifacts) {
    with_capsad(suite, artifacts, "fake-agents", |s, d| {
        started_with_busybox(d)?;
        fake_agents::run(s, d)
    });
}

/// Starts restored from templates, and what each clone must be.
pub fn run_templates(suite: &mut Suite, artifacts: &Artifacts) {
    with_capsad(suite, artifacts, "templates", templates::run);
}

pub fn run_logs(suite: &mut Suite, artifacts: &Artifacts) {
    with_capsad(suite, artifacts, "logs", logs::run);
}

pub fn run_networks(suite: &mut Suite, artifacts: &Artifacts) {
    with_capsad(suite, artifacts, "networks", networks::run);
}

pub fn run_images(suite: &mut Suite, artifacts: &Artifacts) {
    with_capsad(suite, artifacts, "images", images::run);
}

/// Runs `checks` with a capsad of their own, showing its log's tail when
/// they could not go on.
fn with_capsad(
    suite: &mut Suite,
    artifacts: &Artifacts,
    name: &str,
    checks: fn(&mut Suite, &mut harness::Capsad) -> anyhow::Result<()>,
) {
    let result = harness::Capsad::new(artifacts, name).and_then(|mut d| {
        let result = checks(suite, &mut d);
        if result.is_err() {
            eprintln!("capsad's log:\n{}", d.log_tail());
        }
        result
    });
    if let Err(e) = result {
        suite.check("the suite ran to its end", || Err(e));
    }
}

/// `allowed_hangs`: microVMs that may stop answering (the nested
/// emulation's; none on real KVM).
/// `resume`: where an earlier run that froze left off.
pub fn run_cycles(
    suite: &mut Suite,
    artifacts: &Artifacts,
    allowed_hangs: u32,
    resume: Option<crate::report::Progress>,
) {
    let result = harness::Capsad::new(artifacts, "cycles")
        .and_then(|mut d| cycles::run(suite, &mut d, allowed_hangs, resume));
    if let Err(e) = result {
        suite.check("the suite ran to its end", || Err(e));
    }
}
