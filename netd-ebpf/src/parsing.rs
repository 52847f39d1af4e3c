//! Header parsing with the bounds checks the verifier wants. Parsing never
//! writes; it returns the offsets and fields the other modules act on, or the
//! counter that says why the packet cannot be acted on.
use aya_ebpf::programs::TcContext;
use netd_common::Counter;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// Returns a pointer to a `T` at `offset` in the linear packet data, or
/// `None` when the packet is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The IP layer of a parsed frame. The offsets and protocol are what the
/// NAT and conntrack paths act on.
#[derive(Clone, Copy)]
#[allow(dead_code)]
pub enum Ip {
    V4 {
        /// Offset of the L4 header (after IPv4 options).
        l4_offset: usize,
        proto: u8,
        /// Set for every fragment but the first: there is no L4 header.
        later_fragment: bool,
    },
    V6 {
        l4_offset: usize,
        next_header: u8,
    },
}

/// Offsets of an Ethernet + IP frame.
#[derive(Clone, Copy)]
#[allow(dead_code)]
pub struct Frame {
    pub l3_offset: usize,
    pub ip: Ip,
}

/// Parses Ethernet and IP. `Err` carries the pass reason for frames netd
/// leaves alone: non-IP, VLAN-tagged, truncated or malformed IP headers.
#[inline(always)]
pub fn parse_frame(ctx: &TcContext) -> Result<Frame, Counter> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Counter::Truncated)?;
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let l3_offset = EthHdr::LEN;
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, l3_offset),
        ETH_P_IPV6 => parse_ipv6(ctx, l3_offset),
        ETH_P_8021Q | ETH_P_8021AD => Err(Counter::VlanTagged),
        _ => Err(Counter::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, l3_offset: usize) -> Result<Frame, Counter> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_offset).ok_or(Counter::Truncated)?;
    let (vihl, tot_len, frags, proto) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).tot_len),
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
        )
    };
    let header_len = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || usize::from(tot_len) < header_len {
        return Err(Counter::BadIpHeader);
    }
    // The whole header, options included, must be in the frame.
    if ctx.data() + l3_offset + header_len > ctx.data_end() {
        return Err(Counter::Truncated);
    }
    Ok(Frame {
        l3_offset,
        ip: Ip::V4 {
            l4_offset: l3_offset + header_len,
            proto,
            later_fragment: frags & 0x1fff != 0,
        },
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, l3_offset: usize) -> Result<Frame, Counter> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3_offset).ok_or(Counter::Truncated)?;
    let (vcf0, next_header) = unsafe { ((*ip).vcf[0], (*ip).next_hdr) };
    if vcf0 >> 4 != 6 {
        return Err(Counter::BadIpHeader);
    }
    Ok(Frame {
        l3_offset,
        ip: Ip::V6 {
            l4_offset: l3_offset + Ipv6Hdr::LEN,
            next_header,
        },
    })
}
