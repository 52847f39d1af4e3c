//! ICMP errors netd itself sends back to a container, as the router it
//! stands in for would: "fragmentation needed" when a packet does not fit
//! the overlay's path (see `pmtu`), "time exceeded" when a routed packet's
//! TTL runs out here (see `routed`). The container's own packet is turned
//! into the error in place and handed back into the container.
use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_csum_diff, bpf_redirect_peer, bpf_skb_change_tail},
    programs::TcContext,
};
use netd_common::Counter;

use crate::{
    checksum::checksum_of,
    parsing::{ptr_at, ETH_HLEN, IPPROTO_ICMP, PACKET_HOST},
};

/// An error's ICMP type and code, in one word (a BPF call takes five
/// arguments at most).
pub type Kind = [u8; 2];
/// Destination unreachable, fragmentation needed (RFC 1191).
pub const FRAG_NEEDED: Kind = [3, 4];
/// Time exceeded in transit.
pub const TTL_EXCEEDED: Kind = [11, 0];

/// IPv4 "don't fragment", and the fragment offset's bits.
const IP_DF: u16 = 0x4000;
const IP_OFFSET: u16 = 0x1fff;

/// The new headers, written where the frame's Ethernet header was and in
/// the room opened behind it; the quote follows them.
#[repr(C)]
#[derive(Clone, Copy)]
struct ErrorHeaders {
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

/// What a refused error becomes: the packet is dropped, and why.
#[inline(always)]
fn refused(kind: Kind) -> Counter {
    if kind == FRAG_NEEDED {
        Counter::TooBig
    } else {
        Counter::TimeExceeded
    }
}

/// Turns the container's IPv4 packet on this veth into an ICMP error of
/// `kind` about it (`rest`: the header's last four bytes), from `from`
/// (0.0.0.0: from the address the packet was for, as Linux's vxlan does),
/// and hands it back to the container. Refused (`Err`, the packet dropped)
/// for a packet with IP options, a fragment past the first, an ICMP error
/// itself (Linux sends no error about an error), and for "fragmentation
/// needed" one without DF (netd cannot fragment). A BPF call of its own,
/// off the hot path: its stack comes on top of the veth program's, so it
/// keeps little.
#[inline(never)]
pub fn to_sender(
    ctx: &TcContext,
    kind: Kind,
    rest: [u8; 4],
    from: [u8; 4],
) -> Result<i32, Counter> {
    // A packet shorter than the quote (a bare ICMP echo, a small UDP
    // probe) is padded with zeros to it: the quoted header's length says
    // where the packet ended. The headers and the quote then in the
    // linear data (a zero-copy send may have left less there).
    let cut = (ETH_HLEN + QUOTE_LEN) as u32;
    if ctx.len() < cut && unsafe { bpf_skb_change_tail(ctx.skb.skb, cut, 0) } != 0 {
        return Err(refused(kind));
    }
    if ctx.data() + ETH_HLEN + QUOTE_LEN > ctx.data_end() {
        ctx.pull_data(cut).map_err(|_| refused(kind))?;
    }
    {
        let ip: *const [u8; 20] = ptr_at(ctx, ETH_HLEN).ok_or(refused(kind))?;
        // The quote must be there in full (its first byte is the L4 type).
        let l4: *const [u8; 20] = ptr_at(ctx, ETH_HLEN + 20).ok_or(refused(kind))?;
        let (vihl, frags, proto, l4_type) = unsafe {
            (
                (*ip)[0],
                u16::from_be_bytes([(*ip)[6], (*ip)[7]]),
                (*ip)[9],
                (*l4)[0],
            )
        };
        // Linux's ICMP error types: no error is sent about an error.
        let is_error = proto == IPPROTO_ICMP && matches!(l4_type, 3 | 4 | 5 | 11 | 12);
        let needs_df = kind == FRAG_NEEDED;
        if vihl != 0x45 || frags & IP_OFFSET != 0 || (needs_df && frags & IP_DF == 0) || is_error {
            return Err(refused(kind));
        }
    }
    // Cut to the quote, then open room for the new IPv4 and ICMP headers
    // after the Ethernet header (a GSO packet stops being one here). The
    // frame's own Ethernet header stays at 0 and its IPv4 header is now
    // the quote's start: nothing needs keeping across the two calls.
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
    let h: *mut ErrorHeaders = ptr_at(ctx, 0).ok_or(Counter::RewriteFailed)?;
    let tot_len = ((20 + 8 + QUOTE_LEN) as u16).to_be_bytes();
    unsafe {
        let q = &*quote;
        let src = [q[12], q[13], q[14], q[15]];
        let reporter = if from == [0; 4] {
            [q[16], q[17], q[18], q[19]]
        } else {
            from
        };
        let word = |b: [u8; 2]| u32::from(u16::from_ne_bytes(b));
        let ip_sum = word([0x45, 0])
            + word(tot_len)
            + word([64, IPPROTO_ICMP])
            + word([src[0], src[1]])
            + word([src[2], src[3]])
            + word([reporter[0], reporter[1]])
            + word([reporter[2], reporter[3]]);
        let icmp_sum = u64::from(word(kind) + word([rest[0], rest[1]]) + word([rest[2], rest[3]]))
            + u64::from(quote_sum);
        let icmp_sum = (icmp_sum & 0xffff_ffff) + (icmp_sum >> 32);
        let icmp_sum = ((icmp_sum & 0xffff_ffff) + (icmp_sum >> 32)) as u32;
        // Back to the sender, from the MAC its packet was for: the
        // container takes it as from its peer or its gateway.
        let (to, via) = ((*h).eth_src, (*h).eth_dst);
        (*h).eth_dst = to;
        (*h).eth_src = via;
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
            reporter[0],
            reporter[1],
            reporter[2],
            reporter[3],
            src[0],
            src[1],
            src[2],
            src[3],
        ];
        let csum = checksum_of(icmp_sum);
        (*h).icmp = [
            kind[0], kind[1], csum[0], csum[1], rest[0], rest[1], rest[2], rest[3],
        ];
    }
    // The frame came to the gateway's or a peer's MAC (PACKET_OTHERHOST for
    // the host veth); the reply is for the container's own.
    ctx.change_type(PACKET_HOST)
        .map_err(|_| Counter::RewriteFailed)?;
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect_peer(ifindex, 0) } as i32)
}
