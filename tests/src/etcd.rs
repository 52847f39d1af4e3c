//! A real etcd member in a namespace of its own on a LAN: the cluster store
//! the multi-host suites run against. Debian's etcd-server (3.4, v3 API).
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{netns::NetNs, topology::Lan, Bench};

pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

pub struct Etcd {
    child: Option<Child>,
    /// Its own host on the LAN.
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    dir: PathBuf,
    /// Member name and the initial cluster (name=peer URL, …).
    name: String,
    cluster: String,
}

impl Etcd {
    /// Starts a one-member cluster at `.host` on `lan` and waits until it
    /// answers.
    pub fn start(bench: &Bench, lan: &Lan, host: u8) -> Result<Self> {
        Ok(Self::start_cluster(bench, lan, &[host])?.remove(0))
    }

    /// Starts a cluster of one member per `.host` on `lan` and waits until
    /// each answers.
    pub fn start_cluster(bench: &Bench, lan: &Lan, hosts: &[u8]) -> Result<Vec<Self>> {
        let mut members = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let ns = bench.netns("etcd")?;
            let ip = lan.attach(&ns, *host)?;
            let dir = bench.state_dir().join(ns.name());
            std::fs::create_dir_all(&dir)?;
            members.push(Self {
                child: None,
                ns,
                ip,
                dir,
                name: format!("e{}", i + 1),
                cluster: String::new(),
            });
        }
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://{}:{PEER_PORT}", m.name, m.ip))
            .collect::<Vec<_>>()
            .join(",");
        // All launched before any is waited for: a member answers only
        // once a quorum is up.
        for m in &mut members {
            m.cluster = cluster.clone();
            m.launch()?;
        }
        for m in &mut members {
            m.wait_ready()?;
        }
        Ok(members)
    }

    /// `http://IP:2379`, for `--etcd`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{CLIENT_PORT}", self.ip)
    }

    fn spawn(&mut self) -> Result<()> {
        self.launch()?;
        self.wait_ready()
    }

    fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let client = self.endpoint();
        let peer = format!("http://{}:{PEER_PORT}", self.ip);
        let child = self
            .ns
            .command("etcd")
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.cluster])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (is etcd-server installed? run `cargo xtask setup`)")?;
        std::fs::write(self.dir.join("etcd.pid"), child.id().to_string())?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let endpoint = self.endpoint();
        let probe = Self::ctl_in(&self.ns, &endpoint);
        let log = self.dir.join("etcd.log");
        crate::process::wait_ready(
            self.child.as_mut(),
            "etcd",
            Duration::from_secs(30),
            || probe(&["endpoint", "health"]).is_ok(),
            || crate::process::log_tail(&log, 5),
        )
    }

    /// etcdctl against `endpoint` from `ns`.
    fn ctl_in<'a>(ns: &'a NetNs, endpoint: &'a str) -> impl Fn(&[&str]) -> Result<String> + 'a {
        move |args| {
            let out = ns
                .command("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", endpoint, "--dial-timeout", "2s"])
                .args(args)
                .output()
                .context("running etcdctl (is etcd-client installed? run `cargo xtask setup`)")?;
            if !out.status.success() {
                bail!(
                    "etcdctl {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    }

    /// `etcdctl` (v3 API) against this member, from its own namespace;
    /// stdout on success.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        Self::ctl_in(&self.ns, &self.endpoint())(args)
    }

    /// Stops the member (SIGTERM, then SIGKILL), keeping its data: the
    /// store going away.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::terminate(child, Duration::from_secs(10));
        }
    }

    /// Starts it again on the same data.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("etcd is still running");
        }
        self.spawn()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
