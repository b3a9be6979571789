//! `capsa system`: what capsad runs and holds, and clearing what does not
//! run; and the image verbs that go with it, `tag` and `prune`.

use anyhow::Result;
use capsa_api::{DiskUsageView, ImageView, PruneView, SystemInfoView, TagRequest};
use clap::Subcommand;
use hyper::Method;

use capsa_cli::client::Client;

#[derive(Subcommand)]
pub enum SystemCommand {
    /// capsad's version, what it runs, and the caller's quota (a tenant).
    Info,
    /// The disk capsad uses: images, layer disks, volumes, groups.
    Df,
    /// Delete every group that does not run, then every image no group
    /// uses.
    Prune,
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / 1e6)
}

fn print_pruned(pruned: &PruneView, json: bool) -> Result<u8> {
    if json {
        print_json(pruned)?;
        return Ok(0);
    }
    for group in &pruned.groups {
        println!("deleted group {group}");
    }
    for image in &pruned.images {
        println!("removed image {image}");
    }
    println!("freed {}", megabytes(pruned.bytes_freed));
    Ok(0)
}

pub fn run(client: &Client, command: SystemCommand, json: bool) -> Result<u8> {
    match command {
        SystemCommand::Info => {
            let info: SystemInfoView = client.call(Method::GET, "/v1/system/info", None)?;
            if json {
                print_json(&info)?;
                return Ok(0);
            }
            println!("capsad {}", info.version);
            match &info.tenant {
                Some(tenant) => println!("tenant: {tenant}"),
                None => println!("caller: the host's admin"),
            }
            println!(
                "groups: {} ({} running), {} vCPUs, {} MiB",
                info.groups, info.running, info.vcpus, info.memory_mib
            );
            println!("volumes: {}, networks: {}", info.volumes, info.networks);
            if let Some(images) = info.images {
                println!("images: {images}");
            }
            let limit = |value: Option<u64>| value.map_or("none".to_string(), |v| v.to_string());
            if let Some(quota) = &info.quota {
                println!(
                    "quota: groups {}, vCPUs {}, memory {} MiB, volumes {} MiB",
                    limit(quota.groups),
                    limit(quota.vcpus),
                    limit(quota.memory_mib),
                    limit(quota.volume_mib)
                );
            }
            if let (Some(memory), Some(cpus), Some(budget)) = (
                info.max_vm_memory_mib,
                info.max_vm_cpus,
                info.memory_budget_mib,
            ) {
                println!("one VM: at most {cpus} vCPUs, {memory} MiB; all VMs: {budget} MiB");
            }
            match info.templates {
                None => {}
                Some(templates) if templates.is_empty() => println!("templates: none yet"),
                Some(templates) => {
                    for t in templates {
                        println!(
                            "template {}: {} vCPU, {} MiB{}, {} on disk, built in {} ms",
                            t.id,
                            t.cpus,
                            t.memory_mib,
                            if t.nic { ", with a NIC" } else { "" },
                            megabytes(t.disk_bytes),
                            t.build_ms
                        );
                    }
                }
            }
            Ok(0)
        }
        SystemCommand::Df => {
            let df: DiskUsageView = client.call(Method::GET, "/v1/system/df", None)?;
            if json {
                print_json(&df)?;
                return Ok(0);
            }
            println!(
                "{:<12} {:>6} {:>10} {:>12}",
                "TYPE", "COUNT", "SIZE", "RECLAIMABLE"
            );
            println!(
                "{:<12} {:>6} {:>10} {:>12}",
                "images",
                df.images,
                megabytes(df.image_bytes),
                megabytes(df.unused_image_bytes)
            );
            println!(
                "{:<12} {:>6} {:>10}",
                "layer disks",
                "",
                megabytes(df.layer_disk_bytes)
            );
            println!(
                "{:<12} {:>6} {:>10}",
                "volumes",
                df.volumes,
                megabytes(df.volume_bytes)
            );
            println!(
                "{:<12} {:>6} {:>10}",
                "groups",
                df.groups,
                megabytes(df.group_bytes)
            );
            Ok(0)
        }
        SystemCommand::Prune => {
            let pruned: PruneView = client.call(Method::POST, "/v1/system/prune", None)?;
            print_pruned(&pruned, json)
        }
    }
}

pub fn tag(client: &Client, source: String, target: String, json: bool) -> Result<u8> {
    let request = TagRequest { source, target };
    let view: ImageView = client.call(
        Method::POST,
        "/v1/images/tag",
        Some(serde_json::to_string(&request)?),
    )?;
    if json {
        print_json(&view)?;
    } else {
        println!("{} {}", view.name, view.digest);
    }
    Ok(0)
}

pub fn prune_images(client: &Client, json: bool) -> Result<u8> {
    let pruned: PruneView = client.call(Method::POST, "/v1/images/prune", None)?;
    print_pruned(&pruned, json)
}
