//! A raw AF_PACKET socket on an interface of a namespace: the test's own
//! 802.1Q peer. It writes the tag into the frames it sends itself, and
//! reads the tag of a received frame from the kernel's PACKET_AUXDATA (the
//! receive path moves a tag out of the frame into the skb), sharing no code
//! with netd's datapath.
use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::NetNs;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_8021Q: u16 = 0x8100;
/// `tpacket_auxdata.tp_status`: the VLAN TCI field is valid.
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
/// `sockaddr_ll.sll_pkttype` of frames this host sent.
const PACKET_OUTGOING: u8 = 4;

/// `struct tpacket_auxdata` (linux/if_packet.h).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct AuxData {
    status: u32,
    len: u32,
    snaplen: u32,
    mac: u16,
    net: u16,
    vlan_tci: u16,
    vlan_tpid: u16,
}

/// A received frame: its VLAN id (None: untagged) and its bytes, untagged.
#[derive(Debug)]
pub struct Received {
    pub vlan: Option<u16>,
    pub frame: Vec<u8>,
}

pub struct RawSocket {
    fd: OwnedFd,
}

impl RawSocket {
    /// Opens a socket on `ifname` in `ns` that sees every frame.
    pub fn open(ns: &NetNs, ifname: &str) -> Result<Self> {
        let ifname = ifname.to_owned();
        ns.enter(move || {
            let index = nix::net::if_::if_nametoindex(ifname.as_str())
                .with_context(|| format!("no interface {ifname}"))?;
            // SAFETY: plain socket calls on a descriptor this function owns.
            unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ETH_P_ALL.to_be()),
                );
                if fd < 0 {
                    bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = ETH_P_ALL.to_be();
                addr.sll_ifindex = index as i32;
                if libc::bind(
                    fd.as_raw_fd(),
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ) != 0
                {
                    bail!("binding to {ifname}: {}", std::io::Error::last_os_error());
                }
                let on: i32 = 1;
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_AUXDATA,
                    &on as *const _ as *const libc::c_void,
                    4,
                );
                let timeout = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &timeout as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                Ok(Self { fd })
            }
        })
    }

    /// Sends `frame` as it is (any tag written into it).
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: writes from a live buffer of the given length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        if n != frame.len() as isize {
            bail!("sending a raw frame: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame from the wire (not one this host sent) for which
    /// `want` holds, within `limit`.
    pub fn recv_until(
        &self,
        limit: Duration,
        mut want: impl FnMut(&Received) -> bool,
    ) -> Option<Received> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(r) = self.recv_one() {
                if want(&r) {
                    return Some(r);
                }
            }
        }
        None
    }

    fn recv_one(&self) -> Option<Received> {
        let mut buf = vec![0u8; 2048];
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut control = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: every pointer refers to a live local buffer.
        let (n, aux) = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = &mut addr as *mut _ as *mut libc::c_void;
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = control.len();
            let n = libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0);
            if n <= 0 {
                return None;
            }
            let mut aux = AuxData::default();
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_PACKET
                    && (*cmsg).cmsg_type == libc::PACKET_AUXDATA
                {
                    aux = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const AuxData);
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            (n as usize, aux)
        };
        if addr.sll_pkttype == PACKET_OUTGOING {
            return None;
        }
        buf.truncate(n);
        let vlan = (aux.status & TP_STATUS_VLAN_VALID != 0).then_some(aux.vlan_tci & 0x0fff);
        Some(Received { vlan, frame: buf })
    }
}

/// `frame` (an untagged Ethernet frame) with an 802.1Q tag for `vid`.
pub fn tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(frame.len() + 4);
    f.extend_from_slice(&frame[..12]);
    f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}
