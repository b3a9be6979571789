//! What the shim boots its microVMs from, and their size: a TOML file.
//! containerd names it per runtime (the `ConfigPath` runtime option, or
//! `ctr run --runtime-config-path`); without one the shim reads
//! $CAPSA_SHIM_CONFIG, then /etc/capsa/shim.toml, then uses its defaults.

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/capsa/shim.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("the runtime options ({type_url}) do not decode: {reason}")]
    Options { type_url: String, reason: String },
    #[error("{}: {what} must be {range}, not {value}", path.display())]
    OutOfRange {
        path: PathBuf,
        what: &'static str,
        range: &'static str,
        value: u64,
    },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShimConfig {
    /// capsa-vmm; default: beside the shim, then PATH.
    pub vmm: Option<PathBuf>,
    /// The guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// The guest initramfs, with capsa-agent as /init.
    pub initrd: PathBuf,
    /// vCPUs of a sandbox's VM when its pod sets no CPU limit.
    pub cpus: u8,
    /// Memory of a sandbox's VM, in MiB, when its pod sets no memory limit.
    pub memory_mib: u64,
    /// What a VM gets beyond its pod's memory limit: the guest kernel and
    /// agent (about 30 MiB measured, see README "Kubernetes").
    pub memory_overhead_mib: u64,
    /// The least memory a sized VM gets.
    pub min_memory_mib: u64,
    /// The most a pod may ask for; a larger pod is refused.
    pub max_cpus: u8,
    pub max_memory_mib: u64,
    /// Annotations a pod may size its VM with (io.capsa.vm.cpus,
    /// io.capsa.vm.memory-mib); others are refused.
    pub allowed_annotations: Vec<String>,
    /// How long a VM may take to boot and answer.
    pub boot_timeout_secs: u64,
    /// Grace between SIGTERM and SIGKILL when a VM shuts down.
    pub shutdown_grace_secs: u64,
    /// Whether each VMM runs jailed (capsa-jail): its own namespaces, an
    /// empty root, an unprivileged id of its own, no capabilities.
    pub jail: bool,
    /// The first of the ids the jails run as, one per sandbox (a range of
    /// its own: capsad's starts at 900000).
    pub jail_first_id: u32,
    pub jail_ids: u32,
    /// Empty disks a sandbox's VM boots with, each to hold one image's root
    /// filesystem (see rootfs_disks); 0 (the default, for now) streams
    /// every root filesystem over vsock instead.
    pub rootfs_disks: usize,
    /// Each such disk's size (a sparse file): the largest root filesystem
    /// image a disk takes.
    pub rootfs_disk_mib: u64,
    /// Where sandboxes' disks are kept (a directory per sandbox, removed
    /// with it): a file system on disk, not /run's memory.
    pub disk_dir: PathBuf,
}

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            vmm: None,
            kernel: "/usr/share/capsa/vmlinux".into(),
            initrd: "/usr/share/capsa/initramfs.cpio".into(),
            cpus: 1,
            memory_mib: 256,
            memory_overhead_mib: 64,
            min_memory_mib: 128,
            max_cpus: 16,
            max_memory_mib: 65_536,
            allowed_annotations: Vec::new(),
            boot_timeout_secs: 60,
            shutdown_grace_secs: 5,
            jail: true,
            jail_first_id: 1_000_000,
            jail_ids: 65_536,
            rootfs_disks: 4,
            rootfs_disk_mib: 8192,
            disk_dir: "/var/lib/capsa-shim".into(),
        }
    }
}

impl ShimConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: ShimConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let out_of_range = |what, range, value| ConfigError::OutOfRange {
            path: path.to_path_buf(),
            what,
            range,
            value,
        };
        if config.cpus == 0 || config.cpus > 32 {
            return Err(out_of_range("cpus", "1 to 32", config.cpus.into()));
        }
        if config.memory_mib < 64 {
            return Err(out_of_range("memory_mib", "64 or more", config.memory_mib));
        }
        if config.min_memory_mib < 64 {
            return Err(out_of_range(
                "min_memory_mib",
                "64 or more",
                config.min_memory_mib,
            ));
        }
        if config.max_cpus == 0 || config.max_cpus > 32 {
            return Err(out_of_range("max_cpus", "1 to 32", config.max_cpus.into()));
        }
        if config.rootfs_disks > 16 {
            return Err(out_of_range(
                "rootfs_disks",
                "0 to 16",
                config.rootfs_disks as u64,
            ));
        }
        if config.rootfs_disk_mib == 0 || config.rootfs_disk_mib > 1 << 20 {
            return Err(out_of_range(
                "rootfs_disk_mib",
                "1 to 1048576",
                config.rootfs_disk_mib,
            ));
        }
        if config.boot_timeout_secs == 0 {
            return Err(out_of_range("boot_timeout_secs", "1 or more", 0));
        }
        Ok(config)
    }

    /// The configuration for a sandbox whose task carried `options`.
    pub fn for_options(options: Option<&Any>) -> Result<Self, ConfigError> {
        let named = match options {
            Some(any) if !any.value.is_empty() => config_path(any)?,
            _ => None,
        };
        let path = named
            .or_else(|| std::env::var_os("CAPSA_SHIM_CONFIG").map(PathBuf::from))
            .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()));
        match path {
            Some(path) => Self::load(&path),
            None => Ok(ShimConfig::default()),
        }
    }

    /// Where the sandboxes' jail ids are claimed, if they are jailed.
    pub fn jail_claims(&self) -> Option<capsa_jail::Claims> {
        self.jail.then(|| capsa_jail::Claims {
            dir: Path::new(crate::sandbox::STATE_ROOT).join("jail-ids"),
            range: capsa_jail::IdRange {
                first: self.jail_first_id,
                count: self.jail_ids,
            },
        })
    }

    pub fn vm(&self) -> capsa_vm_process::VmConfig {
        capsa_vm_process::VmConfig {
            vmm: self
                .vmm
                .clone()
                .unwrap_or_else(capsa_vm_process::default_vmm),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            seccomp: capsa_vm_process::Seccomp::Kill,
        }
    }
}

/// The ConfigPath of containerd's runtimeoptions.v1.Options (what ctr's
/// --runtime-config-path and the CRI plugin's `options` table send a
/// runtime other than runc): field 2 of that message. Its schema is not
/// among containerd-shim-protos', hence the hand decoding.
fn config_path(any: &Any) -> Result<Option<PathBuf>, ConfigError> {
    let invalid = |reason: String| ConfigError::Options {
        type_url: any.type_url.clone(),
        reason,
    };
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return Err(invalid(
            "expected runtimeoptions.v1.Options, with ConfigPath naming a TOML file".into(),
        ));
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut path = None;
    while !input.eof().map_err(|e| invalid(e.to_string()))? {
        let tag = input
            .read_raw_varint32()
            .map_err(|e| invalid(e.to_string()))?;
        let (field, wire_type) = (tag >> 3, tag & 7);
        match (field, wire_type) {
            (2, 2) => {
                let value = input.read_string().map_err(|e| invalid(e.to_string()))?;
                if !value.is_empty() {
                    path = Some(PathBuf::from(value));
                }
            }
            (_, 2) => {
                input.read_bytes().map_err(|e| invalid(e.to_string()))?;
            }
            (_, 0) => {
                input
                    .read_raw_varint64()
                    .map_err(|e| invalid(e.to_string()))?;
            }
            _ => {
                return Err(invalid(format!(
                    "unexpected field {field}, wire type {wire_type}"
                )))
            }
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::CodedOutputStream;

    fn options(type_url: &str, config_path: &str) -> Any {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            out.write_string(1, "capsa").unwrap();
            out.write_string(2, config_path).unwrap();
            out.write_string(3, "").unwrap();
            out.flush().unwrap();
        }
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn the_config_path_option_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.toml");
        std::fs::write(
            &path,
            "kernel = \"/k/vmlinux\"\ninitrd = \"/k/initrd\"\ncpus = 2\nmemory_mib = 512\n",
        )
        .unwrap();
        let any = options("runtimeoptions.v1.Options", path.to_str().unwrap());
        let config = ShimConfig::for_options(Some(&any)).unwrap();
        assert_eq!(config.kernel, PathBuf::from("/k/vmlinux"));
        assert_eq!(config.cpus, 2);
        assert_eq!(config.memory_mib, 512);
        assert_eq!(config.boot_timeout_secs, 60);
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.toml");
        std::fs::write(&path, "kernal = \"/k\"\n").unwrap();
        let err = ShimConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("kernal"), "{err}");
        std::fs::write(&path, "cpus = 0\n").unwrap();
        let err = ShimConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("cpus must be 1 to 32"), "{err}");
        let err = ShimConfig::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[test]
    fn foreign_or_garbled_options_are_refused() {
        let runc = options("containerd.runc.v1.Options", "/x");
        let err = ShimConfig::for_options(Some(&runc)).unwrap_err();
        assert!(
            err.to_string().contains("runtimeoptions.v1.Options"),
            "{err}"
        );
        let garbled = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0x12, 0x7f, b'a'],
            ..Default::default()
        };
        assert!(ShimConfig::for_options(Some(&garbled)).is_err());
    }
}
