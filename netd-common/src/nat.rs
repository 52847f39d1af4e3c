//! Published ports and the NAT connection table.
//!
//! Addresses and ports are stored in network byte order, as they appear in
//! the packet, so the datapath compares and copies without swapping.

/// A published port as it is reached from outside: a host address (one of
/// the uplink's; "any" publishes are expanded by the daemon), a port and an
/// IP protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

/// Where a published port leads: the container's address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortTarget {
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// A flow as seen in one direction: the packet's own 5-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Which rewrite a connection-table entry asks for.
pub const CT_DIR_ORIGINAL: u8 = 0;
/// Replies: the source goes back to the published address and port.
pub const CT_DIR_REPLY: u8 = 1;

/// A NATed flow. Each flow has two entries, one per direction, each saying
/// how packets matching its key are rewritten.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// Original direction: the new destination. Reply: the new source.
    pub addr: [u8; 4],
    pub port: [u8; 2],
    /// CT_DIR_ORIGINAL or CT_DIR_REPLY.
    pub direction: u8,
    pub _pad: u8,
    /// bpf_ktime_get_ns() of the last packet, for garbage collection.
    pub last_seen_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::PortTarget {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
}
