//! Header parsing with the bounds checks the verifier wants. Parsing never
//! writes; it returns the offsets and fields the other modules act on, or the
//! counter that says why the packet cannot be acted on.
use aya_ebpf::programs::TcContext;
use netd_common::Counter;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

/// Ethernet header length: where L3 starts on every hook netd uses.
pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// `skb->pkt_type` for frames to this interface's own MAC: what a frame
/// handed to a container must say, whatever MAC it arrived for.
pub const PACKET_HOST: u32 = 0;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Offsets of fields in an IPv4 header and TCP/UDP header.
pub const IPV4_CSUM: usize = 10;
pub const IPV4_SRC: usize = 12;
pub const IPV4_DST: usize = 16;
pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;
pub const ICMP_CSUM: usize = 2;
pub const ICMP_ECHO_ID: usize = 4;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// An ICMP echo's id in the place a flow key holds ports: the source side
/// for a request, the destination side for a reply. `None` for other types.
#[inline(always)]
pub fn echo_ports(kind: u8, id: [u8; 2]) -> Option<([u8; 2], [u8; 2])> {
    match kind {
        ICMP_ECHO_REQUEST => Some((id, [0, 0])),
        ICMP_ECHO_REPLY => Some(([0, 0], id)),
        _ => None,
    }
}

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

/// The IP layer of a parsed frame.
#[derive(Clone, Copy)]
pub enum Ip {
    V4 {
        /// Offset of the L4 header (after IPv4 options).
        l4_offset: usize,
        proto: u8,
        /// Set for every fragment but the first: there is no L4 header.
        later_fragment: bool,
    },
    /// IPv6 is parsed for classification; NAT for it is not built yet.
    V6,
}

/// Offsets of an Ethernet + IP frame.
#[derive(Clone, Copy)]
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
    if unsafe { (*ip).vcf[0] } >> 4 != 6 {
        return Err(Counter::BadIpHeader);
    }
    Ok(Frame {
        l3_offset,
        ip: Ip::V6,
    })
}

/// The addresses and ports of an IPv4 TCP, UDP or ICMP echo packet, raw
/// (network order), and where they sit in the packet.
#[derive(Clone, Copy)]
pub struct Ipv4Flow {
    pub l3_offset: usize,
    pub proto: u8,
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    /// For ICMP echo: the id in a request, 0 in a reply.
    pub src_port: [u8; 2],
    /// For ICMP echo: 0 in a request, the id in a reply.
    pub dst_port: [u8; 2],
    pub src_port_offset: usize,
    pub dst_port_offset: usize,
    pub l4_csum_offset: usize,
    /// TCP flags byte (0 for UDP and ICMP).
    pub tcp_flags: u8,
}

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

impl Ipv4Flow {
    /// "Not a flow": every field defined. (An `Option` here let LLVM leave
    /// the fields of its `None` in whatever register was at hand, a packet
    /// pointer on one path, which the verifier refuses to read as a
    /// number.)
    const NONE: Ipv4Flow = Ipv4Flow {
        l3_offset: 0,
        proto: 0,
        src_addr: [0; 4],
        dst_addr: [0; 4],
        src_port: [0; 2],
        dst_port: [0; 2],
        src_port_offset: 0,
        dst_port_offset: 0,
        l4_csum_offset: 0,
        tcp_flags: 0,
    };

    /// False for [`Self::NONE`]: no NAT applies to the packet.
    #[inline(always)]
    pub fn is_flow(&self) -> bool {
        self.proto != 0
    }
}

/// Reads the flow of an IPv4 TCP/UDP/ICMP-echo packet that carries its L4
/// header. [`Ipv4Flow::NONE`]: not a packet NAT applies to (other
/// protocol, other ICMP type, IPv6, later fragment). `Err`: the L4 header
/// is cut short.
#[inline(always)]
pub fn ipv4_flow(ctx: &TcContext, frame: &Frame) -> Result<Ipv4Flow, Counter> {
    let Ip::V4 {
        l4_offset: l4,
        proto,
        later_fragment: false,
    } = frame.ip
    else {
        return Ok(Ipv4Flow::NONE);
    };
    let l4_len = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP | IPPROTO_ICMP => 8,
        _ => return Ok(Ipv4Flow::NONE),
    };
    if ctx.data() + l4 + l4_len > ctx.data_end() {
        return Err(Counter::Truncated);
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, frame.l3_offset).ok_or(Counter::Truncated)?;
    let head: *const [u8; 8] = ptr_at(ctx, l4).ok_or(Counter::Truncated)?;
    let (src_addr, dst_addr, h) = unsafe { ((*ip).src_addr, (*ip).dst_addr, *head) };
    let mut flow = Ipv4Flow {
        l3_offset: frame.l3_offset,
        proto,
        src_addr,
        dst_addr,
        src_port: [h[0], h[1]],
        dst_port: [h[2], h[3]],
        src_port_offset: l4,
        dst_port_offset: l4 + 2,
        l4_csum_offset: l4 + UDP_CSUM,
        tcp_flags: 0,
    };
    match proto {
        IPPROTO_TCP => {
            let flags: *const u8 = ptr_at(ctx, l4 + 13).ok_or(Counter::Truncated)?;
            flow.tcp_flags = unsafe { *flags };
            flow.l4_csum_offset = l4 + TCP_CSUM;
        }
        IPPROTO_ICMP => {
            let id = [h[4], h[5]];
            flow.l4_csum_offset = l4 + ICMP_CSUM;
            flow.src_port_offset = l4 + ICMP_ECHO_ID;
            flow.dst_port_offset = l4 + ICMP_ECHO_ID;
            // Errors and other types (or codes): not a flow of their own.
            let Some((src, dst)) = echo_ports(h[0], id).filter(|_| h[1] == 0) else {
                return Ok(Ipv4Flow::NONE);
            };
            (flow.src_port, flow.dst_port) = (src, dst);
        }
        _ => {}
    }
    Ok(flow)
}

/// Why a parsed frame that no rule applies to is passed.
#[inline(always)]
pub fn unmatched(frame: &Frame) -> Counter {
    match frame.ip {
        Ip::V4 {
            later_fragment: true,
            ..
        } => Counter::Fragment,
        _ => Counter::NoMatch,
    }
}
