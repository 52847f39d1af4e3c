//! netd: an eBPF dataplane for Docker hosts. The library holds the daemon's
//! rooms; `main.rs` is only the CLI entry point.
//!
//! - [`cli`]: argument parsing and human/JSON output.
//! - [`daemon`]: `netd run`, wiring the rooms together.
//! - [`docker`]: the Docker source (bollard).
//! - [`netlink`]: interface and route queries, link events (rtnetlink).
//! - [`arrivals`]: container veths between their appearance and Docker's
//!   report of the container.
//! - [`state`]: the desired state derived from Docker (pure data).
//! - [`reconcile`]: diffs desired state against the maps, applies the difference.
//! - [`dataplane`]: the only code that loads programs and touches maps.
//! - [`cluster`]: the cluster store (etcd): networks, VNIs, address claims.
//! - [`plugin`]: the Docker network and IPAM driver; [`mirror`] copies the
//!   store's networks into Docker; [`overlay`] fills the overlay tables.
//! - [`systemd`]: socket activation and readiness, for the shipped units.
pub mod arrivals;
pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod dataplane;
pub mod docker;
pub mod mirror;
pub mod netlink;
pub mod overlay;
pub mod plugin;
pub mod reconcile;
pub mod segment;
pub mod state;
pub mod systemd;
