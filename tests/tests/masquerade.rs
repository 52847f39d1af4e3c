//! Container traffic leaving the host is masqueraded by netd alone: dockerd
//! runs with --ip-masq=false and --iptables=false, and the outside server has
//! no route to the container subnet, so only SNAT makes replies come back.
use std::time::{Duration, Instant};

use netd_tests::{privileged, Bench, DockerMode, Host};

#[test]
fn containers_reach_the_lan_as_the_host_address() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(3).unwrap();
    let mut host = Host::docker(&bench, &lan, "dh", 1, [198, 19, 3], DockerMode::Netd).unwrap();
    let server = Host::plain(&bench, &lan, "server", 200).unwrap();
    let _httpd = server.serve_http().unwrap();
    host.dockerd().run("c1", &[], &["sleep", "3600"]).unwrap();
    host.dockerd().run("c2", &[], &["sleep", "3600"]).unwrap();

    let peer_url = format!("http://{}/cgi-bin/peer", server.ip);
    let from = |host: &Host, name: &str| {
        host.dockerd().docker(&[
            "exec", name, "timeout", "5", "wget", "-q", "-O", "-", &peer_url,
        ])
    };
    // Without netd nothing masquerades: the server cannot answer 198.19.3.x.
    assert!(
        from(&host, "c1").is_err(),
        "reached the server without masquerade"
    );

    host.start_netd(&bench).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        match from(&host, "c1") {
            Ok(peer) => break peer,
            Err(e) if Instant::now() > deadline => panic!(
                "no masquerade: {e:#}\nfrom host: {:?}\n{:#}",
                host.http_get(&peer_url),
                std::fs::read_to_string(host.netd().log_path())
                    .unwrap()
                    .lines()
                    .filter(|l| l.contains("netd::"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    // busybox httpd listens dual-stack: IPv4 peers read "[::ffff:a.b.c.d]".
    let peer = |s: &str| {
        s.trim()
            .trim_start_matches("[::ffff:")
            .trim_end_matches(']')
            .to_owned()
    };
    assert_eq!(
        peer(&seen),
        host.ip.to_string(),
        "the server must see the host's address"
    );
    assert_eq!(peer(&from(&host, "c2").unwrap()), host.ip.to_string());

    // Ping (ICMP echo) is masqueraded too.
    let ping = host.dockerd().docker(&[
        "exec",
        "c1",
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        &server.ip.to_string(),
    ]);
    assert!(ping.is_ok(), "{ping:?}");

    let status = host.netd().status().unwrap();
    // Masqueraded on the container's veth and sent straight out of the
    // uplink (the FIB routes the LAN there).
    let counter = netd_tests::netd::counter;
    assert!(
        counter(&status, "container-egress", "redirect") >= 4,
        "{status:#}"
    );
    assert!(
        counter(&status, "container-egress", "snat") >= 4,
        "{status:#}"
    );
    assert!(
        counter(&status, "uplink-ingress", "rev-snat") >= 4,
        "{status:#}"
    );
}
