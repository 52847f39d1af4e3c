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
    assert!(netd_tests::eventually(Duration::from_secs(5), || b
        .netd_networks()
        .unwrap()
        == ["ov"]));
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
