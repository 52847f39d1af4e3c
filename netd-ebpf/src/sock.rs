//! Host-local access to published ports: cgroup socket hooks rewrite the
//! destination of host processes' connect()/sendmsg() from a published
//! address (a host address or 127.0.0.1) to the container, so no packet ever
//! needs NAT; recvmsg() gets the published address back for UDP.
use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
    EbpfContext as _,
};
use netd_common::{
    nat::{SockRevKey, SockRevValue},
    Counter, PortKey,
};

use crate::{
    maps::{CONFIG, PORTS, SOCK_REV},
    parsing::{IPPROTO_TCP, IPPROTO_UDP},
};

/// Whether the socket belongs to the network namespace this netd serves.
#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    let Some(config) = CONFIG.get(0) else {
        return false;
    };
    config.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == config.netns_cookie
}

/// The destination (address, port) and protocol of a sock_addr call, raw.
#[inline(always)]
fn destination(ctx: &SockAddrContext) -> Option<([u8; 4], [u8; 2], u8)> {
    let sa = ctx.sock_addr;
    let (proto, ip, port) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    let proto = match proto {
        p if p == u32::from(IPPROTO_TCP) => IPPROTO_TCP,
        p if p == u32::from(IPPROTO_UDP) => IPPROTO_UDP,
        _ => return None,
    };
    // Both fields hold network-order values: their in-memory bytes are the
    // wire bytes.
    Some((ip.to_ne_bytes(), (port as u16).to_ne_bytes(), proto))
}

/// connect4 / sendmsg4: published address → container. Returns the counter
/// for the call, or None when it is not this namespace's.
#[inline(always)]
pub fn translate_destination(ctx: &SockAddrContext) -> Option<Counter> {
    if !ours(ctx) {
        return None;
    }
    let Some((addr, port, proto)) = destination(ctx) else {
        return Some(Counter::NoMatch);
    };
    let key = PortKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    let Some(target) = PORTS.get_ptr(&key) else {
        return Some(Counter::NoMatch);
    };
    let (taddr, tport) = unsafe { ((*target).addr, (*target).port) };
    let sa = ctx.sock_addr;
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(taddr);
        (*sa).user_port = u32::from(u16::from_ne_bytes(tport));
    }
    if proto == IPPROTO_UDP {
        let rev_key = SockRevKey {
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            addr: taddr,
            port: tport,
            _pad: [0; 2],
        };
        let original = SockRevValue {
            addr,
            port,
            _pad: [0; 2],
        };
        // Best effort: without it the reply shows the container's address.
        let _ = SOCK_REV.insert(&rev_key, original, u64::from(BPF_ANY));
    }
    Some(Counter::Dnat)
}

/// recvmsg4: container → the published address the application used.
#[inline(always)]
pub fn restore_source(ctx: &SockAddrContext) -> Option<Counter> {
    if !ours(ctx) {
        return None;
    }
    let (addr, port, proto) = destination(ctx)?;
    if proto != IPPROTO_UDP {
        return None;
    }
    let key = SockRevKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr,
        port,
        _pad: [0; 2],
    };
    let original = SOCK_REV.get_ptr(&key)?;
    let sa = ctx.sock_addr;
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes((*original).addr);
        (*sa).user_port = u32::from(u16::from_ne_bytes((*original).port));
    }
    Some(Counter::RevDnat)
}
