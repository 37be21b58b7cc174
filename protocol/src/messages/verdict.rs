//! The coordinator's answer to a submission or a check report: accepted, or why not, with
//! the stable labels metrics and logs count reasons by and which reasons are strikes.

use serde::{Deserialize, Serialize};

/// The coordinator's decision on a submission, recorded before it is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    Accepted,
    Rejected(RejectReason),
}

/// Why a submission was refused. Each reaches the node, the logs, the metrics and the
/// verdict log. Floats are kept as sent in the verdict for operators to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RejectReason {
    UnknownLease,
    ExpiredLease,
    NotYourLease,
    /// The lease's round is over.
    StaleRound,
    /// The delta was computed from another adapter than the round's.
    WrongBaseAdapter,
    /// run / round / shard do not match the lease.
    LeaseMismatch,
    BadSignature,
    PayloadHashMismatch,
    /// Bigger than any honest encoding of the run's layout.
    PayloadTooLarge {
        bytes: u64,
        cap: u64,
    },
    /// The payload does not decode, or has the wrong codec, counts or indices.
    Malformed(String),
    /// NaN or infinite values.
    NonFinite(String),
    /// This lease already has a submission.
    Duplicate,
    /// All zeros: nothing was trained.
    ZeroDelta,
    /// Larger than the allowed multiple of the median accepted norm.
    NormTooLarge {
        norm: f64,
        bound: f64,
    },
    /// The same payload as another submission.
    CopiedDelta,
    /// Applied alone, the delta did not lower the loss on the shard's own data enough.
    NoImprovement {
        measured: f64,
        required: f64,
    },
    /// Applied alone, the delta raised the held-out loss past the threshold.
    HeldoutRegression {
        before: f64,
        after: f64,
    },
    /// The coordinator recomputed the shard and got something else.
    ReplayMismatch {
        cosine: f64,
        rel_error: f64,
    },
    /// This peer is banned; the text says why.
    Banned(String),
    /// Another peer's delta for the same shard (a backup lease) was accepted first.
    ShardTaken,
    /// A check report differs from the truth (the coordinator's own replay); the text says
    /// by how much.
    CheckMismatch(String),
    /// The payload does not point where the sketch sent with it says (cosine between the
    /// payload's sketch and the sent one under the minimum).
    OffSketch {
        cosine: f64,
        min: f64,
    },
    /// A check report that will not be judged: its submission was withdrawn (rejected on
    /// other grounds, its peer banned) or the coordinator could not replay it. No strike, no
    /// credit.
    CheckVoid,
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::UnknownLease => f.write_str("unknown lease"),
            RejectReason::ExpiredLease => f.write_str("lease expired"),
            RejectReason::NotYourLease => f.write_str("lease belongs to another peer"),
            RejectReason::StaleRound => f.write_str("round already closed"),
            RejectReason::WrongBaseAdapter => f.write_str("delta computed from the wrong adapter"),
            RejectReason::LeaseMismatch => {
                f.write_str("run, round or shard do not match the lease")
            }
            RejectReason::BadSignature => f.write_str("bad signature"),
            RejectReason::PayloadHashMismatch => f.write_str("payload hash mismatch"),
            RejectReason::PayloadTooLarge { bytes, cap } => {
                write!(f, "payload of {bytes} bytes is over the cap of {cap} bytes")
            }
            RejectReason::Malformed(why) => write!(f, "malformed delta: {why}"),
            RejectReason::NonFinite(why) => write!(f, "non-finite values: {why}"),
            RejectReason::Duplicate => f.write_str("duplicate submission"),
            RejectReason::ZeroDelta => f.write_str("the delta is all zeros"),
            RejectReason::NormTooLarge { norm, bound } => {
                write!(f, "delta norm {norm:.4} is over the bound {bound:.4}")
            }
            RejectReason::CopiedDelta => f.write_str("copy of another submission's payload"),
            RejectReason::NoImprovement { measured, required } => write!(
                f,
                "loss on the shard dropped by {measured:.4}, at least {required:.4} required"
            ),
            RejectReason::HeldoutRegression { before, after } => {
                write!(f, "held-out loss rose from {before:.4} to {after:.4}")
            }
            RejectReason::ReplayMismatch { cosine, rel_error } => write!(
                f,
                "replay differs: cosine {cosine:.4}, relative error {rel_error:.4}"
            ),
            RejectReason::Banned(why) => write!(f, "banned: {why}"),
            RejectReason::ShardTaken => {
                f.write_str("another delta for this shard was accepted first")
            }
            RejectReason::CheckMismatch(why) => write!(f, "wrong check: {why}"),
            RejectReason::OffSketch { cosine, min } => write!(
                f,
                "the payload differs from its sketch: cosine {cosine:.3}, at least {min:.3} required"
            ),
            RejectReason::CheckVoid => {
                f.write_str("check not judged: its submission was withdrawn or not replayed")
            }
        }
    }
}

impl RejectReason {
    /// A short stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            RejectReason::UnknownLease => "unknown_lease",
            RejectReason::ExpiredLease => "expired_lease",
            RejectReason::NotYourLease => "not_your_lease",
            RejectReason::StaleRound => "stale_round",
            RejectReason::WrongBaseAdapter => "wrong_base_adapter",
            RejectReason::LeaseMismatch => "lease_mismatch",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::PayloadHashMismatch => "payload_hash_mismatch",
            RejectReason::PayloadTooLarge { .. } => "payload_too_large",
            RejectReason::Malformed(_) => "malformed",
            RejectReason::NonFinite(_) => "non_finite",
            RejectReason::Duplicate => "duplicate",
            RejectReason::ZeroDelta => "zero_delta",
            RejectReason::NormTooLarge { .. } => "norm_too_large",
            RejectReason::CopiedDelta => "copied_delta",
            RejectReason::NoImprovement { .. } => "no_improvement",
            RejectReason::HeldoutRegression { .. } => "heldout_regression",
            RejectReason::ReplayMismatch { .. } => "replay_mismatch",
            RejectReason::Banned(_) => "banned",
            RejectReason::ShardTaken => "shard_taken",
            RejectReason::CheckMismatch(_) => "check_mismatch",
            RejectReason::OffSketch { .. } => "off_sketch",
            RejectReason::CheckVoid => "check_void",
        }
    }

    /// Whether this says something about the peer's honesty or health (a strike against its
    /// standing) rather than about timing, which honest peers run into.
    pub fn is_strike(&self) -> bool {
        !matches!(
            self,
            RejectReason::UnknownLease
                | RejectReason::ExpiredLease
                | RejectReason::StaleRound
                | RejectReason::WrongBaseAdapter
                | RejectReason::Duplicate
                | RejectReason::Banned(_)
                | RejectReason::ShardTaken
                | RejectReason::CheckVoid
        )
    }
}
