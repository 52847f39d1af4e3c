//! Map definitions. Names are the pin file names (netd_common::maps); BTF map
//! definitions so that `bpftool map dump` prints field names.
use aya_ebpf::{
    btf_maps::{Array, PerCpuArray},
    macros::btf_map,
};
use netd_common::{counters::COUNTER_SLOTS, CounterValue, Meta};

#[btf_map(name = "netd_counters")]
pub static COUNTERS: PerCpuArray<CounterValue, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

/// Written by the daemon only; the programs never read it. It lives in this
/// object so that it is created and pinned together with the other maps.
#[btf_map(name = "netd_meta")]
pub static META: Array<Meta, 1> = Array::new();
