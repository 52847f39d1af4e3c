//! The datapath outlives the daemon: an established connection through a
//! published port keeps working while netd is killed (SIGKILL, no cleanup)
//! and after it restarts, and new connections work while it is down.
use std::time::Duration;

use netd_tests::{eventually, privileged, Bench, DockerMode, Host};

#[test]
fn established_connections_survive_a_killed_and_restarted_daemon() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(5).unwrap();
    let mut host = Host::docker(&bench, &lan, "dh", 1, [198, 19, 5], DockerMode::Netd).unwrap();
    let client = Host::plain(&bench, &lan, "client", 100).unwrap();
    host.start_netd(&bench).unwrap();
    // An echo server (one cat per connection) and a web server.
    host.dockerd().run_echo("echo", &["-p", "7000:7"]).unwrap();
    host.dockerd().run_httpd("web", &["-p", "8080:80"]).unwrap();
    let url = format!("http://{}:8080/", host.ip);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.http_get_within(&url, 2).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "published port never came up"
        );
    }

    let wait = Duration::from_secs(5);
    let mut session = client.tcp_session(host.ip, 7000).unwrap();
    assert_eq!(session.echo("before", wait).unwrap(), "before");

    host.netd().kill();
    assert_eq!(session.echo("while down", wait).unwrap(), "while down");
    assert_eq!(
        client.http_get_within(&url, 5).unwrap(),
        "hello from netd-test\n"
    );

    host.netd().start_again().unwrap();
    assert_eq!(
        session.echo("after restart", wait).unwrap(),
        "after restart"
    );
    assert_eq!(
        client.http_get_within(&url, 5).unwrap(),
        "hello from netd-test\n"
    );
}

#[test]
fn netd_follows_docker_through_a_dockerd_restart() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(6).unwrap();
    let mut host = Host::docker(&bench, &lan, "dh", 1, [198, 19, 6], DockerMode::Netd).unwrap();
    let client = Host::plain(&bench, &lan, "client", 100).unwrap();
    host.start_netd(&bench).unwrap();
    host.dockerd().run_httpd("web", &["-p", "8080:80"]).unwrap();
    let host_ip = host.ip;
    let reachable = |port: u16| {
        client
            .http_get_within(&format!("http://{host_ip}:{port}/"), 2)
            .is_ok()
    };
    assert!(eventually(Duration::from_secs(15), || reachable(8080)));

    // dockerd goes away (stopping its containers) and comes back.
    host.docker.as_mut().unwrap().restart().unwrap();
    // netd resyncs: the stopped container's port is withdrawn…
    let pin = host.netd().pin_dir().display().to_string();
    let published = |host: &mut Host| {
        let out = host
            .netd()
            .cli(&["ports", "--json", "--pin-dir", &pin])
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while published(&mut host) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "stale port still published"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!reachable(8080));
    // … and it follows the new daemon's events.
    host.dockerd()
        .run_httpd("web2", &["-p", "9090:80"])
        .unwrap();
    assert!(
        eventually(Duration::from_secs(15), || reachable(9090)),
        "netd lost Docker after its restart"
    );
    let log = std::fs::read_to_string(host.netd().log_path()).unwrap();
    assert!(log.contains("lost Docker event stream"), "{log}");
}
