//! The Prometheus (OpenMetrics text) endpoint: per group and container
//! figures (the VMM's CPU, memory, network and disk bytes; the
//! containers' cgroup figures from the agents; restarts), and daemon-wide
//! counts and create/start latency histograms. A scrape never waits on a
//! guest: the groups' figures come from a cache, filled when a group
//! starts and refreshed in the background by each scrape (for the next
//! one), with one read at a time per group and a short deadline on the
//! guest. Nothing is read while nobody scrapes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::groups::Daemon;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the daemon measures as it goes, and the groups' figures as last
/// read.
pub struct Metrics {
    pub create_seconds: Histogram,
    pub start_seconds: Histogram,
    stats: Mutex<HashMap<String, capsa_api::GroupStats>>,
    /// Groups whose figures are being read: a guest that does not answer
    /// holds up one reader, not one more per refresh.
    reading: Mutex<HashSet<String>>,
}

impl Metrics {
    /// The figures of group `name` as last read.
    fn cached(&self, name: &str) -> Option<capsa_api::GroupStats> {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

/// Reads every running group's figures now, each on a thread of its own;
/// drops those of groups that no longer run.
pub fn refresh(daemon: &Arc<Daemon>) {
    let running: Vec<String> = daemon
        .list()
        .into_iter()
        .filter(|v| v.status == capsa_api::GroupStatus::Running)
        .map(|v| v.name)
        .collect();
    daemon
        .metrics
        .stats
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|name, _| running.contains(name));
    for name in running {
        read_in_background(daemon, name);
    }
}

/// Reads group `name`'s figures into the cache on a thread of its own,
/// unless a read of them is under way already.
pub fn read_in_background(daemon: &Arc<Daemon>, name: String) {
    if !daemon
        .metrics
        .reading
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.clone())
    {
        return;
    }
    let daemon = daemon.clone();
    std::thread::spawn(move || {
        let read = daemon.stats(&name);
        let metrics = &daemon.metrics;
        if let Ok(stats) = read {
            metrics
                .stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), stats);
        }
        metrics
            .reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name);
    });
}

impl Default for Metrics {
    fn default() -> Self {
        // 10 ms to about 80 s.
        let buckets = || exponential_buckets(0.01, 2.0, 14);
        Metrics {
            create_seconds: Histogram::new(buckets()),
            start_seconds: Histogram::new(buckets()),
            stats: Mutex::default(),
            reading: Mutex::default(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerLabels {
    group: String,
    container: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;

/// The text a scrape gets, from the daemon's records and the figures
/// cache: no guest is called here; the cache is refreshed behind it.
pub fn render(daemon: &Arc<Daemon>) -> String {
    refresh(daemon);
    let mut registry = Registry::with_prefix("capsa");
    let groups = Family::<StatusLabels, Gauge>::default();
    let group_up = Family::<GroupLabels, Gauge>::default();
    let group_restarts = Family::<GroupLabels, Counter>::default();
    let vmm_cpu = Family::<GroupLabels, FloatCounter>::default();
    let vmm_memory = Family::<GroupLabels, Gauge>::default();
    let vmm_overhead = Family::<GroupLabels, Gauge>::default();
    let net_from_guest = Family::<GroupLabels, Counter>::default();
    let net_to_guest = Family::<GroupLabels, Counter>::default();
    let block_read = Family::<GroupLabels, Counter>::default();
    let block_write = Family::<GroupLabels, Counter>::default();
    let container_up = Family::<ContainerLabels, Gauge>::default();
    let container_restarts = Family::<ContainerLabels, Counter>::default();
    let container_cpu = Family::<ContainerLabels, FloatCounter>::default();
    let container_memory = Family::<ContainerLabels, Gauge>::default();
    let container_pids = Family::<ContainerLabels, Gauge>::default();

    for view in daemon.list() {
        let status = format!("{:?}", view.status).to_lowercase();
        groups.get_or_create(&StatusLabels { status }).inc();
        let group = GroupLabels {
            group: view.name.clone(),
        };
        let running = view.status == capsa_api::GroupStatus::Running;
        group_up.get_or_create(&group).set(i64::from(running));
        group_restarts
            .get_or_create(&group)
            .inc_by(u64::from(view.restart_count));
        for container in &view.containers {
            let labels = ContainerLabels {
                group: view.name.clone(),
                container: container.name.clone(),
            };
            let up = container.status == capsa_api::ContainerStatus::Running;
            container_up.get_or_create(&labels).set(i64::from(up));
            container_restarts
                .get_or_create(&labels)
                .inc_by(u64::from(container.restart_count));
        }
        // A group not read yet, or whose agent does not answer, just has
        // fewer series this time.
        let Some(stats) = running.then(|| daemon.metrics.cached(&view.name)).flatten() else {
            continue;
        };
        vmm_cpu.get_or_create(&group).inc_by(stats.vmm_cpu_seconds);
        vmm_memory
            .get_or_create(&group)
            .set((stats.vmm_rss_kib * 1024) as i64);
        vmm_overhead
            .get_or_create(&group)
            .set((stats.vmm_overhead_kib * 1024) as i64);
        net_from_guest
            .get_or_create(&group)
            .inc_by(stats.net_from_guest_bytes);
        net_to_guest
            .get_or_create(&group)
            .inc_by(stats.net_to_guest_bytes);
        block_read
            .get_or_create(&group)
            .inc_by(stats.block_read_bytes);
        block_write
            .get_or_create(&group)
            .inc_by(stats.block_write_bytes);
        for container in &stats.containers {
            let labels = ContainerLabels {
                group: view.name.clone(),
                container: container.name.clone(),
            };
            container_cpu
                .get_or_create(&labels)
                .inc_by(container.cpu_usage_usec as f64 / 1e6);
            container_memory
                .get_or_create(&labels)
                .set(container.memory_bytes as i64);
            container_pids
                .get_or_create(&labels)
                .set(container.pids as i64);
        }
    }
    let images = Gauge::<i64>::default();
    images.set(daemon.images.list().map_or(0, |l| l.len()) as i64);
    let volumes = Gauge::<i64>::default();
    volumes.set(daemon.volumes.list().map_or(0, |l| l.len()) as i64);

    registry.register("groups", "Container groups by status", groups);
    registry.register("group_up", "1 while the group's VM runs", group_up);
    registry.register(
        "group_restarts",
        "VM restarts by the group's restart policy",
        group_restarts,
    );
    registry.register(
        "vmm_cpu_seconds",
        "CPU time of the group's VMM process",
        vmm_cpu,
    );
    registry.register(
        "vmm_memory_bytes",
        "Resident memory of the group's VMM process (the guest's memory included)",
        vmm_memory,
    );
    registry.register(
        "vmm_overhead_bytes",
        "Resident memory of the group's VMM outside the guest's memory",
        vmm_overhead,
    );
    registry.register(
        "network_from_guest_bytes",
        "Bytes the group sent through its interface",
        net_from_guest,
    );
    registry.register(
        "network_to_guest_bytes",
        "Bytes the group received through its interface",
        net_to_guest,
    );
    registry.register("block_read_bytes", "Storage bytes the VMM read", block_read);
    registry.register(
        "block_written_bytes",
        "Storage bytes the VMM wrote",
        block_write,
    );
    registry.register("container_up", "1 while the container runs", container_up);
    registry.register(
        "container_restarts",
        "Restarts by the group's restart policy",
        container_restarts,
    );
    registry.register(
        "container_cpu_seconds",
        "CPU time of the container's cgroup",
        container_cpu,
    );
    registry.register(
        "container_memory_bytes",
        "Memory of the container's cgroup",
        container_memory,
    );
    registry.register(
        "container_pids",
        "Processes in the container",
        container_pids,
    );
    registry.register("images", "Images in the store", images);
    registry.register("volumes", "Named persistent volumes", volumes);
    registry.register(
        "group_create_seconds",
        "Time to create a group (validate, address, ports, state)",
        daemon.metrics.create_seconds.clone(),
    );
    registry.register(
        "group_start_seconds",
        "Time to start a group: boot, images, containers running",
        daemon.metrics.start_seconds.clone(),
    );
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        return format!("# encoding the metrics failed: {e}\n# EOF\n");
    }
    text
}
