//! Packet counters: one slot per (hook, counter) in a per-CPU array.
//!
//! Every packet a netd program sees ends in exactly one *verdict* counter
//! (pass, forward, drop…). Packets that are passed untouched or dropped also
//! bump one *reason* counter saying why, so `netd status` can answer "what
//! happened to my packets" without a packet capture.

/// Where a program is attached. Part of the counter index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress on the uplink: traffic arriving at the host.
    UplinkIngress = 0,
    /// TC egress on the uplink: traffic leaving the host.
    UplinkEgress = 1,
    /// TC ingress on a container's host-side veth: traffic leaving a container.
    ContainerEgress = 2,
    /// cgroup socket hooks: host processes connecting to published ports.
    /// Counts connect/sendmsg calls, not packets (bytes stay 0).
    HostSockets = 3,
    /// TC egress on a container's host-side veth: traffic about to enter a
    /// container.
    ContainerIngress = 4,
    /// TC ingress on the parent of a segment (macvlan) network: frames
    /// from its LAN for the containers' MACs.
    ParentIngress = 5,
    /// TC egress on such a parent: what the host sends its own containers.
    ParentEgress = 6,
}

impl Hook {
    pub const COUNT: u32 = 7;
    pub const ALL: [Hook; Self::COUNT as usize] = [
        Hook::UplinkIngress,
        Hook::UplinkEgress,
        Hook::ContainerEgress,
        Hook::HostSockets,
        Hook::ContainerIngress,
        Hook::ParentIngress,
        Hook::ParentEgress,
    ];

    /// The hooks that see packets (the socket hooks see calls).
    pub const PACKET: [Hook; 6] = [
        Hook::UplinkIngress,
        Hook::UplinkEgress,
        Hook::ContainerEgress,
        Hook::ContainerIngress,
        Hook::ParentIngress,
        Hook::ParentEgress,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Hook::UplinkIngress => "uplink-ingress",
            Hook::UplinkEgress => "uplink-egress",
            Hook::ContainerEgress => "container-egress",
            Hook::HostSockets => "host-sockets",
            Hook::ContainerIngress => "container-ingress",
            Hook::ParentIngress => "parent-ingress",
            Hook::ParentEgress => "parent-egress",
        }
    }
}

/// What happened to a packet, or why.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    // Verdicts: exactly one per packet.
    /// Left to the kernel's normal path, untouched.
    Pass = 0,
    /// Dropped by netd (a drop reason says why).
    Drop = 1,

    // Why a packet was passed untouched.
    /// Not IPv4 or IPv6 (ARP, LLDP…).
    NotIp = 2,
    /// IPv4 or IPv6 but no netd rule applies to it.
    NoMatch = 3,
    /// A non-first IP fragment: no L4 header to look at.
    Fragment = 4,

    // Malformed input: passed untouched (the kernel's own checks decide) and
    // counted, never rewritten.
    /// Frame shorter than the headers it announces.
    Truncated = 5,
    /// IPv4 header length or version field is invalid.
    BadIpHeader = 6,
    /// A VLAN tag on an interface netd does not run VLANs on.
    VlanTagged = 7,

    // Actions on packets that netd rewrote (the verdict is still pass: the
    // kernel routes the rewritten packet).
    /// Destination rewritten to a container (published port).
    Dnat = 8,
    /// Source of a reply rewritten back to the published address.
    RevDnat = 9,
    /// A new flow could not be recorded: the connection table is full.
    CtFull = 10,
    /// A kernel helper failed half-way through a rewrite; dropped rather
    /// than delivered wrong.
    RewriteFailed = 11,
    /// Source rewritten to the host address (masquerade).
    Snat = 12,
    /// Destination of a reply rewritten back to the masqueraded container.
    RevSnat = 13,
    /// No free source port for a new masqueraded flow: refused.
    SnatExhausted = 14,
    /// A container sent with a source MAC or IP that is not its own.
    Spoofed = 15,
    /// A container addressed another Docker network's container.
    Isolated = 16,
    /// An ICMP error about a NATed flow, translated (quoted header too).
    IcmpErrorNat = 17,
    /// From outside to a container address that is not published (its
    /// network is reachable only through published ports), or to/from an
    /// internal network.
    NotPublished = 18,
    /// Verdict: handed straight to the container (bpf_redirect_peer),
    /// skipping the host's routing and bridge.
    Redirect = 19,
    /// Already translated (and counted) by a container's veth program and
    /// sent straight to this interface; passed without another look.
    Translated = 20,
    /// From a veth on a Docker bridge netd serves whose endpoint (address,
    /// MAC, network) it does not know yet: dropped, so that no packet takes
    /// the kernel's path untranslated (a hairpin SYN would land in the
    /// socket dockerd holds on the published port). TCP and ARP retry;
    /// a lone UDP datagram or an unsolicited announcement is lost.
    UnknownEndpoint = 21,
    /// A VXLAN frame for a VNI no netd network has: dropped.
    UnknownVni = 22,
    /// A VXLAN frame from an address that is no cluster host's VTEP:
    /// dropped (Docker's unencrypted overlay accepts these).
    UnknownVtep = 23,
    /// For an overlay address no endpoint holds (here or on another host),
    /// or an ARP request for one: dropped, never flooded.
    NoEndpoint = 24,
    /// Would not fit the uplink's MTU once encapsulated: dropped.
    TooBig = 25,
    /// Broadcast or multicast from an overlay container: dropped, since
    /// netd switches by address and floods nothing (ARP is answered).
    Broadcast = 26,
    /// Encapsulated in VXLAN and sent to another host.
    VxlanEncap = 27,
    /// Decapsulated from VXLAN and handed to a container.
    VxlanDecap = 28,
    /// An overlay container's ARP request answered in place.
    ArpReply = 29,
    /// Handed from an overlay container to another on this host.
    Switched = 30,
    /// Several VXLAN packets merged into one (GRO, or a veth uplink passing
    /// a UDP-tunnel GSO packet whole): eBPF on this kernel cannot unwrap it
    /// without leaving its tunnel GSO state behind. Dropped; a NIC's
    /// packets off the wire never arrive so.
    VxlanAggregate = 31,
    /// An underlay router said a VXLAN packet to another host was too big
    /// (ICMP "fragmentation needed" to this host's VTEP): its path MTU is
    /// noted, and the report goes on to the kernel.
    PmtuLearned = 32,
    /// A container's packet did not fit the path to the peer's host: an
    /// ICMP "fragmentation needed" went back to the container, with the
    /// path MTU less the VXLAN overhead.
    FragNeeded = 33,
    /// Handed from a parent interface to the segment container whose MAC
    /// (or, for an ARP request, whose address) the frame is for.
    Demuxed = 34,
    /// Sent by a segment container out of its parent (with its network's
    /// VLAN tag, if any).
    SegmentOut = 35,
    /// From a segment container to its own host: handed to the parent's
    /// receive path, since a host never receives what leaves its own
    /// interface (kernel macvlan cannot do this).
    ToHost = 36,
    /// Routed to another host's block of a routed network (next hop: that
    /// host), or in from one to a container here: no encapsulation.
    Routed = 37,
    /// A broadcast or IPv4 multicast frame on a segment, copied into the
    /// containers of its parent and VLAN on this host (one count per frame;
    /// a container's own frame reaches only its network's neighbours).
    Flooded = 38,
    /// A routed packet's TTL ran out here: ICMP "time exceeded" went back
    /// to the container from its gateway (dropped instead when no error
    /// may be sent about it).
    TimeExceeded = 39,
}

impl Counter {
    pub const COUNT: u32 = 40;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Pass,
        Counter::Drop,
        Counter::NotIp,
        Counter::NoMatch,
        Counter::Fragment,
        Counter::Truncated,
        Counter::BadIpHeader,
        Counter::VlanTagged,
        Counter::Dnat,
        Counter::RevDnat,
        Counter::CtFull,
        Counter::RewriteFailed,
        Counter::Snat,
        Counter::RevSnat,
        Counter::SnatExhausted,
        Counter::Spoofed,
        Counter::Isolated,
        Counter::IcmpErrorNat,
        Counter::NotPublished,
        Counter::Redirect,
        Counter::Translated,
        Counter::UnknownEndpoint,
        Counter::UnknownVni,
        Counter::UnknownVtep,
        Counter::NoEndpoint,
        Counter::TooBig,
        Counter::Broadcast,
        Counter::VxlanEncap,
        Counter::VxlanDecap,
        Counter::ArpReply,
        Counter::Switched,
        Counter::VxlanAggregate,
        Counter::PmtuLearned,
        Counter::FragNeeded,
        Counter::Demuxed,
        Counter::SegmentOut,
        Counter::ToHost,
        Counter::Routed,
        Counter::Flooded,
        Counter::TimeExceeded,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Pass => "pass",
            Counter::Drop => "drop",
            Counter::NotIp => "not-ip",
            Counter::NoMatch => "no-match",
            Counter::Fragment => "fragment",
            Counter::Truncated => "truncated",
            Counter::BadIpHeader => "bad-ip-header",
            Counter::VlanTagged => "vlan-tagged",
            Counter::Dnat => "dnat",
            Counter::RevDnat => "rev-dnat",
            Counter::CtFull => "ct-full",
            Counter::RewriteFailed => "rewrite-failed",
            Counter::Snat => "snat",
            Counter::RevSnat => "rev-snat",
            Counter::SnatExhausted => "snat-exhausted",
            Counter::Spoofed => "spoofed",
            Counter::Isolated => "isolated",
            Counter::IcmpErrorNat => "icmp-error-nat",
            Counter::NotPublished => "not-published",
            Counter::Redirect => "redirect",
            Counter::Translated => "translated",
            Counter::UnknownEndpoint => "unknown-endpoint",
            Counter::UnknownVni => "unknown-vni",
            Counter::UnknownVtep => "unknown-vtep",
            Counter::NoEndpoint => "no-endpoint",
            Counter::TooBig => "too-big",
            Counter::Broadcast => "broadcast",
            Counter::VxlanEncap => "vxlan-encap",
            Counter::VxlanDecap => "vxlan-decap",
            Counter::ArpReply => "arp-reply",
            Counter::Switched => "switched",
            Counter::VxlanAggregate => "vxlan-aggregate",
            Counter::PmtuLearned => "pmtu-learned",
            Counter::FragNeeded => "frag-needed",
            Counter::Demuxed => "demuxed",
            Counter::SegmentOut => "segment-out",
            Counter::ToHost => "to-host",
            Counter::Routed => "routed",
            Counter::Flooded => "flooded",
            Counter::TimeExceeded => "time-exceeded",
        }
    }

    /// Verdicts partition packets; the other counters explain them.
    pub const fn is_verdict(self) -> bool {
        matches!(self, Counter::Pass | Counter::Drop | Counter::Redirect)
    }

    /// "verdict", "action" (a rewrite netd did) or "reason" (why a packet
    /// was left alone or dropped).
    pub const fn kind(self) -> &'static str {
        match self {
            Counter::Pass | Counter::Drop | Counter::Redirect => "verdict",
            Counter::Dnat
            | Counter::RevDnat
            | Counter::Snat
            | Counter::RevSnat
            | Counter::IcmpErrorNat
            | Counter::VxlanEncap
            | Counter::VxlanDecap
            | Counter::ArpReply
            | Counter::Switched
            | Counter::FragNeeded
            | Counter::Demuxed
            | Counter::SegmentOut
            | Counter::ToHost
            | Counter::Routed
            | Counter::Flooded
            | Counter::TimeExceeded => "action",
            _ => "reason",
        }
    }

    /// Index of this counter for `hook` in the counters array.
    pub const fn index(self, hook: Hook) -> u32 {
        hook as u32 * COUNTERS_PER_HOOK + self as u32
    }
}

/// Room per hook in the counters array, and hooks it has room for: more
/// than are defined, so that a new counter or hook is a new slot of the same
/// map and an upgraded daemon keeps the pinned counters (the map's shape
/// does not follow the enums).
pub const COUNTERS_PER_HOOK: u32 = 64;
pub const HOOK_ROOM: u32 = 16;
/// Number of slots in the counters array.
pub const COUNTER_SLOTS: u32 = HOOK_ROOM * COUNTERS_PER_HOOK;
const _: () = assert!(Counter::COUNT <= COUNTERS_PER_HOOK && Hook::COUNT <= HOOK_ROOM);

/// One counter slot (per CPU in the kernel; summed by userspace).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for CounterValue {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails to compile when a hook is added without updating this test, and
    /// fails when `Hook::ALL` misses one.
    #[test]
    fn every_hook_is_listed() {
        let position = |h: Hook| match h {
            Hook::UplinkIngress
            | Hook::UplinkEgress
            | Hook::ContainerEgress
            | Hook::HostSockets
            | Hook::ContainerIngress
            | Hook::ParentIngress
            | Hook::ParentEgress => h as usize,
        };
        for (i, h) in Hook::ALL.iter().enumerate() {
            assert_eq!(position(*h), i);
        }
        assert_eq!(Hook::ALL.len(), Hook::ParentEgress as usize + 1);
    }

    #[test]
    fn indices_are_unique_and_in_range() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for hook in Hook::ALL {
            for c in Counter::ALL {
                let i = c.index(hook) as usize;
                assert!(!seen[i], "duplicate index {i}");
                seen[i] = true;
            }
        }
        assert_eq!(
            seen.iter().filter(|s| **s).count(),
            (Hook::COUNT * Counter::COUNT) as usize
        );
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "Counter::ALL out of order at {}", c.name());
        }
    }
}
