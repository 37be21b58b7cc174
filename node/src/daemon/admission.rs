//! The admission proof a coordinator asks of a new identity (see
//! [`herd_protocol::admission`]): solved once per run on a blocking thread, and kept in
//! `admission.json` beside the identity key, so a restarted daemon does not pay again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use herd_protocol::admission::{AdmissionProof, Challenge};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// What `admission.json` holds: the proof and what it was solved for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stored {
    coordinator: String,
    run: String,
    proof: AdmissionProof,
}

/// This node's admission to its coordinator's run, once it has one.
#[derive(Debug)]
pub struct Admission {
    path: PathBuf,
    coordinator: PeerId,
    me: PeerId,
    stored: Option<Stored>,
}

/// Stops a solve whose caller went away (Ctrl-C while solving).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Admission {
    /// The proof kept in `data_dir` for `coordinator`, if any (one for another coordinator, or
    /// an unreadable file, counts as none).
    pub fn load(data_dir: &Path, coordinator: PeerId, me: PeerId) -> Self {
        let path = data_dir.join("admission.json");
        let stored = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Stored>(&bytes).ok())
            .filter(|s| s.coordinator == coordinator.to_string());
        Admission {
            path,
            coordinator,
            me,
            stored,
        }
    }

    /// The proof to send with a lease request.
    pub fn proof(&self) -> Option<AdmissionProof> {
        self.stored.as_ref().map(|s| s.proof)
    }

    /// Solves the coordinator's challenge for `run` at `bits` and keeps the proof. An ask for
    /// what this node already proved means the coordinator does not take its proof: an error.
    pub async fn solve(&mut self, run: &str, bits: u8) -> Result<()> {
        if self
            .stored
            .as_ref()
            .is_some_and(|s| s.run == run && s.proof.bits >= bits)
        {
            bail!("the coordinator refused this node's admission proof for run `{run}`");
        }
        tracing::info!(
            run,
            bits,
            "proving work to join the run (once per identity and run: about 2^{bits} hashes)"
        );
        let started = Instant::now();
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let stopped = stop.0.clone();
        let (run_name, coordinator, me) = (run.to_string(), self.coordinator, self.me);
        let proof = tokio::task::spawn_blocking(move || {
            let challenge = Challenge {
                run: &run_name,
                coordinator: &coordinator,
                peer: &me,
            };
            challenge.solve(bits, || !stopped.load(Ordering::Relaxed))
        })
        .await?
        .context("admission proof stopped")?;
        drop(stop);
        tracing::info!(
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "admission proof found"
        );
        let stored = Stored {
            coordinator: self.coordinator.to_string(),
            run: run.to_string(),
            proof,
        };
        // Losing the file only costs solving again.
        if let Err(e) = std::fs::write(&self.path, serde_json::to_vec(&stored)?) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot keep the admission proof");
        }
        self.stored = Some(stored);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_proof_is_kept_for_its_coordinator_and_a_refusal_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (coordinator, me, other) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut admission = Admission::load(dir.path(), coordinator, me);
        assert_eq!(admission.proof(), None);
        admission.solve("run", 8).await.unwrap();
        let proof = admission.proof().unwrap();
        let challenge = Challenge {
            run: "run",
            coordinator: &coordinator,
            peer: &me,
        };
        assert!(challenge.accepts(&proof, 8));
        // A restart finds it; another coordinator does not.
        assert_eq!(
            Admission::load(dir.path(), coordinator, me).proof(),
            Some(proof)
        );
        assert_eq!(Admission::load(dir.path(), other, me).proof(), None);
        // Asked again for what it proved: the coordinator does not take it.
        let err = admission.solve("run", 8).await.unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        // A harder ask, or another run, is solved anew.
        admission.solve("run", 10).await.unwrap();
        assert_eq!(admission.proof().unwrap().bits, 10);
    }
}
