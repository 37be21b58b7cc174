//! Evaluation: token-weighted mean next-token cross-entropy over a set of examples.

use serde::Serialize;
use tch::Kind;

use crate::data::{Example, collate};
use crate::error::Result;
use crate::llama::Llama;
use crate::lora::Lora;

/// The loss of a model (with an optional adapter) on some examples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalReport {
    /// Sum of cross-entropy over all targets / number of targets (not a mean of means).
    pub loss: f64,
    /// Positions that contributed.
    pub tokens: u64,
    pub sequences: usize,
}

/// Evaluates in batches of `batch_size`, longest-first to keep padding low.
pub fn evaluate(
    model: &Llama,
    lora: Option<&Lora>,
    examples: &[&Example],
    batch_size: usize,
) -> Result<EvalReport> {
    let _guard = tch::no_grad_guard();
    let mut sorted: Vec<&Example> = examples.to_vec();
    sorted.sort_by_key(|e| std::cmp::Reverse(e.ids.len()));
    let mut sum = 0.0f64;
    let mut tokens = 0u64;
    for chunk in sorted.chunks(batch_size.max(1)) {
        let batch = collate(chunk, model.config().pad_id())?;
        let (loss, count) = model.loss_sum(&batch.input_ids, &batch.labels, lora)?;
        sum += loss.f_to_kind(Kind::Double)?.f_double_value(&[])?;
        tokens += count as u64;
    }
    Ok(EvalReport {
        loss: if tokens > 0 {
            sum / tokens as f64
        } else {
            f64::NAN
        },
        tokens,
        sequences: examples.len(),
    })
}
