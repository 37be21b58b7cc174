//! `cargo xtask demo`: the main job on the embedded default. Until the network exists this is
//! local LoRA fine-tuning through the real `herd-node` binary: held-out loss before and after,
//! a sample generation before and after, and `summary.json` in a run folder.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde_json::{Value, json};

use crate::{libtorch, util};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Base model dir (HF layout).
    #[arg(long, default_value = "model/default/base")]
    model: PathBuf,
    /// Alpaca training data.
    #[arg(long, default_value = "model/default/data/train.jsonl")]
    data: PathBuf,
    /// Held-out data.
    #[arg(long, default_value = "model/default/data/heldout.jsonl")]
    heldout: PathBuf,
    #[arg(long, default_value_t = 600)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Where run folders go.
    #[arg(long, default_value = "runs")]
    runs: PathBuf,
}

pub fn run(root: &Path, args: DemoArgs) -> Result<()> {
    libtorch::setup(root, false)?;
    util::cargo(&["build", "-p", "herd-node"])?;
    let started = Instant::now();
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let run_dir = root.join(&args.runs).join(format!("demo-{stamp}"));
    std::fs::create_dir_all(&run_dir)?;
    let adapter = run_dir.join("adapter");
    let node = |sub: &str| {
        let mut cmd = util::bin(root, "herd-node");
        cmd.arg(sub).arg("--model").arg(&args.model);
        cmd
    };
    let eval = |adapter: Option<&Path>| -> Result<Value> {
        let mut cmd = node("eval");
        cmd.arg("--data").arg(&args.heldout).arg("--json");
        if let Some(a) = adapter {
            cmd.arg("--adapter").arg(a);
        }
        Ok(serde_json::from_str(util::output(&mut cmd)?.trim())?)
    };
    // Greedy answers to every held-out instruction, one JSON line each.
    let answers = |adapter: Option<&Path>| -> Result<Vec<Value>> {
        let mut cmd = node("generate");
        cmd.arg("--data")
            .arg(&args.heldout)
            .args(["--max-new-tokens", "12"]);
        if let Some(a) = adapter {
            cmd.arg("--adapter").arg(a);
        }
        util::output(&mut cmd)?
            .lines()
            .map(|l| Ok(serde_json::from_str(l)?))
            .collect()
    };
    let exact = |answers: &[Value]| {
        answers
            .iter()
            .filter(|a| a["output"] == a["expected"])
            .count()
    };

    println!("herd demo: LoRA fine-tuning of the embedded tiny LLaMA on its instruction task");
    println!("run folder: {}", run_dir.display());
    let before = eval(None)?;
    let said_before = answers(None)?;
    let mut train = node("train-local");
    train
        .arg("--data")
        .arg(&args.data)
        .arg("--heldout")
        .arg(&args.heldout)
        .arg("--out")
        .arg(&adapter)
        .args([
            "--steps",
            &args.steps.to_string(),
            "--lr",
            &args.lr.to_string(),
        ])
        .args(["--batch-size", &args.batch_size.to_string(), "--json"]);
    let report: Value = serde_json::from_str(util::output(&mut train)?.trim())?;
    let after = eval(Some(&adapter))?;
    let said_after = answers(Some(&adapter))?;

    let (loss0, loss1) = (
        before["loss"].as_f64().unwrap_or(f64::NAN),
        after["loss"].as_f64().unwrap_or(f64::NAN),
    );
    println!("held-out loss before: {loss0:.4}");
    println!(
        "held-out loss after:  {loss1:.4}  ({:.0}% lower)",
        100.0 * (1.0 - loss1 / loss0)
    );
    let n = said_after.len();
    println!(
        "held-out answers exactly right: {}/{n} before, {}/{n} after",
        exact(&said_before),
        exact(&said_after)
    );
    for (b, a) in said_before.iter().zip(&said_after).take(6) {
        println!(
            "  {} [{}]",
            a["instruction"].as_str().unwrap_or_default(),
            a["input"].as_str().unwrap_or_default()
        );
        println!(
            "      base model: {}",
            b["output"].as_str().unwrap_or_default()
        );
        println!(
            "      fine-tuned: {}",
            a["output"].as_str().unwrap_or_default()
        );
    }
    let summary = json!({
        "mode": "local",
        "heldout_loss": [loss0, loss1],
        "base_model": args.model.canonicalize().unwrap_or(args.model.clone()),
        "final_adapter": adapter,
        "train": report,
        "heldout_exact": [exact(&said_before), exact(&said_after)],
        "heldout_answers": {"before": said_before, "after": said_after},
        "seconds": started.elapsed().as_secs_f64(),
    });
    let path = run_dir.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)?;
    println!("summary: {}", path.display());
    Ok(())
}
