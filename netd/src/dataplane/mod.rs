//! The dataplane: the only userspace code that loads eBPF programs, attaches
//! them and touches maps. Everything else talks to the kernel through it.
//!
//! Objects live under a pin dir in bpffs:
//!   `<pin-dir>/<map name>`             every map (netd_common::maps::ALL)
//!   `<pin-dir>/links/<attachment>@<target>`  one link per attachment (TCX
//!                                            on interfaces, cgroup links)
//! Pinned links keep programs attached when the daemon exits; a new daemon
//! reuses the pinned maps and swaps its freshly loaded programs into the
//! pinned links atomically (BPF_LINK_UPDATE), so forwarding never stops.

mod attach;
mod conntrack;
mod inspect;
mod pins;
mod tables;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use netd_common::{
    counters::COUNTER_SLOTS,
    maps::{self, LAYOUT_VERSION, META_MAGIC},
    Counter, CounterValue, CtEntry, CtKey, Endpoint, EndpointLocation, Hook, Meta, NatConfig,
    NetworkInfo, PortKey, PortTarget,
};

pub use attach::{AttachKind, Attachment};
pub use conntrack::{monotonic_now_ns, GcReport};
pub use inspect::{
    read_ct, read_endpoints, read_peers, read_ports, read_status, uninstall, AttachmentStatus,
    EndpointStatus, FlowStatus, HookCounters, HostStatus, MapStatus, NamedCounter, PeerStatus,
    PortStatus, SegmentStatus, Status, UninstallReport,
};
pub use pins::{interface_index, PinDir};
pub use tables::{
    Networks, Overlays, Peers, PrefixTable, RoutedBlocks, SegmentAddrs, SegmentFloods, SegmentMacs,
    Segments, Table, Vnis, Vteps,
};

/// The compiled eBPF object (built by build.rs from netd-ebpf).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netd"));
/// A bare redirect program: the benchmarks' per-packet floor.
static BARE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netd-bare"));

/// Time per run of a TC program that only redirects, on `frame`
/// (BPF_PROG_TEST_RUN with `repeat`): what a packet costs with no netd logic.
pub fn bare_redirect_cost(frame: &[u8], repeat: u32) -> Result<std::time::Duration> {
    let mut ebpf = EbpfLoader::new()
        .load(BARE_OBJECT)
        .context("loading the bare redirect program")?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut("netd_bare_redirect")
        .ok_or_else(|| anyhow!("bare object lacks its program"))?
        .try_into()?;
    prog.load()?;
    let mut out = vec![0u8; frame.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat.max(1);
    Ok(prog.test_run(opts)?.duration)
}

/// Options for loading the programs.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Log every packet decision through aya-log (slow; for debugging).
    pub debug_datapath: bool,
    /// Capacity of the NAT flow table when it is created (None: default).
    pub ct_size: Option<u32>,
}

/// Loaded programs and maps, pinned under a pin dir or (for tests) unpinned.
pub struct Dataplane {
    ebpf: Ebpf,
    pins: Option<PinDir>,
    /// Set with `debug_datapath`: drains aya-log records into `log`/tracing.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Outcome of running a program once on a frame with BPF_PROG_TEST_RUN.
#[derive(Debug)]
pub struct TestRunOutput {
    /// The TC action the program returned (TC_ACT_*; -1 is "not ours").
    pub action: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Kernel-measured time per run.
    pub duration_per_run: std::time::Duration,
}

impl Dataplane {
    /// Loads the programs with their maps pinned under `pin_dir`, adopting
    /// maps a previous daemon pinned there. Fails with a one-line error when
    /// the pin dir holds something that is not this netd's layout.
    pub fn open(pin_dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let pins = PinDir::prepare(pin_dir)?;
        let map_paths: Vec<(&str, PathBuf)> = maps::ALL
            .iter()
            .map(|name| (*name, pins.map(name)))
            .collect();
        Self::load_with(&map_paths, Some(pins), opts)
    }

    /// Loads the programs with private, unpinned maps: for BPF_PROG_TEST_RUN
    /// tests and benchmarks, which must not disturb a running daemon.
    pub fn load_unpinned(opts: &LoadOptions) -> Result<Self> {
        Self::load_with(&[], None, opts)
    }

    fn load_with(
        map_pins: &[(&str, PathBuf)],
        pins: Option<PinDir>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let debug: u8 = opts.debug_datapath.into();
        let mut loader = EbpfLoader::new();
        for (name, path) in map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        if let Some(size) = opts.ct_size {
            loader.map_max_entries(maps::NAT_CT, size);
        }
        let mut ebpf = loader
            .override_global("NETD_DEBUG", &debug, true)
            .load(EBPF_OBJECT)
            .context("loading netd's eBPF object")?;
        // The maps exist (and are pinned) from here on: stamp the layout now,
        // before anything else can fail, so a failed start leaves a pin dir
        // that a later run or uninstall recognises as netd's.
        if pins.is_some() {
            stamp_layout(&mut ebpf)?;
        }
        let logger = if opts.debug_datapath {
            Some(aya_log::EbpfLogger::init(&mut ebpf).context("starting aya-log")?)
        } else {
            None
        };
        attach::load_programs(&mut ebpf)?;
        Ok(Self { ebpf, pins, logger })
    }

    /// Attaches `att` to `target` (an interface, or a cgroup v2 directory)
    /// with a pinned link; a live link pinned by an earlier daemon is taken
    /// over atomically.
    pub fn attach(&mut self, att: Attachment, target: &str) -> Result<()> {
        let pins = self
            .pins
            .as_ref()
            .ok_or_else(|| anyhow!("attach needs a pin dir"))?;
        attach::attach(&mut self.ebpf, pins, att, target)
    }

    /// Detaches `att` from `target` and removes its pin. Missing is fine.
    pub fn detach(&mut self, att: Attachment, target: &str) -> Result<()> {
        if let Some(pins) = &self.pins {
            pins::detach_pinned_link(&pins.link(att, target))?;
        }
        Ok(())
    }

    /// Runs the program for `hook` once (or `repeat` times) on `frame`.
    pub fn test_run(&mut self, hook: Hook, frame: &[u8], repeat: u32) -> Result<TestRunOutput> {
        let name = Attachment::for_hook(hook)
            .ok_or_else(|| anyhow!("{} has no packet program to test-run", hook.name()))?
            .program();
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("eBPF object lacks program {name}"))?
            .try_into()?;
        // Room for programs that grow the frame (encapsulation).
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat.max(1);
        let result = prog
            .test_run(opts)
            .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            action: result.return_value as i32,
            frame: out,
            duration_per_run: result.duration,
        })
    }

    /// Counter totals over all CPUs, for every (hook, counter).
    pub fn counters(&self) -> Result<Vec<(Hook, Counter, CounterValue)>> {
        let map = self
            .ebpf
            .map(maps::COUNTERS)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", maps::COUNTERS))?;
        let array: PerCpuArray<&MapData, CounterValue> = PerCpuArray::try_from(map)?;
        sum_counters(&array)
    }

    fn ports_map(&mut self) -> Result<BpfHashMap<&mut MapData, PortKey, PortTarget>> {
        let map = self
            .ebpf
            .map_mut(maps::PORTS)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", maps::PORTS))?;
        Ok(BpfHashMap::try_from(map)?)
    }

    /// Publishes (or re-targets) a port.
    pub fn set_port(&mut self, key: PortKey, target: PortTarget) -> Result<()> {
        self.ports_map()?
            .insert(key, target, 0)
            .context("writing netd_ports (full? raise its size)")
    }

    /// Withdraws a published port; existing flows keep their translation.
    pub fn remove_port(&mut self, key: &PortKey) -> Result<()> {
        match self.ports_map()?.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every published port in the map.
    pub fn ports(&mut self) -> Result<Vec<(PortKey, PortTarget)>> {
        Ok(self.ports_map()?.iter().collect::<Result<_, _>>()?)
    }

    /// Writes the datapath settings (masquerade address, SNAT port range).
    pub fn set_config(&mut self, config: NatConfig) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(maps::CONFIG)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", maps::CONFIG))?;
        let mut array: Array<&mut MapData, NatConfig> = Array::try_from(map)?;
        array.set(0, config, 0)?;
        Ok(())
    }

    /// The datapath settings in force.
    pub fn config(&self) -> Result<NatConfig> {
        let map = self
            .ebpf
            .map(maps::CONFIG)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", maps::CONFIG))?;
        let array: Array<&MapData, NatConfig> = Array::try_from(map)?;
        Ok(array.get(&0, 0)?)
    }

    /// Sets the network of a container subnet.
    pub fn set_network(
        &mut self,
        addr: std::net::Ipv4Addr,
        prefix: u8,
        info: NetworkInfo,
    ) -> Result<()> {
        self.prefix_set::<tables::Networks>((addr, prefix), info)
    }

    pub fn remove_network(&mut self, addr: std::net::Ipv4Addr, prefix: u8) -> Result<()> {
        self.prefix_remove::<tables::Networks>((addr, prefix))
    }

    fn endpoints_map(&mut self) -> Result<BpfHashMap<&mut MapData, u32, Endpoint>> {
        let map = self
            .ebpf
            .map_mut(maps::ENDPOINTS)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", maps::ENDPOINTS))?;
        Ok(BpfHashMap::try_from(map)?)
    }

    /// Registers the container endpoint behind host-side veth `ifindex`.
    pub fn set_endpoint(&mut self, ifindex: u32, endpoint: Endpoint) -> Result<()> {
        self.endpoints_map()?
            .insert(ifindex, endpoint, 0)
            .context("writing netd_endpoints (full? raise its size)")
    }

    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<()> {
        match self.endpoints_map()?.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The endpoint registered behind host-side veth `ifindex`, if any.
    pub fn endpoint(&mut self, ifindex: u32) -> Result<Option<Endpoint>> {
        match self.endpoints_map()?.get(&ifindex, 0) {
            Ok(ep) => Ok(Some(ep)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every registered endpoint: (host-side veth ifindex, endpoint).
    pub fn endpoints(&mut self) -> Result<Vec<(u32, Endpoint)>> {
        Ok(self.endpoints_map()?.iter().collect::<Result<_, _>>()?)
    }

    fn locations_map(&mut self) -> Result<BpfHashMap<&mut MapData, [u8; 4], EndpointLocation>> {
        let map = self
            .ebpf
            .map_mut(maps::ENDPOINT_ADDRS)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", maps::ENDPOINT_ADDRS))?;
        Ok(BpfHashMap::try_from(map)?)
    }

    /// Where packets for container address `addr` are delivered directly.
    pub fn set_endpoint_location(
        &mut self,
        addr: std::net::Ipv4Addr,
        loc: EndpointLocation,
    ) -> Result<()> {
        self.locations_map()?
            .insert(addr.octets(), loc, 0)
            .context("writing netd_endpoint_addrs (full? raise its size)")
    }

    /// Where packets for `addr` are delivered directly, if anywhere.
    pub fn endpoint_location(
        &mut self,
        addr: std::net::Ipv4Addr,
    ) -> Result<Option<EndpointLocation>> {
        match self.locations_map()?.get(&addr.octets(), 0) {
            Ok(loc) => Ok(Some(loc)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn remove_endpoint_location(&mut self, addr: std::net::Ipv4Addr) -> Result<()> {
        match self.locations_map()?.remove(&addr.octets()) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every direct-delivery location: (container address, location).
    pub fn endpoint_locations(&mut self) -> Result<Vec<(std::net::Ipv4Addr, EndpointLocation)>> {
        Ok(self
            .locations_map()?
            .iter()
            .map(|r| r.map(|(a, l)| (a.into(), l)))
            .collect::<Result<_, _>>()?)
    }

    /// The targets `att` has pinned links on.
    pub fn attached_targets(&self, att: Attachment) -> Result<Vec<String>> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        Ok(pins
            .links()?
            .into_iter()
            .filter(|(a, _, _)| *a == att)
            .map(|(_, target, _)| target)
            .collect())
    }

    /// Every entry of the NAT connection table.
    pub fn nat_flows(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        let map = self
            .ebpf
            .map(maps::NAT_CT)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", maps::NAT_CT))?;
        let ct: BpfHashMap<&MapData, CtKey, CtEntry> = BpfHashMap::try_from(map)?;
        Ok(ct.iter().collect::<Result<_, _>>()?)
    }

    /// Expires idle NAT flows (see [`conntrack::gc`]).
    pub fn gc_nat_flows(
        &mut self,
        now_ns: u64,
        timeouts: &netd_common::CtTimeouts,
    ) -> Result<GcReport> {
        let map = self
            .ebpf
            .map_mut(maps::NAT_CT)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", maps::NAT_CT))?;
        let mut ct: BpfHashMap<&mut MapData, CtKey, CtEntry> = BpfHashMap::try_from(map)?;
        conntrack::gc(&mut ct, now_ns, timeouts)
    }

    /// Forwards pending datapath log records (with `debug_datapath`).
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(PinDir::path)
    }
}

fn stamp_layout(ebpf: &mut Ebpf) -> Result<()> {
    let mut meta: Array<&mut MapData, Meta> = Array::try_from(
        ebpf.map_mut(maps::META)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", maps::META))?,
    )?;
    meta.set(
        0,
        Meta {
            magic: META_MAGIC,
            layout_version: LAYOUT_VERSION,
        },
        0,
    )?;
    Ok(())
}

fn sum_counters<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, CounterValue>,
) -> Result<Vec<(Hook, Counter, CounterValue)>> {
    let mut out = Vec::with_capacity(COUNTER_SLOTS as usize);
    for hook in Hook::ALL {
        for counter in Counter::ALL {
            let per_cpu = array.get(&counter.index(hook), 0)?;
            let total = per_cpu
                .iter()
                .fold(CounterValue::default(), |acc, v| CounterValue {
                    packets: acc.packets + v.packets,
                    bytes: acc.bytes + v.bytes,
                });
            out.push((hook, counter, total));
        }
    }
    Ok(out)
}

/// Refuses to run without the privileges every dataplane operation needs.
pub fn require_privileges() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("netd needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run it with sudo");
    }
    Ok(())
}
