//! `herd-node`: the contributor daemon of herd, and the local model tools it is built from
//! (`eval`, `train-local`, `generate`, `merge`). `../shared/INTERFACES.md`, beside the
//! repository, gives the exact surface. `daemon` is `herd-node run`; `commands` holds every
//! other subcommand. `docs/architecture.md` follows one lease from the daemon to the
//! coordinator and back.

mod commands;
mod config_file;
mod daemon;
mod default_world;
mod gpu_memory;
mod progress;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// herd contributor node: train a shared open model together, on your own hardware.
#[derive(Debug, Parser)]
#[command(name = "herd-node", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "HERD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Loss of a model (optionally with an adapter) on a data file.
    Eval(commands::eval::EvalArgs),
    /// Train a LoRA adapter on this machine and write it as a PEFT adapter dir.
    TrainLocal(commands::train_local::TrainLocalArgs),
    /// Greedy generation from a prompt (Alpaca template by default).
    Generate(commands::generate::GenerateArgs),
    /// Fold an adapter into its base model, writing a model dir transformers loads.
    Merge(commands::merge::MergeArgs),
    /// Check a checkpoint dir against its signed manifest (signer, files, sizes, blake3).
    VerifyCheckpoint(commands::verify_checkpoint::VerifyCheckpointArgs),
    /// Join a coordinator and contribute training until the run ends (or Ctrl-C).
    Run(daemon::RunArgs),
    /// What the daemon is doing, and what it has contributed (accepted and rejected deltas,
    /// tokens of credit), from its data dir.
    Status(commands::status::StatusArgs),
    /// Tell the daemon to hand back its shard and take no work until `resume`.
    Pause(commands::pause::PauseArgs),
    /// Let a paused daemon take work again.
    Resume(commands::pause::PauseArgs),
    /// Download a run's base model and latest checkpoint from its peers over libp2p
    /// (hash-checked, resumable), and check the checkpoint's signed manifest.
    Pull(commands::pull::PullArgs),
    /// LoRA training throughput on a random model of a given shape. Used by `cargo xtask bench`.
    #[command(hide = true)]
    BenchTrain(commands::bench_train::BenchTrainArgs),
    /// Greedy generation speed on a model dir, timed apart from loading. Used by `cargo xtask bench`.
    #[command(hide = true)]
    BenchGenerate(commands::bench_generate::BenchGenerateArgs),
    /// A blob between two nodes over libp2p TCP or QUIC, or plain TCP. Used by `cargo xtask bench`.
    #[command(hide = true)]
    BenchTransfer(commands::bench_transfer::BenchTransferArgs),
    /// Rebuild the embedded default (tiny base model + instruction data). Used by `cargo xtask make-default`.
    #[command(hide = true)]
    MakeDefault(commands::make_default::MakeDefaultArgs),
}

fn main() -> ExitCode {
    let applied = match config_file::apply(&Cli::command(), std::env::args_os().collect()) {
        Ok(applied) => applied,
        Err(err) => {
            eprintln!("herd-node: error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = match Cli::try_parse_from(&applied.args) {
        Ok(cli) => cli,
        Err(err) => {
            // A bad value from the config file: say which file, not just which flag.
            let text = err.to_string();
            if let Some((path, flags)) = &applied.from_file
                && flags.iter().any(|f| text.contains(f.as_str()))
            {
                let first = text.lines().next().unwrap_or_default();
                let first = first.trim_start_matches("error: ");
                eprintln!("herd-node: error: {}: {first}", path.display());
                return ExitCode::FAILURE;
            }
            err.exit()
        }
    };
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Eval(args) => commands::eval::run(args),
        Command::TrainLocal(args) => commands::train_local::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Merge(args) => commands::merge::run(args),
        Command::VerifyCheckpoint(args) => commands::verify_checkpoint::run(args),
        Command::Run(args) => daemon::run(args),
        Command::Pull(args) => commands::pull::run(args),
        Command::Status(args) => commands::status::run(args),
        Command::Pause(args) => commands::pause::pause(args),
        Command::Resume(args) => commands::pause::resume(args),
        Command::BenchTrain(args) => commands::bench_train::run(args),
        Command::BenchGenerate(args) => commands::bench_generate::run(args),
        Command::BenchTransfer(args) => commands::bench_transfer::run(args),
        Command::MakeDefault(args) => commands::make_default::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("herd-node: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal; log files and pipes get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
