//! The restart policy: what happens after a container exits (started
//! again after a back-off, or the VM stopped once every container has
//! exited for good), and a failed group booted again.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use capsa_api::{ContainerStatus, GroupStatus, RestartPolicy};
use capsa_guest_client::Guest;

use super::lifecycle::{Exit, Transition};
use super::{start, Daemon, Group};
use crate::state::{now_ms, GroupRecord};

/// What follows a container's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Start it again after this back-off.
    Restart(Duration),
    /// Every container has exited for good: the VM can go.
    StopVm,
    /// Others still run.
    Nothing,
}

/// Decides what follows the exit of `name`, as `record` has it after the
/// exit was recorded; `stopping` is whether the daemon is stopping the
/// group (nothing restarts then).
pub fn after_exit(record: &GroupRecord, name: &str, stopping: bool) -> AfterExit {
    let Some(container) = record.containers.iter().find(|c| c.name == name) else {
        return AfterExit::Nothing;
    };
    let code = container.exit_code.unwrap_or(-1);
    if !stopping && record.spec.restart_policy.restarts(code, container.signal) {
        let last_run = container
            .started_at
            .zip(container.finished_at)
            .map(|(start, end)| Duration::from_millis(end.saturating_sub(start)));
        return AfterExit::Restart(backoff(container.restart_count, last_run));
    }
    if record
        .containers
        .iter()
        .all(|c| c.status == ContainerStatus::Exited)
    {
        AfterExit::StopVm
    } else {
        AfterExit::Nothing
    }
}

/// How long before a failed group is booted again; None when its policy
/// never restarts.
pub fn group_restart_delay(record: &GroupRecord) -> Option<Duration> {
    (record.spec.restart_policy != RestartPolicy::Never)
        .then(|| backoff(record.restart_count, None))
}

/// How long the restart policy waits before the next restart: doubling
/// from one second up to a minute, and one second again after a run of
/// ten minutes or more.
pub fn backoff(restarts: u32, last_run: Option<Duration>) -> Duration {
    if last_run.is_some_and(|run| run >= Duration::from_secs(600)) {
        return Duration::from_secs(1);
    }
    Duration::from_secs(1u64 << restarts.min(6)).min(Duration::from_secs(60))
}

/// Waits for a container's exit (after its output reached the log),
/// starts it again when the restart policy says so, and stops the VM once
/// every container has exited for good.
pub(super) fn watch_container(
    daemon: Arc<Daemon>,
    group: Arc<Group>,
    guest: Arc<Guest>,
    name: String,
    copiers: Vec<JoinHandle<()>>,
) {
    std::thread::spawn(move || {
        let mut copiers = copiers;
        loop {
            let exit = guest.wait(&name, "");
            for copier in copiers.drain(..) {
                let _ = copier.join();
            }
            let exit = match exit {
                Ok(exit) => exit,
                // The VM went away; vm_exited records that.
                Err(_) => return,
            };
            let recorded = group.transition(Transition::ContainerExited {
                name: name.clone(),
                exit: Exit {
                    code: exit.code,
                    signal: (exit.signal != 0).then_some(exit.signal),
                    oom_killed: exit.oom_killed,
                },
                at: now_ms(),
            });
            let Ok(record) = recorded else { return };
            match after_exit(&record, &name, group.is_stopping()) {
                AfterExit::Restart(delay) => {
                    if !group.pause(delay) {
                        // Stopped or deleted meanwhile.
                        return;
                    }
                    match relaunch(&daemon, &group, &guest, &record, &name) {
                        Ok(restarted) => {
                            copiers = restarted;
                            continue;
                        }
                        Err(message) => {
                            tracing::warn!("restarting {}/{name}: {message}", record.spec.name);
                            let _ = group.transition(Transition::Note {
                                error: format!("restarting {name}: {message}"),
                            });
                        }
                    }
                    // A container that cannot restart is over: the VM
                    // goes when the others are too.
                    if after_exit(&group.snapshot(), &name, true) == AfterExit::StopVm {
                        start::stop_vm(&group, Duration::from_secs(2));
                    }
                }
                AfterExit::StopVm => start::stop_vm(&group, Duration::from_secs(2)),
                AfterExit::Nothing => {}
            }
            return;
        }
    });
}

/// Creates the exited container `name` again in the guest.
fn relaunch(
    daemon: &Daemon,
    group: &Arc<Group>,
    guest: &Arc<Guest>,
    record: &GroupRecord,
    name: &str,
) -> Result<Vec<JoinHandle<()>>, String> {
    let spec = record
        .spec
        .containers
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("no container {name:?} in the spec"))?;
    // The exited container's state goes; its log stays.
    let _ = guest.delete(name);
    daemon
        .launch(group, guest, spec, &mut |_| {})
        .map_err(|e| e.message)
}

/// The VM of an auto-removed group is gone: the group is deleted once no
/// client holds it (they get their answers first), unless it was started
/// again meanwhile.
pub(super) fn remove_when_unheld(daemon: &Arc<Daemon>, group: &Arc<Group>) {
    let (daemon, group) = (daemon.clone(), group.clone());
    std::thread::spawn(move || {
        group.wait_unheld();
        let name = group.name();
        // Started again, or deleted and its name taken by another group.
        let same = daemon
            .group(&name)
            .is_ok_and(|now| Arc::ptr_eq(&now, &group));
        if !same || !group.is_over() {
            return;
        }
        match daemon.delete(&name) {
            Ok(()) => {}
            // Deleted, or being deleted, by a client meanwhile.
            Err(e)
                if matches!(
                    e.code,
                    capsa_api::ErrorCode::NotFound | capsa_api::ErrorCode::Conflict
                ) => {}
            Err(e) => tracing::warn!("removing group {name}: {}", e.message),
        }
    });
}

/// The VM failed: under a restart policy other than Never, boot the group
/// again after the back-off (again and again while it keeps failing).
pub(super) fn restart_failed_group(daemon: &Arc<Daemon>, group: &Arc<Group>) {
    let Some(delay) = group_restart_delay(&group.snapshot()) else {
        return;
    };
    let (daemon, group) = (daemon.clone(), group.clone());
    std::thread::spawn(move || {
        if !group.pause(delay) {
            return;
        }
        // Started, stopped or deleted meanwhile: nothing to restart.
        let Ok(record) = group.transition(Transition::Restarting) else {
            return;
        };
        let name = record.spec.name.clone();
        if let Err(e) = daemon.start(&name, &mut |_| {}) {
            tracing::warn!("restarting group {name}: {}", e.message);
            if group.snapshot().status == GroupStatus::Failed {
                restart_failed_group(&daemon, &group);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::lifecycle::tests::record;
    use crate::groups::lifecycle::Lifecycle;

    fn exit(code: i32) -> Exit {
        Exit {
            code,
            signal: None,
            oom_killed: false,
        }
    }

    /// A booted group of two containers under `policy`, both started at
    /// 1000 ms, and `a` exited with `code` after `ran_ms`.
    fn after(policy: &str, code: i32, ran_ms: u64, b_running: bool) -> Lifecycle {
        let mut life = Lifecycle::new(record(policy));
        life.apply(Transition::Boot {
            vmm_pid: 1,
            at: 0,
            template: None,
        })
        .unwrap();
        for name in ["a", "b"] {
            life.apply(Transition::ContainerStarted {
                name: name.into(),
                at: 1000,
            })
            .unwrap();
        }
        if !b_running {
            life.apply(Transition::ContainerExited {
                name: "b".into(),
                exit: exit(0),
                at: 1000,
            })
            .unwrap();
        }
        life.apply(Transition::ContainerExited {
            name: "a".into(),
            exit: exit(code),
            at: 1000 + ran_ms,
        })
        .unwrap();
        life
    }

    #[test]
    fn back_off_doubles_to_a_minute_and_resets_after_a_long_run() {
        let seconds = |restarts, run| backoff(restarts, run).as_secs();
        assert_eq!(
            (0..8).map(|n| seconds(n, None)).collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 32, 60, 60]
        );
        assert_eq!(seconds(30, Some(Duration::from_secs(5))), 60);
        assert_eq!(seconds(30, Some(Duration::from_secs(600))), 1);
    }

    #[test]
    fn never_stops_the_vm_once_every_container_is_done() {
        let life = after("Never", 1, 10, true);
        assert_eq!(after_exit(life.record(), "a", false), AfterExit::Nothing);
        let life = after("Never", 1, 10, false);
        assert_eq!(after_exit(life.record(), "a", false), AfterExit::StopVm);
    }

    #[test]
    fn on_failure_restarts_failures_only() {
        let life = after("OnFailure", 1, 10, false);
        assert_eq!(
            after_exit(life.record(), "a", false),
            AfterExit::Restart(Duration::from_secs(1))
        );
        let life = after("OnFailure", 0, 10, false);
        assert_eq!(after_exit(life.record(), "a", false), AfterExit::StopVm);
    }

    #[test]
    fn always_restarts_with_a_growing_back_off_unless_stopping() {
        let mut life = after("Always", 0, 10, true);
        assert_eq!(
            after_exit(life.record(), "a", false),
            AfterExit::Restart(Duration::from_secs(1))
        );
        for _ in 0..3 {
            life.apply(Transition::ContainerStarted {
                name: "a".into(),
                at: 2000,
            })
            .unwrap();
            life.apply(Transition::ContainerExited {
                name: "a".into(),
                exit: exit(0),
                at: 2010,
            })
            .unwrap();
        }
        assert_eq!(
            after_exit(life.record(), "a", false),
            AfterExit::Restart(Duration::from_secs(8))
        );
        assert_eq!(after_exit(life.record(), "a", true), AfterExit::Nothing);
        // A run of ten minutes starts the back-off over.
        let life = after("Always", 0, 600_000, true);
        assert_eq!(
            after_exit(life.record(), "a", false),
            AfterExit::Restart(Duration::from_secs(1))
        );
    }

    #[test]
    fn failed_groups_restart_unless_the_policy_is_never() {
        let mut life = after("OnFailure", 1, 10, true);
        assert_eq!(
            group_restart_delay(life.record()),
            Some(Duration::from_secs(1))
        );
        life.apply(Transition::Fail { error: "x".into() }).unwrap();
        life.apply(Transition::Restarting).unwrap();
        life.apply(Transition::Restarting).unwrap();
        assert_eq!(
            group_restart_delay(life.record()),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            group_restart_delay(after("Never", 1, 10, true).record()),
            None
        );
    }
}
