//! Group networking on the host. Each network is a bridge of its own
//! holding its subnet's first address as its groups' gateway, with a DNS
//! responder there that answers the names of that network's groups only;
//! each group's tap joins its network's bridge. The `default` network
//! comes from the daemon's flags, the others are made by users and kept
//! in a store. The packet filter (`firewall`) keeps networks apart, holds
//! each tap to its group's addresses, closes the host to guests and lets
//! networks with egress out. Published ports are forwarded by a userspace
//! proxy.
//!
//! Everything here runs on a small runtime of its own, so callers stay
//! synchronous.

mod bridge;
mod dns;
pub mod firewall;
mod ports;
mod store;

use capsa_vmm_config::{MacAddr, NetConfig};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

pub use ipnet::Ipv4Net;

pub use ports::{Protocol, Published};
pub use store::NetworkDef;

use firewall::{Firewall, Forward, Port, Segment};

pub use capsa_api::DEFAULT_NETWORK;

/// Where a network made without a subnet gets one: the first /24 here
/// that no network and no host interface uses.
const AUTO_SUBNETS: &str = "10.89.0.0/16";

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
    #[error("the packet filter (nftables): {what}: {message}")]
    Firewall { what: String, message: String },
    #[error("subnet {0} is too small for groups (at most /30)")]
    SubnetTooSmall(Ipv4Net),
    #[error("subnet {subnet} overlaps {other}")]
    SubnetOverlaps { subnet: Ipv4Net, other: String },
    #[error("no free /24 is left in {AUTO_SUBNETS}: give the network a subnet (--subnet)")]
    NoSubnetLeft,
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Net),
    #[error("no network {0:?} (capsa network create {0})")]
    NotFound(String),
    #[error("network {0:?} already exists")]
    Exists(String),
    #[error("{0:?} is not a valid network name (lowercase letters, digits and '-', at most 63)")]
    InvalidName(String),
    #[error("the default network cannot be removed")]
    DefaultIsFixed,
    #[error("{what}: {source}")]
    Store {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network record {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
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
    #[error("turning IPv4 forwarding on for egress: {0}")]
    Forwarding(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// The default network's bridge; created when missing. The daemon's
    /// packet filter tables are named after it.
    pub bridge: String,
    /// The default network's subnet; its first address is the gateway.
    pub subnet: Ipv4Net,
    /// Whether the default network's groups reach beyond the host.
    pub egress: bool,
    /// Where names that are not groups' are asked (for networks with
    /// egress).
    pub upstream_dns: Vec<SocketAddr>,
    /// Where the networks users make are kept.
    pub store: PathBuf,
}

/// What a group's VM and agent need of its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressing {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
}

/// A network as the API shows it (without its groups, which the daemon
/// knows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub bridge: String,
    pub egress: bool,
    pub created_at: u64,
}

type Names = Arc<RwLock<HashMap<String, Ipv4Addr>>>;

/// One network while the daemon runs.
struct Live {
    def: NetworkDef,
    bridge: String,
    gateway: Ipv4Addr,
    names: Names,
    dns: tokio::task::AbortHandle,
}

impl Live {
    fn segment(&self) -> Segment {
        Segment {
            bridge: self.bridge.clone(),
            gateway: self.gateway,
            subnet: self.def.subnet,
            egress: self.def.egress,
        }
    }

    fn info(&self) -> NetworkInfo {
        NetworkInfo {
            name: self.def.name.clone(),
            subnet: self.def.subnet,
            gateway: self.gateway,
            bridge: self.bridge.clone(),
            egress: self.def.egress,
            created_at: self.def.created_at,
        }
    }

    fn addressing(&self) -> Addressing {
        Addressing {
            bridge: self.bridge.clone(),
            gateway: self.gateway,
            prefix_len: self.def.subnet.prefix_len(),
        }
    }

    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.def.subnet.hosts().filter(|a| *a != self.gateway)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.dns.abort();
    }
}

/// The host's side of group networking, while the daemon runs.
pub struct Networks {
    config: NetworkConfig,
    runtime: tokio::runtime::Runtime,
    firewall: Arc<Firewall>,
    store: store::Store,
    live: Mutex<BTreeMap<String, Live>>,
}

fn gateway_of(subnet: Ipv4Net) -> Result<Ipv4Addr, NetworkError> {
    if subnet.prefix_len() > 30 {
        return Err(NetworkError::SubnetTooSmall(subnet));
    }
    subnet
        .hosts()
        .next()
        .ok_or(NetworkError::SubnetTooSmall(subnet))
}

/// The bridge of a network users made: unique on the host while its
/// subnet is, and short enough for an interface name.
fn bridge_for(subnet: Ipv4Net) -> String {
    format!("capsn{:08x}", u32::from(subnet.network()))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Networks {
    /// Builds every network (the default and the stored ones): bridges,
    /// the packet filter's tables afresh, and the DNS responders.
    pub fn start(config: NetworkConfig) -> Result<Self, NetworkError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("capsa-network")
            .enable_all()
            .build()
            .map_err(NetworkError::Runtime)?;
        let firewall = Arc::new(Firewall::new(&config.bridge)?);
        let store = store::Store::open(&config.store)?;
        let mut defs = vec![(
            NetworkDef {
                name: DEFAULT_NETWORK.into(),
                subnet: config.subnet.trunc(),
                egress: config.egress,
                created_at: 0,
            },
            config.bridge.clone(),
        )];
        for def in store.load()? {
            let bridge = bridge_for(def.subnet);
            defs.push((def, bridge));
        }
        let networks = Networks {
            config,
            runtime,
            firewall,
            store,
            live: Mutex::new(BTreeMap::new()),
        };
        let mut segments = Vec::new();
        for (def, bridge) in &defs {
            segments.push(Segment {
                bridge: bridge.clone(),
                gateway: gateway_of(def.subnet)?,
                subnet: def.subnet,
                egress: def.egress,
            });
        }
        networks.firewall.reset(&segments)?;
        for (def, bridge) in defs {
            let live = networks.bring_up(def, bridge)?;
            networks.lock().insert(live.def.name.clone(), live);
        }
        networks.forwarding()?;
        Ok(networks)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bridge with its gateway, and the DNS responder on it.
    fn bring_up(&self, def: NetworkDef, bridge: String) -> Result<Live, NetworkError> {
        let gateway = gateway_of(def.subnet)?;
        self.runtime
            .block_on(bridge::ensure(&bridge, gateway, def.subnet.prefix_len()))?;
        let names = Names::default();
        let address = SocketAddr::new(IpAddr::V4(gateway), 53);
        let socket = std::net::UdpSocket::bind(address)
            .map_err(|source| NetworkError::Dns { address, source })?;
        let upstream = if def.egress {
            self.config.upstream_dns.clone()
        } else {
            Vec::new()
        };
        let dns = {
            let _entered = self.runtime.enter();
            dns::serve(socket, names.clone(), upstream)
                .map_err(|source| NetworkError::Dns { address, source })?
        };
        Ok(Live {
            def,
            bridge,
            gateway,
            names,
            dns,
        })
    }

    /// Egress needs the host to forward IPv4; turned on (as docker does)
    /// when a network has egress, never turned off under other users.
    fn forwarding(&self) -> Result<(), NetworkError> {
        if self.lock().values().any(|l| l.def.egress) {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
                .map_err(NetworkError::Forwarding)?;
        }
        Ok(())
    }

    /// Makes network `name`, on `subnet` or the first free /24 of
    /// 10.89.0.0/16.
    pub fn create(
        &self,
        name: &str,
        subnet: Option<Ipv4Net>,
        egress: bool,
    ) -> Result<NetworkInfo, NetworkError> {
        if !capsa_api::spec::valid_name(name) {
            return Err(NetworkError::InvalidName(name.to_string()));
        }
        if self.lock().contains_key(name) {
            return Err(NetworkError::Exists(name.to_string()));
        }
        let ours: Vec<String> = self.lock().values().map(|l| l.bridge.clone()).collect();
        let mut taken: Vec<(Ipv4Net, String)> = self
            .lock()
            .values()
            .map(|l| (l.def.subnet, format!("network {}", l.def.name)))
            .collect();
        for net in self.runtime.block_on(bridge::host_subnets(&ours))? {
            taken.push((net, format!("the host's {net}")));
        }
        let overlaps =
            |a: Ipv4Net, b: Ipv4Net| a.contains(&b.network()) || b.contains(&a.network());
        let subnet = match subnet {
            Some(subnet) => {
                let subnet = subnet.trunc();
                gateway_of(subnet)?;
                if let Some((_, other)) = taken.iter().find(|(t, _)| overlaps(*t, subnet)) {
                    return Err(NetworkError::SubnetOverlaps {
                        subnet,
                        other: other.clone(),
                    });
                }
                subnet
            }
            None => AUTO_SUBNETS
                .parse::<Ipv4Net>()
                .ok()
                .and_then(|pool| pool.subnets(24).ok())
                .into_iter()
                .flatten()
                .find(|s| !taken.iter().any(|(t, _)| overlaps(*t, *s)))
                .ok_or(NetworkError::NoSubnetLeft)?,
        };
        let def = NetworkDef {
            name: name.to_string(),
            subnet,
            egress,
            created_at: now_ms(),
        };
        let bridge = bridge_for(subnet);
        let segment = Segment {
            bridge: bridge.clone(),
            gateway: gateway_of(subnet)?,
            subnet,
            egress,
        };
        self.firewall.add_segment(&segment)?;
        let live = self.bring_up(def.clone(), bridge.clone()).and_then(|live| {
            self.store.save(&def)?;
            Ok(live)
        });
        let live = match live {
            Ok(live) => live,
            Err(e) => {
                let _ = self.firewall.remove_segment(&segment);
                let _ = self.runtime.block_on(bridge::remove(&bridge));
                return Err(e);
            }
        };
        let info = live.info();
        self.lock().insert(name.to_string(), live);
        self.forwarding()?;
        Ok(info)
    }

    /// Removes network `name`: its record, its filter elements, its DNS
    /// responder and its bridge. The caller makes sure no group uses it.
    pub fn remove(&self, name: &str) -> Result<(), NetworkError> {
        if name == DEFAULT_NETWORK {
            return Err(NetworkError::DefaultIsFixed);
        }
        let mut live = self.lock();
        let network = live
            .get(name)
            .ok_or_else(|| NetworkError::NotFound(name.to_string()))?;
        self.store.remove(name)?;
        let segment = network.segment();
        live.remove(name);
        drop(live);
        self.firewall.remove_segment(&segment)?;
        self.runtime.block_on(bridge::remove(&segment.bridge))
    }

    pub fn list(&self) -> Vec<NetworkInfo> {
        self.lock().values().map(Live::info).collect()
    }

    pub fn info(&self, name: &str) -> Result<NetworkInfo, NetworkError> {
        self.with(name, Live::info)
    }

    fn with<T>(&self, name: &str, f: impl FnOnce(&Live) -> T) -> Result<T, NetworkError> {
        self.lock()
            .get(name)
            .map(f)
            .ok_or_else(|| NetworkError::NotFound(name.to_string()))
    }

    pub fn addressing(&self, network: &str) -> Result<Addressing, NetworkError> {
        self.with(network, Live::addressing)
    }

    /// The VMM's NIC for the group at `address` on `network`: its tap,
    /// joined to the network's bridge, with the MAC derived from the
    /// address.
    pub fn nic(&self, network: &str, address: Ipv4Addr) -> Result<NetConfig, NetworkError> {
        let bridge = self.with(network, |l| l.bridge.clone())?;
        Ok(NetConfig {
            tap: tap_name(address),
            mac: mac_for(address),
            bridge: Some(bridge),
            fd: None,
            rate: None,
        })
    }

    /// The lowest address of `network` that is neither its gateway nor in
    /// `used`.
    pub fn allocate(
        &self,
        network: &str,
        used: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Result<Ipv4Addr, NetworkError> {
        let used: BTreeSet<Ipv4Addr> = used.into_iter().collect();
        self.with(network, |l| {
            l.hosts()
                .find(|address| !used.contains(address))
                .ok_or(NetworkError::Exhausted(l.def.subnet))
        })?
    }

    /// Whether `address` is one `network` hands out.
    pub fn contains(&self, network: &str, address: Ipv4Addr) -> bool {
        self.with(network, |l| l.hosts().any(|a| a == address))
            .unwrap_or(false)
    }

    /// Group `name` at `address` joins `network`: its tap may send as it,
    /// and the network's DNS answers its name.
    pub fn attach(&self, network: &str, name: &str, address: Ipv4Addr) -> Result<(), NetworkError> {
        let names = self.with(network, |l| l.names.clone())?;
        self.firewall.add_port(&port(address))?;
        names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_ascii_lowercase(), address);
        Ok(())
    }

    /// The opposite of `attach`.
    pub fn detach(&self, network: &str, name: &str, address: Ipv4Addr) -> Result<(), NetworkError> {
        if let Ok(names) = self.with(network, |l| l.names.clone()) {
            names
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name.to_ascii_lowercase());
        }
        self.firewall.remove_port(&port(address))
    }

    /// Binds `listen` now (so a taken port is an error here) and forwards
    /// what arrives to `target` until the returned handle is dropped; a
    /// host address other than loopback is also translated to `target`.
    pub fn publish(
        &self,
        protocol: Protocol,
        listen: SocketAddr,
        target: SocketAddr,
    ) -> Result<Published, NetworkError> {
        let mut published = {
            let _entered = self.runtime.enter();
            ports::publish(protocol, listen, target)?
        };
        if let (Some(listen), SocketAddr::V4(target)) = (Forward::serves(&listen), target) {
            let forward = Forward {
                protocol,
                listen,
                target,
            };
            self.firewall.add_forward(&forward)?;
            published.dnat = Some((self.firewall.clone(), forward));
        }
        Ok(published)
    }

    /// The packet filter's table name (both families).
    pub fn firewall_table(&self) -> &str {
        self.firewall.table()
    }

    /// Whether the filter tells taps by name (see `firewall`): true on a
    /// kernel without nft_meta_bridge.
    pub fn firewall_by_tap_name(&self) -> bool {
        self.firewall.by_tap_name()
    }
}

fn port(address: Ipv4Addr) -> Port {
    Port {
        tap: tap_name(address),
        mac: mac_for(address),
        ip: address,
    }
}

/// The tap of the group at `address`: unique while the address is in use,
/// and short enough for an interface name.
pub fn tap_name(address: Ipv4Addr) -> String {
    format!("{TAP_PREFIX}{:08x}", u32::from(address))
}

/// What every group's tap is called first.
pub const TAP_PREFIX: &str = "capsa";

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
        let bridge = bridge_for("10.89.3.0/24".parse().unwrap());
        assert_eq!(bridge, "capsn0a590300");
        assert!(bridge.len() < 16);
    }

    #[test]
    fn a_gateway_needs_room_for_groups() {
        assert_eq!(
            gateway_of("10.1.2.0/30".parse().unwrap()).ok(),
            Some(Ipv4Addr::new(10, 1, 2, 1))
        );
        assert!(gateway_of("10.1.2.0/31".parse().unwrap()).is_err());
    }
}
