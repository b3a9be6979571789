//! The `conformance` suite: a table of image configs crossed with
//! container specs (entrypoint, cmd, command, args, env, workingDir,
//! user, stop signal, exit codes, death by signal), each row run as a
//! Capsa container and, in the same run, under crun from a bundle built
//! by docker's rules; argv, environment, working directory, uid, gid,
//! groups, exit status, the signal that ended it and the signal it caught
//! must agree.
//!
//! Compared as docker users see them, with one difference named in the
//! README: the environment is compared as a set, since Capsa orders it as
//! containerd's CRI does (the image's variables first) and docker puts the
//! run's first.

mod capsa;
mod image;
pub mod probe;
mod reference;
pub mod table;

use std::collections::{BTreeSet, HashMap};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::suite::Suite;
use crate::suites::daemon::Capsad;
use crate::vm::Artifacts;
use probe::ProcessReport;
use table::{Row, ROWS};

/// What one run of a row showed.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub report: Option<ProcessReport>,
    pub exit_code: Option<i32>,
    /// The signal that ended the process.
    pub signal: Option<i32>,
    /// The signal the probe caught.
    pub caught: Option<i32>,
    /// Why the row could not be observed.
    pub error: Option<String>,
}

/// What is compared: the report with the environment as a set.
#[derive(Debug, PartialEq, Eq)]
struct Comparable {
    argv: Vec<String>,
    env: BTreeSet<String>,
    cwd: String,
    ids: (u32, u32, Vec<u32>),
    exit_code: Option<i32>,
    signal: Option<i32>,
    caught: Option<i32>,
}

impl Observed {
    fn comparable(&self) -> Result<Comparable> {
        if let Some(error) = &self.error {
            bail!("{error}");
        }
        let Some(report) = &self.report else {
            bail!("no report from the probe");
        };
        Ok(Comparable {
            argv: report.argv.clone(),
            env: report.env.iter().cloned().collect(),
            cwd: report.cwd.clone(),
            ids: (report.uid, report.gid, report.groups.clone()),
            exit_code: self.exit_code,
            signal: self.signal,
            caught: self.caught,
        })
    }
}

/// Waits for `child` at most `limit`, killing it after.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The differences between the two, in words.
fn differences(capsa: &Comparable, crun: &Comparable) -> Vec<String> {
    let mut found = Vec::new();
    let mut differ = |what: &str, a: String, b: String| {
        if a != b {
            found.push(format!("{what}: capsa {a}, crun {b}"));
        }
    };
    differ(
        "argv",
        format!("{:?}", capsa.argv),
        format!("{:?}", crun.argv),
    );
    let only = |a: &BTreeSet<String>, b: &BTreeSet<String>| {
        format!("{:?}", a.difference(b).collect::<Vec<_>>())
    };
    if capsa.env != crun.env {
        differ(
            "env (only in each)",
            only(&capsa.env, &crun.env),
            only(&crun.env, &capsa.env),
        );
    }
    differ("cwd", capsa.cwd.clone(), crun.cwd.clone());
    let debug = |value: &dyn std::fmt::Debug| format!("{value:?}");
    for (what, a, b) in [
        ("uid/gid/groups", debug(&capsa.ids), debug(&crun.ids)),
        ("exit", debug(&capsa.exit_code), debug(&crun.exit_code)),
        ("signal", debug(&capsa.signal), debug(&crun.signal)),
        ("caught", debug(&capsa.caught), debug(&crun.caught)),
    ] {
        differ(what, a, b);
    }
    found
}

fn summary(c: &Comparable) -> String {
    format!(
        "argv {:?}, cwd {}, uid/gid/groups {:?}, exit {:?}, signal {:?}, caught {:?}, {} env",
        c.argv,
        c.cwd,
        c.ids,
        c.exit_code,
        c.signal,
        c.caught,
        c.env.len()
    )
}

fn compare(s: &mut Suite, row: &Row, capsa: Option<&Observed>, crun: Option<&Observed>) {
    s.check(&format!("{} agrees with crun", row.name), || {
        let missing = || Observed {
            error: Some("not run".into()),
            ..Observed::default()
        };
        let capsa = capsa.cloned().unwrap_or_else(missing).comparable();
        let crun = crun.cloned().unwrap_or_else(missing).comparable();
        let (capsa, crun) = match (capsa, crun) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => bail!(
                "capsa: {}; crun: {}",
                a.map_or_else(|e| format!("{e:#}"), |c| summary(&c)),
                b.map_or_else(|e| format!("{e:#}"), |c| summary(&c))
            ),
        };
        let found = differences(&capsa, &crun);
        if !found.is_empty() {
            bail!("{}", found.join("; "));
        }
        Ok(summary(&capsa))
    });
}

pub fn run(s: &mut Suite, artifacts: &Artifacts) {
    let result = (|| -> Result<()> {
        let mut d = Capsad::new(artifacts, "conformance")?;
        let work = d.root().join("conformance");
        let images = image::build(
            &work,
            &artifacts.path("busybox-oci"),
            &artifacts.path("capsa-proc-probe"),
            ROWS,
        )?;
        let crun = reference::run_all(&artifacts.tool("crun"), &work, &images.rootfs, ROWS);
        d.start()?;
        capsa::import(&d, &images.layouts)?;
        let mut seen: HashMap<String, Observed> = HashMap::new();
        for stopped in [false, true] {
            let rows: Vec<&Row> = ROWS.iter().filter(|r| r.stopped == stopped).collect();
            match capsa::run_group(&d, &rows) {
                Ok(observed) => seen.extend(observed),
                Err(e) => {
                    let error = format!("the group did not run: {e:#}");
                    eprintln!("capsad's log:\n{}", d.log_tail());
                    for row in rows {
                        seen.insert(
                            row.name.to_string(),
                            Observed {
                                error: Some(error.clone()),
                                ..Observed::default()
                            },
                        );
                    }
                }
            }
        }
        for row in ROWS {
            compare(s, row, seen.get(row.name), crun.get(row.name));
        }
        Ok(())
    })();
    if let Err(e) = result {
        s.check("the suite ran to its end", || Err(e));
    }
}
