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

/// Entries read per BPF_MAP_LOOKUP_BATCH call.
const BATCH: usize = 4096;
/// bpf(2) command numbers (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of union bpf_attr.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of the flow table, read BATCH at a time: one syscall per
/// few thousand entries, where iterating takes two per entry (a full table
/// is 262,144 entries, every 5 s). Falls back to iterating where batches
/// are refused.
fn snapshot<T: std::borrow::Borrow<MapData>>(
    ct: &BpfHashMap<T, CtKey, CtEntry>,
) -> Result<HashMap<CtKey, CtEntry>> {
    use aya::maps::IterableMap as _;
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = ct.map().fd().as_fd().as_raw_fd();
    let mut out = HashMap::new();
    let mut keys = vec![CtKey::default(); BATCH];
    let mut values = vec![CtEntry::default(); BATCH];
    // The hash map's batch cursor is a bucket index.
    let (mut cursor, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        let rc = super::pins::sys_bpf_mut(BPF_MAP_LOOKUP_BATCH, &mut attr);
        // On success, and with ENOENT (the end), the kernel wrote `count`
        // entries; on other errors `count` may be what we passed in.
        let end = matches!(&rc, Err(e) if e.raw_os_error() == Some(libc::ENOENT));
        if rc.is_ok() || end {
            let n = (attr.count as usize).min(BATCH);
            out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        }
        match rc {
            Ok(_) => {}
            Err(_) if end => return Ok(out),
            Err(e) if first && e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(ct.iter().filter_map(Result::ok).collect());
            }
            Err(e) => return Err(anyhow::Error::new(e).context("reading the flow table")),
        }
        cursor = next;
        first = false;
    }
}

/// Removes flows idle longer than their state's timeout at `now_ns`.
pub fn gc<T: std::borrow::BorrowMut<MapData>>(
    ct: &mut BpfHashMap<T, CtKey, CtEntry>,
    now_ns: u64,
    timeouts: &CtTimeouts,
) -> Result<GcReport> {
    // Snapshot first: deleting while walking a BPF hash restarts the walk.
    let entries = snapshot(ct)?;
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
