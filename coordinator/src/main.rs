//! `herd-coordinator`: serve a run, or ask a running coordinator how it is going.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use herd_coordinator::config::RunConfig;
use herd_coordinator::status::Status;

/// herd coordinator: rounds, verification, aggregation and checkpoints of a training run.
#[derive(Debug, Parser)]
#[command(name = "herd-coordinator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator for the run described in a config file.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print a running coordinator's status.
    Status {
        /// The coordinator's HTTP address, e.g. http://127.0.0.1:8080.
        #[arg(long)]
        url: String,
        /// The raw JSON of /v1/status.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Serve { config } => serve(config),
        Command::Status { url, json } => status(&url, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("herd-coordinator: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: PathBuf) -> Result<()> {
    let cfg = RunConfig::load(&config)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(herd_coordinator::server::serve(cfg, async {
        let _ = tokio::signal::ctrl_c().await;
    }))
}

fn status(url: &str, json: bool) -> Result<()> {
    let url = format!("{}/v1/status", url.trim_end_matches('/'));
    let body = ureq::get(&url)
        .call()
        .with_context(|| format!("cannot reach the coordinator at {url}"))?
        .body_mut()
        .read_to_string()?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let s: Status = serde_json::from_str(&body).context("unexpected /v1/status response")?;
    println!(
        "run {}: round {}/{}{}, {} peers, held-out loss {}",
        s.run,
        s.rounds_completed,
        s.rounds_total,
        if s.finished { " (finished)" } else { "" },
        s.peers.iter().filter(|p| p.connected).count(),
        s.heldout_loss
            .last()
            .map(|l| format!("{l:.4}"))
            .unwrap_or_default()
    );
    Ok(())
}
