//! 50 create/start/delete cycles, each publishing a port, leave nothing
//! behind: no tap on the bridge, no VMM, no mount, no descriptor of
//! capsad's, no group state, and no address (the next group gets the
//! first one again). Every 10 cycles what is left is checked, and a run
//! after a freeze of the outer machine picks up from the last such check.

use anyhow::{ensure, Context, Result};

use super::harness::{Capsad, NETNS};
use crate::report::Progress;
use crate::suite::{EmulationFault, Suite};

pub const CYCLES: u32 = 50;

/// What groups could leave behind.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Leftovers {
    taps: usize,
    vmms: usize,
    mounts: usize,
    fds: usize,
    groups: usize,
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} taps, {} VMMs, {} mounts, {} descriptors, {} groups",
            self.taps, self.vmms, self.mounts, self.fds, self.groups
        )
    }
}

fn count_dir(path: &std::path::Path) -> usize {
    std::fs::read_dir(path).map_or(0, |d| d.count())
}

/// Processes running capsa-vmm.
fn vmms() -> usize {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                        c.split(|&b| b == 0)
                            .next()
                            .is_some_and(|p| p.ends_with(b"capsa-vmm"))
                    })
                })
                .count()
        })
        .unwrap_or(0)
}

fn leftovers(d: &Capsad) -> Result<Leftovers> {
    let taps = std::process::Command::new(&d.artifacts.ip)
        .args(["-n", NETNS, "-o", "link", "show", "master", "capsa0"])
        .output()
        .context("listing the bridge's ports")?;
    Ok(Leftovers {
        taps: String::from_utf8_lossy(&taps.stdout).lines().count(),
        vmms: vmms(),
        mounts: std::fs::read_to_string("/proc/mounts")?.lines().count(),
        fds: count_dir(
            &std::path::Path::new("/proc")
                .join(d.pid().context("no capsad")?.to_string())
                .join("fd"),
        ),
        groups: count_dir(&d.root().join("root/groups")),
    })
}

/// What is left once capsad has finished a group's teardown: `capsa run
/// --rm` returns when the group is deleted, while the threads that watched
/// it may still be closing their connections to the guest for a moment.
/// Sampled until it holds still for a second (or, given `expected`,
/// until it matches that), 10 s at most; a real leak stays.
fn settled(d: &Capsad, expected: Option<&Leftovers>) -> Result<Leftovers> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = leftovers(d)?;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let now = leftovers(d)?;
        let done = match expected {
            Some(expected) => &now == expected,
            None => now == last,
        };
        if done || std::time::Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// One cycle; an error that says the microVM stopped answering is the
/// emulation's (capsad's error carries the guest's console then).
fn cycle(d: &Capsad, name: &str) -> Result<()> {
    let out = d.capsa(&[
        "run",
        "--rm",
        "--name",
        name,
        "-p",
        "127.0.0.1:18090:80",
        "busybox",
        "true",
    ])?;
    // capsad reports a guest that gave no answer with words (its
    // GuestError::is_unanswered); there is no error code for it yet.
    out.succeeded(name)
}

/// The fastest, median and slowest of the cycles' times, in words.
fn spread(took: &mut [f64]) -> String {
    took.sort_by(f64::total_cmp);
    match (took.first(), took.get(took.len() / 2), took.last()) {
        (Some(min), Some(median), Some(max)) => {
            format!(
                "a cycle took {min:.1} s at least, {median:.1} s as a median, {max:.1} s at most"
            )
        }
        _ => "no cycle ran".into(),
    }
}

/// Cycles between two checks of what is left: each check that finds
/// nothing left is a point a later run can pick up from.
const CHECKPOINT: u32 = 10;

/// `resume`: cycles an earlier run did and checked before its outer
/// machine froze; this run does the rest, with a capsad of its own.
pub fn run(
    s: &mut Suite,
    d: &mut Capsad,
    allowed_hangs: u32,
    resume: Option<Progress>,
) -> Result<()> {
    let earlier = resume.unwrap_or(Progress { done: 0, hung: 0 });
    d.start()?;
    let import = d.import_busybox()?;
    s.verdict(
        "a busybox OCI layout imports",
        import.code == Some(0),
        import.describe(),
    );
    // One cycle first, so that what capsad sets up once is not counted:
    // the template it builds after that first boot included.
    cycle(d, "warm")?;
    if let Err(e) = super::templates::wait_for_template(d) {
        eprintln!("cycles: {e:#}; the cycles boot from the kernel");
    }
    let before = settled(d, None)?;
    let (mut failed, mut hung) = (Vec::new(), Vec::new());
    let mut took = Vec::new();
    for i in earlier.done + 1..=CYCLES {
        let name = format!("cycle-{i}");
        let began = std::time::Instant::now();
        let result = cycle(d, &name);
        took.push(began.elapsed().as_secs_f64());
        match result {
            Ok(()) => {}
            Err(e) if e.downcast_ref::<EmulationFault>().is_some() => {
                hung.push(format!("{e:#}"));
                // Counted apart, and the cycle run once more.
                if let Err(e) = cycle(d, &format!("{name}-again")) {
                    failed.push(format!("{e:#}"));
                }
            }
            Err(e) => failed.push(format!("{e:#}")),
        }
        if i % CHECKPOINT == 0
            && i < CYCLES
            && failed.is_empty()
            && settled(d, Some(&before))? == before
        {
            s.progress(Progress {
                done: i,
                hung: earlier.hung + hung.len() as u32,
            });
        }
    }
    let after = settled(d, Some(&before))?;
    let span = if earlier.done == 0 {
        String::new()
    } else {
        format!(
            " (cycles 1 to {} in an earlier run, which had left nothing behind at its last check; {} to {CYCLES} in this one)",
            earlier.done,
            earlier.done + 1
        )
    };
    s.verdict(
        &format!("{CYCLES} create/start/delete cycles, a port published each time, all ran"),
        failed.is_empty(),
        if failed.is_empty() {
            format!("{}{span}", spread(&mut took))
        } else {
            failed.join("\n")
        },
    );
    let hangs = earlier.hung + hung.len() as u32;
    s.verdict(
        &format!("with at most {allowed_hangs} microVMs that stopped answering"),
        hangs <= allowed_hangs,
        format!(
            "{hangs} hung ({} in earlier runs): {}",
            earlier.hung,
            hung.join("\n")
        ),
    );
    s.verdict(
        "and left no tap, VMM, mount, descriptor or group state behind",
        before == after,
        format!("before: {before}; after: {after}{span}"),
    );
    s.check(
        "nor an address: the next group gets the first one again",
        || {
            let out = d.capsa(&[
                "run",
                "-d",
                "--name",
                "first-again",
                "busybox",
                "sleep",
                "1",
            ])?;
            ensure!(out.code == Some(0), "{}", out.describe());
            let ip = d.group("first-again")?.ip;
            d.wait("first-again", "main")?;
            let _ = d.capsa(&["rm", "first-again"]);
            ensure!(ip == Some(std::net::Ipv4Addr::new(10, 88, 0, 2)), "{ip:?}");
            Ok("10.88.0.2".into())
        },
    );
    Ok(())
}
