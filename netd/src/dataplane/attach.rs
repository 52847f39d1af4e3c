//! Where programs attach, and attaching them with pinned links: TCX links
//! on interfaces, cgroup links for the socket hooks. A live pinned link is
//! taken over with BPF_LINK_UPDATE (atomic: never a moment without a
//! program); a stale one is replaced.
use std::{fs::File, os::fd::AsFd as _, path::Path};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    programs::{
        links::{CgroupAttachMode, FdLink, LinkOrder, PinnedLink},
        tc::TcAttachOptions,
        CgroupSockAddr, SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use netd_common::Hook;

use super::pins::{bpf_link_update, bpf_obj_get, interface_index, PinDir};

/// A program and the kind of place it attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Attachment {
    /// TC ingress on the uplink.
    UplinkIngress,
    /// TC egress on the uplink.
    UplinkEgress,
    /// TC ingress on a container's host-side veth (what the container sends).
    ContainerEgress,
    /// TC egress on a container's host-side veth (what enters the container).
    ContainerIngress,
    /// TC ingress on the parent of a segment network (frames from its LAN).
    ParentIngress,
    /// TC egress on such a parent (what the host sends its containers).
    ParentEgress,
    /// cgroup connect4: host processes connecting to published ports.
    HostConnect4,
    /// cgroup sendmsg4: the same for unconnected UDP.
    HostSendmsg4,
    /// cgroup recvmsg4: UDP replies show the published address.
    HostRecvmsg4,
}

/// What an attachment's target is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachKind {
    Tc(TcAttachType),
    Cgroup,
}

impl Attachment {
    pub const ALL: [Attachment; 9] = [
        Attachment::UplinkIngress,
        Attachment::UplinkEgress,
        Attachment::ContainerEgress,
        Attachment::ContainerIngress,
        Attachment::ParentIngress,
        Attachment::ParentEgress,
        Attachment::HostConnect4,
        Attachment::HostSendmsg4,
        Attachment::HostRecvmsg4,
    ];

    /// Used in pin names and `netd status`.
    pub const fn name(self) -> &'static str {
        match self {
            Attachment::UplinkIngress => "uplink-ingress",
            Attachment::UplinkEgress => "uplink-egress",
            Attachment::ContainerEgress => "container-egress",
            Attachment::ContainerIngress => "container-ingress",
            Attachment::ParentIngress => "parent-ingress",
            Attachment::ParentEgress => "parent-egress",
            Attachment::HostConnect4 => "host-connect4",
            Attachment::HostSendmsg4 => "host-sendmsg4",
            Attachment::HostRecvmsg4 => "host-recvmsg4",
        }
    }

    /// The eBPF program (function name in netd-ebpf).
    pub const fn program(self) -> &'static str {
        match self {
            Attachment::UplinkIngress => "netd_uplink_ingress",
            Attachment::UplinkEgress => "netd_uplink_egress",
            Attachment::ContainerEgress => "netd_container_egress",
            Attachment::ContainerIngress => "netd_container_ingress",
            Attachment::ParentIngress => "netd_parent_ingress",
            Attachment::ParentEgress => "netd_parent_egress",
            Attachment::HostConnect4 => "netd_host_connect4",
            Attachment::HostSendmsg4 => "netd_host_sendmsg4",
            Attachment::HostRecvmsg4 => "netd_host_recvmsg4",
        }
    }

    pub const fn kind(self) -> AttachKind {
        match self {
            Attachment::UplinkIngress | Attachment::ContainerEgress | Attachment::ParentIngress => {
                AttachKind::Tc(TcAttachType::Ingress)
            }
            Attachment::UplinkEgress | Attachment::ContainerIngress | Attachment::ParentEgress => {
                AttachKind::Tc(TcAttachType::Egress)
            }
            _ => AttachKind::Cgroup,
        }
    }

    /// The TC program that serves a counter hook (for test runs).
    pub fn for_hook(hook: Hook) -> Option<Attachment> {
        match hook {
            Hook::UplinkIngress => Some(Attachment::UplinkIngress),
            Hook::UplinkEgress => Some(Attachment::UplinkEgress),
            Hook::ContainerEgress => Some(Attachment::ContainerEgress),
            Hook::ContainerIngress => Some(Attachment::ContainerIngress),
            Hook::ParentIngress => Some(Attachment::ParentIngress),
            Hook::ParentEgress => Some(Attachment::ParentEgress),
            Hook::HostSockets => None,
        }
    }

    pub fn from_name(name: &str) -> Option<Attachment> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// Pin names carry the target; a cgroup path's '/' become '%'.
pub fn encode_target(target: &str) -> String {
    target.replace('/', "%")
}

pub fn decode_target(encoded: &str) -> String {
    encoded.replace('%', "/")
}

/// Loads every program of the object into the kernel.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    for att in Attachment::ALL {
        let name = att.program();
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("eBPF object lacks program {name}"))?;
        let loaded = match att.kind() {
            AttachKind::Tc(_) => <&mut SchedClassifier>::try_from(prog)?.load(),
            AttachKind::Cgroup => <&mut CgroupSockAddr>::try_from(prog)?.load(),
        };
        if let Err(e) = loaded {
            // The verifier log is long; keep the error to one line.
            tracing::debug!("loading {name}: {e:?}");
            anyhow::bail!(
                "the kernel rejected program {name} (NETD_LOG=debug shows the verifier log)"
            );
        }
    }
    Ok(())
}

/// Attaches `att` to `target` (an interface, or a cgroup v2 directory) with
/// a pinned link, taking over a live link pinned by an earlier daemon.
pub fn attach(ebpf: &mut Ebpf, pins: &PinDir, att: Attachment, target: &str) -> Result<()> {
    let pin = pins.link(att, target);
    let name = att.program();
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("eBPF object lacks program {name}"))?;
    match att.kind() {
        AttachKind::Tc(direction) => {
            interface_index(target)?;
            let prog = <&mut SchedClassifier>::try_from(prog)?;
            if pinned_link_is_live(&pin, |prog_id| {
                let (_, progs) = SchedClassifier::query_tcx(target, direction)
                    .with_context(|| format!("querying TCX programs on {target}"))?;
                Ok(progs.iter().any(|p| p.id() == prog_id))
            })? {
                return update_link(&pin, prog.fd()?.as_fd());
            }
            // A parent may be the uplink too: demux goes first, so that a
            // frame for a container is not looked at twice.
            let order = match att {
                Attachment::ParentIngress | Attachment::ParentEgress => LinkOrder::first(),
                _ => LinkOrder::default(),
            };
            let id = prog
                .attach_with_options(target, direction, TcAttachOptions::TcxOrder(order))
                .with_context(|| format!("attaching {name} to {target}"))?;
            pin_link(FdLink::try_from(prog.take_link(id)?)?, &pin)
        }
        AttachKind::Cgroup => {
            let cgroup = File::open(target).with_context(|| {
                format!("opening cgroup {target} (is cgroup v2 mounted there? see --cgroup)")
            })?;
            let prog = <&mut CgroupSockAddr>::try_from(prog)?;
            // A cgroup link lives as long as its cgroup: a pin that opens is live.
            if pinned_link_is_live(&pin, |_| Ok(true))? {
                return update_link(&pin, prog.fd()?.as_fd());
            }
            // With bpf_link (what aya uses here) the kernel always allows
            // several programs per cgroup and rejects explicit multi flags.
            let id = prog
                .attach(cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {target}"))?;
            pin_link(FdLink::try_from(prog.take_link(id)?)?, &pin)
        }
    }
}

/// True when a link is pinned at `pin` and `live(program id)` says it is
/// still attached; a stale pin is removed.
fn pinned_link_is_live(pin: &Path, live: impl FnOnce(u32) -> Result<bool>) -> Result<bool> {
    if !pin.exists() {
        return Ok(false);
    }
    let link = FdLink::from(
        PinnedLink::from_pin(pin)
            .with_context(|| format!("opening pinned link {}", pin.display()))?,
    );
    if live(link.info()?.program_id())? {
        return Ok(true);
    }
    drop(link);
    std::fs::remove_file(pin)
        .with_context(|| format!("removing stale link pin {}", pin.display()))?;
    Ok(false)
}

fn update_link(pin: &Path, prog_fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    let link = bpf_obj_get(pin).with_context(|| format!("opening {}", pin.display()))?;
    bpf_link_update(link.as_fd(), prog_fd)
        .with_context(|| format!("updating link {}", pin.display()))
}

/// The pin keeps the program attached after this process exits.
fn pin_link(link: FdLink, pin: &Path) -> Result<()> {
    link.pin(pin)
        .with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok(())
}
