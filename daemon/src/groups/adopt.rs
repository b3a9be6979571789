//! After a daemon restart: the groups on disk are loaded again, and those
//! whose VMM still runs are adopted (their containers' output and exits
//! watched again); the others are marked failed.

use std::sync::Arc;
use std::time::Duration;

use capsa_api::{ContainerStatus, GroupStatus};
use capsa_vm_process::{self as vm, sandbox::Sandbox};

use super::lifecycle::Transition;
use super::{restart, start, Daemon, Group};
use crate::state::{self, GroupRecord};

/// What a restarted daemon does with a group it finds on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// Not running: nothing to watch.
    Idle,
    /// It ran, but its VMM is gone.
    Lost,
    /// Its VMM still runs: watch it, and these containers in it.
    Watch {
        vmm_pid: u32,
        containers: Vec<String>,
    },
}

/// Decides a found group's fate; `alive` says whether a PID is still the
/// group's VMM.
pub fn adoption(record: &GroupRecord, alive: impl Fn(u32) -> bool) -> Adoption {
    if record.status != GroupStatus::Running {
        return Adoption::Idle;
    }
    match record.vmm_pid {
        Some(pid) if alive(pid) => Adoption::Watch {
            vmm_pid: pid,
            containers: record
                .containers
                .iter()
                .filter(|c| c.status == ContainerStatus::Running)
                .map(|c| c.name.clone())
                .collect(),
        },
        _ => Adoption::Lost,
    }
}

impl Daemon {
    /// Loads the groups on disk, then adopts those whose VMM still runs,
    /// each in the background: a guest that does not answer delays no
    /// one, the API included.
    pub fn restore(self: &Arc<Self>) {
        let records: Vec<_> = state::load_all(&self.root)
            .into_iter()
            .filter_map(|(paths, record)| match record {
                Ok(record) => Some((paths, record)),
                Err(e) => {
                    tracing::warn!("skipping {}: {e:#}", paths.dir.display());
                    None
                }
            })
            .collect();
        let mut used: Vec<u32> = records.iter().filter_map(|(_, r)| r.jail_id).collect();
        for (paths, mut record) in records {
            // Groups an older capsad made get their jail ids now.
            if let (Some(ids), None) = (self.settings.jail_ids, record.jail_id) {
                record.jail_id = ids.lowest_free(used.iter().copied());
                used.extend(record.jail_id);
                if let Err(e) = state::save(&paths, &record) {
                    tracing::warn!("saving group {}: {e:#}", record.spec.name);
                }
            }
            let name = record.spec.name.clone();
            let group = self.new_group(paths, record);
            if let Err(e) = self.connect(&group) {
                tracing::warn!("group {name}: {}", e.message);
                let _ = group.transition(Transition::Note { error: e.message });
            }
            self.groups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name, group.clone());
            let daemon = self.clone();
            std::thread::spawn(move || adopt(daemon, group));
        }
    }
}

fn adopt(daemon: Arc<Daemon>, group: Arc<Group>) {
    let record = group.snapshot();
    let vsock = group.paths.vsock();
    let (pid, containers) = match adoption(&record, |pid| vm::is_our_vmm(pid, &vsock)) {
        Adoption::Idle => {
            // An auto-removed group that stopped while no daemon ran.
            if record.spec.auto_remove && group.is_over() {
                restart::remove_when_unheld(&daemon, &group);
            }
            return;
        }
        Adoption::Lost => {
            let _ = group.transition(Transition::Fail {
                error: "the VMM exited while the daemon was down".into(),
            });
            if record.spec.auto_remove {
                restart::remove_when_unheld(&daemon, &group);
            }
            return;
        }
        Adoption::Watch {
            vmm_pid,
            containers,
        } => (vmm_pid, containers),
    };
    let sandbox = match Sandbox::adopt(pid, &vsock, &group.paths.console(), Duration::from_secs(10))
    {
        Ok(sandbox) => Arc::new(sandbox),
        Err(e) => {
            let error =
                format!("unresponsive: its agent did not answer after the daemon restarted: {e}");
            tracing::warn!("group {}: {error}", record.spec.name);
            let _ = group.transition(Transition::Note { error });
            return;
        }
    };
    let guest = sandbox.guest().clone();
    group.set_sandbox(sandbox);
    for name in containers {
        let copiers = record
            .spec
            .containers
            .iter()
            .find(|c| c.name == name)
            .map(|spec| start::attach_logs(&group, &guest, spec))
            .transpose()
            .unwrap_or_else(|e| {
                tracing::warn!(
                    "group {}: reattaching {name}'s output: {}",
                    record.spec.name,
                    e.message
                );
                None
            })
            .unwrap_or_default();
        restart::watch_container(daemon.clone(), group.clone(), guest.clone(), name, copiers);
    }
    // Not our child any more: poll for its end.
    let watched = group.clone();
    std::thread::spawn(move || {
        while vm::is_our_vmm(pid, &watched.paths.vsock()) {
            std::thread::sleep(Duration::from_millis(500));
        }
        start::vm_exited(&daemon, &watched, "after the daemon restarted".into());
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::lifecycle::tests::record;
    use crate::groups::lifecycle::Lifecycle;

    #[test]
    fn a_group_that_was_not_running_is_left_alone() {
        assert_eq!(adoption(&record("Never"), |_| true), Adoption::Idle);
    }

    #[test]
    fn a_running_group_whose_vmm_lives_is_watched_with_its_running_containers() {
        let mut life = Lifecycle::new(record("Never"));
        life.apply(Transition::Boot {
            vmm_pid: 42,
            at: 0,
            template: None,
        })
        .unwrap();
        life.apply(Transition::ContainerStarted {
            name: "b".into(),
            at: 1,
        })
        .unwrap();
        assert_eq!(
            adoption(life.record(), |pid| pid == 42),
            Adoption::Watch {
                vmm_pid: 42,
                containers: vec!["b".into()]
            }
        );
        assert_eq!(adoption(life.record(), |_| false), Adoption::Lost);
    }

    #[test]
    fn a_lost_group_fails_once_and_is_not_adopted_again() {
        let mut life = Lifecycle::new(record("OnFailure"));
        life.apply(Transition::Boot {
            vmm_pid: 42,
            at: 0,
            template: None,
        })
        .unwrap();
        assert_eq!(adoption(life.record(), |_| false), Adoption::Lost);
        life.apply(Transition::Fail {
            error: "the VMM exited while the daemon was down".into(),
        })
        .unwrap();
        assert_eq!(life.record().status, GroupStatus::Failed);
        assert_eq!(adoption(life.record(), |_| true), Adoption::Idle);
    }
}
