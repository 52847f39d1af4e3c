//! Garbage collection of the NAT flow table. The datapath only refreshes
//! `last_seen_ns` and the TCP state bits; expiry is decided here, per flow
//! (both entries together), so one direction never outlives the other.
use std::collections::HashMap;

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData};
use netd_common::{CtEntry, CtKey, CtTimeouts};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub scanned: usize,
    pub removed: usize,
}

/// CLOCK_MONOTONIC in ns: the clock the datapath stamps flows with
/// (bpf_ktime_get_coarse_ns(), at most one tick behind).
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether the flow of `entry` (and its other direction `pair`, if present)
/// has been idle longer than its state allows.
fn expired(
    key: &CtKey,
    entry: &CtEntry,
    pair: Option<&CtEntry>,
    now_ns: u64,
    t: &CtTimeouts,
) -> bool {
    let last_seen = pair.map_or(entry.last_seen_ns, |p| {
        p.last_seen_ns.max(entry.last_seen_ns)
    });
    // A missing pair carries no state: judge by this direction alone.
    let pair_flags = pair.map_or(entry.flags, |p| p.flags);
    let timeout_ns = t
        .for_flow(key.proto, entry.flags, pair_flags)
        .saturating_mul(1_000_000_000);
    now_ns.saturating_sub(last_seen) > timeout_ns
}

/// Removes flows idle longer than their state's timeout at `now_ns`.
pub fn gc<T: std::borrow::BorrowMut<MapData>>(
    ct: &mut BpfHashMap<T, CtKey, CtEntry>,
    now_ns: u64,
    timeouts: &CtTimeouts,
) -> Result<GcReport> {
    // Snapshot first: deleting while walking a BPF hash restarts the walk.
    let entries: HashMap<CtKey, CtEntry> = ct.iter().filter_map(Result::ok).collect();
    let mut report = GcReport {
        scanned: entries.len(),
        removed: 0,
    };
    for (key, entry) in &entries {
        let pair = entries.get(&key.reverse_of(entry));
        if !expired(key, entry, pair, now_ns, timeouts) {
            continue;
        }
        // The datapath may have used or re-created the entry since the
        // snapshot: decide again on what it holds now.
        let Ok(current) = ct.get(key, 0) else {
            continue; // gone already (its pair's turn, or LRU)
        };
        if expired(key, &current, pair, now_ns, timeouts) && ct.remove(key).is_ok() {
            report.removed += 1;
        }
    }
    Ok(report)
}
