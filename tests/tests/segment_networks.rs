//! Segment (macvlan) networks: containers with MACs of their own on the
//! hosts' LAN, demultiplexed in eBPF on the parent (no macvlan device, no
//! bridge). Two Docker hosts and a plain LAN machine (standing in for the
//! LAN's router at .254 and for any machine there) on one emulated LAN,
//! with a real etcd.
use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use netd_tests::{etcd::Etcd, eventually, netd::counter, privileged, Bench, Host, NetNs};

/// The macvlan network's subnet on the LAN, beside the hosts' own.
const SUBNET: &str = "198.18.90.0/24";
const ROUTER: &str = "198.18.90.254";

fn cluster_host(bench: &Bench, lan: &netd_tests::Lan, etcd: &Etcd, name: &str, ip: u8) -> Host {
    Host::cluster_member(bench, lan, name, ip, &etcd.endpoint(), &[]).unwrap()
}

fn add_address(ns: &NetNs, cidr: &str) {
    ns.run_ok("ip", &["addr", "add", cidr, "dev", "eth0"])
        .unwrap();
}

fn ping(ns: &NetNs, addr: &str) -> bool {
    ns.run("busybox", &["ping", "-c", "1", "-W", "2", addr])
        .is_ok_and(|o| o.status.success())
}

/// Port the broadcast checks listen on.
const BROADCAST_PORT: u16 = 9999;

/// A UDP socket on [`BROADCAST_PORT`] in container `name`'s namespace.
fn listener_in(host: &Host, name: &str) -> UdpSocket {
    let ns = NetNs::open(&host.dockerd().netns_of(name).unwrap()).unwrap();
    ns.enter(|| Ok(UdpSocket::bind(("0.0.0.0", BROADCAST_PORT))?))
        .unwrap()
}

/// A socket in `ns` allowed to send broadcasts.
fn broadcaster(ns: &NetNs) -> UdpSocket {
    ns.enter(|| {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_broadcast(true)?;
        Ok(s)
    })
    .unwrap()
}

/// The datagrams `socket` receives within `within` (all of them, until
/// the time is up).
fn heard(socket: &UdpSocket, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    got
}

fn ping_from(host: &Host, container: &str, addr: &str) -> bool {
    host.dockerd()
        .exec(container, &["ping", "-c", "1", "-W", "2", addr])
        .is_ok()
}

#[test]
fn macvlan_containers_are_on_the_lan_and_reach_their_host() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(26).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let mut a = cluster_host(&bench, &lan, &etcd, "a", 1);
    let b = cluster_host(&bench, &lan, &etcd, "b", 2);
    let machine = Host::plain(&bench, &lan, "lanbox", 3).unwrap();
    // The LAN's router for the subnet, and the hosts' own addresses in it
    // (outside the containers' --ip-range).
    add_address(&machine.ns, &format!("{ROUTER}/24"));
    add_address(&a.ns, "198.18.90.201/24");
    add_address(&b.ns, "198.18.90.202/24");
    let web = machine.serve_http().unwrap();

    a.create_netd_network(
        "lan",
        SUBNET,
        &[
            "-o",
            "netd.mode=macvlan",
            "-o",
            "parent=eth0",
            "--gateway",
            ROUTER,
            "--ip-range",
            "198.18.90.0/25",
        ],
    )
    .unwrap();
    assert!(
        b.sees_netd_networks(&["lan"], Duration::from_secs(5)),
        "the network did not reach host b"
    );
    let range = b
        .dockerd()
        .docker(&[
            "network",
            "inspect",
            "lan",
            "--format",
            "{{range .IPAM.Config}}{{.IPRange}} {{.Gateway}}{{end}} {{index .Options \"parent\"}}",
        ])
        .unwrap();
    assert_eq!(range.trim(), "198.18.90.0/25 198.18.90.254 eth0");

    a.dockerd().run_echo("c-a", &["--network", "lan"]).unwrap();
    b.dockerd()
        .run("c-b", &["--network", "lan"], &["sleep", "600"])
        .unwrap();
    let (addr_a, addr_b) = (
        a.container_addr("c-a").unwrap(),
        b.container_addr("c-b").unwrap(),
    );
    assert_eq!(
        (addr_a, addr_b),
        (Ipv4Addr::new(198, 18, 90, 1), Ipv4Addr::new(198, 18, 90, 2))
    );
    let (ip_a, ip_b) = (addr_a.to_string(), addr_b.to_string());
    let mtu = a
        .dockerd()
        .exec("c-a", &["cat", "/sys/class/net/eth0/mtu"])
        .unwrap();
    assert_eq!(mtu.trim(), "1500", "the parent's MTU, no encapsulation");

    // A LAN machine that has never heard of the container finds it by ARP,
    // at a MAC of the container's own.
    machine.ns.run_ok("ip", &["neigh", "flush", "all"]).unwrap();
    assert_eq!(machine.ns.neighbour_mac(&ip_a), None);
    assert!(ping(&machine.ns, &ip_a), "the LAN machine cannot reach c-a");
    assert_eq!(
        machine.ns.neighbour_mac(&ip_a).as_deref(),
        Some("02:4e:c6:12:5a:01")
    );

    // The container reaches the LAN directly, with its own address.
    let seen = a
        .dockerd()
        .http_get_from("c-a", &format!("http://{ROUTER}/cgi-bin/peer"))
        .unwrap();
    // busybox httpd reports an IPv4-mapped IPv6 address.
    assert_eq!(
        seen.trim(),
        format!("[::ffff:{ip_a}]"),
        "no NAT on the way out"
    );

    // Across hosts, through the LAN's switch: no encapsulation.
    assert!(ping_from(&b, "c-b", &ip_a), "c-b cannot reach c-a");
    assert!(ping_from(&a, "c-a", &ip_b), "c-a cannot reach c-b");

    // The host and its own container reach each other (kernel macvlan
    // cannot), both ways.
    assert!(ping(&a.ns, &ip_a), "host a cannot reach its container");
    assert!(
        ping_from(&a, "c-a", "198.18.90.201"),
        "c-a cannot reach its host"
    );
    assert!(ping(&b.ns, &ip_a), "host b cannot reach a's container");

    // The LAN's broadcasts, the host's own and a container's reach the
    // containers, as a switch floods them: each once (a container's own
    // comes back to it only by its loopback).
    a.dockerd()
        .run("c-a2", &["--network", "lan"], &["sleep", "600"])
        .unwrap();
    let ears = [
        ("c-a", listener_in(&a, "c-a")),
        ("c-a2", listener_in(&a, "c-a2")),
        ("c-b", listener_in(&b, "c-b")),
    ];
    let to_all = ("198.18.90.255", BROADCAST_PORT);
    broadcaster(&machine.ns).send_to(b"lan", to_all).unwrap();
    broadcaster(&a.ns).send_to(b"host-a", to_all).unwrap();
    let c_a_ns = NetNs::open(&a.dockerd().netns_of("c-a").unwrap()).unwrap();
    broadcaster(&c_a_ns).send_to(b"c-a", to_all).unwrap();
    for (name, socket) in &ears {
        let mut got = heard(socket, Duration::from_secs(2));
        got.sort();
        assert_eq!(got, ["c-a", "host-a", "lan"], "{name}");
    }

    // No macvlan device anywhere.
    let links = a.ns.run_ok("ip", &["-d", "link", "show"]).unwrap();
    assert!(!links.contains("macvlan"), "{links}");

    let status = a.netd().status().unwrap();
    for (hook, name) in [
        ("parent-ingress", "demuxed"),
        ("parent-ingress", "flooded"),
        ("parent-egress", "demuxed"),
        ("parent-egress", "flooded"),
        ("container-egress", "segment-out"),
        ("container-egress", "to-host"),
    ] {
        assert!(counter(&status, hook, name) > 0, "{hook} {name}: {status}");
    }

    let segments = &status["segments"];
    assert_eq!(segments[0]["parent"], "eth0", "{segments}");
    assert_eq!(segments[0]["containers"], 2, "{segments}");
    // A veth has no unicast address filter: the kernel fell back to
    // promiscuous mode when netd added the container's MAC.
    assert_eq!(segments[0]["accepts"], "promiscuous mode", "{segments}");

    // A session from the LAN lives through a restart of netd.
    let mut session = machine.tcp_session(addr_a, 7).unwrap();
    assert_eq!(
        session.echo("before", Duration::from_secs(5)).unwrap(),
        "before"
    );
    a.netd().restart().unwrap();
    assert_eq!(
        session.echo("after", Duration::from_secs(5)).unwrap(),
        "after"
    );
    drop(session);

    // The container's MAC is in eth0's unicast address list; a container
    // removed while netd is down has its MAC taken out once netd is back.
    let mac = "02:4e:c6:12:5a:01";
    let listed = |h: &Host| {
        h.ns.run_ok("bridge", &["fdb", "show", "dev", "eth0"])
            .is_ok_and(|fdb| fdb.contains(mac))
    };
    assert!(listed(&a), "{mac} not in eth0's address list");
    a.netd().stop();
    let _ = a.dockerd().docker(&["rm", "-f", "c-a"]);
    a.netd().start_again().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !listed(&a)),
        "{mac} stayed in eth0's address list"
    );
    // Docker moved the container's end of the veth back to the host: netd
    // takes that for a Leave, deletes the pair and gives the address back.
    let links = a.ns.run_ok("ip", &["-o", "link"]).unwrap();
    assert!(!links.contains("02:4e:c6:12:5a:01"), "{links}");
    let claims = || {
        etcd.ctl(&["get", "--prefix", "--keys-only", "/netd/v1/addrs/"])
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(20), || !claims()
            .contains("/198.18.90.1\n")),
        "{}",
        claims()
    );
    drop(web);
}

#[test]
fn a_macvlan_network_is_refused_with_its_reason() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(27).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = cluster_host(&bench, &lan, &etcd, "a", 1);
    let refused = |subnet: &str, opts: &[&str]| {
        let mut extra = vec!["-o", "netd.mode=macvlan"];
        extra.extend_from_slice(opts);
        format!(
            "{:#}",
            a.create_netd_network("bad", subnet, &extra)
                .expect_err("the network must be refused")
        )
    };
    let err = refused("198.18.90.0/24", &["-o", "parent=eth9"]);
    assert!(
        err.contains("parent interface eth9 does not exist on host a"),
        "{err}"
    );
    let err = refused("198.18.90.0/24", &["-o", "parent=eth0.4095"]);
    assert!(err.contains("VLAN id \"4095\" is not in 1-4094"), "{err}");
    let err = refused("198.18.90.0/24", &[]);
    assert!(err.contains("needs -o parent"), "{err}");
    a.create_netd_network(
        "lan",
        "198.18.90.0/24",
        &["-o", "netd.mode=macvlan", "-o", "parent=eth0"],
    )
    .unwrap();
    let err = refused("198.18.90.0/25", &["-o", "parent=eth0"]);
    // (Named "lan" once the mirror has seen Docker list it.)
    assert!(
        err.contains("overlaps network") && err.contains("(198.18.90.0/24)"),
        "{err}"
    );
}

/// An ARP packet for IPv4 over Ethernet (`op` 1 request, 2 reply).
fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4];
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa.octets());
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tpa.octets());
    p
}

#[test]
fn vlans_are_tagged_on_the_wire_and_isolated() {
    if !privileged() {
        return;
    }
    use netd_tests::{
        packet::{ethernet, icmp_echo, ipv4},
        raw::{tagged, RawSocket},
    };
    let bench = Bench::new().unwrap();
    let lan = bench.lan(28).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = cluster_host(&bench, &lan, &etcd, "a", 1);
    let b = cluster_host(&bench, &lan, &etcd, "b", 2);
    let machine = Host::plain(&bench, &lan, "lanbox", 3).unwrap();
    for (name, subnet, vid) in [
        ("v100", "198.18.91.0/24", 100),
        ("v200", "198.18.92.0/24", 200),
    ] {
        let parent = format!("parent=eth0.{vid}");
        a.create_netd_network(name, subnet, &["-o", "netd.mode=macvlan", "-o", &parent])
            .unwrap();
    }
    assert!(b.sees_netd_networks(&["v100", "v200"], Duration::from_secs(5)));
    let run = |h: &Host, name: &str, net: &str| {
        h.dockerd()
            .run(
                name,
                &["--network", net, "--cap-add", "NET_ADMIN"],
                &["sleep", "600"],
            )
            .unwrap();
        h.container_addr(name).unwrap()
    };
    let a100 = run(&a, "a100", "v100");
    run(&a, "a100b", "v100");
    let a200 = run(&a, "a200", "v200");
    let b100 = run(&b, "b100", "v100");
    let b200 = run(&b, "b200", "v200");

    // The same VLAN talks, across hosts and on one.
    assert!(ping_from(&a, "a100", &b100.to_string()), "a100 -> b100");
    assert!(ping_from(&b, "b200", &a200.to_string()), "b200 -> a200");

    // Different VLANs don't, even when told the other subnet is on-link.
    a.dockerd()
        .exec(
            "a100",
            &["ip", "route", "add", "198.18.92.0/24", "dev", "eth0"],
        )
        .unwrap();
    assert!(
        !ping_from(&a, "a100", &b200.to_string()),
        "a100 reached b200"
    );
    assert!(
        !ping_from(&a, "a100", &a200.to_string()),
        "a100 reached a200"
    );

    // The test's own 802.1Q peer on the wire, at an address of VLAN 100's
    // subnet its kernel does not hold.
    let raw = RawSocket::open(&machine.ns, "eth0").unwrap();
    let peer_mac = machine.ns.mac_of("eth0").unwrap();
    let peer_ip = Ipv4Addr::new(198, 18, 91, 251);
    let request = ethernet(
        [0xff; 6],
        peer_mac,
        0x0806,
        &arp(1, peer_mac, peer_ip, [0; 6], a100),
    );
    // a100's reply to the peer: op 2, sender a100, target the peer.
    let is_arp_reply = |r: &netd_tests::raw::Received| {
        r.frame.len() >= 42
            && r.frame[12..14] == [8, 6]
            && r.frame[20..22] == [0, 2]
            && r.frame[28..32] == a100.octets()
            && r.frame[38..42] == peer_ip.octets()
    };
    raw.send(&tagged(&request, 100)).unwrap();
    let reply = raw
        .recv_until(Duration::from_secs(3), is_arp_reply)
        .expect("no ARP reply from a100 on VLAN 100");
    assert_eq!(
        reply.vlan,
        Some(100),
        "the reply left untagged or mis-tagged"
    );
    let a100_mac: [u8; 6] = reply.frame[22..28].try_into().unwrap();
    assert_eq!(&reply.frame[28..32], &a100.octets());
    // The same question on VLAN 200, or untagged, gets no answer.
    for frame in [tagged(&request, 200), request.clone()] {
        raw.send(&frame).unwrap();
        assert!(
            raw.recv_until(Duration::from_secs(1), is_arp_reply)
                .is_none(),
            "a100 answered outside VLAN 100"
        );
    }
    // An echo request tagged 100 is answered, tagged 100.
    let echo = ethernet(
        a100_mac,
        peer_mac,
        0x0800,
        &ipv4(peer_ip, a100, 1, &icmp_echo(8, 0x4242, 1, b"vlan")),
    );
    // a100's echo reply to the peer.
    let is_echo_reply = |r: &netd_tests::raw::Received| {
        r.frame.len() >= 42
            && r.frame[12..14] == [8, 0]
            && r.frame[23] == 1
            && r.frame[34] == 0
            && r.frame[26..30] == a100.octets()
            && r.frame[30..34] == peer_ip.octets()
    };
    raw.send(&tagged(&echo, 100)).unwrap();
    let reply = raw
        .recv_until(Duration::from_secs(3), is_echo_reply)
        .expect("no echo reply from a100");
    assert_eq!(reply.vlan, Some(100));
    raw.send(&tagged(&echo, 200)).unwrap();
    raw.send(&echo).unwrap();
    assert!(
        raw.recv_until(Duration::from_secs(1), is_echo_reply)
            .is_none(),
        "a100 answered an echo outside VLAN 100"
    );

    // Broadcasts stay in their VLAN: the peer's tagged 100 reaches VLAN
    // 100's containers on both hosts, its untagged one none; a container's
    // reaches its neighbour on the host, the other host's VLAN 100
    // container, and the wire tagged 100.
    let ears: Vec<(&str, UdpSocket)> = [
        (&a, "a100"),
        (&a, "a100b"),
        (&b, "b100"),
        (&a, "a200"),
        (&b, "b200"),
    ]
    .into_iter()
    .map(|(h, name)| (name, listener_in(h, name)))
    .collect();
    let broadcast = |payload: &[u8]| {
        let dst = (Ipv4Addr::BROADCAST, BROADCAST_PORT);
        let frame = netd_tests::packet::udp4_frame((peer_ip, 4000), dst, payload);
        // From the peer's MAC, to everyone.
        let mut frame = frame;
        frame[..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&peer_mac);
        frame
    };
    raw.send(&tagged(&broadcast(b"vlan100"), 100)).unwrap();
    raw.send(&broadcast(b"untagged")).unwrap();
    let a100_ns = NetNs::open(&a.dockerd().netns_of("a100").unwrap()).unwrap();
    broadcaster(&a100_ns)
        .send_to(b"from-a100", ("198.18.91.255", BROADCAST_PORT))
        .unwrap();
    let on_wire = raw
        .recv_until(Duration::from_secs(3), |r| {
            r.frame.len() >= 42 && r.frame[..6] == [0xff; 6] && r.frame.ends_with(b"from-a100")
        })
        .expect("a100's broadcast did not reach the wire");
    assert_eq!(on_wire.vlan, Some(100), "a100's broadcast left untagged");
    for (name, socket) in &ears {
        let got = heard(socket, Duration::from_secs(2));
        let wanted: &[&str] = match *name {
            "a100" => &["vlan100"],
            "a100b" | "b100" => &["vlan100", "from-a100"],
            _ => &[],
        };
        let mut sorted: Vec<&str> = got
            .iter()
            .map(String::as_str)
            .filter(|g| *g != "from-a100" || *name != "a100")
            .collect();
        sorted.sort();
        let mut wanted = wanted.to_vec();
        wanted.sort();
        assert_eq!(sorted, wanted, "{name} heard {got:?}");
    }

    // An untagged machine on the same wire with an address in the subnet
    // cannot reach the VLAN's containers.
    add_address(&machine.ns, "198.18.91.250/24");
    assert!(
        !ping(&machine.ns, &a100.to_string()),
        "untagged reached a100"
    );

    let status = a.netd.as_ref().unwrap().status().unwrap();
    for (hook, name) in [
        ("parent-ingress", "demuxed"),
        ("parent-ingress", "flooded"),
        ("container-egress", "flooded"),
    ] {
        assert!(counter(&status, hook, name) > 0, "{hook} {name}: {status}");
    }
}

#[test]
fn ipvlan_l2_containers_share_the_parents_mac() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(32).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = cluster_host(&bench, &lan, &etcd, "a", 1);
    let b = cluster_host(&bench, &lan, &etcd, "b", 2);
    let machine = Host::plain(&bench, &lan, "lanbox", 3).unwrap();
    add_address(&machine.ns, "198.18.96.254/24");
    let _web = machine.serve_http().unwrap();
    a.create_netd_network(
        "ipv",
        "198.18.96.0/24",
        &[
            "-o",
            "netd.mode=ipvlan",
            "-o",
            "parent=eth0",
            "--gateway",
            "198.18.96.254",
            "--ip-range",
            "198.18.96.0/25",
        ],
    )
    .unwrap();
    assert!(b.sees_netd_networks(&["ipv"], Duration::from_secs(5)));
    for (h, name) in [(&a, "i-a1"), (&a, "i-a2"), (&b, "i-b")] {
        h.dockerd()
            .run(name, &["--network", "ipv"], &["sleep", "600"])
            .unwrap();
    }
    let addr = |h: &Host, name: &str| h.container_addr(name).unwrap().to_string();
    let (a1, a2, ib) = (addr(&a, "i-a1"), addr(&a, "i-a2"), addr(&b, "i-b"));
    let a_mac = a.ns.mac_of("eth0").unwrap();
    let text = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    let inside = a
        .dockerd()
        .exec("i-a1", &["cat", "/sys/class/net/eth0/address"])
        .unwrap();
    assert_eq!(
        inside.trim(),
        text(a_mac),
        "the container has the parent's MAC"
    );

    // A LAN machine finds the container at its host's MAC.
    machine.ns.run_ok("ip", &["neigh", "flush", "all"]).unwrap();
    assert!(ping(&machine.ns, &a1), "the LAN machine cannot reach i-a1");
    assert_eq!(machine.ns.neighbour_mac(&a1), Some(text(a_mac)));
    // Neighbours on one host share the MAC and are told apart by address;
    // across hosts through the switch; out to the LAN with no NAT.
    assert!(ping_from(&a, "i-a1", &a2), "i-a1 cannot reach i-a2");
    assert!(ping_from(&b, "i-b", &a1), "i-b cannot reach i-a1");
    assert!(ping_from(&a, "i-a2", &ib), "i-a2 cannot reach i-b");
    let seen = a
        .dockerd()
        .http_get_from("i-a2", "http://198.18.96.254/cgi-bin/peer")
        .unwrap();
    assert_eq!(seen.trim(), format!("[::ffff:{a2}]"));
    let status = a.netd.as_ref().unwrap().status().unwrap();
    assert!(
        counter(&status, "parent-ingress", "demuxed") > 0,
        "{status}"
    );
    assert!(
        counter(&status, "container-egress", "switched") > 0,
        "{status}"
    );
}

#[test]
fn a_parent_created_again_gets_the_demux_back() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(34).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = Host::cluster_member(
        &bench,
        &lan,
        "a",
        1,
        &etcd.endpoint(),
        &["--resync-interval", "1"],
    )
    .unwrap();
    // A second interface as the parent (a veth: this kernel has no dummy
    // devices), then deleted and made again, as a replugged NIC or a
    // re-created bond comes back: the same name, another interface.
    let make_parent = || {
        a.ns.run_ok(
            "ip",
            &[
                "link", "add", "p0", "type", "veth", "peer", "name", "p0-peer",
            ],
        )
        .unwrap();
        a.ns.run_ok("ip", &["link", "set", "p0", "up"]).unwrap();
    };
    // Both parent programs attached to the interface p0 is now (netd
    // status asks the kernel's TCX lists).
    let demux_on_p0 = || {
        let Ok(status) = a.netd.as_ref().unwrap().status() else {
            return false;
        };
        let on_p0 = |hook: &str| {
            status["attachments"].as_array().is_some_and(|all| {
                all.iter()
                    .any(|x| x["hook"] == hook && x["interface"] == "p0" && x["attached"] == true)
            })
        };
        on_p0("parent-ingress") && on_p0("parent-egress")
    };
    make_parent();
    a.create_netd_network(
        "side",
        "198.18.97.0/24",
        &["-o", "netd.mode=macvlan", "-o", "parent=p0"],
    )
    .unwrap();
    a.dockerd()
        .run("c-side", &["--network", "side"], &["sleep", "600"])
        .unwrap();
    assert!(demux_on_p0(), "no demux on p0 after the Join");
    a.ns.run_ok("ip", &["link", "del", "p0"]).unwrap();
    make_parent();
    assert!(
        eventually(Duration::from_secs(10), demux_on_p0),
        "p0 created again has no demux"
    );
    let status = a.netd.as_ref().unwrap().status().unwrap();
    assert_eq!(status["segments"][0]["parent"], "p0", "{status}");

    // A host of an older release (its record lists no modes) registered
    // after the network was made: the log names it.
    etcd.ctl(&[
        "put",
        "/netd/v1/hosts/old",
        r#"{"node":"old","vtep":"198.18.34.99"}"#,
    ])
    .unwrap();
    let log = || std::fs::read_to_string(a.netd.as_ref().unwrap().log_path()).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(10), || log()
            .contains("host old runs a netd release without macvlan networks")),
        "{}",
        log()
    );
    etcd.ctl(&["del", "/netd/v1/hosts/old"]).unwrap();
}
