//! Map definitions. Names are the pin file names (netd_common::maps); BTF map
//! definitions so that `bpftool map dump` prints field names.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use netd_common::overlay::{RoutedBlock, VtepPmtu};
use netd_common::segment::{
    BroadcastDomain, FloodList, Segment, SegmentAddr, SegmentMac, SegmentPort,
};
use netd_common::{
    counters::COUNTER_SLOTS,
    maps::{
        ENDPOINTS_MAX, NAT_CT_MAX, NETWORKS_MAX, OVERLAYS_MAX, PEERS_MAX, PORTS_MAX, SOCK_REV_MAX,
        VTEPS_MAX,
    },
    nat::{SockRevKey, SockRevValue},
    CounterValue, CtEntry, CtKey, Endpoint, EndpointLocation, Meta, NatConfig, NetworkInfo,
    OverlayNetwork, Peer, PortKey, PortTarget, TunnelConfig,
};

#[btf_map(name = "netd_counters")]
pub static COUNTERS: PerCpuArray<CounterValue, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

/// Written by the daemon only; the programs never read it. It lives in this
/// object so that it is created and pinned together with the other maps.
#[btf_map(name = "netd_meta")]
pub static META: Array<Meta, 1> = Array::new();

/// Published ports; written by the daemon.
#[btf_map(name = "netd_ports")]
pub static PORTS: HashMap<PortKey, PortTarget, { PORTS_MAX as usize }> = HashMap::new();

/// NATed flows, two entries per flow (one per direction). LRU: under
/// pressure the least recently used flows are evicted, never new ones refused
/// silently.
#[btf_map(name = "netd_nat_ct")]
pub static NAT_CT: LruHashMap<CtKey, CtEntry, { NAT_CT_MAX as usize }> = LruHashMap::new();

/// Reverse translation for host-local UDP sockets.
#[btf_map(name = "netd_sock_rev")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue, { SOCK_REV_MAX as usize }> =
    LruHashMap::new();

/// Datapath settings (slot 0); written by the daemon.
#[btf_map(name = "netd_config")]
pub static CONFIG: Array<NatConfig, 1> = Array::new();

/// Container subnets and their networks; written by the daemon.
#[btf_map(name = "netd_networks")]
pub static NETWORKS: LpmTrie<[u8; 4], NetworkInfo, { NETWORKS_MAX as usize }> = LpmTrie::new();

/// Where each container address lives (for direct delivery); written by
/// the daemon together with `netd_endpoints`.
#[btf_map(name = "netd_endpoint_addrs")]
pub static ENDPOINT_ADDRS: HashMap<[u8; 4], EndpointLocation, { ENDPOINTS_MAX as usize }> =
    HashMap::new();

/// Container endpoints by host-side veth ifindex; written by the daemon.
#[btf_map(name = "netd_endpoints")]
pub static ENDPOINTS: HashMap<u32, Endpoint, { ENDPOINTS_MAX as usize }> = HashMap::new();

/// Overlay networks by network id; written by the daemon.
#[btf_map(name = "netd_overlays")]
pub static OVERLAYS: HashMap<u32, OverlayNetwork, { OVERLAYS_MAX as usize }> = HashMap::new();

/// VNI → network id; written by the daemon.
#[btf_map(name = "netd_vnis")]
pub static VNIS: HashMap<u32, u32, { OVERLAYS_MAX as usize }> = HashMap::new();

/// Overlay containers on other hosts, by address; written by the daemon
/// from the cluster store.
#[btf_map(name = "netd_peers")]
pub static PEERS: HashMap<[u8; 4], Peer, { PEERS_MAX as usize }> = HashMap::new();

/// The cluster's hosts (VTEP addresses); written by the daemon.
#[btf_map(name = "netd_vteps")]
pub static VTEPS: HashMap<[u8; 4], u32, { VTEPS_MAX as usize }> = HashMap::new();

/// This host's tunnel end (slot 0); written by the daemon.
#[btf_map(name = "netd_tunnel")]
pub static TUNNEL: Array<TunnelConfig, 1> = Array::new();

/// Path MTUs to other hosts the underlay reported; written by the uplink
/// program, aged out by time (see `pmtu`). LRU: a flood of reports can
/// only push out older ones.
#[btf_map(name = "netd_vtep_pmtu")]
pub static VTEP_PMTU: LruHashMap<[u8; 4], VtepPmtu, { VTEPS_MAX as usize }> = LruHashMap::new();

/// Segment (macvlan) networks by network id: their parent and VLAN here;
/// written by the daemon.
#[btf_map(name = "netd_segments")]
pub static SEGMENTS: HashMap<u32, Segment, { OVERLAYS_MAX as usize }> = HashMap::new();

/// Segment containers on this host by (parent, VLAN, MAC); written by the
/// daemon.
#[btf_map(name = "netd_segment_macs")]
pub static SEGMENT_MACS: HashMap<SegmentMac, SegmentPort, { ENDPOINTS_MAX as usize }> =
    HashMap::new();

/// Segment containers on this host by (parent, VLAN, address); written by
/// the daemon.
#[btf_map(name = "netd_segment_addrs")]
pub static SEGMENT_ADDRS: HashMap<SegmentAddr, SegmentPort, { ENDPOINTS_MAX as usize }> =
    HashMap::new();

/// Segment containers on this host by broadcast domain (parent, VLAN), for
/// copies of broadcasts; written by the daemon.
#[btf_map(name = "netd_segment_floods")]
/// Not preallocated: a replaced list is freed only after the programs
/// reading it are done (RCU), where a preallocated element may be reused
/// by the next update while the copying loop still walks it.
pub static SEGMENT_FLOODS: HashMap<
    BroadcastDomain,
    FloodList,
    { OVERLAYS_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Other hosts' blocks of routed networks; written by the daemon.
#[btf_map(name = "netd_routed_blocks")]
pub static ROUTED_BLOCKS: LpmTrie<[u8; 4], RoutedBlock, { VTEPS_MAX as usize }> = LpmTrie::new();

/// The container network whose subnet holds `addr`, if any.
#[inline(always)]
pub fn network_of(addr: [u8; 4]) -> Option<NetworkInfo> {
    NETWORKS.get(&Key::new(32, addr)).copied()
}
