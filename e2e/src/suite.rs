//! Running one suite: each check is timed and printed as a JSON line as
//! soon as it is decided; a check that hit a known emulation fault says
//! so, for the runner to run the suite again.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::report::{CheckLine, Line};

/// A check's failure that is the emulation's, not ours: an outer machine
/// or microVM that the nested KVM lets down now and then (README, "Hosts
/// with PVM"). The suite is then run again on its own.
#[derive(Debug, thiserror::Error)]
#[error("emulation fault: {0}")]
pub struct EmulationFault(pub String);

/// `error`, marked as the emulation's when it is a guest that gave no
/// answer at all (timed out, or the connection broke).
pub fn unanswered_is_fault(error: anyhow::Error) -> anyhow::Error {
    let unanswered = error.chain().any(|e| {
        e.downcast_ref::<capsa_guest_client::GuestError>()
            .is_some_and(|g| g.is_unanswered())
    });
    if unanswered {
        EmulationFault(format!("the guest stopped answering: {error:#}")).into()
    } else {
        error
    }
}

/// How many soft lockups this machine's kernel log holds (0 where it
/// cannot be read).
fn soft_lockups() -> usize {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER takes no buffer and returns the log's size.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    if size <= 0 {
        return 0;
    }
    let mut log = vec![0u8; size as usize];
    // SAFETY: READ_ALL writes at most `log.len()` bytes into `log`.
    let read = unsafe {
        libc::klogctl(
            SYSLOG_ACTION_READ_ALL,
            log.as_mut_ptr().cast(),
            log.len() as libc::c_int,
        )
    };
    if read <= 0 {
        return 0;
    }
    String::from_utf8_lossy(&log[..read as usize])
        .matches("soft lockup")
        .count()
}

/// How often the heartbeat speaks.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long the heartbeat keeps quiet after the kernel logs a soft
/// lockup: a CPU stuck that long is a freeze in the making, and a frozen
/// machine's kernel goes on logging lockups while user space may still
/// run on its other CPU.
const QUIET_AFTER_LOCKUP: Duration = Duration::from_secs(60);

/// A heartbeat on stderr (the console, nested): the runner stops an outer
/// machine whose payload stays quiet (scripts/nested-kvm.sh, 90 s), so a
/// check that merely takes long, or hangs in our code until its own
/// deadline, must not look like a freeze, and a machine whose kernel
/// keeps reporting stuck CPUs must.
pub fn spawn_heartbeat() {
    std::thread::spawn(|| {
        let began = Instant::now();
        let mut lockups = soft_lockups();
        let mut quiet_until = began;
        loop {
            std::thread::sleep(HEARTBEAT);
            let now = soft_lockups();
            if now > lockups {
                lockups = now;
                quiet_until = Instant::now() + QUIET_AFTER_LOCKUP;
            }
            if Instant::now() >= quiet_until {
                eprintln!("capsa-e2e: still running, {} s", began.elapsed().as_secs());
            }
        }
    });
}

/// Whether a failure's text says a microVM triple-faulted: capsa-vmm's
/// words for it reach a check through capsad's error (the console's
/// tail), the CLI's stderr or a log.
fn mentions_triple_fault(text: &str) -> bool {
    text.contains(crate::vm::TRIPLE_FAULT_TEXT)
}

/// Where a suite's checks go.
pub struct Suite<'a> {
    name: &'static str,
    only: Option<&'a str>,
    out: &'a mut dyn Write,
    started: Instant,
    /// Soft lockups the kernel had logged when the suite began.
    lockups_at_start: usize,
    pub failed: usize,
    pub faulted: bool,
}

impl<'a> Suite<'a> {
    /// `only`: the one check to run (the others are skipped; what a suite
    /// sets up for them still runs).
    pub fn new(name: &'static str, only: Option<&'a str>, out: &'a mut dyn Write) -> Self {
        let mut suite = Suite {
            name,
            only,
            out,
            started: Instant::now(),
            lockups_at_start: soft_lockups(),
            failed: 0,
            faulted: false,
        };
        suite.print(&Line::SuiteStart {
            suite_start: name.to_string(),
        });
        suite
    }

    fn print(&mut self, line: &Line) {
        // A runner that stopped reading has nothing left to tell.
        let _ = writeln!(self.out, "{}", line.to_json());
        let _ = self.out.flush();
    }

    /// Says how far the suite has come (see `report::Progress`).
    pub fn progress(&mut self, at: crate::report::Progress) {
        self.print(&Line::Progress(crate::report::ProgressLine {
            suite: self.name.to_string(),
            at,
        }));
    }

    /// Whether `check` is to run.
    pub fn wants(&self, check: &str) -> bool {
        self.only.is_none_or(|only| only == check)
    }

    /// Runs `check` unless another was asked for: it passes with its
    /// detail, or fails with its error (and its cause chain). Once an
    /// emulation fault has hit the suite, checks are no longer run (each
    /// would wait out the same dead guest): the suite is run again.
    pub fn check(&mut self, check: &str, run: impl FnOnce() -> anyhow::Result<String>) {
        if !self.wants(check) {
            return;
        }
        if self.faulted {
            let not_run = anyhow::anyhow!("not run: an emulation fault hit the suite before it");
            return self.decided(check, Instant::now(), Err(not_run));
        }
        let began = Instant::now();
        let result = run();
        self.decided(check, began, result);
    }

    /// Records a check decided by a value already at hand: `ok`, with
    /// `detail` saying what was seen.
    pub fn verdict(&mut self, check: &str, ok: bool, detail: impl Into<String>) {
        if !self.wants(check) {
            return;
        }
        let detail = detail.into();
        let result = if ok {
            Ok(detail)
        } else {
            Err(anyhow::anyhow!(detail))
        };
        self.decided(check, Instant::now(), result);
    }

    fn decided(&mut self, check: &str, began: Instant, result: anyhow::Result<String>) {
        let ms = began.elapsed().as_millis() as u64;
        let (ok, detail) = match result {
            Ok(detail) => (true, detail),
            Err(e) => {
                if let Some(fault) = e.downcast_ref::<EmulationFault>() {
                    self.fault(fault.0.clone());
                } else if mentions_triple_fault(&format!("{e:#}")) {
                    // Nested KVM's, never seen on real KVM: the suite runs
                    // again, and a failure in every run still counts.
                    self.fault("a microVM triple-faulted".into());
                } else if soft_lockups() > self.lockups_at_start {
                    // The emulated machine's own kernel had a CPU stuck
                    // (in the nested runs, a vCPU thread inside KVM): what
                    // failed with it says nothing of ours. The suite runs
                    // again; a failure in every run still counts.
                    self.fault("the outer machine's kernel reported a soft lockup".into());
                }
                (false, format!("{e:#}"))
            }
        };
        if !ok {
            self.failed += 1;
        }
        self.print(&Line::Check(CheckLine {
            suite: self.name.to_string(),
            check: check.to_string(),
            ok,
            detail,
            ms,
        }));
    }

    /// Marks the suite as hit by an emulation fault.
    pub fn fault(&mut self, reason: String) {
        self.faulted = true;
        self.print(&Line::Fault {
            suite: self.name.to_string(),
            fault: reason,
        });
    }

    pub fn end(mut self) -> usize {
        let ms = self.started.elapsed().as_millis() as u64;
        self.print(&Line::SuiteEnd {
            suite_end: self.name.to_string(),
            ms,
        });
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(out: &[u8]) -> Vec<Line> {
        String::from_utf8_lossy(out)
            .lines()
            .map(|l| Line::parse(l).unwrap())
            .collect()
    }

    #[test]
    fn checks_print_their_verdicts_and_faults_are_marked() {
        let mut out = Vec::new();
        let mut suite = Suite::new("s", None, &mut out);
        suite.check("passes", || Ok("fine".into()));
        suite.check("fails", || anyhow::bail!("wrong"));
        suite.check("faults", || Err(EmulationFault("froze".into()).into()));
        suite.verdict("value", false, "saw 3");
        let mut ran = false;
        suite.check("after the fault", || {
            ran = true;
            Ok(String::new())
        });
        assert!(!ran, "a check after a fault is not run");
        assert_eq!(suite.end(), 4);
        let lines = lines(&out);
        assert_eq!(lines.len(), 8);
        let Line::Check(fails) = &lines[2] else {
            panic!()
        };
        assert_eq!((fails.ok, fails.detail.as_str()), (false, "wrong"));
        assert_eq!(
            lines[3],
            Line::Fault {
                suite: "s".into(),
                fault: "froze".into()
            }
        );
        let Line::Check(skipped) = &lines[6] else {
            panic!()
        };
        assert!(!skipped.ok && skipped.detail.starts_with("not run"));
        assert!(matches!(&lines[7], Line::SuiteEnd { suite_end, .. } if suite_end == "s"));
    }

    #[test]
    fn one_check_alone_skips_the_others() {
        let mut out = Vec::new();
        let mut suite = Suite::new("s", Some("b"), &mut out);
        let mut ran = Vec::new();
        suite.check("a", || {
            ran.push("a");
            Ok(String::new())
        });
        suite.check("b", || {
            ran.push("b");
            Ok(String::new())
        });
        suite.end();
        assert_eq!(ran, ["b"]);
    }
}
