//! The pin dir: where netd's maps and links live in bpffs, and the checks
//! that keep one netd from misreading another's (or a stranger's) objects.
use std::{
    fs,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{Array, Map, MapData};
use netd_common::{
    maps::{self, LAYOUT_VERSION, META_MAGIC},
    Meta,
};

use super::attach::{decode_target, encode_target, Attachment};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
const LINKS_DIR: &str = "links";

/// A pin dir on bpffs.
#[derive(Debug)]
pub struct PinDir {
    root: PathBuf,
    /// Held by the process that owns the pin dir (a running daemon, an
    /// uninstall): an exclusive flock on the directory.
    _lock: Option<fs::File>,
}

impl PinDir {
    /// Uses `root` without creating or mounting anything (for readers).
    pub fn existing(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            bail!(
                "nothing is installed at {} (is netd running with another --pin-dir?)",
                root.display()
            );
        }
        Ok(Self {
            root: root.into(),
            _lock: None,
        })
    }

    /// Checks, without changing anything but mounting bpffs where it is
    /// missing, that `root` can be used: on bpffs, and empty or holding this
    /// netd layout, and not owned by a running daemon.
    pub fn check(root: &Path) -> Result<()> {
        ensure_bpffs(root)?;
        if root.exists() {
            let dir = Self::existing(root)?;
            dir.check_layout()?;
            drop(lock(root)?);
        }
        Ok(())
    }

    /// [`Self::check`], then creates the layout and takes ownership (the
    /// lock) for as long as the returned value lives.
    pub fn prepare(root: &Path) -> Result<Self> {
        Self::check(root)?;
        fs::create_dir_all(root.join(LINKS_DIR))
            .with_context(|| format!("creating {}", root.display()))?;
        Ok(Self {
            root: root.into(),
            _lock: Some(lock(root)?),
        })
    }

    /// An existing pin dir, owned (for uninstall).
    pub fn existing_owned(root: &Path) -> Result<Self> {
        let mut dir = Self::existing(root)?;
        dir._lock = Some(lock(root)?);
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join(LINKS_DIR)
    }

    pub fn link(&self, att: Attachment, target: &str) -> PathBuf {
        self.links_dir()
            .join(format!("{}@{}", att.name(), encode_target(target)))
    }

    /// Every pinned link: (attachment, target, pin path).
    pub fn links(&self) -> Result<Vec<(Attachment, String, PathBuf)>> {
        let mut out = Vec::new();
        let dir = self.links_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let parsed = name.split_once('@').and_then(|(att, target)| {
                Attachment::from_name(att).map(|a| (a, decode_target(target)))
            });
            match parsed {
                Some((hook, ifname)) => out.push((hook, ifname, entry.path())),
                None => tracing::warn!("ignoring unknown pin {}", entry.path().display()),
            }
        }
        out.sort_by(|a, b| (a.0 as u32, &a.1).cmp(&(b.0 as u32, &b.1)));
        Ok(out)
    }

    /// Refuses a pin dir that holds objects but no meta map of this layout.
    /// An empty dir (or one with only our empty links dir) is fine.
    pub fn check_layout(&self) -> Result<()> {
        let meta_path = self.map(maps::META);
        if !meta_path.exists() {
            let foreign: Vec<String> = fs::read_dir(&self.root)
                .with_context(|| format!("reading {}", self.root.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != LINKS_DIR)
                .collect();
            if foreign.is_empty() && self.links()?.is_empty() {
                return Ok(());
            }
            bail!(
                "{} holds objects that are not netd's ({}): choose another --pin-dir",
                self.root.display(),
                foreign.join(", ")
            );
        }
        let meta = self.read_meta()?;
        if meta.magic != META_MAGIC {
            bail!(
                "{} is not a netd meta map: choose another --pin-dir",
                meta_path.display()
            );
        }
        if meta.layout_version != LAYOUT_VERSION {
            bail!(
                "{} holds netd objects of layout v{} but this netd uses v{LAYOUT_VERSION}: run `netd uninstall --pin-dir {}` first",
                self.root.display(),
                meta.layout_version,
                self.root.display()
            );
        }
        Ok(())
    }

    /// Like [`Self::check_layout`] but accepts any layout version: removing
    /// an old netd's objects is how one recovers from a version mismatch.
    pub fn check_layout_for_removal(&self) -> Result<()> {
        if self.map(maps::META).exists() {
            let meta = self.read_meta()?;
            // All zeroes: created by a netd whose start failed before stamping.
            let unstamped = meta == Meta::default();
            if meta.magic != META_MAGIC && !unstamped {
                bail!(
                    "{} is not a netd pin dir: not touching it",
                    self.root.display()
                );
            }
            return Ok(());
        }
        self.check_layout()
    }

    /// Reads slot 0 of the meta map. `Meta` never changes shape, so this
    /// works on every layout version.
    pub fn read_meta(&self) -> Result<Meta> {
        let path = self.map(maps::META);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let array: Array<MapData, Meta> = Array::try_from(Map::Array(data))
            .with_context(|| format!("{} is not a netd meta map", path.display()))?;
        Ok(array.get(&0, 0)?)
    }
}

/// Makes sure bpffs is mounted under `root`, mounting it at /sys/fs/bpf when
/// that is where `root` lives and nothing is mounted there yet.
fn ensure_bpffs(root: &Path) -> Result<()> {
    let ancestor = root
        .ancestors()
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("pin dir {} has no existing parent", root.display()))?;
    if is_bpffs(ancestor)? {
        return Ok(());
    }
    if root.starts_with(DEFAULT_BPFFS) && !is_bpffs(Path::new(DEFAULT_BPFFS))? {
        nix::mount::mount(
            Some("bpf"),
            DEFAULT_BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting bpffs at {DEFAULT_BPFFS}"))?;
        tracing::info!("mounted bpffs at {DEFAULT_BPFFS}");
        return Ok(());
    }
    bail!(
        "pin dir {} is not on bpffs: use a path under {DEFAULT_BPFFS} or mount one (mount -t bpf bpf DIR)",
        root.display()
    )
}

/// Takes the pin dir's exclusive lock without waiting.
fn lock(root: &Path) -> Result<fs::File> {
    let dir = fs::File::open(root).with_context(|| format!("opening {}", root.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "a netd daemon is running on {} (stop it first, or use another --pin-dir)",
            root.display()
        );
    }
    Ok(dir)
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let st =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Resolves an interface name in this network namespace.
pub fn interface_index(ifname: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(ifname).map_err(|_| {
        anyhow!("no interface named {ifname:?} in this network namespace (see `ip link`)")
    })
}

/// Detaches the link pinned at `path` (even if another process still holds
/// it open) and removes the pin. A missing pin is not an error.
pub fn detach_pinned_link(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let fd = bpf_obj_get(path).with_context(|| format!("opening {}", path.display()))?;
    bpf_link_detach(fd.as_fd()).with_context(|| format!("detaching {}", path.display()))?;
    fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(())
}

// aya 0.14 has no public wrapper for BPF_LINK_DETACH, nor a way to get the fd
// out of an FdLink, so these two commands are issued directly.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// BPF_LINK_UPDATE: swaps the program of a link in place (atomic).
pub(super) fn bpf_link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> Result<()> {
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    sys_bpf(BPF_LINK_UPDATE, &attr)?;
    Ok(())
}

pub(super) fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    raw_bpf(cmd, (attr as *const T).cast(), std::mem::size_of::<T>())
}

/// `sys_bpf` for commands that write results back into `attr` (the batch
/// commands' `count`, for one).
pub(super) fn sys_bpf_mut<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    raw_bpf(
        cmd,
        (attr as *mut T).cast_const().cast(),
        std::mem::size_of::<T>(),
    )
}

fn raw_bpf(
    cmd: libc::c_long,
    attr: *const libc::c_void,
    size: usize,
) -> std::io::Result<libc::c_long> {
    // SAFETY: attr points at a fully initialised prefix of union bpf_attr
    // for `cmd`, of exactly `size` bytes (the kernel zero-extends the rest
    // and writes only within it).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size as libc::c_uint) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub(super) fn bpf_obj_get(path: &Path) -> Result<OwnedFd> {
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let attr = ObjGetAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = sys_bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Detaches even while other holders keep the link alive, unlike closing.
fn bpf_link_detach(fd: BorrowedFd<'_>) -> Result<()> {
    #[repr(C)]
    struct LinkDetachAttr {
        link_fd: u32,
    }
    let attr = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    match sys_bpf(BPF_LINK_DETACH, &attr) {
        Ok(_) => Ok(()),
        // ENOLINK: already detached (its interface went away).
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
