//! `herd-node merge`: fold an adapter into its base model.

use std::path::PathBuf;

use anyhow::Result;
use herd_model::merge::merge_adapter;

#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// Base model dir.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter dir.
    #[arg(long)]
    adapter: PathBuf,
    /// Output model dir (created).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let report = merge_adapter(&args.model, &args.adapter, &args.out)?;
    println!(
        "merged {} adapted weights ({} tensors) into {}",
        report.merged_layers,
        report.tensors,
        args.out.display()
    );
    Ok(())
}
