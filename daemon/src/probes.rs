//! Liveness and readiness probes: a command run in the container, or a TCP
//! connection to the group's address, every period. After
//! `failureThreshold` failures in a row a liveness probe kills the
//! container (the restart policy decides what then), and a readiness probe
//! marks it unready; one success marks it ready again.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use capsa_api::Probe;
use capsa_guest_client::{Guest, Streams};

use crate::groups::lifecycle::Transition;
use crate::groups::Group;

impl Purpose {
    fn word(self) -> &'static str {
        match self {
            Purpose::Liveness => "probe",
            Purpose::Readiness => "ready",
        }
    }
}

/// What a probe's verdict does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Liveness,
    Readiness,
}

/// Probes `container` while the run started at `started_at` lasts.
/// `process` is the container's own, for exec probes to run as.
pub fn watch(
    group: Arc<Group>,
    guest: Arc<Guest>,
    container: String,
    (probe, purpose): (Probe, Purpose),
    process: oci_spec::runtime::Process,
    started_at: u64,
) {
    std::thread::spawn(move || {
        if !group.pause(Duration::from_secs(u64::from(probe.initial_delay_seconds))) {
            return;
        }
        let mut failures = 0;
        for attempt in 0u64.. {
            if !group.runs(&container, started_at) {
                return;
            }
            let timeout = Duration::from_secs(u64::from(probe.timeout_seconds));
            let healthy = if let Some(exec) = &probe.exec {
                let mut process = process.clone();
                process.set_args(Some(exec.command.clone()));
                process.set_terminal(Some(false));
                exec_succeeds(
                    &guest,
                    &container,
                    format!("{}-{started_at}-{attempt}", purpose.word()),
                    process,
                    timeout,
                )
            } else if let (Some(tcp), Some(ip)) = (&probe.tcp_socket, group.ip()) {
                TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(ip), tcp.port), timeout)
                    .is_ok()
            } else {
                // A TCP probe without an address (--no-network) cannot fail.
                true
            };
            failures = if healthy { 0 } else { failures + 1 };
            if purpose == Purpose::Readiness {
                let verdict = if healthy {
                    Some(true)
                } else {
                    (failures >= probe.failure_threshold).then_some(false)
                };
                if let Some(ready) = verdict {
                    let noted = group.transition(Transition::Readiness {
                        name: container.clone(),
                        started_at,
                        ready,
                    });
                    // That run is over: so is its probe.
                    if noted.is_err() {
                        return;
                    }
                }
            } else if failures >= probe.failure_threshold {
                group.emit(
                    Some(&container),
                    "unhealthy",
                    Some(format!(
                        "{failures} liveness probes failed in a row: killed"
                    )),
                );
                let _ = guest.signal(&container, "", libc::SIGKILL);
                return;
            }
            if !group.pause(Duration::from_secs(u64::from(probe.period_seconds))) {
                return;
            }
        }
    });
}

/// Runs the probe's command in the container; healthy when it exits 0
/// within `timeout`.
fn exec_succeeds(
    guest: &Arc<Guest>,
    container: &str,
    exec_id: String,
    process: oci_spec::runtime::Process,
    timeout: Duration,
) -> bool {
    if guest
        .exec(container, &exec_id, &process, Streams::default())
        .is_err()
    {
        return false;
    }
    let (done, result) = channel();
    let (guest, container) = (guest.clone(), container.to_string());
    std::thread::spawn(move || {
        let _ = done.send(guest.wait(&container, &exec_id));
    });
    // A probe that hangs past its timeout counts as failed; it goes when
    // the container does.
    matches!(result.recv_timeout(timeout), Ok(Ok(exit)) if exit.code == 0 && exit.signal == 0)
}
