//! Bumping the per-CPU packet counters.
use netd_common::{Counter, Hook};

use crate::maps::COUNTERS;

/// Adds one packet of `len` bytes to `counter` for `hook`.
#[inline(always)]
pub fn count(hook: Hook, counter: Counter, len: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter.index(hook)) {
        // Per-CPU slot: no other CPU writes it, plain adds are race-free.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(len);
        }
    }
}
