//! Verification in layers, cheap first (`docs/architecture.md` follows a submission through
//! them). Each layer is its own module, testable alone:
//!
//! 1. [`envelope`]: signature by the sending peer's key over the lease binding, payload hash.
//!    (The lease rules themselves live in the round machine.)
//! 2. [`structure`]: decode within caps, codec, counts, finiteness, not zero, norm within a
//!    multiple of the running median, not a copy of another submission.
//! 3. [`effect`]: applied alone, the delta lowers the loss on a sample of the shard's own
//!    data and does not raise the held-out loss past a threshold (tensor work).
//! 4. [`replay`]: sampled by standing, the coordinator retrains the shard with the lease's
//!    seed and compares sketches against the calibrated tolerance (tensor work).
//! 5. [`reputation`]: per-peer standing, replay rates, strikes and bans.
//!
//! Every verdict is committed to the store (`crate::store`, one redb transaction) before the
//! node hears it, and appended to the [`log`] (`verdicts.jsonl`, not fsynced) for people to
//! read.

pub mod effect;
pub mod envelope;
pub mod log;
pub mod replay;
pub mod reputation;
pub mod structure;
