//! Checkpoints: a PEFT adapter dir per checkpoint round under `<data_dir>/checkpoints/`, its
//! signed manifest (what it was built from), its files in the blob store so peers fetch them
//! by hash, and what `herd-node pull` is told is published.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use herd_protocol::blobs::BlobStore;
use herd_protocol::manifest;
use herd_protocol::messages::{CheckpointRef, NamedBlob, Published, RunAssets};
use serde::{Deserialize, Serialize};

use crate::store::AcceptedRecord;

/// One file of a checkpoint: name, size, blake3 (what its signed manifest lists too).
pub use herd_protocol::manifest::ManifestFile as CheckpointFile;

/// The files the engine writes into a checkpoint's dir (the manifest is added to them).
const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// A published checkpoint (a PEFT adapter dir), as stored with the run and shown over HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: String,
    pub round: u64,
    pub heldout_loss: f64,
    pub files: Vec<CheckpointFile>,
}

impl Checkpoint {
    /// The name of the checkpoint taken after `round` rounds (its dir under `checkpoints/`).
    pub fn name(round: u64) -> String {
        format!("round-{round:05}")
    }

    /// Describes the adapter just saved into `dir` for `round`: its files, hashed as written.
    pub fn of_saved_adapter(dir: &Path, round: u64, heldout_loss: f64) -> Result<Self> {
        let files = ADAPTER_FILES
            .iter()
            .map(|name| {
                let bytes = std::fs::read(dir.join(name))
                    .with_context(|| format!("reading back {}", dir.join(name).display()))?;
                Ok(CheckpointFile::of(name, &bytes))
            })
            .collect::<Result<_>>()?;
        Ok(Checkpoint {
            id: Checkpoint::name(round),
            round,
            heldout_loss,
            files,
        })
    }

    /// The checkpoint as peers fetch it: every file of its dir by content id (`None` if a
    /// listed hash does not parse).
    pub fn reference(&self) -> Option<CheckpointRef> {
        let files = self
            .files
            .iter()
            .map(|f| {
                Some(NamedBlob {
                    name: f.name.clone(),
                    id: f.blake3.parse().ok()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(CheckpointRef {
            name: self.id.clone(),
            round: self.round,
            files,
        })
    }
}

/// What the coordinator publishes for one run, and the key it signs with.
#[derive(Debug)]
pub struct Publisher {
    /// `<data_dir>/checkpoints`.
    pub dir: PathBuf,
    pub run: String,
    pub assets: RunAssets,
    /// The coordinator's key: signs checkpoint manifests.
    pub identity: libp2p::identity::Keypair,
}

impl Publisher {
    /// Signs what checkpoint `c` is built from into its dir (`manifest.json`, see
    /// `herd_protocol::manifest`) and lists that file with the checkpoint's. `parent` is the
    /// checkpoint before it, `accepted` the deltas of the rounds between the two.
    pub fn sign(
        &self,
        c: &mut Checkpoint,
        parent: Option<&Checkpoint>,
        accepted: &[AcceptedRecord],
    ) -> Result<()> {
        let parent_manifest = parent
            .map(|p| {
                p.files
                    .iter()
                    .find(|f| f.name == manifest::MANIFEST_FILE)
                    .map(|f| manifest::Parent {
                        checkpoint: p.id.clone(),
                        manifest_blake3: f.blake3.clone(),
                    })
                    .with_context(|| format!("checkpoint {} lists no manifest", p.id))
            })
            .transpose()?;
        let mut round_tokens: HashMap<u64, u64> = HashMap::new();
        for a in accepted {
            *round_tokens.entry(a.round).or_default() += a.tokens;
        }
        let deltas = accepted
            .iter()
            .map(|a| manifest::ManifestDelta {
                round: a.round,
                shard: a.shard,
                peer: a.peer.clone(),
                lease: a.lease,
                payload_blake3: a.payload.to_hex(),
                tokens: a.tokens,
                weight: a.tokens as f64 / round_tokens[&a.round].max(1) as f64,
            })
            .collect();
        let m = manifest::Manifest {
            run: self.run.clone(),
            checkpoint: c.id.clone(),
            round: c.round,
            coordinator: self.identity.public().to_peer_id().to_string(),
            base_model: manifest::BaseModel {
                config: self.assets.config.to_hex(),
                weights: self.assets.weights.to_hex(),
                tokenizer: self.assets.tokenizer.to_hex(),
            },
            parent: parent_manifest,
            rounds: manifest::RoundSpan {
                from: parent.map_or(0, |p| p.round),
                to: c.round,
            },
            deltas,
            files: c.files.clone(),
        };
        c.files
            .extend(m.write_signed(&self.dir.join(&c.id), &self.identity)?);
        Ok(())
    }

    /// Registers checkpoint `c`'s files in the blob store (in place), so peers can fetch them
    /// by the hashes its manifest lists; a file that changed since it was published is an
    /// error.
    pub fn register(&self, blobs: &mut BlobStore, c: &Checkpoint) -> Result<()> {
        let dir = self.dir.join(&c.id);
        for f in &c.files {
            let id = blobs.put_file(&dir.join(&f.name))?;
            anyhow::ensure!(
                id.to_hex() == f.blake3,
                "checkpoint {}: {} does not match the hash it was published with",
                c.id,
                f.name
            );
        }
        Ok(())
    }

    /// What `herd-node pull` asks first: the base model's files and checkpoint `name` of
    /// `checkpoints` (the latest if `None`); `None` if there is no such checkpoint.
    pub fn published(&self, checkpoints: &[Checkpoint], name: Option<&str>) -> Option<Published> {
        let checkpoint = match name {
            None => checkpoints.last().and_then(Checkpoint::reference),
            Some(name) => Some(checkpoints.iter().find(|c| c.id == name)?.reference()?),
        };
        let named = |name: &str, id| NamedBlob {
            name: name.into(),
            id,
        };
        Some(Published {
            run: self.run.clone(),
            base_model: vec![
                named("config.json", self.assets.config),
                named("model.safetensors", self.assets.weights),
                named("tokenizer.json", self.assets.tokenizer),
            ],
            checkpoint,
        })
    }
}
