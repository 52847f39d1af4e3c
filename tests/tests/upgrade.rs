//! An upgrade adopts the previous release's pins: the previous release's
//! netd (built from this repository's history by `cargo xtask test`, path in
//! NETD_PREVIOUS_BINARY) serves a published port and a masqueraded
//! session; this build replaces it on the same pins, and the sessions it
//! opened live on, the port still answers, and the new maps exist beside
//! the old ones.
use std::time::Duration;

use netd_tests::{eventually, netd::NetdOptions, privileged, Bench, DockerMode, Host};

#[test]
fn an_upgrade_keeps_sessions_and_ports() {
    if !privileged() {
        return;
    }
    let previous = match std::env::var_os("NETD_PREVIOUS_BINARY") {
        Some(p) => std::path::PathBuf::from(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("NETD_PREVIOUS_BINARY is not set: run the suite with `cargo xtask test`")
        }
        None => {
            eprintln!("skipped: NETD_PREVIOUS_BINARY not set (`cargo xtask test` builds it)");
            return;
        }
    };
    let bench = Bench::new().unwrap();
    let lan = bench.lan(21).unwrap();
    let mut host = Host::docker(&bench, &lan, "dh", 1, [198, 19, 21], DockerMode::Netd).unwrap();
    let client = Host::plain(&bench, &lan, "client", 100).unwrap();
    let _lan_web = client.serve_http().unwrap();
    host.start_netd_with(
        &bench,
        NetdOptions {
            binary: Some(previous),
            ..NetdOptions::default()
        },
    )
    .unwrap();
    host.dockerd().run_echo("echo", &["-p", "7000:7"]).unwrap();
    host.dockerd().run_httpd("web", &["-p", "8080:80"]).unwrap();
    let url = format!("http://{}:8080/", host.ip);
    assert!(eventually(Duration::from_secs(10), || client
        .http_get_within(&url, 2)
        .is_ok()));
    // Inbound through the published port, and outbound masqueraded (a
    // container's session to the LAN).
    let wait = Duration::from_secs(5);
    let mut inbound = client.tcp_session(host.ip, 7000).unwrap();
    assert_eq!(inbound.echo("before", wait).unwrap(), "before");
    host.dockerd().run("out", &[], &["sleep", "600"]).unwrap();
    let outbound_ns = netd_tests::NetNs::open(&host.dockerd().netns_of("out").unwrap()).unwrap();
    let echo_server = client
        .ns
        .command("busybox")
        .args(["nc", "-ll", "-p", "7001", "-e", "cat"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _echo_server = netd_tests::topology::Background::new(echo_server);
    let mut outbound = {
        let mut session = None;
        assert!(eventually(Duration::from_secs(5), || {
            session = outbound_ns
                .enter(|| Ok(std::net::TcpStream::connect((client.ip, 7001))?))
                .ok();
            session.is_some()
        }));
        session.unwrap()
    };
    let mut echo_out = |line: &str| -> String {
        use std::io::{BufRead as _, Write as _};
        writeln!(outbound, "{line}").unwrap();
        outbound.set_read_timeout(Some(wait)).unwrap();
        let mut reader = std::io::BufReader::new(outbound.try_clone().unwrap());
        let mut got = String::new();
        reader.read_line(&mut got).unwrap();
        got.trim().to_owned()
    };
    assert_eq!(echo_out("out before"), "out before");

    let map_names = |status: &serde_json::Value| -> Vec<String> {
        status["maps"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .collect()
    };
    // The previous release it is: it has no overlay maps.
    let before = map_names(&host.netd().status().unwrap());
    assert!(!before.iter().any(|m| m == "netd_peers"), "{before:?}");

    // The upgrade: this build on the previous release's pins.
    host.netd()
        .replace_with(netd_tests::netd::netd_binary().unwrap())
        .unwrap();
    assert_eq!(inbound.echo("after", wait).unwrap(), "after");
    assert_eq!(echo_out("out after"), "out after");
    assert_eq!(
        client.http_get_within(&url, 5).unwrap(),
        "hello from netd-test\n"
    );
    let status = host.netd().status().unwrap();
    let after = map_names(&status);
    assert!(after.iter().any(|m| m == "netd_peers"), "{after:?}");
    // The counters kept their values across the upgrade.
    assert!(netd_tests::netd::counter(&status, "uplink-ingress", "dnat") > 0);
}
