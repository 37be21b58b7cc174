//! Upload size vs learning: the demo (a coordinator and three nodes on loopback) run to the
//! same number of rounds at several codec settings, each against dense fp32: bytes per delta
//! and the held-out loss after every round.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::num;
use crate::demo;

/// Uncompressed first: every other setting is measured against it.
const SETTINGS: [&str; 5] = [
    "raw",
    "int8:64",
    "sign:0.7:256",
    "sign:0.3:64",
    "topk:0.04:64",
];

pub fn measure(root: &Path) -> Result<Value> {
    println!(
        "bench codecs: the demo at {} codec settings, same rounds",
        SETTINGS.len()
    );
    let mut runs: Vec<Value> = Vec::new();
    for codec in SETTINGS {
        println!("bench codecs: --codec {codec}");
        let summary_path = demo::run(root, demo::DemoArgs::with_codec(codec)?)?.summary;
        let summary: Value = serde_json::from_str(&std::fs::read_to_string(&summary_path)?)
            .with_context(|| format!("reading {}", summary_path.display()))?;
        let c = &summary["compression"];
        let losses = demo::heldout_losses(&summary);
        let final_loss = *losses.last().context("summary without held-out losses")?;
        runs.push(json!({
            "codec": codec,
            "bytes_per_delta": c["bytes_per_delta"],
            "dense_fp32_bytes_per_delta": c["dense_fp32_bytes_per_delta"],
            "ratio": c["ratio"],
            "accepted_deltas": c["accepted_deltas"],
            "final_heldout_loss": final_loss,
            "heldout_loss": losses,
            "summary": summary_path,
        }));
    }
    cost_against_first(&mut runs);
    Ok(json!({ "runs": runs }))
}

/// Sets each run's `loss_cost_vs_raw`: its `final_heldout_loss` against the first run's (raw).
pub fn cost_against_first(runs: &mut [Value]) {
    let raw = runs
        .first()
        .map_or(f64::NAN, |r| num(&r["final_heldout_loss"]));
    for run in runs {
        run["loss_cost_vs_raw"] = json!(num(&run["final_heldout_loss"]) / raw - 1.0);
    }
}

/// A codec comparison's table: codec, bytes per delta, ratio, final held-out loss, cost.
pub fn table(runs: &Value) -> String {
    let mut md = String::from(
        "| codec | bytes per delta | vs fp32 | final held-out loss | loss cost |\n|---|---|---|---|---|\n",
    );
    for run in runs.as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| `{}` | {:.0} | {:.1}× smaller | {:.4} | {:+.1}% |",
            run["codec"].as_str().unwrap_or("?"),
            num(&run["bytes_per_delta"]),
            num(&run["ratio"]),
            num(&run["final_heldout_loss"]),
            100.0 * num(&run["loss_cost_vs_raw"]),
        );
    }
    md
}

pub fn markdown(r: &Value) -> String {
    let mut md = String::from(
        "## Upload size vs learning\n\nThe demo (coordinator and 3 nodes on loopback, the embedded default) \
         run to the same number of rounds at each codec setting. Bytes per delta as uploaded \
         (the signed message's delta payload), against dense fp32 of the same adapter; loss cost = \
         final held-out loss / the raw run's − 1 (negative: lower than raw). Held-out loss against \
         bytes uploaded: `bench/codecs.png`. Target: ≥ 100× smaller at ≤ 1% loss cost.\n\n",
    );
    md.push_str(&table(&r["runs"]));
    md
}
