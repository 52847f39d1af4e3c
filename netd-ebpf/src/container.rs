//! What a container may send (TC ingress on its host-side veth): only from
//! its own MAC and IPv4 address (anti-spoofing, ARP included), and not to
//! containers of other Docker networks (isolation, as Docker's
//! DOCKER-ISOLATION rules give it). On overlay networks, ARP is answered
//! and the network's own traffic switched here. Then hairpin NAT.
use aya_ebpf::programs::TcContext;
use netd_common::{network::NETWORK_HOST_ADDR, Counter, Endpoint};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    arp,
    delivery::{back_to_sender, out_uplink},
    icmp,
    maps::{network_of, ENDPOINTS, OVERLAYS, SEGMENTS},
    nat::{self, ContainerNat},
    overlay,
    parsing::{ipv4_flow, parse_frame, ptr_at, unmatched, ETH_P_ARP, ETH_P_IP},
    segment,
};

/// ARP for IPv4 over Ethernet: sender hardware address at 8, sender
/// protocol address at 14.
const ARP_SHA: usize = 8;
const ARP_SPA: usize = 14;
const ARP_LEN: usize = 28;

/// `Ok((counter, None))`: pass (a reason or an action);
/// `Ok((action, Some(verdict)))`: rewritten and redirected; `Err`: drop.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> Result<(Counter, Option<i32>), Counter> {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(ep) = ENDPOINTS.get_ptr(&ifindex) else {
        // netd attaches to a container's veth as soon as Docker enslaves it
        // to a bridge, before it knows the endpoint. Until it does, nothing
        // may take the kernel's path: the checks and translations would be
        // skipped, and a hairpin SYN would be answered by the listening
        // socket dockerd keeps on the published port, then never served.
        return Err(Counter::UnknownEndpoint);
    };
    let ep: Endpoint = unsafe { *ep };
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Counter::Truncated)?;
    let (src_mac, ether_type) = unsafe { ((*eth).src_addr, u16::from_be((*eth).ether_type)) };
    if src_mac != ep.mac {
        return Err(Counter::Spoofed);
    }
    // Segment (macvlan) networks: no routing, no NAT; the LAN decides.
    if let Some(seg) = SEGMENTS.get_ptr(&ep.network) {
        if ether_type == ETH_P_ARP {
            check_arp(ctx, &ep)?;
        }
        let (action, verdict) = segment::from_container(ctx, &ep, unsafe { &*seg })?;
        return Ok((action, Some(verdict)));
    }
    // A reference into the map, not a copy: an Option of a copied struct
    // leaves registers the verifier sees as uninitialised on the None path.
    let overlay = OVERLAYS.get_ptr(&ep.network).map(|n| unsafe { &*n });
    if ether_type == ETH_P_ARP {
        let checked = check_arp(ctx, &ep)?;
        if let Some(net) = overlay {
            if let Some(verdict) = arp::answer(ctx, &ep, net)? {
                return Ok((Counter::ArpReply, Some(verdict)));
            }
        }
        return Ok((checked, None));
    }
    let frame = match parse_frame(ctx) {
        Ok(frame) => frame,
        // Other L2 protocols: the MAC was checked above.
        Err(Counter::NotIp) => return Ok((Counter::NotIp, None)),
        // A frame whose source cannot be verified is not let through.
        Err(reason) => return Err(reason),
    };
    if ether_type != ETH_P_IP {
        // IPv6: MAC checked above; addresses not yet (no IPv6 NAT either).
        return Ok((Counter::NoMatch, None));
    }
    // Every IPv4 packet, not only the flows NAT knows: fragments, ICMP
    // errors, other protocols must come from the container's address too.
    let ip: *const Ipv4Hdr = ptr_at(ctx, frame.l3_offset).ok_or(Counter::Truncated)?;
    let (src, dst) = unsafe { ((*ip).src_addr, (*ip).dst_addr) };
    if src != ep.addr {
        return Err(Counter::Spoofed);
    }
    let flow = ipv4_flow(ctx, &frame)?;
    if let Some(net) = overlay {
        if let Some((action, verdict)) = overlay::switch(ctx, &ep, net, dst, &flow)? {
            return Ok((action, Some(verdict)));
        }
    }
    let nat = if flow.is_flow() {
        nat::container_egress(ctx, &flow)?
    } else {
        ContainerNat::Unrelated
    };
    match nat {
        // Published ports are reachable from every network.
        ContainerNat::Rewritten(action) => Ok((action, None)),
        ContainerNat::Forward(action, route) => match out_uplink(ctx, frame.l3_offset, &route) {
            Some(verdict) => Ok((action, Some(verdict))),
            // Rewritten for the outside but not sent: the kernel would drop
            // it as a martian anyway; say why.
            None => Err(Counter::RewriteFailed),
        },
        ContainerNat::Reflect(action) => match back_to_sender(ctx, frame.l3_offset) {
            Some(verdict) => Ok((action, Some(verdict))),
            // Addressed to itself: the container would drop it anyway.
            None => Err(Counter::RewriteFailed),
        },
        ContainerNat::Related => Ok((Counter::NoMatch, None)),
        ContainerNat::Unrelated => match network_of(dst) {
            // Another network's container; its gateway is the host's own
            // address and stays reachable. An ICMP error about a NATed
            // flow (a hairpin client on that network) is part of the flow.
            Some(net)
                if net.flags & NETWORK_HOST_ADDR == 0
                    && net.id != ep.network
                    && !icmp::is_error_about_nat_flow(ctx, &frame) =>
            {
                Err(Counter::Isolated)
            }
            _ => Ok((unmatched(&frame), None)),
        },
    }
}

#[inline(always)]
fn check_arp(ctx: &TcContext, ep: &Endpoint) -> Result<Counter, Counter> {
    let l3 = EthHdr::LEN;
    if ctx.data() + l3 + ARP_LEN > ctx.data_end() {
        return Err(Counter::Truncated);
    }
    let sha: *const [u8; 6] = ptr_at(ctx, l3 + ARP_SHA).ok_or(Counter::Truncated)?;
    let spa: *const [u8; 4] = ptr_at(ctx, l3 + ARP_SPA).ok_or(Counter::Truncated)?;
    let (sha, spa) = unsafe { (*sha, *spa) };
    // 0.0.0.0 is an ARP probe (duplicate address detection): allowed.
    if sha != ep.mac || (spa != ep.addr && spa != [0; 4]) {
        return Err(Counter::Spoofed);
    }
    Ok(Counter::NotIp)
}
