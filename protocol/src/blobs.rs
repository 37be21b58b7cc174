//! The content-addressed blob store both sides keep (`blobs/ab/<blake3 hex>`, written via temp
//! file + fsync + rename + dir fsync) and how it answers `/herd/blob/2`. Files that already
//! live elsewhere (a base model) are registered in place rather than copied.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::ContentId;
use crate::messages::{BlobRequest, BlobResponse, OUTLINE_PAGE};
use crate::outline::{Outline, group_range};

/// Why the store could not do what it was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {0} is not in the store")]
    Missing(ContentId),
    #[error("blob {id} has no group {index}")]
    NoSuchGroup { id: ContentId, index: u64 },
    #[error("{0}: content does not match its hash")]
    Corrupt(String),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    /// Where each blob's bytes are, and how many there are.
    index: HashMap<ContentId, (PathBuf, u64)>,
    /// Outlines computed so far (32 bytes per MiB), for serving groups.
    outlines: HashMap<ContentId, Arc<Outline>>,
}

impl BlobStore {
    /// Opens `dir`, indexing the blobs an earlier run left there (their names are their
    /// hashes; reads check that on the way out).
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        let mut index = HashMap::new();
        for sub in std::fs::read_dir(dir).map_err(io_at(dir))? {
            let sub = sub.map_err(io_at(dir))?.path();
            if !sub.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(&sub).map_err(io_at(&sub))? {
                let file = file.map_err(io_at(&sub))?;
                let name = file.file_name();
                let Some(id) = name.to_str().and_then(|n| n.parse::<ContentId>().ok()) else {
                    continue; // temp files of an interrupted write, strays
                };
                let len = file.metadata().map_err(io_at(&file.path()))?.len();
                index.insert(id, (file.path(), len));
            }
        }
        Ok(BlobStore {
            dir: dir.to_path_buf(),
            index,
            outlines: HashMap::new(),
        })
    }

    /// The whole blob `id`, checked against its hash.
    pub fn read(&self, id: &ContentId) -> Result<Vec<u8>, BlobError> {
        let (path, _) = self.index.get(id).ok_or(BlobError::Missing(*id))?;
        let bytes = std::fs::read(path).map_err(io_at(path))?;
        if ContentId::of(&bytes) != *id {
            return Err(BlobError::Corrupt(path.display().to_string()));
        }
        Ok(bytes)
    }

    /// Where blob `id` lives.
    pub fn path(&self, id: &ContentId) -> Option<&Path> {
        self.index.get(id).map(|(p, _)| p.as_path())
    }

    pub fn contains(&self, id: &ContentId) -> bool {
        self.index.contains_key(id)
    }

    pub fn size(&self, id: &ContentId) -> Option<u64> {
        self.index.get(id).map(|(_, s)| *s)
    }

    /// Every blob the store holds.
    pub fn ids(&self) -> impl Iterator<Item = &ContentId> {
        self.index.keys()
    }

    /// Where a download of `id` keeps what it has so far (outside the index: never served).
    pub fn partial_path(&self, id: &ContentId) -> PathBuf {
        self.dir.join(format!(".{}.partial", id.to_hex()))
    }

    fn home(&self, id: &ContentId) -> Result<(PathBuf, PathBuf), BlobError> {
        let hex = id.to_hex();
        let sub = self.dir.join(&hex[..2]);
        std::fs::create_dir_all(&sub).map_err(io_at(&sub))?;
        Ok((sub.join(&hex), sub))
    }

    /// Stores `bytes` and returns their id.
    pub fn put_bytes(&mut self, bytes: &[u8]) -> Result<ContentId, BlobError> {
        let id = ContentId::of(bytes);
        let (path, sub) = self.home(&id)?;
        if !path.exists() {
            let tmp = sub.join(format!(".{}.tmp", id.to_hex()));
            (|| {
                let mut f = File::create(&tmp)?;
                f.write_all(bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                // The rename itself must reach the disk too.
                File::open(&sub)?.sync_all()
            })()
            .map_err(io_at(&path))?;
        }
        self.index.insert(id, (path, bytes.len() as u64));
        Ok(id)
    }

    /// Registers an existing file by its hash, without copying it.
    pub fn put_file(&mut self, path: &Path) -> Result<ContentId, BlobError> {
        let f = File::open(path).map_err(io_at(path))?;
        let total = f.metadata().map_err(io_at(path))?.len();
        let outline = Outline::compute(total, std::io::BufReader::new(f)).map_err(io_at(path))?;
        let id = outline.root();
        self.index.insert(id, (path.to_path_buf(), total));
        self.outlines.insert(id, Arc::new(outline));
        Ok(id)
    }

    /// Moves a downloaded file whose every group was checked against `outline` into the store.
    pub fn adopt(&mut self, file: &Path, outline: Outline) -> Result<PathBuf, BlobError> {
        let id = outline.root();
        let (path, sub) = self.home(&id)?;
        (|| {
            File::open(file)?.sync_all()?;
            std::fs::rename(file, &path)?;
            File::open(&sub)?.sync_all()
        })()
        .map_err(io_at(&path))?;
        self.index.insert(id, (path.clone(), outline.total()));
        self.outlines.insert(id, Arc::new(outline));
        Ok(path)
    }

    /// The outline of blob `id`, hashing it the first time it is asked for.
    pub fn outline(&mut self, id: &ContentId) -> Result<Arc<Outline>, BlobError> {
        if let Some(o) = self.outlines.get(id) {
            return Ok(o.clone());
        }
        let (path, total) = self.index.get(id).ok_or(BlobError::Missing(*id))?;
        let f = File::open(path).map_err(io_at(path))?;
        let outline = Outline::compute(*total, std::io::BufReader::new(f)).map_err(io_at(path))?;
        if outline.root() != *id {
            return Err(BlobError::Corrupt(path.display().to_string()));
        }
        let outline = Arc::new(outline);
        self.outlines.insert(*id, outline.clone());
        Ok(outline)
    }

    /// Where group `index` of blob `id` lies and what it must hash to. Reading it is
    /// [`GroupSource::read`], which needs no store: a network loop can do that elsewhere.
    pub fn group_source(&mut self, id: &ContentId, index: u64) -> Result<GroupSource, BlobError> {
        let outline = self.outline(id)?;
        // The index comes from the network: an absurd one must not reach the range arithmetic.
        if index >= outline.groups() {
            return Err(BlobError::NoSuchGroup { id: *id, index });
        }
        Ok(GroupSource {
            path: self.index[id].0.clone(),
            index,
            outline,
        })
    }

    /// The answer to a peer's request; what the store lacks or cannot read is `NotFound`.
    pub fn serve(&mut self, request: &BlobRequest) -> BlobResponse {
        self.answer(request).finish()
    }

    /// The answer to a peer's request, save the reading and checking of a group, which
    /// [`Answer::finish`] does without the store: that is most of a group request's work.
    pub fn answer(&mut self, request: &BlobRequest) -> Answer {
        let answer = match request {
            BlobRequest::Outline { id, first } => self.outline(id).map(|o| {
                Answer::Ready(BlobResponse::Outline {
                    total: o.total(),
                    cvs: o.page(*first, OUTLINE_PAGE).to_vec(),
                })
            }),
            BlobRequest::Group { id, index } => self.group_source(id, *index).map(Answer::Read),
        };
        answer.unwrap_or_else(|e| Answer::Ready(not_found(e)))
    }
}

/// A request's answer, ready or still to be read from disk.
#[derive(Debug)]
pub enum Answer {
    Ready(BlobResponse),
    Read(GroupSource),
}

impl Answer {
    /// The response: a group is read and checked here (blocking file I/O and hashing).
    pub fn finish(self) -> BlobResponse {
        match self {
            Answer::Ready(response) => response,
            Answer::Read(source) => source.read().map_or_else(not_found, BlobResponse::Group),
        }
    }
}

/// What a peer is told when the store cannot answer; anything but a plain absence is logged.
fn not_found(e: BlobError) -> BlobResponse {
    if !matches!(e, BlobError::Missing(_) | BlobError::NoSuchGroup { .. }) {
        tracing::error!(error = %e, "serving a blob");
    }
    BlobResponse::NotFound
}

/// One group of a stored blob: its file, its index and the outline it is checked against.
#[derive(Debug, Clone)]
pub struct GroupSource {
    path: PathBuf,
    index: u64,
    outline: Arc<Outline>,
}

impl GroupSource {
    /// Reads the group and checks it against the blob's outline before it leaves.
    pub fn read(&self) -> Result<Vec<u8>, BlobError> {
        let path = &self.path;
        let range = group_range(self.outline.total(), self.index);
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        (|| {
            let mut f = File::open(path)?;
            f.seek(SeekFrom::Start(range.start))?;
            f.read_exact(&mut bytes)
        })()
        .map_err(io_at(path))?;
        self.outline
            .check_group(self.index, &bytes)
            .map_err(|_| BlobError::Corrupt(path.display().to_string()))?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outline::GROUP_BYTES;

    #[test]
    fn stores_and_serves_checked_groups() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = BlobStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..(2 * GROUP_BYTES + 10))
            .map(|i| (i % 241) as u8)
            .collect();
        let id = store.put_bytes(&data).unwrap();
        assert_eq!(id, ContentId::of(&data));
        let BlobResponse::Outline { total, cvs } =
            store.serve(&BlobRequest::Outline { id, first: 0 })
        else {
            panic!("no outline")
        };
        let outline = Outline::verify(&id, total, cvs).unwrap();
        let BlobResponse::Group(last) = store.serve(&BlobRequest::Group { id, index: 2 }) else {
            panic!("no group")
        };
        assert_eq!(last, data[2 * GROUP_BYTES as usize..]);
        outline.check_group(2, &last).unwrap();
        let other = ContentId::of(b"other");
        assert_eq!(
            store.serve(&BlobRequest::Outline {
                id: other,
                first: 0
            }),
            BlobResponse::NotFound
        );
        // Past the last group, and an index whose byte offset does not fit in a u64 (it came
        // from the network: no overflow, no read).
        for index in [3, u64::MAX / 2, u64::MAX] {
            assert_eq!(
                store.serve(&BlobRequest::Group { id, index }),
                BlobResponse::NotFound
            );
        }
        // A group's answer is read off the store: the store is not needed to finish it.
        let Answer::Read(source) = store.answer(&BlobRequest::Group { id, index: 1 }) else {
            panic!("a group to read")
        };
        drop(store);
        assert_eq!(
            Answer::Read(source).finish(),
            BlobResponse::Group(data[GROUP_BYTES as usize..2 * GROUP_BYTES as usize].to_vec())
        );
        let mut store = BlobStore::open(dir.path()).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, &data).unwrap();
        assert_eq!(store.put_file(&file).unwrap(), id);
        // Reopened, the store still knows its blobs, and checks them: a tampered file is
        // neither read nor served.
        let mut reopened = BlobStore::open(dir.path()).unwrap();
        assert_eq!(reopened.read(&id).unwrap(), data);
        std::fs::write(reopened.path(&id).unwrap(), b"tampered").unwrap();
        assert!(reopened.read(&id).is_err());
        assert_eq!(
            reopened.serve(&BlobRequest::Group { id, index: 0 }),
            BlobResponse::NotFound
        );
    }

    #[test]
    fn adopts_a_checked_download() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = BlobStore::open(dir.path()).unwrap();
        let data = vec![7u8; 5000];
        let id = ContentId::of(&data);
        let partial = store.partial_path(&id);
        std::fs::write(&partial, &data).unwrap();
        let outline = Outline::compute(5000, data.as_slice()).unwrap();
        let path = store.adopt(&partial, outline).unwrap();
        assert!(!partial.exists());
        assert_eq!(store.read(&id).unwrap(), data);
        assert_eq!(store.path(&id), Some(path.as_path()));
    }
}
