//! The desired state netd derives from Docker, as plain data: what the
//! maps should hold. Pure functions, so the derivation is unit-tested
//! without a kernel or a Docker daemon.
use std::{collections::HashMap, net::Ipv4Addr};

use netd_common::{
    network::{
        network_id, NETWORK_HOST_ADDR, NETWORK_INTERNAL, NETWORK_MASQUERADE, NETWORK_OVERLAY,
        NETWORK_ROUTED,
    },
    overlay::{RoutedBlock, HOST_OFF_LINK, HOST_ON_LINK},
    Endpoint, NetworkInfo, OverlayNetwork, Peer, PortKey, PortTarget,
};

use crate::cluster::Picture;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// One published port of one container, as Docker reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub container: String,
    /// `None`: published on every host address.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub proto: u8,
    pub container_ip: Ipv4Addr,
    pub container_port: u16,
}

/// Parses Docker's "80/tcp" port key. SCTP is not served: its checksum is
/// a CRC32c over the whole packet, which a port rewrite would have to
/// recompute, and the datapath cannot tell when the kernel has left it to
/// be computed later (checksum offload).
pub fn parse_port_spec(spec: &str) -> Option<(u16, u8)> {
    let (port, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let proto = match proto {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        _ => return None,
    };
    Some((port.parse().ok()?, proto))
}

/// A binding's HostIp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostBinding {
    /// "" or "0.0.0.0": every host address.
    Any,
    Addr(Ipv4Addr),
    /// IPv6 ("::", …): not served yet.
    Unsupported,
}

pub fn parse_host_ip(ip: &str) -> HostBinding {
    match ip {
        "" | "0.0.0.0" => HostBinding::Any,
        other => other
            .parse::<Ipv4Addr>()
            .map(HostBinding::Addr)
            .unwrap_or(HostBinding::Unsupported),
    }
}

/// What `netd_ports` must hold: "every address" publishes expanded over the
/// host's addresses and 127.0.0.1 (host processes reach them on loopback
/// through the socket hooks, as docker-proxy would give them). When two containers claim the same key (Docker
/// prevents it; a race could not), the first by container id wins, so the
/// result does not depend on listing order.
pub fn desired_ports(
    publishes: &[Publish],
    host_addrs: &[Ipv4Addr],
) -> HashMap<PortKey, PortTarget> {
    let mut sorted: Vec<&Publish> = publishes.iter().collect();
    sorted.sort_by(|a, b| a.container.cmp(&b.container));
    let mut out = HashMap::new();
    for p in sorted {
        let addrs: Vec<Ipv4Addr> = match p.host_ip {
            Some(ip) => vec![ip],
            None => host_addrs
                .iter()
                .copied()
                .chain([Ipv4Addr::LOCALHOST])
                .collect(),
        };
        for addr in addrs {
            let key = PortKey {
                addr: addr.octets(),
                port: p.host_port.to_be_bytes(),
                proto: p.proto,
                _pad: 0,
            };
            out.entry(key).or_insert(PortTarget {
                addr: p.container_ip.octets(),
                port: p.container_port.to_be_bytes(),
                _pad: [0; 2],
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(container: &str, host_ip: Option<Ipv4Addr>, port: u16) -> Publish {
        Publish {
            container: container.into(),
            host_ip,
            host_port: port,
            proto: PROTO_TCP,
            container_ip: Ipv4Addr::new(198, 19, 1, 2),
            container_port: 80,
        }
    }

    #[test]
    fn specs_and_host_ips_parse() {
        assert_eq!(parse_port_spec("80/tcp"), Some((80, PROTO_TCP)));
        assert_eq!(parse_port_spec("53/udp"), Some((53, PROTO_UDP)));
        assert_eq!(parse_port_spec("80/quic"), None);
        assert_eq!(parse_port_spec("9/sctp"), None);
        assert_eq!(parse_port_spec("x/tcp"), None);
        assert_eq!(parse_host_ip(""), HostBinding::Any);
        assert_eq!(parse_host_ip("0.0.0.0"), HostBinding::Any);
        assert_eq!(
            parse_host_ip("198.18.0.1"),
            HostBinding::Addr(Ipv4Addr::new(198, 18, 0, 1))
        );
        assert_eq!(parse_host_ip("::"), HostBinding::Unsupported);
    }

    #[test]
    fn any_address_expands_and_specific_address_does_not() {
        let hosts = [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2)];
        let all = desired_ports(&[publish("a", None, 8080)], &hosts);
        assert_eq!(all.len(), 3, "two host addresses and loopback");
        assert!(all.keys().any(|k| k.addr == [127, 0, 0, 1]));
        let one = desired_ports(&[publish("a", Some(hosts[1]), 8080)], &hosts);
        assert_eq!(one.len(), 1);
        assert!(one.keys().all(|k| k.addr == hosts[1].octets()));
    }

    #[test]
    fn conflicting_claims_resolve_the_same_whatever_the_order() {
        let hosts = [Ipv4Addr::new(198, 18, 0, 1)];
        let mut b = publish("b", None, 8080);
        b.container_ip = Ipv4Addr::new(198, 19, 1, 3);
        let x = desired_ports(&[publish("a", None, 8080), b.clone()], &hosts);
        let y = desired_ports(&[b, publish("a", None, 8080)], &hosts);
        assert_eq!(x, y);
        assert_eq!(x.values().next().unwrap().addr, [198, 19, 1, 2]);
    }
}

/// A Docker network of a driver netd serves (bridge).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub id: String,
    pub name: String,
    /// IPv4 subnets (address, prefix length).
    pub subnets: Vec<(Ipv4Addr, u8)>,
    /// com.docker.network.bridge.enable_ip_masquerade (default true).
    pub masquerade: bool,
    /// Internal networks have no outside connectivity at all.
    pub internal: bool,
    /// The bridge's addresses (the host's own, inside the subnets).
    pub gateways: Vec<Ipv4Addr>,
    /// The Linux bridge Docker made for it (docker0, br-<id>): where its
    /// containers' veths are enslaved.
    pub bridge: String,
}

/// Parses "198.19.1.0/24" (IPv6 subnets yield `None`).
pub fn parse_subnet(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some(())?;
    Some((addr.parse().ok()?, prefix))
}

/// Is `addr` inside `subnet` (address, prefix length)?
pub fn subnet_contains((net, prefix): (Ipv4Addr, u8), addr: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(addr) & mask == u32::from(net) & mask
}

/// What `netd_networks` must hold: subnet → network info.
pub fn desired_networks(networks: &[Network]) -> HashMap<(Ipv4Addr, u8), NetworkInfo> {
    let mut out = HashMap::new();
    for n in networks {
        let flags = if n.internal {
            NETWORK_INTERNAL
        } else if n.masquerade {
            NETWORK_MASQUERADE
        } else {
            0
        };
        let id = network_id(&n.id);
        for subnet in &n.subnets {
            out.entry(*subnet).or_insert(NetworkInfo { flags, id });
        }
        for gw in &n.gateways {
            out.entry((*gw, 32)).or_insert(NetworkInfo {
                flags: NETWORK_HOST_ADDR,
                id,
            });
        }
    }
    out
}

/// The MAC of overlay address `addr` (a container's, or a gateway's):
/// locally administered, then the address, so it is the same on every host
/// and unique within the network.
pub fn overlay_mac(addr: Ipv4Addr) -> [u8; 6] {
    let o = addr.octets();
    [0x02, 0x4e, o[0], o[1], o[2], o[3]]
}

/// What the datapath holds for the cluster's overlay networks, as host
/// `node` sees them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OverlayDesired {
    /// Subnets (and gateways, as /32s) for `netd_networks`.
    pub networks: HashMap<(Ipv4Addr, u8), NetworkInfo>,
    pub overlays: HashMap<u32, OverlayNetwork>,
    pub vnis: HashMap<u32, u32>,
    /// Containers of other hosts.
    pub peers: HashMap<[u8; 4], Peer>,
    /// Other hosts: on this host's LAN, or beyond a router.
    pub vteps: HashMap<[u8; 4], u32>,
    /// Gateway addresses this host answers on.
    pub gateways: Vec<Ipv4Addr>,
    /// Other hosts' blocks of routed networks, for hosts on this LAN.
    pub routed_blocks: HashMap<(Ipv4Addr, u8), RoutedBlock>,
    /// Blocks of hosts not on this LAN: unreachable without encapsulation.
    pub unroutable: Vec<crate::cluster::HostBlock>,
}

/// What the overlay and routed maps hold for `picture` as `node` sees it;
/// `off_link`: the other hosts not on this host's LAN (reached through a
/// router, or not at all).
pub fn desired_overlay(
    picture: &Picture,
    node: &str,
    off_link: &std::collections::HashSet<Ipv4Addr>,
) -> OverlayDesired {
    let mut out = OverlayDesired::default();
    // Segment networks are the LAN's: no subnet routed or NATed here, no
    // gateway of the host's, no peers (the switch finds them).
    for n in picture.networks.iter().filter(|n| !n.is_segment()) {
        let id = network_id(&n.id);
        let flags = NETWORK_OVERLAY
            | if n.internal {
                NETWORK_INTERNAL
            } else if n.masquerades() {
                NETWORK_MASQUERADE
            } else {
                0
            }
            | if n.is_routed() { NETWORK_ROUTED } else { 0 };
        out.networks.insert(n.subnet, NetworkInfo { flags, id });
        out.networks.insert(
            (n.gateway, 32),
            NetworkInfo {
                flags: NETWORK_HOST_ADDR,
                id,
            },
        );
        out.overlays.insert(
            id,
            OverlayNetwork {
                vni: n.vni,
                gateway: n.gateway.octets(),
                gateway_mac: overlay_mac(n.gateway),
                _pad: [0; 2],
            },
        );
        if n.vni != 0 {
            out.vnis.insert(n.vni, id);
        }
        out.gateways.push(n.gateway);
    }
    for e in picture.endpoints.iter().filter(|e| e.host != node) {
        // Routed networks' containers are found by their host's block.
        if !picture
            .networks
            .iter()
            .any(|n| n.id == e.network && n.vni != 0)
        {
            continue;
        }
        out.peers.insert(
            e.addr.octets(),
            Peer {
                vtep: e.vtep.octets(),
                mac: e.mac,
                _pad: [0; 2],
                network: network_id(&e.network),
            },
        );
    }
    for h in picture.hosts.iter().filter(|h| h.node != node) {
        let place = match off_link.contains(&h.vtep) {
            true => HOST_OFF_LINK,
            false => HOST_ON_LINK,
        };
        out.vteps.insert(h.vtep.octets(), place);
    }
    // A block is routed while its host is in the cluster (its record is on
    // the host's lease) and on this LAN.
    for b in picture.blocks.iter().filter(|b| b.host != node) {
        let Some(host) = picture.hosts.iter().find(|h| h.node == b.host) else {
            continue;
        };
        if !picture
            .networks
            .iter()
            .any(|n| n.id == b.network && n.is_routed())
        {
            continue;
        }
        if off_link.contains(&host.vtep) {
            out.unroutable.push(b.clone());
            continue;
        }
        out.routed_blocks.insert(
            b.block,
            RoutedBlock {
                host: host.vtep.octets(),
                network: network_id(&b.network),
                host_mac: host.mac.unwrap_or_default(),
                _pad: [0; 2],
            },
        );
    }
    out
}

/// A container's attachment to a bridge network, as Docker reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub container: String,
    pub network: String,
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
    /// The container's network namespace (inspect's SandboxKey).
    pub sandbox_key: String,
}

/// Parses "02:42:c6:13:01:02".
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The endpoints map entry of `spec`.
pub fn endpoint_value(spec: &EndpointSpec) -> Endpoint {
    Endpoint {
        addr: spec.addr.octets(),
        mac: spec.mac,
        _pad: [0; 2],
        network: network_id(&spec.network),
    }
}

#[cfg(test)]
mod network_tests {
    use super::*;

    #[test]
    fn subnets_parse_and_flags_follow_options() {
        assert_eq!(
            parse_subnet("198.19.1.0/24"),
            Some((Ipv4Addr::new(198, 19, 1, 0), 24))
        );
        assert_eq!(parse_subnet("fd00::/64"), None);
        assert_eq!(parse_subnet("198.19.1.0/33"), None);
        let net = |name: &str, third: u8, masquerade: bool, internal: bool| Network {
            id: format!("{third:08x}"),
            name: name.into(),
            subnets: vec![(Ipv4Addr::new(198, 19, third, 0), 24)],
            masquerade,
            internal,
            gateways: vec![Ipv4Addr::new(198, 19, third, 1)],
            bridge: format!("br-{third}"),
        };
        let d = desired_networks(&[
            net("a", 1, true, false),
            net("b", 2, false, false),
            net("c", 3, true, true),
        ]);
        let at = |third: u8| d[&(Ipv4Addr::new(198, 19, third, 0), 24)];
        assert_eq!(at(1).flags, NETWORK_MASQUERADE);
        assert_eq!(at(2).flags, 0);
        assert_eq!(
            at(3).flags,
            NETWORK_INTERNAL,
            "internal networks never masquerade"
        );
        assert_eq!((at(1).id, at(2).id), (1, 2));
        let gw = d[&(Ipv4Addr::new(198, 19, 1, 1), 32)];
        assert_eq!((gw.flags, gw.id), (NETWORK_HOST_ADDR, 1));
    }

    #[test]
    fn subnets_contain_their_addresses_only() {
        let net = (Ipv4Addr::new(198, 19, 1, 0), 24);
        assert!(subnet_contains(net, Ipv4Addr::new(198, 19, 1, 255)));
        assert!(!subnet_contains(net, Ipv4Addr::new(198, 19, 2, 1)));
        assert!(subnet_contains(
            (Ipv4Addr::UNSPECIFIED, 0),
            Ipv4Addr::new(1, 2, 3, 4)
        ));
        assert!(!subnet_contains(
            (Ipv4Addr::new(198, 19, 1, 1), 32),
            Ipv4Addr::new(198, 19, 1, 2)
        ));
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("02:42:c6:13:01:02"),
            Some([2, 0x42, 0xc6, 0x13, 1, 2])
        );
        assert_eq!(parse_mac("02:42:c6:13:01"), None);
        assert_eq!(parse_mac("02:42:c6:13:01:02:03"), None);
        assert_eq!(parse_mac("zz:42:c6:13:01:02"), None);
    }
}
