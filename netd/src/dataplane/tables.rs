//! The cluster networks' hash maps (overlay networks, VNIs, peers, VTEPs;
//! segments and their MACs) through one set of accessors, and the tunnel
//! settings.
use std::hash::Hash;

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap as BpfHashMap, MapData, MapError,
    },
    Pod,
};
use netd_common::{
    maps,
    overlay::RoutedBlock,
    segment::{BroadcastDomain, FloodList, SegmentAddr},
    NetworkInfo, OverlayNetwork, Peer, Segment, SegmentMac, SegmentPort, TunnelConfig,
};

use super::Dataplane;

/// A hash map of the datapath, by what it holds.
pub trait Table {
    const NAME: &'static str;
    type Key: Pod + Eq + Hash;
    type Value: Pod + PartialEq;
}

/// Network id → its VNI and anycast gateway.
pub struct Overlays;
impl Table for Overlays {
    const NAME: &'static str = maps::OVERLAYS;
    type Key = u32;
    type Value = OverlayNetwork;
}

/// VNI → network id.
pub struct Vnis;
impl Table for Vnis {
    const NAME: &'static str = maps::VNIS;
    type Key = u32;
    type Value = u32;
}

/// Container address on another host → where it is.
pub struct Peers;
impl Table for Peers {
    const NAME: &'static str = maps::PEERS;
    type Key = [u8; 4];
    type Value = Peer;
}

/// The cluster's VTEP addresses.
pub struct Vteps;
impl Table for Vteps {
    const NAME: &'static str = maps::VTEPS;
    type Key = [u8; 4];
    type Value = u32;
}

/// Segment network id → its parent and VLAN on this host.
pub struct Segments;
impl Table for Segments {
    const NAME: &'static str = maps::SEGMENTS;
    type Key = u32;
    type Value = Segment;
}

/// (parent, VLAN, MAC) → the segment container holding the MAC.
pub struct SegmentMacs;
impl Table for SegmentMacs {
    const NAME: &'static str = maps::SEGMENT_MACS;
    type Key = SegmentMac;
    type Value = SegmentPort;
}

/// (parent, VLAN, address) → the segment container holding the address.
pub struct SegmentAddrs;
impl Table for SegmentAddrs {
    const NAME: &'static str = maps::SEGMENT_ADDRS;
    type Key = SegmentAddr;
    type Value = SegmentPort;
}

/// (parent, VLAN) → the segment containers its broadcasts are copied into.
pub struct SegmentFloods;
impl Table for SegmentFloods {
    const NAME: &'static str = maps::SEGMENT_FLOODS;
    type Key = BroadcastDomain;
    type Value = FloodList;
}

/// An LPM trie of the datapath keyed by IPv4 prefix, by what it holds.
pub trait PrefixTable {
    const NAME: &'static str;
    type Value: Pod + PartialEq;
}

/// Container subnets (and the host's gateway /32s) → their network.
pub struct Networks;
impl PrefixTable for Networks {
    const NAME: &'static str = maps::NETWORKS;
    type Value = NetworkInfo;
}

/// Other hosts' blocks of routed networks → the host.
pub struct RoutedBlocks;
impl PrefixTable for RoutedBlocks {
    const NAME: &'static str = maps::ROUTED_BLOCKS;
    type Value = RoutedBlock;
}

/// An IPv4 prefix: (address, length).
pub type Prefix = (std::net::Ipv4Addr, u8);

impl Dataplane {
    fn prefix_table<T: PrefixTable>(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 4], T::Value>> {
        let map = self
            .ebpf
            .map_mut(T::NAME)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", T::NAME))?;
        Ok(LpmTrie::try_from(map)?)
    }

    pub fn prefix_entries<T: PrefixTable>(&mut self) -> Result<Vec<(Prefix, T::Value)>> {
        let trie = self.prefix_table::<T>()?;
        let mut out = Vec::new();
        for key in trie.keys() {
            let key = key?;
            let value = trie.get(&key, 0)?;
            out.push(((key.data().into(), key.prefix_len() as u8), value));
        }
        Ok(out)
    }

    pub fn prefix_set<T: PrefixTable>(
        &mut self,
        (addr, len): Prefix,
        value: T::Value,
    ) -> Result<()> {
        self.prefix_table::<T>()?
            .insert(&LpmKey::new(u32::from(len), addr.octets()), value, 0)
            .with_context(|| format!("writing {} (full? raise its size)", T::NAME))
    }

    pub fn prefix_remove<T: PrefixTable>(&mut self, (addr, len): Prefix) -> Result<()> {
        match self
            .prefix_table::<T>()?
            .remove(&LpmKey::new(u32::from(len), addr.octets()))
        {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn table<T: Table>(&mut self) -> Result<BpfHashMap<&mut MapData, T::Key, T::Value>> {
        let map = self
            .ebpf
            .map_mut(T::NAME)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", T::NAME))?;
        Ok(BpfHashMap::try_from(map)?)
    }

    pub fn table_entries<T: Table>(&mut self) -> Result<Vec<(T::Key, T::Value)>> {
        Ok(self.table::<T>()?.iter().collect::<Result<_, _>>()?)
    }

    pub fn table_set<T: Table>(&mut self, key: T::Key, value: T::Value) -> Result<()> {
        self.table::<T>()?
            .insert(key, value, 0)
            .with_context(|| format!("writing {} (full? raise its size)", T::NAME))
    }

    pub fn table_remove<T: Table>(&mut self, key: &T::Key) -> Result<()> {
        match self.table::<T>()?.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn set_tunnel(&mut self, config: TunnelConfig) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(maps::TUNNEL)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", maps::TUNNEL))?;
        let mut array: Array<&mut MapData, TunnelConfig> = Array::try_from(map)?;
        array.set(0, config, 0)?;
        Ok(())
    }

    pub fn tunnel(&self) -> Result<TunnelConfig> {
        let map = self
            .ebpf
            .map(maps::TUNNEL)
            .ok_or_else(|| anyhow!("eBPF object lacks map {}", maps::TUNNEL))?;
        let array: Array<&MapData, TunnelConfig> = Array::try_from(map)?;
        Ok(array.get(&0, 0)?)
    }
}
