//! Transfer: a 64 MiB blob between two nodes' network loops on loopback over libp2p TCP and
//! QUIC, against the same bytes over one plain TCP connection. Into memory (the transports
//! alone: herd's blob protocol in 1 MiB groups, 4 in flight), and into the cache (what a pull
//! does: each group hash-checked and written, then fsync; plain TCP writes a file and fsyncs).

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
const SINKS: [&str; 2] = ["memory", "cache"];

pub fn measure(root: &Path) -> Result<Value> {
    println!("bench transfer: {MIB} MiB between two nodes over libp2p TCP and QUIC vs plain TCP");
    let scratch = root.join("target/bench-transfer");
    let mut sinks = serde_json::Map::new();
    let mut runs = Vec::new();
    for sink in SINKS {
        let mut best = [0f64; 3];
        for rep in 0..REPS {
            for (i, transport) in TRANSPORTS.iter().enumerate() {
                let text = util::output(
                    util::bin(root, "herd-node")
                        .args(["bench-transfer", "--transport", transport, "--sink", sink])
                        .args(["--mib", &MIB.to_string(), "--dir"])
                        .arg(&scratch)
                        .env("HERD_LOG", "warn"),
                )?;
                let run: Value =
                    serde_json::from_str(text.trim()).context("bench-transfer's JSON")?;
                let speed = num(&run["mib_per_second"]);
                println!(
                    "  into {sink}, run {}: {transport:>5} {speed:>7.1} MiB/s",
                    rep + 1
                );
                best[i] = best[i].max(speed);
                runs.push(run);
            }
        }
        sinks.insert(
            sink.into(),
            json!({
                "plain_tcp_mib_per_second": best[0],
                "libp2p_tcp_mib_per_second": best[1],
                "libp2p_quic_mib_per_second": best[2],
                "tcp_vs_plain": best[1] / best[0],
                "quic_vs_plain": best[2] / best[0],
            }),
        );
    }
    Ok(json!({ "mib": MIB, "sinks": sinks, "runs": runs }))
}

pub fn markdown(r: &Value) -> String {
    let mut md = format!(
        "## Transfer\n\nA {} MiB blob between two nodes' network loops on loopback. *Into memory*: the \
         transports alone, herd's blob protocol (1 MiB groups, 4 in flight, noise + yamux on TCP) \
         against one plain TCP connection read into a buffer. *Into the cache*: what a node's \
         pull does (each group blake3-checked and written, fsync at the end) against plain TCP \
         written to a file and fsynced. Best of {REPS} alternating runs. Target: libp2p ≥ 0.5× \
         plain TCP.\n\n| into | plain TCP MiB/s | libp2p TCP MiB/s | libp2p QUIC MiB/s | TCP vs plain | QUIC vs plain |\n\
         |---|---|---|---|---|---|\n",
        r["mib"]
    );
    for sink in SINKS {
        let s = &r["sinks"][sink];
        let _ = writeln!(
            md,
            "| {sink} | {:.1} | {:.1} | {:.1} | {:.2}× | {:.2}× |",
            num(&s["plain_tcp_mib_per_second"]),
            num(&s["libp2p_tcp_mib_per_second"]),
            num(&s["libp2p_quic_mib_per_second"]),
            num(&s["tcp_vs_plain"]),
            num(&s["quic_vs_plain"]),
        );
    }
    md
}
