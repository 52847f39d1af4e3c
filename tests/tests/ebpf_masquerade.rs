//! Masquerade (SNAT of container traffic leaving by the uplink) run in the
//! kernel on crafted frames.
use std::net::Ipv4Addr;

use netd::dataplane::Dataplane;
use netd_common::{network::NETWORK_HOST_ADDR, Counter, Hook, NetworkInfo};
use netd_tests::{
    ebpf::{count, masquerading, publish, tuple},
    packet::*,
    privileged,
};

const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 200);
const C1: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
const C2: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 3);
const PASS: i32 = -1;
const SHOT: i32 = 2;

fn setup(port_min: u16, port_max: u16) -> Dataplane {
    masquerading(HOST, (port_min, port_max))
}

#[test]
fn container_tcp_is_masqueraded_keeping_its_port_and_replies_come_back() {
    if !privileged() {
        return;
    }
    let mut dp = setup(32768, 65535);
    let syn = tcp4_frame((C1, 40000), (SERVER, 80), TCP_SYN, b"");
    let out = dp.test_run(Hook::UplinkEgress, &syn, 1).unwrap();
    assert_eq!(out.action, PASS);
    assert_eq!(
        tuple(&out.frame),
        (HOST, SERVER, 40000, 80),
        "original port kept"
    );
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
    assert_eq!(count(&dp, Hook::UplinkEgress, Counter::Snat), 1);

    let synack = tcp4_frame((SERVER, 80), (HOST, 40000), TCP_SYN | TCP_ACK, b"");
    let out = dp.test_run(Hook::UplinkIngress, &synack, 1).unwrap();
    assert_eq!(tuple(&out.frame), (SERVER, C1, 80, 40000));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
    assert_eq!(count(&dp, Hook::UplinkIngress, Counter::RevSnat), 1);

    // Later packets of the flow reuse the entry.
    let data = tcp4_frame((C1, 40000), (SERVER, 80), TCP_ACK | TCP_PSH, b"payload");
    let out = dp.test_run(Hook::UplinkEgress, &data, 1).unwrap();
    assert_eq!(tuple(&out.frame), (HOST, SERVER, 40000, 80));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
    assert_eq!(dp.nat_flows().unwrap().len(), 2);
}

#[test]
fn colliding_source_ports_get_distinct_host_ports() {
    if !privileged() {
        return;
    }
    let mut dp = setup(32768, 65535);
    let a = dp
        .test_run(
            Hook::UplinkEgress,
            &udp4_frame((C1, 5000), (SERVER, 53), b"a"),
            1,
        )
        .unwrap();
    let b = dp
        .test_run(
            Hook::UplinkEgress,
            &udp4_frame((C2, 5000), (SERVER, 53), b"b"),
            1,
        )
        .unwrap();
    let (pa, pb) = (tuple(&a.frame).2, tuple(&b.frame).2);
    assert_eq!(pa, 5000);
    assert_ne!(pb, 5000, "second flow must not reuse the taken port");
    assert!((32768..=65535).contains(&pb));
    assert_eq!(verify_ipv4_frame(&b.frame), Ok(()));
    // Each reply finds its own container.
    let ra = dp
        .test_run(
            Hook::UplinkIngress,
            &udp4_frame((SERVER, 53), (HOST, pa), b"ra"),
            1,
        )
        .unwrap();
    let rb = dp
        .test_run(
            Hook::UplinkIngress,
            &udp4_frame((SERVER, 53), (HOST, pb), b"rb"),
            1,
        )
        .unwrap();
    assert_eq!(tuple(&ra.frame), (SERVER, C1, 53, 5000));
    assert_eq!(tuple(&rb.frame), (SERVER, C2, 53, 5000));
    assert_eq!(verify_ipv4_frame(&rb.frame), Ok(()));
}

#[test]
fn a_published_host_port_is_never_used_for_masquerade() {
    if !privileged() {
        return;
    }
    let mut dp = setup(32768, 65535);
    publish(&mut dp, HOST, 8080, PROTO_TCP, C2, 80);
    let out = dp
        .test_run(
            Hook::UplinkEgress,
            &tcp4_frame((C1, 8080), (SERVER, 80), TCP_SYN, b""),
            1,
        )
        .unwrap();
    assert_ne!(tuple(&out.frame).2, 8080);
    assert_eq!(tuple(&out.frame).0, HOST);
}

#[test]
fn ping_from_a_container_is_masqueraded() {
    if !privileged() {
        return;
    }
    let mut dp = setup(32768, 65535);
    let req = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(C1, SERVER, PROTO_ICMP, &icmp_echo(8, 0x1234, 1, b"ping")),
    );
    let out = dp.test_run(Hook::UplinkEgress, &req, 1).unwrap();
    assert_eq!(tuple(&out.frame), (HOST, SERVER, 0x1234, 0x1234));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
    let rep = ethernet(
        MAC_B,
        MAC_A,
        ETH_P_IP,
        &ipv4(SERVER, HOST, PROTO_ICMP, &icmp_echo(0, 0x1234, 1, b"ping")),
    );
    let out = dp.test_run(Hook::UplinkIngress, &rep, 1).unwrap();
    assert_eq!(tuple(&out.frame), (SERVER, C1, 0x1234, 0x1234));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
}

#[test]
fn traffic_from_outside_container_subnets_is_not_masqueraded() {
    if !privileged() {
        return;
    }
    let mut dp = setup(32768, 65535);
    for f in [
        tcp4_frame((HOST, 40000), (SERVER, 80), TCP_SYN, b""),
        tcp4_frame(
            (Ipv4Addr::new(198, 19, 2, 2), 40000),
            (SERVER, 80),
            TCP_SYN,
            b"",
        ),
    ] {
        let out = dp.test_run(Hook::UplinkEgress, &f, 1).unwrap();
        assert_eq!(out.frame, f);
    }
    assert_eq!(dp.nat_flows().unwrap().len(), 0);
}

#[test]
fn exhausted_ports_refuse_new_flows_and_keep_existing_ones() {
    if !privileged() {
        return;
    }
    // A one-port range: only the original port can ever be used.
    let mut dp = setup(40000, 40000);
    let first = tcp4_frame((C1, 40000), (SERVER, 80), TCP_SYN, b"");
    assert_eq!(
        dp.test_run(Hook::UplinkEgress, &first, 1).unwrap().action,
        PASS
    );
    let second = tcp4_frame((C2, 40000), (SERVER, 80), TCP_SYN, b"");
    let out = dp.test_run(Hook::UplinkEgress, &second, 1).unwrap();
    assert_eq!(out.action, SHOT);
    assert_eq!(count(&dp, Hook::UplinkEgress, Counter::SnatExhausted), 1);
    let again = tcp4_frame((C1, 40000), (SERVER, 80), TCP_ACK, b"more");
    let out = dp.test_run(Hook::UplinkEgress, &again, 1).unwrap();
    assert_eq!(out.action, PASS);
    assert_eq!(tuple(&out.frame).0, HOST);
}

#[test]
fn unsolicited_inbound_to_a_nat_network_is_dropped() {
    if !privileged() {
        return;
    }
    let mut dp = setup(32768, 65535);
    let probe = tcp4_frame((SERVER, 50000), (C1, 22), TCP_SYN, b"");
    assert_eq!(
        dp.test_run(Hook::UplinkIngress, &probe, 1).unwrap().action,
        SHOT
    );
    assert_eq!(count(&dp, Hook::UplinkIngress, Counter::NotPublished), 1);
    // Stray packets leave nothing behind in the flow table.
    let stray = udp4_frame((Ipv4Addr::new(8, 8, 8, 8), 53), (C1, 5555), b"x");
    assert_eq!(
        dp.test_run(Hook::UplinkIngress, &stray, 1).unwrap().action,
        SHOT
    );
    assert!(dp.nat_flows().unwrap().is_empty());
    // The host's own address in the subnet (the gateway) is not a container.
    dp.set_network(
        Ipv4Addr::new(198, 19, 1, 1),
        32,
        NetworkInfo {
            flags: NETWORK_HOST_ADDR,
            id: 1,
        },
    )
    .unwrap();
    let to_gw = tcp4_frame(
        (SERVER, 50001),
        (Ipv4Addr::new(198, 19, 1, 1), 22),
        TCP_SYN,
        b"",
    );
    assert_eq!(
        dp.test_run(Hook::UplinkIngress, &to_gw, 1).unwrap().action,
        PASS
    );
}

#[test]
fn replies_to_connections_routed_in_from_outside_are_not_masqueraded() {
    if !privileged() {
        return;
    }
    let mut dp = setup(32768, 65535);
    // A routed network (masquerade off): reachable from outside directly.
    dp.set_network(
        Ipv4Addr::new(198, 19, 1, 0),
        24,
        NetworkInfo { flags: 0, id: 1 },
    )
    .unwrap();
    // An outside client with a route to the container subnet connects in.
    let syn = tcp4_frame((SERVER, 50000), (C1, 80), TCP_SYN, b"");
    let out = dp.test_run(Hook::UplinkIngress, &syn, 1).unwrap();
    assert_eq!(out.frame, syn);
    let synack = tcp4_frame((C1, 80), (SERVER, 50000), TCP_SYN | TCP_ACK, b"");
    let out = dp.test_run(Hook::UplinkEgress, &synack, 1).unwrap();
    assert_eq!(
        out.frame, synack,
        "a reply to a routed connection was masqueraded"
    );
    assert_eq!(count(&dp, Hook::UplinkEgress, Counter::Snat), 0);
    // A non-SYN stray from outside creates no record.
    let before = dp.nat_flows().unwrap().len();
    let stray = tcp4_frame((SERVER, 50009), (C1, 80), TCP_ACK, b"");
    dp.test_run(Hook::UplinkIngress, &stray, 1).unwrap();
    assert_eq!(dp.nat_flows().unwrap().len(), before);
}
