//! `tokenizer.json` through the `tokenizers` crate, with errors that name the file.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// A HF fast tokenizer loaded from `tokenizer.json`.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl TextTokenizer {
    /// Loads `DIR/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(ModelError::NotFound {
                path: path.to_path_buf(),
                hint: " (a model dir needs tokenizer.json)".to_string(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            problem: e.to_string(),
        })?;
        Ok(TextTokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Token ids of `text`; `add_special` applies the post-processor (e.g. a leading BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| self.error(e))?;
        Ok(enc.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.inner.decode(&ids, true).map_err(|e| self.error(e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    fn error(&self, e: tokenizers::Error) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            problem: e.to_string(),
        }
    }
}
