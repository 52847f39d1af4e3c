//! `docker run -p` served by netd alone: dockerd runs with iptables, masquerade
//! and docker-proxy off, so nothing else could make these ports reachable.
use std::time::Duration;

use netd_tests::{eventually, privileged, Bench, DockerMode, Host};
use serde_json::Value;

/// `netd <what> --json` as a list.
fn listed(host: &mut Host, what: &str) -> Vec<Value> {
    let pin = host.netd().pin_dir().display().to_string();
    let out = host
        .netd()
        .cli(&[what, "--json", "--pin-dir", &pin])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn published_port_follows_the_container_lifecycle() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(2).unwrap();
    let mut host = Host::docker(&bench, &lan, "dh", 1, [198, 19, 2], DockerMode::Netd).unwrap();
    let client = Host::plain(&bench, &lan, "client", 100).unwrap();
    host.start_netd(&bench).unwrap();
    let url = format!("http://{}:8080/", host.ip);

    // Nothing published yet: the port is closed.
    assert!(client.http_get(&url).is_err());

    // Published after netd started: the event path.
    host.dockerd().run_httpd("web", &["-p", "8080:80"]).unwrap();
    let web_ip = host.dockerd().container_ip("web").unwrap();
    assert!(eventually(Duration::from_secs(10), || client
        .http_get_within(&url, 2)
        .is_ok()));
    assert_eq!(client.http_get(&url).unwrap(), "hello from netd-test\n");
    // Published on every address: the host's, loopback and the bridge's
    // gateway (where containers reach the host).
    let p = listed(&mut host, "ports");
    assert_eq!(p.len(), 3, "{p:?}");
    let addrs: Vec<_> = p
        .iter()
        .map(|e| e["host_addr"].as_str().unwrap().to_owned())
        .collect();
    for addr in [host.ip.to_string(), "127.0.0.1".into(), "198.19.2.1".into()] {
        assert!(addrs.contains(&addr), "{addrs:?} lacks {addr}");
    }
    assert!(p.iter().all(|e| e["host_port"] == 8080
        && e["container_addr"] == web_ip.as_str()
        && e["container_port"] == 80));

    // The container's endpoint: its host-side veth, address, MAC, network.
    let e = listed(&mut host, "endpoints");
    assert_eq!(e.len(), 1, "{e:?}");
    let mac = host
        .dockerd()
        .docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.MacAddress}}{{end}}",
            "web",
        ])
        .unwrap();
    assert_eq!(e[0]["addr"], web_ip.as_str(), "{e:?}");
    assert_eq!(e[0]["mac"], mac.as_str(), "{e:?}");
    assert_eq!(
        e[0]["subnets"],
        serde_json::json!(["198.19.2.0/24"]),
        "{e:?}"
    );
    assert_eq!(e[0]["direct_delivery"], true, "{e:?}");
    assert!(
        e[0]["interface"].as_str().unwrap().starts_with("veth"),
        "{e:?}"
    );

    // Delivered straight to the container's veth peer, not through the bridge.
    let status = host.netd().status().unwrap();
    assert!(
        netd_tests::netd::counter(&status, "uplink-ingress", "redirect") >= 3,
        "{status:#}"
    );
    // … and its replies straight from the container's veth to the uplink.
    assert!(
        netd_tests::netd::counter(&status, "container-egress", "redirect") >= 3,
        "{status:#}"
    );
    // The uplink's egress program saw them arrive translated, and left them.
    assert_eq!(
        netd_tests::netd::counter(&status, "uplink-egress", "translated"),
        netd_tests::netd::counter(&status, "container-egress", "redirect"),
        "{status:#}"
    );

    // Host-local access: processes on the host itself, on loopback and on
    // the host address (socket hooks; no packet crosses the uplink)…
    let local = |url: &str| host.http_get_within(url, 5);
    assert_eq!(
        local("http://127.0.0.1:8080/").unwrap(),
        "hello from netd-test\n"
    );
    assert_eq!(local(&url).unwrap(), "hello from netd-test\n");
    // … scoped to this host's namespace: another namespace's loopback is
    // its own.
    assert!(client.http_get_within("http://127.0.0.1:8080/", 2).is_err());

    // No NAT rule and no docker-proxy did it.
    let nat = host
        .ns
        .run_ok("iptables-save", &["-t", "nat"])
        .unwrap_or_default();
    assert!(!nat.contains("DNAT"), "{nat}");
    let proxies = std::process::Command::new("pgrep")
        .args(["-f", &format!("docker-proxy.*{}", host.ip)])
        .output()
        .unwrap();
    assert!(
        !proxies.status.success(),
        "a docker-proxy runs for this host"
    );

    // A port published on one host address only.
    host.dockerd()
        .run_httpd("web2", &["-p", &format!("{}:8081:80", host.ip)])
        .unwrap();
    let url2 = format!("http://{}:8081/", host.ip);
    let ok = eventually(Duration::from_secs(10), || {
        client.http_get_within(&url2, 2).is_ok()
    });
    assert!(
        ok,
        "{:?} {} {}",
        listed(&mut host, "ports"),
        host.dockerd()
            .docker(&[
                "inspect",
                "--format",
                "{{json .NetworkSettings.Ports}}",
                "web2"
            ])
            .unwrap(),
        host.netd().status().unwrap()["counters"]
    );

    // The daemon restarted with containers running converges to the same map,
    // and the port keeps working while it is down.
    host.netd().stop();
    assert_eq!(client.http_get(&url).unwrap(), "hello from netd-test\n");
    host.netd().restart().unwrap();
    assert_eq!(listed(&mut host, "ports").len(), 4);

    // docker restart: the port follows the container (its IP may change).
    host.dockerd()
        .docker(&["restart", "-t", "0", "web"])
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || client
        .http_get_within(&url, 2)
        .is_ok()));

    // Removed: the mapping goes, the port closes.
    host.dockerd().docker(&["rm", "-f", "web"]).unwrap();
    assert!(eventually(Duration::from_secs(5), || listed(
        &mut host, "ports"
    )
    .len()
        == 1));
    assert!(client.http_get(&url).is_err());

    // A new container on the same port takes it over.
    host.dockerd()
        .run_httpd("web3", &["-p", "8080:80"])
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || client
        .http_get_within(&url, 2)
        .is_ok()));

    // A new address on the uplink is published on at once (an address
    // change, not the 30 s resync).
    let added = std::net::Ipv4Addr::new(198, 18, 2, 51);
    netd_tests::netlink::with_netlink(&host.ns, |h| async move {
        netd_tests::netlink::add_address(&h, netd_tests::topology::UPLINK, added, 24).await
    })
    .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || listed(&mut host, "ports")
            .iter()
            .any(|p| p["host_addr"] == added.to_string())),
        "{:?}",
        listed(&mut host, "ports")
    );
    assert_eq!(
        client.http_get(&format!("http://{added}:8080/")).unwrap(),
        "hello from netd-test\n"
    );
}
