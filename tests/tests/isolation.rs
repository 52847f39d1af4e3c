//! Between containers, with real Docker networks: same network talks,
//! different networks do not (as Docker's isolation rules give it), a
//! published port is reachable from any network through the host address
//! (hairpin), from its own container too, and a container cannot send as
//! someone else.
use std::time::{Duration, Instant};

use netd_tests::{netd::counter, privileged, Bench, DockerMode, Host};

fn ping(host: &Host, from: &str, to: &str) -> bool {
    host.dockerd()
        .docker(&["exec", from, "ping", "-c", "1", "-W", "1", to])
        .is_ok()
}

#[test]
fn networks_are_isolated_hairpin_works_and_spoofing_is_dropped() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(4).unwrap();
    let mut host = Host::docker(&bench, &lan, "dh", 1, [198, 19, 4], DockerMode::Netd).unwrap();
    let d = host.dockerd();
    d.docker(&["network", "create", "--subnet", "198.19.40.0/24", "net-a"])
        .unwrap();
    d.docker(&["network", "create", "--subnet", "198.19.41.0/24", "net-b"])
        .unwrap();
    d.run(
        "a1",
        &["--network", "net-a", "--cap-add", "NET_ADMIN"],
        &["sleep", "3600"],
    )
    .unwrap();
    d.run("a2", &["--network", "net-a"], &["sleep", "3600"])
        .unwrap();
    d.run_httpd("b1", &["--network", "net-b", "-p", "8080:80"])
        .unwrap();
    let a2 = d.container_ip("a2").unwrap();
    let b1 = d.container_ip("b1").unwrap();
    // Without netd (and without Docker's iptables) nothing isolates them.
    assert!(
        ping(&host, "a1", &b1),
        "baseline: the host routes between bridges"
    );

    host.start_netd(&bench).unwrap();
    let d = host.dockerd();
    assert!(ping(&host, "a1", &a2), "same network must talk");
    let deadline = Instant::now() + Duration::from_secs(5);
    while ping(&host, "a1", &b1) {
        assert!(Instant::now() < deadline, "other network still reachable");
    }
    // A published port is reachable from another network through the host.
    let url = format!("http://{}:8080/", host.ip);
    let body = d
        .docker(&["exec", "a1", "timeout", "5", "wget", "-q", "-O", "-", &url])
        .unwrap();
    assert_eq!(body, "hello from netd-test");
    // … and from the serving container itself (self-hairpin).
    let body = d
        .docker(&["exec", "b1", "timeout", "5", "wget", "-q", "-O", "-", &url])
        .unwrap();
    assert_eq!(body, "hello from netd-test");

    // Sending as another address: dropped at the veth.
    d.docker(&[
        "exec",
        "a1",
        "ip",
        "addr",
        "add",
        "198.19.40.99/24",
        "dev",
        "eth0",
    ])
    .unwrap();
    assert!(!ping_from(&host, "a1", "198.19.40.99", &a2));

    let status = host.netd().status().unwrap();
    assert!(
        counter(&status, "container-egress", "isolated") >= 1,
        "{status:#}"
    );
    assert!(
        counter(&status, "container-egress", "spoofed") >= 1,
        "{status:#}"
    );
    assert!(
        counter(&status, "container-egress", "dnat") >= 1,
        "{status:#}"
    );
    // The self-hairpin packets went straight back into b1.
    assert!(
        counter(&status, "container-ingress", "translated") >= 3,
        "{status:#}"
    );
}

fn ping_from(host: &Host, container: &str, source: &str, to: &str) -> bool {
    host.dockerd()
        .docker(&[
            "exec", container, "ping", "-c", "1", "-W", "1", "-I", source, to,
        ])
        .is_ok()
}
