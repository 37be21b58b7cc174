//! Turning accepted deltas into the next adapter: a robust token-weighted mean (each delta's
//! norm clipped to a multiple of the median, then a coordinate-wise trimmed mean), then
//! DiLoCo's outer Nesterov step (Douillard et al. 2023, "DiLoCo"). With A frozen, LoRA's
//! update `scale·B·A` is linear in B, so the mean of the nodes' updates is exactly the update
//! of the mean B.

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

/// Settings of [`robust_mean`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Robustness {
    /// Deltas longer than this multiple of the median norm are scaled down to it.
    pub clip_multiple: f64,
    /// Fraction of each coordinate's sent values cut from each end.
    pub trim_fraction: f64,
}

/// What [`robust_mean`] did, for logs and status.
#[derive(Debug, Clone, PartialEq)]
pub struct RobustReport {
    pub median_norm: f64,
    /// Deltas whose norm was clipped.
    pub clipped: usize,
    /// Values cut by trimming, over all coordinates.
    pub trimmed: u64,
}

/// A token-weighted mean that one bad delta cannot drag far: norms clipped to
/// `clip_multiple × median`, then per coordinate the `trim_fraction` lowest and highest of the
/// values actually sent are dropped (with their weights).
///
/// Trimming counts only non-zero values: a top-k delta sends a few coordinates, and the zeros
/// of the others mean "not sent this time", not "vote for zero". Counting them would trim
/// away every sparse update. With no clipping and no trimming this is [`weighted_mean`].
pub fn robust_mean(
    deltas: &[(&Delta, u64)],
    r: Robustness,
) -> Result<(Vec<(String, Tensor)>, RobustReport)> {
    let Some((first, _)) = deltas.first() else {
        bail!("no deltas to average");
    };
    if deltas.iter().all(|(_, w)| *w == 0) {
        bail!("deltas carry no tokens");
    }
    let norms: Vec<f64> = deltas.iter().map(|(d, _)| d.norm()).collect();
    let median_norm = median(&norms);
    let bound = r.clip_multiple * median_norm;
    let scales: Vec<f64> = norms
        .iter()
        .map(|&n| if n > bound && n > 0.0 { bound / n } else { 1.0 })
        .collect();
    let clipped = scales.iter().filter(|&&s| s < 1.0).count();
    let mut trimmed = 0u64;
    let mut out = Vec::with_capacity(first.tensors.len());
    let mut column: Vec<(f64, f64)> = Vec::with_capacity(deltas.len());
    for (i, t) in first.tensors.iter().enumerate() {
        for (delta, _) in deltas {
            let other = &delta.tensors[i];
            if other.name != t.name || other.values.len() != t.values.len() {
                bail!(
                    "deltas disagree on tensor {i} (`{}` vs `{}`)",
                    t.name,
                    other.name
                );
            }
        }
        let mut mean = vec![0f32; t.values.len()];
        for (j, m) in mean.iter_mut().enumerate() {
            column.clear();
            let mut zero_weight = 0.0;
            for ((delta, w), scale) in deltas.iter().zip(&scales) {
                let v = delta.tensors[i].values[j] as f64 * scale;
                if v == 0.0 {
                    zero_weight += *w as f64;
                } else {
                    column.push((v, *w as f64));
                }
            }
            let cut = (r.trim_fraction * column.len() as f64).floor() as usize;
            if cut > 0 {
                column.sort_by(|a, b| a.0.total_cmp(&b.0));
                trimmed += 2 * cut as u64;
            }
            let kept = &column[cut..column.len() - cut];
            let weight: f64 = zero_weight + kept.iter().map(|(_, w)| w).sum::<f64>();
            if weight > 0.0 {
                *m = (kept.iter().map(|(v, w)| v * w).sum::<f64>() / weight) as f32;
            }
        }
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        out.push((t.name.clone(), Tensor::from_slice(&mean).reshape(&shape)));
    }
    Ok((
        out,
        RobustReport {
            median_norm,
            clipped,
            trimmed,
        },
    ))
}

/// The median of `values` (mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A momentum buffer as stored: name, shape, fp32 values.
type NamedBuffer = (String, Vec<i64>, Vec<f32>);

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

    /// The momentum buffers as bytes (name → shape and fp32 values), so a restarted
    /// coordinator continues with exactly the same state.
    pub fn state_bytes(&self) -> Result<Vec<u8>> {
        let mut state: Vec<NamedBuffer> = Vec::with_capacity(self.buffers.len());
        for (name, buf) in &self.buffers {
            let values = Vec::<f32>::try_from(buf.to_kind(Kind::Float).flatten(0, -1))?;
            state.push((name.clone(), buf.size(), values));
        }
        state.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(bincode::serde::encode_to_vec(
            &state,
            bincode::config::standard(),
        )?)
    }

    /// Replaces the momentum buffers with those of [`OuterOptimizer::state_bytes`].
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        let (state, _): (Vec<NamedBuffer>, _) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard())?;
        self.buffers.clear();
        for (name, shape, values) in state {
            let numel: i64 = shape.iter().product();
            if numel != values.len() as i64 {
                bail!(
                    "outer state `{name}`: shape {shape:?} but {} values",
                    values.len()
                );
            }
            self.buffers
                .insert(name, Tensor::from_slice(&values).reshape(&shape));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
