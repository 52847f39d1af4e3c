//! Path MTU discovery across an overlay whose underlay is smaller than the
//! uplinks: host a reaches host b through a router whose link toward b has
//! MTU 1400. netd sends VXLAN with DF, the router answers a's VTEP with
//! "fragmentation needed", netd notes it, and the container on a sending
//! full-size packets is told the path's MTU less 50 and resends smaller.
//! Without that a TCP transfer a → b stalls for good. Then a route with an
//! MTU of its own on host a narrows the path again.
//! (Only a → b carries full-size frames here: b's uplink keeps 1500, so
//! its containers keep the same MTU as a's, and a's data segments are the
//! ones that do not fit.)
use std::time::Duration;

use netd_tests::{
    etcd::Etcd,
    netd::{counter, NetdOptions},
    privileged, Bench, DockerMode, Host, NetNs,
};

/// `docker exec` on `host`.
fn exec(host: &Host, container: &str, script: &str) -> String {
    host.dockerd()
        .docker(&["exec", container, "sh", "-c", script])
        .unwrap()
}

/// The path MTU the container `name` on `host` has for `dst` (its route
/// cache), if it learned one.
fn learned_mtu(host: &Host, name: &str, dst: std::net::Ipv4Addr) -> Option<u32> {
    let ns = NetNs::open(&host.dockerd().netns_of(name).unwrap()).unwrap();
    let route = ns
        .run_ok("ip", &["route", "get", &dst.to_string()])
        .unwrap();
    let words: Vec<&str> = route.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "mtu")
        .and_then(|w| w[1].parse().ok())
}

/// One ICMP echo of `len` bytes to `dst` with DF, from a ping socket (the
/// kernel builds and checksums it in software).
fn ping_with_df(dst: std::net::Ipv4Addr, len: usize) {
    // SAFETY: plain socket calls on an fd this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP);
        assert!(fd >= 0, "ping socket: {}", std::io::Error::last_os_error());
        let df: libc::c_int = libc::IP_PMTUDISC_DO;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&df as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let mut packet = vec![0u8; len];
        packet[0] = 8; // echo request; the kernel fills id and checksum
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // EMSGSIZE once the path MTU is known: that is the point.
        libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        libc::close(fd);
    }
}

#[test]
fn a_smaller_underlay_path_is_discovered_and_tcp_goes_through() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let near = bench.lan(24).unwrap();
    let far = bench.lan(25).unwrap();
    let etcd = Etcd::start(&bench, &near, 250).unwrap();
    let router = Host::plain(&bench, &near, "r", 254).unwrap();
    far.attach_as(&router.ns, 254, "eth1").unwrap();
    router.ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    router
        .ns
        .run_ok("ip", &["link", "set", "eth1", "mtu", "1400"])
        .unwrap();

    etcd.ns
        .run_ok(
            "ip",
            &[
                "route",
                "add",
                "198.18.25.0/24",
                "via",
                &near.ip(254).to_string(),
            ],
        )
        .unwrap();
    let a = Host::cluster_member(&bench, &near, "a", 1, &etcd.endpoint(), &[]).unwrap();
    a.route([198, 18, 25], near.ip(254)).unwrap();
    let mut b = Host::docker(&bench, &far, "b", 2, [198, 19, 2], DockerMode::Netd).unwrap();
    b.route([198, 18, 24], far.ip(254)).unwrap();
    b.start_netd_with(
        &bench,
        NetdOptions {
            args: ["--etcd", &etcd.endpoint(), "--node-name", "b"]
                .map(String::from)
                .to_vec(),
            ..NetdOptions::default()
        },
    )
    .unwrap();

    a.create_netd_network("ov", "198.19.124.0/24", &[]).unwrap();
    assert!(b.sees_netd_networks(&["ov"], Duration::from_secs(5)));
    a.dockerd().run_httpd("web", &["--network", "ov"]).unwrap();
    b.dockerd()
        .run("client", &["--network", "ov"], &["sleep", "600"])
        .unwrap();
    let web = a.container_addr("web").unwrap();
    let client = b.container_addr("client").unwrap();
    let want = exec(
        &a,
        "web",
        "dd if=/dev/urandom of=/var/www/big bs=1024 count=2048 2>/dev/null; md5sum /var/www/big",
    );
    let want = want.split_whitespace().next().unwrap().to_owned();
    let fetch = || {
        let got = exec(
            &b,
            "client",
            &format!("timeout 30 wget -q -O - http://{web}/big | md5sum"),
        );
        got.split_whitespace().next().unwrap().to_owned()
    };
    assert_eq!(learned_mtu(&a, "web", client), None);

    // The router's report reaches netd; the container learns 1400 - 50.
    let got = fetch();
    let status = a.netd.as_ref().unwrap().status().unwrap();
    assert_eq!(
        got, want,
        "2 MiB from a to b, byte-exact; a's counters: {}",
        status["counters"]
    );
    assert_eq!(learned_mtu(&a, "web", client), Some(1350));
    assert!(counter(&status, "uplink-ingress", "pmtu-learned") >= 1);
    assert!(counter(&status, "container-egress", "frag-needed") >= 1);

    // The ICMP netd builds is checked by the container's kernel: a ping
    // (checksummed in software, unlike TCP, whose receiver trusts the
    // offload state) to another container of b, too big for the path.
    b.dockerd()
        .run("other", &["--network", "ov"], &["sleep", "600"])
        .unwrap();
    let other = b.container_addr("other").unwrap();
    let web_ns = NetNs::open(&a.dockerd().netns_of("web").unwrap()).unwrap();
    web_ns.sysctl("net.ipv4.ping_group_range", "0 0").unwrap();
    assert!(
        netd_tests::eventually(Duration::from_secs(5), || {
            web_ns
                .enter(|| {
                    ping_with_df(other, 1400);
                    Ok(())
                })
                .unwrap();
            learned_mtu(&a, "web", other) == Some(1350)
        }),
        "the container did not take netd's ICMP"
    );

    // A route on a with a smaller MTU still, locked (the route lookup netd
    // makes, like forwarding, takes a route's MTU only when it is locked or
    // with net.ipv4.ip_forward_use_pmtu): the container learns 1300 - 50.
    a.ns.run_ok(
        "ip",
        &[
            "route",
            "replace",
            "198.18.25.0/24",
            "via",
            &near.ip(254).to_string(),
            "mtu",
            "lock",
            "1300",
        ],
    )
    .unwrap();
    assert_eq!(fetch(), want);
    let status = a.netd.as_ref().unwrap().status().unwrap();
    assert_eq!(
        learned_mtu(&a, "web", client),
        Some(1250),
        "a's counters: {}",
        status["counters"]
    );
}
