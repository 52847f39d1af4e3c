//! The `netd` command line: parsing, dispatch and output.
use std::{fmt::Write as _, path::PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{daemon, dataplane, docker};

/// Default pin dir in bpffs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/netd";

#[derive(Parser, Debug)]
#[command(name = "netd", version, about = "eBPF dataplane for Docker hosts")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load and attach the datapath and keep it in sync with Docker.
    Run {
        /// Docker API endpoint (unix:///path or tcp://host:port). Defaults to
        /// $DOCKER_HOST, then the standard socket.
        #[arg(long, env = "DOCKER_HOST", default_value = docker::DEFAULT_HOST)]
        docker_host: String,
        /// Interface traffic enters and leaves the host by. Defaults to the
        /// interface of the IPv4 default route.
        #[arg(long)]
        uplink: Option<String>,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Log every datapath decision through aya-log (slow).
        #[arg(long)]
        debug_datapath: bool,
    },
    /// Show attachments, map fill levels and packet counters (works while
    /// the daemon is down: it reads the pinned objects).
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach every program and remove everything netd pinned.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// Runs the CLI; returns the process exit code. Errors are one line on
/// stderr, never a panic or a backtrace.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging();
    match dispatch(cli.command) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("netd: {e:#}");
            1
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run {
            docker_host,
            uplink,
            pin_dir,
            debug_datapath,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(daemon::run(daemon::RunOptions {
                docker_host,
                uplink,
                pin_dir,
                debug_datapath,
            }))
        }
        Command::Status { json, pin_dir } => {
            dataplane::require_privileges()?;
            let status = dataplane::read_status(&pin_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_status(&status));
            }
            Ok(())
        }
        Command::Uninstall { pin_dir } => {
            dataplane::require_privileges()?;
            let report = dataplane::uninstall(&pin_dir)?;
            println!(
                "netd: detached {} link(s), removed {} map(s) from {}",
                report.links_detached,
                report.maps_removed,
                pin_dir.display()
            );
            Ok(())
        }
    }
}

/// The human form of `netd status`.
pub fn render_status(s: &dataplane::Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "pin dir {} (layout v{})", s.pin_dir, s.layout_version);
    let _ = writeln!(out, "\nattachments:");
    if s.attachments.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for a in &s.attachments {
        let _ = writeln!(
            out,
            "  {:<18} {:<12} {:<8} {:<24} prog {:<6} link {:<6} {}",
            a.hook,
            a.interface,
            a.direction,
            a.program,
            a.program_id,
            a.link_id,
            if a.attached { "attached" } else { "DETACHED" }
        );
    }
    let _ = writeln!(out, "\nmaps:");
    for m in &s.maps {
        let _ = writeln!(
            out,
            "  {:<18} {:<14} {}/{}",
            m.name, m.map_type, m.entries, m.max_entries
        );
    }
    let _ = writeln!(out, "\ncounters (packets / bytes):");
    for h in &s.counters {
        let _ = writeln!(out, "  {}:", h.hook);
        if h.counters.is_empty() {
            let _ = writeln!(out, "    (no packets)");
        }
        for c in &h.counters {
            let _ = writeln!(
                out,
                "    {:<16} {:>12} {:>14}{}",
                c.name,
                c.packets,
                c.bytes,
                if c.verdict { "" } else { "   (reason)" }
            );
        }
    }
    out
}
