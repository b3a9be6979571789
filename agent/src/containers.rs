//! The group's containers and their processes: created through
//! capsa-runtime, with stdio wired to the host's streams and every exit
//! collected once and kept for whoever waits.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use capsa_layers::Digest;
use capsa_runtime::{
    Cgroup, CgroupStats, Container, ExitStatus, Process, ProcessIo, Reaper, Runtime, Spec,
    StdioRequest,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::Mount;

use crate::disks::LayerDisks;
use crate::errors::ApiError;
use crate::images::Images;
use crate::stdio::{close_input, copy_input, copy_output, Slot, StdioHub};
use capsa_protocol::stdio::{StreamHeader, StreamKind};

/// The exec id of a container's own process, as requests give it.
const INIT: &str = "";
/// How long an exec'd process's exit waits for its output streams to end
/// (children it left behind may hold them open); a container's own
/// process needs no bound, its PID namespace dies with it.
const EXEC_OUTPUT_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub status: ExitStatus,
    pub oom_killed: bool,
}

pub struct ProcessEntry {
    pid: i32,
    terminal: Option<File>,
    stdin: Arc<Mutex<Option<File>>>,
    exit: Mutex<Option<Exit>>,
    exited: Condvar,
}

impl ProcessEntry {
    pub fn wait(&self) -> Exit {
        let mut exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(exit) = *exit {
                return exit;
            }
            exit = self.exited.wait(exit).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn has_exited(&self) -> bool {
        self.exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

struct ContainerEntry {
    container: Mutex<Option<Container>>,
    /// What `stop_all` sends first.
    stop_signal: Signal,
    cgroup: Cgroup,
    init: Arc<ProcessEntry>,
    execs: Mutex<HashMap<String, Arc<ProcessEntry>>>,
}

pub struct Containers {
    runtime: Runtime,
    images: Arc<Images>,
    layer_disks: LayerDisks,
    hub: Arc<StdioHub>,
    entries: Mutex<HashMap<String, Arc<ContainerEntry>>>,
}

pub struct ContainerSummary {
    pub id: String,
    pub status: &'static str,
    pub pid: u32,
}

impl Containers {
    pub fn new(runtime: Runtime, images: Arc<Images>, hub: Arc<StdioHub>) -> Self {
        Containers {
            runtime,
            images,
            layer_disks: LayerDisks::default(),
            hub,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// `layer_disks` (serials, topmost first) when the image comes on
    /// disks, else its layers are the store's `image_chain_id`.
    pub fn create(
        &self,
        id: &str,
        image_chain_id: &str,
        layer_disks: &[String],
        spec_json: &[u8],
        stdio: StdioRequest,
        sandbox_mounts: &[Mount],
    ) -> Result<(), ApiError> {
        capsa_runtime::validate_id(id).map_err(ApiError::from_runtime)?;
        let mut spec: Spec = serde_json::from_slice(spec_json)
            .map_err(|e| ApiError::invalid(format!("the OCI runtime spec: {e}")))?;
        spec.set_mounts(Some(with_sandbox_files(&spec, sandbox_mounts)));
        let stop_signal = stop_signal_of(&spec)?;
        if self.lock_entries().contains_key(id) {
            return Err(ApiError::exists(format!("container {id} already exists")));
        }
        let lower = if layer_disks.is_empty() {
            let chain: Digest = image_chain_id
                .parse()
                .map_err(|e| ApiError::invalid(format!("image_chain_id: {e}")))?;
            self.images
                .store()
                .lower_dirs(&chain)
                .map_err(ApiError::from_layer)?
        } else {
            self.layer_disks.lower_dirs(layer_disks)?
        };
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let (container, io) = self
            .runtime
            .create(id, spec, lower, stdio)
            .map_err(ApiError::from_runtime)?;
        let cgroup = container.cgroup().clone();
        let init = self.watch(
            id,
            INIT,
            container.init_pid(),
            io,
            stdio,
            terminal,
            &cgroup,
            None,
        );
        let entry = ContainerEntry {
            container: Mutex::new(Some(container)),
            stop_signal,
            cgroup,
            init,
            execs: Mutex::new(HashMap::new()),
        };
        self.lock_entries().insert(id.to_string(), Arc::new(entry));
        Ok(())
    }

    pub fn start(&self, id: &str) -> Result<(), ApiError> {
        let entry = self.entry(id)?;
        let mut container = entry.container.lock().unwrap_or_else(|e| e.into_inner());
        let container = container
            .as_mut()
            .ok_or_else(|| ApiError::precondition(format!("container {id} is being deleted")))?;
        if !container.is_created() {
            return Err(ApiError::precondition(format!(
                "container {id} was already started"
            )));
        }
        container.start().map_err(ApiError::from_runtime)
    }

    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: StdioRequest,
    ) -> Result<(), ApiError> {
        let entry = self.entry(id)?;
        if exec_id == INIT {
            return Err(ApiError::invalid("exec_id is empty".into()));
        }
        capsa_runtime::validate_id(exec_id)
            .map_err(|_| ApiError::invalid(format!("invalid exec id {exec_id:?}")))?;
        let process: Process = serde_json::from_slice(process_json)
            .map_err(|e| ApiError::invalid(format!("the OCI process: {e}")))?;
        let terminal = process.terminal().unwrap_or(false);
        let guard = entry.container.lock().unwrap_or_else(|e| e.into_inner());
        let container = guard
            .as_ref()
            .ok_or_else(|| ApiError::precondition(format!("container {id} is being deleted")))?;
        if container.is_created() || entry.init.has_exited() {
            return Err(ApiError::precondition(format!(
                "container {id} is not running"
            )));
        }
        let mut execs = entry.execs.lock().unwrap_or_else(|e| e.into_inner());
        if execs.contains_key(exec_id) {
            return Err(ApiError::exists(format!(
                "exec {exec_id} already exists in {id}"
            )));
        }
        let (pid, io) = self
            .runtime
            .exec(container, process, stdio)
            .map_err(ApiError::from_runtime)?;
        let process = self.watch(
            id,
            exec_id,
            pid,
            io,
            stdio,
            terminal,
            &entry.cgroup,
            Some(EXEC_OUTPUT_PATIENCE),
        );
        execs.insert(exec_id.to_string(), process);
        Ok(())
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<ProcessEntry>, ApiError> {
        let entry = self.entry(id)?;
        if exec_id == INIT {
            return Ok(entry.init.clone());
        }
        let execs = entry.execs.lock().unwrap_or_else(|e| e.into_inner());
        execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no exec {exec_id} in container {id}")))
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: i32) -> Result<(), ApiError> {
        let signal = Signal::try_from(signal)
            .map_err(|_| ApiError::invalid(format!("no signal {signal}")))?;
        let process = self.process(id, exec_id)?;
        if process.has_exited() {
            return Err(ApiError::precondition("the process has exited".into()));
        }
        kill(Pid::from_raw(process.pid), signal)
            .map_err(|e| ApiError::internal(format!("kill {}: {e}", process.pid)))
    }

    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, columns: u32) -> Result<(), ApiError> {
        let process = self.process(id, exec_id)?;
        let terminal = process
            .terminal
            .as_ref()
            .ok_or_else(|| ApiError::precondition("the process has no terminal".into()))?;
        let clamp = |n: u32| u16::try_from(n).unwrap_or(u16::MAX);
        capsa_runtime::resize(terminal, clamp(rows), clamp(columns))
            .map_err(|e| ApiError::internal(format!("resizing the terminal: {e}")))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ApiError> {
        let process = self.process(id, exec_id)?;
        close_input(&process.stdin, process.terminal.is_some());
        Ok(())
    }

    /// Container `id`'s processes with their users and command lines.
    pub fn process_table(&self, id: &str) -> Result<Vec<capsa_runtime::ProcessEntry>, ApiError> {
        let entry = self.entry(id)?;
        let guard = entry.container.lock().unwrap_or_else(|e| e.into_inner());
        let container = guard
            .as_ref()
            .ok_or_else(|| ApiError::precondition(format!("container {id} is being deleted")))?;
        container.process_table().map_err(ApiError::from_runtime)
    }

    /// The PID of container `id`'s own process, which must be running.
    pub fn init_pid(&self, id: &str) -> Result<i32, ApiError> {
        let entry = self.entry(id)?;
        let created = entry
            .container
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|c| c.is_created());
        if created || entry.init.has_exited() || entry.init.pid <= 0 {
            return Err(ApiError::precondition(format!(
                "container {id} is not running"
            )));
        }
        Ok(entry.init.pid)
    }

    /// New limits for container `id`'s cgroup, from OCI LinuxResources JSON.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ApiError> {
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(resources_json)
                .map_err(|e| ApiError::invalid(format!("the OCI resources: {e}")))?;
        let entry = self.entry(id)?;
        entry
            .cgroup
            .update(&resources)
            .map_err(|e| ApiError::invalid(e.to_string()))
    }

    pub fn stats(&self, id: &str) -> Result<CgroupStats, ApiError> {
        let entry = self.entry(id)?;
        entry
            .cgroup
            .stats()
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    pub fn list(&self) -> Vec<ContainerSummary> {
        let entries: Vec<(String, Arc<ContainerEntry>)> = self
            .lock_entries()
            .iter()
            .map(|(id, entry)| (id.clone(), entry.clone()))
            .collect();
        let mut summaries: Vec<ContainerSummary> = entries
            .into_iter()
            .map(|(id, entry)| {
                let created = entry
                    .container
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .is_some_and(|c| c.is_created());
                let status = if entry.init.has_exited() {
                    "stopped"
                } else if created {
                    "created"
                } else {
                    "running"
                };
                ContainerSummary {
                    id,
                    status,
                    pid: entry.init.pid as u32,
                }
            })
            .collect();
        summaries.sort_by(|a, b| a.id.cmp(&b.id));
        summaries
    }

    pub fn delete(&self, id: &str) -> Result<(), ApiError> {
        let entry = self
            .lock_entries()
            .remove(id)
            .ok_or_else(|| ApiError::not_found(format!("no container {id}")))?;
        self.hub.forget_container(id);
        let container = entry
            .container
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match container {
            Some(container) => container.destroy().map_err(ApiError::from_runtime),
            None => Ok(()),
        }
    }

    /// Every container's stop signal (SIGTERM unless its spec says), then
    /// SIGKILL (by deleting) whatever is left after `grace`.
    pub fn stop_all(&self, grace: Duration) {
        let entries: Vec<(String, Arc<ContainerEntry>)> = self
            .lock_entries()
            .iter()
            .map(|(id, entry)| (id.clone(), entry.clone()))
            .collect();
        for (_, entry) in &entries {
            if !entry.init.has_exited() {
                let _ = kill(Pid::from_raw(entry.init.pid), entry.stop_signal);
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && entries.iter().any(|(_, e)| !e.init.has_exited()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for (id, _) in entries {
            let _ = self.delete(&id);
        }
    }

    fn entry(&self, id: &str) -> Result<Arc<ContainerEntry>, ApiError> {
        self.lock_entries()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no container {id}")))
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ContainerEntry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wires a process's stdio to the host's streams and starts the thread
    /// that records its exit once its output has been delivered.
    #[allow(clippy::too_many_arguments)]
    fn watch(
        &self,
        id: &str,
        exec_id: &str,
        pid: i32,
        io: ProcessIo,
        stdio: StdioRequest,
        terminal: bool,
        cgroup: &Cgroup,
        output_patience: Option<Duration>,
    ) -> Arc<ProcessEntry> {
        let register = |kind| self.hub.register(StreamHeader::new(id, exec_id, kind));
        let mut slots: Vec<Arc<Slot>> = Vec::new();
        let mut copiers = Vec::new();
        let stdin = Arc::new(Mutex::new(None));
        let mut master = None;
        let mut input = None;
        if let Some(pty) = io.terminal.filter(|_| terminal) {
            // Output is drained even when nobody attached, or the process
            // would block on a full terminal.
            let slot = stdio.stdout.then(|| register(StreamKind::Stdout));
            if let Ok(reader) = pty.try_clone() {
                copiers.push(copy_output(reader, slot.clone()));
            }
            slots.extend(slot);
            if stdio.stdin {
                *stdin.lock().unwrap_or_else(|e| e.into_inner()) = pty.try_clone().ok();
                input = Some(register(StreamKind::Stdin));
            }
            master = Some(pty);
        } else {
            for (pipe, kind) in [
                (io.stdout, StreamKind::Stdout),
                (io.stderr, StreamKind::Stderr),
            ] {
                if let Some(pipe) = pipe {
                    let slot = register(kind);
                    copiers.push(copy_output(pipe, Some(slot.clone())));
                    slots.push(slot);
                }
            }
            if let Some(pipe) = io.stdin {
                *stdin.lock().unwrap_or_else(|e| e.into_inner()) = Some(pipe);
                input = Some(register(StreamKind::Stdin));
            }
        }
        if let Some(slot) = input {
            copy_input(stdin.clone(), slot.clone(), master.is_some());
            slots.push(slot);
        }
        let process = Arc::new(ProcessEntry {
            pid,
            terminal: master,
            stdin,
            exit: Mutex::new(None),
            exited: Condvar::new(),
        });
        let watched = process.clone();
        let cgroup = cgroup.clone();
        let oom_kills_before = cgroup.oom_kills().unwrap_or(0);
        std::thread::spawn(move || {
            let status = Reaper::global().wait(pid);
            for slot in &slots {
                slot.process_exited();
            }
            let (done, delivered) = channel();
            std::thread::spawn(move || {
                for copier in copiers {
                    let _ = copier.join();
                }
                let _ = done.send(());
            });
            let _ = match output_patience {
                Some(patience) => delivered.recv_timeout(patience).is_ok(),
                None => delivered.recv().is_ok(),
            };
            let oom_killed = status == ExitStatus::Signaled(libc::SIGKILL)
                && cgroup.oom_kills().unwrap_or(0) > oom_kills_before;
            // The terminal's input end goes with the process.
            *watched.stdin.lock().unwrap_or_else(|e| e.into_inner()) = None;
            let mut exit = watched.exit.lock().unwrap_or_else(|e| e.into_inner());
            *exit = Some(Exit { status, oom_killed });
            watched.exited.notify_all();
        });
        process
    }
}

/// The spec's mounts plus the sandbox's files (hosts, hostname,
/// resolv.conf), except where the spec mounts its own or its image brings
/// its own (capsa_protocol::OWN_FILES_ANNOTATION).
fn with_sandbox_files(spec: &Spec, sandbox_mounts: &[Mount]) -> Vec<Mount> {
    let own_files: Vec<&Path> = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(capsa_protocol::OWN_FILES_ANNOTATION))
        .map(|files| files.split(',').map(Path::new).collect())
        .unwrap_or_default();
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for extra in sandbox_mounts {
        let covered = mounts
            .iter()
            .any(|m| m.destination() == extra.destination())
            || own_files.contains(&extra.destination().as_path());
        if !covered {
            mounts.push(extra.clone());
        }
    }
    mounts
}

/// The spec's stop signal (capsa_protocol::STOP_SIGNAL_ANNOTATION).
fn stop_signal_of(spec: &Spec) -> Result<Signal, ApiError> {
    let Some(text) = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(capsa_protocol::STOP_SIGNAL_ANNOTATION))
    else {
        return Ok(Signal::SIGTERM);
    };
    text.parse::<i32>()
        .ok()
        .and_then(|n| Signal::try_from(n).ok())
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "annotation {}: {text:?} is not a signal number",
                capsa_protocol::STOP_SIGNAL_ANNOTATION
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::MountBuilder;

    fn bind(source: &str, destination: &str) -> Mount {
        MountBuilder::default()
            .source(source)
            .destination(destination)
            .typ("bind")
            .options(vec!["rbind".to_string(), "ro".to_string()])
            .build()
            .unwrap()
    }

    #[test]
    fn sandbox_files_yield_to_the_spec_and_to_the_image() {
        let sandbox = [
            bind("/run/capsa/sandbox/hosts", "/etc/hosts"),
            bind("/run/capsa/sandbox/hostname", "/etc/hostname"),
            bind("/run/capsa/sandbox/resolv.conf", "/etc/resolv.conf"),
        ];
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [{"destination": "/etc/hostname", "source": "/elsewhere", "type": "bind",
                        "options": ["rbind"]}],
            "annotations": {(capsa_protocol::OWN_FILES_ANNOTATION): "/etc/hosts,/etc/passwd"}
        }))
        .unwrap();
        let mounts = with_sandbox_files(&spec, &sandbox);
        let found: Vec<String> = mounts
            .iter()
            .map(|m| {
                format!(
                    "{} <- {}",
                    m.destination().display(),
                    m.source().as_ref().unwrap().display()
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                "/etc/hostname <- /elsewhere",
                "/etc/resolv.conf <- /run/capsa/sandbox/resolv.conf"
            ]
        );
    }

    #[test]
    fn without_the_annotation_every_sandbox_file_is_added() {
        let sandbox = [bind("/run/capsa/sandbox/hosts", "/etc/hosts")];
        let spec: Spec =
            serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "mounts": []}))
                .unwrap();
        assert_eq!(with_sandbox_files(&spec, &sandbox).len(), 1);
    }
}
