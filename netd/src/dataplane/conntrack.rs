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

/// CLOCK_MONOTONIC in ns: the clock bpf_ktime_get_ns() reads.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
        let pair_key = key.reverse_of(entry);
        let pair = entries.get(&pair_key);
        let last_seen = pair.map_or(entry.last_seen_ns, |p| {
            p.last_seen_ns.max(entry.last_seen_ns)
        });
        let flags = entry.flags | pair.map_or(0, |p| p.flags);
        let timeout_ns = timeouts
            .for_flow(key.proto, flags)
            .saturating_mul(1_000_000_000);
        if now_ns.saturating_sub(last_seen) > timeout_ns {
            // Missing already (its pair removed it, or LRU did): fine.
            if ct.remove(key).is_ok() {
                report.removed += 1;
            }
        }
    }
    Ok(report)
}
