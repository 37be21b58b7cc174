//! Node training throughput: the node's LoRA trainer (`herd-node bench-train`) against
//! PyTorch + PEFT (bench/peft_baseline.py) on the same shape, batch, sequence length, LoRA
//! targets and rank, thread count and torch build, alternating runs in the same process tree.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::num;
use crate::util;

/// A model shape to measure at a CPU-sized batch.
struct Shape {
    name: &'static str,
    config: &'static str,
    seq: u32,
    batch: u32,
    steps: u32,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "embedded default",
        config: "model/default/base/config.json",
        seq: 128,
        batch: 16,
        steps: 10,
    },
    Shape {
        name: "SmolLM-135M shape",
        config: "bench/shapes/smollm-135m.json",
        seq: 128,
        batch: 4,
        steps: 3,
    },
];
/// Runs of each, alternating herd and PEFT; the best counts (the machine is shared and noisy).
const REPS: usize = 3;
/// What bench/peft_baseline.py exits with when its Python packages are missing.
const PEFT_MISSING: i32 = 3;

pub fn measure(root: &Path) -> Result<Value> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let python = std::env::var("HERD_PYTHON").unwrap_or_else(|_| "python3".into());
    println!(
        "bench train: herd-node's LoRA trainer vs PyTorch + PEFT ({python}), {threads} threads, CPU"
    );
    let mut peft_skipped: Option<String> = None;
    let mut shapes = Vec::new();
    for shape in &SHAPES {
        let common = |cmd: &mut Command| {
            cmd.arg("--config")
                .arg(root.join(shape.config))
                .args(["--seq", &shape.seq.to_string()])
                .args(["--batch", &shape.batch.to_string()])
                .args(["--steps", &shape.steps.to_string()])
                .args(["--warmup", "1", "--threads", &threads.to_string()])
                .args(["--device", "cpu"]);
        };
        let (mut herd_best, mut peft_best) = (0f64, None::<f64>);
        let mut runs = Vec::new();
        for rep in 0..REPS {
            let mut herd = util::bin(root, "herd-node");
            herd.arg("bench-train").env("HERD_LOG", "warn");
            common(&mut herd);
            let run: Value = serde_json::from_str(util::output(&mut herd)?.trim())
                .context("bench-train's JSON")?;
            let speed = num(&run["tokens_per_second"]);
            println!(
                "  {} run {}: herd {speed:>8.0} tokens/s",
                shape.name,
                rep + 1
            );
            herd_best = herd_best.max(speed);
            runs.push(run);
            if peft_skipped.is_some() {
                continue;
            }
            let mut peft = Command::new(&python);
            peft.arg(root.join("bench/peft_baseline.py"));
            common(&mut peft);
            let out = peft
                .output()
                .with_context(|| format!("starting {python}"))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            match out.status.code() {
                Some(0) => {}
                Some(PEFT_MISSING) => {
                    let why = stderr.trim().to_string();
                    println!("  PEFT baseline skipped: {why}");
                    peft_skipped = Some(why);
                    continue;
                }
                _ => bail!("bench/peft_baseline.py failed ({}):\n{stderr}", out.status),
            }
            let run: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())
                .context("peft_baseline.py's JSON")?;
            let speed = num(&run["tokens_per_second"]);
            println!(
                "  {} run {}: PEFT {speed:>8.0} tokens/s",
                shape.name,
                rep + 1
            );
            peft_best = Some(peft_best.unwrap_or(0.0).max(speed));
            runs.push(run);
        }
        shapes.push(json!({
            "shape": shape.name,
            "config": shape.config,
            "seq": shape.seq,
            "batch": shape.batch,
            "herd_tokens_per_second": herd_best,
            "peft_tokens_per_second": peft_best,
            "herd_vs_peft": peft_best.map(|p| herd_best / p),
            "runs": runs,
        }));
    }
    Ok(json!({
        "device": "cpu",
        "threads": threads,
        "peft_skipped": peft_skipped,
        "shapes": shapes,
    }))
}

pub fn markdown(r: &Value) -> String {
    let mut md = format!(
        "## Node training throughput (CPU)\n\nherd-node's LoRA trainer (`herd-node bench-train`) against \
         PyTorch + PEFT (`bench/peft_baseline.py`): the same torch 2.11 kernels, {} threads, random \
         weights and tokens, LoRA rank 8 on q/k/v/o with A frozen (as the node trains), AdamW, \
         clipping; one untimed step first, best of {REPS} alternating runs. Target: herd ≥ 1.2× PEFT.\n\n",
        r["threads"]
    );
    if let Some(why) = r["peft_skipped"].as_str() {
        let _ = writeln!(md, "PEFT baseline skipped: {why}\n");
    }
    md.push_str("| shape | seq × batch | herd tokens/s | PEFT tokens/s | herd / PEFT |\n|---|---|---|---|---|\n");
    for s in r["shapes"].as_array().into_iter().flatten() {
        let peft = s["peft_tokens_per_second"].as_f64();
        let _ = writeln!(
            md,
            "| {} | {} × {} | {:.0} | {} | {} |",
            s["shape"].as_str().unwrap_or("?"),
            s["seq"],
            s["batch"],
            num(&s["herd_tokens_per_second"]),
            peft.map_or("skipped".into(), |p| format!("{p:.0}")),
            s["herd_vs_peft"]
                .as_f64()
                .map_or("—".into(), |x| format!("{x:.2}×")),
        );
    }
    md
}
