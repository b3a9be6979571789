//! What the daemon knows about each group, on disk under
//! `ROOT/groups/<name>/group.json` (replaced atomically and fsynced on
//! every change), so a restarted daemon finds its groups, and the VMMs
//! still running them, again.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use capsa_api::{ContainerStatus, ContainerView, GroupSpec, GroupStatus, GroupView};
use serde::{Deserialize, Serialize};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A container as recorded is what the API shows of it.
pub type ContainerRecord = ContainerView;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRecord {
    pub spec: GroupSpec,
    pub status: GroupStatus,
    pub error: Option<String>,
    pub vmm_pid: Option<u32>,
    /// The group's address while it exists (not only while it runs), so
    /// its published ports and its name hold still.
    #[serde(default)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// The user and group id its VMM's jail runs as, the group's own
    /// while it exists.
    #[serde(default)]
    pub jail_id: Option<u32>,
    /// VM restarts by the restart policy.
    #[serde(default)]
    pub restart_count: u32,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub containers: Vec<ContainerRecord>,
    /// The init containers' runs at the last start.
    #[serde(default)]
    pub init_containers: Vec<ContainerRecord>,
    /// The template the running VM was restored from, if it was.
    #[serde(default)]
    pub template: Option<String>,
}

impl GroupRecord {
    pub fn new(spec: GroupSpec) -> Self {
        let record = |c: &capsa_api::ContainerSpec| ContainerRecord {
            name: c.name.clone(),
            image: c.image.clone(),
            status: ContainerStatus::Created,
            exit_code: None,
            signal: None,
            oom_killed: false,
            started_at: None,
            finished_at: None,
            restart_count: 0,
            ready: false,
        };
        let containers = spec.containers.iter().map(record).collect();
        let init_containers = spec.init_containers.iter().map(record).collect();
        GroupRecord {
            spec,
            status: GroupStatus::Created,
            error: None,
            vmm_pid: None,
            ip: None,
            jail_id: None,
            restart_count: 0,
            created_at: now_ms(),
            started_at: None,
            containers,
            init_containers,
            template: None,
        }
    }

    pub fn container_mut(&mut self, name: &str) -> Option<&mut ContainerRecord> {
        self.containers.iter_mut().find(|c| c.name == name)
    }

    pub fn view(&self) -> GroupView {
        GroupView {
            name: self.spec.name.clone(),
            status: self.status,
            error: self.error.clone(),
            cpus: self.spec.cpus(),
            memory_mib: self.spec.memory_mib(),
            vmm_pid: self.vmm_pid,
            ip: self.ip,
            restart_policy: self.spec.restart_policy,
            restart_count: self.restart_count,
            created_at: self.created_at,
            started_at: self.started_at,
            labels: self.spec.labels.clone(),
            containers: self.containers.clone(),
            init_containers: self.init_containers.clone(),
            template: self.template.clone(),
            spec: self.spec.clone(),
        }
    }
}

/// A group's directory and the files in it.
#[derive(Debug, Clone)]
pub struct GroupPaths {
    pub dir: PathBuf,
}

impl GroupPaths {
    pub fn new(root: &Path, name: &str) -> Self {
        GroupPaths {
            dir: root.join("groups").join(name),
        }
    }

    pub fn record(&self) -> PathBuf {
        self.dir.join("group.json")
    }

    /// Short on purpose: Unix socket paths are limited to 108 bytes.
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    /// The empty directory its VMM's jail has as root.
    pub fn jail(&self) -> PathBuf {
        self.dir.join("jail")
    }

    /// The disk of the containers' writable layers.
    pub fn scratch(&self) -> PathBuf {
        self.dir.join("scratch.img")
    }

    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    pub fn log(&self, container: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{container}.log"))
    }
}

/// Replaces the group's record; its directory must exist (a deleted
/// group's is never brought back by a late save).
/// Owner-only (0600): the spec holds the group's secrets.
pub fn save(paths: &GroupPaths, record: &GroupRecord) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(record)?;
    capsa_image_store::write_atomically_with_mode(&paths.record(), &bytes, 0o600)?;
    Ok(())
}

/// Every group record under `root`; unreadable ones are reported, not
/// fatal.
pub fn load_all(root: &Path) -> Vec<(GroupPaths, Result<GroupRecord>)> {
    let Ok(entries) = fs::read_dir(root.join("groups")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let paths = GroupPaths::new(root, &name);
            let record = fs::read(paths.record())
                .with_context(|| format!("reading {}", paths.record().display()))
                .and_then(|bytes| Ok(serde_json::from_slice(&bytes)?));
            (paths, record)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_saved_group_is_readable_by_its_owner_only_and_loads_back() {
        let root = tempfile::tempdir().unwrap();
        let spec = GroupSpec::parse(
            r#"{"name":"s","volumes":[{"name":"k","secret":{"token":"czNjcmV0"}}],
                "containers":[{"name":"c","image":"busybox"}]}"#,
        )
        .unwrap();
        let paths = GroupPaths::new(root.path(), "s");
        fs::create_dir_all(&paths.dir).unwrap();
        save(&paths, &GroupRecord::new(spec.clone())).unwrap();
        let mode = fs::metadata(paths.record()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Saved again over the old file: still 0600.
        save(&paths, &GroupRecord::new(spec.clone())).unwrap();
        let mode = fs::metadata(paths.record()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = load_all(root.path());
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].1.as_ref().unwrap().spec, spec);
    }
}
