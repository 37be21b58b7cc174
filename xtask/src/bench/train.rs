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

/// A model shape to measure at a CPU-sized batch, with the share of positions carrying loss.
struct Shape {
    name: &'static str,
    config: &'static str,
    seq: u32,
    batch: u32,
    steps: u32,
    loss_fraction: f64,
}

const EMBEDDED: Shape = Shape {
    name: "embedded default",
    config: "model/default/base/config.json",
    seq: 128,
    batch: 16,
    steps: 10,
    loss_fraction: 1.0,
};
const SMOLLM: Shape = Shape {
    name: "SmolLM-135M shape",
    config: "bench/shapes/smollm-135m.json",
    seq: 128,
    batch: 4,
    steps: 3,
    loss_fraction: 1.0,
};
/// Instruction tuning: an Alpaca example's prompt (the template's ~40 tokens, the instruction
/// and its input) is about as long as its response, and only the response carries loss.
const INSTRUCTION_LOSS_FRACTION: f64 = 0.5;

/// Each shape with every position a target (language modelling), then with the prompt half
/// masked (instruction tuning, herd's typical run).
const SHAPES: [Shape; 4] = [
    EMBEDDED,
    Shape {
        loss_fraction: INSTRUCTION_LOSS_FRACTION,
        ..EMBEDDED
    },
    SMOLLM,
    Shape {
        loss_fraction: INSTRUCTION_LOSS_FRACTION,
        ..SMOLLM
    },
];
/// Runs of each, alternating herd and PEFT; the best counts (the machine is shared and noisy),
/// and so does the median ratio of runs side by side.
const REPS: usize = 5;
/// What bench/peft_baseline.py exits with when its Python packages are missing.
const PEFT_MISSING: i32 = 3;

/// The sides compared, in the order each round of runs takes them.
pub const SIDES: [Side; 3] = [Side::Herd, Side::PeftSameWork, Side::PeftDefault];

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Side {
    /// herd-node's trainer as a node runs it: B trained, A frozen at its seeded init.
    Herd,
    /// PEFT doing the same work: A frozen too.
    PeftSameWork,
    /// PEFT as a user would run it instead: A and B trained.
    PeftDefault,
}

impl Side {
    /// How a run names its side in the results (`"side"`).
    pub fn key(self) -> &'static str {
        match self {
            Side::Herd => "herd",
            Side::PeftSameWork => "peft_a_frozen",
            Side::PeftDefault => "peft_default",
        }
    }
}

pub fn measure(root: &Path) -> Result<Value> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let python = crate::python_env::reference_python(root);
    println!(
        "bench train: herd-node's LoRA trainer vs PyTorch + PEFT ({python}), {threads} threads, CPU"
    );
    let mut peft_skipped: Option<String> = None;
    let mut shapes = Vec::new();
    for shape in &SHAPES {
        let args: Vec<String> = vec![
            "--config".into(),
            root.join(shape.config).display().to_string(),
            "--seq".into(),
            shape.seq.to_string(),
            "--batch".into(),
            shape.batch.to_string(),
            "--steps".into(),
            shape.steps.to_string(),
            "--loss-fraction".into(),
            shape.loss_fraction.to_string(),
        ];
        let label = format!(
            "{}, loss on {:.0}%",
            shape.name,
            shape.loss_fraction * 100.0
        );
        let runs = side_by_side(root, &python, &args, &label, REPS, &mut peft_skipped)?;
        let mut figures = shape_figures(
            shape.name,
            json!(shape.seq),
            json!(shape.batch),
            shape.loss_fraction,
            runs,
        );
        figures["config"] = json!(shape.config);
        shapes.push(figures);
    }
    Ok(json!({
        "device": "cpu",
        "threads": threads,
        "peft_skipped": peft_skipped,
        "shapes": shapes,
    }))
}

/// `reps` rounds of herd-node bench-train and bench/peft_baseline.py with `args` (and the
/// threads and device of this machine), one run of each side per round; the runs, each with
/// its `"side"`. The first time PEFT's packages are missing, `peft_skipped` says why and the
/// PEFT sides are left out from then on.
pub fn side_by_side(
    root: &Path,
    python: &str,
    args: &[String],
    label: &str,
    reps: usize,
    peft_skipped: &mut Option<String>,
) -> Result<Vec<Value>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut runs = Vec::new();
    for rep in 0..reps {
        for side in &SIDES {
            let mut cmd = match side {
                Side::Herd => {
                    let mut c = util::bin(root, "herd-node");
                    c.arg("bench-train").env("HERD_LOG", "warn");
                    c
                }
                _ if peft_skipped.is_some() => continue,
                _ => {
                    let mut c = Command::new(python);
                    c.arg(root.join("bench/peft_baseline.py"));
                    if *side == Side::PeftDefault {
                        c.arg("--train-a");
                    }
                    c
                }
            };
            cmd.args(args)
                .args(["--warmup", "1", "--threads", &threads.to_string()])
                .args(["--device", "cpu"]);
            let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            match out.status.code() {
                Some(0) => {}
                Some(PEFT_MISSING) if *side != Side::Herd => {
                    let why = stderr.trim().to_string();
                    println!("  PEFT baseline skipped: {why}");
                    *peft_skipped = Some(why);
                    continue;
                }
                _ => bail!("{cmd:?} failed ({}):\n{stderr}", out.status),
            }
            let mut run: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())
                .with_context(|| format!("{cmd:?} printed no JSON"))?;
            let speed = num(&run["tokens_per_second"]);
            println!(
                "  {label}, run {}: {:<13} {speed:>8.0} tokens/s",
                rep + 1,
                side.key()
            );
            run["side"] = json!(side.key());
            runs.push(run);
        }
    }
    Ok(runs)
}

pub fn markdown(r: &Value) -> String {
    let mut md = format!(
        "## Node training throughput (CPU)\n\nherd-node's LoRA trainer (`herd-node bench-train`) against \
         PyTorch + PEFT (`bench/peft_baseline.py`): the same torch 2.11 kernels, {} threads, random \
         weights and tokens, LoRA rank 8 on q/k/v/o, AdamW, clipping; one untimed step first, best \
         of {REPS} alternating runs. herd trains B with A frozen at its seeded init (what makes \
         averaging exact); PEFT is measured both doing that same work and as a user would run it \
         (A and B trained). *Loss on*: the share of each sequence's positions that carry loss — \
         all of them as in language modelling, or half, the rest masked as a prompt as in \
         instruction tuning (herd computes the LM head and softmax only where there is loss; \
         transformers computes every position's logits). Target: herd ≥ 1.2× PEFT.\n\n",
        r["threads"]
    );
    if let Some(why) = r["peft_skipped"].as_str() {
        let _ = writeln!(md, "PEFT baseline skipped: {why}\n");
    }
    md.push_str(&table(&r["shapes"]));
    md.push_str(
        "\nRun beside run (herd's run against the PEFT runs of the same round, the median over \
         the rounds; less at the mercy of the machine's slow moments than the best of each):\n\n\
         | shape | loss on | herd / PEFT, A frozen | herd / PEFT default |\n|---|---|---|---|\n",
    );
    for s in r["shapes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {:.0}% | {} | {} |",
            s["shape"].as_str().unwrap_or("?"),
            loss_percent(s),
            ratio_cell(&s["herd_vs_peft_a_frozen_paired_median"]),
            ratio_cell(&s["herd_vs_peft_default_paired_median"]),
        );
    }
    md
}

/// The median of `herd[i] / peft[i]`: each run against the PEFT run beside it, which shares
/// the machine's moment better than the best of each side does. `None` without PEFT runs.
fn paired_median(herd: &[f64], peft: &[f64]) -> Option<f64> {
    let mut ratios: Vec<f64> = herd.iter().zip(peft).map(|(h, p)| h / p).collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    let mid = ratios.len() / 2;
    Some(if ratios.len() % 2 == 1 {
        ratios[mid]
    } else {
        (ratios[mid - 1] + ratios[mid]) / 2.0
    })
}

/// One shape's figures from its runs (each carrying its `"side"`, in the order they ran): the
/// best tokens/s of each side (herd, PEFT with A frozen, PEFT's default; `None` where
/// skipped), herd's ratio to each PEFT side, best to best and run beside run, and every run.
pub fn shape_figures(
    shape: &str,
    seq: Value,
    batch: Value,
    loss_fraction: f64,
    runs: Vec<Value>,
) -> Value {
    let [herd, same_work, default] = SIDES.map(|side| {
        runs.iter()
            .filter(|r| r["side"] == side.key())
            .map(|r| num(&r["tokens_per_second"]))
            .collect::<Vec<f64>>()
    });
    let best = |speeds: &[f64]| speeds.iter().copied().reduce(f64::max);
    let herd_best = best(&herd).unwrap_or(f64::NAN);
    json!({
        "shape": shape,
        "seq": seq,
        "batch": batch,
        "loss_fraction": loss_fraction,
        "herd_tokens_per_second": herd_best,
        "peft_a_frozen_tokens_per_second": best(&same_work),
        "peft_default_tokens_per_second": best(&default),
        "herd_vs_peft_a_frozen": best(&same_work).map(|p| herd_best / p),
        "herd_vs_peft_default": best(&default).map(|p| herd_best / p),
        "herd_vs_peft_a_frozen_paired_median": paired_median(&herd, &same_work),
        "herd_vs_peft_default_paired_median": paired_median(&herd, &default),
        "runs": runs,
    })
}

/// A ratio as a table cell; "—" where there is none.
fn ratio_cell(v: &Value) -> String {
    v.as_f64().map_or("—".into(), |x| format!("{x:.2}×"))
}

/// The share of positions carrying loss, in percent (a record without `loss_fraction` counts
/// every position as a target).
fn loss_percent(shape: &Value) -> f64 {
    shape["loss_fraction"].as_f64().unwrap_or(1.0) * 100.0
}

/// The throughput table of `shapes` (also the GPU section's).
pub fn table(shapes: &Value) -> String {
    let mut md = String::from(
        "| shape | seq × batch | loss on | herd tokens/s | PEFT, A frozen | herd / it | PEFT default | herd / it |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let speed = |v: &Value| v.as_f64().map_or("skipped".into(), |p| format!("{p:.0}"));
    for s in shapes.as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} × {} | {:.0}% | {:.0} | {} | {} | {} | {} |",
            s["shape"].as_str().unwrap_or("?"),
            s["seq"],
            s["batch"],
            loss_percent(s),
            num(&s["herd_tokens_per_second"]),
            speed(&s["peft_a_frozen_tokens_per_second"]),
            ratio_cell(&s["herd_vs_peft_a_frozen"]),
            speed(&s["peft_default_tokens_per_second"]),
            ratio_cell(&s["herd_vs_peft_default"]),
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_come_from_the_runs_side_by_side() {
        let run = |side: Side, speed: f64| json!({"side": side.key(), "tokens_per_second": speed});
        // Three rounds; the machine is slow in the second for both sides.
        let runs = vec![
            run(Side::Herd, 120.0),
            run(Side::PeftSameWork, 100.0),
            run(Side::Herd, 60.0),
            run(Side::PeftSameWork, 40.0),
            run(Side::Herd, 110.0),
            run(Side::PeftSameWork, 125.0),
        ];
        let f = shape_figures("s", json!(128), json!(4), 0.5, runs);
        assert_eq!(f["herd_tokens_per_second"], json!(120.0));
        assert_eq!(f["peft_a_frozen_tokens_per_second"], json!(125.0));
        assert_eq!(f["herd_vs_peft_a_frozen"], json!(120.0 / 125.0));
        // Ratios 1.2, 1.5, 0.88: the median is 1.2.
        assert_eq!(f["herd_vs_peft_a_frozen_paired_median"], json!(1.2));
        // No PEFT default runs: skipped, not zero.
        assert_eq!(f["peft_default_tokens_per_second"], Value::Null);
        assert_eq!(f["herd_vs_peft_default_paired_median"], Value::Null);
        assert_eq!(f["loss_fraction"], json!(0.5));
    }
}
