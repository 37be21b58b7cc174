//! Picking a run up after a restart: the open round's accepted deltas and live leases from the
//! store, and everything the shell derives from verdicts (counters, peers' standing, the norm
//! window, payloads seen, the answer each decided lease got) by going through them again in
//! order.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use herd_protocol::delta::{Delta, DeltaLayout};
use herd_protocol::messages::{RejectReason, Verdict};
use herd_protocol::{ContentId, LeaseId, Round, ShardId};
use libp2p::PeerId;

use crate::config::RunConfig;
use crate::round::{Accepted, Grant, MachineConfig};
use crate::status::{PeerStatus, Status};
use crate::store::Snapshot;
use crate::verify::log::VerdictRecord;
use crate::verify::reputation::Reputation;
use crate::verify::structure::StructureState;
use herd_protocol::blobs::BlobStore;

/// A decided submission: what it was and what it got.
#[derive(Debug, Clone)]
pub struct Decided {
    pub peer: String,
    pub payload_hash: Option<String>,
    pub verdict: Verdict,
}

impl Decided {
    /// Whether `peer` sending `payload_hash` again is this same submission.
    pub fn is_resubmission(&self, peer: &str, payload_hash: &ContentId) -> bool {
        self.peer == peer && self.payload_hash.as_deref() == Some(payload_hash.to_hex().as_str())
    }
}

/// Whether `verdict` settles its lease, so that a resubmission of the same payload gets it
/// again. Rejections of a submission that was not the lease's own (another peer's, an unknown
/// lease, other bytes for a decided lease, other round/shard claims) leave the lease as it was.
pub fn decides_lease(verdict: &Verdict) -> bool {
    !matches!(
        verdict,
        Verdict::Rejected(
            RejectReason::NotYourLease
                | RejectReason::UnknownLease
                | RejectReason::Duplicate
                | RejectReason::LeaseMismatch
        )
    )
}

/// The open round as stored.
#[derive(Debug)]
pub struct OpenRound {
    /// Its accepted shards, for the round machine.
    pub accepted: Vec<Accepted>,
    /// Their deltas with token weights, decoded from the stored payloads.
    pub deltas: HashMap<LeaseId, (Delta, u64)>,
    /// Leases granted in it that got no verdict, with their peers.
    pub live: Vec<(Grant, String)>,
}

/// Reads the open `round` (whose adapter is `adapter`) back from `snapshot`.
pub fn open_round(
    snapshot: &Snapshot,
    round: Round,
    adapter: ContentId,
    machine: &MachineConfig,
    cfg: &RunConfig,
    layout: &DeltaLayout,
    blobs: &BlobStore,
) -> Result<OpenRound> {
    let mut accepted = Vec::new();
    let mut deltas = HashMap::new();
    for a in snapshot.accepted.iter().filter(|a| a.round == round.0) {
        let seed = machine.shard_seed(round, ShardId(a.shard));
        let bytes = blobs.read(&a.payload)?;
        let decoded = Delta::decode(&bytes, layout, cfg.round.codec, seed)
            .with_context(|| format!("stored delta of round {} shard {}", a.round, a.shard))?;
        deltas.insert(LeaseId(a.lease), (decoded.delta, a.tokens));
        accepted.push(Accepted {
            lease: LeaseId(a.lease),
            peer: a.peer.clone(),
            shard: ShardId(a.shard),
            tokens: a.tokens,
        });
    }
    let decided: HashSet<u64> = snapshot
        .verdicts
        .iter()
        .filter(|v| decides_lease(&v.outcome))
        .map(|v| v.lease)
        .collect();
    let live = snapshot
        .leases
        .iter()
        .filter(|(id, l)| l.round == round.0 && !decided.contains(id))
        .map(|(id, l)| {
            let shard = ShardId(l.shard);
            let grant = Grant {
                lease: LeaseId(*id),
                round,
                shard,
                ranges: machine.shard_ranges(round, shard),
                seed: machine.shard_seed(round, shard),
                expires_at_ms: l.expires_at_ms,
                base_adapter: adapter,
            };
            (grant, l.peer.clone())
        })
        .collect();
    Ok(OpenRound {
        accepted,
        deltas,
        live,
    })
}

/// Goes through the stored verdicts in order, as the shell did when it gave them; returns
/// the decided leases.
pub fn replay_verdicts(
    verdicts: &[VerdictRecord],
    reputation: &mut Reputation,
    structure: &mut StructureState,
    status: &mut Status,
    peers: &mut HashMap<PeerId, PeerStatus>,
    dense_fp32_bytes: u64,
) -> HashMap<LeaseId, Decided> {
    let mut decided = HashMap::with_capacity(verdicts.len());
    for v in verdicts {
        let accepted = v.outcome == Verdict::Accepted;
        status.tally(v, if accepted { dense_fp32_bytes } else { 0 });
        if let Ok(id) = v.peer.parse::<PeerId>() {
            let p = peers.entry(id).or_insert_with(|| PeerStatus {
                peer: v.peer.clone(),
                ..Default::default()
            });
            p.tally(v);
        }
        if accepted && let Some(norm) = v.norm {
            structure.accepted(norm);
        }
        if let Some(hash) = v.payload_hash.as_deref().and_then(|h| h.parse().ok()) {
            structure.remember(hash, (Round(v.round), ShardId(v.shard)));
        }
        reputation.record(&v.peer, &v.outcome, v.replay.is_some());
        if decides_lease(&v.outcome) {
            decided.entry(LeaseId(v.lease)).or_insert_with(|| Decided {
                peer: v.peer.clone(),
                payload_hash: v.payload_hash.clone(),
                verdict: v.outcome.clone(),
            });
        }
    }
    decided
}
