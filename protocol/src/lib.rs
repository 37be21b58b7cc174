//! herd's wire protocol: what nodes and the coordinator say to each other, and how.
//!
//! # Layout
//! - [`admission`]: the proof of work a new identity pays before its first lease.
//! - [`ids`]: content ids (blake3), rounds, shards, leases, sample ranges.
//! - [`messages`]: versioned requests and responses, with their size caps.
//! - [`delta`]: the payload of a submission (a LoRA update) and its checked decoding.
//! - [`codec`]: how one tensor's values travel (signs of seeded blocks, top-k + int8, dense
//!   int8, raw fp32).
//! - [`sketch`]: the CountSketch of an uncompressed delta that replays are compared with.
//! - `fuzz` (tests only): mutation fuzzing of every decoder (`cargo xtask fuzz` runs millions).
//! - [`signing`]: the canonical bytes a submission signature covers.
//! - [`framing`]: length-prefixed bincode with caps checked before allocating.
//! - [`outline`]: blake3 chaining values of a blob's 1 MiB groups, so each downloaded group is
//!   checked against the blob's id on arrival.
//! - [`blobs`]: the content-addressed blob store both sides keep and serve from.
//! - [`blob_server`]: answering blob requests, with group reads off the network loop.
//! - [`manifest`]: the signed record of what a checkpoint was built from (read and written
//!   as `manifest.json` in the checkpoint's dir).
//! - [`net`]: the libp2p behaviour both sides run.
//!
//! `net`, `blobs`, `blob_server` and `manifest` do I/O, and `framing` and `outline` read or
//! write streams they are handed; the rest is pure data (no I/O, no tch), and every decoder
//! works on bytes in memory, so each can be fuzzed alone. See `docs/architecture.md` for how
//! the crates fit together.

pub mod admission;
pub mod blob_server;
pub mod blobs;
pub mod codec;
pub mod delta;
pub mod framing;
#[cfg(test)]
mod fuzz;
pub mod ids;
pub mod manifest;
pub mod messages;
pub mod net;
pub mod outline;
pub mod signing;
pub mod sketch;

pub use ids::{ContentId, LeaseId, ParseContentIdError, Round, SampleRange, ShardId};
