//! The Docker source: connects to dockerd through its API and follows its
//! events, surviving dockerd restarts.
use std::{collections::HashMap, path::Path, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use bollard::{
    container::ListContainersOptions, models::ContainerInspectResponse, system::EventsOptions,
    Docker, API_DEFAULT_VERSION,
};
use futures::StreamExt as _;
use tokio::sync::mpsc;

use crate::state::{
    parse_host_ip, parse_mac, parse_port_spec, parse_subnet, EndpointSpec, HostBinding, Network,
    Publish,
};

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

/// A client for the Docker API at `host` (unix:///path, /path, tcp://h:p or
/// http://h:p), checked locally only (the socket exists, the address
/// parses): no request is made yet.
pub fn open(host: &str) -> Result<Docker> {
    client(host)
}

/// `docker` once it answers.
pub async fn answering(docker: Docker, host: &str) -> Result<Docker> {
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
        // Resync first, then subscribe with `since` = a moment taken before
        // the resync: events in between are replayed, never lost (a replay
        // is harmless, reconciling is idempotent).
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
            .unwrap_or_default();
        if tx.send(SourceUpdate::Resync).await.is_err() {
            return;
        }
        let filters = HashMap::from([(
            "type".to_owned(),
            vec!["container".to_owned(), "network".to_owned()],
        )]);
        let mut events = docker.events(Some(EventsOptions::<String> {
            since: Some(since),
            filters,
            ..Default::default()
        }));
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

/// What the running containers ask of the datapath.
#[derive(Debug, Default)]
pub struct Containers {
    pub publishes: Vec<Publish>,
    pub endpoints: Vec<EndpointSpec>,
}

/// Every running container's published ports and bridge endpoints, from a
/// full list and one inspect each. Containers without an IPv4 address of
/// their own (host, none and container:<id> network modes) have neither.
pub async fn containers(docker: &Docker, bridge_networks: &[Network]) -> Result<Containers> {
    let containers = docker
        .list_containers(Some(ListContainersOptions::<String> {
            all: false,
            ..Default::default()
        }))
        .await
        .context("listing containers")?;
    let mut out = Containers::default();
    for summary in containers {
        let Some(id) = summary.id else { continue };
        let inspect = match docker.inspect_container(&id, None).await {
            Ok(i) => i,
            // Gone between list and inspect: its destroy event follows.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => continue,
            // Anything else: a partial picture would withdraw a running
            // container's ports and checks; fail the whole pass instead.
            Err(e) => return Err(e).with_context(|| format!("inspecting container {id}")),
        };
        out.publishes.extend(publishes_of(&id, &inspect));
        out.endpoints
            .extend(endpoints_of(&id, &inspect, bridge_networks));
    }
    Ok(out)
}

/// The container's endpoints on bridge networks netd serves.
fn endpoints_of(
    id: &str,
    inspect: &ContainerInspectResponse,
    bridge_networks: &[Network],
) -> Vec<EndpointSpec> {
    let Some(settings) = &inspect.network_settings else {
        return Vec::new();
    };
    let Some(sandbox_key) = settings.sandbox_key.clone().filter(|k| !k.is_empty()) else {
        return Vec::new();
    };
    settings
        .networks
        .iter()
        .flatten()
        .filter_map(|(_, ep)| {
            let network = ep.network_id.clone()?;
            if !bridge_networks.iter().any(|n| n.id == network) {
                return None; // macvlan, ipvlan, overlay…: not ours
            }
            Some(EndpointSpec {
                container: id.to_owned(),
                network,
                addr: ep.ip_address.as_deref()?.parse().ok()?,
                mac: parse_mac(ep.mac_address.as_deref()?)?,
                sandbox_key: sandbox_key.clone(),
            })
        })
        .collect()
}

fn publishes_of(id: &str, inspect: &ContainerInspectResponse) -> Vec<Publish> {
    let Some(settings) = &inspect.network_settings else {
        return Vec::new();
    };
    // The first network (by name) that gave the container an IPv4 address.
    let mut networks: Vec<_> = settings.networks.iter().flatten().collect();
    networks.sort_by(|a, b| a.0.cmp(b.0));
    let Some(container_ip) = networks.iter().find_map(|(_, ep)| {
        ep.ip_address
            .as_deref()
            .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok())
    }) else {
        return Vec::new();
    };
    // Docker fills NetworkSettings.Ports from the network driver's
    // endpoint info, which a plugin cannot give it (Docker 20.10 type-checks
    // the value against its own Go type, which JSON never decodes to): for
    // a container of a netd network, the bindings asked for are the ones.
    let reported = settings
        .ports
        .iter()
        .flatten()
        .any(|(_, b)| b.as_ref().is_some_and(|b| !b.is_empty()));
    let asked = inspect
        .host_config
        .as_ref()
        .and_then(|h| h.port_bindings.as_ref());
    let ports = if reported {
        settings.ports.as_ref()
    } else {
        asked
    };
    let mut out = Vec::new();
    for (spec, bindings) in ports.into_iter().flatten() {
        let Some((container_port, proto)) = parse_port_spec(spec) else {
            warn_once(format!(
                "container {}: port {spec} is not published (netd serves tcp and udp)",
                &id[..id.len().min(12)]
            ));
            continue;
        };
        for b in bindings.iter().flatten() {
            // 0 or none: a port for Docker's bridge driver to pick.
            let Some(host_port) = b
                .host_port
                .as_deref()
                .and_then(|p| p.parse().ok())
                .filter(|p| *p != 0)
            else {
                continue;
            };
            let host_ip = match parse_host_ip(b.host_ip.as_deref().unwrap_or("")) {
                HostBinding::Any => None,
                HostBinding::Addr(ip) => Some(ip),
                HostBinding::Unsupported => continue, // IPv6: not served yet
            };
            out.push(Publish {
                container: id.to_owned(),
                host_ip,
                host_port,
                proto,
                container_ip,
                container_port,
            });
        }
    }
    out
}

/// Logs `message` as a warning the first time only: every reconcile pass
/// (each event, and every 30 s) sees the same containers again. Forgets
/// everything past 1,000 messages (containers come and go), so a warning
/// may then repeat once.
fn warn_once(message: String) {
    static SEEN: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.contains(&message) {
        tracing::warn!("{message}");
        if seen.len() >= 1000 {
            seen.clear();
        }
        seen.insert(message);
    }
}

/// Docker's networks of `driver`.
async fn networks_of_driver(
    docker: &Docker,
    driver: &str,
) -> Result<Vec<bollard::models::Network>> {
    let mut networks = docker
        .list_networks::<String>(None)
        .await
        .context("listing networks")?;
    networks.retain(|n| n.driver.as_deref() == Some(driver));
    Ok(networks)
}

/// Docker's bridge networks. Networks of other drivers (macvlan, ipvlan,
/// overlay, host, null) are left alone.
pub async fn bridge_networks(docker: &Docker) -> Result<Vec<Network>> {
    Ok(networks_of_driver(docker, "bridge")
        .await?
        .into_iter()
        .map(|n| {
            let options = n.options.unwrap_or_default();
            let name = n.name.unwrap_or_default();
            // On the default bridge this option is dockerd's --ip-masq flag,
            // which must be off when netd runs (netd does the masquerade);
            // on user-defined networks it is the operator's per-network choice.
            let masquerade = name == "bridge"
                || options
                    .get("com.docker.network.bridge.enable_ip_masquerade")
                    .is_none_or(|v| v != "false");
            let ipam = n.ipam.and_then(|i| i.config).unwrap_or_default();
            let id = n.id.unwrap_or_default();
            // Docker names a user-defined network's bridge br-<12 hex of its
            // id> unless the option says otherwise (the default bridge's does).
            let bridge = options
                .get("com.docker.network.bridge.name")
                .cloned()
                .unwrap_or_else(|| format!("br-{}", id.get(..12).unwrap_or(&id)));
            Network {
                bridge,
                id,
                name,
                subnets: ipam
                    .iter()
                    .filter_map(|c| c.subnet.as_deref().and_then(parse_subnet))
                    .collect(),
                gateways: ipam
                    .iter()
                    .filter_map(|c| c.gateway.as_deref()?.parse().ok())
                    .collect(),
                masquerade,
                internal: n.internal.unwrap_or(false),
            }
        })
        .collect())
}

/// A network of netd's driver in this host's Docker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetdNetwork {
    pub docker_id: String,
    pub name: String,
    /// netd's id of the cluster network it stands for: the copies netd
    /// made carry it as an option; the first host's copy has it as its id.
    pub netd_id: String,
}

/// Docker's networks of netd's driver.
pub async fn netd_networks(
    docker: &Docker,
    driver: &str,
    id_option: &str,
) -> Result<Vec<NetdNetwork>> {
    Ok(networks_of_driver(docker, driver)
        .await?
        .into_iter()
        .map(|n| {
            let docker_id = n.id.unwrap_or_default();
            let netd_id = n
                .options
                .and_then(|mut o| o.remove(id_option))
                .unwrap_or_else(|| docker_id.clone());
            NetdNetwork {
                docker_id,
                name: n.name.unwrap_or_default(),
                netd_id,
            }
        })
        .collect())
}

/// What a copy of a cluster network is created with.
pub struct NetworkCopy<'a> {
    pub name: &'a str,
    pub driver: &'a str,
    pub subnet: String,
    pub gateway: String,
    pub internal: bool,
    /// `--ip-range`.
    pub ip_range: Option<String>,
    pub options: HashMap<String, String>,
}

/// Creates a network in Docker (driver and IPAM both `copy.driver`).
pub async fn create_network(docker: &Docker, copy: NetworkCopy<'_>) -> Result<()> {
    use bollard::{
        models::{Ipam, IpamConfig},
        network::CreateNetworkOptions,
    };
    docker
        .create_network(CreateNetworkOptions {
            name: copy.name.to_owned(),
            check_duplicate: true,
            driver: copy.driver.to_owned(),
            internal: copy.internal,
            ipam: Ipam {
                driver: Some(copy.driver.to_owned()),
                config: Some(vec![IpamConfig {
                    subnet: Some(copy.subnet),
                    gateway: Some(copy.gateway),
                    ip_range: copy.ip_range,
                    ..Default::default()
                }]),
                options: None,
            },
            options: copy.options,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating network {} in Docker", copy.name))?;
    Ok(())
}

/// Removes a network from Docker; already gone is not an error.
pub async fn remove_network(docker: &Docker, id: &str) -> Result<()> {
    match docker.remove_network(id).await {
        Ok(()) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing network {id} from Docker")),
    }
}
