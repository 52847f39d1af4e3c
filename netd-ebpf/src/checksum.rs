//! In-place rewrites of IPv4 addresses and L4 ports with incremental
//! checksum updates (the kernel helpers also keep skb->csum right for
//! CHECKSUM_COMPLETE packets).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use crate::parsing::{IPPROTO_ICMP, IPPROTO_UDP};

/// Offsets inside an IPv4 + TCP/UDP/ICMP packet that a rewrite touches.
#[derive(Clone, Copy)]
pub struct L4Offsets {
    pub ip_csum: usize,
    pub l4_csum: usize,
    pub proto: u8,
}

impl L4Offsets {
    fn l4_flags(&self) -> u64 {
        // A UDP checksum of 0 means "none": leave it so.
        if self.proto == IPPROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        }
    }

    /// ICMPv4's checksum covers no pseudo-header: addresses do not enter it.
    fn has_pseudo_header(&self) -> bool {
        self.proto != IPPROTO_ICMP
    }
}

/// Replaces the 4-byte IPv4 address at `offset` (source or destination),
/// fixing the IP header checksum and the L4 pseudo-header checksum.
#[inline(always)]
pub fn set_ipv4_addr(
    ctx: &TcContext,
    offs: &L4Offsets,
    offset: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), i64> {
    let (from, to) = (
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
    );
    if offs.has_pseudo_header() {
        ctx.l4_csum_replace(
            offs.l4_csum,
            from,
            to,
            u64::from(BPF_F_PSEUDO_HDR) | offs.l4_flags() | 4,
        )?;
    }
    ctx.l3_csum_replace(offs.ip_csum, from, to, 4)?;
    ctx.store(offset, &new, 0)
}

/// Replaces the 2-byte port at `offset`, fixing the L4 checksum.
#[inline(always)]
pub fn set_port(
    ctx: &TcContext,
    offs: &L4Offsets,
    offset: usize,
    old: [u8; 2],
    new: [u8; 2],
) -> Result<(), i64> {
    let (from, to) = (
        u64::from(u16::from_ne_bytes(old)),
        u64::from(u16::from_ne_bytes(new)),
    );
    ctx.l4_csum_replace(offs.l4_csum, from, to, offs.l4_flags() | 2)?;
    ctx.store(offset, &new, 0)
}
