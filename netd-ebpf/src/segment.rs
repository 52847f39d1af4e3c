//! Segment networks: containers on a parent interface's LAN, optionally in
//! an 802.1Q VLAN, with MACs of their own (macvlan mode) or sharing the
//! parent's (ipvlan L2 mode), with no macvlan or ipvlan device, no bridge
//! and no 8021q sub-interface.
//!
//! - Parent ingress: a frame for a container's MAC (on the frame's VLAN),
//!   or for the parent's MAC and an ipvlan container's address, goes
//!   straight into it (`bpf_redirect_peer`), its tag popped; an ARP
//!   request for a container's address goes to that container alone.
//!   Everything else is the host's.
//! - Container egress: to another container of the network on this host,
//!   straight into it; to this host's own MAC, into the parent's receive
//!   path (a host never receives what leaves its own interface, which is
//!   why kernel macvlan cannot reach its host); anything else out of the
//!   parent, tagged. Broadcasts also go to the host (untagged networks).
//! - Parent egress: what the host sends its own containers (its ARP
//!   requests for their addresses too) goes into their veths instead of
//!   onto the wire, where nobody would answer.
use aya_ebpf::{
    bindings::BPF_F_INGRESS,
    helpers::{
        bpf_clone_redirect, bpf_redirect, bpf_redirect_peer, bpf_skb_vlan_pop, bpf_skb_vlan_push,
    },
    programs::TcContext,
};
use netd_common::{
    segment::{SegmentAddr, SegmentMac, SEGMENT_SHARED_MAC},
    Counter, Endpoint, Segment, SegmentPort,
};

use crate::{
    arp,
    delivery::mark_translated,
    maps::{SEGMENT_ADDRS, SEGMENT_MACS},
    parsing::{ptr_at, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, PACKET_HOST},
};

/// The 12 bits of a TCI that are the VLAN id.
const VLAN_VID_MASK: u32 = 0x0fff;

/// A frame's destination MAC and EtherType (after any tag the kernel took
/// out into the skb).
#[inline(always)]
fn eth_dst_type(ctx: &TcContext) -> Result<([u8; 6], u16), Counter> {
    let eth: *const [u8; 14] = ptr_at(ctx, 0).ok_or(Counter::Truncated)?;
    let eth = unsafe { *eth };
    let dst = [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]];
    Ok((dst, u16::from_be_bytes([eth[12], eth[13]])))
}

#[inline(always)]
fn is_group(mac: &[u8; 6]) -> bool {
    mac[0] & 1 != 0
}

/// The VLAN a received frame is on: 0 untagged, `Err` for a tag netd does
/// not run networks on (802.1ad, or a second tag left in the frame).
#[inline(always)]
fn rx_vlan(ctx: &TcContext, ether_type: u16) -> Result<u16, Counter> {
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        return Err(Counter::VlanTagged);
    }
    let skb = ctx.skb.skb;
    // The receive path has moved a tag off the frame into the skb by now.
    let (present, tci, proto) =
        unsafe { ((*skb).vlan_present, (*skb).vlan_tci, (*skb).vlan_proto) };
    if present == 0 {
        return Ok(0);
    }
    if proto != u32::from(ETH_P_8021Q.to_be()) {
        return Err(Counter::VlanTagged);
    }
    Ok((tci & VLAN_VID_MASK) as u16)
}

/// The container on `parent`/`vlan` holding `addr`.
#[inline(always)]
fn by_addr(parent: u32, vlan: u16, addr: [u8; 4]) -> Option<SegmentPort> {
    let key = SegmentAddr {
        parent,
        vlan,
        _pad: 0,
        addr,
    };
    SEGMENT_ADDRS.get_ptr(&key).map(|p| unsafe { *p })
}

/// The container on `parent`/`vlan` an ARP packet is for: the one whose
/// address a request asks for, or (`replies`) the one a reply answers.
#[inline(always)]
fn arp_target(ctx: &TcContext, parent: u32, vlan: u16, replies: bool) -> Option<SegmentPort> {
    let (tpa, request) = arp::target(ctx)?;
    if !request && !replies {
        return None;
    }
    by_addr(parent, vlan, tpa)
}

/// The IPv4 destination of an IPv4 frame.
#[inline(always)]
fn ipv4_dst(ctx: &TcContext) -> Option<[u8; 4]> {
    let dst: *const [u8; 4] = ptr_at(ctx, ETH_HLEN + 16)?;
    Some(unsafe { *dst })
}

/// An ipvlan container a unicast frame to the parent's own MAC is for:
/// by its destination address (an IPv4 packet, or an ARP reply).
#[inline(always)]
fn shared_mac_target(
    ctx: &TcContext,
    parent: u32,
    vlan: u16,
    ether_type: u16,
) -> Option<SegmentPort> {
    let port = match ether_type {
        ETH_P_IP => by_addr(parent, vlan, ipv4_dst(ctx)?)?,
        ETH_P_ARP => arp_target(ctx, parent, vlan, true)?,
        _ => return None,
    };
    (port.flags & SEGMENT_SHARED_MAC != 0).then_some(port)
}

/// Parent ingress. `Ok(None)`: not for a container here (the host's);
/// `Err`: passed to the host too, and why (malformed, or a tag netd does
/// not run), except `RewriteFailed`: dropped half-rewritten.
#[inline(always)]
pub fn from_parent(ctx: &TcContext) -> Result<Option<i32>, Counter> {
    let (dst, ether_type) = eth_dst_type(ctx)?;
    let vlan = rx_vlan(ctx, ether_type)?;
    let parent = unsafe { (*ctx.skb.skb).ifindex };
    let port = if is_group(&dst) {
        if ether_type != ETH_P_ARP {
            return Ok(None);
        }
        match arp_target(ctx, parent, vlan, false) {
            Some(port) => port,
            None => return Ok(None),
        }
    } else {
        let key = SegmentMac {
            parent,
            vlan,
            mac: dst,
        };
        match SEGMENT_MACS.get_ptr(&key) {
            Some(port) => unsafe { *port },
            None => match shared_mac_target(ctx, parent, vlan, ether_type) {
                Some(port) => port,
                None => return Ok(None),
            },
        }
    };
    // The container has no 8021q device: a tag left on the skb would make
    // its kernel take the frame for somebody else's.
    if vlan != 0 && unsafe { bpf_skb_vlan_pop(ctx.skb.skb) } != 0 {
        return Err(Counter::RewriteFailed);
    }
    if !is_group(&dst) {
        // Sent to the container's MAC, not the parent's: PACKET_OTHERHOST.
        ctx.change_type(PACKET_HOST)
            .map_err(|_| Counter::RewriteFailed)?;
    }
    Ok(Some(unsafe { bpf_redirect_peer(port.ifindex, 0) } as i32))
}

/// Parent egress: the host's own frames to its macvlan containers
/// (untagged networks: the host has no interface on a VLAN; ipvlan
/// containers share its MAC, and as with kernel ipvlan the host does not
/// reach them). `Ok(None)`: for the wire; `Err`: for the wire too, and why.
#[inline(always)]
pub fn from_host(ctx: &TcContext) -> Result<Option<i32>, Counter> {
    let (dst, ether_type) = eth_dst_type(ctx)?;
    if rx_vlan(ctx, ether_type)? != 0 {
        return Err(Counter::VlanTagged);
    }
    let parent = unsafe { (*ctx.skb.skb).ifindex };
    let port = if is_group(&dst) {
        if ether_type != ETH_P_ARP {
            return Ok(None);
        }
        match arp_target(ctx, parent, 0, false) {
            Some(port) if port.flags & SEGMENT_SHARED_MAC == 0 => port,
            _ => return Ok(None),
        }
    } else {
        let key = SegmentMac {
            parent,
            vlan: 0,
            mac: dst,
        };
        match SEGMENT_MACS.get_ptr(&key) {
            Some(port) => unsafe { *port },
            None => return Ok(None),
        }
    };
    // Out of the container's host-side veth: into the container.
    Ok(Some(unsafe { bpf_redirect(port.ifindex, 0) } as i32))
}

/// A segment container's frame (its source MAC already checked). Returns
/// the action and the redirect verdict; `Err`: dropped, and why.
#[inline(always)]
pub fn from_container(
    ctx: &TcContext,
    ep: &Endpoint,
    seg: &Segment,
) -> Result<(Counter, i32), Counter> {
    let (dst, ether_type) = eth_dst_type(ctx)?;
    // A container does not pick its VLAN.
    if ether_type == ETH_P_8021Q
        || ether_type == ETH_P_8021AD
        || unsafe { (*ctx.skb.skb).vlan_present } != 0
    {
        return Err(Counter::VlanTagged);
    }
    if ether_type == ETH_P_IP {
        // Every IPv4 packet, whatever its protocol, from its own address.
        let src: *const [u8; 4] = ptr_at(ctx, ETH_HLEN + 12).ok_or(Counter::Truncated)?;
        if unsafe { *src } != ep.addr {
            return Err(Counter::Spoofed);
        }
    }
    if is_group(&dst) {
        if ether_type == ETH_P_ARP {
            // (Its own address: a probe or an announcement, for the LAN.)
            let own = unsafe { (*ctx.skb.skb).ifindex };
            if let Some(port) = arp_target(ctx, seg.parent, seg.vlan, false) {
                if port.ifindex != own {
                    return to_neighbour(ctx, ep, &port, false);
                }
            }
        }
        // The host is on the untagged LAN too: it hears broadcasts (ARP
        // for its address, DHCP) as any machine there would.
        if seg.vlan == 0
            && unsafe { bpf_clone_redirect(ctx.skb.skb, seg.parent, BPF_F_INGRESS as u64) } != 0
        {
            return Err(Counter::RewriteFailed);
        }
        return out_of_parent(ctx, seg);
    }
    if dst == seg.parent_mac {
        // ipvlan neighbours share the parent's MAC: by address.
        if let Some(port) = shared_mac_target(ctx, seg.parent, seg.vlan, ether_type) {
            return to_neighbour(ctx, ep, &port, true);
        }
        if seg.vlan == 0 {
            let verdict = unsafe { bpf_redirect(seg.parent, BPF_F_INGRESS as u64) } as i32;
            return Ok((Counter::ToHost, verdict));
        }
    }
    let key = SegmentMac {
        parent: seg.parent,
        vlan: seg.vlan,
        mac: dst,
    };
    if let Some(port) = SEGMENT_MACS.get_ptr(&key) {
        let port = unsafe { *port };
        return to_neighbour(ctx, ep, &port, true);
    }
    out_of_parent(ctx, seg)
}

/// To another container on this host's part of the segment: straight into
/// it, if it is on the same network.
#[inline(always)]
fn to_neighbour(
    ctx: &TcContext,
    ep: &Endpoint,
    port: &SegmentPort,
    unicast: bool,
) -> Result<(Counter, i32), Counter> {
    if port.network != ep.network {
        return Err(Counter::Isolated);
    }
    if unicast {
        ctx.change_type(PACKET_HOST)
            .map_err(|_| Counter::RewriteFailed)?;
    }
    let verdict = unsafe { bpf_redirect_peer(port.ifindex, 0) } as i32;
    Ok((Counter::Switched, verdict))
}

/// Onto the wire: tagged with the network's VLAN, marked so that the
/// parent's egress programs let it go without another look.
#[inline(always)]
fn out_of_parent(ctx: &TcContext, seg: &Segment) -> Result<(Counter, i32), Counter> {
    if seg.vlan != 0
        && unsafe { bpf_skb_vlan_push(ctx.skb.skb, ETH_P_8021Q.to_be(), seg.vlan) } != 0
    {
        return Err(Counter::RewriteFailed);
    }
    mark_translated(ctx);
    let verdict = unsafe { bpf_redirect(seg.parent, 0) } as i32;
    Ok((Counter::SegmentOut, verdict))
}
