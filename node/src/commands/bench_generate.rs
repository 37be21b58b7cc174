//! `herd-node bench-generate` (hidden; run by `cargo xtask bench`): greedy generation speed
//! on a model dir for the Alpaca records of a data file, timed apart from loading. Its
//! transformers twin is bench/generate_baseline.py; both print the tokens they generated, so
//! the benchmark also says whether the outputs are identical.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail, ensure};
use herd_model::data::{Record, alpaca_prompt, read_records};
use herd_model::generate::{generate_greedy, generate_greedy_uncached};
use serde_json::json;

use super::{ComputeArgs, load_with_adapter};

#[derive(Debug, clap::Args)]
pub struct BenchGenerateArgs {
    #[arg(long)]
    model: PathBuf,
    /// Alpaca records; their instructions (in the Alpaca template) are the prompts.
    #[arg(long)]
    data: PathBuf,
    /// Prompts used, from the start of the file.
    #[arg(long, default_value_t = 8)]
    limit: usize,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Re-run the whole prefix for every token (no KV cache): the path before the cache.
    #[arg(long)]
    uncached: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(args: BenchGenerateArgs) -> Result<()> {
    ensure!(args.limit > 0, "--limit must be positive");
    let started = Instant::now();
    let (loaded, _) = load_with_adapter(&args.model, None, &args.compute)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let mut prompts = Vec::new();
    for record in read_records(&args.data)?.into_iter().take(args.limit) {
        let Record::Alpaca {
            instruction, input, ..
        } = record
        else {
            bail!(
                "{}: bench-generate needs Alpaca records",
                args.data.display()
            );
        };
        prompts.push(
            loaded
                .tokenizer
                .encode(&alpaca_prompt(&instruction, &input), true)?,
        );
    }
    let eos = loaded.model.config().eos_id();
    let generate = if args.uncached {
        generate_greedy_uncached
    } else {
        generate_greedy
    };
    let timed = Instant::now();
    let mut outputs = Vec::new();
    for prompt in &prompts {
        outputs.push(generate(
            &loaded.model,
            None,
            prompt,
            args.max_new_tokens,
            eos,
        )?);
    }
    let seconds = timed.elapsed().as_secs_f64();
    let new_tokens: usize = outputs.iter().map(Vec::len).sum();
    println!(
        "{}",
        json!({
            "impl": if args.uncached { "herd_uncached" } else { "herd" },
            "threads": tch::get_num_threads(),
            "prompts": prompts.len(),
            "new_tokens": new_tokens,
            "seconds": seconds,
            "tokens_per_second": new_tokens as f64 / seconds.max(1e-9),
            "load_seconds": load_seconds,
            "outputs": outputs,
        })
    );
    Ok(())
}
