//! herd's coordinator: it splits a run into rounds and shards, leases shards to contributor
//! nodes over libp2p, checks and averages their LoRA deltas, and publishes checkpoints.
//!
//! # Layout
//! - [`round`]: the pure round state machine (events + time in, actions out).
//! - [`server`]: the I/O shell around it (libp2p, HTTP, blobs, the engine).
//! - [`engine`]: model, global adapter, outer optimizer, evaluation (tch, off the runtime).
//! - [`verify`]: the layers a submission passes (envelope, structure, effect, replay,
//!   reputation) and the durable verdict log.
//! - [`aggregate`]: robust token-weighted mean and DiLoCo's outer Nesterov step.
//! - [`http`]: the HTTP API; [`status`]: what it shows; [`metrics`]: the same for Prometheus.
//! - [`store`]: the durable state (redb): run, leases, verdicts, accepted deltas.
//! - [`config`]: the `run.toml` of a run.
//! - [`audit`]: rebuilds the adapter from θ_0 and the recorded deltas, to compare bit for bit.
//! - [`resume`]: picking a run up after a restart.
//! - [`dashboard`]: `herd-coordinator dashboard`, the operator's terminal view of `/v1/status`.
//! - [`simulate`]: simulated peers through the real round logic, for `cargo xtask bench`.
//! - [`calibrate`]: how far honest replays differ across thread counts (the replay tolerance).

pub mod aggregate;
pub mod audit;
pub mod calibrate;
pub mod config;
pub mod dashboard;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod resume;
pub mod round;
pub mod server;
pub mod simulate;
pub mod status;
pub mod store;
pub mod verify;
