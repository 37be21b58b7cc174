//! herd's model code on libtorch (via `tch`): a LLaMA-family causal LM, LoRA adapters in PEFT's
//! format, the data pipeline, the inner training loop, evaluation and generation. Used by the
//! contributor daemon (training) and the coordinator (evaluation, replay).
//!
//! # Layout
//! - [`config`]: HF `config.json`.
//! - [`safetensors_io`]: memory-mapped (sharded) safetensors in, atomic safetensors out.
//! - [`llama`]: the model (with [`kv_cache`] for generation); [`lora`]: adapters; [`peft`]: adapter dirs; [`merge`]: folding in.
//! - [`tokenizer`], [`data`]: `tokenizer.json`, records, examples, shards, batches.
//! - [`train`], [`eval`], [`generate`]: what is done with a model; [`shard`]: one lease.
//! - [`delta`]: adapters as protocol deltas.
//! - [`device`]: CPU / CUDA selection.
//!
//! `docs/architecture.md` shows where this crate sits in the path of a submission.

pub mod config;
pub mod data;
pub mod delta;
pub mod device;
pub mod error;
pub mod eval;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod lora;
pub mod merge;
pub mod peft;
mod rope;
pub mod safetensors_io;
pub mod shard;
pub mod tokenizer;
pub mod train;

pub use config::LlamaConfig;
pub use error::{ModelError, Result};
pub use llama::{Llama, WeightInit};
pub use lora::{Lora, LoraConfig, Target};

#[cfg(test)]
mod generate_tests;
#[cfg(test)]
mod parity_tests;
