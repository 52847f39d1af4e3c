//! Networks on a physical segment: containers on a parent interface's LAN,
//! optionally in an 802.1Q VLAN, with MACs of their own (macvlan mode,
//! demultiplexed by destination MAC) or sharing the parent's (ipvlan L2
//! mode, demultiplexed by destination IPv4 address), in eBPF instead of by
//! macvlan or ipvlan devices.

/// Key of `netd_segment_macs`: a container's MAC on a parent interface
/// and VLAN (0: untagged). Twelve bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SegmentMac {
    /// ifindex of the parent interface.
    pub parent: u32,
    /// VLAN id (1-4094), 0 for untagged.
    pub vlan: u16,
    pub mac: [u8; 6],
}

/// Key of `netd_segment_addrs`: a container's IPv4 address on a parent
/// interface and VLAN. Twelve bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SegmentAddr {
    pub parent: u32,
    pub vlan: u16,
    pub _pad: u16,
    pub addr: [u8; 4],
}

/// Value of `netd_segment_macs` and `netd_segment_addrs`: which container
/// holds the MAC or address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SegmentPort {
    /// ifindex of the container's host-side veth.
    pub ifindex: u32,
    /// [`crate::NetworkInfo::id`] of its network.
    pub network: u32,
    /// SEGMENT_* flags of its network.
    pub flags: u32,
}

/// Value of `netd_segments`, keyed by [`crate::NetworkInfo::id`]: where a
/// segment network's containers send from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Segment {
    /// ifindex of the parent interface on this host.
    pub parent: u32,
    /// VLAN id, 0 for untagged.
    pub vlan: u16,
    /// The parent's own MAC: frames a container sends to it are for this
    /// host (or, in ipvlan mode, for a neighbour container), which never
    /// receives what leaves its own interface.
    pub parent_mac: [u8; 6],
    /// SEGMENT_* flags.
    pub flags: u32,
}

/// Key of `netd_segment_floods`: a parent interface and VLAN (0:
/// untagged), the broadcast domain containers of several networks may
/// share. Eight bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BroadcastDomain {
    pub parent: u32,
    pub vlan: u16,
    pub _pad: u16,
}

/// Most containers on one host's part of a broadcast domain that a
/// broadcast is copied into: the copying loop is bounded for the verifier.
pub const FLOOD_MAX: usize = 64;

/// One container in a [`FloodList`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FloodPort {
    /// ifindex of the container's host-side veth.
    pub ifindex: u32,
    /// [`crate::NetworkInfo::id`] of its network: a container's own
    /// broadcasts reach only its network's neighbours.
    pub network: u32,
}

/// Value of `netd_segment_floods`: the containers on this host a
/// broadcast or IPv4 multicast frame of the domain is copied into.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloodList {
    /// How many of `ports` are in use (at most [`FLOOD_MAX`]).
    pub count: u32,
    /// The parent's own MAC: a frame from it (or from a container's MAC)
    /// on the parent's ingress is a copy a container's program made for
    /// the host, never one from the LAN to flood.
    pub parent_mac: [u8; 6],
    pub _pad: [u8; 2],
    pub ports: [FloodPort; FLOOD_MAX],
}

impl Default for FloodList {
    fn default() -> Self {
        Self {
            count: 0,
            parent_mac: [0; 6],
            _pad: [0; 2],
            ports: [FloodPort::default(); FLOOD_MAX],
        }
    }
}

/// Segment flag: the network's containers share the parent's MAC (ipvlan
/// L2): frames for them are told apart by destination address.
pub const SEGMENT_SHARED_MAC: u32 = 1;

/// Highest 802.1Q VLAN id (0 and 4095 are reserved).
pub const VLAN_MAX: u16 = 4094;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::SegmentMac {}
    unsafe impl aya::Pod for super::SegmentPort {}
    unsafe impl aya::Pod for super::SegmentAddr {}
    unsafe impl aya::Pod for super::Segment {}
    unsafe impl aya::Pod for super::BroadcastDomain {}
    unsafe impl aya::Pod for super::FloodList {}
}
