//! What each suite came to over the runs: the runner's retry rules. A
//! suite that ended with no emulation fault is done, failed checks and
//! all; one that a fault hit (a fault it reported, or an outer machine
//! that stopped while it ran) is run again on its own, up to the attempts
//! allowed, and every retry is said with its reason. A suite an earlier
//! one's freeze kept from starting is still to run, and that costs it no
//! attempt.

use std::time::Duration;

use capsa_e2e::report::{CheckLine, Line, Progress};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Not run yet, or to be run again.
    Pending,
    /// In an outer machine's run now.
    Running,
    Done,
}

#[derive(Debug, Clone)]
struct Suite {
    name: String,
    state: State,
    runs: u32,
    /// Its runs that count against `allowed` (not those that got further).
    charged: u32,
    /// Runs it may have in all, when faults keep hitting it.
    allowed: u32,
    ended: bool,
    ms: u64,
    checks: Vec<CheckLine>,
    retries: Vec<String>,
    /// The fault of the last run, when one hit it.
    fault: Option<String>,
    /// Where its next run picks up (its last run's last progress line).
    resume: Option<Progress>,
}

pub struct Outcomes {
    suites: Vec<Suite>,
    /// No retry starts after this: the suites must end within CI's time.
    retry_deadline: Option<std::time::Instant>,
}

/// What one run printed of one suite.
#[derive(Default)]
struct Seen {
    started: bool,
    ended: Option<u64>,
    faults: Vec<String>,
    checks: Vec<CheckLine>,
    progress: Option<Progress>,
}

fn seen(log: &str, suite: &str) -> Seen {
    let mut seen = Seen::default();
    for line in log.lines().filter_map(Line::parse) {
        match line {
            Line::SuiteStart { suite_start } if suite_start == suite => seen.started = true,
            Line::SuiteEnd { suite_end, ms } if suite_end == suite => seen.ended = Some(ms),
            Line::Fault { suite: s, fault } if s == suite => seen.faults.push(fault),
            Line::Check(check) if check.suite == suite => seen.checks.push(check),
            Line::Progress(p) if p.suite == suite => seen.progress = Some(p.at),
            _ => {}
        }
    }
    seen
}

impl Outcomes {
    /// `allowed`: how many runs each suite may have in all.
    pub fn new(names: &[String], allowed: impl Fn(&str) -> u32) -> Self {
        Outcomes {
            suites: names
                .iter()
                .map(|name| Suite {
                    name: name.clone(),
                    state: State::Pending,
                    runs: 0,
                    charged: 0,
                    allowed: allowed(name),
                    ended: false,
                    ms: 0,
                    checks: Vec::new(),
                    retries: Vec::new(),
                    fault: None,
                    resume: None,
                })
                .collect(),
            retry_deadline: None,
        }
    }

    /// No retry is started after `deadline`.
    pub fn retry_until(mut self, deadline: std::time::Instant) -> Self {
        self.retry_deadline = Some(deadline);
        self
    }

    /// The suites still to run that no run has taken.
    pub fn pending(&self) -> Vec<String> {
        self.suites
            .iter()
            .filter(|s| s.state == State::Pending && s.charged < s.allowed)
            .map(|s| s.name.clone())
            .collect()
    }

    /// Takes those of `wanted` that are pending for a run (each suite is
    /// in one run at a time), in the suites' order.
    pub fn claim(&mut self, wanted: &[String]) -> Vec<String> {
        let pending = self.pending();
        let mut taken = Vec::new();
        for suite in self.suites.iter_mut() {
            if wanted.contains(&suite.name) && pending.contains(&suite.name) {
                suite.state = State::Running;
                taken.push(suite.name.clone());
            }
        }
        taken
    }

    /// Where each of `suites` that an earlier run got partway through
    /// picks up.
    pub fn resume_points(&self, suites: &[String]) -> Vec<(String, Progress)> {
        self.suites
            .iter()
            .filter(|s| suites.contains(&s.name))
            .filter_map(|s| Some((s.name.clone(), s.resume?)))
            .collect()
    }

    /// Whether a run holds any suite now.
    pub fn running(&self) -> bool {
        self.suites.iter().any(|s| s.state == State::Running)
    }

    /// Gives back suites a run took but could not report on.
    pub fn release(&mut self, ran: &[String]) {
        for suite in self.suites.iter_mut().filter(|s| ran.contains(&s.name)) {
            if suite.state == State::Running {
                suite.state = State::Pending;
            }
        }
    }

    /// Takes what a run of `ran` printed; returns the retries it calls
    /// for, each with its reason.
    pub fn record(&mut self, ran: &[String], log: &str) -> Vec<String> {
        let mut retries = Vec::new();
        for suite in self.suites.iter_mut().filter(|s| ran.contains(&s.name)) {
            // To run again unless decided below.
            suite.state = State::Pending;
            let seen = seen(log, &suite.name);
            if !seen.started {
                retries.push(format!(
                    "suite {} did not get to start (the outer machine stopped before it): it runs next time",
                    suite.name
                ));
                continue;
            }
            // A run that a freeze stopped after it had got further costs
            // no attempt: the next picks up there, and there are only so
            // many points to pick up from.
            let advanced = seen.progress.is_some_and(|p| {
                seen.ended.is_none() && suite.resume.is_none_or(|r| p.done > r.done)
            });
            suite.runs += 1;
            if !advanced {
                suite.charged += 1;
            }
            if seen.ended.is_none() {
                suite.resume = seen.progress.or(suite.resume);
            }
            suite.checks = seen.checks;
            suite.ended = seen.ended.is_some();
            suite.ms = seen
                .ended
                .unwrap_or_else(|| suite.checks.iter().map(|c| c.ms).sum());
            suite.fault = match (seen.faults.into_iter().next(), suite.ended) {
                (Some(fault), _) => Some(fault),
                (None, false) => Some("the outer machine stopped while it ran".into()),
                (None, true) => None,
            };
            let Some(fault) = &suite.fault else {
                suite.state = State::Done;
                continue;
            };
            let attempts = suite.allowed;
            if self
                .retry_deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
            {
                suite.state = State::Done;
                retries.push(format!(
                    "suite {} is not run again: the time for retries is spent; this run counts: {fault}",
                    suite.name
                ));
            } else if suite.charged < attempts {
                let from = match suite.resume {
                    Some(p) => format!(", from step {}", p.done + 1),
                    None => String::new(),
                };
                let retry = format!(
                    "suite {} is run again on its own (run {} of at most {attempts}{from}): {fault}",
                    suite.name,
                    suite.charged + 1
                );
                suite.retries.push(retry.clone());
                retries.push(retry);
            } else {
                suite.state = State::Done;
                retries.push(format!(
                    "suite {} hit an emulation fault in {attempts} of its runs; the last one counts: {fault}",
                    suite.name
                ));
            }
        }
        retries
    }

    pub fn report(&self, elapsed: Duration) -> Report {
        Report {
            total_ms: elapsed.as_millis() as u64,
            suites: self
                .suites
                .iter()
                .map(|s| SuiteReport {
                    suite: s.name.clone(),
                    passed: s.checks.iter().filter(|c| c.ok).count(),
                    failed: s.checks.iter().filter(|c| !c.ok).count(),
                    runs: s.runs,
                    finished: s.ended && s.fault.is_none(),
                    ms: s.ms,
                    retries: s.retries.clone(),
                    checks: s.checks.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SuiteReport {
    pub suite: String,
    pub passed: usize,
    pub failed: usize,
    pub runs: u32,
    /// Ended, and no fault hit its last run.
    pub finished: bool,
    pub ms: u64,
    pub retries: Vec<String>,
    pub checks: Vec<CheckLine>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub suites: Vec<SuiteReport>,
    pub total_ms: u64,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.suites.iter().all(|s| s.finished && s.failed == 0)
    }

    /// The checks that failed, then one row per suite.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for s in &self.suites {
            for c in s.checks.iter().filter(|c| !c.ok) {
                out.push_str(&format!(
                    "FAIL {}: {}\n     {}\n",
                    s.suite,
                    c.check,
                    c.detail.replace('\n', "\n     ")
                ));
            }
        }
        out.push_str(
            "| suite | passed | failed | runs | finished | seconds |\n|---|---|---|---|---|---|\n",
        );
        for s in &self.suites {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.1} |\n",
                s.suite,
                s.passed,
                s.failed,
                s.runs,
                if s.finished { "yes" } else { "no" },
                s.ms as f64 / 1000.0
            ));
        }
        out.push_str(&format!(
            "e2e: {:.1} s in all",
            self.total_ms as f64 / 1000.0
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(suite: &str, name: &str, ok: bool) -> String {
        Line::Check(CheckLine {
            suite: suite.into(),
            check: name.into(),
            ok,
            detail: String::new(),
            ms: 1,
        })
        .to_json()
    }

    fn start(suite: &str) -> String {
        Line::SuiteStart {
            suite_start: suite.into(),
        }
        .to_json()
    }

    fn end(suite: &str) -> String {
        Line::SuiteEnd {
            suite_end: suite.into(),
            ms: 5,
        }
        .to_json()
    }

    fn fault(suite: &str) -> String {
        Line::Fault {
            suite: suite.into(),
            fault: "a microVM triple-faulted".into(),
        }
        .to_json()
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_fault_reruns_only_its_suite() {
        let all = names(&["boot", "agent", "devices"]);
        let mut outcomes = Outcomes::new(&all, |_| 3);
        assert_eq!(outcomes.claim(&all), all);
        assert!(outcomes.pending().is_empty() && outcomes.running());
        let log = [
            start("boot"),
            check("boot", "a", true),
            end("boot"),
            start("agent"),
            fault("agent"),
            check("agent", "b", false),
            end("agent"),
            "[  12.0] kernel noise".into(),
            start("devices"),
            check("devices", "c", false),
            end("devices"),
        ]
        .join("\n");
        let retries = outcomes.record(&all, &log);
        assert_eq!(retries.len(), 1);
        assert!(
            retries[0].contains("suite agent is run again"),
            "{retries:?}"
        );
        assert_eq!(
            outcomes.pending(),
            ["agent"],
            "a real failure is not retried"
        );
        let log = [start("agent"), check("agent", "b", true), end("agent")].join("\n");
        assert!(outcomes.record(&names(&["agent"]), &log).is_empty());
        assert!(outcomes.pending().is_empty());
        let report = outcomes.report(Duration::from_secs(1));
        let agent = &report.suites[1];
        assert_eq!(
            (agent.passed, agent.failed, agent.runs, agent.finished),
            (1, 0, 2, true)
        );
        assert_eq!(agent.retries.len(), 1);
        assert!(!report.passed(), "devices failed for real");
        assert!(report.table().contains("| agent | 1 | 0 | 2 | yes |"));
    }

    #[test]
    fn a_freeze_reruns_the_suite_it_hit_and_runs_those_it_kept_from_starting() {
        let all = names(&["boot", "agent", "devices"]);
        let mut outcomes = Outcomes::new(&all, |_| 3);
        let log = [
            start("boot"),
            end("boot"),
            start("agent"),
            check("agent", "b", true),
        ]
        .join("\n");
        let retries = outcomes.record(&all, &log);
        assert!(retries
            .iter()
            .any(|r| r.contains("the outer machine stopped while it ran")));
        assert!(retries
            .iter()
            .any(|r| r.contains("devices did not get to start")));
        assert_eq!(outcomes.pending(), ["agent", "devices"]);
    }

    #[test]
    fn faults_stop_at_the_attempts_allowed_and_then_count_as_failures() {
        let all = names(&["boot"]);
        let mut outcomes = Outcomes::new(&all, |_| 2);
        let log = [
            start("boot"),
            fault("boot"),
            check("boot", "a", true),
            end("boot"),
        ]
        .join("\n");
        for _ in 0..2 {
            assert_eq!(outcomes.pending(), ["boot"]);
            outcomes.record(&all, &log);
        }
        assert!(outcomes.pending().is_empty());
        let report = outcomes.report(Duration::ZERO);
        assert!(!report.suites[0].finished);
        assert!(!report.passed());
    }

    fn progress(suite: &str, done: u32) -> String {
        Line::Progress(capsa_e2e::report::ProgressLine {
            suite: suite.into(),
            at: Progress { done, hung: 1 },
        })
        .to_json()
    }

    #[test]
    fn a_freeze_after_progress_picks_up_there_and_costs_no_attempt() {
        let all = names(&["cycles"]);
        let mut outcomes = Outcomes::new(&all, |_| 1);
        let froze_at = |done: u32| {
            [
                start("cycles"),
                progress("cycles", 10),
                progress("cycles", done),
            ]
            .join("\n")
        };
        let retries = outcomes.record(&all, &froze_at(20));
        assert!(
            retries.iter().any(|r| r.contains("from step 21")),
            "{retries:?}"
        );
        assert_eq!(outcomes.pending(), ["cycles"]);
        assert_eq!(
            outcomes.resume_points(&all),
            [("cycles".to_string(), Progress { done: 20, hung: 1 })]
        );
        // No further this time: that run is charged, and the one allowed
        // is spent.
        outcomes.record(&all, &froze_at(20));
        assert!(outcomes.pending().is_empty());
        let report = outcomes.report(Duration::ZERO);
        assert_eq!(report.suites[0].runs, 2);
        assert!(!report.passed());
    }

    #[test]
    fn a_suite_that_ends_keeps_no_resume_point() {
        let all = names(&["cycles"]);
        let mut outcomes = Outcomes::new(&all, |_| 3);
        let log = [
            start("cycles"),
            progress("cycles", 10),
            check("cycles", "a", true),
            end("cycles"),
        ]
        .join("\n");
        assert!(outcomes.record(&all, &log).is_empty());
        assert!(outcomes.resume_points(&all).is_empty());
        assert!(outcomes.report(Duration::ZERO).passed());
    }
}
