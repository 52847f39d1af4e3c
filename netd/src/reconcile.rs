//! The reconciler: makes the maps equal to the desired state by applying
//! only the difference. Idempotent; safe to run at any time.
use std::collections::HashMap;

use anyhow::Result;
use netd_common::{PortKey, PortTarget};

use crate::dataplane::Dataplane;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
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
