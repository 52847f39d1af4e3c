//! Program entry points, one per hook. Each turns the outcome of the concern
//! modules into exactly one verdict counter and a TC action.
use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext, Global};
use aya_log_ebpf::debug;
use netd_common::{Counter, Hook};

use crate::{
    counters::count,
    parsing::{parse_frame, Ip},
};

/// "Not ours": with TCX this runs the next program on the hook, or the
/// kernel's normal path when there is none. netd coexists with other TC users.
const PASS: i32 = TC_ACT_UNSPEC;

/// Set to 1 by `netd run --debug-datapath`. It lives in .rodata, so with 0
/// the verifier removes the logging branches: no cost on the hot path.
#[unsafe(no_mangle)]
static NETD_DEBUG: Global<u8> = Global::new(0);

/// Classifies a frame that netd has no rule for yet: why it is passed.
#[inline(always)]
fn observe(ctx: &TcContext, hook: Hook) -> i32 {
    let reason = match parse_frame(ctx) {
        Ok(frame) => match frame.ip {
            Ip::V4 {
                later_fragment: true,
                ..
            } => Counter::Fragment,
            Ip::V4 { .. } | Ip::V6 { .. } => Counter::NoMatch,
        },
        Err(reason) => reason,
    };
    let len = ctx.len();
    if NETD_DEBUG.load() != 0 {
        debug!(
            ctx,
            "hook {} pass reason {} len {}", hook as u32, reason as u32, len
        );
    }
    count(hook, reason, len);
    count(hook, Counter::Pass, len);
    PASS
}

#[classifier]
pub fn netd_uplink_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, Hook::UplinkIngress)
}

#[classifier]
pub fn netd_uplink_egress(ctx: TcContext) -> i32 {
    observe(&ctx, Hook::UplinkEgress)
}

#[classifier]
pub fn netd_container_egress(ctx: TcContext) -> i32 {
    observe(&ctx, Hook::ContainerEgress)
}
