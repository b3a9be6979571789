//! One container group as the daemon holds it: its state behind one lock
//! (the lifecycle, the guest connection, the published ports), changed
//! only through [`Group::transition`], which saves the record and emits
//! the transition's events.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use capsa_api::{ContainerStatus, Event, GroupStatus};
use capsa_guest_client::Guest;
use capsa_vm_process::sandbox::Sandbox;

use super::lifecycle::{Lifecycle, Refused, Transition};
use crate::state::{self, now_ms, GroupPaths, GroupRecord};

pub struct Group {
    pub paths: GroupPaths,
    state: Mutex<GroupState>,
    changed: Condvar,
    events: tokio::sync::broadcast::Sender<Event>,
}

/// Everything about a group that changes, under the group's one lock.
pub struct GroupState {
    pub life: Lifecycle,
    /// The VM and its agent's connection while it runs.
    pub sandbox: Option<Arc<Sandbox>>,
    /// The group's published ports, open while it exists.
    pub published: Vec<capsa_network::Published>,
    /// Clients waiting on it (see [`Hold`]): an auto-removed group goes
    /// once there are none.
    holds: usize,
    /// The input of each container that keeps it open (`stdin` in its
    /// spec), while it runs; None once a client ended it.
    pub stdin: std::collections::HashMap<String, ContainerInput>,
}

/// A container's standard input, written by one attached client at a time.
pub type ContainerInput = Arc<Mutex<Option<std::os::unix::net::UnixStream>>>;

/// A client waiting on a group (for a container's exit, or following its
/// output): while one is held, an auto-removed group that has stopped is
/// kept, so that the client gets its answer. Dropped when the client has
/// it or is gone.
pub struct Hold(Arc<Group>);

impl Drop for Hold {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.holds = state.holds.saturating_sub(1);
        drop(state);
        self.0.changed.notify_all();
    }
}

impl Group {
    pub fn new(
        paths: GroupPaths,
        record: GroupRecord,
        events: tokio::sync::broadcast::Sender<Event>,
    ) -> Arc<Self> {
        Arc::new(Group {
            paths,
            state: Mutex::new(GroupState {
                life: Lifecycle::new(record),
                sandbox: None,
                published: Vec::new(),
                holds: 0,
                stdin: std::collections::HashMap::new(),
            }),
            changed: Condvar::new(),
            events,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `transition`; when allowed, the record is saved (unless the
    /// group is being deleted), its events are sent, and waiters woken.
    /// Returns the record as it is afterwards.
    pub fn transition(&self, transition: Transition) -> Result<GroupRecord, Refused> {
        let mut state = self.lock();
        let announcements = state.life.apply(transition)?;
        let record = state.life.record().clone();
        if !state.life.deleted() {
            if let Err(e) = state::save(&self.paths, &record) {
                tracing::warn!("saving group {}: {e:#}", record.spec.name);
            }
        }
        for a in announcements {
            self.send(
                &record.spec.name,
                a.container.as_deref(),
                a.action,
                a.detail,
            );
        }
        self.changed.notify_all();
        Ok(record)
    }

    /// Sends an event about the group that is no status change (created,
    /// deleted, unhealthy).
    pub fn emit(&self, container: Option<&str>, action: &str, detail: Option<String>) {
        self.send(&self.name(), container, action, detail);
    }

    fn send(&self, group: &str, container: Option<&str>, action: &str, detail: Option<String>) {
        tracing::info!(
            group,
            container = container.unwrap_or(""),
            action,
            detail = detail.as_deref().unwrap_or(""),
            "event"
        );
        // Nobody listening is fine.
        let _ = self.events.send(Event {
            time: now_ms(),
            group: group.to_string(),
            container: container.map(str::to_string),
            action: action.to_string(),
            detail,
        });
    }

    /// Blocks until `ready` finds what it waits for in the record.
    pub fn wait_for<R>(&self, mut ready: impl FnMut(&GroupRecord) -> Option<R>) -> R {
        let mut state = self.lock();
        loop {
            if let Some(result) = ready(state.life.record()) {
                return result;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn hold(self: &Arc<Self>) -> Hold {
        self.lock().holds += 1;
        Hold(self.clone())
    }

    /// Blocks until no client holds the group.
    pub fn wait_unheld(&self) {
        let mut state = self.lock();
        while state.holds > 0 {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn snapshot(&self) -> GroupRecord {
        self.lock().life.record().clone()
    }

    /// The agent of the group's VM, while it runs.
    pub fn guest(&self) -> Option<Arc<Guest>> {
        self.lock().sandbox.as_ref().map(|s| s.guest().clone())
    }

    /// Gives the group its running VM's sandbox, waking whoever waits for
    /// its agent.
    pub fn set_sandbox(&self, sandbox: Arc<Sandbox>) {
        self.lock().sandbox = Some(sandbox);
        self.changed.notify_all();
    }

    /// The agent of the group's VM. A group a restarted daemon is still
    /// adopting is running with no agent yet: that is waited for,
    /// `patience` at most, rather than answered as not running.
    pub fn guest_within(&self, patience: Duration) -> Option<Arc<Guest>> {
        let deadline = Instant::now() + patience;
        let mut state = self.lock();
        loop {
            if let Some(sandbox) = &state.sandbox {
                return Some(sandbox.guest().clone());
            }
            let now = Instant::now();
            if state.life.record().status != GroupStatus::Running
                || state.life.stopping()
                || now >= deadline
            {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether `container` still runs the incarnation started at
    /// `started_at`.
    pub fn runs(&self, container: &str, started_at: u64) -> bool {
        self.lock().life.record().containers.iter().any(|c| {
            c.name == container
                && c.status == ContainerStatus::Running
                && c.started_at == Some(started_at)
        })
    }

    pub fn name(&self) -> String {
        self.lock().life.record().spec.name.clone()
    }

    pub fn ip(&self) -> Option<std::net::Ipv4Addr> {
        self.lock().life.record().ip
    }

    /// Stopped or failed: nothing it runs writes any more.
    pub fn is_over(&self) -> bool {
        let state = self.lock();
        state.life.deleted()
            || matches!(
                state.life.record().status,
                GroupStatus::Stopped | GroupStatus::Failed
            )
    }

    pub fn is_stopping(&self) -> bool {
        self.lock().life.stopping()
    }

    /// Waits `delay`; false when the group is being stopped or deleted
    /// meanwhile.
    pub fn pause(&self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        let mut state = self.lock();
        loop {
            if state.life.stopping() {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::lifecycle::tests::record;

    fn group(status: GroupStatus) -> Arc<Group> {
        let dir = std::env::temp_dir().join("capsa-group-tests");
        let mut record = record("Never");
        record.status = status;
        let (events, _) = tokio::sync::broadcast::channel(4);
        Group::new(GroupPaths::new(&dir, "g"), record, events)
    }

    #[test]
    fn a_group_not_running_has_no_agent_to_wait_for() {
        let began = Instant::now();
        assert!(group(GroupStatus::Stopped)
            .guest_within(Duration::from_secs(5))
            .is_none());
        assert!(began.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_running_group_still_being_adopted_is_waited_for_a_bounded_time() {
        let began = Instant::now();
        assert!(group(GroupStatus::Running)
            .guest_within(Duration::from_millis(200))
            .is_none());
        let waited = began.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }
}
