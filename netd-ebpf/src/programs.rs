//! Program entry points, one per hook. Each turns the outcome of the concern
//! modules into exactly one verdict counter, one reason/action counter and a
//! TC action.
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
    Global,
};
use aya_log_ebpf::debug;
use netd_common::{Counter, Hook};

use network_types::eth::EthHdr;

use crate::{
    container,
    counters::count,
    delivery,
    icmp::{self, Side},
    nat,
    parsing::{ipv4_flow, parse_frame, unmatched, Ipv4Flow},
    pmtu, segment, sock, tunnel,
};

/// "Not ours", or rewritten and ready for the kernel to route: with TCX this
/// runs the next program on the hook, or the kernel's normal path.
const PASS: i32 = TC_ACT_UNSPEC;

/// Set to 1 by `netd run --debug-datapath`. It lives in .rodata, so with 0
/// the verifier removes the logging branches: no cost on the hot path.
#[unsafe(no_mangle)]
static NETD_DEBUG: Global<u8> = Global::new(0);

enum Outcome {
    /// Passed on; the counter says why (a reason) or what was done (an action).
    Pass(Counter),
    Drop(Counter),
    /// Rewritten (the counter says how) and redirected: `action` is the
    /// helper's TC verdict.
    Redirect(Counter, i32),
}

#[inline(always)]
fn finish(ctx: &TcContext, hook: Hook, outcome: Outcome) -> i32 {
    let len = ctx.len();
    let (verdict, detail, action) = match outcome {
        Outcome::Pass(c) => (Counter::Pass, c, PASS),
        Outcome::Drop(c) => (Counter::Drop, c, TC_ACT_SHOT as i32),
        Outcome::Redirect(c, action) => (Counter::Redirect, c, action),
    };
    if NETD_DEBUG.load() != 0 {
        debug!(
            ctx,
            "hook {} verdict {} detail {} len {}", hook as u32, verdict as u32, detail as u32, len
        );
    }
    count(hook, detail, len);
    count(hook, verdict, len);
    action
}

/// Parses, then hands IPv4 TCP/UDP/ICMP-echo flows to `act` and, on the
/// uplink (`icmp_side`), ICMP errors to the error translation.
#[inline(always)]
fn with_flow(
    ctx: &TcContext,
    icmp_side: Option<Side>,
    act: impl FnOnce(&TcContext, &Ipv4Flow) -> Result<Option<Counter>, Counter>,
) -> Outcome {
    let frame = match parse_frame(ctx) {
        Ok(frame) => frame,
        Err(reason) => return Outcome::Pass(reason),
    };
    match ipv4_flow(ctx, &frame) {
        Err(reason) => Outcome::Pass(reason),
        Ok(flow) if !flow.is_flow() => {
            match icmp_side.map(|side| icmp::translate_error(ctx, &frame, side)) {
                Some(Ok(Some(counter))) => Outcome::Pass(counter),
                Some(Err(reason)) => Outcome::Drop(reason),
                _ => Outcome::Pass(unmatched(&frame)),
            }
        }
        Ok(flow) => match act(ctx, &flow) {
            Ok(Some(action)) => Outcome::Pass(action),
            Ok(None) => Outcome::Pass(Counter::NoMatch),
            Err(reason) => Outcome::Drop(reason),
        },
    }
}

#[classifier]
pub fn netd_uplink_ingress(ctx: TcContext) -> i32 {
    // Only netd sets the mark, and only on packets it sends: one arriving
    // with it was set by someone else.
    delivery::take_translated(&ctx);
    if tunnel::is_ours(&ctx) {
        let outcome = match tunnel::decap(&ctx) {
            Ok(verdict) => Outcome::Redirect(Counter::VxlanDecap, verdict),
            Err(reason) => Outcome::Drop(reason),
        };
        return finish(&ctx, Hook::UplinkIngress, outcome);
    }
    if pmtu::learn(&ctx) {
        return finish(
            &ctx,
            Hook::UplinkIngress,
            Outcome::Pass(Counter::PmtuLearned),
        );
    }
    let outcome = match with_flow(&ctx, Some(Side::Ingress), nat::ingress) {
        // Now addressed to a container: deliver it there directly.
        Outcome::Pass(action @ (Counter::Dnat | Counter::RevSnat | Counter::Routed)) => {
            match delivery::to_container(&ctx, EthHdr::LEN) {
                Some(verdict) => Outcome::Redirect(action, verdict),
                None => Outcome::Pass(action),
            }
        }
        other => other,
    };
    finish(&ctx, Hook::UplinkIngress, outcome)
}

#[classifier]
pub fn netd_uplink_egress(ctx: TcContext) -> i32 {
    // Sent here by a container's veth program, which translated it.
    let outcome = if delivery::take_translated(&ctx) {
        Outcome::Pass(Counter::Translated)
    } else {
        with_flow(&ctx, Some(Side::Egress), nat::egress)
    };
    finish(&ctx, Hook::UplinkEgress, outcome)
}

#[classifier]
pub fn netd_container_egress(ctx: TcContext) -> i32 {
    // A container may set tc_index itself (its own tc programs), and veth
    // does not clear it: its packets must not pass anywhere as netd's.
    delivery::take_translated(&ctx);
    let outcome = match container::egress(&ctx) {
        Ok((action, Some(verdict))) => Outcome::Redirect(action, verdict),
        Ok((counter, None)) => Outcome::Pass(counter),
        Err(reason) => Outcome::Drop(reason),
    };
    finish(&ctx, Hook::ContainerEgress, outcome)
}

#[classifier]
pub fn netd_container_ingress(ctx: TcContext) -> i32 {
    // Reflected by the container's own egress program (self-hairpin).
    let outcome = if delivery::take_translated(&ctx) {
        Outcome::Pass(Counter::Translated)
    } else {
        // ICMP errors about hairpin flows, on their way into the client.
        with_flow(&ctx, Some(Side::Egress), nat::container_ingress)
    };
    finish(&ctx, Hook::ContainerIngress, outcome)
}

#[classifier]
pub fn netd_parent_ingress(ctx: TcContext) -> i32 {
    // What the uplink program would clear, if this parent is the uplink
    // too: this one runs first.
    delivery::take_translated(&ctx);
    let outcome = match segment::from_parent(&ctx) {
        Ok(segment::FromParent::Container(verdict)) => Outcome::Redirect(Counter::Demuxed, verdict),
        Ok(segment::FromParent::Host(counter)) => Outcome::Pass(counter),
        Err(reason @ Counter::RewriteFailed) => Outcome::Drop(reason),
        Err(reason) => Outcome::Pass(reason),
    };
    finish(&ctx, Hook::ParentIngress, outcome)
}

#[classifier]
pub fn netd_parent_egress(ctx: TcContext) -> i32 {
    // A segment container's frame, sent here by its veth's program: left
    // marked for the uplink's program, if this parent is the uplink too.
    let outcome = if delivery::is_translated(&ctx) {
        Outcome::Pass(Counter::Translated)
    } else {
        match segment::from_host(&ctx) {
            Ok(Some(verdict)) => Outcome::Redirect(Counter::Demuxed, verdict),
            Ok(None) => Outcome::Pass(Counter::NoMatch),
            Err(reason) => Outcome::Pass(reason),
        }
    };
    finish(&ctx, Hook::ParentEgress, outcome)
}

/// Socket hooks always allow the call (1); they only rewrite its address.
const SOCK_ALLOW: i32 = 1;

#[inline(always)]
fn count_sock(counter: Option<Counter>) -> i32 {
    if let Some(c) = counter {
        count(Hook::HostSockets, c, 0);
    }
    SOCK_ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn netd_host_connect4(ctx: SockAddrContext) -> i32 {
    count_sock(sock::translate_destination(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn netd_host_sendmsg4(ctx: SockAddrContext) -> i32 {
    count_sock(sock::translate_destination(&ctx))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn netd_host_recvmsg4(ctx: SockAddrContext) -> i32 {
    count_sock(sock::restore_source(&ctx))
}
