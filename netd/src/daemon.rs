//! `netd run`: load and attach the dataplane, follow Docker, exit cleanly on
//! SIGTERM/SIGINT leaving the datapath pinned and forwarding.
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use netd_common::Hook;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    dataplane::{self, Dataplane, LoadOptions},
    docker::{self, SourceUpdate},
    netlink,
};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub docker_host: String,
    pub uplink: Option<String>,
    pub pin_dir: PathBuf,
    pub debug_datapath: bool,
}

pub async fn run(opts: RunOptions) -> Result<()> {
    dataplane::require_privileges()?;
    let uplink = match opts.uplink {
        Some(ifname) => ifname,
        None => netlink::default_route_interface().await?,
    };
    dataplane::interface_index(&uplink)?;
    // Local checks first, so a bad pin dir is reported before Docker is tried.
    dataplane::PinDir::check(&opts.pin_dir)?;
    docker::connect(&opts.docker_host).await?;

    let mut dp = Dataplane::open(
        &opts.pin_dir,
        &LoadOptions {
            debug_datapath: opts.debug_datapath,
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
    loop {
        tokio::select! {
            _ = log_tick.tick(), if opts.debug_datapath => dp.flush_logs(),
            _ = sigterm.recv() => { tracing::info!("SIGTERM"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT"); break; }
            update = rx.recv() => match update {
                Some(SourceUpdate::Resync) => tracing::info!("Docker event stream up; resyncing"),
                Some(SourceUpdate::Event(e)) => tracing::debug!("docker {} {} {}", e.kind, e.action, e.id),
                None => break,
            },
        }
    }
    watcher.abort();
    tracing::info!(
        "exiting; the datapath stays attached (`netd uninstall --pin-dir {}` removes it)",
        opts.pin_dir.display()
    );
    Ok(())
}
