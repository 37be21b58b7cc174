//! `herd-node generate`: greedy generation, by default inside the Alpaca prompt template.

use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;
use herd_model::data::{Record, alpaca_prompt, read_records};
use herd_model::generate::generate_greedy;
use serde_json::json;

use super::{ComputeArgs, load_with_adapter};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Template {
    /// Wrap the prompt as an Alpaca instruction (what herd's runs fine-tune for).
    Alpaca,
    /// Use the prompt as it is.
    Raw,
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The instruction (or the raw text with --template raw).
    #[arg(long, required_unless_present = "data", conflicts_with = "data")]
    prompt: Option<String>,
    /// Instead of --prompt: generate for every Alpaca record of this file and print one JSON
    /// line each, {"instruction", "input", "expected", "output"}.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The Alpaca `input` field.
    #[arg(long, default_value = "")]
    input: String,
    #[arg(long, value_enum, default_value_t = Template::Alpaca)]
    template: Template,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let (loaded, lora) = load_with_adapter(&args.model, args.adapter.as_deref(), &args.compute)?;
    let complete = |text: &str| -> Result<String> {
        let ids = loaded.tokenizer.encode(text, true)?;
        let eos = loaded.model.config().eos_id();
        let new = generate_greedy(&loaded.model, lora.as_ref(), &ids, args.max_new_tokens, eos)?;
        Ok(loaded.tokenizer.decode(&new)?)
    };
    if let Some(path) = &args.data {
        for record in read_records(path)? {
            let Record::Alpaca {
                instruction,
                input,
                output,
            } = record
            else {
                anyhow::bail!("{}: --data needs Alpaca records", path.display());
            };
            let said = complete(&alpaca_prompt(&instruction, &input))?;
            let line = json!({"instruction": instruction, "input": input, "expected": output, "output": said});
            println!("{line}");
        }
        return Ok(());
    }
    let prompt = args.prompt.unwrap_or_default();
    let text = match args.template {
        Template::Alpaca => alpaca_prompt(&prompt, &args.input),
        Template::Raw => prompt,
    };
    println!("{}", complete(&text)?);
    Ok(())
}
