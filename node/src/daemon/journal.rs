//! `leases.jsonl` in the data dir: one line per lease the daemon worked, saying where its time
//! went (fetching, training, submitting until the verdict came back) and what came of it. For
//! people asking what their node did, and for the real-model benchmark's split of a round. The
//! file is capped: past [`MAX_BYTES`] it becomes `leases.jsonl.1` (the one before is dropped),
//! so a node that runs for months keeps two bounded files.

use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

const FILE: &str = "leases.jsonl";
const MAX_BYTES: u64 = 1 << 20;

/// One lease, worked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub run: String,
    pub round: u64,
    pub shard: u32,
    /// When the verdict (or the loss of the submission) came, in Unix milliseconds.
    pub at_ms: u64,
    /// Getting what the lease needs that the cache lacked (model, data, the round's adapter).
    pub fetch_seconds: f64,
    /// Training, encoding and signing.
    pub train_seconds: f64,
    /// From sending the submission to its verdict: the upload, the coordinator's queue and
    /// its checks.
    pub submit_seconds: f64,
    /// `accepted`, a reject reason, or why no verdict came.
    pub verdict: String,
    pub bytes: u64,
    pub tokens: u64,
}

/// Appends `record` to the data dir's journal; a failure is logged, never fatal (the journal
/// is an account, not state).
pub fn append(data_dir: &Path, record: &LeaseRecord) {
    if let Err(e) = try_append(data_dir, record) {
        tracing::warn!(error = %e, "could not write to {FILE}");
    }
}

fn try_append(data_dir: &Path, record: &LeaseRecord) -> std::io::Result<()> {
    let path = data_dir.join(FILE);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= MAX_BYTES) {
        std::fs::rename(&path, data_dir.join(format!("{FILE}.1")))?;
    }
    let mut line = serde_json::to_string(record).map_err(std::io::Error::other)?;
    line.push('\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?
        .write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: u64) -> LeaseRecord {
        LeaseRecord {
            run: "r".into(),
            round,
            shard: 1,
            at_ms: 5,
            fetch_seconds: 0.5,
            train_seconds: 2.0,
            submit_seconds: 0.25,
            verdict: "accepted".into(),
            bytes: 100,
            tokens: 42,
        }
    }

    fn read(path: &Path) -> Vec<LeaseRecord> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn appends_lines_and_rolls_over_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), &record(0));
        append(dir.path(), &record(1));
        assert_eq!(read(&dir.path().join(FILE)), vec![record(0), record(1)]);
        // A full file moves aside whole and the next line starts a new one.
        let full = dir.path().join(FILE);
        std::fs::write(&full, vec![b'\n'; MAX_BYTES as usize]).unwrap();
        append(dir.path(), &record(2));
        assert_eq!(read(&full), vec![record(2)]);
        let old = std::fs::metadata(dir.path().join(format!("{FILE}.1"))).unwrap();
        assert_eq!(old.len(), MAX_BYTES);
    }
}
