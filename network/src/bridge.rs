//! The daemon's bridge, through rtnetlink: created when missing, given the
//! gateway address, brought up. An existing bridge is reused as it is.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use crate::NetworkError;

pub async fn ensure(name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), NetworkError> {
    let failed = |what: &str| {
        let what = what.to_string();
        move |e: rtnetlink::Error| NetworkError::Bridge {
            bridge: name.to_string(),
            what: what.clone(),
            message: e.to_string(),
        }
    };
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| NetworkError::Bridge {
            bridge: name.to_string(),
            what: "opening netlink".into(),
            message: e.to_string(),
        })?;
    tokio::spawn(connection);
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

async fn index_of(handle: &Handle, name: &str) -> Option<u32> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    links
        .try_next()
        .await
        .ok()
        .flatten()
        .map(|link| link.header.index)
}
