//! Templates: VMs booted to their agent with no group's identity,
//! snapshotted once (capsa-vmm's `--snapshot-to`) and kept, so that a
//! group's start restores a clone of one (`--restore-from`) instead of
//! booting a kernel.
//!
//! A template is kept per [`Shape`]: the kernel's, the initramfs's and the
//! VMM's SHA-256, the vCPUs and memory, and the device layout (fixed disk
//! slots, since virtio-mmio has no hotplug, and a NIC or none). It lives in
//! `DIR/ID/` (root's only, its files 0600): the VMM's `state`, its
//! `memory`, and `meta.json` with the shape it was built for. A template
//! of another shape is never used: its id differs, and its `meta.json`
//! must hold the very shape asked for.

mod build;
mod slots;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use capsa_vm_process::VmConfig;
use capsa_vmm_config::MacAddr;
use serde::{Deserialize, Serialize};
use sha2::Digest;

pub use slots::{make_empty_disks, slotted, READ_ONLY_SLOTS, WRITABLE_SLOTS};

/// The MAC of every template's NIC. A clone's agent gives the NIC the
/// group's own; no group's MAC is this one (theirs start 02:ca:95).
pub const TEMPLATE_MAC: MacAddr = MacAddr([0x02, 0xca, 0x96, 0, 0, 1]);

/// The layout of a template's directory and meta.json.
const FORMAT: u32 = 1;
const META: &str = "meta.json";
const STATE: &str = "state";
const MEMORY: &str = "memory";
/// A template being built: renamed to its id once whole.
const PARTIAL: &str = ".partial";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the template's VM: {0}")]
    Vm(#[from] capsa_vm_process::VmError),
    #[error("the template's guest did not answer: {0}")]
    Boot(#[from] capsa_vm_process::sandbox::BootError),
    #[error("the template's snapshot failed: {0}")]
    Snapshot(String),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Io { what, path, source }
}

/// What a template is built for; a clone must be asked for with the very
/// same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shape {
    pub format: u32,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    pub vmm_sha256: String,
    pub cpus: u8,
    pub memory_mib: u64,
    pub read_only_disks: usize,
    pub writable_disks: usize,
    pub nic: bool,
}

impl Shape {
    /// The template's id: the start of the shape's digest.
    pub fn id(&self) -> String {
        let text = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(sha2::Sha256::digest(&text))[..16].to_string()
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    shape: Shape,
    built_at_ms: u64,
    /// How long the build took, boot to snapshot.
    build_ms: u64,
}

/// A template on disk, whole.
#[derive(Debug, Clone)]
pub struct Template {
    pub id: String,
    pub shape: Shape,
    pub built_at_ms: u64,
    pub build_ms: u64,
    dir: PathBuf,
}

impl Template {
    /// Its state and memory, open for reading: a restoring VMM is handed
    /// these and never opens a path.
    pub fn open(&self) -> Result<(File, File), TemplateError> {
        let open = |name| {
            let path = self.dir.join(name);
            File::open(&path).map_err(io_error("opening", &path))
        };
        Ok((open(STATE)?, open(MEMORY)?))
    }

    /// The bytes it holds on disk (the memory file is sparse).
    pub fn disk_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        [META, STATE, MEMORY, build::CONSOLE]
            .iter()
            .filter_map(|name| std::fs::metadata(self.dir.join(name)).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A file's identity and age, so that its digest is read again only when
/// it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            mtime_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
        }
    }
}

/// The templates of one capsad.
#[derive(Debug)]
pub struct Templates {
    dir: PathBuf,
    digests: Mutex<HashMap<PathBuf, (Stamp, String)>>,
    /// Ids being built now: one build per template.
    building: Mutex<HashSet<String>>,
    /// Ids whose restore failed: not built again while this process runs.
    broken: Mutex<HashSet<String>>,
}

impl Templates {
    /// The templates in `dir` (made, root's only). What a build stopped
    /// halfway left is removed.
    pub fn open(dir: &Path) -> Result<Self, TemplateError> {
        std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("restricting", dir))?;
        for entry in std::fs::read_dir(dir)
            .map_err(io_error("listing", dir))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().ends_with(PARTIAL) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Templates {
            dir: dir.to_path_buf(),
            digests: Mutex::default(),
            building: Mutex::default(),
            broken: Mutex::default(),
        })
    }

    /// The shape of a VM of `cpus` and `memory_mib`, with a NIC or none,
    /// booted by `vm`.
    pub fn shape(
        &self,
        vm: &VmConfig,
        cpus: u8,
        memory_mib: u64,
        nic: bool,
    ) -> Result<Shape, TemplateError> {
        Ok(Shape {
            format: FORMAT,
            kernel_sha256: self.digest(&vm.kernel)?,
            initrd_sha256: self.digest(&vm.initrd)?,
            vmm_sha256: self.digest(&vm.vmm)?,
            cpus,
            memory_mib,
            read_only_disks: READ_ONLY_SLOTS,
            writable_disks: WRITABLE_SLOTS,
            nic,
        })
    }

    fn digest(&self, path: &Path) -> Result<String, TemplateError> {
        let mut file = File::open(path).map_err(io_error("opening", path))?;
        let stamp = Stamp::of(&file.metadata().map_err(io_error("reading", path))?);
        let mut digests = self.digests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((known, digest)) = digests.get(path) {
            if *known == stamp {
                return Ok(digest.clone());
            }
        }
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut file, &mut hasher).map_err(io_error("reading", path))?;
        let digest = hex::encode(hasher.finalize());
        digests.insert(path.to_path_buf(), (stamp, digest.clone()));
        Ok(digest)
    }

    /// The template of `shape`, when one is kept whole.
    pub fn find(&self, shape: &Shape) -> Option<Template> {
        let id = shape.id();
        if self.is_broken(&id) {
            return None;
        }
        self.read(&id).filter(|t| t.shape == *shape)
    }

    fn read(&self, id: &str) -> Option<Template> {
        let dir = self.dir.join(id);
        let text = std::fs::read(dir.join(META)).ok()?;
        let meta: Meta = serde_json::from_slice(&text).ok()?;
        Some(Template {
            id: id.to_string(),
            shape: meta.shape,
            built_at_ms: meta.built_at_ms,
            build_ms: meta.build_ms,
            dir,
        })
    }

    /// Every template kept whole.
    pub fn list(&self) -> Vec<Template> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut templates: Vec<Template> = entries
            .flatten()
            .filter_map(|e| self.read(&e.file_name().to_string_lossy()))
            .collect();
        templates.sort_by(|a, b| a.id.cmp(&b.id));
        templates
    }

    /// Deletes template `id`, which a restore could not use; it is not
    /// built again while this process runs.
    pub fn discard(&self, id: &str) -> Result<(), TemplateError> {
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
        let dir = self.dir.join(id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_error("deleting", &dir)(e))
            }
            _ => Ok(()),
        }
    }

    /// Deletes every template; returns how many there were.
    pub fn remove_all(&self) -> Result<usize, TemplateError> {
        let templates = self.list();
        for template in &templates {
            std::fs::remove_dir_all(&template.dir).map_err(io_error("deleting", &template.dir))?;
        }
        Ok(templates.len())
    }

    fn is_broken(&self, id: &str) -> bool {
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// The right to build the template of `shape`: none when it is kept
    /// already, being built, or broken.
    pub fn claim(&self, shape: &Shape) -> Option<Claim<'_>> {
        let id = shape.id();
        if self.is_broken(&id) || self.find(shape).is_some() {
            return None;
        }
        let mut building = self.building.lock().unwrap_or_else(|e| e.into_inner());
        building.insert(id.clone()).then(|| Claim {
            templates: self,
            shape: shape.clone(),
            id,
        })
    }
}

/// A template being built by its holder.
pub struct Claim<'a> {
    templates: &'a Templates,
    shape: Shape,
    id: String,
}

impl Claim<'_> {
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.templates
            .building
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests;
