//! VXLAN (RFC 7348) without a tunnel device: frames of overlay containers
//! are wrapped on their veth and sent out of the uplink, and unwrapped on
//! the uplink and handed to the container.
//!
//! Room is made with `bpf_skb_adjust_room` at the MAC layer with the encap
//! flags, so the kernel records the inner headers and marks GSO packets as
//! UDP tunnel packets: a 64 KB TSO packet from a container leaves as one
//! and is segmented (with its inner checksums) wherever the device cannot.
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_CSUM_LEVEL_DEC, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    helpers::{
        bpf_csum_level, bpf_get_hash_recalc, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
    },
    programs::TcContext,
};
use netd_common::{
    overlay::{VXLAN_SPORT_MAX, VXLAN_SPORT_MIN},
    Counter, Peer,
};

use crate::{
    checksum::ipv4_header_checksum,
    delivery::{mark_translated, FibParams, FIB_LOOKUP_OUTPUT},
    maps::{network_of, CONFIG, ENDPOINT_ADDRS, PEERS, TUNNEL, VNIS, VTEPS},
    parsing::{ptr_at, ETH_HLEN, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP, PACKET_HOST},
    pmtu,
};

/// Outer IPv4 + UDP + VXLAN: what sits between the outer and the inner
/// Ethernet headers.
const OUTER_L3_LEN: usize = 20 + 8 + 8;
/// VXLAN flags: only I (a valid VNI) set; Linux drops anything else.
const VXLAN_FLAG_VNI: u8 = 0x08;
/// The inner frame's IPv4 header, in an encapsulated packet.
const INNER_L3: usize = ETH_HLEN + OUTER_L3_LEN + ETH_HLEN;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner MAC header's length.
const ENCAP_L2_ETH_LEN: u64 = (ETH_HLEN as u64) << 56;
/// Source ports Linux's vxlan picks from (its default range).
const SPORT_MIN: u32 = VXLAN_SPORT_MIN;
const SPORT_MAX: u32 = VXLAN_SPORT_MAX;

#[repr(C)]
#[derive(Clone, Copy)]
struct OuterHeaders {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    eth_type: [u8; 2],
    ip: [u8; 20],
    udp_sport: [u8; 2],
    udp_dport: [u8; 2],
    udp_len: [u8; 2],
    udp_csum: [u8; 2],
    vxlan: [u8; 8],
    /// The frame's own Ethernet header, moved behind the outer headers.
    inner_eth: [u8; 14],
}

/// Wraps the frame for `peer` (on another host) in VXLAN with `vni` and
/// sends it out of the interface the host routes the peer's VTEP by, or
/// says it does not fit the path there (see [`pmtu`]).
#[inline(always)]
pub fn encap(ctx: &TcContext, peer: &Peer, vni: u32) -> Result<Encap, Counter> {
    let tunnel = TUNNEL.get(0).ok_or(Counter::NoEndpoint)?;
    let uplink = CONFIG.get(0).map_or(0, |c| c.uplink_ifindex);
    if tunnel.vtep == [0; 4] || uplink == 0 {
        return Err(Counter::NoEndpoint);
    }
    let inner_eth: [u8; 14] = unsafe { *ptr_at::<[u8; 14]>(ctx, 0).ok_or(Counter::Truncated)? };
    // The frame less its Ethernet header, plus the outer IPv4, UDP, VXLAN
    // and inner Ethernet headers.
    let outer_ip_len = ctx.len() as usize + OUTER_L3_LEN;
    let skb = ctx.skb.skb;
    // An output lookup, as for the host's own packets (the outer source is
    // the host's address), constrained to the uplink.
    let mut fib = FibParams::new(uplink, tunnel.vtep, peer.vtep, IPPROTO_UDP);
    // Checked against the route's MTU by the lookup, and against what the
    // underlay reported: the packet's outer length, or a GSO packet's
    // segments'.
    // (None: a GSO packet whose segments netd cannot size; the helper then
    // checks the packet against the device's MTU itself.)
    let outer_len = match unsafe { (*skb).gso_size } {
        0 => Some(outer_ip_len),
        gso_size => segment_outer_len(ctx, gso_size as usize)?,
    };
    if let (Some(len), Some(path_mtu)) = (outer_len, pmtu::reported(&peer.vtep)) {
        if len > path_mtu as usize {
            return Ok(Encap::TooBig(path_mtu));
        }
    }
    fib.tot_len = outer_len.map_or(0, |len| len.min(0xffff) as u16);
    let resolved = match fib.lookup(ctx, FIB_LOOKUP_OUTPUT) {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        // The lookup left the route's MTU in place of the length.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Ok(Encap::TooBig(u32::from(fib.tot_len))),
        // No route to the VTEP.
        _ => return Err(Counter::NoEndpoint),
    };
    let hash = unsafe { bpf_get_hash_recalc(skb) };
    let flags = u64::from(
        BPF_F_ADJ_ROOM_FIXED_GSO
            | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
            | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
            | BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
    ) | ENCAP_L2_ETH_LEN;
    ctx.adjust_room((OUTER_L3_LEN + ETH_HLEN) as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Counter::RewriteFailed)?;
    // adjust_room at the MAC layer opened the room after the first 14
    // bytes: the frame's own Ethernet header is now at 50, the old one at 0
    // becomes the outer header.
    let ip_len = (outer_ip_len as u16).to_be_bytes();
    let mut ip = [
        0x45,
        0,
        ip_len[0],
        ip_len[1],
        0,
        0,
        0x40,
        0,
        64,
        IPPROTO_UDP,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    ip[12..16].copy_from_slice(&tunnel.vtep);
    ip[16..20].copy_from_slice(&peer.vtep);
    let csum = ipv4_header_checksum(&ip);
    ip[10] = csum[0];
    ip[11] = csum[1];
    let vni = vni.to_be_bytes();
    let headers = OuterHeaders {
        eth_dst: fib.dmac,
        eth_src: fib.smac,
        eth_type: ETH_P_IP.to_be_bytes(),
        ip,
        udp_sport: source_port(hash).to_be_bytes(),
        udp_dport: tunnel.port,
        udp_len: ((outer_ip_len - 20) as u16).to_be_bytes(),
        // Zero: no checksum, legal for UDP over IPv4 (RFC 7348 says
        // SHOULD be zero); the inner packet carries its own.
        udp_csum: [0; 2],
        vxlan: [VXLAN_FLAG_VNI, 0, 0, 0, vni[1], vni[2], vni[3], 0],
        inner_eth,
    };
    ctx.store(0, &headers, 0)
        .map_err(|_| Counter::RewriteFailed)?;
    mark_translated(ctx);
    let verdict = if resolved {
        unsafe { bpf_redirect(fib.ifindex, 0) }
    } else {
        // The kernel resolves the next hop and fills the MACs.
        unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) }
    };
    Ok(Encap::Sent(verdict as i32))
}

/// What became of a frame to wrap.
pub enum Encap {
    /// Wrapped and redirected: the TC verdict.
    Sent(i32),
    /// Too big for the path to the peer's host, whose MTU this is.
    TooBig(u32),
}

/// The outer IPv4 length of each segment of a GSO frame: the inner IPv4
/// and TCP/UDP headers repeat in front of every `gso_size` bytes.
#[inline(always)]
fn segment_outer_len(ctx: &TcContext, gso_size: usize) -> Result<Option<usize>, Counter> {
    // GSO_BY_FRAGS (SCTP): segments of any size.
    if gso_size == 0xffff {
        return Ok(None);
    }
    let vihl: u8 = unsafe { *ptr_at::<u8>(ctx, ETH_HLEN).ok_or(Counter::Truncated)? };
    let proto: u8 = unsafe { *ptr_at::<u8>(ctx, ETH_HLEN + 9).ok_or(Counter::Truncated)? };
    let ip_len = usize::from(vihl & 0x0f) * 4;
    let l4_len = match proto {
        IPPROTO_TCP => {
            let doff: u8 = unsafe {
                *ptr_at::<u8>(ctx, ETH_HLEN + (ip_len & 0x3c) + 12).ok_or(Counter::Truncated)?
            };
            usize::from(doff >> 4) * 4
        }
        IPPROTO_UDP => 8,
        _ => return Ok(None),
    };
    Ok(Some(gso_size + ip_len + l4_len + OUTER_L3_LEN + ETH_HLEN))
}

/// A flow's source port, as Linux's vxlan derives it from the flow hash:
/// spread over its range, so the underlay's ECMP and RSS see the flows.
#[inline(always)]
fn source_port(hash: u32) -> u16 {
    let hash = hash ^ (hash << 16);
    (((u64::from(hash) * u64::from(SPORT_MAX - SPORT_MIN)) >> 32) as u32 + SPORT_MIN) as u16
}

/// The outer headers' fields that say "VXLAN for this host".
#[repr(C)]
#[derive(Clone, Copy)]
struct OuterView {
    eth_type: [u8; 2],
    vihl: u8,
    _tos: u8,
    _tot_len: [u8; 2],
    _id: [u8; 2],
    frags: [u8; 2],
    _ttl: u8,
    proto: u8,
    _csum: [u8; 2],
    _src: [u8; 4],
    dst: [u8; 4],
    _sport: [u8; 2],
    dport: [u8; 2],
}

/// Whether the frame is VXLAN for this host: IPv4 without options or
/// fragmentation, UDP to the tunnel port at this host's VTEP. (A fragment
/// of a VXLAN packet is left to the kernel: it cannot be unwrapped whole.)
#[inline(always)]
pub fn is_ours(ctx: &TcContext) -> bool {
    let Some(tunnel) = TUNNEL.get(0) else {
        return false;
    };
    let Some(view) = ptr_at::<OuterView>(ctx, 12) else {
        return false;
    };
    let v = unsafe { *view };
    tunnel.vtep != [0; 4]
        && v.eth_type == ETH_P_IP.to_be_bytes()
        && v.vihl == 0x45
        && v.proto == IPPROTO_UDP
        && u16::from_be_bytes(v.frags) & 0x3fff == 0
        && v.dst == tunnel.vtep
        && v.dport == tunnel.port
}

/// Unwraps a VXLAN packet for this host and hands the frame to the
/// container it is for. Dropped with a reason: a VNI no network has, a
/// sender that is no cluster host, an inner source that is not a container
/// of that network on that host, a destination no container here holds.
#[inline(always)]
pub fn decap(ctx: &TcContext) -> Result<i32, Counter> {
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        return Err(Counter::VxlanAggregate);
    }
    // Headers up to the inner IPv4 addresses in the linear data: NICs that
    // split headers leave only the outer ones there.
    if ctx.data() + INNER_L3 + 20 > ctx.data_end() {
        ctx.pull_data((INNER_L3 + 20) as u32)
            .map_err(|_| Counter::Truncated)?;
    }
    let outer_src: [u8; 4] =
        unsafe { *ptr_at::<[u8; 4]>(ctx, ETH_HLEN + 12).ok_or(Counter::Truncated)? };
    let vxlan: [u8; 8] =
        unsafe { *ptr_at::<[u8; 8]>(ctx, ETH_HLEN + 28).ok_or(Counter::Truncated)? };
    if vxlan[0] != VXLAN_FLAG_VNI {
        return Err(Counter::UnknownVni);
    }
    let vni = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
    let network = unsafe { *VNIS.get_ptr(&vni).ok_or(Counter::UnknownVni)? };
    if VTEPS.get_ptr(&outer_src).is_none() {
        return Err(Counter::UnknownVtep);
    }
    let inner_type: [u8; 2] =
        unsafe { *ptr_at::<[u8; 2]>(ctx, INNER_L3 - 2).ok_or(Counter::Truncated)? };
    // Only IPv4 crosses hosts: ARP is answered on each host.
    if inner_type != ETH_P_IP.to_be_bytes() {
        return Err(Counter::NotIp);
    }
    let addrs: [[u8; 4]; 2] =
        unsafe { *ptr_at::<[[u8; 4]; 2]>(ctx, INNER_L3 + 12).ok_or(Counter::Truncated)? };
    let [src, dst] = addrs;
    // The sender must be a container of this network on the host it came
    // from: a host cannot speak for another host's containers.
    let peer = unsafe { *PEERS.get_ptr(&src).ok_or(Counter::Spoofed)? };
    if peer.network != network || peer.vtep != outer_src {
        return Err(Counter::Spoofed);
    }
    let loc = unsafe { *ENDPOINT_ADDRS.get_ptr(&dst).ok_or(Counter::NoEndpoint)? };
    if network_of(dst).map(|n| n.id) != Some(network) {
        return Err(Counter::NoEndpoint);
    }
    let inner_src_mac: [u8; 6] =
        unsafe { *ptr_at::<[u8; 6]>(ctx, ETH_HLEN + OUTER_L3_LEN + 6).ok_or(Counter::Truncated)? };
    ctx.adjust_room(
        -((OUTER_L3_LEN + ETH_HLEN) as i32),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    )
    .map_err(|_| Counter::RewriteFailed)?;
    // What is left: the outer Ethernet header, then the inner IPv4 packet.
    let macs: *mut [[u8; 6]; 2] = ptr_at(ctx, 0).ok_or(Counter::RewriteFailed)?;
    unsafe { *macs = [loc.mac, inner_src_mac] };
    ctx.change_type(PACKET_HOST)
        .map_err(|_| Counter::RewriteFailed)?;
    // A NIC's "checksum verified" was the outer UDP's: the inner one is
    // now to be checked (a no-op unless the skb says CHECKSUM_UNNECESSARY).
    unsafe { bpf_csum_level(ctx.skb.skb, u64::from(BPF_CSUM_LEVEL_DEC)) };
    Ok(unsafe { bpf_redirect_peer(loc.ifindex, 0) } as i32)
}
