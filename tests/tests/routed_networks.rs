//! Routed networks (like flannel's host-gw, or the seeds' static routes
//! between per-host container subnets, without anybody writing a route): a
//! cluster network split into per-host blocks in etcd, hosts on one LAN
//! routing each other's blocks in eBPF with no encapsulation, egress to
//! the rest of the world masqueraded. A third host beyond a router is said
//! to be unreachable without encapsulation.
use std::time::Duration;

use netd_tests::{
    etcd::Etcd,
    eventually,
    netd::{counter, NetdOptions},
    privileged,
    topology::LineSession,
    Bench, DockerMode, Host, NetNs,
};

const SUBNET: &str = "198.19.128.0/17";

fn ping_from(host: &Host, container: &str, addr: &str) -> bool {
    host.dockerd()
        .exec(container, &["ping", "-c", "1", "-W", "2", addr])
        .is_ok()
}

fn blocks(etcd: &Etcd) -> String {
    etcd.ctl(&["get", "--prefix", "/netd/v1/blocks/"]).unwrap()
}

#[test]
fn hosts_route_each_others_blocks_without_encapsulation() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(29).unwrap();
    let far = bench.lan(30).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let router = Host::plain(&bench, &lan, "r", 254).unwrap();
    far.attach_as(&router.ns, 254, "eth1").unwrap();
    router.ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    etcd.ns
        .run_ok(
            "ip",
            &["route", "add", "198.18.30.0/24", "via", "198.18.29.254"],
        )
        .unwrap();
    let mut a = Host::cluster_member(&bench, &lan, "a", 1, &etcd.endpoint(), &[]).unwrap();
    let b = Host::cluster_member(&bench, &lan, "b", 2, &etcd.endpoint(), &[]).unwrap();
    a.route([198, 18, 30], lan.ip(254)).unwrap();
    let mut c = Host::docker(&bench, &far, "c", 3, [198, 19, 3], DockerMode::Netd).unwrap();
    c.route([198, 18, 29], far.ip(254)).unwrap();
    c.start_netd_with(
        &bench,
        NetdOptions {
            args: ["--etcd", &etcd.endpoint(), "--node-name", "c"]
                .map(String::from)
                .to_vec(),
            ..NetdOptions::default()
        },
    )
    .unwrap();
    let outside = Host::plain(&bench, &lan, "outside", 200).unwrap();
    let _web = outside.serve_http().unwrap();

    a.create_netd_network("cluster", SUBNET, &["-o", "netd.mode=routed"])
        .unwrap();
    assert!(b.sees_netd_networks(&["cluster"], Duration::from_secs(5)));
    assert!(c.sees_netd_networks(&["cluster"], Duration::from_secs(5)));
    a.dockerd()
        .run_echo("ca", &["--network", "cluster"])
        .unwrap();
    b.dockerd()
        .run("cb", &["--network", "cluster"], &["sleep", "600"])
        .unwrap();
    c.dockerd()
        .run("cc", &["--network", "cluster"], &["sleep", "600"])
        .unwrap();
    // Each host took a /24 of its own, and its containers' addresses come
    // from it (a's block holds the gateway, .1).
    let (ca, cb, cc) = (
        a.container_addr("ca").unwrap(),
        b.container_addr("cb").unwrap(),
        c.container_addr("cc").unwrap(),
    );
    let block_of = |addr: std::net::Ipv4Addr| addr.octets()[2];
    let mut taken = [block_of(ca), block_of(cb), block_of(cc)];
    taken.sort_unstable();
    assert_eq!(taken, [128, 129, 130], "{ca} {cb} {cc}\n{}", blocks(&etcd));
    assert_eq!(ca.octets()[3], 2, "the gateway is .1 of a's block");
    let mtu = a
        .dockerd()
        .exec("ca", &["cat", "/sys/class/net/eth0/mtu"])
        .unwrap();
    assert_eq!(mtu.trim(), "1500", "nothing is added to a routed packet");

    // Across hosts of one LAN: routed, both ways.
    assert!(ping_from(&b, "cb", &ca.to_string()), "cb cannot reach ca");
    let cb_ns = NetNs::open(&b.dockerd().netns_of("cb").unwrap()).unwrap();
    let mut session = LineSession::open(&cb_ns, ca, 7).unwrap();
    assert_eq!(session.echo("before").unwrap(), "before");
    // Nothing went through a tunnel; both ends routed.
    let status = a.netd().status().unwrap();
    assert!(
        counter(&status, "container-egress", "routed") > 0,
        "{status}"
    );
    assert!(counter(&status, "uplink-ingress", "routed") > 0, "{status}");
    assert_eq!(counter(&status, "container-egress", "vxlan-encap"), 0);
    // A packet whose TTL runs out at its host comes back as "time
    // exceeded" from the gateway: traceroute's first hop is the host.
    let ca_text = ca.to_string();
    let probe = [
        "traceroute",
        "-n",
        "-q",
        "1",
        "-w",
        "2",
        "-m",
        "1",
        &ca_text,
    ];
    let trace = b.dockerd().exec("cb", &probe).unwrap();
    assert!(trace.contains("1  198.19.128.1 "), "{trace}");
    // A probe shorter than the quote the error carries (a bare UDP
    // header) is answered too: a connected socket asking for ICMP errors
    // gets "host unreachable", which is how Linux reports time exceeded.
    let reported = cb_ns
        .enter(|| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            socket.set_ttl(1)?;
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv4RecvErr, &true)?;
            socket.connect((ca, 9))?;
            socket.send(b"")?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            Ok(socket
                .recv(&mut [0u8; 16])
                .err()
                .and_then(|e| e.raw_os_error()))
        })
        .unwrap();
    assert_eq!(
        reported,
        Some(libc::EHOSTUNREACH),
        "no time exceeded for a short probe"
    );
    let b_status = b.netd.as_ref().unwrap().status().unwrap();
    assert!(
        counter(&b_status, "container-egress", "time-exceeded") > 0,
        "{b_status}"
    );
    // The routes are netd's maps, not the kernel's tables.
    let routes = a.ns.run_ok("ip", &["route"]).unwrap();
    assert!(!routes.contains("198.19.129.0"), "{routes}");

    // Out of the cluster network: masqueraded, as from a bridge.
    let seen = b
        .dockerd()
        .http_get_from("cb", &format!("http://{}/cgi-bin/peer", outside.ip))
        .unwrap();
    assert_eq!(seen.trim(), format!("[::ffff:{}]", b.ip));
    // The outside cannot reach a routed container unsolicited, even with
    // a route to it.
    outside.route([198, 19, ca.octets()[2]], a.ip).unwrap();
    assert!(
        outside
            .ns
            .run("busybox", &["ping", "-c", "1", "-W", "1", &ca.to_string()])
            .is_ok_and(|o| !o.status.success()),
        "reached a routed container from outside"
    );

    // A LAN machine forging a source in b's block is not let in: the
    // packet does not come from b's MAC.
    {
        use netd_tests::{
            packet::{ethernet, icmp_echo, ipv4},
            raw::RawSocket,
        };
        let raw = RawSocket::open(&outside.ns, "eth0").unwrap();
        let (a_mac, out_mac) = (
            a.ns.mac_of("eth0").unwrap(),
            outside.ns.mac_of("eth0").unwrap(),
        );
        let spoofed =
            |h: &mut Host| counter(&h.netd().status().unwrap(), "uplink-ingress", "spoofed");
        let before = spoofed(&mut a);
        let forged = ethernet(
            a_mac,
            out_mac,
            0x0800,
            &ipv4(cb, ca, 1, &icmp_echo(8, 7, 1, b"forged")),
        );
        raw.send(&forged).unwrap();
        assert!(
            eventually(Duration::from_secs(2), || spoofed(&mut a) > before),
            "a forged source in b's block was let in"
        );
    }

    // c is beyond a router: its block is not routed, and status says why.
    assert!(!ping_from(&a, "ca", &cc.to_string()), "reached c's block");
    let status = a.netd().status().unwrap();
    let hosts = &status["hosts"];
    let place = |addr: &str| {
        hosts
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h["address"] == addr)
            .map(|h| h["reach"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(
        place("198.18.29.2").as_deref(),
        Some("on this LAN"),
        "{hosts}"
    );
    assert_eq!(
        place("198.18.30.3").as_deref(),
        Some("not on this LAN: routed networks cannot reach it without encapsulation"),
        "{hosts}"
    );
    let log = std::fs::read_to_string(a.netd.as_ref().unwrap().log_path()).unwrap();
    assert!(
        log.contains("host c is not on this LAN")
            && log.contains("unreachable without encapsulation"),
        "{log}"
    );

    // The session lives through a restart of netd at its server's end.
    a.netd().restart().unwrap();
    assert_eq!(session.echo("after").unwrap(), "after");

    // b leaves the cluster: its block is no longer routed anywhere.
    let b_block = format!("198.19.{}.0", block_of(cb));
    let forget = |node: &str| {
        let endpoint = etcd.endpoint();
        let out = a
            .netd
            .as_ref()
            .unwrap()
            .cli(&["forget-host", node, "--etcd", &endpoint])
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (done, _, err) = forget("b");
    assert!(
        !done && err.contains("host b is in the cluster"),
        "forgot a live host: {err}"
    );
    drop(b);
    let peers = || {
        let netd = a.netd.as_ref().unwrap();
        let pin = netd.pin_dir().display().to_string();
        let out = netd.cli(&["peers", "--json", "--pin-dir", &pin]).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(peers().contains(&b_block), "{}", peers());
    assert!(
        eventually(Duration::from_secs(45), || !peers().contains(&b_block)),
        "b's block is still routed: {}",
        peers()
    );
    // Its block stays b's (a host that reboots keeps it) until b is
    // forgotten, for good.
    assert!(blocks(&etcd).contains(r#""host":"b""#), "{}", blocks(&etcd));
    let (done, out, err) = forget("b");
    assert!(done && out.starts_with("host b forgotten: "), "{out} {err}");
    assert!(out.contains("1 routed blocks"), "{out}");
    assert!(
        !blocks(&etcd).contains(r#""host":"b""#),
        "{}",
        blocks(&etcd)
    );
    let claims = etcd.ctl(&["get", "--prefix", "/netd/v1/addrs/"]).unwrap();
    assert!(!claims.contains(r#""host":"b""#), "{claims}");
    let (done, _, err) = forget("b");
    assert!(!done && err.contains("holds nothing of host b"), "{err}");
}

#[test]
fn routed_blocks_run_out_with_a_clear_error() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(31).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = Host::cluster_member(&bench, &lan, "a", 1, &etcd.endpoint(), &[]).unwrap();
    let b = Host::cluster_member(&bench, &lan, "b", 2, &etcd.endpoint(), &[]).unwrap();
    let err = a
        .create_netd_network(
            "bad",
            "198.19.140.0/24",
            &["-o", "netd.mode=routed", "-o", "netd.block=24"],
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("does not split"), "{err:#}");
    // Two blocks (/25s): a and b take them, a third host finds none left.
    a.create_netd_network(
        "tiny",
        "198.19.140.0/24",
        &["-o", "netd.mode=routed", "-o", "netd.block=25"],
    )
    .unwrap();
    assert!(b.sees_netd_networks(&["tiny"], Duration::from_secs(5)));
    a.dockerd()
        .run("cx", &["--network", "tiny"], &["sleep", "600"])
        .unwrap();
    b.dockerd()
        .run("cy", &["--network", "tiny"], &["sleep", "600"])
        .unwrap();
    let c = Host::cluster_member(&bench, &lan, "c", 3, &etcd.endpoint(), &[]).unwrap();
    assert!(c.sees_netd_networks(&["tiny"], Duration::from_secs(5)));
    let err = c
        .dockerd()
        .run("cz", &["--network", "tiny"], &["sleep", "600"])
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("its 2 host blocks (/25) are all taken, by a, b"),
        "{err:#}"
    );
}

#[test]
fn ipvlan_l3_containers_are_routed_through_their_host_without_nat() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(33).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = Host::cluster_member(&bench, &lan, "a", 1, &etcd.endpoint(), &[]).unwrap();
    let b = Host::cluster_member(&bench, &lan, "b", 2, &etcd.endpoint(), &[]).unwrap();
    let outside = Host::plain(&bench, &lan, "outside", 200).unwrap();
    let _web = outside.serve_http().unwrap();
    a.create_netd_network(
        "l3",
        "198.19.160.0/20",
        &[
            "-o",
            "netd.mode=ipvlan",
            "-o",
            "ipvlan_mode=l3",
            "-o",
            "parent=eth0",
        ],
    )
    .unwrap();
    assert!(b.sees_netd_networks(&["l3"], Duration::from_secs(5)));
    a.dockerd().run_echo("la", &["--network", "l3"]).unwrap();
    b.dockerd()
        .run("lb", &["--network", "l3"], &["sleep", "600"])
        .unwrap();
    let (la, lb) = (
        a.container_addr("la").unwrap(),
        b.container_addr("lb").unwrap(),
    );
    assert_ne!(la.octets()[2], lb.octets()[2], "one block per host");
    assert!(ping_from(&b, "lb", &la.to_string()), "lb cannot reach la");

    // The LAN routes the block via its host: no NAT either way, and no ARP
    // on the LAN for the container.
    outside.route([198, 19, la.octets()[2]], a.ip).unwrap();
    let seen = a
        .dockerd()
        .http_get_from("la", &format!("http://{}/cgi-bin/peer", outside.ip))
        .unwrap();
    assert_eq!(seen.trim(), format!("[::ffff:{la}]"), "masqueraded");
    let from_outside = outside
        .ns
        .run("busybox", &["ping", "-c", "1", "-W", "2", &la.to_string()])
        .unwrap();
    assert!(from_outside.status.success(), "the LAN cannot reach la");
    assert_eq!(outside.ns.neighbour_mac(&la.to_string()), None);
    let networks = a
        .netd
        .as_ref()
        .unwrap()
        .cli(&["networks", "--etcd", &etcd.endpoint()])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&networks.stdout).contains("ipvlan-l3"),
        "{}",
        String::from_utf8_lossy(&networks.stdout)
    );
}
