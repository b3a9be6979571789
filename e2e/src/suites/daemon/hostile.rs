//! capsad against guests that misbehave (issue 16's "capsad bounded"):
//! a line far longer than a log record, and a guest that stops answering
//! while capsad restarts.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use capsa_api::GroupStatus;

use super::harness::{cgroup_parent, Capsad};
use crate::suite::Suite;

pub fn run(s: &mut Suite, d: &mut Capsad) -> Result<()> {
    s.check(
        "a 2 MiB line without a newline prints in full, and the container exits",
        || {
            let out = d.capsa(&[
                "run",
                "--rm",
                "busybox",
                "sh",
                "-c",
                "head -c 2097152 /dev/zero | tr '\\0' x; echo; echo END",
            ])?;
            let lines = out.lines();
            ensure!(
                out.code == Some(0)
                    && lines.len() == 2
                    && lines[0].len() == 2 << 20
                    && lines[0].bytes().all(|b| b == b'x')
                    && lines[1] == "END",
                "exit {:?}, {} lines of {:?} bytes",
                out.code,
                lines.len(),
                lines.iter().map(|l| l.len()).collect::<Vec<_>>()
            );
            Ok("2097152 x, then END".into())
        },
    );
    let run = d.capsa(&["run", "-d", "--name", "frozen", "busybox", "sleep", "300"])?;
    ensure!(run.code == Some(0), "run -d frozen: {}", run.describe());
    // The cgroup freezer stops both of a jailed VMM's processes.
    let freeze = cgroup_parent().join("frozen").join("cgroup.freeze");
    std::fs::write(&freeze, "1").with_context(|| format!("writing {}", freeze.display()))?;
    s.check(
        "with a group's VMM frozen, a restarted capsad serves its API within 5 s and marks the group unresponsive",
        || {
            d.kill();
            let began = Instant::now();
            d.start()?;
            let answered = began.elapsed();
            ensure!(answered < Duration::from_secs(5), "answered after {answered:?}");
            let deadline = Instant::now() + Duration::from_secs(60);
            let view = loop {
                let view = d.group("frozen")?;
                if view.error.is_some() || Instant::now() > deadline {
                    break view;
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            let error = view.error.clone().unwrap_or_default();
            ensure!(
                view.status == GroupStatus::Running && error.contains("unresponsive"),
                "{view:?}"
            );
            Ok(format!("API after {answered:.1?}; {error}"))
        },
    );
    std::fs::write(&freeze, "0").with_context(|| format!("writing {}", freeze.display()))?;
    let removed = d.capsa(&["rm", "frozen"])?;
    ensure!(removed.code == Some(0), "rm frozen: {}", removed.describe());
    Ok(())
}
