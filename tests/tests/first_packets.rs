//! A container's first packets: a client whose command connects the moment
//! it starts must get what it would get a second later: hairpin to a
//! published port (through the host's LAN address or its own gateway, to a
//! container on another network or its own), masquerade to the LAN, and a
//! same-network peer. Docker starts the
//! container's process before it reports the start, so these connections
//! race netd's reaction to the event; each case runs 20 fresh containers in
//! a row and every one must succeed.
use std::time::Duration;

use netd_tests::{netd::counter, privileged, Bench, DockerMode, Host};

/// Containers per case.
const RUNS: usize = 20;
/// Networks created just before their first container.
const NEW_NETWORKS: usize = 5;
/// One client container's whole life: start, connect, fetch, exit. A
/// connection that hangs (half-translated) shows up as this bound passing.
const CLIENT_LIMIT: Duration = Duration::from_secs(10);

/// Runs `RUNS` containers on `network` that each fetch `url` as their first
/// act, and checks every body. Returns the failures, so that all cases are
/// reported together.
fn fetch_at_start(host: &Host, case: &str, network: &str, url: &str, body: &str) -> Vec<String> {
    let d = host.dockerd();
    let mut failures = Vec::new();
    for i in 0..RUNS {
        let name = format!("{case}-{i}");
        let started = std::time::Instant::now();
        let result = d.run_to_completion(
            &name,
            &["--network", network],
            &["wget", "-q", "-O", "-", url],
            CLIENT_LIMIT,
        );
        eprintln!("{name}: {:?}", started.elapsed());
        match result {
            Ok(got) if got == body => {}
            Ok(got) => failures.push(format!("{case} run {i}: got {got:?}, want {body:?}")),
            Err(e) => failures.push(format!("{case} run {i}: {e:#}")),
        }
    }
    failures
}

#[test]
fn connections_opened_at_container_start_behave_as_later_ones() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(10).unwrap();
    let mut host = Host::docker(&bench, &lan, "dh", 1, [198, 19, 10], DockerMode::Netd).unwrap();
    let lan_server = Host::plain(&bench, &lan, "lan-web", 100).unwrap();
    let _lan_http = lan_server.serve_http().unwrap();
    let d = host.dockerd();
    d.docker(&["network", "create", "--subnet", "198.19.11.0/24", "clients"])
        .unwrap();
    d.docker(&["network", "create", "--subnet", "198.19.12.0/24", "servers"])
        .unwrap();
    // Published, on another network than the clients.
    d.run_httpd("web", &["--network", "servers", "-p", "8080:80"])
        .unwrap();
    // Published, on the clients' own network: the reply is switched by the
    // bridge, never routed by the host.
    d.run_httpd("near", &["--network", "clients", "-p", "8081:80"])
        .unwrap();
    let near_ip = d.container_ip("near").unwrap();
    host.start_netd(&bench).unwrap();

    let hello = "hello from netd-test\n";
    let cases = [
        ("hairpin", format!("http://{}:8080/", host.ip), hello),
        (
            "hairpin-same-net",
            format!("http://{}:8081/", host.ip),
            hello,
        ),
        // Through the clients' own gateway: the host's address on their bridge.
        ("via-gateway", "http://198.19.11.1:8080/".to_owned(), hello),
        (
            "masquerade",
            format!("http://{}/", lan_server.ip),
            "hello from the LAN\n",
        ),
        ("peer", format!("http://{near_ip}/"), hello),
    ];
    let mut failures = Vec::new();
    for (case, url, body) in &cases {
        failures.extend(fetch_at_start(&host, case, "clients", url, body));
    }
    // As `docker compose up` does: a network created a moment before its
    // first container, whose veth may show up before netd has heard of the
    // network from Docker's event.
    let hairpin = format!("http://{}:8080/", host.ip);
    for i in 0..NEW_NETWORKS {
        let (net, name) = (format!("fresh-{i}"), format!("fresh-{i}-client"));
        let subnet = format!("198.19.{}.0/24", 20 + i);
        let d = host.dockerd();
        d.docker(&["network", "create", "--subnet", &subnet, &net])
            .unwrap();
        let got = d.run_to_completion(
            &name,
            &["--network", &net],
            &["wget", "-q", "-O", "-", &hairpin],
            CLIENT_LIMIT,
        );
        match got {
            Ok(got) if got == hello => {}
            other => failures.push(format!("{name}: {other:?}")),
        }
        d.docker(&["network", "rm", &net]).unwrap();
    }
    let status = host.netd().status().unwrap();
    // The mechanism, not luck: every client's endpoint was registered from
    // its veth's link event, before Docker reported the container.
    let log = std::fs::read_to_string(host.netd().log_path()).unwrap();
    let early = log.matches("registered from its link event").count();
    eprintln!(
        "{early} endpoints registered from their veth; {} packets dropped as from an unknown endpoint",
        counter(&status, "container-egress", "unknown-endpoint")
    );
    assert!(
        early >= RUNS * cases.len(),
        "only {early} endpoints registered from their link event"
    );
    assert!(
        failures.is_empty(),
        "{} of {} containers failed:\n{}\nstatus: {status:#}",
        failures.len(),
        RUNS * cases.len() + NEW_NETWORKS,
        failures.join("\n")
    );
}
