//! Group networking on the host. The daemon owns one bridge (`capsa0` by
//! default) holding the subnet's first address as the groups' gateway;
//! each group's VMM adds its tap to it. Groups get addresses from the
//! subnet, published ports are forwarded by a userspace proxy, and a DNS
//! responder on the gateway answers group names.
//!
//! Everything here runs on a small runtime of its own, so callers stay
//! synchronous.

mod bridge;
mod dns;
mod ports;

use capsa_vmm_config::{MacAddr, NetConfig};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

pub use ipnet::Ipv4Net;

pub use ports::{Protocol, Published};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("starting the network runtime: {0}")]
    Runtime(std::io::Error),
    #[error("bridge {bridge}: {what}: {message}")]
    Bridge {
        bridge: String,
        what: String,
        message: String,
    },
    #[error("subnet {0} is too small for groups (at most /30)")]
    SubnetTooSmall(Ipv4Net),
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Net),
    #[error("{protocol} port {address} is not available: {source}")]
    PortUnavailable {
        protocol: Protocol,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("the DNS responder cannot listen on {address}: {source}")]
    Dns {
        address: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// The bridge's name; created when missing.
    pub bridge: String,
    /// Groups' addresses come from here; the first is the gateway.
    pub subnet: Ipv4Net,
    /// Where names that are not groups' are asked.
    pub upstream_dns: Vec<SocketAddr>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "capsa0".into(),
            subnet: "10.88.0.0/24".parse().unwrap_or_default(),
            upstream_dns: Vec::new(),
        }
    }
}

/// The host's side of group networking, while the daemon runs.
pub struct Network {
    config: NetworkConfig,
    gateway: Ipv4Addr,
    runtime: tokio::runtime::Runtime,
    names: Arc<RwLock<HashMap<String, Ipv4Addr>>>,
}

impl Network {
    /// Makes sure the bridge exists with the gateway address and is up,
    /// and starts the DNS responder on the gateway.
    pub fn start(config: NetworkConfig) -> Result<Self, NetworkError> {
        if config.subnet.prefix_len() > 30 {
            return Err(NetworkError::SubnetTooSmall(config.subnet));
        }
        let gateway = config
            .subnet
            .hosts()
            .next()
            .ok_or(NetworkError::SubnetTooSmall(config.subnet))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("capsa-network")
            .enable_all()
            .build()
            .map_err(NetworkError::Runtime)?;
        runtime.block_on(bridge::ensure(
            &config.bridge,
            gateway,
            config.subnet.prefix_len(),
        ))?;
        let names = Arc::new(RwLock::new(HashMap::new()));
        let address = SocketAddr::new(IpAddr::V4(gateway), 53);
        let socket = std::net::UdpSocket::bind(address)
            .map_err(|source| NetworkError::Dns { address, source })?;
        {
            let _entered = runtime.enter();
            dns::serve(socket, names.clone(), config.upstream_dns.clone())
                .map_err(|source| NetworkError::Dns { address, source })?;
        }
        Ok(Network {
            config,
            gateway,
            runtime,
            names,
        })
    }

    pub fn bridge(&self) -> &str {
        &self.config.bridge
    }

    /// The VMM's NIC for the group at `address`: its tap, joined to this
    /// bridge, with the MAC derived from the address.
    pub fn nic(&self, address: Ipv4Addr) -> NetConfig {
        NetConfig {
            tap: tap_name(address),
            mac: mac_for(address),
            bridge: Some(self.bridge().to_string()),
            fd: None,
            rate: None,
        }
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    pub fn prefix_len(&self) -> u8 {
        self.config.subnet.prefix_len()
    }

    /// The lowest address of the subnet that is neither the gateway nor
    /// in `used`.
    pub fn allocate(
        &self,
        used: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Result<Ipv4Addr, NetworkError> {
        let used: BTreeSet<Ipv4Addr> = used.into_iter().collect();
        self.config
            .subnet
            .hosts()
            .find(|address| *address != self.gateway && !used.contains(address))
            .ok_or(NetworkError::Exhausted(self.config.subnet))
    }

    /// Whether `address` is one this network hands out.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        address != self.gateway && self.config.subnet.hosts().any(|a| a == address)
    }

    /// Group `name` answers at `address` in DNS.
    pub fn register_name(&self, name: &str, address: Ipv4Addr) {
        self.names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_ascii_lowercase(), address);
    }

    pub fn forget_name(&self, name: &str) {
        self.names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name.to_ascii_lowercase());
    }

    /// Binds `listen` now (so a taken port is an error here) and forwards
    /// what arrives to `target` until the returned handle is dropped.
    pub fn publish(
        &self,
        protocol: Protocol,
        listen: SocketAddr,
        target: SocketAddr,
    ) -> Result<Published, NetworkError> {
        let _entered = self.runtime.enter();
        ports::publish(protocol, listen, target)
    }
}

/// The tap of the group at `address`: unique while the address is in use,
/// and short enough for an interface name.
pub fn tap_name(address: Ipv4Addr) -> String {
    format!("capsa{:08x}", u32::from(address))
}

/// A locally administered MAC derived from the group's address.
pub fn mac_for(address: Ipv4Addr) -> MacAddr {
    let [_, b, c, d] = address.octets();
    MacAddr([0x02, 0xca, 0x95, b, c, d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interfaces_and_macs_are_local_unicast() {
        let address = Ipv4Addr::new(10, 88, 0, 5);
        assert_eq!(tap_name(address), "capsa0a580005");
        assert!(tap_name(Ipv4Addr::BROADCAST).len() < 16);
        assert_eq!(mac_for(address).to_string(), "02:ca:95:58:00:05");
    }
}
