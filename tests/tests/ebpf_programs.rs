//! The eBPF programs run in the kernel on crafted frames (BPF_PROG_TEST_RUN).
use std::net::{Ipv4Addr, Ipv6Addr};

use netd::dataplane::{Dataplane, LoadOptions};
use netd_common::{Counter, Hook};
use netd_tests::{ebpf::count, packet::*, privileged};
use rand::{Rng as _, SeedableRng as _};

/// TC_ACT_UNSPEC: "not ours", the next program or the kernel decides.
const PASS: i32 = -1;
/// TC_ACT_SHOT.
const SHOT: i32 = 2;

fn load() -> Dataplane {
    Dataplane::load_unpinned(&LoadOptions::default()).expect("loading the eBPF programs")
}

const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);

/// Runs `frame` through every hook: it must come back untouched with the
/// pass verdict and `reason` counted once per hook. On a container's veth
/// with no endpoint registered (the test device's) it is dropped instead,
/// as from an unknown endpoint, also untouched.
fn assert_passed_with(dp: &mut Dataplane, frame: &[u8], reason: Counter) {
    for hook in Hook::PACKET {
        let (reason, verdict, action) = match hook {
            Hook::ContainerEgress => (Counter::UnknownEndpoint, Counter::Drop, SHOT),
            // A parent's programs look at MACs and tags only.
            Hook::ParentIngress | Hook::ParentEgress if reason != Counter::VlanTagged => {
                (Counter::NoMatch, Counter::Pass, PASS)
            }
            _ => (reason, Counter::Pass, PASS),
        };
        let before = (count(dp, hook, reason), count(dp, hook, verdict));
        let out = dp.test_run(hook, frame, 1).unwrap();
        assert_eq!(out.action, action, "{hook:?} {reason:?}");
        assert_eq!(out.frame, frame, "{hook:?} rewrote a frame it passes");
        assert_eq!(
            count(dp, hook, reason),
            before.0 + 1,
            "{hook:?} {reason:?} not counted"
        );
        assert_eq!(
            count(dp, hook, verdict),
            before.1 + 1,
            "{hook:?} verdict not counted"
        );
    }
}

#[test]
fn ip_traffic_without_rules_is_passed_as_no_match() {
    if !privileged() {
        return;
    }
    let mut dp = load();
    assert_passed_with(
        &mut dp,
        &tcp4_frame((A, 40000), (B, 80), TCP_SYN, b""),
        Counter::NoMatch,
    );
    assert_passed_with(
        &mut dp,
        &udp4_frame((A, 5353), (B, 53), b"query"),
        Counter::NoMatch,
    );
    let v6 = ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, PROTO_UDP, &[0; 8]);
    assert_passed_with(
        &mut dp,
        &ethernet(MAC_B, MAC_A, ETH_P_IPV6, &v6),
        Counter::NoMatch,
    );
}

#[test]
fn non_ip_vlan_and_fragments_are_passed_with_their_reason() {
    if !privileged() {
        return;
    }
    let mut dp = load();
    assert_passed_with(
        &mut dp,
        &ethernet(MAC_B, MAC_A, ETH_P_ARP, &[0; 28]),
        Counter::NotIp,
    );
    let inner = ipv4(A, B, PROTO_UDP, &[0; 8]);
    let mut tagged = vec![0, 100];
    tagged.extend_from_slice(&ETH_P_IP.to_be_bytes());
    tagged.extend_from_slice(&inner);
    assert_passed_with(
        &mut dp,
        &ethernet(MAC_B, MAC_A, ETH_P_8021Q, &tagged),
        Counter::VlanTagged,
    );
    // Offset 185 * 8 bytes: a later fragment, no L4 header inside.
    let frag = ipv4_with(A, B, PROTO_UDP, &[0xab; 16], &[], 185);
    assert_passed_with(
        &mut dp,
        &ethernet(MAC_B, MAC_A, ETH_P_IP, &frag),
        Counter::Fragment,
    );
}

#[test]
fn malformed_frames_are_passed_untouched_with_a_reason() {
    if !privileged() {
        return;
    }
    let mut dp = load();
    let good = tcp4_frame((A, 1), (B, 2), TCP_ACK, b"data");
    // (The kernel's test runner refuses IPv4 frames shorter than Ethernet +
    // a 20-byte IPv4 header, so truncation is tested past that point.)
    // IHL 15 (60-byte header) in a frame that holds less than that.
    let mut long_ihl = good[..14 + 40].to_vec();
    long_ihl[14] = 0x4f;
    long_ihl[16..18].copy_from_slice(&60u16.to_be_bytes());
    assert_passed_with(&mut dp, &long_ihl, Counter::Truncated);
    // IHL below 5, a version that is not 4, a total length below the header.
    for (offset, value) in [(14, 0x44u8), (14, 0x65), (17, 10)] {
        let mut bad = good.clone();
        bad[offset] = value;
        if offset == 17 {
            bad[16] = 0;
        }
        assert_passed_with(&mut dp, &bad, Counter::BadIpHeader);
    }
}

#[test]
fn randomized_malformed_frames_never_change_and_get_one_verdict() {
    if !privileged() {
        return;
    }
    let mut dp = load();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e65_7464);
    let seeds = [
        tcp4_frame((A, 1000), (B, 80), TCP_SYN | TCP_FIN | TCP_RST, b"xx"),
        udp4_frame((A, 1000), (B, 53), &[7; 40]),
        ethernet(
            MAC_B,
            MAC_A,
            ETH_P_IP,
            &ipv4_with(A, B, PROTO_TCP, &[0; 30], &[1, 1, 1, 0], 0),
        ),
    ];
    let runs = 3000u64;
    let before: u64 = Hook::ALL
        .iter()
        .map(|h| count(&dp, *h, Counter::Pass) + count(&dp, *h, Counter::Drop))
        .sum();
    for i in 0..runs {
        let mut f = seeds[(i % 3) as usize].clone();
        // Truncate somewhere, then flip a few random bytes.
        let len = rng.gen_range(34..=f.len());
        f.truncate(len);
        for _ in 0..rng.gen_range(1..6) {
            let at = rng.gen_range(0..f.len());
            f[at] = rng.gen();
        }
        let hook = Hook::ALL[(i % 3) as usize];
        let out = dp.test_run(hook, &f, 1).unwrap();
        assert!(
            out.action == PASS || out.action == 2,
            "run {i}: action {}",
            out.action
        );
        if out.action == PASS {
            assert_eq!(out.frame, f, "run {i}: a passed frame was rewritten");
        }
    }
    let after: u64 = Hook::ALL
        .iter()
        .map(|h| count(&dp, *h, Counter::Pass) + count(&dp, *h, Counter::Drop))
        .sum();
    assert_eq!(after - before, runs, "every frame gets exactly one verdict");
}
