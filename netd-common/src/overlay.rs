//! Overlay networks as the datapath sees them: a network's VNI and anycast
//! gateway, the containers of other hosts (peers) and the hosts themselves
//! (VTEPs).

/// UDP port of VXLAN (IANA, RFC 7348) unless `--vxlan-port` says otherwise.
pub const VXLAN_PORT: u16 = 4789;
/// What VXLAN over IPv4 adds in front of a frame: outer Ethernet 14, IPv4
/// 20, UDP 8, VXLAN 8. (An overlay container's MTU is the uplink's less
/// the 50 bytes of all but the outer Ethernet header.)
pub const VXLAN_ENCAP_LEN: usize = 50;

/// Value of `netd_overlays`, keyed by [`crate::NetworkInfo::id`]: overlay
/// networks, and routed networks (VNI 0: their traffic between hosts is
/// routed, not tunnelled).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OverlayNetwork {
    pub vni: u32,
    /// The anycast gateway every host answers for (ARP) and routes at.
    pub gateway: [u8; 4],
    pub gateway_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Value of `netd_peers`, keyed by a container address on another host.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The host's VTEP: where frames for the container are sent, and the
    /// only source its frames are accepted from.
    pub vtep: [u8; 4],
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// [`crate::NetworkInfo::id`] of its network.
    pub network: u32,
}

/// Value of `netd_routed_blocks` (LPM trie keyed by block): another host's
/// block of a routed network.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RoutedBlock {
    /// The host's address on the LAN: the next hop.
    pub host: [u8; 4],
    /// [`crate::NetworkInfo::id`] of its network.
    pub network: u32,
    /// The host's uplink MAC: packets from the block must come from it
    /// (all zero: not known, an older host; then by address alone).
    pub host_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Values of `netd_vteps`: a cluster host on this host's LAN, or one that
/// is not (reached through a router, or not at all): tunnels may reach it,
/// routed networks cannot.
pub const HOST_ON_LINK: u32 = 1;
pub const HOST_OFF_LINK: u32 = 2;

/// Slot 0 of `netd_tunnel`: this host's end of the tunnels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TunnelConfig {
    /// This host's VTEP (outer source; 0: no tunnels).
    pub vtep: [u8; 4],
    /// UDP port, network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Value of `netd_vtep_pmtu`: the path MTU to a host's VTEP that an
/// underlay router reported (ICMP "fragmentation needed" about a VXLAN
/// packet), and when (CLOCK_MONOTONIC ns). It ages out like a Linux PMTU
/// exception, so a path that grew back is used in full again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VtepPmtu {
    pub mtu: u32,
    pub _pad: u32,
    pub learned_ns: u64,
}

/// How long a reported path MTU holds: Linux's default mtu_expires.
pub const PMTU_EXPIRY_NS: u64 = 600 * 1_000_000_000;
/// The smallest path MTU believed: what carries the 576 bytes Linux's
/// tunnels tell a container at least, wrapped. A forged report cannot
/// shrink packets below it.
pub const PMTU_MIN: u32 = 576 + VXLAN_ENCAP_LEN as u32;
/// Source ports of netd's VXLAN (Linux vxlan's default range): reports
/// quoting another are not about netd's packets.
pub const VXLAN_SPORT_MIN: u32 = 32768;
pub const VXLAN_SPORT_MAX: u32 = 61000;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::OverlayNetwork {}
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::TunnelConfig {}
    unsafe impl aya::Pod for super::VtepPmtu {}
    unsafe impl aya::Pod for super::RoutedBlock {}
}
