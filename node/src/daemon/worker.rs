//! Doing one lease: fetch what is missing, train H steps from θ_r off the async runtime, then
//! for a training lease compress `Δ + residual` with the run's codec and build the signed
//! submission; for a check, report the sketch of Δ (the residual is not touched).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use herd_model::Llama;
use herd_model::data::Dataset;
use herd_model::lora::{Lora, LoraConfig};
use herd_model::peft::load_adapter_weights;
use herd_model::shard::{ShardOutcome, train_shard};
use herd_model::tokenizer::TextTokenizer;
use herd_protocol::delta::Feedback;
use herd_protocol::messages::{CheckReport, Lease, LeaseTask, RunAssets, Submission};
use libp2p::identity::Keypair;

use crate::progress::StepProgress;

use super::cache::BlobCache;
use super::network::Client;
use super::residual::ResidualStore;

/// A run's model and data, loaded once and reused across leases.
struct Loaded {
    assets: RunAssets,
    max_seq_len: u32,
    model: Llama,
    data: Dataset,
}

/// What a lease produced.
pub struct Outcome {
    pub submission: Submission,
    /// What to keep as the residual, depending on the verdict.
    pub feedback: Feedback,
    pub loss_before: f64,
    pub loss_after: f64,
    /// Getting the lease's files and loading what changed; then training, encoding, signing.
    pub fetch_seconds: f64,
    pub seconds: f64,
}

/// What a check lease produced.
pub struct CheckOutcome {
    pub report: CheckReport,
    pub tokens: u64,
    pub fetch_seconds: f64,
    pub seconds: f64,
}

/// A lease's shard, trained.
struct Trained {
    shard: ShardOutcome,
    fetch_seconds: f64,
    started: std::time::Instant,
}

pub struct Worker {
    pub cache: BlobCache,
    pub residuals: ResidualStore,
    device: tch::Device,
    loaded: Option<Loaded>,
}

impl Worker {
    pub fn new(data_dir: &std::path::Path, cache: BlobCache, device: tch::Device) -> Result<Self> {
        Ok(Worker {
            cache,
            residuals: ResidualStore::new(data_dir.join("residual")),
            device,
            loaded: None,
        })
    }

    /// Trains `lease` and returns the signed submission.
    pub async fn work(
        &mut self,
        client: &Client,
        keypair: &Keypair,
        lease: &Lease,
    ) -> Result<Outcome> {
        let Trained {
            shard,
            fetch_seconds,
            started,
        } = self.train_lease(client, lease).await?;
        let residual = self.residuals.load(&lease.run);
        let mut feedback = shard
            .delta
            .encode(lease.codec, residual.as_deref(), lease.seed)
            .context("encoding the delta")?;
        let submission = Submission::signed(
            lease,
            std::mem::take(&mut feedback.payload),
            shard.loss_before,
            shard.loss_after,
            shard.tokens,
            keypair,
        )
        .context("signing the submission")?;
        let (loss_before, loss_after) = (shard.loss_before, shard.loss_after);
        Ok(Outcome {
            submission,
            feedback,
            loss_before,
            loss_after,
            fetch_seconds,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Replays `lease` (a check) and returns the report of what it trained.
    pub async fn check(&mut self, client: &Client, lease: &Lease) -> Result<CheckOutcome> {
        let trained = self.train_lease(client, lease).await?;
        let report = CheckReport {
            lease: lease.id,
            run: lease.run.clone(),
            round: lease.round,
            shard: lease.shard,
            base_adapter: lease.base_adapter,
            sketch: trained.shard.delta.sketch(lease.seed),
        };
        Ok(CheckOutcome {
            report,
            tokens: trained.shard.tokens,
            fetch_seconds: trained.fetch_seconds,
            seconds: trained.started.elapsed().as_secs_f64(),
        })
    }

    /// Fetches what `lease` needs and the cache lacks, loads what changed, and trains the
    /// shard (off the runtime).
    async fn train_lease(&mut self, client: &Client, lease: &Lease) -> Result<Trained> {
        let fetch_started = std::time::Instant::now();
        let a = &lease.assets;
        let config = self.cache.fetch(client, &a.config, "config.json").await?;
        let weights = self
            .cache
            .fetch(client, &a.weights, "model.safetensors")
            .await?;
        let tokenizer = self
            .cache
            .fetch(client, &a.tokenizer, "tokenizer.json")
            .await?;
        let data = self.cache.fetch(client, &a.data, "training data").await?;
        let adapter = self
            .cache
            .fetch(client, &lease.base_adapter, "the round's adapter")
            .await?;
        let stale = self
            .loaded
            .as_ref()
            .is_none_or(|l| l.assets != *a || l.max_seq_len != lease.max_seq_len);
        let loaded = if stale {
            let dir = self
                .cache
                .model_dir(&config, &weights, &tokenizer, &a.weights)?;
            let (device, max_seq_len, assets) = (self.device, lease.max_seq_len, a.clone());
            tokio::task::spawn_blocking(move || load(dir, data, device, max_seq_len, assets))
                .await??
        } else {
            self.loaded.take().expect("checked above")
        };
        let lease_owned = lease.clone();
        let fetch_seconds = fetch_started.elapsed().as_secs_f64();
        let started = std::time::Instant::now();
        // Dropping this future (pause, Ctrl-C) stops the training within a step.
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let stopped = stop.0.clone();
        let (loaded, result) = tokio::task::spawn_blocking(move || {
            let result = train(&loaded, &lease_owned, &adapter, &stopped);
            (loaded, result)
        })
        .await?;
        drop(stop);
        self.loaded = Some(loaded);
        Ok(Trained {
            shard: result?,
            fetch_seconds,
            started,
        })
    }
}

fn load(
    dir: PathBuf,
    data: PathBuf,
    device: tch::Device,
    max_seq_len: u32,
    assets: RunAssets,
) -> Result<Loaded> {
    let model = Llama::load(&dir, device)?;
    let tok = TextTokenizer::from_dir(&dir)?;
    let data = Dataset::for_model(&data, &tok, model.config(), Some(max_seq_len as usize))?;
    tracing::info!(examples = data.len(), "run loaded");
    Ok(Loaded {
        assets,
        max_seq_len,
        model,
        data,
    })
}

/// Sets its flag when dropped: the training thread checks it after every step.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Trains from the lease's adapter, with a progress bar on a terminal (log lines otherwise),
/// until done or `stop`; returns the raw delta, losses and tokens.
fn train(
    loaded: &Loaded,
    lease: &Lease,
    adapter: &std::path::Path,
    stop: &AtomicBool,
) -> Result<ShardOutcome> {
    let model_cfg = loaded.model.config();
    let mut lora = Lora::new(
        model_cfg,
        LoraConfig::try_from(&lease.lora)?,
        loaded.model.device(),
    )?;
    load_adapter_weights(&mut lora, adapter, model_cfg.num_hidden_layers)?;
    let what = match lease.task {
        LeaseTask::Train => "",
        LeaseTask::Check => " (check)",
    };
    let mut progress = StepProgress::new(
        lease.inner_steps as usize,
        &format!("round {} shard {}{what}", lease.round, lease.shard),
    );
    // A check reports its sketch only: the before/after loss is a training lease's.
    let measure_loss = lease.task == LeaseTask::Train;
    let outcome = train_shard(
        &loaded.model,
        &lora,
        &loaded.data,
        lease,
        measure_loss,
        |s| {
            progress.step(s.step, s.loss, s.tokens);
            if stop.load(Ordering::Relaxed) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    );
    progress.finish();
    Ok(outcome?)
}
