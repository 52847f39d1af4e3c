//! Load generators for the NAT benchmark, run from a client namespace
//! against a published port: TCP request/response (RR), connect/request/
//! response/close (CRR) and bulk throughput. No netperf on this platform, so
//! they are written here, small and symmetric for every host under test.
use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::netns::NetNs;

/// Request and response size.
pub const MESSAGE: usize = 64;

/// The CPU the load generator and the server under test share. On one CPU a
/// transaction's rate is set by the work done for it — syscalls, the stack,
/// and the datapath under test — not by how fast the (virtual) machine wakes
/// a thread on another CPU, which varies by more than the datapaths differ.
pub const CPU: usize = 0;

fn pin_to_cpu() -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(CPU)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .context("pinning the load generator")?;
    Ok(())
}

fn connect(addr: SocketAddrV4) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

fn transact(s: &mut TcpStream, buf: &mut [u8; MESSAGE]) -> Result<()> {
    s.write_all(buf)?;
    s.read_exact(buf).context("no response")?;
    Ok(())
}

/// Transactions per second over one connection.
pub fn rr(ns: &NetNs, addr: SocketAddrV4, duration: Duration) -> Result<f64> {
    ns.enter(|| {
        pin_to_cpu()?;
        let mut s = connect(addr)?;
        let mut buf = [0x5a; MESSAGE];
        // Warm up: the first transaction sets up the flow everywhere.
        transact(&mut s, &mut buf)?;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < duration {
            transact(&mut s, &mut buf)?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
}

/// New connections per second, each carrying one transaction. Connections
/// end with RST (SO_LINGER 0) so the client's ports do not pile up in
/// TIME_WAIT.
pub fn crr(ns: &NetNs, addr: SocketAddrV4, duration: Duration) -> Result<f64> {
    ns.enter(|| {
        pin_to_cpu()?;
        let mut buf = [0x5a; MESSAGE];
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < duration {
            let mut s = connect(addr)?;
            transact(&mut s, &mut buf)?;
            set_linger_zero(&s);
            drop(s);
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
}

fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a linger struct of the size passed.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Bits per second sent to a discard server over one connection.
pub fn bulk(ns: &NetNs, addr: SocketAddrV4, duration: Duration) -> Result<f64> {
    ns.enter(|| {
        pin_to_cpu()?;
        let mut s = connect(addr)?;
        let buf = vec![0xa5u8; 128 * 1024];
        let start = Instant::now();
        let mut bytes = 0u64;
        while start.elapsed() < duration {
            s.write_all(&buf)?;
            bytes += buf.len() as u64;
        }
        Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64())
    })
}
