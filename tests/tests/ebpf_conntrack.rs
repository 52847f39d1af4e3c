//! Flow state kept by the datapath and expiry by the daemon's GC.
use std::net::Ipv4Addr;

use netd::dataplane::{monotonic_now_ns, Dataplane};
use netd_common::{nat::*, CtTimeouts, Hook, NetworkInfo};
use netd_tests::{ebpf::masquerading, ebpf::publish, packet::*, privileged};

const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 200);
const C1: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
const SEC: u64 = 1_000_000_000;

fn setup() -> Dataplane {
    let mut dp = masquerading(HOST, (61000, 65535));
    // A routed network (masquerade off): reachable from outside directly.
    dp.set_network(
        Ipv4Addr::new(198, 19, 2, 0),
        24,
        NetworkInfo { flags: 0, id: 2 },
    )
    .unwrap();
    publish(&mut dp, HOST, 8080, PROTO_TCP, C1, 80);
    dp
}

fn run(dp: &mut Dataplane, hook: Hook, frame: Vec<u8>) {
    assert_eq!(dp.test_run(hook, &frame, 1).unwrap().action, -1);
}

/// The OR of the flags of every entry whose key has source port `sport`
/// or destination port `sport` (both directions of one test flow).
fn flow_flags(dp: &Dataplane, port: u16) -> u8 {
    dp.nat_flows()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.src_port == port.to_be_bytes() || k.dst_port == port.to_be_bytes())
        .fold(0, |acc, (_, e)| acc | e.flags)
}

#[test]
fn tcp_state_is_tracked_and_idle_flows_expire_by_state() {
    if !privileged() {
        return;
    }
    let mut dp = setup();
    let start = monotonic_now_ns();
    // 1: a published-port connection stuck at SYN.
    run(
        &mut dp,
        Hook::UplinkIngress,
        tcp4_frame((PEER, 50001), (HOST, 8080), TCP_SYN, b""),
    );
    // 2: an established one (handshake completed).
    run(
        &mut dp,
        Hook::UplinkIngress,
        tcp4_frame((PEER, 50002), (HOST, 8080), TCP_SYN, b""),
    );
    run(
        &mut dp,
        Hook::UplinkEgress,
        tcp4_frame((C1, 80), (PEER, 50002), TCP_SYN | TCP_ACK, b""),
    );
    run(
        &mut dp,
        Hook::UplinkIngress,
        tcp4_frame((PEER, 50002), (HOST, 8080), TCP_ACK, b""),
    );
    // 3: a closed one (FIN seen).
    run(
        &mut dp,
        Hook::UplinkIngress,
        tcp4_frame((PEER, 50003), (HOST, 8080), TCP_SYN, b""),
    );
    run(
        &mut dp,
        Hook::UplinkEgress,
        tcp4_frame((C1, 80), (PEER, 50003), TCP_SYN | TCP_ACK, b""),
    );
    run(
        &mut dp,
        Hook::UplinkIngress,
        tcp4_frame((PEER, 50003), (HOST, 8080), TCP_FIN | TCP_ACK, b""),
    );
    run(
        &mut dp,
        Hook::UplinkEgress,
        tcp4_frame((C1, 80), (PEER, 50003), TCP_FIN | TCP_ACK, b""),
    );
    // 4: a masqueraded UDP flow.
    run(
        &mut dp,
        Hook::UplinkEgress,
        udp4_frame((C1, 50004), (PEER, 53), b"q"),
    );

    assert_eq!(
        flow_flags(&dp, 50001) & (CT_FLAG_TCP_ACKED | CT_FLAG_TCP_FIN),
        0
    );
    assert_ne!(flow_flags(&dp, 50002) & CT_FLAG_TCP_ACKED, 0);
    assert_eq!(flow_flags(&dp, 50002) & CT_FLAG_TCP_FIN, 0);
    assert_ne!(flow_flags(&dp, 50003) & CT_FLAG_TCP_FIN, 0);
    assert_ne!(flow_flags(&dp, 50004) & CT_FLAG_SNAT, 0);
    assert_eq!(dp.nat_flows().unwrap().len(), 8);

    let t = CtTimeouts::default();
    // Nothing is idle yet.
    assert_eq!(dp.gc_nat_flows(start + SEC, &t).unwrap().removed, 0);
    // After the closing timeout: only the closed flow (both directions).
    assert_eq!(
        dp.gc_nat_flows(start + (t.tcp_closing + 2) * SEC, &t)
            .unwrap()
            .removed,
        2
    );
    assert_eq!(flow_flags(&dp, 50003), 0);
    // After the SYN / non-TCP timeout: the SYN-only and the UDP flow.
    assert_eq!(
        dp.gc_nat_flows(start + (t.other + 2) * SEC, &t)
            .unwrap()
            .removed,
        4
    );
    assert_ne!(
        flow_flags(&dp, 50002),
        0,
        "an established flow outlives the short timeouts"
    );
    // After the established timeout: everything.
    assert_eq!(
        dp.gc_nat_flows(start + (t.tcp_established + 2) * SEC, &t)
            .unwrap()
            .removed,
        2
    );
    assert!(dp.nat_flows().unwrap().is_empty());
}

#[test]
fn reverse_keys_pair_every_entry_with_its_other_direction() {
    if !privileged() {
        return;
    }
    let mut dp = setup();
    run(
        &mut dp,
        Hook::UplinkIngress,
        tcp4_frame((PEER, 50010), (HOST, 8080), TCP_SYN, b""),
    );
    run(
        &mut dp,
        Hook::UplinkEgress,
        udp4_frame((C1, 50011), (PEER, 53), b"q"),
    );
    let req = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(C1, PEER, PROTO_ICMP, &icmp_echo(8, 77, 1, b"")),
    );
    run(&mut dp, Hook::UplinkEgress, req);
    run(
        &mut dp,
        Hook::UplinkIngress,
        tcp4_frame(
            (PEER, 50012),
            (Ipv4Addr::new(198, 19, 2, 2), 80),
            TCP_SYN,
            b"",
        ),
    );
    let flows = dp.nat_flows().unwrap();
    assert_eq!(flows.len(), 8);
    for (k, e) in &flows {
        let pair = k.reverse_of(e);
        let (_, pe) = flows
            .iter()
            .find(|(pk, _)| *pk == pair)
            .unwrap_or_else(|| panic!("no pair for {k:?}"));
        assert_eq!(pair.reverse_of(pe), *k, "pairing is symmetric");
    }
}

#[test]
fn half_closed_and_half_open_flows_keep_the_right_timeouts() {
    let t = CtTimeouts::default();
    // One FIN: half-closed, still established.
    assert_eq!(
        t.for_flow(6, CT_FLAG_TCP_ACKED | CT_FLAG_TCP_FIN, CT_FLAG_TCP_ACKED),
        t.tcp_established
    );
    // FIN both ways, or an RST: closing.
    assert_eq!(
        t.for_flow(6, CT_FLAG_TCP_FIN, CT_FLAG_TCP_FIN),
        t.tcp_closing
    );
    assert_eq!(
        t.for_flow(6, CT_FLAG_TCP_RST, CT_FLAG_TCP_ACKED),
        t.tcp_closing
    );
    // A SYN answered by a SYN-ACK but never ACKed: not established.
    assert_eq!(t.for_flow(6, 0, CT_FLAG_TCP_ACKED), t.tcp_syn);
    assert_eq!(t.for_flow(17, 0, 0), t.other);
}

#[test]
fn the_collector_reads_a_table_larger_than_one_batch() {
    if !privileged() {
        return;
    }
    let mut dp = setup();
    // 6,000 masqueraded flows: 12,000 entries, three batches' worth.
    let peer = |i: u16| Ipv4Addr::new(198, 18, 1, 100 + (i / 1000) as u8);
    for i in 0..6000u16 {
        let syn = udp4_frame((C1, 10000 + i % 1000), (peer(i), 53), b"q");
        run(&mut dp, Hook::UplinkEgress, syn);
    }
    assert_eq!(dp.nat_flows().unwrap().len(), 12_000);
    let t = CtTimeouts::default();
    let now = monotonic_now_ns();
    let report = dp.gc_nat_flows(now, &t).unwrap();
    assert_eq!((report.scanned, report.removed), (12_000, 0));
    let report = dp.gc_nat_flows(now + (t.other + 2) * SEC, &t).unwrap();
    assert_eq!((report.scanned, report.removed), (12_000, 12_000));
    assert!(dp.nat_flows().unwrap().is_empty());
}
