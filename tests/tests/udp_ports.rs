//! A UDP port published with `-p 5353:53/udp`, served by netd alone: the
//! datagram reaches the container with the client's own address (DNAT, no
//! SNAT, as Docker's rules give it) and the answer comes back from the
//! published address.
use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use netd_tests::{eventually, privileged, Bench, DockerMode, Host};

/// Answers every datagram with the address it came from, inside the
/// network namespace at `netns` (a container's), until `stop`. The busybox
/// test image has no UDP server; the datapath does not care which process
/// holds the socket, only which namespace.
fn udp_peer_echo(netns: std::fs::File, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let sock = UdpSocket::bind("0.0.0.0:53").expect("bind 53/udp in the container");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(peer.to_string().as_bytes(), peer);
            }
        }
    })
}

#[test]
fn a_published_udp_port_answers_from_the_published_address() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(7).unwrap();
    let mut host = Host::docker(&bench, &lan, "dh", 1, [198, 19, 7], DockerMode::Netd).unwrap();
    let client = Host::plain(&bench, &lan, "client", 100).unwrap();
    host.start_netd(&bench).unwrap();
    host.dockerd()
        .run("dns", &["-p", "5353:53/udp"], &["sleep", "3600"])
        .unwrap();
    let netns = std::fs::File::open(host.dockerd().netns_of("dns").unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server = udp_peer_echo(netns, stop.clone());

    let published = SocketAddr::from((host.ip, 5353));
    let ask = || {
        client.ns.enter(|| {
            let sock = UdpSocket::bind("0.0.0.0:40053")?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))?;
            sock.send_to(b"who am I?", published)?;
            let mut buf = [0u8; 512];
            let (n, from) = sock.recv_from(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
        })
    };
    let mut answer = None;
    assert!(eventually(Duration::from_secs(10), || {
        answer = ask().ok();
        answer.is_some()
    }));
    let (seen_as, from) = answer.unwrap();
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    assert_eq!(
        seen_as,
        format!("{}:40053", client.ip),
        "client address kept"
    );
    assert_eq!(from, published, "answered from the published address");
    let status = host.netd().status().unwrap();
    assert!(
        netd_tests::netd::counter(&status, "uplink-ingress", "dnat") >= 1,
        "{status:#}"
    );
}
