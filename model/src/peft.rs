//! PEFT adapter dirs: `adapter_config.json` + `adapter_model.safetensors`, keys as PEFT writes
//! them (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`), so adapters move
//! between herd and PEFT unchanged.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::Device;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::lora::{Lora, LoraConfig, Target};
use crate::safetensors_io::{SafetensorsFiles, serialize_safetensors, write_atomic};

/// Prefix PEFT puts before the base model's own parameter names.
pub const PEFT_PREFIX: &str = "base_model.model.";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// herd's own keys in the safetensors header (PEFT ignores header metadata).
const META_TRAIN_A: &str = "herd.train_a";
const META_INIT_SEED: &str = "herd.init_seed";

/// `target_modules`: PEFT allows a list of names or one regex string.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

/// The fields of PEFT's `LoraConfig` that herd reads or writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: i64,
    pub lora_alpha: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    #[serde(default)]
    pub rank_pattern: Option<Value>,
    #[serde(default)]
    pub alpha_pattern: Option<Value>,
}

fn default_bias() -> String {
    "none".to_string()
}

/// Writes `lora` as a PEFT adapter dir. `base_model` goes to `base_model_name_or_path`.
pub fn save_adapter(dir: &Path, lora: &Lora, base_model: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let cfg = lora.config();
    let config = AdapterConfig {
        peft_type: "LORA".into(),
        r: cfg.rank,
        lora_alpha: cfg.alpha,
        target_modules: TargetModules::List(
            cfg.targets.iter().map(|t| t.name().to_string()).collect(),
        ),
        lora_dropout: 0.0,
        bias: "none".into(),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: base_model.map(str::to_string),
        fan_in_fan_out: false,
        use_rslora: cfg.use_rslora,
        use_dora: false,
        inference_mode: true,
        layers_to_transform: None,
        rank_pattern: None,
        alpha_pattern: None,
    };
    let mut json = serde_json::to_value(&config).expect("adapter config serialises");
    if let Value::Object(map) = &mut json {
        map.retain(|_, v| !v.is_null());
    }
    let text = serde_json::to_string_pretty(&json).expect("adapter config serialises");
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    write_atomic(
        &weights_path,
        &adapter_weights_bytes(lora).map_err(|e| e.with_path(&weights_path))?,
    )?;
    write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
}

/// Reads `DIR/adapter_config.json` and checks that herd can apply it.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelError::NotFound {
            path: path.clone(),
            hint: " (an adapter dir needs adapter_config.json and adapter_model.safetensors)"
                .into(),
        },
        _ => ModelError::io(&path, e),
    })?;
    let cfg: AdapterConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    let unsupported = |problem: &str| ModelError::AdapterMismatch {
        path: path.clone(),
        problem: problem.to_string(),
    };
    if cfg.peft_type != "LORA" {
        return Err(unsupported(&format!(
            "peft_type `{}` (herd reads LORA adapters)",
            cfg.peft_type
        )));
    }
    if cfg.use_dora || cfg.fan_in_fan_out || cfg.bias != "none" {
        return Err(unsupported(
            "DoRA, fan_in_fan_out and LoRA biases are not supported",
        ));
    }
    let non_empty = |v: &Option<Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    if non_empty(&cfg.layers_to_transform)
        || non_empty(&cfg.rank_pattern)
        || non_empty(&cfg.alpha_pattern)
    {
        return Err(unsupported(
            "layers_to_transform, rank_pattern and alpha_pattern are not supported",
        ));
    }
    if cfg.r <= 0 {
        return Err(unsupported(&format!("rank r = {} must be positive", cfg.r)));
    }
    Ok(cfg)
}

/// Loads a PEFT adapter dir for a model of config `model`, checking that its rank, targets and
/// every tensor's shape fit that model.
pub fn load_adapter(dir: &Path, model: &LlamaConfig, device: Device) -> Result<Lora> {
    let cfg = read_adapter_config(dir)?;
    let config_path = dir.join(ADAPTER_CONFIG);
    let names = match &cfg.target_modules {
        TargetModules::List(names) => names.clone(),
        TargetModules::Pattern(p) => {
            return Err(ModelError::AdapterMismatch {
                path: config_path,
                problem: format!(
                    "target_modules is the pattern `{p}`; herd needs a list of module names"
                ),
            });
        }
    };
    let targets = names
        .iter()
        .map(|n| {
            Target::parse(n).map_err(|_| ModelError::AdapterMismatch {
                path: config_path.clone(),
                problem: format!(
                    "target module `{n}` is not a linear layer of a LLaMA decoder block (valid: {})",
                    Target::ALL.map(Target::name).join(", ")
                ),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    if !weights_path.exists() {
        let hint = if dir.join("adapter_model.bin").exists() {
            " (only safetensors adapters are read; adapter_model.bin is a pickle)"
        } else {
            ""
        };
        return Err(ModelError::NotFound {
            path: weights_path,
            hint: hint.into(),
        });
    }
    let files = SafetensorsFiles::open(std::slice::from_ref(&weights_path))?;
    let meta = files.metadata()?;
    let lora_cfg = LoraConfig {
        rank: cfg.r,
        alpha: cfg.lora_alpha,
        targets,
        train_a: meta.get(META_TRAIN_A).is_some_and(|v| v == "true"),
        use_rslora: cfg.use_rslora,
        init_seed: meta
            .get(META_INIT_SEED)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    };
    let mut lora = Lora::new(model, lora_cfg, device)?;
    fill_factors(&mut lora, &files, &weights_path, model.num_hidden_layers)?;
    Ok(lora)
}

/// Fills `lora`'s factors from an `adapter_model.safetensors` file (PEFT keys), which must hold
/// exactly this adapter's factors with matching shapes.
pub fn load_adapter_weights(lora: &mut Lora, weights_path: &Path, layers: i64) -> Result<()> {
    let files = SafetensorsFiles::open(&[weights_path.to_path_buf()])?;
    fill_factors(lora, &files, weights_path, layers)
}

fn fill_factors(
    lora: &mut Lora,
    files: &SafetensorsFiles,
    weights_path: &Path,
    layers: i64,
) -> Result<()> {
    let names: Vec<&str> = lora.config().targets.iter().map(|t| t.name()).collect();
    let weights_path = weights_path.to_path_buf();
    let expected: std::collections::HashSet<String> = lora
        .named_factors()
        .into_iter()
        .map(|(n, _)| format!("{PEFT_PREFIX}{n}"))
        .collect();
    let mut unexpected: Vec<&str> = files.names().filter(|n| !expected.contains(*n)).collect();
    unexpected.sort();
    if let Some(first) = unexpected.first() {
        return Err(ModelError::AdapterMismatch {
            path: weights_path,
            problem: format!(
                "tensor `{first}` (and {} more) is not a LoRA factor of this model's {layers} layers and targets {names:?}",
                unexpected.len() - 1,
            ),
        });
    }
    let rank = lora.config().rank;
    lora.load_factors(|name, shape| {
        files
            .tensor(&format!("{PEFT_PREFIX}{name}"), Some(shape))
            .map_err(|e| match e {
                ModelError::ShapeMismatch { path, name, expected, found } => ModelError::AdapterMismatch {
                    path,
                    problem: format!(
                        "tensor `{name}` has shape {found:?}, but rank r={rank} on this model needs {expected:?}"
                    ),
                },
                other => other,
            })
    })
}

/// The `adapter_model.safetensors` bytes of `lora` (what [`save_adapter`] writes).
pub fn adapter_weights_bytes(lora: &Lora) -> Result<Vec<u8>> {
    let cfg = lora.config();
    let tensors: Vec<_> = lora
        .named_factors()
        .into_iter()
        .map(|(name, t)| (format!("{PEFT_PREFIX}{name}"), t.detach()))
        .collect();
    serialize_safetensors(
        &tensors,
        &[
            (META_TRAIN_A, cfg.train_a.to_string()),
            (META_INIT_SEED, cfg.init_seed.to_string()),
        ],
    )
}
