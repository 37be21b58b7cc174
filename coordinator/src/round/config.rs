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
    /// Who may hold how many shards (see [`LeasePolicy`]).
    pub leases: LeasePolicy,
}

/// Fair shares of a round's shards in an open network, where anyone may ask for work.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasePolicy {
    /// Live leases one peer may hold at once.
    pub per_peer: u32,
    /// A shard free for this long may go to a trusted peer past its `per_peer` limit: shards
    /// go first to peers without one, but do not sit idle.
    pub idle_grace_ms: u64,
    /// The share of a round's shards that peers not (yet) trusted may hold at once, together
    /// (at least one shard): a flood of new identities cannot take a round.
    pub newcomer_share: f64,
    /// A shard a peer not trusted has held longer than this multiple of the usual time from
    /// grant to accepted submission may be leased to a trusted peer as well (a backup, as for
    /// MapReduce stragglers); the first accepted delta counts. 0 turns backups off.
    pub backup_after: f64,
    /// A lease that ends without a submission (expired or handed back) bars its peer from new
    /// leases for this long, doubling with each such lease in a row, up to `max_backoff_ms`.
    pub miss_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Leases in a row that expired without a submission (no accepted shard between) that ban
    /// the peer. 0: never.
    pub ban_after_expiries: u32,
}

impl LeasePolicy {
    /// No per-peer limit, no newcomer share, no backoff: the rules of a closed group of
    /// machines that trust each other.
    pub fn unlimited(shards: u32) -> Self {
        LeasePolicy {
            per_peer: shards,
            idle_grace_ms: 0,
            newcomer_share: 1.0,
            backup_after: 0.0,
            miss_backoff_ms: 0,
            max_backoff_ms: 0,
            ban_after_expiries: 0,
        }
    }

    /// Shards peers not trusted may hold at once in a round of `shards`.
    pub fn newcomer_cap(&self, shards: u32) -> u32 {
        ((self.newcomer_share * shards as f64).floor() as u32).clamp(1, shards)
    }

    /// How long a peer waits after `misses` leases in a row ended without a submission.
    pub fn backoff_ms(&self, misses: u32) -> u64 {
        if misses == 0 || self.miss_backoff_ms == 0 {
            return 0;
        }
        let doubled = self
            .miss_backoff_ms
            .saturating_mul(1u64 << (misses - 1).min(32));
        doubled.min(self.max_backoff_ms.max(self.miss_backoff_ms))
    }
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
