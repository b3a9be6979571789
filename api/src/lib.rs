//! The daemon's API types, shared by `capsad` and `capsa`: the container
//! group spec (modelled on Azure Container Instances' container group),
//! what the daemon reports about groups and images, and its errors.

pub mod aci;
pub mod exec;
pub mod openapi;
pub mod rate;
pub mod signal;
pub mod spec;

use serde::{Deserialize, Serialize};

pub use rate::RateLimitSpec;
pub use spec::{
    ContainerSpec, EmptyDirSpec, ExecProbe, GroupSpec, PersistentSpec, PortProtocol, PortSpec,
    Probe, RestartPolicy, SpecError, TcpProbe, VolumeMount, VolumeSpec, DEFAULT_NETWORK,
    MIN_VOLUME_MIB,
};

/// The API's path prefix; bumped with any change an older client would
/// misread.
pub const API_PREFIX: &str = "/v1";

/// `GET /v1/version`: capsad's version, and who the caller is to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Version")]
pub struct VersionView {
    pub version: String,
    /// The API's path prefix without its slash ("v1").
    pub api: String,
    /// The caller's tenant; none for the host's admin (the Unix socket).
    pub tenant: Option<String>,
}

/// Every error the API returns: a stable code for programs and a message
/// for people.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename = "Error")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Field-level problems of a rejected spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidSpec,
    InvalidRequest,
    NotFound,
    AlreadyExists,
    Conflict,
    ImageNotFound,
    /// No credentials, or credentials capsad does not know (TLS listener).
    Unauthorized,
    /// What this caller may not do (a tenant importing from a host path).
    Forbidden,
    /// Would take a tenant past its quota.
    QuotaExceeded,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidSpec | ErrorCode::InvalidRequest => 400,
            ErrorCode::NotFound | ErrorCode::ImageNotFound => 404,
            ErrorCode::AlreadyExists | ErrorCode::Conflict => 409,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden | ErrorCode::QuotaExceeded => 403,
            ErrorCode::Internal => 500,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        for detail in &self.details {
            write!(f, "\n  {detail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupStatus {
    Created,
    Running,
    Stopped,
    Failed,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ContainerStatus {
    Created,
    Running,
    Exited,
}

/// Also the daemon's record of a container on disk: records written
/// before the API's one casing (snake_case fields) still load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Container")]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub status: ContainerStatus,
    #[serde(alias = "exit_code")]
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    #[serde(alias = "oom_killed")]
    pub oom_killed: bool,
    /// Unix milliseconds.
    #[serde(alias = "started_at")]
    pub started_at: Option<u64>,
    #[serde(alias = "finished_at")]
    pub finished_at: Option<u64>,
    /// Times the restart policy has started it again.
    #[serde(default)]
    #[serde(alias = "restart_count")]
    pub restart_count: u32,
    /// Running, and passing its readiness probe if it has one.
    #[serde(default)]
    pub ready: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Group")]
pub struct GroupView {
    pub name: String,
    pub status: GroupStatus,
    /// Why the group failed, when it did.
    pub error: Option<String>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub vmm_pid: Option<u32>,
    /// The group's address on the daemon's network.
    pub ip: Option<std::net::Ipv4Addr>,
    pub restart_policy: RestartPolicy,
    /// Times the restart policy has booted the group again after its VM
    /// failed (a VMM crash or a guest kernel panic).
    #[serde(default)]
    pub restart_count: u32,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub containers: Vec<ContainerView>,
    /// The init containers' runs at the last start, in their order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<ContainerView>,
    /// The template its running microVM was restored from; none when it
    /// booted from its kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The spec it was created from, whole: `capsa create -f` takes it
    /// (or this whole view) back.
    pub spec: GroupSpec,
}

/// A named persistent volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Volume")]
pub struct VolumeView {
    pub name: String,
    pub size_bytes: u64,
    pub created_at: u64,
    /// The running groups it is attached to.
    #[serde(default)]
    pub attached_to: Vec<String>,
}

/// A group network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Network")]
pub struct NetworkView {
    pub name: String,
    pub subnet: String,
    pub gateway: std::net::Ipv4Addr,
    pub bridge: String,
    /// Whether its groups reach beyond the host.
    pub egress: bool,
    pub created_at: u64,
    /// The groups on it.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// Creates a network; its subnet is the first free /24 of 10.89.0.0/16
/// unless given, and it has egress unless told not to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

/// Creates a volume, or grows one to `size_mib`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeRequest {
    pub name: String,
    pub size_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeGrowRequest {
    pub size_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Image")]
pub struct ImageView {
    pub name: String,
    pub digest: String,
    pub size: u64,
    pub layers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportRequest {
    /// An OCI layout directory, an oci-archive tar or a docker-save tar,
    /// on the daemon's host.
    pub path: String,
    /// The name to give it (for a docker save, its own tag by default).
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PullRequest {
    /// `[registry/]repository[:tag|@digest]`.
    pub reference: String,
    /// The name to tag it with (the reference by default).
    pub name: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Plain HTTP (always for localhost and 127.0.0.1).
    #[serde(default)]
    pub insecure: bool,
}

/// `POST /v1/images/push`: an image of the store to a registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PushRequest {
    pub name: String,
    /// `registry/repository[:tag]`; the name unless given.
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Plain HTTP (always for localhost and 127.0.0.1).
    #[serde(default)]
    pub insecure: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Push")]
pub struct PushView {
    pub target: String,
    /// The manifest's digest.
    pub digest: String,
}

/// `POST /v1/images/tag`: another name for an image of the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TagRequest {
    pub source: String,
    pub target: String,
}

/// What a prune removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Prune")]
pub struct PruneView {
    /// Groups deleted (stopped or failed ones; `system prune`).
    pub groups: Vec<String>,
    /// Image names removed.
    pub images: Vec<String>,
    /// Bytes of blobs and layer disk images freed.
    pub bytes_freed: u64,
}

/// `GET /v1/system/df`: what the host's disk holds for capsad.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "DiskUsage")]
pub struct DiskUsageView {
    pub images: u64,
    /// Bytes of the store's blobs.
    pub image_bytes: u64,
    /// Bytes of images no group uses (an image prune frees them, less
    /// what other images share).
    pub unused_image_bytes: u64,
    /// Bytes of the layers' disk images (the VMs' read-only disks).
    pub layer_disk_bytes: u64,
    pub volumes: u64,
    /// Bytes the volumes' files hold on the host (sparse files count what
    /// is written).
    pub volume_bytes: u64,
    pub groups: u64,
    /// Bytes of the groups' directories (logs, scratch disks, consoles).
    pub group_bytes: u64,
}

/// `GET /v1/system/info`: capsad and what it runs; a tenant sees its own
/// share and its quota.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "SystemInfo")]
pub struct SystemInfoView {
    pub version: String,
    /// The caller's tenant; none for the host's admin.
    pub tenant: Option<String>,
    pub groups: u64,
    pub running: u64,
    pub volumes: u64,
    pub networks: u64,
    /// vCPUs and memory of the groups counted.
    pub vcpus: u64,
    pub memory_mib: u64,
    /// The tenant's quota (the admin has none).
    pub quota: Option<QuotaView>,
    /// The host's side (the admin only): images, and what one VM may have.
    pub images: Option<u64>,
    pub max_vm_memory_mib: Option<u64>,
    pub max_vm_cpus: Option<u8>,
    pub memory_budget_mib: Option<u64>,
    /// The microVM templates kept (the admin only): a VM booted to its
    /// agent and snapshotted, restored at the start of a group of its
    /// shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<Vec<TemplateView>>,
}

/// A microVM template: what it was built for, and when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Template")]
pub struct TemplateView {
    pub id: String,
    pub cpus: u8,
    pub memory_mib: u64,
    /// Whether it has a network interface (capsad with networking).
    pub nic: bool,
    /// Unix milliseconds.
    pub built_at: u64,
    /// Boot to snapshot, in milliseconds.
    pub build_ms: u64,
    /// Bytes its files hold on disk (the memory file is sparse).
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Quota")]
pub struct QuotaView {
    pub groups: Option<u64>,
    pub vcpus: Option<u64>,
    pub memory_mib: Option<u64>,
    pub volume_mib: Option<u64>,
}

/// `POST /v1/registries/login`: whether a registry takes these
/// credentials (capsad keeps none: each pull carries its own).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoginRequest {
    /// host[:port], or `docker.io`.
    pub registry: String,
    pub username: String,
    pub password: String,
    /// Plain HTTP (always for localhost and 127.0.0.1).
    #[serde(default)]
    pub insecure: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Login")]
pub struct LoginView {
    pub registry: String,
    pub username: String,
}

/// The media type that asks a long operation (image import and pull,
/// group start) for its progress as it goes.
pub const PROGRESS_MEDIA_TYPE: &str = "application/x-ndjson";

/// One line of a long operation's response stream (JSON lines), for a
/// client that accepts PROGRESS_MEDIA_TYPE: progress, then the result or
/// the error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
#[schemars(rename = "ProgressEvent")]
pub enum ProgressEvent<T> {
    Progress(String),
    /// Bytes of one blob moved so far (pulls and imports).
    Transfer(Transfer),
    Result(T),
    Error(ApiError),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transfer {
    /// The blob's digest.
    pub id: String,
    pub done: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Exit")]
pub struct WaitResponse {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
}

/// One line of a container's log, as stored and as `logs` streams it
/// (JSON lines).
/// One process of a running container (`capsa top`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "Process")]
pub struct ProcessView {
    /// As the container sees it.
    pub pid: u32,
    pub uid: u32,
    /// Its arguments joined by spaces (the name in brackets when it has
    /// none), as the guest reports them.
    pub command: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogLine {
    /// Unix milliseconds when the daemon received it.
    pub time: u64,
    pub stream: String,
    pub line: String,
    /// A piece of a longer line (at most 16 KiB each, as docker's): the
    /// next record of its stream continues it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// Something that happened to a group, as `GET /v1/events` streams it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Unix milliseconds.
    pub time: u64,
    pub group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// created, started, died, stopped, failed, deleted.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What a group uses now: its VMM on the host, and each running
/// container's cgroup in the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupStats {
    pub group: String,
    pub vmm_rss_kib: u64,
    /// The VMM's resident memory outside the guest's: its own overhead.
    #[serde(default)]
    pub vmm_overhead_kib: u64,
    pub vmm_cpu_seconds: f64,
    /// Bytes through the group's network interface, as the host's tap
    /// counts them: received from the guest, and sent to it.
    #[serde(default)]
    pub net_from_guest_bytes: u64,
    #[serde(default)]
    pub net_to_guest_bytes: u64,
    /// Storage I/O of the VMM process (its disks, mostly).
    #[serde(default)]
    pub block_read_bytes: u64,
    #[serde(default)]
    pub block_write_bytes: u64,
    /// The rate limits its VM's disks and network interface are held to
    /// (the spec's, or capsad's defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_rate_limit: Option<RateLimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_rate_limit: Option<RateLimitSpec>,
    pub containers: Vec<ContainerStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStats {
    pub name: String,
    pub cpu_usage_usec: u64,
    pub memory_bytes: u64,
    /// 0: no limit.
    pub memory_limit_bytes: u64,
    pub pids: u64,
}
