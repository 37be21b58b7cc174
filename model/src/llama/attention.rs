//! Grouped-query self-attention with RoPE, over the positions of the input and, when
//! generating, over those a KV cache holds.

use tch::{Kind, Tensor};

use super::{Inits, Linear};
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::lora::{Lora, Target};
use crate::rope::Rope;

#[derive(Debug)]
pub(super) struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    pub(super) fn new(p: &tch::nn::Path, cfg: &LlamaConfig, init: &Inits) -> Self {
        let dims = |t: Target| t.dims(cfg);
        let lin = |t: Target, bias: bool| {
            let (i, o) = dims(t);
            Linear::new(&(p / t.name()), i, o, bias, init)
        };
        Attention {
            q_proj: lin(Target::QProj, cfg.qkv_bias()),
            k_proj: lin(Target::KProj, cfg.qkv_bias()),
            v_proj: lin(Target::VProj, cfg.qkv_bias()),
            o_proj: lin(Target::OProj, cfg.o_bias()),
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_kv_heads(),
            head_dim: cfg.head_dim(),
        }
    }

    /// Attention of `x`'s positions, the first of which is `offset` in its sequence, over
    /// themselves (causally) and over what `cache` holds, which they join.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        lora: Option<&Lora>,
        (layer, offset): (i64, i64),
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let split = |y: Tensor, heads: i64| -> Result<Tensor> {
            Ok(y.f_view([b, t, heads, self.head_dim])?.f_transpose(1, 2)?)
        };
        let q = split(
            self.q_proj.forward_lora(x, lora, layer, Target::QProj)?,
            self.heads,
        )?;
        let k = split(
            self.k_proj.forward_lora(x, lora, layer, Target::KProj)?,
            self.kv_heads,
        )?;
        let v = split(
            self.v_proj.forward_lora(x, lora, layer, Target::VProj)?,
            self.kv_heads,
        )?;
        let (q, k) = (rope.apply(&q, offset)?, rope.apply(&k, offset)?);
        let (k, v) = match cache {
            Some(cache) => cache.extend(layer as usize, k, v)?,
            None => (k, v),
        };
        // SDPA's `is_causal` aligns the mask top-left, right only when nothing is cached; one
        // new position may see everything; several after a cache need the mask spelled out.
        let (mask, is_causal) = match (offset, t) {
            (0, _) => (None, true),
            (_, 1) => (None, false),
            _ => {
                let rows = Tensor::f_arange(t, (Kind::Int64, x.device()))?.f_unsqueeze(1)?;
                let cols = Tensor::f_arange(offset + t, (Kind::Int64, x.device()))?;
                (Some(cols.f_le_tensor(&rows.f_add_scalar(offset)?)?), false)
            }
        };
        let gqa = self.kv_heads != self.heads;
        let y = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref(),
            0.0,
            is_causal,
            None,
            gqa,
        )?;
        let y = y
            .f_transpose(1, 2)?
            .f_reshape([b, t, self.heads * self.head_dim])?;
        self.o_proj.forward_lora(&y, lora, layer, Target::OProj)
    }
}
