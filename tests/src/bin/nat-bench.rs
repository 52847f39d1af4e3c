//! `cargo xtask bench nat`: published-port performance of netd against
//! stock Docker, side by side on one emulated LAN, in one run.
//!
//! Hosts: stock Docker with iptables NAT (userland proxy off), stock Docker
//! with docker-proxy, and Docker with netd. Each runs the same static echo /
//! discard server in a container published on 7000 (echo) and 9000
//! (discard). A client on the LAN measures RR, CRR and bulk throughput, then
//! RR and CRR again with 1,000 and 10,000 published ports on the host, and
//! how soon a newly started container's port answers. The
//! per-packet cost of each netd program path is measured with
//! BPF_PROG_TEST_RUN against a bare redirect program (the local floor).
//! Results: a table on stdout (ratios to the iptables host), and
//! target/bench/nat.json + nat.svg.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use netd::dataplane::{bare_redirect_cost, Dataplane, LoadOptions};
use netd_common::{
    network::NETWORK_MASQUERADE, Endpoint, Hook, NatConfig, NetworkInfo, PortKey, PortTarget,
};
use netd_tests::{bench, packet::*, Bench, DockerMode, Host};
use serde_json::json;

const RUN: Duration = Duration::from_secs(3);
/// Each measurement is repeated, hosts interleaved, and the median kept:
/// single runs on a shared 2-core machine vary by ±5-10%.
const REPEATS: usize = 5;
const ECHO: u16 = 7000;
const DISCARD: u16 = 9000;

struct Target {
    name: &'static str,
    host: Host,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("nat-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let echo = PathBuf::from(std::env::var("NETD_BENCH_ECHO").context(
        "NETD_BENCH_ECHO must name the static echo server (cargo xtask bench nat builds it)",
    )?);
    let bench = Bench::new()?;
    let lan = bench.lan(9)?;
    let client = Host::plain(&bench, &lan, "client", 100)?;
    let mut targets = vec![
        Target {
            name: "iptables",
            host: Host::docker(
                &bench,
                &lan,
                "stock",
                1,
                [198, 19, 91],
                DockerMode::StockIptables,
            )?,
        },
        Target {
            name: "docker-proxy",
            host: Host::docker(
                &bench,
                &lan,
                "proxy",
                2,
                [198, 19, 92],
                DockerMode::StockProxy,
            )?,
        },
        Target {
            name: "netd",
            host: Host::docker(&bench, &lan, "netd", 3, [198, 19, 93], DockerMode::Netd)?,
        },
    ];
    lan.plain_switch()?;
    targets[2].host.start_netd(&bench)?;
    let _empty_rules = EmptyRuleTablesOnDrop(&targets);
    for t in &targets {
        let mount = format!("{}:/echo:ro", echo.display());
        t.host.dockerd().run(
            "echo",
            &[
                "--cpuset-cpus",
                &bench::CPU.to_string(),
                "-v",
                &mount,
                "-p",
                &format!("{ECHO}:7"),
                "-p",
                &format!("{DISCARD}:9"),
            ],
            &["/echo"],
        )?;
    }
    for t in &targets {
        wait_reachable(&client, SocketAddrV4::new(t.host.ip, ECHO))?;
    }

    let mut samples: BTreeMap<String, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    for round in 0..REPEATS {
        for t in &targets {
            eprintln!("round {}: measuring {} …", round + 1, t.name);
            let echo = SocketAddrV4::new(t.host.ip, ECHO);
            let discard = SocketAddrV4::new(t.host.ip, DISCARD);
            let mut add = |metric: &str, v: f64| {
                samples
                    .entry(metric.into())
                    .or_default()
                    .entry(t.name)
                    .or_default()
                    .push(v);
            };
            add("RR (transactions/s)", bench::rr(&client.ns, echo, RUN)?);
            add("CRR (connections/s)", bench::crr(&client.ns, echo, RUN)?);
            add(
                "bulk (Gbit/s)",
                bench::bulk(&client.ns, discard, RUN)? / 1e9,
            );
        }
    }
    let mut results = medians(samples);

    let reachable = start_to_reachable(&targets, &client, &echo)?;

    // Port scaling: the proxy host would need one process per port; it is
    // measured at 1 port only. `--quick` skips it (Docker with iptables
    // takes about 20 minutes to publish 10,000 ports here).
    let scaling: &[(&str, u16, u16)] = if std::env::args().any(|a| a == "--quick") {
        &[]
    } else {
        &[("1,000", 20_000, 999), ("10,000", 21_000, 9_000)]
    };
    for &(label, first, count) in scaling {
        for t in targets.iter().filter(|t| t.name != "docker-proxy") {
            let started = Instant::now();
            let range = format!(
                "{first}-{}:{first}-{}",
                first + count - 1,
                first + count - 1
            );
            t.host.dockerd().run(
                &format!("ports{first}"),
                &["-p", &range],
                &["sleep", "3600"],
            )?;
            eprintln!(
                "{}: published {count} more ports in {:?}",
                t.name,
                started.elapsed()
            );
        }
        let mut samples: BTreeMap<String, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
        for _ in 0..REPEATS {
            for t in targets.iter().filter(|t| t.name != "docker-proxy") {
                let echo = SocketAddrV4::new(t.host.ip, ECHO);
                wait_reachable(&client, echo)?;
                let mut add = |metric: String, v: f64| {
                    samples
                        .entry(metric)
                        .or_default()
                        .entry(t.name)
                        .or_default()
                        .push(v)
                };
                add(
                    format!("RR with {label} ports"),
                    bench::rr(&client.ns, echo, RUN)?,
                );
                add(
                    format!("CRR with {label} ports"),
                    bench::crr(&client.ns, echo, RUN)?,
                );
            }
        }
        results.extend(medians(samples));
    }

    let costs = program_costs()?;
    print_table(&results, &costs, &reachable);
    write_outputs(&results, &costs, &reachable)?;
    Ok(())
}

/// Removing the containers makes Docker delete its thousands of iptables
/// rules one `iptables` run at a time (as long as adding them took); the
/// hosts' namespaces go away with the bench, so their tables are emptied
/// first, however the bench ends, and Docker's deletions fail fast.
struct EmptyRuleTablesOnDrop<'a>(&'a [Target]);

impl Drop for EmptyRuleTablesOnDrop<'_> {
    fn drop(&mut self) {
        for t in self.0.iter().filter(|t| t.name != "netd") {
            for table in ["nat", "filter"] {
                let _ = t
                    .host
                    .ns
                    .command("iptables")
                    .args(["-w", "-t", table, "-F"])
                    .status();
            }
        }
    }
}

/// Milliseconds from `docker run -d -p` returning (the container is started)
/// until the client's first connection to the port succeeds; median of
/// REPEATS containers per host. Stock Docker installs its rules (or starts
/// its proxy) before the container starts; netd follows Docker's event.
fn start_to_reachable(
    targets: &[Target],
    client: &Host,
    echo: &std::path::Path,
) -> Result<BTreeMap<&'static str, f64>> {
    let mount = format!("{}:/echo:ro", echo.display());
    let mut out = BTreeMap::new();
    for t in targets {
        let mut v = Vec::new();
        for i in 0..REPEATS {
            let port = 7100 + i as u16;
            let addr = SocketAddrV4::new(t.host.ip, port);
            let name = format!("late{i}");
            t.host.dockerd().run(
                &name,
                &[
                    "--cpuset-cpus",
                    &bench::CPU.to_string(),
                    "-v",
                    &mount,
                    "-p",
                    &format!("{port}:7"),
                ],
                &["/echo"],
            )?;
            let started = Instant::now();
            client.ns.enter(|| loop {
                if std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_millis(100))
                    .is_ok()
                {
                    return Ok(());
                }
                if started.elapsed() > Duration::from_secs(30) {
                    bail!("{addr} never answered");
                }
                std::thread::sleep(Duration::from_millis(1));
            })?;
            v.push(started.elapsed().as_secs_f64() * 1e3);
            t.host.dockerd().docker(&["rm", "-f", &name])?;
        }
        out.insert(t.name, median(v));
    }
    Ok(out)
}

/// Per metric and host, the median of the samples.
fn medians(
    samples: BTreeMap<String, BTreeMap<&str, Vec<f64>>>,
) -> BTreeMap<String, BTreeMap<&str, f64>> {
    samples
        .into_iter()
        .map(|(metric, hosts)| {
            let medians = hosts.into_iter().map(|(h, v)| (h, median(v))).collect();
            (metric, medians)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn wait_reachable(client: &Host, addr: SocketAddrV4) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while bench::rr(&client.ns, addr, Duration::from_millis(10)).is_err() {
        if Instant::now() > deadline {
            bail!("{addr} never answered");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// ns per packet of each program path, and of the bare redirect.
fn program_costs() -> Result<Vec<(&'static str, f64)>> {
    const REPEAT: u32 = 1_000_000;
    let host = Ipv4Addr::new(198, 18, 1, 1);
    let peer = Ipv4Addr::new(198, 18, 1, 200);
    let c = Ipv4Addr::new(198, 19, 1, 2);
    let mut dp = Dataplane::load_unpinned(&LoadOptions::default())?;
    dp.set_config(NatConfig {
        host_addr: host.octets(),
        snat_port_min: 61000,
        snat_port_max: 65535,
        ..Default::default()
    })?;
    dp.set_network(
        Ipv4Addr::new(198, 19, 1, 0),
        24,
        NetworkInfo {
            flags: NETWORK_MASQUERADE,
            id: 1,
        },
    )?;
    dp.set_endpoint(
        1,
        Endpoint {
            addr: c.octets(),
            mac: MAC_A,
            _pad: [0; 2],
            network: 1,
        },
    )?;
    dp.set_port(
        PortKey {
            addr: host.octets(),
            port: 8080u16.to_be_bytes(),
            proto: PROTO_TCP,
            _pad: 0,
        },
        PortTarget {
            addr: c.octets(),
            port: 80u16.to_be_bytes(),
            _pad: [0; 2],
        },
    )?;
    let payload = [0u8; 64];
    let inbound = tcp4_frame((peer, 40000), (host, 8080), TCP_ACK, &payload);
    let reply = tcp4_frame((c, 80), (peer, 40000), TCP_ACK, &payload);
    let outbound = tcp4_frame((c, 41000), (peer, 443), TCP_ACK, &payload);
    // Create the flows once, then time established-flow packets.
    dp.test_run(
        Hook::UplinkIngress,
        &tcp4_frame((peer, 40000), (host, 8080), TCP_SYN, b""),
        1,
    )?;
    dp.test_run(Hook::UplinkEgress, &outbound, 1)?;
    let per = |d: Duration| d.as_nanos() as f64;
    let mut costs = vec![(
        "bare redirect (floor)",
        per(bare_redirect_cost(&inbound, REPEAT)?),
    )];
    costs.push((
        "uplink ingress: DNAT, established",
        per(dp
            .test_run(Hook::UplinkIngress, &inbound, REPEAT)?
            .duration_per_run),
    ));
    costs.push((
        "uplink egress: reverse DNAT",
        per(dp
            .test_run(Hook::UplinkEgress, &reply, REPEAT)?
            .duration_per_run),
    ));
    costs.push((
        "uplink egress: masquerade, established",
        per(dp
            .test_run(Hook::UplinkEgress, &outbound, REPEAT)?
            .duration_per_run),
    ));
    costs.push((
        "container egress: checks, no NAT",
        per(dp
            .test_run(Hook::ContainerEgress, &outbound, REPEAT)?
            .duration_per_run),
    ));
    let stranger = tcp4_frame(
        (peer, 1),
        (Ipv4Addr::new(198, 18, 1, 7), 2),
        TCP_ACK,
        &payload,
    );
    costs.push((
        "uplink ingress: not ours",
        per(dp
            .test_run(Hook::UplinkIngress, &stranger, REPEAT)?
            .duration_per_run),
    ));
    Ok(costs)
}

fn print_table(
    results: &BTreeMap<String, BTreeMap<&str, f64>>,
    costs: &[(&str, f64)],
    reachable: &BTreeMap<&str, f64>,
) {
    println!(
        "\n{:<28} {:>12} {:>13} {:>12} {:>9} {:>9}",
        "metric", "iptables", "docker-proxy", "netd", "netd/ipt", "proxy/ipt"
    );
    for (metric, row) in results {
        let get = |k: &str| row.get(k).copied();
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        let ratio = |k: &str| match (get(k), get("iptables")) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!(
            "{metric:<28} {:>12} {:>13} {:>12} {:>9} {:>9}",
            fmt(get("iptables")),
            fmt(get("docker-proxy")),
            fmt(get("netd")),
            ratio("netd"),
            ratio("docker-proxy")
        );
    }
    let ms = |k: &str| reachable.get(k).map_or("-".into(), |v| format!("{v:.1}"));
    println!(
        "{:<28} {:>12} {:>13} {:>12}",
        "reachable after run (ms)",
        ms("iptables"),
        ms("docker-proxy"),
        ms("netd")
    );
    let floor = costs[0].1;
    println!(
        "\n{:<42} {:>10} {:>10}",
        "program path (BPF_PROG_TEST_RUN)", "ns/packet", "vs floor"
    );
    for (name, ns) in costs {
        println!("{name:<42} {ns:>10.1} {:>9.2}x", ns / floor);
    }
}

fn write_outputs(
    results: &BTreeMap<String, BTreeMap<&str, f64>>,
    costs: &[(&str, f64)],
    reachable: &BTreeMap<&str, f64>,
) -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let doc = json!({
        "results": results,
        "program_ns_per_packet": costs.iter().map(|(n, v)| json!({"path": n, "ns": v})).collect::<Vec<_>>(),
        "reachable_after_run_ms": reachable,
        "run_seconds": RUN.as_secs(),
        "repeats": REPEATS,
    });
    std::fs::write(dir.join("nat.json"), serde_json::to_string_pretty(&doc)?)?;
    std::fs::write(dir.join("nat.svg"), svg(results))?;
    eprintln!("wrote {}/nat.json and nat.svg", dir.display());
    Ok(())
}

/// Bars of each metric relative to the iptables host (= 1.0).
fn svg(results: &BTreeMap<String, BTreeMap<&str, f64>>) -> String {
    let hosts = [
        ("iptables", "#888"),
        ("docker-proxy", "#d98"),
        ("netd", "#49c"),
    ];
    let (row_h, bar_h, left, scale) = (48.0, 12.0, 230.0, 220.0);
    let height = 40.0 + row_h * results.len() as f64;
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='760' height='{height}' font-family='sans-serif' font-size='12'>\
         <text x='10' y='20' font-size='14'>netd vs stock Docker (relative to iptables = 1.0)</text>"
    );
    for (i, (metric, row)) in results.iter().enumerate() {
        let y = 36.0 + row_h * i as f64;
        s += &format!("<text x='10' y='{}'>{metric}</text>", y + 20.0);
        let base = row
            .get("iptables")
            .copied()
            .unwrap_or(1.0)
            .max(f64::MIN_POSITIVE);
        for (j, (host, color)) in hosts.iter().enumerate() {
            if let Some(v) = row.get(host) {
                let w = v / base * scale;
                let by = y + j as f64 * bar_h;
                s += &format!(
                    "<rect x='{left}' y='{by}' width='{w:.1}' height='{}' fill='{color}'/>\
                     <text x='{}' y='{}'>{host} {:.2}x</text>",
                    bar_h - 2.0,
                    left + w + 4.0,
                    by + bar_h - 3.0,
                    v / base
                );
            }
        }
    }
    s + "</svg>\n"
}
