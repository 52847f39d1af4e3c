//! Container veths between their appearance and Docker's word on them.
//!
//! Docker creates a container's veth, enslaves it to the network's bridge,
//! moves the other end into the container, configures it, starts the
//! container's process and only then sends the start event netd reconciles
//! on. A packet sent in that window would take the kernel's path with no
//! check or translation: a hairpin SYN to a published port is answered by
//! the listening socket dockerd holds on that port (its port reservation)
//! and the connection hangs, established and never served.
//!
//! So netd follows the veths themselves (rtnetlink): it attaches its
//! programs when the veth is enslaved to a bridge it serves — they drop the
//! veth's traffic while its endpoint is unknown — and registers the endpoint
//! when the veth's carrier comes up, which Docker does only after giving the
//! container's end its MAC and address; netd reads those from the
//! container's namespace by its id, without entering it. A new container's
//! process has not run yet then, so what its end holds is Docker's doing.
//! Docker's report then confirms (and, being the authority, overrides) what
//! was read.
use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use netd_common::Endpoint;

use crate::{netlink::BridgePort, state::subnet_contains};

/// A bridge of a Docker network netd serves, by the bridge's ifindex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedBridge {
    /// netd's id of the network (`network_id` of Docker's id).
    pub network: u32,
    pub subnets: Vec<(Ipv4Addr, u8)>,
    /// The host's own addresses on it: never a container's.
    pub gateways: Vec<Ipv4Addr>,
}

/// How long a veth may stay on a served bridge without Docker naming it as
/// a running container's endpoint. After that it is given up: detached and
/// left to the kernel's path until it is gone or Docker reports it (it is
/// no container netd knows how to check).
pub const GRACE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Arrival {
    pub ifname: String,
    pub since: Instant,
    /// Read from the container's namespace; None until its carrier is up.
    pub endpoint: Option<Endpoint>,
}

/// Docker's bridges and the veths on them that Docker has not reported
/// (yet).
#[derive(Debug, Default)]
pub struct Arrivals {
    bridges: HashMap<u32, ServedBridge>,
    /// Bridges Docker's latest networks do not include.
    unserved: HashSet<u32>,
    /// Veths on a bridge not known yet (ifindex → the bridge's): Docker's
    /// networks are being read.
    parked: HashMap<u32, u32>,
    ports: HashMap<u32, Arrival>,
    /// Given up after [`GRACE`], by ifindex: (name).
    abandoned: HashMap<u32, String>,
}

/// What to do about a bridge port that changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Not a veth netd serves, or nothing new.
    Nothing,
    /// Newly seen: attach the container programs (traffic dropped until the
    /// endpoint is known).
    Attach,
    /// Attached; its carrier is up: read the container's end and register
    /// the endpoint.
    Identify {
        /// The container's namespace, as netd's namespace knows it.
        nsid: i32,
        /// The container end's ifindex there.
        peer: u32,
    },
    /// On a bridge not known yet (a network created a moment ago): read
    /// Docker's networks, then look again.
    AskDocker,
}

impl Arrivals {
    /// The bridges of the networks Docker now has (by ifindex). A bridge
    /// the parked veths are on that is not among them is not Docker's.
    /// Returns the parked veths, to be looked at again.
    pub fn set_bridges(&mut self, bridges: HashMap<u32, ServedBridge>) -> Vec<u32> {
        let unserved: Vec<u32> = self.parked.values().copied().collect();
        self.unserved.extend(unserved);
        self.unserved.retain(|m| !bridges.contains_key(m));
        self.bridges = bridges;
        self.parked.drain().map(|(ifindex, _)| ifindex).collect()
    }

    pub fn bridge(&self, ifindex: u32) -> Option<&ServedBridge> {
        self.bridges.get(&ifindex)
    }

    /// The next step for `port`. `registered`: the endpoint the datapath
    /// has behind this veth, if any. `reported`: whether Docker's snapshot
    /// at hand reports it (None: no snapshot at hand, as for a link event).
    pub fn step(
        &mut self,
        port: &BridgePort,
        registered: Option<Endpoint>,
        reported: Option<bool>,
        now: Instant,
    ) -> Step {
        let ifindex = port.ifindex;
        if reported == Some(true) {
            // Docker's report rules from here on.
            self.ports.remove(&ifindex);
            self.abandoned.remove(&ifindex);
            return Step::Nothing;
        }
        if self.abandoned.get(&ifindex) == Some(&port.name) {
            return Step::Nothing;
        }
        if !self.bridges.contains_key(&port.master) {
            self.ports.remove(&ifindex);
            if self.unserved.contains(&port.master) {
                return Step::Nothing;
            }
            self.parked.insert(ifindex, port.master);
            return Step::AskDocker;
        }
        let Some(arrival) = self.ports.get(&ifindex) else {
            return match (registered, reported) {
                (None, _) => {
                    self.ports.insert(ifindex, arrival(port, None, now));
                    // Attach first; the caller then asks again (its carrier
                    // may be up already).
                    Step::Attach
                }
                // Registered by a previous daemon, not reported by Docker
                // (yet): keep it, as an arrival of its own.
                (Some(ep), Some(false)) => {
                    self.ports.insert(ifindex, arrival(port, Some(ep), now));
                    Step::Nothing
                }
                // Docker's, or left for the next pass to tell.
                (Some(_), _) => Step::Nothing,
            };
        };
        match (arrival.endpoint, port.carrier, port.peer) {
            (None, true, Some((nsid, peer))) => Step::Identify { nsid, peer },
            _ => Step::Nothing,
        }
    }

    /// Records the endpoint read for `ifindex`.
    pub fn identified(&mut self, ifindex: u32, endpoint: Endpoint) {
        if let Some(a) = self.ports.get_mut(&ifindex) {
            a.endpoint = Some(endpoint);
        }
    }

    pub fn forget(&mut self, ifindex: u32) {
        self.ports.remove(&ifindex);
        self.abandoned.remove(&ifindex);
        self.parked.remove(&ifindex);
    }

    /// Merges the arrivals into Docker's picture of the endpoints: those
    /// Docker reports are forgotten (confirmed), as are veths gone
    /// (`name_of` no longer gives their name); those waiting longer than
    /// [`GRACE`] are given up. The rest join `desired` when identified, else
    /// are returned: veths to keep attached with no endpoint.
    pub fn merge(
        &mut self,
        desired: &mut HashMap<u32, (String, Endpoint)>,
        name_of: impl Fn(u32) -> Option<String>,
        now: Instant,
    ) -> Vec<String> {
        let alive = |ifindex: u32, name: &String| name_of(ifindex).as_ref() == Some(name);
        self.abandoned
            .retain(|ifindex, name| !desired.contains_key(ifindex) && alive(*ifindex, name));
        let abandoned = &mut self.abandoned;
        self.ports.retain(|ifindex, a| {
            if desired.contains_key(ifindex) || !alive(*ifindex, &a.ifname) {
                return false;
            }
            if now.duration_since(a.since) > GRACE {
                tracing::warn!(
                    "veth {} has been on a Docker bridge for {GRACE:?} without Docker reporting a container for it: given up, its traffic left to the kernel",
                    a.ifname
                );
                abandoned.insert(*ifindex, a.ifname.clone());
                return false;
            }
            true
        });
        let mut attach_only = Vec::new();
        for (ifindex, a) in &self.ports {
            match a.endpoint {
                Some(ep) => {
                    desired.insert(*ifindex, (a.ifname.clone(), ep));
                }
                None => attach_only.push(a.ifname.clone()),
            }
        }
        attach_only
    }
}

fn arrival(port: &BridgePort, endpoint: Option<Endpoint>, now: Instant) -> Arrival {
    Arrival {
        ifname: port.name.clone(),
        since: now,
        endpoint,
    }
}

/// The endpoint a container's end of a veth on `bridge` stands for: its MAC
/// and its one address inside the network's subnets (never a gateway).
/// None when there is no such address, or more than one (then Docker's
/// report decides).
pub fn endpoint_of(mac: [u8; 6], addrs: &[Ipv4Addr], bridge: &ServedBridge) -> Option<Endpoint> {
    let inside = |a: &&Ipv4Addr| {
        !bridge.gateways.contains(a)
            && bridge
                .subnets
                .iter()
                .any(|&subnet| subnet_contains(subnet, **a))
    };
    let mut ours = addrs.iter().filter(inside);
    let addr = *ours.next()?;
    if ours.next().is_some() {
        return None;
    }
    Some(Endpoint {
        addr: addr.octets(),
        mac,
        _pad: [0; 2],
        network: bridge.network,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0x42, 198, 19, 1, 2];

    fn bridge() -> ServedBridge {
        ServedBridge {
            network: 7,
            subnets: vec![(Ipv4Addr::new(198, 19, 1, 0), 24)],
            gateways: vec![Ipv4Addr::new(198, 19, 1, 1)],
        }
    }

    fn port(ifindex: u32, carrier: bool, peer: Option<(i32, u32)>) -> BridgePort {
        BridgePort {
            ifindex,
            name: format!("veth{ifindex}"),
            master: 3,
            carrier,
            peer,
        }
    }

    fn served() -> Arrivals {
        let mut a = Arrivals::default();
        a.set_bridges(HashMap::from([(3, bridge())]));
        a
    }

    fn ep() -> Endpoint {
        endpoint_of(MAC, &[Ipv4Addr::new(198, 19, 1, 2)], &bridge()).unwrap()
    }

    #[test]
    fn the_one_address_in_the_subnet_makes_the_endpoint() {
        let b = bridge();
        let e = ep();
        assert_eq!((e.addr, e.mac, e.network), ([198, 19, 1, 2], MAC, 7));
        assert!(endpoint_of(MAC, &[Ipv4Addr::new(198, 19, 2, 2)], &b).is_none());
        assert!(endpoint_of(MAC, &[], &b).is_none());
        assert!(
            endpoint_of(MAC, &[Ipv4Addr::new(198, 19, 1, 1)], &b).is_none(),
            "the gateway is the host's"
        );
        let two = [Ipv4Addr::new(198, 19, 1, 2), Ipv4Addr::new(198, 19, 1, 3)];
        assert!(endpoint_of(MAC, &two, &b).is_none(), "ambiguous");
    }

    #[test]
    fn a_veth_is_attached_when_enslaved_and_identified_once_its_carrier_is_up() {
        let now = Instant::now();
        let mut a = served();
        assert_eq!(a.step(&port(9, false, None), None, None, now), Step::Attach);
        assert_eq!(
            a.step(&port(9, false, None), None, None, now),
            Step::Nothing
        );
        let up = port(9, true, Some((0, 2)));
        assert_eq!(
            a.step(&up, None, None, now),
            Step::Identify { nsid: 0, peer: 2 }
        );
        a.identified(9, ep());
        assert_eq!(a.step(&up, Some(ep()), None, now), Step::Nothing);
        // Known to the datapath already (Docker's).
        assert_eq!(
            a.step(&port(10, true, None), Some(ep()), None, now),
            Step::Nothing
        );
        // Docker reports it: its word rules.
        assert_eq!(a.step(&up, Some(ep()), Some(true), now), Step::Nothing);
        let mut desired = HashMap::new();
        assert!(a
            .merge(&mut desired, |i| Some(format!("veth{i}")), now)
            .is_empty());
        assert!(desired.is_empty(), "forgotten once Docker reported it");
    }

    #[test]
    fn a_veth_on_an_unknown_bridge_waits_for_dockers_networks() {
        let now = Instant::now();
        let mut a = served();
        let mut p = port(11, false, None);
        p.master = 4;
        assert_eq!(a.step(&p, None, None, now), Step::AskDocker);
        // Docker's networks include bridge 4 now.
        let mut b4 = bridge();
        b4.network = 8;
        assert_eq!(
            a.set_bridges(HashMap::from([(3, bridge()), (4, b4)])),
            vec![11]
        );
        assert_eq!(a.step(&p, None, None, now), Step::Attach);
        // A bridge that is not Docker's: asked once, then left alone.
        let mut q = port(12, false, None);
        q.master = 5;
        assert_eq!(a.step(&q, None, None, now), Step::AskDocker);
        assert_eq!(a.set_bridges(HashMap::from([(3, bridge())])), vec![12]);
        assert_eq!(a.step(&q, None, None, now), Step::Nothing);
    }

    #[test]
    fn a_previous_daemons_unconfirmed_endpoint_is_kept() {
        let now = Instant::now();
        let mut a = served();
        let p = port(9, true, Some((0, 2)));
        assert_eq!(a.step(&p, Some(ep()), Some(false), now), Step::Nothing);
        let mut desired = HashMap::new();
        assert!(a
            .merge(&mut desired, |i| Some(format!("veth{i}")), now)
            .is_empty());
        assert_eq!(desired[&9], ("veth9".to_owned(), ep()));
    }

    #[test]
    fn merging_keeps_the_unconfirmed_and_forgets_the_confirmed_gone_and_stale() {
        let t0 = Instant::now();
        let mut a = served();
        for i in [9, 10, 11, 12] {
            a.step(&port(i, false, None), None, None, t0);
        }
        a.identified(9, ep());
        // 10: Docker reports it; 11: its veth is gone; 12: not identified.
        let mut desired = HashMap::from([(10, ("veth10".to_owned(), ep()))]);
        let names = |i: u32| (i != 11).then(|| format!("veth{i}"));
        let attach_only = a.merge(&mut desired, names, t0);
        assert_eq!(attach_only, vec!["veth12".to_owned()]);
        assert_eq!(desired.len(), 2);
        assert_eq!(desired[&9], ("veth9".to_owned(), ep()));
        // Past the grace period nothing is kept, and what was given up
        // stays given up: a rescan does not attach it again.
        let mut desired = HashMap::new();
        let later = t0 + GRACE + Duration::from_secs(1);
        assert!(a.merge(&mut desired, names, later).is_empty());
        assert!(desired.is_empty());
        assert_eq!(
            a.step(&port(12, false, None), None, None, later),
            Step::Nothing
        );
        // … until Docker reports it, or the veth is gone.
        assert_eq!(
            a.step(&port(12, false, None), None, Some(true), later),
            Step::Nothing
        );
        assert_eq!(
            a.step(&port(12, false, None), None, None, later),
            Step::Attach
        );
    }
}
