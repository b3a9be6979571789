//! The agent in a booted guest, as the host reaches it through the VMM's
//! vsock socket: its API (version, ping), every container scenario on a
//! busybox image (with a NIC on a tap in a network namespace of the
//! suite's own and an ext4 disk for the sandbox's volumes), and a
//! shutdown that stops what still runs and powers the VM off.

mod refusals;
mod sandbox;
mod scenarios;

use std::time::Duration;

use anyhow::{ensure, Context};
use capsa_guest_client::Guest;
use capsa_vmm_config::{DiskConfig, MacAddr, NetConfig, VsockConfig};

use crate::suite::{unanswered_is_fault, Suite};
use crate::vm::{Artifacts, Background, TapNamespace};

const NETNS: &str = "capsa-e2e-agent";
const TAP: &str = "capsa-tap1";
const MAC: MacAddr = MacAddr([0x02, 0xca, 0x95, 0, 0, 3]);
const DISK_SERIAL: &str = "capsa-data";
const BOOT_PATIENCE: Duration = Duration::from_secs(120);

pub fn run(suite: &mut Suite, artifacts: &Artifacts) {
    let work = std::env::temp_dir().join("capsa-e2e-agent");
    let _ = std::fs::remove_dir_all(&work);
    let setup = std::fs::create_dir_all(&work)
        .context("making the work directory")
        .and_then(|()| TapNamespace::new(artifacts, NETNS, TAP, "10.0.3.1/24"));
    let namespace = match setup {
        Ok(namespace) => namespace,
        Err(e) => return suite.check("setup", || Err(e)),
    };
    let socket = work.join("agent.sock");
    let args = capsa_vmm_config::VmmArgs {
        nets: vec![NetConfig {
            tap: TAP.into(),
            mac: MAC,
            bridge: None,
            fd: None,
            rate: None,
        }],
        disks: vec![DiskConfig::at(
            artifacts.path("data.img"),
            false,
            Some(DISK_SERIAL.into()),
        )],
        vsock: Some(VsockConfig::at(&socket)),
        ..artifacts.vm(2, 512)
    };
    let vmm = args
        .to_args()
        .map_err(anyhow::Error::from)
        .and_then(|argv| {
            Background::spawn(artifacts.command_in(Some(&namespace.name), &artifacts.vmm(), &argv))
        });
    let vmm = match vmm {
        Ok(vmm) => vmm,
        Err(e) => return suite.check("setup", || Err(e)),
    };
    let mut guest = None;
    suite.check(
        "the agent answers its API (version, ping) over vsock",
        || {
            let connected = Guest::connect(&socket, BOOT_PATIENCE)
                .map_err(|e| unanswered_is_fault(e.into()))?;
            let uptime_ms = connected
                .ping()
                .map_err(|e| unanswered_is_fault(e.into()))?;
            guest = Some(connected);
            Ok(format!("ping: up {uptime_ms} ms"))
        },
    );
    if let Some(guest) = &guest {
        let options = scenarios::Options {
            nic: Some(scenarios::Nic {
                mac: MAC.to_string(),
                host_address: std::net::Ipv4Addr::new(10, 0, 3, 1),
            }),
            ext4_disk: Some(DISK_SERIAL.into()),
        };
        if let Err(e) = scenarios::run(suite, guest, &artifacts.path("busybox-oci"), options) {
            suite.check("scenarios", || Err(unanswered_is_fault(e)));
        }
        if let Err(e) = guest.shutdown(Duration::from_secs(2)) {
            suite.check("shutdown", || Err(unanswered_is_fault(e.into())));
        }
    }
    let finished = vmm.finish(Duration::from_secs(if guest.is_some() { 60 } else { 5 }));
    suite.check(
        "the VMM exits 0 once the agent stopped its containers and powered off",
        || {
            let run = finished?;
            if let Some(fault) = run.fault() {
                return Err(fault.into());
            }
            ensure!(
                run.status == Some(0),
                "status {:?}: {}",
                run.status,
                run.tail(30)
            );
            Ok("status 0".into())
        },
    );
    drop(namespace);
}
