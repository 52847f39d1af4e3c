//! The `netd` command line: parsing, dispatch and output.
use std::{fmt::Write as _, path::PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{daemon, dataplane, docker};

/// Default pin dir in bpffs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/netd";

#[derive(Parser, Debug)]
#[command(name = "netd", version, about = "eBPF dataplane for Docker hosts")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of `Run` costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load and attach the datapath and keep it in sync with Docker.
    Run {
        /// Docker API endpoint (unix:///path or tcp://host:port). Defaults to
        /// $DOCKER_HOST, then the standard socket.
        #[arg(long, env = "DOCKER_HOST", default_value = docker::DEFAULT_HOST)]
        docker_host: String,
        /// Interface traffic enters and leaves the host by. Defaults to the
        /// interface of the IPv4 default route.
        #[arg(long)]
        uplink: Option<String>,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Log every datapath decision through aya-log (slow).
        #[arg(long)]
        debug_datapath: bool,
        /// Source ports a masqueraded flow gets when its own is taken. The
        /// default stays clear of Linux's ephemeral range (32768-60999) so
        /// the host's own connections do not collide with them.
        #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
        snat_ports: (u16, u16),
        /// Capacity of the NAT flow table (two entries per flow). Applies
        /// when the table is created; a pinned table keeps its size.
        #[arg(long, default_value_t = netd_common::maps::NAT_CT_MAX)]
        ct_size: u32,
        /// Idle timeout of established TCP flows, seconds.
        #[arg(long, default_value_t = 8000)]
        ct_timeout_tcp: u64,
        /// Idle timeout of TCP flows that never got past SYN, seconds.
        #[arg(long, default_value_t = 60)]
        ct_timeout_tcp_syn: u64,
        /// Idle timeout of TCP flows after FIN or RST, seconds.
        #[arg(long, default_value_t = 10)]
        ct_timeout_tcp_closing: u64,
        /// Idle timeout of UDP and ICMP flows, seconds.
        #[arg(long, default_value_t = 60)]
        ct_timeout_other: u64,
        /// cgroup v2 directory whose processes reach published ports on
        /// the host's own addresses and 127.0.0.1 (socket hooks; only
        /// sockets in netd's network namespace are affected). Defaults to
        /// the root of the cgroup2 mount.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Seconds between full reconciles with Docker (besides the ones
        /// events trigger): retries whatever a failed pass left undone.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        resync_interval: u64,
        /// The cluster store: etcd client URLs, comma-separated
        /// (http://IP:2379,...). Without it netd serves this host alone.
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// This host's name in the cluster. Defaults to the hostname.
        #[arg(long)]
        node_name: Option<String>,
        /// The address other hosts send this host's VXLAN traffic to.
        /// Defaults to the uplink's first IPv4 address.
        #[arg(long)]
        vtep_addr: Option<std::net::Ipv4Addr>,
        /// Seconds this host's record (and, later, its endpoints) outlives
        /// it in etcd: a host gone longer is withdrawn everywhere.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        etcd_lease_ttl: u64,
        /// The Docker plugin socket netd serves with --etcd (driver and
        /// IPAM `netd`); dockerd finds it by name in /run/docker/plugins.
        #[arg(long, default_value = crate::plugin::DEFAULT_SOCKET)]
        plugin_socket: PathBuf,
        /// UDP port of VXLAN between hosts; the same on every host.
        #[arg(long, default_value_t = netd_common::overlay::VXLAN_PORT, value_parser = clap::value_parser!(u16).range(1..))]
        vxlan_port: u16,
    },
    /// Show attachments, map fill levels and packet counters (works while
    /// the daemon is down: it reads the pinned objects).
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Published ports as the datapath holds them (reads the pinned map).
    Ports {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Container endpoints: host-side veth, address, MAC, network, and
    /// whether inbound packets are delivered to it directly.
    Endpoints {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// The cluster's netd networks (reads the cluster store): name, mode,
    /// VNI, subnet, gateway, and the hosts with containers on each.
    Networks {
        #[arg(long)]
        json: bool,
        /// etcd client URLs, comma-separated.
        #[arg(long, env = "NETD_ETCD", value_delimiter = ',', required = true)]
        etcd: Vec<String>,
    },
    /// Give back what a host that left the cluster for good still holds in
    /// the cluster store: its containers' addresses and its routed
    /// networks' blocks (kept for a host that reboots). Refused while the
    /// host is registered.
    ForgetHost {
        /// The host's name in the cluster (`netd run --node`).
        node: String,
        #[arg(long)]
        json: bool,
        /// etcd client URLs, comma-separated.
        #[arg(long, env = "NETD_ETCD", value_delimiter = ',', required = true)]
        etcd: Vec<String>,
    },
    /// The overlay forwarding table as the datapath holds it (reads the
    /// pinned maps): each container address, its MAC and network, and
    /// whether it is on this host (its veth) or another (its host's VTEP).
    Peers {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// The NAT flow table: one line per direction of each flow.
    Ct {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach every program and remove everything netd pinned.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// A runtime for one command's requests, and a connection to the cluster
/// store at `etcd`.
fn cluster_store(etcd: &[String]) -> Result<(tokio::runtime::Runtime, crate::cluster::Store)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = runtime.block_on(crate::cluster::Store::connect(
        etcd,
        std::time::Duration::from_secs(5),
    ))?;
    Ok((runtime, store))
}

/// Parses "MIN-MAX" (1 <= MIN <= MAX <= 65535).
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not MIN-MAX"))?;
    let min: u16 = a.parse().map_err(|_| format!("bad port {a:?}"))?;
    let max: u16 = b.parse().map_err(|_| format!("bad port {b:?}"))?;
    if min == 0 || min > max {
        return Err(format!("{s:?}: need 1 <= MIN <= MAX"));
    }
    Ok((min, max))
}

/// Runs the CLI; returns the process exit code. Errors are one line on
/// stderr, never a panic or a backtrace.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging();
    match dispatch(cli.command) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("netd: {e:#}");
            1
        }
    }
}

/// netlink-packet-route warns, on every link it parses, when the kernel
/// sends more IPv6 per-device fields (IFLA_INET6_CONF, _STATS) than the
/// crate knows: true of every kernel newer than the crate, and nothing netd
/// reads (it never looks at IPv6 device settings). Every link dump (each
/// endpoint on each resync) would repeat it. Only errors from that module
/// are kept, whatever NETD_LOG says; the more specific directive wins.
const QUIET_DEPENDENCY_NOISE: &str = "netlink_packet_route::link::buffer_tool=error";

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive(
            QUIET_DEPENDENCY_NOISE
                .parse()
                .expect("a valid static directive"),
        );
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run {
            docker_host,
            uplink,
            pin_dir,
            debug_datapath,
            snat_ports,
            ct_size,
            ct_timeout_tcp,
            ct_timeout_tcp_syn,
            ct_timeout_tcp_closing,
            ct_timeout_other,
            cgroup,
            resync_interval,
            etcd,
            node_name,
            vtep_addr,
            etcd_lease_ttl,
            plugin_socket,
            vxlan_port,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(daemon::run(daemon::RunOptions {
                docker_host,
                uplink,
                pin_dir,
                debug_datapath,
                snat_ports,
                ct_size,
                ct_timeouts: netd_common::CtTimeouts {
                    tcp_syn: ct_timeout_tcp_syn,
                    tcp_established: ct_timeout_tcp,
                    tcp_closing: ct_timeout_tcp_closing,
                    other: ct_timeout_other,
                },
                cgroup,
                resync_interval: std::time::Duration::from_secs(resync_interval),
                cluster: (!etcd.is_empty()).then(|| daemon::ClusterOptions {
                    etcd,
                    node_name,
                    vtep_addr,
                    lease_ttl: std::time::Duration::from_secs(etcd_lease_ttl),
                    plugin_socket,
                    vxlan_port,
                }),
            }))
        }
        Command::Status { json, pin_dir } => {
            dataplane::require_privileges()?;
            let mut status = dataplane::read_status(&pin_dir)?;
            if !status.segments.is_empty() {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                for seg in &mut status.segments {
                    // A count above 0 with netd's MACs in the filter: the
                    // device has no unicast filter (or someone set it).
                    seg.accepts = runtime
                        .block_on(crate::netlink::link_identity(&seg.parent))
                        .ok()
                        .map(|(_, _, promiscuity)| match promiscuity {
                            0 => "unicast filter".to_owned(),
                            _ => "promiscuous mode".to_owned(),
                        });
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_status(&status));
            }
            Ok(())
        }
        Command::Ports { json, pin_dir } => {
            dataplane::require_privileges()?;
            let ports = dataplane::read_ports(&pin_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ports)?);
            } else {
                println!("{:<6} {:<22} CONTAINER", "PROTO", "HOST");
                for p in &ports {
                    println!(
                        "{:<6} {:<22} {}:{}",
                        p.proto,
                        format!("{}:{}", p.host_addr, p.host_port),
                        p.container_addr,
                        p.container_port
                    );
                }
            }
            Ok(())
        }
        Command::Networks { json, etcd } => {
            let (runtime, mut store) = cluster_store(&etcd)?;
            let picture = runtime.block_on(store.picture())?;
            let rows = network_rows(&picture);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<20} {:<10} {:<12} {:<18} {:<16} HOSTS",
                    "NAME", "MODE", "VNI/PARENT", "SUBNET", "GATEWAY"
                );
                for r in &rows {
                    let place = match &r.parent {
                        Some(p) => p.clone(),
                        None => r.vni.to_string(),
                    };
                    println!(
                        "{:<20} {:<10} {:<12} {:<18} {:<16} {}",
                        r.name,
                        r.mode,
                        place,
                        r.subnet,
                        r.gateway,
                        r.hosts.join(",")
                    );
                }
            }
            Ok(())
        }
        Command::ForgetHost { node, json, etcd } => {
            let (runtime, mut store) = cluster_store(&etcd)?;
            let forgotten = runtime.block_on(store.forget_host(&node))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&forgotten)?);
            } else {
                println!(
                    "host {node} forgotten: {} addresses, {} routed blocks and {} records given back",
                    forgotten.addresses, forgotten.blocks, forgotten.records
                );
            }
            Ok(())
        }
        Command::Peers { json, pin_dir } => {
            dataplane::require_privileges()?;
            let peers = dataplane::read_peers(&pin_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&peers)?);
            } else {
                println!(
                    "{:<16} {:<18} {:<9} {:<9} WHERE",
                    "ADDRESS", "MAC", "NETWORK", "VNI"
                );
                for p in &peers {
                    let place = match (&p.interface, p.vtep, &p.block) {
                        (Some(i), _, _) => format!("local {i}"),
                        (None, Some(v), Some(b)) => format!("block {b} routed to host {v}"),
                        (None, Some(v), None) => format!("remote vtep {v}"),
                        (None, None, _) => "?".into(),
                    };
                    println!(
                        "{:<16} {:<18} {:<9} {:<9} {place}",
                        p.addr, p.mac, p.network, p.vni
                    );
                }
            }
            Ok(())
        }
        Command::Endpoints { json, pin_dir } => {
            dataplane::require_privileges()?;
            let endpoints = dataplane::read_endpoints(&pin_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&endpoints)?);
            } else {
                println!(
                    "{:<16} {:<16} {:<18} {:<9} {:<20} DIRECT",
                    "INTERFACE", "ADDRESS", "MAC", "NETWORK", "SUBNETS"
                );
                for e in &endpoints {
                    println!(
                        "{:<16} {:<16} {:<18} {:<9} {:<20} {}",
                        e.interface,
                        e.addr,
                        e.mac,
                        e.network,
                        e.subnets.join(","),
                        if e.direct_delivery { "yes" } else { "no" }
                    );
                }
            }
            Ok(())
        }
        Command::Ct { json, pin_dir } => {
            dataplane::require_privileges()?;
            let flows = dataplane::read_ct(&pin_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
            } else {
                println!(
                    "{:<5} {:<6} {:<22} {:<22} {:<26} {:<12} IDLE",
                    "PROTO", "KIND", "SRC", "DST", "REWRITE", "STATE"
                );
                for f in &flows {
                    let rewrite = if f.to.is_empty() {
                        "-".to_owned()
                    } else {
                        format!("{} -> {}", f.rewrite, f.to)
                    };
                    println!(
                        "{:<5} {:<6} {:<22} {:<22} {:<26} {:<12} {}s",
                        f.proto, f.kind, f.src, f.dst, rewrite, f.state, f.idle_secs
                    );
                }
            }
            Ok(())
        }
        Command::Uninstall { pin_dir } => {
            dataplane::require_privileges()?;
            let report = dataplane::uninstall(&pin_dir)?;
            println!(
                "netd: detached {} link(s), removed {} map(s) from {}",
                report.links_detached,
                report.maps_removed,
                pin_dir.display()
            );
            Ok(())
        }
    }
}

/// The human form of `netd status`.
pub fn render_status(s: &dataplane::Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "pin dir {} (layout v{})", s.pin_dir, s.layout_version);
    let _ = writeln!(out, "\nattachments:");
    if s.attachments.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for a in &s.attachments {
        let _ = writeln!(
            out,
            "  {:<18} {:<12} {:<8} {:<24} prog {:<6} link {:<6} {}",
            a.hook,
            a.interface,
            a.direction,
            a.program,
            a.program_id,
            a.link_id,
            if a.attached { "attached" } else { "DETACHED" }
        );
    }
    let _ = writeln!(out, "\nmaps:");
    for m in &s.maps {
        let _ = writeln!(
            out,
            "  {:<20} {:<14} {}/{}",
            m.name, m.map_type, m.entries, m.max_entries
        );
    }
    if !s.segments.is_empty() {
        let _ = writeln!(out, "\nsegment networks:");
    }
    for seg in &s.segments {
        let _ = writeln!(
            out,
            "  network {} on {}{}: containers here {}, their MACs taken in by {}",
            seg.network,
            seg.parent,
            match seg.vlan {
                0 => String::new(),
                v => format!(" VLAN {v}"),
            },
            seg.containers,
            seg.accepts.as_deref().unwrap_or("? (interface unreadable)")
        );
    }
    if !s.hosts.is_empty() {
        let _ = writeln!(out, "\ncluster hosts:");
    }
    for h in &s.hosts {
        let _ = writeln!(out, "  {:<16} {}", h.address, h.reach);
    }
    let _ = writeln!(out, "\ncounters (packets / bytes):");
    for h in &s.counters {
        let _ = writeln!(out, "  {}:", h.hook);
        if h.counters.is_empty() {
            let _ = writeln!(out, "    (no packets)");
        }
        for c in &h.counters {
            let _ = writeln!(
                out,
                "    {:<16} {:>12} {:>14}{}",
                c.name,
                c.packets,
                c.bytes,
                if c.kind == "verdict" {
                    String::new()
                } else {
                    format!("   ({})", c.kind)
                }
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_definition_is_consistent_and_defaults_hold() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["netd", "status"]).unwrap();
        match cli.command {
            Command::Status { json, pin_dir } => {
                assert!(!json);
                assert_eq!(pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["netd", "run", "--bogus"]).is_err());
        match Cli::try_parse_from(["netd", "run"]).unwrap().command {
            Command::Run {
                resync_interval, ..
            } => assert_eq!(resync_interval, 30),
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["netd", "run", "--resync-interval", "0"]).is_err());
        assert_eq!(parse_port_range("61000-65535"), Ok((61000, 65535)));
        assert!(parse_port_range("9-1").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("x").is_err());
    }

    #[test]
    fn status_rendering_names_every_attachment_and_counter() {
        let status = dataplane::Status {
            pin_dir: "/sys/fs/bpf/netd".into(),
            layout_version: 1,
            attachments: vec![dataplane::AttachmentStatus {
                hook: "uplink-ingress",
                interface: "eth0".into(),
                direction: "ingress",
                program: "netd_uplink_ingress".into(),
                program_id: 7,
                link_id: 3,
                attached: false,
            }],
            maps: vec![],
            hosts: vec![dataplane::HostStatus {
                address: std::net::Ipv4Addr::new(198, 18, 0, 2),
                reach: "on this LAN",
            }],
            segments: vec![dataplane::SegmentStatus {
                network: "0123abcd".into(),
                parent: "eth1".into(),
                vlan: 100,
                containers: 2,
                accepts: Some("promiscuous mode".into()),
            }],
            counters: vec![dataplane::HookCounters {
                hook: "uplink-ingress",
                counters: vec![dataplane::NamedCounter {
                    name: "no-match",
                    kind: "reason",
                    packets: 42,
                    bytes: 4200,
                }],
            }],
        };
        let text = render_status(&status);
        assert!(text.contains("netd_uplink_ingress"));
        assert!(text.contains("DETACHED"));
        assert!(text.contains(
            "on eth1 VLAN 100: containers here 2, their MACs taken in by promiscuous mode"
        ));
        assert!(text.contains("no-match") && text.contains("42") && text.contains("(reason)"));
    }
}

/// A line of `netd networks`.
#[derive(Debug, serde::Serialize, PartialEq, Eq)]
pub struct NetworkRow {
    pub name: String,
    pub id: String,
    pub mode: String,
    pub vni: u32,
    pub subnet: String,
    pub gateway: std::net::Ipv4Addr,
    pub internal: bool,
    /// Segment networks: `-o parent=` (with its VLAN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<String>,
    /// Hosts with containers on it.
    pub hosts: Vec<String>,
}

fn network_rows(picture: &crate::cluster::Picture) -> Vec<NetworkRow> {
    let mut rows: Vec<NetworkRow> = picture
        .networks
        .iter()
        .map(|n| {
            let mut hosts: Vec<String> = picture
                .endpoints
                .iter()
                .filter(|e| e.network == n.id)
                .map(|e| e.host.clone())
                .collect();
            hosts.sort();
            hosts.dedup();
            NetworkRow {
                name: n.label().to_owned(),
                id: n.id.clone(),
                mode: n.mode_label(),
                vni: n.vni,
                subnet: format!("{}/{}", n.subnet.0, n.subnet.1),
                gateway: n.gateway,
                internal: n.internal,
                parent: (!n.parent.is_empty()).then(|| n.parent_option()),
                ip_range: n.ip_range.map(|(a, l)| format!("{a}/{l}")),
                hosts,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}
