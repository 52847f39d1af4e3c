//! Frame builders and checksum checks for eBPF unit tests.
use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

/// Ones' complement sum folded to 16 bits, not inverted.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    sum16(&p, 0)
}

fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, proto]);
    sum16(&p, 0)
}

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet (no options, DF clear) with a correct header checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_with(src, dst, proto, payload, &[], 0)
}

/// An IPv4 packet with `options` (padded to 4 bytes) and the raw flags +
/// fragment offset field `frags`.
pub fn ipv4_with(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload: &[u8],
    options: &[u8],
    frags: u16,
) -> Vec<u8> {
    let opt_len = options.len().div_ceil(4) * 4;
    let hlen = 20 + opt_len;
    let mut p = vec![0u8; hlen];
    p[0] = 0x40 | (hlen / 4) as u8;
    p[2..4].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
    p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    p[6..8].copy_from_slice(&frags.to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..20 + options.len()].copy_from_slice(options);
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = next;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// Where an L4 segment will travel: decides its checksum's pseudo-header.
#[derive(Clone, Copy, Debug)]
pub enum Addrs {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl Addrs {
    fn pseudo(self, proto: u8, len: usize) -> u32 {
        match self {
            Addrs::V4(s, d) => pseudo_v4(s, d, proto, len),
            Addrs::V6(s, d) => pseudo_v6(s, d, proto, len),
        }
    }
}

pub fn tcp(
    addrs: Addrs,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut s = vec![0u8; 20];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..8].copy_from_slice(&seq.to_be_bytes());
    s[8..12].copy_from_slice(&ack.to_be_bytes());
    s[12] = 5 << 4;
    s[13] = flags;
    s[14..16].copy_from_slice(&64240u16.to_be_bytes());
    s.extend_from_slice(payload);
    let c = !fold(sum16(&s, addrs.pseudo(PROTO_TCP, s.len())));
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

pub fn udp(addrs: Addrs, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut s = vec![0u8; 8];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    s.extend_from_slice(payload);
    let mut c = !fold(sum16(&s, addrs.pseudo(PROTO_UDP, len)));
    if c == 0 {
        c = 0xffff;
    }
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
}

/// ICMPv4 echo request (type 8) or reply (type 0).
pub fn icmp_echo(kind: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![kind, 0, 0, 0];
    s.extend_from_slice(&id.to_be_bytes());
    s.extend_from_slice(&seq.to_be_bytes());
    s.extend_from_slice(payload);
    let c = checksum(&s);
    s[2..4].copy_from_slice(&c.to_be_bytes());
    s
}

/// An ICMPv4 error (`kind`/`code`, e.g. 3/4 "fragmentation needed" with
/// `mtu`) quoting the IP header and first 8 L4 bytes of `offending`.
pub fn icmp_error(kind: u8, code: u8, mtu: u16, offending: &[u8]) -> Vec<u8> {
    let hlen = usize::from(offending[0] & 0x0f) * 4;
    let quote = &offending[..(hlen + 8).min(offending.len())];
    let mut s = vec![kind, code, 0, 0, 0, 0];
    s.extend_from_slice(&mtu.to_be_bytes());
    s.extend_from_slice(quote);
    let c = checksum(&s);
    s[2..4].copy_from_slice(&c.to_be_bytes());
    s
}

/// Ethernet + IPv4 + TCP in one call.
pub fn tcp4_frame(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let seg = tcp(
        Addrs::V4(src.0, dst.0),
        src.1,
        dst.1,
        1000,
        0,
        flags,
        payload,
    );
    ethernet(MAC_B, MAC_A, ETH_P_IP, &ipv4(src.0, dst.0, PROTO_TCP, &seg))
}

/// Ethernet + IPv4 + UDP in one call.
pub fn udp4_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let seg = udp(Addrs::V4(src.0, dst.0), src.1, dst.1, payload);
    ethernet(MAC_B, MAC_A, ETH_P_IP, &ipv4(src.0, dst.0, PROTO_UDP, &seg))
}

/// Checks the IPv4 header checksum and the TCP/UDP/ICMP checksum of an
/// Ethernet + IPv4 frame. Returns what is wrong, if anything.
pub fn verify_ipv4_frame(frame: &[u8]) -> Result<(), String> {
    if frame.len() < 34 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP {
        return Err("not an Ethernet + IPv4 frame".into());
    }
    let ip = &frame[14..];
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if hlen < 20 || total < hlen || total > ip.len() {
        return Err(format!(
            "bad IPv4 lengths hlen={hlen} total={total} have={}",
            ip.len()
        ));
    }
    if fold(sum16(&ip[..hlen], 0)) != 0xffff {
        return Err("IPv4 header checksum wrong".into());
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[hlen..total];
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if frag != 0 {
        return Ok(()); // fragments: the L4 checksum spans the whole datagram
    }
    let ok = match ip[9] {
        PROTO_TCP => fold(sum16(l4, pseudo_v4(src, dst, PROTO_TCP, l4.len()))) == 0xffff,
        PROTO_UDP if l4.len() >= 8 && l4[6..8] == [0, 0] => true,
        PROTO_UDP => fold(sum16(l4, pseudo_v4(src, dst, PROTO_UDP, l4.len()))) == 0xffff,
        PROTO_ICMP => fold(sum16(l4, 0)) == 0xffff,
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("L4 checksum wrong (proto {})", ip[9]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify_and_corruption_is_caught() {
        let a = Ipv4Addr::new(198, 18, 0, 1);
        let b = Ipv4Addr::new(198, 18, 0, 2);
        let mut f = tcp4_frame((a, 1234), (b, 80), TCP_SYN, b"hello");
        assert_eq!(verify_ipv4_frame(&f), Ok(()));
        let u = udp4_frame((a, 53), (b, 5353), b"q");
        assert_eq!(verify_ipv4_frame(&u), Ok(()));
        let icmp = ethernet(
            MAC_B,
            MAC_A,
            ETH_P_IP,
            &ipv4(a, b, PROTO_ICMP, &icmp_echo(8, 7, 1, b"x")),
        );
        assert_eq!(verify_ipv4_frame(&icmp), Ok(()));
        let last = f.len() - 1;
        f[last] ^= 0xff;
        assert!(verify_ipv4_frame(&f).is_err());
        f[last] ^= 0xff;
        f[14 + 8] = 1; // TTL changed without fixing the header checksum
        assert!(verify_ipv4_frame(&f).is_err());
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example bytes sum to 0xddf2 before inversion.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
    }
}
