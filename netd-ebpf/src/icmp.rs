//! ICMP errors about NATed flows (destination unreachable — fragmentation
//! needed included —, time exceeded, parameter problem). The error quotes
//! the offending packet as it was on the wire; for it to reach the right
//! host and mean something there, both the outer header and the quoted
//! header are translated, as Linux's conntrack does. Without this, path MTU
//! discovery through netd would break.
use aya_ebpf::programs::TcContext;
use netd_common::{
    nat::{CT_REWRITE_DST, CT_REWRITE_SRC},
    Counter, CtKey,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    maps::NAT_CT,
    parsing::{
        echo_ports, ptr_at, Frame, Ip, ICMP_CSUM, ICMP_ECHO_ID, IPPROTO_ICMP, IPPROTO_TCP,
        IPPROTO_UDP, IPV4_CSUM, IPV4_DST, IPV4_SRC, TCP_CSUM, UDP_CSUM,
    },
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_HEADER: usize = 8;
/// bpf_l4_csum_replace: leave a zero checksum (UDP: none) alone, and write
/// a computed zero as 0xffff.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Which way the error crosses the translation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Arriving on the uplink: about a packet the host sent out translated.
    Ingress,
    /// Leaving by the uplink, or entering a container that reached a
    /// published port through the host (hairpin): about a packet the host
    /// delivered translated.
    Egress,
}

/// The quoted packet of an ICMP error.
struct Quote {
    l3: usize,
    src: [u8; 4],
    dst: [u8; 4],
    /// As a flow key would hold them (ICMP echo: the id on one side).
    src_port: [u8; 2],
    dst_port: [u8; 2],
    src_port_offset: usize,
    dst_port_offset: usize,
    proto: u8,
    /// The quoted L4 checksum, when the quote holds it (UDP's and ICMP
    /// echo's always do; TCP's only when its whole header is quoted). It is
    /// kept consistent with the rewritten quote, as Linux's NAT keeps it.
    l4_csum: Option<QuotedCsum>,
}

#[derive(Clone, Copy)]
struct QuotedCsum {
    offset: usize,
    /// TCP/UDP: covers the addresses through the pseudo-header.
    pseudo_header: bool,
    /// UDP: 0 means "no checksum" and must stay 0.
    zero_is_none: bool,
}

impl QuotedCsum {
    /// Flags for `replace_quoted_csum` with `size` bytes changed.
    fn flags(&self, size: u64) -> u64 {
        if self.zero_is_none {
            size | BPF_F_MARK_MANGLED_0
        } else {
            size
        }
    }
}

/// Translates an ICMP error about a NATed flow. `Ok(None)`: not an ICMP
/// error, or not about a NATed flow. `Ok(Some(c))`: passed, translated or
/// (with a reason) left alone. `Err`: a rewrite failed half-way: drop.
#[inline(always)]
pub fn translate_error(
    ctx: &TcContext,
    frame: &Frame,
    side: Side,
) -> Result<Option<Counter>, Counter> {
    let (l4, quote) = match read_error(ctx, frame) {
        Ok(Some(error)) => error,
        Ok(None) => return Ok(None),
        Err(reason) => return Ok(Some(reason)),
    };
    let Some(entry) = NAT_CT.get_ptr(&quote.flow_key()) else {
        return Ok(None);
    };
    let (addr, port, rewrite) = unsafe { ((*entry).addr, (*entry).port, (*entry).rewrite) };
    let icmp_csum = l4 + ICMP_CSUM;
    let outer = frame.l3_offset;
    match side {
        Side::Ingress if rewrite == CT_REWRITE_DST => {
            // To the host about (host → peer): to the container about
            // (container → peer).
            set_outer_addr(ctx, outer, IPV4_DST, quote.src, addr)?;
            set_quoted_addr(ctx, icmp_csum, &quote, IPV4_SRC, quote.src, addr)?;
            set_quoted_port(
                ctx,
                icmp_csum,
                &quote,
                quote.src_port_offset,
                quote.src_port,
                port,
            )?;
            Ok(Some(Counter::IcmpErrorNat))
        }
        Side::Egress if rewrite == CT_REWRITE_SRC => {
            // From the container about (peer → container): from the host
            // about (peer → host).
            set_outer_addr(ctx, outer, IPV4_SRC, quote.dst, addr)?;
            set_quoted_addr(ctx, icmp_csum, &quote, IPV4_DST, quote.dst, addr)?;
            set_quoted_port(
                ctx,
                icmp_csum,
                &quote,
                quote.dst_port_offset,
                quote.dst_port,
                port,
            )?;
            Ok(Some(Counter::IcmpErrorNat))
        }
        _ => Ok(None),
    }
}

impl Quote {
    /// The quoted packet went the other way: its reverse is the flow key.
    #[inline(always)]
    fn flow_key(&self) -> CtKey {
        CtKey {
            src_addr: self.dst,
            dst_addr: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Whether `frame` is an ICMP error about a flow in the NAT table: it
/// belongs to that flow (a container may answer a hairpin client on another
/// network with one, as it may answer with data).
#[inline(always)]
pub fn is_error_about_nat_flow(ctx: &TcContext, frame: &Frame) -> bool {
    match read_error(ctx, frame) {
        Ok(Some((_, quote))) => NAT_CT.get_ptr(&quote.flow_key()).is_some(),
        _ => false,
    }
}

/// An ICMP error (of the kinds that quote a packet) and its ICMP header's
/// offset. `Ok(None)`: not one; `Err`: one too malformed to read.
#[inline(always)]
fn read_error(ctx: &TcContext, frame: &Frame) -> Result<Option<(usize, Quote)>, Counter> {
    let Ip::V4 {
        l4_offset: l4,
        proto: IPPROTO_ICMP,
        later_fragment: false,
    } = frame.ip
    else {
        return Ok(None);
    };
    let head: *const [u8; 2] = ptr_at(ctx, l4).ok_or(Counter::Truncated)?;
    if !matches!(
        unsafe { (*head)[0] },
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) {
        return Ok(None);
    }
    Ok(read_quote(ctx, l4 + ICMP_HEADER)?.map(|quote| (l4, quote)))
}

#[inline(always)]
fn read_quote(ctx: &TcContext, l3: usize) -> Result<Option<Quote>, Counter> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(Counter::Truncated)?;
    let (vihl, proto, src, dst) =
        unsafe { ((*ip).vihl, (*ip).proto, (*ip).src_addr, (*ip).dst_addr) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Counter::BadIpHeader);
    }
    let l4 = l3 + ihl;
    // RFC 792 quotes at least 8 bytes of the L4 header: the ports, or the
    // echo id.
    let p: *const [u8; 8] = ptr_at(ctx, l4).ok_or(Counter::Truncated)?;
    let p = unsafe { *p };
    let mut q = Quote {
        l3,
        src,
        dst,
        src_port: [p[0], p[1]],
        dst_port: [p[2], p[3]],
        src_port_offset: l4,
        dst_port_offset: l4 + 2,
        proto,
        l4_csum: None,
    };
    match proto {
        IPPROTO_TCP => {
            if ptr_at::<[u8; 2]>(ctx, l4 + TCP_CSUM).is_some() {
                q.l4_csum = Some(QuotedCsum {
                    offset: l4 + TCP_CSUM,
                    pseudo_header: true,
                    zero_is_none: false,
                });
            }
        }
        IPPROTO_UDP => {
            q.l4_csum = Some(QuotedCsum {
                offset: l4 + UDP_CSUM,
                pseudo_header: true,
                zero_is_none: true,
            })
        }
        IPPROTO_ICMP => {
            q.l4_csum = Some(QuotedCsum {
                offset: l4 + ICMP_CSUM,
                pseudo_header: false,
                zero_is_none: false,
            });
            let id = [p[4], p[5]];
            q.src_port_offset = l4 + ICMP_ECHO_ID;
            q.dst_port_offset = l4 + ICMP_ECHO_ID;
            let Some((src, dst)) = echo_ports(p[0], id) else {
                return Ok(None);
            };
            (q.src_port, q.dst_port) = (src, dst);
        }
        _ => return Ok(None),
    }
    Ok(Some(q))
}

/// The outer header's address (only if it is the translated one: an error
/// the host itself generated already carries the right address).
#[inline(always)]
fn set_outer_addr(
    ctx: &TcContext,
    l3: usize,
    field: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), Counter> {
    let cur: [u8; 4] = ctx.load(l3 + field).map_err(|_| Counter::RewriteFailed)?;
    if cur != old {
        return Ok(());
    }
    let (from, to) = (
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
    );
    // ICMPv4 has no pseudo-header: only the IP header checksum moves.
    ctx.l3_csum_replace(l3 + IPV4_CSUM, from, to, 4)
        .and_then(|_| ctx.store(l3 + field, &new, 0))
        .map_err(|_| Counter::RewriteFailed)
}

/// A checksum field inside the quote moves from `from` to `to` (`size`
/// bytes, BPF_F_* flags): the ICMP checksum, which covers that field, follows.
#[inline(always)]
fn replace_quoted_csum(
    ctx: &TcContext,
    icmp_csum: usize,
    field: usize,
    from: u64,
    to: u64,
    flags: u64,
) -> Result<(), Counter> {
    let before: [u8; 2] = ctx.load(field).map_err(|_| Counter::RewriteFailed)?;
    if flags & BPF_F_MARK_MANGLED_0 != 0 {
        ctx.l4_csum_replace(field, from, to, flags)
    } else {
        ctx.l3_csum_replace(field, from, to, flags)
    }
    .map_err(|_| Counter::RewriteFailed)?;
    let after: [u8; 2] = ctx.load(field).map_err(|_| Counter::RewriteFailed)?;
    ctx.l4_csum_replace(
        icmp_csum,
        u64::from(u16::from_ne_bytes(before)),
        u64::from(u16::from_ne_bytes(after)),
        2,
    )
    .map_err(|_| Counter::RewriteFailed)
}

/// A quoted address: the quoted IP header checksum, the quoted TCP/UDP
/// checksum (its pseudo-header holds the address) and the ICMP checksum (which
/// covers the quote, those checksum fields included) follow.
#[inline(always)]
fn set_quoted_addr(
    ctx: &TcContext,
    icmp_csum: usize,
    quote: &Quote,
    field: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), Counter> {
    let (from, to) = (
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
    );
    replace_quoted_csum(ctx, icmp_csum, quote.l3 + IPV4_CSUM, from, to, 4)?;
    if let Some(c) = quote.l4_csum.filter(|c| c.pseudo_header) {
        replace_quoted_csum(ctx, icmp_csum, c.offset, from, to, c.flags(4))?;
    }
    ctx.l4_csum_replace(icmp_csum, from, to, 4)
        .and_then(|_| ctx.store(quote.l3 + field, &new, 0))
        .map_err(|_| Counter::RewriteFailed)
}

/// A quoted port (or echo id), and the quoted L4 checksum with it when the
/// quote holds it.
#[inline(always)]
fn set_quoted_port(
    ctx: &TcContext,
    icmp_csum: usize,
    quote: &Quote,
    offset: usize,
    old: [u8; 2],
    new: [u8; 2],
) -> Result<(), Counter> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (
        u64::from(u16::from_ne_bytes(old)),
        u64::from(u16::from_ne_bytes(new)),
    );
    if let Some(c) = quote.l4_csum {
        replace_quoted_csum(ctx, icmp_csum, c.offset, from, to, c.flags(2))?;
    }
    ctx.l4_csum_replace(icmp_csum, from, to, 2)
        .and_then(|_| ctx.store(offset, &new, 0))
        .map_err(|_| Counter::RewriteFailed)
}
