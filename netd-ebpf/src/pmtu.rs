//! Path MTU discovery across the overlay. A container's MTU leaves room for
//! the 50 bytes of VXLAN on the local uplink, but the path to another host
//! may be smaller: a route with an MTU of its own, or an underlay router
//! with a smaller link. The outer header has DF set, so such a router
//! answers the host's VTEP with ICMP "fragmentation needed", which the
//! kernel cannot use (no socket sent it). netd notes that path MTU per
//! VTEP, and a container packet that does not fit the path (by the route's
//! MTU or the noted one) gets "fragmentation needed" back from netd, with
//! the path MTU less 50, as Linux's own vxlan does for bridged traffic. The
//! container's kernel lowers its PMTU and resends smaller.
use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_csum_diff, bpf_ktime_get_coarse_ns, bpf_redirect_peer, bpf_skb_change_tail},
    programs::TcContext,
};
use netd_common::{
    overlay::{
        VtepPmtu, PMTU_EXPIRY_NS, PMTU_MIN, VXLAN_ENCAP_LEN, VXLAN_SPORT_MAX, VXLAN_SPORT_MIN,
    },
    Counter,
};

use crate::{
    checksum::checksum_of,
    maps::{TUNNEL, VTEPS, VTEP_PMTU},
    parsing::{ptr_at, ETH_HLEN, ETH_P_IP, IPPROTO_ICMP, IPPROTO_UDP, PACKET_HOST},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// IPv4 "don't fragment".
const IP_DF: u16 = 0x4000;
/// The smallest MTU told to a container, as Linux's tunnels do.
const INNER_MTU_MIN: u32 = 576;

/// What a "fragmentation needed" about a VXLAN packet of this host looks
/// like from the EtherType on: outer IPv4, ICMP, the quoted outer IPv4 and
/// UDP headers of the packet that did not fit.
#[repr(C)]
#[derive(Clone, Copy)]
struct UnderlayReport {
    eth_type: [u8; 2],
    ip: [u8; 20],
    icmp: [u8; 8],
    quoted_ip: [u8; 20],
    quoted_udp: [u8; 8],
}

/// Notes the path MTU an underlay router reported for a VXLAN packet this
/// host sent to another cluster host. False: not such a report (it goes on
/// as any other packet).
#[inline(always)]
pub fn learn(ctx: &TcContext) -> bool {
    // Cheap checks first: this runs on every uplink packet that is not
    // VXLAN.
    let Some(report) = ptr_at::<UnderlayReport>(ctx, 12) else {
        return false;
    };
    let r = unsafe { *report };
    if r.eth_type != ETH_P_IP.to_be_bytes()
        || r.ip[9] != IPPROTO_ICMP
        || r.icmp[0] != ICMP_DEST_UNREACH
        || r.icmp[1] != ICMP_FRAG_NEEDED
    {
        return false;
    }
    let Some(tunnel) = TUNNEL.get(0) else {
        return false;
    };
    let quoted_dst = [
        r.quoted_ip[16],
        r.quoted_ip[17],
        r.quoted_ip[18],
        r.quoted_ip[19],
    ];
    let mtu = u32::from(u16::from_be_bytes([r.icmp[6], r.icmp[7]]));
    let quoted_len = u32::from(u16::from_be_bytes([r.quoted_ip[2], r.quoted_ip[3]]));
    let sport = u32::from(u16::from_be_bytes([r.quoted_udp[0], r.quoted_udp[1]]));
    // About a VXLAN packet of this host's, as netd sends them (no options,
    // a source port from netd's range), that was bigger than the MTU the
    // router says it has: anything else is not believed. 0 is a router
    // from before RFC 1191, which says no size.
    let ours = tunnel.vtep != [0; 4]
        && r.ip[0] == 0x45
        && r.ip[16..20] == tunnel.vtep
        && r.quoted_ip[0] == 0x45
        && r.quoted_ip[9] == IPPROTO_UDP
        && r.quoted_ip[12..16] == tunnel.vtep
        && r.quoted_udp[2..4] == tunnel.port
        && (VXLAN_SPORT_MIN..VXLAN_SPORT_MAX).contains(&sport)
        && mtu != 0
        && quoted_len > mtu;
    // Only paths to cluster hosts are noted: nobody can fill the map with
    // addresses of their choosing.
    if !ours || VTEPS.get_ptr(&quoted_dst).is_none() {
        return false;
    }
    // A path only shrinks while its entry holds; it grows back when the
    // entry ages out (RFC 1191).
    let mtu = mtu.max(PMTU_MIN);
    if reported(&quoted_dst).is_some_and(|known| known <= mtu) {
        return true;
    }
    let entry = VtepPmtu {
        mtu,
        _pad: 0,
        learned_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    let _ = VTEP_PMTU.insert(&quoted_dst, &entry, 0);
    true
}

/// The path MTU an underlay reported for `vtep`, while it holds.
#[inline(always)]
pub fn reported(vtep: &[u8; 4]) -> Option<u32> {
    let entry = unsafe { *VTEP_PMTU.get_ptr(vtep)? };
    let age = unsafe { bpf_ktime_get_coarse_ns() }.wrapping_sub(entry.learned_ns);
    if age > PMTU_EXPIRY_NS {
        let _ = VTEP_PMTU.remove(vtep);
        return None;
    }
    Some(entry.mtu)
}

/// The new headers, written where the frame's Ethernet header was and in
/// the room opened behind it; the quote follows them.
#[repr(C)]
#[derive(Clone, Copy)]
struct FragNeededHeaders {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    eth_type: [u8; 2],
    ip: [u8; 20],
    icmp: [u8; 8],
}

/// Where the quote (the offending IPv4 header and 20 bytes after it) sits
/// once the room is open. 20, not the least RFC 792 asks (8): the kernel
/// will not cut a packet whose checksum is left to offload (a container's
/// TCP) short of its checksum field, at 16 into the TCP header.
const QUOTE_AT: usize = ETH_HLEN + 20 + 8;
const QUOTE_LEN: usize = 20 + 20;

/// Turns the container's packet on this veth into ICMP "fragmentation
/// needed" (next-hop MTU: the path's less the VXLAN overhead) and hands it
/// back to the container. A packet without DF, with IP options, or itself
/// an ICMP error is dropped as too big instead (Linux sends no error about
/// an error, and netd cannot fragment). A BPF call of its own, off the hot
/// path: its stack comes on top of the veth program's, so it keeps little.
#[inline(never)]
pub fn frag_needed(ctx: &TcContext, path_mtu: u32) -> Result<i32, Counter> {
    // The headers and the quote in the linear data (a zero-copy send may
    // have left less there).
    if ctx.data() + ETH_HLEN + QUOTE_LEN > ctx.data_end() {
        ctx.pull_data((ETH_HLEN + QUOTE_LEN) as u32)
            .map_err(|_| Counter::TooBig)?;
    }
    {
        let ip: *const [u8; 20] = ptr_at(ctx, ETH_HLEN).ok_or(Counter::TooBig)?;
        // The quote must be there in full (its first byte is the L4 type).
        let l4: *const [u8; 20] = ptr_at(ctx, ETH_HLEN + 20).ok_or(Counter::TooBig)?;
        let (vihl, frags, proto, kind) = unsafe {
            (
                (*ip)[0],
                u16::from_be_bytes([(*ip)[6], (*ip)[7]]),
                (*ip)[9],
                (*l4)[0],
            )
        };
        // Linux's ICMP error types: no error is sent about an error.
        let is_error = proto == IPPROTO_ICMP && matches!(kind, 3 | 4 | 5 | 11 | 12);
        if vihl != 0x45 || frags & IP_DF == 0 || is_error {
            return Err(Counter::TooBig);
        }
    }
    // Never below 576, as Linux's tunnels: a container clamps a smaller
    // one to its min_pmtu and sends without DF, which netd cannot carry.
    let inner_mtu = path_mtu
        .saturating_sub(VXLAN_ENCAP_LEN as u32)
        .clamp(INNER_MTU_MIN, 0xffff) as u16;
    // Cut to the quote, then open room for the new IPv4 and ICMP headers
    // after the Ethernet header (a GSO packet stops being one here). The
    // frame's own Ethernet header stays at 0 and its IPv4 header is now
    // the quote's start: nothing needs keeping across the two calls.
    let cut = (ETH_HLEN + QUOTE_LEN) as u32;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, cut, 0) } != 0 {
        return Err(Counter::RewriteFailed);
    }
    ctx.adjust_room(28, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| Counter::RewriteFailed)?;
    let quote: *mut [u8; QUOTE_LEN] = ptr_at(ctx, QUOTE_AT).ok_or(Counter::RewriteFailed)?;
    // Summed by the kernel (csum_partial), in place.
    let quote_sum =
        unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, quote.cast(), QUOTE_LEN as u32, 0) }
            as u32;
    let h: *mut FragNeededHeaders = ptr_at(ctx, 0).ok_or(Counter::RewriteFailed)?;
    let tot_len = ((20 + 8 + QUOTE_LEN) as u16).to_be_bytes();
    let mtu = inner_mtu.to_be_bytes();
    unsafe {
        let q = &*quote;
        let (src, dst) = ([q[12], q[13], q[14], q[15]], [q[16], q[17], q[18], q[19]]);
        let word = |b: [u8; 2]| u32::from(u16::from_ne_bytes(b));
        let ip_sum = word([0x45, 0])
            + word(tot_len)
            + word([64, IPPROTO_ICMP])
            + word([src[0], src[1]])
            + word([src[2], src[3]])
            + word([dst[0], dst[1]])
            + word([dst[2], dst[3]]);
        let icmp_sum = u64::from(word([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED]) + word(mtu))
            + u64::from(quote_sum);
        let icmp_sum = (icmp_sum & 0xffff_ffff) + (icmp_sum >> 32);
        let icmp_sum = ((icmp_sum & 0xffff_ffff) + (icmp_sum >> 32)) as u32;
        // Back to the sender, from the peer and address its packet was for
        // (as Linux's vxlan does): the container takes it as from its peer.
        let (to, from) = ((*h).eth_src, (*h).eth_dst);
        (*h).eth_dst = to;
        (*h).eth_src = from;
        let csum = checksum_of(ip_sum);
        (*h).ip = [
            0x45,
            0,
            tot_len[0],
            tot_len[1],
            0,
            0,
            0,
            0,
            64,
            IPPROTO_ICMP,
            csum[0],
            csum[1],
            dst[0],
            dst[1],
            dst[2],
            dst[3],
            src[0],
            src[1],
            src[2],
            src[3],
        ];
        let csum = checksum_of(icmp_sum);
        (*h).icmp = [
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            csum[0],
            csum[1],
            0,
            0,
            mtu[0],
            mtu[1],
        ];
    }
    // The frame came to the gateway's or a peer's MAC (PACKET_OTHERHOST for
    // the host veth); the reply is for the container's own.
    ctx.change_type(PACKET_HOST)
        .map_err(|_| Counter::RewriteFailed)?;
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect_peer(ifindex, 0) } as i32)
}
