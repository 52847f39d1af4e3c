//! The daemon's side of overlay networks: the endpoints the plugin joined
//! on this host, and the cluster's picture (networks, other hosts'
//! endpoints, hosts) turned into the overlay maps.
//!
//! Endpoints of netd networks are the plugin's, not Docker's reports: Join
//! registers them, Leave removes them, and after a restart they are found
//! again from the pinned endpoint map (their veths are named `nd…`) and the
//! cluster store's records of this host.
use std::collections::HashMap;

use anyhow::Result;
use netd_common::{network::network_id, Endpoint, EndpointLocation, NetworkInfo};

use crate::{
    cluster::{EndpointRecord, Picture, Store},
    dataplane::{Attachment, Dataplane, Overlays, Peers, RoutedBlocks, Vnis, Vteps},
    netlink,
    plugin::DatapathRequest,
    reconcile,
    segment::Segments,
    state,
};

/// Prefix of the host-side veth of a netd endpoint.
pub const VETH_PREFIX: &str = "nd";
/// Prefix of its container-side peer's name, until Docker moves it into
/// the container (and after Docker moves it back, its container gone).
pub const PEER_VETH_PREFIX: &str = "nc";

/// Whether the container end of host-side veth `ifname` is back in this
/// namespace: Docker took the container down (and moved its interface
/// back) without a Leave reaching netd, while netd was down.
fn container_left(ifname: &str) -> bool {
    ifname.strip_prefix(VETH_PREFIX).is_some_and(|short| {
        nix::net::if_::if_nametoindex(format!("{PEER_VETH_PREFIX}{short}").as_str()).is_ok()
    })
}

/// A netd endpoint on this host.
pub struct Joined {
    pub ifname: String,
    pub endpoint: Endpoint,
    /// Its record in the cluster store; None until read back after a
    /// restart.
    pub record: Option<EndpointRecord>,
}

pub struct Overlay {
    node: String,
    store: Store,
    lease: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// What the last picture asked for.
    desired: state::OverlayDesired,
    /// By host-side veth ifindex.
    joined: HashMap<u32, Joined>,
    /// Whether this daemon has taken over its host's records yet.
    adopted: bool,
    /// The gateway addresses last put on lo.
    gateways_applied: Option<Vec<std::net::Ipv4Addr>>,
    /// Segment (macvlan) networks: their parents and container MACs.
    segments: Segments,
    /// The other hosts not on this LAN, as last read.
    off_link: std::collections::HashSet<std::net::Ipv4Addr>,
    /// Endpoints here with neither a record nor a claim in the store,
    /// already said in the log.
    unclaimed: std::collections::HashSet<[u8; 4]>,
    /// (host, mode) pairs of hosts whose netd does not run a mode some
    /// network has, already said in the log.
    behind: std::collections::HashSet<(String, String)>,
}

impl Overlay {
    /// Picks up the endpoints an earlier daemon registered (pinned) whose
    /// veths still exist.
    pub fn new(
        dp: &mut Dataplane,
        node: String,
        store: Store,
        lease: std::sync::Arc<std::sync::atomic::AtomicI64>,
    ) -> Result<Self> {
        let mut joined = HashMap::new();
        for (ifindex, endpoint) in dp.endpoints()? {
            let ifname = nix::net::if_::if_indextoname(ifindex)
                .ok()
                .map(|n| n.to_string_lossy().into_owned());
            if let Some(ifname) = ifname.filter(|n| n.starts_with(VETH_PREFIX)) {
                if container_left(&ifname) {
                    // Its maps entries go with the next reconcile, its
                    // record and address with the adoption below.
                    tracing::info!("the container of {ifname} left while netd was down");
                    tokio::spawn(async move {
                        if let Err(e) = netlink::delete_link(&ifname).await {
                            tracing::warn!("{e:#}");
                        }
                    });
                    continue;
                }
                joined.insert(
                    ifindex,
                    Joined {
                        ifname,
                        endpoint,
                        record: None,
                    },
                );
            }
        }
        Ok(Self {
            node,
            store,
            lease,
            desired: state::OverlayDesired::default(),
            joined,
            adopted: false,
            gateways_applied: None,
            segments: Segments::new(dp)?,
            off_link: Default::default(),
            unclaimed: Default::default(),
            behind: Default::default(),
        })
    }

    /// Subnets and gateways for `netd_networks`, besides Docker's bridges.
    pub fn networks(&self) -> &HashMap<(std::net::Ipv4Addr, u8), NetworkInfo> {
        &self.desired.networks
    }

    /// This host's netd endpoints, to merge with Docker's bridge endpoints.
    pub fn endpoints(&self) -> impl Iterator<Item = (u32, (String, Endpoint))> + '_ {
        self.joined
            .iter()
            .map(|(i, j)| (*i, (j.ifname.clone(), j.endpoint)))
    }

    /// Attaches and registers a joined endpoint, or removes one that left.
    pub fn on_request(&mut self, dp: &mut Dataplane, request: DatapathRequest) {
        match request {
            DatapathRequest::Join {
                ifname,
                ifindex,
                record,
                network,
                segment,
                done,
            } => {
                let endpoint = Endpoint {
                    addr: record.addr.octets(),
                    mac: record.mac,
                    _pad: [0; 2],
                    network: network_id(&record.network),
                };
                let registered = (|| {
                    // Entries first: the programs drop what comes from an
                    // unknown endpoint.
                    dp.set_endpoint_location(
                        record.addr,
                        EndpointLocation::of(ifindex, &endpoint),
                    )?;
                    if let Some(segment) = segment {
                        self.segments
                            .join(dp, ifindex, &endpoint, &network.parent, segment)?;
                    }
                    dp.set_endpoint(ifindex, endpoint)?;
                    for att in [Attachment::ContainerEgress, Attachment::ContainerIngress] {
                        dp.attach(att, &ifname)?;
                    }
                    Ok(())
                })();
                if registered.is_ok() {
                    tracing::info!(
                        "endpoint {} of network {} joined on {ifname}",
                        record.addr,
                        short(&record.network)
                    );
                    self.joined.insert(
                        ifindex,
                        Joined {
                            ifname,
                            endpoint,
                            record: Some(record),
                        },
                    );
                }
                let _ = done.send(registered);
            }
            DatapathRequest::Leave { ifindex, done } => {
                let left = match self.joined.remove(&ifindex) {
                    Some(j) => (|| {
                        self.segments.leave(dp, &j.endpoint)?;
                        dp.remove_endpoint_location(j.endpoint.addr.into())?;
                        dp.remove_endpoint(ifindex)?;
                        for att in [Attachment::ContainerEgress, Attachment::ContainerIngress] {
                            dp.detach(att, &j.ifname)?;
                        }
                        tracing::info!(
                            "endpoint {:?} left",
                            std::net::Ipv4Addr::from(j.endpoint.addr)
                        );
                        Ok(())
                    })(),
                    None => Ok(()),
                };
                let _ = done.send(left);
            }
        }
    }

    /// A veth that vanished (its container's namespace went away without a
    /// Leave, or netd missed it): its endpoint goes, and is not published
    /// again.
    pub fn forget(&mut self, dp: &mut Dataplane, ifindex: u32) {
        let Some(j) = self.joined.remove(&ifindex) else {
            return;
        };
        let gone = (|| {
            self.segments.leave(dp, &j.endpoint)?;
            dp.remove_endpoint_location(j.endpoint.addr.into())?;
            dp.remove_endpoint(ifindex)?;
            for att in [Attachment::ContainerEgress, Attachment::ContainerIngress] {
                dp.detach(att, &j.ifname)?;
            }
            anyhow::Ok(())
        })();
        if let Err(e) = gone {
            tracing::warn!("removing the endpoint of vanished {}: {e:#}", j.ifname);
        }
    }

    /// Brings the overlay maps and the gateway addresses to `picture`, and
    /// publishes again this host's endpoints the store lost (a lease that
    /// ran out while etcd was away).
    pub async fn apply(&mut self, dp: &mut Dataplane, picture: &Picture) -> Result<bool> {
        let others: Vec<std::net::Ipv4Addr> = picture
            .hosts
            .iter()
            .filter(|h| h.node != self.node)
            .map(|h| h.vtep)
            .collect();
        // A failed read keeps the last answer: taking every host for one
        // on this LAN would route to hosts beyond a router.
        match netlink::off_link(&others).await {
            Ok(off_link) => self.off_link = off_link,
            Err(e) => tracing::warn!("{e:#}"),
        }
        self.say_hosts_behind(picture);
        let desired = state::desired_overlay(picture, &self.node, &self.off_link);
        for b in desired
            .unroutable
            .iter()
            .filter(|b| !self.desired.unroutable.contains(b))
        {
            tracing::warn!(
                "host {} is not on this LAN: its block {}/{} of routed network {} is \
                 unreachable without encapsulation",
                b.host,
                b.block.0,
                b.block.1,
                short(&b.network)
            );
        }
        let mut changed = reconcile::table::<Overlays>(dp, &desired.overlays)?;
        changed.add(reconcile::prefixes::<RoutedBlocks>(
            dp,
            &desired.routed_blocks,
        )?);
        changed.add(reconcile::table::<Vnis>(dp, &desired.vnis)?);
        changed.add(reconcile::table::<Peers>(dp, &desired.peers)?);
        changed.add(reconcile::table::<Vteps>(dp, &desired.vteps)?);
        // lo is dumped only when the gateways changed (or the last try
        // failed), not on every endpoint's coming and going. One address
        // that cannot be put on lo must not stall the rest.
        let gateways = if self.gateways_applied.as_ref() == Some(&desired.gateways) {
            false
        } else {
            match netlink::sync_gateway_addresses(&desired.gateways).await {
                Ok(changed) => {
                    self.gateways_applied = Some(desired.gateways.clone());
                    changed
                }
                Err(e) => {
                    tracing::warn!("{e:#}");
                    false
                }
            }
        };
        let joined: Vec<(u32, Endpoint)> =
            self.joined.iter().map(|(i, j)| (*i, j.endpoint)).collect();
        if let Err(e) = self.segments.apply(dp, picture, &joined).await {
            tracing::warn!("segment networks: {e:#}");
        }
        let networks_changed = desired.networks != self.desired.networks;
        self.desired = desired;
        if !self.adopted {
            self.adopted = true;
            self.adopt(picture);
        }
        // Records of this host's endpoints: read back after a restart, put
        // back when missing.
        for joined in self.joined.values_mut() {
            let own = picture
                .endpoints
                .iter()
                .find(|e| e.host == self.node && e.addr.octets() == joined.endpoint.addr);
            if own.is_none() && joined.record.is_none() {
                joined.record = rebuilt_record(picture, &self.node, &joined.endpoint);
            }
            match (own, &joined.record) {
                (Some(r), _) => joined.record = Some(r.clone()),
                (None, Some(record)) => {
                    let (mut store, record) = (self.store.clone(), record.clone());
                    let lease = self.lease.load(std::sync::atomic::Ordering::Relaxed);
                    // A host forgotten while it was cut off from the store
                    // lost its claims: the address is taken back first, or
                    // the endpoint is not published over somebody else's.
                    let claimed = picture.claims.iter().any(|(n, a, c)| {
                        *n == record.network && *a == record.addr && c.host == self.node
                    });
                    tokio::spawn(async move {
                        if !claimed {
                            let claim = crate::cluster::AddressClaim {
                                host: record.host.clone(),
                                owner: record.endpoint.clone(),
                            };
                            if let Err(e) = store
                                .claim_exact(&record.network, record.addr, &claim)
                                .await
                            {
                                tracing::warn!(
                                    "endpoint {} lost its address claim (was this host \
                                     forgotten?) and cannot take it back: {e:#}; remove its \
                                     container",
                                    record.addr
                                );
                                return;
                            }
                        }
                        match store.put_endpoint(&record, lease).await {
                            Ok(()) => tracing::info!("endpoint {} published again", record.addr),
                            Err(e) => tracing::warn!("publishing endpoint {}: {e:#}", record.addr),
                        }
                    });
                }
                (None, None) => {
                    // The host was forgotten (`netd forget-host`) while it
                    // was away: nothing of this endpoint is in the store.
                    let addr = std::net::Ipv4Addr::from(joined.endpoint.addr);
                    if self.unclaimed.insert(joined.endpoint.addr) {
                        tracing::warn!(
                            "endpoint {addr} on {} has no record or address claim of this host \
                             in the cluster store (was this host forgotten?): other hosts do not \
                             reach it and its address may be given to another container; \
                             remove its container",
                            joined.ifname
                        );
                    }
                }
            }
        }
        let nothing = reconcile::Applied::default();
        if changed != nothing {
            tracing::info!(
                "overlay: {} networks, {} peers, {} hosts",
                self.desired.overlays.len(),
                self.desired.peers.len(),
                self.desired.vteps.len()
            );
        }
        Ok(networks_changed || gateways)
    }
}

/// The record of a local endpoint whose record is gone (its lease ran out
/// while this daemon was away), from its address claim, which names the
/// endpoint and is not on the lease.
fn rebuilt_record(picture: &Picture, node: &str, endpoint: &Endpoint) -> Option<EndpointRecord> {
    let network = picture
        .networks
        .iter()
        .find(|n| network_id(&n.id) == endpoint.network)?;
    let addr = std::net::Ipv4Addr::from(endpoint.addr);
    let (_, _, claim) = picture
        .claims
        .iter()
        .find(|(n, a, c)| *n == network.id && *a == addr && c.host == node)?;
    let vtep = picture.hosts.iter().find(|h| h.node == node)?.vtep;
    Some(EndpointRecord {
        network: network.id.clone(),
        addr,
        mac: endpoint.mac,
        host: node.to_owned(),
        vtep,
        endpoint: claim.owner.clone(),
    })
}

impl Overlay {
    /// Says once per host and mode when a host's netd (an older release,
    /// registered after the network was made) does not run a mode one of
    /// the cluster's networks has: it takes such a network for an overlay
    /// one, and its containers on it do not work.
    fn say_hosts_behind(&mut self, picture: &Picture) {
        for host in &picture.hosts {
            for n in picture.networks.iter().filter(|n| !host.runs(&n.mode)) {
                if self.behind.insert((host.node.clone(), n.mode.clone())) {
                    tracing::warn!(
                        "host {} runs a netd release without {} networks, as network {} is: \
                         upgrade it",
                        host.node,
                        n.mode,
                        n.label()
                    );
                }
            }
        }
    }

    /// A new daemon's first picture: this host's endpoint records go on
    /// this daemon's lease (the previous daemon's runs out after its TTL,
    /// and would take them along), and those whose veth is still missing
    /// after [`JOIN_GRACE`] (their container left while netd was down, and
    /// Docker's Leave found no plugin) are withdrawn with their addresses.
    /// The grace: CreateEndpoint may have published one just before the
    /// restart, and its Join not come yet.
    fn adopt(&self, picture: &Picture) {
        let lease = self.lease.load(std::sync::atomic::Ordering::Relaxed);
        for record in picture.endpoints.iter().filter(|e| e.host == self.node) {
            let alive = endpoint_alive(&record.endpoint);
            let (mut store, record) = (self.store.clone(), record.clone());
            tokio::spawn(async move {
                let kept = store.put_endpoint(&record, lease).await;
                if !alive() {
                    tokio::time::sleep(JOIN_GRACE).await;
                }
                let done = if alive() {
                    kept
                } else {
                    tracing::info!(
                        "endpoint {} left while netd was down: withdrawn",
                        record.addr
                    );
                    match store
                        .delete_endpoint(&record.network, &record.endpoint)
                        .await
                    {
                        Ok(()) => {
                            store
                                .release_address(&record.network, record.addr, &record.host)
                                .await
                        }
                        Err(e) => Err(e),
                    }
                };
                if let Err(e) = done {
                    tracing::warn!("taking over endpoint {}: {e:#}", record.addr);
                }
            });
        }
        // Claims of this host's endpoints whose record went with an
        // expired lease (netd was down longer than its TTL): with no veth
        // after the grace either, the address is given back.
        for (network, addr, claim) in picture.claims.iter().filter(|(_, _, c)| {
            c.host == self.node
                && !c.owner.starts_with(crate::plugin::PENDING_CLAIM)
                && !picture.endpoints.iter().any(|e| e.endpoint == c.owner)
        }) {
            let alive = endpoint_alive(&claim.owner);
            let (mut store, network, addr, host) = (
                self.store.clone(),
                network.clone(),
                *addr,
                claim.host.clone(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(JOIN_GRACE).await;
                if alive() {
                    return;
                }
                tracing::info!(
                    "address {addr} of an endpoint that left while netd was down: released"
                );
                if let Err(e) = store.release_address(&network, addr, &host).await {
                    tracing::warn!("releasing {addr}: {e:#}");
                }
            });
        }
    }
}

/// Whether endpoint `id`'s veth is here with its container end in a
/// container.
fn endpoint_alive(id: &str) -> impl Fn() -> bool + Send + 'static {
    let veth = id.get(..11).map(|short| format!("{VETH_PREFIX}{short}"));
    move || {
        veth.as_ref().is_some_and(|v| {
            nix::net::if_::if_nametoindex(v.as_str()).is_ok() && !container_left(v)
        })
    }
}

/// How long, at a daemon's start, an endpoint record of this host whose
/// veth is missing waits for its Join before it is withdrawn.
const JOIN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the cluster's picture whenever `wake` says the store changed (and
/// every `resync`), and sends it on `tx`.
pub async fn read_pictures(
    mut store: Store,
    mut wake: tokio::sync::mpsc::Receiver<()>,
    tx: tokio::sync::mpsc::Sender<Picture>,
    resync: std::time::Duration,
) {
    loop {
        tokio::select! {
            woken = wake.recv() => if woken.is_none() { return },
            _ = tokio::time::sleep(resync) => {}
        }
        while wake.try_recv().is_ok() {}
        match store.picture().await {
            Ok(p) => {
                if tx.send(p).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
