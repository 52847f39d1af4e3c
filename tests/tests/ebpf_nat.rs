//! Published-port DNAT and its reverse, run in the kernel on crafted frames.
use std::net::Ipv4Addr;

use netd::dataplane::{Dataplane, LoadOptions};
use netd_common::{nat::CT_REWRITE_SRC, Counter, Hook, PortKey, PortTarget};
use netd_tests::{
    ebpf::{count, publish, tuple},
    packet::*,
    privileged,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 100);
const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const CONTAINER: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
const PASS: i32 = -1;

#[test]
fn tcp_published_port_is_translated_both_ways_with_valid_checksums() {
    if !privileged() {
        return;
    }
    let mut dp = Dataplane::load_unpinned(&LoadOptions::default()).unwrap();
    publish(&mut dp, HOST, 8080, PROTO_TCP, CONTAINER, 80);

    let syn = tcp4_frame((CLIENT, 40000), (HOST, 8080), TCP_SYN, b"");
    let out = dp.test_run(Hook::UplinkIngress, &syn, 1).unwrap();
    assert_eq!(out.action, PASS);
    assert_eq!(tuple(&out.frame), (CLIENT, CONTAINER, 40000, 80));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
    assert_eq!(count(&dp, Hook::UplinkIngress, Counter::Dnat), 1);

    // Both directions of the flow are recorded.
    let flows = dp.nat_flows().unwrap();
    assert_eq!(flows.len(), 2, "{flows:?}");
    assert!(flows.iter().any(|(k, e)| e.rewrite == CT_REWRITE_SRC
        && k.src_addr == CONTAINER.octets()
        && e.addr == HOST.octets()
        && e.port == 8080u16.to_be_bytes()));

    // The container's SYN-ACK leaves by the uplink with the published source.
    let synack = tcp4_frame((CONTAINER, 80), (CLIENT, 40000), TCP_SYN | TCP_ACK, b"");
    let out = dp.test_run(Hook::UplinkEgress, &synack, 1).unwrap();
    assert_eq!(out.action, PASS);
    assert_eq!(tuple(&out.frame), (HOST, CLIENT, 8080, 40000));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
    assert_eq!(count(&dp, Hook::UplinkEgress, Counter::RevDnat), 1);

    // A data packet with payload follows the recorded flow even after the
    // port is withdrawn (existing flows keep working).
    dp.remove_port(&PortKey {
        addr: HOST.octets(),
        port: 8080u16.to_be_bytes(),
        proto: PROTO_TCP,
        _pad: 0,
    })
    .unwrap();
    let data = tcp4_frame(
        (CLIENT, 40000),
        (HOST, 8080),
        TCP_ACK | TCP_PSH,
        b"GET / HTTP/1.0\r\n\r\n",
    );
    let out = dp.test_run(Hook::UplinkIngress, &data, 1).unwrap();
    assert_eq!(tuple(&out.frame), (CLIENT, CONTAINER, 40000, 80));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
    // … but a new flow to the withdrawn port is not translated.
    let other = tcp4_frame((CLIENT, 40001), (HOST, 8080), TCP_SYN, b"");
    let out = dp.test_run(Hook::UplinkIngress, &other, 1).unwrap();
    assert_eq!(out.frame, other);
}

#[test]
fn udp_is_translated_and_a_zero_checksum_stays_zero() {
    if !privileged() {
        return;
    }
    let mut dp = Dataplane::load_unpinned(&LoadOptions::default()).unwrap();
    publish(&mut dp, HOST, 5353, PROTO_UDP, CONTAINER, 53);

    let q = udp4_frame((CLIENT, 33333), (HOST, 5353), b"query");
    let out = dp.test_run(Hook::UplinkIngress, &q, 1).unwrap();
    assert_eq!(tuple(&out.frame), (CLIENT, CONTAINER, 33333, 53));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));

    let mut no_csum = udp4_frame((CLIENT, 33334), (HOST, 5353), b"query");
    no_csum[14 + 20 + 6] = 0;
    no_csum[14 + 20 + 7] = 0;
    let out = dp.test_run(Hook::UplinkIngress, &no_csum, 1).unwrap();
    assert_eq!(tuple(&out.frame), (CLIENT, CONTAINER, 33334, 53));
    assert_eq!(&out.frame[40..42], &[0, 0], "UDP 'no checksum' must stay 0");
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));

    let reply = udp4_frame((CONTAINER, 53), (CLIENT, 33333), b"answer");
    let out = dp.test_run(Hook::UplinkEgress, &reply, 1).unwrap();
    assert_eq!(tuple(&out.frame), (HOST, CLIENT, 5353, 33333));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
}

#[test]
fn other_ports_protocols_and_truncated_l4_are_untouched() {
    if !privileged() {
        return;
    }
    let mut dp = Dataplane::load_unpinned(&LoadOptions::default()).unwrap();
    publish(&mut dp, HOST, 8080, PROTO_TCP, CONTAINER, 80);
    // Same port, other protocol; same protocol, other port; other host IP.
    for f in [
        udp4_frame((CLIENT, 1), (HOST, 8080), b"x"),
        tcp4_frame((CLIENT, 1), (HOST, 8081), TCP_SYN, b""),
        tcp4_frame(
            (CLIENT, 1),
            (Ipv4Addr::new(198, 18, 1, 2), 8080),
            TCP_SYN,
            b"",
        ),
    ] {
        let out = dp.test_run(Hook::UplinkIngress, &f, 1).unwrap();
        assert_eq!(out.frame, f);
    }
    // A TCP header cut short: passed untouched, counted as truncated.
    let full = tcp4_frame((CLIENT, 1), (HOST, 8080), TCP_SYN, b"");
    let cut = &full[..14 + 20 + 10];
    let mut cut = cut.to_vec();
    cut[16..18].copy_from_slice(&30u16.to_be_bytes());
    let before = count(&dp, Hook::UplinkIngress, Counter::Truncated);
    let out = dp.test_run(Hook::UplinkIngress, &cut, 1).unwrap();
    assert_eq!(out.frame, cut);
    assert_eq!(
        count(&dp, Hook::UplinkIngress, Counter::Truncated),
        before + 1
    );
    assert_eq!(dp.nat_flows().unwrap().len(), 0);
}

#[test]
fn a_new_syn_on_a_reused_tuple_takes_the_current_mapping() {
    if !privileged() {
        return;
    }
    let mut dp = Dataplane::load_unpinned(&LoadOptions::default()).unwrap();
    publish(&mut dp, HOST, 8080, PROTO_TCP, CONTAINER, 80);
    let syn = tcp4_frame((CLIENT, 40000), (HOST, 8080), TCP_SYN, b"");
    assert_eq!(
        tuple(&dp.test_run(Hook::UplinkIngress, &syn, 1).unwrap().frame).1,
        CONTAINER
    );

    // The container is replaced (new address); the client reuses its port.
    let moved = Ipv4Addr::new(198, 19, 1, 9);
    publish(&mut dp, HOST, 8080, PROTO_TCP, moved, 80);
    // Mid-flow packets of the old connection keep the old translation…
    let ack = tcp4_frame((CLIENT, 40000), (HOST, 8080), TCP_ACK, b"");
    assert_eq!(
        tuple(&dp.test_run(Hook::UplinkIngress, &ack, 1).unwrap().frame).1,
        CONTAINER
    );
    // … a new SYN on the same tuple goes to the new container, and its
    // replies are recognised.
    let out = dp.test_run(Hook::UplinkIngress, &syn, 1).unwrap();
    assert_eq!(tuple(&out.frame), (CLIENT, moved, 40000, 80));
    let synack = tcp4_frame((moved, 80), (CLIENT, 40000), TCP_SYN | TCP_ACK, b"");
    let out = dp.test_run(Hook::UplinkEgress, &synack, 1).unwrap();
    assert_eq!(tuple(&out.frame), (HOST, CLIENT, 8080, 40000));
}

#[test]
fn loopback_publishes_are_never_reachable_by_packets() {
    if !privileged() {
        return;
    }
    let mut dp = Dataplane::load_unpinned(&LoadOptions::default()).unwrap();
    dp.set_port(
        PortKey {
            addr: [127, 0, 0, 1],
            port: 8080u16.to_be_bytes(),
            proto: PROTO_TCP,
            _pad: 0,
        },
        PortTarget {
            addr: CONTAINER.octets(),
            port: 80u16.to_be_bytes(),
            _pad: [0; 2],
        },
    )
    .unwrap();
    // A LAN host sending to 127.0.0.1 with the host's MAC: not translated.
    let forged = tcp4_frame((CLIENT, 40000), (Ipv4Addr::LOCALHOST, 8080), TCP_SYN, b"");
    assert_eq!(
        dp.test_run(Hook::UplinkIngress, &forged, 1).unwrap().frame,
        forged
    );
}

#[test]
fn a_translated_packet_for_a_known_container_is_delivered_directly() {
    if !privileged() {
        return;
    }
    let mut dp = Dataplane::load_unpinned(&LoadOptions::default()).unwrap();
    publish(&mut dp, HOST, 8080, PROTO_TCP, CONTAINER, 80);
    let container_mac = [0x02, 0x42, 0xc6, 0x13, 0x01, 0x02];
    dp.set_endpoint_location(
        CONTAINER,
        netd_common::EndpointLocation {
            ifindex: 1,
            mac: container_mac,
            _pad: [0; 2],
        },
    )
    .unwrap();
    let syn = tcp4_frame((CLIENT, 40000), (HOST, 8080), TCP_SYN, b"");
    let out = dp.test_run(Hook::UplinkIngress, &syn, 1).unwrap();
    const TC_ACT_REDIRECT: i32 = 7;
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(
        &out.frame[0..6],
        &container_mac,
        "destination MAC is the container's"
    );
    assert_eq!(out.frame[14 + 8], 63, "TTL decremented as a router would");
    assert_eq!(tuple(&out.frame), (CLIENT, CONTAINER, 40000, 80));
    assert_eq!(verify_ipv4_frame(&out.frame), Ok(()));
    assert_eq!(count(&dp, Hook::UplinkIngress, Counter::Redirect), 1);
    // A packet whose TTL would expire is left to the kernel (time exceeded).
    let mut dying = tcp4_frame((CLIENT, 40001), (HOST, 8080), TCP_SYN, b"");
    dying[14 + 8] = 1;
    fix_ip_checksum(&mut dying);
    assert_eq!(
        dp.test_run(Hook::UplinkIngress, &dying, 1).unwrap().action,
        -1
    );
}

/// Recomputes the IPv4 header checksum of a frame after editing it.
fn fix_ip_checksum(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}
