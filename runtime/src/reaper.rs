//! Collects the exit status of every child (and of orphans reparented to
//! us) in one place, so each status reaches whoever waits for that PID
//! however the exit and the wait are ordered.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// Statuses nobody claimed (orphans' mostly) are kept this long, by count.
const UNCLAIMED_KEPT: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// The shell's convention: the code, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(signal) => 128 + signal,
        }
    }
}

pub struct Reaper {
    exited: Mutex<(HashMap<i32, ExitStatus>, VecDeque<i32>)>,
    changed: Condvar,
}

impl Reaper {
    /// The process's reaper. The first call makes this process a child
    /// subreaper (PID 1 is one anyway) and starts the reaping thread.
    pub fn global() -> &'static Reaper {
        static REAPER: OnceLock<&'static Reaper> = OnceLock::new();
        REAPER.get_or_init(|| {
            let reaper: &'static Reaper = Box::leak(Box::new(Reaper {
                exited: Mutex::new((HashMap::new(), VecDeque::new())),
                changed: Condvar::new(),
            }));
            // Without it, the grandchildren the container-init helper leaves
            // would be reparented past us (only matters when not PID 1).
            let _ = nix::sys::prctl::set_child_subreaper(true);
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || reaper.reap_forever())
                .expect("cannot start the reaper thread");
            reaper
        })
    }

    fn reap_forever(&self) {
        loop {
            match waitpid(None::<Pid>, None) {
                Ok(WaitStatus::Exited(pid, code)) => self.record(pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    self.record(pid, ExitStatus::Signaled(signal as i32))
                }
                Ok(_) | Err(Errno::EINTR) => {}
                // No children right now; new ones may come at any time.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn record(&self, pid: Pid, status: ExitStatus) {
        let mut guard = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        let (statuses, order) = &mut *guard;
        statuses.insert(pid.as_raw(), status);
        order.push_back(pid.as_raw());
        while order.len() > UNCLAIMED_KEPT {
            if let Some(old) = order.pop_front() {
                statuses.remove(&old);
            }
        }
        self.changed.notify_all();
    }

    /// Blocks until `pid` has exited and returns its status (once).
    pub fn wait(&self, pid: i32) -> ExitStatus {
        let mut guard = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(status) = guard.0.remove(&pid) {
                guard.1.retain(|&p| p != pid);
                return status;
            }
            guard = self.changed.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// `pid`'s status if it has exited, without taking it.
    pub fn peek(&self, pid: i32) -> Option<ExitStatus> {
        let guard = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.get(&pid).copied()
    }

    /// Like `wait`, giving up after `timeout`.
    pub fn wait_timeout(&self, pid: i32, timeout: Duration) -> Option<ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        let mut guard = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(status) = guard.0.remove(&pid) {
                guard.1.retain(|&p| p != pid);
                return Some(status);
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            guard = self
                .changed
                .wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
