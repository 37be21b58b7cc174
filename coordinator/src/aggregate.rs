//! Turning accepted deltas into the next adapter: a token-weighted mean, then DiLoCo's outer
//! Nesterov step (Douillard et al. 2023, "DiLoCo"). With A frozen, LoRA's update `scale·B·A`
//! is linear in B, so the mean of the nodes' updates is exactly the update of the mean B.

use std::collections::HashMap;

use anyhow::{Result, bail};
use herd_model::lora::Lora;
use herd_protocol::delta::Delta;
use tch::{Kind, Tensor};

/// Token-weighted mean of deltas, tensor by tensor, in the deltas' order.
pub fn weighted_mean(deltas: &[(&Delta, u64)]) -> Result<Vec<(String, Tensor)>> {
    let Some((first, _)) = deltas.first() else {
        bail!("no deltas to average");
    };
    let total: u64 = deltas.iter().map(|(_, w)| *w).sum();
    if total == 0 {
        bail!("deltas carry no tokens");
    }
    let mut out = Vec::with_capacity(first.tensors.len());
    for (i, t) in first.tensors.iter().enumerate() {
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        let mut acc = Tensor::zeros(&shape, (Kind::Double, tch::Device::Cpu));
        for (delta, weight) in deltas {
            let other = &delta.tensors[i];
            if other.name != t.name || other.shape != t.shape {
                bail!(
                    "deltas disagree on tensor {i} (`{}` vs `{}`)",
                    t.name,
                    other.name
                );
            }
            let values = Tensor::from_slice(&other.values)
                .reshape(&shape)
                .to_kind(Kind::Double);
            acc += values * (*weight as f64 / total as f64);
        }
        out.push((t.name.clone(), acc.to_kind(Kind::Float)));
    }
    Ok(out)
}

/// DiLoCo's outer optimizer: SGD with Nesterov momentum on the pseudo-gradient `-mean Δ`.
#[derive(Debug)]
pub struct OuterOptimizer {
    lr: f64,
    momentum: f64,
    /// Momentum buffer per factor.
    buffers: HashMap<String, Tensor>,
}

impl OuterOptimizer {
    pub fn new(lr: f64, momentum: f64) -> Self {
        OuterOptimizer {
            lr,
            momentum,
            buffers: HashMap::new(),
        }
    }

    /// Applies `mean_delta` to `lora` in place and returns the update it applied per factor.
    /// With lr 1 and momentum 0 the update is the mean delta itself (plain averaging).
    pub fn step(
        &mut self,
        lora: &Lora,
        mean_delta: &[(String, Tensor)],
    ) -> Result<Vec<(String, Tensor)>> {
        let mut applied = Vec::with_capacity(mean_delta.len());
        for (name, delta) in mean_delta {
            let grad = -delta;
            let buf = match self.buffers.remove(name) {
                Some(b) => b * self.momentum + &grad,
                None => grad.shallow_clone(),
            };
            let update = -(grad + &buf * self.momentum) * self.lr;
            lora.add_to_factor(name, &update)?;
            self.buffers.insert(name.clone(), buf);
            applied.push((name.clone(), update));
        }
        Ok(applied)
    }
}

#[cfg(test)]
mod tests;
