//! The container process of every conformance row (`capsa-proc-probe`):
//! it prints what it was given as one JSON line, then does what its
//! arguments say: `exit=N` exits N, `trap=N` catches signal N (printing
//! `{"signal":N}` and exiting 0 when it comes), `wait` waits for a caught
//! signal (60 s at most, then exits 99).

use std::io::Write;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What a process was started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessReport {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, sorted.
    pub groups: Vec<u32>,
}

/// The line printed when a trapped signal came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caught {
    pub signal: i32,
}

/// The exit status when `wait` saw no signal in time.
pub const WAITED_IN_VAIN: i32 = 99;
const WAIT_LIMIT: Duration = Duration::from_secs(60);

static CAUGHT: AtomicI32 = AtomicI32::new(0);

extern "C" fn note(signal: libc::c_int) {
    CAUGHT.store(signal, Ordering::SeqCst);
}

fn report() -> ProcessReport {
    // SAFETY: getuid, getgid and getgroups with a null list (size query)
    // touch no memory of ours.
    let (uid, gid, count) = unsafe {
        (
            libc::getuid(),
            libc::getgid(),
            libc::getgroups(0, std::ptr::null_mut()),
        )
    };
    let mut groups = vec![0 as libc::gid_t; count.max(0) as usize];
    // SAFETY: the buffer holds `count` gids.
    let got = unsafe { libc::getgroups(count, groups.as_mut_ptr()) };
    groups.truncate(got.max(0) as usize);
    groups.sort_unstable();
    ProcessReport {
        argv: std::env::args().collect(),
        env: std::env::vars_os()
            .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
            .collect(),
        cwd: std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        uid,
        gid,
        groups,
    }
}

fn print(line: &impl Serialize) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(line).unwrap_or_default());
    let _ = out.flush();
}

pub fn main() -> ! {
    print(&report());
    let mut code = 0;
    let mut waits = false;
    for word in std::env::args().skip(1) {
        if let Some(n) = word.strip_prefix("exit=").and_then(|n| n.parse().ok()) {
            code = n;
        } else if let Some(n) = word.strip_prefix("trap=").and_then(|n| n.parse().ok()) {
            // SAFETY: the handler only stores to an atomic, which is
            // async-signal-safe.
            unsafe { libc::signal(n, note as *const () as libc::sighandler_t) };
        } else if word == "wait" {
            waits = true;
        }
    }
    if waits {
        let deadline = Instant::now() + WAIT_LIMIT;
        while Instant::now() < deadline {
            let signal = CAUGHT.load(Ordering::SeqCst);
            if signal != 0 {
                print(&Caught { signal });
                std::process::exit(0);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::process::exit(WAITED_IN_VAIN);
    }
    std::process::exit(code)
}
