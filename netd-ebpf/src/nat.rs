//! Published ports: DNAT of traffic arriving on the uplink and the reverse
//! rewrite of the container's replies leaving by it. Flows are recorded in
//! NAT_CT so a flow keeps its translation even if the port mapping changes
//! under it, and replies are recognised without a port lookup.
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use netd_common::{
    nat::{CT_DIR_ORIGINAL, CT_DIR_REPLY},
    Counter, CtEntry, CtKey, PortKey,
};

use crate::{
    checksum::{set_ipv4_addr, set_port, L4Offsets},
    maps::{NAT_CT, PORTS},
    parsing::{
        Ipv4Flow, IPPROTO_TCP, IPV4_CSUM, IPV4_DST, IPV4_SRC, TCP_CSUM, TCP_FLAG_ACK, TCP_FLAG_SYN,
        UDP_CSUM,
    },
};

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
        l4_csum: f.l4_offset
            + if f.proto == IPPROTO_TCP {
                TCP_CSUM
            } else {
                UDP_CSUM
            },
        proto: f.proto,
    }
}

/// Translates a packet arriving at a published port. `Ok(Some(Dnat))` when
/// rewritten, `Ok(None)` when no port applies, `Err(reason)` to drop.
#[inline(always)]
pub fn dnat_ingress(ctx: &TcContext, f: &Ipv4Flow) -> Result<Option<Counter>, Counter> {
    let now = unsafe { bpf_ktime_get_ns() };
    let key = key_of(f);
    // A bare SYN opens a new connection even if its 4-tuple was used before
    // (clients reuse ports quickly): it takes the current mapping and
    // replaces any entry left from the earlier connection.
    let new_connection = f.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    let existing = if new_connection {
        None
    } else {
        NAT_CT.get_ptr_mut(&key)
    };
    let (addr, port) = match existing {
        Some(entry) if unsafe { (*entry).direction } == CT_DIR_ORIGINAL => unsafe {
            (*entry).last_seen_ns = now;
            ((*entry).addr, (*entry).port)
        },
        _ => {
            let port_key = PortKey {
                addr: f.dst_addr,
                port: f.dst_port,
                proto: f.proto,
                _pad: 0,
            };
            let Some(target) = PORTS.get_ptr(&port_key) else {
                return Ok(None);
            };
            let (addr, port) = unsafe { ((*target).addr, (*target).port) };
            record_flow(&key, addr, port, now)?;
            (addr, port)
        }
    };
    let offs = offsets(f);
    // A failed helper leaves a half-rewritten packet: drop it rather than
    // deliver it wrong.
    set_port(ctx, &offs, f.l4_offset + 2, f.dst_port, port).map_err(|_| Counter::RewriteFailed)?;
    set_ipv4_addr(ctx, &offs, f.l3_offset + IPV4_DST, f.dst_addr, addr)
        .map_err(|_| Counter::RewriteFailed)?;
    Ok(Some(Counter::Dnat))
}

/// Both directions of a new flow; the reply key is what the container sends.
#[inline(always)]
fn record_flow(original: &CtKey, addr: [u8; 4], port: [u8; 2], now: u64) -> Result<(), Counter> {
    let forward = CtEntry {
        addr,
        port,
        direction: CT_DIR_ORIGINAL,
        _pad: 0,
        last_seen_ns: now,
    };
    let reply_key = CtKey {
        src_addr: addr,
        dst_addr: original.src_addr,
        src_port: port,
        dst_port: original.src_port,
        proto: original.proto,
        _pad: [0; 3],
    };
    let reply = CtEntry {
        addr: original.dst_addr,
        port: original.dst_port,
        direction: CT_DIR_REPLY,
        _pad: 0,
        last_seen_ns: now,
    };
    NAT_CT
        .insert(original, forward, 0)
        .map_err(|_| Counter::CtFull)?;
    if NAT_CT.insert(&reply_key, reply, 0).is_err() {
        let _ = NAT_CT.remove(original);
        return Err(Counter::CtFull);
    }
    Ok(())
}

/// Rewrites the source of a container's reply back to the published
/// address and port. `Ok(None)` when the packet is not a NATed reply.
#[inline(always)]
pub fn rev_dnat_egress(ctx: &TcContext, f: &Ipv4Flow) -> Result<Option<Counter>, Counter> {
    let key = key_of(f);
    let Some(entry) = NAT_CT.get_ptr_mut(&key) else {
        return Ok(None);
    };
    let (addr, port) = unsafe {
        if (*entry).direction != CT_DIR_REPLY {
            return Ok(None);
        }
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        ((*entry).addr, (*entry).port)
    };
    let offs = offsets(f);
    set_port(ctx, &offs, f.l4_offset, f.src_port, port).map_err(|_| Counter::RewriteFailed)?;
    set_ipv4_addr(ctx, &offs, f.l3_offset + IPV4_SRC, f.src_addr, addr)
        .map_err(|_| Counter::RewriteFailed)?;
    Ok(Some(Counter::RevDnat))
}
