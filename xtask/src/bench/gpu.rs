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
    // (shape, loss fraction) → best tokens/s of herd, PEFT with A frozen, PEFT default; and
    // every run
    type Sides = ([Option<f64>; 3], Vec<Value>);
    let mut shapes: BTreeMap<(String, String), Sides> = BTreeMap::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let line: Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let shape = line["shape"]
            .as_str()
            .context("a line without its shape")?
            .to_string();
        let result = line["result"].clone();
        let side = match (result["impl"].as_str(), result["train_a"].as_bool()) {
            (Some("herd"), _) => 0,
            (Some("peft"), Some(false)) => 1,
            (Some("peft"), Some(true)) => 2,
            other => anyhow::bail!("line {}: unknown side {other:?}", i + 1),
        };
        let loss_fraction = result["loss_fraction"].as_f64().unwrap_or(1.0).to_string();
        let entry = shapes.entry((shape, loss_fraction)).or_default();
        let speed = num(&result["tokens_per_second"]);
        entry.0[side] = Some(entry.0[side].unwrap_or(0.0).max(speed));
        entry.1.push(result);
    }
    let shapes: Vec<Value> = shapes
        .into_iter()
        .map(|((shape, _), (best, runs))| {
            let first = runs.first().cloned().unwrap_or_default();
            let mut figures = super::train::shape_figures(
                &shape,
                first["seq"].clone(),
                first["batch"].clone(),
                best,
                runs,
            );
            figures["loss_fraction"] = json!(first["loss_fraction"].as_f64().unwrap_or(1.0));
            figures
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
    md.push_str(&super::train::table(&r["shapes"]));
    md
}
