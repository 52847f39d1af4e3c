//! `netd run`: load and attach the dataplane, follow Docker, exit cleanly on
//! SIGTERM/SIGINT leaving the datapath pinned and forwarding.
use std::{collections::HashMap, path::PathBuf};

use anyhow::{Context as _, Result};
use netd_common::{CtTimeouts, NatConfig};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    dataplane::{self, Attachment, Dataplane, LoadOptions},
    docker::{self, DockerEvent, SourceUpdate},
    netlink, reconcile, state,
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

/// One reconcile pass: from a full list of Docker's containers and
/// networks and the uplink's addresses, bring every map to the desired
/// state, writing only the difference.
async fn reconcile_all(
    docker: &bollard::Docker,
    dp: &mut Dataplane,
    uplink: &str,
    snat_ports: (u16, u16),
    netns_cookie: u64,
) -> Result<()> {
    let started = std::time::Instant::now();
    let host_addrs = netlink::ipv4_addresses(uplink).await?;
    let config = NatConfig {
        host_addr: host_addrs.first().map_or([0; 4], |a| a.octets()),
        snat_port_min: snat_ports.0,
        snat_port_max: snat_ports.1,
        uplink_ifindex: dataplane::interface_index(uplink)?,
        _pad: 0,
        netns_cookie,
    };
    if dp.config()? != config {
        dp.set_config(config)?;
        tracing::info!(
            "masquerading as {:?}, fallback source ports {}-{}",
            host_addrs.first(),
            snat_ports.0,
            snat_ports.1
        );
    }
    let networks = docker::bridge_networks(docker).await?;
    let net_applied = reconcile::networks(dp, &state::desired_networks(&networks))?;
    let containers = docker::containers(docker, &networks).await?;
    let mut endpoints = HashMap::new();
    let mut unresolved = 0;
    for spec in &containers.endpoints {
        match host_veth(spec) {
            Ok((ifindex, ifname)) => {
                endpoints.insert(ifindex, (ifname, state::endpoint_value(spec)));
            }
            Err(e) => {
                tracing::warn!("endpoint of {}: {e:#}", short(&spec.container));
                unresolved += 1;
            }
        }
    }
    // With an endpoint unresolved (gone meanwhile, or its namespace not
    // ready) the picture is partial: applying it could strip a running
    // container's checks. Keep what is there; the next pass retries.
    let ep_applied = if unresolved == 0 {
        reconcile::endpoints(dp, &endpoints)?
    } else {
        reconcile::Applied::default()
    };
    // "Every address" publishes are also served on the bridges' gateway
    // addresses, where containers reach the host.
    let mut served_addrs = host_addrs.clone();
    served_addrs.extend(networks.iter().flat_map(|n| n.gateways.iter().copied()));
    let desired = state::desired_ports(&containers.publishes, &served_addrs);
    let applied = reconcile::ports(dp, &desired)?;
    let nothing = reconcile::Applied::default();
    if applied != nothing || net_applied != nothing || ep_applied != nothing {
        tracing::info!(
            "ports {}; networks {}; endpoints {}; in {:?}",
            summary(&applied, desired.len()),
            summary(&net_applied, networks.len()),
            summary(&ep_applied, endpoints.len()),
            started.elapsed()
        );
    }
    Ok(())
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
/// A full reconcile even without Docker events or address changes: retries
/// what a failed pass left undone.
const RESYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

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
    let (tx, mut rx) = mpsc::channel(1024);
    let watcher = tokio::spawn(docker::watch_events(opts.docker_host.clone(), tx));
    let (addr_tx, mut addr_rx) = mpsc::channel(16);
    netlink::watch_ipv4_addresses(addr_tx)?;

    let mut log_tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let mut gc_tick = tokio::time::interval(CT_GC_INTERVAL);
    let mut resync_tick = tokio::time::interval(RESYNC_INTERVAL);
    resync_tick.tick().await; // the first tick is immediate; the watcher resyncs at start
    let mut in_sync = false;
    loop {
        tokio::select! {
            _ = log_tick.tick(), if opts.debug_datapath => dp.flush_logs(),
            _ = resync_tick.tick(), if in_sync => {
                if let Err(e) = reconcile_all(&docker, &mut dp, &uplink, opts.snat_ports, netns_cookie).await {
                    tracing::warn!("periodic reconcile failed: {e:#}");
                }
            }
            _ = gc_tick.tick() => {
                match dp.gc_nat_flows(dataplane::monotonic_now_ns(), &opts.ct_timeouts) {
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
                if let Err(e) = reconcile_all(&docker, &mut dp, &uplink, opts.snat_ports, netns_cookie).await {
                    tracing::warn!("reconcile after an address change failed: {e:#}");
                }
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
                    match reconcile_all(&docker, &mut dp, &uplink, opts.snat_ports, netns_cookie).await {
                        Ok(()) if !in_sync => {
                            in_sync = true;
                            tracing::info!("in sync with Docker");
                        }
                        Ok(()) => {}
                        // The watcher resyncs once Docker is back.
                        Err(e) => tracing::warn!("reconcile failed: {e:#}"),
                    }
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
