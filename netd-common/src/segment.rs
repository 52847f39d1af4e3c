//! Networks on a physical segment (macvlan mode): containers with MACs of
//! their own on a parent interface's LAN, optionally in an 802.1Q VLAN,
//! demultiplexed by destination MAC in eBPF instead of by a macvlan device.

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

/// Value of `netd_segment_macs`: which container holds the MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SegmentPort {
    /// ifindex of the container's host-side veth.
    pub ifindex: u32,
    /// [`crate::NetworkInfo::id`] of its network.
    pub network: u32,
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
    /// host, which never receives what leaves its own interface.
    pub parent_mac: [u8; 6],
}

/// Highest 802.1Q VLAN id (0 and 4095 are reserved).
pub const VLAN_MAX: u16 = 4094;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::SegmentMac {}
    unsafe impl aya::Pod for super::SegmentPort {}
    unsafe impl aya::Pod for super::Segment {}
}
