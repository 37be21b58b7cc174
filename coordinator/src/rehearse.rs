//! `herd-coordinator rehearse`: a run's rounds in one process, the nodes played in turn. Each
//! round every shard is trained from θ_r by the node's own code path (`train_shard`), encoded
//! with the run's codec and that node's error-feedback residual, decoded as the coordinator
//! decodes a payload, and the engine aggregates them (robust mean, outer step, held-out loss).
//! No network and no verification: what is left is the learning, so settings (codec, nodes,
//! batch) can be compared at their cost in bytes and loss before a run opens, and `cargo xtask
//! bench` sweeps codecs with it.

use std::time::Instant;

use anyhow::Result;
use herd_model::shard::train_shard;
use herd_protocol::delta::Delta;
use herd_protocol::{LeaseId, Round, ShardId};
use serde::Serialize;

use crate::config::RunConfig;
use crate::engine::Engine;
use crate::lease::in_process_lease;

/// What a rehearsal measured.
#[derive(Debug, Clone, Serialize)]
pub struct Rehearsal {
    pub codec: String,
    /// Nodes (one per shard of the quorum), and examples per inner step each.
    pub nodes: u32,
    pub batch_size: u32,
    pub rounds: u64,
    /// After each round; index 0 = before any training.
    pub heldout_loss: Vec<f64>,
    /// Real tokens trained on, all nodes together.
    pub tokens: u64,
    pub bytes_per_delta: f64,
    pub dense_fp32_bytes_per_delta: f64,
    pub ratio: f64,
    /// Seconds training (the nodes' work), and aggregating with the held-out evaluation.
    pub training_seconds: f64,
    pub aggregation_seconds: f64,
}

/// Runs `cfg`'s rounds with its quorum of nodes; `progress` sees each round's held-out loss.
pub fn rehearse(cfg: &RunConfig, mut progress: impl FnMut(u64, f64)) -> Result<Rehearsal> {
    let mut engine = Engine::new(cfg)?;
    engine.start()?;
    let machine = cfg.machine_config(cfg.training_examples()?);
    let layout = engine.layout();
    let dense_bytes = 4 * layout.numel() as u64;
    let nodes = cfg.quorum();
    let mut residuals: Vec<Option<Vec<Vec<f32>>>> = vec![None; nodes as usize];
    let mut heldout_loss = vec![engine.heldout_loss()];
    let (mut tokens, mut payload_bytes, mut deltas_sent) = (0u64, 0u64, 0u64);
    let (mut training_seconds, mut aggregation_seconds) = (0.0, 0.0);
    for r in 0..cfg.rounds {
        let round = Round(r);
        let mut deltas = Vec::with_capacity(nodes as usize);
        let started = Instant::now();
        for (node, residual) in residuals.iter_mut().enumerate() {
            let id = LeaseId(r * u64::from(nodes) + node as u64);
            let lease = in_process_lease(cfg, &machine, id, round, ShardId(node as u32));
            let (model, data, theta) = engine.node_view()?;
            let outcome = train_shard(model, &theta, data, &lease, false, |_| {
                std::ops::ControlFlow::Continue(())
            })?;
            let feedback = outcome
                .delta
                .encode(lease.codec, residual.as_deref(), lease.seed)?;
            *residual = Some(feedback.residual_if_accepted());
            let sent = Delta::decode(&feedback.payload, &layout, lease.codec, lease.seed)?;
            payload_bytes += feedback.payload.len() as u64;
            deltas_sent += 1;
            tokens += outcome.tokens;
            deltas.push((sent.delta, outcome.tokens));
        }
        training_seconds += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let result = engine.finish_round(&deltas, None)?;
        aggregation_seconds += started.elapsed().as_secs_f64();
        progress(r + 1, result.heldout_loss);
        heldout_loss.push(result.heldout_loss);
    }
    let bytes_per_delta = payload_bytes as f64 / deltas_sent.max(1) as f64;
    Ok(Rehearsal {
        codec: cfg.round.codec.to_string(),
        nodes,
        batch_size: cfg.round.batch_size,
        rounds: cfg.rounds,
        heldout_loss,
        tokens,
        bytes_per_delta,
        dense_fp32_bytes_per_delta: dense_bytes as f64,
        ratio: dense_bytes as f64 / bytes_per_delta,
        training_seconds,
        aggregation_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded default's run with `codec`: 2 nodes, 3 rounds of 5 steps.
    fn config(dir: &std::path::Path, codec: &str) -> RunConfig {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let path = dir.join(format!("{}.toml", codec.replace(':', "_")));
        std::fs::write(
            &path,
            format!(
                "run = \"rehearsal\"\nbase_model = {:?}\ndata = {:?}\nheldout = {:?}\n\
                 data_dir = \"coordinator\"\nrounds = 3\n[round]\nshards = 2\n\
                 samples_per_shard = 64\ninner_steps = 5\nlr = 3e-3\nbatch_size = 8\n\
                 max_seq_len = 128\nlease_secs = 60\nouter_lr = 0.7\nouter_momentum = 0.5\ncheckpoint_every = 10\ncodec = {codec:?}\n",
                root.join("model/default/base"),
                root.join("model/default/data/train.jsonl"),
                root.join("model/default/data/heldout.jsonl"),
            ),
        )
        .unwrap();
        RunConfig::load(&path).unwrap()
    }

    #[test]
    fn rehearsal_learns_and_counts_what_the_codec_sends() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        let raw = rehearse(&config(dir.path(), "raw"), |round, loss| {
            seen.push((round, loss))
        })
        .unwrap();
        assert_eq!(raw.heldout_loss.len(), 4);
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(seen.last().unwrap().1, raw.heldout_loss[3]);
        assert!(
            raw.heldout_loss[3] < 0.8 * raw.heldout_loss[0],
            "3 rounds of 2 nodes lower the held-out loss: {:?}",
            raw.heldout_loss
        );
        assert_eq!((raw.nodes, raw.rounds), (2, 3));
        assert!(raw.tokens > 0);
        // Raw fp32 carries the sketch and framing besides the values: a little over dense.
        assert!(raw.ratio > 0.9 && raw.ratio < 1.0, "{}", raw.ratio);
        let sign = rehearse(&config(dir.path(), "sign:0.3:64"), |_, _| {}).unwrap();
        assert!(sign.ratio > 20.0, "{}", sign.ratio);
        assert_eq!(
            sign.dense_fp32_bytes_per_delta,
            raw.dense_fp32_bytes_per_delta
        );
        assert!(sign.heldout_loss[3] < sign.heldout_loss[0]);
    }
}
