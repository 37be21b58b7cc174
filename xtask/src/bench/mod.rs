//! `cargo xtask bench`: benchmarks, each side by side with what it is compared to, run in one
//! go so the figures share the machine's state; results go to `bench/results.json`,
//! `bench/RESULTS.md`, `bench/codecs.png` and `bench/codecs-smollm2.png`.
//!
//! - train: the node's LoRA training tokens/s against PyTorch + PEFT (bench/peft_baseline.py).
//! - codecs: bytes per delta and held-out loss of the demo at several codec settings.
//! - scale: the coordinator with 100, 1,000 and 10,000 simulated peers.
//! - checks: verification by check leases: the demo's coordinator share and honest checks
//!   across thread counts, and simulated lying checkers and colluding pairs at scale.
//! - transfer: a 64 MiB blob between two nodes over libp2p TCP and QUIC against plain TCP.
//! - abuse: the open network's defences under attack (hoarder and Sybils, stalled frames, a
//!   connection flood, identity churn, admission cost), by `herd-abuse`.
//! - real: SmolLM2-135M-Instruct (`cargo xtask fetch-model`): training against PEFT and
//!   generation against transformers on the real weights and data, a codec sweep and 3 nodes
//!   vs 1 rehearsed in one process, and the demo's network run with its time per round.
//! - gpu: folded in from bench/gpu/run.sh's output (`--gpu-results`); needs a GPU machine.

mod abuse;
mod checks;
mod codecs;
mod gpu;
mod plot;
mod real;
mod scale;
mod train;
mod transfer;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value};

use crate::util;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Only these benchmarks (comma-separated); the others keep their last figures.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Bench>,
    /// JSON lines written by bench/gpu/run.sh on a GPU machine, to fold into the results.
    #[arg(long)]
    gpu_results: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Bench {
    Train,
    Codecs,
    Scale,
    Checks,
    Transfer,
    Abuse,
    Real,
    Gpu,
}

const ALL: [Bench; 8] = [
    Bench::Train,
    Bench::Codecs,
    Bench::Scale,
    Bench::Checks,
    Bench::Transfer,
    Bench::Abuse,
    Bench::Real,
    Bench::Gpu,
];

impl Bench {
    fn key(self) -> &'static str {
        match self {
            Bench::Train => "node_training",
            Bench::Codecs => "upload_vs_learning",
            Bench::Scale => "coordinator_scale",
            Bench::Checks => "checks",
            Bench::Transfer => "transfer",
            Bench::Abuse => "abuse",
            Bench::Real => "real_model",
            Bench::Gpu => "gpu",
        }
    }

    fn measure(self, root: &Path, args: &BenchArgs) -> Result<Value> {
        match self {
            Bench::Train => train::measure(root),
            Bench::Codecs => codecs::measure(root),
            Bench::Scale => scale::measure(root),
            Bench::Checks => checks::measure(root),
            Bench::Transfer => transfer::measure(root),
            Bench::Abuse => abuse::measure(root),
            Bench::Real => real::measure(root),
            Bench::Gpu => gpu::measure(args.gpu_results.as_deref()),
        }
    }

    fn markdown(self, results: &Value) -> String {
        match self {
            Bench::Train => train::markdown(results),
            Bench::Codecs => codecs::markdown(results),
            Bench::Scale => scale::markdown(results),
            Bench::Checks => checks::markdown(results),
            Bench::Transfer => transfer::markdown(results),
            Bench::Abuse => abuse::markdown(results),
            Bench::Real => real::markdown(results),
            Bench::Gpu => gpu::markdown(results),
        }
    }
}

pub fn run(root: &Path, args: BenchArgs) -> Result<()> {
    util::build_bins(root)?;
    let out = root.join("bench");
    let json_path = out.join("results.json");
    // Figures of benchmarks not run this time stay as they were (GPU ones come from elsewhere).
    let mut results: Map<String, Value> = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let chosen: Vec<Bench> = if args.only.is_empty() {
        ALL.to_vec()
    } else {
        args.only.clone()
    };
    for bench in chosen {
        let gpu_kept = bench == Bench::Gpu
            && args.gpu_results.is_none()
            && results
                .get(bench.key())
                .is_some_and(|v| v.get("skipped").is_none());
        if gpu_kept {
            println!("bench gpu: keeping the figures folded in earlier");
            continue;
        }
        let figures = bench
            .measure(root, &args)
            .with_context(|| format!("benchmark {}", bench.key()))?;
        results.insert(bench.key().into(), figures);
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)? + "\n")?;
    let results = Value::Object(results);
    let mut md = String::from(
        "# Benchmarks\n\nWritten by `cargo xtask bench` (`--only NAME` reruns one and keeps the others); \
         every comparison in a table was measured side by side in the same run.\n",
    );
    for bench in ALL {
        if let Some(section) = results.get(bench.key()) {
            md.push('\n');
            md.push_str(&bench.markdown(section));
        }
    }
    std::fs::write(out.join("RESULTS.md"), md)?;
    let plots = [
        (
            results.get(Bench::Codecs.key()),
            "codecs.png",
            "Held-out loss vs bytes uploaded (demo: 3 nodes, 80 rounds)",
            // The first rounds (loss 7 → 1.5) look alike for every codec.
            1.5,
        ),
        (
            results
                .get(Bench::Real.key())
                .and_then(|r| r.get("learning"))
                .and_then(|l| l.get("sweep")),
            "codecs-smollm2.png",
            "Held-out loss vs bytes uploaded (SmolLM2-135M, 3 nodes)",
            f64::INFINITY,
        ),
    ];
    for (figures, file, caption, y_top) in plots {
        let Some(figures) = figures else { continue };
        match plot::codecs(figures, &out.join(file), caption, y_top) {
            Ok(()) => println!("bench: {}", out.join(file).display()),
            Err(e) => println!("bench: no plot {file} ({e:#})"),
        }
    }
    println!("bench: {}", out.join("RESULTS.md").display());
    Ok(())
}

/// `value` as f64, NaN when absent (a figure that is missing shows as NaN, never as 0).
fn num(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}
