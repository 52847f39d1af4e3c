//! Project automation: `cargo xtask setup | test | demo`.
//!
//! `setup` is idempotent and installs everything a fresh machine lacks: the
//! pinned nightly with rust-src (for the eBPF build), bpf-linker built
//! against that nightly's own libLLVM, and the Debian packages the tests use.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

/// Nightly for the eBPF crate (see shared/machine.md: rustc 1.97, LLVM 22).
/// netd/build.rs uses the same default; both honour NETD_EBPF_TOOLCHAIN.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The release the upgrade test starts from: the commit that resolved the
/// previous issue. Its netd is built from this repository's history.
const PREVIOUS_RELEASE: &str = "80cb63266e5686b97dd637a1fe753d2362157564";
/// Debian packages the test bench, the demo and the benchmarks run.
const DEBIAN_PACKAGES: &[&str] = &[
    "docker.io",
    "bpftool",
    "iproute2",
    "busybox-static",
    "iperf3",
    "iptables",
    "tar",
    "coreutils",
    // The test bench's uplinks segment UDP tunnel packets as a NIC would.
    "ethtool",
    // The cluster store: a real etcd for the multi-host tests, and what the
    // etcd-client crate's build needs to compile etcd's protos.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
    // systemd-analyze checks the shipped units (dist/systemd).
    "systemd",
];

#[derive(Parser)]
#[command(about = "netd project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install toolchains, bpf-linker and Debian packages (idempotent).
    Setup,
    /// Setup, lint, then every test: unit, eBPF (BPF_PROG_TEST_RUN),
    /// namespace and Docker end-to-end.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks (need root): `nat` compares published-port performance of
    /// netd with stock Docker (iptables, docker-proxy) on one emulated LAN;
    /// `overlay` container to container across hosts, netd's overlay with
    /// the kernel's (Docker's overlay datapath).
    Bench {
        #[arg(value_parser = ["nat", "overlay", "segment"])]
        which: String,
        /// Skip the 1,000 / 10,000 published-port runs (Docker with
        /// iptables needs ~20 minutes to publish 10,000 ports).
        #[arg(long)]
        quick: bool,
    },
    /// Build netd and run the demo in an emulated Docker host.
    Demo {
        /// Keep the topology up until Ctrl-C.
        #[arg(long)]
        hold: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::Test { args } => test(&args),
        Task::Demo { hold } => demo(hold),
        Task::Bench { which, quick } => bench(&which, quick),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (network namespaces, eBPF, dockerd): run it with sudo");
    }
    Ok(())
}

/// Space a build of the whole suite from a clean clone needs under target/,
/// measured with some headroom. A linker that runs out of disk dies with
/// SIGBUS and no word about space, so this is checked before building.
const SUITE_BUILD_BYTES: u64 = 8 << 30;

fn require_build_space() -> Result<()> {
    let root = workspace_root();
    let target = root.join("target");
    let probe = if target.exists() { target } else { root };
    let path = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs writes only into the struct it is given.
    let mut fs: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut fs) } != 0 {
        return Ok(()); // Unknown: let the build speak for itself.
    }
    let free = fs.f_bavail as u64 * fs.f_frsize as u64;
    let used = dir_size(&probe.join("debug"));
    if free + used < SUITE_BUILD_BYTES {
        bail!(
            "only {:.1} GiB free on the filesystem of {}; building the suite needs about {} GiB",
            free as f64 / f64::from(1 << 30),
            probe.display(),
            SUITE_BUILD_BYTES >> 30
        );
    }
    Ok(())
}

/// Bytes in files under `dir` (0 when it does not exist).
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            describe(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn setup() -> Result<()> {
    install_debian_packages()?;
    let sysroot = install_ebpf_toolchain()?;
    install_bpf_linker(&sysroot)?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn install_debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!("installing {}", missing.join(" ")))?;
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Installs the pinned nightly with rust-src; returns its sysroot.
fn install_ebpf_toolchain() -> Result<PathBuf> {
    let toolchain = ebpf_toolchain();
    let sysroot = |tc: &str| -> Option<PathBuf> {
        let out = Command::new("rustup")
            .args(["run", tc, "rustc", "--print", "sysroot"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    let has_src = |root: &Path| {
        root.join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .exists()
    };
    match sysroot(&toolchain) {
        Some(root) if has_src(&root) => return Ok(root),
        _ => {}
    }
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        &toolchain,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        "--no-self-update",
    ]))?;
    let root = sysroot(&toolchain).context("the nightly installed but rustc does not run")?;
    if !has_src(&root) {
        bail!("{toolchain} lacks rust-src after installing it");
    }
    Ok(root)
}

fn ebpf_toolchain() -> String {
    std::env::var("NETD_EBPF_TOOLCHAIN").unwrap_or_else(|_| EBPF_TOOLCHAIN.into())
}

/// The LLVM major version a rustc was built with.
fn rustc_llvm_major(toolchain: &str) -> Result<String> {
    let vv = output(Command::new("rustup").args(["run", toolchain, "rustc", "-vV"]))?;
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .context("rustc -vV does not name its LLVM version")
}

/// bpf-linker must link the same LLVM major as the nightly that emits the
/// bitcode; it is built against the libLLVM inside that nightly's sysroot.
fn install_bpf_linker(sysroot: &Path) -> Result<()> {
    let toolchain = ebpf_toolchain();
    let major = rustc_llvm_major(&toolchain)?;
    if bpf_linker_llvm_major().as_deref() == Some(major.as_str()) {
        return Ok(());
    }
    let lib = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib.display()))?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", sysroot))
}

/// The LLVM major the installed bpf-linker links, from its dynamic deps.
fn bpf_linker_llvm_major() -> Option<String> {
    let version = Command::new("bpf-linker").arg("--version").output().ok()?;
    if !String::from_utf8_lossy(&version.stdout).contains(BPF_LINKER_VERSION) {
        return None;
    }
    let path = output(Command::new("sh").args(["-c", "command -v bpf-linker"])).ok()?;
    let ldd = output(Command::new("ldd").arg(path.trim())).ok()?;
    if ldd.contains("not found") {
        return None;
    }
    ldd.split_whitespace()
        .find_map(|w| w.strip_prefix("libLLVM.so."))
        .or_else(|| {
            ldd.split_whitespace()
                .find_map(|w| w.strip_prefix("libLLVM-"))
        })
        .and_then(|v| v.split(['.', '-']).next())
        .map(str::to_owned)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn test(args: &[String]) -> Result<()> {
    require_root("cargo xtask test")?;
    require_build_space()?;
    setup()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The e2e suites run the real netd binary from target/debug.
    run(cargo().args(["build", "--package", "netd", "--bins"]))?;
    let previous = build_previous_release()?;
    run(cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(args)
        .env("NETD_PREVIOUS_BINARY", &previous)
        // A privileged test may never skip in CI; the bench panics instead.
        .env("CI", std::env::var("CI").unwrap_or_else(|_| "true".into())))
}

/// Builds the previous release's netd (for the upgrade test) from git
/// history into target/previous-release, once per release.
fn build_previous_release() -> Result<PathBuf> {
    let root = workspace_root();
    let dir = root.join("target/previous-release");
    let binary = dir.join("target/debug/netd");
    let stamp = dir.join("commit");
    if binary.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(PREVIOUS_RELEASE)
    {
        return Ok(binary);
    }
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    // `git archive`, not a worktree: nothing to clean up in .git.
    let archive = Command::new("git")
        .current_dir(&root)
        .args(["archive", "--format=tar", PREVIOUS_RELEASE])
        .output()
        .context("running git archive (the upgrade test needs the repository's history)")?;
    if !archive.status.success() {
        bail!(
            "git archive {PREVIOUS_RELEASE} failed: {}",
            String::from_utf8_lossy(&archive.stderr).trim()
        );
    }
    let mut untar = Command::new("tar")
        .current_dir(&src)
        .args(["-x", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running tar")?;
    std::io::Write::write_all(untar.stdin.as_mut().expect("piped"), &archive.stdout)?;
    drop(untar.stdin.take());
    if !untar.wait()?.success() {
        bail!("unpacking the previous release failed");
    }
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&src)
            .args(["build", "--package", "netd", "--bins", "--target-dir"])
            .arg(dir.join("target")),
    )?;
    std::fs::write(&stamp, PREVIOUS_RELEASE)?;
    Ok(binary)
}

fn demo(hold: bool) -> Result<()> {
    require_root("cargo xtask demo")?;
    setup()?;
    run(cargo().args([
        "build",
        "--package",
        "netd",
        "--package",
        "netd-tests",
        "--bins",
    ]))?;
    let mut cmd = Command::new(workspace_root().join("target/debug/demo"));
    if hold {
        cmd.arg("--hold");
    }
    run(&mut cmd)
}

fn bench(which: &str, quick: bool) -> Result<()> {
    require_root("cargo xtask bench")?;
    setup()?;
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "netd",
        "--package",
        "netd-tests",
        "--bins",
    ]))?;
    // The echo server runs inside busybox containers: link it statically.
    run(cargo()
        .args([
            "build",
            "--release",
            "--package",
            "netd-bench-echo",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--target-dir",
            "target/static",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
    let root = workspace_root();
    run(
        Command::new(root.join(format!("target/release/{which}-bench")))
            .args(quick.then_some("--quick"))
            .env("NETD_BIN", root.join("target/release/netd"))
            .env(
                "NETD_BENCH_ECHO",
                root.join("target/static/x86_64-unknown-linux-gnu/release/netd-bench-echo"),
            ),
    )
}
