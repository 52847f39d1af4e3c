//! The cluster store: what every netd host agrees on, kept in etcd (v3 API).
//! Networks (with a cluster-unique VNI and a subnet that overlaps no other
//! network's) and address claims (one holder per address across all hosts)
//! are created by transactions that fail when what they were planned on
//! changed meanwhile (any network, for a creation; the network and the
//! address, for a claim); the loser reads again and retries.
//!
//! Layout, below [`PREFIX`]:
//! ```text
//! hosts/<node>             HostRecord (JSON), on the host's lease
//! networks/<id>            NetworkRecord (JSON)
//! vnis/<vni>               <id>: the VNI's holder
//! addrs/<id>/<ip>          AddressClaim (JSON)
//! endpoints/<id>/<endpoint> EndpointRecord (JSON), on its host's lease
//! copies/<node>/<docker id> <id>: what a host's Docker network stands for
//! ```
//! A network's id is the Docker network id it was created with on its first
//! host: Docker tells a network driver the id, never the name, so a network
//! is created nameless and named once that host's Docker has reported it
//! ([`Store::name_network`]).
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::state::subnet_contains;

/// Every netd key lives below this; the version lets a later layout live
/// beside this one during an upgrade.
pub const PREFIX: &str = "/netd/v1/";
/// VNIs netd picks from when none is asked for (below is left to
/// operators' own vxlan devices, as Docker's overlay does).
pub const VNI_AUTO: std::ops::RangeInclusive<u32> = 4096..=0xff_ffff;
/// How often a transaction that lost a race is tried again.
const ATTEMPTS: usize = 16;
/// How often a request is tried again on another member.
const RETRIES: usize = 4;

/// An error that says the member asked is not there (another may be).
fn is_unavailable(e: &etcd_client::Error) -> bool {
    match e {
        // gRPC's UNAVAILABLE (14): tonic itself is not a dependency here.
        etcd_client::Error::GRpcStatus(status) => status.code() as i32 == 14,
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// A netd network, as every host sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The Docker network id of its first host's copy.
    pub id: String,
    /// Docker's name for it; empty until its first host's Docker reported it.
    #[serde(default)]
    pub name: String,
    /// The node it was created on.
    pub origin: String,
    /// "overlay", "macvlan", "ipvlan" or "routed".
    pub mode: String,
    /// ipvlan networks: "l2" (on the parent's LAN, sharing its MAC) or
    /// "l3" (routed through the host, as a routed network without NAT).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipvlan_mode: String,
    /// Overlay networks' VXLAN id; 0 for the others.
    pub vni: u32,
    pub subnet: (Ipv4Addr, u8),
    pub gateway: Ipv4Addr,
    pub internal: bool,
    /// Segment networks: the interface their containers sit on, the same
    /// name on every host (Docker's `-o parent=`), and its VLAN (0: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vlan: u16,
    /// Where container addresses come from (`--ip-range`); None: the
    /// whole subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<(Ipv4Addr, u8)>,
    /// Routed networks: the prefix length of each host's block.
    #[serde(default, skip_serializing_if = "is_zero_u8")]
    pub block: u8,
}

fn is_zero_u8(v: &u8) -> bool {
    *v == 0
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}

/// Mode names.
pub const MODE_OVERLAY: &str = "overlay";
pub const MODE_MACVLAN: &str = "macvlan";
pub const MODE_ROUTED: &str = "routed";
pub const MODE_IPVLAN: &str = "ipvlan";
/// The modes this release runs, published in its host record.
pub const MODES: [&str; 4] = [MODE_OVERLAY, MODE_MACVLAN, MODE_IPVLAN, MODE_ROUTED];
pub const IPVLAN_L2: &str = "l2";
pub const IPVLAN_L3: &str = "l3";

/// Whether `mode` (with `ipvlan_mode`) puts containers on the parent's LAN.
fn segment_mode(mode: &str, ipvlan_mode: &str) -> bool {
    mode == MODE_MACVLAN || (mode == MODE_IPVLAN && ipvlan_mode == IPVLAN_L2)
}

/// Whether `mode` (with `ipvlan_mode`) splits the network into host blocks.
fn routed_mode(mode: &str, ipvlan_mode: &str) -> bool {
    mode == MODE_ROUTED || (mode == MODE_IPVLAN && ipvlan_mode == IPVLAN_L3)
}

/// A routed network's block per host unless `netd.block` says otherwise:
/// a /24 (254 containers a host), or a quarter of a smaller network.
pub fn default_block(subnet: (Ipv4Addr, u8)) -> u8 {
    if subnet.1 < 24 {
        24
    } else {
        (subnet.1 + 2).min(30)
    }
}

impl NetworkRecord {
    /// How messages name it: its name, or its short id while it has none.
    pub fn label(&self) -> &str {
        if self.name.is_empty() {
            self.id.get(..12).unwrap_or(&self.id)
        } else {
            &self.name
        }
    }
}

/// What `docker network create -d netd` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkRequest {
    pub id: String,
    pub origin: String,
    pub mode: String,
    pub subnet: (Ipv4Addr, u8),
    /// None: the subnet's first host address.
    pub gateway: Option<Ipv4Addr>,
    /// None: the lowest free one in [`VNI_AUTO`] (overlay networks).
    pub vni: Option<u32>,
    pub internal: bool,
    pub parent: String,
    pub vlan: u16,
    pub ip_range: Option<(Ipv4Addr, u8)>,
    /// Routed networks: the per-host block's prefix length (None: the
    /// default).
    pub block: Option<u8>,
    pub ipvlan_mode: String,
}

impl NetworkRecord {
    /// Whether its containers sit on a physical segment (no VXLAN).
    pub fn is_segment(&self) -> bool {
        segment_mode(&self.mode, &self.ipvlan_mode)
    }

    /// Whether its containers share the parent's MAC (ipvlan L2).
    pub fn shares_parent_mac(&self) -> bool {
        self.mode == MODE_IPVLAN && self.ipvlan_mode == IPVLAN_L2
    }

    /// Whether it is split into per-host blocks, routed between hosts.
    pub fn is_routed(&self) -> bool {
        routed_mode(&self.mode, &self.ipvlan_mode)
    }

    /// Whether its egress leaving the cluster network is masqueraded
    /// (ipvlan L3 containers are routed as they are, as with Docker's).
    pub fn masquerades(&self) -> bool {
        self.mode != MODE_IPVLAN
    }

    /// Its mode as `netd networks` says it: `ipvlan-l3`, `overlay`…
    pub fn mode_label(&self) -> String {
        match self.ipvlan_mode.as_str() {
            "" => self.mode.clone(),
            m => format!("{}-{m}", self.mode),
        }
    }

    /// How many host blocks it has.
    pub fn block_count(&self) -> u64 {
        1u64 << (self.block.saturating_sub(self.subnet.1))
    }

    /// The `index`th host block.
    pub fn block_at(&self, index: u64) -> (Ipv4Addr, u8) {
        let size = 1u64 << (32 - u32::from(self.block));
        let base = u64::from(u32::from(self.subnet.0));
        (Ipv4Addr::from((base + index * size) as u32), self.block)
    }

    /// The parent as Docker's option says it: `eth1`, or `eth1.100`.
    pub fn parent_option(&self) -> String {
        match self.vlan {
            0 => self.parent.clone(),
            vid => format!("{}.{vid}", self.parent),
        }
    }
}

/// Who holds an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressClaim {
    pub host: String,
    /// Docker's endpoint id, or whatever the holder calls it.
    pub owner: String,
}

#[derive(Clone)]
pub struct Store {
    client: Client,
}

impl Store {
    /// Connects to the etcd cluster at `endpoints` and checks that it
    /// answers, within `timeout`.
    pub async fn connect(endpoints: &[String], timeout: Duration) -> Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        let mut client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| anyhow!("etcd at {} is unreachable: {e}", endpoints.join(",")))?;
        client
            .get(
                PREFIX,
                Some(GetOptions::new().with_keys_only().with_limit(1)),
            )
            .await
            .map_err(|e| anyhow!("etcd at {} does not answer: {e}", endpoints.join(",")))?;
        Ok(Self { client })
    }

    /// etcd requests are retried a few times when the member asked is not
    /// reachable: the client balances over every member given, and one
    /// down (a cluster losing a member) must not fail what another member
    /// would answer. Requests are idempotent or conditional (transactions
    /// compare revisions), so a retry never applies anything twice.
    async fn retrying<T, F, Fut>(&self, mut request: F) -> Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 0;
        loop {
            match request(self.client.clone()).await {
                Err(e) if attempt < RETRIES && is_unavailable(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
                }
                other => return other,
            }
        }
    }

    async fn get_retrying(
        &mut self,
        key: impl Into<Vec<u8>>,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, etcd_client::Error> {
        let key = key.into();
        self.retrying(|mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.get(key, options).await }
        })
        .await
    }

    async fn put_retrying(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        options: Option<etcd_client::PutOptions>,
    ) -> Result<etcd_client::PutResponse, etcd_client::Error> {
        let (key, value) = (key.into(), value.into());
        self.retrying(|mut c| {
            let (key, value, options) = (key.clone(), value.clone(), options.clone());
            async move { c.put(key, value, options).await }
        })
        .await
    }

    async fn delete_retrying(
        &mut self,
        key: impl Into<Vec<u8>>,
        options: Option<etcd_client::DeleteOptions>,
    ) -> Result<etcd_client::DeleteResponse, etcd_client::Error> {
        let key = key.into();
        self.retrying(|mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.delete(key, options).await }
        })
        .await
    }

    async fn txn_retrying(
        &mut self,
        txn: Txn,
    ) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        self.retrying(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// Runs `txn`: true when its comparisons held and it was applied.
    async fn commit(&mut self, txn: Txn, what: &'static str) -> Result<bool> {
        Ok(self.txn_retrying(txn).await.context(what)?.succeeded())
    }

    /// Every network, and the store revision they were read at.
    pub async fn networks(&mut self) -> Result<(Vec<NetworkRecord>, i64)> {
        let resp = self
            .get_retrying(
                key(&["networks", ""]),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .context("reading networks from etcd")?;
        let revision = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| anyhow!("etcd's answer has no revision"))?;
        let networks = resp
            .kvs()
            .iter()
            .map(|kv| parse_record(kv.key(), kv.value()))
            .collect::<Result<_>>()?;
        Ok((networks, revision))
    }

    /// Creates a network, or returns it when one of that id and the same
    /// request exists (idempotent). Refused with a one-line reason: the
    /// id taken by another definition, a subnet overlapping another
    /// network's, a VNI in use, no VNI left.
    pub async fn create_network(&mut self, req: &NetworkRequest) -> Result<NetworkRecord> {
        check_name(&req.id)?;
        for _ in 0..ATTEMPTS {
            let (existing, revision) = self.networks().await?;
            let record = match plan_network(req, &existing)? {
                Plan::Exists(record) => return Ok(record),
                Plan::Create(record) => record,
            };
            // An older netd would take the record for an overlay network.
            if let Some(old) = self.hosts().await?.iter().find(|h| !h.runs(&record.mode)) {
                bail!(
                    "host {} runs a netd release without {} networks: upgrade it first",
                    old.node,
                    record.mode
                );
            }
            let net_key = key(&["networks", &record.id]);
            // No network was created or changed since the read the plan
            // was made on (a range compare: etcd >= 3.3). That alone
            // serialises creations; `vnis/` is a record of who holds a VNI
            // for operators, not a lock.
            let mut puts = vec![TxnOp::put(net_key, serde_json::to_vec(&record)?, None)];
            if record.vni != 0 {
                let vni_key = key(&["vnis", &record.vni.to_string()]);
                puts.push(TxnOp::put(vni_key, record.id.clone(), None));
            }
            // Nor a host registered since (the modes check read them).
            let hosts_unchanged =
                Compare::mod_revision(key(&["hosts", ""]), CompareOp::Less, revision + 1)
                    .with_prefix();
            let txn = Txn::new()
                .when([networks_unchanged_since(revision), hosts_unchanged])
                .and_then(puts);
            if self.commit(txn, "creating the network in etcd").await? {
                return Ok(record);
            }
        }
        bail!("creating network {}: too much contention in etcd", req.id)
    }

    /// Gives network `id` its Docker name, unique among netd networks (the
    /// same name again is not an error).
    pub async fn name_network(&mut self, id: &str, name: &str) -> Result<NetworkRecord> {
        if name.is_empty() {
            bail!("a network name cannot be empty");
        }
        for _ in 0..ATTEMPTS {
            let (existing, revision) = self.networks().await?;
            let mut record = existing
                .iter()
                .find(|n| n.id == id)
                .cloned()
                .ok_or_else(|| anyhow!("no netd network has id {id}"))?;
            if record.name == name {
                return Ok(record);
            }
            if !record.name.is_empty() {
                bail!("network {id} is already named {}", record.name);
            }
            if let Some(other) = existing.iter().find(|n| n.name == name) {
                bail!("another netd network ({}) is named {name}", other.id);
            }
            record.name = name.into();
            // Names are unique: serialised as creations are.
            let txn = Txn::new()
                .when([networks_unchanged_since(revision)])
                .and_then([TxnOp::put(
                    key(&["networks", id]),
                    serde_json::to_vec(&record)?,
                    None,
                )]);
            if self.commit(txn, "naming the network in etcd").await? {
                return Ok(record);
            }
        }
        bail!("naming network {id}: too much contention in etcd")
    }

    /// Deletes a network and its VNI record. Refused while any host holds
    /// an address of it (naming the hosts): Docker checks only its own
    /// host's containers. Nothing to delete is not an error.
    pub async fn delete_network(&mut self, id: &str) -> Result<()> {
        check_name(id)?;
        for _ in 0..ATTEMPTS {
            let Some((record, revision)) = self.network(id).await? else {
                return Ok(());
            };
            let holders = self.holders(id).await?;
            if !holders.is_empty() {
                bail!(
                    "network {} still has endpoints on {}",
                    record.label(),
                    holders.join(", ")
                );
            }
            let net_key = key(&["networks", id]);
            let mut deletes = vec![TxnOp::delete(net_key.clone(), None)];
            if record.vni != 0 {
                deletes.push(TxnOp::delete(key(&["vnis", &record.vni.to_string()]), None));
            }
            deletes.push(TxnOp::delete(
                key(&["blocks", id, ""]),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ));
            // The network read, not one re-created meanwhile, and still no
            // claims.
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(net_key.clone(), CompareOp::Equal, revision),
                    Compare::create_revision(key(&["addrs", id, ""]), CompareOp::Equal, 0)
                        .with_prefix(),
                ])
                .and_then(deletes);
            if self.commit(txn, "deleting a network from etcd").await? {
                return Ok(());
            }
        }
        bail!("deleting network {id}: too much contention in etcd")
    }

    /// The network `id` and its key's mod revision.
    pub async fn network(&mut self, id: &str) -> Result<Option<(NetworkRecord, i64)>> {
        check_name(id)?;
        let resp = self
            .get_retrying(key(&["networks", id]), None)
            .await
            .context("reading a network from etcd")?;
        resp.kvs()
            .first()
            .map(|kv| Ok((parse_record(kv.key(), kv.value())?, kv.mod_revision())))
            .transpose()
    }

    /// The blocks of routed network `id`: (block address, host).
    async fn blocks(&mut self, id: &str) -> Result<Vec<(Ipv4Addr, String)>> {
        let prefix = key(&["blocks", id, ""]);
        let resp = self
            .get_retrying(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .context("reading host blocks from etcd")?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let addr = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(&prefix))
                .and_then(|a| a.parse().ok());
            let claim: Option<BlockClaim> = serde_json::from_slice(kv.value()).ok();
            if let (Some(addr), Some(claim)) = (addr, claim) {
                out.push((addr, claim.host));
            }
        }
        Ok(out)
    }

    /// `host`'s block of routed network `id`, taken now if it has none: the
    /// lowest free one. Refused when every block is another host's.
    pub async fn host_block(&mut self, id: &str, host: &str) -> Result<(Ipv4Addr, u8)> {
        check_name(id)?;
        let gone = || anyhow!("no netd network has id {id}");
        for _ in 0..ATTEMPTS {
            let (record, revision) = self.network(id).await?.ok_or_else(gone)?;
            if !record.is_routed() {
                bail!("network {} is not a routed network", record.label());
            }
            let blocks = self.blocks(id).await?;
            if let Some((addr, _)) = blocks.iter().find(|(_, h)| h == host) {
                return Ok((*addr, record.block));
            }
            let taken: std::collections::HashSet<Ipv4Addr> =
                blocks.iter().map(|(a, _)| *a).collect();
            let Some(block) = (0..record.block_count())
                .map(|i| record.block_at(i))
                .find(|(a, _)| !taken.contains(a))
            else {
                let mut hosts: Vec<&str> = blocks.iter().map(|(_, h)| h.as_str()).collect();
                hosts.sort_unstable();
                hosts.dedup();
                bail!(
                    "routed network {}: its {} host blocks (/{}) are all taken, by {}",
                    record.label(),
                    record.block_count(),
                    record.block,
                    hosts.join(", ")
                );
            };
            let block_key = key(&["blocks", id, &block.0.to_string()]);
            let claim = BlockClaim {
                host: host.to_owned(),
                prefix: block.1,
            };
            let txn = Txn::new()
                .when([
                    Compare::create_revision(block_key.clone(), CompareOp::Equal, 0),
                    Compare::mod_revision(key(&["networks", id]), CompareOp::Equal, revision),
                ])
                .and_then([TxnOp::put(block_key, serde_json::to_vec(&claim)?, None)]);
            if self.commit(txn, "taking a host block in etcd").await? {
                tracing::info!(
                    "network {}: block {}/{} is this host's",
                    record.label(),
                    block.0,
                    block.1
                );
                return Ok(block);
            }
        }
        bail!("taking a block of {id}: too much contention in etcd")
    }

    /// Claims a free address of network `id` for `claim`: the lowest host
    /// address nobody holds, never the network's gateway. Unique across
    /// the cluster; refused when the pool is exhausted.
    pub async fn claim_address(&mut self, id: &str, claim: &AddressClaim) -> Result<Ipv4Addr> {
        self.claim_address_in(id, claim, None).await
    }

    /// [`Self::claim_address`] within `within` (a routed network's host
    /// block) instead of the network's own range.
    pub async fn claim_address_in(
        &mut self,
        id: &str,
        claim: &AddressClaim,
        within: Option<(Ipv4Addr, u8)>,
    ) -> Result<Ipv4Addr> {
        check_name(id)?;
        let gone = || anyhow!("no netd network has id {id}");
        let (mut record, mut revision) = self.network(id).await?.ok_or_else(gone)?;
        if within.is_some() {
            record.ip_range = within;
        }
        let mut held = self.claimed(id).await?;
        // Each lost race means somebody else got an address: bounded by
        // the pool, not by a number of tries.
        for _ in 0..pool_size(record.subnet) + ATTEMPTS as u64 {
            let addr = free_address(&record, &held).ok_or_else(|| {
                anyhow!(
                    "the address pool of network {} ({}/{}) is exhausted",
                    record.label(),
                    record.subnet.0,
                    record.subnet.1
                )
            })?;
            let addr_key = key(&["addrs", id, &addr.to_string()]);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(addr_key.clone(), CompareOp::Equal, 0),
                    // The network read, not one deleted or re-created since.
                    Compare::mod_revision(key(&["networks", id]), CompareOp::Equal, revision),
                ])
                .and_then([TxnOp::put(addr_key, serde_json::to_vec(claim)?, None)]);
            if self.commit(txn, "claiming an address in etcd").await?
                || self.holds(&addr_key_of(id, addr), claim).await?
            {
                return Ok(addr);
            }
            match self.network(id).await? {
                None => bail!("network {id} was deleted meanwhile"),
                Some((mut r, rev)) if rev != revision => {
                    if within.is_some() {
                        r.ip_range = within;
                    }
                    (record, revision) = (r, rev);
                    held = self.claimed(id).await?;
                }
                // Taken by somebody else: the next one.
                Some(_) => held.push(addr),
            }
        }
        bail!("claiming an address of {id}: too much contention in etcd")
    }

    /// Claims `addr` of network `id` for `claim` (`docker run --ip`):
    /// refused when it is no host address of the subnet, the gateway, or
    /// somebody's already.
    pub async fn claim_exact(
        &mut self,
        id: &str,
        addr: Ipv4Addr,
        claim: &AddressClaim,
    ) -> Result<Ipv4Addr> {
        let gone = || anyhow!("no netd network has id {id}");
        let (record, revision) = self.network(id).await?.ok_or_else(gone)?;
        if !is_host_address(record.subnet, addr) {
            bail!(
                "{addr} is not a host address of network {} ({}/{})",
                record.label(),
                record.subnet.0,
                record.subnet.1
            );
        }
        if addr == record.gateway {
            bail!("{addr} is network {}'s gateway", record.label());
        }
        let addr_key = key(&["addrs", id, &addr.to_string()]);
        let txn = Txn::new()
            .when([
                Compare::create_revision(addr_key.clone(), CompareOp::Equal, 0),
                Compare::mod_revision(key(&["networks", id]), CompareOp::Equal, revision),
            ])
            .and_then([TxnOp::put(
                addr_key.clone(),
                serde_json::to_vec(claim)?,
                None,
            )]);
        if self.commit(txn, "claiming an address in etcd").await?
            || self.holds(&addr_key_of(id, addr), claim).await?
        {
            return Ok(addr);
        }
        let holder = self
            .get_retrying(addr_key, None)
            .await
            .context("reading an address claim from etcd")?
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<AddressClaim>(kv.value()).ok());
        match holder {
            Some(h) => bail!("{addr} is already in use on {}", h.host),
            None => bail!("network {} changed meanwhile: try again", record.label()),
        }
    }

    /// Whether the claim at `addr_key` is exactly `claim`: a claim whose
    /// transaction etcd applied though its answer was lost (the member went
    /// away) is the claimer's, not somebody else's. Claims carry a nonce, so
    /// no two requests make the same one.
    async fn holds(&mut self, addr_key: &str, claim: &AddressClaim) -> Result<bool> {
        let resp = self
            .get_retrying(addr_key, None)
            .await
            .context("reading an address claim from etcd")?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<AddressClaim>(kv.value()).ok())
            .is_some_and(|held| held == *claim))
    }

    /// Gives back an address `host` holds. Not held, or held by another
    /// host (released and claimed again meanwhile), is not an error and
    /// changes nothing.
    pub async fn release_address(&mut self, id: &str, addr: Ipv4Addr, host: &str) -> Result<()> {
        check_name(id)?;
        let addr_key = key(&["addrs", id, &addr.to_string()]);
        let resp = self
            .get_retrying(addr_key.clone(), None)
            .await
            .context("reading an address claim from etcd")?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(());
        };
        match serde_json::from_slice::<AddressClaim>(kv.value()) {
            Ok(claim) if claim.host == host => {}
            _ => return Ok(()),
        }
        // Only the claim read: not one made after it.
        let txn = Txn::new()
            .when([Compare::mod_revision(
                addr_key.clone(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::delete(addr_key, None)]);
        self.commit(txn, "releasing an address in etcd").await?;
        Ok(())
    }

    /// The addresses of `id` somebody holds.
    pub async fn claimed(&mut self, id: &str) -> Result<Vec<Ipv4Addr>> {
        let prefix = key(&["addrs", id, ""]);
        let resp = self
            .get_retrying(
                prefix.clone(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .context("reading address claims from etcd")?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok()?.strip_prefix(&prefix)?.parse().ok())
            .collect())
    }

    /// The hosts holding addresses of `id`, each once.
    async fn holders(&mut self, id: &str) -> Result<Vec<String>> {
        let resp = self
            .get_retrying(
                key(&["addrs", id, ""]),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .context("reading address claims from etcd")?;
        let mut hosts: Vec<String> = resp
            .kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice::<AddressClaim>(kv.value())
                    .map_or_else(|_| "an unknown host".to_owned(), |c| c.host)
            })
            .collect();
        hosts.sort();
        hosts.dedup();
        Ok(hosts)
    }
}

impl Store {
    /// Sends `()` on every `tx` once watching and whenever anything below
    /// [`PREFIX`] changes after that (from the revision read when the watch
    /// began, so nothing between is lost); a broken watch is set up again,
    /// with backoff, and wakes once more. Runs until the first `tx` closes.
    /// Each `tx` should hold one message: a burst of changes is one wake-up.
    pub async fn watch(mut self, txs: Vec<tokio::sync::mpsc::Sender<()>>) {
        let prefix = PREFIX.to_owned();
        let wake = || {
            for tx in &txs {
                let _ = tx.try_send(());
            }
        };
        let mut backoff = Duration::from_millis(250);
        loop {
            let watched = async {
                let revision = self
                    .get_retrying(
                        prefix.clone(),
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_keys_only()
                                .with_limit(1),
                        ),
                    )
                    .await?
                    .header()
                    .map_or(0, |h| h.revision());
                let mut stream = self
                    .client
                    .watch(
                        prefix.clone(),
                        Some(
                            etcd_client::WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(revision + 1),
                        ),
                    )
                    .await?;
                wake();
                backoff = Duration::from_millis(250);
                while let Some(resp) = stream.message().await? {
                    if resp.canceled() {
                        break;
                    }
                    if !resp.events().is_empty() {
                        wake();
                    }
                }
                Ok::<(), etcd_client::Error>(())
            }
            .await;
            if txs.first().is_none_or(|tx| tx.is_closed()) {
                return;
            }
            match watched {
                Err(e) => tracing::warn!("watching the cluster store: {e}; again in {backoff:?}"),
                Ok(()) => tracing::warn!("etcd ended the watch; again in {backoff:?}"),
            }
            // The readers read again at once (their reads go to another
            // member): what changed while the watch is down is not left
            // waiting for it to come back.
            wake();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

/// A container of a netd network, as every host sees it: on its host's
/// lease, so a host gone longer than its TTL takes its endpoints with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub network: String,
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
    pub host: String,
    pub vtep: Ipv4Addr,
    /// Docker's endpoint id.
    pub endpoint: String,
}

/// Everything the datapath needs from the store, read at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Picture {
    pub networks: Vec<NetworkRecord>,
    pub endpoints: Vec<EndpointRecord>,
    pub hosts: Vec<HostRecord>,
    /// (network id, address, claim).
    pub claims: Vec<(String, Ipv4Addr, AddressClaim)>,
    /// Routed networks' host blocks.
    pub blocks: Vec<HostBlock>,
}

/// The value of `blocks/<network>/<address>`: the host a routed network's
/// block belongs to. Not on the host's lease: the block, like the host's
/// address claims, outlives a restart; its route goes with the host's
/// record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockClaim {
    pub host: String,
    pub prefix: u8,
}

/// What [`Store::forget_host`] gave back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Forgotten {
    pub addresses: usize,
    pub blocks: usize,
    /// Endpoint records and the mirror's copies of Docker networks.
    pub records: usize,
}

/// A routed network's block and its host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBlock {
    pub network: String,
    pub block: (Ipv4Addr, u8),
    pub host: String,
}

impl Store {
    /// Publishes an endpoint on `lease` (this host's).
    pub async fn put_endpoint(&mut self, record: &EndpointRecord, lease: i64) -> Result<()> {
        check_name(&record.network)?;
        check_name(&record.endpoint)?;
        self.put_retrying(
            key(&["endpoints", &record.network, &record.endpoint]),
            serde_json::to_vec(record)?,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .context("publishing the endpoint in etcd")?;
        Ok(())
    }

    /// Names the holder of a claimed address (Docker's endpoint id, once
    /// CreateEndpoint tells it): what a host needs to publish the endpoint
    /// again after its lease ran out.
    pub async fn name_claim(
        &mut self,
        network: &str,
        addr: Ipv4Addr,
        claim: &AddressClaim,
    ) -> Result<()> {
        check_name(network)?;
        let addr_key = key(&["addrs", network, &addr.to_string()]);
        // Only a claim that exists (not one released meanwhile).
        let txn = Txn::new()
            .when([Compare::create_revision(
                addr_key.clone(),
                CompareOp::Greater,
                0,
            )])
            .and_then([TxnOp::put(addr_key, serde_json::to_vec(claim)?, None)]);
        self.commit(txn, "naming an address claim in etcd").await?;
        Ok(())
    }

    /// Records that Docker's network `docker_id` on `node` is a copy of
    /// network `id`.
    pub async fn put_copy(&mut self, node: &str, docker_id: &str, id: &str) -> Result<()> {
        check_name(node)?;
        check_name(docker_id)?;
        self.put_retrying(key(&["copies", node, docker_id]), id, None)
            .await
            .context("recording a network copy in etcd")?;
        Ok(())
    }

    /// The network Docker's network `docker_id` on `node` is a copy of.
    pub async fn copy_of(&mut self, node: &str, docker_id: &str) -> Result<Option<String>> {
        check_name(node)?;
        check_name(docker_id)?;
        let resp = self
            .get_retrying(key(&["copies", node, docker_id]), None)
            .await
            .context("reading a network copy from etcd")?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    pub async fn delete_copy(&mut self, node: &str, docker_id: &str) -> Result<()> {
        check_name(node)?;
        check_name(docker_id)?;
        self.delete_retrying(key(&["copies", node, docker_id]), None)
            .await
            .context("deleting a network copy from etcd")?;
        Ok(())
    }

    /// Withdraws an endpoint. Not there is not an error.
    pub async fn delete_endpoint(&mut self, network: &str, endpoint: &str) -> Result<()> {
        check_name(network)?;
        check_name(endpoint)?;
        self.delete_retrying(key(&["endpoints", network, endpoint]), None)
            .await
            .context("withdrawing the endpoint from etcd")?;
        Ok(())
    }

    /// The endpoint `endpoint` (Docker's id) of network `network`.
    pub async fn endpoint(
        &mut self,
        network: &str,
        endpoint: &str,
    ) -> Result<Option<EndpointRecord>> {
        check_name(network)?;
        check_name(endpoint)?;
        let resp = self
            .get_retrying(key(&["endpoints", network, endpoint]), None)
            .await
            .context("reading an endpoint from etcd")?;
        resp.kvs()
            .first()
            .map(|kv| serde_json::from_slice(kv.value()).context("malformed endpoint record"))
            .transpose()
    }

    /// Networks, endpoints and hosts, in one read (one revision). A
    /// malformed record is skipped with a warning: one bad key must not
    /// blind a host to the rest of the cluster.
    pub async fn picture(&mut self) -> Result<Picture> {
        let resp = self
            .get_retrying(PREFIX, Some(GetOptions::new().with_prefix()))
            .await
            .context("reading the cluster store")?;
        let mut picture = Picture::default();
        for kv in resp.kvs() {
            let Some(rest) = kv.key_str().ok().and_then(|k| k.strip_prefix(PREFIX)) else {
                continue;
            };
            let parsed: Result<()> = match rest.split('/').next() {
                Some("networks") => {
                    parse_record(kv.key(), kv.value()).map(|r| picture.networks.push(r))
                }
                Some("endpoints") => serde_json::from_slice(kv.value())
                    .map(|r| picture.endpoints.push(r))
                    .map_err(Into::into),
                Some("hosts") => serde_json::from_slice(kv.value())
                    .map(|r| picture.hosts.push(r))
                    .map_err(Into::into),
                Some("addrs") => parse_claim(rest, kv.value()).map(|c| picture.claims.push(c)),
                Some("blocks") => parse_block(rest, kv.value()).map(|b| picture.blocks.push(b)),
                _ => Ok(()),
            };
            if let Err(e) = parsed {
                tracing::warn!("skipping {rest} in etcd: {e:#}");
            }
        }
        Ok(picture)
    }
}

/// `blocks/<network>/<address>` and its value.
fn parse_block(key: &str, value: &[u8]) -> Result<HostBlock> {
    let mut parts = key.split('/').skip(1);
    let (Some(network), Some(addr)) = (parts.next(), parts.next()) else {
        bail!("malformed block key");
    };
    let claim: BlockClaim = serde_json::from_slice(value)?;
    Ok(HostBlock {
        network: network.to_owned(),
        block: (
            addr.parse().context("malformed block address")?,
            claim.prefix,
        ),
        host: claim.host,
    })
}

/// `addrs/<network>/<ip>` and its value.
fn parse_claim(key: &str, value: &[u8]) -> Result<(String, Ipv4Addr, AddressClaim)> {
    let mut parts = key.split('/').skip(1);
    let (Some(network), Some(addr)) = (parts.next(), parts.next()) else {
        bail!("malformed claim key");
    };
    let addr = addr.parse().context("malformed claim address")?;
    Ok((network.to_owned(), addr, serde_json::from_slice(value)?))
}

/// A netd host as the cluster sees it, on that host's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub node: String,
    /// Where its VXLAN traffic comes from and goes to.
    pub vtep: Ipv4Addr,
    /// Its uplink's MAC: the source of the packets it routes to other
    /// hosts' blocks of routed networks (None: a host of an older release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<[u8; 6]>,
    /// The network modes its netd runs (empty: a host of a release before
    /// they were listed, which runs overlay networks only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modes: Vec<String>,
}

impl HostRecord {
    /// Whether its netd runs networks of `mode`.
    pub fn runs(&self, mode: &str) -> bool {
        mode == MODE_OVERLAY || self.modes.iter().any(|m| m == mode)
    }
}

/// A host's registration: its record lives as long as this keeps the lease
/// alive. Dropped (or the process gone), the lease runs out after its TTL
/// and etcd deletes the record, and with it whatever else was put on the
/// lease: that is how a vanished host is withdrawn everywhere.
pub struct HostLease {
    keeper: tokio::task::JoinHandle<()>,
    lease: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl HostLease {
    /// The current lease id (it changes when the lease had to be granted
    /// again).
    pub fn id(&self) -> i64 {
        self.lease.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A handle on the current lease id, for what else goes on the lease.
    pub fn id_handle(&self) -> std::sync::Arc<std::sync::atomic::AtomicI64> {
        self.lease.clone()
    }
}

impl Drop for HostLease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl Store {
    /// Registers `host` on a lease of `ttl` and keeps it alive (every third
    /// of the TTL) until the returned [`HostLease`] is dropped. A lease
    /// lost meanwhile (etcd unreachable for longer than the TTL) is granted
    /// again and the record put back: a host that returns, returns.
    pub async fn register_host(&mut self, host: &HostRecord, ttl: Duration) -> Result<HostLease> {
        check_name(&host.node)?;
        let ttl_s = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let id = put_on_new_lease(&mut self.client, host, ttl_s).await?;
        let lease = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(id));
        let (mut client, host, shared) = (self.client.clone(), host.clone(), lease.clone());
        let keeper = tokio::spawn(async move {
            let period = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100));
            loop {
                let id = shared.load(std::sync::atomic::Ordering::Relaxed);
                let renewed = async {
                    let (mut keeper, mut answers) = client.lease_keep_alive(id).await?;
                    loop {
                        keeper.keep_alive().await?;
                        match answers.message().await? {
                            Some(a) if a.ttl() > 0 => {}
                            // Expired: etcd has already deleted the record.
                            Some(_) => return Ok::<(), etcd_client::Error>(()),
                            // The stream ended (a member went away): the
                            // lease may well live; renew it again.
                            None => {
                                return Err(etcd_client::Error::InvalidArgs(
                                    "the keep-alive stream ended".into(),
                                ))
                            }
                        }
                        tokio::time::sleep(period).await;
                    }
                }
                .await;
                if let Err(e) = renewed {
                    // The member asked went away, or all did: the lease may
                    // well still be valid (another member answers, or etcd
                    // returns within the TTL). Renew it again; a new one is
                    // granted only once etcd says it expired.
                    tracing::warn!("keeping host {}'s lease alive: {e}", host.node);
                    tokio::time::sleep(period).await;
                    continue;
                }
                match put_on_new_lease(&mut client, &host, ttl_s).await {
                    Ok(id) => {
                        tracing::info!("host {} registered again in etcd", host.node);
                        shared.store(id, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!("registering host {} again: {e:#}", host.node);
                        tokio::time::sleep(period).await;
                    }
                }
            }
        });
        Ok(HostLease { keeper, lease })
    }

    /// Withdraws a host at once (a clean shutdown): its lease is revoked.
    pub async fn withdraw_host(&mut self, lease: HostLease) -> Result<()> {
        let id = lease.id();
        drop(lease);
        self.client
            .lease_revoke(id)
            .await
            .context("revoking the host's lease")?;
        Ok(())
    }

    /// Gives back what a host that left the cluster for good still holds:
    /// its address claims and routed blocks (which outlive its lease, so
    /// that a host that reboots keeps them), and any record naming it.
    /// Refused while the host is registered; each deletion is conditional
    /// on the host's record still being absent and on the key unchanged
    /// since it was read, so a host coming back meanwhile loses nothing
    /// it claimed again.
    pub async fn forget_host(&mut self, node: &str) -> Result<Forgotten> {
        check_name(node)?;
        let alive = || {
            anyhow!(
                "host {node} is in the cluster (its lease keeps its record): stop its netd \
                 and let the lease run out first"
            )
        };
        let host_key = key(&["hosts", node]);
        let resp = self
            .get_retrying(PREFIX, Some(GetOptions::new().with_prefix()))
            .await
            .context("reading the cluster store")?;
        if resp.kvs().iter().any(|kv| kv.key() == host_key.as_bytes()) {
            return Err(alive());
        }
        // Records before claims: one left half-done keeps no record of an
        // address nobody holds.
        let mut kvs: Vec<_> = resp.kvs().iter().collect();
        kvs.sort_by_key(|kv| !kv.key().starts_with(key(&["endpoints", ""]).as_bytes()));
        let mut forgotten = Forgotten::default();
        for kv in kvs {
            let Some(rest) = kv.key_str().ok().and_then(|k| k.strip_prefix(PREFIX)) else {
                continue;
            };
            let kind = rest.split('/').next().unwrap_or_default();
            let holder = match kind {
                "addrs" => serde_json::from_slice::<AddressClaim>(kv.value())
                    .ok()
                    .map(|c| c.host),
                "blocks" => serde_json::from_slice::<BlockClaim>(kv.value())
                    .ok()
                    .map(|c| c.host),
                "endpoints" => serde_json::from_slice::<EndpointRecord>(kv.value())
                    .ok()
                    .map(|r| r.host),
                "copies" => rest.split('/').nth(1).map(str::to_owned),
                _ => None,
            };
            if holder.as_deref() != Some(node) {
                continue;
            }
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(kv.key(), CompareOp::Equal, kv.mod_revision()),
                    Compare::create_revision(host_key.clone(), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::delete(kv.key(), None)]);
            if !self.commit(txn, "forgetting a host's keys").await? {
                if self.hosts().await?.iter().any(|h| h.node == node) {
                    return Err(alive());
                }
                continue; // Changed meanwhile: somebody else's now.
            }
            match kind {
                "addrs" => forgotten.addresses += 1,
                "blocks" => forgotten.blocks += 1,
                _ => forgotten.records += 1,
            }
        }
        if forgotten == Forgotten::default() {
            bail!("the cluster store holds nothing of host {node}");
        }
        Ok(forgotten)
    }

    /// Every registered host.
    pub async fn hosts(&mut self) -> Result<Vec<HostRecord>> {
        let resp = self
            .get_retrying(key(&["hosts", ""]), Some(GetOptions::new().with_prefix()))
            .await
            .context("reading hosts from etcd")?;
        resp.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice(kv.value()).with_context(|| {
                    format!(
                        "malformed host record at {}",
                        String::from_utf8_lossy(kv.key())
                    )
                })
            })
            .collect()
    }
}

async fn put_on_new_lease(client: &mut Client, host: &HostRecord, ttl_s: i64) -> Result<i64> {
    let id = client
        .lease_grant(ttl_s, None)
        .await
        .context("granting the host's lease")?
        .id();
    client
        .put(
            key(&["hosts", &host.node]),
            serde_json::to_vec(host)?,
            Some(etcd_client::PutOptions::new().with_lease(id)),
        )
        .await
        .context("registering the host")?;
    Ok(id)
}

/// A network key part: not empty, and no '/' (it would reach into another
/// network's keys).
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') {
        bail!("{name:?} is not a valid key (empty, or holding '/')");
    }
    Ok(())
}

/// A network record read from etcd, checked as a request would be: the
/// subnet math elsewhere relies on it.
fn parse_record(key: &[u8], value: &[u8]) -> Result<NetworkRecord> {
    let key = String::from_utf8_lossy(key);
    let record: NetworkRecord = serde_json::from_slice(value)
        .with_context(|| format!("malformed network record at {key}"))?;
    check_subnet(record.subnet).with_context(|| format!("network record at {key}"))?;
    if !is_host_address(record.subnet, record.gateway) {
        bail!("network record at {key}: gateway outside its subnet");
    }
    Ok(record)
}

/// Host addresses in `subnet`.
fn pool_size(subnet: (Ipv4Addr, u8)) -> u64 {
    (1u64 << (32 - u32::from(subnet.1))).saturating_sub(2)
}

/// No network key created or modified after `revision` (a range compare
/// on the `networks/` prefix: etcd >= 3.3).
fn networks_unchanged_since(revision: i64) -> Compare {
    Compare::mod_revision(key(&["networks", ""]), CompareOp::Less, revision + 1).with_prefix()
}

fn addr_key_of(id: &str, addr: Ipv4Addr) -> String {
    key(&["addrs", id, &addr.to_string()])
}

fn key(parts: &[&str]) -> String {
    format!("{PREFIX}{}", parts.join("/"))
}

#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Exists(NetworkRecord),
    Create(NetworkRecord),
}

/// What creating `req` among `existing` means, or why it is refused.
fn plan_network(req: &NetworkRequest, existing: &[NetworkRecord]) -> Result<Plan> {
    let (net, prefix) = req.subnet;
    check_subnet(req.subnet)?;
    let gateway = match req.gateway {
        Some(gw) if !is_host_address(req.subnet, gw) => {
            bail!("gateway {gw} is not a host address of {net}/{prefix}")
        }
        Some(gw) => gw,
        None => Ipv4Addr::from(u32::from(net) + 1),
    };
    let overlay = req.mode == MODE_OVERLAY;
    if routed_mode(&req.mode, &req.ipvlan_mode) && req.ip_range.is_some() {
        bail!("a routed network's addresses come from its host blocks: no --ip-range");
    }
    if let Some(vni) = req.vni {
        if !overlay {
            bail!("a VNI is for overlay networks, not {}", req.mode);
        }
        if vni == 0 || vni > *VNI_AUTO.end() {
            bail!("VNI {vni} is out of range (1-{})", VNI_AUTO.end());
        }
    }
    if let Some(range) = req.ip_range {
        check_ip_range(req.subnet, range)?;
    }
    let routed = routed_mode(&req.mode, &req.ipvlan_mode);
    let block = match (routed, req.block) {
        (true, None) => default_block(req.subnet),
        (true, Some(b)) if b > prefix && b <= 30 => b,
        (true, Some(b)) => bail!(
            "block /{b} does not split {net}/{prefix}: a routed network's host blocks are /{} to /30",
            prefix + 1
        ),
        (false, Some(_)) => bail!("a host block is for routed networks, not {}", req.mode),
        (false, None) => 0,
    };
    if block != 0 && block <= prefix {
        bail!("{net}/{prefix} is too small to split into host blocks");
    }
    if let Some(same) = existing.iter().find(|n| n.id == req.id) {
        let differs = if (&same.mode, &same.ipvlan_mode) != (&req.mode, &req.ipvlan_mode) {
            Some(format!("mode {}", same.mode_label()))
        } else if same.subnet != req.subnet {
            Some(format!("subnet {}/{}", same.subnet.0, same.subnet.1))
        } else if same.internal != req.internal {
            Some(format!("internal {}", same.internal))
        } else if req.gateway.is_some_and(|g| g != same.gateway) {
            Some(format!("gateway {}", same.gateway))
        } else if req.vni.is_some_and(|v| v != same.vni) {
            Some(format!("VNI {}", same.vni))
        } else if (&req.parent, req.vlan) != (&same.parent, same.vlan) {
            Some(format!("parent {}", same.parent_option()))
        } else if req.ip_range != same.ip_range {
            Some("another --ip-range".to_owned())
        } else if req.block.is_some_and(|b| b != same.block) {
            Some(format!("host blocks /{}", same.block))
        } else {
            None
        };
        return match differs {
            None => Ok(Plan::Exists(same.clone())),
            Some(what) => bail!(
                "netd network {} already exists with another definition ({what})",
                same.label()
            ),
        };
    }
    if let Some(other) = existing.iter().find(|n| overlaps(n.subnet, req.subnet)) {
        bail!(
            "subnet {net}/{prefix} overlaps network {} ({}/{})",
            other.label(),
            other.subnet.0,
            other.subnet.1
        );
    }
    let vni = match req.vni {
        _ if !overlay => 0,
        Some(vni) => match existing.iter().find(|n| n.vni == vni) {
            Some(other) => bail!("VNI {vni} is already network {}'s", other.label()),
            None => vni,
        },
        None => VNI_AUTO
            .clone()
            .find(|v| existing.iter().all(|n| n.vni != *v))
            .ok_or_else(|| anyhow!("no free VNI left"))?,
    };
    Ok(Plan::Create(NetworkRecord {
        id: req.id.clone(),
        name: String::new(),
        origin: req.origin.clone(),
        mode: req.mode.clone(),
        vni,
        subnet: req.subnet,
        gateway,
        internal: req.internal,
        parent: req.parent.clone(),
        vlan: req.vlan,
        ip_range: req.ip_range,
        block,
        ipvlan_mode: req.ipvlan_mode.clone(),
    }))
}

/// Shortest and longest prefix a network may have: a /8 is 16 million
/// addresses; a /30 the smallest with two hosts.
const PREFIX_RANGE: std::ops::RangeInclusive<u8> = 8..=30;

pub fn check_subnet((net, prefix): (Ipv4Addr, u8)) -> Result<()> {
    if prefix > 32 {
        bail!("/{prefix} is not a prefix length");
    }
    if !PREFIX_RANGE.contains(&prefix) {
        bail!(
            "subnet {net}/{prefix}: a network's prefix is /{} to /{}",
            PREFIX_RANGE.start(),
            PREFIX_RANGE.end()
        );
    }
    if u32::from(net) & !mask(prefix) != 0 {
        bail!("{net}/{prefix} is not a subnet address (host bits set)");
    }
    Ok(())
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    subnet_contains(a, b.0) || subnet_contains(b, a.0)
}

/// Inside `subnet` and neither its network nor its broadcast address.
pub fn is_host_address(subnet: (Ipv4Addr, u8), addr: Ipv4Addr) -> bool {
    let net = u32::from(subnet.0) & mask(subnet.1);
    subnet_contains(subnet, addr)
        && u32::from(addr) != net
        && u32::from(addr) != net | !mask(subnet.1)
}

/// `--ip-range`: a prefix inside the subnet.
pub fn check_ip_range(subnet: (Ipv4Addr, u8), range: (Ipv4Addr, u8)) -> Result<()> {
    if range.1 > 32 || u32::from(range.0) & !mask(range.1) != 0 {
        bail!("--ip-range {}/{} is not a prefix", range.0, range.1);
    }
    if range.1 < subnet.1 || !subnet_contains(subnet, range.0) {
        bail!(
            "--ip-range {}/{} is not inside subnet {}/{}",
            range.0,
            range.1,
            subnet.0,
            subnet.1
        );
    }
    Ok(())
}

/// The lowest host address of `network` (of its `--ip-range`, if it has
/// one) that is not its gateway and not in `held`.
fn free_address(network: &NetworkRecord, held: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let held: std::collections::HashSet<&Ipv4Addr> = held.iter().collect();
    let (from, len) = network.ip_range.unwrap_or(network.subnet);
    let first = u32::from(from) & mask(len);
    let last = first | !mask(len);
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|a| is_host_address(network.subnet, *a) && *a != network.gateway && !held.contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, third: u8) -> NetworkRequest {
        NetworkRequest {
            id: id.into(),
            origin: "h1".into(),
            mode: "overlay".into(),
            subnet: (Ipv4Addr::new(198, 19, third, 0), 24),
            gateway: None,
            vni: None,
            internal: false,
            parent: String::new(),
            vlan: 0,
            ip_range: None,
            block: None,
            ipvlan_mode: String::new(),
        }
    }

    fn created(plan: Result<Plan>) -> NetworkRecord {
        match plan.unwrap() {
            Plan::Create(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn networks_get_the_lowest_free_vni_and_the_first_host_as_gateway() {
        let a = created(plan_network(&req("a", 1), &[]));
        assert_eq!((a.vni, a.gateway), (4096, Ipv4Addr::new(198, 19, 1, 1)));
        let b = created(plan_network(&req("b", 2), std::slice::from_ref(&a)));
        assert_eq!(b.vni, 4097);
        // The same request again is the same network.
        assert_eq!(
            plan_network(&req("a", 1), &[a.clone(), b]).unwrap(),
            Plan::Exists(a)
        );
    }

    #[test]
    fn clashes_and_bad_requests_are_refused_with_a_reason() {
        let a = created(plan_network(&req("a", 1), &[]));
        let existing = [a];
        let err = |r: NetworkRequest| plan_network(&r, &existing).unwrap_err().to_string();
        assert!(err(req("a", 2)).contains("already exists"));
        let mut wide = req("w", 0);
        wide.subnet = (Ipv4Addr::new(198, 19, 0, 0), 16);
        assert!(err(wide).contains("overlaps network a"));
        let mut vni = req("v", 3);
        vni.vni = Some(4096);
        assert!(err(vni.clone()).contains("VNI 4096 is already network a's"));
        vni.vni = Some(1 << 24);
        assert!(err(vni).contains("out of range"));
        let mut tiny = req("t", 6);
        tiny.subnet = (Ipv4Addr::new(198, 0, 0, 0), 4);
        assert!(err(tiny.clone()).contains("prefix is /8 to /30"));
        tiny.subnet = (Ipv4Addr::new(198, 19, 6, 0), 33);
        assert!(err(tiny).contains("not a prefix length"));
        let mut other_mode = req("a", 1);
        other_mode.mode = "routed".into();
        assert!(err(other_mode).contains("(mode overlay)"));
        let mut host_bits = req("h", 4);
        host_bits.subnet = (Ipv4Addr::new(198, 19, 4, 5), 24);
        assert!(err(host_bits).contains("host bits"));
        let mut gw = req("g", 5);
        gw.gateway = Some(Ipv4Addr::new(198, 19, 5, 255));
        assert!(err(gw).contains("not a host address"));
    }

    #[test]
    fn keys_and_records_are_checked() {
        assert!(check_name("ov").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        let good = created(plan_network(&req("a", 1), &[]));
        let json = serde_json::to_vec(&good).unwrap();
        assert_eq!(parse_record(b"k", &json).unwrap(), good);
        let mut bad = good.clone();
        bad.subnet.1 = 40;
        let err = parse_record(b"k", &serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a prefix length"),
            "{err:#}"
        );
        assert!(parse_record(b"k", b"{").is_err());
        assert_eq!(pool_size((Ipv4Addr::new(198, 19, 1, 0), 24)), 254);
    }

    #[test]
    fn addresses_skip_the_gateway_and_the_held_and_run_out() {
        let mut n = created(plan_network(&req("a", 1), &[]));
        n.subnet = (Ipv4Addr::new(198, 19, 1, 0), 30);
        assert_eq!(free_address(&n, &[]), Some(Ipv4Addr::new(198, 19, 1, 2)));
        assert_eq!(free_address(&n, &[Ipv4Addr::new(198, 19, 1, 2)]), None);
    }

    #[test]
    fn an_ip_range_bounds_the_addresses_and_must_lie_in_the_subnet() {
        let mut r = req("a", 1);
        r.mode = MODE_MACVLAN.into();
        r.ip_range = Some((Ipv4Addr::new(198, 19, 1, 128), 30));
        let n = created(plan_network(&r, &[]));
        assert_eq!(n.vni, 0, "no VNI for a segment network");
        let held = [Ipv4Addr::new(198, 19, 1, 128)];
        assert_eq!(
            free_address(&n, &held),
            Some(Ipv4Addr::new(198, 19, 1, 129))
        );
        let full = [129, 130, 131].map(|h| Ipv4Addr::new(198, 19, 1, h));
        assert_eq!(
            free_address(&n, &full),
            Some(Ipv4Addr::new(198, 19, 1, 128))
        );
        r.ip_range = Some((Ipv4Addr::new(198, 19, 2, 0), 25));
        let err = format!("{:#}", plan_network(&r, &[]).unwrap_err());
        assert!(err.contains("not inside subnet"), "{err}");
        r.ip_range = Some((Ipv4Addr::new(198, 19, 1, 1), 25));
        let err = format!("{:#}", plan_network(&r, &[]).unwrap_err());
        assert!(err.contains("not a prefix"), "{err}");
        r.ip_range = None;
        r.vni = Some(5000);
        let err = format!("{:#}", plan_network(&r, &[]).unwrap_err());
        assert!(err.contains("a VNI is for overlay networks"), "{err}");
    }
}
