//! Ending what the bench started: by PID, gracefully first.
use std::{
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use nix::{
    mount::{umount2, MntFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps. With
/// `whole_group`, the SIGKILL also reaches the child's process group (a
/// child spawned as group leader, so helpers such as dockerd's containerd
/// die with it).
pub fn terminate_group(mut child: Child, grace: Duration, whole_group: bool) {
    let pid = Pid::from_raw(child.id() as i32);
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if whole_group {
        let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps.
pub fn terminate(child: Child, grace: Duration) {
    terminate_group(child, grace, false)
}

/// Polls `ready` until it holds; fails, saying `what` and `tail()` (the end
/// of its log), when `child` exits first or `limit` passes.
pub fn wait_ready(
    child: Option<&mut Child>,
    what: &str,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
    tail: impl Fn() -> String,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut child = child;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            anyhow::bail!("{what} exited ({status}): {}", tail());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what} not ready in {limit:?}: {}", tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` lines of the log at `path`, on one line.
pub fn log_tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Is `pid` alive (and not a zombie)?
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Kills a process a crashed earlier run started, if `pid` still runs a
/// command line that mentions `marker` (so a recycled PID is left alone).
pub fn kill_leftover(pid: i32, marker: &str) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(marker) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Lazily unmounts every mount at or below `dir` (dockerd's overlay, netns
/// and shm mounts that a crash left behind), deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = umount2(p, MntFlags::MNT_DETACH);
    }
}
