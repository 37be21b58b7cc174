//! Checkpoint provenance. Each checkpoint dir holds `manifest.json`: what the checkpoint is
//! built from (the base model's files, the parent checkpoint, the rounds, and every accepted
//! delta with its peer, lease, payload hash and weight) and what its files are (size, blake3).
//! `manifest.sig.json` holds the coordinator's signature over the manifest's exact bytes.
//! Anyone with the dir checks it offline with [`verify_checkpoint`] (`herd-node
//! verify-checkpoint DIR`).

use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};

use crate::ContentId;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const SIGNATURE_FILE: &str = "manifest.sig.json";
/// Signed bytes are `DOMAIN || manifest.json`: a manifest signature can never pass for a
/// submission signature or the other way round.
const DOMAIN: &[u8] = b"herd/checkpoint-manifest/v1\0";

/// What a checkpoint is and what built it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub run: String,
    /// The checkpoint's id, e.g. `round-00010`.
    pub checkpoint: String,
    /// Rounds completed when it was taken.
    pub round: u64,
    /// The coordinator's PeerId: the key that signs.
    pub coordinator: String,
    pub base_model: BaseModel,
    /// The checkpoint before this one, `None` for the first.
    pub parent: Option<Parent>,
    /// The rounds this checkpoint adds to its parent: `from..to`.
    pub rounds: RoundSpan,
    /// Every accepted delta of those rounds, in (round, shard) order.
    pub deltas: Vec<ManifestDelta>,
    /// The checkpoint's files (the manifest pair excluded).
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseModel {
    pub config: String,
    pub weights: String,
    pub tokenizer: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parent {
    pub checkpoint: String,
    /// blake3 of the parent's `manifest.json`.
    pub manifest_blake3: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundSpan {
    pub from: u64,
    pub to: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestDelta {
    pub round: u64,
    pub shard: u32,
    pub peer: String,
    pub lease: u64,
    pub payload_blake3: String,
    pub tokens: u64,
    /// Its share of its round's token-weighted mean (before clipping and trimming).
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

impl ManifestFile {
    /// The entry of a file `name` holding `bytes`.
    pub fn of(name: &str, bytes: &[u8]) -> Self {
        ManifestFile {
            name: name.to_string(),
            size: bytes.len() as u64,
            blake3: ContentId::of(bytes).to_hex(),
        }
    }
}

/// The signature file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestSignature {
    /// The signer's public key, protobuf-encoded, hex.
    pub public_key: String,
    pub signature: String,
}

/// Why a checkpoint does not check out.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid {what}: {detail}")]
    Format {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error(
        "{0}: the signature does not match the manifest: the manifest or its signature was changed"
    )]
    BadSignature(PathBuf),
    #[error("{path}: signed by {found}, but the manifest names coordinator {named}")]
    SignerNotNamed {
        path: PathBuf,
        found: String,
        named: String,
    },
    #[error("signed by {found}, not by the expected coordinator {expected}")]
    UnexpectedSigner { found: String, expected: String },
    #[error("{path}: missing, but the manifest lists it")]
    MissingFile { path: PathBuf },
    #[error(
        "{path}: {found_size} bytes with blake3 {found}, but the manifest says {size} bytes with blake3 {expected}: the file was changed"
    )]
    FileMismatch {
        path: PathBuf,
        found_size: u64,
        found: String,
        size: u64,
        expected: String,
    },
    #[error("{path}: not listed in the manifest")]
    UnlistedFile { path: PathBuf },
    #[error("signing failed: {0}")]
    Signing(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn signed_bytes(manifest: &[u8]) -> Vec<u8> {
    [DOMAIN, manifest].concat()
}

impl Manifest {
    /// Writes `manifest.json` and its signature by `key` into `dir`; returns the two files'
    /// entries (the manifest's blake3 is what a child checkpoint names as its parent).
    pub fn write_signed(
        &self,
        dir: &Path,
        key: &Keypair,
    ) -> Result<[ManifestFile; 2], ManifestError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| ManifestError::Format {
            path: dir.join(MANIFEST_FILE),
            what: "manifest",
            detail: e.to_string(),
        })?;
        let signature = key
            .sign(&signed_bytes(&bytes))
            .map_err(|e| ManifestError::Signing(e.to_string()))?;
        let sig = ManifestSignature {
            public_key: hex_encode(&key.public().encode_protobuf()),
            signature: hex_encode(&signature),
        };
        let sig_bytes = serde_json::to_vec_pretty(&sig).expect("plain strings serialize");
        for (name, content) in [(MANIFEST_FILE, &bytes), (SIGNATURE_FILE, &sig_bytes)] {
            let path = dir.join(name);
            std::fs::write(&path, content).map_err(io(&path))?;
        }
        Ok([
            ManifestFile::of(MANIFEST_FILE, &bytes),
            ManifestFile::of(SIGNATURE_FILE, &sig_bytes),
        ])
    }
}

/// Checks the checkpoint in `dir`: the signature over `manifest.json`, that the signer is the
/// coordinator the manifest names (and `expected`, when given), and that the dir holds exactly
/// the listed files with their sizes and hashes. Returns the manifest.
pub fn verify_checkpoint(dir: &Path, expected: Option<&PeerId>) -> Result<Manifest, ManifestError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let sig_path = dir.join(SIGNATURE_FILE);
    let bytes = std::fs::read(&manifest_path).map_err(io(&manifest_path))?;
    let sig_bytes = std::fs::read(&sig_path).map_err(io(&sig_path))?;
    let format = |path: &Path, what, detail: String| ManifestError::Format {
        path: path.to_path_buf(),
        what,
        detail,
    };
    let sig: ManifestSignature = serde_json::from_slice(&sig_bytes)
        .map_err(|e| format(&sig_path, "signature file", e.to_string()))?;
    let key = hex_decode(&sig.public_key)
        .and_then(|k| PublicKey::try_decode_protobuf(&k).ok())
        .ok_or_else(|| format(&sig_path, "signature file", "bad public key".into()))?;
    let signature = hex_decode(&sig.signature)
        .ok_or_else(|| format(&sig_path, "signature file", "bad signature hex".into()))?;
    if !key.verify(&signed_bytes(&bytes), &signature) {
        return Err(ManifestError::BadSignature(manifest_path));
    }
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| format(&manifest_path, "manifest", e.to_string()))?;
    let signer = key.to_peer_id();
    if signer.to_string() != manifest.coordinator {
        return Err(ManifestError::SignerNotNamed {
            path: manifest_path,
            found: signer.to_string(),
            named: manifest.coordinator,
        });
    }
    if let Some(expected) = expected
        && *expected != signer
    {
        return Err(ManifestError::UnexpectedSigner {
            found: signer.to_string(),
            expected: expected.to_string(),
        });
    }
    for file in &manifest.files {
        let path = dir.join(&file.name);
        if file.name.contains(['/', '\\']) || file.name.starts_with('.') {
            return Err(format(
                &manifest_path,
                "manifest",
                format!("file name `{}`", file.name),
            ));
        }
        let content = match std::fs::read(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManifestError::MissingFile { path });
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let found = ContentId::of(&content).to_hex();
        if found != file.blake3 || content.len() as u64 != file.size {
            return Err(ManifestError::FileMismatch {
                path,
                found_size: content.len() as u64,
                found,
                size: file.size,
                expected: file.blake3.clone(),
            });
        }
    }
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let listed = manifest.files.iter().any(|f| f.name == name);
        if !listed && name != MANIFEST_FILE && name != SIGNATURE_FILE {
            return Err(ManifestError::UnlistedFile { path: entry.path() });
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(dir: &Path, key: &Keypair) -> Manifest {
        std::fs::write(dir.join("adapter_model.safetensors"), b"weights").unwrap();
        let manifest = Manifest {
            run: "r".into(),
            checkpoint: "round-00002".into(),
            round: 2,
            coordinator: key.public().to_peer_id().to_string(),
            base_model: BaseModel {
                config: "c".into(),
                weights: "w".into(),
                tokenizer: "t".into(),
            },
            parent: None,
            rounds: RoundSpan { from: 0, to: 2 },
            deltas: vec![ManifestDelta {
                round: 0,
                shard: 0,
                peer: "p".into(),
                lease: 1,
                payload_blake3: "ab".into(),
                tokens: 10,
                weight: 1.0,
            }],
            files: vec![ManifestFile::of("adapter_model.safetensors", b"weights")],
        };
        manifest.write_signed(dir, key).unwrap();
        manifest
    }

    #[test]
    fn a_signed_checkpoint_verifies_and_any_change_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = Keypair::generate_ed25519();
        let manifest = checkpoint(dir.path(), &key);
        let me = key.public().to_peer_id();
        assert_eq!(verify_checkpoint(dir.path(), Some(&me)).unwrap(), manifest);
        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert!(matches!(
            verify_checkpoint(dir.path(), Some(&other)),
            Err(ManifestError::UnexpectedSigner { .. })
        ));

        // A changed weights file.
        let weights = dir.path().join("adapter_model.safetensors");
        std::fs::write(&weights, b"weightz").unwrap();
        let err = verify_checkpoint(dir.path(), None).unwrap_err();
        assert!(matches!(err, ManifestError::FileMismatch { .. }), "{err}");
        assert!(
            err.to_string().contains("adapter_model.safetensors"),
            "{err}"
        );
        std::fs::write(&weights, b"weights").unwrap();

        // A changed manifest (one more token for a delta).
        let path = dir.path().join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"tokens\": 10", "\"tokens\": 11")).unwrap();
        let err = verify_checkpoint(dir.path(), None).unwrap_err();
        assert!(matches!(err, ManifestError::BadSignature(_)), "{err}");
        std::fs::write(&path, text).unwrap();

        // Re-signed by someone else: the manifest still names the coordinator.
        let thief = Keypair::generate_ed25519();
        manifest.write_signed(dir.path(), &thief).unwrap();
        assert!(matches!(
            verify_checkpoint(dir.path(), None),
            Err(ManifestError::SignerNotNamed { .. })
        ));
        manifest.write_signed(dir.path(), &key).unwrap();

        // An extra file, a missing file.
        std::fs::write(dir.path().join("extra.bin"), b"x").unwrap();
        assert!(matches!(
            verify_checkpoint(dir.path(), None),
            Err(ManifestError::UnlistedFile { .. })
        ));
        std::fs::remove_file(dir.path().join("extra.bin")).unwrap();
        std::fs::remove_file(&weights).unwrap();
        assert!(matches!(
            verify_checkpoint(dir.path(), None),
            Err(ManifestError::MissingFile { .. })
        ));
    }
}
