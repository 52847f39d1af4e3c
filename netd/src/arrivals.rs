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
//! container's namespace by its id, without entering it. Docker's report
//! then confirms (and, being the authority, overrides) what was read.
use std::{
    collections::HashMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use netd_common::Endpoint;

use crate::netlink::BridgePort;

/// A bridge of a Docker network netd serves, by the bridge's ifindex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedBridge {
    /// netd's id of the network (`network_id` of Docker's id).
    pub network: u32,
    pub subnets: Vec<(Ipv4Addr, u8)>,
}

/// How long a veth may stay on a served bridge without Docker naming it as
/// a running container's endpoint. After that it is left alone (detached):
/// it is not a container netd knows how to check.
pub const GRACE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Arrival {
    pub ifname: String,
    pub since: Instant,
    /// Read from the container's namespace; None until its carrier is up.
    pub endpoint: Option<Endpoint>,
}

/// Veths on served bridges that Docker has not reported yet.
#[derive(Debug, Default)]
pub struct Arrivals {
    ports: HashMap<u32, Arrival>,
}

/// What to do about a bridge port that changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Not a veth netd serves, or nothing new.
    Nothing,
    /// Newly seen: attach the container programs (traffic dropped until the
    /// endpoint is known).
    Attach,
    /// Attached; its carrier is up: read the container's end (namespace
    /// id, ifindex there) and register the endpoint.
    Identify(i32, u32),
}

impl Arrivals {
    /// The next step for `port`. `registered`: the datapath already has an
    /// endpoint behind this veth (Docker reported it, or a previous daemon
    /// registered it).
    pub fn step(
        &mut self,
        port: &BridgePort,
        bridges: &HashMap<u32, ServedBridge>,
        registered: bool,
        now: Instant,
    ) -> Step {
        if !bridges.contains_key(&port.master) {
            self.ports.remove(&port.ifindex);
            return Step::Nothing;
        }
        let arrival = match self.ports.get(&port.ifindex) {
            Some(a) => a,
            None if registered => return Step::Nothing,
            None => {
                self.ports.insert(
                    port.ifindex,
                    Arrival {
                        ifname: port.name.clone(),
                        since: now,
                        endpoint: None,
                    },
                );
                // Attach first; the caller then asks again (its carrier
                // may be up already).
                return Step::Attach;
            }
        };
        match (arrival.endpoint, port.carrier, port.peer) {
            (None, true, Some((nsid, peer))) => Step::Identify(nsid, peer),
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
    }

    /// Merges the arrivals into Docker's picture of the endpoints: those
    /// Docker reports are forgotten (confirmed), as are veths gone
    /// (`name_of` no longer gives their name) or waiting longer than
    /// [`GRACE`]. The rest join `desired` when identified, else are
    /// returned: veths to keep attached with no endpoint.
    pub fn merge(
        &mut self,
        desired: &mut HashMap<u32, (String, Endpoint)>,
        name_of: impl Fn(u32) -> Option<String>,
        now: Instant,
    ) -> Vec<String> {
        self.ports.retain(|ifindex, a| {
            if desired.contains_key(ifindex) || name_of(*ifindex).as_ref() != Some(&a.ifname) {
                return false;
            }
            if now.duration_since(a.since) > GRACE {
                tracing::warn!(
                    "veth {} has been on a Docker bridge for {GRACE:?} without Docker reporting a container for it; left to the kernel",
                    a.ifname
                );
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

/// The endpoint a container's end of a veth on `bridge` stands for: its MAC
/// and its one address inside the network's subnets. None when there is no
/// such address, or more than one (then Docker's report decides).
pub fn endpoint_of(mac: [u8; 6], addrs: &[Ipv4Addr], bridge: &ServedBridge) -> Option<Endpoint> {
    let inside = |a: &Ipv4Addr| {
        bridge.subnets.iter().any(|&(net, prefix)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(*a) & mask == u32::from(net) & mask
        })
    };
    let mut ours = addrs.iter().filter(|a| inside(a));
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

    #[test]
    fn the_one_address_in_the_subnet_makes_the_endpoint() {
        let b = bridge();
        let ep = endpoint_of(MAC, &[Ipv4Addr::new(198, 19, 1, 2)], &b).unwrap();
        assert_eq!((ep.addr, ep.mac, ep.network), ([198, 19, 1, 2], MAC, 7));
        assert!(endpoint_of(MAC, &[Ipv4Addr::new(198, 19, 2, 2)], &b).is_none());
        assert!(endpoint_of(MAC, &[], &b).is_none());
        let two = [Ipv4Addr::new(198, 19, 1, 2), Ipv4Addr::new(198, 19, 1, 3)];
        assert!(endpoint_of(MAC, &two, &b).is_none(), "ambiguous");
    }

    #[test]
    fn a_veth_is_attached_when_enslaved_and_identified_once_its_carrier_is_up() {
        let bridges = HashMap::from([(3, bridge())]);
        let now = Instant::now();
        let mut a = Arrivals::default();
        assert_eq!(
            a.step(&port(9, false, None), &bridges, false, now),
            Step::Attach
        );
        assert_eq!(
            a.step(&port(9, false, None), &bridges, false, now),
            Step::Nothing
        );
        assert_eq!(
            a.step(&port(9, true, Some((0, 2))), &bridges, false, now),
            Step::Identify(0, 2)
        );
        let ep = endpoint_of(MAC, &[Ipv4Addr::new(198, 19, 1, 2)], &bridge()).unwrap();
        a.identified(9, ep);
        assert_eq!(
            a.step(&port(9, true, Some((0, 2))), &bridges, false, now),
            Step::Nothing
        );
        // Known to the datapath already, or on a bridge netd does not serve.
        assert_eq!(
            a.step(&port(10, true, None), &bridges, true, now),
            Step::Nothing
        );
        let mut other = port(11, true, None);
        other.master = 4;
        assert_eq!(a.step(&other, &bridges, false, now), Step::Nothing);
    }

    #[test]
    fn merging_keeps_the_unconfirmed_and_forgets_the_confirmed_gone_and_stale() {
        let bridges = HashMap::from([(3, bridge())]);
        let t0 = Instant::now();
        let mut a = Arrivals::default();
        for i in [9, 10, 11, 12] {
            a.step(&port(i, false, None), &bridges, false, t0);
        }
        let ep = endpoint_of(MAC, &[Ipv4Addr::new(198, 19, 1, 2)], &bridge()).unwrap();
        a.identified(9, ep);
        // 10: Docker reports it; 11: its veth is gone; 12: not identified.
        let mut desired = HashMap::from([(10, ("veth10".to_owned(), ep))]);
        let names = |i: u32| (i != 11).then(|| format!("veth{i}"));
        let attach_only = a.merge(&mut desired, names, t0);
        assert_eq!(attach_only, vec!["veth12".to_owned()]);
        assert_eq!(desired.len(), 2);
        assert_eq!(desired[&9], ("veth9".to_owned(), ep));
        // Past the grace period nothing is kept.
        let mut desired = HashMap::new();
        let later = t0 + GRACE + Duration::from_secs(1);
        assert!(a.merge(&mut desired, names, later).is_empty());
        assert!(desired.is_empty());
    }
}
