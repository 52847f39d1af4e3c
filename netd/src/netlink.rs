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
