//! The verdict log, `verdicts.jsonl` in the data dir: one JSON line per verdict with its
//! reason and the figures behind it, for people to read. Not fsynced: the durable record,
//! which the coordinator restarts from, is `store`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One verdict as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerdictRecord {
    pub time_ms: u64,
    pub peer: String,
    pub lease: u64,
    pub round: u64,
    pub shard: u32,
    /// `accepted` or the reason's label.
    pub verdict: String,
    /// The reason in words (empty when accepted).
    pub reason: String,
    /// The verdict as sent (what a resubmission of the same payload gets again).
    pub outcome: herd_protocol::messages::Verdict,
    pub payload_hash: Option<String>,
    pub payload_bytes: u64,
    pub tokens: u64,
    pub norm: Option<f64>,
    pub effect: Option<crate::verify::effect::EffectReport>,
    pub replay: Option<herd_protocol::sketch::Agreement>,
    pub verify_seconds: f64,
    pub replay_seconds: f64,
}

#[derive(Debug)]
pub struct VerdictLog {
    file: File,
}

impl VerdictLog {
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(VerdictLog { file })
    }

    /// Appends `record`.
    pub fn append(&mut self, record: &VerdictRecord) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .context("writing the verdict log")
    }
}
