//! Segment networks: containers on a parent interface's LAN, optionally in
//! an 802.1Q VLAN, with MACs of their own (macvlan mode) or sharing the
//! parent's (ipvlan L2 mode), with no macvlan or ipvlan device, no bridge
//! and no 8021q sub-interface.
//!
//! - Parent ingress: a frame for a container's MAC (on the frame's VLAN),
//!   or for the parent's MAC and an ipvlan container's address, goes
//!   straight into it (`bpf_redirect_peer`), its tag popped; an ARP
//!   request for a container's address goes to that container alone.
//!   Other broadcasts and IPv4 multicast (ARP and IPv4) are copied into
//!   every container of the frame's parent and VLAN, as a switch floods
//!   them, and go on to the host as they came. Everything else is the
//!   host's.
//! - Container egress: to another container of the network on this host,
//!   straight into it; to this host's own MAC, into the parent's receive
//!   path (a host never receives what leaves its own interface, which is
//!   why kernel macvlan cannot reach its host); anything else out of the
//!   parent, tagged. Broadcasts also go to the host (untagged networks)
//!   and to the network's other containers here.
//! - Parent egress: what the host sends its own containers (its ARP
//!   requests for their addresses too) goes into their veths instead of
//!   onto the wire, where nobody would answer; its broadcasts are copied
//!   into its untagged networks' containers.
use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_INGRESS},
    cty::c_void,
    helpers::{
        bpf_clone_redirect, bpf_loop, bpf_redirect, bpf_redirect_peer, bpf_skb_vlan_pop,
        bpf_skb_vlan_push,
    },
    programs::TcContext,
};
use netd_common::{
    segment::{BroadcastDomain, FloodList, SegmentAddr, SegmentMac, FLOOD_MAX, SEGMENT_SHARED_MAC},
    Counter, Endpoint, Hook, Segment, SegmentPort,
};

use crate::{
    arp,
    counters::count,
    delivery::mark_translated,
    maps::{SEGMENT_ADDRS, SEGMENT_FLOODS, SEGMENT_MACS},
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

/// Whether a group frame is one a broadcast domain floods: ARP, and IPv4
/// broadcast and multicast (netd's containers speak IPv4 only; link-local
/// control frames such as STP's and LLDP's stay with the host).
#[inline(always)]
fn floods(ether_type: u16) -> bool {
    ether_type == ETH_P_ARP || ether_type == ETH_P_IP
}

/// What [`flood_one`] needs, on the caller's stack.
#[repr(C)]
struct Flood {
    skb: *mut __sk_buff,
    list: *const FloodList,
    /// Only this network's containers, if `one_network` is set.
    network: u32,
    one_network: u32,
    /// The sender's veth (0: none).
    except: u32,
    copied: u32,
}

/// One turn of the copying loop. A `bpf_loop` callback: the verifier checks
/// it once, where an unrolled loop would be walked again for every state
/// reaching it (container egress then exceeds the verifier's budget).
extern "C" fn flood_one(index: u64, flood: *mut c_void) -> i64 {
    let flood = unsafe { &mut *(flood as *mut Flood) };
    let list = unsafe { &*flood.list };
    if index >= u64::from(list.count) {
        return 1;
    }
    let Some(port) = list.ports.get(index as usize) else {
        return 1;
    };
    if port.ifindex == flood.except || (flood.one_network != 0 && port.network != flood.network) {
        return 0;
    }
    if unsafe { bpf_clone_redirect(flood.skb, port.ifindex, 0) } == 0 {
        flood.copied = 1;
    }
    0
}

/// Copies the frame, as it is now (untagged), out of the host-side veths
/// of the containers in `list` (a domain's): into the containers.
/// `network`: only that network's, and not the sender `except`. Whether a
/// copy reached a container; one that fails (a veth just deleted) is left
/// out.
#[inline(always)]
fn flood(ctx: &TcContext, list: *const FloodList, network: Option<u32>, except: u32) -> bool {
    let mut flood = Flood {
        skb: ctx.skb.skb,
        list,
        network: network.unwrap_or(0),
        one_network: network.is_some() as u32,
        except,
        copied: 0,
    };
    unsafe {
        bpf_loop(
            FLOOD_MAX as u32,
            flood_one as *mut c_void,
            &mut flood as *mut Flood as *mut c_void,
            0,
        )
    };
    flood.copied != 0
}

/// [`flood`] into `domain`'s containers, counted `flooded` on `hook`
/// (beside the frame's own detail).
#[inline(always)]
fn flood_counted(
    ctx: &TcContext,
    hook: Hook,
    domain: &BroadcastDomain,
    network: Option<u32>,
    except: u32,
) {
    if let Some(list) = SEGMENT_FLOODS.get_ptr(domain) {
        if flood(ctx, list, network, except) {
            count(hook, Counter::Flooded, ctx.len());
        }
    }
}

#[inline(always)]
fn domain(parent: u32, vlan: u16) -> BroadcastDomain {
    BroadcastDomain {
        parent,
        vlan,
        _pad: 0,
    }
}

/// Whether a group frame on the parent's ingress comes from this host's
/// own side of the domain (`list`, its containers here: a container's MAC,
/// or the parent's own): the copy a container's program handed to the
/// host. A LAN never sends a station its own frames back, so such a frame
/// is the host's alone: not flooded again, and an ARP probe not sent back
/// into its sender. (Not a mark on the skb: netd's marks are not trusted
/// on arrival.)
#[inline(always)]
fn from_own(
    ctx: &TcContext,
    list: Option<*const FloodList>,
    parent: u32,
    vlan: u16,
) -> Result<bool, Counter> {
    let src: *const [u8; 6] = ptr_at(ctx, 6).ok_or(Counter::Truncated)?;
    let src = unsafe { *src };
    if list.is_some_and(|l| unsafe { (*l).parent_mac } == src) {
        return Ok(true);
    }
    let key = SegmentMac {
        parent,
        vlan,
        mac: src,
    };
    Ok(SEGMENT_MACS.get_ptr(&key).is_some())
}

/// Where parent ingress sends a frame.
pub enum FromParent {
    /// Redirected into a container: the helper's verdict.
    Container(i32),
    /// On to the host, and what was done (`Flooded`) or why not (`NoMatch`).
    Host(Counter),
}

/// Parent ingress. `Err`: passed to the host too, and why (malformed, or
/// a tag netd does not run), except `RewriteFailed`: dropped
/// half-rewritten.
#[inline(always)]
pub fn from_parent(ctx: &TcContext) -> Result<FromParent, Counter> {
    let (dst, ether_type) = eth_dst_type(ctx)?;
    let vlan = rx_vlan(ctx, ether_type)?;
    let parent = unsafe { (*ctx.skb.skb).ifindex };
    let port = if is_group(&dst) {
        // One lookup of the domain's list for the frame.
        let list = SEGMENT_FLOODS
            .get_ptr(&domain(parent, vlan))
            .map(|l| l as *const FloodList);
        if from_own(ctx, list, parent, vlan)? {
            return Ok(FromParent::Host(Counter::NoMatch));
        }
        let target = if ether_type == ETH_P_ARP {
            arp_target(ctx, parent, vlan, false)
        } else {
            None
        };
        match (target, list) {
            (Some(port), _) => port,
            (None, Some(list)) if floods(ether_type) => return flood_from_parent(ctx, list, vlan),
            (None, _) => return Ok(FromParent::Host(Counter::NoMatch)),
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
                None => return Ok(FromParent::Host(Counter::NoMatch)),
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
    Ok(FromParent::Container(
        unsafe { bpf_redirect_peer(port.ifindex, 0) } as i32,
    ))
}

/// A LAN broadcast: into every container of its domain, then to the host
/// with its tag back on (the host has no interface on a VLAN, and must not
/// take a VLAN's broadcast for the untagged LAN's).
#[inline(always)]
fn flood_from_parent(
    ctx: &TcContext,
    list: *const FloodList,
    vlan: u16,
) -> Result<FromParent, Counter> {
    let skb = ctx.skb.skb;
    // The whole TCI, priority bits too, goes back on the host's copy.
    let tci = unsafe { (*skb).vlan_tci } as u16;
    if vlan != 0 && unsafe { bpf_skb_vlan_pop(skb) } != 0 {
        return Err(Counter::RewriteFailed);
    }
    let copied = flood(ctx, list, None, 0);
    if vlan != 0 && unsafe { bpf_skb_vlan_push(skb, ETH_P_8021Q.to_be(), tci) } != 0 {
        return Err(Counter::RewriteFailed);
    }
    Ok(FromParent::Host(if copied {
        Counter::Flooded
    } else {
        Counter::NoMatch
    }))
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
        let target = if ether_type == ETH_P_ARP {
            arp_target(ctx, parent, 0, false)
        } else {
            None
        };
        match target {
            Some(port) if port.flags & SEGMENT_SHARED_MAC == 0 => port,
            // The host is on the untagged LAN: its broadcasts reach the
            // containers there as a LAN machine's do.
            None if floods(ether_type) => {
                flood_counted(ctx, Hook::ParentEgress, &domain(parent, 0), None, 0);
                return Ok(None);
            }
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
        let own = unsafe { (*ctx.skb.skb).ifindex };
        if ether_type == ETH_P_ARP {
            // (Its own address: a probe or an announcement, for the LAN.)
            if let Some(port) = arp_target(ctx, seg.parent, seg.vlan, false) {
                if port.ifindex != own {
                    return to_neighbour(ctx, ep, &port, false);
                }
            }
        }
        if floods(ether_type) {
            let domain = domain(seg.parent, seg.vlan);
            flood_counted(ctx, Hook::ContainerEgress, &domain, Some(ep.network), own);
        }
        // The host is on the untagged LAN too: it hears broadcasts (ARP
        // for its address, DHCP) as any machine there would. (The parent's
        // ingress program knows the copy by its source: not flooded again.)
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
