//! NAT on the uplink: published ports (DNAT of arriving traffic, the reverse
//! on replies) and masquerade (SNAT of container traffic leaving the host,
//! the reverse on replies). Flows live in NAT_CT, one entry per direction
//! keyed by the packet's own 5-tuple, so each packet needs one lookup, and a
//! flow keeps its translation even if the mapping changes under it.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::lpm_trie::Key,
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_sk_lookup_tcp, bpf_sk_lookup_udp,
        bpf_sk_release,
    },
    programs::TcContext,
    EbpfContext as _,
};
use netd_common::{
    nat::{
        CT_FLAG_DNAT, CT_FLAG_HAIRPIN, CT_FLAG_ROUTED, CT_FLAG_SNAT, CT_FLAG_TCP_ACKED,
        CT_FLAG_TCP_FIN, CT_FLAG_TCP_RST, CT_REWRITE_DST, CT_REWRITE_NONE, CT_REWRITE_SRC,
    },
    network::{NETWORK_HOST_ADDR, NETWORK_INTERNAL, NETWORK_MASQUERADE, NETWORK_ROUTED},
    Counter, CtEntry, CtKey, PortKey,
};

use crate::{
    checksum::{set_ipv4_addr, set_port, L4Offsets},
    delivery::{route_via_uplink, Route},
    maps::{network_of, CONFIG, NAT_CT, PORTS, ROUTED_BLOCKS},
    parsing::{
        ptr_at, Ipv4Flow, IPPROTO_TCP, IPPROTO_UDP, IPV4_CSUM, IPV4_DST, IPV4_SRC, TCP_FLAG_ACK,
        TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN,
    },
};

/// Source ports tried for a new masqueraded flow: the original, then
/// random ones from the configured range.
const SNAT_TRIES: u32 = 8;

#[inline(always)]
fn key_of(f: &Ipv4Flow) -> CtKey {
    CtKey {
        src_addr: f.src_addr,
        dst_addr: f.dst_addr,
        src_port: f.src_port,
        dst_port: f.dst_port,
        proto: f.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn offsets(f: &Ipv4Flow) -> L4Offsets {
    L4Offsets {
        ip_csum: f.l3_offset + IPV4_CSUM,
        l4_csum: f.l4_csum_offset,
        proto: f.proto,
    }
}

/// The CT_FLAG_TCP_* state bits a packet with these TCP flags sets (0 for
/// non-TCP packets, whose `tcp_flags` is 0).
#[inline(always)]
fn tcp_state(tcp_flags: u8) -> u8 {
    let mut state = 0;
    if tcp_flags & TCP_FLAG_ACK != 0 {
        state |= CT_FLAG_TCP_ACKED;
    }
    if tcp_flags & TCP_FLAG_FIN != 0 {
        state |= CT_FLAG_TCP_FIN;
    }
    if tcp_flags & TCP_FLAG_RST != 0 {
        state |= CT_FLAG_TCP_RST;
    }
    state
}

/// CLOCK_MONOTONIC as of the last tick: flow timeouts are seconds, and the
/// precise clock costs a TSC read per packet (expensive in a VM).
#[inline(always)]
fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// What a flow-table hit says, read once.
#[derive(Clone, Copy)]
struct Hit {
    addr: [u8; 4],
    port: [u8; 2],
    rewrite: u8,
    flags: u8,
    /// How long the entry had been idle before this packet.
    idle_ns: u64,
}

/// Refreshes a hit entry (last-seen time, TCP state) and returns it.
#[inline(always)]
fn touch(e: *mut CtEntry, f: &Ipv4Flow, now: u64) -> Hit {
    unsafe {
        let idle_ns = now.saturating_sub((*e).last_seen_ns);
        // The coarse clock moves once a tick: most packets need no write
        // (and leave the entry's cache line clean for other CPUs).
        if idle_ns != 0 {
            (*e).last_seen_ns = now;
        }
        let state = tcp_state(f.tcp_flags);
        if (*e).flags & state != state {
            (*e).flags |= state;
        }
        Hit {
            addr: (*e).addr,
            port: (*e).port,
            rewrite: (*e).rewrite,
            flags: (*e).flags,
            idle_ns,
        }
    }
}

/// Loopback is the host's own: published-on-loopback ports are served by the
/// socket hooks only, never to packets (which could be forged from outside).
#[inline(always)]
fn is_loopback(addr: [u8; 4]) -> bool {
    addr[0] == 127
}

#[inline(always)]
fn entry(addr: [u8; 4], port: [u8; 2], rewrite: u8, flags: u8, now: u64) -> CtEntry {
    CtEntry {
        addr,
        port,
        rewrite,
        flags,
        last_seen_ns: now,
    }
}

/// A failed helper may leave a half-rewritten packet: the caller drops it
/// rather than deliver it wrong.
#[inline(always)]
fn rewrite_dst(ctx: &TcContext, f: &Ipv4Flow, addr: [u8; 4], port: [u8; 2]) -> Result<(), Counter> {
    let offs = offsets(f);
    if port != f.dst_port {
        set_port(ctx, &offs, f.dst_port_offset, f.dst_port, port)
            .map_err(|_| Counter::RewriteFailed)?;
    }
    set_ipv4_addr(ctx, &offs, f.l3_offset + IPV4_DST, f.dst_addr, addr)
        .map_err(|_| Counter::RewriteFailed)
}

#[inline(always)]
fn rewrite_src(ctx: &TcContext, f: &Ipv4Flow, addr: [u8; 4], port: [u8; 2]) -> Result<(), Counter> {
    let offs = offsets(f);
    if port != f.src_port {
        set_port(ctx, &offs, f.src_port_offset, f.src_port, port)
            .map_err(|_| Counter::RewriteFailed)?;
    }
    set_ipv4_addr(ctx, &offs, f.l3_offset + IPV4_SRC, f.src_addr, addr)
        .map_err(|_| Counter::RewriteFailed)
}

/// Traffic arriving on the uplink: replies to masqueraded flows and
/// packets of published-port flows get their destination rewritten.
/// `Ok(Some(action))` when rewritten, `Ok(None)` when not ours, `Err` to drop.
#[inline(always)]
pub fn ingress(ctx: &TcContext, f: &Ipv4Flow) -> Result<Option<Counter>, Counter> {
    let now = now_ns();
    let key = key_of(f);
    // A bare SYN opens a new connection even if its 4-tuple was used before
    // (clients reuse ports quickly): it takes the current port mapping.
    let new_connection = f.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    if !new_connection {
        if let Some(e) = NAT_CT.get_ptr_mut(&key) {
            // Both ends of a self-hairpin flow are a local container: from
            // outside, such a packet is forged.
            if unsafe { (*e).flags } & CT_FLAG_HAIRPIN != 0 {
                return Err(Counter::Spoofed);
            }
            let hit = touch(e, f, now);
            if hit.rewrite == CT_REWRITE_DST {
                rewrite_dst(ctx, f, hit.addr, hit.port)?;
                return Ok(Some(if hit.flags & CT_FLAG_SNAT != 0 {
                    Counter::RevSnat
                } else {
                    Counter::Dnat
                }));
            }
            if hit.rewrite == CT_REWRITE_NONE {
                return Ok(None);
            }
        }
    }
    let port_key = PortKey {
        addr: f.dst_addr,
        port: f.dst_port,
        proto: f.proto,
        _pad: 0,
    };
    let target = if is_loopback(f.dst_addr) {
        None
    } else {
        PORTS.get_ptr(&port_key)
    };
    let Some(target) = target else {
        return unpublished_inbound(ctx, f, &key, new_connection, now);
    };
    // A local container's address does not come from outside: recording it
    // would let a forged packet replace that container's own flows.
    if network_of(f.src_addr).is_some_and(|n| n.flags & NETWORK_HOST_ADDR == 0) {
        return Err(Counter::Spoofed);
    }
    let (addr, port) = unsafe { ((*target).addr, (*target).port) };
    record_dnat_flow(&key, addr, port, now, tcp_state(f.tcp_flags), false)?;
    rewrite_dst(ctx, f, addr, port)?;
    Ok(Some(Counter::Dnat))
}

/// Inbound traffic that is neither a known flow nor a published port.
/// Containers of NAT and internal networks are reachable from outside only
/// through published ports (Docker's default); routed networks (masquerade
/// off) are, and their flows are recorded so the replies leave untranslated.
#[inline(always)]
fn unpublished_inbound(
    ctx: &TcContext,
    f: &Ipv4Flow,
    key: &CtKey,
    new_connection: bool,
    now: u64,
) -> Result<Option<Counter>, Counter> {
    let Some(net) = network_of(f.dst_addr) else {
        return Ok(None);
    };
    if net.flags & NETWORK_HOST_ADDR != 0 {
        return Ok(None); // an address of the host itself
    }
    // Within a routed network: from another host's block, routed here by
    // that host (its uplink's MAC, when it published one).
    if net.flags & NETWORK_ROUTED != 0 {
        if let Some(block) = ROUTED_BLOCKS.get(&Key::new(32, f.src_addr)) {
            if block.network == net.id {
                let src_mac: [u8; 6] =
                    unsafe { *ptr_at::<[u8; 6]>(ctx, 6).ok_or(Counter::Truncated)? };
                if block.host_mac != [0; 6] && src_mac != block.host_mac {
                    return Err(Counter::Spoofed);
                }
                return Ok(Some(Counter::Routed));
            }
        }
    }
    if net.flags & (NETWORK_MASQUERADE | NETWORK_INTERNAL) != 0 {
        return Err(Counter::NotPublished);
    }
    // Only a connection's opening packet creates the record: stray packets
    // cannot pre-seed the table.
    if new_connection || f.tcp_flags == 0 {
        record_routed_flow(key, now, tcp_state(f.tcp_flags))?;
    }
    Ok(None)
}

/// Both directions of a new published-port flow; the reply key is what the
/// container sends back. `hairpin`: the container is reaching its own port
/// (CT_FLAG_HAIRPIN: it sees the request come from the published address).
#[inline(always)]
fn record_dnat_flow(
    original: &CtKey,
    addr: [u8; 4],
    port: [u8; 2],
    now: u64,
    state: u8,
    hairpin: bool,
) -> Result<(), Counter> {
    let flags = if hairpin {
        CT_FLAG_DNAT | CT_FLAG_HAIRPIN
    } else {
        CT_FLAG_DNAT
    };
    let reply_key = CtKey {
        src_addr: addr,
        dst_addr: if hairpin {
            original.dst_addr
        } else {
            original.src_addr
        },
        src_port: port,
        dst_port: original.src_port,
        proto: original.proto,
        _pad: [0; 3],
    };
    let forward = entry(addr, port, CT_REWRITE_DST, flags | state, now);
    let reply = entry(
        original.dst_addr,
        original.dst_port,
        CT_REWRITE_SRC,
        flags,
        now,
    );
    put_flow(original, forward).map_err(|_| Counter::CtFull)?;
    if put_flow(&reply_key, reply).is_err() {
        let _ = NAT_CT.remove(original);
        return Err(Counter::CtFull);
    }
    Ok(())
}

/// The flags that say what kind of flow an entry belongs to.
const FLOW_KIND: u8 = CT_FLAG_DNAT | CT_FLAG_SNAT | CT_FLAG_ROUTED | CT_FLAG_HAIRPIN;

/// Records `e` under `key`, replacing what is there. Under load a new
/// connection often reuses a tuple still in the table (clients cycle through
/// their ~28,000 ephemeral ports in seconds, and a closed flow's entries
/// outlive it by the closing timeout), almost always with the same
/// translation: then only its timestamp and TCP state are reset, in place,
/// sparing a map update (which allocates an element and frees the old one,
/// several times the cost of the lookup). A translation is never written in
/// place: other CPUs may be reading the entry.
#[inline(always)]
fn put_flow(key: &CtKey, e: CtEntry) -> Result<(), i32> {
    if let Some(p) = NAT_CT.get_ptr_mut(key) {
        // SAFETY: `p` points at a live CtEntry of the map.
        unsafe {
            if (*p).addr == e.addr
                && (*p).port == e.port
                && (*p).rewrite == e.rewrite
                && (*p).flags & FLOW_KIND == e.flags & FLOW_KIND
            {
                (*p).last_seen_ns = e.last_seen_ns;
                (*p).flags = e.flags;
                return Ok(());
            }
        }
    }
    NAT_CT.insert(key, e, 0)
}

/// Both directions of a flow routed to a container without translation.
#[inline(always)]
fn record_routed_flow(original: &CtKey, now: u64, state: u8) -> Result<(), Counter> {
    let reply_key = CtKey {
        src_addr: original.dst_addr,
        dst_addr: original.src_addr,
        src_port: original.dst_port,
        dst_port: original.src_port,
        proto: original.proto,
        _pad: [0; 3],
    };
    let forward = entry([0; 4], [0; 2], CT_REWRITE_NONE, CT_FLAG_ROUTED | state, now);
    let reply = entry([0; 4], [0; 2], CT_REWRITE_NONE, CT_FLAG_ROUTED, now);
    put_flow(original, forward).map_err(|_| Counter::CtFull)?;
    put_flow(&reply_key, reply).map_err(|_| Counter::CtFull)
}

/// Traffic leaving by the uplink: replies of published-port flows and
/// packets of masqueraded flows get their source rewritten; the first
/// packet of a container's outbound flow creates the masquerade.
#[inline(always)]
pub fn egress(ctx: &TcContext, f: &Ipv4Flow) -> Result<Option<Counter>, Counter> {
    let now = now_ns();
    let key = key_of(f);
    if let Some(e) = NAT_CT.get_ptr_mut(&key) {
        let hit = touch(e, f, now);
        if hit.rewrite == CT_REWRITE_SRC {
            if hit.flags & CT_FLAG_SNAT != 0 {
                keep_reply_entry(&key, f, &hit, now);
            }
            rewrite_src(ctx, f, hit.addr, hit.port)?;
            return Ok(Some(if hit.flags & CT_FLAG_SNAT != 0 {
                Counter::Snat
            } else {
                Counter::RevDnat
            }));
        }
        if hit.rewrite == CT_REWRITE_NONE {
            return Ok(None);
        }
    }
    let src_flags = network_of(f.src_addr).map_or(0, |n| n.flags);
    if src_flags & NETWORK_INTERNAL != 0 {
        return Err(Counter::NotPublished);
    }
    if src_flags & NETWORK_MASQUERADE == 0 {
        return Ok(None);
    }
    let Some(config) = CONFIG.get(0) else {
        return Ok(None);
    };
    let host = config.host_addr;
    if host == [0; 4] {
        return Ok(None);
    }
    let state = tcp_state(f.tcp_flags);
    let port = allocate_snat(
        ctx,
        &key,
        host,
        (config.snat_port_min, config.snat_port_max),
        now,
        state,
    )?;
    rewrite_src(ctx, f, host, port)?;
    Ok(Some(Counter::Snat))
}

/// The table is an LRU: an outbound-only flow (UDP logs, say) never looks
/// its reply entry up, which would then be evicted first and its port
/// handed to another flow. Once a second at most, a forward hit refreshes
/// the reply entry, and puts it back if it was evicted.
#[inline(always)]
fn keep_reply_entry(key: &CtKey, f: &Ipv4Flow, hit: &Hit, now: u64) {
    if hit.idle_ns < 1_000_000_000 {
        return;
    }
    let forward = entry(hit.addr, hit.port, hit.rewrite, hit.flags, now);
    let reply_key = key.reverse_of(&forward);
    if NAT_CT.get_ptr(&reply_key).is_none() {
        let reply = entry(f.src_addr, f.src_port, CT_REWRITE_DST, CT_FLAG_SNAT, now);
        let _ = NAT_CT.insert(&reply_key, reply, u64::from(BPF_NOEXIST));
    }
}

/// Whether the host itself has a socket on `host:port` talking to the
/// peer (or bound to that port for anyone): giving the port to a container
/// would divert that socket's replies.
#[inline(always)]
fn host_socket_uses(ctx: &TcContext, original: &CtKey, host: [u8; 4], port: [u8; 2]) -> bool {
    #[repr(C)]
    struct Tuple {
        saddr: [u8; 4],
        daddr: [u8; 4],
        sport: [u8; 2],
        dport: [u8; 2],
    }
    // As a reply to that socket would arrive.
    let mut tuple = Tuple {
        saddr: original.dst_addr,
        daddr: host,
        sport: original.dst_port,
        dport: port,
    };
    let size = core::mem::size_of::<Tuple>() as u32;
    let t = (&mut tuple as *mut Tuple).cast();
    let sk = unsafe {
        match original.proto {
            IPPROTO_TCP => bpf_sk_lookup_tcp(ctx.as_ptr(), t, size, CURRENT_NETNS, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(ctx.as_ptr(), t, size, CURRENT_NETNS, 0),
            _ => return false,
        }
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// BPF_F_CURRENT_NETNS: look sockets up in the packet's namespace.
const CURRENT_NETNS: u64 = u64::MAX;

/// Claims a source port on `host` for a new masqueraded flow and records
/// both directions. The original port is kept when free; otherwise random
/// ports in [min, max] are tried. A port is free when no reply key on it
/// exists for this peer and no published port uses it.
#[inline(always)]
fn allocate_snat(
    ctx: &TcContext,
    original: &CtKey,
    host: [u8; 4],
    (min, max): (u16, u16),
    now: u64,
    state: u8,
) -> Result<[u8; 2], Counter> {
    let span = u32::from(max.saturating_sub(min)) + 1;
    let tries = if max > min { SNAT_TRIES } else { 1 };
    for i in 0..tries {
        let port = if i == 0 {
            original.src_port
        } else {
            let r = unsafe { bpf_get_prandom_u32() } % span;
            (min + r as u16).to_be_bytes()
        };
        let published = PortKey {
            addr: host,
            port,
            proto: original.proto,
            _pad: 0,
        };
        if PORTS.get_ptr(&published).is_some() || host_socket_uses(ctx, original, host, port) {
            continue;
        }
        let reply_key = CtKey {
            src_addr: original.dst_addr,
            dst_addr: host,
            src_port: original.dst_port,
            dst_port: port,
            proto: original.proto,
            _pad: [0; 3],
        };
        let reply = entry(
            original.src_addr,
            original.src_port,
            CT_REWRITE_DST,
            CT_FLAG_SNAT,
            now,
        );
        if NAT_CT
            .insert(&reply_key, reply, u64::from(BPF_NOEXIST))
            .is_err()
        {
            continue; // taken (or the table refuses): try another
        }
        let forward = entry(host, port, CT_REWRITE_SRC, CT_FLAG_SNAT | state, now);
        if NAT_CT.insert(original, forward, 0).is_err() {
            let _ = NAT_CT.remove(&reply_key);
            return Err(Counter::CtFull);
        }
        return Ok(port);
    }
    Err(Counter::SnatExhausted)
}

/// What NAT made of a packet a container sent.
pub enum ContainerNat {
    /// Rewritten (hairpin to a published port).
    Rewritten(Counter),
    /// Rewritten for the outside and to be sent straight out of the uplink.
    Forward(Counter, Route),
    /// A container reaching its own published port: rewritten both ways and
    /// to be sent straight back into it.
    Reflect(Counter),
    /// Part of a NATed flow, rewritten elsewhere (a reply, rewritten on the
    /// uplink or on the receiving container's veth).
    Related,
    /// Not a NATed flow.
    Unrelated,
}

/// Traffic a container sends (TC ingress on its host-side veth): hairpin
/// access to the host's published ports. Replies of published-port flows are
/// left alone here: rewritten to a host address before the host routes them,
/// they would be dropped as martians; the uplink or the receiving
/// container's veth rewrites them.
#[inline(always)]
pub fn container_egress(ctx: &TcContext, f: &Ipv4Flow) -> Result<ContainerNat, Counter> {
    let now = now_ns();
    let key = key_of(f);
    let new_connection = f.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    if let Some(e) = NAT_CT.get_ptr_mut(&key) {
        let hit = touch(e, f, now);
        if hit.flags & CT_FLAG_HAIRPIN != 0 && !new_connection {
            return reflect(ctx, f, &hit);
        }
        if hit.rewrite == CT_REWRITE_DST && hit.flags & CT_FLAG_DNAT != 0 && !new_connection {
            rewrite_dst(ctx, f, hit.addr, hit.port)?;
            return Ok(ContainerNat::Rewritten(Counter::Dnat));
        }
        if hit.rewrite == CT_REWRITE_SRC {
            // Bound outside and routed via the uplink: rewrite now and send
            // it out directly. Anything else is left to the kernel path and
            // rewritten on the uplink (or the receiving container's veth).
            if network_of(f.dst_addr).is_some() {
                return Ok(ContainerNat::Related);
            }
            let Some(route) = route_via_uplink(ctx, f.src_addr, f.dst_addr, f.proto) else {
                return Ok(ContainerNat::Related);
            };
            let snat = hit.flags & CT_FLAG_SNAT != 0;
            if snat {
                keep_reply_entry(&key, f, &hit, now);
            }
            rewrite_src(ctx, f, hit.addr, hit.port)?;
            let action = if snat {
                Counter::Snat
            } else {
                Counter::RevDnat
            };
            return Ok(ContainerNat::Forward(action, route));
        }
        if hit.rewrite == CT_REWRITE_NONE {
            return Ok(ContainerNat::Related);
        }
    }
    let port_key = PortKey {
        addr: f.dst_addr,
        port: f.dst_port,
        proto: f.proto,
        _pad: 0,
    };
    let target = if is_loopback(f.dst_addr) {
        None
    } else {
        PORTS.get_ptr(&port_key)
    };
    let Some(target) = target else {
        return masquerade_direct(ctx, f, &key, now);
    };
    let (addr, port) = unsafe { ((*target).addr, (*target).port) };
    let hairpin = addr == f.src_addr;
    record_dnat_flow(&key, addr, port, now, tcp_state(f.tcp_flags), hairpin)?;
    if hairpin {
        let hit = Hit {
            addr,
            port,
            rewrite: CT_REWRITE_DST,
            flags: CT_FLAG_DNAT | CT_FLAG_HAIRPIN,
            idle_ns: 0,
        };
        return reflect(ctx, f, &hit);
    }
    rewrite_dst(ctx, f, addr, port)?;
    Ok(ContainerNat::Rewritten(Counter::Dnat))
}

/// A packet of a container's flow to its own published port (see
/// CT_FLAG_HAIRPIN): the request from the container's address to the
/// published one becomes published address → container port; the reply
/// becomes published port → the container's address. The host's routing
/// would take neither (the first is addressed to the container it came from,
/// the second carries a host address as source), so both go straight back.
#[inline(always)]
fn reflect(ctx: &TcContext, f: &Ipv4Flow, hit: &Hit) -> Result<ContainerNat, Counter> {
    if hit.rewrite == CT_REWRITE_DST {
        rewrite_dst(ctx, f, hit.addr, hit.port)?;
        rewrite_src(ctx, f, f.dst_addr, f.src_port)?;
        Ok(ContainerNat::Reflect(Counter::Dnat))
    } else {
        rewrite_src(ctx, f, hit.addr, hit.port)?;
        rewrite_dst(ctx, f, f.src_addr, f.dst_port)?;
        Ok(ContainerNat::Reflect(Counter::RevDnat))
    }
}

/// The first packet of a container's flow to the outside: masqueraded here
/// and sent straight out when the FIB routes it via the uplink; otherwise
/// left to the uplink's egress program.
#[inline(always)]
fn masquerade_direct(
    ctx: &TcContext,
    f: &Ipv4Flow,
    key: &CtKey,
    now: u64,
) -> Result<ContainerNat, Counter> {
    if network_of(f.dst_addr).is_some()
        || network_of(f.src_addr).map_or(0, |n| n.flags) & NETWORK_MASQUERADE == 0
    {
        return Ok(ContainerNat::Unrelated);
    }
    let Some(config) = CONFIG.get(0) else {
        return Ok(ContainerNat::Unrelated);
    };
    let host = config.host_addr;
    if host == [0; 4] {
        return Ok(ContainerNat::Unrelated);
    }
    let Some(route) = route_via_uplink(ctx, f.src_addr, f.dst_addr, f.proto) else {
        return Ok(ContainerNat::Unrelated);
    };
    let range = (config.snat_port_min, config.snat_port_max);
    let port = allocate_snat(ctx, key, host, range, now, tcp_state(f.tcp_flags))?;
    rewrite_src(ctx, f, host, port)?;
    Ok(ContainerNat::Forward(Counter::Snat, route))
}

/// Traffic about to enter a container (TC egress on its host-side veth):
/// replies of hairpin flows get the published address back as source.
#[inline(always)]
pub fn container_ingress(ctx: &TcContext, f: &Ipv4Flow) -> Result<Option<Counter>, Counter> {
    let key = key_of(f);
    let Some(e) = NAT_CT.get_ptr_mut(&key) else {
        return Ok(None);
    };
    let hit = touch(e, f, now_ns());
    // Only replies bound for a container (the hook can also see traffic the
    // host itself sends into the bridge).
    if hit.rewrite != CT_REWRITE_SRC
        || hit.flags & CT_FLAG_DNAT == 0
        || network_of(f.dst_addr).is_none()
    {
        return Ok(None);
    }
    rewrite_src(ctx, f, hit.addr, hit.port)?;
    Ok(Some(Counter::RevDnat))
}
