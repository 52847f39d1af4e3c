//! ARP on overlay networks, answered where it is asked: an overlay
//! container's request for its gateway or a peer (on this host or another)
//! is turned into the reply in place and sent back out of the veth it came
//! from. Nothing is flooded, and no ARP crosses hosts.
use aya_ebpf::{btf_maps::lpm_trie::Key, helpers::bpf_redirect, programs::TcContext};
use netd_common::{Counter, Endpoint, OverlayNetwork};

use crate::{
    delivery::mark_translated,
    maps::{network_of, ENDPOINT_ADDRS, PEERS, ROUTED_BLOCKS},
    parsing::{ptr_at, ETH_HLEN},
};

/// An ARP packet for IPv4 over Ethernet, as it follows the Ethernet header.
#[repr(C)]
#[derive(Clone, Copy)]
struct ArpIpv4 {
    htype: [u8; 2],
    ptype: [u8; 2],
    hlen: u8,
    plen: u8,
    op: [u8; 2],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

const ARP_REQUEST: [u8; 2] = [0, 1];
const ARP_REPLY: [u8; 2] = [0, 2];
/// Ethernet hardware, IPv4 protocol, 6- and 4-byte addresses.
const HTYPE_ETHER: [u8; 2] = [0, 1];
const PTYPE_IPV4: [u8; 2] = [0x08, 0x00];

/// Answers `ep`'s ARP request on overlay network `net` (its sender already
/// checked). `Ok(verdict)`: the reply is on its way back. `Err`: dropped,
/// and why — an address nobody holds, a gratuitous announcement or probe
/// (nothing to tell anybody), or a malformed packet. Replies (the
/// container answering the host's own request) go to the kernel: `Ok(None)`.
#[inline(always)]
pub fn answer(
    ctx: &TcContext,
    ep: &Endpoint,
    net: &OverlayNetwork,
) -> Result<Option<i32>, Counter> {
    let arp: *mut ArpIpv4 = ptr_at(ctx, ETH_HLEN).ok_or(Counter::Truncated)?;
    let req = unsafe { *arp };
    if req.htype != HTYPE_ETHER || req.ptype != PTYPE_IPV4 || req.hlen != 6 || req.plen != 4 {
        return Err(Counter::NotIp);
    }
    if req.op == ARP_REPLY {
        return Ok(None);
    }
    if req.op != ARP_REQUEST {
        return Err(Counter::NotIp);
    }
    // Gratuitous ARP and probes for its own address: nobody else holds it
    // (addresses are the cluster's to give), so there is nobody to tell.
    if req.tpa == ep.addr || req.tpa == req.spa {
        return Err(Counter::Broadcast);
    }
    let mac = owner_mac(req.tpa, ep.network, net).ok_or(Counter::NoEndpoint)?;
    let macs: *mut [[u8; 6]; 2] = ptr_at(ctx, 0).ok_or(Counter::Truncated)?;
    // SAFETY: both bounds-checked above.
    unsafe {
        *macs = [req.sha, mac];
        (*arp).op = ARP_REPLY;
        (*arp).sha = mac;
        (*arp).spa = req.tpa;
        (*arp).tha = req.sha;
        (*arp).tpa = req.spa;
    }
    mark_translated(ctx);
    Ok(Some(
        unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) } as i32
    ))
}

/// The target address of a well-formed IPv4-over-Ethernet ARP packet,
/// and whether it is a request.
#[inline(always)]
pub fn target(ctx: &TcContext) -> Option<([u8; 4], bool)> {
    let arp: *const ArpIpv4 = ptr_at(ctx, ETH_HLEN)?;
    let req = unsafe { *arp };
    let well_formed =
        req.htype == HTYPE_ETHER && req.ptype == PTYPE_IPV4 && req.hlen == 6 && req.plen == 4;
    if !well_formed || (req.op != ARP_REQUEST && req.op != ARP_REPLY) {
        return None;
    }
    Some((req.tpa, req.op == ARP_REQUEST))
}

/// The MAC of whoever holds `addr` on overlay network `network`: its
/// gateway, a container on this host, or one on another.
#[inline(always)]
fn owner_mac(addr: [u8; 4], network: u32, net: &OverlayNetwork) -> Option<[u8; 6]> {
    if addr == net.gateway {
        return Some(net.gateway_mac);
    }
    if network_of(addr)?.id != network {
        return None;
    }
    if let Some(loc) = ENDPOINT_ADDRS.get_ptr(&addr) {
        return Some(unsafe { (*loc).mac });
    }
    // A routed network's containers on other hosts are behind this host,
    // its gateway.
    if net.vni == 0 {
        let block = ROUTED_BLOCKS.get(&Key::new(32, addr))?;
        return (block.network == network).then_some(net.gateway_mac);
    }
    let peer = PEERS.get_ptr(&addr)?;
    let peer = unsafe { *peer };
    (peer.network == network).then_some(peer.mac)
}
