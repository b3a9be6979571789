//! containerd's CRI plugin as Kubernetes' kubelet drives it: Debian's
//! containerd with the CRI plugin on, Capsa as runtime handler `capsa`,
//! Debian's CNI plugins (bridge and host-local) for pod networking, and a
//! CRI client generated from the CRI protos (capsa-cri-client).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use capsa_cri_client::CriClient;

use crate::suites::shim::containerd::{Containerd, RUNTIME};
use crate::vm::Artifacts;

/// The runtime handler a RuntimeClass names for Capsa.
pub const HANDLER: &str = "capsa";
/// The pods' CNI network, inside the outer machine only.
pub const POD_SUBNET: &str = "10.99.0.0/24";
/// The CNI bridge's own address in it (the pods' gateway): a local
/// address of the test machine, where hostPorts answer.
pub const BRIDGE_IP: &str = "10.99.0.1";
/// The registry the pods pull from (Debian's docker-registry on the test
/// machine's loopback, plain HTTP).
pub const REGISTRY: &str = "127.0.0.1:5002";
/// How long one CRI call may take (a sandbox boots a VM, nested).
const CALL_TIMEOUT: Duration = Duration::from_secs(180);

pub struct Cri<'a> {
    pub containerd: Containerd<'a>,
    client: CriClient,
}

/// Where the CNI plugins are: the payload's copies (nested), else
/// Debian's.
fn cni_bin(artifacts: &Artifacts) -> PathBuf {
    if artifacts.path("bin/bridge").exists() {
        artifacts.path("bin")
    } else {
        PathBuf::from("/usr/lib/cni")
    }
}

fn plugins(dir: &Path, cni_bin: &Path) -> Result<String> {
    let cni_conf = dir.join("cni");
    std::fs::create_dir_all(&cni_conf)?;
    std::fs::write(
        cni_conf.join("10-capsa-e2e.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "capsa-e2e",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni-capsa0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                         "routes": [{"dst": "0.0.0.0/0"}],
                         "dataDir": dir.join("cni-ipam").display().to_string()}
            }, {
                "type": "portmap",
                "capabilities": {"portMappings": true}
            }]
        })
        .to_string(),
    )?;
    let d = dir.display();
    let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
    Ok(format!(
        "[{cri}]\n  sandbox_image = \"{image}\"\n  disable_apparmor = true\n\
         [{cri}.containerd]\n  snapshotter = \"overlayfs\"\n  default_runtime_name = \"runc\"\n\
         [{cri}.containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
         [{cri}.containerd.runtimes.{HANDLER}]\n  runtime_type = \"{RUNTIME}\"\n\
         [{cri}.containerd.runtimes.{HANDLER}.options]\n  ConfigPath = \"{d}/shim-cri.toml\"\n\
         [{cri}.cni]\n  bin_dir = \"{bin}\"\n  conf_dir = \"{conf}\"\n\
         [{cri}.registry.mirrors.\"{REGISTRY}\"]\n  endpoint = [\"http://{REGISTRY}\"]\n",
        image = crate::suites::shim::containerd::IMAGE,
        bin = cni_bin.display(),
        conf = cni_conf.display(),
    ))
}

/// The CRI's shim config: the shim suite's, with root filesystems on
/// disks (off by default).
fn shim_config(dir: &Path) -> Result<()> {
    let base = std::fs::read_to_string(dir.join("shim.toml"))?;
    std::fs::write(
        dir.join("shim-cri.toml"),
        format!("{base}rootfs_disks = 4\n"),
    )?;
    Ok(())
}

impl<'a> Cri<'a> {
    pub fn start(artifacts: &'a Artifacts) -> Result<Self> {
        // containerd's streaming server and the registry listen on
        // loopback, which a bare test machine (the nested outer one) has
        // down.
        artifacts.ip(&["link", "set", "lo", "up"])?;
        let bin = cni_bin(artifacts);
        let mut config = None;
        let containerd =
            Containerd::start_in(artifacts, "capsa-e2e-cri", |dir| match plugins(dir, &bin) {
                Ok(text) => text,
                Err(e) => {
                    config = Some(e);
                    String::new()
                }
            })?;
        if let Some(e) = config {
            return Err(e.context("writing the CNI config"));
        }
        shim_config(&containerd.dir)?;
        let client = CriClient::connect(&containerd.dir.join("containerd.sock"), CALL_TIMEOUT)?;
        Ok(Cri { containerd, client })
    }
}

impl std::ops::Deref for Cri<'_> {
    type Target = CriClient;

    fn deref(&self) -> &CriClient {
        &self.client
    }
}
