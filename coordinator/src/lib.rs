//! herd's coordinator: it splits a run into rounds and shards, leases shards to contributor
//! nodes over libp2p, checks and averages their LoRA deltas, and publishes checkpoints.
//! `docs/architecture.md` follows one submission through these modules.
//!
//! # Layout
//! - [`round`]: the pure round state machine (events + time in, actions out).
//! - [`ledger`]: what verdicts add up to (totals, credit, reputation, answers), applied by one
//!   function live and at restart.
//! - [`shell`]: the I/O around both (libp2p, HTTP, blobs, the engine's slot, the store).
//! - [`lease`]: the lease message a grant becomes.
//! - [`engine`]: model, global adapter, outer optimizer, evaluation (tch, off the runtime).
//! - [`verify`]: the layers a submission passes (envelope, structure, effect, replay,
//!   reputation) and the verdict log for people to read.
//! - [`checks`]: check leases: replays by peers, canaries, spot checks and arbitration
//!   (pure, like the round machine).
//! - [`aggregate`]: robust token-weighted mean and DiLoCo's outer Nesterov step.
//! - [`checkpoint`]: checkpoints, their signed manifests, and what is published.
//! - [`store`]: the durable state (redb): run, leases, verdicts, accepted deltas; resuming a
//!   run and auditing it.
//! - [`http`]: the HTTP API; [`status`]: what it shows; [`metrics`]: the same for Prometheus.
//! - [`config`]: the `run.toml` of a run.
//! - [`dashboard`]: `herd-coordinator dashboard`, the operator's terminal view of `/v1/status`.
//! - Tools: [`simulate`] (simulated peers through the real round logic, for `cargo xtask
//!   bench`), [`calibrate`] (how far honest replays differ: the replay tolerance) and
//!   [`rehearse`] (a run's learning in one process: codec, nodes and batch compared).

pub mod aggregate;
pub mod calibrate;
pub mod checkpoint;
pub mod checks;
pub mod config;
pub mod dashboard;
pub mod engine;
pub mod http;
pub mod lease;
pub mod ledger;
pub mod metrics;
pub mod rehearse;
pub mod round;
pub mod shell;
pub mod simulate;
pub mod status;
pub mod store;
pub mod verify;
