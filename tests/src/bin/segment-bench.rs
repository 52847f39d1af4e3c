//! `cargo xtask bench segment`: containers on the hosts' own LAN. netd's
//! macvlan mode (demux by MAC in eBPF on the parent) against Docker's own
//! macvlan driver (kernel macvlan devices, bridge mode), side by side on
//! one emulated LAN, for a LAN machine reaching a container and for a
//! container reaching one on another host.
//!
//! Then, container to container across two hosts: netd's routed mode
//! against netd's overlay on the same two hosts, and against kernel
//! routing over hand-made static routes between two hosts' bridges (the
//! seeds' recipe: a subnet per host, `ip route add` of the other's).
//!
//! Every server is the same static echo/discard process in the container's
//! namespace, pinned with the load generator to one CPU; both drivers'
//! containers are real Docker containers on a user-defined network (so
//! both carry Docker's embedded-DNS netfilter rules). Results: a table on
//! stdout (ratios to kernel macvlan), and target/bench/segment.json.
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{bail, Context as _, Result};
use netd_tests::{
    bench::{self, echo_server, ratio, Target},
    docker::DockerMode,
    etcd::Etcd,
    Bench, Host, NetNs,
};
use serde_json::json;

const RUN: Duration = Duration::from_secs(3);
const REPEATS: usize = 3;
/// netd's network and Docker's, two subnets on the one LAN.
const NETD_SUBNET: &str = "198.18.94.0/24";
const KERNEL_SUBNET: &str = "198.18.93.0/24";
/// netd's container addresses (one range for the whole cluster).
const NETD_RANGE: &str = "198.18.94.0/25";

const ROUTED_SUBNET: &str = "198.19.128.0/17";
const OVERLAY_SUBNET: &str = "198.19.100.0/24";
/// The static-routes hosts' bridge subnets: 198.19.<n>.0/24.
const STATIC_SUBNETS: [u8; 2] = [106, 107];

/// (scenario, netd target, kernel target).
const SCENARIOS: [(&str, &str, &str); 2] = [
    ("LAN machine to container", "netd lan", "kernel lan"),
    (
        "container to container, two hosts",
        "netd cross-host",
        "kernel cross-host",
    ),
];

fn main() {
    if let Err(e) = run() {
        eprintln!("segment-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let echo = PathBuf::from(std::env::var("NETD_BENCH_ECHO").context(
        "NETD_BENCH_ECHO must name the static echo server (cargo xtask bench segment builds it)",
    )?);
    let bench = Bench::new()?;
    let lan = bench.lan(42)?;
    let etcd = Etcd::start(&bench, &lan, 250)?;

    // netd: two hosts, one macvlan network on their LAN interface.
    let a = Host::cluster_member(&bench, &lan, "a", 1, &etcd.endpoint(), &[])?;
    let b = Host::cluster_member(&bench, &lan, "b", 2, &etcd.endpoint(), &[])?;
    a.create_netd_network(
        "seg",
        NETD_SUBNET,
        &[
            "-o",
            "netd.mode=macvlan",
            "-o",
            "parent=eth0",
            "--ip-range",
            NETD_RANGE,
        ],
    )?;
    if !b.sees_netd_networks(&["seg"], Duration::from_secs(10)) {
        bail!("the network never reached host b");
    }
    // Docker's macvlan driver: two stock hosts, the same network on each
    // (Docker's macvlan is per host; the --ip-range halves keep the two
    // hosts' addresses apart, as an operator has to).
    let c = Host::docker(
        &bench,
        &lan,
        "c",
        3,
        [198, 19, 3],
        DockerMode::StockIptables,
    )?;
    let d = Host::docker(
        &bench,
        &lan,
        "d",
        4,
        [198, 19, 4],
        DockerMode::StockIptables,
    )?;
    lan.plain_switch()?;
    for (h, range) in [(&c, "198.18.93.0/26"), (&d, "198.18.93.64/26")] {
        h.dockerd().docker(&[
            "network",
            "create",
            "-d",
            "macvlan",
            "-o",
            "parent=eth0",
            "--subnet",
            KERNEL_SUBNET,
            "--ip-range",
            range,
            "seg",
        ])?;
    }
    for (name, subnet, mode) in [
        ("rt", ROUTED_SUBNET, "netd.mode=routed"),
        ("ov", OVERLAY_SUBNET, "netd.mode=overlay"),
    ] {
        a.create_netd_network(name, subnet, &["-o", mode])?;
    }
    if !b.sees_netd_networks(&["ov", "rt", "seg"], Duration::from_secs(10)) {
        bail!("the routed and overlay networks never reached host b");
    }
    let machine = Host::plain(&bench, &lan, "lanbox", 5)?;
    for cidr in ["198.18.94.250/24", "198.18.93.250/24"] {
        machine
            .ns
            .run_ok("ip", &["addr", "add", cidr, "dev", "eth0"])?;
    }

    let sleeper = |h: &Host, name: &str, net: &str| -> Result<NetNs> {
        h.dockerd()
            .run(name, &["--network", net], &["sleep", "3600"])?;
        NetNs::open(&h.dockerd().netns_of(name)?)
    };
    let netd_server = sleeper(&a, "server", "seg")?;
    let netd_client = sleeper(&b, "client", "seg")?;
    let kernel_server = sleeper(&c, "server", "seg")?;
    let kernel_client = sleeper(&d, "client", "seg")?;
    let routed_server = sleeper(&a, "server-rt", "rt")?;
    let routed_client = sleeper(&b, "client-rt", "rt")?;
    let overlay_server = sleeper(&a, "server-ov", "ov")?;
    let overlay_client = sleeper(&b, "client-ov", "ov")?;
    // Static routes between two plain hosts' bridges, endpoints with the
    // netfilter rules Docker gives its containers.
    let docker_rules = routed_client.run_ok("iptables-save", &[])?;
    if !docker_rules.contains("*nat") || !docker_rules.contains("127.0.0.11") {
        bail!("no embedded-DNS NAT rules in a netd container to copy:\n{docker_rules}");
    }
    let e = Host::plain(&bench, &lan, "e", 6)?;
    let f = Host::plain(&bench, &lan, "f", 7)?;
    let static_addr = |i: usize, host: u8| Ipv4Addr::new(198, 19, STATIC_SUBNETS[i], host);
    let mut static_ns = Vec::new();
    for (i, (h, other)) in [(&e, &f), (&f, &e)].into_iter().enumerate() {
        let ip = |args: &[&str]| h.ns.run_ok("ip", args).map(|_| ());
        h.ns.sysctl("net.ipv4.ip_forward", "1")?;
        // Plain kernel routing: no netfilter on the bridge (the stock
        // dockerds load br_netfilter, which a new namespace then applies).
        for family in ["iptables", "ip6tables", "arptables"] {
            let key = format!("net.bridge.bridge-nf-call-{family}");
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            if h.ns.enter(|| Ok(std::path::Path::new(&path).exists()))? {
                h.ns.sysctl(&key, "0")?;
            }
        }
        ip(&["link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", static_addr(i, 1)),
            "dev",
            "br0",
        ])?;
        ip(&["link", "set", "br0", "up"])?;
        let theirs = format!("{}/24", static_addr(1 - i, 0));
        ip(&["route", "add", &theirs, "via", &other.ip.to_string()])?;
        let mac = format!("02:42:c6:13:{:02x}:02", STATIC_SUBNETS[i]);
        let ns =
            bench::bridge_endpoint(&bench, h, &format!("st{i}"), static_addr(i, 2), 1500, &mac)?;
        ns.run_ok(
            "ip",
            &[
                "route",
                "add",
                "default",
                "via",
                &static_addr(i, 1).to_string(),
            ],
        )?;
        bench::restore_netfilter(&ns, &docker_rules)?;
        static_ns.push(ns);
    }
    let static_client = static_ns.pop().context("static client")?;
    let static_server = static_ns.pop().context("static server")?;
    lan.plain_switch()?;
    let _servers = [
        echo_server(&netd_server, &echo)?,
        echo_server(&kernel_server, &echo)?,
        echo_server(&routed_server, &echo)?,
        echo_server(&overlay_server, &echo)?,
        echo_server(&static_server, &echo)?,
    ];
    let (netd_addr, kernel_addr) = (a.container_addr("server")?, c.container_addr("server")?);
    let targets = [
        Target {
            name: "netd lan",
            client: machine.ns.handle()?,
            server: netd_addr,
        },
        Target {
            name: "kernel lan",
            client: machine.ns.handle()?,
            server: kernel_addr,
        },
        Target {
            name: "netd cross-host",
            client: netd_client,
            server: netd_addr,
        },
        Target {
            name: "kernel cross-host",
            client: kernel_client,
            server: kernel_addr,
        },
        Target {
            name: "netd routed",
            client: routed_client,
            server: a.container_addr("server-rt")?,
        },
        Target {
            name: "netd overlay",
            client: overlay_client,
            server: a.container_addr("server-ov")?,
        },
        Target {
            name: "kernel static routes",
            client: static_client,
            server: static_addr(0, 2),
        },
    ];
    let results = bench::measure(&targets, REPEATS, RUN)?;
    print_table(&results);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let doc = json!({
        "results": results,
        "run_seconds": RUN.as_secs(),
        "repeats": REPEATS,
    });
    std::fs::write(
        dir.join("segment.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    eprintln!("wrote {}/segment.json", dir.display());
    Ok(())
}

fn print_table(results: &bench::Results) {
    println!(
        "\n{:<36} {:<22} {:>14} {:>16} {:>12}",
        "scenario", "metric", "netd macvlan", "kernel macvlan", "netd/kernel"
    );
    for (scenario, netd, kernel) in SCENARIOS {
        for (metric, row) in results {
            let get = |k: &str| row.get(k).copied().unwrap_or(0.0);
            println!(
                "{scenario:<36} {metric:<22} {:>14.1} {:>16.1} {:>12}",
                get(netd),
                get(kernel),
                ratio(get(netd), get(kernel)),
            );
        }
    }
    println!(
        "\n{:<22} {:>12} {:>12} {:>14} {:>14} {:>14}",
        "container to container",
        "netd routed",
        "netd overlay",
        "static routes",
        "vs overlay",
        "vs static"
    );
    for (metric, row) in results {
        let get = |k: &str| row.get(k).copied().unwrap_or(0.0);
        let routed = get("netd routed");
        println!(
            "{metric:<22} {routed:>12.1} {:>12.1} {:>14.1} {:>14} {:>14}",
            get("netd overlay"),
            get("kernel static routes"),
            ratio(routed, get("netd overlay")),
            ratio(routed, get("kernel static routes")),
        );
    }
}
