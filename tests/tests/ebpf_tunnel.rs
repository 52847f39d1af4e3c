//! VXLAN decapsulation and ARP on overlay networks, run in the kernel with
//! BPF_PROG_TEST_RUN: a frame from a member host for a local container is
//! unwrapped; every other one is dropped with its reason, never delivered.
//! A smaller path to another host, reported by the underlay, is told to
//! the container as "fragmentation needed".
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
        ethernet, icmp_echo, icmp_error, ipv4, ipv4_with, udp, verify_ipv4_frame, Addrs, ETH_P_ARP,
        ETH_P_IP, MAC_A, MAC_B, PROTO_ICMP, PROTO_UDP,
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

/// A router between the hosts reports (ICMP "fragmentation needed", to
/// this host's VTEP) that a VXLAN packet to MEMBER did not fit `mtu`.
fn underlay_report(about: Ipv4Addr, mtu: u16) -> Vec<u8> {
    let vxlan_packet = ipv4_with(
        HOST,
        about,
        PROTO_UDP,
        &udp(Addrs::V4(HOST, about), 40000, 4789, &[0; 1472]),
        &[],
        0x4000,
    );
    let router = Ipv4Addr::new(198, 18, 0, 254);
    ethernet(
        MAC_A,
        MAC_B,
        ETH_P_IP,
        &ipv4(
            router,
            HOST,
            PROTO_ICMP,
            &icmp_error(3, 4, mtu, &vxlan_packet),
        ),
    )
}

/// A UDP datagram of `len` bytes from the local container to REMOTE, DF
/// set or not.
fn to_remote(len: usize, df: bool) -> Vec<u8> {
    let seg = udp(Addrs::V4(LOCAL, REMOTE), 5000, 6000, &vec![7; len]);
    let frags = if df { 0x4000 } else { 0 };
    ethernet(
        GW_MAC,
        MAC_A,
        ETH_P_IP,
        &ipv4_with(LOCAL, REMOTE, PROTO_UDP, &seg, &[], frags),
    )
}

#[test]
fn a_smaller_path_to_another_host_is_learned_and_told_to_the_container() {
    if !privileged() {
        return;
    }
    let mut dp = overlay_dataplane();
    // Reports about non-members are not believed; about members, noted and
    // passed on.
    let out = dp
        .test_run(Hook::UplinkIngress, &underlay_report(STRANGER, 1300), 1)
        .unwrap();
    assert_eq!(count(&dp, Hook::UplinkIngress, Counter::PmtuLearned), 0);
    assert_ne!(out.action, SHOT);
    // A "smaller" MTU that the quoted 1500-byte packet would have fit: not
    // a real report.
    dp.test_run(Hook::UplinkIngress, &underlay_report(MEMBER, 1500), 1)
        .unwrap();
    assert_eq!(count(&dp, Hook::UplinkIngress, Counter::PmtuLearned), 0);
    dp.test_run(Hook::UplinkIngress, &underlay_report(MEMBER, 1300), 1)
        .unwrap();
    assert_eq!(count(&dp, Hook::UplinkIngress, Counter::PmtuLearned), 1);
    // A later, larger report does not grow the path back while it holds.
    dp.test_run(Hook::UplinkIngress, &underlay_report(MEMBER, 1400), 1)
        .unwrap();

    // 1300 - 50 = 1250 bytes of container packet fit; one more does not.
    let big = to_remote(1250 - 28 + 1, true);
    let out = dp.test_run(Hook::ContainerEgress, &big, 1).unwrap();
    assert_eq!(out.action, REDIRECT);
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::FragNeeded), 1);
    let reply = &out.frame;
    verify_ipv4_frame(reply).unwrap();
    assert_eq!(&reply[..6], &MAC_A, "back to the container");
    assert_eq!(&reply[6..12], &MAC_B, "from the peer it was for");
    assert_eq!(&reply[26..30], &REMOTE.octets());
    assert_eq!(&reply[30..34], &LOCAL.octets());
    let icmp = &reply[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1250);
    assert_eq!(
        &icmp[8..48],
        &big[14..54],
        "the offending header and 20 bytes"
    );
    assert_eq!(reply.len(), 14 + 20 + 8 + 40);

    // A report of a tiny path is taken as 576 + 50: a container is never
    // told less than 576.
    dp.test_run(Hook::UplinkIngress, &underlay_report(MEMBER, 300), 1)
        .unwrap();
    let out = dp
        .test_run(Hook::ContainerEgress, &to_remote(1000, true), 1)
        .unwrap();
    assert_eq!(out.action, REDIRECT);
    assert_eq!(u16::from_be_bytes([out.frame[40], out.frame[41]]), 576);

    // Without DF: nothing to tell, and netd cannot fragment: dropped.
    let out = dp
        .test_run(Hook::ContainerEgress, &to_remote(1250 - 28 + 1, false), 1)
        .unwrap();
    assert_eq!(out.action, SHOT);
    assert_eq!(count(&dp, Hook::ContainerEgress, Counter::TooBig), 1);
}
