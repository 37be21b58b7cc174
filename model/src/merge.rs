//! Folding an adapter into its base: `W' = W + scale · B·A` for every adapted layer, written as
//! a base model dir (HF layout) that transformers loads like any other.

use std::path::Path;

use tch::{Device, Kind};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::lora::Target;
use crate::peft::load_adapter;
use crate::safetensors_io::{SafetensorsFiles, write_safetensors};

/// Files of a model dir copied as they are into a merged dir, when present.
const COPIED_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// What a merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeReport {
    pub merged_layers: usize,
    pub tensors: usize,
}

/// Writes `base + adapter` into `out` (which must not be `base`). Weights keep their dtype.
pub fn merge_adapter(base: &Path, adapter: &Path, out: &Path) -> Result<MergeReport> {
    let cfg = LlamaConfig::from_dir(base)?;
    let lora = load_adapter(adapter, &cfg, Device::Cpu)?;
    let files = SafetensorsFiles::open_model_dir(base)?;
    if same_dir(base, out) {
        return Err(ModelError::Argument(format!(
            "--out {} is the base model dir; merging writes a new dir",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let scale = lora.config().scale();
    let mut names: Vec<String> = files.names().map(str::to_string).collect();
    names.sort();
    let mut merged_layers = 0;
    let mut tensors = Vec::with_capacity(names.len());
    let _guard = tch::no_grad_guard();
    for name in names {
        let mut tensor = files.tensor(&name, None)?;
        if let Some((layer, target)) = adapted_layer(&name, &cfg)
            && let Some(pair) = lora.pair(layer, target)
        {
            let kind = tensor.kind();
            let update = pair.b.f_matmul(&pair.a)?.f_mul_scalar(scale)?;
            tensor = tensor
                .f_to_kind(Kind::Float)?
                .f_add(&update)?
                .f_to_kind(kind)?;
            merged_layers += 1;
        }
        tensors.push((name, tensor));
    }
    let expected = cfg.num_hidden_layers as usize * lora.config().targets.len();
    if merged_layers != expected {
        return Err(ModelError::invalid(
            files.display_path(),
            format!("found {merged_layers} of the {expected} adapted weights"),
        ));
    }
    write_safetensors(&out.join("model.safetensors"), &tensors, &[])?;
    for file in COPIED_FILES {
        let src = base.join(file);
        if src.exists() {
            std::fs::copy(&src, out.join(file)).map_err(|e| ModelError::io(&src, e))?;
        }
    }
    Ok(MergeReport {
        merged_layers,
        tensors: tensors.len(),
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `model.layers.{i}.{block}.{target}.weight` → `(i, target)`.
fn adapted_layer(name: &str, cfg: &LlamaConfig) -> Option<(i64, Target)> {
    let rest = name
        .strip_prefix("model.layers.")?
        .strip_suffix(".weight")?;
    let mut parts = rest.split('.');
    let layer: i64 = parts.next()?.parse().ok()?;
    let block = parts.next()?;
    let module = parts.next()?;
    if parts.next().is_some() || layer >= cfg.num_hidden_layers {
        return None;
    }
    Target::ALL
        .into_iter()
        .find(|t| t.name() == module && t.block() == block)
        .map(|t| (layer, t))
}
