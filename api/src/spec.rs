//! The container group spec, JSON (or YAML), with unknown fields refused
//! and every problem reported with the field it is in.

use std::collections::BTreeMap;

use indexmap::IndexMap;

use serde::{Deserialize, Serialize};

pub const DEFAULT_CPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 256;
const MAX_CPUS: u8 = 64;
const MIN_MEMORY_MIB: u64 = 64;
/// The least cpuLimit: cgroup v2 takes no cpu.max quota under 1 ms of
/// its 100 ms period.
const MIN_CPU_LIMIT: f64 = 0.01;
/// The writable layers' disk when the spec does not size it.
pub const DEFAULT_SCRATCH_MIB: u64 = 10 << 10;
const MIN_SCRATCH_MIB: u64 = 64;
/// An ext4 volume smaller than this has no room for its journal.
pub const MIN_VOLUME_MIB: u64 = 8;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GroupSpec {
    pub name: String,
    pub containers: Vec<ContainerSpec>,
    /// vCPUs of the group's microVM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// The host CPU time the whole VM may use, in CPUs (0.5: half of one),
    /// held by its VMM's cgroup (`cpu.max`); its vCPUs unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// What happens when a container exits or the VM fails (ACI's
    /// restartPolicy); Never unless given.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Volumes the containers may mount (volumeMounts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    /// MiB of the disk that holds the containers' writable layers (a
    /// sparse file on the host, made afresh at each boot); 0 for no disk:
    /// the writable layers are then a tmpfs in the VM's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_mib: Option<u64>,
    /// Each of the VM's disks (volumes, image layers, scratch) is held to
    /// this; capsad's default where not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_rate_limit: Option<crate::RateLimitSpec>,
    /// The VM's network interface is held to this, each way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_rate_limit: Option<crate::RateLimitSpec>,
    /// The network the group joins (`capsa network create`); the default
    /// network unless given. Groups of one network reach each other by
    /// name; groups of different networks cannot exchange a packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Delete the group, its logs and its scratch disk once its VM has
    /// stopped (every container exited, the group stopped, or the VM
    /// failed) and no client waits on it: `capsa run --rm`, done by capsad
    /// whether or not a client is still there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_remove: bool,
    /// Boot the group's microVM from its kernel at every start, never
    /// restoring it from one of capsad's templates.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold_boot: bool,
    /// Run one after another to completion, each exiting 0, before the
    /// containers start, at each start of the group (Kubernetes' and ACI's
    /// initContainers); one that fails fails the start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<ContainerSpec>,
}

/// The network of a group whose spec names none.
pub const DEFAULT_NETWORK: &str = "default";

/// Capabilities a container may be given beyond Docker's default set
/// (`capAdd`), by their names without `CAP_`. Inside a microVM they reach
/// the guest's kernel, which is the boundary, not the host's.
pub const ADDABLE_CAPABILITIES: &[&str] = &[
    "NET_ADMIN",
    "NET_RAW",
    "SYS_ADMIN",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_PTRACE",
    "SYS_BOOT",
    "SYS_TIME",
    "SYS_RESOURCE",
    "SYS_NICE",
    "IPC_LOCK",
    "MKNOD",
    "DAC_READ_SEARCH",
    "LINUX_IMMUTABLE",
    "SYSLOG",
];

/// A volume of the group: exactly one of its sources is given.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeSpec {
    pub name: String,
    /// A tmpfs in the guest, shared by the containers that mount it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirSpec>,
    /// Files (name to base64 content), mode 0400 on a tmpfs in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<BTreeMap<String, String>>,
    /// A named volume on the host (an ext4 image attached as a disk); kept
    /// until `capsa volume rm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<PersistentSpec>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EmptyDirSpec {
    /// No limit beyond the guest's memory unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PersistentSpec {
    /// The named volume.
    pub volume: String,
    /// Creates the volume with this size when it does not exist yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
    #[serde(default)]
    pub read_only: bool,
}

/// Where a container sees one of the group's volumes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(
    Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum RestartPolicy {
    /// Containers are started again whenever they exit.
    Always,
    /// Containers that exit with a non-zero code or a signal are started
    /// again, and a group whose VM failed is booted again.
    OnFailure,
    #[default]
    Never,
}

impl RestartPolicy {
    /// Whether a container that ended this way is started again.
    pub fn restarts(self, exit_code: i32, signal: Option<i32>) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0 || signal.is_some(),
            RestartPolicy::Never => false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// In the order given: after the image's, and overriding its.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub env: IndexMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Replaces the image's user: `user[:group]`, each a name (looked up
    /// in the container's /etc/passwd and /etc/group) or a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Replaces the image's stop signal (`SIGTERM` when neither gives
    /// one): a name, with or without `SIG`, or a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// CPU limit, in CPUs (0.5 = half of one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
    /// CPUs the container is guaranteed a share of (its cgroup's weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_request: Option<f64>,
    /// Memory protected from reclaim (its cgroup's memory.low).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_request_mib: Option<u64>,
    /// Give the container a terminal.
    #[serde(default)]
    pub tty: bool,
    /// Keep its standard input open, for clients that attach (`capsa run
    /// -i`, `capsa attach`); closed when one ends its input.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// Ports of the container published on the host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Capabilities beyond Docker's default set, such as `NET_ADMIN` (see
    /// `ADDABLE_CAPABILITIES`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Killed (and restarted as the restart policy says) when this keeps
    /// failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,
    /// The container counts as ready (its view's `ready`, an event when
    /// that changes) only while this passes; it is never killed for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
}

/// A health check: exactly one of exec and tcpSocket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Probe {
    /// Healthy when this command, run in the container, exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbe>,
    /// Healthy when the group's address accepts a TCP connection here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpProbe>,
    #[serde(default)]
    pub initial_delay_seconds: u32,
    #[serde(default = "ten")]
    pub period_seconds: u32,
    #[serde(default = "one")]
    pub timeout_seconds: u32,
    #[serde(default = "three")]
    pub failure_threshold: u32,
}

fn ten() -> u32 {
    10
}
fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExecProbe {
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpProbe {
    pub port: u16,
}

/// A container port published on the host: `capsa run -p
/// [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSpec {
    pub container_port: u16,
    pub host_port: u16,
    /// Loopback unless given.
    #[serde(default = "loopback")]
    pub host_ip: std::net::IpAddr,
    #[serde(default)]
    pub protocol: PortProtocol,
}

impl std::fmt::Display for PortSpec {
    /// As `docker port` prints one: `80/tcp -> 127.0.0.1:8080`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protocol = match self.protocol {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        };
        let host = std::net::SocketAddr::new(self.host_ip, self.host_port);
        write!(f, "{}/{protocol} -> {host}", self.container_port)
    }
}

fn loopback() -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
}

#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    Serialize,
    Deserialize,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

impl std::str::FromStr for PortSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]");
        let (ports, protocol) = match text.rsplit_once('/') {
            Some((ports, "tcp")) => (ports, PortProtocol::Tcp),
            Some((ports, "udp")) => (ports, PortProtocol::Udp),
            Some(_) => return Err(bad()),
            None => (text, PortProtocol::Tcp),
        };
        let (host, container_port) = ports.rsplit_once(':').ok_or_else(bad)?;
        let (host_ip, host_port) = match host.rsplit_once(':') {
            Some((ip, port)) => (
                ip.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .map_err(|_| bad())?,
                port,
            ),
            None => (loopback(), host),
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
        Ok(PortSpec {
            container_port: port(container_port)?,
            host_port: port(host_port)?,
            host_ip,
            protocol,
        })
    }
}

/// A spec the daemon refuses, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid container group spec: {}", problems.join("; "))]
pub struct SpecError {
    pub problems: Vec<String>,
}

/// Names of groups and containers: they become VM, file and cgroup names.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

impl GroupSpec {
    /// Checks the volumes and returns their names.
    fn validate_volumes(&self, problems: &mut Vec<String>) -> std::collections::BTreeSet<&str> {
        use base64::Engine;
        let mut names = std::collections::BTreeSet::new();
        for (i, volume) in self.volumes.iter().enumerate() {
            let at = format!("volumes[{i}]");
            if !valid_name(&volume.name) {
                problems.push(format!("{at}.name: {:?} is not a valid name", volume.name));
            } else if !names.insert(volume.name.as_str()) {
                problems.push(format!("{at}.name: {:?} is used twice", volume.name));
            }
            let sources = [
                volume.empty_dir.is_some(),
                volume.secret.is_some(),
                volume.persistent.is_some(),
            ];
            if sources.iter().filter(|&&given| given).count() != 1 {
                problems.push(format!(
                    "{at}: give exactly one of emptyDir, secret and persistent"
                ));
            }
            if volume.empty_dir.as_ref().and_then(|e| e.size_mib) == Some(0) {
                problems.push(format!("{at}.emptyDir.sizeMib: 0 leaves no room"));
            }
            for (file, content) in volume.secret.iter().flatten() {
                if file.is_empty()
                    || file.starts_with('/')
                    || file.split('/').any(|p| p == ".." || p.is_empty())
                {
                    problems.push(format!("{at}.secret: {file:?} is not a relative file path"));
                }
                if base64::engine::general_purpose::STANDARD
                    .decode(content)
                    .is_err()
                {
                    problems.push(format!("{at}.secret.{file}: not base64"));
                }
            }
            if let Some(persistent) = &volume.persistent {
                if !valid_name(&persistent.volume) {
                    problems.push(format!(
                        "{at}.persistent.volume: {:?} is not a valid volume name",
                        persistent.volume
                    ));
                }
                if persistent
                    .size_mib
                    .is_some_and(|size| size < MIN_VOLUME_MIB)
                {
                    problems.push(format!(
                        "{at}.persistent.sizeMib: below the minimum of {MIN_VOLUME_MIB}"
                    ));
                }
            }
        }
        names
    }

    /// Parses a JSON spec and validates it, naming each field that is wrong.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let spec: GroupSpec = serde_json::from_str(text).map_err(|e| SpecError {
            problems: vec![e.to_string()],
        })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn cpus(&self) -> u8 {
        self.cpus.unwrap_or(DEFAULT_CPUS)
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB)
    }

    /// The host CPU time the VM may use, in CPUs.
    pub fn cpu_limit(&self) -> f64 {
        self.cpu_limit.unwrap_or(f64::from(self.cpus()))
    }

    /// The network the group joins.
    /// The init containers, then the containers: all a start runs.
    pub fn all_containers(&self) -> impl Iterator<Item = &ContainerSpec> {
        self.init_containers.iter().chain(&self.containers)
    }

    pub fn network(&self) -> &str {
        self.network.as_deref().unwrap_or(DEFAULT_NETWORK)
    }

    pub fn scratch_mib(&self) -> u64 {
        self.scratch_mib.unwrap_or(DEFAULT_SCRATCH_MIB)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let mut problems = Vec::new();
        if !valid_name(&self.name) {
            problems.push(format!(
                "name: {:?} must be 1-63 lowercase letters, digits or '-', starting with a letter or digit",
                self.name
            ));
        }
        if self.containers.is_empty() {
            problems.push("containers: at least one container is needed".into());
        }
        if self.auto_remove && self.restart_policy != RestartPolicy::Never {
            problems.push(
                "autoRemove: a group removed when it stops cannot also be restarted (restartPolicy must be Never)"
                    .into(),
            );
        }
        if let Some(cpus) = self.cpus {
            if cpus == 0 || cpus > MAX_CPUS {
                problems.push(format!("cpus: {cpus} is not between 1 and {MAX_CPUS}"));
            }
        }
        if let Some(cpu) = self.cpu_limit {
            if !(MIN_CPU_LIMIT..=f64::from(self.cpus())).contains(&cpu) {
                problems.push(format!(
                    "cpuLimit: {cpu} is not between {MIN_CPU_LIMIT} and the group's {} CPUs",
                    self.cpus()
                ));
            }
        }
        if let Some(memory) = self.memory_mib {
            if memory < MIN_MEMORY_MIB {
                problems.push(format!(
                    "memoryMib: {memory} is below the minimum of {MIN_MEMORY_MIB}"
                ));
            }
        }
        if let Some(scratch) = self.scratch_mib {
            if scratch != 0 && !(MIN_SCRATCH_MIB..=(16 << 20)).contains(&scratch) {
                problems.push(format!(
                    "scratchMib: {scratch} is neither 0 (in memory) nor between {MIN_SCRATCH_MIB} and 16777216 (16 TiB)"
                ));
            }
        }
        for (field, limit) in [
            ("diskRateLimit", &self.disk_rate_limit),
            ("networkRateLimit", &self.network_rate_limit),
        ] {
            if let Some(limit) = limit {
                problems.extend(limit.problems(field));
            }
        }
        if let Some(network) = &self.network {
            if !valid_name(network) {
                problems.push(format!("network: {network:?} is not a valid network name"));
            }
        }
        let volumes = self.validate_volumes(&mut problems);
        let mut seen = std::collections::BTreeSet::new();
        let mut published = std::collections::BTreeSet::new();
        for (i, init) in self.init_containers.iter().enumerate() {
            let at = format!("initContainers[{i}]");
            for (given, field) in [
                (init.liveness_probe.is_some(), "livenessProbe"),
                (init.readiness_probe.is_some(), "readinessProbe"),
                (!init.ports.is_empty(), "ports"),
                (init.stdin, "stdin"),
                (init.tty, "tty"),
            ] {
                if given {
                    problems.push(format!(
                        "{at}.{field}: an init container runs to its end unattended, without it"
                    ));
                }
            }
        }
        let all = self
            .init_containers
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("initContainers[{i}]"), c))
            .chain(
                self.containers
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (format!("containers[{i}]"), c)),
            );
        for (at, container) in all {
            if !valid_name(&container.name) {
                problems.push(format!(
                    "{at}.name: {:?} is not a valid name",
                    container.name
                ));
            } else if !seen.insert(container.name.clone()) {
                problems.push(format!("{at}.name: {:?} is used twice", container.name));
            }
            for capability in &container.cap_add {
                if !ADDABLE_CAPABILITIES.contains(&capability.as_str()) {
                    problems.push(format!(
                        "{at}.capAdd: {capability:?} is not one of {}",
                        ADDABLE_CAPABILITIES.join(", ")
                    ));
                }
            }
            if container.image.trim().is_empty() {
                problems.push(format!("{at}.image: empty"));
            }
            if container.command.as_ref().is_some_and(|c| c.is_empty()) {
                problems.push(format!(
                    "{at}.command: empty; leave it out to keep the image's"
                ));
            }
            for key in container.env.keys() {
                if key.is_empty() || key.contains('=') {
                    problems.push(format!("{at}.env: {key:?} is not a variable name"));
                }
            }
            if let Some(user) = &container.user {
                let (name, group) = user.split_once(':').unwrap_or((user, "-"));
                if name.is_empty() || group.is_empty() || user.contains(char::is_whitespace) {
                    problems.push(format!(
                        "{at}.user: {user:?} is not user[:group] (names or numbers)"
                    ));
                }
            }
            if let Some(signal) = &container.stop_signal {
                if crate::signal::number(signal).is_none() {
                    problems.push(format!("{at}.stopSignal: {signal:?} is not a signal"));
                }
            }
            if let Some(dir) = &container.working_dir {
                if !dir.starts_with('/') {
                    problems.push(format!("{at}.workingDir: {dir:?} is not absolute"));
                }
            }
            if let Some(cpu) = container.cpu_limit {
                if !(cpu > 0.0 && cpu <= f64::from(self.cpus())) {
                    problems.push(format!(
                        "{at}.cpuLimit: {cpu} is not above 0 and at most the group's {} CPUs",
                        self.cpus()
                    ));
                }
            }
            if let Some(cpu) = container.cpu_request {
                let limit = container.cpu_limit.unwrap_or(f64::from(self.cpus()));
                if !(cpu > 0.0 && cpu <= limit) {
                    problems.push(format!(
                        "{at}.cpuRequest: {cpu} is not above 0 and at most the limit {limit}"
                    ));
                }
            }
            if let Some(memory) = container.memory_request_mib {
                let limit = container.memory_limit_mib.unwrap_or(self.memory_mib());
                if memory == 0 || memory > limit {
                    problems.push(format!(
                        "{at}.memoryRequestMib: {memory} is not above 0 and at most the limit {limit}"
                    ));
                }
            }
            for (field, probe) in [
                ("livenessProbe", &container.liveness_probe),
                ("readinessProbe", &container.readiness_probe),
            ] {
                let Some(probe) = probe else { continue };
                let at = format!("{at}.{field}");
                if probe.exec.is_some() == probe.tcp_socket.is_some() {
                    problems.push(format!("{at}: give exactly one of exec and tcpSocket"));
                }
                if probe.exec.as_ref().is_some_and(|e| e.command.is_empty()) {
                    problems.push(format!("{at}.exec.command: empty"));
                }
                if probe.tcp_socket.as_ref().is_some_and(|t| t.port == 0) {
                    problems.push(format!("{at}.tcpSocket.port: 0 is not a port"));
                }
                if probe.period_seconds == 0
                    || probe.timeout_seconds == 0
                    || probe.failure_threshold == 0
                {
                    problems.push(format!(
                        "{at}: periodSeconds, timeoutSeconds and failureThreshold must be above 0"
                    ));
                }
            }
            let mut paths = std::collections::BTreeSet::new();
            for (j, mount) in container.volume_mounts.iter().enumerate() {
                let at = format!("{at}.volumeMounts[{j}]");
                if !volumes.contains(mount.name.as_str()) {
                    problems.push(format!("{at}.name: no volume {:?} in volumes", mount.name));
                }
                if !mount.mount_path.starts_with('/')
                    || mount.mount_path.split('/').any(|p| p == "..")
                {
                    problems.push(format!(
                        "{at}.mountPath: {:?} is not an absolute path",
                        mount.mount_path
                    ));
                } else if !paths.insert(mount.mount_path.trim_end_matches('/')) {
                    problems.push(format!(
                        "{at}.mountPath: {:?} is mounted twice",
                        mount.mount_path
                    ));
                }
            }
            for (j, port) in container.ports.iter().enumerate() {
                if port.container_port == 0 || port.host_port == 0 {
                    problems.push(format!("{at}.ports[{j}]: port 0 is not a port"));
                } else if !published.insert((port.host_ip, port.host_port, port.protocol)) {
                    problems.push(format!(
                        "{at}.ports[{j}]: host port {}:{} is published twice",
                        port.host_ip, port.host_port
                    ));
                }
            }
            if let Some(memory) = container.memory_limit_mib {
                if memory == 0 || memory > self.memory_mib() {
                    problems.push(format!(
                        "{at}.memoryLimitMib: {memory} is not above 0 and at most the group's {} MiB",
                        self.memory_mib()
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SpecError { problems })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_spec_gets_defaults() {
        let spec =
            GroupSpec::parse(r#"{"name":"web","containers":[{"name":"app","image":"busybox"}]}"#)
                .unwrap();
        assert_eq!((spec.cpus(), spec.memory_mib()), (1, 256));
    }

    #[test]
    fn auto_remove_is_never_restarted_and_round_trips() {
        let spec = |extra: &str| {
            GroupSpec::parse(&format!(
                r#"{{"name":"w","autoRemove":true{extra},"containers":[{{"name":"a","image":"busybox"}}]}}"#
            ))
        };
        let removed = spec("").unwrap();
        assert!(removed.auto_remove);
        let text = serde_json::to_string(&removed).unwrap();
        assert_eq!(GroupSpec::parse(&text).unwrap(), removed);
        let error = spec(r#","restartPolicy":"OnFailure""#).unwrap_err();
        assert!(error.problems[0].starts_with("autoRemove: "), "{error:?}");
        let kept =
            GroupSpec::parse(r#"{"name":"w","containers":[{"name":"a","image":"busybox"}]}"#)
                .unwrap();
        assert!(!serde_json::to_string(&kept).unwrap().contains("autoRemove"));
    }

    #[test]
    fn ports_parse_like_docker_run_p() {
        let port: PortSpec = "18080:80".parse().unwrap();
        assert_eq!(
            (
                port.host_ip.to_string(),
                port.host_port,
                port.container_port,
                port.protocol
            ),
            ("127.0.0.1".into(), 18080, 80, PortProtocol::Tcp)
        );
        let port: PortSpec = "0.0.0.0:53:5353/udp".parse().unwrap();
        assert_eq!(
            (
                port.host_ip.to_string(),
                port.host_port,
                port.container_port,
                port.protocol
            ),
            ("0.0.0.0".into(), 53, 5353, PortProtocol::Udp)
        );
        let port: PortSpec = "[::1]:8443:443".parse().unwrap();
        assert_eq!(port.host_ip.to_string(), "::1");
        assert_eq!(port.to_string(), "443/tcp -> [::1]:8443");
        let port: PortSpec = "18080:80/udp".parse().unwrap();
        assert_eq!(port.to_string(), "80/udp -> 127.0.0.1:18080");
        for bad in [
            "80",
            "a:80",
            "8080:0",
            "1:2:3:4",
            "8080:80/sctp",
            "70000:80",
            "",
        ] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad:?}");
        }
        let spec = GroupSpec::parse(
            r#"{"name":"web","containers":[
                {"name":"a","image":"busybox","ports":[{"containerPort":80,"hostPort":8080}]},
                {"name":"b","image":"busybox","ports":[{"containerPort":81,"hostPort":8080}]}]}"#,
        )
        .unwrap_err();
        assert!(
            spec.problems[0].starts_with("containers[1].ports[0]: host port 127.0.0.1:8080"),
            "{spec:?}"
        );
    }

    #[test]
    fn a_cpu_limit_is_within_the_vcpus() {
        let spec = |limit: &str| {
            GroupSpec::parse(&format!(
                r#"{{"name":"w","cpus":2,"cpuLimit":{limit},"containers":[{{"name":"a","image":"busybox"}}]}}"#
            ))
        };
        assert_eq!(spec("0.5").unwrap().cpu_limit(), 0.5);
        assert_eq!(spec("2").unwrap().cpu_limit(), 2.0);
        for bad in ["0", "0.001", "2.5", "-1"] {
            let error = spec(bad).unwrap_err();
            assert!(
                error.problems[0].starts_with("cpuLimit: "),
                "{bad}: {error:?}"
            );
        }
        let plain = GroupSpec::parse(
            r#"{"name":"w","cpus":3,"containers":[{"name":"a","image":"busybox"}]}"#,
        );
        assert_eq!(plain.unwrap().cpu_limit(), 3.0);
    }

    #[test]
    fn volumes_are_checked_and_mounts_must_name_one() {
        let problems = GroupSpec::parse(
            r#"{"name":"v","volumes":[
                {"name":"cache","emptyDir":{}},
                {"name":"creds","secret":{"token":"czNjcmV0","../x":"!!"}},
                {"name":"both","emptyDir":{},"persistent":{"volume":"data"}},
                {"name":"cache","persistent":{"volume":"Bad_Name","sizeMib":1}}],
              "containers":[{"name":"a","image":"busybox","volumeMounts":[
                {"name":"cache","mountPath":"/cache"},
                {"name":"nope","mountPath":"relative"},
                {"name":"creds","mountPath":"/cache/"}]}]}"#,
        )
        .unwrap_err()
        .problems;
        let expected = [
            "volumes[1].secret: \"../x\" is not a relative file path",
            "volumes[1].secret.../x: not base64",
            "volumes[2]: give exactly one of emptyDir, secret and persistent",
            "volumes[3].name: \"cache\" is used twice",
            "volumes[3].persistent.volume: \"Bad_Name\" is not a valid volume name",
            "volumes[3].persistent.sizeMib: below the minimum of 8",
            "containers[0].volumeMounts[1].name: no volume \"nope\" in volumes",
            "containers[0].volumeMounts[1].mountPath: \"relative\" is not an absolute path",
            "containers[0].volumeMounts[2].mountPath: \"/cache/\" is mounted twice",
        ];
        assert_eq!(problems, expected);
    }

    #[test]
    fn unknown_fields_are_errors() {
        let error = GroupSpec::parse(
            r#"{"name":"web","containers":[{"name":"app","image":"busybox","imgae":"x"}]}"#,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("unknown field `imgae`"),
            "{error}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let error = GroupSpec::parse(
            r#"{"name":"Web!","cpus":0,"memoryMib":16,"containers":[
                {"name":"a","image":"","command":[],"workingDir":"rel","cpuLimit":4},
                {"name":"a","image":"x","env":{"A=B":"c"},"memoryLimitMib":1024,
                 "cpuRequest":2,"memoryRequestMib":0}]}"#,
        )
        .unwrap_err();
        let text = error.problems.join("\n");
        for field in [
            "name:",
            "cpus:",
            "memoryMib:",
            "containers[0].image",
            "containers[0].command",
            "containers[0].workingDir",
            "containers[0].cpuLimit",
            "containers[1].name",
            "containers[1].env",
            "containers[1].memoryLimitMib",
            "containers[1].cpuRequest",
            "containers[1].memoryRequestMib",
        ] {
            assert!(text.contains(field), "{field} missing from:\n{text}");
        }
    }
}
