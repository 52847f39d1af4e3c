//! Keeps this host's Docker holding a copy of every netd network of the
//! cluster, and no copy of a deleted one: a network created on any host
//! appears in every host's `docker network ls`, and `docker network rm` on
//! any host removes it everywhere.
//!
//! It runs outside the plugin's handlers (which must never call Docker's
//! API): woken by the cluster store's watch, by Docker's network events,
//! and every resync interval.
//!
//! A network is created nameless (Docker tells a driver the id only) and
//! named once its first host's Docker lists it. One that Docker never
//! lists (dockerd failed or died right after CreateNetwork) would hold its
//! subnet and VNI forever: its first host removes it from the store once
//! its Docker has not listed it for two resync intervals.
use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::sync::mpsc;

use crate::{
    cluster::{NetworkRecord, Store},
    docker::{self, NetdNetwork, NetworkCopy},
    plugin::{self, driver, LocalNetworks},
};

pub struct Mirror {
    pub docker: bollard::Docker,
    pub store: Store,
    pub local: LocalNetworks,
    /// This host's node name: the nameless networks it created are its own
    /// to name or collect.
    node: String,
    /// Problems already reported, so a resync does not repeat them.
    reported: HashSet<String>,
    /// Nameless networks of this host's that its Docker does not list, and
    /// since when (this daemon's clock).
    unlisted: HashMap<String, Instant>,
    /// How long one may stay unlisted: two resync intervals.
    unlisted_grace: Duration,
}

impl Mirror {
    pub fn new(
        docker: bollard::Docker,
        store: Store,
        local: LocalNetworks,
        node: String,
        resync: Duration,
    ) -> Self {
        Self {
            docker,
            store,
            local,
            node,
            reported: HashSet::new(),
            unlisted: HashMap::new(),
            unlisted_grace: resync * 2,
        }
    }

    /// Mirrors until `wake` closes: one pass per wake-up (a burst is one
    /// pass), and one every `resync`.
    pub async fn run(mut self, mut wake: mpsc::Receiver<()>, resync: Duration) {
        loop {
            if let Err(e) = self.pass().await {
                self.report(format!("mirroring the cluster's networks: {e:#}"));
            }
            tokio::select! {
                woken = wake.recv() => if woken.is_none() { return },
                _ = tokio::time::sleep(resync) => {}
            }
            while wake.try_recv().is_ok() {}
        }
    }

    fn report(&mut self, message: String) {
        if self.reported.insert(message.clone()) {
            tracing::warn!("{message}");
        }
    }

    async fn pass(&mut self) -> Result<()> {
        // Docker first: a copy it lists had its record written (in
        // CreateNetwork) before the store is read.
        let copies = docker::netd_networks(&self.docker, plugin::NAME, driver::OPT_ID).await?;
        let (records, _) = self.store.networks().await?;
        {
            let mut local = self.local.lock().expect("local networks lock");
            for c in &copies {
                local.insert(c.docker_id.clone(), c.netd_id.clone());
            }
        }
        let nameless: Vec<&NetworkRecord> = records.iter().filter(|r| r.name.is_empty()).collect();
        self.unlisted
            .retain(|id, _| nameless.iter().any(|r| &r.id == id));
        for record in nameless {
            if copies.iter().any(|c| c.docker_id == record.id) {
                self.unlisted.remove(&record.id);
                self.name(record, &copies).await;
            } else if record.origin == self.node {
                self.collect_if_unlisted(record).await;
            }
        }
        for record in records.iter().filter(|r| !r.name.is_empty()) {
            if !copies.iter().any(|c| c.netd_id == record.id) {
                self.copy(record).await;
            }
        }
        for copy in copies
            .iter()
            .filter(|c| !records.iter().any(|r| r.id == c.netd_id))
        {
            match docker::remove_network(&self.docker, &copy.docker_id).await {
                Ok(()) => tracing::info!(
                    "network {} is gone from the cluster: removed from Docker",
                    copy.name
                ),
                Err(e) => self.report(format!(
                    "network {} is gone from the cluster, but: {e:#}",
                    copy.name
                )),
            }
        }
        Ok(())
    }

    /// A network created here: the cluster learns its name from Docker.
    async fn name(&mut self, record: &NetworkRecord, copies: &[NetdNetwork]) {
        let Some(copy) = copies.iter().find(|c| c.docker_id == record.id) else {
            return;
        };
        match self.store.name_network(&record.id, &copy.name).await {
            Ok(_) => tracing::info!("network {} is in the cluster", copy.name),
            Err(e) => self.report(format!(
                "naming network {} in the cluster: {e:#}",
                copy.name
            )),
        }
    }

    /// A nameless network of this host's that its Docker does not list:
    /// removed from the store once that has lasted the grace period (the
    /// store refuses while anyone holds an address of it).
    async fn collect_if_unlisted(&mut self, record: &NetworkRecord) {
        let since = *self
            .unlisted
            .entry(record.id.clone())
            .or_insert_with(Instant::now);
        if since.elapsed() < self.unlisted_grace {
            return;
        }
        match self.store.delete_network(&record.id).await {
            Ok(()) => {
                self.unlisted.remove(&record.id);
                tracing::info!(
                    "network {} was created here but never appeared in Docker: removed from the cluster",
                    record.label()
                );
            }
            Err(e) => self.report(format!(
                "removing network {}, which never appeared in Docker: {e:#}",
                record.label()
            )),
        }
    }

    /// A cluster network this host's Docker lacks.
    async fn copy(&mut self, record: &NetworkRecord) {
        let copy = NetworkCopy {
            name: &record.name,
            driver: plugin::NAME,
            subnet: format!("{}/{}", record.subnet.0, record.subnet.1),
            gateway: record.gateway.to_string(),
            internal: record.internal,
            ip_range: record.ip_range.map(|(a, l)| format!("{a}/{l}")),
            options: copy_options(record),
        };
        match docker::create_network(&self.docker, copy).await {
            Ok(()) => tracing::info!("network {} copied from the cluster", record.name),
            Err(e) => self.report(format!("copying network {}: {e:#}", record.name)),
        }
    }
}

/// The `-o` options of a copy of `record`: what its creation was given.
fn copy_options(record: &NetworkRecord) -> std::collections::HashMap<String, String> {
    let mut options = std::collections::HashMap::from([
        (driver::OPT_ID.to_owned(), record.id.clone()),
        (driver::OPT_MODE.to_owned(), record.mode.clone()),
    ]);
    if record.vni != 0 {
        options.insert(driver::OPT_VNI.to_owned(), record.vni.to_string());
    }
    if !record.parent.is_empty() {
        options.insert(driver::OPT_PARENT.to_owned(), record.parent_option());
    }
    if !record.ipvlan_mode.is_empty() {
        options.insert(
            driver::OPT_IPVLAN_MODE.to_owned(),
            record.ipvlan_mode.clone(),
        );
    }
    if record.block != 0 {
        options.insert(driver::OPT_BLOCK.to_owned(), record.block.to_string());
    }
    options
}
