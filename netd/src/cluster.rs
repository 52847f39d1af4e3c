//! The cluster store: what every netd host agrees on, kept in etcd (v3 API).
//! Networks (with a cluster-unique VNI and a subnet that overlaps no other
//! network's) and address claims (one holder per address across all hosts)
//! are created by transactions that fail when anybody else wrote in
//! between; the loser reads again and retries.
//!
//! Layout, below [`PREFIX`]:
//! ```text
//! networks/<name>          NetworkRecord (JSON)
//! vnis/<vni>               <name>: the VNI's holder
//! addrs/<name>/<ip>        AddressClaim (JSON)
//! ```
//! This is the first piece of the multi-host work: the daemon and the
//! Docker plugin (IPAM) are not wired to it yet.
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

/// A netd network, as every host sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub name: String,
    /// "overlay" (the next modes: macvlan, ipvlan, routed).
    pub mode: String,
    pub vni: u32,
    pub subnet: (Ipv4Addr, u8),
    pub gateway: Ipv4Addr,
    pub internal: bool,
}

/// What `netd network create` (through Docker) asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkRequest {
    pub name: String,
    pub mode: String,
    pub subnet: (Ipv4Addr, u8),
    /// None: the subnet's first host address.
    pub gateway: Option<Ipv4Addr>,
    /// None: the lowest free one in [`VNI_AUTO`].
    pub vni: Option<u32>,
    pub internal: bool,
}

/// Who holds an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressClaim {
    pub host: String,
    /// Docker's endpoint id, or whatever the holder calls it.
    pub owner: String,
}

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

    /// Every network, and the store revision they were read at.
    pub async fn networks(&mut self) -> Result<(Vec<NetworkRecord>, i64)> {
        let resp = self
            .client
            .get(
                key(&["networks", ""]),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .context("reading networks from etcd")?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let networks = resp
            .kvs()
            .iter()
            .map(|kv| serde_json::from_slice(kv.value()).context("a malformed network record"))
            .collect::<Result<_>>()?;
        Ok((networks, revision))
    }

    /// Creates a network, or returns it when one of that name and the same
    /// request exists (idempotent). Refused with a one-line reason: the
    /// name taken by another definition, a subnet overlapping another
    /// network's, a VNI in use, no VNI left.
    pub async fn create_network(&mut self, req: &NetworkRequest) -> Result<NetworkRecord> {
        for _ in 0..ATTEMPTS {
            let (existing, revision) = self.networks().await?;
            let record = match plan_network(req, &existing)? {
                Plan::Exists(record) => return Ok(record),
                Plan::Create(record) => record,
            };
            let net_key = key(&["networks", &record.name]);
            let vni_key = key(&["vnis", &record.vni.to_string()]);
            // Nobody created or changed a network since the read, and the
            // VNI is still free.
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(key(&["networks", ""]), CompareOp::Less, revision + 1)
                        .with_prefix(),
                    Compare::create_revision(net_key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(vni_key.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(net_key, serde_json::to_vec(&record)?, None),
                    TxnOp::put(vni_key, record.name.clone(), None),
                ]);
            if self
                .client
                .txn(txn)
                .await
                .context("creating the network in etcd")?
                .succeeded()
            {
                return Ok(record);
            }
        }
        bail!("creating network {}: too much contention in etcd", req.name)
    }

    /// Deletes a network, its VNI and its address claims. Nothing to delete
    /// is not an error.
    pub async fn delete_network(&mut self, name: &str) -> Result<()> {
        let Some(record) = self.network(name).await? else {
            return Ok(());
        };
        let txn = Txn::new().and_then([
            TxnOp::delete(key(&["networks", name]), None),
            TxnOp::delete(key(&["vnis", &record.vni.to_string()]), None),
            TxnOp::delete(
                key(&["addrs", name, ""]),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        ]);
        self.client
            .txn(txn)
            .await
            .with_context(|| format!("deleting network {name} from etcd"))?;
        Ok(())
    }

    pub async fn network(&mut self, name: &str) -> Result<Option<NetworkRecord>> {
        let resp = self
            .client
            .get(key(&["networks", name]), None)
            .await
            .context("reading a network from etcd")?;
        resp.kvs()
            .first()
            .map(|kv| serde_json::from_slice(kv.value()).context("a malformed network record"))
            .transpose()
    }

    /// Claims a free address of network `name` for `claim`: the lowest host
    /// address nobody holds, never the network's gateway. Unique across
    /// the cluster; refused when the pool is exhausted.
    pub async fn claim_address(&mut self, name: &str, claim: &AddressClaim) -> Result<Ipv4Addr> {
        let record = self
            .network(name)
            .await?
            .ok_or_else(|| anyhow!("no netd network named {name:?}"))?;
        for _ in 0..ATTEMPTS {
            let held = self.claimed(name).await?;
            let addr = free_address(&record, &held).ok_or_else(|| {
                anyhow!(
                    "the address pool of network {name} ({}/{}) is exhausted",
                    record.subnet.0,
                    record.subnet.1
                )
            })?;
            let addr_key = key(&["addrs", name, &addr.to_string()]);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(addr_key.clone(), CompareOp::Equal, 0),
                    // The network still exists (deleted meanwhile: no claim).
                    Compare::create_revision(key(&["networks", name]), CompareOp::Greater, 0),
                ])
                .and_then([TxnOp::put(addr_key, serde_json::to_vec(claim)?, None)]);
            if self
                .client
                .txn(txn)
                .await
                .context("claiming an address in etcd")?
                .succeeded()
            {
                return Ok(addr);
            }
            if self.network(name).await?.is_none() {
                bail!("network {name} was deleted meanwhile");
            }
        }
        bail!("claiming an address of {name}: too much contention in etcd")
    }

    /// Gives an address back. Not held is not an error.
    pub async fn release_address(&mut self, name: &str, addr: Ipv4Addr) -> Result<()> {
        self.client
            .delete(key(&["addrs", name, &addr.to_string()]), None)
            .await
            .context("releasing an address in etcd")?;
        Ok(())
    }

    /// The addresses of `name` somebody holds.
    pub async fn claimed(&mut self, name: &str) -> Result<Vec<Ipv4Addr>> {
        let prefix = key(&["addrs", name, ""]);
        let resp = self
            .client
            .get(
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
    if prefix > 30 {
        bail!("subnet {net}/{prefix} is too small for a network (at most /30)");
    }
    if !subnet_contains(req.subnet, net) || u32::from(net) & !mask(prefix) != 0 {
        bail!("{net}/{prefix} is not a subnet address (host bits set)");
    }
    let gateway = match req.gateway {
        Some(gw) if !is_host_address(req.subnet, gw) => {
            bail!("gateway {gw} is not a host address of {net}/{prefix}")
        }
        Some(gw) => gw,
        None => Ipv4Addr::from(u32::from(net) + 1),
    };
    if let Some(vni) = req.vni {
        if vni == 0 || vni > *VNI_AUTO.end() {
            bail!("VNI {vni} is out of range (1-{})", VNI_AUTO.end());
        }
    }
    if let Some(same) = existing.iter().find(|n| n.name == req.name) {
        let matches = same.mode == req.mode
            && same.subnet == req.subnet
            && same.internal == req.internal
            && req.gateway.is_none_or(|g| g == same.gateway)
            && req.vni.is_none_or(|v| v == same.vni);
        if matches {
            return Ok(Plan::Exists(same.clone()));
        }
        bail!(
            "a netd network named {} already exists with another definition ({}/{}, VNI {})",
            same.name,
            same.subnet.0,
            same.subnet.1,
            same.vni
        );
    }
    if let Some(other) = existing.iter().find(|n| overlaps(n.subnet, req.subnet)) {
        bail!(
            "subnet {net}/{prefix} overlaps network {} ({}/{})",
            other.name,
            other.subnet.0,
            other.subnet.1
        );
    }
    let vni = match req.vni {
        Some(vni) => match existing.iter().find(|n| n.vni == vni) {
            Some(other) => bail!("VNI {vni} is already network {}'s", other.name),
            None => vni,
        },
        None => VNI_AUTO
            .clone()
            .find(|v| existing.iter().all(|n| n.vni != *v))
            .ok_or_else(|| anyhow!("no free VNI left"))?,
    };
    Ok(Plan::Create(NetworkRecord {
        name: req.name.clone(),
        mode: req.mode.clone(),
        vni,
        subnet: req.subnet,
        gateway,
        internal: req.internal,
    }))
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    subnet_contains(a, b.0) || subnet_contains(b, a.0)
}

/// Inside `subnet` and neither its network nor its broadcast address.
fn is_host_address(subnet: (Ipv4Addr, u8), addr: Ipv4Addr) -> bool {
    let net = u32::from(subnet.0) & mask(subnet.1);
    subnet_contains(subnet, addr)
        && u32::from(addr) != net
        && u32::from(addr) != net | !mask(subnet.1)
}

/// The lowest host address of `network` that is not its gateway and not in
/// `held`.
fn free_address(network: &NetworkRecord, held: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let net = u32::from(network.subnet.0) & mask(network.subnet.1);
    let broadcast = net | !mask(network.subnet.1);
    (net + 1..broadcast)
        .map(Ipv4Addr::from)
        .find(|a| *a != network.gateway && !held.contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, third: u8) -> NetworkRequest {
        NetworkRequest {
            name: name.into(),
            mode: "overlay".into(),
            subnet: (Ipv4Addr::new(198, 19, third, 0), 24),
            gateway: None,
            vni: None,
            internal: false,
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
        let mut host_bits = req("h", 4);
        host_bits.subnet = (Ipv4Addr::new(198, 19, 4, 5), 24);
        assert!(err(host_bits).contains("host bits"));
        let mut gw = req("g", 5);
        gw.gateway = Some(Ipv4Addr::new(198, 19, 5, 255));
        assert!(err(gw).contains("not a host address"));
    }

    #[test]
    fn addresses_skip_the_gateway_and_the_held_and_run_out() {
        let mut n = created(plan_network(&req("a", 1), &[]));
        n.subnet = (Ipv4Addr::new(198, 19, 1, 0), 30);
        assert_eq!(free_address(&n, &[]), Some(Ipv4Addr::new(198, 19, 1, 2)));
        assert_eq!(free_address(&n, &[Ipv4Addr::new(198, 19, 1, 2)]), None);
    }
}
