//! netd's eBPF programs. One module per concern; this file only declares the
//! program entry points and wires them to those modules.
//!
//! The crate is built for `bpfel-unknown-none` by netd's build.rs. A host
//! `cargo check --workspace` also compiles it for the host (feature
//! unification gives netd-common its `user` feature there), so `no_std`,
//! `no_main` and the panic handler apply to the BPF target only.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod arp;
#[cfg(target_arch = "bpf")]
mod checksum;
#[cfg(target_arch = "bpf")]
mod container;
#[cfg(target_arch = "bpf")]
mod counters;
#[cfg(target_arch = "bpf")]
mod delivery;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod icmp_error;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod overlay;
#[cfg(target_arch = "bpf")]
mod parsing;
#[cfg(target_arch = "bpf")]
mod pmtu;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod routed;
#[cfg(target_arch = "bpf")]
mod segment;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod tunnel;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this only
    // satisfies the compiler.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
