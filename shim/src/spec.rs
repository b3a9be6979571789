//! containerd's OCI runtime spec, made to fit inside the sandbox's VM.
//! What names host resources (namespace paths, bind mounts of host paths,
//! hooks that would run host binaries) means nothing in the guest. Bind
//! mounts are handed back to the caller, who says where each one's source
//! is in the guest (`place_binds`: a host directory shared by copy) or
//! leaves it out (a small host file travels in the root filesystem); the
//! rest is left out, and each omission is reported so the log says why.

use std::collections::HashMap;

use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType, Spec};

/// A bind mount of the spec: host `source` on `destination`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub read_only: bool,
}

fn is_bind(mount: &oci_spec::runtime::Mount) -> bool {
    let options = mount.options().as_deref().unwrap_or_default();
    mount.typ().as_deref() == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind")
}

/// What `for_guest` took out of a spec, and the binds it found.
#[derive(Debug, Default)]
pub struct Removed {
    /// For the log: what is gone for good.
    pub dropped: Vec<String>,
    /// Still in the spec, until `place_binds`.
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
    for mount in spec.mounts().iter().flatten().filter(|m| is_bind(m)) {
        let options = mount.options().as_deref().unwrap_or_default();
        binds.push(Bind {
            source: mount.source().clone().unwrap_or_default(),
            destination: mount.destination().clone(),
            read_only: options.iter().any(|o| o == "ro"),
        });
    }
    Removed {
        dropped,
        binds,
        netns,
    }
}

/// Gives each bind mount of `spec` its source in the guest, from
/// `guest_sources` by destination, in its place among the mounts; binds
/// not named there are taken out.
pub fn place_binds(spec: &mut Spec, guest_sources: &HashMap<PathBuf, PathBuf>) {
    if let Some(mounts) = spec.mounts_mut() {
        mounts.retain_mut(|mount| {
            if !is_bind(mount) {
                return true;
            }
            match guest_sources.get(mount.destination()) {
                Some(source) => {
                    mount.set_source(Some(source.clone()));
                    true
                }
                None => false,
            }
        });
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
                    destination: "/etc/hosts".into(),
                    read_only: true,
                },
                Bind {
                    source: "/srv/data".into(),
                    destination: "/data".into(),
                    read_only: false,
                }
            ]
        );
        assert!(spec.hooks().is_none());
        let guest_sources = HashMap::from([("/data".into(), "/run/capsa/shared/x".into())]);
        place_binds(&mut spec, &guest_sources);
        let mounts: Vec<_> = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| {
                format!(
                    "{} <- {}",
                    m.destination().display(),
                    m.source().as_ref().unwrap().display()
                )
            })
            .collect();
        assert_eq!(mounts, ["/proc <- proc", "/data <- /run/capsa/shared/x"]);
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
