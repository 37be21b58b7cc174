//! `herd-node eval`: token-weighted mean loss of a model (and adapter) on a data file.

use std::path::PathBuf;

use anyhow::Result;
use herd_model::eval::evaluate;

use super::{ComputeArgs, load_data, load_with_adapter};

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Base model dir (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter dir to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL (or JSON array) of {"text"} or Alpaca records.
    #[arg(long)]
    data: PathBuf,
    /// Print one JSON line: {"loss": .., "tokens": .., "sequences": ..}.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Cap on tokens per sequence (default: the model's context).
    #[arg(long)]
    max_seq_len: Option<usize>,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let (loaded, lora) = load_with_adapter(&args.model, args.adapter.as_deref(), &args.compute)?;
    let data = load_data(&loaded, &args.data, args.max_seq_len)?;
    let examples: Vec<_> = data.examples.iter().collect();
    let report = evaluate(&loaded.model, lora.as_ref(), &examples, args.batch_size)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "loss {:.6} over {} tokens ({} sequences)",
            report.loss, report.tokens, report.sequences
        );
    }
    Ok(())
}
