//! Container groups: each runs in a microVM of its own. The daemon starts
//! the VMM, hands the agent the images and the containers, copies their
//! output into logs, records exits, and stops the VM when nothing runs in
//! it any more. Calls here block; the HTTP layer runs them off its
//! threads.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capsa_api::exec::ExecRequest;
use capsa_api::{
    ApiError, ContainerSpec, ContainerStats, ContainerStatus, ErrorCode, Event, GroupSpec,
    GroupStats, GroupStatus, GroupView, PortProtocol, RestartPolicy, WaitResponse,
};
use capsa_guest_client::{Guest, GuestError, OciImage, Streams};
use capsa_image_store::ImageStore;
use capsa_network::Network;
use capsa_protocol::stdio::StreamKind;
use capsa_volumes::VolumeStore;
use oci_spec::runtime::{
    LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, Spec,
};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use crate::logs::LogWriter;
use crate::state::{self, now_ms, GroupPaths, GroupRecord};
use capsa_vm_process::{self as vm, VmConfig, VmSpec};

/// How long a booting guest gets to answer.
const BOOT_PATIENCE: Duration = Duration::from_secs(120);
/// How long containers get between SIGTERM and SIGKILL when a group stops.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

pub fn error(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
        details: Vec::new(),
    }
}

fn no_container(group: &str, container: &str) -> ApiError {
    error(
        ErrorCode::NotFound,
        format!("no container {container:?} in {group:?}"),
    )
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    error(ErrorCode::Internal, e.to_string())
}

/// A failed guest call while a group starts; when the guest gave no answer
/// at all, its console's last lines are the best clue to why.
fn guest_failed(group: &Group, what: &str, e: GuestError) -> ApiError {
    let mut message = format!("{what}: {e}");
    if e.is_unanswered() {
        message.push_str("; console:\n");
        message.push_str(&vm::console_tail(&group.paths.console()));
    }
    internal(message)
}

pub struct Group {
    paths: GroupPaths,
    record: Mutex<GroupRecord>,
    guest: Mutex<Option<Arc<Guest>>>,
    changed: Condvar,
    /// Set while the daemon itself stops the VM, so its exit is no failure.
    stopping: Mutex<bool>,
    /// Set once the group is being deleted: nothing is saved after that.
    deleted: Mutex<bool>,
    events: tokio::sync::broadcast::Sender<Event>,
    /// The group's published ports, open while it exists.
    published: Mutex<Vec<capsa_network::Published>>,
}

impl Group {
    fn update(&self, change: impl FnOnce(&mut GroupRecord)) {
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        let before = record.clone();
        change(&mut record);
        self.announce_changes(&before, &record);
        if *self.deleted.lock().unwrap_or_else(|e| e.into_inner()) {
            self.changed.notify_all();
            return;
        }
        if let Err(e) = state::save(&self.paths, &record) {
            eprintln!("capsad: saving group {}: {e:#}", record.spec.name);
        }
        self.changed.notify_all();
    }

    pub fn emit_for(
        &self,
        group: &str,
        container: Option<&str>,
        action: &str,
        detail: Option<String>,
    ) {
        // Nobody listening is fine.
        let _ = self.events.send(Event {
            time: now_ms(),
            group: group.to_string(),
            container: container.map(str::to_string),
            action: action.to_string(),
            detail,
        });
    }

    /// Events for what a change did: the group's status, containers that
    /// started or exited.
    fn announce_changes(&self, before: &GroupRecord, after: &GroupRecord) {
        let name = &after.spec.name;
        if before.status != after.status {
            let action = match after.status {
                GroupStatus::Running => "started",
                GroupStatus::Stopped => "stopped",
                GroupStatus::Failed => "failed",
                GroupStatus::Created => "created",
            };
            self.emit_for(name, None, action, after.error.clone());
        }
        for (old, new) in before.containers.iter().zip(&after.containers) {
            if old.status != new.status {
                let (action, detail) = match new.status {
                    ContainerStatus::Running => ("started", None),
                    ContainerStatus::Exited => {
                        ("died", new.exit_code.map(|c| format!("exit code {c}")))
                    }
                    ContainerStatus::Created => continue,
                };
                self.emit_for(name, Some(&new.name), action, detail);
            }
        }
    }

    /// Whether `container` still runs the incarnation started at
    /// `started_at`.
    pub fn runs(&self, container: &str, started_at: u64) -> bool {
        self.snapshot().containers.iter().any(|c| {
            c.name == container
                && c.status == ContainerStatus::Running
                && c.started_at == Some(started_at)
        })
    }

    pub fn name(&self) -> String {
        self.snapshot().spec.name
    }

    pub fn ip(&self) -> Option<std::net::Ipv4Addr> {
        self.snapshot().ip
    }

    pub fn is_stopping(&self) -> bool {
        *self.stopping.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits `delay`; false when the group is being stopped or deleted
    /// meanwhile.
    pub fn pause(&self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            if self.is_stopping() || *self.deleted.lock().unwrap_or_else(|e| e.into_inner()) {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }

    fn snapshot(&self) -> GroupRecord {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub struct Daemon {
    pub root: PathBuf,
    pub images: ImageStore,
    vm: VmConfig,
    /// None when the daemon runs without networking (--no-network).
    network: Option<Network>,
    pub volumes: VolumeStore,
    /// Held from a start's checks until its group counts as running, so
    /// two starts cannot both claim one volume.
    starting: Mutex<()>,
    pub metrics: crate::metrics::Metrics,
    groups: Mutex<BTreeMap<String, Arc<Group>>>,
    next_exec: std::sync::atomic::AtomicU64,
    events: tokio::sync::broadcast::Sender<Event>,
}

/// A process started by `exec`, with its streams attached.
pub struct Exec {
    pub guest: Arc<Guest>,
    pub container: String,
    pub exec_id: String,
    pub stdin: Option<std::os::unix::net::UnixStream>,
    pub stdout: std::os::unix::net::UnixStream,
    pub stderr: Option<std::os::unix::net::UnixStream>,
}

impl Daemon {
    pub fn new(
        root: PathBuf,
        images: ImageStore,
        vm: VmConfig,
        network: Option<Network>,
        volumes: VolumeStore,
    ) -> Arc<Self> {
        Arc::new(Daemon {
            root,
            images,
            vm,
            network,
            volumes,
            starting: Mutex::new(()),
            metrics: Default::default(),
            groups: Mutex::new(BTreeMap::new()),
            next_exec: std::sync::atomic::AtomicU64::new(1),
            events: tokio::sync::broadcast::channel(1024).0,
        })
    }

    fn new_group(&self, paths: GroupPaths, record: GroupRecord) -> Arc<Group> {
        Arc::new(Group {
            paths,
            record: Mutex::new(record),
            guest: Mutex::new(None),
            changed: Condvar::new(),
            stopping: Mutex::new(false),
            deleted: Mutex::new(false),
            events: self.events.clone(),
            published: Mutex::new(Vec::new()),
        })
    }

    /// Gives a group its name in DNS and opens its published ports.
    fn connect(&self, group: &Group) -> Result<(), ApiError> {
        let (Some(network), record) = (&self.network, group.snapshot()) else {
            return Ok(());
        };
        let Some(ip) = record.ip else { return Ok(()) };
        let mut published = Vec::new();
        for container in &record.spec.containers {
            for port in &container.ports {
                let protocol = match port.protocol {
                    PortProtocol::Tcp => capsa_network::Protocol::Tcp,
                    PortProtocol::Udp => capsa_network::Protocol::Udp,
                };
                let listen = SocketAddr::new(port.host_ip, port.host_port);
                let target = SocketAddr::new(IpAddr::V4(ip), port.container_port);
                published.push(
                    network
                        .publish(protocol, listen, target)
                        .map_err(|e| error(ErrorCode::Conflict, e.to_string()))?,
                );
            }
        }
        *group.published.lock().unwrap_or_else(|e| e.into_inner()) = published;
        network.register_name(&record.spec.name, ip);
        Ok(())
    }

    fn disconnect(&self, group: &Group) {
        group
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        if let Some(network) = &self.network {
            network.forget_name(&group.snapshot().spec.name);
        }
    }

    fn group(&self, name: &str) -> Result<Arc<Group>, ApiError> {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| error(ErrorCode::NotFound, format!("no group {name:?}")))
    }

    fn all_groups(&self) -> Vec<Arc<Group>> {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn list(&self) -> Vec<GroupView> {
        self.all_groups()
            .iter()
            .map(|g| g.snapshot().view())
            .collect()
    }

    /// The running groups volume `name` is attached to.
    pub fn volume_users(&self, name: &str) -> Vec<String> {
        self.all_groups()
            .iter()
            .map(|g| g.snapshot())
            .filter(|r| r.status == GroupStatus::Running)
            .filter(|r| {
                r.spec
                    .volumes
                    .iter()
                    .any(|v| v.persistent.as_ref().is_some_and(|p| p.volume == name))
            })
            .map(|r| r.spec.name)
            .collect()
    }

    pub fn inspect(&self, name: &str) -> Result<GroupView, ApiError> {
        Ok(self.group(name)?.snapshot().view())
    }

    /// Who uses image `name`, if any group does.
    pub fn image_user(&self, name: &str) -> Option<String> {
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.values().find_map(|group| {
            let record = group.snapshot();
            let uses = record
                .spec
                .containers
                .iter()
                .any(|c| capsa_image_store::normalize_name(&c.image).is_ok_and(|n| n == name));
            uses.then(|| format!("group {}", record.spec.name))
        })
    }

    pub fn create(&self, spec: GroupSpec) -> Result<GroupView, ApiError> {
        let began = Instant::now();
        let view = self.create_group(spec)?;
        self.metrics
            .create_seconds
            .observe(began.elapsed().as_secs_f64());
        Ok(view)
    }

    fn create_group(&self, spec: GroupSpec) -> Result<GroupView, ApiError> {
        spec.validate().map_err(|e| ApiError {
            code: ErrorCode::InvalidSpec,
            message: "invalid container group spec".into(),
            details: e.problems,
        })?;
        let mut missing = Vec::new();
        for (i, container) in spec.containers.iter().enumerate() {
            if let Err(e) = self.images.summary(&container.image) {
                missing.push(format!("containers[{i}].image: {e}"));
            }
        }
        if !missing.is_empty() {
            return Err(ApiError {
                code: ErrorCode::ImageNotFound,
                message: "the spec names images the store does not have (capsa image import)"
                    .into(),
                details: missing,
            });
        }
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if groups.contains_key(&spec.name) {
            return Err(error(
                ErrorCode::AlreadyExists,
                format!("group {:?} already exists", spec.name),
            ));
        }
        let paths = GroupPaths::new(&self.root, &spec.name);
        let mut record = GroupRecord::new(spec);
        if let Some(network) = &self.network {
            let used = groups.values().filter_map(|g| g.snapshot().ip);
            record.ip = Some(
                network
                    .allocate(used)
                    .map_err(|e| error(ErrorCode::Conflict, e.to_string()))?,
            );
        }
        let group = self.new_group(paths, record);
        // Ports first: a taken one refuses the group before anything is
        // written.
        self.connect(&group)?;
        let record = group.snapshot();
        let saved = std::fs::create_dir_all(&group.paths.dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| state::save(&group.paths, &record));
        if let Err(e) = saved {
            self.disconnect(&group);
            return Err(internal(e));
        }
        let view = record.view();
        group.emit_for(&view.name, None, "created", None);
        groups.insert(view.name.clone(), group);
        Ok(view)
    }

    /// Boots the group's VM and starts its containers, telling `report`
    /// each step; returns once they run (or the start failed, which leaves
    /// the group Failed).
    pub fn start(
        self: &Arc<Self>,
        name: &str,
        report: &mut dyn FnMut(String),
    ) -> Result<GroupView, ApiError> {
        let began = Instant::now();
        let group = self.group(name)?;
        let starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        let record = group.snapshot();
        if record.status == GroupStatus::Running {
            return Err(error(
                ErrorCode::Conflict,
                format!("group {name:?} is already running"),
            ));
        }
        let running: Vec<GroupSpec> = self
            .all_groups()
            .iter()
            .map(|g| g.snapshot())
            .filter(|r| r.status == GroupStatus::Running && r.spec.name != record.spec.name)
            .map(|r| r.spec)
            .collect();
        let volumes = crate::volumes::plan(&self.volumes, &record.spec, &running)?;
        *group.stopping.lock().unwrap_or_else(|e| e.into_inner()) = false;
        let net = self
            .network
            .as_ref()
            .zip(record.ip)
            .map(|(network, ip)| network.nic(ip));
        let mut child = vm::spawn(
            &self.vm,
            &VmSpec {
                cpus: record.spec.cpus(),
                memory_mib: record.spec.memory_mib(),
                net,
                disks: &volumes.disks,
                vsock: &group.paths.vsock(),
                console: &group.paths.console(),
            },
        )
        .map_err(internal)?;
        let pid = child.id();
        report(format!(
            "booting the microVM: {} vCPU, {} MiB (VMM pid {pid})",
            record.spec.cpus(),
            record.spec.memory_mib()
        ));
        group.update(|r| {
            r.status = GroupStatus::Running;
            r.error = None;
            r.vmm_pid = Some(pid);
            r.started_at = Some(now_ms());
            for c in &mut r.containers {
                c.status = ContainerStatus::Created;
                c.exit_code = None;
                c.signal = None;
                c.oom_killed = false;
                c.started_at = None;
                c.finished_at = None;
            }
        });
        drop(starting);
        let (daemon, watched) = (self.clone(), group.clone());
        std::thread::spawn(move || {
            let status = child.wait();
            vm_exited(
                &daemon,
                &watched,
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string()),
            );
        });
        match self.run_containers(&group, volumes.sandbox, report) {
            Ok(()) => {
                self.metrics
                    .start_seconds
                    .observe(began.elapsed().as_secs_f64());
                Ok(group.snapshot().view())
            }
            Err(e) => {
                let message = e.message.clone();
                *group.stopping.lock().unwrap_or_else(|e| e.into_inner()) = true;
                vm::kill(pid);
                group.update(|r| {
                    r.status = GroupStatus::Failed;
                    r.error = Some(message);
                });
                Err(e)
            }
        }
    }

    fn run_containers(
        self: &Arc<Self>,
        group: &Arc<Group>,
        volumes: Vec<capsa_protocol::agent::Volume>,
        report: &mut dyn FnMut(String),
    ) -> Result<(), ApiError> {
        let record = group.snapshot();
        let booting = Instant::now();
        // A connect error is always unanswered: the console comes with it.
        let guest = Guest::connect(&group.paths.vsock(), BOOT_PATIENCE)
            .map_err(|e| guest_failed(group, "the guest did not answer", e))?;
        report(format!(
            "the guest agent answered after {} ms",
            booting.elapsed().as_millis()
        ));
        let guest = Arc::new(guest);
        let mut sandbox = capsa_protocol::agent::SetupSandboxRequest {
            hostname: record.spec.name.clone(),
            time_unix_ns: (now_ms() as i64) * 1_000_000,
            volumes,
            ..Default::default()
        };
        if let (Some(network), Some(ip)) = (&self.network, record.ip) {
            let gateway = network.gateway().to_string();
            sandbox.interfaces.push(capsa_protocol::agent::Interface {
                mac: capsa_network::mac_for(ip).to_string(),
                name: "eth0".into(),
                addresses: vec![format!("{ip}/{}", network.prefix_len())],
                ..Default::default()
            });
            sandbox.routes.push(capsa_protocol::agent::Route {
                destination: "default".into(),
                gateway: gateway.clone(),
                device: "eth0".into(),
                ..Default::default()
            });
            sandbox.dns = protobuf::MessageField::some(capsa_protocol::agent::Dns {
                servers: vec![gateway],
                ..Default::default()
            });
        }
        guest
            .setup_sandbox(&sandbox)
            .map_err(|e| guest_failed(group, "setting up the sandbox", e))?;
        *group.guest.lock().unwrap_or_else(|e| e.into_inner()) = Some(guest.clone());
        for container in &record.spec.containers {
            let copiers = self.launch(group, &guest, container, report)?;
            watch_container(
                self.clone(),
                group.clone(),
                guest.clone(),
                container.name.clone(),
                copiers,
            );
        }
        Ok(())
    }

    /// Creates and starts one container in the guest, its output going to
    /// its log.
    fn launch(
        &self,
        group: &Arc<Group>,
        guest: &Arc<Guest>,
        container: &ContainerSpec,
        report: &mut dyn FnMut(String),
    ) -> Result<Vec<JoinHandle<()>>, ApiError> {
        let image = OciImage::open(self.images.layout(), Some(&normalized(&container.image)))
            .map_err(internal)?;
        let pushing = Instant::now();
        let chain = guest
            .push_image(&image)
            .map_err(|e| guest_failed(group, &format!("container {}: image", container.name), e))?;
        report(format!(
            "container {}: image {} ({} layer(s)) in the guest after {} ms",
            container.name,
            container.image,
            image.layers.len(),
            pushing.elapsed().as_millis()
        ));
        let spec = oci_spec_for(&image, container).map_err(internal)?;
        guest
            .create(&container.name, &chain, &spec, Streams::OUTPUT)
            .map_err(|e| guest_failed(group, &format!("container {}", container.name), e))?;
        let copiers = attach_logs(group, guest, container)?;
        guest
            .start(&container.name)
            .map_err(|e| guest_failed(group, &format!("container {}", container.name), e))?;
        report(format!("container {} started", container.name));
        let started_at = now_ms();
        group.update(|r| {
            if let Some(c) = r.container_mut(&container.name) {
                c.status = ContainerStatus::Running;
                c.started_at = Some(started_at);
                c.exit_code = None;
                c.signal = None;
                c.oom_killed = false;
                c.finished_at = None;
            }
        });
        if let Some(probe) = &container.liveness_probe {
            crate::probes::watch(
                group.clone(),
                guest.clone(),
                container.name.clone(),
                probe.clone(),
                spec.process().clone().unwrap_or_default(),
                started_at,
            );
        }
        Ok(copiers)
    }

    /// Stops the containers (SIGTERM, SIGKILL after `grace`) and the VM.
    pub fn stop(&self, name: &str, grace: Duration) -> Result<GroupView, ApiError> {
        let group = self.group(name)?;
        stop_vm(&group, grace);
        Ok(group.snapshot().view())
    }

    pub fn delete(&self, name: &str) -> Result<(), ApiError> {
        let group = self
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .ok_or_else(|| error(ErrorCode::NotFound, format!("no group {name:?}")))?;
        *group.deleted.lock().unwrap_or_else(|e| e.into_inner()) = true;
        // Stopped, or on its way there: either way the VMM must be gone
        // before its files are.
        stop_vm(&group, Duration::from_secs(2));
        self.disconnect(&group);
        // Under the record's lock: no save is half done meanwhile.
        let record = group.record.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::remove_dir_all(&group.paths.dir).map_err(internal)?;
        group.emit_for(&record.spec.name, None, "deleted", None);
        Ok(())
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The VMM's host RSS and CPU time, and each running container's
    /// cgroup figures from the agent.
    pub fn stats(&self, name: &str) -> Result<GroupStats, ApiError> {
        let group = self.group(name)?;
        let record = group.snapshot();
        let guest = group
            .guest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (Some(pid), Some(guest)) = (record.vmm_pid, guest) else {
            return Err(error(
                ErrorCode::Conflict,
                format!("group {name:?} is not running"),
            ));
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let vmm_rss_kib = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // utime and stime: fields 14 and 15, the 12th and 13th after the
        // command's closing parenthesis.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
            .sum();
        // SAFETY: sysconf reads a constant and touches no memory of ours.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut containers = Vec::new();
        for container in record
            .containers
            .iter()
            .filter(|c| c.status == ContainerStatus::Running)
        {
            let stats = guest.stats(&container.name).map_err(internal)?;
            containers.push(ContainerStats {
                name: container.name.clone(),
                cpu_usage_usec: stats.cpu_usage_usec,
                memory_bytes: stats.memory_current_bytes,
                memory_limit_bytes: stats.memory_limit_bytes,
                pids: stats.pids_current,
            });
        }
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
        let io_field = |key: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let tap = |counter: &str| {
            record
                .ip
                .and_then(|ip| {
                    let tap = capsa_network::tap_name(ip);
                    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{counter}"))
                        .ok()
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        Ok(GroupStats {
            group: name.to_string(),
            vmm_rss_kib,
            vmm_cpu_seconds: ticks as f64 / per_second,
            net_from_guest_bytes: tap("rx_bytes"),
            net_to_guest_bytes: tap("tx_bytes"),
            block_read_bytes: io_field("read_bytes:"),
            block_write_bytes: io_field("write_bytes:"),
            containers,
        })
    }

    /// Blocks until `container` of `name` has exited.
    pub fn wait(&self, name: &str, container: &str) -> Result<WaitResponse, ApiError> {
        let group = self.group(name)?;
        let mut record = group.record.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let c = record
                .containers
                .iter()
                .find(|c| c.name == container)
                .ok_or_else(|| no_container(name, container))?;
            if c.status == ContainerStatus::Exited {
                return Ok(WaitResponse {
                    exit_code: c.exit_code.unwrap_or(-1),
                    signal: c.signal,
                    oom_killed: c.oom_killed,
                });
            }
            if matches!(record.status, GroupStatus::Failed | GroupStatus::Stopped)
                && c.status != ContainerStatus::Exited
            {
                return Err(error(
                    ErrorCode::Conflict,
                    format!(
                        "group {name:?} is {:?} and container {container:?} never exited: {}",
                        record.status,
                        record.error.clone().unwrap_or_default()
                    ),
                ));
            }
            record = group
                .changed
                .wait(record)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Starts `request.command` in a running container and attaches its
    /// streams (stdin when asked, stdout, and stderr unless on a terminal).
    pub fn exec_start(
        &self,
        name: &str,
        container: &str,
        request: &ExecRequest,
    ) -> Result<Exec, ApiError> {
        let group = self.group(name)?;
        let record = group.snapshot();
        let spec = record
            .spec
            .containers
            .iter()
            .find(|c| c.name == container)
            .ok_or_else(|| no_container(name, container))?;
        let running = record
            .containers
            .iter()
            .any(|c| c.name == container && c.status == ContainerStatus::Running);
        let guest = group
            .guest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (Some(guest), true) = (guest, running) else {
            return Err(error(
                ErrorCode::Conflict,
                format!("container {name}/{container} is not running"),
            ));
        };
        if request.command.is_empty() {
            return Err(error(ErrorCode::InvalidRequest, "exec needs a command"));
        }
        let image = OciImage::open(self.images.layout(), Some(&normalized(&spec.image)))
            .map_err(internal)?;
        let mut process = oci_spec_for(&image, spec)
            .map_err(internal)?
            .process()
            .clone()
            .unwrap_or_default();
        process.set_args(Some(request.command.clone()));
        process.set_terminal(Some(request.tty));
        if request.tty {
            process.set_console_size(Some(
                oci_spec::runtime::BoxBuilder::default()
                    .height(u64::from(request.rows.max(1)))
                    .width(u64::from(request.columns.max(1)))
                    .build()
                    .map_err(internal)?,
            ));
        }
        let exec_id = format!(
            "exec-{}",
            self.next_exec
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let streams = Streams {
            stdin: request.stdin,
            stdout: true,
            stderr: !request.tty,
        };
        guest
            .exec(container, &exec_id, &process, streams)
            .map_err(|e| error(ErrorCode::InvalidRequest, e.to_string()))?;
        let attach = |kind| guest.attach(container, &exec_id, kind).map_err(internal);
        let stdin = if request.stdin {
            Some(attach(StreamKind::Stdin)?)
        } else {
            None
        };
        let stdout = attach(StreamKind::Stdout)?;
        let stderr = if request.tty {
            None
        } else {
            Some(attach(StreamKind::Stderr)?)
        };
        Ok(Exec {
            guest,
            container: container.to_string(),
            exec_id,
            stdin,
            stdout,
            stderr,
        })
    }

    /// Whether `container` of `name` has exited (its log is then complete).
    pub fn wait_done(&self, name: &str, container: &str) -> bool {
        self.group(name).is_ok_and(|group| {
            group
                .snapshot()
                .containers
                .iter()
                .any(|c| c.name == container && c.status == ContainerStatus::Exited)
        })
    }

    /// The log file of a container, checking both exist.
    pub fn log_path(&self, name: &str, container: &str) -> Result<(PathBuf, Arc<Group>), ApiError> {
        let group = self.group(name)?;
        if !group
            .snapshot()
            .containers
            .iter()
            .any(|c| c.name == container)
        {
            return Err(no_container(name, container));
        }
        Ok((group.paths.log(container), group))
    }

    /// Loads the groups on disk; groups whose VMM still runs are adopted
    /// (their containers' exits watched again), the others marked failed.
    pub fn restore(self: &Arc<Self>) {
        for (paths, record) in state::load_all(&self.root) {
            let record = match record {
                Ok(record) => record,
                Err(e) => {
                    eprintln!("capsad: skipping {}: {e:#}", paths.dir.display());
                    continue;
                }
            };
            let name = record.spec.name.clone();
            let group = self.new_group(paths, record);
            if let Err(e) = self.connect(&group) {
                eprintln!("capsad: group {name}: {}", e.message);
                group.update(|r| r.error = Some(e.message.clone()));
            }
            self.groups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name, group.clone());
            adopt(self.clone(), group);
        }
    }
}

pub fn is_running(group: &Group) -> bool {
    group.snapshot().status == GroupStatus::Running
}

fn normalized(image: &str) -> String {
    capsa_image_store::normalize_name(image).unwrap_or_else(|_| image.to_string())
}

/// The OCI runtime spec for one container of the group spec.
fn oci_spec_for(image: &OciImage, container: &ContainerSpec) -> anyhow::Result<Spec> {
    let config = image.config.config().clone().unwrap_or_default();
    let mut spec = image.spec(container.args.as_deref())?;
    let mut process = spec.process().clone().unwrap_or_default();
    if let Some(command) = &container.command {
        let rest = container
            .args
            .clone()
            .unwrap_or_else(|| config.cmd().clone().unwrap_or_default());
        process.set_args(Some(command.iter().cloned().chain(rest).collect()));
    }
    let mut env = process.env().clone().unwrap_or_default();
    for (key, value) in &container.env {
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(format!("{key}={value}"));
    }
    process.set_env(Some(env));
    if let Some(dir) = &container.working_dir {
        process.set_cwd(dir.into());
    }
    process.set_terminal(Some(container.tty));
    spec.set_process(Some(process));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for mount in &container.volume_mounts {
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(&mount.mount_path)
                .source(Path::new(capsa_protocol::VOLUMES_DIR).join(&mount.name))
                .typ("bind")
                .options(vec![
                    "rbind".to_string(),
                    if mount.read_only { "ro" } else { "rw" }.to_string(),
                ])
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));
    let wants_resources = container.cpu_limit.is_some()
        || container.memory_limit_mib.is_some()
        || container.cpu_request.is_some()
        || container.memory_request_mib.is_some();
    if wants_resources {
        let mut resources = LinuxResourcesBuilder::default();
        if container.cpu_limit.is_some() || container.cpu_request.is_some() {
            let period = 100_000u64;
            let mut cpu = LinuxCpuBuilder::default();
            if let Some(cpus) = container.cpu_limit {
                cpu = cpu.period(period).quota((cpus * period as f64) as i64);
            }
            if let Some(cpus) = container.cpu_request {
                // 1024 shares per CPU, as Kubernetes maps requests.
                cpu = cpu.shares((cpus * 1024.0) as u64);
            }
            resources = resources.cpu(cpu.build()?);
        }
        if container.memory_limit_mib.is_some() || container.memory_request_mib.is_some() {
            let mut memory = LinuxMemoryBuilder::default();
            if let Some(mib) = container.memory_limit_mib {
                memory = memory.limit((mib << 20) as i64);
            }
            if let Some(mib) = container.memory_request_mib {
                memory = memory.reservation((mib << 20) as i64);
            }
            resources = resources.memory(memory.build()?);
        }
        let mut linux = spec
            .linux()
            .clone()
            .unwrap_or(LinuxBuilder::default().build()?);
        linux.set_resources(Some(resources.build()?));
        spec.set_linux(Some(linux));
    }
    Ok(spec)
}

/// Copies a container's output into its log, from where it is now: the
/// agent resends what an earlier daemon had not kept.
fn attach_logs(
    group: &Group,
    guest: &Guest,
    container: &ContainerSpec,
) -> Result<Vec<JoinHandle<()>>, ApiError> {
    let log = LogWriter::open(&group.paths.log(&container.name)).map_err(internal)?;
    // A terminal has one output stream.
    let streams: &[_] = if container.tty {
        &[(StreamKind::Stdout, "stdout")]
    } else {
        &[
            (StreamKind::Stdout, "stdout"),
            (StreamKind::Stderr, "stderr"),
        ]
    };
    let mut copiers = Vec::new();
    for &(kind, tag) in streams {
        let stream = guest
            .attach_acked(&container.name, "", kind)
            .map_err(internal)?;
        let log = log.clone();
        copiers.push(std::thread::spawn(move || {
            if let Err(e) = log.copy(tag, stream) {
                eprintln!("capsad: log of {}: {e}", log.path().display());
            }
        }));
    }
    Ok(copiers)
}

/// Waits for a container's exit (after its output reached the log),
/// starts it again when the restart policy says so, and stops the VM once
/// every container has exited for good.
fn watch_container(
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
            let signal = (exit.signal != 0).then_some(exit.signal);
            group.update(|r| {
                if let Some(c) = r.container_mut(&name) {
                    c.status = ContainerStatus::Exited;
                    c.exit_code = Some(exit.code);
                    c.signal = signal;
                    c.oom_killed = exit.oom_killed;
                    c.finished_at = Some(now_ms());
                }
            });
            let record = group.snapshot();
            if record.spec.restart_policy.restarts(exit.code, signal) && !group.is_stopping() {
                match restart_container(&daemon, &group, &guest, &record, &name) {
                    Some(Ok(restarted)) => {
                        copiers = restarted;
                        continue;
                    }
                    Some(Err(e)) => {
                        eprintln!(
                            "capsad: restarting {}/{name}: {}",
                            record.spec.name, e.message
                        );
                        group.update(|r| {
                            r.error = Some(format!("restarting {name}: {}", e.message))
                        });
                    }
                    // Stopped or deleted meanwhile.
                    None => return,
                }
            }
            let all_done = group
                .snapshot()
                .containers
                .iter()
                .all(|c| c.status == ContainerStatus::Exited);
            if all_done {
                stop_vm(&group, Duration::from_secs(2));
            }
            return;
        }
    });
}

/// How long the restart policy waits before the next restart: doubling
/// from one second up to a minute, and one second again after a run of
/// ten minutes or more.
fn backoff(restarts: u32, last_run: Option<Duration>) -> Duration {
    if last_run.is_some_and(|run| run >= Duration::from_secs(600)) {
        return Duration::from_secs(1);
    }
    Duration::from_secs(1u64 << restarts.min(6)).min(Duration::from_secs(60))
}

/// Waits out the back-off, then creates the container again; None when
/// the group was stopped or deleted meanwhile.
fn restart_container(
    daemon: &Daemon,
    group: &Arc<Group>,
    guest: &Arc<Guest>,
    record: &GroupRecord,
    name: &str,
) -> Option<Result<Vec<JoinHandle<()>>, ApiError>> {
    let container = record.containers.iter().find(|c| c.name == name)?;
    let spec = record.spec.containers.iter().find(|c| c.name == name)?;
    let last_run = container
        .started_at
        .zip(container.finished_at)
        .map(|(start, end)| Duration::from_millis(end.saturating_sub(start)));
    if !group.pause(backoff(container.restart_count, last_run)) {
        return None;
    }
    // The exited container's state goes; its log stays.
    let _ = guest.delete(name);
    let launched = daemon.launch(group, guest, spec, &mut |_| {});
    if launched.is_ok() {
        let mut count = 0;
        group.update(|r| {
            if let Some(c) = r.container_mut(name) {
                c.restart_count += 1;
                count = c.restart_count;
            }
        });
        group.emit_for(
            &record.spec.name,
            Some(name),
            "restarted",
            Some(format!("restart {count}")),
        );
    }
    Some(launched)
}

/// The VM failed: under a restart policy other than Never, boot the group
/// again after the back-off (again and again while it keeps failing).
fn restart_failed_group(daemon: &Arc<Daemon>, group: &Arc<Group>) {
    let record = group.snapshot();
    if record.spec.restart_policy == RestartPolicy::Never {
        return;
    }
    let (daemon, group) = (daemon.clone(), group.clone());
    std::thread::spawn(move || {
        if !group.pause(backoff(record.restart_count, None)) {
            return;
        }
        if group.snapshot().status != GroupStatus::Failed {
            return;
        }
        let name = record.spec.name.clone();
        group.update(|r| r.restart_count += 1);
        group.emit_for(&name, None, "restarted", group.snapshot().error);
        if let Err(e) = daemon.start(&name, &mut |_| {}) {
            eprintln!("capsad: restarting group {name}: {}", e.message);
            restart_failed_group(&daemon, &group);
        }
    });
}

fn stop_vm(group: &Arc<Group>, grace: Duration) {
    *group.stopping.lock().unwrap_or_else(|e| e.into_inner()) = true;
    let guest = group.guest.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(guest) = guest {
        let _ = guest.shutdown(grace);
    }
    let pid = group.snapshot().vmm_pid;
    if let Some(pid) = pid {
        let deadline = Instant::now() + grace + Duration::from_secs(10);
        while vm::is_our_vmm(pid, &group.paths.vsock()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if vm::is_our_vmm(pid, &group.paths.vsock()) {
            vm::kill(pid);
        }
    }
    group.update(|r| {
        if r.status == GroupStatus::Running {
            r.status = GroupStatus::Stopped;
        }
        r.vmm_pid = None;
    });
}

/// The VMM process ended: a failure unless the daemon was stopping it.
fn vm_exited(daemon: &Arc<Daemon>, group: &Arc<Group>, how: String) {
    let expected = group.is_stopping();
    group.guest.lock().unwrap_or_else(|e| e.into_inner()).take();
    let tail = vm::console_tail(&group.paths.console());
    let mut failed = false;
    group.update(|r| {
        if r.status != GroupStatus::Running {
            return;
        }
        r.vmm_pid = None;
        if expected {
            r.status = GroupStatus::Stopped;
        } else {
            failed = true;
            r.status = GroupStatus::Failed;
            r.error = Some(format!("the VMM exited ({how}); console:\n{tail}"));
        }
    });
    if failed {
        restart_failed_group(daemon, group);
    }
}

/// After a daemon restart: watch a running group's VMM and containers
/// again, or record that it died meanwhile.
fn adopt(daemon: Arc<Daemon>, group: Arc<Group>) {
    let record = group.snapshot();
    if record.status != GroupStatus::Running {
        return;
    }
    let alive = record
        .vmm_pid
        .is_some_and(|pid| vm::is_our_vmm(pid, &group.paths.vsock()));
    if !alive {
        group.update(|r| {
            r.status = GroupStatus::Failed;
            r.error = Some("the VMM exited while the daemon was down".into());
            r.vmm_pid = None;
        });
        return;
    }
    let pid = record.vmm_pid.unwrap_or_default();
    let guest = match Guest::connect(&group.paths.vsock(), Duration::from_secs(10)) {
        Ok(guest) => Arc::new(guest),
        Err(e) => {
            eprintln!(
                "capsad: group {}: cannot reach its agent: {e}",
                record.spec.name
            );
            return;
        }
    };
    *group.guest.lock().unwrap_or_else(|e| e.into_inner()) = Some(guest.clone());
    for container in &record.containers {
        if container.status != ContainerStatus::Running {
            continue;
        }
        let copiers = record
            .spec
            .containers
            .iter()
            .find(|c| c.name == container.name)
            .map(|spec| attach_logs(&group, &guest, spec))
            .transpose()
            .unwrap_or_else(|e| {
                eprintln!(
                    "capsad: group {}: reattaching {}'s output: {}",
                    record.spec.name, container.name, e.message
                );
                None
            })
            .unwrap_or_default();
        watch_container(
            daemon.clone(),
            group.clone(),
            guest.clone(),
            container.name.clone(),
            copiers,
        );
    }
    // Not our child any more: poll for its end.
    let watched = group.clone();
    std::thread::spawn(move || {
        while vm::is_our_vmm(pid, &watched.paths.vsock()) {
            std::thread::sleep(Duration::from_millis(500));
        }
        vm_exited(&daemon, &watched, "after the daemon restarted".into());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
