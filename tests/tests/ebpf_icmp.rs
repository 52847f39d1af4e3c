//! ICMP errors about NATed flows are translated, quoted header included,
//! with every checksum right: path MTU discovery and traceroute work
//! through netd.
use std::net::Ipv4Addr;

use netd::dataplane::Dataplane;
use netd_common::{Counter, Hook};
use netd_tests::{
    ebpf::{be_container, count, masquerading, nat_network, publish},
    packet::*,
    privileged,
};

const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 200);
const C1: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);

fn setup() -> Dataplane {
    masquerading(HOST, (61000, 65535))
}

/// The IP packet inside an Ethernet frame.
fn ip_of(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

/// (outer src, outer dst, quoted src, quoted dst, quoted sport, quoted dport)
/// of an ICMP error frame; checks the quoted IP header checksum too.
fn error_tuple(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr, Ipv4Addr, Ipv4Addr, u16, u16) {
    assert_eq!(
        verify_ipv4_frame(frame),
        Ok(()),
        "outer IP or ICMP checksum"
    );
    let ip = ip_of(frame);
    let icmp = &ip[usize::from(ip[0] & 0xf) * 4..];
    let q = &icmp[8..];
    let qh = usize::from(q[0] & 0xf) * 4;
    assert_eq!(checksum(&q[..qh]), 0, "quoted IP header checksum");
    let l4 = &q[qh..];
    let a = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let (sp, dp) = if q[9] == PROTO_ICMP {
        let id = u16::from_be_bytes([l4[4], l4[5]]);
        (id, id)
    } else {
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    };
    (
        a(&ip[12..16]),
        a(&ip[16..20]),
        a(&q[12..16]),
        a(&q[16..20]),
        sp,
        dp,
    )
}

#[test]
fn fragmentation_needed_for_a_masqueraded_flow_reaches_the_container() {
    if !privileged() {
        return;
    }
    let mut dp = setup();
    // C1 connects out; the SYN leaves as HOST:40000 (original port kept).
    let syn = tcp4_frame((C1, 40000), (PEER, 443), TCP_SYN, b"");
    let out = dp.test_run(Hook::UplinkEgress, &syn, 1).unwrap();
    // A router on the way cannot forward a big segment of that flow.
    let big = ipv4(
        HOST,
        PEER,
        PROTO_TCP,
        &tcp(Addrs::V4(HOST, PEER), 40000, 443, 1, 1, TCP_ACK, &[0; 64]),
    );
    let err = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(ROUTER, HOST, PROTO_ICMP, &icmp_error(3, 4, 1400, &big)),
    );
    assert_eq!(ip_of(&out.frame)[12..16], HOST.octets());
    let out = dp.test_run(Hook::UplinkIngress, &err, 1).unwrap();
    assert_eq!(out.action, -1);
    assert_eq!(error_tuple(&out.frame), (ROUTER, C1, C1, PEER, 40000, 443));
    // The MTU the router reported is untouched.
    let ip = ip_of(&out.frame);
    assert_eq!(&ip[20 + 6..20 + 8], &1400u16.to_be_bytes());
}

#[test]
fn port_unreachable_from_a_published_container_leaves_as_the_host() {
    if !privileged() {
        return;
    }
    let mut dp = setup();
    publish(&mut dp, HOST, 5353, PROTO_UDP, C1, 53);
    let q = udp4_frame((PEER, 33000), (HOST, 5353), b"query");
    let delivered = dp.test_run(Hook::UplinkIngress, &q, 1).unwrap().frame;
    // The container has nothing on port 53 and says so.
    let err = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(
            C1,
            PEER,
            PROTO_ICMP,
            &icmp_error(3, 3, 0, ip_of(&delivered)),
        ),
    );
    let out = dp.test_run(Hook::UplinkEgress, &err, 1).unwrap();
    assert_eq!(
        error_tuple(&out.frame),
        (HOST, PEER, PEER, HOST, 33000, 5353)
    );
}

#[test]
fn time_exceeded_for_a_masqueraded_ping_reaches_the_container() {
    if !privileged() {
        return;
    }
    let mut dp = setup();
    let req = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(C1, PEER, PROTO_ICMP, &icmp_echo(8, 0x4242, 1, b"trace")),
    );
    let sent = dp.test_run(Hook::UplinkEgress, &req, 1).unwrap().frame;
    let err = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(
            ROUTER,
            HOST,
            PROTO_ICMP,
            &icmp_error(11, 0, 0, ip_of(&sent)),
        ),
    );
    let out = dp.test_run(Hook::UplinkIngress, &err, 1).unwrap();
    assert_eq!(
        error_tuple(&out.frame),
        (ROUTER, C1, C1, PEER, 0x4242, 0x4242)
    );
}

#[test]
fn errors_about_unknown_flows_and_truncated_quotes_are_left_alone() {
    if !privileged() {
        return;
    }
    let mut dp = setup();
    let stranger = ipv4(
        HOST,
        PEER,
        PROTO_TCP,
        &tcp(Addrs::V4(HOST, PEER), 1234, 80, 1, 1, TCP_SYN, b""),
    );
    let err = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(ROUTER, HOST, PROTO_ICMP, &icmp_error(3, 1, 0, &stranger)),
    );
    assert_eq!(
        dp.test_run(Hook::UplinkIngress, &err, 1).unwrap().frame,
        err
    );
    // Quote cut inside the L4 header.
    let mut short = icmp_error(3, 1, 0, &stranger);
    short.truncate(8 + 20 + 4);
    let err = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(ROUTER, HOST, PROTO_ICMP, &short),
    );
    assert_eq!(
        dp.test_run(Hook::UplinkIngress, &err, 1).unwrap().frame,
        err
    );
}

#[test]
fn translated_errors_are_counted() {
    if !privileged() {
        return;
    }
    let mut dp = setup();
    let syn = tcp4_frame((C1, 40001), (PEER, 443), TCP_SYN, b"");
    let sent = dp.test_run(Hook::UplinkEgress, &syn, 1).unwrap().frame;
    let err = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(
            ROUTER,
            HOST,
            PROTO_ICMP,
            &icmp_error(3, 4, 1400, ip_of(&sent)),
        ),
    );
    dp.test_run(Hook::UplinkIngress, &err, 1).unwrap();
    let n = dp
        .counters()
        .unwrap()
        .into_iter()
        .find(|(h, c, _)| *h == Hook::UplinkIngress && *c == netd_common::Counter::IcmpErrorNat)
        .unwrap()
        .2
        .packets;
    assert_eq!(n, 1);
}

#[test]
fn port_unreachable_for_a_hairpin_client_on_another_network_reaches_it_translated() {
    if !privileged() {
        return;
    }
    const SHOT: i32 = 2;
    let mut dp = setup();
    // The client is a container of another network (id 2) than C1's (id 1).
    let client = Ipv4Addr::new(198, 19, 2, 2);
    nat_network(&mut dp, (Ipv4Addr::new(198, 19, 2, 0), 24), 2);
    publish(&mut dp, HOST, 5353, PROTO_UDP, C1, 53);
    be_container(&mut dp, client, 2);
    let query = udp4_frame((client, 40000), (HOST, 5353), b"query");
    let out = dp.test_run(Hook::ContainerEgress, &query, 1).unwrap();
    // C1 has nothing on port 53: it answers with port unreachable, quoting
    // the datagram as it received it.
    let received = ip_of(&out.frame).to_vec();
    let err = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(C1, client, PROTO_ICMP, &icmp_error(3, 3, 0, &received)),
    );
    // Leaving C1: part of the hairpin flow, not a breach of isolation …
    be_container(&mut dp, C1, 1);
    let out = dp.test_run(Hook::ContainerEgress, &err, 1).unwrap();
    assert_ne!(out.action, SHOT);
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::Isolated), 0);
    // … and entering the client: from the published address, about the
    // datagram it sent.
    let out = dp.test_run(Hook::ContainerIngress, &err, 1).unwrap();
    assert_eq!(
        error_tuple(&out.frame),
        (HOST, client, client, HOST, 40000, 5353)
    );
    // An error about no NATed flow stays isolated.
    let stray = ipv4(
        client,
        C1,
        PROTO_UDP,
        &udp(Addrs::V4(client, C1), 40001, 53, b"x"),
    );
    let err = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(C1, client, PROTO_ICMP, &icmp_error(3, 3, 0, &stray)),
    );
    let out = dp.test_run(Hook::ContainerEgress, &err, 1).unwrap();
    assert_eq!(out.action, SHOT);
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::Isolated), 1);
}

/// A port unreachable frame from `from` to `to` quoting the whole offending
/// packet (Linux quotes up to 576 bytes), so that its L4 checksum can be
/// checked after translation.
fn port_unreachable_quoting_all(from: Ipv4Addr, to: Ipv4Addr, offending: &[u8]) -> Vec<u8> {
    error_quoting_all(3, 3, from, to, offending)
}

fn error_quoting_all(
    kind: u8,
    code: u8,
    from: Ipv4Addr,
    to: Ipv4Addr,
    offending: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(offending);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ethernet(MAC_B, MAC_A, ETH_P_IP, &ipv4(from, to, PROTO_ICMP, &icmp))
}

/// The quoted packet of an ICMP error frame, as an Ethernet frame of its
/// own (for `verify_ipv4_frame`).
fn quoted_frame(error: &[u8]) -> Vec<u8> {
    let ip = ip_of(error);
    let quote = &ip[usize::from(ip[0] & 0xf) * 4 + 8..];
    ethernet(MAC_B, MAC_A, ETH_P_IP, quote)
}

#[test]
fn a_quoted_udp_checksum_is_translated_with_its_addresses_and_ports() {
    if !privileged() {
        return;
    }
    let mut dp = setup();
    // Masqueraded: C1:5000 → PEER:53 leaves as HOST:5000; the error from a
    // router quotes it and reaches C1 quoting what C1 sent.
    let q = udp4_frame((C1, 5000), (PEER, 53), b"query");
    let sent = dp.test_run(Hook::UplinkEgress, &q, 1).unwrap().frame;
    let err = port_unreachable_quoting_all(ROUTER, HOST, ip_of(&sent));
    let out = dp.test_run(Hook::UplinkIngress, &err, 1).unwrap().frame;
    assert_eq!(error_tuple(&out), (ROUTER, C1, C1, PEER, 5000, 53));
    assert_eq!(quoted_frame(&out), q, "the datagram as C1 sent it");
    // Published: PEER → HOST:5353 reaches C1:53; C1's port unreachable
    // leaves quoting what PEER sent, its UDP checksum right.
    publish(&mut dp, HOST, 5353, PROTO_UDP, C1, 53);
    let q = udp4_frame((PEER, 33001), (HOST, 5353), b"query");
    let received = dp.test_run(Hook::UplinkIngress, &q, 1).unwrap().frame;
    let err = port_unreachable_quoting_all(C1, PEER, ip_of(&received));
    let out = dp.test_run(Hook::UplinkEgress, &err, 1).unwrap().frame;
    assert_eq!(error_tuple(&out), (HOST, PEER, PEER, HOST, 33001, 5353));
    assert_eq!(verify_ipv4_frame(&quoted_frame(&out)), Ok(()));
}

#[test]
fn quoted_tcp_and_echo_checksums_follow_the_translation() {
    if !privileged() {
        return;
    }
    let mut dp = setup();
    // A masqueraded SYN whose whole header a router quotes …
    let syn = tcp4_frame((C1, 40002), (PEER, 443), TCP_SYN, b"");
    let sent = dp.test_run(Hook::UplinkEgress, &syn, 1).unwrap().frame;
    let err = error_quoting_all(11, 0, ROUTER, HOST, ip_of(&sent));
    let out = dp.test_run(Hook::UplinkIngress, &err, 1).unwrap().frame;
    assert_eq!(quoted_frame(&out), syn, "the segment as C1 sent it");
    // … and a masqueraded ping whose id was rewritten (another container
    // holds the first one's id).
    let ping = |from: Ipv4Addr| {
        ethernet(
            MAC_B,
            MAC_A,
            ETH_P_IP,
            &ipv4(from, PEER, PROTO_ICMP, &icmp_echo(8, 0x4343, 1, b"ttl")),
        )
    };
    dp.test_run(Hook::UplinkEgress, &ping(Ipv4Addr::new(198, 19, 1, 3)), 1)
        .unwrap();
    let sent = dp.test_run(Hook::UplinkEgress, &ping(C1), 1).unwrap().frame;
    assert_ne!(echo_id(&sent), 0x4343, "id kept: nothing to test");
    let err = error_quoting_all(11, 0, ROUTER, HOST, ip_of(&sent));
    let out = dp.test_run(Hook::UplinkIngress, &err, 1).unwrap().frame;
    assert_eq!(quoted_frame(&out), ping(C1), "the echo as C1 sent it");
}

/// The id of an Ethernet + IPv4 + ICMP echo frame.
fn echo_id(frame: &[u8]) -> u16 {
    let ip = ip_of(frame);
    let icmp = &ip[usize::from(ip[0] & 0xf) * 4..];
    u16::from_be_bytes([icmp[4], icmp[5]])
}
