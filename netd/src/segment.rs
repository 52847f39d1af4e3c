//! The daemon's side of segment (macvlan) networks: where each network's
//! parent is on this host, the container MACs the parents' programs demux,
//! the programs on the parents, and the parents' unicast filters.
//!
//! A Join writes its endpoint's entries at once (the container's first
//! frame must find them); each picture of the cluster then brings the maps
//! to what the networks and the joined endpoints ask for.
use std::collections::{HashMap, HashSet};

use anyhow::Result;
use netd_common::{Endpoint, Segment, SegmentMac, SegmentPort};

use crate::{
    cluster::{NetworkRecord, Picture},
    dataplane::{Attachment, Dataplane, SegmentMacs, Segments as SegmentTable},
    netlink, reconcile,
};

const PARENT_ATTACHMENTS: [Attachment; 2] = [Attachment::ParentIngress, Attachment::ParentEgress];

#[derive(Default)]
pub struct Segments {
    /// Network id → its segment here, and the parent's name.
    networks: HashMap<u32, (Segment, String)>,
    /// Parents with netd's programs, by name.
    attached: HashSet<String>,
    /// (parent ifindex, MAC) put into unicast filters.
    filtered: HashSet<(u32, [u8; 6])>,
}

impl Segments {
    /// Picks up the parents an earlier daemon attached to.
    pub fn new(dp: &Dataplane) -> Result<Self> {
        Ok(Self {
            attached: dp
                .attached_targets(Attachment::ParentIngress)?
                .into_iter()
                .collect(),
            ..Self::default()
        })
    }

    /// Resolves `network`'s parent on this host (Join's check that it
    /// exists here, and its MAC).
    pub async fn resolve(network: &NetworkRecord) -> Result<Segment> {
        let (parent, parent_mac, _) = netlink::link_identity(&network.parent).await?;
        Ok(Segment {
            parent,
            vlan: network.vlan,
            parent_mac,
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
        let (key, port) = mac_entry(&segment, ifindex, endpoint);
        dp.table_set::<SegmentMacs>(key, port)?;
        self.attach(dp, parent)?;
        self.filter(segment.parent, endpoint.mac);
        Ok(())
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
        let (key, _) = mac_entry(segment, 0, endpoint);
        dp.table_remove::<SegmentMacs>(&key)?;
        let parent = segment.parent;
        self.unfilter(parent, endpoint.mac);
        Ok(())
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
                // Not an error of this host's until a container joins.
                Err(e) => tracing::debug!("network {}: {e:#}", n.label()),
            }
        }
        // A network the picture lacks but an endpoint joined (a picture
        // older than the Join) keeps what the Join found.
        for (_, ep) in joined {
            if let Some(known) = self.networks.get(&ep.network) {
                networks.entry(ep.network).or_insert_with(|| known.clone());
            }
        }
        let (tables, macs) = desired(&networks, joined);
        reconcile::table::<SegmentTable>(dp, &tables)?;
        reconcile::table::<SegmentMacs>(dp, &macs)?;
        let parents: HashSet<String> = networks.values().map(|(_, p)| p.clone()).collect();
        for parent in &parents {
            if let Err(e) = self.attach(dp, parent) {
                tracing::warn!("{e:#}");
            }
        }
        for parent in self.attached.clone().difference(&parents) {
            for att in PARENT_ATTACHMENTS {
                dp.detach(att, parent)?;
            }
            self.attached.remove(parent);
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

    fn attach(&mut self, dp: &mut Dataplane, parent: &str) -> Result<()> {
        if self.attached.contains(parent) {
            return Ok(());
        }
        for att in PARENT_ATTACHMENTS {
            dp.attach(att, parent)?;
        }
        tracing::info!("segment demux attached to {parent}");
        self.attached.insert(parent.to_owned());
        Ok(())
    }

    fn filter(&mut self, parent: u32, mac: [u8; 6]) {
        if self.filtered.insert((parent, mac)) {
            tokio::spawn(async move {
                if let Err(e) = netlink::add_unicast_filter(parent, mac).await {
                    tracing::warn!("{e:#}");
                }
            });
        }
    }

    fn unfilter(&mut self, parent: u32, mac: [u8; 6]) {
        if self.filtered.remove(&(parent, mac)) {
            tokio::spawn(async move {
                if let Err(e) = netlink::remove_unicast_filter(parent, mac).await {
                    tracing::debug!("{e:#}");
                }
            });
        }
    }
}

/// The `netd_segment_macs` entry of `endpoint` behind veth `ifindex`.
fn mac_entry(segment: &Segment, ifindex: u32, endpoint: &Endpoint) -> (SegmentMac, SegmentPort) {
    (
        SegmentMac {
            parent: segment.parent,
            vlan: segment.vlan,
            mac: endpoint.mac,
        },
        SegmentPort {
            ifindex,
            network: endpoint.network,
        },
    )
}

/// What `netd_segments` and `netd_segment_macs` hold for `networks` (id →
/// segment here) and the endpoints joined here.
fn desired(
    networks: &HashMap<u32, (Segment, String)>,
    joined: &[(u32, Endpoint)],
) -> (HashMap<u32, Segment>, HashMap<SegmentMac, SegmentPort>) {
    let tables = networks.iter().map(|(id, (s, _))| (*id, *s)).collect();
    let macs = joined
        .iter()
        .filter_map(|(ifindex, ep)| {
            let (segment, _) = networks.get(&ep.network)?;
            Some(mac_entry(segment, *ifindex, ep))
        })
        .collect();
    (tables, macs)
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
        };
        let networks = HashMap::from([(7, (segment, "eth0".to_owned()))]);
        let ep = |network, last| Endpoint {
            addr: [198, 18, 90, last],
            mac: [2, 0x4e, 198, 18, 90, last],
            _pad: [0; 2],
            network,
        };
        let (tables, macs) = desired(&networks, &[(10, ep(7, 2)), (11, ep(8, 3))]);
        assert_eq!(tables, HashMap::from([(7, segment)]));
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
                    network: 7
                }
            )])
        );
    }
}
