//! Types shared by netd's eBPF programs and its userspace daemon.
//!
//! Everything here is `#[repr(C)]` plain data with one definition used by both
//! sides, so a map's key and value layout cannot drift between the kernel and
//! the daemon. With the `user` feature the types implement `aya::Pod`.
#![no_std]

pub mod counters;
pub mod maps;
pub mod nat;
pub mod network;
pub mod overlay;
pub mod segment;

pub use counters::{Counter, CounterValue, Hook};
pub use maps::Meta;
pub use nat::{CtEntry, CtKey, CtTimeouts, NatConfig, PortKey, PortTarget};
pub use network::{Endpoint, EndpointLocation, NetworkInfo};
pub use overlay::{OverlayNetwork, Peer, TunnelConfig};
pub use segment::{Segment, SegmentMac, SegmentPort};
