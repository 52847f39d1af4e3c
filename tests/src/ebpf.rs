//! Helpers shared by the BPF_PROG_TEST_RUN suites.
use std::net::Ipv4Addr;

use netd::dataplane::{Dataplane, LoadOptions};
use netd_common::{
    network::NETWORK_MASQUERADE, Counter, Endpoint, Hook, NatConfig, NetworkInfo, PortKey,
    PortTarget,
};

use crate::packet::{MAC_A, PROTO_ICMP};

/// The ifindex BPF_PROG_TEST_RUN runs programs on (loopback).
pub const TEST_RUN_IFINDEX: u32 = 1;

/// Makes the test runner's device the host-side veth of the container at
/// `addr` (MAC [`MAC_A`], the source of the packet builders' frames) on
/// network `network`.
pub fn be_container(dp: &mut Dataplane, addr: Ipv4Addr, network: u32) {
    dp.set_endpoint(
        TEST_RUN_IFINDEX,
        Endpoint {
            addr: addr.octets(),
            mac: MAC_A,
            _pad: [0; 2],
            network,
        },
    )
    .expect("writing netd_endpoints");
}

/// Packets counted for (`hook`, `counter`), summed over CPUs.
pub fn count(dp: &Dataplane, hook: Hook, counter: Counter) -> u64 {
    dp.counters()
        .expect("reading counters")
        .into_iter()
        .find(|(h, c, _)| *h == hook && *c == counter)
        .map(|(_, _, v)| v.packets)
        .expect("every (hook, counter) has a slot")
}

/// (src, dst, sport, dport) of an Ethernet + IPv4 + TCP/UDP frame; for
/// ICMP the echo id stands in both port places.
pub fn tuple(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let ip = &frame[14..];
    let l4 = &ip[usize::from(ip[0] & 0xf) * 4..];
    let (sport, dport) = if ip[9] == PROTO_ICMP {
        let id = u16::from_be_bytes([l4[4], l4[5]]);
        (id, id)
    } else {
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    };
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    (addr(&ip[12..16]), addr(&ip[16..20]), sport, dport)
}

/// Publishes `host:host_port/proto` to `target:target_port`.
pub fn publish(
    dp: &mut Dataplane,
    host: Ipv4Addr,
    host_port: u16,
    proto: u8,
    target: Ipv4Addr,
    target_port: u16,
) {
    dp.set_port(
        PortKey {
            addr: host.octets(),
            port: host_port.to_be_bytes(),
            proto,
            _pad: 0,
        },
        PortTarget {
            addr: target.octets(),
            port: target_port.to_be_bytes(),
            _pad: [0; 2],
        },
    )
    .expect("writing netd_ports");
}

/// The container subnet the NAT suites use: 198.19.1.0/24, network id 1.
pub const CONTAINER_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 1, 0), 24);

/// Programs loaded unpinned, masquerading [`CONTAINER_SUBNET`] as `host`
/// with fallback source ports `ports`.
pub fn masquerading(host: Ipv4Addr, ports: (u16, u16)) -> Dataplane {
    let mut dp = Dataplane::load_unpinned(&LoadOptions::default()).expect("loading programs");
    dp.set_config(NatConfig {
        host_addr: host.octets(),
        snat_port_min: ports.0,
        snat_port_max: ports.1,
        ..Default::default()
    })
    .expect("writing netd_config");
    nat_network(&mut dp, CONTAINER_SUBNET, 1);
    dp
}

/// Adds a masquerading (NAT) Docker network with `subnet` and `id`.
pub fn nat_network(dp: &mut Dataplane, (addr, prefix): (Ipv4Addr, u8), id: u32) {
    dp.set_network(
        addr,
        prefix,
        NetworkInfo {
            flags: NETWORK_MASQUERADE,
            id,
        },
    )
    .expect("writing netd_networks");
}
