//! The guest's network, over rtnetlink: loopback up at boot, then the
//! group's interfaces (found by MAC, renamed, MTU, addresses) and routes
//! as the host gives them. Static only; the host owns addressing.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use capsa_protocol::agent::{Interface, Route};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::errors::ApiError;

struct InterfacePlan {
    mac: [u8; 6],
    /// The MAC to find it by, when it does not have `mac` yet.
    found_by: Option<[u8; 6]>,
    name: Option<String>,
    mtu: Option<u32>,
    addresses: Vec<(IpAddr, u8)>,
}

struct RoutePlan {
    destination: (IpAddr, u8),
    gateway: Option<IpAddr>,
    device: Option<String>,
}

/// Brings up `lo`: containers of a group talk to each other on localhost.
pub fn bring_up_loopback() -> Result<(), ApiError> {
    run(async |handle: Handle| set_up_by_name(&handle, "lo").await)
}

pub fn configure(interfaces: &[Interface], routes: &[Route]) -> Result<(), ApiError> {
    let interfaces = interfaces
        .iter()
        .map(plan_interface)
        .collect::<Result<Vec<_>, _>>()?;
    let routes = routes
        .iter()
        .map(plan_route)
        .collect::<Result<Vec<_>, _>>()?;
    if interfaces.is_empty() && routes.is_empty() {
        return Ok(());
    }
    run(async move |handle: Handle| {
        for interface in &interfaces {
            configure_interface(&handle, interface).await?;
        }
        for route in &routes {
            add_route(&handle, route).await?;
        }
        Ok(())
    })
}

/// Runs `work` with a netlink connection on a runtime of its own: the
/// rest of the agent is threads, not async.
fn run<F, Fut>(work: F) -> Result<(), ApiError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<(), ApiError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| ApiError::internal(format!("starting the netlink runtime: {e}")))?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| ApiError::internal(format!("opening netlink: {e}")))?;
        tokio::spawn(connection);
        work(handle).await
    })
}

fn netlink_error(what: String) -> impl FnOnce(rtnetlink::Error) -> ApiError {
    move |e| ApiError::internal(format!("{what}: {e}"))
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<LinkMessage, ApiError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    links
        .try_next()
        .await
        .ok()
        .flatten()
        .ok_or_else(|| ApiError::precondition(format!("no network interface {name}")))
}

async fn set_up_by_name(handle: &Handle, name: &str) -> Result<(), ApiError> {
    let link = link_by_name(handle, name).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(link.header.index).up().build())
        .execute()
        .await
        .map_err(netlink_error(format!("bringing {name} up")))
}

async fn configure_interface(handle: &Handle, plan: &InterfacePlan) -> Result<(), ApiError> {
    let mac = format_mac(&plan.mac);
    let wanted = plan.found_by.unwrap_or(plan.mac);
    let mut links = handle.link().get().execute();
    let mut index = None;
    while let Some(link) = links
        .try_next()
        .await
        .map_err(netlink_error("listing interfaces".into()))?
    {
        let matches = link
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Address(bytes) if bytes.as_slice() == wanted));
        if matches {
            index = Some(link.header.index);
            break;
        }
    }
    let index = index.ok_or_else(|| {
        ApiError::precondition(format!("no interface has MAC {}", format_mac(&wanted)))
    })?;
    let set = |message| handle.link().set(message).execute();
    if plan.name.is_some() || plan.found_by.is_some() {
        // A link is renamed, and given an address, only while down.
        set(LinkUnspec::new_with_index(index).down().build())
            .await
            .map_err(netlink_error(format!("taking {mac} down")))?;
    }
    if plan.found_by.is_some() {
        set(LinkUnspec::new_with_index(index)
            .address(plan.mac.to_vec())
            .build())
        .await
        .map_err(netlink_error(format!(
            "giving {} the MAC {mac}",
            format_mac(&wanted)
        )))?;
    }
    if let Some(name) = &plan.name {
        set(LinkUnspec::new_with_index(index).name(name.clone()).build())
            .await
            .map_err(netlink_error(format!("renaming {mac} to {name}")))?;
    }
    if let Some(mtu) = plan.mtu {
        set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .await
            .map_err(netlink_error(format!("setting MTU {mtu} on {mac}")))?;
    }
    set(LinkUnspec::new_with_index(index).up().build())
        .await
        .map_err(netlink_error(format!("bringing {mac} up")))?;
    for (address, prefix) in &plan.addresses {
        handle
            .address()
            .add(index, *address, *prefix)
            .execute()
            .await
            .map_err(netlink_error(format!("adding {address}/{prefix} to {mac}")))?;
    }
    Ok(())
}

async fn add_route(handle: &Handle, plan: &RoutePlan) -> Result<(), ApiError> {
    let device = match &plan.device {
        Some(name) => Some(link_by_name(handle, name).await?.header.index),
        None => None,
    };
    let (destination, prefix) = plan.destination;
    let message = match (destination, plan.gateway) {
        (IpAddr::V4(destination), gateway) => {
            let mut builder =
                RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(destination, prefix);
            if let Some(IpAddr::V4(gateway)) = gateway {
                builder = builder.gateway(gateway);
            }
            if let Some(index) = device {
                builder = builder.output_interface(index);
            }
            builder.build()
        }
        (IpAddr::V6(destination), gateway) => {
            let mut builder =
                RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(destination, prefix);
            if let Some(IpAddr::V6(gateway)) = gateway {
                builder = builder.gateway(gateway);
            }
            if let Some(index) = device {
                builder = builder.output_interface(index);
            }
            builder.build()
        }
    };
    handle
        .route()
        .add(message)
        .execute()
        .await
        .map_err(netlink_error(format!(
            "adding the route to {destination}/{prefix}"
        )))
}

fn plan_interface(interface: &Interface) -> Result<InterfacePlan, ApiError> {
    let mac = parse_mac(&interface.mac)?;
    let found_by = (!interface.found_by_mac.is_empty())
        .then(|| parse_mac(&interface.found_by_mac))
        .transpose()?
        .filter(|found_by| *found_by != mac);
    let name = (!interface.name.is_empty()).then(|| interface.name.clone());
    if let Some(name) = &name {
        let valid = name.len() < 16
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(ApiError::invalid(format!(
                "invalid interface name {name:?}"
            )));
        }
    }
    let addresses = interface
        .addresses
        .iter()
        .map(|a| parse_prefix(a))
        .collect::<Result<_, _>>()?;
    Ok(InterfacePlan {
        mac,
        found_by,
        name,
        mtu: (interface.mtu > 0).then_some(interface.mtu),
        addresses,
    })
}

fn plan_route(route: &Route) -> Result<RoutePlan, ApiError> {
    let gateway =
        match route.gateway.as_str() {
            "" => None,
            text => Some(text.parse::<IpAddr>().map_err(|_| {
                ApiError::invalid(format!("route gateway {text:?} is not an address"))
            })?),
        };
    let destination = match route.destination.as_str() {
        "default" => match gateway {
            Some(IpAddr::V6(_)) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            _ => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        },
        text => parse_prefix(text)?,
    };
    let device = (!route.device.is_empty()).then(|| route.device.clone());
    if gateway.is_none() && device.is_none() {
        return Err(ApiError::invalid(format!(
            "route to {}: needs a gateway or a device",
            route.destination
        )));
    }
    if gateway.is_some_and(|g| g.is_ipv4() != destination.0.is_ipv4()) {
        return Err(ApiError::invalid(format!(
            "route to {}: gateway of another address family",
            route.destination
        )));
    }
    Ok(RoutePlan {
        destination,
        gateway,
        device,
    })
}

fn parse_prefix(text: &str) -> Result<(IpAddr, u8), ApiError> {
    let invalid = || ApiError::invalid(format!("{text:?} is not address/prefix"));
    let (address, prefix) = text.split_once('/').ok_or_else(invalid)?;
    let address: IpAddr = address.parse().map_err(|_| invalid())?;
    let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(invalid());
    }
    Ok((address, prefix))
}

fn parse_mac(text: &str) -> Result<[u8; 6], ApiError> {
    let invalid = || ApiError::invalid(format!("{text:?} is not a MAC address"));
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(invalid());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    Ok(mac)
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_host_sends_and_refuses_the_rest() {
        assert_eq!(
            parse_mac("02:00:00:0a:0B:ff").unwrap(),
            [2, 0, 0, 10, 11, 255]
        );
        for bad in ["", "02:00", "02:00:00:00:00:0g", "020:00:00:00:00:00"] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_prefix("10.0.0.2/24").unwrap(),
            ("10.0.0.2".parse().unwrap(), 24)
        );
        assert_eq!(
            parse_prefix("fd00::2/64").unwrap(),
            ("fd00::2".parse().unwrap(), 64)
        );
        for bad in ["10.0.0.2", "10.0.0.2/33", "fd00::/129", "x/8"] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
        let route = |destination: &str, gateway: &str, device: &str| Route {
            destination: destination.into(),
            gateway: gateway.into(),
            device: device.into(),
            ..Default::default()
        };
        assert!(plan_route(&route("default", "10.0.0.1", "")).is_ok());
        assert!(plan_route(&route("default", "", "")).is_err());
        assert!(plan_route(&route("10.1.0.0/16", "fd00::1", "")).is_err());
        assert!(plan_route(&route("default", "fd00::1", "eth0"))
            .unwrap()
            .destination
            .0
            .is_ipv6());
    }
}
