//! The real daemon in an emulated Docker host: attach, pin, count real
//! packets, keep forwarding while down, adopt on restart, uninstall.
use std::time::Duration;

use netd_tests::{
    eventually,
    netd::{counter, NetdOptions},
    privileged, Bench, DockerMode, Host,
};

/// Packets a hook handled, whatever the verdict.
fn seen_by(status: &serde_json::Value, hook: &str) -> u64 {
    ["pass", "redirect", "drop"]
        .iter()
        .map(|v| counter(status, hook, v))
        .sum()
}

fn wget(client: &Host, url: &str) -> String {
    client.http_get(url).unwrap()
}

#[test]
fn daemon_attaches_survives_restart_and_uninstalls() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(1).unwrap();
    let mut host = Host::docker(&bench, &lan, "dh", 1, [198, 19, 1], DockerMode::Netd).unwrap();
    let client = Host::plain(&bench, &lan, "client", 100).unwrap();
    host.dockerd().run_httpd("web", &["-p", "8080:80"]).unwrap();
    let url = format!("http://{}:8080/", host.ip);

    host.start_netd(&bench).unwrap();
    let status = host.netd().status().unwrap();
    let attachments = status["attachments"].as_array().unwrap();
    // Uplink ingress + egress, three socket hooks, both ways on the
    // container's veth.
    assert_eq!(attachments.len(), 7, "{status:#}");
    let on_veth = attachments
        .iter()
        .filter(|a| a["hook"] == "container-egress" || a["hook"] == "container-ingress")
        .count();
    assert_eq!(on_veth, 2, "{status:#}");
    assert!(
        attachments.iter().all(|a| a["attached"] == true),
        "{status:#}"
    );
    let on_uplink = attachments
        .iter()
        .filter(|a| a["interface"] == "eth0")
        .count();
    assert_eq!(on_uplink, 2, "{status:#}");
    let link_ids: Vec<_> = attachments.iter().map(|a| a["link_id"].clone()).collect();
    let prog_ids: Vec<_> = attachments
        .iter()
        .map(|a| a["program_id"].clone())
        .collect();

    // Real packets through the uplink programs.
    assert_eq!(wget(&client, &url), "hello from netd-test\n");
    let status = host.netd().status().unwrap();
    let seen = seen_by(&status, "uplink-ingress");
    assert!(seen >= 5, "TCP handshake + request not counted: {status:#}");
    assert!(seen_by(&status, "uplink-egress") >= 5);

    // Daemon down: the pinned datapath keeps running and counting.
    host.netd().stop();
    assert_eq!(wget(&client, &url), "hello from netd-test\n");
    let down = host.netd().status().unwrap();
    assert!(seen_by(&down, "uplink-ingress") > seen, "{down:#}");

    // One owner per pin dir: a second daemon and an uninstall are refused
    // while the first runs.
    host.netd().restart().unwrap();
    let pin = host.netd().pin_dir().display().to_string();
    let docker_host = host.dockerd().host();
    let second = host
        .netd()
        .cli(&[
            "run",
            "--uplink",
            "eth0",
            "--pin-dir",
            &pin,
            "--docker-host",
            &docker_host,
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && err.contains("a netd daemon is running"),
        "{err}"
    );
    let un = host.netd().cli(&["uninstall", "--pin-dir", &pin]).unwrap();
    assert!(String::from_utf8_lossy(&un.stderr).contains("a netd daemon is running"));
    assert!(host.netd().pin_dir().join("netd_meta").exists());

    // Restart: same links (adopted), new programs swapped in, counters kept.
    host.netd().restart().unwrap();
    let up = host.netd().status().unwrap();
    let attachments = up["attachments"].as_array().unwrap();
    assert_eq!(
        attachments
            .iter()
            .map(|a| a["link_id"].clone())
            .collect::<Vec<_>>(),
        link_ids
    );
    let new_prog_ids: Vec<_> = attachments
        .iter()
        .map(|a| a["program_id"].clone())
        .collect();
    assert!(
        new_prog_ids.iter().zip(&prog_ids).all(|(n, o)| n != o),
        "programs not replaced"
    );
    assert!(seen_by(&up, "uplink-ingress") >= seen_by(&down, "uplink-ingress"));
    assert_eq!(wget(&client, &url), "hello from netd-test\n");

    // Uninstall: pins gone, programs unloaded from the kernel.
    host.netd().stop();
    host.netd().uninstall().unwrap();
    assert!(!host.netd().pin_dir().exists());
    for id in new_prog_ids {
        let out = std::process::Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "program {id} still loaded after uninstall"
        );
    }
    // With netd gone (and Docker's iptables off) nothing serves the port.
    assert!(client.http_get_within(&url, 3).is_err());
}

/// At steady state the daemon's journal is quiet: passes that change
/// nothing log nothing at info level or above, and neither does a
/// dependency (netlink-packet-route warns about every link it parses from
/// a kernel newer than itself).
#[test]
fn a_steady_state_daemon_logs_nothing_at_info_level() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let lan = bench.lan(11).unwrap();
    let mut host = Host::docker(&bench, &lan, "dh", 1, [198, 19, 13], DockerMode::Netd).unwrap();
    // A container with a published port: each pass lists it, inspects it and
    // reads its veth over rtnetlink.
    host.dockerd().run_httpd("web", &["-p", "8080:80"]).unwrap();
    host.start_netd_with(
        &bench,
        NetdOptions {
            // The daemon's own debug line marks each resync.
            log: "info,netd::daemon=debug".into(),
            args: vec!["--resync-interval".into(), "1".into()],
            ..NetdOptions::default()
        },
    )
    .unwrap();
    let log_path = host.netd().log_path();
    let mark = std::fs::read_to_string(&log_path).unwrap().len();
    let after_mark = || std::fs::read_to_string(&log_path).unwrap()[mark..].to_owned();
    // Three resyncs begun: at least two complete passes in between.
    assert!(
        eventually(Duration::from_secs(20), || after_mark()
            .matches("periodic resync")
            .count()
            >= 3),
        "no resyncs: {}",
        after_mark()
    );
    let loud: Vec<String> = after_mark()
        .lines()
        .filter(|l| {
            [" INFO ", " WARN ", " ERROR "]
                .iter()
                .any(|lvl| l.contains(lvl))
        })
        .map(str::to_owned)
        .collect();
    assert!(
        loud.is_empty(),
        "logged at steady state:\n{}",
        loud.join("\n")
    );
}
