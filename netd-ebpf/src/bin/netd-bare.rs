//! The "physical limit" for benchmarks: a TC program that does what netd's
//! fast path ends with — a redirect — and nothing else (no parsing, no map
//! lookups). `cargo xtask bench nat` reports each netd program path's cost
//! per packet against this one, measured the same way (BPF_PROG_TEST_RUN).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod bare {
    use aya_ebpf::{helpers::bpf_redirect, macros::classifier, programs::TcContext};

    #[classifier]
    pub fn netd_bare_redirect(_ctx: TcContext) -> i32 {
        // ifindex 1 (lo) always exists; the test runner does not redirect.
        unsafe { bpf_redirect(1, 0) as i32 }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
