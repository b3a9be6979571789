//! `capsa-agent`: PID 1 inside every Capsa microVM.
//!
//! It brings up the basic filesystems, reports that the guest is ready
//! (with its CPU count and memory) on the console, and serves the ttrpc API
//! of `capsa-protocol` on vsock port 1024, with process stdio on port 1025
//! (or powers the VM off at once when the kernel command line asks it to).
//!
//! Run again as `capsa-agent container-init`, it is the runtime's helper
//! that sets up one container process (capsa_runtime::init).

mod api;
mod containers;
mod copy;
mod disks;
mod errors;
mod images;
mod init;
mod kmsg;
mod net;
mod params;
mod ready;
mod sandbox;
mod shared;
mod stdio;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use capsa_layers::LayerStore;
use capsa_runtime::{Runtime, RuntimeConfig};

/// The argument that makes this binary the container-init helper.
const CONTAINER_INIT: &str = "container-init";
const LAYERS_DIR: &str = "/run/capsa/layers";
const CGROUP_PARENT: &str = "/sys/fs/cgroup/containers";

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some(CONTAINER_INIT) => capsa_runtime::init::main(),
        Some(mode @ (copy::COPY_IN | copy::COPY_OUT)) => copy::helper_main(mode),
        _ => {}
    }
    kmsg::install_panic_hook();
    if let Err(e) = run() {
        // As PID 1 our exit panics the kernel; the VMM then reports that
        // panic with this message in the console tail.
        kmsg::error(&format!("fatal: {e:#}"));
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    init::leave_initramfs()?;
    init::mount_basics()?;
    init::attach_console();
    let params = params::BootParams::from_proc()?;
    let report = ready::ReadyReport::collect()?;
    // writeln! rather than println!: a console write error must be reported,
    // not turned into a panic of PID 1.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", report.line())
        .and_then(|()| stdout.flush())
        .context("cannot write the ready line to the console")?;
    drop(stdout);
    // The tty sends output from a buffer; let it drain before power-off.
    init::drain_console();
    if params.exit_after_ready {
        init::power_off()?;
    }
    // PID 1 inherits every orphan; the reaper collects them all and hands
    // container processes' statuses to whoever waits for them.
    capsa_runtime::Reaper::global();
    net::bring_up_loopback().map_err(|e| anyhow::anyhow!("{e:?}"))?;

    let store = LayerStore::open(LAYERS_DIR.as_ref()).context("cannot open the layer store")?;
    let images = Arc::new(images::Images::new(Arc::new(store)));
    let runtime = Runtime::new(RuntimeConfig {
        helper: PathBuf::from("/proc/self/exe"),
        helper_args: vec![CONTAINER_INIT.to_string()],
        state_dir: PathBuf::from(disks::CONTAINERS_DIR),
        cgroup_parent: PathBuf::from(CGROUP_PARENT),
    });
    let hub = Arc::new(stdio::StdioHub::default());
    hub.serve(capsa_protocol::STDIO_VSOCK_PORT)?;
    let containers = Arc::new(containers::Containers::new(runtime, images.clone(), hub));
    // Kept alive for as long as PID 1 runs.
    let _server = api::serve(api::AgentService {
        images,
        containers,
        sandbox: Arc::new(sandbox::Sandbox::default()),
        shared: shared::SharedDirs::default(),
        copies: copy::Copies::default(),
    })?;
    loop {
        std::thread::park();
    }
}
