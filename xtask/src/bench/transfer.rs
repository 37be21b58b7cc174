//! Transfer: a 64 MiB blob fetched by one node from another through the daemon's own network
//! loop (outline, 1 MiB groups, each hash-checked, written to the cache with fsync) over
//! libp2p TCP and QUIC on loopback, against the same bytes over one plain TCP connection.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::num;
use crate::util;

const MIB: u32 = 64;
/// Runs of each, alternating; the best counts (the machine is shared and noisy).
const REPS: usize = 3;
const TRANSPORTS: [&str; 3] = ["plain", "tcp", "quic"];

pub fn measure(root: &Path) -> Result<Value> {
    println!("bench transfer: {MIB} MiB between two nodes over libp2p TCP and QUIC vs plain TCP");
    let scratch = root.join("target/bench-transfer");
    let mut best = [0f64; 3];
    let mut runs = Vec::new();
    for rep in 0..REPS {
        for (i, transport) in TRANSPORTS.iter().enumerate() {
            let text = util::output(
                util::bin(root, "herd-node")
                    .args(["bench-transfer", "--transport", transport, "--mib"])
                    .arg(MIB.to_string())
                    .arg("--dir")
                    .arg(&scratch)
                    .env("HERD_LOG", "warn"),
            )?;
            let run: Value = serde_json::from_str(text.trim()).context("bench-transfer's JSON")?;
            let speed = num(&run["mib_per_second"]);
            println!("  run {}: {transport:>5} {speed:>7.1} MiB/s", rep + 1);
            best[i] = best[i].max(speed);
            runs.push(run);
        }
    }
    Ok(json!({
        "mib": MIB,
        "plain_tcp_mib_per_second": best[0],
        "libp2p_tcp_mib_per_second": best[1],
        "libp2p_quic_mib_per_second": best[2],
        "tcp_vs_plain": best[1] / best[0],
        "quic_vs_plain": best[2] / best[0],
        "runs": runs,
    }))
}

pub fn markdown(r: &Value) -> String {
    let mut md = format!(
        "## Transfer\n\nA {} MiB blob fetched by one node from another on loopback the way a node pulls \
         a checkpoint: herd's blob protocol (outline, then 1 MiB groups, 4 in flight, each \
         blake3-checked, written to the cache with fsync) through the daemon's network loop, \
         against the same bytes over one plain TCP connection into memory. Best of {REPS} \
         alternating runs. Target: libp2p ≥ 0.5× plain TCP.\n\n\
         | path | MiB/s | vs plain TCP |\n|---|---|---|\n",
        r["mib"]
    );
    let plain = num(&r["plain_tcp_mib_per_second"]);
    for (name, key) in [
        ("plain TCP", "plain_tcp_mib_per_second"),
        ("libp2p TCP (noise, yamux)", "libp2p_tcp_mib_per_second"),
        ("libp2p QUIC", "libp2p_quic_mib_per_second"),
    ] {
        let v = num(&r[key]);
        let _ = writeln!(md, "| {name} | {v:.1} | {:.2}× |", v / plain);
    }
    md
}
