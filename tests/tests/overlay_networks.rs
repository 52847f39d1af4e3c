//! netd as Docker's network and IPAM plugin across hosts: a network created
//! on one host exists on every host, addresses are unique across them, bad
//! requests are refused with their reason, and removal reaches every host
//! but never takes a network from under another host's containers. Two
//! Docker hosts, each with its own mount namespace (its own
//! /run/docker/plugins), and a real etcd, on one emulated LAN.
use std::time::Duration;

use netd_tests::{etcd::Etcd, eventually, privileged, Bench, Host};

fn cluster_host(bench: &Bench, lan: &netd_tests::Lan, etcd: &Etcd, name: &str, ip: u8) -> Host {
    Host::cluster_member(bench, lan, name, ip, &etcd.endpoint(), &[]).unwrap()
}

fn netd_networks(host: &Host) -> Vec<String> {
    host.netd_networks().unwrap()
}

fn create_fails(host: &Host, name: &str, subnet: &str, extra: &[&str]) -> String {
    let err = host
        .create_netd_network(name, subnet, extra)
        .expect_err("the network must be refused");
    format!("{err:#}")
}

#[test]
fn a_network_created_on_one_host_exists_on_every_host() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(15).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = cluster_host(&bench, &lan, &etcd, "a", 1);
    let b = cluster_host(&bench, &lan, &etcd, "b", 2);
    let created = std::time::Instant::now();
    a.create_netd_network("ov", "198.19.66.0/24", &[]).unwrap();
    assert!(
        eventually(Duration::from_secs(2), || netd_networks(&b) == ["ov"]),
        "ov did not reach host b within 2 s: {:?}",
        netd_networks(&b)
    );
    eprintln!(
        "network on host b {:?} after its creation on a",
        created.elapsed()
    );
    let subnet = |h: &Host| {
        h.dockerd()
            .docker(&[
                "network",
                "inspect",
                "ov",
                "--format",
                "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}}",
            ])
            .unwrap()
    };
    assert_eq!(subnet(&b).trim(), "198.19.66.0/24 198.19.66.1");
    let record = etcd
        .ctl(&[
            "get",
            "--prefix",
            "--print-value-only",
            "/netd/v1/networks/",
        ])
        .unwrap();
    assert!(record.contains("\"name\":\"ov\""), "{record}");
    assert!(record.contains("\"vni\":4096"), "{record}");

    // Refused, each with its reason.
    let plain = a
        .dockerd()
        .docker(&[
            "network",
            "create",
            "-d",
            "netd",
            "--subnet",
            "198.19.67.0/24",
            "plain-ipam",
        ])
        .expect_err("Docker's own IPAM must be refused");
    assert!(
        format!("{plain:#}").contains("--ipam-driver netd"),
        "{plain:#}"
    );
    let err = create_fails(&b, "over", "198.19.66.128/25", &[]);
    assert!(err.contains("overlaps network ov"), "{err}");
    let err = create_fails(&b, "clash", "198.19.68.0/24", &["-o", "netd.vni=4096"]);
    assert!(err.contains("VNI 4096 is already network ov's"), "{err}");
    let err = create_fails(&a, "bogus", "198.19.69.0/24", &["-o", "netd.mode=bogus"]);
    assert!(err.contains("not a netd mode"), "{err}");
    assert_eq!(netd_networks(&a), ["ov"]);
    assert_eq!(netd_networks(&b), ["ov"]);

    // Containers on both hosts get addresses nobody else has, and the
    // uplink's MTU less the VXLAN overhead.
    let run = |h: &Host, name: &str| {
        h.dockerd()
            .run(name, &["--network", "ov"], &["sleep", "600"])
            .unwrap();
        h.dockerd()
            .docker(&[
                "inspect",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.MacAddress}}{{end}}",
                name,
            ])
            .unwrap()
            .trim()
            .to_owned()
    };
    let on_b = run(&b, "c-b");
    let on_a = run(&a, "c-a");
    assert_eq!(on_b, "198.19.66.2 02:4e:c6:13:42:02");
    assert_eq!(on_a, "198.19.66.3 02:4e:c6:13:42:03");
    let mtu = a
        .dockerd()
        .docker(&["exec", "c-a", "cat", "/sys/class/net/eth0/mtu"])
        .unwrap();
    assert_eq!(mtu.trim(), "1450");

    // Removed on a while b has a container on it: Docker removes its copy
    // whatever a driver says, so the cluster keeps the network, says why,
    // and a gets it back.
    a.dockerd().docker(&["rm", "-f", "c-a"]).unwrap();
    a.dockerd().docker(&["network", "rm", "ov"]).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || netd_networks(&a) == ["ov"]),
        "ov was not restored on a"
    );
    let log = std::fs::read_to_string(a.netd.as_ref().unwrap().log_path()).unwrap();
    assert!(log.contains("network ov still has endpoints on b"), "{log}");
    assert_eq!(netd_networks(&b), ["ov"]);

    // Once b's container is gone, removing it on b removes it everywhere.
    b.dockerd().docker(&["rm", "-f", "c-b"]).unwrap();
    b.dockerd().docker(&["network", "rm", "ov"]).unwrap();
    assert!(
        eventually(Duration::from_secs(2), || netd_networks(&a).is_empty()),
        "ov is still on a: {:?}",
        netd_networks(&a)
    );
    let left = etcd
        .ctl(&["get", "--prefix", "--keys-only", "/netd/v1/"])
        .unwrap();
    assert!(
        !left.contains("networks/") && !left.contains("addrs/"),
        "{left}"
    );
}

/// Containers of one overlay network on two hosts, and one more on the
/// first host: ping and TCP both ways across hosts, and on one host; the
/// anycast gateway answers on each host; the LAN is reached through the
/// local uplink, masqueraded.
#[test]
fn containers_on_different_hosts_reach_each_other() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(16).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = cluster_host(&bench, &lan, &etcd, "a", 1);
    let b = cluster_host(&bench, &lan, &etcd, "b", 2);
    let outside = Host::plain(&bench, &lan, "outside", 9).unwrap();
    let _web = outside.serve_http().unwrap();
    a.create_netd_network("ov", "198.19.76.0/24", &[]).unwrap();
    assert!(eventually(Duration::from_secs(2), || netd_networks(&b) == ["ov"]));

    let ip = |h: &Host, name: &str| h.container_addr(name).unwrap().to_string();
    a.dockerd()
        .run_httpd("web-a", &["--network", "ov"])
        .unwrap();
    b.dockerd()
        .run_httpd("web-b", &["--network", "ov"])
        .unwrap();
    a.dockerd()
        .run_httpd("web-a2", &["--network", "ov"])
        .unwrap();
    let (ip_a, ip_b, ip_a2) = (ip(&a, "web-a"), ip(&b, "web-b"), ip(&a, "web-a2"));
    let exec = |h: &Host, name: &str, cmd: &[&str]| h.dockerd().exec(name, cmd);
    let ping = |h: &Host, name: &str, to: &str| exec(h, name, &["ping", "-c", "2", "-W", "2", to]);
    let get =
        |h: &Host, name: &str, to: &str| h.dockerd().http_get_from(name, &format!("http://{to}"));
    for (h, from, to) in [
        (&a, "web-a", &ip_b),
        (&b, "web-b", &ip_a),
        (&a, "web-a", &ip_a2),
    ] {
        ping(h, from, to).unwrap_or_else(|e| panic!("ping {from} -> {to}: {e:#}"));
        let page =
            get(h, from, &format!("{to}/")).unwrap_or_else(|e| panic!("GET {from} -> {to}: {e:#}"));
        assert!(page.contains("hello from netd-test"), "{page}");
    }
    // The gateway is every host's own.
    ping(&a, "web-a", "198.19.76.1").unwrap();
    ping(&b, "web-b", "198.19.76.1").unwrap();
    // Out to the LAN, from the local host's address.
    let peer = get(&b, "web-b", &format!("{}/cgi-bin/peer", outside.ip)).unwrap();
    // busybox httpd reports an IPv4-mapped IPv6 address.
    assert_eq!(peer.trim(), format!("[::ffff:{}]", b.ip));

    // A published port of an overlay container: from the LAN, from the
    // host itself, and hairpin from another container.
    b.dockerd()
        .run_httpd("pub-b", &["--network", "ov", "-p", "8080:80"])
        .unwrap();
    let url = format!("http://{}:8080/", b.ip);
    let mut page = String::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            page = outside.http_get_within(&url, 2).unwrap_or_default();
            !page.is_empty()
        }),
        "{url} does not answer from the LAN: {:?}",
        b.netd.as_ref().unwrap().cli(&[
            "ports",
            "--pin-dir",
            &b.netd.as_ref().unwrap().pin_dir().display().to_string()
        ])
    );
    assert!(page.contains("hello from netd-test"), "{page}");
    let page = b.http_get(&url).unwrap();
    assert!(page.contains("hello from netd-test"), "{page}");
    let page = get(&b, "web-b", &format!("{}:8080/", b.ip)).unwrap();
    assert!(page.contains("hello from netd-test"), "{page}");

    // The CLI: the cluster's networks from etcd, the forwarding table
    // from the pins.
    let netd_a = a.netd.as_ref().unwrap();
    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let networks = json(
        netd_a
            .cli(&["networks", "--json", "--etcd", &etcd.endpoint()])
            .unwrap(),
    );
    assert_eq!(networks[0]["name"], "ov", "{networks:#}");
    assert_eq!(
        networks[0]["hosts"],
        serde_json::json!(["a", "b"]),
        "{networks:#}"
    );
    let pin = netd_a.pin_dir().display().to_string();
    let peers = json(netd_a.cli(&["peers", "--json", "--pin-dir", &pin]).unwrap());
    let entry = |addr: &str| {
        peers
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["addr"] == addr)
            .unwrap_or_else(|| panic!("{addr} not in {peers:#}"))
            .clone()
    };
    assert_eq!(entry(&ip_b)["vtep"], b.ip.to_string());
    assert!(entry(&ip_a)["interface"]
        .as_str()
        .unwrap()
        .starts_with("nd"));
    assert_eq!(entry(&ip_a2)["vtep"], serde_json::Value::Null);

    let status = a.netd.as_ref().unwrap().status().unwrap();
    let encap = netd_tests::netd::counter(&status, "container-egress", "vxlan-encap");
    let decap = netd_tests::netd::counter(&status, "uplink-ingress", "vxlan-decap");
    assert!(encap > 0 && decap > 0, "encap {encap} decap {decap}");
}

/// A deterministic byte stream (xorshift64), so the receiver checks every
/// byte without holding what was sent; reads of any length continue it.
struct Stream {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Stream {
    fn new(seed: u64) -> Self {
        Self {
            state: seed,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.word = self.state.to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// Across hosts with TSO/GSO left on: 1 GiB over TCP arrives byte-exact,
/// UDP is answered both ways, and other networks stay out of reach (another
/// netd network, a bridge network).
#[test]
fn bulk_tcp_udp_and_isolation_across_hosts() {
    use std::io::{Read as _, Write as _};
    use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(18).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = cluster_host(&bench, &lan, &etcd, "a", 1);
    let b = cluster_host(&bench, &lan, &etcd, "b", 2);
    for (name, subnet) in [("ov", "198.19.86.0/24"), ("other", "198.19.87.0/24")] {
        a.create_netd_network(name, subnet, &[]).unwrap();
    }
    assert!(eventually(Duration::from_secs(3), || netd_networks(&b)
        .len()
        == 2));
    a.dockerd()
        .run("c-a", &["--network", "ov"], &["sleep", "600"])
        .unwrap();
    b.dockerd()
        .run("c-b", &["--network", "ov"], &["sleep", "600"])
        .unwrap();
    b.dockerd()
        .run("c-other", &["--network", "other"], &["sleep", "600"])
        .unwrap();
    a.dockerd().run("c-bridge", &[], &["sleep", "600"]).unwrap();
    let netns =
        |h: &Host, c: &str| netd_tests::NetNs::open(&h.dockerd().netns_of(c).unwrap()).unwrap();
    let ip = |h: &Host, c: &str| h.container_addr(c).unwrap();
    let (ns_a, ns_b) = (netns(&a, "c-a"), netns(&b, "c-b"));
    let ip_b = ip(&b, "c-b");

    const TOTAL: usize = 1 << 30;
    let listener = ns_b.enter(|| Ok(TcpListener::bind((ip_b, 5001))?)).unwrap();
    let receiver = std::thread::spawn(move || -> Result<usize, String> {
        let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (mut expected, mut got, mut want) =
            (Stream::new(7), vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
        let mut seen = 0;
        while seen < TOTAL {
            let n = conn
                .read(&mut got)
                .map_err(|e| format!("after {seen} bytes: {e}"))?;
            if n == 0 {
                break;
            }
            expected.fill(&mut want[..n]);
            if got[..n] != want[..n] {
                let at = got[..n].iter().zip(&want[..n]).position(|(g, w)| g != w);
                return Err(format!("byte {} differs", seen + at.unwrap_or(0)));
            }
            seen += n;
        }
        Ok(seen)
    });
    let started = std::time::Instant::now();
    let sent = ns_a.enter(|| {
        let mut conn =
            TcpStream::connect_timeout(&SocketAddr::from((ip_b, 5001)), Duration::from_secs(5))?;
        let (mut stream, mut buf) = (Stream::new(7), vec![0u8; 1 << 16]);
        let mut sent = 0;
        while sent < TOTAL {
            stream.fill(&mut buf);
            conn.write_all(&buf)?;
            sent += buf.len();
        }
        Ok(())
    });
    let received = receiver.join().unwrap();
    assert_eq!(received, Ok(TOTAL), "sender: {sent:?}");
    sent.unwrap();
    eprintln!("1 GiB across hosts in {:?}", started.elapsed());

    // UDP, both ways: b answers a, a answers b.
    let echo =
        |server: &netd_tests::NetNs, addr: std::net::Ipv4Addr, client: &netd_tests::NetNs| {
            let sock = server.enter(|| Ok(UdpSocket::bind((addr, 5353))?)).unwrap();
            let served = std::thread::spawn(move || {
                sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                sock.send_to(&buf[..n], from).unwrap();
            });
            let answer = client
                .enter(|| {
                    let s = UdpSocket::bind("0.0.0.0:0")?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    s.send_to(b"across", (addr, 5353))?;
                    let mut buf = [0u8; 64];
                    let (n, _) = s.recv_from(&mut buf)?;
                    Ok(buf[..n].to_vec())
                })
                .unwrap();
            served.join().unwrap();
            assert_eq!(answer, b"across");
        };
    echo(&ns_b, ip_b, &ns_a);
    echo(&ns_a, ip(&a, "c-a"), &ns_b);

    // Another netd network and a bridge network are out of reach.
    let unreachable = |h: &Host, from: &str, to: std::net::Ipv4Addr| {
        let out =
            h.dockerd()
                .docker(&["exec", from, "ping", "-c", "1", "-W", "1", &to.to_string()]);
        assert!(out.is_err(), "{from} reached {to}");
    };
    unreachable(&a, "c-a", ip(&b, "c-other"));
    unreachable(&b, "c-other", ip(&a, "c-a"));
    unreachable(&a, "c-bridge", ip(&a, "c-a"));
    unreachable(&a, "c-a", ip(&a, "c-bridge"));
    let status = a.netd.as_ref().unwrap().status().unwrap();
    assert!(netd_tests::netd::counter(&status, "container-egress", "isolated") >= 3);
}

/// The frames are standard VXLAN: a plain Linux vxlan device on a LAN
/// machine, with the network's VNI, port 4789 and static FDB and neighbour
/// entries, exchanges ping and TCP both ways with a netd container. The
/// machine is entered in the cluster store by hand, as a host holding one
/// endpoint.
#[test]
fn a_kernel_vxlan_device_interoperates() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(20).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = cluster_host(&bench, &lan, &etcd, "a", 1);
    let k = Host::plain(&bench, &lan, "kernel", 9).unwrap();
    a.create_netd_network("ov", "198.19.106.0/24", &[]).unwrap();
    let record: serde_json::Value = serde_json::from_str(
        &etcd
            .ctl(&[
                "get",
                "--prefix",
                "--print-value-only",
                "/netd/v1/networks/",
            ])
            .unwrap(),
    )
    .unwrap();
    let (id, vni) = (
        record["id"].as_str().unwrap(),
        record["vni"].as_u64().unwrap(),
    );

    // The kernel's side: vx0 with its own address and MAC.
    let (k_addr, k_mac) = ("198.19.106.200", "02:4e:c6:13:6a:c8");
    let vni_s = vni.to_string();
    let sh = |args: &[&str]| {
        k.ns.run_ok("ip", args).unwrap();
    };
    sh(&[
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        &vni_s,
        "local",
        &k.ip.to_string(),
        "dstport",
        "4789",
        "nolearning",
    ]);
    sh(&["link", "set", "vx0", "address", k_mac, "mtu", "1450", "up"]);
    sh(&["addr", "add", &format!("{k_addr}/24"), "dev", "vx0"]);
    let host = format!(r#"{{"node":"kernel","vtep":"{}"}}"#, k.ip);
    etcd.ctl(&["put", "/netd/v1/hosts/kernel", &host]).unwrap();
    let claim = r#"{"host":"kernel","owner":"vx0"}"#;
    etcd.ctl(&["put", &format!("/netd/v1/addrs/{id}/{k_addr}"), claim])
        .unwrap();
    let mac_json = "[2,78,198,19,106,200]";
    let endpoint = format!(
        r#"{{"network":"{id}","addr":"{k_addr}","mac":{mac_json},"host":"kernel","vtep":"{}","endpoint":"vx0"}}"#,
        k.ip
    );
    etcd.ctl(&["put", &format!("/netd/v1/endpoints/{id}/vx0"), &endpoint])
        .unwrap();

    a.dockerd().run_httpd("web", &["--network", "ov"]).unwrap();
    let web = a.container_addr("web").unwrap();
    let web_mac = format!("02:4e:c6:13:6a:{:02x}", web.octets()[3]);
    k.ns.run_ok(
        "bridge",
        &[
            "fdb",
            "append",
            &web_mac,
            "dev",
            "vx0",
            "dst",
            &a.ip.to_string(),
        ],
    )
    .unwrap();
    sh(&[
        "neigh",
        "add",
        &web.to_string(),
        "lladdr",
        &web_mac,
        "dev",
        "vx0",
        "nud",
        "permanent",
    ]);

    // Kernel to netd: ping and TCP.
    assert!(
        eventually(Duration::from_secs(5), || k
            .ns
            .run_ok("busybox", &["ping", "-c", "1", "-W", "1", &web.to_string()])
            .is_ok()),
        "the vxlan device cannot ping the netd container"
    );
    let page = k.http_get(&format!("http://{web}/")).unwrap();
    assert!(page.contains("hello from netd-test"), "{page}");
    // netd to kernel: ping and TCP (the machine serves over vx0).
    let _served = k.serve_http().unwrap();
    a.dockerd()
        .docker(&["exec", "web", "ping", "-c", "1", "-W", "2", k_addr])
        .unwrap();
    let page = a
        .dockerd()
        .docker(&[
            "exec",
            "web",
            "timeout",
            "10",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{k_addr}/"),
        ])
        .unwrap();
    assert!(page.contains("hello from the LAN"), "{page}");
}
