//! Overlay networks through the faults users meet: netd killed and
//! restarted with a cross-host TCP session open, a host vanishing (its
//! containers withdrawn everywhere within the lease TTL, back with it), and
//! etcd going away (forwarding goes on, new containers are refused with a
//! reason, a container removed meanwhile gives back its address once it
//! is back, and what changed meanwhile converges), dockerd
//! restarted (its network and containers come back).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, TcpListener},
    time::Duration,
};

use netd_tests::{etcd::Etcd, eventually, privileged, topology::LineSession, Bench, Host, NetNs};

const TTL: &str = "3";

/// A TCP echo server on `addr:port` inside `ns`, serving one connection.
fn echo_server(ns: &NetNs, addr: Ipv4Addr, port: u16) -> std::thread::JoinHandle<()> {
    let listener = ns.enter(|| Ok(TcpListener::bind((addr, port))?)).unwrap();
    std::thread::spawn(move || {
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        let mut out = conn.try_clone().unwrap();
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { break };
            if writeln!(out, "{line}").is_err() {
                break;
            }
        }
    })
}

fn peers(host: &Host) -> serde_json::Value {
    let netd = host.netd.as_ref().unwrap();
    let pin = netd.pin_dir().display().to_string();
    let out = netd.cli(&["peers", "--json", "--pin-dir", &pin]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn has_peer(host: &Host, addr: Ipv4Addr) -> bool {
    peers(host)
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["addr"] == addr.to_string())
}

fn ping(host: &Host, from: &str, to: Ipv4Addr) -> bool {
    host.dockerd()
        .docker(&["exec", from, "ping", "-c", "1", "-W", "2", &to.to_string()])
        .is_ok()
}

#[test]
fn sessions_survive_restarts_and_hosts_come_and_go_with_their_lease() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(19).unwrap();
    let mut etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let extra = ["--etcd-lease-ttl", TTL];
    let mut a = Host::cluster_member(&bench, &lan, "a", 1, &etcd.endpoint(), &extra).unwrap();
    let mut b = Host::cluster_member(&bench, &lan, "b", 2, &etcd.endpoint(), &extra).unwrap();
    a.create_netd_network("ov", "198.19.96.0/24", &[]).unwrap();
    assert!(b.sees_netd_networks(&["ov"], Duration::from_secs(3)));
    a.dockerd()
        .run("c-a", &["--network", "ov"], &["sleep", "600"])
        .unwrap();
    b.dockerd()
        .run("c-b", &["--network", "ov"], &["sleep", "600"])
        .unwrap();
    let (ip_a, ip_b) = (
        a.container_addr("c-a").unwrap(),
        b.container_addr("c-b").unwrap(),
    );
    let ns = |h: &Host, c: &str| NetNs::open(&h.dockerd().netns_of(c).unwrap()).unwrap();
    let (ns_a, ns_b) = (ns(&a, "c-a"), ns(&b, "c-b"));
    let server = echo_server(&ns_b, ip_b, 7000);
    let mut session = LineSession::open(&ns_a, ip_b, 7000).unwrap();
    assert_eq!(session.echo("before").unwrap(), "before");

    // netd killed on a: the pinned datapath goes on forwarding.
    a.netd().kill();
    assert_eq!(
        session.echo("while a's netd is down").unwrap(),
        "while a's netd is down"
    );
    // Back, past the old lease's TTL: its records were moved to the new
    // lease, so nothing was withdrawn.
    a.netd().start_again().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        session.echo("after a's netd is back").unwrap(),
        "after a's netd is back"
    );
    assert!(
        has_peer(&b, ip_a),
        "a's container was withdrawn: {:#}",
        peers(&b)
    );
    a.dockerd()
        .run("c-a2", &["--network", "ov"], &["sleep", "600"])
        .unwrap();
    assert!(ping(&a, "c-a2", ip_b));
    let ip_a2 = a.container_addr("c-a2").unwrap();
    let id_a2 = a
        .dockerd()
        .docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.EndpointID}}{{end}}",
            "c-a2",
        ])
        .unwrap();

    // Host b vanishes (netd killed, nothing renews its lease): its
    // container is withdrawn on a within the TTL, and returns with it.
    b.netd().kill();
    assert!(
        eventually(Duration::from_secs(10), || !has_peer(&a, ip_b)),
        "b's container outlived b's lease: {:#}",
        peers(&a)
    );
    b.netd().start_again().unwrap();
    assert!(eventually(Duration::from_secs(10), || has_peer(&a, ip_b)));
    assert!(ping(&a, "c-a", ip_b));

    // etcd goes away: forwarding between existing containers goes on, a
    // new container is refused with a reason.
    etcd.stop();
    assert_eq!(session.echo("without etcd").unwrap(), "without etcd");
    assert!(ping(&b, "c-b", ip_a));
    let err = a
        .dockerd()
        .docker(&[
            "run",
            "-d",
            "--pull=never",
            "--network",
            "ov",
            "--name",
            "c-late",
            netd_tests::docker::TEST_IMAGE,
            "sleep",
            "600",
        ])
        .expect_err("a container must not start without the cluster store");
    assert!(
        format!("{err:#}").contains("etcd") || format!("{err:#}").contains("cluster store"),
        "{err:#}"
    );
    // A container removed meanwhile: Docker asks once, netd retries. Once
    // etcd is back, its endpoint and its address are gone from the store.
    a.dockerd().docker(&["rm", "-f", "c-a2"]).unwrap();
    // Back: a container started now reaches the others.
    etcd.start_again().unwrap();
    let keys = || {
        etcd.ctl(&["get", "--prefix", "--keys-only", "/netd/v1/"])
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(20), || {
            let keys = keys();
            !keys.is_empty()
                && !keys.contains(&format!("/{ip_a2}\n"))
                && !keys.contains(id_a2.trim())
        }),
        "c-a2's claim or endpoint outlived it: {}",
        keys()
    );
    assert!(eventually(Duration::from_secs(20), || {
        let _ = a.dockerd().docker(&["rm", "-f", "c-late"]);
        a.dockerd()
            .run("c-late", &["--network", "ov"], &["sleep", "600"])
            .is_ok()
    }));
    let ip_late = a.container_addr("c-late").unwrap();
    assert!(eventually(Duration::from_secs(10), || ping(
        &b, "c-b", ip_late
    )));
    assert_eq!(session.echo("at the end").unwrap(), "at the end");
    drop(session);
    server.join().unwrap();

    // dockerd restarted on b: the network is still there and a container
    // with a restart policy comes back on it, reachable from a.
    b.dockerd()
        .run(
            "c-b-always",
            &["--network", "ov", "--restart", "always"],
            &["sleep", "600"],
        )
        .unwrap();
    b.docker.as_mut().unwrap().restart().unwrap();
    assert_eq!(b.netd_networks().unwrap(), ["ov"]);
    assert!(
        eventually(Duration::from_secs(20), || b
            .container_addr("c-b-always")
            .is_ok_and(|ip| ping(&a, "c-a", ip))),
        "c-b-always did not come back reachable"
    );
}

/// A three-member etcd cluster loses a member: nothing is noticed. Networks
/// still reach every host, containers still start and reach each other.
#[test]
fn a_store_member_lost_goes_unnoticed() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(22).unwrap();
    let mut members = Etcd::start_cluster(&bench, &lan, &[250, 251, 252]).unwrap();
    let urls = members
        .iter()
        .map(Etcd::endpoint)
        .collect::<Vec<_>>()
        .join(",");
    let a = Host::cluster_member(&bench, &lan, "a", 1, &urls, &[]).unwrap();
    let b = Host::cluster_member(&bench, &lan, "b", 2, &urls, &[]).unwrap();
    a.create_netd_network("ov", "198.19.116.0/24", &[]).unwrap();
    assert!(b.sees_netd_networks(&["ov"], Duration::from_secs(3)));
    a.dockerd()
        .run("c-a", &["--network", "ov"], &["sleep", "600"])
        .unwrap();

    // The first member (the one each client lists first) goes away.
    members[0].stop();
    b.dockerd()
        .run("c-b", &["--network", "ov"], &["sleep", "600"])
        .unwrap();
    let ip_b = b.container_addr("c-b").unwrap();
    // (The watch a had on that member is set up again on another.)
    assert!(eventually(Duration::from_secs(10), || ping(
        &a, "c-a", ip_b
    )));
    let started = std::time::Instant::now();
    b.create_netd_network("ov2", "198.19.117.0/24", &[])
        .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || a.netd_networks().unwrap().len()
            == 2),
        "ov2 did not reach a"
    );
    eprintln!(
        "ov2 on a {:?} after its creation on b, one member down",
        started.elapsed()
    );
    for h in [&a, &b] {
        let log = std::fs::read_to_string(h.netd.as_ref().unwrap().log_path()).unwrap();
        assert!(!log.contains(" ERROR "), "{log}");
    }
}
