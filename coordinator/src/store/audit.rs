//! `herd-coordinator audit`: rebuilds a run's adapter from θ_0 and the accepted deltas the
//! store recorded, round by round through the same aggregation, and checks that it equals the
//! adapter the run reached, bit for bit. What a restart, a crash or a bug could get wrong (a
//! delta lost, applied twice, or applied to the wrong state) shows up here.

use anyhow::{Context, Result, bail};
use herd_protocol::ContentId;
use herd_protocol::blobs::BlobStore;
use serde::Serialize;

use crate::config::RunConfig;
use crate::engine::Engine;
use crate::store::Store;

/// What an audit found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// Rounds the run completed.
    pub rounds: u64,
    /// Accepted deltas per completed round.
    pub deltas_per_round: Vec<usize>,
    /// The adapter the run reached, and the one rebuilt from its record.
    pub recorded: ContentId,
    pub rebuilt: ContentId,
}

impl AuditReport {
    pub fn matches(&self) -> bool {
        self.recorded == self.rebuilt
    }
}

/// Audits the run of `cfg` (its data dir must hold a stopped coordinator's state).
pub fn audit(cfg: &RunConfig) -> Result<AuditReport> {
    let path = cfg.data_dir.join("state.redb");
    if !path.exists() {
        bail!("{}: no coordinator state here", path.display());
    }
    let snapshot = Store::open(&path)
        .context("is the coordinator still running? audit reads the state of a stopped one")?
        .load()?;
    let run = snapshot.run.context("the store holds no run state yet")?;
    let blobs = BlobStore::open(&cfg.data_dir.join("blobs"))?;
    let mut engine = Engine::new(cfg)?;
    let layout = engine.layout();
    let machine = cfg.machine_config(cfg.training_examples()?);
    let mut deltas_per_round = Vec::new();
    for r in 0..run.round {
        // Snapshot order is (round, shard): the order aggregation takes them in.
        let mut deltas = Vec::new();
        for a in snapshot.accepted.iter().filter(|a| a.round == r) {
            let delta = a.delta(&blobs, &layout, cfg.round.codec, &machine)?;
            deltas.push((delta, a.tokens));
        }
        if deltas.is_empty() {
            bail!("round {r} closed with no recorded delta");
        }
        engine.apply_round(&deltas)?; // the robust-mean report is not needed here
        deltas_per_round.push(deltas.len());
    }
    Ok(AuditReport {
        rounds: run.round,
        deltas_per_round,
        recorded: run.adapter,
        rebuilt: ContentId::of(&engine.adapter_bytes()?),
    })
}
