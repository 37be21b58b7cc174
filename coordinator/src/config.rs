//! `run.toml`: what an operator sets for a run. Relative paths are relative to the file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use herd_protocol::codec::CodecSpec;
use serde::Deserialize;

mod checks;
mod open_network;
pub use checks::ChecksSection;
pub use open_network::{LeasesSection, NetworkSection};

/// A whole run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run name; nodes' submissions must name it.
    pub run: String,
    /// Base model dir (HF layout, single `model.safetensors`).
    pub base_model: PathBuf,
    /// Training data (JSONL or JSON array), served to nodes as one blob.
    pub data: PathBuf,
    /// Held-out data, evaluated after every round.
    pub heldout: PathBuf,
    /// Where state, blobs and checkpoints go.
    pub data_dir: PathBuf,
    /// libp2p listen addresses.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// HTTP listen address (`host:port`; port 0 picks one), or `off`: checkpoints then travel
    /// only over libp2p, from whichever peers hold them.
    #[serde(default = "default_http")]
    pub http: String,
    /// Peers on private or loopback addresses count as reachable (AutoNAT dial-backs): for a
    /// LAN, containers or a test on one machine. Leave off on the internet.
    #[serde(default)]
    pub lan: bool,
    pub rounds: u64,
    #[serde(default)]
    pub seed: u64,
    /// Keep serving HTTP and blobs after the last round, until Ctrl-C.
    #[serde(default)]
    pub serve_after_finish: bool,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub round: RoundSection,
    #[serde(default)]
    pub verify: VerifySection,
    #[serde(default)]
    pub aggregate: AggregateSection,
    #[serde(default)]
    pub network: NetworkSection,
    #[serde(default)]
    pub leases: LeasesSection,
    #[serde(default)]
    pub checks: ChecksSection,
}

/// The adapter every node trains.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    pub rank: i64,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// Off by default: a frozen A keeps averaging exact.
    pub train_a: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            rank: 8,
            alpha: 16.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            train_a: false,
        }
    }
}

/// How rounds are cut and trained.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundSection {
    pub shards: u32,
    /// Accepted shards that close a round (default: all).
    pub quorum: Option<u32>,
    /// Examples per shard (default: the data split evenly over the shards).
    pub samples_per_shard: Option<u64>,
    /// Inner AdamW steps per shard (H).
    pub inner_steps: u32,
    /// Inner AdamW learning rate of the first round.
    pub lr: f64,
    /// Where a cosine schedule over the run's rounds takes the inner learning rate by the last
    /// round, as a fraction of `lr` (1 = constant, the default). Decaying it settles the end
    /// of a run: with a constant rate the held-out loss keeps wobbling by a few percent from
    /// round to round, and a compressed run's error-feedback residual never drains.
    #[serde(default = "one")]
    pub lr_final_fraction: f64,
    /// How far into the run (a fraction of its rounds) that decay begins; the rate is
    /// constant before it. 0, the default, decays over the whole run; 0.75 holds the rate for
    /// three quarters of it and settles only the end (warmup-stable-decay, Hu et al. 2024).
    #[serde(default)]
    pub lr_decay_start: f64,
    pub batch_size: u32,
    pub max_seq_len: u32,
    pub lease_secs: f64,
    /// Outer Nesterov step (DiLoCo defaults 0.7 / 0.9).
    pub outer_lr: f64,
    pub outer_momentum: f64,
    /// Publish a checkpoint every k rounds (and after the last).
    pub checkpoint_every: u64,
    /// Stragglers: a round still open after this multiple of the median duration of recent
    /// rounds closes with the shards it has, if at least `deadline_quorum` (default: half the
    /// quorum, rounded up); deltas that arrive later are rejected as `stale_round`. 0 = wait
    /// for quorum however long it takes (leases still expire).
    #[serde(default = "default_straggler_multiple")]
    pub straggler_multiple: f64,
    pub deadline_quorum: Option<u32>,
    /// Delta codec: `sign[:KEEP[:BLOCK]]` (the default), `topk[:FRACTION[:BLOCK]]`,
    /// `int8[:BLOCK]` or `raw`.
    #[serde(default, deserialize_with = "codec_from_str")]
    pub codec: CodecSpec,
}

fn one() -> f64 {
    1.0
}

fn default_straggler_multiple() -> f64 {
    3.0
}

fn codec_from_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<CodecSpec, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// How submissions are checked (see `verify`). The replay tolerance comes from
/// `cargo xtask calibrate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifySection {
    /// Reject deltas with a norm above this multiple of the median accepted norm.
    pub norm_multiple: f64,
    /// The payload must not point away from the Δ its sketch stands for: the cosine between
    /// the sketch of the decoded payload and the sketch the node sent (of its raw Δ) is at
    /// least `-sketch_noise_margin / sqrt(m)`, `m` the sketch's length (1/sqrt(m) is the
    /// sketch's own error on a cosine). What ties the payload to the Δ a replay vouches for,
    /// on every delta, for the price of one sketch (docs/checking.md, "The payload and its
    /// sketch").
    pub sketch_noise_margin: f64,
    /// Examples of the shard, and of the held-out set, the effect check evaluates.
    pub effect_samples: usize,
    /// The measured loss drop on those must be at least this fraction of the claimed one
    /// (scaled like the delta), less the allowance below.
    pub effect_min_fraction: f64,
    /// Noise allowance of the effect check, as a fraction of the shard loss.
    pub shard_max_rise: f64,
    /// Held-out loss may rise by at most this fraction when the delta is applied alone.
    pub heldout_max_rise: f64,
    /// Replay probability for new and suspect peers, and for trusted ones.
    pub replay_new: f64,
    pub replay_trusted: f64,
    /// Effect-check probability for trusted peers' deltas, independent of the replay draw (new
    /// and suspect peers' deltas always get it). The effect check is the coordinator's own
    /// forward passes; for trusted peers the robust mean, the norm bound and the replay draw
    /// stand beside it (docs/checking.md, "Effect checks").
    pub effect_trusted: f64,
    /// Passed replays after which a peer with no recent strike is trusted.
    pub trusted_after: u32,
    /// Honest replays agree at least this well (sketch cosine, relative error). Measured with
    /// `herd-coordinator calibrate` on the demo run, worst of 50: 1 vs 2 CPU threads cosine
    /// 0.99996 / error 0.009; a CPU replay of a CUDA contributor (bf16 base weights) 0.99908 /
    /// 0.044. The defaults leave ≥ 10× (cosine) and ≥ 4.5× (error) room over the CUDA case;
    /// attacks land at cosine 0.14 (re-encoded copy) or error 1.4 (other data).
    pub replay_min_cosine: f64,
    pub replay_max_rel_error: f64,
    /// Strikes within the last 20 verdicts that ban a peer (a failed replay bans at once).
    pub ban_after: u32,
}

impl VerifySection {
    /// How far apart honest replays may land.
    pub fn tolerance(&self) -> crate::verify::replay::ReplayTolerance {
        crate::verify::replay::ReplayTolerance {
            min_cosine: self.replay_min_cosine,
            max_rel_error: self.replay_max_rel_error,
        }
    }

    /// The standing rules: replay and effect draws, trust, bans.
    pub fn reputation(&self) -> crate::verify::reputation::ReputationConfig {
        crate::verify::reputation::ReputationConfig {
            replay_new: self.replay_new,
            replay_trusted: self.replay_trusted,
            effect_trusted: self.effect_trusted,
            trusted_after: self.trusted_after,
            ban_after: self.ban_after,
        }
    }
}

impl Default for VerifySection {
    fn default() -> Self {
        VerifySection {
            norm_multiple: 4.0,
            sketch_noise_margin: 3.0,
            effect_samples: 16,
            effect_min_fraction: 0.05,
            shard_max_rise: 0.03,
            heldout_max_rise: 0.05,
            replay_new: 1.0,
            replay_trusted: 0.1,
            effect_trusted: 0.1,
            trusted_after: 3,
            replay_min_cosine: 0.99,
            replay_max_rel_error: 0.2,
            ban_after: 3,
        }
    }
}

/// Robust aggregation: norm clipping, then a coordinate-wise trimmed mean.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregateSection {
    /// Deltas are scaled down to at most this multiple of the round's median norm.
    pub clip_multiple: f64,
    /// Fraction of a coordinate's sent values cut from each end before averaging.
    pub trim_fraction: f64,
}

impl Default for AggregateSection {
    fn default() -> Self {
        AggregateSection {
            clip_multiple: 2.0,
            trim_fraction: 0.1,
        }
    }
}

impl Default for RoundSection {
    fn default() -> Self {
        RoundSection {
            shards: 3,
            quorum: None,
            samples_per_shard: None,
            inner_steps: 50,
            lr: 1e-3,
            lr_final_fraction: 1.0,
            lr_decay_start: 0.0,
            batch_size: 8,
            max_seq_len: 512,
            lease_secs: 300.0,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            checkpoint_every: 1,
            straggler_multiple: default_straggler_multiple(),
            deadline_quorum: None,
            codec: CodecSpec::default(),
        }
    }
}

fn default_listen() -> Vec<String> {
    vec![
        "/ip4/0.0.0.0/tcp/4001".into(),
        "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
    ]
}

fn default_http() -> String {
    "127.0.0.1:8080".into()
}

impl RunConfig {
    /// Reads `path`, resolves relative paths against its dir and checks the numbers.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: RunConfig = toml::from_str(&text)
            .with_context(|| format!("{}: invalid run config", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.base_model,
            &mut cfg.data,
            &mut cfg.heldout,
            &mut cfg.data_dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.check()
            .with_context(|| format!("{}: invalid run config", path.display()))?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        let r = &self.round;
        if r.shards == 0 || self.quorum() == 0 || self.quorum() > r.shards {
            bail!("round.shards must be > 0 and round.quorum in 1..=shards");
        }
        if r.inner_steps == 0 || r.batch_size == 0 || r.max_seq_len < 2 || r.lease_secs <= 0.0 {
            bail!(
                "round.inner_steps, batch_size, lease_secs must be positive and max_seq_len >= 2"
            );
        }
        if !(r.lr > 0.0 && r.outer_lr > 0.0 && (0.0..1.0).contains(&r.outer_momentum)) {
            bail!("round.lr and outer_lr must be positive, outer_momentum in [0, 1)");
        }
        if !(r.straggler_multiple >= 0.0
            && r.deadline_quorum
                .is_none_or(|q| q >= 1 && q <= self.quorum()))
        {
            bail!("round.straggler_multiple must be >= 0 and round.deadline_quorum in 1..=quorum");
        }
        if !(r.lr_final_fraction > 0.0 && r.lr_final_fraction <= 1.0) {
            bail!("round.lr_final_fraction must be in (0, 1]");
        }
        if !(0.0..1.0).contains(&r.lr_decay_start) {
            bail!("round.lr_decay_start must be in [0, 1)");
        }
        let v = &self.verify;
        if !(v.norm_multiple > 1.0
            && (0.0..=1.0).contains(&v.replay_new)
            && (0.0..=1.0).contains(&v.replay_trusted)
            && (0.0..=1.0).contains(&v.effect_trusted)
            && (-1.0..=1.0).contains(&v.replay_min_cosine)
            && v.sketch_noise_margin >= 0.0
            && v.replay_max_rel_error > 0.0
            && v.effect_min_fraction >= 0.0
            && v.heldout_max_rise >= 0.0
            && v.shard_max_rise >= 0.0
            && v.effect_samples > 0
            && v.ban_after > 0)
        {
            bail!(
                "verify: norm_multiple > 1, replay rates and effect_trusted in [0, 1], replay_min_cosine in [-1, 1], non-negative sketch_noise_margin, positive replay_max_rel_error, effect_samples and ban_after, non-negative effect_min_fraction, shard_max_rise and heldout_max_rise"
            );
        }
        let a = &self.aggregate;
        if !(a.clip_multiple > 0.0 && (0.0..0.5).contains(&a.trim_fraction)) {
            bail!("aggregate: clip_multiple > 0 and trim_fraction in [0, 0.5)");
        }
        if self.run.is_empty() || self.run.len() > herd_protocol::messages::MAX_TEXT_BYTES {
            bail!("run name must be 1..=256 bytes");
        }
        self.network.check()?;
        self.leases.check()?;
        self.checks.check()
    }

    /// The replay tolerance of `[verify]`: the coordinator's replays and peers' checks alike.
    pub fn replay_tolerance(&self) -> crate::verify::replay::ReplayTolerance {
        self.verify.tolerance()
    }

    /// The check book's rules for this run.
    pub fn check_policy(&self) -> crate::checks::CheckPolicy {
        self.checks
            .policy(self.round.lease_secs, self.replay_tolerance())
    }

    /// Records in the training data file (what shards are cut from).
    pub fn training_examples(&self) -> Result<u64> {
        Ok(herd_model::data::read_records(&self.data)?.len() as u64)
    }

    /// What the round machine needs, for training data of `data_len` examples.
    pub fn machine_config(&self, data_len: u64) -> crate::round::MachineConfig {
        crate::round::MachineConfig {
            shards: self.round.shards,
            quorum: self.quorum(),
            lease_ms: (self.round.lease_secs * 1000.0) as u64,
            rounds: self.rounds,
            data_len,
            samples_per_shard: self
                .round
                .samples_per_shard
                .unwrap_or((data_len / self.round.shards as u64).max(1)),
            seed: self.seed,
            straggler_multiple: self.round.straggler_multiple,
            deadline_quorum: self
                .round
                .deadline_quorum
                .unwrap_or(self.quorum().div_ceil(2)),
            leases: self.leases.policy(),
        }
    }

    /// The inner learning rate of `round`: `lr` until `lr_decay_start` of the run, then a
    /// cosine to `lr × lr_final_fraction` at the last round (a run without an end stays at `lr`).
    pub fn inner_lr(&self, round: u64) -> f64 {
        let r = &self.round;
        if self.rounds < 2 || r.lr_final_fraction >= 1.0 {
            return r.lr;
        }
        let at = round.min(self.rounds - 1) as f64 / (self.rounds - 1) as f64;
        let progress = ((at - r.lr_decay_start) / (1.0 - r.lr_decay_start)).max(0.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        r.lr * (r.lr_final_fraction + (1.0 - r.lr_final_fraction) * cosine)
    }

    pub fn quorum(&self) -> u32 {
        self.round.quorum.unwrap_or(self.round.shards)
    }

    /// The HTTP address to bind, unless HTTP is off.
    pub fn http_addr(&self) -> Option<&str> {
        (self.http != "off").then_some(self.http.as_str())
    }

    pub fn checkpoint_every(&self) -> u64 {
        self.round.checkpoint_every.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rounds: u64, lr_final_fraction: f64) -> RunConfig {
        let text = format!(
            "run = \"t\"\nbase_model = \"m\"\ndata = \"d\"\nheldout = \"h\"\ndata_dir = \"x\"\n\
             rounds = {rounds}\n[round]\nshards = 1\ninner_steps = 1\nlr = 0.01\n\
             lr_final_fraction = {lr_final_fraction}\nbatch_size = 1\nmax_seq_len = 8\n\
             lease_secs = 1\nouter_lr = 1\nouter_momentum = 0\ncheckpoint_every = 1\n"
        );
        let cfg: RunConfig = toml::from_str(&text).unwrap();
        cfg.check().unwrap();
        cfg
    }

    #[test]
    fn the_example_configs_in_deploy_load() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        for file in [
            "run.toml",
            "compose/run.toml",
            "quickstart.toml",
            "smollm2-tasks.toml",
        ] {
            let cfg = RunConfig::load(&deploy.join(file))
                .unwrap_or_else(|e| panic!("deploy/{file}: {e:#}"));
            assert!(cfg.rounds > 0, "deploy/{file}");
        }
    }

    #[test]
    fn inner_lr_follows_a_cosine_to_the_final_fraction() {
        let cfg = config(11, 0.1);
        assert!((cfg.inner_lr(0) - 0.01).abs() < 1e-12);
        assert!(
            (cfg.inner_lr(5) - 0.0055).abs() < 1e-12,
            "halfway: the mean"
        );
        assert!((cfg.inner_lr(10) - 0.001).abs() < 1e-12);
        assert!(
            (cfg.inner_lr(99) - 0.001).abs() < 1e-12,
            "past the end: the floor"
        );
        let lrs: Vec<f64> = (0..11).map(|r| cfg.inner_lr(r)).collect();
        assert!(
            lrs.windows(2).all(|w| w[1] < w[0]),
            "strictly falling: {lrs:?}"
        );
    }

    #[test]
    fn inner_lr_holds_until_the_decay_starts_then_falls_to_the_same_floor() {
        let mut cfg = config(11, 0.1);
        cfg.round.lr_decay_start = 0.5;
        assert!(
            (0..=5).all(|r| cfg.inner_lr(r) == 0.01),
            "held for the first half"
        );
        assert!((cfg.inner_lr(10) - 0.001).abs() < 1e-12);
        let tail: Vec<f64> = (5..11).map(|r| cfg.inner_lr(r)).collect();
        assert!(
            tail.windows(2).all(|w| w[1] < w[0]),
            "then falling: {tail:?}"
        );
        cfg.round.lr_decay_start = 1.0;
        assert!(cfg.check().is_err(), "a decay that never starts is refused");
    }

    #[test]
    fn inner_lr_is_constant_by_default_and_for_open_ended_runs() {
        for cfg in [config(11, 1.0), config(0, 0.1)] {
            assert!((0..20).all(|r| cfg.inner_lr(r) == 0.01));
        }
    }
}
