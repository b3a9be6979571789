//! `capsa network`: group networks, made, listed, shown and removed.

use anyhow::Result;
use capsa_api::{NetworkRequest, NetworkView};
use capsa_cli::client::Client;
use clap::Subcommand;
use hyper::Method;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Egress {
    On,
    Off,
}

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Make a network: its groups reach each other by name, and no group
    /// of another network.
    Create {
        name: String,
        /// Its subnet (the first free /24 of 10.89.0.0/16 unless given).
        #[arg(long)]
        subnet: Option<String>,
        /// Whether its groups reach beyond the host (masqueraded).
        #[arg(long, value_enum, default_value_t = Egress::On)]
        egress: Egress,
    },
    Ls,
    Inspect {
        name: String,
    },
    /// Remove networks no group is on.
    Rm {
        names: Vec<String>,
    },
}

pub fn run(client: &Client, command: NetworkCommand, json: bool) -> Result<u8> {
    match command {
        NetworkCommand::Create {
            name,
            subnet,
            egress,
        } => {
            let request = NetworkRequest {
                name,
                subnet,
                egress: Some(egress == Egress::On),
            };
            let view: NetworkView = client.call(
                Method::POST,
                "/v1/networks",
                Some(serde_json::to_string(&request)?),
            )?;
            if json {
                super::print_json(&view)?;
            } else {
                println!("{} {}", view.name, view.subnet);
            }
        }
        NetworkCommand::Ls => {
            let networks: Vec<NetworkView> = client.call(Method::GET, "/v1/networks", None)?;
            if json {
                super::print_json(&networks)?;
                return Ok(0);
            }
            println!(
                "{:<24} {:<18} {:<15} {:<7} GROUPS",
                "NAME", "SUBNET", "BRIDGE", "EGRESS"
            );
            for network in networks {
                println!(
                    "{:<24} {:<18} {:<15} {:<7} {}",
                    network.name,
                    network.subnet,
                    network.bridge,
                    if network.egress { "on" } else { "off" },
                    network.groups.join(", ")
                );
            }
        }
        NetworkCommand::Inspect { name } => {
            let view: NetworkView =
                client.call(Method::GET, &format!("/v1/networks/{name}"), None)?;
            super::print_json(&view)?;
        }
        NetworkCommand::Rm { names } => {
            for name in names {
                let _: serde_json::Value =
                    client.call(Method::DELETE, &format!("/v1/networks/{name}"), None)?;
                println!("{name}");
            }
        }
    }
    Ok(0)
}
