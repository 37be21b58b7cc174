//! One module per `herd-node` subcommand other than `run` (the daemon, in `crate::daemon`),
//! plus the options they share; `pause` and `resume` share a module.

pub mod bench_generate;
pub mod bench_train;
pub mod bench_transfer;
pub mod eval;
pub mod generate;
pub mod make_default;
pub mod merge;
pub mod pause;
pub mod pull;
pub mod status;
pub mod train_local;
pub mod verify_checkpoint;

use std::path::Path;

use anyhow::Result;
use herd_model::Llama;
use herd_model::data::Dataset;
use herd_model::device::DeviceChoice;
use herd_model::tokenizer::TextTokenizer;

use crate::gpu_memory::GpuMemoryShare;

/// Where and how wide to compute.
#[derive(Debug, Clone, clap::Args)]
pub struct ComputeArgs {
    /// auto (CUDA when present, else CPU), cpu, or cuda:N.
    #[arg(long, default_value = "auto", env = "HERD_DEVICE")]
    pub device: DeviceChoice,
    /// CPU threads for libtorch (default: libtorch's choice, one per core).
    #[arg(long, env = "HERD_THREADS")]
    pub threads: Option<i32>,
    /// Most of the GPU's memory libtorch may take, as a share of the device: `60%` or `0.6`.
    /// Past it a shard fails with out-of-memory instead of squeezing out your other programs.
    #[arg(long, env = "HERD_MAX_GPU_MEM")]
    pub max_gpu_mem: Option<GpuMemoryShare>,
}

impl ComputeArgs {
    pub fn apply(&self) -> Result<tch::Device> {
        // First, before libtorch touches a GPU: this may restart the process with the cap.
        if let (Some(share), DeviceChoice::Auto | DeviceChoice::Cuda(_)) =
            (self.max_gpu_mem, &self.device)
        {
            crate::gpu_memory::ensure_cap(share)?;
        }
        if let Some(n) = self.threads {
            anyhow::ensure!(n > 0, "--threads must be positive");
            tch::set_num_threads(n);
        }
        let device = self.device.resolve()?;
        if let Some(share) = self.max_gpu_mem {
            match device {
                tch::Device::Cuda(n) => tracing::info!("cuda:{n} capped at {share} of its memory"),
                _ => tracing::warn!("no GPU in use: --max-gpu-mem {share} has no effect"),
            }
        }
        tracing::debug!(?device, threads = tch::get_num_threads(), "compute");
        Ok(device)
    }
}

/// A loaded base model with its tokenizer.
pub struct Loaded {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
}

/// Applies the compute options, then loads a model and, if given, an adapter for it.
pub fn load_with_adapter(
    model: &Path,
    adapter: Option<&Path>,
    compute: &ComputeArgs,
) -> Result<(Loaded, Option<herd_model::Lora>)> {
    let device = compute.apply()?;
    let loaded = load_model(model, device)?;
    let lora = adapter
        .map(|dir| herd_model::peft::load_adapter(dir, loaded.model.config(), device))
        .transpose()?;
    Ok((loaded, lora))
}

pub fn load_model(dir: &Path, device: tch::Device) -> Result<Loaded> {
    let model = Llama::load(dir, device)?;
    let tokenizer = TextTokenizer::from_dir(dir)?;
    Ok(Loaded { model, tokenizer })
}

/// Tokenizes a data file for `loaded`'s model, sequences capped at `max_len` (or the model's context).
pub fn load_data(loaded: &Loaded, path: &Path, max_len: Option<usize>) -> Result<Dataset> {
    Ok(Dataset::for_model(
        path,
        &loaded.tokenizer,
        loaded.model.config(),
        max_len,
    )?)
}
