//! The daemon's side of segment networks (macvlan, ipvlan L2): where each
//! network's parent is on this host, the container MACs and addresses the
//! parents' programs demux, the containers each parent and VLAN copies
//! broadcasts into, the programs on the parents, and the parents' unicast
//! filters.
//!
//! A Join writes its endpoint's entries at once (the container's first
//! frame must find them); each picture of the cluster then brings the maps
//! to what the networks and the joined endpoints ask for.
use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;
use netd_common::{
    segment::{BroadcastDomain, FloodList, FloodPort, SegmentAddr, FLOOD_MAX, SEGMENT_SHARED_MAC},
    Endpoint, Segment, SegmentMac, SegmentPort,
};

use crate::{
    cluster::{NetworkRecord, Picture},
    dataplane::{
        Attachment, Dataplane, SegmentAddrs, SegmentFloods, SegmentMacs, Segments as SegmentTable,
    },
    netlink, reconcile,
};

const PARENT_ATTACHMENTS: [Attachment; 2] = [Attachment::ParentIngress, Attachment::ParentEgress];

#[derive(Default)]
pub struct Segments {
    /// Network id → its segment here, and the parent's name.
    networks: HashMap<u32, (Segment, String)>,
    /// Parents with netd's programs: name → the ifindex they went on (a
    /// parent deleted and created again under its name needs them again).
    attached: HashMap<String, u32>,
    /// (parent ifindex, MAC) put into unicast filters.
    filtered: HashSet<(u32, [u8; 6])>,
    /// Each broadcast domain's containers here, by address.
    members: Members,
    /// Domains with more containers than a broadcast reaches (said once).
    overfull: HashSet<BroadcastDomain>,
    /// Filter changes, applied in order by one task (a Leave and Join of
    /// the same MAC must not land the other way round).
    filter_ops: Option<tokio::sync::mpsc::UnboundedSender<FilterOp>>,
}

/// Add (true) or remove a MAC from a parent's unicast filter.
type FilterOp = (u32, [u8; 6], bool);

/// Broadcast domain → its containers on this host, by address.
type Members = BTreeMap<BroadcastDomain, BTreeMap<[u8; 4], FloodPort>>;

/// Applies filter changes in order, each retried a few times.
async fn apply_filter_ops(mut ops: tokio::sync::mpsc::UnboundedReceiver<FilterOp>) {
    while let Some((parent, mac, add)) = ops.recv().await {
        for attempt in 1..=3 {
            let done = match add {
                true => netlink::add_unicast_filter(parent, mac).await,
                false => netlink::remove_unicast_filter(parent, mac).await,
            };
            match done {
                Ok(()) => break,
                Err(e) if attempt == 3 => tracing::warn!("{e:#}"),
                Err(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
            }
        }
    }
}

impl Segments {
    /// Takes over the parents an earlier daemon attached to: their pinned
    /// links get this daemon's programs (an upgrade's too).
    pub fn new(dp: &mut Dataplane) -> Result<Self> {
        // The MACs an earlier daemon demuxed are the ones it put into the
        // parents' filters: the first picture takes out those whose
        // container left while netd was down.
        // And a Join before the first picture adds to the pinned domains'
        // members, rather than write a list of its endpoint alone.
        let addrs: HashMap<SegmentAddr, SegmentPort> =
            dp.table_entries::<SegmentAddrs>()?.into_iter().collect();
        let mut segments = Self {
            filtered: dp
                .table_entries::<SegmentMacs>()?
                .into_iter()
                .map(|(key, _)| (key.parent, key.mac))
                .collect(),
            members: members(&addrs),
            ..Self::default()
        };
        for parent in dp.attached_targets(Attachment::ParentIngress)? {
            let taken = crate::dataplane::interface_index(&parent)
                .and_then(|ifindex| segments.attach(dp, &parent, ifindex));
            if let Err(e) = taken {
                tracing::warn!("taking over the segment demux on {parent}: {e:#}");
            }
        }
        Ok(segments)
    }

    /// Resolves `network`'s parent on this host (Join's check that it
    /// exists here, and its MAC).
    pub async fn resolve(network: &NetworkRecord) -> Result<Segment> {
        let (parent, parent_mac, _) = netlink::link_identity(&network.parent).await?;
        Ok(Segment {
            parent,
            vlan: network.vlan,
            parent_mac,
            flags: if network.shares_parent_mac() {
                SEGMENT_SHARED_MAC
            } else {
                0
            },
        })
    }

    /// A segment endpoint joined on veth `ifindex`: its entries, the
    /// parent's programs, and its MAC in the parent's filter.
    pub fn join(
        &mut self,
        dp: &mut Dataplane,
        ifindex: u32,
        endpoint: &Endpoint,
        parent: &str,
        segment: Segment,
    ) -> Result<()> {
        self.networks
            .insert(endpoint.network, (segment, parent.to_owned()));
        dp.table_set::<SegmentTable>(endpoint.network, segment)?;
        let (addr, port) = addr_entry(&segment, ifindex, endpoint);
        dp.table_set::<SegmentAddrs>(addr, port)?;
        if let Some((key, port)) = mac_entry(&segment, ifindex, endpoint) {
            dp.table_set::<SegmentMacs>(key, port)?;
            self.filter(segment.parent, endpoint.mac);
        }
        let domain = domain_of(&segment);
        self.members.entry(domain).or_default().insert(
            endpoint.addr,
            FloodPort {
                ifindex,
                network: endpoint.network,
            },
        );
        self.write_flood(dp, domain)?;
        self.attach(dp, parent, segment.parent)?;
        Ok(())
    }

    /// Writes `domain`'s flood list from its members (or takes it out).
    fn write_flood(&mut self, dp: &mut Dataplane, domain: BroadcastDomain) -> Result<()> {
        match self.members.get(&domain).filter(|m| !m.is_empty()) {
            Some(members) => {
                let list = flood_list(members, self.parent_mac(domain.parent));
                self.say_overfull(domain, members.len());
                dp.table_set::<SegmentFloods>(domain, list)
            }
            None => {
                self.members.remove(&domain);
                dp.table_remove::<SegmentFloods>(&domain)
            }
        }
    }

    fn parent_mac(&self, ifindex: u32) -> [u8; 6] {
        parent_mac_in(&self.networks, ifindex)
    }

    fn say_overfull(&mut self, domain: BroadcastDomain, members: usize) {
        if members <= FLOOD_MAX {
            self.overfull.remove(&domain);
        } else if self.overfull.insert(domain) {
            tracing::warn!(
                "parent ifindex {} VLAN {}: {members} containers on this host; \
                 broadcasts reach only {FLOOD_MAX} of them",
                domain.parent,
                domain.vlan
            );
        }
    }

    /// Whether `network` is a segment network here.
    pub fn has(&self, network: u32) -> bool {
        self.networks.contains_key(&network)
    }

    /// An endpoint that left: its MAC is nobody's here any more.
    pub fn leave(&mut self, dp: &mut Dataplane, endpoint: &Endpoint) -> Result<()> {
        let Some((segment, _)) = self.networks.get(&endpoint.network) else {
            return Ok(());
        };
        let segment = *segment;
        let (addr, _) = addr_entry(&segment, 0, endpoint);
        dp.table_remove::<SegmentAddrs>(&addr)?;
        if let Some((key, _)) = mac_entry(&segment, 0, endpoint) {
            dp.table_remove::<SegmentMacs>(&key)?;
            self.unfilter(segment.parent, endpoint.mac);
        }
        let domain = domain_of(&segment);
        if let Some(members) = self.members.get_mut(&domain) {
            members.remove(&endpoint.addr);
        }
        self.write_flood(dp, domain)
    }

    /// Brings the segment maps, the parents' programs and their filters to
    /// `picture` and the endpoints joined here (by veth ifindex).
    pub async fn apply(
        &mut self,
        dp: &mut Dataplane,
        picture: &Picture,
        joined: &[(u32, Endpoint)],
    ) -> Result<()> {
        let mut networks = HashMap::new();
        for n in picture.networks.iter().filter(|n| n.is_segment()) {
            let id = netd_common::network::network_id(&n.id);
            match Self::resolve(n).await {
                Ok(segment) => {
                    networks.insert(id, (segment, n.parent.clone()));
                }
                // Not an error of this host's until a container joins; one
                // that worked before keeps what it had (a failed read must
                // not take the containers' entries away).
                Err(e) => {
                    tracing::debug!("network {}: {e:#}", n.label());
                    if let Some(known) = self.networks.get(&id) {
                        networks.insert(id, known.clone());
                    }
                }
            }
        }
        // A network the picture lacks but an endpoint joined (a picture
        // older than the Join) keeps what the Join found.
        for (_, ep) in joined {
            if let Some(known) = self.networks.get(&ep.network) {
                networks.entry(ep.network).or_insert_with(|| known.clone());
            }
        }
        let (tables, macs, addrs) = desired(&networks, joined);
        reconcile::table::<SegmentTable>(dp, &tables)?;
        reconcile::table::<SegmentMacs>(dp, &macs)?;
        reconcile::table::<SegmentAddrs>(dp, &addrs)?;
        self.members = members(&addrs);
        let floods: HashMap<BroadcastDomain, FloodList> = self
            .members
            .iter()
            .map(|(domain, m)| {
                let mac = parent_mac_in(&networks, domain.parent);
                (*domain, flood_list(m, mac))
            })
            .collect();
        reconcile::table::<SegmentFloods>(dp, &floods)?;
        let sizes: Vec<_> = self.members.iter().map(|(d, m)| (*d, m.len())).collect();
        for (domain, size) in sizes {
            self.say_overfull(domain, size);
        }
        let parents: HashMap<String, u32> = networks
            .values()
            .map(|(s, p)| (p.clone(), s.parent))
            .collect();
        for (parent, ifindex) in &parents {
            if let Err(e) = self.attach(dp, parent, *ifindex) {
                tracing::warn!("{e:#}");
            }
        }
        let gone: Vec<String> = self
            .attached
            .keys()
            .filter(|p| !parents.contains_key(*p))
            .cloned()
            .collect();
        for parent in gone {
            for att in PARENT_ATTACHMENTS {
                dp.detach(att, &parent)?;
            }
            self.attached.remove(&parent);
            tracing::info!("no segment network on {parent} any more: detached");
        }
        let wanted: HashSet<(u32, [u8; 6])> = macs.keys().map(|k| (k.parent, k.mac)).collect();
        for (parent, mac) in self.filtered.clone().difference(&wanted) {
            self.unfilter(*parent, *mac);
        }
        for (parent, mac) in wanted {
            self.filter(parent, mac);
        }
        self.networks = networks;
        Ok(())
    }

    /// netd's programs on `parent`, at `ifindex` (again, when the name
    /// now stands for another interface: its pinned links went with the
    /// old one, and `Dataplane::attach` replaces stale ones).
    fn attach(&mut self, dp: &mut Dataplane, parent: &str, ifindex: u32) -> Result<()> {
        match self.attached.get(parent) {
            Some(known) if *known == ifindex => return Ok(()),
            Some(_) => tracing::info!("{parent} was created again: attaching anew"),
            None => {}
        }
        for att in PARENT_ATTACHMENTS {
            dp.attach(att, parent)?;
        }
        tracing::info!("segment demux attached to {parent}");
        self.attached.insert(parent.to_owned(), ifindex);
        Ok(())
    }

    fn filter(&mut self, parent: u32, mac: [u8; 6]) {
        if self.filtered.insert((parent, mac)) {
            self.send_filter_op((parent, mac, true));
        }
    }

    fn unfilter(&mut self, parent: u32, mac: [u8; 6]) {
        if self.filtered.remove(&(parent, mac)) {
            self.send_filter_op((parent, mac, false));
        }
    }

    fn send_filter_op(&mut self, op: FilterOp) {
        let ops = self.filter_ops.get_or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(apply_filter_ops(rx));
            tx
        });
        let _ = ops.send(op);
    }
}

fn port(segment: &Segment, ifindex: u32, endpoint: &Endpoint) -> SegmentPort {
    SegmentPort {
        ifindex,
        network: endpoint.network,
        flags: segment.flags,
    }
}

/// The `netd_segment_macs` entry of `endpoint` behind veth `ifindex`; none
/// in ipvlan mode, where the MAC is the parent's.
fn mac_entry(
    segment: &Segment,
    ifindex: u32,
    endpoint: &Endpoint,
) -> Option<(SegmentMac, SegmentPort)> {
    (segment.flags & SEGMENT_SHARED_MAC == 0).then(|| {
        let key = SegmentMac {
            parent: segment.parent,
            vlan: segment.vlan,
            mac: endpoint.mac,
        };
        (key, port(segment, ifindex, endpoint))
    })
}

/// The `netd_segment_addrs` entry of `endpoint` behind veth `ifindex`.
fn addr_entry(segment: &Segment, ifindex: u32, endpoint: &Endpoint) -> (SegmentAddr, SegmentPort) {
    let key = SegmentAddr {
        parent: segment.parent,
        vlan: segment.vlan,
        _pad: 0,
        addr: endpoint.addr,
    };
    (key, port(segment, ifindex, endpoint))
}

fn domain_of(segment: &Segment) -> BroadcastDomain {
    BroadcastDomain {
        parent: segment.parent,
        vlan: segment.vlan,
        _pad: 0,
    }
}

/// The containers of each broadcast domain, from the address entries.
fn members(addrs: &HashMap<SegmentAddr, SegmentPort>) -> Members {
    let mut members = Members::new();
    for (key, port) in addrs {
        let domain = BroadcastDomain {
            parent: key.parent,
            vlan: key.vlan,
            _pad: 0,
        };
        members.entry(domain).or_default().insert(
            key.addr,
            FloodPort {
                ifindex: port.ifindex,
                network: port.network,
            },
        );
    }
    members
}

/// The MAC of parent `ifindex`, from the segments resolved on it.
fn parent_mac_in(networks: &HashMap<u32, (Segment, String)>, ifindex: u32) -> [u8; 6] {
    networks
        .values()
        .find(|(s, _)| s.parent == ifindex)
        .map_or([0; 6], |(s, _)| s.parent_mac)
}

/// A domain's flood list: its first [`FLOOD_MAX`] containers by address,
/// and the parent's MAC.
fn flood_list(members: &BTreeMap<[u8; 4], FloodPort>, parent_mac: [u8; 6]) -> FloodList {
    let mut list = FloodList {
        parent_mac,
        ..FloodList::default()
    };
    for (slot, port) in list.ports.iter_mut().zip(members.values()) {
        *slot = *port;
        list.count += 1;
    }
    list
}

type Desired = (
    HashMap<u32, Segment>,
    HashMap<SegmentMac, SegmentPort>,
    HashMap<SegmentAddr, SegmentPort>,
);

/// What `netd_segments`, `netd_segment_macs` and `netd_segment_addrs` hold
/// for `networks` (id → segment here) and the endpoints joined here.
fn desired(networks: &HashMap<u32, (Segment, String)>, joined: &[(u32, Endpoint)]) -> Desired {
    let tables = networks.iter().map(|(id, (s, _))| (*id, *s)).collect();
    let mut macs = HashMap::new();
    let mut addrs = HashMap::new();
    for (ifindex, ep) in joined {
        let Some((segment, _)) = networks.get(&ep.network) else {
            continue;
        };
        macs.extend(mac_entry(segment, *ifindex, ep));
        let (key, port) = addr_entry(segment, *ifindex, ep);
        addrs.insert(key, port);
    }
    (tables, macs, addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_endpoints_of_segment_networks_get_mac_entries() {
        let segment = Segment {
            parent: 2,
            vlan: 100,
            parent_mac: [2, 0, 0, 0, 0, 1],
            flags: 0,
        };
        let networks = HashMap::from([(7, (segment, "eth0".to_owned()))]);
        let ep = |network, last| Endpoint {
            addr: [198, 18, 90, last],
            mac: [2, 0x4e, 198, 18, 90, last],
            _pad: [0; 2],
            network,
        };
        let (tables, macs, addrs) = desired(&networks, &[(10, ep(7, 2)), (11, ep(8, 3))]);
        assert_eq!(tables, HashMap::from([(7, segment)]));
        assert_eq!(addrs.len(), 1);
        assert_eq!(
            macs,
            HashMap::from([(
                SegmentMac {
                    parent: 2,
                    vlan: 100,
                    mac: [2, 0x4e, 198, 18, 90, 2]
                },
                SegmentPort {
                    ifindex: 10,
                    network: 7,
                    flags: 0,
                }
            )])
        );
        // ipvlan: by address only.
        let shared = Segment {
            flags: SEGMENT_SHARED_MAC,
            ..segment
        };
        let networks = HashMap::from([(7, (shared, "eth0".to_owned()))]);
        let (_, macs, addrs) = desired(&networks, &[(10, ep(7, 2))]);
        assert!(macs.is_empty());
        assert_eq!(addrs.keys().next().map(|k| k.addr), Some([198, 18, 90, 2]));
    }

    #[test]
    fn a_domains_flood_list_holds_its_containers_up_to_the_bound() {
        let key = |vlan, last| SegmentAddr {
            parent: 2,
            vlan,
            _pad: 0,
            addr: [198, 18, 90, last],
        };
        let port = |ifindex| SegmentPort {
            ifindex,
            network: 7,
            flags: 0,
        };
        let addrs = HashMap::from([
            (key(100, 3), port(13)),
            (key(100, 2), port(12)),
            (key(200, 2), port(22)),
        ]);
        let domains = members(&addrs);
        assert_eq!(domains.len(), 2, "one list per VLAN");
        let domain = BroadcastDomain {
            parent: 2,
            vlan: 100,
            _pad: 0,
        };
        let list = flood_list(&domains[&domain], [2, 0, 0, 0, 0, 1]);
        assert_eq!(list.count, 2);
        assert_eq!(list.parent_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(
            list.ports[..2]
                .iter()
                .map(|p| p.ifindex)
                .collect::<Vec<_>>(),
            [12, 13],
            "by address"
        );
        let many: HashMap<_, _> = (1..=FLOOD_MAX as u8 + 5)
            .map(|last| (key(100, last), port(u32::from(last))))
            .collect();
        let list = flood_list(&members(&many)[&domain], [0; 6]);
        assert_eq!(list.count as usize, FLOOD_MAX);
        assert_eq!(list.ports[FLOOD_MAX - 1].ifindex, FLOOD_MAX as u32);
    }
}
