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

/// What a connection-table entry rewrites in packets matching its key.
pub const CT_REWRITE_DST: u8 = 0;
pub const CT_REWRITE_SRC: u8 = 1;
/// Leave the packet as it is: a flow routed to a container from outside
/// without NAT. Recorded (as Linux conntrack does) so that the container's
/// replies are not masqueraded.
pub const CT_REWRITE_NONE: u8 = 2;

/// The flow was created for a published port (DNAT).
pub const CT_FLAG_DNAT: u8 = 1 << 0;
/// The flow was created by masquerade (SNAT).
pub const CT_FLAG_SNAT: u8 = 1 << 1;
/// The flow was routed to a container without translation.
pub const CT_FLAG_ROUTED: u8 = 1 << 2;
/// TCP: a segment with ACK passed in this entry's direction (the handshake
/// got past the SYN).
pub const CT_FLAG_TCP_ACKED: u8 = 1 << 3;
/// TCP: a FIN passed in this entry's direction.
pub const CT_FLAG_TCP_FIN: u8 = 1 << 4;
/// TCP: an RST passed in this entry's direction.
pub const CT_FLAG_TCP_RST: u8 = 1 << 5;
/// A container reaching its own published port (with `CT_FLAG_DNAT`). Both
/// ends of such a flow are the same container, so each direction rewrites
/// both addresses: the request gets the published address as its source
/// (the container would drop a packet from itself), the reply gets the
/// container's address back as its destination. Ports other than the
/// rewritten one stay.
pub const CT_FLAG_HAIRPIN: u8 = 1 << 6;

/// How long an idle flow lives, by state (seconds). Defaults follow Cilium
/// (see shared/design.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    pub tcp_syn: u64,
    pub tcp_established: u64,
    pub tcp_closing: u64,
    pub other: u64,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self {
            tcp_syn: 60,
            tcp_established: 8000,
            tcp_closing: 10,
            other: 60,
        }
    }
}

impl CtTimeouts {
    /// Timeout of a flow whose two directions' entries carry `a` and `b`.
    /// TCP is closing after an RST either way or a FIN both ways (a
    /// half-closed connection stays established), and established once both
    /// directions carried an ACK (a SYN-ACK alone does not make it so).
    pub fn for_flow(&self, proto: u8, a: u8, b: u8) -> u64 {
        if proto != 6 {
            self.other
        } else if (a | b) & CT_FLAG_TCP_RST != 0 || a & b & CT_FLAG_TCP_FIN != 0 {
            self.tcp_closing
        } else if a & b & CT_FLAG_TCP_ACKED != 0 {
            self.tcp_established
        } else {
            self.tcp_syn
        }
    }
}

impl CtKey {
    /// The key of the other direction of the flow `self` → `entry` belongs
    /// to: the packet as rewritten, seen from the other end.
    pub fn reverse_of(&self, entry: &CtEntry) -> CtKey {
        let (mut src, mut dst, mut sport, mut dport) =
            (self.src_addr, self.dst_addr, self.src_port, self.dst_port);
        let hairpin = entry.flags & CT_FLAG_HAIRPIN != 0;
        match entry.rewrite {
            CT_REWRITE_DST => {
                if hairpin {
                    src = self.dst_addr;
                }
                dst = entry.addr;
                dport = entry.port;
            }
            CT_REWRITE_SRC => {
                if hairpin {
                    dst = self.src_addr;
                }
                src = entry.addr;
                sport = entry.port;
            }
            _ => {}
        }
        CtKey {
            src_addr: dst,
            dst_addr: src,
            src_port: dport,
            dst_port: sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// A NATed flow. Each flow has two entries, one per direction, keyed by the
/// 5-tuple packets carry in that direction; each says which address and
/// port to put in the packet. For ICMP echo the "port" is the echo id: a
/// request's key has it as source port, a reply's as destination port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    /// CT_REWRITE_DST or CT_REWRITE_SRC.
    pub rewrite: u8,
    /// CT_FLAG_*.
    pub flags: u8,
    /// CLOCK_MONOTONIC (coarse) of the last packet, for garbage collection.
    pub last_seen_ns: u64,
}

// The datapath overwrites an entry's first 8 bytes (the translation) and
// its timestamp as two aligned 8-byte stores.
const _: () = assert!(core::mem::size_of::<CtEntry>() == 16);
const _: () = assert!(core::mem::align_of::<CtEntry>() == 8);
const _: () = assert!(core::mem::offset_of!(CtEntry, last_seen_ns) == 8);

/// Datapath settings written by the daemon, slot 0 of `netd_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatConfig {
    /// The address masqueraded traffic leaves with (0.0.0.0: masquerade off).
    pub host_addr: [u8; 4],
    /// Range for source ports when the original one is taken (host order).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// The uplink's ifindex: traffic the FIB routes there may be sent
    /// straight out (0: no fast path).
    pub uplink_ifindex: u32,
    pub _pad: u32,
    /// Cookie of the network namespace this netd serves (SO_NETNS_COOKIE).
    /// The socket hooks are attached to a cgroup shared with other
    /// namespaces; they act only on sockets of this one. 0: off.
    pub netns_cookie: u64,
}

/// A host socket's translated destination, so that replies read by
/// recvmsg() show the address the application sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// bpf_get_socket_cookie() of the socket.
    pub cookie: u64,
    /// The container address and port the socket really talks to.
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// The published address and port the application used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::PortTarget {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::NatConfig {}
    unsafe impl aya::Pod for super::SockRevKey {}
    unsafe impl aya::Pod for super::SockRevValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> CtKey {
        CtKey {
            src_addr: src,
            dst_addr: dst,
            src_port: sport.to_be_bytes(),
            dst_port: dport.to_be_bytes(),
            proto: 6,
            _pad: [0; 3],
        }
    }

    fn entry(addr: [u8; 4], port: u16, rewrite: u8, flags: u8) -> CtEntry {
        CtEntry {
            addr,
            port: port.to_be_bytes(),
            rewrite,
            flags,
            last_seen_ns: 0,
        }
    }

    const CLIENT: [u8; 4] = [198, 18, 0, 100];
    const HOST: [u8; 4] = [198, 18, 0, 1];
    const C: [u8; 4] = [198, 19, 0, 2];

    #[test]
    fn each_direction_of_a_published_port_flow_names_the_other() {
        let forward = key(CLIENT, 40000, HOST, 8080);
        let to_c = entry(C, 80, CT_REWRITE_DST, CT_FLAG_DNAT);
        let reply = forward.reverse_of(&to_c);
        assert_eq!(reply, key(C, 80, CLIENT, 40000));
        let back = entry(HOST, 8080, CT_REWRITE_SRC, CT_FLAG_DNAT);
        assert_eq!(reply.reverse_of(&back), forward);
    }

    #[test]
    fn a_container_reaching_its_own_port_is_answered_from_the_published_address() {
        let flags = CT_FLAG_DNAT | CT_FLAG_HAIRPIN;
        let forward = key(C, 40000, HOST, 8080);
        let reply = forward.reverse_of(&entry(C, 80, CT_REWRITE_DST, flags));
        assert_eq!(reply, key(C, 80, HOST, 40000));
        let back = entry(HOST, 8080, CT_REWRITE_SRC, flags);
        assert_eq!(reply.reverse_of(&back), forward);
    }
}
