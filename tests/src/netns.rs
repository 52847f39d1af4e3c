//! Network namespaces: created with unshare(2) and bind-mounted under
//! /run/netns (so `ip netns` and `nsenter --net` see them), entered with
//! setns(2) (never `ip netns exec`, which remounts /sys and hides bpffs).
//!
//! An emulated host may also have a mount namespace of its own, entered by
//! every process started in it, whose /run/docker/plugins is a directory of
//! the host's: Docker's plugin discovery path is fixed, and each host's
//! dockerd must find its own netd there.
use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{bail, Context as _, Result};
use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{setns, unshare, CloneFlags},
};

pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace, deleted on drop.
pub struct NetNs {
    name: String,
    path: PathBuf,
    file: File,
    /// Delete on drop (false for handles from [`NetNs::open`]).
    owned: bool,
    /// The host's mount namespace, if it has one (see [`Self::give_mounts`]).
    mounts: Option<MountNs>,
}

/// A mount namespace held by a bind mount of its nsfs file.
struct MountNs {
    path: PathBuf,
    file: File,
}

/// Docker's fixed plugin discovery directory.
pub const DOCKER_PLUGIN_DIR: &str = "/run/docker/plugins";

impl NetNs {
    /// Creates the namespace `name` with its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        std::fs::create_dir_all(NETNS_DIR)?;
        let path = Path::new(NETNS_DIR).join(name);
        if path.exists() {
            bail!("network namespace {name} already exists");
        }
        File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let target = path.clone();
        // unshare() changes the calling thread only: do it on a scratch
        // thread so the test's own thread stays in its namespace.
        let made = std::thread::spawn(move || -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .context("bind-mounting the namespace")?;
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("namespace thread panicked")));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let file = File::open(&path)?;
        let ns = Self {
            name: name.into(),
            path,
            file,
            owned: true,
            mounts: None,
        };
        crate::netlink::with_netlink(
            &ns,
            |h| async move { crate::netlink::set_up(&h, "lo").await },
        )?;
        Ok(ns)
    }

    /// Opens an existing namespace without taking ownership of it (its
    /// drop does not delete it).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.into(),
            file,
            owned: false,
            mounts: None,
        })
    }

    /// A handle to the same namespaces that does not delete them on drop,
    /// for daemons that outlive a borrow of the host.
    pub fn handle(&self) -> Result<Self> {
        let mut ns = Self::open(&self.path)?;
        if let Some(m) = &self.mounts {
            ns.mounts = Some(MountNs {
                path: m.path.clone(),
                file: File::open(&m.path)?,
            });
        }
        Ok(ns)
    }

    /// Gives this host a mount namespace of its own, held at `dir/mnt`, in
    /// which [`DOCKER_PLUGIN_DIR`] is `dir/plugins`. Mounts are copied from
    /// this process's namespace and kept from propagating either way, so
    /// what the host's dockerd mounts stays its own.
    pub fn give_mounts(&mut self, dir: &Path) -> Result<()> {
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins)?;
        std::fs::create_dir_all(DOCKER_PLUGIN_DIR)?;
        let path = dir.join("mnt");
        File::create(&path)?;
        // A mount namespace's nsfs file can only be bound from a namespace
        // older than it: a scratch thread makes it and waits while this
        // thread binds it.
        let (made_tx, made_rx) = std::sync::mpsc::channel::<Result<i32>>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<()>();
        let maker = std::thread::spawn(move || {
            let made = (|| -> Result<i32> {
                unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_SLAVE,
                    None::<&str>,
                )
                .context("making the host's mounts slaves")?;
                mount(
                    Some(&plugins),
                    DOCKER_PLUGIN_DIR,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .context("binding the host's plugin directory")?;
                Ok(nix::unistd::gettid().as_raw())
            })();
            let _ = made_tx.send(made);
            let _ = bound_rx.recv();
        });
        let bound = made_rx
            .recv()
            .context("mount namespace thread died")
            .and_then(|made| {
                let tid = made?;
                mount(
                    Some(format!("/proc/self/task/{tid}/ns/mnt").as_str()),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .context("bind-mounting the mount namespace")
            });
        let _ = bound_tx.send(());
        let _ = maker.join();
        if let Err(e) = bound {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let file = File::open(&path)?;
        self.mounts = Some(MountNs { path, file });
        Ok(())
    }
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs inside this namespace, and the host's mount
    /// namespace if it has one (setns before exec).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let fd = self.file.as_raw_fd();
        let mnt = self.mounts.as_ref().map(|m| m.file.as_raw_fd());
        // SAFETY: setns is async-signal-safe; the fds outlive the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(mnt) = mnt {
                    let borrowed = std::os::fd::BorrowedFd::borrow_raw(mnt);
                    setns(borrowed, CloneFlags::CLONE_NEWNS).map_err(std::io::Error::from)?;
                }
                let borrowed = std::os::fd::BorrowedFd::borrow_raw(fd);
                setns(borrowed, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        cmd
    }

    /// Runs `program args…` in the namespace and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.command(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.name))
    }

    /// Like [`Self::run`] but fails unless the command succeeds; returns stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.run(program, args)?;
        if !out.status.success() {
            bail!(
                "`{program} {}` in {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&self.file, CloneFlags::CLONE_NEWNET).context("setns")?;
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// The MAC of interface `ifname` here (from this namespace's
    /// rtnetlink: /sys is the machine's).
    pub fn mac_of(&self, ifname: &str) -> Result<[u8; 6]> {
        let out = self.run_ok("ip", &["-o", "link", "show", ifname])?;
        let mut words = out.split_whitespace();
        words
            .find(|w| *w == "link/ether")
            .with_context(|| format!("{ifname} is no Ethernet interface"))?;
        let text = words.next().context("no MAC after link/ether")?;
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for b in &mut mac {
            *b = u8::from_str_radix(parts.next().context("short MAC")?, 16)?;
        }
        Ok(mac)
    }

    /// The MAC this namespace's neighbour table has for `addr`, if any.
    pub fn neighbour_mac(&self, addr: &str) -> Option<String> {
        let out = self.run_ok("ip", &["neigh", "show", addr]).ok()?;
        let mut words = out.split_whitespace();
        words.find(|w| *w == "lladdr")?;
        words.next().map(str::to_owned)
    }

    /// Writes a sysctl of this namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.enter(|| std::fs::write(&path, value).with_context(|| format!("writing {path}")))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.owned {
            delete_netns(&self.path);
            if let Some(m) = &self.mounts {
                delete_netns(&m.path);
            }
        }
    }
}

/// Unmounts and removes a namespace bind mount (network or mount); the
/// namespace itself goes away with its last user.
pub fn delete_netns(path: &Path) {
    let _ = umount2(path, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}
