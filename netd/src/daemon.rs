//! `netd run`: load and attach the dataplane, follow Docker, exit cleanly on
//! SIGTERM/SIGINT leaving the datapath pinned and forwarding.
use std::{collections::HashMap, path::PathBuf};

use anyhow::{Context as _, Result};
use netd_common::{CtTimeouts, EndpointLocation, NatConfig};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    arrivals::{self, Arrivals, ServedBridge, Step},
    dataplane::{self, Attachment, Dataplane, LoadOptions},
    docker::{self, DockerEvent, SourceUpdate},
    netlink::{self, BridgePort, LinkChange},
    reconcile, state,
};

/// Container lifecycle and network attachment changes move endpoints and
/// published ports; other events (exec, attach, health…) do not.
fn affects_datapath(e: &DockerEvent) -> bool {
    matches!(
        e.action.as_str(),
        "start"
            | "restart"
            | "die"
            | "stop"
            | "kill"
            | "destroy"
            | "pause"
            | "unpause"
            | "connect"
            | "disconnect"
            | "create"
    )
}

/// What Docker and the uplink say should exist, read without touching the
/// datapath, so that reading it (Docker's API can take a while) never holds
/// up the daemon's reaction to a veth appearing.
struct Snapshot {
    host_addrs: Vec<std::net::Ipv4Addr>,
    networks: Vec<state::Network>,
    containers: docker::Containers,
    /// Docker's endpoints by host-side veth. None when one could not be
    /// resolved (gone meanwhile, or its namespace not ready): applying a
    /// partial picture could strip a running container's checks, so the
    /// endpoints are left as they are; the next pass retries.
    endpoints: Option<HashMap<u32, (String, netd_common::Endpoint)>>,
}

async fn fetch_snapshot(docker: bollard::Docker, uplink: String) -> Result<Snapshot> {
    let host_addrs = netlink::ipv4_addresses(&uplink).await?;
    let networks = docker::bridge_networks(&docker).await?;
    let containers = docker::containers(&docker, &networks).await?;
    let specs = containers.endpoints.clone();
    // Entering namespaces blocks: keep it off the runtime's workers.
    let endpoints = tokio::task::spawn_blocking(move || {
        let mut endpoints = HashMap::new();
        for spec in &specs {
            match host_veth(spec) {
                Ok((ifindex, ifname)) => {
                    endpoints.insert(ifindex, (ifname, state::endpoint_value(spec)));
                }
                Err(e) => {
                    tracing::warn!("endpoint of {}: {e:#}", short(&spec.container));
                    return None;
                }
            }
        }
        Some(endpoints)
    })
    .await?;
    Ok(Snapshot {
        host_addrs,
        networks,
        containers,
        endpoints,
    })
}

/// The daemon's own state besides the maps.
struct Daemon {
    dp: Dataplane,
    uplink: String,
    snat_ports: (u16, u16),
    netns_cookie: u64,
    /// The bridges of the networks netd serves, by ifindex.
    bridges: HashMap<u32, ServedBridge>,
    arrivals: Arrivals,
}

impl Daemon {
    /// One reconcile pass: brings every map to `snap`, writing only the
    /// difference.
    async fn apply(&mut self, snap: Snapshot) -> Result<()> {
        let started = std::time::Instant::now();
        let dp = &mut self.dp;
        let host_addrs = &snap.host_addrs;
        let config = NatConfig {
            host_addr: host_addrs.first().map_or([0; 4], |a| a.octets()),
            snat_port_min: self.snat_ports.0,
            snat_port_max: self.snat_ports.1,
            uplink_ifindex: dataplane::interface_index(&self.uplink)?,
            _pad: 0,
            netns_cookie: self.netns_cookie,
        };
        if dp.config()? != config {
            dp.set_config(config)?;
            tracing::info!(
                "masquerading as {:?}, fallback source ports {}-{}",
                host_addrs.first(),
                self.snat_ports.0,
                self.snat_ports.1
            );
        }
        let networks = &snap.networks;
        let net_applied = reconcile::networks(dp, &state::desired_networks(networks))?;
        self.bridges = served_bridges(networks);
        // Veths Docker enslaved whose events were missed (netd started, or
        // a network became known, after they appeared).
        for port in netlink::bridge_ports().await? {
            self.on_bridge_port(&port).await;
        }
        let dp = &mut self.dp;
        let ep_applied = match snap.endpoints {
            Some(mut endpoints) => {
                let attach_only =
                    self.arrivals
                        .merge(&mut endpoints, interface_name, std::time::Instant::now());
                let applied = reconcile::endpoints(dp, &endpoints, &attach_only)?;
                (applied, endpoints.len())
            }
            None => (reconcile::Applied::default(), 0),
        };
        // "Every address" publishes are also served on the bridges' gateway
        // addresses, where containers reach the host.
        let mut served_addrs = host_addrs.clone();
        served_addrs.extend(networks.iter().flat_map(|n| n.gateways.iter().copied()));
        let desired = state::desired_ports(&snap.containers.publishes, &served_addrs);
        let applied = reconcile::ports(dp, &desired)?;
        let nothing = reconcile::Applied::default();
        if applied != nothing || net_applied != nothing || ep_applied.0 != nothing {
            tracing::info!(
                "ports {}; networks {}; endpoints {}; in {:?}",
                summary(&applied, desired.len()),
                summary(&net_applied, networks.len()),
                summary(&ep_applied.0, ep_applied.1),
                started.elapsed()
            );
        }
        Ok(())
    }

    /// A veth on a bridge appeared or changed: attach at once, register its
    /// endpoint as soon as the container's end is configured. Failures are
    /// logged; Docker's report of the container still registers it.
    async fn on_bridge_port(&mut self, port: &BridgePort) {
        loop {
            let registered = match self.dp.has_endpoint(port.ifindex) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("reading the endpoint of {}: {e:#}", port.name);
                    return;
                }
            };
            let step =
                self.arrivals
                    .step(port, &self.bridges, registered, std::time::Instant::now());
            match step {
                Step::Nothing => return,
                Step::Attach => {
                    for att in [Attachment::ContainerEgress, Attachment::ContainerIngress] {
                        if let Err(e) = self.dp.attach(att, &port.name) {
                            tracing::warn!("{e:#}");
                            self.arrivals.forget(port.ifindex);
                            return;
                        }
                    }
                    tracing::debug!("veth {} on a Docker bridge: attached", port.name);
                }
                Step::Identify(nsid, peer) => {
                    if let Err(e) = self.identify(port, nsid, peer).await {
                        tracing::debug!("veth {}: {e:#}; waiting for Docker", port.name);
                    }
                    return;
                }
            }
        }
    }

    async fn identify(&mut self, port: &BridgePort, nsid: i32, peer: u32) -> Result<()> {
        let (mac, addrs) = netlink::peer_identity(nsid, peer).await?;
        let bridge = self
            .bridges
            .get(&port.master)
            .ok_or_else(|| anyhow::anyhow!("its bridge is no longer served"))?;
        let endpoint = arrivals::endpoint_of(mac, &addrs, bridge).ok_or_else(|| {
            anyhow::anyhow!("no single address of its network on the other end ({addrs:?})")
        })?;
        // Location first: the endpoint entry is what lets its packets through.
        self.dp.set_endpoint_location(
            endpoint.addr.into(),
            EndpointLocation {
                ifindex: port.ifindex,
                mac: endpoint.mac,
                _pad: [0; 2],
            },
        )?;
        self.dp.set_endpoint(port.ifindex, endpoint)?;
        self.arrivals.identified(port.ifindex, endpoint);
        tracing::debug!(
            "veth {}: endpoint {} registered before Docker's report",
            port.name,
            std::net::Ipv4Addr::from(endpoint.addr)
        );
        Ok(())
    }

    async fn on_link_change(&mut self, change: LinkChange) {
        match change {
            LinkChange::Port(port) => self.on_bridge_port(&port).await,
            LinkChange::Gone(ifindex) => self.arrivals.forget(ifindex),
            LinkChange::Overrun => match netlink::bridge_ports().await {
                Ok(ports) => {
                    for port in ports {
                        self.on_bridge_port(&port).await;
                    }
                }
                Err(e) => tracing::warn!("rescanning bridge ports: {e:#}"),
            },
        }
    }
}

/// The bridges (by ifindex) of the networks netd serves with IPv4.
fn served_bridges(networks: &[state::Network]) -> HashMap<u32, ServedBridge> {
    networks
        .iter()
        .filter(|n| !n.subnets.is_empty())
        .filter_map(|n| {
            let ifindex = dataplane::interface_index(&n.bridge).ok()?;
            let bridge = ServedBridge {
                network: netd_common::network::network_id(&n.id),
                subnets: n.subnets.clone(),
            };
            Some((ifindex, bridge))
        })
        .collect()
}

fn interface_name(ifindex: u32) -> Option<String> {
    nix::net::if_::if_indextoname(ifindex)
        .ok()
        .map(|n| n.to_string_lossy().into_owned())
}

fn summary(a: &reconcile::Applied, total: usize) -> String {
    format!("+{} ~{} -{} ({total})", a.added, a.changed, a.removed)
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The host-side veth (ifindex, name) of a container endpoint.
fn host_veth(spec: &state::EndpointSpec) -> Result<(u32, String)> {
    let ifindex = netlink::host_side_of_veth(&spec.sandbox_key, spec.mac)?;
    let ifname = nix::net::if_::if_indextoname(ifindex)
        .with_context(|| format!("no interface with index {ifindex}"))?
        .to_string_lossy()
        .into_owned();
    Ok((ifindex, ifname))
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub docker_host: String,
    pub uplink: Option<String>,
    pub pin_dir: PathBuf,
    pub debug_datapath: bool,
    /// Source ports for masqueraded flows whose own port is taken.
    pub snat_ports: (u16, u16),
    pub ct_size: u32,
    pub ct_timeouts: CtTimeouts,
    /// cgroup v2 directory the socket hooks attach to (host-local access);
    /// None: the root of the cgroup2 mount.
    pub cgroup: Option<PathBuf>,
    /// A full reconcile even without Docker events or address changes.
    pub resync_interval: std::time::Duration,
}

/// Where cgroup2 is mounted (hybrid hosts mount it at /sys/fs/cgroup/unified).
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(point))
    })
}

/// The cookie of this process's network namespace (SO_NETNS_COOKIE): the
/// socket hooks act only on sockets of this namespace.
fn own_netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").context("opening a probe socket")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a u64 buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

/// How often idle NAT flows are expired.
const CT_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn run(opts: RunOptions) -> Result<()> {
    dataplane::require_privileges()?;
    let uplink = match opts.uplink {
        Some(ifname) => ifname,
        None => netlink::default_route_interface().await?,
    };
    dataplane::interface_index(&uplink)?;
    // Local checks first, so a bad pin dir is reported before Docker is tried.
    dataplane::PinDir::check(&opts.pin_dir)?;
    let docker = docker::connect(&opts.docker_host).await?;
    let netns_cookie = own_netns_cookie()?;

    let mut dp = Dataplane::open(
        &opts.pin_dir,
        &LoadOptions {
            debug_datapath: opts.debug_datapath,
            ct_size: Some(opts.ct_size),
        },
    )?;
    for att in [Attachment::UplinkIngress, Attachment::UplinkEgress] {
        dp.attach(att, &uplink)?;
    }
    // Container veths attached by an earlier daemon: swap in this daemon's
    // program now (a veth gone meanwhile loses its pin); reconciling with
    // Docker then adds and removes the rest.
    for att in [Attachment::ContainerEgress, Attachment::ContainerIngress] {
        for veth in dp.attached_targets(att)? {
            if dataplane::interface_index(&veth).is_ok() {
                dp.attach(att, &veth)?;
            } else {
                dp.detach(att, &veth)?;
            }
        }
    }
    match opts.cgroup.clone().or_else(cgroup2_mount) {
        Some(cgroup) => {
            let cgroup = cgroup.display().to_string();
            for att in [
                Attachment::HostConnect4,
                Attachment::HostSendmsg4,
                Attachment::HostRecvmsg4,
            ] {
                dp.attach(att, &cgroup)?;
            }
        }
        None => tracing::warn!(
            "no cgroup2 mount: host processes cannot reach published ports on the host's own addresses (mount cgroup2 or pass --cgroup)"
        ),
    }
    tracing::info!(
        "datapath attached to uplink {uplink}; objects pinned under {}",
        opts.pin_dir.display()
    );

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    // Link events first: a veth appearing while the first pass reads
    // Docker is then not missed (the pass also rescans).
    let (link_tx, mut link_rx) = mpsc::unbounded_channel();
    netlink::watch_links(link_tx)?;
    let (tx, mut rx) = mpsc::channel(1024);
    let watcher = tokio::spawn(docker::watch_events(opts.docker_host.clone(), tx));
    let (addr_tx, mut addr_rx) = mpsc::channel(16);
    netlink::watch_ipv4_addresses(addr_tx)?;

    let mut daemon = Daemon {
        dp,
        uplink,
        snat_ports: opts.snat_ports,
        netns_cookie,
        bridges: HashMap::new(),
        arrivals: Arrivals::default(),
    };
    // One read of Docker at a time, in a task of its own; a request while
    // one runs is served by one more read after it.
    let (snap_tx, mut snap_rx) = mpsc::channel::<Result<Snapshot>>(1);
    let mut fetching = false;
    let mut fetch_again = false;
    let fetch = |fetching: &mut bool, fetch_again: &mut bool, uplink: &str| {
        if *fetching {
            *fetch_again = true;
            return;
        }
        *fetching = true;
        let (docker, uplink, snap_tx) = (docker.clone(), uplink.to_owned(), snap_tx.clone());
        tokio::spawn(async move {
            let _ = snap_tx.send(fetch_snapshot(docker, uplink).await).await;
        });
    };

    let mut log_tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let mut gc_tick = tokio::time::interval(CT_GC_INTERVAL);
    let mut resync_tick = tokio::time::interval(opts.resync_interval);
    resync_tick.tick().await; // the first tick is immediate; the watcher resyncs at start
    let mut in_sync = false;
    loop {
        tokio::select! {
            // Ahead of everything else: a container may be about to send.
            biased;
            Some(change) = link_rx.recv() => {
                // Before the first pass the served bridges are unknown; that
                // pass rescans the bridge ports.
                if in_sync {
                    daemon.on_link_change(change).await;
                }
            }
            Some(result) = snap_rx.recv() => {
                fetching = false;
                match result {
                    Ok(snap) => match daemon.apply(snap).await {
                        Ok(()) if !in_sync => {
                            in_sync = true;
                            tracing::info!("in sync with Docker");
                        }
                        Ok(()) => {}
                        Err(e) => tracing::warn!("reconcile failed: {e:#}"),
                    },
                    // The watcher resyncs once Docker is back.
                    Err(e) => tracing::warn!("reading Docker's state failed: {e:#}"),
                }
                if std::mem::take(&mut fetch_again) {
                    fetch(&mut fetching, &mut fetch_again, &daemon.uplink);
                }
            }
            _ = log_tick.tick(), if opts.debug_datapath => daemon.dp.flush_logs(),
            _ = resync_tick.tick(), if in_sync => {
                tracing::debug!("periodic resync");
                fetch(&mut fetching, &mut fetch_again, &daemon.uplink);
            }
            _ = gc_tick.tick() => {
                match daemon.dp.gc_nat_flows(dataplane::monotonic_now_ns(), &opts.ct_timeouts) {
                    Ok(r) if r.removed > 0 => {
                        tracing::debug!("conntrack gc: {} of {} entries expired", r.removed, r.scanned)
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("conntrack gc: {e:#}"),
                }
            }
            Some(()) = addr_rx.recv(), if in_sync => {
                // One pass for a burst (an interface brought up with several).
                while addr_rx.try_recv().is_ok() {}
                tracing::debug!("IPv4 addresses changed; reconciling");
                fetch(&mut fetching, &mut fetch_again, &daemon.uplink);
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT"); break; }
            update = rx.recv() => {
                let Some(first) = update else { break };
                // Coalesce a burst (e.g. `docker compose up`) into one pass.
                let mut updates = vec![first];
                while let Ok(more) = rx.try_recv() {
                    updates.push(more);
                }
                let mut needed = false;
                for u in &updates {
                    match u {
                        SourceUpdate::Resync => {
                            tracing::info!("Docker event stream up; resyncing");
                            needed = true;
                        }
                        SourceUpdate::Event(e) => {
                            tracing::debug!("docker {} {} {}", e.kind, e.action, e.id);
                            needed |= affects_datapath(e);
                        }
                    }
                }
                if needed {
                    fetch(&mut fetching, &mut fetch_again, &daemon.uplink);
                }
            }
        }
    }
    watcher.abort();
    tracing::info!(
        "exiting; the datapath stays attached (`netd uninstall --pin-dir {}` removes it)",
        opts.pin_dir.display()
    );
    Ok(())
}
