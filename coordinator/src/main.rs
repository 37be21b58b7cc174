//! `herd-coordinator`: serve a run, or ask a running coordinator how it is going.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use herd_coordinator::config::RunConfig;
use herd_coordinator::status::Status;
use herd_model::device::DeviceChoice;

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
    /// Train shards of a run twice (two thread counts, or CPU and CUDA) and report how far
    /// honest replays differ: the noise the replay tolerance (`[verify]` in run.toml) must allow.
    Calibrate {
        #[arg(long)]
        config: PathBuf,
        /// Shards to train twice.
        #[arg(long, default_value_t = 50)]
        replays: usize,
        /// The two thread counts compared (the replay's, then the contributor's).
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<i32>,
        /// The two devices compared (`cpu`, `cuda`, `cuda:N`), e.g. `cpu,cuda`: a CPU replay of
        /// a GPU contributor.
        #[arg(long, value_delimiter = ',', default_value = "cpu,cpu")]
        devices: Vec<DeviceChoice>,
        /// Where the figures go (JSON).
        #[arg(long, default_value = "calibration.json")]
        out: PathBuf,
    },
    /// Rehearse a run in this process: its rounds, with its quorum of nodes played in turn
    /// by the node's training code, its codec and the coordinator's averaging (no network, no
    /// verification). Prints the held-out loss per round; writes the figures as JSON.
    Rehearse {
        #[arg(long)]
        config: PathBuf,
        /// Where the figures go (JSON).
        #[arg(long, default_value = "rehearsal.json")]
        out: PathBuf,
    },
    /// Rebuild a run's adapter from θ_0 and the accepted deltas it recorded, and check that it
    /// equals the adapter the run reached, bit for bit.
    Audit {
        #[arg(long)]
        config: PathBuf,
    },
    /// Watch a running coordinator: rounds, peers, held-out loss, traffic, rejects and
    /// checkpoints, refreshed every second (q quits; it waits out coordinator restarts).
    Dashboard {
        /// The coordinator's HTTP address, e.g. http://127.0.0.1:8080.
        #[arg(long)]
        url: String,
    },
    /// Benchmark helper: simulated peers through the real round machine, codec and structure
    /// checks (no network, no training); prints a JSON report. `cargo xtask bench` runs it.
    #[command(hide = true)]
    Simulate {
        #[arg(long)]
        peers: u32,
        #[arg(long, default_value_t = 5)]
        rounds: u64,
    },
    /// Simulated forgers, lying checkers and colluding pairs against the real check book and
    /// reputation, with the default `[verify]` and `[checks]` rules; prints one JSON line.
    SimulateChecks {
        #[arg(long)]
        peers: u32,
        #[arg(long, default_value_t = 20)]
        rounds: u64,
        /// Shares of the peers that forge their deltas (once trusted), that lie when they
        /// check, and that are in colluding pairs (a forger and its accomplice).
        #[arg(long, default_value_t = 0.0)]
        forgers: f64,
        #[arg(long, default_value_t = 0.1)]
        lying_checkers: f64,
        #[arg(long, default_value_t = 0.05)]
        colluding: f64,
        /// Overrides `[verify] replay_trusted`: how often a trusted peer's delta is checked.
        #[arg(long)]
        replay_trusted: Option<f64>,
        /// Overrides `[checks] spot_rate`: the share of agreed checks the coordinator redoes.
        #[arg(long)]
        spot_rate: Option<f64>,
        /// An effect check's compute as a share of a shard's training (the demo's: 0.23).
        #[arg(long, default_value_t = 0.23)]
        effect_cost: f64,
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
        // Colours only for a person at a terminal; log files and pipes get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        Command::Serve { config } => serve(config),
        Command::Status { url, json } => status(&url, json),
        Command::Dashboard { url } => herd_coordinator::dashboard::run(&url),
        Command::Simulate { peers, rounds } => simulate(peers, rounds),
        Command::SimulateChecks {
            peers,
            rounds,
            forgers,
            lying_checkers,
            colluding,
            replay_trusted,
            spot_rate,
            effect_cost,
        } => {
            let verify = herd_coordinator::config::VerifySection {
                replay_trusted: replay_trusted
                    .unwrap_or(herd_coordinator::config::VerifySection::default().replay_trusted),
                ..Default::default()
            };
            let defaults = herd_coordinator::config::ChecksSection::default();
            let checks = herd_coordinator::config::ChecksSection {
                spot_rate: spot_rate.unwrap_or(defaults.spot_rate),
                ..defaults
            };
            let cfg = herd_coordinator::simulate::checks::CheckSimConfig {
                peers,
                rounds,
                forgers,
                lying_checkers,
                colluding,
                policy: checks.policy(
                    herd_coordinator::config::RoundSection::default().lease_secs,
                    verify.tolerance(),
                ),
                reputation: verify.reputation(),
                effect_cost,
                seed: 1,
            };
            simulate_checks(&cfg)
        }
        Command::Audit { config } => audit(&config),
        Command::Rehearse { config, out } => rehearse(&config, &out),
        Command::Calibrate {
            config,
            replays,
            threads,
            devices,
            out,
        } => calibrate(&config, replays, &threads, &devices, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("herd-coordinator: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn audit(config: &std::path::Path) -> Result<()> {
    let cfg = RunConfig::load(config)?;
    let report = herd_coordinator::store::audit::audit(&cfg)?;
    let deltas: usize = report.deltas_per_round.iter().sum();
    if !report.matches() {
        anyhow::bail!(
            "audit FAILED: {deltas} recorded deltas over {} rounds rebuild adapter {}, but the run is at {}",
            report.rounds,
            report.rebuilt,
            report.recorded
        );
    }
    println!(
        "audit: {deltas} recorded deltas over {} rounds {:?} rebuild the run's adapter bit for bit (blake3 {})",
        report.rounds, report.deltas_per_round, report.recorded
    );
    Ok(())
}

fn serve(config: PathBuf) -> Result<()> {
    let cfg = RunConfig::load(&config)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(herd_coordinator::shell::serve(cfg, async {
        let _ = tokio::signal::ctrl_c().await;
    }))
}

fn calibrate(
    config: &std::path::Path,
    replays: usize,
    threads: &[i32],
    devices: &[DeviceChoice],
    out: &std::path::Path,
) -> Result<()> {
    use herd_coordinator::calibrate::{self, Side};
    let cfg = RunConfig::load(config)?;
    let (&[a, b], &[da, db]) = (threads, devices) else {
        anyhow::bail!("--threads and --devices take two values each, e.g. 1,2 and cpu,cuda");
    };
    let sides = [
        Side {
            device: da,
            threads: a,
        },
        Side {
            device: db,
            threads: b,
        },
    ];
    println!(
        "training {replays} shards twice (replay: {}; contributor: {}) ...",
        sides[0], sides[1]
    );
    let c = calibrate::calibrate(&cfg, replays, sides, |i, s| {
        println!(
            "  {:>3}  round {} shard {}: sketch cosine {:.6}, relative error {:.5}",
            i + 1,
            s.round,
            s.shard,
            s.sketch.cosine,
            s.sketch.rel_error
        );
    })?;
    calibrate::write(&c, out)?;
    println!(
        "honest disagreement over {replays} replays: sketch cosine >= {:.6}, relative error <= {:.5} (raw deltas: {:.6}, {:.5})",
        c.sketch_min_cosine, c.sketch_max_rel_error, c.raw_min_cosine, c.raw_max_rel_error
    );
    println!(
        "suggested tolerance ({}x margin): replay_min_cosine = {:.4}, replay_max_rel_error = {:.4}",
        calibrate::MARGIN,
        c.suggested_min_cosine,
        c.suggested_max_rel_error
    );
    println!(
        "configured tolerance: replay_min_cosine = {}, replay_max_rel_error = {}: {} false rejects of {replays}",
        c.configured_min_cosine, c.configured_max_rel_error, c.false_rejects
    );
    println!("figures: {}", out.display());
    Ok(())
}

fn rehearse(config: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let cfg = RunConfig::load(config)?;
    println!(
        "rehearsing {} rounds of {} nodes, codec {} ...",
        cfg.rounds,
        cfg.quorum(),
        cfg.round.codec
    );
    let r = herd_coordinator::rehearse::rehearse(&cfg, |round, loss| {
        println!("  round {round}: held-out loss {loss:.4}");
    })?;
    std::fs::write(out, serde_json::to_string_pretty(&r)?)?;
    println!(
        "held-out loss {:.4} -> {:.4}; {:.0} bytes per delta, {:.1}x smaller than dense fp32; training {:.0} s, aggregation {:.0} s",
        r.heldout_loss[0],
        r.heldout_loss.last().copied().unwrap_or(f64::NAN),
        r.bytes_per_delta,
        r.ratio,
        r.training_seconds,
        r.aggregation_seconds
    );
    println!("figures: {}", out.display());
    Ok(())
}

fn simulate(peers: u32, rounds: u64) -> Result<()> {
    use herd_coordinator::simulate::{ScaleConfig, simulate};
    let report = simulate(ScaleConfig {
        peers,
        rounds,
        codec: herd_protocol::codec::CodecSpec::default(),
        // The demo adapter's size: 6,144 values.
        tensors: 16,
        values_per_tensor: 384,
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn simulate_checks(cfg: &herd_coordinator::simulate::checks::CheckSimConfig) -> Result<()> {
    anyhow::ensure!(
        cfg.peers >= 4 && cfg.forgers + cfg.lying_checkers + cfg.colluding <= 1.0,
        "at least 4 peers, and adversary shares adding up to at most 1"
    );
    let rates = [
        cfg.forgers,
        cfg.lying_checkers,
        cfg.colluding,
        cfg.policy.spot_rate,
        cfg.reputation.replay_trusted,
    ];
    anyhow::ensure!(
        rates.iter().all(|r| (0.0..=1.0).contains(r)),
        "shares and rates are in [0, 1]"
    );
    let started = std::time::Instant::now();
    let report = herd_coordinator::simulate::checks::simulate_checks(cfg);
    let mut json = serde_json::to_value(&report)?;
    json["seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
    println!("{json}");
    Ok(())
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
    for addr in &s.addresses {
        println!("join: herd-node run --coordinator {addr}");
    }
    Ok(())
}
