//! `netd run`: load and attach the dataplane, follow Docker, exit cleanly on
//! SIGTERM/SIGINT leaving the datapath pinned and forwarding.
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use netd_common::{CtTimeouts, Hook, NatConfig};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    dataplane::{self, Dataplane, LoadOptions},
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
) -> Result<()> {
    let started = std::time::Instant::now();
    let host_addrs = netlink::ipv4_addresses(uplink).await?;
    let config = NatConfig {
        host_addr: host_addrs.first().map_or([0; 4], |a| a.octets()),
        snat_port_min: snat_ports.0,
        snat_port_max: snat_ports.1,
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
    let publishes = docker::published_ports(docker).await?;
    let desired = state::desired_ports(&publishes, &host_addrs);
    let applied = reconcile::ports(dp, &desired)?;
    if applied != reconcile::Applied::default() || net_applied != reconcile::Applied::default() {
        tracing::info!(
            "published ports: +{} ~{} -{} ({} total); networks: +{} ~{} -{} ({} total); in {:?}",
            applied.added,
            applied.changed,
            applied.removed,
            desired.len(),
            net_applied.added,
            net_applied.changed,
            net_applied.removed,
            networks.len(),
            started.elapsed()
        );
    }
    Ok(())
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

    let mut dp = Dataplane::open(
        &opts.pin_dir,
        &LoadOptions {
            debug_datapath: opts.debug_datapath,
            ct_size: Some(opts.ct_size),
        },
    )?;
    for hook in [Hook::UplinkIngress, Hook::UplinkEgress] {
        dp.attach(hook, &uplink)?;
    }
    tracing::info!(
        "datapath attached to uplink {uplink}; objects pinned under {}",
        opts.pin_dir.display()
    );

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let (tx, mut rx) = mpsc::channel(1024);
    let watcher = tokio::spawn(docker::watch_events(opts.docker_host.clone(), tx));

    let mut log_tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let mut gc_tick = tokio::time::interval(CT_GC_INTERVAL);
    loop {
        tokio::select! {
            _ = log_tick.tick(), if opts.debug_datapath => dp.flush_logs(),
            _ = gc_tick.tick() => {
                match dp.gc_nat_flows(dataplane::monotonic_now_ns(), &opts.ct_timeouts) {
                    Ok(r) if r.removed > 0 => {
                        tracing::debug!("conntrack gc: {} of {} entries expired", r.removed, r.scanned)
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("conntrack gc: {e:#}"),
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
                    if let Err(e) = reconcile_all(&docker, &mut dp, &uplink, opts.snat_ports).await {
                        // The watcher resyncs once Docker is back.
                        tracing::warn!("reconcile failed: {e:#}");
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
