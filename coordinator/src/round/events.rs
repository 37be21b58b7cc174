//! The round machine's vocabulary: the events the shell feeds it and the actions it returns.

use herd_protocol::messages::{RejectReason, Verdict};
use herd_protocol::{ContentId, LeaseId, Round, SampleRange, ShardId};

/// A peer, by its libp2p identity (the key its submissions are signed with).
pub type PeerKey = libp2p::PeerId;

/// What the shell tells the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    LeaseRequested {
        peer: PeerKey,
        /// The peer is in good standing (see [`crate::verify::reputation::Standing`]): it may
        /// take shards newcomers may not.
        trusted: bool,
    },
    /// A submission whose payload the shell has already checked (`checked` is the outcome of
    /// signature, hash and structure checks, so the lease rules can take precedence).
    Submitted {
        peer: PeerKey,
        lease: LeaseId,
        round: Round,
        shard: ShardId,
        base_adapter: ContentId,
        tokens: u64,
        checked: Result<(), RejectReason>,
    },
    Returned {
        peer: PeerKey,
        lease: LeaseId,
    },
    /// Verification of a submission asked for with [`Action::Verify`] finished.
    Verified {
        lease: LeaseId,
        result: Result<(), RejectReason>,
    },
    /// The peer was banned: drop its accepted shards of the open round and its live leases.
    Banned {
        peer: PeerKey,
        reason: String,
    },
    /// The shell finished aggregating `round` into `adapter`.
    Aggregated {
        round: Round,
        adapter: ContentId,
    },
    Tick,
}

/// A lease as granted.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub lease: LeaseId,
    pub round: Round,
    pub shard: ShardId,
    pub ranges: Vec<SampleRange>,
    pub seed: u64,
    pub expires_at_ms: u64,
    pub base_adapter: ContentId,
}

/// An accepted shard, as aggregation needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub lease: LeaseId,
    pub peer: PeerKey,
    pub shard: ShardId,
    pub tokens: u64,
}

/// What the machine asks the shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Grant {
        peer: PeerKey,
        grant: Grant,
    },
    NoWork {
        peer: PeerKey,
        retry_after_ms: u64,
        finished: bool,
        reason: String,
    },
    /// The submission passed the lease rules: verify it, then report [`Event::Verified`].
    Verify {
        peer: PeerKey,
        lease: LeaseId,
        round: Round,
        shard: ShardId,
    },
    Verdict {
        peer: PeerKey,
        lease: LeaseId,
        verdict: Verdict,
    },
    /// An accepted delta no longer counts (its peer was banned); its shard is open again.
    Excluded {
        peer: PeerKey,
        lease: LeaseId,
        round: Round,
        shard: ShardId,
    },
    /// Answer to a return: `true` if the lease was live and its shard is open again.
    Returned {
        peer: PeerKey,
        lease: LeaseId,
        released: bool,
    },
    LeaseExpired {
        peer: PeerKey,
        lease: LeaseId,
        shard: ShardId,
    },
    /// Too many of the peer's leases expired without a submission: ban it (the shell records
    /// the ban and reports [`Event::Banned`]).
    Banned {
        peer: PeerKey,
        reason: String,
    },
    /// The round ran past its straggler deadline and closes with fewer than `quorum` shards
    /// (an [`Action::Aggregate`] follows); later submissions for it are stale.
    DeadlinePassed {
        round: Round,
        accepted: usize,
        waited_ms: u64,
    },
    /// Quorum reached: aggregate these accepted deltas into the next adapter.
    Aggregate {
        round: Round,
        accepted: Vec<Accepted>,
    },
    RoundOpened {
        round: Round,
        adapter: ContentId,
    },
    Finished {
        rounds: u64,
    },
}
