//! `herd-node train-local`: LoRA fine-tuning on this machine, written as a PEFT adapter dir.

use std::path::PathBuf;

use anyhow::{Context, Result};
use herd_model::eval::evaluate;
use herd_model::lora::{Lora, LoraConfig, Target};
use herd_model::peft::save_adapter;
use herd_model::train::{LrSchedule, TrainConfig, train_lora};
use serde_json::json;

use super::{ComputeArgs, load_data, load_model};
use crate::progress::StepProgress;

#[derive(Debug, clap::Args)]
pub struct TrainLocalArgs {
    /// Base model dir (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Training data: JSONL (or JSON array) of {"text"} or Alpaca records.
    #[arg(long)]
    data: PathBuf,
    /// Output adapter dir (PEFT layout).
    #[arg(long)]
    out: PathBuf,
    /// Held-out data to report loss on before and after.
    #[arg(long)]
    heldout: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    rank: i64,
    /// lora_alpha; updates are scaled by alpha / r.
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Comma-separated target modules.
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj")]
    targets: String,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Train A as well as B (by default A stays at its seeded init, which keeps averaging exact).
    #[arg(long)]
    train_a: bool,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this before each step.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Cap on tokens per sequence (default: the model's context).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Print the report as one JSON line on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(args: TrainLocalArgs) -> Result<()> {
    let device = args.compute.apply()?;
    let loaded = load_model(&args.model, device)?;
    let data = load_data(&loaded, &args.data, args.max_seq_len)?;
    let heldout = args
        .heldout
        .as_deref()
        .map(|p| load_data(&loaded, p, args.max_seq_len))
        .transpose()?;
    let lora_cfg = LoraConfig {
        rank: args.rank,
        alpha: args.alpha,
        targets: Target::parse_list(&args.targets)?,
        train_a: args.train_a,
        use_rslora: false,
        init_seed: args.seed,
    };
    let lora = Lora::new(loaded.model.config(), lora_cfg, device)?;
    let heldout_loss = |lora: &Lora| -> Result<Option<f64>> {
        heldout
            .as_ref()
            .map(|h| {
                let ex: Vec<_> = h.examples.iter().collect();
                Ok(evaluate(&loaded.model, Some(lora), &ex, 32)?.loss)
            })
            .transpose()
    };
    let heldout_before = heldout_loss(&lora)?;
    let cfg = TrainConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        seed: args.seed,
        schedule: LrSchedule::Constant,
        measure_loss: true,
    };
    tracing::info!(examples = data.len(), steps = cfg.steps, device = ?device, "training LoRA");
    let started = std::time::Instant::now();
    let mut progress = StepProgress::new(cfg.steps, "train");
    let indices: Vec<usize> = (0..data.len()).collect();
    let report = train_lora(&loaded.model, &lora, &data, &indices, &cfg, |s| {
        progress.step(s.step, s.loss, s.tokens)
    })?;
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    let heldout_after = heldout_loss(&lora)?;
    let base_name = args.model.display().to_string();
    save_adapter(&args.out, &lora, Some(&base_name))
        .with_context(|| format!("writing the adapter to {}", args.out.display()))?;
    let summary = json!({
        "adapter": args.out,
        "train_loss_before": report.loss_before,
        "train_loss_after": report.loss_after,
        "heldout_loss_before": heldout_before,
        "heldout_loss_after": heldout_after,
        "tokens": report.tokens,
        "steps": cfg.steps,
        "seconds": seconds,
        "tokens_per_s": report.tokens as f64 / seconds.max(1e-9),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "train loss {:.4} -> {:.4}{}; {} tokens in {:.1}s; adapter written to {}",
            report.loss_before,
            report.loss_after,
            match (heldout_before, heldout_after) {
                (Some(b), Some(a)) => format!("; held-out loss {b:.4} -> {a:.4}"),
                _ => String::new(),
            },
            report.tokens,
            seconds,
            args.out.display()
        );
    }
    Ok(())
}
