//! Docker networks and container endpoints as the datapath sees them.

/// Value flag in `netd_networks`: sources in this subnet are masqueraded,
/// and the subnet is reachable from outside only through published ports
/// (Docker's default "nat" gateway mode).
pub const NETWORK_MASQUERADE: u32 = 1;
/// Internal network: no traffic to or from outside the host.
pub const NETWORK_INTERNAL: u32 = 1 << 1;
/// A /32 entry for an address of the host inside a container subnet (the
/// bridge's gateway): reachable from every network, never isolated.
pub const NETWORK_HOST_ADDR: u32 = 1 << 2;
/// A netd overlay network: its containers are switched by netd (same host:
/// straight to the peer's veth; another host: VXLAN), with no bridge.
pub const NETWORK_OVERLAY: u32 = 1 << 3;
/// A netd routed network (with NETWORK_OVERLAY): split into per-host
/// blocks that hosts route to each other without encapsulation. Traffic
/// from its own subnet (another host's block) arriving on the uplink is
/// let in, although the network masquerades towards everything else.
pub const NETWORK_ROUTED: u32 = 1 << 4;

/// Value of `netd_networks` (LPM trie keyed by subnet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetworkInfo {
    /// NETWORK_* flags.
    pub flags: u32,
    /// A stable id of the Docker network (from its Docker id), shared by
    /// all its subnets: containers may talk only within one network.
    pub id: u32,
}

/// Value of `netd_endpoints`, keyed by the ifindex of the container's
/// host-side veth: who may send from that interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u8; 4],
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// [`NetworkInfo::id`] of the endpoint's network.
    pub network: u32,
}

/// Value of `netd_endpoint_addrs`, keyed by a container's IPv4 address:
/// where to deliver packets for it directly (bpf_redirect_peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointLocation {
    /// ifindex of the container's host-side veth.
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl EndpointLocation {
    /// Where `endpoint`, behind host-side veth `ifindex`, is delivered.
    pub const fn of(ifindex: u32, endpoint: &Endpoint) -> Self {
        Self {
            ifindex,
            mac: endpoint.mac,
            _pad: [0; 2],
        }
    }
}

/// The network id netd uses for a Docker network id (64 hex digits): its
/// first 8 hex digits, so it survives daemon restarts without a registry.
pub fn network_id(docker_id: &str) -> u32 {
    docker_id
        .get(..8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .unwrap_or(0)
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::NetworkInfo {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::EndpointLocation {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn network_ids_come_from_docker_ids() {
        assert_eq!(super::network_id("0123abcd99"), 0x0123_abcd);
        assert_eq!(super::network_id("xyz"), 0);
    }
}
