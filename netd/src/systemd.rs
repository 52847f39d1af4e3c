//! The two pieces of systemd's service protocol netd speaks, without
//! linking libsystemd: socket activation (the plugin socket handed over by
//! `netd.socket`, which systemd keeps listening across netd's restarts, so
//! dockerd's plugin calls wait in its backlog instead of failing) and the
//! readiness notification of `Type=notify`.
//!
//! Protocol (sd_listen_fds(3), sd_notify(3)): passed sockets start at fd 3,
//! `LISTEN_FDS` counts them, `LISTEN_PID` names the process they are for
//! (an inherited environment must not be taken for ours), and
//! `LISTEN_FDNAMES` names them, colon-separated. `NOTIFY_SOCKET` is a
//! datagram socket path, abstract when it starts with `@`.
use std::os::{
    fd::{FromRawFd as _, RawFd},
    unix::net::{SocketAddr, UnixDatagram, UnixListener},
};

use anyhow::{bail, Context as _, Result};

const FIRST_PASSED_FD: RawFd = 3;

/// The listening stream socket systemd passed for the Docker plugin, if
/// any: the one named `netd.sock` (the socket unit's FileDescriptorName,
/// systemd's default for `netd.socket` is `netd.socket`), else the only one.
/// The variables stay in the environment (changing it in a threaded process
/// is unsound); a child ignores them, as `LISTEN_PID` is not its pid.
pub fn plugin_listener() -> Result<Option<UnixListener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(None);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let count: RawFd = count
        .parse()
        .with_context(|| format!("LISTEN_FDS={count:?} is not a number"))?;
    if count < 1 {
        return Ok(None);
    }
    let names: Vec<&str> = names.split(':').collect();
    let pick = match names
        .iter()
        .position(|n| *n == "netd.sock" || *n == "netd.socket")
    {
        Some(i) if (i as RawFd) < count => i as RawFd,
        _ if count == 1 => 0,
        _ => bail!(
            "systemd passed {count} sockets ({}) and none is named netd.sock",
            names.join(", ")
        ),
    };
    let fd = FIRST_PASSED_FD + pick;
    check_listening_unix_stream(fd)?;
    // The others are not netd's to use; they must not leak into children.
    for other in (0..count).filter(|i| *i != pick) {
        let _ = nix::fcntl::fcntl(
            FIRST_PASSED_FD + other,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("marking the passed plugin socket close-on-exec")?;
    // SAFETY: fd is open (checked above), a listening socket, and owned by
    // nothing else in this process: this function runs once, at start.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    listener
        .set_nonblocking(true)
        .context("making the passed plugin socket non-blocking")?;
    Ok(Some(listener))
}

fn check_listening_unix_stream(fd: RawFd) -> Result<()> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockType};
    use std::os::fd::BorrowedFd;
    // SAFETY: only borrowed for these queries; failures are reported.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let kind = getsockopt(&borrowed, sockopt::SockType)
        .with_context(|| format!("fd {fd} passed by systemd is not a socket"))?;
    let listening = getsockopt(&borrowed, sockopt::AcceptConn).unwrap_or(false);
    let unix = getsockname::<nix::sys::socket::UnixAddr>(fd)
        .map(|a| nix::sys::socket::SockaddrLike::family(&a) == Some(AddressFamily::Unix))
        .unwrap_or(false);
    if kind != SockType::Stream || !listening || !unix {
        bail!("fd {fd} passed by systemd is not a listening unix stream socket (check netd.socket's ListenStream=)");
    }
    Ok(())
}

/// Tells systemd the service is ready (`Type=notify`): the datapath is
/// attached and the plugin serves. A no-op outside systemd.
pub fn notify_ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}\n"));
}

/// The one-line status `systemctl status netd` shows.
pub fn notify_status(status: &str) {
    notify(&format!("STATUS={status}\n"));
}

/// A failed notification is logged, not fatal: the datapath works either
/// way, and systemd reports a start timeout itself.
fn notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let path = path.to_string_lossy();
        let addr = match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None => SocketAddr::from_pathname(path.as_ref())?,
        };
        UnixDatagram::unbound()?.send_to_addr(message.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!("notifying systemd: {e}");
    }
}
