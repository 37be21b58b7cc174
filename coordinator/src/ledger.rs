//! The ledger: everything a verdict implies, kept in one place. Run totals, each peer's credit,
//! reputation (standing, strikes, bans), the structure layer's memory (accepted norms, payload
//! hashes seen) and the answer each decided lease got. Pure: [`Ledger::apply`] is the one
//! function that turns a recorded verdict into these effects, used live as verdicts are given
//! and at restart over the stored verdicts in order, so the two cannot drift apart.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result};
use herd_protocol::messages::{RejectReason, Verdict};
use herd_protocol::{ContentId, LeaseId, Round, ShardId};
use serde::{Deserialize, Serialize};

use crate::round::PeerKey;
use crate::verify::log::VerdictRecord;
use crate::verify::reputation::Reputation;
use crate::verify::structure::StructureState;

/// Rejections kept in [`Totals::recent_rejects`].
pub const RECENT_REJECTS: usize = 50;

/// What the run's verdicts add up to (shown flat in `/v1/status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    /// Payload bytes of accepted deltas, and what they would be as dense fp32.
    pub bytes_uploaded: u64,
    pub bytes_dense_fp32: u64,
    pub accepted_deltas: u64,
    /// Rejections so far, by reason label.
    pub rejects_by_reason: BTreeMap<String, u64>,
    /// Seconds spent on effect checks and on the coordinator's own replays, and replays done.
    pub verify_seconds: f64,
    pub replay_seconds: f64,
    pub replays: u64,
    /// Submissions whose replay peers did (check leases), and check reports credited.
    pub peer_checked: u64,
    pub checks: u64,
    pub recent_rejects: Vec<RejectRecord>,
}

/// A recent rejection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectRecord {
    pub peer: String,
    pub round: u64,
    pub reason: String,
}

/// A peer's credit: what of its work was accepted (shown flat in each `/v1/status` peer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Credit {
    pub accepted: u64,
    pub rejected: u64,
    pub tokens: u64,
    /// Check leases done and found right (credited work, no tokens of its own).
    #[serde(default)]
    pub checks: u64,
}

/// A decided submission: what it was and what it got.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub peer: PeerKey,
    pub payload_hash: Option<String>,
    pub verdict: Verdict,
}

impl Decided {
    /// Whether `peer` sending `payload_hash` again is this same submission.
    pub fn is_resubmission(&self, peer: PeerKey, payload_hash: &ContentId) -> bool {
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

#[derive(Debug, PartialEq)]
pub struct Ledger {
    /// One delta of the run's layout as dense fp32, in bytes (what compression is measured
    /// against).
    dense_fp32_bytes: u64,
    totals: Totals,
    credit: HashMap<PeerKey, Credit>,
    reputation: Reputation,
    structure: StructureState,
    decided: HashMap<LeaseId, Decided>,
}

impl Ledger {
    /// An empty ledger for a run whose deltas are `dense_fp32_bytes` as dense fp32.
    pub fn new(reputation: Reputation, dense_fp32_bytes: u64) -> Self {
        Ledger {
            dense_fp32_bytes,
            totals: Totals::default(),
            credit: HashMap::new(),
            reputation,
            structure: StructureState::default(),
            decided: HashMap::new(),
        }
    }

    /// The ledger a run had after `verdicts` (as stored, in the order given).
    pub fn restore(
        reputation: Reputation,
        dense_fp32_bytes: u64,
        verdicts: &[VerdictRecord],
    ) -> Result<Self> {
        let mut ledger = Ledger::new(reputation, dense_fp32_bytes);
        for v in verdicts {
            let peer: PeerKey = v.peer.parse().with_context(|| {
                format!("stored verdict on lease {}: peer `{}`", v.lease, v.peer)
            })?;
            ledger.apply(peer, v);
        }
        Ok(ledger)
    }

    /// Applies one recorded verdict of `peer`'s; returns the ban reason if it banned the peer.
    pub fn apply(&mut self, peer: PeerKey, v: &VerdictRecord) -> Option<String> {
        let accepted = v.outcome == Verdict::Accepted;
        let t = &mut self.totals;
        let credit = self.credit.entry(peer).or_default();
        if crate::checks::CheckBook::is_check(LeaseId(v.lease)) {
            // A checker's report: credit or a ban, nothing of a submission's.
            if accepted {
                t.checks += 1;
                credit.checks += 1;
            } else {
                *t.rejects_by_reason.entry(v.verdict.clone()).or_default() += 1;
                credit.rejected += 1;
            }
            return self.reputation.record(peer, &v.outcome, false);
        }
        if accepted {
            t.bytes_uploaded += v.payload_bytes;
            t.bytes_dense_fp32 += self.dense_fp32_bytes;
            t.accepted_deltas += 1;
            credit.accepted += 1;
            credit.tokens += v.tokens;
        } else {
            *t.rejects_by_reason.entry(v.verdict.clone()).or_default() += 1;
            t.recent_rejects.push(RejectRecord {
                peer: v.peer.clone(),
                round: v.round,
                reason: v.reason.clone(),
            });
            if t.recent_rejects.len() > RECENT_REJECTS {
                t.recent_rejects.remove(0);
            }
            credit.rejected += 1;
        }
        t.verify_seconds += v.verify_seconds;
        t.replay_seconds += v.replay_seconds;
        // A replay with no seconds of the coordinator's was done by peers.
        let own_replay = v.replay_seconds > 0.0;
        t.replays += (v.replay.is_some() && own_replay) as u64;
        t.peer_checked += (v.replay.is_some() && !own_replay) as u64;
        if accepted && let Some(norm) = v.norm {
            self.structure.accepted(norm);
        }
        // The structure check remembers a hash as it passes; a verdict remembers it too, so a
        // restarted coordinator knows every payload that was decided.
        if let Some(hash) = v.payload_hash.as_deref().and_then(|h| h.parse().ok()) {
            self.structure
                .remember(hash, (Round(v.round), ShardId(v.shard)));
        }
        if decides_lease(&v.outcome) {
            self.decided
                .entry(LeaseId(v.lease))
                .or_insert_with(|| Decided {
                    peer,
                    payload_hash: v.payload_hash.clone(),
                    verdict: v.outcome.clone(),
                });
        }
        self.reputation.record(peer, &v.outcome, v.replay.is_some())
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// `peer`'s credit (zero for a peer with no verdict).
    pub fn credit(&self, peer: &PeerKey) -> Credit {
        self.credit.get(peer).copied().unwrap_or_default()
    }

    /// Every peer with a verdict.
    pub fn peers(&self) -> impl Iterator<Item = &PeerKey> {
        self.credit.keys()
    }

    /// A replay of the coordinator's own that no verdict records (a reopened submission, decided
    /// before). Live only: a restart forgets its seconds.
    pub fn count_own_replay(&mut self, seconds: f64) {
        self.totals.replay_seconds += seconds;
        self.totals.replays += 1;
    }

    /// A banned checker vouched for `peer`: the trust its checks earned is void, so `peer` is
    /// checked like a new peer again. Live only: a restart keeps the trust.
    pub fn distrust(&mut self, peer: &PeerKey) {
        self.reputation.distrust(peer);
    }

    /// Bans `peer` for what it did outside a verdict (its leases expired unused). Held for
    /// this coordinator's life: the store records verdicts, and this is none.
    pub fn ban(&mut self, peer: PeerKey, reason: &str) {
        self.reputation.ban(peer, reason);
    }

    pub fn reputation(&self) -> &Reputation {
        &self.reputation
    }

    /// The structure layer's memory, for checking the next submission.
    pub fn structure_mut(&mut self) -> &mut StructureState {
        &mut self.structure
    }

    /// The verdict lease `lease` was settled with, if it was.
    pub fn decided(&self, lease: LeaseId) -> Option<&Decided> {
        self.decided.get(&lease)
    }
}

#[cfg(test)]
mod tests;
