//! The network driver: networks are cluster store records (created on the
//! host where `docker network create` ran, adopted by the copies the mirror
//! makes on every other host); endpoints are veth pairs netd creates in
//! Join, which Docker moves into the container.
use std::net::Ipv4Addr;

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

use super::{field, parse_cidr, DatapathRequest, Plugin, Reply, ADDRESS_SPACE};
use crate::{
    cluster::{
        AddressClaim, EndpointRecord, NetworkRequest, IPVLAN_L2, IPVLAN_L3, MODE_IPVLAN,
        MODE_MACVLAN, MODE_OVERLAY, MODE_ROUTED,
    },
    netlink,
    state::overlay_mac,
};

/// `-o` options netd takes. `netd.id` is set by the mirror on the copies it
/// makes: the cluster network a copy stands for.
pub const OPT_MODE: &str = "netd.mode";
pub const OPT_VNI: &str = "netd.vni";
pub const OPT_ID: &str = "netd.id";
/// Docker's own macvlan option: the interface (and `.VID` VLAN) a segment
/// network's containers sit on.
pub const OPT_PARENT: &str = "parent";
/// Routed networks: the prefix length of each host's block.
pub const OPT_BLOCK: &str = "netd.block";
/// Docker's own ipvlan option: l2 (the default) or l3.
pub const OPT_IPVLAN_MODE: &str = "ipvlan_mode";
/// Modes `netd.mode` may name (overlay is the default).
const MODES: &[&str] = &[MODE_OVERLAY, MODE_MACVLAN, MODE_IPVLAN, MODE_ROUTED];
/// What VXLAN over IPv4 adds to a frame: outer IPv4 20, UDP 8, VXLAN 8 and
/// the inner Ethernet header 14.
pub const VXLAN_OVERHEAD: u32 = 50;

pub(super) async fn handle(plugin: &Plugin, call: &str, body: Value) -> Reply {
    let answer = match call {
        "GetCapabilities" => Ok(json!({"Scope": "local", "ConnectivityScope": "global"})),
        "CreateNetwork" => create_network(plugin, &body).await,
        "DeleteNetwork" => delete_network(plugin, &body).await,
        "CreateEndpoint" => create_endpoint(plugin, &body).await,
        "EndpointOperInfo" => Ok(json!({"Value": {}})),
        "Join" => join(plugin, &body).await,
        "Leave" => leave(plugin, &body).await,
        "DeleteEndpoint" => delete_endpoint(plugin, &body).await,
        "ProgramExternalConnectivity" | "RevokeExternalConnectivity" => Ok(json!({})),
        "DiscoverNew" | "DiscoverDelete" => Ok(json!({})),
        _ => return Reply::not_found(),
    };
    match answer {
        Ok(v) => Reply::ok(v),
        Err(e) => {
            tracing::warn!("network driver {call}: {e:#}");
            Reply::error("Err", &e)
        }
    }
}

/// What a CreateNetwork request asks for, checked.
#[derive(Debug, PartialEq, Eq)]
struct Requested {
    mode: String,
    vni: Option<u32>,
    /// The cluster network this copy stands for (the mirror's copies).
    adopt: Option<String>,
    subnet: (Ipv4Addr, u8),
    gateway: Option<Ipv4Addr>,
    internal: bool,
    parent: String,
    vlan: u16,
    block: Option<u8>,
    ipvlan_mode: String,
}

/// `eth1` or `eth1.100` (Docker's syntax): the interface and the VLAN.
fn parse_parent(value: &str) -> Result<(String, u16)> {
    let (ifname, vlan) = match value.rsplit_once('.') {
        Some((ifname, vid)) => {
            let vid: u16 = vid
                .parse()
                .ok()
                .filter(|v| (1..=netd_common::segment::VLAN_MAX).contains(v))
                .ok_or_else(|| {
                    anyhow!(
                        "{OPT_PARENT}={value}: VLAN id {vid:?} is not in 1-{}",
                        netd_common::segment::VLAN_MAX
                    )
                })?;
            (ifname, vid)
        }
        None => (value, 0),
    };
    if ifname.is_empty() || ifname.len() > 15 || ifname.contains('/') {
        bail!("{OPT_PARENT}={value}: {ifname:?} is not an interface name");
    }
    Ok((ifname.to_owned(), vlan))
}

fn parse_create(body: &Value) -> Result<Requested> {
    let options = body.get("Options");
    if options
        .and_then(|o| o.get("com.docker.network.enable_ipv6"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        bail!("netd networks are IPv4 only");
    }
    let internal = options
        .and_then(|o| o.get("com.docker.network.internal"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let (mut mode, mut vni, mut adopt) = (MODE_OVERLAY.to_owned(), None, None);
    let (mut parent, mut block, mut ipvlan_mode) = (None, None, None);
    if let Some(generic) = options
        .and_then(|o| o.get("com.docker.network.generic"))
        .and_then(Value::as_object)
    {
        for (key, value) in generic {
            let value = value.as_str().unwrap_or_default();
            match key.as_str() {
                OPT_MODE if MODES.contains(&value) => mode = value.into(),
                OPT_MODE => bail!(
                    "{OPT_MODE}={value} is not a netd mode ({})",
                    MODES.join(", ")
                ),
                OPT_VNI => {
                    vni = Some(
                        value
                            .parse::<u32>()
                            .map_err(|_| anyhow!("{OPT_VNI}={value} is not a number"))?,
                    )
                }
                OPT_ID => adopt = Some(value.to_owned()),
                OPT_PARENT => parent = Some(parse_parent(value)?),
                OPT_IPVLAN_MODE if [IPVLAN_L2, IPVLAN_L3].contains(&value) => {
                    ipvlan_mode = Some(value.to_owned())
                }
                OPT_IPVLAN_MODE => bail!("{OPT_IPVLAN_MODE}={value}: netd runs l2 and l3"),
                OPT_BLOCK => {
                    block = Some(
                        value
                            .trim_start_matches('/')
                            .parse::<u8>()
                            .map_err(|_| anyhow!("{OPT_BLOCK}={value} is not a prefix length"))?,
                    )
                }
                other => bail!(
                    "netd takes no option {other} (it knows {OPT_MODE}, {OPT_VNI}, {OPT_PARENT}, \
                     {OPT_IPVLAN_MODE}, {OPT_BLOCK})"
                ),
            }
        }
    }
    let ipvlan_mode = match (mode.as_str(), ipvlan_mode) {
        (MODE_IPVLAN, m) => m.unwrap_or_else(|| IPVLAN_L2.to_owned()),
        (_, Some(_)) => bail!("-o {OPT_IPVLAN_MODE} is for ipvlan networks, not {mode}"),
        (_, None) => String::new(),
    };
    let (parent, vlan) = match (mode.as_str(), parent) {
        (MODE_IPVLAN, Some((_, vid))) if ipvlan_mode == IPVLAN_L3 && vid != 0 => {
            bail!("an ipvlan l3 network is routed through its host: no VLAN (.{vid})")
        }
        (MODE_MACVLAN | MODE_IPVLAN, Some(p)) => p,
        (MODE_MACVLAN | MODE_IPVLAN, None) => {
            bail!("a {mode} network needs -o {OPT_PARENT}=INTERFACE[.VLAN]")
        }
        (_, Some(_)) => bail!("-o {OPT_PARENT} is for macvlan and ipvlan networks, not {mode}"),
        (_, None) => (String::new(), 0),
    };
    let v4 = body
        .get("IPv4Data")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let [data] = v4 else {
        bail!(
            "a netd network has exactly one IPv4 subnet (got {})",
            v4.len()
        );
    };
    if field(data, "AddressSpace") != ADDRESS_SPACE {
        bail!(
            "netd networks need --ipam-driver netd: another IPAM allocates on each host alone \
             and would give containers on different hosts the same addresses"
        );
    }
    let subnet = parse_cidr(field(data, "Pool"))?;
    let gateway = match field(data, "Gateway") {
        "" => None,
        g => Some(parse_cidr(g)?.0),
    };
    Ok(Requested {
        mode,
        vni,
        adopt,
        subnet,
        gateway,
        internal,
        parent,
        vlan,
        block,
        ipvlan_mode,
    })
}

async fn create_network(plugin: &Plugin, body: &Value) -> Result<Value> {
    let docker_id = field(body, "NetworkID");
    let req = parse_create(body)?;
    let ip_range = plugin
        .ip_ranges
        .lock()
        .expect("ip ranges lock")
        .remove(&req.subnet);
    if !req.parent.is_empty() && nix::net::if_::if_nametoindex(req.parent.as_str()).is_err() {
        bail!(
            "parent interface {} does not exist on host {}",
            req.parent,
            plugin.host.node
        );
    }
    let mut store = plugin.store.clone();
    let id = match &req.adopt {
        // A copy of a cluster network: it must be that network.
        Some(id) => {
            let (record, _) = store
                .network(id)
                .await?
                .ok_or_else(|| anyhow!("no netd network has id {id}"))?;
            if record.subnet != req.subnet {
                bail!(
                    "netd network {} has subnet {}/{}, not {}/{}",
                    record.label(),
                    record.subnet.0,
                    record.subnet.1,
                    req.subnet.0,
                    req.subnet.1
                );
            }
            if (&record.parent, record.vlan) != (&req.parent, req.vlan) {
                bail!(
                    "netd network {} has parent {}",
                    record.label(),
                    record.parent_option()
                );
            }
            record.id
        }
        None => {
            let record = store
                .create_network(&NetworkRequest {
                    id: docker_id.into(),
                    origin: plugin.host.node.clone(),
                    mode: req.mode,
                    subnet: req.subnet,
                    gateway: req.gateway,
                    vni: req.vni,
                    internal: req.internal,
                    parent: req.parent,
                    vlan: req.vlan,
                    ip_range,
                    block: req.block,
                    ipvlan_mode: req.ipvlan_mode,
                })
                .await?;
            tracing::info!(
                "network {} created in the cluster store: {} {}/{} {}",
                record.label(),
                record.mode,
                record.subnet.0,
                record.subnet.1,
                if record.is_segment() {
                    format!(
                        "{} on parent {}",
                        record.mode_label(),
                        record.parent_option()
                    )
                } else if record.is_routed() {
                    format!("host blocks /{}", record.block)
                } else {
                    format!("VNI {}", record.vni)
                }
            );
            record.id
        }
    };
    if id != docker_id {
        // Kept in the store too: Docker never replays CreateNetwork, and a
        // restarted netd must know what this copy stands for before it
        // reads Docker.
        store.put_copy(&plugin.host.node, docker_id, &id).await?;
    }
    plugin.remember(docker_id, &id);
    Ok(json!({}))
}

/// Docker removes its copy whatever the answer (it only logs a driver's
/// error): a network other hosts still use stays in the cluster store,
/// and the mirror puts the local copy back.
async fn delete_network(plugin: &Plugin, body: &Value) -> Result<Value> {
    let docker_id = field(body, "NetworkID");
    let id = plugin.netd_id(docker_id).await?;
    plugin
        .local
        .lock()
        .expect("local networks lock")
        .remove(docker_id);
    let mut store = plugin.store.clone();
    store.delete_copy(&plugin.host.node, docker_id).await?;
    store.delete_network(&id).await?;
    Ok(json!({}))
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    crate::state::parse_mac(s).ok_or_else(|| anyhow!("{s:?} is not a MAC address"))
}

/// Publishes the endpoint in the cluster store (other hosts learn where
/// its address is) and picks its MAC unless Docker was given one.
async fn create_endpoint(plugin: &Plugin, body: &Value) -> Result<Value> {
    let iface = body.get("Interface").unwrap_or(&Value::Null);
    if !field(iface, "AddressIPv6").is_empty() {
        bail!("netd networks are IPv4 only");
    }
    let addr = parse_cidr(field(iface, "Address"))?.0;
    let network = plugin.netd_id(field(body, "NetworkID")).await?;
    let given = field(iface, "MacAddress");
    let (net, _) = plugin
        .store
        .clone()
        .network(&network)
        .await?
        .ok_or_else(|| anyhow!("no netd network has id {network}"))?;
    let mac = if net.shares_parent_mac() {
        // ipvlan L2: the parent's MAC, as kernel ipvlan gives its slaves.
        let segment = crate::segment::Segments::resolve(&net).await.map_err(|e| {
            anyhow!(
                "network {}: parent {} on host {}: {e:#}",
                net.label(),
                net.parent,
                plugin.host.node
            )
        })?;
        if !given.is_empty() && parse_mac(given)? != segment.parent_mac {
            bail!("ipvlan containers share the parent's MAC: no --mac-address");
        }
        segment.parent_mac
    } else {
        match given {
            "" => overlay_mac(addr),
            m => parse_mac(m)?,
        }
    };
    if net.is_segment() && !given.is_empty() && !net.shares_parent_mac() {
        // On the LAN, a MAC the parent's programs demux by: never a group
        // address or the parent's own (its traffic would be a container's).
        let parent = crate::segment::Segments::resolve(&net).await?;
        if mac[0] & 1 != 0 || mac == parent.parent_mac {
            bail!(
                "--mac-address {given}: a container on {} cannot have a group MAC or the \
                 parent's own",
                net.parent
            );
        }
    }
    let record = EndpointRecord {
        network,
        addr,
        mac,
        host: plugin.host.node.clone(),
        vtep: plugin.host.vtep,
        endpoint: field(body, "EndpointID").to_owned(),
    };
    let lease = plugin.host.lease.load(std::sync::atomic::Ordering::Relaxed);
    let mut store = plugin.store.clone();
    store.put_endpoint(&record, lease).await?;
    let claim = AddressClaim {
        host: record.host.clone(),
        owner: record.endpoint.clone(),
    };
    store.name_claim(&record.network, addr, &claim).await?;
    // Docker lets a driver fill only what it left empty.
    if given.is_empty() && mac != [0; 6] {
        return Ok(json!({"Interface": {"MacAddress": format_mac(mac)}}));
    }
    Ok(json!({}))
}

async fn delete_endpoint(plugin: &Plugin, body: &Value) -> Result<Value> {
    leave(plugin, body).await?;
    let docker_network = field(body, "NetworkID").to_owned();
    let endpoint = field(body, "EndpointID").to_owned();
    plugin
        .until_done(
            format!("removing endpoint {endpoint} from the cluster store"),
            move |plugin| {
                let (docker_network, endpoint) = (docker_network.clone(), endpoint.clone());
                async move {
                    let network = plugin.netd_id(&docker_network).await?;
                    plugin
                        .store
                        .clone()
                        .delete_endpoint(&network, &endpoint)
                        .await
                }
            },
        )
        .await;
    Ok(json!({}))
}

/// The host and container-side names of an endpoint's veth pair (at most
/// 15 bytes); Docker renames the container side when it moves it.
fn veth_names(endpoint_id: &str) -> Result<(String, String)> {
    let short = endpoint_id
        .get(..11)
        .filter(|s| s.bytes().all(|b| b.is_ascii_alphanumeric()))
        .ok_or_else(|| anyhow!("endpoint id {endpoint_id:?} is malformed"))?;
    use crate::overlay::{PEER_VETH_PREFIX, VETH_PREFIX};
    Ok((
        format!("{VETH_PREFIX}{short}"),
        format!("{PEER_VETH_PREFIX}{short}"),
    ))
}

/// Creates the endpoint's veth pair and has the daemon attach and register
/// it; the host end carries the gateway's MAC (the container's frames to
/// its gateway are the host's) and a route to the container.
async fn join(plugin: &Plugin, body: &Value) -> Result<Value> {
    let network = plugin.netd_id(field(body, "NetworkID")).await?;
    let endpoint_id = field(body, "EndpointID");
    let mut store = plugin.store.clone();
    let (net, _) = store
        .network(&network)
        .await?
        .ok_or_else(|| anyhow!("no netd network has id {network}"))?;
    let record = store
        .endpoint(&network, endpoint_id)
        .await?
        .ok_or_else(|| anyhow!("endpoint {endpoint_id} is not in the cluster store"))?;
    let (host, peer) = veth_names(endpoint_id)?;
    let segment = match net.is_segment() {
        true => Some(crate::segment::Segments::resolve(&net).await.map_err(|e| {
            anyhow!(
                "network {}: parent {} on host {}: {e:#}",
                net.label(),
                net.parent,
                plugin.host.node
            )
        })?),
        false => None,
    };
    let mtu = if net.is_segment() {
        // On the parent's LAN, as a macvlan device would be.
        netlink::mtu(&net.parent).await.with_context(|| {
            format!(
                "network {}: parent {} on host {}",
                net.label(),
                net.parent,
                plugin.host.node
            )
        })?
    } else if net.is_routed() {
        // Routed as the host's own packets are: nothing added.
        netlink::mtu(&plugin.host.uplink).await?
    } else {
        netlink::mtu(&plugin.host.uplink).await? - VXLAN_OVERHEAD
    };
    // The container's end has its MAC from the start: the first frames it
    // sends as it comes up (IPv6 MLD) carry the MAC its endpoint has. The
    // host end of an overlay veth is the gateway; a segment network's
    // gateway is a router on the LAN, and its host end is nobody's.
    let host_mac = match net.is_segment() {
        false => overlay_mac(net.gateway),
        true => segment_host_mac(record.mac),
    };
    let ifindex = netlink::create_veth(&host, &peer, mtu, host_mac, record.mac).await?;
    let registered = async {
        if !net.is_segment() {
            netlink::add_host_route(record.addr, ifindex).await?;
        }
        let network = Box::new(net.clone());
        plugin
            .ask_datapath(|done| DatapathRequest::Join {
                ifname: host.clone(),
                ifindex,
                record,
                network,
                segment,
                done,
            })
            .await
    }
    .await;
    if let Err(e) = registered {
        let _ = netlink::delete_link(&host).await;
        return Err(e);
    }
    Ok(json!({
        "InterfaceName": {"SrcName": peer, "DstPrefix": "eth"},
        "Gateway": net.gateway.to_string(),
    }))
}

/// The MAC of a segment endpoint's host-side veth: its container's, with
/// the second byte changed (never seen on the LAN: nothing leaves by it).
fn segment_host_mac(mac: [u8; 6]) -> [u8; 6] {
    [mac[0], mac[1] ^ 0x80, mac[2], mac[3], mac[4], mac[5]]
}

async fn leave(plugin: &Plugin, body: &Value) -> Result<Value> {
    let (host, _) = veth_names(field(body, "EndpointID"))?;
    if let Ok(ifindex) = nix::net::if_::if_nametoindex(host.as_str()) {
        plugin
            .ask_datapath(|done| DatapathRequest::Leave { ifindex, done })
            .await?;
    }
    netlink::delete_link(&host).await?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(generic: Value, space: &str) -> Value {
        json!({
            "NetworkID": "abc",
            "Options": {"com.docker.network.generic": generic, "com.docker.network.internal": true},
            "IPv4Data": [{"AddressSpace": space, "Pool": "198.19.66.0/24", "Gateway": "198.19.66.1/24"}],
            "IPv6Data": [],
        })
    }

    #[test]
    fn create_requests_are_read_and_checked() {
        let err = |b: Value| format!("{:#}", parse_create(&b).unwrap_err());
        let r = parse_create(&request(json!({"netd.vni": "5000"}), ADDRESS_SPACE)).unwrap();
        assert_eq!(
            r,
            Requested {
                mode: "overlay".into(),
                vni: Some(5000),
                adopt: None,
                subnet: (Ipv4Addr::new(198, 19, 66, 0), 24),
                gateway: Some(Ipv4Addr::new(198, 19, 66, 1)),
                internal: true,
                parent: String::new(),
                vlan: 0,
                block: None,
                ipvlan_mode: String::new(),
            }
        );
        let r = parse_create(&request(
            json!({"netd.mode": "ipvlan", "parent": "eth1"}),
            ADDRESS_SPACE,
        ))
        .unwrap();
        assert_eq!((r.ipvlan_mode.as_str(), r.parent.as_str()), ("l2", "eth1"));
        assert!(err(request(
            json!({"netd.mode": "ipvlan", "ipvlan_mode": "l3", "parent": "eth1.5"}),
            ADDRESS_SPACE
        ))
        .contains("no VLAN"));
        assert!(err(request(
            json!({"netd.mode": "ipvlan", "ipvlan_mode": "l3s", "parent": "eth1"}),
            ADDRESS_SPACE
        ))
        .contains("netd runs l2 and l3"));
        let r = parse_create(&request(
            json!({"netd.mode": "routed", "netd.block": "/26"}),
            ADDRESS_SPACE,
        ))
        .unwrap();
        assert_eq!((r.mode.as_str(), r.block), ("routed", Some(26)));
        assert!(err(request(
            json!({"netd.mode": "routed", "netd.block": "x"}),
            ADDRESS_SPACE
        ))
        .contains("not a prefix length"));
        let r = parse_create(&request(
            json!({"netd.mode": "macvlan", "parent": "eth1.100"}),
            ADDRESS_SPACE,
        ))
        .unwrap();
        assert_eq!(
            (r.mode.as_str(), r.parent.as_str(), r.vlan),
            ("macvlan", "eth1", 100)
        );
        for (parent, why) in [
            ("eth1.0", "not in 1-4094"),
            ("eth1.4095", "not in 1-4094"),
            ("eth1.x", "not in 1-4094"),
            (".5", "not an interface name"),
        ] {
            let e = err(request(
                json!({"netd.mode": "macvlan", "parent": parent}),
                ADDRESS_SPACE,
            ));
            assert!(e.contains(why), "{parent}: {e}");
        }
        assert!(err(request(json!({"netd.mode": "macvlan"}), ADDRESS_SPACE))
            .contains("needs -o parent"));
        assert!(err(request(json!({}), "LocalDefault")).contains("--ipam-driver netd"));
        assert!(
            err(request(json!({"netd.mode": "bridge"}), ADDRESS_SPACE)).contains("not a netd mode")
        );
        assert!(err(request(json!({"netd.vni": "x"}), ADDRESS_SPACE)).contains("not a number"));
        assert!(err(request(json!({"parent": "eth1"}), ADDRESS_SPACE))
            .contains("for macvlan and ipvlan networks"));
        assert!(err(request(json!({"bogus": "1"}), ADDRESS_SPACE)).contains("no option bogus"));
    }

    #[test]
    fn macs_and_veth_names_follow_from_ids() {
        assert_eq!(
            format_mac(overlay_mac(Ipv4Addr::new(198, 19, 66, 2))),
            "02:4e:c6:13:42:02"
        );
        let (host, peer) = veth_names("0123456789abcdef").unwrap();
        assert_eq!(
            (host.as_str(), peer.as_str()),
            ("nd0123456789a", "nc0123456789a")
        );
        assert!(veth_names("short").is_err());
        assert!(veth_names("../../etc/passwd").is_err());
    }
}
