//! The IPAM driver: pools are the subnets users give with `--subnet`;
//! container addresses are claims in the cluster store, unique across every
//! host; the gateway is the network's anycast gateway, the same on every
//! host, and never a claim.
use std::net::Ipv4Addr;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::{field, parse_cidr, Plugin, Reply, ADDRESS_SPACE};
use crate::cluster::{self, AddressClaim};

/// Docker's RequestAddress option naming the gateway request.
const REQUEST_TYPE: &str = "RequestAddressType";
const GATEWAY_REQUEST: &str = "com.docker.network.gateway";
/// How a PoolID starts: the rest is the subnet, so the same request gives
/// the same id on every host, as Docker requires.
const POOL_PREFIX: &str = "netd/";

pub(super) async fn handle(plugin: &Plugin, call: &str, body: Value) -> Reply {
    let answer = match call {
        "GetCapabilities" => {
            Ok(json!({"RequiresMACAddress": false, "RequiresRequestReplay": false}))
        }
        "GetDefaultAddressSpaces" => Ok(json!({
            "LocalDefaultAddressSpace": ADDRESS_SPACE,
            "GlobalDefaultAddressSpace": ADDRESS_SPACE,
        })),
        "RequestPool" => request_pool(plugin, &body),
        "ReleasePool" => Ok(json!({})),
        "RequestAddress" => request_address(plugin, &body).await,
        "ReleaseAddress" => release_address(plugin, &body).await.map(|()| json!({})),
        _ => return Reply::not_found(),
    };
    match answer {
        Ok(v) => Reply::ok(v),
        Err(e) => {
            tracing::warn!("IPAM {call}: {e:#}");
            Reply::error("Error", &e)
        }
    }
}

fn request_pool(plugin: &Plugin, body: &Value) -> Result<Value> {
    if body.get("V6").and_then(Value::as_bool) == Some(true) {
        bail!("netd networks are IPv4 only");
    }
    let pool = field(body, "Pool");
    if pool.is_empty() {
        bail!("netd's IPAM needs the network's subnet (--subnet)");
    }
    if let Some(opts) = body.get("Options").and_then(Value::as_object) {
        if let Some(key) = opts.keys().next() {
            bail!("netd's IPAM takes no --ipam-opt (got {key})");
        }
    }
    let subnet = parse_cidr(pool)?;
    cluster::check_subnet(subnet)?;
    // The range goes into the network's record at CreateNetwork, which
    // comes next and is not told it.
    let mut ranges = plugin.ip_ranges.lock().expect("ip ranges lock");
    match field(body, "SubPool") {
        "" => ranges.remove(&subnet),
        range => {
            let range = parse_cidr(range)?;
            cluster::check_ip_range(subnet, range)?;
            ranges.insert(subnet, range)
        }
    };
    Ok(json!({
        "PoolID": format!("{POOL_PREFIX}{}/{}", subnet.0, subnet.1),
        "Pool": pool,
        "Data": {},
    }))
}

fn pool_subnet(body: &Value) -> Result<(Ipv4Addr, u8)> {
    let id = field(body, "PoolID");
    let subnet = id
        .strip_prefix(POOL_PREFIX)
        .ok_or_else(|| anyhow!("pool {id:?} is not netd's"))?;
    parse_cidr(subnet)
}

async fn request_address(plugin: &Plugin, body: &Value) -> Result<Value> {
    let subnet = pool_subnet(body)?;
    let wanted = match field(body, "Address") {
        "" => None,
        a => Some(
            a.parse::<Ipv4Addr>()
                .map_err(|_| anyhow!("{a:?} is not an IPv4 address"))?,
        ),
    };
    let is_gateway = body
        .get("Options")
        .and_then(|o| o.get(REQUEST_TYPE))
        .and_then(Value::as_str)
        == Some(GATEWAY_REQUEST);
    let cidr = |a: Ipv4Addr| json!({"Address": format!("{a}/{}", subnet.1), "Data": {}});
    if is_gateway {
        // Asked while the network is created (before CreateNetwork, which
        // records it), on its first host and on every other: the anycast
        // gateway is everybody's, so nothing is claimed.
        let gateway = match wanted {
            Some(g) => g,
            None => Ipv4Addr::from(u32::from(subnet.0) + 1),
        };
        if !cluster::is_host_address(subnet, gateway) {
            bail!(
                "gateway {gateway} is not a host address of {}/{}",
                subnet.0,
                subnet.1
            );
        }
        return Ok(cidr(gateway));
    }
    let network = plugin.network_by_subnet(subnet).await?.ok_or_else(|| {
        anyhow!(
            "no netd network has subnet {}/{} in the cluster store",
            subnet.0,
            subnet.1
        )
    })?;
    // Named after the endpoint once CreateEndpoint tells it; until then a
    // nonce, so that this request's claim is told from any other's.
    let claim = AddressClaim {
        host: plugin.host.node.clone(),
        owner: format!("{}{:016x}", super::PENDING_CLAIM, nonce()),
    };
    let mut store = plugin.store.clone();
    // A routed network's containers take their addresses from their
    // host's block, which the other hosts route to it.
    let block = match network.is_routed() {
        true => Some(store.host_block(&network.id, &plugin.host.node).await?),
        false => None,
    };
    let addr = match (wanted, block) {
        (Some(a), Some(b)) if !crate::state::subnet_contains(b, a) => bail!(
            "{a} is outside this host's block {}/{} of network {}: the others route only \
             that block here",
            b.0,
            b.1,
            network.label()
        ),
        (Some(a), _) => store.claim_exact(&network.id, a, &claim).await?,
        (None, block) => store.claim_address_in(&network.id, &claim, block).await?,
    };
    Ok(cidr(addr))
}

/// 64 random bits (std's per-process random hash keys, fresh per call).
fn nonce() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

async fn release_address(plugin: &Plugin, body: &Value) -> Result<()> {
    let subnet = pool_subnet(body)?;
    let addr: Ipv4Addr = match field(body, "Address").split_once('/') {
        Some((a, _)) => a.parse(),
        None => field(body, "Address").parse(),
    }
    .map_err(|_| anyhow!("{:?} is not an IPv4 address", field(body, "Address")))?;
    plugin
        .until_done(format!("releasing {addr}"), move |plugin| async move {
            let Some(network) = plugin.network_by_subnet(subnet).await? else {
                return Ok(());
            };
            if addr == network.gateway {
                return Ok(());
            }
            plugin
                .store
                .clone()
                .release_address(&network.id, addr, &plugin.host.node)
                .await
        })
        .await;
    Ok(())
}
