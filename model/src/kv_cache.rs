//! The keys and values of the positions a model has already seen, per layer, so generation
//! computes each new token's attention against them instead of re-running the whole prefix.

use tch::Tensor;

use crate::error::{ModelError, Result};

/// One sequence batch's cached keys and values: per layer `[b, kv_heads, len, head_dim]`
/// (after RoPE), all layers holding the same `len` positions.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    capacity: i64,
}

impl KvCache {
    /// An empty cache for a model of `layers` decoder layers that can place `capacity`
    /// positions (its `max_position_embeddings`).
    pub fn new(layers: usize, capacity: i64) -> KvCache {
        KvCache {
            layers: (0..layers).map(|_| None).collect(),
            capacity,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> i64 {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions that still fit before the model's position table ends.
    pub fn room(&self) -> i64 {
        self.capacity - self.len()
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// Errors unless `t` more positions fit.
    pub(crate) fn check_room(&self, t: i64) -> Result<()> {
        if t > self.room() {
            return Err(ModelError::Argument(format!(
                "{t} new positions after {} cached: over max_position_embeddings {}",
                self.len(),
                self.capacity
            )));
        }
        Ok(())
    }

    /// Appends layer `layer`'s new keys and values `[b, kv_heads, t, d]`; returns all of its
    /// keys and values, old and new.
    pub(crate) fn extend(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let slot = &mut self.layers[layer];
        let (k, v) = match slot.take() {
            None => (k, v),
            Some((old_k, old_v)) => (
                Tensor::f_cat(&[old_k, k], 2)?,
                Tensor::f_cat(&[old_v, v], 2)?,
            ),
        };
        *slot = Some((k.shallow_clone(), v.shallow_clone()));
        Ok((k, v))
    }
}
