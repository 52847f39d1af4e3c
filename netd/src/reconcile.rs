//! The reconciler: makes the maps equal to the desired state by applying
//! only the difference. Idempotent; safe to run at any time.
use std::collections::HashMap;

use anyhow::Result;
use netd_common::{Endpoint, EndpointLocation, NetworkInfo, PortKey, PortTarget};

use crate::dataplane::{Attachment, Dataplane, Networks, PrefixTable, Table};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
}

impl Applied {
    pub fn add(&mut self, other: Applied) {
        self.added += other.added;
        self.changed += other.changed;
        self.removed += other.removed;
    }
}

/// Brings `netd_ports` to `desired`.
pub fn ports(dp: &mut Dataplane, desired: &HashMap<PortKey, PortTarget>) -> Result<Applied> {
    let current: HashMap<PortKey, PortTarget> = dp.ports()?.into_iter().collect();
    let mut applied = Applied::default();
    for (key, target) in desired {
        match current.get(key) {
            Some(t) if t == target => {}
            Some(_) => {
                dp.set_port(*key, *target)?;
                applied.changed += 1;
            }
            None => {
                dp.set_port(*key, *target)?;
                applied.added += 1;
            }
        }
    }
    for key in current.keys().filter(|k| !desired.contains_key(k)) {
        dp.remove_port(key)?;
        applied.removed += 1;
    }
    Ok(applied)
}

/// Brings the overlay table `T` to `desired`.
pub fn table<T: Table>(dp: &mut Dataplane, desired: &HashMap<T::Key, T::Value>) -> Result<Applied> {
    let current: HashMap<T::Key, T::Value> = dp.table_entries::<T>()?.into_iter().collect();
    let mut applied = Applied::default();
    for (key, value) in desired {
        match current.get(key) {
            Some(v) if v == value => {}
            found => {
                dp.table_set::<T>(*key, *value)?;
                if found.is_some() {
                    applied.changed += 1;
                } else {
                    applied.added += 1;
                }
            }
        }
    }
    for key in current.keys().filter(|k| !desired.contains_key(k)) {
        dp.table_remove::<T>(key)?;
        applied.removed += 1;
    }
    Ok(applied)
}

/// Brings `netd_networks` to `desired` (subnet → network).
pub fn networks(
    dp: &mut Dataplane,
    desired: &HashMap<(std::net::Ipv4Addr, u8), NetworkInfo>,
) -> Result<Applied> {
    prefixes::<Networks>(dp, desired)
}

/// Brings the LPM table `T` to `desired`.
pub fn prefixes<T: PrefixTable>(
    dp: &mut Dataplane,
    desired: &HashMap<(std::net::Ipv4Addr, u8), T::Value>,
) -> Result<Applied> {
    let current: HashMap<(std::net::Ipv4Addr, u8), T::Value> =
        dp.prefix_entries::<T>()?.into_iter().collect();
    let mut applied = Applied::default();
    for (&prefix, value) in desired {
        match current.get(&prefix) {
            Some(v) if v == value => {}
            found => {
                dp.prefix_set::<T>(prefix, *value)?;
                if found.is_some() {
                    applied.changed += 1;
                } else {
                    applied.added += 1;
                }
            }
        }
    }
    for &prefix in current.keys().filter(|k| !desired.contains_key(k)) {
        dp.prefix_remove::<T>(prefix)?;
        applied.removed += 1;
    }
    Ok(applied)
}

/// Brings `netd_endpoints` and the container veth attachments to `desired`
/// (host-side veth ifindex → (veth name, endpoint)) plus `attach_only`:
/// veths that keep their programs while their endpoint is not known yet
/// (their traffic is dropped until it is). The map entry is written before
/// a program is attached, so a known endpoint's traffic is never dropped as
/// unknown. With `complete` false the picture is partial (an endpoint of
/// Docker's could not be resolved): only additions and changes are applied,
/// since removing what is missing could strip a running container's checks.
pub fn endpoints(
    dp: &mut Dataplane,
    desired: &HashMap<u32, (String, Endpoint)>,
    attach_only: &[String],
    complete: bool,
) -> Result<Applied> {
    let current: HashMap<u32, Endpoint> = dp.endpoints()?.into_iter().collect();
    let mut applied = Applied::default();
    for (ifindex, (_, endpoint)) in desired {
        match current.get(ifindex) {
            Some(e) if e == endpoint => {}
            found => {
                dp.set_endpoint(*ifindex, *endpoint)?;
                if found.is_some() {
                    applied.changed += 1;
                } else {
                    applied.added += 1;
                }
            }
        }
    }
    for att in [Attachment::ContainerEgress, Attachment::ContainerIngress] {
        let attached: Vec<String> = dp.attached_targets(att)?;
        let wanted = || desired.values().map(|(name, _)| name).chain(attach_only);
        for ifname in wanted() {
            if !attached.contains(ifname) {
                // One veth vanishing mid-pass must not stop the others.
                if let Err(e) = dp.attach(att, ifname) {
                    tracing::warn!("{e:#}");
                }
            }
        }
        if !complete {
            continue;
        }
        for ifname in attached.iter().filter(|a| !wanted().any(|name| name == *a)) {
            if let Err(e) = dp.detach(att, ifname) {
                tracing::warn!("{e:#}");
            }
        }
    }
    if complete {
        for ifindex in current.keys().filter(|i| !desired.contains_key(i)) {
            dp.remove_endpoint(*ifindex)?;
            applied.removed += 1;
        }
    }
    // Direct delivery by container address follows the same endpoints.
    let locations: HashMap<std::net::Ipv4Addr, EndpointLocation> = desired
        .iter()
        .map(|(ifindex, (_, ep))| (ep.addr.into(), EndpointLocation::of(*ifindex, ep)))
        .collect();
    let current: HashMap<std::net::Ipv4Addr, EndpointLocation> =
        dp.endpoint_locations()?.into_iter().collect();
    for (addr, loc) in &locations {
        if current.get(addr) != Some(loc) {
            dp.set_endpoint_location(*addr, *loc)?;
        }
    }
    if complete {
        for addr in current.keys().filter(|a| !locations.contains_key(a)) {
            dp.remove_endpoint_location(*addr)?;
        }
    }
    Ok(applied)
}
