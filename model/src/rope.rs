//! Rotary position embeddings (Su et al. 2021, "RoFormer"), in HF's rotate-half layout.

use tch::{Device, Kind, Tensor};

use crate::config::LlamaConfig;
use crate::error::Result;

/// Precomputed RoPE cos/sin tables (`[max_pos, head_dim]`).
#[derive(Debug)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub(crate) fn new(cfg: &LlamaConfig, device: Device) -> Result<Self> {
        let dim = cfg.head_dim();
        let inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / cfg.rope_theta().powf(2.0 * i as f64 / dim as f64) as f32)
            .collect();
        let inv_freq = Tensor::f_from_slice(&inv_freq)?;
        let positions = Tensor::f_arange(cfg.max_position_embeddings, (Kind::Float, Device::Cpu))?;
        let freqs = positions.f_outer(&inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        Ok(Rope {
            cos: emb.f_cos()?.f_to_device(device)?,
            sin: emb.f_sin()?.f_to_device(device)?,
        })
    }

    /// Rotates `x: [b, heads, t, d]` whose first position is `offset` in its sequence (0
    /// unless earlier positions sit in a KV cache).
    pub(crate) fn apply(&self, x: &Tensor, offset: i64) -> Result<Tensor> {
        let (t, d) = (x.size()[2], x.size()[3]);
        let cos = self.cos.f_narrow(0, offset, t)?.f_to_kind(x.kind())?;
        let sin = self.sin.f_narrow(0, offset, t)?.f_to_kind(x.kind())?;
        let x1 = x.f_narrow(-1, 0, d / 2)?;
        let x2 = x.f_narrow(-1, d / 2, d / 2)?;
        let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
        Ok(x.f_mul(&cos)?.f_add(&rotated.f_mul(&sin)?)?)
    }
}
