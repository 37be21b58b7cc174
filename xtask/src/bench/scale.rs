//! The coordinator at scale: simulated peers (in process) through the real round machine, delta
//! codec and structure checks; rounds per second, verifications per second and peak memory at
//! 100, 1,000 and 10,000 peers, each count in a process of its own so peak memory is its own.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::num;
use crate::util;

/// Peer counts, with rounds enough for ~20,000 submissions each.
const SCALE: [(u32, u64); 3] = [(100, 200), (1_000, 20), (10_000, 2)];

pub fn measure(root: &Path) -> Result<Value> {
    println!(
        "bench scale: coordinator with simulated peers — real round machine, codec and structure checks"
    );
    let mut runs = Vec::new();
    for (peers, rounds) in SCALE {
        let text = util::output(util::bin(root, "herd-coordinator").args([
            "simulate",
            "--peers",
            &peers.to_string(),
            "--rounds",
            &rounds.to_string(),
        ]))?;
        let report: Value = serde_json::from_str(&text).context("simulate's JSON")?;
        println!(
            "  {:>6} peers: {:>8.1} rounds/s, {:>9.0} verifications/s, peak RSS {:.1} MiB",
            peers,
            num(&report["rounds_per_second"]),
            num(&report["verifications_per_second"]),
            num(&report["peak_rss_bytes"]) / (1 << 20) as f64,
        );
        runs.push(report);
    }
    Ok(json!({ "runs": runs }))
}

pub fn markdown(results: &Value) -> String {
    let mut md = String::from(
        "## Coordinator at scale\n\nSimulated peers (in process) through the real round machine, delta codec \
         (default `sign:0.7:256`, the demo's 6,144-value layout) and structure checks; no network, \
         no training. Only the coordinator's side is timed. Each peer count runs in its own process. \
         Target: memory that does not grow with the peer count.\n\n\
         | peers | rounds | submissions | rounds/s | verifications/s | peak RSS |\n|---|---|---|---|---|---|\n",
    );
    for r in results["runs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.0} | {:.1} MiB |",
            r["peers"],
            r["rounds"],
            r["submissions"],
            num(&r["rounds_per_second"]),
            num(&r["verifications_per_second"]),
            num(&r["peak_rss_bytes"]) / (1 << 20) as f64,
        );
    }
    md
}
