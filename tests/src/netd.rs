//! The real `netd run` daemon inside an emulated host.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::netns::NetNs;

/// The netd binary under test: $NETD_BIN, else the one cargo built next to
/// this test executable (target/<profile>/netd).
pub fn netd_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NETD_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("netd");
        if candidate.is_file() {
            check_fresh(&candidate)?;
            return Ok(candidate);
        }
    }
    bail!(
        "netd binary not found next to {}: build it first (`cargo build -p netd`) or set NETD_BIN",
        exe.display()
    )
}

/// Refuses a netd binary older than the sources it is built from: `cargo
/// test` alone does not rebuild another package's binary, and testing a
/// stale daemon gives misleading results.
fn check_fresh(binary: &Path) -> Result<()> {
    let built = std::fs::metadata(binary)?.modified()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let mut stack: Vec<PathBuf> = ["netd/src", "netd-ebpf/src", "netd-common/src"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > built)
            {
                bail!(
                    "{} is older than {}: run `cargo build -p netd` first (`cargo xtask test` does)",
                    binary.display(),
                    path.display()
                );
            }
        }
    }
    Ok(())
}

pub struct Netd {
    child: Option<Child>,
    ns: NetNs,
    binary: PathBuf,
    docker_host: String,
    uplink: String,
    pin_dir: PathBuf,
    state_dir: PathBuf,
    options: NetdOptions,
}

/// How a test runs `netd run`.
#[derive(Clone, Debug)]
pub struct NetdOptions {
    /// NETD_LOG.
    pub log: String,
    /// More `netd run` flags.
    pub args: Vec<String>,
    /// Another netd build than this checkout's (the upgrade test's previous
    /// release).
    pub binary: Option<PathBuf>,
    /// A listening plugin socket handed over as systemd's socket activation
    /// does (fd 3, LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES=netd.sock): the
    /// test holds it across netd's restarts, as `netd.socket` does.
    pub systemd_socket: Option<Arc<std::os::unix::net::UnixListener>>,
    /// More environment (NOTIFY_SOCKET, …).
    pub env: Vec<(String, String)>,
}

impl Default for NetdOptions {
    fn default() -> Self {
        Self {
            log: "debug".into(),
            args: Vec::new(),
            binary: None,
            systemd_socket: None,
            env: Vec::new(),
        }
    }
}

/// `binary` run in `ns` with `socket` as systemd passes it: a shell sets
/// LISTEN_PID to its own pid and execs netd, which keeps it.
fn socket_activated(
    ns: &NetNs,
    binary: &Path,
    socket: &Arc<std::os::unix::net::UnixListener>,
) -> Command {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let mut cmd = ns.command("/bin/sh");
    cmd.arg("-c")
        .arg("export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=netd.sock; exec \"$0\" \"$@\"")
        .arg(binary);
    let fd = socket.as_raw_fd();
    // SAFETY: dup2 and fcntl are async-signal-safe; the socket outlives the
    // spawn (the options hold it).
    unsafe {
        cmd.pre_exec(move || {
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, 3) == 3
            };
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd
}

impl Netd {
    pub fn start(
        ns: &NetNs,
        docker_host: &str,
        uplink: &str,
        pin_dir: &Path,
        state_dir: &Path,
        options: NetdOptions,
    ) -> Result<Self> {
        let binary = match &options.binary {
            Some(b) => b.clone(),
            None => netd_binary()?,
        };
        let mut netd = Self {
            options,
            child: None,
            ns: ns.handle()?,
            binary,
            docker_host: docker_host.into(),
            uplink: uplink.into(),
            pin_dir: pin_dir.into(),
            state_dir: state_dir.into(),
        };
        netd.spawn()?;
        Ok(netd)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        // Readiness is judged on what this run writes, not earlier runs.
        let log_start = log.metadata()?.len() as usize;
        let mut command = match &self.options.systemd_socket {
            Some(socket) => socket_activated(&self.ns, &self.binary, socket),
            None => self.ns.command(&self.binary),
        };
        let child = command
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .arg("run")
            .arg("--docker-host")
            .arg(&self.docker_host)
            .arg("--uplink")
            .arg(&self.uplink)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(&self.options.args)
            .env("NETD_LOG", &self.options.log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting netd run")?;
        std::fs::write(self.state_dir.join("netd.pid"), child.id().to_string())?;
        self.child = Some(child);
        self.wait_ready(log_start)
    }

    /// Ready = this run's log says it reconciled with Docker once.
    fn wait_ready(&mut self, log_start: usize) -> Result<()> {
        let path = self.log_path();
        let this_run = || {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            log.get(log_start..).unwrap_or_default().trim().to_owned()
        };
        crate::process::wait_ready(
            self.child.as_mut(),
            "netd run",
            Duration::from_secs(30),
            || this_run().contains("in sync with Docker"),
            this_run,
        )
    }

    pub fn log_path(&self) -> PathBuf {
        self.state_dir.join("netd.log")
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM and wait: the datapath must stay pinned and working.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::terminate(child, Duration::from_secs(10));
        }
    }

    /// SIGKILL, as a crash would: no cleanup code of netd runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops this daemon (SIGTERM) and starts `binary` in its place, on the
    /// same pins: an upgrade.
    pub fn replace_with(&mut self, binary: PathBuf) -> Result<()> {
        self.stop();
        self.binary = binary;
        self.spawn()
    }

    /// Starts the daemon again on the same pins.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// Starts the daemon after [`Self::stop`] or [`Self::kill`].
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("netd is still running");
        }
        self.spawn()
    }

    /// Runs `netd <args…>` in the host's namespace.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.ns
            .command(&self.binary)
            .args(args)
            .output()
            .context("running netd")
    }

    /// `netd status --json` for this daemon's pin dir.
    pub fn status(&self) -> Result<Value> {
        let pin = self.pin_dir.display().to_string();
        let out = self.cli(&["status", "--json", "--pin-dir", &pin])?;
        if !out.status.success() {
            bail!(
                "netd status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `netd uninstall` for this daemon's pin dir.
    pub fn uninstall(&self) -> Result<()> {
        let pin = self.pin_dir.display().to_string();
        let out = self.cli(&["uninstall", "--pin-dir", &pin])?;
        if !out.status.success() {
            bail!(
                "netd uninstall failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// Packets of counter `name` at `hook` in a `netd status --json` document.
pub fn counter(status: &Value, hook: &str, name: &str) -> u64 {
    status["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["hook"] == hook)
        .flat_map(|h| h["counters"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["name"] == name)
        .map(|c| c["packets"].as_u64().unwrap_or(0))
        .sum()
}

impl Drop for Netd {
    fn drop(&mut self) {
        self.stop();
        if self.pin_dir.exists() {
            if let Err(e) = self.uninstall() {
                eprintln!("netd bench: {e:#}");
            }
        }
    }
}
