//! containerd-shim-capsa-v2: containerd's runtime v2 shim for Capsa. Each
//! sandbox (a pod, or a lone container) runs in its own microVM; the shim
//! serves containerd's Task API for it over ttrpc and drives the VM's
//! agent. containerd finds it as runtime `io.containerd.capsa.v2`.

mod config;
mod pod_network;
mod rootfs;
mod rootfs_disks;
mod sandbox;
mod shared_dirs;
mod sizing;
mod spec;
mod stdio;
mod task;

use std::path::Path;
use std::sync::Arc;

use containerd_shim::api::DeleteResponse;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, ExitSignal, Flags, StartOpts};

const RUNTIME_ID: &str = "io.containerd.capsa.v2";

struct Service {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

/// The sandbox a bundle's container belongs to: the pod CRI names in its
/// annotations, else the container itself.
fn sandbox_of(bundle: &Path, id: &str) -> String {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|spec| {
            spec.get("annotations")?
                .get(task::SANDBOX_ID_ANNOTATION)?
                .as_str()
                .map(str::to_string)
        })
        .filter(|sandbox| !sandbox.is_empty())
        .unwrap_or_else(|| id.to_string())
}

impl containerd_shim::Shim for Service {
    type T = task::TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// One shim process per sandbox: a container of a sandbox that has a
    /// shim already gets that shim's address.
    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = sandbox_of(Path::new("."), &opts.id);
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    /// Cleans up after a shim that is gone: run in the bundle directory.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = std::env::current_dir().unwrap_or_default();
        rootfs::unmount(&bundle.join("rootfs"));
        let sandbox = sandbox_of(&bundle, &self.id);
        if sandbox == self.id {
            sandbox::destroy(&sandbox::dir_for(&self.namespace, &sandbox));
        }
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(Timestamp::now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let sandbox = sandbox_of(&std::env::current_dir().unwrap_or_default(), &self.id);
        task::TaskService::new(&self.namespace, &sandbox, publisher, self.exit.clone())
    }
}

fn main() {
    containerd_shim::run::<Service>(RUNTIME_ID, None);
}
