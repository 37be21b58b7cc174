//! herd's wire protocol: what nodes and the coordinator say to each other, and how.
//!
//! # Layout
//! - [`ids`]: content ids (blake3), rounds, shards, leases, sample ranges.
//! - [`messages`]: versioned requests and responses, with their size caps.
//! - [`delta`]: the payload of a submission (a LoRA update) and its checked decoding.
//! - [`signing`]: the canonical bytes a submission signature covers.
//! - [`framing`]: length-prefixed bincode with caps checked before allocating.
//! - [`net`]: the libp2p behaviour both sides run.
//!
//! Everything but `net` is pure data: no I/O, no tch, so each decoder can be fuzzed alone.

pub mod delta;
pub mod framing;
pub mod ids;
pub mod messages;
pub mod net;
pub mod signing;

pub use ids::{ContentId, LeaseId, ParseContentIdError, Round, SampleRange, ShardId};
