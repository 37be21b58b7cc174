//! The lease a node is sent: the round machine's grant, dressed with the run's training
//! settings, assets and adapter shape. Nodes train it; replays and calibration redo it.

use herd_protocol::messages::{Lease, LeaseTask, LoraSpec, RunAssets};
use herd_protocol::{ContentId, LeaseId, Round, ShardId};

use crate::config::RunConfig;
use crate::round::{Grant, MachineConfig};

/// The lease message for `grant` in the run `cfg` (what nodes train, and replays redo).
pub fn lease_for(cfg: &RunConfig, assets: &RunAssets, grant: &Grant) -> Lease {
    let r = &cfg.round;
    Lease {
        id: grant.lease,
        run: cfg.run.clone(),
        round: grant.round,
        shard: grant.shard,
        ranges: grant.ranges.clone(),
        seed: grant.seed,
        inner_steps: r.inner_steps,
        lr: cfg.inner_lr(grant.round.0),
        batch_size: r.batch_size,
        max_seq_len: r.max_seq_len,
        expires_at_ms: grant.expires_at_ms,
        assets: assets.clone(),
        lora: lora_spec(cfg),
        codec: r.codec,
        base_adapter: grant.base_adapter,
        task: LeaseTask::Train,
    }
}

/// The lease for `shard` of `round` as the round machine would cut it, for training in this
/// process (`calibrate`, `rehearse`): its assets and base adapter name nothing to fetch.
pub fn in_process_lease(
    cfg: &RunConfig,
    machine: &MachineConfig,
    id: LeaseId,
    round: Round,
    shard: ShardId,
) -> Lease {
    let nothing = ContentId::of(b"in process");
    let assets = RunAssets {
        config: nothing,
        weights: nothing,
        tokenizer: nothing,
        data: nothing,
    };
    let grant = Grant {
        lease: id,
        round,
        shard,
        ranges: machine.shard_ranges(round, shard),
        seed: machine.shard_seed(round, shard),
        expires_at_ms: 0,
        base_adapter: nothing,
    };
    lease_for(cfg, &assets, &grant)
}

/// The LoRA shape nodes are told to use.
pub fn lora_spec(cfg: &RunConfig) -> LoraSpec {
    LoraSpec {
        rank: cfg.lora.rank,
        alpha: cfg.lora.alpha,
        targets: cfg.lora.targets.clone(),
        train_a: cfg.lora.train_a,
        init_seed: cfg.seed,
    }
}
