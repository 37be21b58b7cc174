//! What a demo run trains and how: its flags, the presets they start from (the embedded
//! default, or a real model `cargo xtask fetch-model` knows), and the run.toml they become.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::models;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// What to fine-tune, with its data and settings: `default` (the embedded tiny LLaMA on
    /// model/default/data) or `smollm2-135m` (SmolLM2-135M-Instruct on deploy/data's
    /// checkable tasks; fetched first if .models/ lacks it). The flags below override it.
    #[arg(long, default_value = "default")]
    preset: String,
    /// Base model dir (HF layout). Default: the preset's.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Alpaca training data. Default: the preset's.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out data. Default: the preset's.
    #[arg(long)]
    heldout: Option<PathBuf>,
    /// Rounds (default: 80; smollm2-135m 10). For the tiny default, 80 rounds of 5 steps
    /// cost what 20 of 20 do; talking four times as often lets error feedback keep up with
    /// the default codec (figures in docs/verification.md).
    #[arg(long)]
    rounds: Option<u64>,
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Torch threads of each node, in turn (`1,2`: nodes 0, 2, ... one thread, 1, 3, ... two):
    /// nodes unlike each other, as on a real network, whose checks of each other must agree.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    node_threads: Vec<u32>,
    /// Inner steps per shard (H; default 5).
    #[arg(long)]
    inner_steps: Option<u32>,
    /// Examples each shard covers. Default: all of them (each node walks the whole data in its own
    /// seeded order). Splitting the demo's 126 examples three ways makes each node overfit its
    /// 42 and the average suffer; real runs with large data split it (the coordinator's default).
    #[arg(long)]
    samples_per_shard: Option<u64>,
    /// Examples per inner step (default: 16; smollm2-135m 8).
    #[arg(long)]
    batch_size: Option<u32>,
    /// Inner learning rate (default: 3e-3; smollm2-135m 1e-3).
    #[arg(long)]
    lr: Option<f64>,
    /// Cosine decay of the inner learning rate: the fraction of it left at the last round
    /// (1 = constant).
    #[arg(long, default_value_t = 0.1)]
    lr_final_fraction: f64,
    /// Where in the run (a fraction of its rounds) that decay begins. Holding the rate for 70%
    /// of the run and then settling it steadies the end: with a constant rate the held-out loss
    /// wobbles by ±2.5% from round to round, which is more than the codecs differ by.
    #[arg(long, default_value_t = 0.7)]
    lr_decay_start: f64,
    /// Outer (DiLoCo) learning rate.
    #[arg(long, default_value_t = 0.7)]
    outer_lr: f64,
    /// Outer Nesterov momentum. DiLoCo uses 0.9 over many rounds; in a 10-round demo run 0.9
    /// overshoots (held-out 1.05 vs 0.63 with 0.5, measured), so the demo uses 0.5.
    #[arg(long, default_value_t = 0.5)]
    outer_momentum: f64,
    /// Delta codec: `sign[:KEEP[:BLOCK]]`, `topk[:FRACTION[:BLOCK]]`, `int8[:BLOCK]` or `raw`
    /// (default: sign:0.7:256, ~35× smaller than fp32 on the embedded default's adapter, 39× on
    /// SmolLM2's; smaller settings cost SmolLM2's 10-round demo more loss: docs/real-model.md).
    #[arg(long)]
    codec: Option<String>,
    /// Share of a round's shards nodes not yet trusted may hold at once (the coordinator's
    /// `[leases] newcomer_share`; default: the coordinator's 0.5 for the embedded default, 1 for
    /// smollm2-135m — a demo's nodes are the operator's own, and holding SmolLM2's first rounds
    /// to one shard at a time until each node has passed 3 replays costs minutes).
    #[arg(long)]
    newcomer_share: Option<f64>,
    /// Keep the coordinator serving (HTTP, dashboard) after the last round, until Ctrl-C.
    #[arg(long)]
    serve: bool,
    /// Where run folders go.
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
}

/// A demo's settings before the flags override them.
struct Preset {
    /// How the demo names what it trains.
    title: &'static str,
    model: PathBuf,
    data: &'static str,
    heldout: &'static str,
    rounds: u64,
    inner_steps: u32,
    batch_size: u32,
    lr: f64,
    /// Tokens per example at most (the prompt and the answer).
    max_seq_len: u32,
    /// Longer than the slowest of 3 nodes sharing 2 cores needs for a shard.
    lease_secs: u32,
    lora_rank: u32,
    /// New tokens the exact-answer check generates per held-out instruction.
    answer_tokens: u32,
    /// `[leases] newcomer_share`, when not the coordinator's default.
    newcomer_share: Option<f64>,
    codec: &'static str,
}

impl Preset {
    fn named(root: &Path, name: &str) -> Result<Preset> {
        Ok(match name {
            "default" => Preset {
                title: "the embedded tiny LLaMA",
                model: PathBuf::from("model/default/base"),
                data: "model/default/data/train.jsonl",
                heldout: "model/default/data/heldout.jsonl",
                rounds: 80,
                inner_steps: 5,
                batch_size: 16,
                lr: 3e-3,
                max_seq_len: 128,
                lease_secs: 60,
                lora_rank: 8,
                answer_tokens: 12,
                newcomer_share: None,
                codec: "sign:0.7:256",
            },
            "smollm2-135m" => Preset {
                title: "SmolLM2-135M-Instruct",
                model: models::fetch(root, name)?,
                data: "deploy/data/tasks-train.jsonl",
                heldout: "deploy/data/tasks-heldout.jsonl",
                rounds: 10,
                inner_steps: 5,
                batch_size: 8,
                lr: 1e-3,
                max_seq_len: 96,
                lease_secs: 900,
                lora_rank: 16,
                answer_tokens: 16,
                newcomer_share: Some(1.0),
                codec: "sign:0.7:256",
            },
            _ => bail!("no preset {name:?}: default, smollm2-135m"),
        })
    }
}

/// A demo run's settings, every one decided.
#[derive(Debug, Clone)]
pub struct Demo {
    pub title: String,
    pub model: PathBuf,
    pub data: PathBuf,
    pub heldout: PathBuf,
    pub rounds: u64,
    pub nodes: u32,
    pub node_threads: Vec<u32>,
    pub inner_steps: u32,
    pub samples_per_shard: u64,
    pub batch_size: u32,
    pub lr: f64,
    pub lr_final_fraction: f64,
    pub lr_decay_start: f64,
    pub outer_lr: f64,
    pub outer_momentum: f64,
    pub codec: String,
    pub max_seq_len: u32,
    pub lease_secs: u32,
    pub lora_rank: u32,
    pub answer_tokens: u32,
    pub newcomer_share: Option<f64>,
    pub serve: bool,
    pub runs: PathBuf,
}

impl DemoArgs {
    /// The default demo's flags with another codec (for benchmarks).
    pub fn with_codec(codec: &str) -> Result<Self> {
        Self::parse_from(&["--codec", codec])
    }

    /// The demo's flags as parsed from `args` (what follows `cargo xtask demo`).
    pub fn parse_from(args: &[&str]) -> Result<Self> {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            demo: DemoArgs,
        }
        let argv = std::iter::once("demo").chain(args.iter().copied());
        Ok(<Wrapper as clap::Parser>::try_parse_from(argv)?.demo)
    }

    /// The preset with the flags over it; paths made absolute under `root`. Fetches the
    /// preset's model if it is a real one not yet in .models/.
    pub fn resolve(&self, root: &Path) -> Result<Demo> {
        let preset = Preset::named(root, &self.preset)?;
        if self.node_threads.contains(&0) {
            bail!("--node-threads: every node needs at least 1 thread");
        }
        let abs = |p: &Path| root.join(p);
        let data = abs(self.data.as_deref().unwrap_or(Path::new(preset.data)));
        let samples_per_shard = match self.samples_per_shard {
            Some(n) => n,
            None => count_records(&data)?,
        };
        Ok(Demo {
            title: preset.title.to_string(),
            model: abs(self.model.as_deref().unwrap_or(&preset.model)),
            heldout: abs(self.heldout.as_deref().unwrap_or(Path::new(preset.heldout))),
            data,
            rounds: self.rounds.unwrap_or(preset.rounds),
            nodes: self.nodes,
            node_threads: self.node_threads.clone(),
            inner_steps: self.inner_steps.unwrap_or(preset.inner_steps),
            samples_per_shard,
            batch_size: self.batch_size.unwrap_or(preset.batch_size),
            lr: self.lr.unwrap_or(preset.lr),
            lr_final_fraction: self.lr_final_fraction,
            lr_decay_start: self.lr_decay_start,
            outer_lr: self.outer_lr,
            outer_momentum: self.outer_momentum,
            codec: self.codec.clone().unwrap_or(preset.codec.to_string()),
            max_seq_len: preset.max_seq_len,
            lease_secs: preset.lease_secs,
            lora_rank: preset.lora_rank,
            answer_tokens: preset.answer_tokens,
            newcomer_share: self.newcomer_share.or(preset.newcomer_share),
            serve: self.serve,
            runs: abs(&self.runs),
        })
    }
}

impl Demo {
    /// Writes the run's `run.toml` into `run_dir` (also what `calibrate` trains).
    pub fn write_run_toml(&self, run_dir: &Path) -> Result<PathBuf> {
        let config = run_dir.join("run.toml");
        let leases = match self.newcomer_share {
            Some(share) => format!("\n[leases]\nnewcomer_share = {share:?}\n"),
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                r#"# Written by `cargo xtask demo`.
run = "demo"
base_model = {model:?}
data = {data:?}
heldout = {heldout:?}
data_dir = "coordinator"
listen = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"]
http = "127.0.0.1:0"
rounds = {rounds}
serve_after_finish = {serve}

[lora]
rank = {rank}
alpha = {alpha:.1}
targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
train_a = false

[round]
shards = {shards}
samples_per_shard = {samples}
inner_steps = {steps}
lr = {lr:e}
lr_final_fraction = {lr_final_fraction}
lr_decay_start = {lr_decay_start}
batch_size = {batch}
max_seq_len = {max_seq_len}
lease_secs = {lease_secs}
outer_lr = {outer_lr}
outer_momentum = {outer_momentum}
checkpoint_every = 10
codec = {codec:?}
{leases}"#,
                model = self.model,
                data = self.data,
                heldout = self.heldout,
                rounds = self.rounds,
                serve = self.serve,
                rank = self.lora_rank,
                alpha = f64::from(2 * self.lora_rank),
                shards = self.nodes,
                samples = self.samples_per_shard,
                steps = self.inner_steps,
                lr = self.lr,
                lr_final_fraction = self.lr_final_fraction,
                lr_decay_start = self.lr_decay_start,
                batch = self.batch_size,
                max_seq_len = self.max_seq_len,
                lease_secs = self.lease_secs,
                outer_lr = self.outer_lr,
                outer_momentum = self.outer_momentum,
                codec = self.codec,
            ),
        )?;
        Ok(config)
    }
}

/// Non-empty lines of a JSONL file.
fn count_records(path: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).count() as u64)
}
