//! Layer 4: the coordinator trains the shard again, through the node's own code path
//! ([`herd_model::shard::train_shard`]) from θ_r with the lease's seed, and compares the
//! sketch of its delta with the sketch the node sent. Honest results differ only by
//! floating-point noise, whose size `cargo xtask calibrate` measures; the tolerance in
//! `run.toml` comes from there.

use herd_model::Llama;
use herd_model::data::Dataset;
use herd_model::lora::Lora;
use herd_model::shard::train_shard;
use herd_protocol::delta::Delta;
use herd_protocol::messages::{Lease, RejectReason};
use herd_protocol::sketch::{Agreement, agreement};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplayTolerance {
    pub min_cosine: f64,
    pub max_rel_error: f64,
}

impl ReplayTolerance {
    /// Whether two sketches that agree this well are the same training (up to honest noise).
    pub fn accepts(&self, a: &Agreement) -> bool {
        a.cosine >= self.min_cosine && a.rel_error <= self.max_rel_error
    }
}

/// The delta an honest node would have sent for `lease`, trained from a copy of `theta`.
pub fn replay(
    model: &Llama,
    theta: &Lora,
    data: &Dataset,
    lease: &Lease,
) -> herd_model::Result<Delta> {
    let lora = theta.try_clone(model.config())?;
    Ok(train_shard(model, &lora, data, lease, false, |_| {
        std::ops::ControlFlow::Continue(())
    })?
    .delta)
}

/// Compares the node's sketch with the replay's (both under the lease's seed).
pub fn judge(
    submitted_sketch: &[f32],
    replayed_sketch: &[f32],
    tol: &ReplayTolerance,
) -> (Agreement, Result<(), RejectReason>) {
    let a = agreement(submitted_sketch, replayed_sketch);
    let result = if tol.accepts(&a) {
        Ok(())
    } else {
        Err(RejectReason::ReplayMismatch {
            cosine: a.cosine,
            rel_error: a.rel_error,
        })
    };
    (a, result)
}
