//! Load generators for the benchmarks, run from a client namespace against
//! a server: TCP request/response (RR), connect/request/response/close
//! (CRR) and bulk throughput. No netperf on this platform, so they are
//! written here, small and symmetric for every host under test; and the
//! round-robin measurement of several targets the benchmarks share.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{netns::NetNs, topology::Background};

/// Ports of the static echo/discard server (`tests/echo`).
pub const ECHO: u16 = 7;
pub const DISCARD: u16 = 9;

/// One thing measured: a client namespace and the server it loads.
pub struct Target {
    pub name: &'static str,
    pub client: NetNs,
    pub server: Ipv4Addr,
}

/// Metric → target → value.
pub type Results = BTreeMap<&'static str, BTreeMap<&'static str, f64>>;

/// RR, CRR and bulk of every target, `repeats` rounds of `run` each with
/// the targets interleaved (a slow spell of the machine hits them all),
/// the median kept.
pub fn measure(targets: &[Target], repeats: usize, run: Duration) -> Result<Results> {
    for t in targets {
        wait_reachable(&t.client, SocketAddrV4::new(t.server, ECHO))?;
    }
    let mut samples: BTreeMap<&str, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    for round in 0..repeats {
        for t in targets {
            eprintln!("round {}: {} …", round + 1, t.name);
            let echo = SocketAddrV4::new(t.server, ECHO);
            let discard = SocketAddrV4::new(t.server, DISCARD);
            let mut add = |metric: &'static str, v: f64| {
                samples
                    .entry(metric)
                    .or_default()
                    .entry(t.name)
                    .or_default()
                    .push(v);
            };
            add("RR (transactions/s)", rr(&t.client, echo, run)?);
            add("CRR (connections/s)", crr(&t.client, echo, run)?);
            add("bulk (Gbit/s)", bulk(&t.client, discard, run)? / 1e9);
        }
    }
    Ok(samples
        .into_iter()
        .map(|(m, hosts)| (m, hosts.into_iter().map(|(h, v)| (h, median(v))).collect()))
        .collect())
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `a / b` as "1.23x", or "-" without a base.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

/// Until `addr` answers a transaction from `ns` (30 s at most).
pub fn wait_reachable(ns: &NetNs, addr: SocketAddrV4) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while rr(ns, addr, Duration::from_millis(10)).is_err() {
        if Instant::now() > deadline {
            bail!("{addr} never answered");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The static echo/discard server `echo` as a plain process in `ns`,
/// pinned to the benchmark's CPU. (A container only holds the namespace:
/// its seccomp filter and cgroup are not what is measured.)
pub fn echo_server(ns: &NetNs, echo: &Path) -> Result<Background> {
    let child = ns
        .command("taskset")
        .args(["-c", &CPU.to_string()])
        .arg(echo)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting the echo server")?;
    Ok(Background::new(child))
}

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

/// `rules` (iptables-save output) loaded into `ns`: Docker's rules for a
/// container of a user-defined network (its embedded DNS's NAT, so
/// conntrack runs on every packet), given to the hand-made endpoints a
/// benchmark compares Docker's containers with.
pub fn restore_netfilter(ns: &NetNs, rules: &str) -> Result<()> {
    let mut child = ns
        .command("iptables-restore")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running iptables-restore (`cargo xtask setup` installs iptables)")?;
    child
        .stdin
        .take()
        .context("iptables-restore's stdin")?
        .write_all(rules.as_bytes())?;
    if !child.wait()?.success() {
        bail!("iptables-restore refused Docker's container rules:\n{rules}");
    }
    Ok(())
}

/// A namespace plugged into `host`'s bridge br0 as `eth0` with `addr`/24,
/// `mtu` and `mac`: a hand-made container.
pub fn bridge_endpoint(
    bench: &crate::Bench,
    host: &crate::Host,
    role: &str,
    addr: Ipv4Addr,
    mtu: u32,
    mac: &str,
) -> Result<NetNs> {
    let ns = bench.netns(role)?;
    let (outer, inner) = (format!("{role}-h"), format!("{role}-c"));
    // By namespace fd: the host's own mount namespace does not see
    // namespaces bound after it was made.
    crate::netlink::veth_between(&host.ns, &outer, &ns, &inner, "eth0")?;
    let mtu = mtu.to_string();
    host.ns.run_ok(
        "ip",
        &["link", "set", &outer, "master", "br0", "mtu", &mtu, "up"],
    )?;
    let inside = |args: &[&str]| ns.run_ok("ip", args).map(|_| ());
    inside(&["link", "set", "eth0", "address", mac, "mtu", &mtu, "up"])?;
    inside(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    Ok(ns)
}
