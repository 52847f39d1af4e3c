//! Reading and removing what is pinned, without loading any program: works
//! while the daemon is down.
use std::{os::fd::AsFd as _, path::Path};

use anyhow::{Context as _, Result};
use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs, SchedClassifier,
    },
};
use netd_common::{maps, Counter, CounterValue, Hook, PortKey, PortTarget};
use serde::Serialize;

use super::{
    attach::{AttachKind, Attachment},
    pins::{detach_pinned_link, interface_index},
    sum_counters, PinDir,
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub layout_version: u32,
    pub attachments: Vec<AttachmentStatus>,
    pub maps: Vec<MapStatus>,
    /// hook name -> counter name -> totals; zero counters omitted.
    pub counters: Vec<HookCounters>,
    /// Segment (macvlan) networks on this host.
    pub segments: Vec<SegmentStatus>,
    /// The other hosts of the cluster.
    pub hosts: Vec<HostStatus>,
}

/// Another cluster host as this one reaches it.
#[derive(Debug, Serialize)]
pub struct HostStatus {
    pub address: std::net::Ipv4Addr,
    pub reach: &'static str,
}

/// A segment network's place on this host.
#[derive(Debug, Serialize)]
pub struct SegmentStatus {
    pub network: String,
    pub parent: String,
    /// 0: untagged.
    pub vlan: u16,
    /// Its containers on this host (MACs the parent's programs demux).
    pub containers: u32,
    /// How the parent takes the containers' MACs in: "unicast filter", or
    /// "promiscuous mode" (a device without one; or set so by somebody). Filled
    /// in from the kernel by the CLI.
    pub accepts: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AttachmentStatus {
    pub hook: &'static str,
    pub interface: String,
    pub direction: &'static str,
    pub program: String,
    pub program_id: u32,
    pub link_id: u32,
    /// False when the link outlived its interface or was detached.
    pub attached: bool,
}

#[derive(Debug, Serialize)]
pub struct MapStatus {
    pub name: &'static str,
    pub map_type: String,
    pub max_entries: u32,
    /// Entries in use (arrays are always full).
    pub entries: u32,
}

#[derive(Debug, Serialize)]
pub struct HookCounters {
    pub hook: &'static str,
    pub counters: Vec<NamedCounter>,
}

#[derive(Debug, Serialize)]
pub struct NamedCounter {
    pub name: &'static str,
    /// "verdict", "action" or "reason".
    pub kind: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// Reads the status of what is pinned under `pin_dir`.
pub fn read_status(pin_dir: &Path) -> Result<Status> {
    let pins = PinDir::existing(pin_dir)?;
    pins.check_layout()?;
    let meta = pins.read_meta()?;

    let mut attachments = Vec::new();
    for (att, target, path) in pins.links()? {
        attachments.push(attachment_status(att, target, &path)?);
    }

    let mut map_status = Vec::new();
    for name in maps::ALL {
        let path = pins.map(name);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let info = data.info()?;
        let map_type = info.map_type()?;
        let entries = match map_type {
            aya::maps::MapType::Hash
            | aya::maps::MapType::LruHash
            | aya::maps::MapType::LpmTrie => count_keys(&data)?,
            _ => info.max_entries(), // arrays are always full
        };
        map_status.push(MapStatus {
            name,
            map_type: format!("{map_type:?}"),
            max_entries: info.max_entries(),
            entries,
        });
    }

    let path = pins.map(maps::COUNTERS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let array: PerCpuArray<MapData, CounterValue> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let totals = sum_counters(&array)?;
    let counters = group_counters(&totals);

    Ok(Status {
        pin_dir: pin_dir.display().to_string(),
        layout_version: meta.layout_version,
        attachments,
        maps: map_status,
        counters,
        segments: read_segments(&pins)?,
        hosts: read_hosts(&pins)?,
    })
}

fn read_hosts(pins: &PinDir) -> Result<Vec<HostStatus>> {
    use netd_common::overlay::{HOST_OFF_LINK, HOST_ON_LINK};
    let path = pins.map(maps::VTEPS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let vteps: aya::maps::HashMap<MapData, [u8; 4], u32> =
        aya::maps::HashMap::try_from(Map::HashMap(data))?;
    let mut out: Vec<HostStatus> = vteps
        .iter()
        .filter_map(|e| e.ok())
        .map(|(addr, place)| HostStatus {
            address: addr.into(),
            reach: match place {
                HOST_ON_LINK => "on this LAN",
                HOST_OFF_LINK => {
                    "not on this LAN: routed networks cannot reach it without encapsulation"
                }
                _ => "cluster host",
            },
        })
        .collect();
    out.sort_by_key(|h| h.address);
    Ok(out)
}

fn read_segments(pins: &PinDir) -> Result<Vec<SegmentStatus>> {
    use netd_common::{Segment, SegmentMac, SegmentPort};
    let open = |name: &str| {
        let path = pins.map(name);
        MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
    };
    let segments: aya::maps::HashMap<MapData, u32, Segment> =
        aya::maps::HashMap::try_from(Map::HashMap(open(maps::SEGMENTS)?))?;
    let macs: aya::maps::HashMap<MapData, SegmentMac, SegmentPort> =
        aya::maps::HashMap::try_from(Map::HashMap(open(maps::SEGMENT_MACS)?))?;
    let macs: Vec<SegmentPort> = macs.iter().filter_map(|m| m.ok().map(|(_, p)| p)).collect();
    let mut out = Vec::new();
    for item in segments.iter() {
        let (id, seg) = item?;
        out.push(SegmentStatus {
            network: format!("{id:08x}"),
            parent: interface_name(seg.parent).unwrap_or_else(|| format!("ifindex {}", seg.parent)),
            vlan: seg.vlan,
            containers: macs.iter().filter(|p| p.network == id).count() as u32,
            accepts: None,
        });
    }
    out.sort_by(|a, b| (&a.parent, a.vlan).cmp(&(&b.parent, b.vlan)));
    Ok(out)
}

/// Counts the keys of a hash map by walking them (BPF has no size query).
fn count_keys(data: &MapData) -> Result<u32> {
    let fd = data.fd().as_fd();
    let mut count = 0u32;
    let mut key: Option<Vec<u8>> = None;
    let key_size = data.info()?.key_size() as usize;
    loop {
        let mut next = vec![0u8; key_size];
        #[repr(C)]
        struct NextKeyAttr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            next_key: u64,
        }
        let attr = NextKeyAttr {
            map_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
            _pad: 0,
            key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
            next_key: next.as_mut_ptr() as u64,
        };
        match super::pins::sys_bpf(BPF_MAP_GET_NEXT_KEY, &attr) {
            Ok(_) => {
                count += 1;
                key = Some(next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
            Err(e) => return Err(e).context("walking map keys"),
        }
    }
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

fn attachment_status(att: Attachment, target: String, path: &Path) -> Result<AttachmentStatus> {
    let link = FdLink::from(
        PinnedLink::from_pin(path).with_context(|| format!("opening {}", path.display()))?,
    );
    let info = link.info()?;
    let program_id = info.program_id();
    let expected = att.program();
    let attached = match att.kind() {
        // The interface is gone: the link outlived it.
        AttachKind::Tc(_) if interface_index(&target).is_err() => false,
        AttachKind::Tc(direction) => {
            let (_, progs) = SchedClassifier::query_tcx(&target, direction)
                .with_context(|| format!("querying TCX programs on {target}"))?;
            progs.iter().any(|p| p.id() == program_id)
        }
        AttachKind::Cgroup => Path::new(&target).is_dir(),
    };
    // The kernel keeps 15 characters of a program name: show ours in full
    // when the kernel's is a prefix of it, and the kernel's otherwise.
    let program = match loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == program_id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
    {
        Some(name) if expected.starts_with(&name) => expected.to_owned(),
        Some(name) => name,
        None => "(gone)".to_owned(),
    };
    Ok(AttachmentStatus {
        hook: att.name(),
        interface: target,
        direction: match att.kind() {
            AttachKind::Tc(aya::programs::TcAttachType::Ingress) => "ingress",
            AttachKind::Tc(_) => "egress",
            AttachKind::Cgroup => "cgroup",
        },
        program,
        program_id,
        link_id: info.id(),
        attached,
    })
}

fn group_counters(totals: &[(Hook, Counter, CounterValue)]) -> Vec<HookCounters> {
    Hook::ALL
        .into_iter()
        .map(|hook| HookCounters {
            hook: hook.name(),
            counters: totals
                .iter()
                .filter(|(h, _, v)| *h == hook && v.packets != 0)
                .map(|(_, c, v)| NamedCounter {
                    name: c.name(),
                    kind: c.kind(),
                    packets: v.packets,
                    bytes: v.bytes,
                })
                .collect(),
        })
        .collect()
}

#[derive(Debug, Default, Serialize)]
pub struct UninstallReport {
    pub links_detached: usize,
    pub maps_removed: usize,
}

/// Detaches every pinned link and removes every pin and the pin dir itself.
/// Idempotent: a missing pin dir is reported as nothing to do.
pub fn uninstall(pin_dir: &Path) -> Result<UninstallReport> {
    let mut report = UninstallReport::default();
    if !pin_dir.exists() {
        return Ok(report);
    }
    let pins = PinDir::existing_owned(pin_dir)?;
    // Refuse to delete a directory that is not ours.
    pins.check_layout_for_removal()?;
    for (_, _, path) in pins.links()? {
        detach_pinned_link(&path)?;
        report.links_detached += 1;
    }
    // Every other pin in a netd pin dir is a map (of this or an older layout).
    for entry in std::fs::read_dir(pin_dir)? {
        let path = entry?.path();
        if path != pins.links_dir() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            report.maps_removed += 1;
        }
    }
    let links_dir = pins.links_dir();
    if links_dir.exists() {
        std::fs::remove_dir(&links_dir)
            .with_context(|| format!("removing {}", links_dir.display()))?;
    }
    std::fs::remove_dir(pin_dir).with_context(|| {
        format!(
            "removing {} (it holds objects netd did not create)",
            pin_dir.display()
        )
    })?;
    Ok(report)
}

/// One published port as the datapath holds it.
#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortStatus {
    pub proto: &'static str,
    pub host_addr: std::net::Ipv4Addr,
    pub host_port: u16,
    pub container_addr: std::net::Ipv4Addr,
    pub container_port: u16,
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        6 => "tcp",
        17 => "udp",
        132 => "sctp",
        _ => "other",
    }
}

/// The published ports pinned under `pin_dir`, sorted.
pub fn read_ports(pin_dir: &Path) -> Result<Vec<PortStatus>> {
    let pins = PinDir::existing(pin_dir)?;
    pins.check_layout()?;
    let path = pins.map(maps::PORTS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let ports: aya::maps::HashMap<MapData, PortKey, PortTarget> =
        aya::maps::HashMap::try_from(Map::HashMap(data))?;
    let mut out = Vec::new();
    for entry in ports.iter() {
        let (k, v) = entry?;
        out.push(PortStatus {
            proto: proto_name(k.proto),
            host_addr: k.addr.into(),
            host_port: u16::from_be_bytes(k.port),
            container_addr: v.addr.into(),
            container_port: u16::from_be_bytes(v.port),
        });
    }
    out.sort();
    Ok(out)
}

/// A container endpoint as the datapath holds it: what may send from a
/// host-side veth, and whether packets for its address are delivered there
/// directly.
#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointStatus {
    /// The host-side veth ("?" if the interface is gone).
    pub interface: String,
    pub ifindex: u32,
    pub addr: std::net::Ipv4Addr,
    pub mac: String,
    /// The Docker network's id prefix (as `docker network ls` shows it).
    pub network: String,
    /// The network's subnets.
    pub subnets: Vec<String>,
    /// Inbound packets for `addr` skip the bridge (bpf_redirect_peer).
    pub direct_delivery: bool,
}

fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The container endpoints pinned under `pin_dir`, sorted by interface.
pub fn read_endpoints(pin_dir: &Path) -> Result<Vec<EndpointStatus>> {
    use netd_common::{network::NETWORK_HOST_ADDR, Endpoint, EndpointLocation, NetworkInfo};
    let pins = PinDir::existing(pin_dir)?;
    pins.check_layout()?;
    let open = |name: &str| {
        let path = pins.map(name);
        MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
    };
    let endpoints: aya::maps::HashMap<MapData, u32, Endpoint> =
        aya::maps::HashMap::try_from(Map::HashMap(open(maps::ENDPOINTS)?))?;
    let addrs: aya::maps::HashMap<MapData, [u8; 4], EndpointLocation> =
        aya::maps::HashMap::try_from(Map::HashMap(open(maps::ENDPOINT_ADDRS)?))?;
    let networks: aya::maps::lpm_trie::LpmTrie<MapData, [u8; 4], NetworkInfo> =
        aya::maps::lpm_trie::LpmTrie::try_from(Map::LpmTrie(open(maps::NETWORKS)?))?;
    let mut subnets: Vec<(u32, String)> = Vec::new();
    for item in networks.iter() {
        let (key, info) = item?;
        if info.flags & NETWORK_HOST_ADDR == 0 {
            let net = std::net::Ipv4Addr::from(key.data());
            subnets.push((info.id, format!("{net}/{}", key.prefix_len())));
        }
    }
    subnets.sort();
    let mut out = Vec::new();
    for item in endpoints.iter() {
        let (ifindex, ep) = item?;
        let m = ep.mac;
        out.push(EndpointStatus {
            interface: interface_name(ifindex).unwrap_or_else(|| "?".into()),
            ifindex,
            addr: ep.addr.into(),
            mac: format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
            network: format!("{:08x}", ep.network),
            subnets: subnets
                .iter()
                .filter(|(id, _)| *id == ep.network)
                .map(|(_, s)| s.clone())
                .collect(),
            direct_delivery: addrs
                .get(&ep.addr, 0)
                .is_ok_and(|loc| loc.ifindex == ifindex),
        });
    }
    out.sort();
    Ok(out)
}

/// One direction of a NATed flow as the datapath holds it.
#[derive(Debug, Serialize)]
pub struct FlowStatus {
    pub proto: &'static str,
    pub src: String,
    pub dst: String,
    /// "dst", "src" or "none": which side this direction's packets get.
    pub rewrite: &'static str,
    /// The address:port put in place (empty for "none").
    pub to: String,
    /// "dnat" (published port), "hairpin" (a container reaching its own
    /// published port), "snat" (masquerade) or "routed".
    pub kind: &'static str,
    /// TCP: "syn", "established" or "closing"; other protocols: "-".
    pub state: &'static str,
    pub idle_secs: u64,
}

/// The NAT flow table pinned under `pin_dir`.
pub fn read_ct(pin_dir: &Path) -> Result<Vec<FlowStatus>> {
    use netd_common::nat::*;
    let pins = PinDir::existing(pin_dir)?;
    pins.check_layout()?;
    let path = pins.map(maps::NAT_CT);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let ct: aya::maps::HashMap<MapData, CtKey, CtEntry> =
        aya::maps::HashMap::try_from(Map::LruHashMap(data))?;
    let now = super::monotonic_now_ns();
    let endpoint = |addr: [u8; 4], port: [u8; 2]| {
        format!(
            "{}:{}",
            std::net::Ipv4Addr::from(addr),
            u16::from_be_bytes(port)
        )
    };
    let mut out = Vec::new();
    for item in ct.iter() {
        let (k, e) = item?;
        out.push(FlowStatus {
            proto: proto_name(k.proto),
            src: endpoint(k.src_addr, k.src_port),
            dst: endpoint(k.dst_addr, k.dst_port),
            rewrite: match e.rewrite {
                CT_REWRITE_DST => "dst",
                CT_REWRITE_SRC => "src",
                _ => "none",
            },
            to: if e.rewrite == CT_REWRITE_NONE {
                String::new()
            } else {
                endpoint(e.addr, e.port)
            },
            kind: if e.flags & CT_FLAG_HAIRPIN != 0 {
                "hairpin"
            } else if e.flags & CT_FLAG_SNAT != 0 {
                "snat"
            } else if e.flags & CT_FLAG_DNAT != 0 {
                "dnat"
            } else {
                "routed"
            },
            state: if k.proto != 6 {
                "-"
            } else if e.flags & (CT_FLAG_TCP_FIN | CT_FLAG_TCP_RST) != 0 {
                "closing"
            } else if e.flags & CT_FLAG_TCP_ACKED != 0 {
                "established"
            } else {
                "syn"
            },
            idle_secs: now.saturating_sub(e.last_seen_ns) / 1_000_000_000,
        });
    }
    out.sort_by(|a, b| (a.kind, &a.src, &a.dst).cmp(&(b.kind, &b.src, &b.dst)));
    Ok(out)
}

/// One entry of the overlay forwarding table: a container on this host or
/// another, as the datapath holds it.
#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerStatus {
    pub addr: std::net::Ipv4Addr,
    pub mac: String,
    /// netd's network id (the first 8 hex digits of its cluster id).
    pub network: String,
    pub vni: u32,
    /// The VTEP of the container's host (None: this host).
    pub vtep: Option<std::net::Ipv4Addr>,
    /// The host-side veth of a local container.
    pub interface: Option<String>,
    /// Another host's block of a routed network (`addr` is its first
    /// address, `vtep` the host it is routed to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<String>,
}

/// The overlay forwarding table from the pins: the local endpoints of
/// overlay networks, and every peer on other hosts.
pub fn read_peers(pin_dir: &Path) -> Result<Vec<PeerStatus>> {
    use netd_common::{Endpoint, OverlayNetwork, Peer};
    let pins = PinDir::existing(pin_dir)?;
    pins.check_layout()?;
    let open = |name: &str| {
        let path = pins.map(name);
        MapData::from_pin(&path).with_context(|| {
            format!(
                "opening pinned map {} (has a netd with --etcd run here?)",
                path.display()
            )
        })
    };
    let overlays: aya::maps::HashMap<MapData, u32, OverlayNetwork> =
        aya::maps::HashMap::try_from(Map::HashMap(open(maps::OVERLAYS)?))?;
    let vni_of = |id: u32| overlays.get(&id, 0).ok().map(|o| o.vni);
    let mut out = Vec::new();
    let endpoints: aya::maps::HashMap<MapData, u32, Endpoint> =
        aya::maps::HashMap::try_from(Map::HashMap(open(maps::ENDPOINTS)?))?;
    for item in endpoints.iter() {
        let (ifindex, ep) = item?;
        if let Some(vni) = vni_of(ep.network) {
            out.push(PeerStatus {
                addr: ep.addr.into(),
                mac: format_mac(ep.mac),
                network: format!("{:08x}", ep.network),
                vni,
                vtep: None,
                interface: Some(interface_name(ifindex).unwrap_or_else(|| "?".into())),
                block: None,
            });
        }
    }
    let peers: aya::maps::HashMap<MapData, [u8; 4], Peer> =
        aya::maps::HashMap::try_from(Map::HashMap(open(maps::PEERS)?))?;
    for item in peers.iter() {
        let (addr, peer) = item?;
        out.push(PeerStatus {
            addr: addr.into(),
            mac: format_mac(peer.mac),
            network: format!("{:08x}", peer.network),
            vni: vni_of(peer.network).unwrap_or(0),
            vtep: Some(peer.vtep.into()),
            interface: None,
            block: None,
        });
    }
    let blocks: aya::maps::LpmTrie<MapData, [u8; 4], netd_common::overlay::RoutedBlock> =
        aya::maps::LpmTrie::try_from(Map::LpmTrie(open(maps::ROUTED_BLOCKS)?))?;
    for key in blocks.keys() {
        let key = key?;
        let block = blocks.get(&key, 0)?;
        let addr = std::net::Ipv4Addr::from(key.data());
        out.push(PeerStatus {
            addr,
            mac: String::new(),
            network: format!("{:08x}", block.network),
            vni: 0,
            vtep: Some(block.host.into()),
            interface: None,
            block: Some(format!("{addr}/{}", key.prefix_len())),
        });
    }
    out.sort();
    Ok(out)
}

fn format_mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}
