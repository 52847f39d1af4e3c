//! `netd run`: load and attach the dataplane, follow Docker, exit cleanly on
//! SIGTERM/SIGINT leaving the datapath pinned and forwarding.
use std::{collections::HashMap, path::PathBuf};

use anyhow::{Context as _, Result};
use netd_common::{CtTimeouts, Endpoint, EndpointLocation, NatConfig};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    arrivals::{self, Arrivals, ServedBridge, Step},
    cluster,
    dataplane::{self, Attachment, Dataplane, LoadOptions},
    docker::{self, DockerEvent, SourceUpdate},
    mirror::Mirror,
    netlink::{self, BridgePort, LinkChange},
    overlay::{self, Overlay},
    plugin, reconcile, state,
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
    /// Docker's endpoints by host-side veth.
    endpoints: HashMap<u32, (String, Endpoint)>,
    /// False when one could not be resolved (gone meanwhile, or its
    /// namespace not ready): the picture is partial, and applying what is
    /// missing from it as removals could strip a running container's checks.
    complete: bool,
}

/// Docker's bridge networks, each with its gateways. Docker leaves a
/// network's gateway out of its IPAM config when the network was created
/// with `--subnet` and no `--gateway`; it is then the address it gave the
/// bridge, read from the bridge itself.
async fn bridge_networks(docker: &bollard::Docker) -> Result<Vec<state::Network>> {
    let mut networks = docker::bridge_networks(docker).await?;
    for n in networks.iter_mut().filter(|n| n.gateways.is_empty()) {
        // A bridge not there (yet): no gateway to serve on.
        if let Ok(addrs) = netlink::ipv4_addresses(&n.bridge).await {
            n.gateways = addrs
                .into_iter()
                .filter(|a| n.subnets.iter().any(|s| state::subnet_contains(*s, *a)))
                .collect();
        }
    }
    Ok(networks)
}

async fn fetch_snapshot(docker: bollard::Docker, uplink: String) -> Result<Snapshot> {
    let host_addrs = netlink::ipv4_addresses(&uplink).await?;
    let networks = bridge_networks(&docker).await?;
    let containers = docker::containers(&docker, &networks).await?;
    let specs = containers.endpoints.clone();
    // Entering namespaces blocks: keep it off the runtime's workers.
    let (endpoints, complete) = tokio::task::spawn_blocking(move || {
        let mut endpoints = HashMap::new();
        let mut complete = true;
        for spec in &specs {
            match host_veth(spec) {
                Ok((ifindex, ifname)) => {
                    endpoints.insert(ifindex, (ifname, state::endpoint_value(spec)));
                }
                Err(e) => {
                    tracing::warn!("endpoint of {}: {e:#}", short(&spec.container));
                    complete = false;
                }
            }
        }
        (endpoints, complete)
    })
    .await?;
    Ok(Snapshot {
        host_addrs,
        networks,
        containers,
        endpoints,
        complete,
    })
}

/// Runs `work` in a task and sends its result on `tx`, a panic included as
/// an error: whoever waits for the result is never left waiting.
fn spawn_reporting<T: Send + 'static>(
    tx: &mpsc::Sender<Result<T>>,
    work: impl std::future::Future<Output = Result<T>> + Send + 'static,
) {
    let tx = tx.clone();
    tokio::spawn(async move {
        let result = match tokio::spawn(work).await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("the task panicked: {e}")),
        };
        let _ = tx.send(result).await;
    });
}

/// One read of something at a time; a request during a read makes one more
/// after it.
#[derive(Default)]
struct Reads {
    running: bool,
    again: bool,
}

impl Reads {
    /// True when the caller should start a read now.
    fn request(&mut self) -> bool {
        if self.running {
            self.again = true;
            return false;
        }
        self.running = true;
        true
    }

    /// A read ended; true when another should start.
    fn done(&mut self) -> bool {
        self.running = false;
        if std::mem::take(&mut self.again) {
            self.running = true;
            return true;
        }
        false
    }
}

/// The daemon's own state besides the maps, and its reads of Docker.
struct Daemon {
    dp: Dataplane,
    docker: bollard::Docker,
    uplink: String,
    snat_ports: (u16, u16),
    netns_cookie: u64,
    arrivals: Arrivals,
    snapshots: Reads,
    snapshot_tx: mpsc::Sender<Result<Snapshot>>,
    /// Networks only (one API call): for a veth on a bridge just created.
    network_reads: Reads,
    networks_tx: mpsc::Sender<Result<Vec<state::Network>>>,
    /// Docker's bridge networks, as last read.
    bridges: Vec<state::Network>,
    /// Multi-host: netd's own networks and endpoints.
    overlay: Option<Overlay>,
}

impl Daemon {
    /// `netd_networks` as it should be: Docker's bridge networks and netd's.
    fn desired_networks(&self) -> HashMap<(std::net::Ipv4Addr, u8), netd_common::NetworkInfo> {
        let mut desired = state::desired_networks(&self.bridges);
        if let Some(o) = &self.overlay {
            for (subnet, info) in o.networks() {
                desired.entry(*subnet).or_insert(*info);
            }
        }
        desired
    }

    /// A new picture of the cluster: the overlay maps follow it.
    async fn on_picture(&mut self, picture: cluster::Picture) {
        let Some(overlay) = self.overlay.as_mut() else {
            return;
        };
        match overlay.apply(&mut self.dp, &picture).await {
            Ok(true) => {
                let desired = self.desired_networks();
                if let Err(e) = reconcile::networks(&mut self.dp, &desired) {
                    tracing::warn!("{e:#}");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("applying the cluster's picture: {e:#}"),
        }
    }

    fn on_datapath_request(&mut self, request: plugin::DatapathRequest) {
        match self.overlay.as_mut() {
            Some(o) => o.on_request(&mut self.dp, request),
            None => tracing::warn!("a plugin request without a cluster"),
        }
    }

    /// Asks for a full reconcile: a read of Docker's state, then
    /// [`Self::apply`].
    fn read_snapshot(&mut self) {
        if self.snapshots.request() {
            self.spawn_snapshot_read();
        }
    }

    fn spawn_snapshot_read(&self) {
        let work = fetch_snapshot(self.docker.clone(), self.uplink.clone());
        spawn_reporting(&self.snapshot_tx, work);
    }

    /// A snapshot read ended (its result is applied by the caller).
    fn snapshot_done(&mut self) {
        if self.snapshots.done() {
            self.spawn_snapshot_read();
        }
    }

    fn read_networks(&mut self) {
        if self.network_reads.request() {
            self.spawn_networks_read();
        }
    }

    fn spawn_networks_read(&self) {
        let docker = self.docker.clone();
        spawn_reporting(
            &self.networks_tx,
            async move { bridge_networks(&docker).await },
        );
    }

    /// Docker's networks, read because a veth appeared on a bridge not
    /// known yet: serve them at once (their subnets and flags too, which
    /// masquerade and isolation need), then look at the waiting veths.
    async fn networks_read(&mut self, networks: Result<Vec<state::Network>>) {
        if self.network_reads.done() {
            self.spawn_networks_read();
        }
        let networks = match networks {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("reading Docker's networks failed: {e:#}");
                return;
            }
        };
        self.bridges = networks;
        let desired = self.desired_networks();
        if let Err(e) = reconcile::networks(&mut self.dp, &desired) {
            tracing::warn!("{e:#}");
        }
        let waiting = self.arrivals.set_bridges(served_bridges(&self.bridges));
        self.rescan(|_| None, |ifindex| waiting.contains(&ifindex))
            .await;
    }

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
        self.bridges = snap.networks.clone();
        let networks = &snap.networks;
        let desired_networks = self.desired_networks();
        let net_applied = reconcile::networks(&mut self.dp, &desired_networks)?;
        self.arrivals.set_bridges(served_bridges(networks));
        // A veth that died after the read: its address may be a new veth's.
        let mut endpoints = snap.endpoints;
        endpoints.retain(|ifindex, (name, _)| interface_name(*ifindex).as_ref() == Some(name));
        // Veths Docker enslaved whose events were missed (netd started, or
        // a network became known, after they appeared), and a previous
        // daemon's arrivals. Docker's report rules where it has one.
        self.rescan(|ifindex| Some(endpoints.contains_key(&ifindex)), |_| true)
            .await;
        let attach_only =
            self.arrivals
                .merge(&mut endpoints, interface_name, std::time::Instant::now());
        if let Some(o) = &self.overlay {
            endpoints.extend(o.endpoints());
        }
        let dp = &mut self.dp;
        let ep_applied = reconcile::endpoints(dp, &endpoints, &attach_only, snap.complete)?;
        // "Every address" publishes are also served on the bridges' gateway
        // addresses, where containers reach the host.
        let mut served_addrs = host_addrs.clone();
        served_addrs.extend(networks.iter().flat_map(|n| n.gateways.iter().copied()));
        let desired = state::desired_ports(&snap.containers.publishes, &served_addrs);
        let applied = reconcile::ports(dp, &desired)?;
        let nothing = reconcile::Applied::default();
        if applied != nothing || net_applied != nothing || ep_applied != nothing {
            tracing::info!(
                "ports {}; networks {}; endpoints {}; in {:?}",
                summary(&applied, desired.len()),
                summary(&net_applied, desired_networks.len()),
                summary(&ep_applied, endpoints.len()),
                started.elapsed()
            );
        }
        Ok(())
    }

    /// Looks at every bridge port `which` selects, from a dump: the
    /// catch-up for link events missed or not actionable when they came.
    async fn rescan(
        &mut self,
        reported: impl Fn(u32) -> Option<bool>,
        which: impl Fn(u32) -> bool,
    ) {
        let ports = match netlink::bridge_ports().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("listing bridge ports: {e:#}");
                return;
            }
        };
        for port in ports.iter().filter(|p| which(p.ifindex)) {
            self.on_bridge_port(port, reported(port.ifindex), "rescan")
                .await;
        }
    }

    /// A veth on a bridge appeared or changed: attach at once, register its
    /// endpoint as soon as the container's end is configured. Failures are
    /// logged; Docker's report of the container still registers it.
    async fn on_bridge_port(&mut self, port: &BridgePort, reported: Option<bool>, how: &str) {
        loop {
            let registered = match self.dp.endpoint(port.ifindex) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("reading the endpoint of {}: {e:#}", port.name);
                    return;
                }
            };
            let step = self
                .arrivals
                .step(port, registered, reported, std::time::Instant::now());
            match step {
                Step::Nothing => return,
                Step::AskDocker => return self.read_networks(),
                Step::Attach => {
                    for att in [Attachment::ContainerEgress, Attachment::ContainerIngress] {
                        if let Err(e) = self.dp.attach(att, &port.name) {
                            tracing::warn!("{e:#}");
                            self.arrivals.forget(port.ifindex);
                            return;
                        }
                    }
                    tracing::debug!("veth {} on a Docker bridge: attached ({how})", port.name);
                }
                Step::Identify { nsid, peer } => {
                    if let Err(e) = self.identify(port, nsid, peer, how).await {
                        tracing::debug!("veth {}: {e:#}; waiting for Docker", port.name);
                    }
                    return;
                }
            }
        }
    }

    async fn identify(&mut self, port: &BridgePort, nsid: i32, peer: u32, how: &str) -> Result<()> {
        let (mac, addrs) = netlink::peer_identity(nsid, peer).await?;
        let bridge = self
            .arrivals
            .bridge(port.master)
            .ok_or_else(|| anyhow::anyhow!("its bridge is no longer served"))?;
        let endpoint = arrivals::endpoint_of(mac, &addrs, bridge).ok_or_else(|| {
            anyhow::anyhow!("no single address of its network on the other end ({addrs:?})")
        })?;
        let addr = std::net::Ipv4Addr::from(endpoint.addr);
        // Another endpoint's address (a container that set it itself):
        // not taken from the kernel; Docker's report decides.
        if let Some(other) = self.dp.endpoint_location(addr)? {
            if other.ifindex != port.ifindex && interface_name(other.ifindex).is_some() {
                anyhow::bail!(
                    "{addr} is the address of the endpoint behind ifindex {}",
                    other.ifindex
                );
            }
        }
        // Location first: the endpoint entry is what lets its packets through.
        self.dp
            .set_endpoint_location(addr, EndpointLocation::of(port.ifindex, &endpoint))?;
        self.dp.set_endpoint(port.ifindex, endpoint)?;
        self.arrivals.identified(port.ifindex, endpoint);
        tracing::debug!(
            "veth {}: endpoint {addr} registered from its {how}",
            port.name
        );
        Ok(())
    }

    async fn on_link_change(&mut self, change: LinkChange) {
        match change {
            LinkChange::Port(port) => self.on_bridge_port(&port, None, "link event").await,
            LinkChange::Gone(ifindex) => {
                self.arrivals.forget(ifindex);
                if let Some(o) = self.overlay.as_mut() {
                    o.forget(&mut self.dp, ifindex);
                }
            }
            LinkChange::Overrun => self.rescan(|_| None, |_| true).await,
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
                gateways: n.gateways.clone(),
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
    let ifname =
        interface_name(ifindex).with_context(|| format!("no interface with index {ifindex}"))?;
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
    /// Multi-host: the cluster store and this host's place in it.
    pub cluster: Option<ClusterOptions>,
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub etcd: Vec<String>,
    /// None: the hostname.
    pub node_name: Option<String>,
    /// None: the uplink's first IPv4 address.
    pub vtep_addr: Option<std::net::Ipv4Addr>,
    pub lease_ttl: std::time::Duration,
    pub plugin_socket: PathBuf,
    /// UDP port of VXLAN, the same on every host.
    pub vxlan_port: u16,
}

/// This host in the cluster: kept for the daemon's life (dropping the lease
/// stops renewing it).
struct Membership {
    lease: cluster::HostLease,
    store: cluster::Store,
    node: String,
    vtep: std::net::Ipv4Addr,
}

/// How long connecting to etcd at start may take before netd gives up.
const ETCD_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Joins the cluster: connects to etcd (an unreachable store at start is an
/// error, not a wait) and registers this host on its lease. The lease is
/// not revoked when netd exits: a restart within the TTL must not withdraw
/// the host everywhere; the next daemon puts the record on a lease of its
/// own.
async fn join_cluster(opts: &ClusterOptions, uplink: &str) -> Result<Membership> {
    let node = match &opts.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the hostname (pass --node-name)")?
            .trim()
            .to_owned(),
    };
    let vtep = match opts.vtep_addr {
        Some(a) => a,
        None => *netlink::ipv4_addresses(uplink)
            .await?
            .first()
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "uplink {uplink} has no IPv4 address to be the VTEP (pass --vtep-addr)"
                )
            })?,
    };
    let mut store = cluster::Store::connect(&opts.etcd, ETCD_CONNECT_TIMEOUT).await?;
    let lease = store
        .register_host(
            &cluster::HostRecord {
                node: node.clone(),
                vtep,
                mac: netlink::link_identity(uplink)
                    .await
                    .ok()
                    .map(|(_, mac, _)| mac),
                modes: cluster::MODES.map(str::to_owned).to_vec(),
            },
            opts.lease_ttl,
        )
        .await?;
    tracing::info!(
        "joined the cluster at {} as {node} (VTEP {vtep}, lease TTL {:?})",
        opts.etcd.join(","),
        opts.lease_ttl
    );
    Ok(Membership {
        lease,
        store,
        node,
        vtep,
    })
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
    let membership = match &opts.cluster {
        Some(c) => Some(join_cluster(c, &uplink).await?),
        None => None,
    };
    // The plugin before Docker: a dockerd starting containers of netd
    // networks (restart policies) needs it before its API is up.
    let local_networks = plugin::LocalNetworks::default();
    // Join and Leave wait on the daemon's loop, which owns the datapath.
    let (datapath_tx, mut datapath_rx) = mpsc::channel(64);
    let plugin_server = match (&membership, &opts.cluster) {
        (Some(m), Some(c)) => {
            let plugin = plugin::Plugin::new(
                m.store.clone(),
                plugin::HostInfo {
                    node: m.node.clone(),
                    vtep: m.vtep,
                    uplink: uplink.clone(),
                    lease: m.lease.id_handle(),
                },
                local_networks.clone(),
                datapath_tx,
            );
            let listener = plugin::listen(&c.plugin_socket)?;
            Some(tokio::spawn(async move {
                if let Err(e) = plugin::serve(listener, plugin).await {
                    tracing::error!("the Docker plugin stopped: {e:#}");
                }
            }))
        }
        _ => {
            if crate::systemd::plugin_listener()?.is_some() {
                anyhow::bail!("systemd passed the Docker plugin socket (netd.socket), but without --etcd netd serves no plugin: pass --etcd, or disable netd.socket");
            }
            None
        }
    };
    let netns_cookie = own_netns_cookie()?;
    // A Docker endpoint that cannot work (no socket) is reported before
    // anything is attached; whether it answers is asked later.
    let docker = docker::open(&opts.docker_host)?;

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
    let overlay = match (&membership, &opts.cluster) {
        (Some(m), Some(c)) => {
            dp.set_tunnel(netd_common::TunnelConfig {
                vtep: m.vtep.octets(),
                port: c.vxlan_port.to_be_bytes(),
                _pad: [0; 2],
            })?;
            Some(Overlay::new(
                &mut dp,
                m.node.clone(),
                m.store.clone(),
                m.lease.id_handle(),
            )?)
        }
        _ => None,
    };
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
    crate::systemd::notify_ready("datapath attached; waiting for Docker");

    // Docker last: a dockerd starting up (restarting containers of netd
    // networks) waits on Join before it answers its API, so Join and Leave
    // are served meanwhile.
    let (docker, overlay) = {
        let connect = docker::answering(docker, &opts.docker_host);
        tokio::pin!(connect);
        let mut overlay = overlay;
        let docker = loop {
            tokio::select! {
                docker = &mut connect => break docker?,
                Some(request) = datapath_rx.recv() => match overlay.as_mut() {
                    Some(o) => o.on_request(&mut dp, request),
                    None => tracing::warn!("a plugin request without a cluster"),
                },
            }
        };
        (docker, overlay)
    };
    // One wake-up pending at most: a burst of changes is one pass.
    let (mirror_tx, mirror_rx) = mpsc::channel(1);
    let (picture_wake_tx, picture_wake_rx) = mpsc::channel(1);
    let (picture_tx, mut picture_rx) = mpsc::channel(1);
    let cluster_tasks = membership.as_ref().map(|m| {
        let mirror = Mirror::new(
            docker.clone(),
            m.store.clone(),
            local_networks.clone(),
            m.node.clone(),
            opts.resync_interval,
        );
        [
            tokio::spawn(mirror.run(mirror_rx, opts.resync_interval)),
            tokio::spawn(overlay::read_pictures(
                m.store.clone(),
                picture_wake_rx,
                picture_tx,
                opts.resync_interval,
            )),
            tokio::spawn(
                m.store
                    .clone()
                    .watch(vec![picture_wake_tx, mirror_tx.clone()]),
            ),
        ]
    });
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

    let (snapshot_tx, mut snapshot_rx) = mpsc::channel(1);
    let (networks_tx, mut networks_rx) = mpsc::channel(1);
    let mut daemon = Daemon {
        dp,
        docker,
        uplink,
        snat_ports: opts.snat_ports,
        netns_cookie,
        arrivals: Arrivals::default(),
        snapshots: Reads::default(),
        snapshot_tx,
        network_reads: Reads::default(),
        networks_tx,
        bridges: Vec::new(),
        overlay,
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
            Some(change) = link_rx.recv() => daemon.on_link_change(change).await,
            Some(request) = datapath_rx.recv() => daemon.on_datapath_request(request),
            Some(picture) = picture_rx.recv() => daemon.on_picture(picture).await,
            Some(networks) = networks_rx.recv() => daemon.networks_read(networks).await,
            Some(result) = snapshot_rx.recv() => {
                daemon.snapshot_done();
                match result {
                    Ok(snap) => match daemon.apply(snap).await {
                        Ok(()) if !in_sync => {
                            in_sync = true;
                            tracing::info!("in sync with Docker");
                            crate::systemd::notify_status("in sync with Docker");
                        }
                        Ok(()) => {}
                        Err(e) => tracing::warn!("reconcile failed: {e:#}"),
                    },
                    // The watcher resyncs once Docker is back.
                    Err(e) => tracing::warn!("reading Docker's state failed: {e:#}"),
                }
            }
            _ = log_tick.tick(), if opts.debug_datapath => daemon.dp.flush_logs(),
            // Also before the first pass succeeds: it may have failed for a
            // reason of netd's own.
            _ = resync_tick.tick() => {
                tracing::debug!("periodic resync");
                daemon.read_snapshot();
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
                daemon.read_snapshot();
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
                            let _ = mirror_tx.try_send(());
                        }
                        SourceUpdate::Event(e) => {
                            tracing::debug!("docker {} {} {}", e.kind, e.action, e.id);
                            needed |= affects_datapath(e);
                            if e.kind == "network" {
                                let _ = mirror_tx.try_send(());
                            }
                        }
                    }
                }
                if needed {
                    daemon.read_snapshot();
                }
            }
        }
    }
    watcher.abort();
    for task in cluster_tasks.into_iter().flatten().chain(plugin_server) {
        task.abort();
    }
    tracing::info!(
        "exiting; the datapath stays attached (`netd uninstall --pin-dir {}` removes it)",
        opts.pin_dir.display()
    );
    Ok(())
}
