//! The sandbox scenario: hostname, clock, NIC, routes, DNS and volumes.

use anyhow::{ensure, Context, Result};
use capsa_guest_client::GuestError;
use ttrpc::Code;

use super::refusals::expect_code;
use super::scenarios::Check;
use std::path::Path;

pub(super) fn sandbox(check: &Check) -> Result<String> {
    use capsa_protocol::agent::{
        volume, BlockDevice, Dns, EmptyDir, Interface, Route, Secret, SecretFile,
        SetupSandboxRequest, Volume,
    };
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as i64;
    let guest_address = check.options.nic.as_ref().map(|nic| {
        let mut octets = nic.host_address.octets();
        octets[3] += 1;
        std::net::Ipv4Addr::from(octets)
    });
    let mut request = SetupSandboxRequest {
        hostname: "capsa-group".into(),
        dns: protobuf::MessageField::some(Dns {
            servers: vec!["10.0.3.53".into()],
            search: vec!["corp.test".into()],
            ..Default::default()
        }),
        volumes: vec![
            Volume {
                name: "scratch".into(),
                source: Some(volume::Source::EmptyDir(EmptyDir {
                    size_limit_bytes: 1 << 20,
                    ..Default::default()
                })),
                ..Default::default()
            },
            Volume {
                name: "creds".into(),
                source: Some(volume::Source::Secret(Secret {
                    files: vec![SecretFile {
                        path: "api/token".into(),
                        content: b"s3cret".to_vec(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
                ..Default::default()
            },
        ],
        time_unix_ns: now_ns,
        ..Default::default()
    };
    if let Some(serial) = &check.options.ext4_disk {
        request.volumes.push(Volume {
            name: "data".into(),
            source: Some(volume::Source::Block(BlockDevice {
                serial: serial.clone(),
                fstype: "ext4".into(),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    if let (Some(nic), Some(address)) = (&check.options.nic, guest_address) {
        request.interfaces = vec![Interface {
            mac: nic.mac.clone(),
            name: "eth0".into(),
            addresses: vec![format!("{address}/24")],
            mtu: 1400,
            ..Default::default()
        }];
        request.routes = vec![Route {
            destination: "default".into(),
            gateway: nic.host_address.to_string(),
            ..Default::default()
        }];
    }
    let setup = |request: &SetupSandboxRequest| {
        check
            .guest
            .agent()
            .setup_sandbox(ttrpc::context::with_timeout(60_000_000_000), request)
            .map_err(|source| GuestError::Call {
                call: "SetupSandbox",
                source,
            })
    };
    setup(&request)?;
    expect_code(setup(&request), Code::FAILED_PRECONDITION, "a second setup")?;

    let mut script = String::from(
        "hostname; grep nameserver /etc/resolv.conf; grep -c capsa-group /etc/hosts; \
         stat -c '%a' /creds/api/token; cat /creds/api/token; echo; \
         (dd if=/dev/zero of=/scratch/fill bs=64k count=32 2>/dev/null && echo scratch-unlimited) || echo scratch-full; \
         date +%s; ",
    );
    if check.options.ext4_disk.is_some() {
        script.push_str(
            "grep ' /data ' /proc/mounts | cut -d' ' -f3; echo kept > /data/file && cat /data/file; ",
        );
    }
    if let Some(address) = guest_address {
        script.push_str(&format!(
            "ip -o addr show eth0 | grep -o '{address}/24'; cat /sys/class/net/eth0/mtu; \
             ip route | grep -o 'default via [0-9.]*'; \
             ping -c 1 -W 5 {} > /dev/null && echo ping-ok",
            check
                .options
                .nic
                .as_ref()
                .map(|n| n.host_address.to_string())
                .unwrap_or_default()
        ));
    }
    let mut spec = check.spec(&["sh", "-c", &script])?;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    let mut volumes = vec![("scratch", "/scratch"), ("creds", "/creds")];
    if check.options.ext4_disk.is_some() {
        volumes.push(("data", "/data"));
    }
    for (name, destination) in volumes {
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(destination)
                .typ("bind")
                .source(Path::new(capsa_protocol::VOLUMES_DIR).join(name))
                .options(vec!["rbind".to_string()])
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));
    let (out, err, exit) = check.run("sandboxed", &spec)?;
    let lines: Vec<&str> = out.lines().collect();
    let expected = [
        "capsa-group",
        "nameserver 10.0.3.53",
        "1",
        "400",
        "s3cret",
        "scratch-full",
    ];
    ensure!(
        lines.len() >= 7 && lines[..6] == expected,
        "saw {out:?}, stderr {err:?}, {exit:?}"
    );
    let guest_seconds: i64 = lines[6].parse().context("date")?;
    ensure!(
        (guest_seconds - now_ns / 1_000_000_000).abs() < 120,
        "guest clock {guest_seconds}, host {}",
        now_ns / 1_000_000_000
    );
    let mut detail = "hostname, DNS, hosts, secret 0400, 1 MiB emptyDir full, clock".to_string();
    let mut rest = &lines[7..];
    if check.options.ext4_disk.is_some() {
        ensure!(
            rest.len() >= 2 && rest[..2] == ["ext4", "kept"],
            "ext4 volume: saw {out:?}, stderr {err:?}"
        );
        rest = &rest[2..];
        detail.push_str("; ext4 disk by serial");
    }
    if let (Some(nic), Some(address)) = (&check.options.nic, guest_address) {
        let wanted = [
            format!("{address}/24"),
            "1400".to_string(),
            format!("default via {}", nic.host_address),
            "ping-ok".to_string(),
        ];
        ensure!(rest == wanted, "network: saw {out:?}, stderr {err:?}");
        detail.push_str(&format!(
            "; eth0 {address}/24 mtu 1400, pinged {}",
            nic.host_address
        ));
    }
    Ok(detail)
}
