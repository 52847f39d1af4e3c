//! `cargo xtask demo`: an emulated Docker host running the real netd daemon,
//! an outside client on its LAN, and traffic through the eBPF programs; then
//! a second Docker host and an overlay network across both (a real etcd as
//! the cluster store), with a container on each host talking to the other;
//! then a macvlan network on the LAN itself, its container reached
//! directly by the LAN client and by its own host. Everything is torn down
//! on exit and on Ctrl-C.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use netd_tests::{
    etcd::Etcd,
    netd::{netd_binary, NetdOptions},
    Bench, DockerMode, Host,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; tearing down");
    }
    Ok(())
}

fn step(title: &str) -> Result<()> {
    check_interrupt()?;
    println!("\n\x1b[1m==> {title}\x1b[0m");
    Ok(())
}

fn show(out: &std::process::Output) {
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `netd <args…>` in `host`'s namespace and prints what it says;
/// fails if it does.
fn netd_cli(host: &mut Host, args: &[&str]) -> Result<()> {
    let out = host.netd().cli(args)?;
    show(&out);
    if !out.status.success() {
        bail!("netd {} failed ({})", args.join(" "), out.status);
    }
    Ok(())
}

/// `docker exec CONTAINER CMD…` on `host`; its stdout.
fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("netd demo: needs root (network namespaces, dockerd, eBPF): run it with sudo");
        std::process::exit(1);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let hold = std::env::args().any(|a| a == "--hold");
    let code = match demo(hold) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("netd demo: {e:#}");
            1
        }
    };
    println!("\n==> torn down: namespaces, dockerd, netd, etcd, containers, pins");
    std::process::exit(code);
}

fn demo(hold: bool) -> Result<()> {
    let netd = netd_binary()?;
    step("Emulated LAN 198.18.1.0/24: a Docker host (.1), an outside client (.100) and server (.200), etcd (.50)")?;
    let bench = Bench::new()?;
    let lan = bench.lan(1)?;
    // The cluster store, for the overlay part; netd serves the host's own
    // containers the same with or without it.
    let etcd = Etcd::start(&bench, &lan, 50).context("starting etcd")?;
    let mut host = Host::docker(&bench, &lan, "host-a", 1, [198, 19, 1], DockerMode::Netd)
        .context("starting the emulated Docker host")?;
    let client = Host::plain(&bench, &lan, "client", 100)?;
    let server = Host::plain(&bench, &lan, "server", 200)?;
    let _httpd = server.serve_http()?;
    println!("dockerd runs with --iptables=false --ip-masq=false --userland-proxy=false:");
    println!("no NAT rules, no docker-proxy; the LAN has no route to 198.19.1.0/24");
    println!("etcd listens on {}", etcd.endpoint());

    step(&format!(
        "netd run --uplink eth0 --etcd {} --node-name host-a (the real daemon, {})",
        etcd.endpoint(),
        netd.display()
    ))?;
    host.start_netd_with(
        &bench,
        NetdOptions {
            args: ["--etcd", &etcd.endpoint(), "--node-name", "host-a"]
                .map(String::from)
                .to_vec(),
            ..NetdOptions::default()
        },
    )?;
    let pin = host.netd().pin_dir().display().to_string();

    step("docker run -p 8080:80 web (busybox httpd)")?;
    host.dockerd().run_httpd("web", &["-p", "8080:80"])?;
    let web = host.dockerd().container_ip("web")?;
    println!("container web at {web}");
    std::thread::sleep(Duration::from_millis(300));
    netd_cli(&mut host, &["ports", "--pin-dir", &pin])?;

    step(&format!(
        "Published port: the client fetches http://{}:8080/ three times",
        host.ip
    ))?;
    for _ in 0..3 {
        print!(
            "client got: {}",
            client.http_get(&format!("http://{}:8080/", host.ip))?
        );
    }

    step("Masquerade: the container asks the outside server who is calling")?;
    let peer = host
        .dockerd()
        .http_get_from("web", &format!("http://{}/cgi-bin/peer", server.ip))?;
    // busybox httpd listens dual-stack: IPv4 peers read "[::ffff:a.b.c.d]".
    let peer = peer
        .trim()
        .trim_start_matches("[::ffff:")
        .trim_end_matches(']');
    println!("server saw the caller as {peer} (the host's address)");

    step("netd status: what the programs on eth0 did")?;
    netd_cli(&mut host, &["status", "--pin-dir", &pin])?;

    step("A second Docker host (.2), netd run --etcd ... --node-name host-b")?;
    let mut host_b = Host::cluster_member(&bench, &lan, "host-b", 2, &etcd.endpoint(), &[])
        .context("starting the second Docker host")?;
    let pin_b = host_b.netd().pin_dir().display().to_string();
    println!(
        "host-b at {}, its default bridge 198.19.2.0/24; both hosts' netd in the cluster at {}",
        host_b.ip,
        etcd.endpoint()
    );

    step("On host-a: docker network create -d netd --ipam-driver netd --subnet 198.19.66.0/24 ov")?;
    println!("{}", host.create_netd_network("ov", "198.19.66.0/24", &[])?);
    if !host_b.sees_netd_networks(&["ov"], Duration::from_secs(10)) {
        bail!("network ov did not reach host-b within 10 s");
    }
    println!("host-b's docker network ls:");
    println!("{}", host_b.dockerd().docker(&["network", "ls"])?);

    step("docker run --network ov: ov-a on host-a, ov-b on host-b (busybox httpd)")?;
    host.dockerd().run_httpd("ov-a", &["--network", "ov"])?;
    host_b.dockerd().run_httpd("ov-b", &["--network", "ov"])?;
    let ov_a = host.container_addr("ov-a")?.to_string();
    let ov_b = host_b.container_addr("ov-b")?.to_string();
    println!("ov-a at {ov_a} on host-a, ov-b at {ov_b} on host-b");

    step(&format!(
        "Across hosts (VXLAN between {} and {}): ov-a pings and fetches ov-b",
        host.ip, host_b.ip
    ))?;
    println!(
        "{}",
        host.dockerd()
            .exec("ov-a", &["ping", "-c", "3", "-W", "2", &ov_b])
            .context("ping from ov-a to ov-b")?
    );
    let page = host
        .dockerd()
        .http_get_from("ov-a", &format!("http://{ov_b}/"))
        .context("GET from ov-a to ov-b")?;
    println!("ov-a got from http://{ov_b}/: {}", page.trim());

    step(&format!("netd networks --etcd {}", etcd.endpoint()))?;
    netd_cli(&mut host, &["networks", "--etcd", &etcd.endpoint()])?;

    step("netd peers on host-a: the overlay forwarding table")?;
    netd_cli(&mut host, &["peers", "--pin-dir", &pin])?;

    step("netd status on host-a, its counters now: vxlan-encap and vxlan-decap")?;
    let out = host.netd().cli(&["status", "--pin-dir", &pin])?;
    if !out.status.success() {
        show(&out);
        bail!("netd status failed ({})", out.status);
    }
    let status = String::from_utf8_lossy(&out.stdout);
    let counters = status
        .find("counters")
        .map_or(&status[..], |at| &status[at..]);
    print!("{counters}");

    step("On host-a: a macvlan network on the LAN itself: docker network create -d netd --ipam-driver netd -o netd.mode=macvlan -o parent=eth0 --subnet 198.18.95.0/24 --ip-range 198.18.95.0/25 lan")?;
    host.create_netd_network(
        "lan",
        "198.18.95.0/24",
        &[
            "-o",
            "netd.mode=macvlan",
            "-o",
            "parent=eth0",
            "--ip-range",
            "198.18.95.0/25",
        ],
    )?;
    host.dockerd().run_httpd("lan-a", &["--network", "lan"])?;
    let lan_a = host.container_addr("lan-a")?.to_string();
    println!(
        "lan-a at {lan_a}, with a MAC of its own on the LAN (no macvlan device, no bridge: eBPF demux on eth0)"
    );
    // The client and host-a as machines of that subnet on the same wire.
    for (who, cidr) in [(&client, "198.18.95.250/24"), (&host, "198.18.95.201/24")] {
        who.ns.run_ok("ip", &["addr", "add", cidr, "dev", "eth0"])?;
    }
    step(&format!(
        "The LAN client fetches http://{lan_a}/ directly: no published port, no NAT"
    ))?;
    println!("{}", client.http_get(&format!("http://{lan_a}/"))?.trim());
    step("host-a pings its own macvlan container (kernel macvlan cannot)")?;
    let out = host
        .ns
        .run("busybox", &["ping", "-c", "2", "-W", "2", &lan_a])?;
    show(&out);
    if !out.status.success() {
        bail!("host-a could not reach lan-a");
    }
    step("netd status on host-a: the segment network, and how eth0 takes lan-a's MAC in")?;
    let out = host.netd().cli(&["status", "--pin-dir", &pin])?;
    let status = String::from_utf8_lossy(&out.stdout);
    for line in status
        .lines()
        .filter(|l| l.contains("on eth0") || l.contains("demuxed"))
    {
        println!("{line}");
    }

    if hold {
        step("Holding the topology; press Ctrl-C to tear down")?;
        println!(
            "try: nsenter --net={} busybox wget -O - http://{}:8080/",
            client.ns.path().display(),
            host.ip
        );
        println!(
            "     nsenter --net={} {} status --pin-dir {pin}",
            host.ns.path().display(),
            netd.display()
        );
        println!("overlay:");
        println!(
            "     docker -H {} exec ov-a ping -c 3 {ov_b}",
            host.dockerd().host()
        );
        println!(
            "     docker -H {} exec ov-b wget -q -O - http://{ov_a}/",
            host_b.dockerd().host()
        );
        println!(
            "     nsenter --net={} {} peers --pin-dir {pin_b}",
            host_b.ns.path().display(),
            netd.display()
        );
        println!(
            "     nsenter --net={} {} networks --etcd {}",
            host.ns.path().display(),
            netd.display(),
            etcd.endpoint()
        );
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Dropped in reverse order of creation: host-b, the server and client,
    // host-a (each dockerd before its netd), etcd, the LAN, the bench.
    Ok(())
}
