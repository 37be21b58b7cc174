//! What the check book takes and gives: its rules, the actions it asks of the shell, the checks
//! it hands out and why it refuses a report.

use herd_protocol::sketch::Agreement;
use herd_protocol::{LeaseId, Round, ShardId};

use crate::round::PeerKey;
use crate::verify::replay::ReplayTolerance;

/// How many checkers, how often the coordinator looks itself, and how long checks may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckPolicy {
    /// Checkers per drawn submission of a new or suspect peer, and of a trusted one.
    pub checkers_new: u32,
    pub checkers_trusted: u32,
    /// Share of fully agreed targets the coordinator replays as well.
    pub spot_rate: f64,
    /// Share of check requests with no real check to give that get a canary.
    pub canary_rate: f64,
    /// How long a target waits for checkers to take its checks before the coordinator
    /// replays it itself.
    pub take_ms: u64,
    /// How long a checker has for a check once it took it.
    pub lease_ms: u64,
    pub tolerance: ReplayTolerance,
}

/// Why the coordinator replays a target itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnReplay {
    /// A checker and the submitter disagree.
    Arbitration,
    /// Drawn among targets whose checks all agreed.
    Spot,
    /// Not enough checkers took its checks in time, or a check expired.
    NoChecker,
    /// A checker that agreed with it was banned.
    Reopened,
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckAction {
    /// The submission passed its checks: it counts (`Event::Verified` with `Ok`). `agreement`:
    /// of its sketch with the last check's (or the coordinator's replay).
    Passed {
        lease: LeaseId,
        agreement: Agreement,
    },
    /// The submitter's sketch differs from the truth: reject it (a failed replay).
    Failed {
        lease: LeaseId,
        agreement: Agreement,
    },
    /// Replay this target and report the result with [`CheckBook::truth`].
    ReplayYourself { lease: LeaseId, why: OwnReplay },
    /// The checker's report on `check` differs from the truth (or is malformed): ban it.
    BanChecker {
        peer: PeerKey,
        check: LeaseId,
        shard: ShardId,
        reason: String,
    },
    /// A checker's report on `check` agreed: credit it. `agreement`: of its sketch with the
    /// submitter's (or the coordinator's replay, when that judged it).
    Credit {
        peer: PeerKey,
        check: LeaseId,
        shard: ShardId,
        agreement: Agreement,
    },
    /// A report that waited for an arbitration will not be judged: its target left the book
    /// (rejected on other grounds, its submitter banned) or the coordinator's replay failed.
    /// Answer it; no credit, no strike.
    Void { peer: PeerKey, check: LeaseId },
    /// A checker was banned after vouching for `submitter`: the trust those checks earned is
    /// void.
    Distrust { submitter: PeerKey },
    /// A submission that passed on checkers' word failed the coordinator's replay when it was
    /// reopened: ban its submitter (which drops its accepted shards of the open round).
    Overturned {
        lease: LeaseId,
        submitter: PeerKey,
        agreement: Agreement,
    },
}

/// A check handed to a peer: everything its lease needs is the target's.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckGrant {
    pub check: LeaseId,
    /// The submission it checks (the shell builds the lease from that lease's round and shard).
    pub target: LeaseId,
    pub round: Round,
    pub shard: ShardId,
    pub expires_at_ms: u64,
}

/// Why a report was not taken (answered, never a strike: it may be late or lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportRefused {
    /// No such check out (expired, its round closed, or never issued).
    Unknown,
    /// The check is another peer's.
    NotYours,
    /// Round or shard differ from the check's.
    Mismatch,
}
