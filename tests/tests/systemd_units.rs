//! The shipped systemd units (dist/systemd) and the start-up order they
//! exist for. dockerd gives up on a plugin whose socket is missing (after
//! about 15 s) and then fails to start containers of its networks, so the
//! plugin socket must exist before dockerd and across netd's restarts:
//! `netd.socket` holds it and passes it to netd (socket activation).
//! Here the test holds the socket, as systemd would, and hands it over the
//! same way (fd 3, LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES).
use std::{
    io::{Read as _, Write as _},
    os::unix::{
        fs::MetadataExt as _,
        net::{UnixDatagram, UnixListener, UnixStream},
    },
    path::Path,
    process::Command,
    sync::Arc,
    time::Duration,
};

use netd_tests::{
    docker::TEST_IMAGE,
    etcd::Etcd,
    eventually,
    netd::{netd_binary, NetdOptions},
    privileged, Bench, DockerMode, Host,
};

fn unit(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist/systemd")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn setting<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// systemd-analyze accepts the units without a word, and they agree with
/// netd: the socket is where dockerd looks and has the name netd takes.
#[test]
fn the_shipped_units_pass_systemd_analyze() {
    let socket = unit("netd.socket");
    let service = unit("netd.service");
    assert_eq!(
        setting(&socket, "ListenStream"),
        [netd::plugin::DEFAULT_SOCKET]
    );
    assert_eq!(setting(&socket, "FileDescriptorName"), ["netd.sock"]);
    assert_eq!(setting(&socket, "Before"), ["docker.service docker.socket"]);
    assert_eq!(setting(&service, "Type"), ["notify"]);
    // Restarting netd must not restart the socket, and enabling netd alone
    // (one host, no plugin) must not enable it.
    assert!(setting(&socket, "PartOf").is_empty());
    assert!(setting(&service, "Also").is_empty());
    assert_eq!(setting(&service, "StartLimitIntervalSec"), ["0"]);
    assert_eq!(
        setting(&service, "ExecStart"),
        ["/usr/local/bin/netd run $NETD_OPTS"]
    );
    // Verified as installed, with the binary where the unit expects it.
    let dir = std::env::temp_dir().join(format!("netd-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let netd = netd_binary().unwrap();
    std::fs::write(
        dir.join("netd.service"),
        service.replace("/usr/local/bin/netd", &netd.display().to_string()),
    )
    .unwrap();
    std::fs::write(dir.join("netd.socket"), &socket).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("netd.service"))
        .arg(dir.join("netd.socket"))
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.expect("systemd-analyze (package systemd; `cargo xtask setup`)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// A one-shot container on `network` fetching `url`, through the plugin
/// (CreateEndpoint, Join) of whatever netd serves the socket.
fn fetch(host: &str, network: &str, url: &str) -> std::process::Output {
    Command::new("docker")
        .args([
            "-H",
            host,
            "run",
            "--rm",
            "--pull=never",
            "--network",
            network,
        ])
        .arg(TEST_IMAGE)
        .args(["timeout", "10", "wget", "-q", "-O", "-", url])
        .output()
        .unwrap()
}

#[test]
fn a_dockerd_started_before_netd_recovers_once_netd_comes_up() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(23).unwrap();
    let etcd = Etcd::start(&bench, &lan, 250).unwrap();
    let mut a = Host::docker(&bench, &lan, "a", 1, [198, 19, 1], DockerMode::Netd).unwrap();
    // systemd's part: the socket exists before netd, and so does the
    // readiness socket of Type=notify.
    let socket = Arc::new(UnixListener::bind(a.plugin_dir().join("netd.sock")).unwrap());
    let notify_path = bench.state_dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    a.start_netd_with(
        &bench,
        NetdOptions {
            args: ["--etcd", &etcd.endpoint(), "--node-name", "a"]
                .map(String::from)
                .to_vec(),
            systemd_socket: Some(socket.clone()),
            env: vec![("NOTIFY_SOCKET".into(), notify_path.display().to_string())],
            ..NetdOptions::default()
        },
    )
    .unwrap();
    let mut said = [0; 256];
    let n = notify.recv(&mut said).unwrap();
    let said = String::from_utf8_lossy(&said[..n]).into_owned();
    assert!(said.contains("READY=1\n"), "netd told systemd {said:?}");
    let log = std::fs::read_to_string(a.netd().log_path()).unwrap();
    assert!(log.contains("(passed by systemd)"), "{log}");

    a.create_netd_network("ov", "198.19.123.0/24", &[]).unwrap();
    a.dockerd()
        .run_httpd("web", &["--network", "ov", "--restart", "always"])
        .unwrap();
    let web = format!("http://{}/", a.container_addr("web").unwrap());
    let host = a.dockerd().host();

    // netd restarts; the socket stays. A plugin call made meanwhile
    // connects (a socket netd bound itself would refuse it: nobody
    // listens) and is answered once netd is back; so is a container
    // started meanwhile, whose Join waits in the backlog.
    let path = a.plugin_dir().join("netd.sock");
    let inode = || std::fs::metadata(&path).unwrap().ino();
    let before = inode();
    a.netd().stop();
    let mut call =
        UnixStream::connect(&path).expect("the socket refused a call while netd was down");
    call.write_all(b"POST /Plugin.Activate HTTP/1.1\r\nHost: netd\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    call.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let Host { netd, .. } = &mut a;
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| fetch(&host, "ov", &web));
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            !waiting.is_finished(),
            "docker run did not wait for netd: {:?}",
            waiting.join()
        );
        netd.as_mut().unwrap().start_again().unwrap();
        let out = waiting.join().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello"),
            "{out:?}"
        );
    });
    let mut answer = [0; 512];
    let n = call.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("NetworkDriver"),
        "{answer}"
    );
    assert_eq!(inode(), before, "netd bound a socket of its own");

    // dockerd first, netd later: dockerd restores `web` through a plugin
    // that is not running yet, and both come back once netd is up. (dockerd
    // stops first, while netd answers its Leave calls, as at shutdown.)
    let docker = a.docker.as_mut().unwrap();
    docker.stop();
    a.netd().stop();
    let docker = a.docker.as_mut().unwrap();
    docker.launch().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    a.netd().start_again().unwrap();
    a.docker.as_mut().unwrap().wait_ready().unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            let out = fetch(&host, "ov", &web);
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello")
        }),
        "web did not come back on ov"
    );
    let _ = std::fs::remove_file(&notify_path);
}
