//! What the round machine knows of a run: its shape, and how shards map to data and seeds.

use herd_protocol::{Round, SampleRange, ShardId};

/// Everything the machine needs to know about the run.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineConfig {
    pub shards: u32,
    pub quorum: u32,
    pub lease_ms: u64,
    /// Rounds to run; the machine finishes after this many.
    pub rounds: u64,
    /// Examples in the training data.
    pub data_len: u64,
    pub samples_per_shard: u64,
    pub seed: u64,
    /// Stragglers: a round still open after this multiple of the median of recent rounds'
    /// durations closes with what it has, if that is at least `deadline_quorum` accepted
    /// shards (0 turns the deadline off).
    pub straggler_multiple: f64,
    pub deadline_quorum: u32,
}

impl MachineConfig {
    /// The examples shard `shard` of `round` covers: consecutive slices that walk through the
    /// data round after round, wrapping at the end.
    pub fn shard_ranges(&self, round: Round, shard: ShardId) -> Vec<SampleRange> {
        let n = self.data_len.max(1);
        let k = self.samples_per_shard.clamp(1, n);
        let start = (round.0 * self.shards as u64 + shard.0 as u64) * k % n;
        let end = start + k;
        if end <= n {
            vec![SampleRange { start, end }]
        } else {
            vec![
                SampleRange { start, end: n },
                SampleRange {
                    start: 0,
                    end: end - n,
                },
            ]
        }
    }

    /// The training seed of a shard: distinct per run, round and shard; known to replays.
    pub fn shard_seed(&self, round: Round, shard: ShardId) -> u64 {
        let mut h = blake3::Hasher::new();
        h.update(&self.seed.to_le_bytes());
        h.update(&round.0.to_le_bytes());
        h.update(&shard.0.to_le_bytes());
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
    }
}
