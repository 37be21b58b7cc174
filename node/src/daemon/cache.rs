//! The node's blob cache: blobs fetched from the coordinator in chunks, verified against their
//! blake3 id before they are kept (`cache/blobs/<hex>`), so a cache hit is always good bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use herd_protocol::ContentId;
use herd_protocol::messages::{BLOB_CHUNK_BYTES, BlobRequest, BlobResponse};

use super::network::Client;

/// Largest blob a node accepts (a 7B model in bf16 is ~15 GB).
const MAX_BLOB_BYTES: u64 = 64 << 30;

#[derive(Debug)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    pub fn new(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(BlobCache { dir })
    }

    pub fn path(&self, id: &ContentId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// The local path of blob `id`, downloading and verifying it first if needed.
    pub async fn fetch(&self, client: &Client, id: &ContentId) -> Result<PathBuf> {
        let path = self.path(id);
        if path.exists() {
            return Ok(path);
        }
        let tmp = self.dir.join(format!(".{}.partial", id.to_hex()));
        let mut file = std::fs::File::create(&tmp)?;
        let mut hasher = blake3::Hasher::new();
        let mut offset = 0u64;
        let mut total = None;
        loop {
            let request = BlobRequest {
                id: *id,
                offset,
                len: BLOB_CHUNK_BYTES,
            };
            let (size, bytes) = match client.blob(request).await? {
                BlobResponse::Chunk { total, bytes } => (total, bytes),
                BlobResponse::NotFound => bail!("the coordinator does not have blob {id}"),
            };
            if size > MAX_BLOB_BYTES || total.is_some_and(|t| t != size) {
                bail!("blob {id}: inconsistent or oversized total {size}");
            }
            total = Some(size);
            let expected = (size - offset.min(size)).min(BLOB_CHUNK_BYTES as u64);
            if bytes.len() as u64 != expected {
                bail!(
                    "blob {id}: chunk at {offset} has {} bytes, expected {expected}",
                    bytes.len()
                );
            }
            hasher.update(&bytes);
            file.write_all(&bytes)?;
            offset += bytes.len() as u64;
            if offset >= size {
                break;
            }
        }
        file.sync_all()?;
        drop(file);
        let got = ContentId(*hasher.finalize().as_bytes());
        if got != *id {
            let _ = std::fs::remove_file(&tmp);
            bail!("blob {id}: downloaded bytes hash to {got}; discarded");
        }
        std::fs::rename(&tmp, &path)?;
        tracing::debug!(%id, bytes = offset, "blob cached");
        Ok(path)
    }

    /// A model dir (`config.json`, `model.safetensors`, `tokenizer.json`) assembled from cached
    /// blobs by hard link (copy where links are not possible).
    pub fn model_dir(
        &self,
        config: &Path,
        weights: &Path,
        tokenizer: &Path,
        key: &ContentId,
    ) -> Result<PathBuf> {
        let dir = self.dir.join("models").join(key.to_hex());
        std::fs::create_dir_all(&dir)?;
        for (src, name) in [
            (config, "config.json"),
            (weights, "model.safetensors"),
            (tokenizer, "tokenizer.json"),
        ] {
            let dst = dir.join(name);
            if !dst.exists() && std::fs::hard_link(src, &dst).is_err() {
                std::fs::copy(src, &dst)?;
            }
        }
        Ok(dir)
    }
}
