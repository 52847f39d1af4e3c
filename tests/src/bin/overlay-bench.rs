//! `cargo xtask bench overlay`: container to container across two hosts,
//! netd's overlay against the kernel's (the datapath Docker's overlay
//! driver builds: a Linux bridge and a vxlan device with static FDB and
//! neighbour entries, the seed's manual recipe), and a same-host pair on one
//! Linux bridge as the floor, in one run on one emulated LAN.
//!
//! Docker's own overlay needs swarm mode, whose control plane (raft,
//! gossip, the ingress network) is not what is measured here; its datapath
//! is reproduced by hand instead, with Docker's settings (VNI, port 4789,
//! no UDP checksum, MTU 1450). The same static echo/discard server runs in
//! every case, pinned with the load generator to one CPU. Also measured:
//! how long a container started with `docker run` on one host takes to be
//! reachable from a container on another (netd).
//! Results: a table on stdout (ratios to the kernel overlay), and
//! target/bench/overlay.json.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use netd_tests::{
    bench::{self, echo_server, median, ratio, Target, ECHO},
    etcd::Etcd,
    Bench, Host, NetNs,
};
use serde_json::json;

const RUN: Duration = Duration::from_secs(3);
/// Targets interleaved, the median of the repeats kept.
const REPEATS: usize = 3;
/// Containers started for the time-to-reachable measurement.
const STARTS: usize = 20;
const KERNEL_VNI: &str = "42";
const SUBNET_NETD: &str = "198.19.200.0/24";
const SUBNET_KERNEL: [u8; 3] = [198, 19, 201];

fn main() {
    if let Err(e) = run() {
        eprintln!("overlay-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let echo = PathBuf::from(std::env::var("NETD_BENCH_ECHO").context(
        "NETD_BENCH_ECHO must name the static echo server (cargo xtask bench overlay builds it)",
    )?);
    let bench = Bench::new()?;
    let lan = bench.lan(41)?;
    let etcd = Etcd::start(&bench, &lan, 250)?;

    // netd: two hosts, one overlay network.
    let a = Host::cluster_member(&bench, &lan, "a", 1, &etcd.endpoint(), &[])?;
    let b = Host::cluster_member(&bench, &lan, "b", 2, &etcd.endpoint(), &[])?;
    a.create_netd_network("ov", SUBNET_NETD, &[])?;
    if !b.sees_netd_networks(&["ov"], Duration::from_secs(10)) {
        bail!("the network never reached host b");
    }
    let mount = format!("{}:/echo:ro", echo.display());
    // The servers (and clients) of every target are the same plain
    // processes in the endpoint's namespace: a container only holds the
    // namespace, so its seccomp filter and cgroup are not measured.
    b.dockerd()
        .run("echo", &["--network", "ov"], &["sleep", "3600"])?;
    a.dockerd()
        .run("client", &["--network", "ov"], &["sleep", "3600"])?;
    b.dockerd()
        .run("client-b", &["--network", "ov"], &["sleep", "3600"])?;
    let netd_server = b.container_addr("echo")?;
    let container_ns =
        |h: &Host, name: &str| -> Result<NetNs> { NetNs::open(&h.dockerd().netns_of(name)?) };

    // The kernel's overlay: hosts c and d, a bridge and a vxlan device each.
    let c = Host::plain(&bench, &lan, "c", 3)?;
    let d = Host::plain(&bench, &lan, "d", 4)?;
    for h in [&c, &d] {
        kernel_overlay(h)?;
    }
    let kernel_addr =
        |host: u8| Ipv4Addr::new(SUBNET_KERNEL[0], SUBNET_KERNEL[1], SUBNET_KERNEL[2], host);
    // MTU 1450, as Docker's overlay gives its containers.
    let endpoint = |h: &Host, role: &str, host: u8| {
        bench::bridge_endpoint(
            &bench,
            h,
            role,
            kernel_addr(host),
            1450,
            &kernel_mac(kernel_addr(host)),
        )
    };
    let server_ns = endpoint(&d, "ks", 2)?;
    let client_ns = endpoint(&c, "kc", 3)?;
    let floor_ns = endpoint(&d, "kf", 4)?;
    // Static FDB and neighbour entries, as Docker's overlay programs them.
    for (host, remote, addr, ns) in [
        (&c, &d, kernel_addr(2), &client_ns),
        (&d, &c, kernel_addr(3), &server_ns),
    ] {
        let mac = kernel_mac(addr);
        host.ns.run_ok(
            "bridge",
            &[
                "fdb",
                "append",
                &mac,
                "dev",
                "vxlan0",
                "dst",
                &remote.ip.to_string(),
            ],
        )?;
        ns.run_ok(
            "ip",
            &[
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )?;
    }
    // Docker gives every container on a user-defined network netfilter
    // rules in its namespace (the embedded DNS's NAT), so conntrack runs on
    // each of its packets; Docker's own overlay containers have them too.
    // The kernel overlay's endpoints get the same rules.
    let docker_rules = container_ns(&a, "client")?.run_ok("iptables-save", &[])?;
    if !docker_rules.contains("*nat") || !docker_rules.contains("127.0.0.11") {
        bail!("no embedded-DNS NAT rules in a netd container to copy:\n{docker_rules}");
    }
    for ns in [&server_ns, &client_ns, &floor_ns] {
        bench::restore_netfilter(ns, &docker_rules)?;
    }
    let _servers = [
        echo_server(&container_ns(&b, "echo")?, &echo)?,
        echo_server(&server_ns, &echo)?,
    ];

    let targets = [
        Target {
            name: "netd overlay",
            client: container_ns(&a, "client")?,
            server: netd_server,
        },
        Target {
            name: "kernel overlay",
            client: client_ns,
            server: kernel_addr(2),
        },
        Target {
            name: "same-host bridge",
            client: floor_ns,
            server: kernel_addr(2),
        },
    ];
    let results = bench::measure(&targets, REPEATS, RUN)?;

    let reachable = time_to_reachable(&a, &container_ns(&b, "client-b")?, &mount)?;
    print_table(&results, &reachable);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let doc = json!({
        "results": results,
        "reachable_ms": reachable,
        "run_seconds": RUN.as_secs(),
        "repeats": REPEATS,
    });
    std::fs::write(
        dir.join("overlay.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    eprintln!("wrote {}/overlay.json", dir.display());
    Ok(())
}

/// MACs of the kernel overlay's endpoints: locally administered, then the
/// address.
fn kernel_mac(addr: Ipv4Addr) -> String {
    let o = addr.octets();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// br0 with vxlan0 (Docker's overlay settings) on `host`.
fn kernel_overlay(host: &Host) -> Result<()> {
    let ip = |args: &[&str]| host.ns.run_ok("ip", args).map(|_| ());
    ip(&["link", "add", "br0", "type", "bridge"])?;
    ip(&["link", "set", "br0", "up"])?;
    ip(&[
        "link",
        "add",
        "vxlan0",
        "type",
        "vxlan",
        "id",
        KERNEL_VNI,
        "local",
        &host.ip.to_string(),
        "dstport",
        "4789",
        "nolearning",
        "noudpcsum",
    ])?;
    ip(&[
        "link", "set", "vxlan0", "master", "br0", "mtu", "1450", "up",
    ])?;
    Ok(())
}

/// `docker run` of an echo server on `host` (its address fixed with --ip);
/// once it returns, connects from `client` (on another host) until one
/// succeeds. Per container: from the `docker run` command's start, and from
/// its return (the container running), to the first answered connection;
/// median and p99 of each.
fn time_to_reachable(
    host: &Host,
    client: &NetNs,
    mount: &str,
) -> Result<BTreeMap<&'static str, f64>> {
    let (mut from_run, mut from_started) = (Vec::new(), Vec::new());
    for i in 0..STARTS {
        let addr = Ipv4Addr::new(198, 19, 200, 100 + i as u8);
        let name = format!("late{i}");
        let started = Instant::now();
        host.dockerd().run(
            &name,
            &["--network", "ov", "--ip", &addr.to_string(), "-v", mount],
            &["/echo"],
        )?;
        let running = Instant::now();
        // Probed once the container runs: an address asked for before it
        // exists is unknown everywhere, its ARP unanswered, and the asker's
        // kernel asks again only a second later.
        let ns = client.handle()?;
        let target = SocketAddrV4::new(addr, ECHO);
        let prober = std::thread::spawn(move || -> Result<Instant> {
            ns.enter(|| loop {
                if std::net::TcpStream::connect_timeout(&target.into(), Duration::from_millis(50))
                    .is_ok()
                {
                    return Ok(Instant::now());
                }
                if running.elapsed() > Duration::from_secs(30) {
                    bail!("{target} never answered");
                }
                std::thread::sleep(Duration::from_millis(1));
            })
        });
        let reached = prober.join().expect("prober thread")?;
        from_run.push(reached.duration_since(started).as_secs_f64() * 1e3);
        from_started.push(reached.saturating_duration_since(running).as_secs_f64() * 1e3);
        host.dockerd().docker(&["rm", "-f", &name])?;
    }
    let p99 = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[(v.len() * 99).div_ceil(100) - 1]
    };
    Ok(BTreeMap::from([
        ("from docker run, median", median(from_run.clone())),
        ("from docker run, p99", p99(from_run)),
        (
            "after docker run returned, median",
            median(from_started.clone()),
        ),
        ("after docker run returned, p99", p99(from_started)),
    ]))
}

fn print_table(results: &bench::Results, reachable: &BTreeMap<&str, f64>) {
    println!(
        "\n{:<22} {:>14} {:>16} {:>18} {:>12} {:>12}",
        "metric", "netd overlay", "kernel overlay", "same-host bridge", "netd/kernel", "netd/floor"
    );
    for (metric, row) in results {
        let get = |k: &str| row.get(k).copied().unwrap_or(0.0);
        println!(
            "{metric:<22} {:>14.1} {:>16.1} {:>18.1} {:>12} {:>12}",
            get("netd overlay"),
            get("kernel overlay"),
            get("same-host bridge"),
            ratio(get("netd overlay"), get("kernel overlay")),
            ratio(get("netd overlay"), get("same-host bridge")),
        );
    }
    println!(
        "\nnetd: a container started on one host, reachable from another (ms, {STARTS} containers)"
    );
    for (k, v) in reachable {
        println!("  {k:<36} {v:>8.1}");
    }
}
