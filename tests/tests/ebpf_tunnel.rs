//! VXLAN decapsulation and ARP on overlay networks, run in the kernel with
//! BPF_PROG_TEST_RUN: a frame from a member host for a local container is
//! unwrapped; every other one is dropped with its reason, never delivered.
use std::net::Ipv4Addr;

use netd::dataplane::{Dataplane, LoadOptions, Overlays, Peers, Vnis, Vteps};
use netd_common::{
    network::{NETWORK_MASQUERADE, NETWORK_OVERLAY},
    Counter, Endpoint, EndpointLocation, Hook, NatConfig, NetworkInfo, OverlayNetwork, Peer,
    TunnelConfig,
};
use netd_tests::{
    ebpf::{count, TEST_RUN_IFINDEX},
    packet::{
        ethernet, icmp_echo, ipv4, udp, Addrs, ETH_P_ARP, ETH_P_IP, MAC_A, MAC_B, PROTO_ICMP,
        PROTO_UDP,
    },
    privileged,
};

const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const MEMBER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 66);
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 19, 50, 2);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 19, 50, 3);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 50, 1);
const VNI: u32 = 5000;
const NET: u32 = 7;
const GW_MAC: [u8; 6] = [0x02, 0x4e, 198, 19, 50, 1];
/// TC_ACT_SHOT and TC_ACT_REDIRECT.
const SHOT: i32 = 2;
const REDIRECT: i32 = 7;

fn overlay_dataplane() -> Dataplane {
    let mut dp = Dataplane::load_unpinned(&LoadOptions::default()).unwrap();
    dp.set_config(NatConfig {
        host_addr: HOST.octets(),
        uplink_ifindex: TEST_RUN_IFINDEX,
        ..Default::default()
    })
    .unwrap();
    dp.set_tunnel(TunnelConfig {
        vtep: HOST.octets(),
        port: 4789u16.to_be_bytes(),
        _pad: [0; 2],
    })
    .unwrap();
    dp.set_network(
        Ipv4Addr::new(198, 19, 50, 0),
        24,
        NetworkInfo {
            flags: NETWORK_OVERLAY | NETWORK_MASQUERADE,
            id: NET,
        },
    )
    .unwrap();
    dp.table_set::<Overlays>(
        NET,
        OverlayNetwork {
            vni: VNI,
            gateway: GATEWAY.octets(),
            gateway_mac: GW_MAC,
            _pad: [0; 2],
        },
    )
    .unwrap();
    dp.table_set::<Vnis>(VNI, NET).unwrap();
    dp.table_set::<Vteps>(MEMBER.octets(), 1).unwrap();
    dp.table_set::<Peers>(
        REMOTE.octets(),
        Peer {
            vtep: MEMBER.octets(),
            mac: MAC_B,
            _pad: [0; 2],
            network: NET,
        },
    )
    .unwrap();
    let local = Endpoint {
        addr: LOCAL.octets(),
        mac: MAC_A,
        _pad: [0; 2],
        network: NET,
    };
    dp.set_endpoint(TEST_RUN_IFINDEX, local).unwrap();
    dp.set_endpoint_location(LOCAL, EndpointLocation::of(TEST_RUN_IFINDEX, &local))
        .unwrap();
    dp
}

/// A VXLAN packet from `vtep` with `vni` carrying an ICMP echo `src` → `dst`.
fn vxlan(vtep: Ipv4Addr, vni: u32, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let inner = ethernet(
        MAC_A,
        MAC_B,
        ETH_P_IP,
        &ipv4(src, dst, PROTO_ICMP, &icmp_echo(8, 1, 1, b"across")),
    );
    let v = vni.to_be_bytes();
    let mut payload = vec![0x08, 0, 0, 0, v[1], v[2], v[3], 0];
    payload.extend_from_slice(&inner);
    let seg = udp(Addrs::V4(vtep, HOST), 40000, 4789, &payload);
    ethernet(MAC_A, MAC_B, ETH_P_IP, &ipv4(vtep, HOST, PROTO_UDP, &seg))
}

#[test]
fn vxlan_from_a_member_for_a_local_container_is_unwrapped() {
    if !privileged() {
        return;
    }
    let mut dp = overlay_dataplane();
    let out = dp
        .test_run(Hook::UplinkIngress, &vxlan(MEMBER, VNI, REMOTE, LOCAL), 1)
        .unwrap();
    assert_eq!(out.action, REDIRECT);
    // The inner packet, as the container sees it: its MAC, the sender's.
    assert_eq!(&out.frame[..6], &MAC_A);
    assert_eq!(&out.frame[6..12], &MAC_B);
    assert_eq!(&out.frame[26..30], &REMOTE.octets());
    assert_eq!(&out.frame[30..34], &LOCAL.octets());
    assert_eq!(count(&dp, Hook::UplinkIngress, Counter::VxlanDecap), 1);
}

#[test]
fn other_vxlan_frames_are_dropped_with_their_reason() {
    if !privileged() {
        return;
    }
    let mut dp = overlay_dataplane();
    let cases = [
        (vxlan(MEMBER, VNI + 1, REMOTE, LOCAL), Counter::UnknownVni),
        (vxlan(STRANGER, VNI, REMOTE, LOCAL), Counter::UnknownVtep),
        // A member speaking for an address that is not its container.
        (
            vxlan(MEMBER, VNI, Ipv4Addr::new(198, 19, 50, 9), LOCAL),
            Counter::Spoofed,
        ),
        (
            vxlan(MEMBER, VNI, REMOTE, Ipv4Addr::new(198, 19, 50, 8)),
            Counter::NoEndpoint,
        ),
    ];
    for (frame, reason) in cases {
        let out = dp.test_run(Hook::UplinkIngress, &frame, 1).unwrap();
        assert_eq!(out.action, SHOT, "{reason:?}");
        assert_eq!(count(&dp, Hook::UplinkIngress, reason), 1, "{reason:?}");
    }
    assert_eq!(count(&dp, Hook::UplinkIngress, Counter::VxlanDecap), 0);
}

/// An ARP request from the local container for `target`.
fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&LOCAL.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target.octets());
    ethernet([0xff; 6], MAC_A, ETH_P_ARP, &arp)
}

#[test]
fn arp_is_answered_in_place_and_nothing_is_flooded() {
    if !privileged() {
        return;
    }
    let mut dp = overlay_dataplane();
    for (target, mac) in [(GATEWAY, GW_MAC), (REMOTE, MAC_B), (LOCAL, MAC_A)] {
        let out = dp
            .test_run(Hook::ContainerEgress, &arp_request(target), 1)
            .unwrap();
        if target == LOCAL {
            // Its own address (a probe): nobody to tell.
            assert_eq!(out.action, SHOT);
            continue;
        }
        assert_eq!(out.action, REDIRECT, "{target}");
        let reply = &out.frame[14..];
        assert_eq!(&out.frame[..6], &MAC_A, "to the asker");
        assert_eq!(&reply[6..8], &[0, 2], "an ARP reply");
        assert_eq!(&reply[8..14], &mac, "{target}'s MAC");
        assert_eq!(&reply[14..18], &target.octets());
        assert_eq!(&reply[24..28], &LOCAL.octets());
    }
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::ArpReply), 2);
    // Nobody holds it: dropped, not flooded.
    let out = dp
        .test_run(
            Hook::ContainerEgress,
            &arp_request(Ipv4Addr::new(198, 19, 50, 77)),
            1,
        )
        .unwrap();
    assert_eq!(out.action, SHOT);
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::NoEndpoint), 1);
    // Broadcast IPv4 from the container: dropped and counted.
    let bcast = ethernet(
        [0xff; 6],
        MAC_A,
        ETH_P_IP,
        &ipv4(
            LOCAL,
            Ipv4Addr::new(198, 19, 50, 255),
            PROTO_ICMP,
            &icmp_echo(8, 1, 1, b""),
        ),
    );
    assert_eq!(
        dp.test_run(Hook::ContainerEgress, &bcast, 1)
            .unwrap()
            .action,
        SHOT
    );
    assert!(count(&dp, Hook::ContainerEgress, Counter::Broadcast) >= 2);
}
