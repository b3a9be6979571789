//! A group's lifecycle as one state machine: [`Lifecycle::apply`] is the
//! only place a group's or a container's status changes, it decides
//! whether a transition is allowed, and it says which events the change
//! makes. It is pure (no VM, no disk, no clock), so every transition is
//! tested here.

use capsa_api::{ContainerStatus, GroupStatus};

use crate::state::GroupRecord;

/// How a container's process ended, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The VMM was started: the group runs, its containers are about to
    /// be created.
    Boot {
        vmm_pid: u32,
        at: u64,
        /// The template the VM was restored from, if it was.
        template: Option<String>,
    },
    /// A container's process runs (again, by the restart policy, when it
    /// had exited in this boot).
    ContainerStarted {
        name: String,
        at: u64,
    },
    ContainerExited {
        name: String,
        exit: Exit,
        at: u64,
    },
    /// An init container ran to its end at this start.
    InitExited {
        name: String,
        exit: Exit,
        started_at: u64,
        at: u64,
    },
    /// A readiness probe's verdict on the run of `name` that started at
    /// `started_at` (a verdict on an earlier run is refused).
    Readiness {
        name: String,
        started_at: u64,
        ready: bool,
    },
    /// The daemon itself is stopping the VM: its end is no failure.
    Stop,
    /// The VM is gone after the daemon stopped it.
    Stopped,
    /// The group cannot go on (its start failed, or its VMM was lost).
    Fail {
        error: String,
    },
    /// The VMM process ended: as asked while stopping, else a failure.
    VmmExited {
        how: String,
        console: String,
    },
    /// The restart policy boots a failed group again.
    Restarting,
    /// A problem worth showing that changes no status.
    Note {
        error: String,
    },
    /// The group is being deleted: nothing of it is saved any more.
    Delete,
}

/// An event a transition makes, for the group it happened to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub container: Option<String>,
    pub action: &'static str,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("group {group:?} is already running")]
    AlreadyRunning { group: String },
    #[error("group {group:?} is {status}, not running")]
    NotRunning { group: String, status: &'static str },
    #[error("group {group:?} is {status}, not failed")]
    NotFailed { group: String, status: &'static str },
    #[error("no container {container:?} in {group:?}")]
    NoContainer { group: String, container: String },
    #[error("container {group}/{container} is {status}")]
    Container {
        group: String,
        container: String,
        status: &'static str,
    },
    #[error("group {group:?} is being deleted")]
    Deleted { group: String },
}

pub fn group_word(status: GroupStatus) -> &'static str {
    match status {
        GroupStatus::Created => "created",
        GroupStatus::Running => "running",
        GroupStatus::Stopped => "stopped",
        GroupStatus::Failed => "failed",
    }
}

fn container_word(status: ContainerStatus) -> &'static str {
    match status {
        ContainerStatus::Created => "created",
        ContainerStatus::Running => "running",
        ContainerStatus::Exited => "exited",
    }
}

/// A group's record and the flags that live only as long as the daemon.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    record: GroupRecord,
    stopping: bool,
    deleted: bool,
}

impl Lifecycle {
    pub fn new(record: GroupRecord) -> Self {
        Lifecycle {
            record,
            stopping: false,
            deleted: false,
        }
    }

    pub fn record(&self) -> &GroupRecord {
        &self.record
    }

    /// Whether the daemon is stopping (or deleting) the group.
    pub fn stopping(&self) -> bool {
        self.stopping || self.deleted
    }

    pub fn deleted(&self) -> bool {
        self.deleted
    }

    /// Applies `transition` when the group's state allows it, and returns
    /// the events it makes; a refused transition changes nothing.
    pub fn apply(&mut self, transition: Transition) -> Result<Vec<Announcement>, Refused> {
        let mut next = self.record.clone();
        let mut announce = Vec::new();
        let status = next.status;
        let group = next.spec.name.clone();
        let not_running = || Refused::NotRunning {
            group: group.clone(),
            status: group_word(status),
        };
        // A group being deleted stays until its files are gone, and is
        // neither started again nor deleted twice meanwhile.
        if self.deleted
            && matches!(
                transition,
                Transition::Boot { .. } | Transition::Restarting | Transition::Delete
            )
        {
            return Err(Refused::Deleted { group });
        }
        match transition {
            Transition::Boot {
                vmm_pid,
                at,
                template,
            } => {
                if status == GroupStatus::Running {
                    return Err(Refused::AlreadyRunning { group });
                }
                next.status = GroupStatus::Running;
                next.error = None;
                next.vmm_pid = Some(vmm_pid);
                next.started_at = Some(at);
                next.template = template;
                for c in next.containers.iter_mut().chain(&mut next.init_containers) {
                    c.status = ContainerStatus::Created;
                    c.exit_code = None;
                    c.signal = None;
                    c.oom_killed = false;
                    c.started_at = None;
                    c.finished_at = None;
                }
                self.stopping = false;
            }
            Transition::ContainerStarted { name, at } => {
                if status != GroupStatus::Running {
                    return Err(not_running());
                }
                let probed = next
                    .spec
                    .containers
                    .iter()
                    .any(|c| c.name == name && c.readiness_probe.is_some());
                let c = container(&mut next, &name)?;
                let restarted = match c.status {
                    ContainerStatus::Created => false,
                    ContainerStatus::Exited => true,
                    ContainerStatus::Running => {
                        return Err(Refused::Container {
                            group,
                            container: name,
                            status: "already running",
                        })
                    }
                };
                c.status = ContainerStatus::Running;
                c.started_at = Some(at);
                // Ready at once unless a readiness probe is to say so.
                c.ready = !probed;
                c.exit_code = None;
                c.signal = None;
                c.oom_killed = false;
                c.finished_at = None;
                if restarted {
                    c.restart_count += 1;
                    announce.push(Announcement {
                        container: Some(name),
                        action: "restarted",
                        detail: Some(format!("restart {}", c.restart_count)),
                    });
                }
            }
            Transition::ContainerExited { name, exit, at } => {
                let c = container(&mut next, &name)?;
                if c.status != ContainerStatus::Running {
                    return Err(Refused::Container {
                        group,
                        container: name,
                        status: container_word(c.status),
                    });
                }
                c.status = ContainerStatus::Exited;
                c.ready = false;
                c.exit_code = Some(exit.code);
                c.signal = exit.signal;
                c.oom_killed = exit.oom_killed;
                c.finished_at = Some(at);
            }
            Transition::InitExited {
                name,
                exit,
                started_at,
                at,
            } => {
                if status != GroupStatus::Running {
                    return Err(not_running());
                }
                let Some(c) = next.init_containers.iter_mut().find(|c| c.name == name) else {
                    return Err(Refused::NoContainer {
                        group,
                        container: name,
                    });
                };
                c.status = ContainerStatus::Exited;
                c.started_at = Some(started_at);
                c.exit_code = Some(exit.code);
                c.signal = exit.signal;
                c.oom_killed = exit.oom_killed;
                c.finished_at = Some(at);
                announce.push(Announcement {
                    container: Some(name),
                    action: "init-exited",
                    detail: Some(format!("exit {}", exit.code)),
                });
            }
            Transition::Readiness {
                name,
                started_at,
                ready,
            } => {
                let c = container(&mut next, &name)?;
                if c.status != ContainerStatus::Running || c.started_at != Some(started_at) {
                    return Err(Refused::Container {
                        group,
                        container: name,
                        status: "not in that run any more",
                    });
                }
                if c.ready != ready {
                    c.ready = ready;
                    announce.push(Announcement {
                        container: Some(name),
                        action: if ready { "ready" } else { "unready" },
                        detail: None,
                    });
                }
            }
            Transition::Stop => self.stopping = true,
            Transition::Stopped => {
                if status == GroupStatus::Running {
                    next.status = GroupStatus::Stopped;
                }
                next.vmm_pid = None;
            }
            Transition::Fail { error } => {
                if status != GroupStatus::Running {
                    return Err(not_running());
                }
                next.status = GroupStatus::Failed;
                next.error = Some(error);
                next.vmm_pid = None;
            }
            Transition::VmmExited { how, console } => {
                if status != GroupStatus::Running {
                    return Err(not_running());
                }
                next.vmm_pid = None;
                if self.stopping() {
                    next.status = GroupStatus::Stopped;
                } else {
                    next.status = GroupStatus::Failed;
                    next.error = Some(format!("the VMM exited ({how}); console:\n{console}"));
                }
            }
            Transition::Restarting => {
                if status != GroupStatus::Failed {
                    return Err(Refused::NotFailed {
                        group,
                        status: group_word(status),
                    });
                }
                next.restart_count += 1;
                announce.push(Announcement {
                    container: None,
                    action: "restarted",
                    detail: next.error.clone(),
                });
            }
            Transition::Note { error } => next.error = Some(error),
            Transition::Delete => {
                self.deleted = true;
                self.stopping = true;
            }
        }
        let mut events = self.changes_to(&next);
        events.extend(announce);
        self.record = next;
        Ok(events)
    }

    /// The events of going from the current record to `next`: the
    /// group's status, containers that started or exited.
    fn changes_to(&self, next: &GroupRecord) -> Vec<Announcement> {
        let before = &self.record;
        let mut events = Vec::new();
        if before.status != next.status {
            events.push(Announcement {
                container: None,
                action: match next.status {
                    GroupStatus::Running => "started",
                    GroupStatus::Stopped => "stopped",
                    GroupStatus::Failed => "failed",
                    GroupStatus::Created => "created",
                },
                detail: next.error.clone(),
            });
        }
        for (old, new) in before.containers.iter().zip(&next.containers) {
            if old.status == new.status {
                continue;
            }
            let (action, detail) = match new.status {
                ContainerStatus::Running => ("started", None),
                ContainerStatus::Exited => {
                    ("died", new.exit_code.map(|c| format!("exit code {c}")))
                }
                ContainerStatus::Created => continue,
            };
            events.push(Announcement {
                container: Some(new.name.clone()),
                action,
                detail,
            });
        }
        events
    }
}

fn container<'a>(
    record: &'a mut GroupRecord,
    name: &str,
) -> Result<&'a mut crate::state::ContainerRecord, Refused> {
    let group = record.spec.name.clone();
    record
        .container_mut(name)
        .ok_or_else(|| Refused::NoContainer {
            group,
            container: name.to_string(),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use capsa_api::GroupSpec;

    pub fn record(restart_policy: &str) -> GroupRecord {
        let spec = GroupSpec::parse(&format!(
            r#"{{"name":"g","restartPolicy":"{restart_policy}",
                "containers":[{{"name":"a","image":"busybox"}},{{"name":"b","image":"busybox"}}]}}"#
        ))
        .unwrap();
        GroupRecord::new(spec)
    }

    fn actions(events: &[Announcement]) -> Vec<(Option<&str>, &str)> {
        events
            .iter()
            .map(|e| (e.container.as_deref(), e.action))
            .collect()
    }

    const EXIT_0: Exit = Exit {
        code: 0,
        signal: None,
        oom_killed: false,
    };

    fn started(name: &str) -> Transition {
        Transition::ContainerStarted {
            name: name.into(),
            at: 20,
        }
    }

    fn exited(name: &str, code: i32) -> Transition {
        Transition::ContainerExited {
            name: name.into(),
            exit: Exit { code, ..EXIT_0 },
            at: 30,
        }
    }

    fn booted() -> Lifecycle {
        let mut life = Lifecycle::new(record("Never"));
        life.apply(Transition::Boot {
            vmm_pid: 7,
            at: 10,
            template: None,
        })
        .unwrap();
        life
    }

    #[test]
    fn boot_runs_a_created_stopped_or_failed_group_and_resets_its_containers() {
        let mut life = Lifecycle::new(record("Never"));
        let events = life
            .apply(Transition::Boot {
                vmm_pid: 7,
                at: 10,
                template: None,
            })
            .unwrap();
        assert_eq!(actions(&events), [(None, "started")]);
        let r = life.record();
        assert_eq!(
            (r.status, r.vmm_pid, r.started_at),
            (GroupStatus::Running, Some(7), Some(10))
        );
        assert_eq!(
            life.apply(Transition::Boot {
                vmm_pid: 8,
                at: 11,
                template: None,
            }),
            Err(Refused::AlreadyRunning { group: "g".into() })
        );
        life.apply(started("a")).unwrap();
        life.apply(exited("a", 3)).unwrap();
        life.apply(Transition::Stop).unwrap();
        life.apply(Transition::Stopped).unwrap();
        assert_eq!(life.record().status, GroupStatus::Stopped);
        assert!(life.stopping());
        life.apply(Transition::Boot {
            vmm_pid: 9,
            at: 12,
            template: None,
        })
        .unwrap();
        assert!(!life.stopping(), "a new boot is not being stopped");
        let a = &life.record().containers[0];
        assert_eq!((a.status, a.exit_code), (ContainerStatus::Created, None));
        life.apply(Transition::Fail {
            error: "boom".into(),
        })
        .unwrap();
        life.apply(Transition::Boot {
            vmm_pid: 10,
            at: 13,
            template: None,
        })
        .unwrap();
        assert_eq!(life.record().error, None, "a new boot clears the old error");
    }

    #[test]
    fn containers_start_only_in_a_running_group_and_not_twice() {
        let mut life = Lifecycle::new(record("Never"));
        assert!(matches!(
            life.apply(started("a")),
            Err(Refused::NotRunning { .. })
        ));
        let mut life = booted();
        assert_eq!(
            actions(&life.apply(started("a")).unwrap()),
            [(Some("a"), "started")]
        );
        assert!(matches!(
            life.apply(started("a")),
            Err(Refused::Container { .. })
        ));
        assert!(matches!(
            life.apply(started("zz")),
            Err(Refused::NoContainer { .. })
        ));
        assert_eq!(life.record().containers[0].started_at, Some(20));
    }

    #[test]
    fn an_exit_is_recorded_once_with_its_code_and_a_restart_counts() {
        let mut life = booted();
        assert!(matches!(
            life.apply(exited("a", 1)),
            Err(Refused::Container { .. })
        ));
        life.apply(started("a")).unwrap();
        let events = life.apply(exited("a", 1)).unwrap();
        assert_eq!(events[0].action, "died");
        assert_eq!(events[0].detail.as_deref(), Some("exit code 1"));
        assert!(matches!(
            life.apply(exited("a", 1)),
            Err(Refused::Container { .. })
        ));
        let a = &life.record().containers[0];
        assert_eq!(
            (a.status, a.exit_code, a.finished_at),
            (ContainerStatus::Exited, Some(1), Some(30))
        );
        let events = life.apply(started("a")).unwrap();
        assert_eq!(
            actions(&events),
            [(Some("a"), "started"), (Some("a"), "restarted")]
        );
        assert_eq!(events[1].detail.as_deref(), Some("restart 1"));
        let a = &life.record().containers[0];
        assert_eq!((a.restart_count, a.exit_code), (1, None));
    }

    #[test]
    fn a_vmm_exit_is_a_stop_when_asked_for_and_a_failure_otherwise() {
        let mut life = booted();
        let how = || Transition::VmmExited {
            how: "signal 9".into(),
            console: "oops".into(),
        };
        let events = life.apply(how()).unwrap();
        assert_eq!(actions(&events), [(None, "failed")]);
        let r = life.record();
        assert_eq!((r.status, r.vmm_pid), (GroupStatus::Failed, None));
        assert_eq!(
            r.error.as_deref(),
            Some("the VMM exited (signal 9); console:\noops")
        );
        assert!(
            matches!(life.apply(how()), Err(Refused::NotRunning { .. })),
            "only once"
        );

        let mut life = booted();
        life.apply(Transition::Stop).unwrap();
        assert_eq!(actions(&life.apply(how()).unwrap()), [(None, "stopped")]);
        assert_eq!(life.record().error, None);
    }

    #[test]
    fn stopped_clears_the_vmm_in_any_state_and_stops_only_a_running_group() {
        let mut life = Lifecycle::new(record("Never"));
        assert!(life.apply(Transition::Stopped).unwrap().is_empty());
        assert_eq!(life.record().status, GroupStatus::Created);
        let mut life = booted();
        assert_eq!(
            actions(&life.apply(Transition::Stopped).unwrap()),
            [(None, "stopped")]
        );
        assert_eq!(life.record().vmm_pid, None);
    }

    #[test]
    fn failing_needs_a_running_group() {
        let mut life = Lifecycle::new(record("Never"));
        let fail = || Transition::Fail { error: "no".into() };
        assert!(matches!(
            life.apply(fail()),
            Err(Refused::NotRunning { .. })
        ));
        let mut life = booted();
        assert_eq!(actions(&life.apply(fail()).unwrap()), [(None, "failed")]);
        assert_eq!(life.record().error.as_deref(), Some("no"));
    }

    #[test]
    fn only_a_failed_group_restarts_and_each_restart_counts() {
        let mut life = booted();
        assert!(matches!(
            life.apply(Transition::Restarting),
            Err(Refused::NotFailed { .. })
        ));
        life.apply(Transition::Fail {
            error: "crashed".into(),
        })
        .unwrap();
        let events = life.apply(Transition::Restarting).unwrap();
        assert_eq!(actions(&events), [(None, "restarted")]);
        assert_eq!(events[0].detail.as_deref(), Some("crashed"));
        life.apply(Transition::Restarting).unwrap();
        assert_eq!(life.record().restart_count, 2);
    }

    #[test]
    fn notes_and_deletion_change_no_status() {
        let mut life = booted();
        let events = life
            .apply(Transition::Note {
                error: "port".into(),
            })
            .unwrap();
        assert!(events.is_empty());
        assert_eq!(life.record().error.as_deref(), Some("port"));
        assert!(!life.deleted());
        life.apply(Transition::Delete).unwrap();
        assert!(life.deleted() && life.stopping());
        assert_eq!(life.record().status, GroupStatus::Running);
        for again in [
            Transition::Delete,
            Transition::Restarting,
            Transition::Boot {
                vmm_pid: 3,
                at: 4,
                template: None,
            },
        ] {
            assert!(
                matches!(life.apply(again), Err(Refused::Deleted { .. })),
                "a group being deleted is left to its deletion"
            );
        }
    }

    #[test]
    fn a_refused_transition_changes_nothing() {
        let mut life = booted();
        life.apply(started("a")).unwrap();
        let before = life.record().clone();
        assert!(life.apply(started("a")).is_err());
        assert!(life
            .apply(Transition::Boot {
                vmm_pid: 1,
                at: 1,
                template: None,
            })
            .is_err());
        assert_eq!(format!("{:?}", life.record()), format!("{before:?}"));
    }

    #[test]
    fn readiness_follows_the_probe_of_the_run_it_watches() {
        let spec = GroupSpec::parse(
            r#"{"name":"g","containers":[
                {"name":"a","image":"busybox","readinessProbe":{"exec":{"command":["true"]}}},
                {"name":"b","image":"busybox"}]}"#,
        )
        .unwrap();
        let mut life = Lifecycle::new(GroupRecord::new(spec));
        life.apply(Transition::Boot {
            vmm_pid: 7,
            at: 10,
            template: None,
        })
        .unwrap();
        life.apply(started("a")).unwrap();
        life.apply(started("b")).unwrap();
        let ready = |life: &Lifecycle, name: &str| {
            life.record()
                .containers
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.ready)
        };
        // Without a probe, running is ready; with one, not until it says.
        assert_eq!(
            (ready(&life, "a"), ready(&life, "b")),
            (Some(false), Some(true))
        );
        let verdict = |ready: bool, started_at: u64| Transition::Readiness {
            name: "a".into(),
            started_at,
            ready,
        };
        let events = life.apply(verdict(true, 20)).unwrap();
        assert_eq!(actions(&events), [(Some("a"), "ready")]);
        assert!(life.apply(verdict(true, 20)).unwrap().is_empty());
        // A verdict on another run is refused.
        assert!(life.apply(verdict(false, 19)).is_err());
        let events = life.apply(verdict(false, 20)).unwrap();
        assert_eq!(actions(&events), [(Some("a"), "unready")]);
        life.apply(verdict(true, 20)).unwrap();
        life.apply(exited("a", 0)).unwrap();
        assert_eq!(ready(&life, "a"), Some(false));
        assert!(life.apply(verdict(true, 20)).is_err());
    }

    #[test]
    fn init_containers_are_recorded_apart_and_reset_at_each_boot() {
        let spec = GroupSpec::parse(
            r#"{"name":"g","initContainers":[{"name":"setup","image":"busybox"}],
                "containers":[{"name":"a","image":"busybox"}]}"#,
        )
        .unwrap();
        let mut life = Lifecycle::new(GroupRecord::new(spec));
        let init_exit = |code| Transition::InitExited {
            name: "setup".into(),
            exit: Exit { code, ..EXIT_0 },
            started_at: 11,
            at: 12,
        };
        // Not while the group does not run.
        assert!(life.apply(init_exit(0)).is_err());
        life.apply(Transition::Boot {
            vmm_pid: 7,
            at: 10,
            template: None,
        })
        .unwrap();
        let events = life.apply(init_exit(3)).unwrap();
        assert_eq!(actions(&events), [(Some("setup"), "init-exited")]);
        let setup = &life.record().init_containers[0];
        assert_eq!(
            (setup.status, setup.exit_code),
            (ContainerStatus::Exited, Some(3))
        );
        // An init container is none of the group's containers.
        assert_eq!(life.record().containers.len(), 1);
        assert!(life
            .apply(Transition::InitExited {
                name: "a".into(),
                exit: EXIT_0,
                started_at: 1,
                at: 2
            })
            .is_err());
        life.apply(Transition::Fail {
            error: "init failed".into(),
        })
        .unwrap();
        life.apply(Transition::Boot {
            vmm_pid: 8,
            at: 20,
            template: None,
        })
        .unwrap();
        let setup = &life.record().init_containers[0];
        assert_eq!(
            (setup.status, setup.exit_code),
            (ContainerStatus::Created, None)
        );
    }
}
