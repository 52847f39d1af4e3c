//! The cluster store against a real etcd on an emulated LAN: networks get
//! cluster-unique VNIs and non-overlapping subnets, hosts claiming
//! addresses at the same moment never get the same one, and a host's record
//! lives on its lease.
use std::{net::Ipv4Addr, time::Duration};

use netd::cluster::{AddressClaim, HostRecord, NetworkRequest, Store};
use netd_tests::{
    etcd::Etcd,
    eventually,
    netd::{netd_binary, NetdOptions},
    privileged, Bench, DockerMode, Host, NetNs,
};

/// Runs `f` with a store client opened from inside `ns` (a host's view of
/// the LAN), on a runtime of its own.
fn from_host<T: Send>(
    ns: &NetNs,
    endpoint: &str,
    f: impl AsyncFnOnce(&mut Store) -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut store = Store::connect(&[endpoint.to_owned()], Duration::from_secs(3)).await?;
            f(&mut store).await
        })
    })
}

fn request(id: &str, subnet: (Ipv4Addr, u8)) -> NetworkRequest {
    NetworkRequest {
        id: id.into(),
        origin: "a".into(),
        mode: "overlay".into(),
        subnet,
        gateway: None,
        vni: None,
        internal: false,
        parent: String::new(),
        vlan: 0,
        ip_range: None,
        block: None,
        ipvlan_mode: String::new(),
    }
}

#[test]
fn networks_and_addresses_are_unique_across_hosts() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(12).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = Host::plain(&bench, &lan, "a", 1).unwrap();
    let b = Host::plain(&bench, &lan, "b", 2).unwrap();
    let ep = etcd.endpoint();

    // Nobody at that address: a clear error, in bounded time.
    let err = from_host(&a.ns, "http://198.18.12.99:2379", async |_| Ok(()))
        .expect_err("connecting to nothing must fail")
        .to_string();
    assert!(err.contains("198.18.12.99:2379"), "{err}");

    let ov = (Ipv4Addr::new(198, 19, 66, 0), 24);
    let record = from_host(&a.ns, &ep, async |s| {
        s.create_network(&request("ov", ov)).await
    })
    .unwrap();
    assert_eq!(record.vni, 4096);
    assert_eq!(record.gateway, Ipv4Addr::new(198, 19, 66, 1));
    // The same request from another host is the same network.
    let again = from_host(&b.ns, &ep, async |s| {
        s.create_network(&request("ov", ov)).await
    })
    .unwrap();
    assert_eq!(again, record);
    // What clashes is refused with the reason.
    let half = (Ipv4Addr::new(198, 19, 66, 128), 25);
    let err = from_host(&b.ns, &ep, async |s| {
        s.create_network(&request("ov2", half)).await
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("overlaps network ov"), "{err}");
    let mut clash = request("ov3", (Ipv4Addr::new(198, 19, 67, 0), 24));
    clash.vni = Some(4096);
    let err = from_host(&b.ns, &ep, async |s| s.create_network(&clash).await)
        .unwrap_err()
        .to_string();
    assert!(err.contains("VNI 4096"), "{err}");

    // Six creations at once from both hosts, all for one subnet: exactly
    // one wins, the others are told which network has it. Six more for
    // distinct subnets: all win, with six different VNIs.
    let race = |i: usize, third: u8| {
        let ns = NetNs::open([&a, &b][i % 2].ns.path()).unwrap();
        let ep = ep.clone();
        std::thread::spawn(move || {
            let req = request(
                &format!("race-{third}-{i}"),
                (Ipv4Addr::new(198, 19, third, 0), 24),
            );
            from_host(&ns, &ep, async move |s| s.create_network(&req).await)
        })
    };
    let same: Vec<_> = (0..6).map(|i| race(i, 70)).collect();
    let results: Vec<_> = same.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(e.to_string().contains("overlaps network race-70-"), "{e}");
    }
    let distinct: Vec<_> = (0..6).map(|i| race(i, 71 + i as u8)).collect();
    let mut vnis: Vec<u32> = distinct
        .into_iter()
        .map(|t| t.join().unwrap().unwrap().vni)
        .collect();
    vnis.sort();
    vnis.dedup();
    assert_eq!(vnis.len(), 6, "a VNI was handed out twice");

    // Eight claimers, from both hosts, at once, ten claims each on a /26
    // (61 addresses besides the gateway): 61 claims succeed, all
    // different; the rest are told the pool is exhausted.
    let small = (Ipv4Addr::new(198, 19, 68, 0), 26);
    from_host(&a.ns, &ep, async |s| {
        s.create_network(&request("small", small)).await
    })
    .unwrap();
    let claimers: Vec<_> = (0..8)
        .map(|i| {
            let host = if i % 2 == 0 { "a" } else { "b" };
            let ns = NetNs::open([&a, &b][i % 2].ns.path()).unwrap();
            let ep = ep.clone();
            std::thread::spawn(move || {
                from_host(&ns, &ep, async move |s| {
                    let mut got = Vec::new();
                    let mut refusals = Vec::new();
                    for j in 0..10 {
                        let who = AddressClaim {
                            host: host.into(),
                            owner: format!("{i}-{j}"),
                        };
                        match s.claim_address("small", &who).await {
                            Ok(addr) => got.push(addr),
                            Err(e) => refusals.push(e.to_string()),
                        }
                    }
                    Ok((got, refusals))
                })
                .unwrap()
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in claimers {
        let (got, refused) = t.join().unwrap();
        all.extend(got);
        for r in refused {
            assert!(r.contains("exhausted"), "{r}");
        }
    }
    assert_eq!(all.len(), 61, "{all:?}");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 61, "an address was handed out twice");
    assert!(!all.contains(&Ipv4Addr::new(198, 19, 68, 1)), "the gateway");
    // What the store holds is readable with etcdctl.
    let keys = etcd
        .ctl(&["get", "--prefix", "--keys-only", "/netd/v1/addrs/small/"])
        .unwrap();
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 61);

    // A released address is handed out again; a deleted network takes its
    // claims and VNI with it.
    let freed = all[10];
    let held = from_host(&a.ns, &ep, async |s| {
        // Only its holder gives it back: another host's release (a late
        // cleanup) leaves it alone.
        s.release_address("small", freed, "c").await?;
        let still = s.claimed("small").await?.len();
        for host in ["a", "b"] {
            s.release_address("small", freed, host).await?;
        }
        Ok(still)
    })
    .unwrap();
    assert_eq!(
        held, 61,
        "a release by a host that does not hold it took it"
    );
    let who = AddressClaim {
        host: "b".into(),
        owner: "late".into(),
    };
    let reused = from_host(&b.ns, &ep, async |s| s.claim_address("small", &who).await).unwrap();
    assert_eq!(reused, freed);
    // Not deleted while hosts hold addresses of it (Docker checks only its
    // own host's containers).
    let err = from_host(&b.ns, &ep, async |s| s.delete_network("small").await)
        .unwrap_err()
        .to_string();
    assert!(err.contains("still has endpoints on a, b"), "{err}");
    from_host(&a.ns, &ep, async |s| {
        for addr in s.claimed("small").await? {
            for host in ["a", "b"] {
                s.release_address("small", addr, host).await?;
            }
        }
        Ok(())
    })
    .unwrap();
    from_host(&b.ns, &ep, async |s| s.delete_network("small").await).unwrap();
    assert!(etcd
        .ctl(&["get", "--prefix", "--keys-only", "/netd/v1/addrs/small/"])
        .unwrap()
        .trim()
        .is_empty());
    let vni = from_host(&a.ns, &ep, async |s| {
        Ok(s.create_network(&request("small", small)).await?.vni)
    })
    .unwrap();
    assert!(
        !vnis.contains(&vni),
        "the lowest free VNI ({vni}) is nobody else's"
    );
    // 4096 ov, 4097 the race's winner, 4098-4103 the six others, 4104 the
    // deleted network's, free again.
    assert_eq!(vni, 4104, "the lowest free VNI");
}

/// A host's record lives on its lease: kept while its netd keeps the lease
/// alive, gone within the TTL once it stops, gone at once when withdrawn.
#[test]
fn hosts_come_and_go_with_their_lease() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(13).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let a = Host::plain(&bench, &lan, "a", 1).unwrap();
    let b = Host::plain(&bench, &lan, "b", 2).unwrap();
    let ep = etcd.endpoint();
    let nodes = || {
        from_host(&b.ns, &ep, async |s| {
            Ok(s.hosts()
                .await?
                .into_iter()
                .map(|h| h.node)
                .collect::<Vec<_>>())
        })
        .unwrap()
    };

    // Host a registers with a 2 s lease and keeps it until told to stop,
    // then vanishes without a word (as a crash would).
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let a_ns = NetNs::open(a.ns.path()).unwrap();
    let a_ep = ep.clone();
    let host_a = std::thread::spawn(move || {
        from_host(&a_ns, &a_ep, async move |s| {
            let record = HostRecord {
                node: "a".into(),
                vtep: Ipv4Addr::new(198, 18, 13, 1),
                mac: None,
                modes: Vec::new(),
            };
            let lease = s.register_host(&record, Duration::from_secs(2)).await?;
            while stop_rx.try_recv().is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            drop(lease);
            Ok(())
        })
    });
    assert!(eventually(Duration::from_secs(10), || nodes() == ["a"]));
    // Longer than the TTL: kept alive.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(nodes(), ["a"]);
    stop_tx.send(()).unwrap();
    host_a.join().unwrap().unwrap();
    assert!(
        eventually(Duration::from_secs(8), || nodes().is_empty()),
        "a's record outlived its lease"
    );

    // A clean shutdown withdraws at once.
    from_host(&b.ns, &ep, async |s| {
        let record = HostRecord {
            node: "b".into(),
            vtep: Ipv4Addr::new(198, 18, 13, 2),
            mac: None,
            modes: Vec::new(),
        };
        let lease = s.register_host(&record, Duration::from_secs(30)).await?;
        anyhow::ensure!(s.hosts().await?.len() == 1, "b not registered");
        s.withdraw_host(lease).await?;
        anyhow::ensure!(s.hosts().await?.is_empty(), "b still registered");
        Ok(())
    })
    .unwrap();

    // A host of a release that runs overlay networks only (its record
    // lists no modes) would take a macvlan network for an overlay one: its
    // creation is refused while that host is in the cluster.
    let err = from_host(&b.ns, &ep, async |s| {
        let old = HostRecord {
            node: "old".into(),
            vtep: Ipv4Addr::new(198, 18, 13, 3),
            mac: None,
            modes: Vec::new(),
        };
        let lease = s.register_host(&old, Duration::from_secs(30)).await?;
        let mut req = request("mv", (Ipv4Addr::new(198, 19, 67, 0), 24));
        req.mode = "macvlan".into();
        req.parent = "eth0".into();
        let refused = s.create_network(&req).await;
        let overlay = s
            .create_network(&request("ov2", (Ipv4Addr::new(198, 19, 68, 0), 24)))
            .await;
        s.withdraw_host(lease).await?;
        anyhow::ensure!(overlay.is_ok(), "overlay refused: {overlay:?}");
        Ok(format!(
            "{:#}",
            refused.expect_err("created with an old host")
        ))
    })
    .unwrap();
    assert!(
        err.contains("host old runs a netd release without macvlan networks"),
        "{err}"
    );
}

/// `netd run --etcd`: an unreachable store at start is a one-line error; a
/// running daemon's host record is in etcd, and it is withdrawn within the
/// lease TTL once the daemon is killed, and back when it restarts.
#[test]
fn a_daemon_joins_the_cluster_and_is_withdrawn_with_its_lease() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(14).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let mut host = Host::docker(&bench, &lan, "h1", 1, [198, 19, 14], DockerMode::Netd).unwrap();

    let pin = bench.bpffs().join("unreachable").display().to_string();
    let docker_host = host.dockerd().host();
    let out = host
        .ns
        .command(netd_binary().unwrap())
        .args(["run", "--uplink", "eth0", "--pin-dir", &pin])
        .args(["--docker-host", &docker_host])
        .args(["--etcd", "http://198.18.14.99:2379", "--node-name", "h1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    assert!(
        stderr.starts_with("netd: etcd at http://198.18.14.99:2379"),
        "{stderr}"
    );

    host.start_netd_with(
        &bench,
        NetdOptions {
            args: [
                "--etcd",
                &etcd.endpoint(),
                "--node-name",
                "h1",
                "--etcd-lease-ttl",
                "2",
                "--resync-interval",
                "1",
            ]
            .map(String::from)
            .to_vec(),
            ..NetdOptions::default()
        },
    )
    .unwrap();

    // A network this host created that its Docker never listed (dockerd
    // failed right after CreateNetwork) is collected after two resyncs; one
    // Docker lists stays, named.
    let ghost = "f".repeat(64);
    from_host(&host.ns, &etcd.endpoint(), async |store| {
        let mut req = request(&ghost, (Ipv4Addr::new(198, 19, 140, 0), 24));
        req.origin = "h1".into();
        store.create_network(&req).await.map(|_| ())
    })
    .unwrap();
    host.create_netd_network("kept", "198.19.141.0/24", &[])
        .unwrap();
    let networks = || {
        etcd.ctl(&["get", "--prefix", "--keys-only", "/netd/v1/networks/"])
            .unwrap()
    };
    assert!(networks().contains(&ghost));
    assert!(
        eventually(Duration::from_secs(10), || !networks().contains(&ghost)),
        "a network Docker never listed was not collected"
    );
    assert_eq!(host.netd_networks().unwrap(), ["kept"]);
    assert!(networks()
        .lines()
        .any(|k| k.starts_with("/netd/v1/networks/")));

    let record = || {
        etcd.ctl(&["get", "--print-value-only", "/netd/v1/hosts/h1"])
            .unwrap()
    };
    assert!(record().contains("198.18.14.1"), "{}", record());
    // Alive past the TTL while the daemon runs.
    std::thread::sleep(Duration::from_secs(4));
    assert!(record().contains("198.18.14.1"));
    host.netd().kill();
    assert!(
        eventually(Duration::from_secs(10), || record().trim().is_empty()),
        "a killed daemon's host record outlived its lease"
    );
    host.netd().start_again().unwrap();
    assert!(eventually(Duration::from_secs(10), || record().contains("198.18.14.1")));

    // A restart between CreateEndpoint and Join: a record of this host
    // whose veth is missing at start waits for its Join (the veth appearing)
    // before it is withdrawn; one whose Join never comes is withdrawn.
    let network = host
        .dockerd()
        .docker(&["network", "inspect", "--format", "{{.Id}}", "kept"])
        .unwrap();
    host.netd().kill();
    let endpoint = |id: char, last: u8| netd::cluster::EndpointRecord {
        network: network.clone(),
        addr: Ipv4Addr::new(198, 19, 141, last),
        mac: [2, 0x4e, 198, 19, 141, last],
        host: "h1".into(),
        vtep: Ipv4Addr::new(198, 18, 14, 1),
        endpoint: id.to_string().repeat(64),
    };
    from_host(&host.ns, &etcd.endpoint(), async |store| {
        store.put_endpoint(&endpoint('a', 50), 0).await?;
        store.put_endpoint(&endpoint('b', 51), 0).await
    })
    .unwrap();
    host.netd().start_again().unwrap();
    host.ns
        .run_ok(
            "ip",
            &[
                "link",
                "add",
                "ndaaaaaaaaaaa",
                "type",
                "veth",
                "peer",
                "name",
                // Not nc…: Docker has taken the container's end (an nc…
                // peer here means its container is gone).
                "eth0-of-a",
            ],
        )
        .unwrap();
    let endpoints = || {
        etcd.ctl(&["get", "--prefix", "--keys-only", "/netd/v1/endpoints/"])
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(20), || !endpoints()
            .contains(&"b".repeat(64))),
        "an endpoint whose Join never came was not withdrawn"
    );
    assert!(
        endpoints().contains(&"a".repeat(64)),
        "an endpoint whose Join came late was withdrawn"
    );
    let _ = host.ns.run("ip", &["link", "del", "ndaaaaaaaaaaa"]);
}
