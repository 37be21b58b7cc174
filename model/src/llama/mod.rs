//! LLaMA-family decoder (LLaMA, Mistral, Qwen2): RMSNorm, RoPE, SwiGLU, grouped-query attention,
//! optional q/k/v(/o) bias and tied embeddings, after Touvron et al. 2023, "LLaMA".
//!
//! The module tree mirrors HF checkpoint names (`model.layers.{i}.self_attn.q_proj.weight`, ...),
//! so weights are filled by name with no mapping table. Batches are right-padded and attention
//! is causal, so real tokens never attend to padding; padding positions carry label -100.

use std::path::Path;

use tch::{Device, Kind, Tensor, nn::Init, nn::VarStore};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::lora::{Lora, Target};
use crate::rope::Rope;

mod attention;
use crate::safetensors_io::{SafetensorsFiles, write_safetensors};
use attention::Attention;

/// Label value that excludes a position from the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// How to fill the variables when the model is created.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightInit {
    /// Zeros; used when the weights are loaded right after.
    Zeros,
    /// Random normal(0, std) for matrices, ones for norms, zero biases: pretraining from scratch.
    Random { std: f64 },
}

#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(p: &tch::nn::Path, in_dim: i64, out_dim: i64, bias: bool, init: &Inits) -> Self {
        Linear {
            weight: p.var("weight", &[out_dim, in_dim], init.matrix),
            bias: bias.then(|| p.var("bias", &[out_dim], init.bias)),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, self.bias.as_ref())?)
    }

    /// The base projection plus the LoRA update of this layer, if the adapter has one.
    fn forward_lora(
        &self,
        x: &Tensor,
        lora: Option<&Lora>,
        layer: i64,
        target: Target,
    ) -> Result<Tensor> {
        let base = self.forward(x)?;
        match lora
            .map(|l| l.delta(layer, target, x))
            .transpose()?
            .flatten()
        {
            Some(delta) => Ok(base.f_add(&delta)?),
            None => Ok(base),
        }
    }
}

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: &tch::nn::Path, dim: i64, eps: f64, init: &Inits) -> Self {
        RmsNorm {
            weight: p.var("weight", &[dim], init.norm),
            eps,
        }
    }

    /// Normalises in fp32 whatever the compute kind, as HF does.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        let x32 = x.f_to_kind(Kind::Float)?;
        let var = x32
            .f_pow_tensor_scalar(2)?
            .f_mean_dim(-1, true, Kind::Float)?;
        let normed = x32.f_mul(&var.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        Ok(self.weight.f_mul(&normed.f_to_kind(kind)?)?)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(p: &tch::nn::Path, cfg: &LlamaConfig, init: &Inits) -> Self {
        let lin = |t: Target| {
            let (i, o) = t.dims(cfg);
            Linear::new(&(p / t.name()), i, o, cfg.mlp_bias, init)
        };
        Mlp {
            gate_proj: lin(Target::GateProj),
            up_proj: lin(Target::UpProj),
            down_proj: lin(Target::DownProj),
        }
    }

    /// SwiGLU: `down(silu(gate(x)) * up(x))`.
    fn forward(&self, x: &Tensor, lora: Option<&Lora>, layer: i64) -> Result<Tensor> {
        let gate = self
            .gate_proj
            .forward_lora(x, lora, layer, Target::GateProj)?
            .f_silu()?;
        let up = self.up_proj.forward_lora(x, lora, layer, Target::UpProj)?;
        self.down_proj
            .forward_lora(&gate.f_mul(&up)?, lora, layer, Target::DownProj)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        lora: Option<&Lora>,
        (layer, offset): (i64, i64),
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            rope,
            lora,
            (layer, offset),
            cache,
        )?;
        let x = x.f_add(&h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?, lora, layer)?;
        Ok(x.f_add(&h)?)
    }
}

/// Initialisers for the three kinds of variables.
struct Inits {
    matrix: Init,
    norm: Init,
    bias: Init,
}

/// A LLaMA-family causal language model whose weights live in one VarStore.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    vs: VarStore,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `lm_head.weight`, or the embedding matrix when embeddings are tied.
    lm_head: Tensor,
    rope: Rope,
}

impl Llama {
    /// Creates the model with every variable registered under its checkpoint name.
    /// `trainable` is false for a frozen base (LoRA) and true for pretraining.
    pub fn new(
        cfg: LlamaConfig,
        device: Device,
        init: WeightInit,
        trainable: bool,
    ) -> Result<Self> {
        let inits = match init {
            WeightInit::Zeros => Inits {
                matrix: Init::Const(0.0),
                norm: Init::Const(0.0),
                bias: Init::Const(0.0),
            },
            WeightInit::Random { std } => Inits {
                matrix: Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
                norm: Init::Const(1.0),
                bias: Init::Const(0.0),
            },
        };
        let mut vs = VarStore::new(device);
        let root = vs.root();
        let model = &root / "model";
        let embed_tokens = (&model / "embed_tokens").var(
            "weight",
            &[cfg.vocab_size, cfg.hidden_size],
            inits.matrix,
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = &model / "layers" / i;
                DecoderLayer {
                    input_layernorm: RmsNorm::new(
                        &(&p / "input_layernorm"),
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                        &inits,
                    ),
                    self_attn: Attention::new(&(&p / "self_attn"), &cfg, &inits),
                    post_attention_layernorm: RmsNorm::new(
                        &(&p / "post_attention_layernorm"),
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                        &inits,
                    ),
                    mlp: Mlp::new(&(&p / "mlp"), &cfg, &inits),
                }
            })
            .collect();
        let norm = RmsNorm::new(
            &(&model / "norm"),
            cfg.hidden_size,
            cfg.rms_norm_eps,
            &inits,
        );
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            (&root / "lm_head").var("weight", &[cfg.vocab_size, cfg.hidden_size], inits.matrix)
        };
        if !trainable {
            vs.freeze();
        }
        let rope = Rope::new(&cfg, device)?;
        Ok(Llama {
            cfg,
            vs,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// Loads `DIR/config.json` and the weights of a model dir onto `device`, frozen. On CUDA the
    /// weights are kept in bf16 (half the memory of fp32); on CPU in fp32.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let cfg = LlamaConfig::from_dir(dir)?;
        let files = SafetensorsFiles::open_model_dir(dir)?;
        let mut model = Llama::new(cfg, device, WeightInit::Zeros, false)?;
        model.load_weights(&files)?;
        if device.is_cuda() {
            model.vs.bfloat16();
        }
        Ok(model)
    }

    /// A frozen model of `cfg`'s shape with random weights (normal, `std`), in the kind
    /// [`Llama::load`] would give it: for benchmarks of a shape nobody has to download.
    pub fn random(cfg: LlamaConfig, device: Device, std: f64) -> Result<Self> {
        let mut model = Llama::new(cfg, device, WeightInit::Random { std }, false)?;
        if device.is_cuda() {
            model.vs.bfloat16();
        }
        Ok(model)
    }

    /// Copies every variable from `files` by name, checking presence and shape.
    pub fn load_weights(&mut self, files: &SafetensorsFiles) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut var) in vars {
            let src = files.tensor(&name, Some(&var.size()))?;
            var.f_copy_(&src)?;
        }
        Ok(())
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The kind activations are computed in: bf16 on CUDA, fp32 on CPU.
    pub fn compute_kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    /// Logits `[b, t, vocab]` in fp32 for token ids `[b, t]`.
    pub fn forward(&self, input_ids: &Tensor, lora: Option<&Lora>) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, lora)?;
        self.logits(&hidden)
    }

    /// An empty KV cache for [`Llama::next_token_logits`].
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len(), self.cfg.max_position_embeddings)
    }

    /// fp32 logits `[b, vocab]` after the last of `input_ids` `[b, t]`, which continue the
    /// sequences whose keys and values `cache` holds; they join the cache. With an empty cache
    /// this is `forward`'s last position, computed once instead of at every position.
    pub fn next_token_logits(
        &self,
        input_ids: &Tensor,
        lora: Option<&Lora>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let t = input_ids.size().get(1).copied().unwrap_or(0);
        cache.check_room(t)?;
        let hidden = self.run_layers(input_ids, lora, Some(cache))?;
        self.logits(&hidden.f_select(1, t - 1)?)
    }

    /// The last decoder layer's output `[b, t, hidden]`, before the final norm.
    fn hidden_states(&self, input_ids: &Tensor, lora: Option<&Lora>) -> Result<Tensor> {
        self.run_layers(input_ids, lora, None)
    }

    fn run_layers(
        &self,
        input_ids: &Tensor,
        lora: Option<&Lora>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let size = input_ids.size();
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if size.len() != 2 || size[1] < 1 || offset + size[1] > self.cfg.max_position_embeddings {
            return Err(ModelError::Argument(format!(
                "input of shape {size:?} after {offset} cached positions: expected [batch, t] \
                 with 1 <= t and cached + t <= max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let ids = input_ids.f_to_device(self.device())?;
        let mut x = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(
                &x,
                &self.rope,
                lora,
                (i as i64, offset),
                cache.as_deref_mut(),
            )?;
        }
        Ok(x)
    }

    /// Final norm and LM head over hidden states `[..., hidden]`: fp32 logits `[..., vocab]`.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self
            .norm
            .forward(hidden)?
            .f_linear::<Tensor>(&self.lm_head, None)?
            .f_to_kind(Kind::Float)?)
    }

    /// Summed next-token cross-entropy over positions whose (unshifted, HF-convention) label is
    /// not [`IGNORE_INDEX`], and the number of such targets.
    ///
    /// The final norm, LM head and softmax run only at those positions. In instruction tuning
    /// the prompt and the padding carry no loss (about half of an Alpaca example), and with a
    /// large vocabulary the head is a fifth of the model's compute (SmolLM-135M: 28 M of its
    /// 135 M weights), so this is work saved, not reordered: transformers computes every
    /// position's logits and discards the masked ones in the loss.
    pub fn loss_sum(
        &self,
        input_ids: &Tensor,
        labels: &Tensor,
        lora: Option<&Lora>,
    ) -> Result<(Tensor, i64)> {
        let hidden = self.hidden_states(input_ids, lora)?;
        let (b, t, d) = (hidden.size()[0], hidden.size()[1], hidden.size()[2]);
        let labels = labels.f_to_device(self.device())?;
        if labels.size() != [b, t] {
            return Err(ModelError::Argument(format!(
                "labels of shape {:?} for input of shape [{b}, {t}]",
                labels.size()
            )));
        }
        // Position p predicts label p + 1; the last position of each row predicts nothing.
        let next = Tensor::f_cat(
            &[
                labels.f_narrow(1, 1, t - 1)?,
                Tensor::f_full([b, 1], IGNORE_INDEX, (Kind::Int64, self.device()))?,
            ],
            1,
        )?
        .f_reshape([b * t])?;
        let positions = next.f_ne(IGNORE_INDEX)?.f_nonzero()?.f_squeeze_dim(1)?;
        let count = positions.size()[0];
        let logits = self.logits(
            &hidden
                .f_reshape([b * t, d])?
                .f_index_select(0, &positions)?,
        )?;
        let loss = logits.f_cross_entropy_loss::<Tensor>(
            &next.f_index_select(0, &positions)?,
            None,
            tch::Reduction::Sum,
            IGNORE_INDEX,
            0.0,
        )?;
        Ok((loss, count))
    }

    /// Writes `config.json` and `model.safetensors` (fp32; no `lm_head` when tied) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let config = serde_json::to_string_pretty(&self.cfg).expect("config serialises");
        crate::safetensors_io::write_atomic(&dir.join("config.json"), config.as_bytes())?;
        let mut tensors: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| Ok((n, t.f_detach()?.f_to_kind(Kind::Float)?)))
            .collect::<Result<_>>()?;
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        write_safetensors(&dir.join("model.safetensors"), &tensors, &[])
    }
}
