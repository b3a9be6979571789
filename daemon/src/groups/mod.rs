//! Container groups: each runs in a microVM of its own. The daemon starts
//! the VMM, hands the agent the images and the containers, copies their
//! output into logs, records exits, and stops the VM when nothing runs in
//! it any more. Calls here block; the HTTP layer runs them off its
//! threads.
//!
//! - `lifecycle`: the state machine every status change goes through;
//! - `group`: one group and its one lock;
//! - `start`: booting a group and launching its containers, stopping it;
//! - `restart`: the restart policy and its back-off;
//! - `adopt`: groups found again after a daemon restart;
//! - `networks`: the group networks the API makes and removes;
//! - `exec`, `stats`, `oci`: processes started in a container, figures,
//!   and the OCI runtime spec made of a container spec.

pub mod admission;
mod adopt;
mod copy;
mod exec;
mod group;
pub mod layers;
pub mod lifecycle;
mod networks;
mod oci;
mod restart;
mod start;
mod stats;
mod system;
mod templates;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsa_api::{
    ApiError, ContainerStatus, ErrorCode, Event, GroupSpec, GroupStatus, GroupView, PortProtocol,
    ProcessView, WaitResponse,
};
use capsa_image_store::layer_images::LayerImages;
use capsa_image_store::ImageStore;
use capsa_network::Networks;
use capsa_volumes::VolumeStore;

use crate::errors::{
    conflict, error, guest_failed, internal, network_error, no_container, no_group, refused,
    store_error,
};
use crate::state::{self, GroupPaths, GroupRecord};
use capsa_vm_process::VmConfig;
pub use exec::Exec;
pub use group::{ContainerInput, Group, Hold};
use lifecycle::group_word;

/// How long containers get between SIGTERM and SIGKILL when a group stops.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a call on a running group waits for a restarted daemon to
/// reach its agent again (adoption gives the agent 10 s to answer).
pub const ADOPTION_PATIENCE: Duration = Duration::from_secs(15);

pub struct Daemon {
    pub root: PathBuf,
    pub images: ImageStore,
    /// Each image layer as an EROFS disk image, converted once.
    pub layer_images: LayerImages,
    vm: VmConfig,
    /// None when the daemon runs without networking (--no-network).
    pub(crate) network: Option<Networks>,
    pub volumes: VolumeStore,
    /// Held from a start's checks until its group counts as running, so
    /// two starts cannot both claim one volume.
    starting: Mutex<()>,
    pub metrics: crate::metrics::Metrics,
    groups: Mutex<BTreeMap<String, Arc<Group>>>,
    /// Exec ids name processes in guests that outlive this daemon: they
    /// count up from its start time (milliseconds times 1000), so that a
    /// restarted daemon never reuses one an earlier daemon gave (seen: a
    /// daemon's first exec after a restart refused, "exec-1 already exists").
    next_exec: std::sync::atomic::AtomicU64,
    events: tokio::sync::broadcast::Sender<Event>,
    pub settings: Settings,
    /// Which tenant made each group, volume and network.
    pub owners: crate::tenants::owners::Owners,
    /// Held across a tenant's quota check and its create.
    pub(crate) tenancy: Mutex<()>,
}

/// capsad's settings for what it runs and fetches.
#[derive(Debug, Default)]
pub struct Settings {
    /// Docker Hub mirrors pulls ask first (capsad --registry-mirror).
    pub registry_mirrors: Vec<String>,
    /// The parent of the VMs' cgroups, where the host has cgroup v2.
    pub cgroups: Option<capsa_cgroup::Hierarchy>,
    /// The VM sizes and the memory this host takes.
    pub capacity: admission::Capacity,
    /// The ids the VMMs' jails run as, one per group; None runs VMMs
    /// unjailed.
    pub jail_ids: Option<capsa_jail::IdRange>,
    /// The jail id of the VMs that templates are built from (none of a
    /// group's).
    pub template_jail_id: Option<u32>,
    /// The microVM templates group starts restore clones of; None boots
    /// every VM from its kernel (capsad --templates off).
    pub templates: Option<capsa_templates::Templates>,
    /// The rate limits of groups whose spec sets none.
    pub default_disk_rate: Option<capsa_api::RateLimitSpec>,
    pub default_network_rate: Option<capsa_api::RateLimitSpec>,
}

impl Settings {
    /// The limits `spec`'s disks and network interface are held to.
    pub fn rates(
        &self,
        spec: &GroupSpec,
    ) -> (
        Option<capsa_api::RateLimitSpec>,
        Option<capsa_api::RateLimitSpec>,
    ) {
        (
            spec.disk_rate_limit.or(self.default_disk_rate),
            spec.network_rate_limit.or(self.default_network_rate),
        )
    }
}

/// A spec's rate limit as the VMM takes it.
pub fn vmm_rate(limit: &capsa_api::RateLimitSpec) -> capsa_vmm_config::RateLimit {
    capsa_vmm_config::RateLimit {
        bytes_per_sec: limit.bytes_per_sec,
        ops_per_sec: limit.ops_per_sec,
        burst_ms: limit.burst_ms.unwrap_or(capsa_vmm_config::DEFAULT_BURST_MS),
    }
}

impl Daemon {
    pub fn new(
        root: PathBuf,
        images: ImageStore,
        layer_images: LayerImages,
        vm: VmConfig,
        network: Option<Networks>,
        volumes: VolumeStore,
        settings: Settings,
    ) -> std::io::Result<Arc<Self>> {
        let owners = crate::tenants::owners::Owners::open(&root)?;
        Ok(Arc::new(Daemon {
            root,
            images,
            layer_images,
            vm,
            network,
            volumes,
            starting: Mutex::new(()),
            metrics: Default::default(),
            groups: Mutex::new(BTreeMap::new()),
            next_exec: std::sync::atomic::AtomicU64::new(
                crate::state::now_ms().saturating_mul(1000),
            ),
            events: tokio::sync::broadcast::channel(1024).0,
            settings,
            owners,
            tenancy: Mutex::new(()),
        }))
    }

    fn new_group(&self, paths: GroupPaths, record: GroupRecord) -> Arc<Group> {
        Group::new(paths, record, self.events.clone())
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
                        .map_err(conflict)?,
                );
            }
        }
        network
            .attach(record.spec.network(), &record.spec.name, ip)
            .map_err(network_error)?;
        group.lock().published = published;
        Ok(())
    }

    /// The opposite of `connect`: ports closed, name gone, tap closed.
    fn disconnect(&self, group: &Group) {
        group.lock().published.clear();
        let record = group.snapshot();
        if let (Some(network), Some(ip)) = (&self.network, record.ip) {
            if let Err(e) = network.detach(record.spec.network(), &record.spec.name, ip) {
                tracing::warn!("group {}: {e}", record.spec.name);
            }
        }
    }

    /// The groups on network `name`, whatever their state.
    pub fn network_users(&self, name: &str) -> Vec<String> {
        self.all_groups()
            .iter()
            .map(|g| g.snapshot().spec)
            .filter(|spec| spec.network() == name)
            .map(|spec| spec.name)
            .collect()
    }

    pub fn group(&self, name: &str) -> Result<Arc<Group>, ApiError> {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| no_group(name))
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

    /// The image the store knows as `name`.
    pub fn open_image(&self, name: &str) -> Result<capsa_guest_client::OciImage, ApiError> {
        let summary = self.images.summary(name).map_err(store_error)?;
        capsa_guest_client::OciImage::open_manifest(self.images.layout(), &summary.manifest_digest)
            .map_err(internal)
    }

    /// Who uses image `name`, if any group does.
    pub fn image_user(&self, name: &str) -> Option<String> {
        self.all_groups().iter().find_map(|group| {
            let record = group.snapshot();
            let uses = record
                .spec
                .all_containers()
                .any(|c| capsa_image_store::normalize_name(&c.image).is_ok_and(|n| n == name));
            uses.then(|| format!("group {}", record.spec.name))
        })
    }

    /// Creates a group made by `owner` (a tenant; None for the admin).
    pub fn create(&self, spec: GroupSpec, owner: Option<&str>) -> Result<GroupView, ApiError> {
        let began = Instant::now();
        let view = self.create_group(spec, owner)?;
        self.metrics
            .create_seconds
            .observe(began.elapsed().as_secs_f64());
        Ok(view)
    }

    fn create_group(&self, spec: GroupSpec, owner: Option<&str>) -> Result<GroupView, ApiError> {
        spec.validate().map_err(|e| ApiError {
            code: ErrorCode::InvalidSpec,
            message: "invalid container group spec".into(),
            details: e.problems,
        })?;
        let too_big = self.settings.capacity.check_spec(&spec);
        if !too_big.is_empty() {
            return Err(ApiError {
                code: ErrorCode::InvalidSpec,
                message: "the group's VM is larger than this daemon allows".into(),
                details: too_big,
            });
        }
        let mut missing = Vec::new();
        for (i, container) in spec.containers.iter().enumerate() {
            if let Err(e) = self.images.summary(&container.image) {
                missing.push(format!("containers[{i}].image: {e}"));
            }
        }
        for (i, container) in spec.init_containers.iter().enumerate() {
            if let Err(e) = self.images.summary(&container.image) {
                missing.push(format!("initContainers[{i}].image: {e}"));
            }
        }
        if !missing.is_empty() {
            return Err(ApiError {
                code: ErrorCode::ImageNotFound,
                message: "the spec names images the store does not have (capsa image pull or capsa image import)"
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
            let used = groups.values().filter_map(|g| g.ip());
            record.ip = Some(
                network
                    .allocate(record.spec.network(), used)
                    .map_err(network_error)?,
            );
        }
        if let Some(ids) = self.settings.jail_ids {
            let used = groups.values().filter_map(|g| g.snapshot().jail_id);
            record.jail_id = Some(ids.lowest_free(used).ok_or_else(|| {
                conflict(format!(
                    "all {} jail ids (from {}) are taken: delete a group, or give capsad more (--jail-ids)",
                    ids.count, ids.first
                ))
            })?);
        }
        let group = self.new_group(paths, record);
        // Ports first: a taken one refuses the group before anything is
        // written.
        self.connect(&group)?;
        let record = group.snapshot();
        // The owner first: the name may have an entry left by an earlier
        // group of another tenant, which must not see this one.
        let saved = self
            .owners
            .set(
                crate::tenants::owners::Kind::Group,
                &record.spec.name,
                owner,
            )
            .and_then(|()| std::fs::create_dir_all(&group.paths.dir))
            .map_err(anyhow::Error::from)
            .and_then(|()| state::save(&group.paths, &record));
        if let Err(e) = saved {
            self.disconnect(&group);
            return Err(internal(e));
        }
        let view = record.view();
        group.emit(None, "created", None);
        groups.insert(view.name.clone(), group);
        Ok(view)
    }

    /// Stops the containers (SIGTERM, SIGKILL after `grace`) and the VM.
    pub fn stop(&self, name: &str, grace: Duration) -> Result<GroupView, ApiError> {
        let group = self.group(name)?;
        start::stop_vm(&group, grace);
        Ok(group.snapshot().view())
    }

    /// Stops the group's VM, releases its address and ports, removes its
    /// files, and only then its name: a client told the group is gone
    /// (a 404) finds nothing of it left.
    pub fn delete(&self, name: &str) -> Result<(), ApiError> {
        let group = self.group(name)?;
        // One deleter: the first to record it.
        group
            .transition(lifecycle::Transition::Delete)
            .map_err(refused)?;
        // Stopped, or on its way there: either way the VMM must be gone
        // before its files are.
        start::stop_vm(&group, Duration::from_secs(2));
        self.disconnect(&group);
        // Under the group's lock: no save is half done meanwhile (none
        // comes after Delete).
        let state = group.lock();
        let removed = std::fs::remove_dir_all(&group.paths.dir).map_err(internal);
        drop(state);
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if groups.get(name).is_some_and(|g| Arc::ptr_eq(g, &group)) {
            groups.remove(name);
        }
        drop(groups);
        removed?;
        group.emit(None, "deleted", None);
        Ok(())
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Sends `signal` to the main process of `container` of `name`, which
    /// must be running; its exit, if it exits, is recorded as any other
    /// (the restart policy applies).
    pub fn kill(&self, name: &str, container: &str, signal: i32) -> Result<(), ApiError> {
        let group = self.group(name)?;
        let guest = self.running_guest(&group, name, container)?;
        guest
            .signal(container, "", signal)
            .map_err(|e| guest_failed(&group.paths.console(), "signalling it", e))
    }

    /// The processes of `container` of `name`, which must be running.
    pub fn top(&self, name: &str, container: &str) -> Result<Vec<ProcessView>, ApiError> {
        let group = self.group(name)?;
        let guest = self.running_guest(&group, name, container)?;
        let processes = guest
            .process_table(container)
            .map_err(|e| guest_failed(&group.paths.console(), "listing its processes", e))?;
        Ok(processes
            .into_iter()
            .map(|p| ProcessView {
                pid: p.pid,
                uid: p.uid,
                command: p.command,
            })
            .collect())
    }

    /// The guest of `group`, whose `container` must be running.
    fn running_guest(
        &self,
        group: &Group,
        name: &str,
        container: &str,
    ) -> Result<Arc<capsa_guest_client::Guest>, ApiError> {
        let guest = group.guest_within(ADOPTION_PATIENCE);
        let record = group.snapshot();
        let Some(c) = record.containers.iter().find(|c| c.name == container) else {
            return Err(no_container(name, container));
        };
        guest
            .filter(|_| c.status == ContainerStatus::Running)
            .ok_or_else(|| {
                conflict(format!(
                    "container {container:?} of {name:?} is not running"
                ))
            })
    }

    /// Blocks until `container` of `name` has exited.
    pub fn wait(&self, name: &str, container: &str) -> Result<WaitResponse, ApiError> {
        let group = self.group(name)?;
        group.wait_for(|record| {
            let Some(c) = record.containers.iter().find(|c| c.name == container) else {
                return Some(Err(no_container(name, container)));
            };
            if c.status == ContainerStatus::Exited {
                return Some(Ok(WaitResponse {
                    exit_code: c.exit_code.unwrap_or(-1),
                    signal: c.signal,
                    oom_killed: c.oom_killed,
                }));
            }
            if matches!(record.status, GroupStatus::Failed | GroupStatus::Stopped) {
                return Some(Err(conflict(format!(
                    "group {name:?} is {} and container {container:?} never exited: {}",
                    group_word(record.status),
                    record.error.clone().unwrap_or_default()
                ))));
            }
            None
        })
    }

    /// Whether `container` of `name` has exited (its log is then complete).
    pub fn wait_done(&self, name: &str, container: &str) -> bool {
        self.group(name).is_ok_and(|group| {
            let record = group.snapshot();
            record
                .containers
                .iter()
                .chain(&record.init_containers)
                .any(|c| c.name == container && c.status == ContainerStatus::Exited)
        })
    }

    /// The log file of a container, checking both exist.
    pub fn log_path(&self, name: &str, container: &str) -> Result<(PathBuf, Arc<Group>), ApiError> {
        let group = self.group(name)?;
        let record = group.snapshot();
        if !record
            .containers
            .iter()
            .chain(&record.init_containers)
            .any(|c| c.name == container)
        {
            return Err(no_container(name, container));
        }
        Ok((group.paths.log(container), group))
    }
}
