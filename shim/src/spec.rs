//! containerd's OCI runtime spec, made to fit inside the sandbox's VM.
//! What names host resources (namespace paths, bind mounts of host paths,
//! hooks that would run host binaries) means nothing in the guest. Bind
//! mounts are handed back to the caller (a small host file can travel
//! with the root filesystem); the rest is left out, and each omission is
//! reported so the log says why.

use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType, Spec};

/// A bind mount taken out of the spec: host `source` on `destination`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: PathBuf,
}

/// What `for_guest` took out of a spec.
#[derive(Debug, Default)]
pub struct Removed {
    /// For the log: what is gone for good.
    pub dropped: Vec<String>,
    pub binds: Vec<Bind>,
    /// The network namespace the spec named (CNI's, for a pod): the VM
    /// takes its interface over rather than the container joining it.
    pub netns: Option<PathBuf>,
}

/// Adapts `spec` in place; returns what it took out.
pub fn for_guest(spec: &mut Spec) -> Removed {
    let mut dropped = Vec::new();
    let mut binds = Vec::new();
    let mut netns = None;
    if spec.hooks().is_some() {
        spec.set_hooks(None);
        dropped.push("hooks (they name host binaries)".to_string());
    }
    if let Some(linux) = spec.linux_mut() {
        if let Some(namespaces) = linux.namespaces_mut() {
            for namespace in namespaces.iter_mut() {
                if let Some(path) = namespace.path() {
                    if namespace.typ() == LinuxNamespaceType::Network {
                        netns = Some(path.clone());
                    }
                    dropped.push(format!(
                        "the {} namespace path {} (a host path; the guest makes its own)",
                        namespace.typ(),
                        path.display()
                    ));
                    if let Ok(fresh) = LinuxNamespaceBuilder::default()
                        .typ(namespace.typ())
                        .build()
                    {
                        *namespace = fresh;
                    }
                }
            }
        }
    }
    if let Some(mounts) = spec.mounts_mut() {
        mounts.retain(|mount| {
            let options = mount.options().as_deref().unwrap_or_default();
            let bind = mount.typ().as_deref() == Some("bind")
                || options.iter().any(|o| o == "bind" || o == "rbind");
            if bind {
                binds.push(Bind {
                    source: mount.source().clone().unwrap_or_default(),
                    destination: mount.destination().clone(),
                });
            }
            !bind
        });
    }
    Removed {
        dropped,
        binds,
        netns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTAINERD_SPEC: &str = r#"{
        "ociVersion": "1.0.2-dev",
        "process": {"args": ["echo", "hello"], "cwd": "/", "terminal": false,
                    "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "hooks": {"createRuntime": [{"path": "/usr/bin/nri-hook"}]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts",
             "options": ["rbind", "ro"]},
            {"destination": "/data", "source": "/srv/data", "options": ["rbind"]}
        ],
        "linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
            {"type": "ipc", "path": "/proc/42/ns/ipc"}
        ]}
    }"#;

    #[test]
    fn host_resources_are_left_out_and_reported() {
        let mut spec: Spec = serde_json::from_str(CONTAINERD_SPEC).unwrap();
        let removed = for_guest(&mut spec);
        let dropped = removed.dropped;
        assert_eq!(dropped.len(), 3, "{dropped:#?}");
        assert_eq!(
            removed.binds,
            [
                Bind {
                    source: "/var/lib/x/hosts".into(),
                    destination: "/etc/hosts".into()
                },
                Bind {
                    source: "/srv/data".into(),
                    destination: "/data".into()
                }
            ]
        );
        assert!(spec.hooks().is_none());
        let mounts: Vec<_> = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.destination().display().to_string())
            .collect();
        assert_eq!(mounts, ["/proc"]);
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert_eq!(namespaces.len(), 3);
        assert!(namespaces.iter().all(|n| n.path().is_none()));
        assert!(dropped
            .iter()
            .any(|d| d.contains("/var/run/netns/cni-1234")));
        assert_eq!(removed.netns, Some("/var/run/netns/cni-1234".into()));
    }

    #[test]
    fn a_plain_spec_is_left_alone() {
        let mut spec = Spec::default();
        let before = serde_json::to_string(&spec).unwrap();
        let removed = for_guest(&mut spec);
        assert!(removed.dropped.is_empty() && removed.binds.is_empty());
        assert_eq!(serde_json::to_string(&spec).unwrap(), before);
    }
}
