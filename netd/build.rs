//! Builds netd-ebpf for the BPF target with the pinned nightly and bpf-linker
//! (installed by `cargo xtask setup`) and leaves the object in OUT_DIR.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// The nightly whose LLVM bpf-linker is built against. Override with
/// NETD_EBPF_TOOLCHAIN; keep in sync with xtask's setup.
const DEFAULT_EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NETD_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("NETD_EBPF_TOOLCHAIN").unwrap_or_else(|_| DEFAULT_EBPF_TOOLCHAIN.into());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("netd has no parent directory"))?
        .join("netd-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "netd-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` to install the pinned nightly and bpf-linker")
}
