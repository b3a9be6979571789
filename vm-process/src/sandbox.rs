//! A microVM and its agent, for capsad and the shim alike: booted (the
//! VMM started, then its agent reached over vsock, with the console's
//! last lines when it does not answer), found again by PID, and shut down
//! politely (the agent stops its containers and powers off) and then by
//! force.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsa_guest_client::{Guest, GuestError};

use crate::{console_tail, is_our_vmm, kill, spawn, VmConfig, VmError, VmSpec};

/// How long a VMM gets to exit after its guest's shutdown grace before it
/// is killed.
pub const POWER_OFF_MARGIN: Duration = Duration::from_secs(10);

/// A guest that did not come up, with what its console last said.
#[derive(Debug, thiserror::Error)]
#[error("{}{error}; console:\n{console}", if *.vmm_ended { "its VMM ended before the guest answered: " } else { "" })]
pub struct BootError {
    pub error: GuestError,
    /// The VMM process was gone when the guest was last tried.
    pub vmm_ended: bool,
    pub console: String,
}

/// A started VMM whose agent has not answered yet.
#[derive(Debug)]
pub struct Booting {
    pid: u32,
    vsock: PathBuf,
    console: PathBuf,
}

/// Starts the VMM of `vm`; the caller reaps the returned child.
pub fn boot(config: &VmConfig, vm: &VmSpec) -> Result<(Booting, Child), VmError> {
    let child = spawn(config, vm)?;
    let booting = Booting {
        pid: child.id(),
        vsock: vm.vsock.to_path_buf(),
        console: vm.console.to_path_buf(),
    };
    Ok((booting, child))
}

impl Booting {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits up to `patience` for the agent, and no longer than the VMM
    /// lives. A VMM whose agent never answers is left running: the caller
    /// stops it ([`stop`]).
    pub fn connect(self, patience: Duration) -> Result<Sandbox, BootError> {
        // Tried in slices, so that a VMM that died (a bad argument, a
        // jail it could not enter) is reported at once, with its words.
        const SLICE: Duration = Duration::from_secs(2);
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match Guest::connect(&self.vsock, left.min(SLICE)) {
                Ok(guest) => {
                    return Ok(Sandbox {
                        pid: self.pid,
                        vsock: self.vsock,
                        console: self.console,
                        guest: Arc::new(guest),
                    })
                }
                Err(_) if Instant::now() < deadline && is_our_vmm(self.pid, &self.vsock) => {}
                Err(error) => {
                    return Err(BootError {
                        error,
                        vmm_ended: !is_our_vmm(self.pid, &self.vsock),
                        console: console_tail(&self.console),
                    })
                }
            }
        }
    }
}

/// A running microVM whose agent answered.
pub struct Sandbox {
    pid: u32,
    vsock: PathBuf,
    console: PathBuf,
    guest: Arc<Guest>,
}

impl Sandbox {
    /// The sandbox of a VMM that still runs, after whoever started it
    /// restarted.
    pub fn adopt(
        pid: u32,
        vsock: &Path,
        console: &Path,
        patience: Duration,
    ) -> Result<Sandbox, BootError> {
        Booting {
            pid,
            vsock: vsock.to_path_buf(),
            console: console.to_path_buf(),
        }
        .connect(patience)
    }

    pub fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the VMM still runs (a guest that crashed, or a VMM that was
    /// killed, takes every container with it).
    pub fn is_alive(&self) -> bool {
        is_our_vmm(self.pid, &self.vsock)
    }

    /// `error` of a call to this guest, with its console's last lines.
    pub fn failure(&self, error: GuestError) -> BootError {
        BootError {
            error,
            vmm_ended: !self.is_alive(),
            console: console_tail(&self.console),
        }
    }

    /// Stops the containers (SIGTERM, then SIGKILL after `grace`) and
    /// powers the VM off; a VMM still there [`POWER_OFF_MARGIN`] later is
    /// killed. Returns once the VMM is gone or killed.
    pub fn shutdown(&self, grace: Duration) -> Result<(), GuestError> {
        // An error may only mean the guest powered off before it
        // answered: the VMM gets its time either way.
        let asked = self.guest.shutdown(grace);
        stop(self.pid, &self.vsock, grace + POWER_OFF_MARGIN);
        asked
    }
}

/// Waits up to `within` for the VMM `pid` serving `vsock` to exit, then
/// kills it if it still runs.
pub fn stop(pid: u32, vsock: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while is_our_vmm(pid, vsock) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if is_our_vmm(pid, vsock) {
        kill(pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_that_never_answers_is_a_boot_error_with_the_console() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, "early line\nKernel panic - not syncing\n").unwrap();
        let booting = Booting {
            pid: u32::MAX,
            vsock: dir.path().join("nothing.sock"),
            console,
        };
        let err = booting.connect(Duration::from_millis(200)).err().unwrap();
        assert!(err.console.ends_with("Kernel panic - not syncing"), "{err}");
        assert!(err.to_string().contains("; console:\nearly line"), "{err}");
        // No process has that PID: the VMM is told to have ended.
        assert!(err.vmm_ended);
        assert!(
            err.to_string()
                .starts_with("its VMM ended before the guest answered: "),
            "{err}"
        );
    }

    #[test]
    fn stopping_a_vmm_that_is_gone_returns_at_once() {
        let began = Instant::now();
        stop(
            u32::MAX,
            Path::new("/run/none/v.sock"),
            Duration::from_secs(30),
        );
        assert!(began.elapsed() < Duration::from_secs(1));
    }
}
