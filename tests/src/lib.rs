//! netd's test bench: emulated Docker hosts in network namespaces, wired by
//! veth into LANs; dockerd and netd per host; packet builders for eBPF unit
//! tests. Used by the e2e suites, the benchmarks and the demo.
//!
//! Everything a bench creates carries this process's PID in its name and is
//! removed on drop (also when a test panics). A later bench removes what a
//! crashed run (dead PID) left behind.
pub mod bench;
pub mod docker;
pub mod ebpf;
pub mod etcd;
pub mod netd;
pub mod netlink;
pub mod netns;
pub mod packet;
pub mod process;
pub mod raw;
pub mod topology;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

pub use docker::DockerMode;
pub use netns::NetNs;
pub use topology::{Host, Lan};

/// Where benches keep daemon state and their private bpffs mounts.
pub const STATE_ROOT: &str = "/run/netd-tests";
/// Prefix of every namespace a bench creates.
const NS_PREFIX: &str = "netdt-";

static BENCH_SEQ: AtomicU32 = AtomicU32::new(0);
/// Benches alive in this process: the last one out removes the shared test
/// image build dir.
static LIVE_BENCHES: AtomicU32 = AtomicU32::new(0);

/// Returns Ok(true) when privileged tests can run. Without root they are
/// skipped with a message, except in CI (CI=true) where that is a failure.
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("privileged test cannot run without root, and CI=true forbids skipping");
    }
    eprintln!("skipping privileged test: not root");
    false
}

/// Polls `f` every 20 ms until it returns true (true) or `limit` passes
/// (false).
pub fn eventually(limit: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// One test's private world: a state dir, a private bpffs mount, and a
/// counter for unique names.
pub struct Bench {
    id: String,
    state_dir: PathBuf,
    bpffs: PathBuf,
    names: AtomicU32,
}

impl Bench {
    pub fn new() -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the test bench needs root (network namespaces, dockerd, bpffs)");
        }
        sweep_leftovers();
        let id = format!(
            "{}-{}",
            std::process::id(),
            BENCH_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let state_dir = Path::new(STATE_ROOT).join(&id);
        let bpffs = state_dir.join("bpffs");
        std::fs::create_dir_all(&bpffs)?;
        mount(
            Some("bpf"),
            &bpffs,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting bpffs at {}", bpffs.display()))?;
        LIVE_BENCHES.fetch_add(1, Ordering::SeqCst);
        Ok(Self {
            id,
            state_dir,
            bpffs,
            names: 0.into(),
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// A bpffs mount private to this bench: pin dirs go below it.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// A copy of `program` that any user can run: in this bench's state dir,
    /// with every directory from `/` down to it traversable by others (the
    /// original may be in a checkout below /root or a 0700 temp dir).
    pub fn world_executable(&self, program: &Path) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = self.state_dir.join("bin");
        std::fs::create_dir_all(&dir)?;
        let name = program
            .file_name()
            .context("program path has no file name")?;
        let copy = dir.join(name);
        std::fs::copy(program, &copy)
            .with_context(|| format!("copying {} to {}", program.display(), copy.display()))?;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
        // The bench made these directories; a umask may have closed them.
        for d in [Path::new(STATE_ROOT), &self.state_dir, &dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        for ancestor in copy.ancestors().skip(1) {
            let mode = std::fs::metadata(ancestor)?.permissions().mode();
            if mode & 0o001 == 0 {
                bail!("{} is not traversable by other users", ancestor.display());
            }
        }
        Ok(copy)
    }

    /// A fresh namespace named after this bench and `role`.
    pub fn netns(&self, role: &str) -> Result<NetNs> {
        let n = self.names.fetch_add(1, Ordering::Relaxed);
        NetNs::create(&format!("{NS_PREFIX}{}-{n}-{role}", self.id))
    }

    /// A LAN with the /24 `198.18.<third>.0`.
    pub fn lan(&self, third: u8) -> Result<Lan> {
        Lan::new(self.netns("lan")?, [198, 18, third])
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        process::unmount_under(&self.state_dir);
        let _ = std::fs::remove_dir_all(&self.state_dir);
        if LIVE_BENCHES.fetch_sub(1, Ordering::SeqCst) == 1 {
            docker::remove_test_image_dir();
        }
    }
}

/// Removes namespaces, daemons, mounts and state of bench runs whose process
/// is gone.
fn sweep_leftovers() {
    let dead = |name: &str| -> bool {
        name.split(['-', '/'])
            .find_map(|part| part.parse::<i32>().ok())
            .is_some_and(|pid| !process::alive(pid))
    };
    if let Ok(entries) = std::fs::read_dir(netns::NETNS_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(NS_PREFIX) {
                if dead(rest) {
                    netns::delete_netns(&e.path());
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(STATE_ROOT) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_prefix("image-").unwrap_or(&name);
            if !dead(stem) {
                continue;
            }
            let dir = e.path();
            for pidfile in find_files(&dir, &["docker.pid", "netd.pid", "etcd.pid"]) {
                if let Some(pid) = std::fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    process::kill_leftover(pid, &dir.display().to_string());
                }
            }
            process::unmount_under(&dir);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

fn find_files(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() && !p.ends_with("data") && !p.ends_with("bpffs") {
                stack.push(p);
            } else if names.iter().any(|n| p.file_name().is_some_and(|f| f == *n)) {
                out.push(p);
            }
        }
    }
    out
}

/// Unmounts a bpffs mount point (used by tests that make their own).
pub fn unmount(path: &Path) {
    let _ = umount2(path, MntFlags::MNT_DETACH);
}
