//! Interface and route queries over rtnetlink, in the daemon's network
//! namespace.
use anyhow::{anyhow, Context as _, Result};
use futures::TryStreamExt as _;
use netlink_packet_route::{
    link::LinkAttribute,
    route::{RouteAttribute, RouteMessage},
};
use rtnetlink::IpVersion;

/// The interface of the IPv4 default route: netd's uplink unless told.
pub async fn default_route_interface() -> Result<String> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .context("listing routes")?;
    let oif = routes
        .iter()
        .filter(|r| r.header.destination_prefix_length == 0)
        .find_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        })
        .ok_or_else(|| {
            anyhow!("this network namespace has no IPv4 default route: pass --uplink IFACE")
        })?;
    let mut links = handle.link().get().match_index(oif).execute();
    let link = links
        .try_next()
        .await?
        .ok_or_else(|| anyhow!("default route points at unknown ifindex {oif}"))?;
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .ok_or_else(|| anyhow!("interface {oif} has no name"))
}

/// The IPv4 addresses of `ifname`: the host addresses published ports
/// bound to "every address" are served on.
pub async fn ipv4_addresses(ifname: &str) -> Result<Vec<std::net::Ipv4Addr>> {
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    let index = nix::net::if_::if_nametoindex(ifname)
        .with_context(|| format!("no interface named {ifname:?}"))?;
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let addrs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .with_context(|| format!("listing addresses of {ifname}"))?;
    Ok(addrs
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter_map(|a| match a {
            AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        })
        .collect())
}

/// Sends `()` on `tx` whenever an IPv4 address is added or removed in this
/// namespace (the uplink's addresses are where ports are published and what
/// masquerade uses: a renumbered uplink must not wait for the periodic
/// resync). Runs until `tx` is closed.
pub fn watch_ipv4_addresses(tx: tokio::sync::mpsc::Sender<()>) -> Result<()> {
    use futures::StreamExt as _;
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_sys::AsyncSocket as _;
    let (mut conn, handle, mut messages) =
        rtnetlink::new_connection().context("opening rtnetlink")?;
    let groups = rtnetlink::constants::RTMGRP_IPV4_IFADDR;
    conn.socket_mut()
        .socket_mut()
        .bind(&netlink_sys::SocketAddr::new(0, groups))
        .context("subscribing to address changes")?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        // The connection lives as long as a handle does.
        let _handle = handle;
        while let Some((msg, _)) = messages.next().await {
            // An overrun lost messages: assume one was a change.
            let address_change = matches!(
                msg.payload,
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_)
                ) | NetlinkPayload::Overrun(_)
            );
            // A full channel already says "something changed".
            if address_change
                && matches!(
                    tx.try_send(()),
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_))
                )
            {
                break;
            }
        }
    });
    Ok(())
}

/// The ifindex, in this namespace, of the host side of the veth whose other
/// end is the interface with `mac` in the network namespace at
/// `sandbox_key` (a container's). Looks inside that namespace from a
/// scratch thread, so the daemon itself never leaves its own.
pub fn host_side_of_veth(sandbox_key: &str, mac: [u8; 6]) -> Result<u32> {
    let ns = std::fs::File::open(sandbox_key)
        .with_context(|| format!("opening container namespace {sandbox_key}"))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<u32> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the container namespace")?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection()?;
                tokio::spawn(conn);
                let mut links = handle.link().get().execute();
                while let Some(link) = links.try_next().await? {
                    let has_mac = link
                        .attributes
                        .iter()
                        .any(|a| matches!(a, LinkAttribute::Address(m) if m.as_slice() == mac));
                    if !has_mac {
                        continue;
                    }
                    if let Some(peer) = link.attributes.iter().find_map(|a| match a {
                        LinkAttribute::Link(i) => Some(*i),
                        _ => None,
                    }) {
                        return Ok(peer);
                    }
                }
                Err(anyhow!("no veth with MAC {mac:02x?} in {sandbox_key}"))
            })
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow!("namespace thread panicked")))
    })
}
