//! GPU throughput: the node's trainer against PEFT on a GPU (bf16), measured by bench/gpu/run.sh
//! on a GPU machine with the CUDA build bench/gpu/build.sh makes; this folds in the JSON lines
//! it wrote (`cargo xtask bench --only gpu --gpu-results FILE`). Without them: skipped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::num;

pub fn measure(results: Option<&Path>) -> Result<Value> {
    let Some(path) = results else {
        println!("bench gpu: skipped (this build is CPU-only; see bench/gpu/README.md)");
        return Ok(json!({
            "skipped": "needs a GPU machine: bench/gpu/build.sh here, bench/gpu/run.sh there, \
                        then cargo xtask bench --only gpu --gpu-results FILE"
        }));
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // shape → (best herd tokens/s, best PEFT tokens/s, every run)
    let mut shapes: BTreeMap<String, (f64, Option<f64>, Vec<Value>)> = BTreeMap::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let line: Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let shape = line["shape"]
            .as_str()
            .context("a line without its shape")?
            .to_string();
        let result = line["result"].clone();
        let speed = num(&result["tokens_per_second"]);
        let entry = shapes.entry(shape).or_insert((0.0, None, Vec::new()));
        match result["impl"].as_str() {
            Some("herd") => entry.0 = entry.0.max(speed),
            Some("peft") => entry.1 = Some(entry.1.unwrap_or(0.0).max(speed)),
            other => anyhow::bail!("line {}: unknown impl {other:?}", i + 1),
        }
        entry.2.push(result);
    }
    let shapes: Vec<Value> = shapes
        .into_iter()
        .map(|(shape, (herd, peft, runs))| {
            json!({
                "shape": shape,
                "seq": runs.first().map(|r| r["seq"].clone()),
                "batch": runs.first().map(|r| r["batch"].clone()),
                "herd_tokens_per_second": herd,
                "peft_tokens_per_second": peft,
                "herd_vs_peft": peft.map(|p| herd / p),
                "runs": runs,
            })
        })
        .collect();
    Ok(json!({ "source": path, "shapes": shapes }))
}

pub fn markdown(r: &Value) -> String {
    let mut md = String::from(
        "## Node training throughput (GPU)\n\nbf16 weights, fp32 adapters, the same comparison as on CPU, \
         run by `bench/gpu/run.sh` on a GPU machine. Target: herd ≥ 1.0× PEFT.\n\n",
    );
    if let Some(why) = r["skipped"].as_str() {
        let _ = writeln!(md, "Skipped: {why}.");
        return md;
    }
    md.push_str("| shape | seq × batch | herd tokens/s | PEFT tokens/s | herd / PEFT |\n|---|---|---|---|---|\n");
    for s in r["shapes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} × {} | {:.0} | {} | {} |",
            s["shape"].as_str().unwrap_or("?"),
            s["seq"],
            s["batch"],
            num(&s["herd_tokens_per_second"]),
            s["peft_tokens_per_second"]
                .as_f64()
                .map_or("—".into(), |p| format!("{p:.0}")),
            s["herd_vs_peft"]
                .as_f64()
                .map_or("—".into(), |x| format!("{x:.2}×")),
        );
    }
    md
}
