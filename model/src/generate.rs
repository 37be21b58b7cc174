//! Greedy generation, one token at a time (the models herd fine-tunes locally are small enough
//! that re-running the prefix beats the complexity of a KV cache here).

use tch::Tensor;

use crate::error::Result;
use crate::llama::Llama;
use crate::lora::Lora;

/// Extends `prompt` greedily by up to `max_new_tokens`, stopping after `eos`. Returns only the
/// new tokens.
pub fn generate_greedy(
    model: &Llama,
    lora: Option<&Lora>,
    prompt: &[i64],
    max_new_tokens: usize,
    eos: Option<i64>,
) -> Result<Vec<i64>> {
    let _guard = tch::no_grad_guard();
    let window = model.config().max_position_embeddings as usize;
    let mut ids = prompt.to_vec();
    let mut new = Vec::new();
    for _ in 0..max_new_tokens {
        let context = &ids[ids.len().saturating_sub(window)..];
        let input = Tensor::f_from_slice(context)?.f_unsqueeze(0)?;
        let logits = model.forward(&input, lora)?;
        let next = i64::try_from(
            &logits
                .f_select(1, context.len() as i64 - 1)?
                .f_argmax(-1, false)?
                .f_squeeze()?,
        )?;
        ids.push(next);
        new.push(next);
        if Some(next) == eos {
            break;
        }
    }
    Ok(new)
}
