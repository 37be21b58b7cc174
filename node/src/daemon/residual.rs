//! The error-feedback residual: what the codec did not send, kept per run in the data dir
//! (`residual/<blake3 of the run name>.bin`) and added to the next delta. Written atomically
//! after each verdict; a missing, unreadable or foreign file starts from zero, which costs a
//! little accuracy and nothing else.

use std::path::PathBuf;

use anyhow::{Context, Result};
use herd_protocol::delta::MAX_DELTA_BYTES;
use herd_protocol::framing::{decode, encode};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    run: String,
    tensors: Vec<Vec<f32>>,
}

#[derive(Debug)]
pub struct ResidualStore {
    dir: PathBuf,
}

impl ResidualStore {
    pub fn new(dir: PathBuf) -> Self {
        ResidualStore { dir }
    }

    fn path(&self, run: &str) -> PathBuf {
        self.dir
            .join(format!("{}.bin", blake3::hash(run.as_bytes()).to_hex()))
    }

    /// The residual kept for `run`, if there is a readable one.
    pub fn load(&self, run: &str) -> Option<Vec<Vec<f32>>> {
        let bytes = std::fs::read(self.path(run)).ok()?;
        // Fp32 residuals are as large as a raw delta, so the delta cap bounds them too.
        match decode::<Stored, { MAX_DELTA_BYTES * 2 }>(&bytes) {
            Ok(s) if s.run == run => Some(s.tensors),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable error-feedback residual");
                None
            }
        }
    }

    pub fn save(&self, run: &str, tensors: Vec<Vec<f32>>) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let bytes = encode(&Stored {
            run: run.to_string(),
            tensors,
        })?;
        herd_model::safetensors_io::write_atomic(&self.path(run), &bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_one_residual_per_run_and_survives_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResidualStore::new(dir.path().join("residual"));
        assert!(store.load("a").is_none());
        store.save("a", vec![vec![1.0, 2.0], vec![3.0]]).unwrap();
        store.save("b", vec![vec![9.0]]).unwrap();
        assert_eq!(store.load("a").unwrap(), vec![vec![1.0, 2.0], vec![3.0]]);
        assert_eq!(store.load("b").unwrap(), vec![vec![9.0]]);
        std::fs::write(store.path("a"), b"garbage").unwrap();
        assert!(store.load("a").is_none());
    }
}
