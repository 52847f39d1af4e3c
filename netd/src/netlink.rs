//! Interface and route queries over rtnetlink, in the daemon's network
//! namespace.
use anyhow::{anyhow, Context as _, Result};
use futures::TryStreamExt as _;
use netlink_packet_route::{
    link::{LinkAttribute, LinkMessage},
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

/// Which of `hosts` are not on this host's LAN: the main table's most
/// specific route to it has a gateway, or there is none (a routed network
/// cannot reach such a host's containers without encapsulation).
pub async fn off_link(
    hosts: &[std::net::Ipv4Addr],
) -> Result<std::collections::HashSet<std::net::Ipv4Addr>> {
    use netlink_packet_route::route::{RouteAddress, RouteType};
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .context("listing routes")?;
    // (prefix, length, has a gateway) of the main table's unicast routes.
    let table: Vec<(u32, u8, bool)> = routes
        .iter()
        .filter(|r| r.header.table == 254 && r.header.kind == RouteType::Unicast)
        .map(|r| {
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(u32::from(*d)),
                _ => None,
            });
            let gateway = r
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Gateway(_)));
            (
                dst.unwrap_or(0),
                r.header.destination_prefix_length,
                gateway,
            )
        })
        .collect();
    Ok(hosts
        .iter()
        .filter(|h| {
            let addr = u32::from(**h);
            table
                .iter()
                .filter(|(dst, len, _)| {
                    let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                    addr & mask == dst & mask
                })
                .max_by_key(|(_, len, _)| *len)
                .is_none_or(|(_, _, gateway)| *gateway)
        })
        .copied()
        .collect())
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
    let (handle, mut messages) =
        subscribe(rtnetlink::constants::RTMGRP_IPV4_IFADDR, "address changes")?;
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

/// A veth enslaved to a bridge in netd's namespace: where a Docker
/// container's host-side interface shows up, before Docker reports the
/// container as started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgePort {
    pub ifindex: u32,
    pub name: String,
    /// The bridge's ifindex.
    pub master: u32,
    /// Both ends are up. Docker brings the container's end up only after
    /// giving it its MAC and address, so from here on those can be read.
    pub carrier: bool,
    /// The other end, once it has been moved to another namespace: that
    /// namespace's id as netd's namespace knows it, and its ifindex there.
    pub peer: Option<(i32, u32)>,
}

/// What a link event says about bridge ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// A veth on a bridge was created or changed.
    Port(BridgePort),
    /// An interface was deleted.
    Gone(u32),
    /// Notifications were lost: rescan.
    Overrun,
}

/// The bridge port a link message describes, if it is a veth with a master.
fn bridge_port(link: &LinkMessage) -> Option<BridgePort> {
    use netlink_packet_route::link::{InfoKind, LinkFlag, LinkInfo};
    let mut port = BridgePort {
        ifindex: link.header.index,
        name: String::new(),
        master: 0,
        carrier: link.header.flags.contains(&LinkFlag::LowerUp),
        peer: None,
    };
    let (mut veth, mut peer_index, mut peer_ns) = (false, None, None);
    for a in &link.attributes {
        match *a {
            LinkAttribute::IfName(ref n) => port.name = n.clone(),
            LinkAttribute::Controller(m) => port.master = m,
            LinkAttribute::Link(i) => peer_index = Some(i),
            LinkAttribute::NetnsId(ns) => peer_ns = Some(ns),
            LinkAttribute::LinkInfo(ref infos) => {
                veth |= infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
            }
            _ => {}
        }
    }
    if !veth || port.master == 0 || port.name.is_empty() {
        return None;
    }
    port.peer = peer_ns.zip(peer_index);
    Some(port)
}

/// Every veth enslaved to a bridge in this namespace.
pub async fn bridge_ports() -> Result<Vec<BridgePort>> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing interfaces")?;
    Ok(links.iter().filter_map(bridge_port).collect())
}

/// Sends what link notifications (RTMGRP_LINK) say about bridge ports on
/// `tx` until it is closed: a container's veth is attached the moment
/// Docker enslaves it, not when Docker's start event arrives, after the
/// container's process has already begun sending. Should the notifications
/// stop, it subscribes again and sends [`LinkChange::Overrun`] (rescan).
pub fn watch_links(tx: tokio::sync::mpsc::UnboundedSender<LinkChange>) -> Result<()> {
    use futures::StreamExt as _;
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage;
    let mut subscription = Some(subscribe(
        rtnetlink::constants::RTMGRP_LINK,
        "link changes",
    )?);
    tokio::spawn(async move {
        loop {
            let (handle, mut messages) = match subscription.take() {
                Some(s) => s,
                None => match subscribe(rtnetlink::constants::RTMGRP_LINK, "link changes") {
                    Ok(s) => {
                        if tx.send(LinkChange::Overrun).is_err() {
                            return;
                        }
                        s
                    }
                    Err(e) => {
                        tracing::warn!("{e:#}; retrying in 1 s");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                },
            };
            // The connection lives as long as a handle does.
            let _handle = handle;
            while let Some((msg, _)) = messages.next().await {
                let change = match msg.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                        bridge_port(&link).map(LinkChange::Port)
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                        Some(LinkChange::Gone(link.header.index))
                    }
                    NetlinkPayload::Overrun(_) => Some(LinkChange::Overrun),
                    _ => None,
                };
                if let Some(change) = change {
                    if tx.send(change).is_err() {
                        return;
                    }
                }
            }
            tracing::warn!("link notifications stopped; subscribing again");
        }
    });
    Ok(())
}

type Notifications = futures::channel::mpsc::UnboundedReceiver<(
    netlink_packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>,
    netlink_sys::SocketAddr,
)>;

/// An rtnetlink connection subscribed to the multicast `groups`; its
/// notifications arrive as long as the handle lives.
fn subscribe(groups: u32, what: &str) -> Result<(rtnetlink::Handle, Notifications)> {
    use netlink_sys::AsyncSocket as _;
    let (mut conn, handle, messages) = rtnetlink::new_connection().context("opening rtnetlink")?;
    conn.socket_mut()
        .socket_mut()
        .bind(&netlink_sys::SocketAddr::new(0, groups))
        .with_context(|| format!("subscribing to {what}"))?;
    tokio::spawn(conn);
    Ok((handle, messages))
}

/// The MAC and IPv4 addresses of interface `ifindex` in the namespace this
/// one knows as `nsid` (a container's), read without entering it
/// (IFLA_TARGET_NETNSID / IFA_TARGET_NETNSID; address dumps honour the
/// target only on a socket with strict checking).
pub async fn peer_identity(nsid: i32, ifindex: u32) -> Result<([u8; 6], Vec<std::net::Ipv4Addr>)> {
    use netlink_packet_route::{
        address::{AddressAttribute, AddressMessage},
        AddressFamily,
    };
    use netlink_sys::AsyncSocket as _;
    /// IFA_TARGET_NETNSID, which netlink-packet-route 0.19 does not name.
    const IFA_TARGET_NETNSID: u16 = 10;
    let (mut conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    conn.socket_mut()
        .socket_mut()
        .set_netlink_get_strict_chk(true)
        .context("enabling strict netlink checks")?;
    tokio::spawn(conn);
    let mut get = handle.link().get().match_index(ifindex);
    get.message_mut()
        .attributes
        .push(LinkAttribute::IfNetnsId(nsid));
    let link = get
        .execute()
        .try_next()
        .await
        .with_context(|| format!("reading interface {ifindex} of namespace id {nsid}"))?
        .ok_or_else(|| anyhow!("no interface {ifindex} in namespace id {nsid}"))?;
    let mac = link_mac(&link)
        .ok_or_else(|| anyhow!("interface {ifindex} of namespace id {nsid} has no MAC"))?;
    let mut get = handle.address().get().set_link_index_filter(ifindex);
    let msg = get.message_mut();
    msg.header.family = AddressFamily::Inet;
    // With strict checking the kernel filters the dump by index itself.
    msg.header.index = ifindex;
    msg.attributes.push(AddressAttribute::Other(
        netlink_packet_utils::nla::DefaultNla::new(IFA_TARGET_NETNSID, nsid.to_ne_bytes().to_vec()),
    ));
    let addrs: Vec<AddressMessage> = get
        .execute()
        .try_collect()
        .await
        .with_context(|| format!("reading addresses in namespace id {nsid}"))?;
    let v4 = addrs
        .iter()
        .filter(|m| m.header.index == ifindex)
        .flat_map(|m| m.attributes.iter())
        .filter_map(|a| match a {
            AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        })
        .collect();
    Ok((mac, v4))
}

/// The MTU of `ifname`.
pub async fn mtu(ifname: &str) -> Result<u32> {
    link_named(ifname)
        .await?
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .ok_or_else(|| anyhow!("{ifname} reports no MTU"))
}

/// The interface named `ifname`.
async fn link_named(ifname: &str) -> Result<LinkMessage> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    handle
        .link()
        .get()
        .match_name(ifname.into())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("reading interface {ifname}"))?
        .ok_or_else(|| anyhow!("no interface named {ifname:?}"))
}

/// A link's Ethernet address.
fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    })
}

/// The ifindex, MAC and promiscuity count of `ifname`.
pub async fn link_identity(ifname: &str) -> Result<(u32, [u8; 6], u32)> {
    let link = link_named(ifname).await?;
    let mac = link_mac(&link).ok_or_else(|| anyhow!("{ifname} has no Ethernet address"))?;
    let promiscuity = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Promiscuity(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    Ok((link.header.index, mac, promiscuity))
}

/// Makes interface `ifindex` accept frames for `mac` (`bridge fdb add MAC
/// dev IF self permanent`, what kernel macvlan does): into its unicast
/// address filter, or, on a device without one, the kernel sets it
/// promiscuous. Already there is fine.
pub async fn add_unicast_filter(ifindex: u32, mac: [u8; 6]) -> Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    match handle
        .neighbours()
        .add_bridge(ifindex, &mac)
        .flags(vec![netlink_packet_route::neighbour::NeighbourFlag::Own])
        .execute()
        .await
    {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        r => r.with_context(|| format!("adding a unicast address to interface {ifindex}")),
    }
}

/// Undoes [`add_unicast_filter`]; already gone is fine.
pub async fn remove_unicast_filter(ifindex: u32, mac: [u8; 6]) -> Result<()> {
    use netlink_packet_route::{
        neighbour::{NeighbourAttribute, NeighbourFlag, NeighbourMessage, NeighbourState},
        AddressFamily,
    };
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = ifindex;
    message.header.state = NeighbourState::Permanent;
    message.header.flags = vec![NeighbourFlag::Own];
    message
        .attributes
        .push(NeighbourAttribute::LinkLocalAddress(mac.to_vec()));
    match handle.neighbours().del(message).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => Ok(()),
        r => r.with_context(|| format!("removing a unicast address from interface {ifindex}")),
    }
}

/// Creates the veth pair `host`–`peer` with `mtu` on both ends, the host
/// end up with MAC `host_mac`, the peer (the container's end, left down
/// for Docker to move) with `peer_mac`; returns the host end's ifindex. A
/// pair left by an earlier try (same names) is replaced: Docker retries
/// Join.
pub async fn create_veth(
    host: &str,
    peer: &str,
    mtu: u32,
    host_mac: [u8; 6],
    peer_mac: [u8; 6],
) -> Result<u32> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    if let Ok(index) = nix::net::if_::if_nametoindex(host) {
        let _ = handle.link().del(index).execute().await;
    }
    handle
        .link()
        .add()
        .veth(host.into(), peer.into())
        .execute()
        .await
        .with_context(|| format!("creating the veth pair {host}/{peer}"))?;
    for (name, mac, up) in [(peer, peer_mac, false), (host, host_mac, true)] {
        let index =
            nix::net::if_::if_nametoindex(name).with_context(|| format!("finding {name}"))?;
        let set = handle.link().set(index).mtu(mtu).address(mac.to_vec());
        let set = if up { set.up() } else { set };
        set.execute()
            .await
            .with_context(|| format!("setting up {name}"))?;
    }
    nix::net::if_::if_nametoindex(host).with_context(|| format!("finding {host}"))
}

/// Routes `addr`/32 to interface `ifindex` (a container behind its veth).
pub async fn add_host_route(addr: std::net::Ipv4Addr, ifindex: u32) -> Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    handle
        .route()
        .add()
        .v4()
        .destination_prefix(addr, 32)
        .output_interface(ifindex)
        .scope(netlink_packet_route::route::RouteScope::Link)
        .replace()
        .execute()
        .await
        .with_context(|| format!("routing {addr} to ifindex {ifindex}"))
}

/// The label netd gives the addresses it puts on `lo` (overlay gateways),
/// so that it removes only its own.
pub const GATEWAY_LABEL: &str = "lo:netd";

/// Makes netd's addresses on `lo` exactly `wanted` (/32, scope host: the
/// host answers on them, and never picks them as a source for its own
/// traffic).
pub async fn sync_gateway_addresses(wanted: &[std::net::Ipv4Addr]) -> Result<bool> {
    use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
    let lo = nix::net::if_::if_nametoindex("lo").context("finding lo")?;
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let current: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(lo)
        .execute()
        .try_collect()
        .await
        .context("listing addresses of lo")?;
    let ours = |m: &AddressMessage| {
        let label = m
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Label(l) if l == GATEWAY_LABEL));
        let addr = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        addr.filter(|_| label)
    };
    let mut changed = false;
    for m in &current {
        if let Some(addr) = ours(m).filter(|a| !wanted.contains(a)) {
            handle
                .address()
                .del(m.clone())
                .execute()
                .await
                .with_context(|| format!("removing {addr} from lo"))?;
            changed = true;
        }
    }
    let present: Vec<_> = current.iter().filter_map(ours).collect();
    for addr in wanted.iter().filter(|a| !present.contains(a)) {
        let mut req = handle.address().add(lo, std::net::IpAddr::V4(*addr), 32);
        let msg = req.message_mut();
        msg.header.scope = AddressScope::Host;
        msg.attributes
            .push(AddressAttribute::Label(GATEWAY_LABEL.to_owned()));
        match req.execute().await {
            Ok(()) => changed = true,
            // Already there, put by someone else: the host answers anyway.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            Err(e) => return Err(e).with_context(|| format!("adding gateway {addr} to lo")),
        }
    }
    Ok(changed)
}

/// Deletes the interface `ifname` (a veth takes its peer with it). Not
/// there is not an error.
pub async fn delete_link(ifname: &str) -> Result<()> {
    let Ok(index) = nix::net::if_::if_nametoindex(ifname) else {
        return Ok(());
    };
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        // Gone meanwhile (its container's namespace went first).
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting {ifname}")),
    }
}
