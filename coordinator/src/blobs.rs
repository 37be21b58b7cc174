//! A content-addressed blob store: `blobs/ab/<blake3 hex>`, written via temp file + fsync +
//! rename. Files that already live elsewhere (the base model) are registered in place rather
//! than copied.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use herd_protocol::ContentId;

#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    /// Where each blob's bytes are, and how many there are.
    index: HashMap<ContentId, (PathBuf, u64)>,
}

impl BlobStore {
    /// Opens `dir`, indexing the blobs an earlier run left there (their names are their
    /// hashes; [`BlobStore::read`] checks that on the way out).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut index = HashMap::new();
        for sub in std::fs::read_dir(dir)? {
            let sub = sub?.path();
            if !sub.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(&sub)? {
                let file = file?;
                let name = file.file_name();
                let Some(id) = name.to_str().and_then(|n| n.parse::<ContentId>().ok()) else {
                    continue; // temp files of an interrupted write, strays
                };
                index.insert(id, (file.path(), file.metadata()?.len()));
            }
        }
        Ok(BlobStore {
            dir: dir.to_path_buf(),
            index,
        })
    }

    /// The whole blob `id`, checked against its hash.
    pub fn read(&self, id: &ContentId) -> Result<Vec<u8>> {
        let (path, _) = self
            .index
            .get(id)
            .with_context(|| format!("blob {} is not in the store", id.to_hex()))?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        anyhow::ensure!(
            ContentId::of(&bytes) == *id,
            "{}: content does not match its hash",
            path.display()
        );
        Ok(bytes)
    }

    /// Where blob `id` lives.
    pub fn path(&self, id: &ContentId) -> Option<&Path> {
        self.index.get(id).map(|(p, _)| p.as_path())
    }

    /// Stores `bytes` and returns their id.
    pub fn put_bytes(&mut self, bytes: &[u8]) -> Result<ContentId> {
        let id = ContentId::of(bytes);
        let hex = id.to_hex();
        let sub = self.dir.join(&hex[..2]);
        std::fs::create_dir_all(&sub)?;
        let path = sub.join(&hex);
        if !path.exists() {
            let tmp = sub.join(format!(".{hex}.tmp"));
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename itself must reach the disk too.
            File::open(&sub)?.sync_all()?;
        }
        self.index.insert(id, (path, bytes.len() as u64));
        Ok(id)
    }

    /// Registers an existing file by its hash, without copying it.
    pub fn put_file(&mut self, path: &Path) -> Result<ContentId> {
        let mut hasher = blake3::Hasher::new();
        let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = std::io::copy(&mut f, &mut hasher)?;
        let id = ContentId(*hasher.finalize().as_bytes());
        self.index.insert(id, (path.to_path_buf(), size));
        Ok(id)
    }

    pub fn size(&self, id: &ContentId) -> Option<u64> {
        self.index.get(id).map(|(_, s)| *s)
    }

    /// Up to `len` bytes of blob `id` from `offset`, and the blob's total size; `None` if unknown.
    pub fn read_chunk(
        &self,
        id: &ContentId,
        offset: u64,
        len: u32,
    ) -> Option<Result<(u64, Vec<u8>)>> {
        let (path, total) = self.index.get(id)?;
        Some((|| {
            let start = offset.min(*total);
            let n = (*total - start).min(len as u64) as usize;
            let mut f = File::open(path)?;
            f.seek(SeekFrom::Start(start))?;
            let mut buf = vec![0u8; n];
            f.read_exact(&mut buf)?;
            Ok((*total, buf))
        })())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_serves_chunks_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = BlobStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let id = store.put_bytes(&data).unwrap();
        assert_eq!(id, ContentId::of(&data));
        let (total, chunk) = store.read_chunk(&id, 9_000, 4_096).unwrap().unwrap();
        assert_eq!((total, chunk.as_slice()), (10_000, &data[9_000..]));
        let (_, past_end) = store.read_chunk(&id, 20_000, 10).unwrap().unwrap();
        assert!(past_end.is_empty());
        assert!(store.read_chunk(&ContentId::of(b"other"), 0, 1).is_none());
        let file = dir.path().join("f");
        std::fs::write(&file, &data).unwrap();
        assert_eq!(store.put_file(&file).unwrap(), id);
        // Reopened, the store still knows its blobs, and checks them.
        let reopened = BlobStore::open(dir.path()).unwrap();
        assert_eq!(reopened.read(&id).unwrap(), data);
        std::fs::write(reopened.path(&id).unwrap(), b"tampered").unwrap();
        assert!(reopened.read(&id).is_err());
    }
}
