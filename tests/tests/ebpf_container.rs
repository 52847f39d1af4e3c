//! What a container may send, run in the kernel on crafted frames: the
//! test runner's device is loopback (ifindex 1), registered as the endpoint.
use std::net::Ipv4Addr;

use netd::dataplane::{Dataplane, LoadOptions};
use netd_common::{Counter, Hook};
use netd_tests::{
    ebpf::{be_container, count, nat_network, publish, tuple},
    packet::*,
    privileged,
};

const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 200);
const C1: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
const C2: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 3);
const OTHER_NET: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 2);
const PASS: i32 = -1;
const SHOT: i32 = 2;

fn setup(me: Ipv4Addr) -> Dataplane {
    let mut dp = Dataplane::load_unpinned(&LoadOptions::default()).unwrap();
    nat_network(&mut dp, (Ipv4Addr::new(198, 19, 1, 0), 24), 1);
    nat_network(&mut dp, (Ipv4Addr::new(198, 19, 2, 0), 24), 2);
    be(&mut dp, me);
    dp
}

/// Makes the test runner's device the veth of the container at `addr`.
fn be(dp: &mut Dataplane, addr: Ipv4Addr) {
    be_container(dp, addr, 1);
}

fn arp(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender_ip.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target_ip.octets());
    ethernet([0xff; 6], sender_mac, ETH_P_ARP, &a)
}

#[test]
fn a_container_may_send_only_as_itself() {
    if !privileged() {
        return;
    }
    let mut dp = setup(C1);
    let own = tcp4_frame((C1, 40000), (OUTSIDE, 80), TCP_SYN, b"");
    assert_eq!(
        dp.test_run(Hook::ContainerEgress, &own, 1).unwrap().action,
        PASS
    );

    let forged_ip = tcp4_frame((C2, 40000), (OUTSIDE, 80), TCP_SYN, b"");
    assert_eq!(
        dp.test_run(Hook::ContainerEgress, &forged_ip, 1)
            .unwrap()
            .action,
        SHOT
    );
    let mut forged_mac = own.clone();
    forged_mac[6..12].copy_from_slice(&MAC_B);
    assert_eq!(
        dp.test_run(Hook::ContainerEgress, &forged_mac, 1)
            .unwrap()
            .action,
        SHOT
    );
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::Spoofed), 2);

    // ARP: only its own sender addresses (0.0.0.0 probes allowed).
    assert_eq!(
        dp.test_run(Hook::ContainerEgress, &arp(MAC_A, C1, C2), 1)
            .unwrap()
            .action,
        PASS
    );
    assert_eq!(
        dp.test_run(
            Hook::ContainerEgress,
            &arp(MAC_A, Ipv4Addr::UNSPECIFIED, C2),
            1
        )
        .unwrap()
        .action,
        PASS
    );
    assert_eq!(
        dp.test_run(Hook::ContainerEgress, &arp(MAC_A, C2, C1), 1)
            .unwrap()
            .action,
        SHOT
    );
    assert_eq!(
        dp.test_run(Hook::ContainerEgress, &arp(MAC_B, C1, C2), 1)
            .unwrap()
            .action,
        SHOT
    );
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::Spoofed), 4);
}

#[test]
fn replies_across_networks_are_allowed_only_for_published_port_flows() {
    if !privileged() {
        return;
    }
    let mut dp = setup(C1);
    publish(&mut dp, HOST, 8080, PROTO_TCP, OTHER_NET, 80);
    // C1 (network 1) reaches a network-2 container through the published port.
    let syn = tcp4_frame((C1, 40000), (HOST, 8080), TCP_SYN, b"");
    assert_eq!(
        tuple(&dp.test_run(Hook::ContainerEgress, &syn, 1).unwrap().frame).1,
        OTHER_NET
    );
    // Its reply is part of that flow: allowed out of network 2.
    be_container(&mut dp, OTHER_NET, 2);
    let synack = tcp4_frame((OTHER_NET, 80), (C1, 40000), TCP_SYN | TCP_ACK, b"");
    assert_eq!(
        dp.test_run(Hook::ContainerEgress, &synack, 1)
            .unwrap()
            .action,
        PASS
    );
    // A direct connection the other way is not.
    let direct = tcp4_frame((OTHER_NET, 41000), (C1, 22), TCP_SYN, b"");
    assert_eq!(
        dp.test_run(Hook::ContainerEgress, &direct, 1)
            .unwrap()
            .action,
        SHOT
    );
}

#[test]
fn containers_of_other_networks_are_unreachable() {
    if !privileged() {
        return;
    }
    let mut dp = setup(C1);
    let same = tcp4_frame((C1, 40000), (C2, 80), TCP_SYN, b"");
    assert_eq!(
        dp.test_run(Hook::ContainerEgress, &same, 1).unwrap().action,
        PASS
    );
    let other = tcp4_frame((C1, 40000), (OTHER_NET, 80), TCP_SYN, b"");
    assert_eq!(
        dp.test_run(Hook::ContainerEgress, &other, 1)
            .unwrap()
            .action,
        SHOT
    );
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::Isolated), 1);
}

#[test]
fn hairpin_to_a_published_port_is_translated_both_ways() {
    if !privileged() {
        return;
    }
    let mut dp = setup(C1);
    publish(&mut dp, HOST, 8080, PROTO_TCP, C2, 80);
    // C1 → host:8080 becomes C1 → C2:80 on C1's veth.
    let syn = tcp4_frame((C1, 40000), (HOST, 8080), TCP_SYN, b"");
    let out = dp.test_run(Hook::ContainerEgress, &syn, 1).unwrap();
    assert_eq!(out.action, PASS);
    assert_eq!(tuple(&out.frame), (C1, C2, 40000, 80));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
    // C2's reply leaves C2 untouched (rewritten now, a routed reply would
    // carry a host address into the host's routing) and is rewritten on its
    // way into C1.
    be(&mut dp, C2);
    let synack = tcp4_frame((C2, 80), (C1, 40000), TCP_SYN | TCP_ACK, b"");
    let out = dp.test_run(Hook::ContainerEgress, &synack, 1).unwrap();
    assert_eq!(out.action, PASS);
    assert_eq!(out.frame, synack);
    let out = dp.test_run(Hook::ContainerIngress, &synack, 1).unwrap();
    assert_eq!(tuple(&out.frame), (HOST, C1, 8080, 40000));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
}

#[test]
fn a_container_reaching_its_own_published_port_is_answered_from_the_published_address() {
    if !privileged() {
        return;
    }
    const TC_ACT_REDIRECT: i32 = 7;
    const TTL: usize = 14 + 8;
    let mut dp = setup(C1);
    publish(&mut dp, HOST, 8080, PROTO_TCP, C1, 80);
    // C1 → host:8080 comes back into C1 as host → C1:80 (from C1 itself it
    // would be dropped), straight back out of the veth it came in on, as a
    // router would send it: MACs swapped, TTL decremented.
    let reflected = |dp: &mut Dataplane, frame: &[u8]| {
        let out = dp.test_run(Hook::ContainerEgress, frame, 1).unwrap();
        assert_eq!(out.action, TC_ACT_REDIRECT);
        assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
        assert_eq!(&out.frame[..6], &MAC_A, "to the container");
        assert_eq!(&out.frame[6..12], &MAC_B, "from its gateway");
        assert_eq!(out.frame[TTL], frame[TTL] - 1);
        out.frame
    };
    let syn = tcp4_frame((C1, 40000), (HOST, 8080), TCP_SYN, b"");
    assert_eq!(tuple(&reflected(&mut dp, &syn)), (HOST, C1, 40000, 80));
    // Its answer goes back to the connecting socket, from the published port.
    let synack = tcp4_frame((C1, 80), (HOST, 40000), TCP_SYN | TCP_ACK, b"");
    assert_eq!(tuple(&reflected(&mut dp, &synack)), (HOST, C1, 8080, 40000));
    let ack = tcp4_frame((C1, 40000), (HOST, 8080), TCP_ACK, b"GET /");
    assert_eq!(tuple(&reflected(&mut dp, &ack)), (HOST, C1, 40000, 80));
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::Dnat), 2);
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::RevDnat), 1);
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::Redirect), 3);
    // From outside, packets claiming C1's address are forged: neither an RST
    // on the flow nor a new SYN replacing it gets through.
    let rst = tcp4_frame((C1, 40000), (HOST, 8080), TCP_RST | TCP_ACK, b"");
    let syn = tcp4_frame((C1, 40000), (HOST, 8080), TCP_SYN, b"");
    for forged in [rst, syn] {
        let out = dp.test_run(Hook::UplinkIngress, &forged, 1).unwrap();
        assert_eq!(out.action, SHOT);
    }
    assert_eq!(count(&dp, Hook::UplinkIngress, Counter::Spoofed), 2);
    assert_eq!(tuple(&reflected(&mut dp, &ack)), (HOST, C1, 40000, 80));
    // Another container still reaches C1:80 by plain hairpin.
    be(&mut dp, C2);
    let syn = tcp4_frame((C2, 40000), (HOST, 8080), TCP_SYN, b"");
    let out = dp.test_run(Hook::ContainerEgress, &syn, 1).unwrap();
    assert_eq!(out.action, PASS);
    assert_eq!(tuple(&out.frame), (C2, C1, 40000, 80));
}

#[test]
fn replies_to_outside_clients_are_left_to_the_uplink() {
    if !privileged() {
        return;
    }
    let mut dp = setup(C2);
    publish(&mut dp, HOST, 8080, PROTO_TCP, C2, 80);
    let syn = tcp4_frame((OUTSIDE, 50000), (HOST, 8080), TCP_SYN, b"");
    dp.test_run(Hook::UplinkIngress, &syn, 1).unwrap();
    let synack = tcp4_frame((C2, 80), (OUTSIDE, 50000), TCP_SYN | TCP_ACK, b"");
    let out = dp.test_run(Hook::ContainerEgress, &synack, 1).unwrap();
    assert_eq!(out.frame, synack, "rewritten before the host routed it");
    let out = dp.test_run(Hook::ContainerIngress, &synack, 1).unwrap();
    assert_eq!(out.frame, synack, "not a container-bound reply");
    let out = dp.test_run(Hook::UplinkEgress, &synack, 1).unwrap();
    assert_eq!(tuple(&out.frame), (HOST, OUTSIDE, 8080, 50000));
}

#[test]
fn a_veth_whose_endpoint_is_unknown_sends_nothing() {
    if !privileged() {
        return;
    }
    // netd attaches when Docker enslaves the veth, before it knows the
    // endpoint: a hairpin SYN, an ARP request, anything is dropped and
    // counted until it does, then passes.
    let mut dp = Dataplane::load_unpinned(&LoadOptions::default()).unwrap();
    nat_network(&mut dp, (Ipv4Addr::new(198, 19, 1, 0), 24), 1);
    publish(&mut dp, HOST, 8080, PROTO_TCP, C2, 80);
    let syn = tcp4_frame((C1, 40000), (HOST, 8080), TCP_SYN, b"");
    let who_has = arp(MAC_A, C1, Ipv4Addr::new(198, 19, 1, 1));
    for frame in [&syn, &who_has] {
        let out = dp.test_run(Hook::ContainerEgress, frame, 1).unwrap();
        assert_eq!(out.action, SHOT);
        assert_eq!(out.frame, *frame, "dropped frames are not rewritten");
    }
    assert_eq!(
        count(&dp, Hook::ContainerEgress, Counter::UnknownEndpoint),
        2
    );
    be(&mut dp, C1);
    let out = dp.test_run(Hook::ContainerEgress, &syn, 1).unwrap();
    assert_eq!(out.action, PASS);
    assert_eq!(
        tuple(&out.frame),
        (C1, C2, 40000, 80),
        "hairpin DNAT once known"
    );
    assert_eq!(
        count(&dp, Hook::ContainerEgress, Counter::UnknownEndpoint),
        2
    );
}
