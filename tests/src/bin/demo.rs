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
    step("Emulated LAN 198.18.1.0/24: a Docker host (.1) and an outside client (.100)")?;
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
    client.route([198, 19, 1], host.ip)?;
    println!("dockerd runs with --iptables=false --ip-masq=false --userland-proxy=false");

    step("A container serving HTTP on the host's bridge 198.19.1.0/24")?;
    host.dockerd()
        .run("web", &[], &["httpd", "-f", "-p", "80", "-h", "/var/www"])?;
    let web = host.dockerd().container_ip("web")?;
    println!("container web at {web}");

    step(&format!(
        "netd run --uplink eth0 (the real daemon, {})",
        netd.display()
    ))?;
    host.start_netd(&bench)?;
    let pin = host.netd().pin_dir().display().to_string();
    show(&host.netd().cli(&["status", "--pin-dir", &pin])?);

    step(&format!(
        "The outside client fetches http://{web}/ five times"
    ))?;
    for _ in 0..5 {
        print!(
            "client got: {}",
            client.http_get(&format!("http://{web}/"))?
        );
    }
    step("netd status: the packets went through netd's programs on eth0")?;
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
