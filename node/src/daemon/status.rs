//! The daemon's account of itself: what it is doing and what it has contributed, kept in
//! `status.json` in its data dir and replaced whole at each change (written to a temporary file,
//! then renamed over it, so a reader never sees half a file). `herd-node status` reads it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use herd_protocol::messages::{RejectReason, now_ms};
use serde::{Deserialize, Serialize};

const FILE: &str = "status.json";

/// The daemon's account of itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub peer: String,
    pub coordinator: String,
    pub device: String,
    /// The daemon's process id, to tell whether it still runs.
    pub pid: u32,
    /// Whether other peers can reach it (AutoNAT), in words; empty until known.
    #[serde(default)]
    pub reachability: String,
    /// What it is doing, in words ("training round 3, shard 1", "waiting for work", ...).
    pub doing: String,
    pub since_ms: u64,
    /// Shards whose delta the coordinator accepted, and their tokens: the node's credit.
    pub accepted: u64,
    pub tokens: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub bytes_uploaded: u64,
    /// The last verdict, in words.
    pub last_verdict: Option<String>,
}

impl NodeStatus {
    pub fn new(peer: String, coordinator: String, device: String) -> Self {
        NodeStatus {
            peer,
            coordinator,
            device,
            pid: std::process::id(),
            ..NodeStatus::default()
        }
    }

    /// This start's status, carrying over what the same identity contributed before (a
    /// restarted daemon keeps its credit); an unreadable or foreign file starts from zero.
    pub fn resume(data_dir: &Path, peer: String, coordinator: String, device: String) -> Self {
        let fresh = NodeStatus::new(peer, coordinator, device);
        match NodeStatus::load(data_dir) {
            Ok(Some(old)) if old.peer == fresh.peer => NodeStatus {
                accepted: old.accepted,
                tokens: old.tokens,
                rejected: old.rejected,
                rejected_by_reason: old.rejected_by_reason,
                bytes_uploaded: old.bytes_uploaded,
                last_verdict: old.last_verdict,
                ..fresh
            },
            _ => fresh,
        }
    }

    /// Reads `data_dir`'s status file; `None` if there is none.
    pub fn load(data_dir: &Path) -> Result<Option<Self>> {
        let path = data_dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is not a node status", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Says what the daemon does now and writes the file; a failed write is logged, not fatal.
    pub fn set(&mut self, data_dir: &Path, doing: impl Into<String>) {
        self.doing = doing.into();
        self.since_ms = now_ms();
        self.save(data_dir);
    }

    /// Notes what AutoNAT found, writing the file when it changed.
    pub fn set_reachability(&mut self, data_dir: &Path, words: String) {
        if words != self.reachability {
            self.reachability = words;
            self.save(data_dir);
        }
    }

    /// Counts a verdict on one of this node's deltas.
    pub fn verdict(
        &mut self,
        data_dir: &Path,
        rejected: Option<&RejectReason>,
        tokens: u64,
        bytes: u64,
    ) {
        match rejected {
            None => {
                self.accepted += 1;
                self.tokens += tokens;
                self.bytes_uploaded += bytes;
                self.last_verdict = Some("accepted".into());
            }
            Some(reason) => {
                self.rejected += 1;
                *self
                    .rejected_by_reason
                    .entry(reason.label().to_string())
                    .or_default() += 1;
                self.last_verdict = Some(format!("rejected: {reason}"));
            }
        }
        self.save(data_dir);
    }

    fn save(&self, data_dir: &Path) {
        let path = data_dir.join(FILE);
        let tmp = data_dir.join(format!(".{FILE}.tmp"));
        let written = serde_json::to_vec_pretty(self)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the status file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_add_up_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = NodeStatus::new("p".into(), "c".into(), "cpu".into());
        s.set(dir.path(), "training round 0, shard 1");
        s.verdict(dir.path(), None, 1000, 700);
        s.verdict(dir.path(), Some(&RejectReason::StaleRound), 1000, 700);
        s.verdict(dir.path(), None, 500, 600);
        let back = NodeStatus::load(dir.path()).unwrap().unwrap();
        assert_eq!(back, s);
        // A restart of the same identity keeps the credit; another identity starts at zero.
        let again = NodeStatus::resume(dir.path(), "p".into(), "c".into(), "cuda".into());
        assert_eq!((again.accepted, again.tokens, again.rejected), (2, 1500, 1));
        assert_eq!(again.device, "cuda");
        let other = NodeStatus::resume(dir.path(), "q".into(), "c".into(), "cpu".into());
        assert_eq!((other.accepted, other.tokens), (0, 0));
        assert_eq!((back.accepted, back.tokens, back.rejected), (2, 1500, 1));
        assert_eq!(back.rejected_by_reason["stale_round"], 1);
        assert!(
            NodeStatus::load(&dir.path().join("none"))
                .unwrap()
                .is_none()
        );
    }
}
