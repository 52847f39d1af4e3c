//! Routed networks (like flannel's host-gw): a cluster network split into
//! per-host blocks that hosts route to each other without encapsulation.
//! A container's packet for another host's block is routed here, from its
//! veth: TTL decremented, next hop the block's host (by a FIB lookup, its
//! neighbour resolved by the kernel when not known yet), out of the uplink.
//! The receiving host lets it in (see `nat::unpublished_inbound`) and hands
//! it to the container.
use aya_ebpf::{
    bindings::{
        bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    btf_maps::lpm_trie::Key,
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use netd_common::{Counter, Endpoint};

use crate::{
    delivery::{decrement_ttl, mark_translated, set_macs, FibParams, AF_INET, FIB_LOOKUP_OUTPUT},
    icmp_error,
    maps::{CONFIG, ROUTED_BLOCKS},
    parsing::ETH_HLEN,
};

/// Routes `ep`'s packet for `dst` (in its routed network, not on this
/// host) to the host whose block holds `dst`. A packet whose TTL runs out
/// here goes back as ICMP "time exceeded" from `gateway`, the router the
/// container sees. `Err`: dropped, and why (no host has the block, it is
/// another network's, its host is not directly on the uplink's LAN any
/// more, or too big for the link; no ICMP error is sent for those).
#[inline(always)]
pub fn route(
    ctx: &TcContext,
    ep: &Endpoint,
    dst: [u8; 4],
    gateway: [u8; 4],
) -> Result<(Counter, i32), Counter> {
    let block = ROUTED_BLOCKS
        .get(&Key::new(32, dst))
        .copied()
        .ok_or(Counter::NoEndpoint)?;
    if block.network != ep.network {
        return Err(Counter::Isolated);
    }
    // Before the next hop's lookup, as a router checks TTL before MTU.
    if decrement_ttl(ctx, ETH_HLEN).is_none() {
        // (Or the packet is too short to hold a TTL: then it is refused.)
        let verdict = icmp_error::to_sender(ctx, icmp_error::TTL_EXCEEDED, [0; 4], gateway)?;
        return Ok((Counter::TimeExceeded, verdict));
    }
    let uplink = CONFIG.get(0).map_or(0, |c| c.uplink_ifindex);
    if uplink == 0 {
        return Err(Counter::NoEndpoint);
    }
    let mut fib = FibParams::new(uplink, ep.addr, block.host, 0);
    let resolved = match fib.lookup(ctx, FIB_LOOKUP_OUTPUT) {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        // No route to the host, or too big for its link.
        _ => return Err(Counter::NoEndpoint),
    };
    // The lookup put the route's gateway in place of the destination: a
    // host beyond a router would have its containers' packets sent to the
    // router, which does not know the block.
    if fib.dst[..4] != block.host {
        return Err(Counter::NoEndpoint);
    }
    mark_translated(ctx);
    let verdict = if resolved {
        set_macs(ctx, fib.dmac, Some(fib.smac)).ok_or(Counter::RewriteFailed)?;
        unsafe { bpf_redirect(fib.ifindex, 0) }
    } else {
        // The next hop is the block's host, not the packet's destination.
        let mut nh = bpf_redir_neigh {
            nh_family: u32::from(AF_INET),
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                ipv4_nh: u32::from_ne_bytes(block.host),
            },
        };
        unsafe {
            bpf_redirect_neigh(
                fib.ifindex,
                &mut nh,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        }
    };
    Ok((Counter::Routed, verdict as i32))
}
