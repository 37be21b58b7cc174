//! `herd-node bench-train` (hidden; run by `cargo xtask bench`): LoRA training throughput of
//! the node's own trainer, either on a model of a given shape with random weights and random
//! tokens (any shape, nothing to download) or on a real model dir and Alpaca data (variable
//! lengths, padding, the prompt masked). Its PEFT twin is bench/peft_baseline.py, which takes
//! the same arguments and does the same steps.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use herd_model::data::{Dataset, Example};
use herd_model::llama::IGNORE_INDEX;
use herd_model::lora::{Lora, LoraConfig, Target};
use herd_model::train::{LrSchedule, TrainConfig, train_lora};
use herd_model::{Llama, LlamaConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::ComputeArgs;

#[derive(Debug, clap::Args)]
pub struct BenchTrainArgs {
    /// A model config.json (HF layout) giving the shape of a random model.
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    config: Option<PathBuf>,
    /// Instead of --config: a model dir (HF layout) whose weights are trained on --data.
    #[arg(long, requires = "data")]
    model: Option<PathBuf>,
    /// With --model: Alpaca records; the first batch × (warmup + steps) are the steps' batches.
    #[arg(long, requires = "model")]
    data: Option<PathBuf>,
    /// With --model: tokens per example at most.
    #[arg(long, default_value_t = 128)]
    max_seq_len: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Share of each sequence's positions that carry loss: the rest, at its start, is prompt
    /// (label -100), as in instruction tuning. 1 = every position a target.
    #[arg(long, default_value_t = 1.0)]
    loss_fraction: f64,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first (allocator, caches, kernel selection).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 8)]
    rank: i64,
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj")]
    targets: String,
    /// Train A as well as B (the node trains B only).
    #[arg(long)]
    train_a: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(args: BenchTrainArgs) -> Result<()> {
    ensure!(
        args.steps > 0 && args.batch > 0 && args.seq > 1,
        "--steps and --batch must be positive and --seq above 1"
    );
    ensure!(
        args.loss_fraction > 0.0 && args.loss_fraction <= 1.0,
        "--loss-fraction must be in (0, 1]"
    );
    let device = args.compute.apply()?;
    tch::manual_seed(args.seed as i64);
    let (model, data) = match (&args.config, &args.model, &args.data) {
        (Some(config), _, _) => random_model_and_tokens(&args, config, device)?,
        (None, Some(model), Some(data)) => real_model_and_data(&args, model, data, device)?,
        _ => anyhow::bail!("give --config, or --model with --data"),
    };
    let lora = Lora::new(
        model.config(),
        LoraConfig {
            rank: args.rank,
            alpha: 2.0 * args.rank as f64,
            targets: Target::parse_list(&args.targets)?,
            train_a: args.train_a,
            use_rslora: false,
            init_seed: args.seed,
        },
        device,
    )?;
    let train = TrainConfig {
        steps: args.warmup + args.steps,
        batch_size: args.batch,
        lr: 1e-3,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        seed: args.seed,
        schedule: LrSchedule::Constant,
        measure_loss: false,
    };
    let indices: Vec<usize> = (0..data.len()).collect();
    // Each step ends by reading its loss back, so a step's end is its end on a GPU too.
    let mut timed_from = Instant::now();
    let mut timed_tokens = 0usize;
    train_lora(&model, &lora, &data, &indices, &train, |s| {
        if s.step + 1 == args.warmup {
            timed_from = Instant::now();
        } else if s.step >= args.warmup {
            timed_tokens += s.tokens;
        }
    })?;
    let seconds = timed_from.elapsed().as_secs_f64();
    let real = args.model.is_some();
    println!(
        "{}",
        json!({
            "impl": "herd",
            "device": format!("{device:?}"),
            "threads": tch::get_num_threads(),
            "data": if real { "real" } else { "random" },
            "seq": if real { json!(null) } else { json!(args.seq) },
            "batch": args.batch,
            "loss_fraction": args.loss_fraction,
            "steps": args.steps,
            "train_a": args.train_a,
            "tokens": timed_tokens,
            "seconds": seconds,
            "tokens_per_second": timed_tokens as f64 / seconds.max(1e-9),
        })
    );
    Ok(())
}

/// A random model of `config`'s shape and `batch × (warmup + steps)` sequences of random
/// tokens: the same work per step as text of that length. The first positions of each carry
/// no loss as `--loss-fraction` says (bench/peft_baseline.py masks the same ones).
fn random_model_and_tokens(
    args: &BenchTrainArgs,
    config: &Path,
    device: tch::Device,
) -> Result<(Llama, Dataset)> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let cfg = LlamaConfig::from_json(&text, config)?;
    ensure!(
        args.seq as i64 <= cfg.max_position_embeddings,
        "--seq {} is longer than the model's context ({})",
        args.seq,
        cfg.max_position_embeddings
    );
    let vocab = cfg.vocab_size;
    let model = Llama::random(cfg, device, 0.02)?;
    let prompt = prompt_len(args.seq, args.loss_fraction);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let examples = (0..args.batch * (args.warmup + args.steps))
        .map(|_| {
            let ids: Vec<i64> = (0..args.seq).map(|_| rng.random_range(0..vocab)).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| if i < prompt { IGNORE_INDEX } else { id })
                .collect();
            Example { ids, labels }
        })
        .collect();
    let data = Dataset {
        path: PathBuf::from("random tokens"),
        examples,
    };
    Ok((model, data))
}

/// A real model and the first `batch × (warmup + steps)` examples of an Alpaca file,
/// tokenized as a node would (prompt masked, EOS appended, cut at `--max-seq-len`).
fn real_model_and_data(
    args: &BenchTrainArgs,
    model: &Path,
    data: &Path,
    device: tch::Device,
) -> Result<(Llama, Dataset)> {
    let loaded = super::load_model(model, device)?;
    let mut data = Dataset::for_model(
        data,
        &loaded.tokenizer,
        loaded.model.config(),
        Some(args.max_seq_len),
    )?;
    let needed = args.batch * (args.warmup + args.steps);
    ensure!(
        data.len() >= needed,
        "{} has {} examples; {needed} are needed",
        data.path.display(),
        data.len()
    );
    data.examples.truncate(needed);
    Ok((loaded.model, data))
}

/// Masked prompt positions at the start of a `seq`-token sequence where `loss_fraction` of the
/// positions carry loss; bench/peft_baseline.py computes the same (`seq - round(seq * f)`).
fn prompt_len(seq: usize, loss_fraction: f64) -> usize {
    seq - (seq as f64 * loss_fraction).round() as usize
}
