//! Path MTU discovery across the overlay. A container's MTU leaves room for
//! the 50 bytes of VXLAN on the local uplink, but the path to another host
//! may be smaller: a route with an MTU of its own, or an underlay router
//! with a smaller link. The outer header has DF set, so such a router
//! answers the host's VTEP with ICMP "fragmentation needed", which the
//! kernel cannot use (no socket sent it). netd notes that path MTU per
//! VTEP, and a container packet that does not fit the path (by the route's
//! MTU or the noted one) gets "fragmentation needed" back from netd, with
//! the path MTU less 50, as Linux's own vxlan does for bridged traffic. The
//! container's kernel lowers its PMTU and resends smaller.
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use netd_common::{
    overlay::{
        VtepPmtu, PMTU_EXPIRY_NS, PMTU_MIN, VXLAN_ENCAP_LEN, VXLAN_SPORT_MAX, VXLAN_SPORT_MIN,
    },
    Counter,
};

use crate::{
    icmp_error,
    maps::{TUNNEL, VTEPS, VTEP_PMTU},
    parsing::{ptr_at, ETH_P_IP, IPPROTO_ICMP, IPPROTO_UDP},
};
/// The smallest MTU told to a container, as Linux's tunnels do.
const INNER_MTU_MIN: u32 = 576;

/// What a "fragmentation needed" about a VXLAN packet of this host looks
/// like from the EtherType on: outer IPv4, ICMP, the quoted outer IPv4 and
/// UDP headers of the packet that did not fit.
#[repr(C)]
#[derive(Clone, Copy)]
struct UnderlayReport {
    eth_type: [u8; 2],
    ip: [u8; 20],
    icmp: [u8; 8],
    quoted_ip: [u8; 20],
    quoted_udp: [u8; 8],
}

/// Notes the path MTU an underlay router reported for a VXLAN packet this
/// host sent to another cluster host. False: not such a report (it goes on
/// as any other packet).
#[inline(always)]
pub fn learn(ctx: &TcContext) -> bool {
    // Cheap checks first: this runs on every uplink packet that is not
    // VXLAN.
    let Some(report) = ptr_at::<UnderlayReport>(ctx, 12) else {
        return false;
    };
    let r = unsafe { *report };
    if r.eth_type != ETH_P_IP.to_be_bytes()
        || r.ip[9] != IPPROTO_ICMP
        || r.icmp[..2] != icmp_error::FRAG_NEEDED
    {
        return false;
    }
    let Some(tunnel) = TUNNEL.get(0) else {
        return false;
    };
    let quoted_dst = [
        r.quoted_ip[16],
        r.quoted_ip[17],
        r.quoted_ip[18],
        r.quoted_ip[19],
    ];
    let mtu = u32::from(u16::from_be_bytes([r.icmp[6], r.icmp[7]]));
    let quoted_len = u32::from(u16::from_be_bytes([r.quoted_ip[2], r.quoted_ip[3]]));
    let sport = u32::from(u16::from_be_bytes([r.quoted_udp[0], r.quoted_udp[1]]));
    // About a VXLAN packet of this host's, as netd sends them (no options,
    // a source port from netd's range), that was bigger than the MTU the
    // router says it has: anything else is not believed. 0 is a router
    // from before RFC 1191, which says no size.
    let ours = tunnel.vtep != [0; 4]
        && r.ip[0] == 0x45
        && r.ip[16..20] == tunnel.vtep
        && r.quoted_ip[0] == 0x45
        && r.quoted_ip[9] == IPPROTO_UDP
        && r.quoted_ip[12..16] == tunnel.vtep
        && r.quoted_udp[2..4] == tunnel.port
        && (VXLAN_SPORT_MIN..VXLAN_SPORT_MAX).contains(&sport)
        && mtu != 0
        && quoted_len > mtu;
    // Only paths to cluster hosts are noted: nobody can fill the map with
    // addresses of their choosing.
    if !ours || VTEPS.get_ptr(&quoted_dst).is_none() {
        return false;
    }
    // A path only shrinks while its entry holds; it grows back when the
    // entry ages out (RFC 1191).
    let mtu = mtu.max(PMTU_MIN);
    if reported(&quoted_dst).is_some_and(|known| known <= mtu) {
        return true;
    }
    let entry = VtepPmtu {
        mtu,
        _pad: 0,
        learned_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    let _ = VTEP_PMTU.insert(&quoted_dst, &entry, 0);
    true
}

/// The path MTU an underlay reported for `vtep`, while it holds.
#[inline(always)]
pub fn reported(vtep: &[u8; 4]) -> Option<u32> {
    let entry = unsafe { *VTEP_PMTU.get_ptr(vtep)? };
    let age = unsafe { bpf_ktime_get_coarse_ns() }.wrapping_sub(entry.learned_ns);
    if age > PMTU_EXPIRY_NS {
        let _ = VTEP_PMTU.remove(vtep);
        return None;
    }
    Some(entry.mtu)
}

/// Turns the container's packet on this veth into ICMP "fragmentation
/// needed" (next-hop MTU: the path's less the VXLAN overhead) and hands it
/// back to the container. A packet without DF, with IP options, or itself
/// an ICMP error is dropped as too big instead (Linux sends no error about
/// an error, and netd cannot fragment).
#[inline(always)]
pub fn frag_needed(ctx: &TcContext, path_mtu: u32) -> Result<i32, Counter> {
    // Never below 576, as Linux's tunnels: a container clamps a smaller
    // one to its min_pmtu and sends without DF, which netd cannot carry.
    let inner_mtu = path_mtu
        .saturating_sub(VXLAN_ENCAP_LEN as u32)
        .clamp(INNER_MTU_MIN, 0xffff) as u16;
    let mtu = inner_mtu.to_be_bytes();
    icmp_error::to_sender(ctx, icmp_error::FRAG_NEEDED, [0, 0, mtu[0], mtu[1]], [0; 4])
}
