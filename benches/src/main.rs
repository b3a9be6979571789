//! `capsa-bench`: Capsa's benchmarks. Each prints a table and writes JSON.
//!
//! `boot`: wall time from starting the VMM process to its exit after the
//! guest agent printed its ready line and powered off, and the guest's own
//! uptime at the ready line; for capsa-vmm and, in the same run, QEMU's
//! `microvm` machine booting the same kernel and initramfs.
//!
//! `restore`: a VM restored from a snapshot next to the same VM booted
//! cold, each from starting capsa-vmm to its agent's first answer, and
//! the host memory (PSS) of idle VMs of each kind.
//!
//! `starts`: `capsa run --rm IMAGE true` through capsad, restored from the
//! template of its shape and booted cold (`--cold-boot`), next to crun and
//! runc on the same rootfs; and the host memory (PSS) of N idle groups
//! restored from the template next to N booted cold.
//!
//! `devices`: vsock throughput both ways and virtio-blk sequential and
//! random-read speed measured in the guest, with the host's own Unix
//! sockets and disk file measured by the same code as the reference.
//!
//! `unpack`: OCI layer import by capsa-layers (digest and diff-id checks,
//! decompression, unpack into overlay form), uncompressed, gzip and zstd,
//! next to GNU tar extracting the same archives.
//!
//! `containers`: wall time of `capsa run --rm IMAGE true` next to runc and
//! crun on the same rootfs, and a running group's memory on the host.
//!
//! `containment`: escape probes (host kernel, files, processes, devices,
//! modules, port I/O, sysrq, core_pattern, release_agent, vsock, host
//! services) inside a Capsa group and, as peers, runc and crun containers,
//! each as root with the capabilities the attacks need.
//!
//! `ctr`: wall time of `ctr run --rm IMAGE ID true` through containerd with
//! the Capsa shim next to io.containerd.runc.v2, same image, same run.
//!
//! `cri`: a pod and its first container through containerd's CRI plugin,
//! as kubelet starts one, per runtime handler (Capsa next to runc).

mod boot;
mod containers;
mod containment;
mod cri;
mod ctr;
mod devices;
mod network;
mod process;
mod restore;
mod starts;
mod stats;
mod unpack;
mod workdir;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "capsa-bench", about = "Capsa benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Boot to the agent's ready line and power off, N times per runner.
    Boot(boot::BootArgs),
    /// Restore from a snapshot next to a cold boot, to the agent's first
    /// answer, and idle VMs' memory.
    Restore(restore::RestoreArgs),
    /// `capsa run --rm IMAGE true` from a template, cold and by the peers,
    /// and the memory of N idle groups of each kind.
    Starts(starts::StartsArgs),
    /// vsock and virtio-blk throughput in the guest, next to the host's.
    Devices(devices::DevicesArgs),
    /// OCI layer import (verify, decompress, unpack) next to GNU tar.
    Unpack(unpack::UnpackArgs),
    /// `capsa run --rm IMAGE true` next to runc and crun, and a group's
    /// memory on the host.
    Containers(containers::ContainersArgs),
    /// `ctr run --rm IMAGE true` through containerd, per runtime (the
    /// Capsa shim next to runc.v2).
    Ctr(ctr::CtrArgs),
    /// A pod and its first container through the CRI, per runtime handler
    /// (Capsa next to runc).
    Cri(cri::CriArgs),
    /// TCP throughput into a group: published port, group address, and
    /// host loopback as the reference.
    Network(network::NetworkArgs),
    /// The network benchmark's receiving end (runs in a group).
    Sink(network::SinkArgs),
    /// Escape probes in a Capsa group next to runc and crun containers:
    /// a table probe x runtime (contained / escaped / not applicable).
    Containment(containment::ContainmentArgs),
    /// The containment probes themselves (run in the container under test).
    Probe(containment::ProbeArgs),
}

fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::Boot(args) => boot::run(&args),
        Bench::Restore(args) => restore::run(&args),
        Bench::Starts(args) => starts::run(&args),
        Bench::Devices(args) => devices::run(&args),
        Bench::Unpack(args) => unpack::run(&args),
        Bench::Containers(args) => containers::run(&args),
        Bench::Ctr(args) => ctr::run(&args),
        Bench::Cri(args) => cri::run(&args),
        Bench::Network(args) => network::run(&args),
        Bench::Sink(args) => network::sink(&args),
        Bench::Containment(args) => containment::run(&args),
        Bench::Probe(args) => containment::probe(&args),
    }
}

/// Where a benchmark writes its JSON unless told otherwise.
pub fn default_json(name: &str) -> PathBuf {
    PathBuf::from(format!("target/capsa/bench-{name}.json"))
}

/// Writes a benchmark's report as pretty JSON, creating its directory.
pub fn write_json(path: &std::path::Path, report: &impl serde::Serialize) -> Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("results written to {}", path.display());
    Ok(())
}
