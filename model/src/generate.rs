//! Greedy generation with a KV cache: the prompt runs once, then each new token attends to the
//! cached keys and values instead of re-running the prefix.

use tch::Tensor;

use crate::error::Result;
use crate::llama::Llama;
use crate::lora::Lora;

/// Extends `prompt` greedily by up to `max_new_tokens`, stopping after `eos`. Returns only the
/// new tokens.
///
/// Past `max_position_embeddings` tokens the model sees the last window of them, as it would
/// re-run on the truncated prefix (the cache is refilled from that window for each token then).
pub fn generate_greedy(
    model: &Llama,
    lora: Option<&Lora>,
    prompt: &[i64],
    max_new_tokens: usize,
    eos: Option<i64>,
) -> Result<Vec<i64>> {
    let _guard = tch::no_grad_guard();
    let window = model.config().max_position_embeddings as usize;
    let mut cache = model.new_cache();
    let mut ids = prompt.to_vec();
    let mut new = Vec::new();
    // Where what the cache has not seen yet begins: the whole prompt first, then the last token.
    let mut from = ids.len().saturating_sub(window);
    for _ in 0..max_new_tokens {
        if cache.room() < (ids.len() - from) as i64 {
            cache.clear();
            from = ids.len() - window;
        }
        let input = Tensor::f_from_slice(&ids[from..])?.f_unsqueeze(0)?;
        let logits = model.next_token_logits(&input, lora, &mut cache)?;
        let next = i64::try_from(&logits.f_argmax(-1, false)?.f_squeeze()?)?;
        ids.push(next);
        new.push(next);
        if Some(next) == eos {
            break;
        }
        from = ids.len() - 1;
    }
    Ok(new)
}

/// Greedy generation as it was before the cache: the whole (windowed) prefix re-run for every
/// token. The reference the cached path is tested against, and the baseline of its benchmark.
pub fn generate_greedy_uncached(
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
