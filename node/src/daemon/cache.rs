//! The node's blob cache: a [`BlobStore`] under the data dir (`cache/blobs/ab/<hex>`) holding
//! what leases needed, every blob checked against its id before it is kept, so a cache hit is
//! always good bytes; the network loop serves it to other peers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use herd_protocol::ContentId;
use herd_protocol::blobs::BlobStore;

use super::fetch::fetch;
use super::network::{Client, SharedStore};

#[derive(Debug)]
pub struct BlobCache {
    dir: PathBuf,
    store: SharedStore,
}

impl BlobCache {
    pub fn open(dir: PathBuf) -> Result<Self> {
        let store = BlobStore::open(&dir.join("blobs"))?;
        Ok(BlobCache {
            dir,
            store: Arc::new(Mutex::new(store)),
        })
    }

    /// The store, for the network loop to serve from.
    pub fn shared(&self) -> SharedStore {
        self.store.clone()
    }

    /// Every blob the cache holds (announced in the DHT at start).
    pub fn ids(&self) -> Vec<ContentId> {
        self.store
            .lock()
            .expect("blob store lock")
            .ids()
            .copied()
            .collect()
    }

    /// The local path of blob `id`, downloading and verifying it first if needed.
    pub async fn fetch(&self, client: &Client, id: &ContentId, what: &str) -> Result<PathBuf> {
        Ok(fetch(client, &self.store, *id, what).await?.path)
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
        link_files(
            &dir,
            [
                (config, "config.json"),
                (weights, "model.safetensors"),
                (tokenizer, "tokenizer.json"),
            ],
        )?;
        Ok(dir)
    }
}

/// Puts each `(file, name)` into `dir` under its name: a hard link, or a copy where links
/// are not possible (another file system).
pub fn link_files<'a>(
    dir: &Path,
    files: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (src, name) in files {
        let dst = dir.join(name);
        if !dst.exists() && std::fs::hard_link(src, &dst).is_err() {
            std::fs::copy(src, &dst)?;
        }
    }
    Ok(())
}
