//! `herd-node status`: what the daemon is doing and what it has given, read from the status
//! file it keeps in its data dir (`status.json`). The command works whether the daemon runs or
//! not, and needs no port.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use herd_protocol::messages::now_ms;

use crate::daemon::default_data_dir;
use crate::daemon::status::NodeStatus;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The daemon's data dir (default: $XDG_DATA_HOME/herd-node).
    #[arg(long, env = "HERD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print the status file as JSON, for scripts.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> Result<()> {
    let dir = args.data_dir.unwrap_or_else(default_data_dir);
    let Some(s) = NodeStatus::load(&dir)? else {
        bail!(
            "no node status in {}: start `herd-node run` with this --data-dir first",
            dir.display()
        );
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let running = Path::new(&format!("/proc/{}", s.pid)).exists();
    let ago = now_ms().saturating_sub(s.since_ms) / 1000;
    println!(
        "node {} ({}): {} for {ago} s{}",
        s.peer,
        s.device,
        s.doing,
        if running { "" } else { " (not running now)" }
    );
    println!("coordinator {}", s.coordinator);
    if !s.reachability.is_empty() {
        println!("reachability: {}", s.reachability);
    }
    let reasons: Vec<String> = s
        .rejected_by_reason
        .iter()
        .map(|(r, n)| format!("{n} {r}"))
        .collect();
    println!(
        "contributed: {} accepted shards, {} tokens of credit, {} bytes uploaded; {} rejected{}",
        s.accepted,
        s.tokens,
        s.bytes_uploaded,
        s.rejected,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        }
    );
    if let Some(v) = &s.last_verdict {
        println!("last verdict: {v}");
    }
    Ok(())
}
