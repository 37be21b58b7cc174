//! The tensor side of the coordinator: the base model, the global adapter θ_r, the outer
//! optimizer, held-out evaluation, and the tensor layers of verification (effect, replay).
//! Tensors only: leases, checkpoints' manifests and storage live elsewhere.
//! Owned by one task at a time and moved into `spawn_blocking` for work, so the async side
//! never blocks on a tensor.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use herd_model::Llama;
use herd_model::data::{Dataset, Example, indices_of};
use herd_model::delta::delta_layout;
use herd_model::eval::evaluate;
use herd_model::lora::{Lora, LoraConfig};
use herd_model::peft::{adapter_weights_bytes, load_adapter_weights, save_adapter};
use herd_model::tokenizer::TextTokenizer;
use herd_protocol::delta::{Delta, DeltaLayout};
use herd_protocol::messages::{Lease, RejectReason};
use herd_protocol::sketch::Agreement;

use crate::aggregate::{OuterOptimizer, RobustReport, Robustness, robust_mean};
use crate::config::RunConfig;
use crate::lease::lora_spec;
use crate::verify::effect::{self, EffectConfig, EffectReport};
use crate::verify::replay::{self, ReplayTolerance};

/// Model, adapter and optimizer state.
#[derive(Debug)]
pub struct Engine {
    model: Llama,
    lora: Lora,
    outer: OuterOptimizer,
    robustness: Robustness,
    data: Dataset,
    heldout: Dataset,
    /// Held-out loss of the current θ_r.
    heldout_loss: f64,
    /// The held-out examples the effect check evaluates (a fixed sample of `effect_samples`:
    /// the whole set for every delta would cost more than training it), and θ_r's loss on
    /// them.
    effect_heldout: Vec<usize>,
    effect_heldout_before: f64,
    base_model: PathBuf,
}

/// What aggregating a round produced.
#[derive(Debug)]
pub struct RoundResult {
    pub adapter_bytes: Vec<u8>,
    /// The outer optimizer's momentum after the step (what a restart needs besides θ).
    pub outer_state: Vec<u8>,
    pub heldout_loss: f64,
    pub robust: RobustReport,
    /// Seconds this took (averaging, outer step, evaluation, saving).
    pub seconds: f64,
}

/// A submission that passed the cheap layers, for the tensor layers.
#[derive(Debug)]
pub struct VerifyJob {
    pub lease: Lease,
    pub delta: Delta,
    pub sketch: Vec<f32>,
    pub claimed_drop: f64,
    pub replay: bool,
    /// Whether the effect check runs (a trusted peer's unreplayed delta may skip it).
    pub check_effect: bool,
    pub effect_samples: usize,
    pub effect: EffectConfig,
    pub tolerance: ReplayTolerance,
}

/// What the tensor layers found.
#[derive(Debug)]
pub struct VerifyOutcome {
    pub result: Result<(), RejectReason>,
    pub detail: VerifyDetail,
}

/// The figures behind a verdict, for the verdict log.
#[derive(Debug, Clone, Default)]
pub struct VerifyDetail {
    pub effect: Option<EffectReport>,
    /// Present when the shard was replayed.
    pub replay: Option<Agreement>,
    pub effect_seconds: f64,
    pub replay_seconds: f64,
    /// The sketch of the coordinator's own replay (a check whose answer it knows: a canary).
    pub replayed_sketch: Option<Vec<f32>>,
}

impl Engine {
    /// The run's base model, data and θ_0, and the outer optimizer's initial state. The held-out
    /// loss is not measured yet: [`Engine::start`] or [`Engine::restore`] does that, once.
    pub fn new(cfg: &RunConfig) -> Result<Self> {
        let model = Llama::load(&cfg.base_model, tch::Device::Cpu)?;
        let tok = TextTokenizer::from_dir(&cfg.base_model)?;
        let mcfg = model.config();
        let max_len = Some(cfg.round.max_seq_len as usize);
        let heldout = Dataset::for_model(&cfg.heldout, &tok, mcfg, max_len)?;
        let data = Dataset::for_model(&cfg.data, &tok, mcfg, max_len)?;
        let lora = Lora::new(
            mcfg,
            LoraConfig::try_from(&lora_spec(cfg))?,
            tch::Device::Cpu,
        )?;
        let all: Vec<usize> = (0..heldout.len()).collect();
        let effect_heldout = effect::shard_sample(&all, cfg.verify.effect_samples, cfg.seed);
        Ok(Engine {
            model,
            lora,
            outer: OuterOptimizer::new(cfg.round.outer_lr, cfg.round.outer_momentum),
            robustness: Robustness {
                clip_multiple: cfg.aggregate.clip_multiple,
                trim_fraction: cfg.aggregate.trim_fraction,
            },
            data,
            heldout,
            heldout_loss: f64::NAN,
            effect_heldout,
            effect_heldout_before: f64::NAN,
            base_model: cfg.base_model.clone(),
        })
    }

    /// Starts a fresh run from θ_0: measures its held-out loss.
    pub fn start(&mut self) -> Result<()> {
        self.heldout_loss = self.evaluate_heldout(&self.lora)?;
        self.effect_heldout_before = self.evaluate_effect_heldout(&self.lora)?;
        Ok(())
    }

    /// Continues from a stored θ_r (`adapter`: an `adapter_model.safetensors` file), outer
    /// momentum and θ_r's held-out loss as measured when it was made: how a restarted
    /// coordinator picks up its run.
    pub fn restore(
        &mut self,
        adapter: &Path,
        outer_state: Option<&[u8]>,
        heldout_loss: f64,
    ) -> Result<()> {
        let layers = self.model.config().num_hidden_layers;
        load_adapter_weights(&mut self.lora, adapter, layers)
            .with_context(|| format!("loading the run's adapter {}", adapter.display()))?;
        if let Some(bytes) = outer_state {
            self.outer.restore_state(bytes)?;
        }
        self.heldout_loss = heldout_loss;
        self.effect_heldout_before = self.evaluate_effect_heldout(&self.lora)?;
        Ok(())
    }

    /// The robust mean of `deltas` and the outer step, without evaluating: the part of
    /// [`Engine::finish_round`] an audit replays.
    pub fn apply_round(&mut self, deltas: &[(Delta, u64)]) -> Result<RobustReport> {
        let weighted: Vec<(&Delta, u64)> = deltas.iter().map(|(d, w)| (d, *w)).collect();
        let (mean, robust) = robust_mean(&weighted, self.robustness)?;
        self.outer.step(&self.lora, &mean)?;
        Ok(robust)
    }

    /// What a node trains from: the base model, the training data and a copy of θ_r (for
    /// `rehearse`, which plays the nodes in this process).
    pub fn node_view(&self) -> Result<(&Llama, &Dataset, Lora)> {
        let theta = self.lora.try_clone(self.model.config())?;
        Ok((&self.model, &self.data, theta))
    }

    pub fn layout(&self) -> DeltaLayout {
        delta_layout(&self.lora)
    }

    pub fn adapter_bytes(&self) -> Result<Vec<u8>> {
        Ok(adapter_weights_bytes(&self.lora)?)
    }

    /// Held-out loss of the current adapter.
    pub fn heldout_loss(&self) -> f64 {
        self.heldout_loss
    }

    fn evaluate_heldout(&self, lora: &Lora) -> Result<f64> {
        let ex: Vec<&Example> = self.heldout.examples.iter().collect();
        Ok(evaluate(&self.model, Some(lora), &ex, 32)?.loss)
    }

    fn effect_heldout_examples(&self) -> Vec<&Example> {
        self.effect_heldout
            .iter()
            .map(|&i| &self.heldout.examples[i])
            .collect()
    }

    fn evaluate_effect_heldout(&self, lora: &Lora) -> Result<f64> {
        let ex = self.effect_heldout_examples();
        Ok(evaluate(&self.model, Some(lora), &ex, 32)?.loss)
    }

    /// Effect check (if drawn), then replay (if drawn); cheap first, stops at the first
    /// failure.
    pub fn verify(&self, job: &VerifyJob) -> VerifyOutcome {
        let mut out = VerifyOutcome {
            result: Ok(()),
            detail: VerifyDetail::default(),
        };
        if job.check_effect {
            let started = Instant::now();
            let effect = self.measure_effect(job);
            out.detail.effect_seconds = started.elapsed().as_secs_f64();
            match effect {
                Ok(report) => {
                    out.result = effect::judge(&report, &job.effect);
                    out.detail.effect = Some(report);
                }
                Err(e) => {
                    out.result = Err(RejectReason::Malformed(format!("cannot evaluate: {e:#}")));
                }
            }
        }
        if out.result.is_err() || !job.replay {
            return out;
        }
        let started = Instant::now();
        match replay::replay(&self.model, &self.lora, &self.data, &job.lease) {
            Ok(replayed) => {
                let replayed = replayed.sketch(job.lease.seed);
                let (agreement, result) = replay::judge(&job.sketch, &replayed, &job.tolerance);
                out.detail.replay = Some(agreement);
                out.detail.replayed_sketch = Some(replayed);
                out.result = result;
            }
            Err(e) => {
                // Our failure, not the node's: accept on the earlier layers and say so.
                tracing::error!(error = %e, lease = %job.lease.id, "replay failed");
            }
        }
        out.detail.replay_seconds = started.elapsed().as_secs_f64();
        out
    }

    /// The sketch of `lease` trained from θ_r here: the truth a check is judged by.
    pub fn replay_sketch(&self, lease: &Lease) -> Result<Vec<f32>> {
        let replayed = replay::replay(&self.model, &self.lora, &self.data, lease)?;
        Ok(replayed.sketch(lease.seed))
    }

    fn measure_effect(&self, job: &VerifyJob) -> Result<EffectReport> {
        let indices = indices_of(&job.lease.ranges, self.data.len())?;
        let sample = effect::shard_sample(&indices, job.effect_samples, job.lease.seed);
        let shard: Vec<&Example> = sample.iter().map(|&i| &self.data.examples[i]).collect();
        let heldout = self.effect_heldout_examples();
        let scale = job.effect.scale;
        let losses = effect::measure(&self.model, &self.lora, &job.delta, scale, &shard, &heldout)?;
        Ok(EffectReport {
            shard_before: losses.shard_before,
            shard_after: losses.shard_after,
            claimed_drop: job.claimed_drop,
            scale,
            heldout_before: self.effect_heldout_before,
            heldout_after: losses.heldout_after,
        })
    }

    /// Robust mean of `deltas` (token-weighted), the outer step, evaluation, and the new
    /// adapter saved as a PEFT dir into `checkpoint` when given.
    pub fn finish_round(
        &mut self,
        deltas: &[(Delta, u64)],
        checkpoint: Option<&Path>,
    ) -> Result<RoundResult> {
        let started = Instant::now();
        let robust = self.apply_round(deltas)?;
        self.heldout_loss = self.evaluate_heldout(&self.lora)?;
        self.effect_heldout_before = self.evaluate_effect_heldout(&self.lora)?;
        if let Some(dir) = checkpoint {
            save_adapter(
                dir,
                &self.lora,
                Some(&self.base_model.display().to_string()),
            )?;
        }
        Ok(RoundResult {
            adapter_bytes: self.adapter_bytes()?,
            outer_state: self.outer.state_bytes()?,
            heldout_loss: self.heldout_loss,
            robust,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
