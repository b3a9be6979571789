//! The virtio devices from both sides, with capsa-io-probe as the guest's
//! init and as the host's end:
//! - virtio-blk: data the host wrote reads back in the guest, and data
//!   the guest wrote reads back on the host, byte for byte;
//! - virtio-vsock: 32 echo streams guest-initiated and 32 host-initiated,
//!   and a bulk transfer each way through one stream, checked;
//! - virtio-net: the guest pings and TCP-connects to the host's end of a
//!   tap in a network namespace of the suite's own;
//! - virtio-rng: getrandom does not block at boot, hw_random is virtio.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use capsa_vmm_config::{DiskConfig, MacAddr, NetConfig, VsockConfig};

use crate::suite::Suite;
use crate::vm::{self, Artifacts, Background, Run, TapNamespace};

const NETNS: &str = "capsa-e2e-devices";
const TAP: &str = "capsa-tap0";
const DISK_BYTES: u64 = 4 << 20;
const STREAMS: u32 = 32;
const VM_TIMEOUT: Duration = Duration::from_secs(600);

/// One `PROBE STEP ok|FAIL DETAIL` line of the guest's probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub ok: bool,
    pub detail: String,
}

/// The probe's steps by name, from the guest's console.
pub fn probe_steps(console: &str) -> BTreeMap<String, Step> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("PROBE "))
        .filter_map(|l| {
            let (name, rest) = l.split_once(' ')?;
            let (verdict, detail) = rest.split_once(' ').unwrap_or((rest, ""));
            let ok = match verdict {
                "ok" => true,
                "FAIL" => false,
                // `done failed=N`
                _ => return Some((name.to_string(), done_step(rest))),
            };
            Some((
                name.to_string(),
                Step {
                    ok,
                    detail: detail.to_string(),
                },
            ))
        })
        .collect()
}

fn done_step(rest: &str) -> Step {
    let failed = rest
        .strip_prefix("failed=")
        .and_then(|n| n.parse::<u32>().ok());
    Step {
        ok: failed == Some(0),
        detail: rest.to_string(),
    }
}

fn probe(artifacts: &Artifacts, args: &[&str]) -> Command {
    let mut command = Command::new(artifacts.path("capsa-io-probe"));
    command.args(args);
    command
}

fn zeroed(path: &Path) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(8 << 20)?;
    Ok(())
}

pub fn run(suite: &mut Suite, artifacts: &Artifacts, bulk_bytes: u64) {
    if let Err(e) = run_vm(suite, artifacts, bulk_bytes) {
        suite.check("setup", || Err(e));
    }
}

fn run_vm(suite: &mut Suite, artifacts: &Artifacts, bulk_bytes: u64) -> Result<()> {
    let work = std::env::temp_dir().join("capsa-e2e-devices");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let (vda, vdb, socket) = (
        work.join("vda.img"),
        work.join("vdb.img"),
        work.join("vsock.sock"),
    );
    zeroed(&vda)?;
    zeroed(&vdb)?;
    let blk = DISK_BYTES.to_string();
    let fill = vm::run(
        probe(artifacts, &["fill", path(&vdb)?, &blk, "11"]),
        Duration::from_secs(60),
    )?;
    ensure!(fill.status == Some(0), "fill: {}", fill.tail(5));
    let namespace = TapNamespace::new(artifacts, NETNS, TAP, "10.0.2.1/24")?;
    // The 32 echo streams plus the two bulk transfers, guest-initiated.
    let unix_server = Background::spawn(probe(
        artifacts,
        &[
            "serve-unix",
            &format!("{}_5000", path(&socket)?),
            &(STREAMS + 2).to_string(),
        ],
    ))?;
    let tcp_server = Background::spawn(artifacts.command_in(
        Some(&namespace.name),
        &artifacts.path("capsa-io-probe"),
        &["serve-tcp".into(), "10.0.2.1:7000".into(), "1".into()],
    ))?;
    let connector = Background::spawn(probe(
        artifacts,
        &[
            "connect-vsock",
            path(&socket)?,
            "6000",
            &STREAMS.to_string(),
            "1048576",
        ],
    ))?;
    let steps = format!(
        "rng blk-read=vdb:{blk}:11 blk-write=vda:{blk}:12 vsock-serve=6000:{STREAMS} \
         vsock-connect=5000:{STREAMS}:1048576 vsock-bulk=5000:{bulk_bytes} \
         net=10.0.2.15/24:10.0.2.1:7000 vsock-wait"
    );
    let args = capsa_vmm_config::VmmArgs {
        initrd: Some(artifacts.path("probe-initramfs.cpio")),
        cmdline: format!("quiet rdinit=/bin/capsa-io-probe -- {steps}"),
        disks: vec![
            DiskConfig::at(vda.clone(), false, None),
            DiskConfig::at(vdb, true, None),
        ],
        nets: vec![NetConfig {
            tap: TAP.into(),
            mac: MacAddr([0x02, 0xca, 0x95, 0, 0, 2]),
            bridge: None,
            fd: None,
            rate: None,
        }],
        vsock: Some(VsockConfig::at(&socket)),
        ..artifacts.vm(2, 256)
    };
    let argv: Vec<OsString> = args.to_args()?;
    let guest = vm::run(
        artifacts.command_in(Some(&namespace.name), &artifacts.vmm(), &argv),
        VM_TIMEOUT,
    );
    let hosts = [
        ("serve-unix", unix_server),
        ("serve-tcp", tcp_server),
        ("connect-vsock", connector),
    ]
    .map(|(name, process)| (name, process.finish(Duration::from_secs(5))));
    drop(namespace);
    let guest = guest?;
    if let Some(fault) = guest.fault() {
        return Err(fault.into());
    }
    report(suite, artifacts, &guest, &vda, bulk_bytes, hosts)
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("a non-UTF-8 work path")
}

fn report(
    suite: &mut Suite,
    artifacts: &Artifacts,
    guest: &Run,
    vda: &Path,
    bulk_bytes: u64,
    hosts: [(&str, Result<Run>); 3],
) -> Result<()> {
    suite.verdict(
        "the VMM exits 0 at power-off",
        guest.status == Some(0),
        format!("status {:?}; {}", guest.status, guest.tail(5)),
    );
    let steps = probe_steps(&guest.stdout);
    let mut step = |check: &str, name: &str| {
        let step = steps.get(name);
        suite.verdict(
            check,
            step.is_some_and(|s| s.ok),
            step.map_or_else(|| format!("no {name} step"), |s| s.detail.clone()),
        );
    };
    step(
        "virtio-rng: getrandom is ready at boot, hw_random is virtio",
        "rng",
    );
    step(
        "virtio-blk: a host-written disk reads back in the guest",
        "blk-read",
    );
    step("virtio-blk: the guest writes its disk", "blk-write");
    step("virtio-vsock: 32 guest-initiated streams", "vsock-connect");
    step(
        &format!("virtio-vsock: {bulk_bytes} bytes each way, checked"),
        "vsock-bulk",
    );
    step(
        "virtio-vsock: 32 host-initiated streams (guest side)",
        "vsock-wait",
    );
    step(
        "virtio-net: ping and TCP to a tap in a network namespace",
        "net",
    );
    step("no guest step failed", "done");
    let verify = vm::run(
        probe(
            artifacts,
            &["verify", path(vda)?, &DISK_BYTES.to_string(), "12"],
        ),
        Duration::from_secs(60),
    )?;
    suite.verdict(
        "virtio-blk: the guest-written disk reads back on the host",
        verify.status == Some(0),
        verify.tail(3),
    );
    for (name, run) in hosts {
        let check = match name {
            "serve-unix" => "virtio-vsock: the host's server saw every stream intact",
            "serve-tcp" => "virtio-net: the host's TCP server saw the guest's stream",
            _ => "virtio-vsock: 32 host-initiated streams (host side)",
        };
        suite.check(check, || {
            let run = run?;
            ensure!(
                run.status == Some(0),
                "{name}: status {:?}: {}",
                run.status,
                run.tail(5)
            );
            Ok(run.tail(1))
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_lines_become_steps() {
        let console = "boot noise\r\nPROBE rng ok hw_random=virtio\r\nPROBE net FAIL no route\nPROBE done failed=1\n";
        let steps = probe_steps(console);
        assert_eq!(
            steps["rng"],
            Step {
                ok: true,
                detail: "hw_random=virtio".into()
            }
        );
        assert!(!steps["net"].ok);
        assert!(!steps["done"].ok);
        assert!(probe_steps("PROBE done failed=0")["done"].ok);
    }
}
