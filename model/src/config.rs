//! The HF `config.json` of a LLaMA-family model (LLaMA, Mistral, Qwen2), field names as HF writes them.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Model types whose architecture is the one implemented in [`crate::llama`].
const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

/// A token id or a list of them (`eos_token_id` is either in HF configs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    /// The first id, used when one is needed (e.g. to end a response).
    pub fn first(&self) -> Option<i64> {
        match self {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }

    /// Whether `id` is one of these ids.
    pub fn contains(&self, id: i64) -> bool {
        match self {
            TokenIds::One(one) => *one == id,
            TokenIds::Many(ids) => ids.contains(&id),
        }
    }
}

/// RoPE parameters as transformers 5 writes them (`rope_parameters`); older files use
/// top-level `rope_theta` and `rope_scaling`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
}

/// The subset of HF `config.json` that a LLaMA-family forward pass depends on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Fewer than `num_attention_heads` means grouped-query attention; absent means MHA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<i64>,
    /// Absent means `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    pub max_position_embeddings: i64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// LLaMA: bias on q, k, v and o projections. Qwen2 always has q/k/v bias and no o bias.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<TokenIds>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_hidden_act() -> String {
    "silu".to_string()
}

impl LlamaConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::NotFound {
                path: path.clone(),
                hint: " (a model dir needs config.json, model.safetensors and tokenizer.json)"
                    .to_string(),
            },
            _ => ModelError::io(&path, e),
        })?;
        Self::from_json(&text, &path)
    }

    /// Parses and validates config JSON; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let cfg: LlamaConfig = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let unsupported = |problem: String| ModelError::Unsupported {
            path: path.to_path_buf(),
            problem,
        };
        if !SUPPORTED_MODEL_TYPES.contains(&self.model_type.as_str()) {
            return Err(unsupported(format!(
                "model_type `{}` (herd runs LLaMA-family models: {})",
                self.model_type,
                SUPPORTED_MODEL_TYPES.join(", ")
            )));
        }
        if let Some(archs) = &self.architectures
            && let Some(arch) = archs.iter().find(|a| !a.ends_with("ForCausalLM"))
        {
            return Err(unsupported(format!(
                "architecture `{arch}` (expected a *ForCausalLM model)"
            )));
        }
        if self.hidden_act != "silu" {
            return Err(unsupported(format!(
                "hidden_act `{}` (LLaMA uses silu)",
                self.hidden_act
            )));
        }
        for rope in [&self.rope_parameters, &self.rope_scaling]
            .into_iter()
            .flatten()
        {
            if let Some(kind) = rope.rope_type.as_deref()
                && kind != "default"
            {
                return Err(unsupported(format!("rope type `{kind}`")));
            }
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value <= 0 {
                return Err(ModelError::invalid(
                    path,
                    format!("{name} must be positive, is {value}"),
                ));
            }
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(ModelError::invalid(
                path,
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(ModelError::invalid(path, "head_dim must be even for RoPE"));
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            return Err(ModelError::invalid(
                path,
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads,
                    self.num_kv_heads()
                ),
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta() > 0.0) {
            return Err(ModelError::invalid(
                path,
                "rms_norm_eps and rope_theta must be positive",
            ));
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE base, wherever the file keeps it; 10000 (LLaMA's) when absent.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// Whether q, k and v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    /// Whether the output projection carries a bias (LLaMA's `attention_bias`, never Qwen2).
    pub fn o_bias(&self) -> bool {
        self.attention_bias && self.model_type != "qwen2"
    }

    pub fn eos_id(&self) -> Option<i64> {
        self.eos_token_id.as_ref().and_then(TokenIds::first)
    }

    /// The id used to pad batches: `pad_token_id`, else EOS, else 0 (padding never reaches the loss).
    pub fn pad_id(&self) -> i64 {
        self.pad_token_id
            .as_ref()
            .and_then(TokenIds::first)
            .or(self.eos_id())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":16,
        "rope_parameters":{"rope_theta":500.0,"rope_type":"default"}}"#;

    #[test]
    fn reads_rope_theta_from_either_place() {
        let cfg = LlamaConfig::from_json(TINY, Path::new("config.json")).unwrap();
        assert_eq!(cfg.rope_theta(), 500.0);
        assert_eq!(cfg.head_dim(), 4);
        let old = TINY.replace(
            r#""rope_parameters":{"rope_theta":500.0,"rope_type":"default"}"#,
            r#""rope_theta":1234.0"#,
        );
        let cfg = LlamaConfig::from_json(&old, Path::new("config.json")).unwrap();
        assert_eq!(cfg.rope_theta(), 1234.0);
    }

    #[test]
    fn rejects_unsupported_and_inconsistent_configs() {
        let bert = TINY.replace("\"llama\"", "\"bert\"");
        let err = LlamaConfig::from_json(&bert, Path::new("m/config.json")).unwrap_err();
        assert!(err.to_string().contains("model_type `bert`"), "{err}");
        let gqa = TINY.replace("\"num_key_value_heads\":1", "\"num_key_value_heads\":3");
        let err = LlamaConfig::from_json(&gqa, Path::new("m/config.json")).unwrap_err();
        assert!(err.to_string().contains("not a multiple"), "{err}");
        let err = LlamaConfig::from_json("{not json", Path::new("m/config.json")).unwrap_err();
        assert!(
            err.to_string().starts_with("m/config.json: invalid JSON"),
            "{err}"
        );
    }
}
