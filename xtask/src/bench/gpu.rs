//! GPU throughput: the node's trainer against PEFT on a GPU (bf16), measured by bench/gpu/run.sh
//! on a GPU machine with the CUDA build bench/gpu/build.sh makes; this folds in the JSON lines
//! it wrote (`cargo xtask bench --only gpu --gpu-results FILE`). Without them: skipped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::train::SIDES;

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
    // (shape, loss fraction) → its runs, in the order they ran
    let mut shapes: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let line: Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let shape = line["shape"]
            .as_str()
            .context("a line without its shape")?
            .to_string();
        let mut result = line["result"].clone();
        let side = match (result["impl"].as_str(), result["train_a"].as_bool()) {
            (Some("herd"), _) => 0,
            (Some("peft"), Some(false)) => 1,
            (Some("peft"), Some(true)) => 2,
            other => anyhow::bail!("line {}: unknown side {other:?}", i + 1),
        };
        result["side"] = json!(SIDES[side].key());
        let loss_fraction = result["loss_fraction"].as_f64().unwrap_or(1.0).to_string();
        shapes
            .entry((shape, loss_fraction))
            .or_default()
            .push(result);
    }
    let shapes: Vec<Value> = shapes
        .into_iter()
        .map(|((shape, _), runs)| {
            let first = runs.first().cloned().unwrap_or_default();
            super::train::shape_figures(
                &shape,
                first["seq"].clone(),
                first["batch"].clone(),
                first["loss_fraction"].as_f64().unwrap_or(1.0),
                runs,
            )
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
