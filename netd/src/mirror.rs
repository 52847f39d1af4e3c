//! Keeps this host's Docker holding a copy of every netd network of the
//! cluster, and no copy of a deleted one: a network created on any host
//! appears in every host's `docker network ls`, and `docker network rm` on
//! any host removes it everywhere.
//!
//! It runs outside the plugin's handlers (which must never call Docker's
//! API): woken by the cluster store's watch, by Docker's network events,
//! and every resync interval.
use std::collections::HashSet;

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
    /// Problems already reported, so a resync does not repeat them.
    reported: HashSet<String>,
}

impl Mirror {
    pub fn new(docker: bollard::Docker, store: Store, local: LocalNetworks) -> Self {
        Self {
            docker,
            store,
            local,
            reported: HashSet::new(),
        }
    }

    /// Mirrors until `wake` closes: one pass per wake-up (a burst is one
    /// pass), and one every `resync`.
    pub async fn run(mut self, mut wake: mpsc::Receiver<()>, resync: std::time::Duration) {
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
        for record in records.iter().filter(|r| r.name.is_empty()) {
            self.name(record, &copies).await;
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

    /// A cluster network this host's Docker lacks.
    async fn copy(&mut self, record: &NetworkRecord) {
        let copy = NetworkCopy {
            name: &record.name,
            driver: plugin::NAME,
            subnet: format!("{}/{}", record.subnet.0, record.subnet.1),
            gateway: record.gateway.to_string(),
            internal: record.internal,
            options: [
                (driver::OPT_ID.to_owned(), record.id.clone()),
                (driver::OPT_MODE.to_owned(), record.mode.clone()),
                (driver::OPT_VNI.to_owned(), record.vni.to_string()),
            ]
            .into(),
        };
        match docker::create_network(&self.docker, copy).await {
            Ok(()) => tracing::info!("network {} copied from the cluster", record.name),
            Err(e) => self.report(format!("copying network {}: {e:#}", record.name)),
        }
    }
}
