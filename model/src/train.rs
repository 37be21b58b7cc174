//! The inner loop: H AdamW steps from a given adapter state on given examples, with gradient
//! clipping; also full-parameter pretraining (used to make the embedded default base model).
//!
//! Deterministic for the same seed, device and thread count: the only randomness is the batch
//! order, drawn from ChaCha with the lease's seed.

use std::ops::ControlFlow;

use serde::Serialize;
use tch::nn::{OptimizerConfig, VarStore};

use crate::data::{BatchOrder, Dataset, Example, collate};
use crate::error::{ModelError, Result};
use crate::eval::evaluate;
use crate::llama::Llama;
use crate::lora::Lora;

/// Examples the before/after loss is measured on at most. A shard may hold thousands of
/// examples (SmolLM2's demo: 2,000, a 7-minute pass on one core); a fixed sample keeps the
/// measurement a small share of the training, and the coordinator's effect check draws its
/// own sample anyway.
pub const LOSS_SAMPLE: usize = 32;

/// Mixed into the seed for the loss sample, so it is not the first batches' examples.
const LOSS_SAMPLE_SALT: u64 = 0x6c6f_7373; // "loss"

/// How the learning rate moves over the steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum LrSchedule {
    Constant,
    /// Linear warm-up, then cosine decay to 10% of the peak.
    Cosine {
        warmup_steps: usize,
    },
}

/// Hyper-parameters of one training run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Global L2 norm the gradients are clipped to before each step.
    pub max_grad_norm: f64,
    pub seed: u64,
    pub schedule: LrSchedule,
    /// Evaluate loss on a sample of the training examples (at most [`LOSS_SAMPLE`], drawn with
    /// the seed) before and after: two forward passes over the sample.
    pub measure_loss: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            batch_size: 8,
            lr: 1e-3,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 0,
            schedule: LrSchedule::Constant,
            measure_loss: true,
        }
    }
}

/// One step as it happened, for progress bars and logs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    /// Real tokens in this step's batch.
    pub tokens: usize,
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainReport {
    /// Loss on the training examples before the first step (NaN unless `measure_loss`).
    pub loss_before: f64,
    pub loss_after: f64,
    /// Real tokens processed over all steps.
    pub tokens: u64,
    /// Loss targets processed over all steps.
    pub targets: u64,
    pub step_losses: Vec<f64>,
}

/// Trains `lora`'s trainable factors in place for `cfg.steps` steps on `indices` of `data`.
pub fn train_lora(
    model: &Llama,
    lora: &Lora,
    data: &Dataset,
    indices: &[usize],
    cfg: &TrainConfig,
    mut on_step: impl FnMut(&StepReport),
) -> Result<TrainReport> {
    train_lora_until(model, lora, data, indices, cfg, |s| {
        on_step(s);
        ControlFlow::Continue(())
    })
}

/// [`train_lora`], stopped with [`ModelError::Cancelled`] when `on_step` breaks: a node that
/// is paused or interrupted gives its machine back within a step.
pub fn train_lora_until(
    model: &Llama,
    lora: &Lora,
    data: &Dataset,
    indices: &[usize],
    cfg: &TrainConfig,
    on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<TrainReport> {
    run(
        model,
        Some(lora),
        lora.var_store(),
        data,
        indices,
        cfg,
        on_step,
    )
}

/// Trains every weight of `model` (created trainable) on `indices` of `data`.
pub fn pretrain(
    model: &Llama,
    data: &Dataset,
    indices: &[usize],
    cfg: &TrainConfig,
    mut on_step: impl FnMut(&StepReport),
) -> Result<TrainReport> {
    run(model, None, model.var_store(), data, indices, cfg, |s| {
        on_step(s);
        ControlFlow::Continue(())
    })
}

fn run(
    model: &Llama,
    lora: Option<&Lora>,
    trainable: &VarStore,
    data: &Dataset,
    indices: &[usize],
    cfg: &TrainConfig,
    mut on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<TrainReport> {
    if indices.is_empty() || cfg.batch_size == 0 {
        return Err(ModelError::Argument(
            "training needs at least one example and a batch size > 0".into(),
        ));
    }
    if let Some(&bad) = indices.iter().find(|&&i| i >= data.len()) {
        return Err(ModelError::Argument(format!(
            "example {bad} is outside the data set of {}",
            data.len()
        )));
    }
    // Drawn only when measured: a replay (no measurement) does none of this.
    let sample: Vec<&Example> = if cfg.measure_loss {
        BatchOrder::new(indices.to_vec(), cfg.seed ^ LOSS_SAMPLE_SALT)
            .next_batch(LOSS_SAMPLE)
            .into_iter()
            .map(|i| &data.examples[i])
            .collect()
    } else {
        Vec::new()
    };
    let eval_batch = cfg.batch_size.max(8);
    let loss_before = if cfg.measure_loss {
        evaluate(model, lora, &sample, eval_batch)?.loss
    } else {
        f64::NAN
    };
    let mut opt = tch::nn::AdamW {
        wd: cfg.weight_decay,
        ..Default::default()
    }
    .build(trainable, cfg.lr)?;
    let mut order = BatchOrder::new(indices.to_vec(), cfg.seed);
    let pad = model.config().pad_id();
    let (mut tokens, mut targets) = (0u64, 0u64);
    let mut step_losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let lr = lr_at(cfg, step);
        opt.set_lr(lr);
        let batch_examples: Vec<&Example> = order
            .next_batch(cfg.batch_size)
            .into_iter()
            .map(|i| &data.examples[i])
            .collect();
        let batch = collate(&batch_examples, pad)?;
        tokens += batch.tokens as u64;
        targets += batch.targets as u64;
        let (sum, count) = model.loss_sum(&batch.input_ids, &batch.labels, lora)?;
        if count == 0 {
            // Every response in this batch was truncated away: nothing to learn from.
            tracing::warn!(step, "batch without loss targets skipped");
            continue;
        }
        let loss = sum.f_div_scalar(count as f64)?;
        opt.zero_grad();
        loss.f_backward()?;
        opt.clip_grad_norm(cfg.max_grad_norm);
        opt.step();
        let value = loss.f_double_value(&[])?;
        if !value.is_finite() {
            return Err(ModelError::Argument(format!(
                "loss became {value} at step {step}; lower the learning rate"
            )));
        }
        step_losses.push(value);
        let report = StepReport {
            step,
            loss: value,
            lr,
            tokens: batch.tokens,
        };
        if on_step(&report).is_break() {
            return Err(ModelError::Cancelled { steps: step + 1 });
        }
    }
    let loss_after = if cfg.measure_loss {
        evaluate(model, lora, &sample, eval_batch)?.loss
    } else {
        f64::NAN
    };
    Ok(TrainReport {
        loss_before,
        loss_after,
        tokens,
        targets,
        step_losses,
    })
}

fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    match cfg.schedule {
        LrSchedule::Constant => cfg.lr,
        LrSchedule::Cosine { warmup_steps } => {
            if step < warmup_steps {
                cfg.lr * (step + 1) as f64 / warmup_steps as f64
            } else {
                let span = (cfg.steps.saturating_sub(warmup_steps)).max(1) as f64;
                let progress = (step - warmup_steps) as f64 / span;
                let floor = 0.1 * cfg.lr;
                floor + (cfg.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}
