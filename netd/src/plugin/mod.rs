//! netd as a Docker plugin: one unix socket in Docker's plugin directory
//! serving both the network driver (`-d netd`) and the IPAM driver
//! (`--ipam-driver netd`), backed by the cluster store.
//!
//! Docker's plugin protocol is HTTP POST with JSON bodies. dockerd waits for
//! each answer with no timeout, holding its own locks: handlers never call
//! Docker's API (it could deadlock), answer from etcd and the kernel only,
//! and are idempotent (Docker retries, and calls Leave/DeleteEndpoint for
//! endpoints netd may not know: unknown ids get `{}`).
pub mod driver;
mod ipam;

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::Path,
    sync::{atomic::AtomicI64, Arc, Mutex},
};

use anyhow::{Context as _, Result};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Request, Response, StatusCode};
use serde_json::{json, Value};

use tokio::sync::{mpsc, oneshot};

use crate::cluster::{EndpointRecord, NetworkRecord, Store};

/// Where dockerd looks for plugin sockets (`NAME.sock`).
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/netd.sock";
/// The driver and IPAM name users pass to `-d` and `--ipam-driver`.
pub const NAME: &str = "netd";
/// The address space netd's IPAM answers with: a network created with
/// another IPAM shows another one in CreateNetwork, and is refused.
pub const ADDRESS_SPACE: &str = "netd";

/// Docker's network id on this host → netd's network id. A network's copy
/// on its first host has netd's id; the copies the mirror makes elsewhere
/// carry it in the `netd.id` option. Shared by the plugin (CreateNetwork)
/// and the mirror (which reads Docker's networks).
pub type LocalNetworks = Arc<Mutex<HashMap<String, String>>>;

/// What Join and Leave ask of the daemon, which owns the datapath: the
/// endpoint's programs attached and its entries written before Join
/// answers, so the container's first packet is handled.
pub enum DatapathRequest {
    Join {
        ifname: String,
        ifindex: u32,
        record: EndpointRecord,
        /// Its network, as Join read it: a segment network's entries are
        /// written with the endpoint's, before its first frame.
        network: Box<crate::cluster::NetworkRecord>,
        /// A segment network's parent and VLAN on this host.
        segment: Option<netd_common::Segment>,
        done: oneshot::Sender<anyhow::Result<()>>,
    },
    Leave {
        ifindex: u32,
        done: oneshot::Sender<anyhow::Result<()>>,
    },
}

/// This host, as the handlers need it.
#[derive(Clone)]
pub struct HostInfo {
    pub node: String,
    pub vtep: Ipv4Addr,
    /// Container MTUs follow its MTU.
    pub uplink: String,
    /// The host's lease: endpoints are published on it.
    pub lease: Arc<AtomicI64>,
}

/// How the owner of an address claim starts until CreateEndpoint names it
/// after its endpoint.
pub const PENDING_CLAIM: &str = "pending-";

/// Subnet → its `--ip-range`.
type IpRanges = HashMap<(Ipv4Addr, u8), (Ipv4Addr, u8)>;

/// What the handlers share.
#[derive(Clone)]
pub struct Plugin {
    store: Store,
    host: HostInfo,
    local: LocalNetworks,
    datapath: mpsc::Sender<DatapathRequest>,
    /// `--ip-range` by subnet, from RequestPool to the CreateNetwork that
    /// follows it (Docker tells only the IPAM driver the range).
    ip_ranges: Arc<std::sync::Mutex<IpRanges>>,
}

impl Plugin {
    pub fn new(
        store: Store,
        host: HostInfo,
        local: LocalNetworks,
        datapath: mpsc::Sender<DatapathRequest>,
    ) -> Self {
        Self {
            store,
            host,
            local,
            datapath,
            ip_ranges: Arc::default(),
        }
    }

    /// Hands `request` to the daemon and waits for its answer.
    async fn ask_datapath(
        &self,
        request: impl FnOnce(oneshot::Sender<anyhow::Result<()>>) -> DatapathRequest,
    ) -> anyhow::Result<()> {
        let (done, answer) = oneshot::channel();
        self.datapath
            .send(request(done))
            .await
            .map_err(|_| anyhow::anyhow!("netd is shutting down"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("netd is shutting down"))?
    }

    /// Runs `cleanup` (a store change Docker asked for and never asks
    /// again: DeleteEndpoint, ReleaseAddress) until it succeeds. The first
    /// try is awaited; if the store does not answer, the handler answers
    /// anyway and the rest happen in the background, so a container removed
    /// while etcd is away does not leave its endpoint and address claimed.
    /// Nothing can claim that address meanwhile: claims need the store.
    async fn until_done<F, Fut>(&self, what: String, mut cleanup: F)
    where
        F: FnMut(Plugin) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>> + Send,
    {
        let Err(e) = cleanup(self.clone()).await else {
            return;
        };
        tracing::warn!("{what}: {e:#}; retrying until the cluster store answers");
        let plugin = self.clone();
        tokio::spawn(async move {
            let mut wait = std::time::Duration::from_secs(1);
            loop {
                tokio::time::sleep(wait).await;
                match cleanup(plugin.clone()).await {
                    Ok(()) => {
                        tracing::info!("{what}: done");
                        return;
                    }
                    Err(e) => tracing::debug!("{what}: {e:#}"),
                }
                wait = (wait * 2).min(std::time::Duration::from_secs(10));
            }
        });
    }

    /// netd's id of Docker's network `docker_id` on this host: known since
    /// CreateNetwork or the mirror's last read of Docker, else from the
    /// store's record of this host's copies (a restarted netd, before the
    /// mirror has read Docker), else its own (the network's first copy).
    async fn netd_id(&self, docker_id: &str) -> Result<String> {
        let known = self
            .local
            .lock()
            .expect("local networks lock")
            .get(docker_id)
            .cloned();
        if let Some(id) = known {
            return Ok(id);
        }
        let id = self
            .store
            .clone()
            .copy_of(&self.host.node, docker_id)
            .await?
            .unwrap_or_else(|| docker_id.to_owned());
        self.remember(docker_id, &id);
        Ok(id)
    }

    fn remember(&self, docker_id: &str, id: &str) {
        self.local
            .lock()
            .expect("local networks lock")
            .insert(docker_id.into(), id.into());
    }

    /// The netd network with subnet `subnet`, if any.
    async fn network_by_subnet(&self, subnet: (Ipv4Addr, u8)) -> Result<Option<NetworkRecord>> {
        let (networks, _) = self.store.clone().networks().await?;
        Ok(networks.into_iter().find(|n| n.subnet == subnet))
    }

    async fn handle(&self, method: &str, body: Value) -> Reply {
        match method {
            "/Plugin.Activate" => Reply::ok(json!({"Implements": ["NetworkDriver", "IpamDriver"]})),
            m if m.starts_with("/IpamDriver.") => ipam::handle(self, &m[12..], body).await,
            m if m.starts_with("/NetworkDriver.") => driver::handle(self, &m[15..], body).await,
            _ => Reply::not_found(),
        }
    }
}

/// A handler's answer. Docker reads errors from `Err` (network driver) or
/// `Error` (IPAM), with HTTP 200 either way; 404 means "not implemented".
struct Reply {
    status: StatusCode,
    body: Value,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body,
        }
    }

    fn not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            body: json!({"Err": "not implemented by netd"}),
        }
    }

    /// An error in the key the caller's protocol reads.
    fn error(key: &str, e: &anyhow::Error) -> Self {
        Self::ok(json!({ key: format!("{e:#}") }))
    }
}

/// The plugin's listening socket: the one systemd passed (`netd.socket`,
/// which outlives netd's restarts) or, without socket activation, `socket`
/// bound afresh. Opened before anything is attached, so a socket that
/// cannot be had is a start-up error.
pub fn listen(socket: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(passed) = crate::systemd::plugin_listener()? {
        let listener = tokio::net::UnixListener::from_std(passed)
            .context("serving the plugin socket passed by systemd")?;
        let at = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            .unwrap_or_else(|| "an unnamed socket".into());
        tracing::info!("Docker plugin {NAME} listening on {at} (passed by systemd)");
        if at != socket.display().to_string() {
            tracing::warn!(
                "--plugin-socket {} is not used: systemd passed the socket at {at}",
                socket.display()
            );
        }
        return Ok(listener);
    }
    let listener = bind(socket)?;
    tracing::info!("Docker plugin {NAME} listening on {}", socket.display());
    Ok(listener)
}

/// Serves the plugin on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::UnixListener, plugin: Plugin) -> Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accepting a plugin connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let plugin = plugin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let plugin = plugin.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&plugin, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("plugin connection: {e}");
            }
        });
    }
}

fn bind(socket: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the plugin directory {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the stale {}", socket.display()));
        }
        _ => {}
    }
    tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("listening on the plugin socket {}", socket.display()))
}

async fn respond(plugin: &Plugin, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let method = req.uri().path().to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(Reply::error(
                "Err",
                &anyhow::anyhow!("reading the request: {e}"),
            ))
        }
    };
    // Some calls (Activate, GetCapabilities) come with an empty body.
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                let e = anyhow::anyhow!("malformed request to {method}: {e}");
                tracing::warn!("{e}");
                return reply(Reply::error("Err", &e));
            }
        }
    };
    let started = std::time::Instant::now();
    let answer = plugin.handle(&method, body).await;
    tracing::debug!(
        "plugin {method}: {} {} in {:?}",
        answer.status.as_u16(),
        answer.body,
        started.elapsed()
    );
    reply(answer)
}

fn reply(r: Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(r.body.to_string())));
    *resp.status_mut() = r.status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/vnd.docker.plugins.v1+json"),
    );
    resp
}

/// `"a.b.c.d/len"` as Docker writes addresses and pools.
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("{s:?} is not an IPv4 address/length"))?;
    let addr = addr
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not an IPv4 address/length"))?;
    let len = len
        .parse::<u8>()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| anyhow::anyhow!("{s:?} has no valid prefix length"))?;
    Ok((addr, len))
}

/// A string field of a request, empty when absent.
fn field<'a>(body: &'a Value, name: &str) -> &'a str {
    body.get(name).and_then(Value::as_str).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_are_parsed_strictly() {
        assert_eq!(
            parse_cidr("198.19.66.0/24").unwrap(),
            (Ipv4Addr::new(198, 19, 66, 0), 24)
        );
        for bad in [
            "198.19.66.0",
            "198.19.66.0/33",
            "x/24",
            "198.19.66.0/-1",
            "",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
