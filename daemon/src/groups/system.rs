//! The host's side of capsad for `capsa system` and `capsa image prune`:
//! what it runs and holds on disk, and what it can let go of.

use std::path::Path;

use capsa_api::{ApiError, DiskUsageView, GroupStatus, PruneView, QuotaView, SystemInfoView};

use super::Daemon;
use crate::errors::{internal, store_error, volume_error};
use crate::tenants::owners::Kind;
use crate::tenants::Caller;

/// The bytes `path` holds on disk (allocated blocks: a sparse file counts
/// what is written), every file under it included; 0 when it is missing.
pub fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = metadata.blocks() * 512;
    if !metadata.is_dir() {
        return own;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return own;
    };
    own + entries
        .flatten()
        .map(|entry| disk_bytes(&entry.path()))
        .sum::<u64>()
}

impl Daemon {
    pub fn info(&self, caller: &Caller) -> Result<SystemInfoView, ApiError> {
        let groups = self.visible(caller, Kind::Group, self.list(), |g| &g.name);
        let volumes = self.volumes.list().map_err(volume_error)?;
        let volumes = self.visible(caller, Kind::Volume, volumes, |v| &v.name);
        let networks = self.list_networks().unwrap_or_default();
        let networks = self.visible(caller, Kind::Network, networks, |n| &n.name);
        let admin = matches!(caller, Caller::Admin);
        let capacity = &self.settings.capacity;
        Ok(SystemInfoView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            tenant: caller.tenant().map(str::to_string),
            running: groups
                .iter()
                .filter(|g| g.status == GroupStatus::Running)
                .count() as u64,
            groups: groups.len() as u64,
            volumes: volumes.len() as u64,
            networks: networks.len() as u64,
            vcpus: groups.iter().map(|g| u64::from(g.spec.cpus())).sum(),
            memory_mib: groups.iter().map(|g| g.spec.memory_mib()).sum(),
            quota: match caller {
                Caller::Admin => None,
                Caller::Tenant(tenant) => Some(QuotaView {
                    groups: tenant.quota.groups,
                    vcpus: tenant.quota.vcpus,
                    memory_mib: tenant.quota.memory_mib,
                    volume_mib: tenant.quota.volume_mib,
                }),
            },
            images: if admin {
                Some(self.images.list().map_err(store_error)?.len() as u64)
            } else {
                None
            },
            max_vm_memory_mib: admin.then_some(capacity.max_memory_mib),
            max_vm_cpus: admin.then_some(capacity.max_cpus),
            memory_budget_mib: admin.then_some(capacity.memory_budget_mib),
            templates: self
                .settings
                .templates
                .as_ref()
                .filter(|_| admin)
                .map(|templates| {
                    templates
                        .list()
                        .iter()
                        .map(|t| capsa_api::TemplateView {
                            id: t.id.clone(),
                            cpus: t.shape.cpus,
                            memory_mib: t.shape.memory_mib,
                            nic: t.shape.nic,
                            built_at: t.built_at_ms,
                            build_ms: t.build_ms,
                            disk_bytes: t.disk_bytes(),
                        })
                        .collect()
                }),
        })
    }

    pub fn disk_usage(&self) -> Result<DiskUsageView, ApiError> {
        let images = self.images.list().map_err(store_error)?;
        let unused: u64 = images
            .iter()
            .filter(|image| self.image_user(&image.name).is_none())
            .map(|image| image.size)
            .sum();
        Ok(DiskUsageView {
            images: images.len() as u64,
            image_bytes: disk_bytes(&self.images.layout().join("blobs")),
            unused_image_bytes: unused,
            layer_disk_bytes: disk_bytes(&self.root.join("layer-images")),
            volumes: self.volumes.list().map_err(volume_error)?.len() as u64,
            volume_bytes: disk_bytes(&self.root.join("volumes")),
            groups: self.list().len() as u64,
            group_bytes: disk_bytes(&self.root.join("groups")),
        })
    }

    /// Removes every image no group uses, then the blobs and layer disk
    /// images nothing reaches.
    pub fn prune_images(&self) -> Result<PruneView, ApiError> {
        let before = disk_bytes(&self.root.join("layer-images"));
        let mut removed = Vec::new();
        for image in self.images.list().map_err(store_error)? {
            // One that a group took meanwhile is refused here, and kept.
            if self
                .images
                .remove(&image.name, |name| self.image_user(name))
                .is_ok()
            {
                removed.push(image.name);
            }
        }
        let (_, blob_bytes) = self.images.garbage_collect().map_err(internal)?;
        let in_use = self.images.chains_in_use().map_err(store_error)?;
        self.layer_images.retain(&in_use).map_err(store_error)?;
        let after = disk_bytes(&self.root.join("layer-images"));
        Ok(PruneView {
            groups: Vec::new(),
            images: removed,
            bytes_freed: blob_bytes + before.saturating_sub(after),
        })
    }

    /// Deletes the groups that do not run (created, stopped or failed),
    /// then prunes the images.
    pub fn prune_system(&self) -> Result<PruneView, ApiError> {
        let mut groups = Vec::new();
        for view in self.list() {
            if view.status != GroupStatus::Running && self.delete(&view.name).is_ok() {
                groups.push(view.name);
            }
        }
        let images = self.prune_images()?;
        Ok(PruneView { groups, ..images })
    }
}
