//! The real-model network run: `cargo xtask demo --preset smollm2-135m` (a coordinator and 3
//! nodes as processes on 127.0.0.1), its held-out loss per round, the exact answers before and
//! after, and where each round's wall time went: the coordinator's `round_times` (verification,
//! aggregation) beside the nodes' `leases.jsonl` (fetching, training, submit → verdict).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::super::num;
use super::MODEL;
use crate::demo::{self, Demo, DemoArgs};
use crate::util;

pub fn measure(root: &Path, python: &str) -> Result<Value> {
    println!("bench real: the network run (cargo xtask demo --preset {MODEL})");
    let finished = demo::run(root, DemoArgs::parse_from(&["--preset", MODEL])?)?;
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&finished.summary)?)
        .with_context(|| format!("reading {}", finished.summary.display()))?;
    println!("bench real: the base model's answers, before fine-tuning");
    let before = demo::exact_answers(root, &finished.demo, None)?;
    let after = finished.exact.context("the run published no adapter")?;
    let adapter = summary["final_adapter"]
        .as_str()
        .context("summary.json names no final adapter")?;
    println!("bench real: the final checkpoint's held-out loss in PEFT");
    let peft = peft_heldout_loss(root, python, &finished.demo, Path::new(adapter))?;
    let leases = journals(&finished.run_dir)?;
    let losses = demo::heldout_losses(&summary);
    let rounds: Vec<Value> = summary["round_times"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let round = t["round"].as_u64().unwrap_or(u64::MAX);
            let mine: Vec<&Value> = leases
                .iter()
                .filter(|l| l["round"].as_u64() == Some(round) && l["verdict"] == "accepted")
                .collect();
            let mean = |key: &str| {
                mine.iter().map(|l| num(&l[key])).sum::<f64>() / mine.len().max(1) as f64
            };
            json!({
                "round": round,
                "heldout_loss": losses.get(round as usize + 1),
                "seconds": t["seconds"],
                "verification_seconds": t["verification_seconds"],
                "aggregation_seconds": t["aggregation_seconds"],
                "node_fetch_seconds": mean("fetch_seconds"),
                "node_train_seconds": mean("train_seconds"),
                "node_submit_seconds": mean("submit_seconds"),
            })
        })
        .collect();
    let d = &finished.demo;
    Ok(json!({
        "nodes": d.nodes,
        "rounds": d.rounds,
        "inner_steps": d.inner_steps,
        "batch_size": d.batch_size,
        "lr": d.lr,
        "codec": d.codec,
        "heldout_loss": losses,
        "peft_heldout_loss": peft,
        "peft_vs_herd": peft / losses.last().copied().unwrap_or(f64::NAN) - 1.0,
        "exact_before": before.right,
        "exact_after": after.right,
        "heldout_instructions": after.total,
        "compression": summary["compression"],
        "verification": summary["verification"],
        "per_round": rounds,
        "summary": finished.summary,
    }))
}

/// The held-out loss of `adapter` on the base model as PEFT computes it (transformers' model,
/// PEFT's loading of the checkpoint's adapter files).
fn peft_heldout_loss(root: &Path, python: &str, demo: &Demo, adapter: &Path) -> Result<f64> {
    let mut check = Command::new(python);
    check
        .arg(root.join("tests/fixtures/make_fixtures.py"))
        .arg("check-adapter")
        .arg("--model")
        .arg(&demo.model)
        .arg("--adapter")
        .arg(adapter)
        .arg("--data")
        .arg(&demo.heldout);
    let out = util::output(&mut check)?;
    let line: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("check-adapter printed {out:?}"))?;
    line["loss"]
        .as_f64()
        .context("check-adapter printed no loss")
}

/// Every node's `leases.jsonl` lines in the run folder.
fn journals(run_dir: &Path) -> Result<Vec<Value>> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(run_dir)? {
        let path = entry?.path().join("leases.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            lines.push(
                serde_json::from_str(line)
                    .with_context(|| format!("a line of {}", path.display()))?,
            );
        }
    }
    Ok(lines)
}

pub fn markdown(n: &Value) -> String {
    let mut md = String::new();
    let losses: Vec<f64> = n["heldout_loss"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    let (first, last) = (
        losses.first().copied().unwrap_or(f64::NAN),
        losses.last().copied().unwrap_or(f64::NAN),
    );
    let _ = writeln!(
        md,
        "**Network run** (`cargo xtask demo --preset smollm2-135m`): a coordinator and {} nodes \
         (1 thread each) as processes on 127.0.0.1 sharing this machine's cores, {} rounds of \
         H = {} steps of {} examples, lr {}, codec `{}`. Held-out loss {first:.4} → {last:.4}; \
         held-out instructions answered exactly: **{} of {} before, {} after**. The final \
         checkpoint loaded in PEFT (`tests/fixtures/make_fixtures.py check-adapter`) gives \
         held-out loss {:.4} ({:+.3}% from herd's). Uploads: {:.0} \
         bytes per delta, {:.1}× smaller than dense fp32. The coordinator replayed {} \
         submissions (every new node's first ones, then a sample).\n\n\
         Where each round's wall time went. *Nodes* (mean over the round's accepted leases, from \
         their `leases.jsonl`): fetching what changed (the round's adapter; the model in round \
         0), training, and submit → verdict (upload, the coordinator's queue and checks). \
         *Coordinator* (`round_times` in summary.json): its effect checks and replays of the \
         round's submissions, one after another, and aggregation with the held-out evaluation.\n\n\
         | round | held-out loss | wall s | node fetch s | node train s | node submit → verdict s | coordinator verification s | aggregation s |\n\
         |---|---|---|---|---|---|---|---|",
        n["nodes"],
        n["rounds"],
        n["inner_steps"],
        n["batch_size"],
        n["lr"],
        n["codec"].as_str().unwrap_or("?"),
        n["exact_before"],
        n["heldout_instructions"],
        n["exact_after"],
        num(&n["peft_heldout_loss"]),
        100.0 * num(&n["peft_vs_herd"]),
        num(&n["compression"]["bytes_per_delta"]),
        num(&n["compression"]["ratio"]),
        n["verification"]["replays"],
    );
    for r in n["per_round"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {:.4} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} |",
            num(&r["round"]) + 1.0,
            num(&r["heldout_loss"]),
            num(&r["seconds"]),
            num(&r["node_fetch_seconds"]),
            num(&r["node_train_seconds"]),
            num(&r["node_submit_seconds"]),
            num(&r["verification_seconds"]),
            num(&r["aggregation_seconds"]),
        );
    }
    md
}
