//! A dockerd per emulated host, with a private data-root, exec-root, socket
//! and pidfile, and the locally built test image.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use std::os::unix::process::CommandExt as _;

use crate::netns::NetNs;

/// Image every test container runs: busybox-static, imported locally.
pub const TEST_IMAGE: &str = "netd-test:latest";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DockerMode {
    /// Configured for netd: no iptables rules, no masquerade, no docker-proxy.
    Netd,
    /// Docker's own iptables NAT, userland proxy off.
    StockIptables,
    /// Docker's own iptables NAT plus docker-proxy.
    StockProxy,
}

pub struct Dockerd {
    child: Option<Child>,
    ns: NetNs,
    args: Vec<std::ffi::OsString>,
    dir: PathBuf,
    sock: PathBuf,
}

impl Dockerd {
    pub fn start(ns: &NetNs, dir: &Path, bip: &str, mode: DockerMode) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let sock = dir.join("docker.sock");
        let mut args: Vec<std::ffi::OsString> = vec![
            "--data-root".into(),
            dir.join("data").into(),
            "--exec-root".into(),
            dir.join("exec").into(),
            "-H".into(),
            format!("unix://{}", sock.display()).into(),
            "--pidfile".into(),
            dir.join("docker.pid").into(),
            "--bip".into(),
            bip.into(),
            "--log-level".into(),
            "warn".into(),
        ];
        let mode_args: &[&str] = match mode {
            DockerMode::Netd => &[
                "--iptables=false",
                "--ip-masq=false",
                "--userland-proxy=false",
            ],
            DockerMode::StockIptables => &["--userland-proxy=false"],
            DockerMode::StockProxy => &["--userland-proxy=true"],
        };
        args.extend(mode_args.iter().map(Into::into));
        let mut d = Self {
            child: None,
            ns: ns.handle()?,
            args,
            dir: dir.into(),
            sock,
        };
        d.spawn()?;
        d.import_test_image()?;
        Ok(d)
    }

    fn spawn(&mut self) -> Result<()> {
        self.launch()?;
        self.wait_ready()
    }

    /// Stops dockerd (its containers stop with it), keeping its state.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::terminate_group(child, Duration::from_secs(20), true);
        }
    }

    /// Starts dockerd again after [`Self::stop`] without waiting for its
    /// API: a dockerd restoring containers of plugin networks answers only
    /// once the plugin has. [`Self::wait_ready`] waits.
    pub fn launch(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("dockerd is still running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))?;
        let child = self
            .ns
            .command("dockerd")
            .args(&self.args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd (is docker.io installed? run `cargo xtask setup`)")?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops dockerd (its containers stop with it) and starts it again on
    /// the same state.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// Waits until dockerd's API answers (up to 60 s).
    pub fn wait_ready(&mut self) -> Result<()> {
        let host = self.host();
        let ready = || {
            Command::new("docker")
                .args(["-H", &host, "version", "--format", "{{.Server.Version}}"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let log = self.dir.join("dockerd.log");
        crate::process::wait_ready(
            self.child.as_mut(),
            "dockerd",
            Duration::from_secs(60),
            ready,
            || crate::process::log_tail(&log, 5),
        )
    }

    /// The API endpoint for netd's --docker-host.
    pub fn host(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn docker_raw(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new("docker")
            .arg("-H")
            .arg(self.host())
            .args(args)
            .output()
            .context("running the docker CLI")
    }

    /// Runs the docker CLI against this daemon; fails unless it succeeds.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let out = self.docker_raw(args)?;
        if !out.status.success() {
            bail!(
                "docker {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `docker exec NAME CMD…`; stdout on success.
    pub fn exec(&self, name: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        self.docker(&args)
    }

    /// HTTP GET of `url` from inside container `name`; the body on
    /// success. busybox wget's own -T crashes it (SIGSEGV) in this image:
    /// `timeout` bounds it.
    pub fn http_get_from(&self, name: &str, url: &str) -> Result<String> {
        self.exec(name, &["timeout", "10", "wget", "-q", "-O", "-", url])
    }

    /// Starts a detached container from the test image; returns its id.
    pub fn run(&self, name: &str, extra: &[&str], command: &[&str]) -> Result<String> {
        let mut args = vec!["run", "-d", "--pull=never", "--name", name];
        args.extend_from_slice(extra);
        args.push(TEST_IMAGE);
        args.extend_from_slice(command);
        self.docker(&args)
    }

    /// Starts a detached container serving the test image's page over HTTP
    /// on port 80 ("hello from netd-test"); returns its id.
    pub fn run_httpd(&self, name: &str, extra: &[&str]) -> Result<String> {
        self.run(name, extra, &["httpd", "-f", "-p", "80", "-h", "/var/www"])
    }

    /// Starts a detached container echoing TCP on port 7 (one `cat` per
    /// connection), with `extra` flags (`-p …`); returns its id.
    pub fn run_echo(&self, name: &str, extra: &[&str]) -> Result<String> {
        self.run(name, extra, &["nc", "-ll", "-p", "7", "-e", "cat"])
    }

    /// Runs a container in the foreground (`docker run --rm`) and returns its
    /// output once it exits, or an error if it has not exited within
    /// `limit` (then it is removed). The bound is kept here, outside the
    /// container: busybox `timeout` execs its command as the container's
    /// PID 1, which ignores SIGTERM.
    pub fn run_to_completion(
        &self,
        name: &str,
        extra: &[&str],
        command: &[&str],
        limit: Duration,
    ) -> Result<String> {
        let mut child = Command::new("docker")
            .arg("-H")
            .arg(self.host())
            .args(["run", "--rm", "--pull=never", "--name", name])
            .args(extra)
            .arg(TEST_IMAGE)
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running the docker CLI")?;
        let deadline = Instant::now() + limit;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.docker_raw(&["rm", "-f", name]);
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "container {name} ({}) still running after {limit:?}",
                    command.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "container {name} ({}) failed ({}): {}",
                command.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The network namespace of a running container (/proc/<pid>/ns/net),
    /// for tests that serve or send from inside it with their own sockets
    /// (the busybox image has no UDP tools).
    pub fn netns_of(&self, container: &str) -> Result<std::path::PathBuf> {
        let pid = self.docker(&["inspect", "--format", "{{.State.Pid}}", container])?;
        Ok(format!("/proc/{}/ns/net", pid.trim()).into())
    }

    /// The container's IP address on the default bridge.
    pub fn container_ip(&self, name: &str) -> Result<String> {
        self.docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            name,
        ])
    }

    fn import_test_image(&self) -> Result<()> {
        let tar = test_image_tar()?;
        let out = Command::new("docker")
            .arg("-H")
            .arg(self.host())
            .args(["import", "-c", "CMD [\"/bin/sh\"]"])
            .arg(tar)
            .arg(TEST_IMAGE)
            .output()?;
        if !out.status.success() {
            bail!(
                "docker import failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// A rootfs tarball of busybox-static with its applet links, built once per
/// test process.
fn test_image_tar() -> Result<PathBuf> {
    static TAR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let tar = TAR
        .get_or_init(|| build_test_image_tar().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    if !tar.exists() {
        // The last bench of an earlier batch removed it: build again.
        return build_test_image_tar();
    }
    Ok(tar)
}

fn test_image_dir() -> PathBuf {
    Path::new(crate::STATE_ROOT).join(format!("image-{}", std::process::id()))
}

/// Removes the test image build dir (a later bench would rebuild it only if
/// this process had not cached the path: it is removed with the last bench).
pub(crate) fn remove_test_image_dir() {
    let _ = std::fs::remove_dir_all(test_image_dir());
}

fn build_test_image_tar() -> Result<PathBuf> {
    let busybox =
        which("busybox").context("busybox-static is not installed: run `cargo xtask setup`")?;
    let root = test_image_dir();
    let bin = root.join("rootfs/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(&busybox, bin.join("busybox"))?;
    let list = Command::new(&busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    for dir in ["etc", "tmp", "proc", "sys", "dev", "var/www"] {
        std::fs::create_dir_all(root.join("rootfs").join(dir))?;
    }
    std::fs::write(
        root.join("rootfs/var/www/index.html"),
        "hello from netd-test\n",
    )?;
    let tar = root.join("image.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(root.join("rootfs"))
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    if !status.success() {
        bail!("tar of the test rootfs failed");
    }
    Ok(tar)
}

pub fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found in PATH"))
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
        }
        if let Some(child) = self.child.take() {
            crate::process::terminate_group(child, Duration::from_secs(20), true);
        }
        crate::process::unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
