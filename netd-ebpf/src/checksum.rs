//! In-place rewrites of IPv4 addresses and L4 ports with incremental
//! checksum updates (the kernel helpers also keep skb->csum right for
//! CHECKSUM_COMPLETE packets).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use crate::parsing::{ptr_at, IPPROTO_ICMP, IPPROTO_UDP, IPV4_CSUM};

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

/// Failure of a direct write: the packet is shorter than the field.
const SHORT: i64 = -1;

/// Folds a 32-bit one's complement sum into 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The one's complement sum of `bytes` (an even count) as 16-bit words.
#[inline(always)]
pub fn sum_words(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_ne_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// The Internet checksum of data whose words sum to `sum`, as stored.
#[inline(always)]
pub fn checksum_of(sum: u32) -> [u8; 2] {
    (!fold(sum)).to_ne_bytes()
}

/// The checksum of a 20-byte IPv4 header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header_checksum(header: &[u8; 20]) -> [u8; 2] {
    checksum_of(sum_words(header))
}

/// The Internet checksum `check` once the 16-bit words `old` became `new`
/// (RFC 1624, eqn. 3). Every value as stored in the packet: the one's
/// complement sum does not depend on byte order.
#[inline(always)]
fn csum_replace(check: [u8; 2], old: &[[u8; 2]], new: &[[u8; 2]]) -> [u8; 2] {
    let mut sum = u32::from(!u16::from_ne_bytes(check));
    for w in old {
        sum += u32::from(!u16::from_ne_bytes(*w));
    }
    for w in new {
        sum += u32::from(u16::from_ne_bytes(*w));
    }
    (!fold(sum)).to_ne_bytes()
}

#[inline(always)]
fn halves(a: [u8; 4]) -> [[u8; 2]; 2] {
    [[a[0], a[1]], [a[2], a[3]]]
}

/// Sets the 16-bit word of the IPv4 header at `l3 + offset` and the header
/// checksum, written directly: the IP header checksum is never left to
/// offload, and the sum over the header is unchanged (skb->csum stays right).
#[inline(always)]
pub fn set_ipv4_word(ctx: &TcContext, l3: usize, offset: usize, new: [u8; 2]) -> Result<(), i64> {
    let word: *mut [u8; 2] = ptr_at(ctx, l3 + offset).ok_or(SHORT)?;
    let csum: *mut [u8; 2] = ptr_at(ctx, l3 + IPV4_CSUM).ok_or(SHORT)?;
    // SAFETY: both pointers were bounds-checked against the packet.
    unsafe {
        *csum = csum_replace(*csum, &[*word], &[new]);
        *word = new;
    }
    Ok(())
}

/// Replaces the 4-byte IPv4 address at `offset` (source or destination),
/// fixing the L4 pseudo-header checksum (by the kernel helper, which knows
/// whether the L4 checksum is left to offload) and the IP header checksum.
#[inline(always)]
pub fn set_ipv4_addr(
    ctx: &TcContext,
    offs: &L4Offsets,
    offset: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), i64> {
    if offs.has_pseudo_header() {
        ctx.l4_csum_replace(
            offs.l4_csum,
            u64::from(u32::from_ne_bytes(old)),
            u64::from(u32::from_ne_bytes(new)),
            u64::from(BPF_F_PSEUDO_HDR) | offs.l4_flags() | 4,
        )?;
    }
    let addr: *mut [u8; 4] = ptr_at(ctx, offset).ok_or(SHORT)?;
    let csum: *mut [u8; 2] = ptr_at(ctx, offs.ip_csum).ok_or(SHORT)?;
    // SAFETY: both pointers were bounds-checked against the packet.
    unsafe {
        *csum = csum_replace(*csum, &halves(old), &halves(new));
        *addr = new;
    }
    Ok(())
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
    let port: *mut [u8; 2] = ptr_at(ctx, offset).ok_or(SHORT)?;
    // SAFETY: bounds-checked against the packet.
    unsafe { *port = new };
    Ok(())
}
