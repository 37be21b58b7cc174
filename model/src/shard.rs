//! One lease, trained: the code path the node runs to contribute and the coordinator runs to
//! replay, so an honest replay differs from the node's result only by floating-point noise
//! (thread counts, kernels), which `cargo xtask calibrate` measures.

use herd_protocol::delta::Delta;
use herd_protocol::messages::Lease;

use crate::data::{Dataset, indices_of};
use crate::delta::lora_delta;
use crate::error::Result;
use crate::llama::Llama;
use crate::lora::Lora;
use std::ops::ControlFlow;

use crate::train::{LrSchedule, StepReport, TrainConfig, train_lora_until};

/// What training one shard produced.
#[derive(Debug)]
pub struct ShardOutcome {
    /// `θ' − θ_r`, uncompressed.
    pub delta: Delta,
    /// Loss on the shard's examples before and after (NaN when not measured).
    pub loss_before: f64,
    pub loss_after: f64,
    pub tokens: u64,
}

/// The inner-loop settings a lease prescribes.
pub fn train_config(lease: &Lease, measure_loss: bool) -> TrainConfig {
    TrainConfig {
        steps: lease.inner_steps as usize,
        batch_size: lease.batch_size as usize,
        lr: lease.lr,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        seed: lease.seed,
        schedule: LrSchedule::Constant,
        measure_loss,
    }
}

/// Trains `lora` (holding θ_r) in place on the lease's shard of `data` and returns the delta.
/// `measure_loss` adds a pass over a sample of the shard before and after (the node reports
/// both losses; a replay does not need them). `on_step` sees each step and may stop the training
/// ([`crate::ModelError::Cancelled`]).
pub fn train_shard(
    model: &Llama,
    lora: &Lora,
    data: &Dataset,
    lease: &Lease,
    measure_loss: bool,
    on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<ShardOutcome> {
    let before = lora.snapshot()?;
    let indices = indices_of(&lease.ranges, data.len())?;
    let report = train_lora_until(
        model,
        lora,
        data,
        &indices,
        &train_config(lease, measure_loss),
        on_step,
    )?;
    Ok(ShardOutcome {
        delta: lora_delta(&before, lora)?,
        loss_before: report.loss_before,
        loss_after: report.loss_after,
        tokens: report.tokens,
    })
}
