//! containerd's Task service for the containers of one sandbox, each a
//! container in the sandbox's microVM, driven through its agent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use capsa_guest_client::{ExitInfo, GuestError};
use containerd_shim::api;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Enum, MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, context::Context, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use oci_spec::runtime::Spec;

use crate::config::ShimConfig;
use crate::rootfs;
use crate::sandbox::{self, Sandbox};
use crate::sizing;
use crate::spec;
use crate::stdio::{Copies, Fifos};

/// The annotation CRI gives every container of a pod: the pod's id.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// CRI's kind of container: "sandbox" for the pod's pause container,
/// which the VM itself stands for (nothing of it runs in the guest).
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// How often a pause container looks whether its VM still runs.
const PAUSE_POLL: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Stopped,
}

struct ProcessState {
    status: Status,
    pid: u32,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    copies: Copies,
}

/// A container's own process or an exec.
struct Process {
    container_id: String,
    /// Empty for the container's own process.
    exec_id: String,
    fifos: Fifos,
    /// An exec's process spec, run at Start.
    exec_spec: Option<oci_spec::runtime::Process>,
    state: Mutex<ProcessState>,
    exited: Condvar,
}

impl Process {
    fn new(container_id: &str, exec_id: &str, fifos: Fifos) -> Self {
        Process {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            fifos,
            exec_spec: None,
            state: Mutex::new(ProcessState {
                status: Status::Created,
                pid: 0,
                exit_status: 0,
                exited_at: None,
                copies: Copies::default(),
            }),
            exited: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProcessState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends a process deleted before it was started, so that whoever
    /// waits for it is answered (as for a kill).
    fn never_started(&self) {
        let mut state = self.lock();
        if state.status == Status::Created {
            state.status = Status::Stopped;
            state.exit_status = 128 + libc::SIGKILL as u32;
            state.exited_at = Some(now());
            self.exited.notify_all();
        }
    }

    /// The id containerd knows this process by in events.
    fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }
}

struct Container {
    bundle: PathBuf,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    /// The pod's pause container: the VM is its process.
    pause: bool,
}

pub struct TaskService {
    namespace: String,
    sandbox_id: String,
    publisher: Arc<Mutex<RemotePublisher>>,
    exit: Arc<ExitSignal>,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Container>>,
}

fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

/// An agent's refusal keeps its code (the agent speaks a newer ttrpc than
/// containerd-shim, so the code travels as its number).
fn guest_status(what: &str, e: GuestError) -> ttrpc::Error {
    let code = e
        .code()
        .and_then(|c| Code::from_i32(c as i32))
        .unwrap_or(Code::INTERNAL);
    status(code, format!("{what}: {e}"))
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn not_found(id: &str) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("no task {id} in this sandbox"))
}

impl TaskService {
    pub fn new(
        namespace: &str,
        sandbox_id: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        TaskService {
            namespace: namespace.to_string(),
            sandbox_id: sandbox_id.to_string(),
            publisher: Arc::new(Mutex::new(publisher)),
            exit,
            sandbox: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        let containers = self.containers();
        let container = containers.get(id).ok_or_else(|| not_found(id))?;
        if exec_id.is_empty() {
            return Ok(container.init.clone());
        }
        container
            .execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("no exec {exec_id} in task {id}")))
    }

    /// The sandbox's VM, booted on first use with what `setup` says (only
    /// then asked: a later container's spec does not size the VM).
    fn sandbox_for(
        &self,
        config: &ShimConfig,
        setup: impl FnOnce() -> TtrpcResult<sandbox::Setup>,
    ) -> TtrpcResult<Arc<Sandbox>> {
        let mut slot = self.sandbox.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sandbox) = slot.as_ref() {
            return Ok(sandbox.clone());
        }
        let setup = &setup()?;
        let dir = sandbox::dir_for(&self.namespace, &self.sandbox_id);
        let sandbox = Arc::new(
            Sandbox::boot(config, dir, setup)
                .map_err(|e| status(Code::UNAVAILABLE, format!("booting the sandbox VM: {e}")))?,
        );
        log::info!(
            "sandbox {}: VM up (VMM pid {}, {} vCPUs, {} MiB{})",
            self.sandbox_id,
            sandbox.vmm_pid(),
            setup.size.cpus,
            setup.size.memory_mib,
            if setup.netns.is_some() {
                ", the pod's network"
            } else {
                ""
            }
        );
        *slot = Some(sandbox.clone());
        Ok(sandbox)
    }

    fn running_sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.sandbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| status(Code::FAILED_PRECONDITION, "the sandbox VM is not running"))
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish(&self.publisher, &self.namespace, topic, event);
    }

    fn create_container(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        if self.containers().contains_key(&req.id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("task {} already exists", req.id),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let mut spec = Spec::load(bundle.join("config.json")).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!("reading the bundle's config.json: {e}"),
            )
        })?;
        let removed = spec::for_guest(&mut spec);
        for dropped in &removed.dropped {
            log::warn!("task {}: left out {dropped}", req.id);
        }
        let (copies, dirs) = file_copies(&req.id, removed.binds)?;
        if !copies.is_empty() {
            let own: Vec<String> = copies
                .iter()
                .map(|c| c.destination.display().to_string())
                .collect();
            let mut annotations = spec.annotations().clone().unwrap_or_default();
            annotations.insert(
                capsa_protocol::OWN_FILES_ANNOTATION.to_string(),
                own.join(","),
            );
            spec.set_annotations(Some(annotations));
        }
        let config = ShimConfig::for_options(req.options.as_ref())
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let sandbox = self.sandbox_for(&config, || {
            Ok(sandbox::Setup {
                hostname: spec.hostname().clone().unwrap_or_default(),
                size: sizing::vm_size(&config, &spec)
                    .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?,
                netns: removed.netns,
                cgroups_path: spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()),
            })
        })?;
        let pause = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(CONTAINER_TYPE_ANNOTATION))
            .is_some_and(|kind| kind == "sandbox");
        if pause {
            let pid = sandbox.vmm_pid();
            let init = Process::new(&req.id, "", Fifos::default());
            init.lock().pid = pid;
            self.add_container(&req.id, bundle, init, true);
            return Ok(pid);
        }
        let guest = sandbox.guest();
        let mut guest_sources = HashMap::new();
        for bind in &dirs {
            let source = sandbox
                .share(bind)
                .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
            log::info!(
                "task {}: host directory {} is shared with the VM as {} for {}",
                req.id,
                bind.source.display(),
                source.display(),
                bind.destination.display()
            );
            guest_sources.insert(bind.destination.clone(), source);
        }
        spec::place_binds(&mut spec, &guest_sources);

        let target = bundle.join("rootfs");
        let mounted = rootfs::mount(&req.rootfs, &target)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let root = match sandbox.place_rootfs(&req.rootfs, &target, &copies) {
            Some(Ok(placed)) => {
                if placed.bytes == 0 {
                    log::info!(
                        "task {}: root filesystem on disk {}, an earlier container's image",
                        req.id,
                        placed.serial
                    );
                } else {
                    log::info!(
                        "task {}: root filesystem written to disk {}, {} bytes in {} ms",
                        req.id,
                        placed.serial,
                        placed.bytes,
                        placed.elapsed.as_millis()
                    );
                }
                Ok(Root::Disk(placed.serial))
            }
            other => {
                if let Some(Err(e)) = other {
                    log::warn!(
                        "task {}: {e}; the root filesystem is streamed instead",
                        req.id
                    );
                }
                rootfs::send(guest, &target, &copies).map(|(chain_id, cost)| {
                    log::info!(
                        "task {}: root filesystem sent to the guest, {} bytes in {} ms",
                        req.id,
                        cost.bytes,
                        cost.elapsed.as_millis()
                    );
                    Root::Layers(chain_id)
                })
            }
        };
        if mounted {
            rootfs::unmount(&target);
        }
        let root = root.map_err(|e| status(Code::INTERNAL, e.to_string()))?;

        let fifos = Fifos {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        match &root {
            Root::Disk(serial) => guest.create_on_disks(
                &req.id,
                std::slice::from_ref(serial),
                &spec,
                fifos.streams(),
            ),
            Root::Layers(chain_id) => guest.create(&req.id, chain_id, &spec, fifos.streams()),
        }
        .map_err(|e| guest_status("creating the container", e))?;
        let copies = Copies::start(guest, &req.id, "", &fifos).map_err(|e| {
            let _ = guest.delete(&req.id);
            guest_status("attaching its stdio", e)
        })?;
        let pid = guest
            .containers()
            .ok()
            .and_then(|all| all.into_iter().find(|c| c.container_id == req.id))
            .map(|c| c.pid)
            .unwrap_or(0);
        let init = Process::new(&req.id, "", fifos);
        {
            let mut state = init.lock();
            state.pid = pid;
            state.copies = copies;
        }
        self.add_container(&req.id, bundle, init, false);
        Ok(pid)
    }

    fn add_container(&self, id: &str, bundle: PathBuf, init: Process, pause: bool) {
        self.containers().insert(
            id.to_string(),
            Container {
                bundle,
                init: Arc::new(init),
                execs: HashMap::new(),
                pause,
            },
        );
    }

    fn is_pause(&self, id: &str) -> bool {
        self.containers().get(id).is_some_and(|c| c.pause)
    }

    /// A pause container runs as long as its VM: it ends when killed, or
    /// when the VM is gone (a crashed guest, a killed VMM).
    fn watch_pause(&self, sandbox: Arc<Sandbox>, process: Arc<Process>) {
        let publisher = self.publisher.clone();
        let namespace = self.namespace.clone();
        std::thread::spawn(move || loop {
            if process.lock().status == Status::Stopped {
                return;
            }
            if !sandbox.is_alive() {
                log::error!(
                    "the sandbox VM is gone: its pause container ends; its console ended with:\n{}",
                    sandbox.console_tail(CONSOLE_TAIL_LINES)
                );
                exited(&publisher, &namespace, &process, 128 + libc::SIGKILL as u32);
                return;
            }
            std::thread::sleep(PAUSE_POLL);
        });
    }

    /// Waits in the background for `process` to exit, then reports it.
    fn watch(&self, sandbox: Arc<Sandbox>, process: Arc<Process>) {
        let publisher = self.publisher.clone();
        let namespace = self.namespace.clone();
        std::thread::spawn(move || {
            let waited = sandbox
                .guest()
                .reconnect()
                .and_then(|guest| guest.wait(&process.container_id, &process.exec_id));
            let (exit_status, oom) = match waited {
                Ok(ExitInfo {
                    code, oom_killed, ..
                }) => (code as u32, oom_killed),
                Err(e) => {
                    log::error!(
                        "waiting for {} in the guest: {e}; reporting it killed",
                        process.event_id()
                    );
                    if !sandbox.is_alive() {
                        log::error!(
                            "the sandbox VM is gone; its console ended with:\n{}",
                            sandbox.console_tail(CONSOLE_TAIL_LINES)
                        );
                    }
                    (128 + libc::SIGKILL as u32, false)
                }
            };
            let mut copies = std::mem::take(&mut process.lock().copies);
            copies.finish_output();
            if oom {
                publish(
                    &publisher,
                    &namespace,
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM {
                        container_id: process.container_id.clone(),
                        ..Default::default()
                    }),
                );
            }
            process.lock().copies = copies;
            exited(&publisher, &namespace, &process, exit_status);
        });
    }
}

/// Records that `process` ended with `exit_status`, wakes whoever waits
/// for it and publishes its exit; a process that had ended already is
/// left as it was.
fn exited(
    publisher: &Mutex<RemotePublisher>,
    namespace: &str,
    process: &Process,
    exit_status: u32,
) {
    let exited_at = now();
    let pid = {
        let mut state = process.lock();
        if state.status == Status::Stopped {
            return;
        }
        state.status = Status::Stopped;
        state.exit_status = exit_status;
        state.exited_at = Some(exited_at.clone());
        state.pid
    };
    process.exited.notify_all();
    publish(
        publisher,
        namespace,
        topics::TASK_EXIT_EVENT_TOPIC,
        Box::new(TaskExit {
            container_id: process.container_id.clone(),
            id: process.event_id().to_string(),
            pid,
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        }),
    );
}

fn publish(
    publisher: &Mutex<RemotePublisher>,
    namespace: &str,
    topic: &str,
    event: Box<dyn MessageDyn>,
) {
    let publisher = publisher.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = publisher.publish(Context::default(), topic, namespace, event) {
        log::warn!("publishing {topic}: {e}");
    }
}

/// Where a container's root filesystem is in the guest.
enum Root {
    /// An EROFS image on the root filesystem disk with this serial.
    Disk(String),
    /// Streamed and unpacked: the agent's layer chain.
    Layers(String),
}

/// Console lines logged when a sandbox's VM is gone.
const CONSOLE_TAIL_LINES: usize = 30;

/// Splits the bind mounts: host files up to rootfs::MAX_FILE_COPY (CRI's
/// /etc/hosts, /etc/resolv.conf, /etc/hostname, a subPath) travel with the
/// root filesystem; host directories are shared with the VM (shared_dirs).
/// A larger file, or a source that cannot be read, is refused.
type Binds = (Vec<rootfs::FileCopy>, Vec<spec::Bind>);
fn file_copies(id: &str, binds: Vec<spec::Bind>) -> TtrpcResult<Binds> {
    let mut copies = Vec::new();
    let mut dirs = Vec::new();
    for bind in binds {
        let refused = |why: String| {
            status(
                Code::INVALID_ARGUMENT,
                format!(
                    "the bind mount of {} on {}: {why}",
                    bind.source.display(),
                    bind.destination.display()
                ),
            )
        };
        let meta = std::fs::metadata(&bind.source).map_err(|e| refused(e.to_string()))?;
        if meta.is_dir() {
            dirs.push(bind);
            continue;
        }
        if meta.len() > rootfs::MAX_FILE_COPY {
            return Err(refused(format!(
                "a host file is copied into the VM, and {} bytes is over the {} a copy may have",
                meta.len(),
                rootfs::MAX_FILE_COPY
            )));
        }
        log::info!(
            "task {id}: {} is copied into the root filesystem at {} (a copy, not a live bind)",
            bind.source.display(),
            bind.destination.display()
        );
        copies.push(rootfs::FileCopy {
            source: bind.source,
            destination: bind.destination,
        });
    }
    Ok((copies, dirs))
}

fn bundle_of(path: &Path) -> String {
    path.display().to_string()
}

impl containerd_shim::Task for TaskService {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "restoring from a checkpoint is not supported",
            ));
        }
        let pid = self.create_container(&req)?;
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let process = self.process(&req.id, &req.exec_id)?;
        let sandbox = self.running_sandbox()?;
        let guest = sandbox.guest();
        if process.lock().status != Status::Created {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("{} has been started already", process.event_id()),
            ));
        }
        if req.exec_id.is_empty() && self.is_pause(&req.id) {
            let pid = {
                let mut state = process.lock();
                state.status = Status::Running;
                state.pid
            };
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
            self.watch_pause(sandbox, process);
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let pid = if req.exec_id.is_empty() {
            guest
                .start(&req.id)
                .map_err(|e| guest_status("starting the container", e))?;
            let pid = process.lock().pid;
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
            pid
        } else {
            let spec = process
                .exec_spec
                .as_ref()
                .ok_or_else(|| status(Code::INTERNAL, "the exec has no process spec"))?;
            guest
                .exec(&req.id, &req.exec_id, spec, process.fifos.streams())
                .map_err(|e| guest_status("starting the exec", e))?;
            let copies = Copies::start(guest, &req.id, &req.exec_id, &process.fifos)
                .map_err(|e| guest_status("attaching the exec's stdio", e))?;
            process.lock().copies = copies;
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                }),
            );
            0
        };
        process.lock().status = Status::Running;
        self.watch(sandbox, process);
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let process = self.process(&req.id, &req.exec_id)?;
        let bundle = self
            .containers()
            .get(&req.id)
            .map(|c| bundle_of(&c.bundle))
            .unwrap_or_default();
        let state = process.lock();
        let status = match state.status {
            Status::Created => api::Status::CREATED,
            Status::Running => api::Status::RUNNING,
            Status::Stopped => api::Status::STOPPED,
        };
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle,
            pid: state.pid,
            status: status.into(),
            stdin: process.fifos.stdin.clone(),
            stdout: process.fifos.stdout.clone(),
            stderr: process.fifos.stderr.clone(),
            terminal: process.fifos.terminal,
            exit_status: state.exit_status,
            exited_at: state.exited_at.clone().into(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let process = self.process(&req.id, &req.exec_id)?;
        let mut state = process.lock();
        while state.status != Status::Stopped {
            state = process
                .exited
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        Ok(api::WaitResponse {
            exit_status: state.exit_status,
            exited_at: state.exited_at.clone().into(),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let process = self.process(&req.id, &req.exec_id)?;
        if process.lock().status == Status::Stopped {
            return Err(status(
                Code::NOT_FOUND,
                format!("{} has exited already", process.event_id()),
            ));
        }
        let signal = i32::try_from(req.signal)
            .map_err(|_| status(Code::INVALID_ARGUMENT, "no such signal"))?;
        if req.exec_id.is_empty() && self.is_pause(&req.id) {
            // The pause process's part: any signal but 0 ends it.
            if signal != 0 {
                exited(&self.publisher, &self.namespace, &process, 128 + req.signal);
            }
            return Ok(api::Empty::new());
        }
        self.running_sandbox()?
            .guest()
            .signal(&req.id, &req.exec_id, signal)
            .map_err(|e| guest_status("signalling", e))?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "the exec has no process spec"))?;
        let process_spec: oci_spec::runtime::Process = serde_json::from_slice(&spec.value)
            .map_err(|e| {
                status(
                    Code::INVALID_ARGUMENT,
                    format!("the exec's process spec: {e}"),
                )
            })?;
        let fifos = Fifos {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        if self.is_pause(&req.id) {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("{} is the pod's sandbox: it runs no processes", req.id),
            ));
        }
        {
            let mut containers = self.containers();
            let container = containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(&req.id))?;
            if container.execs.contains_key(&req.exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            let mut process = Process::new(&req.id, &req.exec_id, fifos);
            process.exec_spec = Some(process_spec);
            container
                .execs
                .insert(req.exec_id.clone(), Arc::new(process));
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.process(&req.id, &req.exec_id)?;
        self.running_sandbox()?
            .guest()
            .resize(&req.id, &req.exec_id, req.height, req.width)
            .map_err(|e| guest_status("resizing the terminal", e))?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let process = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            process.lock().copies.close_stdin();
        }
        Ok(api::Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        self.process(&req.id, "")?;
        if self.is_pause(&req.id) {
            return Ok(api::PidsResponse::default());
        }
        let pids = self
            .running_sandbox()?
            .guest()
            .processes(&req.id)
            .map_err(|e| guest_status("listing processes", e))?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| containerd_shim::protos::api::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        self.process(&req.id, "")?;
        if self.is_pause(&req.id) {
            // Nothing of it runs in the guest.
            let any = containerd_shim::util::convert_to_any(Box::new(v2::Metrics::default()))
                .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
            return Ok(api::StatsResponse {
                stats: MessageField::some(any),
                ..Default::default()
            });
        }
        let stats = self
            .running_sandbox()?
            .guest()
            .stats(&req.id)
            .map_err(|e| guest_status("reading stats", e))?;
        let metrics = v2::Metrics {
            cpu: MessageField::some(v2::CPUStat {
                usage_usec: stats.cpu_usage_usec,
                user_usec: stats.cpu_user_usec,
                system_usec: stats.cpu_system_usec,
                ..Default::default()
            }),
            memory: MessageField::some(v2::MemoryStat {
                usage: stats.memory_current_bytes,
                usage_limit: stats.memory_limit_bytes,
                ..Default::default()
            }),
            pids: MessageField::some(v2::PidsStat {
                current: stats.pids_current,
                ..Default::default()
            }),
            io: MessageField::some(v2::IOStat {
                usage: vec![v2::IOEntry {
                    rbytes: stats.io_read_bytes,
                    wbytes: stats.io_write_bytes,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            memory_events: MessageField::some(v2::MemoryEvents {
                oom_kill: stats.oom_kills,
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let process = self.process(&req.id, &req.exec_id)?;
        if req.exec_id.is_empty() && self.is_pause(&req.id) {
            self.containers().remove(&req.id);
            process.never_started();
        } else if req.exec_id.is_empty() {
            let sandbox = self.running_sandbox()?;
            // Kills whatever still runs in it and removes it in the guest.
            if let Err(e) = sandbox.guest().delete(&req.id) {
                // With the VM gone, so is the container.
                if !e.is_not_found() && sandbox.is_alive() {
                    return Err(guest_status("deleting the container", e));
                }
            }
            if let Some(container) = self.containers().remove(&req.id) {
                rootfs::unmount(&container.bundle.join("rootfs"));
                for exec in container.execs.values() {
                    exec.lock().copies.release();
                    exec.never_started();
                }
            }
            process.never_started();
        } else {
            if process.lock().status == Status::Running {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} is still running", req.exec_id),
                ));
            }
            if let Some(container) = self.containers().get_mut(&req.id) {
                container.execs.remove(&req.exec_id);
            }
            process.never_started();
        }
        let state = process.lock();
        state.copies.release();
        let exited_at = state.exited_at.clone().unwrap_or_else(now);
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    id: req.id.clone(),
                    pid: state.pid,
                    exit_status: state.exit_status,
                    exited_at: MessageField::some(exited_at.clone()),
                    ..Default::default()
                }),
            );
        }
        Ok(api::DeleteResponse {
            pid: state.pid,
            exit_status: state.exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    /// New limits for a container's cgroup in the guest (CRI's
    /// UpdateContainerResources). The VM's own size stays: the pause
    /// container's limits are the pod's, which a VM has from its boot.
    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        self.process(&req.id, "")?;
        if self.is_pause(&req.id) {
            return Ok(api::Empty::new());
        }
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "the update has no resources"))?;
        // Checked here so that a malformed update is refused by the shim.
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources.value).map_err(
            |e| {
                status(
                    Code::INVALID_ARGUMENT,
                    format!("the update's resources: {e}"),
                )
            },
        )?;
        self.running_sandbox()?
            .guest()
            .update(&req.id, resources.value.clone())
            .map_err(|e| guest_status("updating the container's limits", e))?;
        Ok(api::Empty::new())
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.process(&req.id, "").map(|p| p.lock().pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if !self.containers().is_empty() {
            // Other containers of the sandbox still use the VM.
            return Ok(api::Empty::new());
        }
        if let Some(sandbox) = self
            .sandbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            sandbox.shutdown();
            log::info!("sandbox {}: VM shut down", self.sandbox_id);
        }
        self.exit.signal();
        Ok(api::Empty::new())
    }
}
