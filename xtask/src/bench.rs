//! `cargo xtask bench`: benchmarks, each side by side with what it is compared to, run in one
//! go so the figures share the machine's state; results go to `bench/results.json` and
//! `bench/RESULTS.md`.
//!
//! Measured now: the coordinator at scale (simulated peers through the real round machine,
//! codec and structure checks; rounds per second, verifications per second and peak memory at
//! 100, 1,000 and 10,000 peers, each count in a process of its own so peak memory is its own).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::util;

/// Peer counts of the scale benchmark, with rounds enough for ~20,000 submissions each.
const SCALE: [(u32, u64); 3] = [(100, 200), (1_000, 20), (10_000, 2)];

pub fn run(root: &Path) -> Result<()> {
    util::build_bins(root)?;
    let out = root.join("bench");
    std::fs::create_dir_all(&out)?;
    println!(
        "bench: coordinator at scale — simulated peers, real round machine, codec and structure checks"
    );
    let mut scale = Vec::new();
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
            report["rounds_per_second"].as_f64().unwrap_or(f64::NAN),
            report["verifications_per_second"]
                .as_f64()
                .unwrap_or(f64::NAN),
            report["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / (1 << 20) as f64,
        );
        scale.push(report);
    }
    let results = json!({ "coordinator_scale": scale });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out.join("RESULTS.md"), markdown(&scale))?;
    println!("bench: {}", out.join("RESULTS.md").display());
    Ok(())
}

fn markdown(scale: &[Value]) -> String {
    let mut md = String::from(
        "# Benchmarks\n\nWritten by `cargo xtask bench`; every figure of one table comes from the same run.\n\n\
         ## Coordinator at scale\n\nSimulated peers (in process) through the real round machine, delta codec \
         (default `sign:0.7:256`, the demo's 6,144-value layout) and structure checks; no network, \
         no training. Only the coordinator's side is timed. Each peer count runs in its own process.\n\n\
         | peers | rounds | submissions | rounds/s | verifications/s | peak RSS |\n|---|---|---|---|---|---|\n",
    );
    for r in scale {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.0} | {:.1} MiB |",
            r["peers"],
            r["rounds"],
            r["submissions"],
            r["rounds_per_second"].as_f64().unwrap_or(f64::NAN),
            r["verifications_per_second"].as_f64().unwrap_or(f64::NAN),
            r["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / (1 << 20) as f64,
        );
    }
    md
}
