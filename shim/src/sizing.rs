//! The size of a sandbox's VM: the pod's CPU and memory limits (what
//! containerd's CRI plugin writes into the sandbox's annotations, or a
//! lone container's own `linux.resources`), plus the guest's own memory
//! overhead, within the bounds the shim's config allows. An annotation may
//! set the size outright where the config allows it. Without limits the
//! config's default size stands.

use std::collections::HashMap;

use oci_spec::runtime::Spec;

use crate::config::ShimConfig;

/// containerd's CRI plugin: the pod's CPU quota and period and its memory
/// limit in bytes (from the PodSandboxConfig's linux resources).
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// Capsa's own: the VM's vCPUs and memory (MiB), honoured only where the
/// shim config's `allowed_annotations` names them.
pub const VM_CPUS: &str = "io.capsa.vm.cpus";
pub const VM_MEMORY_MIB: &str = "io.capsa.vm.memory-mib";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub cpus: u8,
    pub memory_mib: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizingError {
    #[error("annotation {0} is not allowed by the shim's config (allowed_annotations)")]
    NotAllowed(String),
    #[error("annotation {name}: {value:?} is not a positive whole number")]
    Invalid { name: String, value: String },
    #[error("the pod asks for {asked} {what}, over the {limit} the shim's config allows ({key})")]
    OverLimit {
        what: &'static str,
        asked: u64,
        limit: u64,
        key: &'static str,
    },
}

fn number(annotations: &HashMap<String, String>, name: &str) -> Result<Option<u64>, SizingError> {
    match annotations.get(name).map(|v| v.trim()) {
        None | Some("") => Ok(None),
        Some(value) => value
            .parse::<i64>()
            .map_err(|_| SizingError::Invalid {
                name: name.to_string(),
                value: value.to_string(),
            })
            // 0 and -1 are how CRI says "no limit".
            .map(|n| u64::try_from(n).ok().filter(|&n| n > 0)),
    }
}

/// The VM size for the sandbox whose first container's spec is `spec`.
pub fn vm_size(config: &ShimConfig, spec: &Spec) -> Result<VmSize, SizingError> {
    let annotations = spec.annotations().clone().unwrap_or_default();
    for name in [VM_CPUS, VM_MEMORY_MIB] {
        if annotations.contains_key(name) && !config.allowed_annotations.iter().any(|a| a == name) {
            return Err(SizingError::NotAllowed(name.to_string()));
        }
    }
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let own_cpu = resources.and_then(|r| r.cpu().as_ref());
    let quota = number(&annotations, SANDBOX_CPU_QUOTA)?.or_else(|| {
        own_cpu
            .and_then(|c| c.quota())
            .and_then(|q| u64::try_from(q).ok())
    });
    let period = number(&annotations, SANDBOX_CPU_PERIOD)?
        .or_else(|| own_cpu.and_then(|c| c.period()))
        .unwrap_or(100_000);
    let pod_cpus = quota
        .filter(|&q| q > 0 && period > 0)
        .map(|q| q.div_ceil(period));
    let pod_memory = number(&annotations, SANDBOX_MEMORY)?.or_else(|| {
        resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .and_then(|l| u64::try_from(l).ok())
            .filter(|&l| l > 0)
    });

    let cpus = match number(&annotations, VM_CPUS)? {
        Some(n) => n,
        None => pod_cpus.unwrap_or(config.cpus.into()),
    };
    let memory_mib = match number(&annotations, VM_MEMORY_MIB)? {
        Some(n) => n,
        None => match pod_memory {
            Some(bytes) => {
                (bytes.div_ceil(1 << 20) + config.memory_overhead_mib).max(config.min_memory_mib)
            }
            None => config.memory_mib,
        },
    };
    if cpus > config.max_cpus.into() {
        return Err(SizingError::OverLimit {
            what: "vCPUs",
            asked: cpus,
            limit: config.max_cpus.into(),
            key: "max_cpus",
        });
    }
    if memory_mib > config.max_memory_mib {
        return Err(SizingError::OverLimit {
            what: "MiB of VM memory",
            asked: memory_mib,
            limit: config.max_memory_mib,
            key: "max_memory_mib",
        });
    }
    Ok(VmSize {
        // max_cpus is a u8, so this holds.
        cpus: u8::try_from(cpus).unwrap_or(u8::MAX),
        memory_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotations: &[(&str, &str)], resources: Option<serde_json::Value>) -> Spec {
        let mut json = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": annotations.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                .collect::<serde_json::Map<_, _>>(),
        });
        if let Some(resources) = resources {
            json["linux"] = serde_json::json!({ "resources": resources });
        }
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_pod_without_limits_gets_the_default_size() {
        let config = ShimConfig::default();
        assert_eq!(
            vm_size(&config, &spec(&[], None)).unwrap(),
            VmSize {
                cpus: config.cpus,
                memory_mib: config.memory_mib
            }
        );
    }

    #[test]
    fn the_sandbox_annotations_size_the_vm_with_the_overhead() {
        let config = ShimConfig::default();
        let size = vm_size(
            &config,
            &spec(
                &[
                    (SANDBOX_CPU_QUOTA, "150000"),
                    (SANDBOX_CPU_PERIOD, "100000"),
                    (SANDBOX_MEMORY, "1073741824"),
                ],
                None,
            ),
        )
        .unwrap();
        assert_eq!(
            size,
            VmSize {
                cpus: 2,
                memory_mib: 1024 + config.memory_overhead_mib
            }
        );
    }

    #[test]
    fn a_lone_containers_limits_size_its_vm() {
        let config = ShimConfig::default();
        let size = vm_size(
            &config,
            &spec(
                &[],
                Some(
                    serde_json::json!({"cpu": {"quota": 300000, "period": 100000},
                                        "memory": {"limit": 16777216}}),
                ),
            ),
        )
        .unwrap();
        assert_eq!(
            size,
            VmSize {
                cpus: 3,
                memory_mib: config.min_memory_mib
            }
        );
    }

    #[test]
    fn overrides_need_the_config_and_limits_hold() {
        let mut config = ShimConfig::default();
        let asked = spec(&[(VM_CPUS, "4"), (VM_MEMORY_MIB, "2048")], None);
        assert_eq!(
            vm_size(&config, &asked).unwrap_err(),
            SizingError::NotAllowed(VM_CPUS.into())
        );
        config.allowed_annotations = vec![VM_CPUS.into(), VM_MEMORY_MIB.into()];
        assert_eq!(
            vm_size(&config, &asked).unwrap(),
            VmSize {
                cpus: 4,
                memory_mib: 2048
            }
        );
        config.max_cpus = 2;
        let err = vm_size(&config, &asked).unwrap_err().to_string();
        assert!(err.contains("4 vCPUs") && err.contains("max_cpus"), "{err}");
        let bad = spec(&[(SANDBOX_MEMORY, "lots")], None);
        assert!(matches!(
            vm_size(&config, &bad),
            Err(SizingError::Invalid { .. })
        ));
    }
}
