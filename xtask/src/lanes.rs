//! Outer machines side by side. Nested, one outer machine keeps about one
//! of the host's cores busy (its emulated CPUs mostly wait on each other),
//! so the suites are shared among lanes, each running one outer machine
//! at a time: each lane starts with a share of the suites balanced by
//! their usual time, and a lane that is done takes whatever is left to
//! run, the retries of the other lanes' suites included. A freeze then
//! costs its own lane, not every suite after it.

use std::sync::{Condvar, Mutex};

use anyhow::Result;

use capsa_e2e::report::Progress;

use crate::outcome::Outcomes;

/// Each lane's first suites: the heaviest first to the lane with the least
/// so far, each lane then in the suites' own order (cycles last).
pub fn first_batches(
    suites: &[String],
    lanes: usize,
    weight: impl Fn(&str) -> u64,
) -> Vec<Vec<String>> {
    let mut heaviest_first: Vec<&String> = suites.iter().collect();
    heaviest_first.sort_by_key(|s| std::cmp::Reverse(weight(s)));
    let mut batches: Vec<(u64, Vec<String>)> = vec![(0, Vec::new()); lanes.max(1)];
    for suite in heaviest_first {
        if let Some(lightest) = batches.iter_mut().min_by_key(|(load, _)| *load) {
            lightest.0 += weight(suite);
            lightest.1.push(suite.clone());
        }
    }
    batches
        .into_iter()
        .map(|(_, mut batch)| {
            batch.sort_by_key(|s| suites.iter().position(|x| x == s));
            batch
        })
        .filter(|batch| !batch.is_empty())
        .collect()
}

/// What the lanes share.
struct Shared {
    outcomes: Outcomes,
    /// The next run's number (its log is `outer-N.log`).
    next_run: u32,
    /// A run could not be made at all: no lane starts another.
    stopped: bool,
}

/// One run of an outer machine: its number, its suites, whether it is its
/// lane's first, and where suites an earlier run got partway through pick
/// up; returns what it printed.
pub type RunOnce<'a> =
    dyn Fn(u32, &[String], bool, &[(String, Progress)]) -> Result<String> + Sync + 'a;

/// Runs every suite of `outcomes` to its end over `first.len()` lanes,
/// each lane starting with its batch of `first`.
pub fn run(
    mut outcomes: Outcomes,
    first: Vec<Vec<String>>,
    run_once: &RunOnce,
) -> Result<Outcomes> {
    // Each lane's first batch is its own before any lane starts, so that a
    // lane done early cannot take a batch meant for one not yet started.
    let first: Vec<Vec<String>> = first
        .iter()
        .map(|batch| outcomes.claim(batch))
        .filter(|batch| !batch.is_empty())
        .collect();
    let shared = Mutex::new(Shared {
        outcomes,
        next_run: 1,
        stopped: false,
    });
    let changed = Condvar::new();
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let lanes: Vec<_> = first
            .into_iter()
            .map(|batch| {
                let (shared, changed) = (&shared, &changed);
                scope.spawn(move || lane(batch, shared, changed, run_once))
            })
            .collect();
        lanes
            .into_iter()
            .map(|lane| {
                lane.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a lane's thread panicked")))
            })
            .collect()
    });
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(shared
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .outcomes)
}

/// One lane: its first batch (claimed for it already), then whatever is
/// pending, until nothing is left to run and no run could leave a retry.
fn lane(
    first: Vec<String>,
    shared: &Mutex<Shared>,
    changed: &Condvar,
    run_once: &RunOnce,
) -> Result<()> {
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    let mut claimed = Some(first);
    loop {
        let (number, batch, is_first, resume) = {
            let mut s = lock();
            let is_first = claimed.is_some();
            let batch = match claimed.take() {
                Some(first) => first,
                None => loop {
                    if s.stopped {
                        return Ok(());
                    }
                    let pending = s.outcomes.pending();
                    let batch = s.outcomes.claim(&pending);
                    if !batch.is_empty() {
                        break batch;
                    }
                    if !s.outcomes.running() {
                        changed.notify_all();
                        return Ok(());
                    }
                    s = changed.wait(s).unwrap_or_else(|e| e.into_inner());
                },
            };
            if s.stopped {
                s.outcomes.release(&batch);
                return Ok(());
            }
            s.next_run += 1;
            let resume = s.outcomes.resume_points(&batch);
            (s.next_run - 1, batch, is_first, resume)
        };
        let printed = run_once(number, &batch, is_first, &resume);
        let mut s = lock();
        match printed {
            Ok(log) => {
                for retry in s.outcomes.record(&batch, &log) {
                    eprintln!("xtask e2e: {retry}");
                }
                changed.notify_all();
            }
            Err(e) => {
                s.outcomes.release(&batch);
                s.stopped = true;
                changed.notify_all();
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_e2e::report::Line;

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_heaviest_suites_are_spread_and_each_lane_keeps_the_order() {
        let all = names(&["boot", "agent", "daemon", "hostile", "cycles"]);
        let weight = |s: &str| match s {
            "hostile" => 500,
            "daemon" => 370,
            "cycles" => 350,
            _ => 20,
        };
        let batches = first_batches(&all, 2, weight);
        assert_eq!(
            batches,
            [
                names(&["boot", "agent", "hostile"]),
                names(&["daemon", "cycles"])
            ]
        );
        assert_eq!(first_batches(&all, 1, weight), vec![all.clone()]);
        assert_eq!(first_batches(&names(&["boot"]), 3, weight).len(), 1);
    }

    fn ran(suites: &[String], faulted: &[&str]) -> String {
        suites
            .iter()
            .flat_map(|s| {
                let mut lines = vec![Line::SuiteStart {
                    suite_start: s.clone(),
                }];
                if faulted.contains(&s.as_str()) {
                    lines.push(Line::Fault {
                        suite: s.clone(),
                        fault: "the outer machine froze".into(),
                    });
                }
                lines.push(Line::SuiteEnd {
                    suite_end: s.clone(),
                    ms: 1,
                });
                lines
            })
            .map(|l| l.to_json())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_lane_that_is_done_takes_the_other_lanes_retries() {
        let all = names(&["boot", "agent", "cycles"]);
        let outcomes = Outcomes::new(&all, |_| 3);
        let first = vec![names(&["boot", "agent"]), names(&["cycles"])];
        let runs = Mutex::new(Vec::new());
        let cycles_ran = std::sync::atomic::AtomicBool::new(false);
        let once =
            |n: u32, suites: &[String], _first: bool, _: &[(String, Progress)]| -> Result<String> {
                runs.lock().unwrap().push((n, suites.to_vec()));
                // cycles is hit by a fault in its first run only (whichever
                // number that run got: the lanes' threads start in any order).
                let first_cycles = suites == ["cycles"]
                    && !cycles_ran.swap(true, std::sync::atomic::Ordering::SeqCst);
                Ok(ran(suites, if first_cycles { &["cycles"] } else { &[] }))
            };
        let outcomes = run(outcomes, first, &once).unwrap();
        let runs = runs.into_inner().unwrap();
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert_eq!(
            runs.iter().filter(|(_, s)| s == &["cycles"]).count(),
            2,
            "{runs:?}"
        );
        let mut numbers: Vec<u32> = runs.iter().map(|(n, _)| *n).collect();
        numbers.sort();
        assert_eq!(numbers, [1, 2, 3]);
        assert!(outcomes.pending().is_empty() && !outcomes.running());
        assert!(outcomes.report(std::time::Duration::ZERO).passed());
    }

    #[test]
    fn a_run_that_cannot_be_made_stops_every_lane() {
        let all = names(&["boot", "cycles"]);
        let outcomes = Outcomes::new(&all, |_| 3);
        let first = vec![names(&["boot"]), names(&["cycles"])];
        let once =
            |_: u32, suites: &[String], _: bool, _: &[(String, Progress)]| -> Result<String> {
                anyhow::ensure!(!suites.contains(&"cycles".to_string()), "no QEMU");
                Ok(ran(suites, &["boot"]))
            };
        match run(outcomes, first, &once) {
            Ok(_) => panic!("a run that could not be made passed"),
            Err(e) => assert!(e.to_string().contains("no QEMU"), "{e}"),
        }
    }
}
