//! The coordinator's public state, as `/v1/status` and `/v1/checkpoints` show it.

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::ledger::{Credit, Totals};

/// What a peer has done, as far as the coordinator knows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer: String,
    pub device: String,
    pub connected: bool,
    /// Accepted and rejected shards, tokens accepted.
    #[serde(flatten)]
    pub credit: Credit,
    /// `new`, `trusted`, `suspect` or `banned` (see [`crate::verify::reputation::Standing`]).
    #[serde(default)]
    pub standing: String,
    /// When the coordinator last heard from the peer (ms since the Unix epoch; 0 = not since
    /// this start).
    #[serde(default)]
    pub last_seen_ms: u64,
    /// Tokens of its last accepted shard over the time from its lease to its submission:
    /// the peer's training speed as the run sees it (fetches and upload included).
    #[serde(default)]
    pub tokens_per_second: f64,
}

/// Where one round's wall time went, as the coordinator saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundTime {
    pub round: u64,
    /// From the round's opening (or the coordinator's start) to its commit.
    pub seconds: f64,
    /// The coordinator's effect checks and replays of the round's submissions.
    pub verification_seconds: f64,
    /// Averaging, the outer step, the held-out evaluation and the checkpoint.
    pub aggregation_seconds: f64,
}

/// A snapshot of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub run: String,
    pub peer_id: String,
    /// Where nodes dial it: each listen address with `/p2p/<peer_id>`, as `--coordinator` takes it.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The round in progress (or the number of rounds done when finished).
    pub round: u64,
    pub rounds_total: u64,
    pub rounds_completed: u64,
    /// Shards a round is cut into, and how many accepted ones close it.
    #[serde(default)]
    pub shards: u64,
    #[serde(default)]
    pub quorum: u64,
    pub finished: bool,
    /// Held-out loss after each round; index 0 = before any training.
    pub heldout_loss: Vec<f64>,
    pub accepted_this_round: u64,
    pub active_leases: u64,
    /// What the verdicts add up to: bytes, accepted deltas, rejects, verification time.
    #[serde(flatten)]
    pub totals: Totals,
    /// Payload bytes of every submission received, accepted or not (since this start).
    #[serde(default)]
    pub bytes_received: u64,
    /// Blob bytes sent to peers over libp2p (since this start).
    #[serde(default)]
    pub blob_bytes_served: u64,
    /// Leases granted (since this start).
    #[serde(default)]
    pub leases_granted: u64,
    /// Check leases granted (since this start); real checks and canaries alike.
    #[serde(default)]
    pub checks_granted: u64,
    pub peers: Vec<PeerStatus>,
    pub checkpoints: Vec<Checkpoint>,
    /// The last rounds committed since this start (256 at most): wall time and where it went.
    #[serde(default)]
    pub round_times: Vec<RoundTime>,
}

/// A peer's credit: what of its work went into the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    pub peer: String,
    pub accepted_shards: u64,
    pub tokens: u64,
    pub rejected: u64,
}

/// Every peer's credit, most tokens first (ties by peer id, so the order is stable).
pub fn contributions<'a>(
    credit: impl Iterator<Item = (&'a crate::round::PeerKey, Credit)>,
) -> Vec<Contribution> {
    let mut list: Vec<Contribution> = credit
        .map(|(peer, c)| Contribution {
            peer: peer.to_string(),
            accepted_shards: c.accepted,
            tokens: c.tokens,
            rejected: c.rejected,
        })
        .collect();
    list.sort_by(|a, b| b.tokens.cmp(&a.tokens).then_with(|| a.peer.cmp(&b.peer)));
    list
}
