//! Emulated hosts and the LAN between them.
use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};

use crate::{
    docker::{DockerMode, Dockerd},
    netd::{Netd, NetdOptions},
    netlink::{add_address, add_route, veth_between, with_netlink},
    netns::NetNs,
    Bench,
};

/// Name of every emulated host's LAN interface.
pub const UPLINK: &str = "eth0";

/// An L2 segment: a bridge in a switch namespace of its own.
pub struct Lan {
    ns: NetNs,
    /// First three octets of the /24, inside 198.18.0.0/15.
    prefix: [u8; 3],
    ports: std::sync::atomic::AtomicU32,
}

impl Lan {
    pub(crate) fn new(ns: NetNs, prefix: [u8; 3]) -> Result<Self> {
        crate::netlink::add_bridge(&ns, "lan")?;
        let lan = Self {
            ns,
            prefix,
            ports: 0.into(),
        };
        lan.plain_switch()?;
        Ok(lan)
    }

    /// Keeps the switch a plain L2 switch. Once a stock dockerd has loaded
    /// br_netfilter, every bridge in a namespace whose bridge-nf-call-*
    /// sysctls are 1 (the default in a new namespace) sends its frames
    /// through netfilter: a real switch does not, and in the benchmark that
    /// would add the same overhead to every host under test. Call again after
    /// starting a stock dockerd (the sysctls appear with the module).
    pub fn plain_switch(&self) -> Result<()> {
        for family in ["iptables", "ip6tables", "arptables"] {
            let key = format!("net.bridge.bridge-nf-call-{family}");
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            let present = self.ns.enter(|| Ok(std::path::Path::new(&path).exists()))?;
            if present {
                self.ns.sysctl(&key, "0")?;
            }
        }
        Ok(())
    }

    /// The LAN address with host part `host`.
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], host)
    }

    /// Plugs `ns` into the LAN as `eth0` with address `.host`/24.
    pub fn attach(&self, ns: &NetNs, host: u8) -> Result<Ipv4Addr> {
        self.attach_as(ns, host, UPLINK)
    }

    /// [`Self::attach`] as interface `ifname` (a router's second leg).
    pub fn attach_as(&self, ns: &NetNs, host: u8, ifname: &str) -> Result<Ipv4Addr> {
        let port = self
            .ports
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (sw, tmp) = (format!("p{port}"), format!("t{port}"));
        veth_between(&self.ns, &sw, ns, &tmp, ifname)?;
        crate::netlink::enslave(&self.ns, &sw, "lan")?;
        let ip = self.ip(host);
        let name = ifname.to_owned();
        with_netlink(ns, |h| async move { add_address(&h, &name, ip, 24).await })?;
        // A veth hands GSO packets to its peer whole, across namespaces: on
        // this LAN a 64 KB UDP-tunnel packet would arrive at the other host
        // in one piece, as it never does off a wire. A NIC without UDP
        // tunnel segmentation offload segments it in software when sending;
        // so does this uplink now.
        ns.run_ok(
            "ethtool",
            &[
                "-K",
                ifname,
                "tx-udp_tnl-segmentation",
                "off",
                "tx-udp_tnl-csum-segmentation",
                "off",
            ],
        )
        .context(
            "turning UDP tunnel segmentation off (is ethtool installed? `cargo xtask setup`)",
        )?;
        Ok(ip)
    }
}

/// A network namespace standing in for a machine: a LAN address, maybe a
/// dockerd and a netd of its own. Dropped in field order: dockerd (its
/// containers leave their netd networks through netd's plugin, which must
/// still answer), netd, ns.
pub struct Host {
    pub docker: Option<Dockerd>,
    pub netd: Option<Netd>,
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    state_dir: std::path::PathBuf,
}

impl Host {
    /// A plain host on `lan` (a client or server, no Docker).
    pub fn plain(bench: &Bench, lan: &Lan, role: &str, host: u8) -> Result<Self> {
        let mut ns = bench.netns(role)?;
        let ip = lan.attach(&ns, host)?;
        let state_dir = bench.state_dir().join(ns.name());
        std::fs::create_dir_all(&state_dir)?;
        ns.give_mounts(&state_dir)?;
        Ok(Self {
            netd: None,
            docker: None,
            ns,
            ip,
            state_dir,
        })
    }

    /// A Docker host on `lan` whose containers get `bridge_subnet` (a /24
    /// given by its first three octets; the bridge is .1).
    pub fn docker(
        bench: &Bench,
        lan: &Lan,
        role: &str,
        host: u8,
        bridge_subnet: [u8; 3],
        mode: DockerMode,
    ) -> Result<Self> {
        let mut h = Self::plain(bench, lan, role, host)?;
        h.ns.sysctl("net.ipv4.ip_forward", "1")?;
        let bip = format!(
            "{}.{}.{}.1/24",
            bridge_subnet[0], bridge_subnet[1], bridge_subnet[2]
        );
        h.docker = Some(Dockerd::start(
            &h.ns,
            &h.state_dir.join("docker"),
            &bip,
            mode,
        )?);
        Ok(h)
    }

    /// A Docker host (its bridge subnet 198.19.`host`.0/24) running netd
    /// as a member of the cluster at `etcd` under the node name `role`,
    /// with `extra` flags of the test's own.
    pub fn cluster_member(
        bench: &Bench,
        lan: &Lan,
        role: &str,
        host: u8,
        etcd: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut h = Self::docker(bench, lan, role, host, [198, 19, host], DockerMode::Netd)?;
        let mut args: Vec<String> = ["--etcd", etcd, "--node-name", role]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        h.start_netd_with(
            bench,
            NetdOptions {
                args,
                ..NetdOptions::default()
            },
        )?;
        Ok(h)
    }

    /// `docker network create -d netd --ipam-driver netd --subnet SUBNET
    /// [extra…] NAME` on this host.
    pub fn create_netd_network(&self, name: &str, subnet: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["network", "create", "-d", "netd", "--ipam-driver", "netd"];
        args.extend_from_slice(&["--subnet", subnet]);
        args.extend_from_slice(extra);
        args.push(name);
        self.dockerd().docker(&args)
    }

    /// The names of this host's Docker networks of driver netd.
    pub fn netd_networks(&self) -> Result<Vec<String>> {
        Ok(self
            .dockerd()
            .docker(&[
                "network",
                "ls",
                "--filter",
                "driver=netd",
                "--format",
                "{{.Name}}",
            ])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Whether this host's Docker lists exactly the netd networks `want`
    /// within `limit` (a network created on another host arriving here).
    pub fn sees_netd_networks(&self, want: &[&str], limit: std::time::Duration) -> bool {
        crate::eventually(limit, || {
            self.netd_networks()
                .is_ok_and(|names| names.iter().map(String::as_str).eq(want.iter().copied()))
        })
    }

    /// The IPv4 address of container `name` (its only network's).
    pub fn container_addr(&self, name: &str) -> Result<std::net::Ipv4Addr> {
        let out = self.dockerd().docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            name,
        ])?;
        out.trim()
            .parse()
            .with_context(|| format!("{name} has no single IPv4 address ({out:?})"))
    }

    /// This host's /run/docker/plugins, as the bench sees it: where a
    /// test stands in for systemd's `netd.socket`.
    pub fn plugin_dir(&self) -> std::path::PathBuf {
        self.state_dir.join("plugins")
    }

    pub fn dockerd(&self) -> &Dockerd {
        self.docker.as_ref().expect("host has no dockerd")
    }

    pub fn netd(&mut self) -> &mut Netd {
        self.netd.as_mut().expect("host runs no netd")
    }

    /// Starts netd in this host against its dockerd, pinned on the bench's
    /// private bpffs.
    pub fn start_netd(&mut self, bench: &Bench) -> Result<()> {
        self.start_netd_with(bench, NetdOptions::default())
    }

    /// [`Self::start_netd`] with a log filter and flags of the test's own.
    pub fn start_netd_with(&mut self, bench: &Bench, options: NetdOptions) -> Result<()> {
        let pin_dir = bench.bpffs().join(self.ns.name());
        let netd = Netd::start(
            &self.ns,
            &self.dockerd().host(),
            UPLINK,
            &pin_dir,
            &self.state_dir,
            options,
        )?;
        self.netd = Some(netd);
        Ok(())
    }

    /// Routes `subnet`/24 via `gateway` (e.g. a Docker host's container subnet).
    pub fn route(&self, subnet: [u8; 3], gateway: Ipv4Addr) -> Result<()> {
        let dest = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 0);
        with_netlink(&self.ns, |h| async move {
            add_route(&h, dest, 24, gateway).await
        })
    }

    /// HTTP GET from this host; the body on success. (busybox wget's own -T
    /// timeout crashes in Debian's busybox 1.35, so coreutils' timeout
    /// bounds it.)
    pub fn http_get(&self, url: &str) -> Result<String> {
        self.http_get_within(url, 10)
    }

    /// [`Self::http_get`] bounded to `secs` seconds.
    pub fn http_get_within(&self, url: &str, secs: u32) -> Result<String> {
        let out = self.ns.run(
            "timeout",
            &[&secs.to_string(), "busybox", "wget", "-q", "-O", "-", url],
        )?;
        if !out.status.success() {
            anyhow::bail!(
                "GET {url} from {} failed ({}): {}",
                self.ns.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Serves HTTP on port 80 from this host (not a container): `/` says
    /// hello, `/cgi-bin/peer` answers the client's address as it arrived.
    pub fn serve_http(&self) -> Result<Background> {
        let root = self.state_dir.join("www");
        let cgi = root.join("cgi-bin");
        std::fs::create_dir_all(&cgi)?;
        std::fs::write(root.join("index.html"), "hello from the LAN\n")?;
        let script = cgi.join("peer");
        std::fs::write(
            &script,
            "#!/bin/busybox sh\necho 'Content-Type: text/plain'\necho\necho \"$REMOTE_ADDR\"\n",
        )?;
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(&script)?.permissions(),
            0o755,
        );
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let child = self
            .ns
            .command("busybox")
            .args(["httpd", "-f", "-p", "80", "-h"])
            .arg(&root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let bg = Background { child: Some(child) };
        // Ready when it answers on its own address.
        for _ in 0..100 {
            if self
                .http_get_within(&format!("http://{}/", self.ip), 2)
                .is_ok()
            {
                return Ok(bg);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        anyhow::bail!("busybox httpd did not come up in {}", self.ns.name())
    }

    /// Runs a busybox applet in this host's namespace.
    pub fn busybox(&self, args: &[&str]) -> Result<std::process::Output> {
        self.ns.run("busybox", args)
    }
}

/// A line-oriented TCP session from a host (busybox nc), for checking that
/// one connection survives what happens meanwhile.
pub struct TcpSession {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TcpSession {
    /// Sends `line` and waits up to `timeout` for the echoed line.
    pub fn echo(&mut self, line: &str, timeout: std::time::Duration) -> Result<String> {
        use std::io::Write as _;
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        self.lines
            .recv_timeout(timeout)
            .map_err(|_| anyhow::anyhow!("no echo of {line:?} within {timeout:?}"))
    }
}

impl Drop for TcpSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Host {
    /// Opens a TCP connection to `addr:port` from this host with busybox nc.
    pub fn tcp_session(&self, addr: std::net::Ipv4Addr, port: u16) -> Result<TcpSession> {
        use std::io::BufRead as _;
        let mut child = self
            .ns
            .command("busybox")
            .args(["nc", &addr.to_string(), &port.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(TcpSession {
            child,
            stdin,
            lines,
        })
    }
}

/// A process started in a namespace; ended (SIGTERM, then SIGKILL) on drop.
pub struct Background {
    child: Option<std::process::Child>,
}

impl Background {
    /// Holds `child` until dropped (then stops it).
    pub fn new(child: std::process::Child) -> Self {
        Self { child: Some(child) }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::terminate(child, std::time::Duration::from_secs(5));
        }
    }
}

/// A TCP connection opened from inside a namespace (a container's, for
/// instance) to a line echo server: what a test keeps open across a
/// restart to see a session live on.
pub struct LineSession {
    conn: std::net::TcpStream,
    lines: std::io::Lines<std::io::BufReader<std::net::TcpStream>>,
}

impl LineSession {
    /// Connects from `ns` to `addr:port` (5 s), reads with a 10 s bound.
    pub fn open(ns: &NetNs, addr: Ipv4Addr, port: u16) -> Result<Self> {
        use std::io::BufRead as _;
        let conn = ns.enter(|| {
            Ok(std::net::TcpStream::connect_timeout(
                &(addr, port).into(),
                std::time::Duration::from_secs(5),
            )?)
        })?;
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let lines = std::io::BufReader::new(conn.try_clone()?).lines();
        Ok(Self { conn, lines })
    }

    /// Sends `line` and returns the line that comes back.
    pub fn echo(&mut self, line: &str) -> Result<String> {
        use std::io::Write as _;
        writeln!(self.conn, "{line}")?;
        Ok(self.lines.next().context("the connection closed")??)
    }
}
