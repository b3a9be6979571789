//! The pod's network, as CNI made it, carried into the VM: in the pod's
//! network namespace a tap is made beside the CNI interface, and tc
//! redirects every frame arriving on either to the other (ingress qdiscs,
//! a match-all u32 filter with a mirred redirect, as Kata does). The
//! guest's NIC takes the CNI interface's MAC, addresses, MTU and routes,
//! so the pod IP Kubernetes sees is the guest's own. The tap lives in the
//! pod's namespace, which CNI deletes with the pod: nothing is left on the
//! host.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// The tap's name inside the pod's namespace.
pub const TAP_NAME: &str = "capsa0";

#[derive(Debug, thiserror::Error)]
pub enum PodNetworkError {
    #[error("entering the pod's network namespace {}: {source}", path.display())]
    Enter {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("in the pod's network namespace: {what}: {message}")]
    Netlink { what: String, message: String },
    #[error("the pod's network namespace has no interface but loopback (is CNI configured?)")]
    NoInterface,
    #[error("the pod's tap: {0}")]
    Tap(#[from] capsa_tap::TapError),
}

/// What the guest's NIC takes over from the CNI interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNic {
    /// The CNI interface's name (the guest's NIC gets it too).
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// "address/prefix".
    pub addresses: Vec<String>,
    /// IPv4 routes: ("default" or "address/prefix", gateway).
    pub routes: Vec<(String, Ipv4Addr)>,
}

/// A tap in the pod's namespace, redirected to and from its CNI interface.
pub struct PodNetwork {
    pub tap: capsa_tap::Tap,
    pub nic: PodNic,
}

/// Sets up the tap and the redirects in the namespace at `netns`.
pub fn attach(netns: &Path) -> Result<PodNetwork, PodNetworkError> {
    let file = File::open(netns).map_err(|source| PodNetworkError::Enter {
        path: netns.to_path_buf(),
        source,
    })?;
    let path = netns.to_path_buf();
    // setns changes the calling thread's namespace only: a thread of its
    // own, which ends there.
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            PodNetworkError::Enter {
                path,
                source: e.into(),
            }
        })?;
        let tap = capsa_tap::Tap::open(TAP_NAME)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| netlink_error("starting netlink")(e.to_string()))?;
        let nic = runtime.block_on(redirect(tap.name()))?;
        Ok(PodNetwork { tap, nic })
    })
    .join()
    .unwrap_or_else(|_| {
        Err(PodNetworkError::Netlink {
            what: "setting up the redirect".into(),
            message: "its thread panicked".into(),
        })
    })
}

fn netlink_error(what: &str) -> impl Fn(String) -> PodNetworkError + '_ {
    move |message| PodNetworkError::Netlink {
        what: what.to_string(),
        message,
    }
}

/// In the current thread's namespace: finds the CNI interface, brings
/// the tap up with its MTU, and redirects each one's ingress to the other.
async fn redirect(tap_name: &str) -> Result<PodNic, PodNetworkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| netlink_error("opening netlink")(e.to_string()))?;
    tokio::spawn(connection);
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink_error("listing interfaces")(e.to_string()))?;
    let name_of = |link: &LinkMessage| {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
    };
    let tap = links
        .iter()
        .find(|l| name_of(l).as_deref() == Some(tap_name))
        .map(|l| l.header.index)
        .ok_or(PodNetworkError::NoInterface)?;
    let cni = links
        .iter()
        .filter(|l| !l.header.flags.contains(LinkFlags::Loopback) && l.header.index != tap)
        .min_by_key(|l| l.header.index)
        .ok_or(PodNetworkError::NoInterface)?;
    let name = name_of(cni).unwrap_or_default();
    let mac = cni
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => None,
        })
        .ok_or_else(|| netlink_error("reading its MAC")(format!("{name} has none")))?;
    let mtu = cni
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .unwrap_or(1500);
    let addresses = addresses_of(&handle, cni.header.index).await?;
    let routes = routes_of(&handle, cni.header.index).await?;

    handle
        .link()
        .change(LinkUnspec::new_with_index(tap).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(|e| netlink_error("bringing the tap up")(e.to_string()))?;
    for (from, to) in [(cni.header.index, tap), (tap, cni.header.index)] {
        let from_index = i32::try_from(from)
            .map_err(|_| netlink_error("an interface index")(from.to_string()))?;
        handle
            .qdisc()
            .add(from_index)
            .ingress()
            .execute()
            .await
            .map_err(|e| netlink_error("adding an ingress qdisc")(e.to_string()))?;
        handle
            .traffic_filter(from_index)
            .add()
            .ingress()
            .protocol((libc::ETH_P_ALL as u16).to_be())
            .redirect(to)
            .map_err(|e| netlink_error("building the redirect")(e.to_string()))?
            .execute()
            .await
            .map_err(|e| netlink_error("adding the redirect")(e.to_string()))?;
    }
    Ok(PodNic {
        name,
        mac,
        mtu,
        addresses,
        routes,
    })
}

async fn addresses_of(handle: &Handle, index: u32) -> Result<Vec<String>, PodNetworkError> {
    let messages: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink_error("listing addresses")(e.to_string()))?;
    Ok(messages
        .iter()
        .flat_map(|m| {
            m.attributes.iter().filter_map(move |a| match a {
                AddressAttribute::Address(address @ IpAddr::V4(_)) => {
                    Some(format!("{address}/{}", m.header.prefix_len))
                }
                _ => None,
            })
        })
        .collect())
}

async fn routes_of(
    handle: &Handle,
    index: u32,
) -> Result<Vec<(String, Ipv4Addr)>, PodNetworkError> {
    let messages: Vec<_> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink_error("listing routes")(e.to_string()))?;
    Ok(messages
        .iter()
        .filter(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(oif) if *oif == index))
        })
        .filter_map(|m| {
            let gateway = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(gateway)) => Some(*gateway),
                _ => None,
            })?;
            let destination = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                        Some(format!("{d}/{}", m.header.destination_prefix_length))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| "default".to_string());
            Some((destination, gateway))
        })
        .collect())
}

impl PodNic {
    /// The MAC as the VMM's and the agent's arguments write it.
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}
