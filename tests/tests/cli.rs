//! Bad input to the real netd binary: one clear line, the right exit code,
//! nothing lost.
use std::{os::unix::process::CommandExt as _, process::Command};

use netd_tests::{netd::netd_binary, privileged, Bench};

fn one_line_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("netd: "), "{stderr}");
    assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let out = Command::new(netd_binary().unwrap())
        .args(["status", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
}

#[test]
fn unknown_interface_missing_socket_and_no_privileges() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let ns = bench.netns("cli").unwrap();
    let pin = bench.bpffs().join("cli").display().to_string();
    let netd = netd_binary().unwrap();

    let out = ns
        .command(&netd)
        .args(["run", "--uplink", "nosuch0", "--pin-dir", &pin])
        .output()
        .unwrap();
    one_line_error(&out, "no interface named \"nosuch0\"");

    let out = ns
        .command(&netd)
        .args([
            "run",
            "--uplink",
            "lo",
            "--pin-dir",
            &pin,
            "--docker-host",
            "unix:///nonexistent/docker.sock",
        ])
        .output()
        .unwrap();
    one_line_error(&out, "no Docker socket at /nonexistent/docker.sock");

    // The real binary as an unprivileged user. The checkout may sit below a
    // directory that user cannot traverse (/root, a mktemp -d dir), so it
    // runs a copy from the bench's state dir, which is world-traversable.
    let copy = bench.world_executable(&netd).unwrap();
    let out = Command::new(&copy)
        .args(["status", "--pin-dir", &pin])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap_or_else(|e| panic!("running {} as uid 65534: {e}", copy.display()));
    one_line_error(&out, "needs root");

    for inspect in ["status", "ports", "endpoints", "ct"] {
        let out = ns
            .command(&netd)
            .args([inspect, "--pin-dir", "/sys/fs/bpf/netd-never-installed"])
            .output()
            .unwrap();
        one_line_error(&out, "nothing is installed");
    }

    let out = ns
        .command(&netd)
        .args(["run", "--uplink", "lo", "--pin-dir", "/proc/netd"])
        .output()
        .unwrap();
    one_line_error(&out, "not on bpffs");
}

#[test]
fn foreign_and_incompatible_pin_dirs_are_refused_and_kept() {
    if !privileged() {
        return;
    }
    let bench = Bench::new().unwrap();
    let ns = bench.netns("pins").unwrap();
    let netd = netd_binary().unwrap();
    let run = |pin: &str| {
        ns.command(&netd)
            .args([
                "run",
                "--uplink",
                "lo",
                "--pin-dir",
                pin,
                "--docker-host",
                "unix:///nonexistent/docker.sock",
            ])
            .output()
            .unwrap()
    };
    let bpftool = |args: &[&str]| {
        let out = Command::new("bpftool").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // A stranger's map: refused, and left where it is.
    let foreign = bench.bpffs().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let stranger = foreign.join("their_map");
    bpftool(&[
        "map",
        "create",
        stranger.to_str().unwrap(),
        "type",
        "array",
        "key",
        "4",
        "value",
        "4",
        "entries",
        "1",
        "name",
        "their_map",
    ]);
    let listing = |dir: &std::path::Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let before = listing(&foreign);
    one_line_error(&run(foreign.to_str().unwrap()), "not netd's");
    assert_eq!(listing(&foreign), before, "a refused pin dir was changed");
    let out = ns
        .command(&netd)
        .args(["uninstall", "--pin-dir", foreign.to_str().unwrap()])
        .output()
        .unwrap();
    one_line_error(&out, "not netd's");
    assert_eq!(listing(&foreign), before);

    // A netd meta map of another layout version: refused with the way out.
    let old = bench.bpffs().join("old");
    std::fs::create_dir_all(&old).unwrap();
    let meta = old.join("netd_meta");
    bpftool(&[
        "map",
        "create",
        meta.to_str().unwrap(),
        "type",
        "array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "1",
        "name",
        "netd_meta",
    ]);
    // magic "netd" (0x6e657464 little-endian), layout version 99
    bpftool(&[
        "map",
        "update",
        "pinned",
        meta.to_str().unwrap(),
        "key",
        "0",
        "0",
        "0",
        "0",
        "value",
        "0x64",
        "0x74",
        "0x65",
        "0x6e",
        "99",
        "0",
        "0",
        "0",
    ]);
    let before = listing(&old);
    one_line_error(&run(old.to_str().unwrap()), "layout v99");
    assert_eq!(listing(&old), before);
    // … and `netd uninstall` is that way out.
    let out = ns
        .command(&netd)
        .args(["uninstall", "--pin-dir", old.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!old.exists());
}
