//! The coordinator's public state, as `/v1/status` and `/v1/checkpoints` show it.

use serde::{Deserialize, Serialize};

/// One file of a checkpoint: name, size, blake3 (what its signed manifest lists too).
pub use herd_protocol::manifest::ManifestFile as CheckpointFile;

/// A published checkpoint (a PEFT adapter dir).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: String,
    pub round: u64,
    pub heldout_loss: f64,
    pub files: Vec<CheckpointFile>,
}

/// What a peer has done, as far as the coordinator knows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer: String,
    pub device: String,
    pub connected: bool,
    pub accepted: u64,
    pub rejected: u64,
    pub tokens: u64,
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

/// A recent rejection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectRecord {
    pub peer: String,
    pub round: u64,
    pub reason: String,
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
    /// Payload bytes of accepted deltas, and what they would be as dense fp32.
    pub bytes_uploaded: u64,
    pub bytes_dense_fp32: u64,
    /// Payload bytes of every submission received, accepted or not (since this start).
    #[serde(default)]
    pub bytes_received: u64,
    /// Blob bytes sent to peers over libp2p (since this start).
    #[serde(default)]
    pub blob_bytes_served: u64,
    /// Leases granted (since this start).
    #[serde(default)]
    pub leases_granted: u64,
    pub accepted_deltas: u64,
    /// Rejections so far, by reason label.
    pub rejects_by_reason: std::collections::BTreeMap<String, u64>,
    /// Seconds spent on effect checks and on replays, and replays done.
    pub verify_seconds: f64,
    pub replay_seconds: f64,
    pub replays: u64,
    pub peers: Vec<PeerStatus>,
    pub recent_rejects: Vec<RejectRecord>,
    pub checkpoints: Vec<Checkpoint>,
}

impl Status {
    /// Counts one recorded verdict (`dense_fp32` = the bytes of its delta as dense fp32): the
    /// same whether it was just decided or read back after a restart.
    pub fn tally(&mut self, v: &crate::verify::log::VerdictRecord, dense_fp32: u64) {
        if v.outcome == herd_protocol::messages::Verdict::Accepted {
            self.bytes_uploaded += v.payload_bytes;
            self.bytes_dense_fp32 += dense_fp32;
            self.accepted_deltas += 1;
        } else {
            *self.rejects_by_reason.entry(v.verdict.clone()).or_default() += 1;
            self.recent_rejects.push(RejectRecord {
                peer: v.peer.clone(),
                round: v.round,
                reason: v.reason.clone(),
            });
            if self.recent_rejects.len() > RECENT_REJECTS {
                self.recent_rejects.remove(0);
            }
        }
        self.verify_seconds += v.verify_seconds;
        self.replay_seconds += v.replay_seconds;
        self.replays += v.replay.is_some() as u64;
    }
}

impl PeerStatus {
    /// Counts one verdict on this peer's work.
    pub fn tally(&mut self, v: &crate::verify::log::VerdictRecord) {
        if v.outcome == herd_protocol::messages::Verdict::Accepted {
            self.accepted += 1;
            self.tokens += v.tokens;
        } else {
            self.rejected += 1;
        }
    }
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
pub fn contributions(s: &Status) -> Vec<Contribution> {
    let mut list: Vec<Contribution> = s
        .peers
        .iter()
        .map(|p| Contribution {
            peer: p.peer.clone(),
            accepted_shards: p.accepted,
            tokens: p.tokens,
            rejected: p.rejected,
        })
        .collect();
    list.sort_by(|a, b| b.tokens.cmp(&a.tokens).then_with(|| a.peer.cmp(&b.peer)));
    list
}

/// Rejections kept in [`Status::recent_rejects`].
pub const RECENT_REJECTS: usize = 50;
