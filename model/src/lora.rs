//! LoRA adapters per PEFT conventions (`r`, `lora_alpha`, `target_modules`, `lora_A`/`lora_B`),
//! held in their own VarStore; the base model stays frozen.
//!
//! By default A is frozen at a seeded init and only B trains (FFA-LoRA): then the update of a
//! target, `scale · B·A`, is linear in B and the mean of many nodes' updates is exactly the
//! update of the mean B. Training A as well is an option (`train_a`).

use std::collections::BTreeMap;
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor, nn::VarStore};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

/// A linear layer of a decoder block that LoRA can adapt, named as in HF checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::QProj,
        Target::KProj,
        Target::VProj,
        Target::OProj,
        Target::GateProj,
        Target::UpProj,
        Target::DownProj,
    ];
    /// PEFT's default for LLaMA is q,v; herd adapts all of attention by default.
    pub const DEFAULT: [Target; 4] = [Target::QProj, Target::KProj, Target::VProj, Target::OProj];

    /// The module name (`q_proj`, ...), as in `target_modules` and checkpoint keys.
    pub fn name(self) -> &'static str {
        match self {
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }

    /// The sub-module of a decoder layer the linear layer sits in.
    pub fn block(self) -> &'static str {
        match self {
            Target::QProj | Target::KProj | Target::VProj | Target::OProj => "self_attn",
            Target::GateProj | Target::UpProj | Target::DownProj => "mlp",
        }
    }

    /// `(in_features, out_features)` of the linear layer in a model of this config.
    pub fn dims(self, cfg: &LlamaConfig) -> (i64, i64) {
        let q = cfg.num_attention_heads * cfg.head_dim();
        let kv = cfg.num_kv_heads() * cfg.head_dim();
        match self {
            Target::QProj => (cfg.hidden_size, q),
            Target::KProj | Target::VProj => (cfg.hidden_size, kv),
            Target::OProj => (q, cfg.hidden_size),
            Target::GateProj | Target::UpProj => (cfg.hidden_size, cfg.intermediate_size),
            Target::DownProj => (cfg.intermediate_size, cfg.hidden_size),
        }
    }

    /// Parses one module name; unknown names are an error listing the valid ones.
    pub fn parse(name: &str) -> Result<Self> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == name.trim())
            .ok_or_else(|| {
                ModelError::Argument(format!(
                    "unknown LoRA target module `{name}` (valid: {})",
                    Target::ALL.map(Target::name).join(", ")
                ))
            })
    }

    /// Parses a comma-separated list (`q_proj,v_proj`).
    pub fn parse_list(list: &str) -> Result<Vec<Self>> {
        let mut targets: Vec<Target> = list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Target::parse)
            .collect::<Result<_>>()?;
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err(ModelError::Argument("no LoRA target modules given".into()));
        }
        Ok(targets)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How an adapter is shaped and trained.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of each update `B·A`.
    pub rank: i64,
    /// `lora_alpha`; the update is scaled by `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    pub targets: Vec<Target>,
    /// Train A as well as B. Off by default: a frozen, seeded A makes averaging exact.
    pub train_a: bool,
    pub use_rslora: bool,
    /// Seed of A's init; every node of a run must use the same one.
    pub init_seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: Target::DEFAULT.to_vec(),
            train_a: false,
            use_rslora: false,
            init_seed: 0,
        }
    }
}

impl TryFrom<&herd_protocol::messages::LoraSpec> for LoraConfig {
    type Error = ModelError;

    /// The adapter a run's lease describes (every node and the coordinator build it this way).
    fn try_from(spec: &herd_protocol::messages::LoraSpec) -> Result<Self> {
        Ok(LoraConfig {
            rank: spec.rank,
            alpha: spec.alpha,
            targets: Target::parse_list(&spec.targets.join(","))?,
            train_a: spec.train_a,
            use_rslora: false,
            init_seed: spec.init_seed,
        })
    }
}

impl LoraConfig {
    /// The factor PEFT multiplies `B·A x` by.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// The two factors adapting one linear layer: `A: [r, in]`, `B: [out, r]`.
#[derive(Debug)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// A LoRA adapter for every target of every layer of one model.
#[derive(Debug)]
pub struct Lora {
    cfg: LoraConfig,
    vs: VarStore,
    pairs: BTreeMap<(i64, Target), LoraPair>,
}

/// The key of a factor inside herd (PEFT prepends `base_model.model.`).
pub fn factor_name(layer: i64, target: Target, factor: char) -> String {
    format!(
        "model.layers.{layer}.{}.{}.lora_{factor}.weight",
        target.block(),
        target.name()
    )
}

impl Lora {
    /// A fresh adapter: A from a seeded Kaiming-uniform init (PEFT's distribution, but seeded
    /// by ChaCha so that every machine gets the same bits), B zero, so the adapter starts as a no-op.
    pub fn new(model: &LlamaConfig, cfg: LoraConfig, device: Device) -> Result<Self> {
        if cfg.rank <= 0 {
            return Err(ModelError::Argument(format!(
                "LoRA rank must be positive, is {}",
                cfg.rank
            )));
        }
        if cfg.targets.is_empty() {
            return Err(ModelError::Argument("no LoRA target modules given".into()));
        }
        let vs = VarStore::new(device);
        let mut pairs = BTreeMap::new();
        for layer in 0..model.num_hidden_layers {
            for &target in &cfg.targets {
                let (fan_in, fan_out) = target.dims(model);
                let a =
                    seeded_a(cfg.init_seed, layer, target, cfg.rank, fan_in).f_to_device(device)?;
                let b = Tensor::f_zeros([fan_out, cfg.rank], (Kind::Float, device))?;
                let path = vs.root() / "model" / "layers" / layer / target.block() / target.name();
                let a = (&path / "lora_A").add("weight", a, cfg.train_a);
                let b = (&path / "lora_B").add("weight", b, true);
                pairs.insert((layer, target), LoraPair { a, b });
            }
        }
        Ok(Lora { cfg, vs, pairs })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.cfg
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn pair(&self, layer: i64, target: Target) -> Option<&LoraPair> {
        self.pairs.get(&(layer, target))
    }

    /// `scale · B·A·x` for one adapted layer, in `x`'s kind; `None` when the layer is not adapted.
    pub fn delta(&self, layer: i64, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(pair) = self.pairs.get(&(layer, target)) else {
            return Ok(None);
        };
        let kind = x.kind();
        let a = pair.a.f_to_kind(kind)?;
        let b = pair.b.f_to_kind(kind)?;
        let out = x
            .f_linear::<Tensor>(&a, None)?
            .f_linear::<Tensor>(&b, None)?
            .f_mul_scalar(self.cfg.scale())?;
        Ok(Some(out))
    }

    /// Every factor with its herd key (`model.layers.0.self_attn.q_proj.lora_A.weight`), in a
    /// fixed order (layer, target, A before B).
    pub fn named_factors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.pairs.len() * 2);
        for (&(layer, target), pair) in &self.pairs {
            out.push((factor_name(layer, target, 'A'), pair.a.shallow_clone()));
            out.push((factor_name(layer, target, 'B'), pair.b.shallow_clone()));
        }
        out
    }

    /// Overwrites every factor from `lookup(name, expected_shape)`, which must return a tensor
    /// of that shape (callers check shapes and say which file was wrong).
    pub fn load_factors(
        &mut self,
        mut lookup: impl FnMut(&str, &[i64]) -> Result<Tensor>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (&(layer, target), pair) in &mut self.pairs {
            for (factor, tensor) in [('A', &mut pair.a), ('B', &mut pair.b)] {
                let name = factor_name(layer, target, factor);
                let src = lookup(&name, &tensor.size())?;
                tensor.f_copy_(&src.f_to_kind(Kind::Float)?)?;
            }
        }
        Ok(())
    }

    /// The factors training changes (B, and A when `train_a`), in [`Lora::named_factors`] order:
    /// what a delta carries.
    pub fn trainable_factors(&self) -> Vec<(String, Tensor)> {
        self.named_factors()
            .into_iter()
            .filter(|(name, _)| self.cfg.train_a || name.contains(".lora_B."))
            .collect()
    }

    /// Adds `delta` to the factor `name` in place (no autograd): how updates are applied.
    pub fn add_to_factor(&self, name: &str, delta: &Tensor) -> Result<()> {
        let Some((_, mut factor)) = self.named_factors().into_iter().find(|(n, _)| n == name)
        else {
            return Err(ModelError::Argument(format!("no LoRA factor `{name}`")));
        };
        if factor.size() != delta.size() {
            return Err(ModelError::Argument(format!(
                "update of `{name}` has shape {:?}, the factor {:?}",
                delta.size(),
                factor.size()
            )));
        }
        let _guard = tch::no_grad_guard();
        let _ = factor.f_add_(&delta.f_to_device(factor.device())?.f_to_kind(Kind::Float)?)?;
        Ok(())
    }

    /// An independent adapter with the same config and values (e.g. for a replay that must
    /// not touch the coordinator's θ).
    pub fn try_clone(&self, model: &LlamaConfig) -> Result<Lora> {
        let mut copy = Lora::new(model, self.cfg.clone(), self.vs.device())?;
        let factors = self.named_factors();
        copy.load_factors(|name, _| {
            factors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| ModelError::Argument(format!("no LoRA factor `{name}`")))
        })?;
        Ok(copy)
    }

    /// A deep copy of every factor (for "before" snapshots and deltas).
    pub fn snapshot(&self) -> Result<Vec<(String, Tensor)>> {
        self.named_factors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.f_detach()?.copy())))
            .collect()
    }
}

fn seeded_a(seed: u64, layer: i64, target: Target, rank: i64, fan_in: i64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // One stream per (layer, target): A of a layer does not depend on which others are adapted.
    rng.set_stream(layer as u64 * 16 + target as u64);
    // kaiming_uniform_(a = sqrt(5)) as PEFT uses: bound = gain · sqrt(3 / fan_in) = 1 / sqrt(fan_in).
    let bound = 1.0 / (fan_in as f32).sqrt();
    let values: Vec<f32> = (0..rank * fan_in)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Tensor::from_slice(&values).reshape([rank, fan_in])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlamaConfig {
        LlamaConfig::from_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":16}"#,
            std::path::Path::new("config.json"),
        )
        .unwrap()
    }

    #[test]
    fn frozen_a_is_seeded_and_only_b_trains() {
        let cfg = tiny();
        let one = Lora::new(&cfg, LoraConfig::default(), Device::Cpu).unwrap();
        let two = Lora::new(&cfg, LoraConfig::default(), Device::Cpu).unwrap();
        let a1 = &one.pair(1, Target::VProj).unwrap().a;
        let a2 = &two.pair(1, Target::VProj).unwrap().a;
        assert_eq!(a1.size(), vec![8, 8]);
        assert!(a1.equal(a2), "same seed must give the same A");
        assert_eq!(one.pair(1, Target::VProj).unwrap().b.size(), vec![4, 8]);
        // 2 layers x 4 targets, only B trainable.
        assert_eq!(one.var_store().trainable_variables().len(), 8);
        let other_seed = LoraConfig {
            init_seed: 1,
            ..LoraConfig::default()
        };
        let three = Lora::new(&cfg, other_seed, Device::Cpu).unwrap();
        assert!(!three.pair(1, Target::VProj).unwrap().a.equal(a1));
        let train_a = LoraConfig {
            train_a: true,
            ..LoraConfig::default()
        };
        let four = Lora::new(&cfg, train_a, Device::Cpu).unwrap();
        assert_eq!(four.var_store().trainable_variables().len(), 16);
    }

    #[test]
    fn parses_target_lists() {
        assert_eq!(
            Target::parse_list("v_proj, q_proj,q_proj").unwrap(),
            vec![Target::QProj, Target::VProj]
        );
        let err = Target::parse_list("q_proj,lm_head")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`lm_head`"), "{err}");
    }
}
