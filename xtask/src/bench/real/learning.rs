//! Learning on the real model, without the network: `herd-coordinator rehearse` plays the
//! demo's rounds in one process (the node's training code, the codec with error feedback, the
//! coordinator's averaging and outer step). Two questions: what each codec costs in held-out
//! loss for the bytes it saves (the sweep), and whether 3 nodes averaging every H steps learn
//! what one node does with the same tokens (DiLoCo's claim; the one node takes 3× the batch,
//! so both take the same number of steps on the same number of examples).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::super::{codecs, num};
use super::MODEL;
use crate::demo::DemoArgs;
use crate::util;

/// Uncompressed first: every other setting is measured against it. Then the default (39× on
/// SmolLM2's adapter) and two smaller settings (92× and 149×).
const SWEEP: [&str; 4] = ["raw", "sign:0.7:256", "sign:0.25:512", "sign:0.15:512"];

pub fn measure(root: &Path) -> Result<Value> {
    let mut sweep = Vec::new();
    for codec in SWEEP {
        println!("bench real: rehearsal, 3 nodes, codec {codec}");
        sweep.push(rehearse(root, &["--codec", codec])?);
    }
    for run in &mut sweep {
        run["final_heldout_loss"] = json!(final_loss(run));
        // What the plot's x axis counts.
        run["accepted_deltas"] = json!(num(&run["nodes"]) * num(&run["rounds"]));
    }
    codecs::cost_against_first(&mut sweep);
    let raw = final_loss(&sweep[0]);
    println!("bench real: rehearsal, 1 node with 3× the batch, codec raw");
    let alone = rehearse(
        root,
        &["--codec", "raw", "--nodes", "1", "--batch-size", "24"],
    )?;
    let parity = json!({
        "one_node": alone,
        "three_nodes_final_loss": raw,
        "one_node_final_loss": final_loss(&alone),
        "three_vs_one": raw / final_loss(&alone) - 1.0,
    });
    Ok(json!({ "sweep": { "runs": sweep }, "parity": parity }))
}

fn final_loss(run: &Value) -> f64 {
    run["heldout_loss"]
        .as_array()
        .and_then(|l| l.last())
        .map_or(f64::NAN, num)
}

/// `herd-coordinator rehearse` on the smollm2-135m demo's run.toml with `flags` over it.
fn rehearse(root: &Path, flags: &[&str]) -> Result<Value> {
    let mut args = vec!["--preset", MODEL];
    args.extend_from_slice(flags);
    let demo = DemoArgs::parse_from(&args)?.resolve(root)?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let dir = demo.runs.join(format!("rehearsal-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    let config = demo.write_run_toml(&dir)?;
    let out = dir.join("rehearsal.json");
    util::run(
        util::bin(root, "herd-coordinator")
            .args(["rehearse", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&out),
    )?;
    serde_json::from_str(&std::fs::read_to_string(&out)?)
        .with_context(|| format!("reading {}", out.display()))
}

pub fn markdown(l: &Value) -> String {
    let mut md = String::from(
        "**Upload size vs learning** (`herd-coordinator rehearse`: the demo's rounds in one \
         process — the node's training code, the codec with each node's error-feedback \
         residual, the coordinator's averaging and outer step; no network, no verification). \
         Loss cost = final held-out loss / the raw run's − 1. Held-out loss against bytes \
         uploaded: `bench/codecs-smollm2.png`. Target: the default ≥ 100× smaller at ≤ 1% \
         loss cost.\n\n",
    );
    md.push_str(&codecs::table(&l["sweep"]["runs"]));
    let p = &l["parity"];
    let one = &p["one_node"];
    let _ = writeln!(
        md,
        "\n**3 nodes vs 1 node at equal tokens** (rehearsals, codec `raw`): 3 nodes with \
         batch {} each against 1 node with batch {} for the same {} rounds of H steps — the same \
         examples per round, the same optimizer steps. Target: within 2%.\n\n\
         | | tokens | final held-out loss |\n|---|---|---|\n\
         | 3 nodes, averaged every round | {} | {:.4} |\n\
         | 1 node | {} | {:.4} |\n\n\
         3 nodes vs 1: **{:+.2}%**.",
        l["sweep"]["runs"][0]["batch_size"],
        one["batch_size"],
        one["rounds"],
        l["sweep"]["runs"][0]["tokens"],
        num(&p["three_nodes_final_loss"]),
        one["tokens"],
        num(&p["one_node_final_loss"]),
        100.0 * num(&p["three_vs_one"]),
    );
    md
}
