//! Networks' bridges, through rtnetlink: created when missing, given the
//! gateway address, brought up (an existing bridge is reused as it is),
//! and deleted with their network; and the subnets the host's interfaces
//! already use, which a new network must not overlap.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use crate::NetworkError;

fn failed(name: &str, what: &str) -> impl Fn(rtnetlink::Error) -> NetworkError {
    let (name, what) = (name.to_string(), what.to_string());
    move |e| NetworkError::Bridge {
        bridge: name.clone(),
        what: what.clone(),
        message: e.to_string(),
    }
}

fn connect(name: &str) -> Result<Handle, NetworkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| NetworkError::Bridge {
            bridge: name.to_string(),
            what: "opening netlink".into(),
            message: e.to_string(),
        })?;
    tokio::spawn(connection);
    Ok(handle)
}

pub async fn ensure(name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), NetworkError> {
    let failed = |what: &str| failed(name, what);
    let handle = connect(name)?;
    let index = match index_of(&handle, name).await {
        Some(index) => index,
        None => {
            handle
                .link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
                .map_err(failed("creating it"))?;
            index_of(&handle, name)
                .await
                .ok_or_else(|| NetworkError::Bridge {
                    bridge: name.to_string(),
                    what: "creating it".into(),
                    message: "it did not appear".into(),
                })?
        }
    };
    let has_gateway = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(failed("listing its addresses"))?
        .iter()
        .any(|message| {
            message.attributes.iter().any(
                |a| matches!(a, AddressAttribute::Address(IpAddr::V4(address)) if *address == gateway),
            )
        });
    if !has_gateway {
        handle
            .address()
            .add(index, IpAddr::V4(gateway), prefix)
            .execute()
            .await
            .map_err(failed(&format!("adding {gateway}/{prefix}")))?;
    }
    handle
        .link()
        .change(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(failed("bringing it up"))
}

/// Deletes bridge `name` if it exists.
pub async fn remove(name: &str) -> Result<(), NetworkError> {
    let handle = connect(name)?;
    let Some(index) = index_of(&handle, name).await else {
        return Ok(());
    };
    handle
        .link()
        .del(index)
        .execute()
        .await
        .map_err(failed(name, "deleting it"))
}

/// The IPv4 subnets of the host's interface addresses, but those on
/// `except` (a network's own bridge).
pub async fn host_subnets(except: &[String]) -> Result<Vec<Ipv4Net>, NetworkError> {
    let handle = connect("(any)")?;
    let skip: Vec<u32> = {
        let mut skip = Vec::new();
        for name in except {
            if let Some(index) = index_of(&handle, name).await {
                skip.push(index);
            }
        }
        skip
    };
    let messages = handle
        .address()
        .get()
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(failed("(any)", "listing the host's addresses"))?;
    Ok(messages
        .iter()
        .filter(|m| !skip.contains(&m.header.index))
        .flat_map(|m| {
            m.attributes.iter().filter_map(move |a| match a {
                AddressAttribute::Address(IpAddr::V4(address)) => {
                    Ipv4Net::new(*address, m.header.prefix_len).ok()
                }
                _ => None,
            })
        })
        .map(|net| net.trunc())
        .collect())
}

async fn index_of(handle: &Handle, name: &str) -> Option<u32> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    links
        .try_next()
        .await
        .ok()
        .flatten()
        .map(|link| link.header.index)
}
