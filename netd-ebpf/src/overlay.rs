//! Switching within an overlay network, from a container's veth: a packet
//! for a container of the same network goes straight to it — into its veth
//! when it is on this host, in VXLAN to its host otherwise. Netd knows
//! every address of the network (the cluster store says where each
//! container is), so nothing is flooded: unknown unicast, broadcast and
//! multicast are dropped and counted.
use aya_ebpf::{helpers::bpf_redirect_peer, programs::TcContext};
use netd_common::{Counter, Endpoint, OverlayNetwork};

use crate::{
    maps::{network_of, ENDPOINT_ADDRS, PEERS},
    nat,
    parsing::{ptr_at, Ipv4Flow, PACKET_HOST},
    pmtu, routed,
    tunnel::{self, Encap},
};

/// What became of a packet `ep` sent on overlay network `net` to `dst`:
/// `Ok(Some((action, verdict)))` switched; `Ok(None)` not for the network
/// itself (for its gateway: routed, masqueraded, or the host's own);
/// `Err`: dropped, and why.
#[inline(always)]
pub fn switch(
    ctx: &TcContext,
    ep: &Endpoint,
    net: &OverlayNetwork,
    dst: [u8; 4],
    flow: &Ipv4Flow,
) -> Result<Option<(Counter, i32)>, Counter> {
    let dst_mac: [u8; 6] = unsafe { *ptr_at::<[u8; 6]>(ctx, 0).ok_or(Counter::Truncated)? };
    // Broadcast and multicast, to any MAC or address: nobody to flood to.
    if dst_mac[0] & 1 != 0 || dst[0] >= 224 {
        return Err(Counter::Broadcast);
    }
    if dst == net.gateway || network_of(dst).map(|n| n.id) != Some(ep.network) {
        return Ok(None);
    }
    if let Some(loc) = ENDPOINT_ADDRS.get_ptr(&dst) {
        let loc = unsafe { *loc };
        // Handed over past the receiver's veth, whose egress program would
        // give a hairpin reply its published source back: do it here.
        if flow.is_flow() {
            nat::container_ingress(ctx, flow)?;
        }
        let macs: *mut [u8; 6] = ptr_at(ctx, 0).ok_or(Counter::Truncated)?;
        unsafe { *macs = loc.mac };
        // Sent to the peer's MAC, not the host veth's: PACKET_OTHERHOST
        // here, which older kernels carry through redirect_peer.
        ctx.change_type(PACKET_HOST)
            .map_err(|_| Counter::RewriteFailed)?;
        let verdict = unsafe { bpf_redirect_peer(loc.ifindex, 0) } as i32;
        return Ok(Some((Counter::Switched, verdict)));
    }
    // VNI 0: a routed network, whose other hosts are reached by routing.
    if net.vni == 0 {
        return routed::route(ctx, ep, dst, net.gateway).map(Some);
    }
    let peer = unsafe { *PEERS.get_ptr(&dst).ok_or(Counter::NoEndpoint)? };
    if peer.network != ep.network {
        return Err(Counter::NoEndpoint);
    }
    let macs: *mut [u8; 6] = ptr_at(ctx, 0).ok_or(Counter::Truncated)?;
    unsafe { *macs = peer.mac };
    match tunnel::encap(ctx, &peer, net.vni)? {
        Encap::Sent(verdict) => Ok(Some((Counter::VxlanEncap, verdict))),
        Encap::TooBig(path_mtu) => {
            let verdict = pmtu::frag_needed(ctx, path_mtu)?;
            Ok(Some((Counter::FragNeeded, verdict)))
        }
    }
}
