//! Fake agents (issue 16): while capsad is down, a group's VMM is swapped
//! for `capsa-vmm-fake`, an agent gone bad in one of four ways, and the
//! group's record is pointed at it; the restarted capsad adopts it as it
//! would any VMM it finds. Each way must leave capsad serving its API
//! within 5 s, its RSS within 32 MiB of where it was, and another group's
//! exec and logs working.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::harness::{cgroup_parent, Capsad};
use crate::suite::Suite;

/// How far capsad's RSS may grow while a fake agent misbehaves.
const RSS_SLACK_KIB: u64 = 32 << 10;

/// Each way an agent goes bad, and what the check says of it.
const MODES: &[(&str, &str)] = &[
    ("silent", "never answers"),
    ("garbage", "sends garbage frames"),
    ("unacked", "ignores acknowledgements"),
    ("endless", "sends 2 GiB without a newline"),
];

/// What the `endless` fake sends (512 MiB took 45 s nested).
const ENDLESS_BYTES: u64 = 2 << 30;

/// The fake standing in for the group's VMM, and its report lines.
struct Fake {
    child: Child,
    lines: Receiver<String>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The highest `tick N` in the bystander's log.
fn last_tick(d: &Capsad) -> Result<u64> {
    let logs = d.capsa(&["logs", "bystander"])?;
    ensure!(logs.code == Some(0), "logs bystander: {}", logs.describe());
    Ok(logs
        .lines()
        .iter()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .max()
        .unwrap_or(0))
}

fn wait_for<T>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe()? {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {} s", within.as_secs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Puts a fake in `mode` behind group `victim` while capsad is down.
fn swap_in(d: &Capsad, group: &Path, mode: &str) -> Result<Fake> {
    // The real VMM (both its processes) goes with its cgroup.
    let cgroup = cgroup_parent().join("victim");
    if cgroup.join("cgroup.kill").exists() {
        std::fs::write(cgroup.join("cgroup.kill"), "1")?;
        wait_for(Duration::from_secs(10), "the real VMM's end", || {
            let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            Ok(procs.trim().is_empty().then_some(()))
        })?;
    }
    let mut child = Command::new(d.artifacts.path("capsa-vmm-fake"))
        .arg("--socket")
        .arg(group.join("v.sock"))
        .args(["--mode", mode])
        .args(["--bytes", &ENDLESS_BYTES.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting capsa-vmm-fake")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (send, lines) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                return;
            }
        }
    });
    let fake = Fake { child, lines };
    let first = fake.lines.recv_timeout(Duration::from_secs(30));
    ensure!(
        first.as_deref() == Ok("listening"),
        "capsa-vmm-fake said {first:?}"
    );
    // The group's record names the fake as its VMM, its container running.
    let path = group.join("group.json");
    let text = std::fs::read_to_string(&path)?;
    let mut record: serde_json::Value = serde_json::from_str(&text)?;
    record["vmm_pid"] = fake.child.id().into();
    record["status"] = "running".into();
    record["error"] = serde_json::Value::Null;
    for container in record["containers"].as_array_mut().into_iter().flatten() {
        container["status"] = "running".into();
    }
    std::fs::write(&path, serde_json::to_vec(&record)?)?;
    Ok(fake)
}

/// One fake agent's round: what it led to, or why the check fails.
fn round(d: &mut Capsad, group: &Path, mode: &str, fake: &mut Option<Fake>) -> Result<String> {
    let ticks = last_tick(d)?;
    let before = rss_kib(d.pid().context("capsad is not running")?)?;
    d.kill();
    *fake = None;
    let current = fake.insert(swap_in(d, group, mode)?);
    let began = Instant::now();
    d.start()?;
    let answered = began.elapsed();
    ensure!(
        answered < Duration::from_secs(5),
        "capsad answered after {answered:?}"
    );
    let outcome = match mode {
        "silent" | "garbage" => wait_for(Duration::from_secs(90), "the group marked", || {
            let view = d.group("victim")?;
            Ok(view.error.filter(|e| e.contains("unresponsive")))
        })?,
        "unacked" | "endless" => {
            let (within, wanted) = if mode == "unacked" {
                (Duration::from_secs(180), "the host closed it")
            } else {
                (Duration::from_secs(900), "then all sent")
            };
            let deadline = Instant::now() + within;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match current.lines.recv_timeout(left) {
                    Ok(line) if line.starts_with("stdout") && line.contains(wanted) => break line,
                    Ok(_) => continue,
                    Err(e) => bail!("capsa-vmm-fake's stdout stream: {e} (wanted {wanted:?})"),
                }
            }
        }
        other => bail!("no mode {other}"),
    };
    let after = rss_kib(d.pid().context("capsad is not running")?)?;
    ensure!(
        after <= before + RSS_SLACK_KIB,
        "capsad's RSS went from {before} KiB to {after} KiB"
    );
    d.capsa(&["exec", "bystander", "--", "echo", "still here"])?
        .exited_with(0, &["still here"])?;
    let now = wait_for(
        Duration::from_secs(30),
        "a new tick in the bystander's log",
        || Ok(Some(last_tick(d)?).filter(|&t| t > ticks)),
    )?;
    Ok(format!(
        "API after {answered:.1?}; {outcome}; RSS {before} -> {after} KiB; bystander's exec answered, its log at tick {now}"
    ))
}

pub fn run(s: &mut Suite, d: &mut Capsad) -> Result<()> {
    let bystander = d.capsa(&[
        "run",
        "-d",
        "--name",
        "bystander",
        "busybox",
        "sh",
        "-c",
        "for i in $(seq 1800); do echo tick $i; sleep 1; done",
    ])?;
    ensure!(
        bystander.code == Some(0),
        "run -d bystander: {}",
        bystander.describe()
    );
    let victim = d.capsa(&["run", "-d", "--name", "victim", "busybox", "sleep", "1800"])?;
    ensure!(
        victim.code == Some(0),
        "run -d victim: {}",
        victim.describe()
    );
    let group = d.root().join("root/groups/victim");
    let mut fake = None;
    for &(mode, what) in MODES {
        s.check(
            &format!("a fake agent that {what}: capsad serves its API within 5 s, its RSS within 32 MiB, another group's exec and logs work"),
            || round(d, &group, mode, &mut fake),
        );
    }
    let removed = d.capsa(&["rm", "victim"])?;
    drop(fake);
    ensure!(removed.code == Some(0), "rm victim: {}", removed.describe());
    let removed = d.capsa(&["rm", "bystander"])?;
    ensure!(
        removed.code == Some(0),
        "rm bystander: {}",
        removed.describe()
    );
    Ok(())
}
