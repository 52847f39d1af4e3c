//! `cargo xtask demo`: an emulated Docker host running the real netd daemon,
//! an outside client on its LAN, and traffic through the eBPF programs.
//! Everything is torn down on exit and on Ctrl-C.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use netd_tests::{netd::netd_binary, Bench, DockerMode, Host};

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
    println!("\n==> torn down: namespaces, dockerd, containers, pins");
    std::process::exit(code);
}

fn demo(hold: bool) -> Result<()> {
    let netd = netd_binary()?;
    step("Emulated LAN 198.18.1.0/24: a Docker host (.1), an outside client (.100) and server (.200)")?;
    let bench = Bench::new()?;
    let lan = bench.lan(1)?;
    let mut host = Host::docker(
        &bench,
        &lan,
        "docker-host",
        1,
        [198, 19, 1],
        DockerMode::Netd,
    )
    .context("starting the emulated Docker host")?;
    let client = Host::plain(&bench, &lan, "client", 100)?;
    let server = Host::plain(&bench, &lan, "server", 200)?;
    let _httpd = server.serve_http()?;
    println!("dockerd runs with --iptables=false --ip-masq=false --userland-proxy=false:");
    println!("no NAT rules, no docker-proxy; the LAN has no route to 198.19.1.0/24");

    step(&format!(
        "netd run --uplink eth0 (the real daemon, {})",
        netd.display()
    ))?;
    host.start_netd(&bench)?;
    let pin = host.netd().pin_dir().display().to_string();

    step("docker run -p 8080:80 web (busybox httpd)")?;
    host.dockerd().run_httpd("web", &["-p", "8080:80"])?;
    let web = host.dockerd().container_ip("web")?;
    println!("container web at {web}");
    std::thread::sleep(Duration::from_millis(300));
    show(&host.netd().cli(&["ports", "--pin-dir", &pin])?);

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
    let peer = host.dockerd().docker(&[
        "exec",
        "web",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{}/cgi-bin/peer", server.ip),
    ])?;
    // busybox httpd listens dual-stack: IPv4 peers read "[::ffff:a.b.c.d]".
    let peer = peer
        .trim()
        .trim_start_matches("[::ffff:")
        .trim_end_matches(']');
    println!("server saw the caller as {peer} (the host's address)");

    step("netd status: what the programs on eth0 did")?;
    show(&host.netd().cli(&["status", "--pin-dir", &pin])?);

    if hold {
        step("Holding the topology; press Ctrl-C to tear down")?;
        println!(
            "try: nsenter --net={} busybox wget -O - http://{web}/",
            client.ns.path().display()
        );
        println!(
            "     nsenter --net={} {} status --pin-dir {pin}",
            host.ns.path().display(),
            netd.display()
        );
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}
