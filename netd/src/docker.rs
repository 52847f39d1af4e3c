//! The Docker source: connects to dockerd through its API and follows its
//! events, surviving dockerd restarts.
use std::{collections::HashMap, path::Path, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use bollard::{system::EventsOptions, Docker, API_DEFAULT_VERSION};
use futures::StreamExt as _;
use tokio::sync::mpsc;

/// Default Docker endpoint when neither --docker-host nor DOCKER_HOST is set.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// A Docker object change netd cares about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerEvent {
    /// "container" or "network".
    pub kind: String,
    /// "start", "die", "destroy", "connect", …
    pub action: String,
    pub id: String,
}

/// What the event watcher reports to the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceUpdate {
    Event(DockerEvent),
    /// The stream was (re)established: anything may have changed while it
    /// was down, so the daemon must resync from a full list.
    Resync,
}

/// Connects to `host` (unix:///path, /path, tcp://h:p or http://h:p) and
/// checks that dockerd answers.
pub async fn connect(host: &str) -> Result<Docker> {
    let docker = client(host)?;
    let version = docker.version().await.map_err(|e| {
        anyhow!("Docker at {host} does not answer ({e}): is dockerd running? (set --docker-host)")
    })?;
    tracing::info!(
        "connected to Docker {} (API {}) at {host}",
        version.version.unwrap_or_default(),
        version.api_version.unwrap_or_default()
    );
    Ok(docker)
}

fn client(host: &str) -> Result<Docker> {
    if let Some(path) = host
        .strip_prefix("unix://")
        .or_else(|| host.starts_with('/').then_some(host))
    {
        if !Path::new(path).exists() {
            bail!("no Docker socket at {path}: is dockerd running? (set --docker-host)");
        }
        return Docker::connect_with_unix(path, 30, API_DEFAULT_VERSION)
            .with_context(|| format!("opening Docker socket {path}"));
    }
    if host.starts_with("tcp://") || host.starts_with("http://") {
        let url = host.replacen("tcp://", "http://", 1);
        return Docker::connect_with_http(&url, 30, API_DEFAULT_VERSION)
            .with_context(|| format!("opening Docker endpoint {host}"));
    }
    bail!("unsupported Docker host {host:?}: use unix:///path/docker.sock or tcp://host:port")
}

/// Follows Docker's container and network events and forwards them to `tx`
/// until `tx` closes. On any stream error it reconnects with exponential
/// backoff (capped at 30 s) and sends [`SourceUpdate::Resync`] once back.
pub async fn watch_events(host: String, tx: mpsc::Sender<SourceUpdate>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let docker = match client(&host) {
            Ok(d) if d.ping().await.is_ok() => d,
            Ok(_) | Err(_) => {
                tracing::warn!("Docker at {host} unreachable; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let filters = HashMap::from([(
            "type".to_owned(),
            vec!["container".to_owned(), "network".to_owned()],
        )]);
        let mut events = docker.events(Some(EventsOptions::<String> {
            filters,
            ..Default::default()
        }));
        // Subscribed first, then resync: nothing between the two is lost.
        if tx.send(SourceUpdate::Resync).await.is_err() {
            return;
        }
        backoff = Duration::from_millis(250);
        while let Some(item) = events.next().await {
            match item {
                Ok(msg) => {
                    let event = DockerEvent {
                        kind: msg.typ.map(|t| t.to_string()).unwrap_or_default(),
                        action: msg.action.unwrap_or_default(),
                        id: msg.actor.and_then(|a| a.id).unwrap_or_default(),
                    };
                    if tx.send(SourceUpdate::Event(event)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("Docker event stream broke: {e}");
                    break;
                }
            }
        }
        tracing::warn!("lost Docker event stream at {host}; reconnecting");
    }
}
