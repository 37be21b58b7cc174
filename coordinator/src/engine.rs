//! The tensor side of the coordinator: the base model, the global adapter, the outer optimizer
//! and held-out evaluation. Owned by one task at a time and moved into `spawn_blocking` for
//! work, so the async side never blocks on a tensor.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use herd_model::Llama;
use herd_model::data::{Dataset, read_records};
use herd_model::delta::delta_layout;
use herd_model::eval::evaluate;
use herd_model::lora::{Lora, LoraConfig};
use herd_model::peft::{adapter_weights_bytes, save_adapter};
use herd_model::tokenizer::TextTokenizer;
use herd_protocol::delta::{Delta, DeltaLayout};
use herd_protocol::messages::LoraSpec;

use crate::aggregate::{OuterOptimizer, weighted_mean};
use crate::config::RunConfig;
use crate::status::{Checkpoint, CheckpointFile};

/// Model, adapter and optimizer state.
#[derive(Debug)]
pub struct Engine {
    model: Llama,
    lora: Lora,
    outer: OuterOptimizer,
    heldout: Dataset,
    base_model: PathBuf,
}

/// What aggregating a round produced.
#[derive(Debug)]
pub struct RoundResult {
    pub adapter_bytes: Vec<u8>,
    pub heldout_loss: f64,
    pub checkpoint: Option<Checkpoint>,
}

impl Engine {
    pub fn new(cfg: &RunConfig) -> Result<Self> {
        let model = Llama::load(&cfg.base_model, tch::Device::Cpu)?;
        let tok = TextTokenizer::from_dir(&cfg.base_model)?;
        let mcfg = model.config();
        let heldout = Dataset::for_model(
            &cfg.heldout,
            &tok,
            mcfg,
            Some(cfg.round.max_seq_len as usize),
        )?;
        let lora = Lora::new(
            mcfg,
            LoraConfig::try_from(&lora_spec(cfg))?,
            tch::Device::Cpu,
        )?;
        Ok(Engine {
            model,
            lora,
            outer: OuterOptimizer::new(cfg.round.outer_lr, cfg.round.outer_momentum),
            heldout,
            base_model: cfg.base_model.clone(),
        })
    }

    pub fn layout(&self) -> DeltaLayout {
        delta_layout(&self.lora)
    }

    pub fn adapter_bytes(&self) -> Result<Vec<u8>> {
        Ok(adapter_weights_bytes(&self.lora)?)
    }

    pub fn heldout_loss(&self) -> Result<f64> {
        let ex: Vec<_> = self.heldout.examples.iter().collect();
        Ok(evaluate(&self.model, Some(&self.lora), &ex, 32)?.loss)
    }

    /// Averages `deltas` (token-weighted), takes the outer step, evaluates, and writes a
    /// checkpoint into `checkpoint_dir` when given.
    pub fn finish_round(
        &mut self,
        deltas: &[(Delta, u64)],
        round: u64,
        checkpoint_dir: Option<&Path>,
    ) -> Result<RoundResult> {
        let weighted: Vec<(&Delta, u64)> = deltas.iter().map(|(d, w)| (d, *w)).collect();
        let mean = weighted_mean(&weighted)?;
        self.outer.step(&self.lora, &mean)?;
        let heldout_loss = self.heldout_loss()?;
        let checkpoint = checkpoint_dir
            .map(|dir| self.write_checkpoint(dir, round, heldout_loss))
            .transpose()?;
        Ok(RoundResult {
            adapter_bytes: self.adapter_bytes()?,
            heldout_loss,
            checkpoint,
        })
    }

    fn write_checkpoint(&self, dir: &Path, round: u64, heldout_loss: f64) -> Result<Checkpoint> {
        let id = format!("round-{round:05}");
        let path = dir.join(&id);
        save_adapter(
            &path,
            &self.lora,
            Some(&self.base_model.display().to_string()),
        )?;
        let mut files = Vec::new();
        for name in ["adapter_config.json", "adapter_model.safetensors"] {
            let bytes =
                std::fs::read(path.join(name)).with_context(|| format!("reading back {name}"))?;
            files.push(CheckpointFile {
                name: name.into(),
                size: bytes.len() as u64,
                blake3: blake3::hash(&bytes).to_hex().to_string(),
            });
        }
        Ok(Checkpoint {
            id,
            round,
            heldout_loss,
            files,
        })
    }
}

/// The LoRA shape nodes are told to use.
pub fn lora_spec(cfg: &RunConfig) -> LoraSpec {
    LoraSpec {
        rank: cfg.lora.rank,
        alpha: cfg.lora.alpha,
        targets: cfg.lora.targets.clone(),
        train_a: cfg.lora.train_a,
        init_seed: cfg.seed,
    }
}

/// Number of records in the training data file.
pub fn count_examples(path: &Path) -> Result<u64> {
    Ok(read_records(path)?.len() as u64)
}
