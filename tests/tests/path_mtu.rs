//! Path MTU discovery through netd's outbound fast path: the uplink's MTU
//! is below the containers' (a cloud uplink under a 1500-byte bridge). A
//! too-big packet with DF set must not be sent out of the uplink by the
//! fast path (it would vanish); it takes the kernel path, which answers
//! "fragmentation needed", and the container learns the smaller MTU.
use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use netd_tests::{eventually, privileged, Bench, DockerMode, Host};

const UPLINK_MTU: i32 = 1400;

/// The path MTU the socket's route knows (IP_MTU).
fn path_mtu(sock: &UdpSocket) -> i32 {
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid socket fd; `mtu` and `len` are valid for writes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt(IP_MTU)");
    mtu
}

#[test]
fn a_too_big_packet_from_a_container_gets_fragmentation_needed() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(8).unwrap();
    let mut host = Host::docker(&bench, &lan, "dh", 1, [198, 19, 8], DockerMode::Netd).unwrap();
    let server = Host::plain(&bench, &lan, "server", 200).unwrap();
    for h in [&host, &server] {
        h.ns.run_ok(
            "ip",
            &[
                "link",
                "set",
                netd_tests::topology::UPLINK,
                "mtu",
                &UPLINK_MTU.to_string(),
            ],
        )
        .unwrap();
    }
    host.start_netd(&bench).unwrap();
    host.dockerd().run("c1", &[], &["sleep", "3600"]).unwrap();
    let container =
        netd_tests::netns::NetNs::open(&host.dockerd().netns_of("c1").unwrap()).unwrap();

    let to = SocketAddr::from((server.ip, 9999));
    let learned = container
        .enter(|| {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            // DF on every datagram, and EMSGSIZE instead of fragmenting.
            let on: libc::c_int = libc::IP_PMTUDISC_DO;
            // SAFETY: valid socket fd and an int option of the size passed.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "setsockopt(IP_MTU_DISCOVER)");
            sock.connect(to)?;
            // A small datagram first: the host resolves the server's MAC,
            // so the big ones meet the fast path, not the neighbour miss
            // that would send them down the kernel path anyway.
            sock.send(b"hello")?;
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(path_mtu(&sock), 1500, "the container's own MTU first");
            // 1,472 bytes of UDP payload: a 1,500-byte packet.
            let datagram = [0x5au8; 1472];
            let learned = eventually(Duration::from_secs(5), || {
                let _ = sock.send(&datagram);
                std::thread::sleep(Duration::from_millis(50));
                path_mtu(&sock) == UPLINK_MTU
            });
            Ok(learned)
        })
        .unwrap();
    assert!(learned, "no fragmentation needed reached the container");
}
