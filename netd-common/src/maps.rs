//! Map names (they are also the pin file names under the pin dir) and the
//! layout version stamp.

/// Per-CPU array of [`crate::CounterValue`], indexed by [`crate::Counter::index`].
pub const COUNTERS: &str = "netd_counters";
/// One-slot array holding [`Meta`]: says which netd layout owns a pin dir.
pub const META: &str = "netd_meta";
/// Hash of [`crate::PortKey`] → [`crate::PortTarget`]: published ports.
pub const PORTS: &str = "netd_ports";
/// LRU hash of [`crate::CtKey`] → [`crate::CtEntry`]: NATed flows.
pub const NAT_CT: &str = "netd_nat_ct";

/// One-slot array holding [`crate::nat::NatConfig`].
pub const CONFIG: &str = "netd_config";
/// LPM trie of container subnets (key: prefix length + IPv4 address) →
/// [`crate::NetworkInfo`].
pub const NETWORKS: &str = "netd_networks";
/// Hash of host-side veth ifindex → [`crate::Endpoint`].
pub const ENDPOINTS: &str = "netd_endpoints";
/// Hash of container IPv4 address → [`crate::EndpointLocation`].
pub const ENDPOINT_ADDRS: &str = "netd_endpoint_addrs";

/// Hash of network id → [`crate::OverlayNetwork`].
pub const OVERLAYS: &str = "netd_overlays";
/// Hash of VNI → network id: which network a VXLAN frame is for.
pub const VNIS: &str = "netd_vnis";
/// Hash of container IPv4 address → [`crate::Peer`]: containers on other
/// hosts.
pub const PEERS: &str = "netd_peers";
/// Hash of IPv4 address → 1: the cluster's hosts (VTEPs) frames are
/// accepted from.
pub const VTEPS: &str = "netd_vteps";
/// One-slot array holding [`crate::TunnelConfig`].
pub const TUNNEL: &str = "netd_tunnel";
/// LRU hash of VTEP address → [`crate::overlay::VtepPmtu`]: path MTUs to
/// other hosts that the underlay reported.
pub const VTEP_PMTU: &str = "netd_vtep_pmtu";
/// Hash of network id → [`crate::Segment`]: parent and VLAN of segment
/// (macvlan) networks on this host.
pub const SEGMENTS: &str = "netd_segments";
/// Hash of [`crate::SegmentMac`] → [`crate::SegmentPort`]: the containers
/// of segment networks on this host, by parent, VLAN and MAC.
pub const SEGMENT_MACS: &str = "netd_segment_macs";
/// Hash of [`crate::segment::SegmentAddr`] → [`crate::SegmentPort`]: the
/// containers of segment networks on this host, by parent, VLAN and
/// address (ipvlan demux, and ARP for any segment container).
pub const SEGMENT_ADDRS: &str = "netd_segment_addrs";
/// Hash of [`crate::segment::BroadcastDomain`] →
/// [`crate::segment::FloodList`]: the segment containers on this host that
/// a broadcast on a parent and VLAN is copied into.
pub const SEGMENT_FLOODS: &str = "netd_segment_floods";
/// LPM trie of other hosts' blocks of routed networks →
/// [`crate::overlay::RoutedBlock`].
pub const ROUTED_BLOCKS: &str = "netd_routed_blocks";

/// LRU hash of [`crate::nat::SockRevKey`] → [`crate::nat::SockRevValue`]:
/// reverse translation for host-local UDP.
pub const SOCK_REV: &str = "netd_sock_rev";

/// Default capacities (overridable at load time).
pub const PORTS_MAX: u32 = 65_536;
pub const NAT_CT_MAX: u32 = 262_144;
pub const NETWORKS_MAX: u32 = 1024;
pub const SOCK_REV_MAX: u32 = 65_536;
pub const ENDPOINTS_MAX: u32 = 16_384;
pub const OVERLAYS_MAX: u32 = 1024;
pub const PEERS_MAX: u32 = 65_536;
pub const VTEPS_MAX: u32 = 4096;

/// Every map netd pins, in the order `netd status` lists them.
pub const ALL: &[&str] = &[
    META,
    COUNTERS,
    CONFIG,
    NETWORKS,
    ENDPOINTS,
    ENDPOINT_ADDRS,
    PORTS,
    NAT_CT,
    SOCK_REV,
    OVERLAYS,
    VNIS,
    PEERS,
    VTEPS,
    TUNNEL,
    VTEP_PMTU,
    SEGMENTS,
    SEGMENT_MACS,
    SEGMENT_ADDRS,
    SEGMENT_FLOODS,
    ROUTED_BLOCKS,
];

/// Bumped whenever a pinned map's key/value layout or meaning changes. A
/// daemon refuses to adopt a pin dir stamped with another version instead of
/// misreading its maps. New maps and counters are not a change: a newer
/// daemon creates the maps an older one's pin dir lacks.
pub const LAYOUT_VERSION: u32 = 12;
/// "netd" in ASCII: tells a netd meta map from anything else pinned there.
pub const META_MAGIC: u32 = 0x6e65_7464;

/// The value stored in [`META`] slot 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub magic: u32,
    pub layout_version: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Meta {}
