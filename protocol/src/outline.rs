//! Verified chunks of a blob: the blake3 chaining values of its 1 MiB groups (its "outline")
//! merge, through blake3's own tree, into the blob's content id, so a downloader checks the
//! outline once against the id it asked for and then each group on arrival, whichever
//! untrusted peer sent it.
//!
//! Groups are aligned power-of-two subtrees of the blake3 tree (1 MiB ≥ blake3's 1 KiB chunk),
//! so each one's chaining value is [`HasherExt::finalize_non_root`] at its offset and the root
//! is rebuilt with blake3's own split rule ([`hazmat::left_subtree_len`]). A blob of one group
//! is its own root: its outline is the content id itself.
//!
//! The root does not pin the size exactly: a size a few bytes off keeps the tree's shape. The
//! last group's hash does (blake3 commits to a chunk's length), so a downloader fetches the last
//! group together with the outline, from the same peer, and trusts the outline only if it
//! checks.

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};

use crate::ContentId;

/// Bytes per verified group (the last group of a blob may be shorter).
pub const GROUP_BYTES: u64 = 1 << 20;
/// Largest blob a peer accepts (a 7B model in bf16 is ~15 GB).
pub const MAX_BLOB_BYTES: u64 = 64 << 30;

/// How many groups a blob of `total` bytes has (an empty blob has one, empty).
pub fn group_count(total: u64) -> u64 {
    total.div_ceil(GROUP_BYTES).max(1)
}

/// The byte range of group `index` of a blob of `total` bytes.
pub fn group_range(total: u64, index: u64) -> std::ops::Range<u64> {
    let start = (index * GROUP_BYTES).min(total);
    start..(start + GROUP_BYTES).min(total)
}

/// Why an outline or a group was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OutlineError {
    #[error("blob of {0} bytes is over the {MAX_BLOB_BYTES}-byte cap")]
    TooLarge(u64),
    #[error("an outline of {total} bytes has {expected} groups, not {got}")]
    WrongCount { total: u64, expected: u64, got: u64 },
    #[error("the outline does not hash to the blob's id")]
    WrongRoot,
    #[error("group {index} does not exist")]
    NoSuchGroup { index: u64 },
    #[error("group {index} has {got} bytes, expected {expected}")]
    WrongLength { index: u64, expected: u64, got: u64 },
    #[error("group {index} does not match its hash")]
    WrongHash { index: u64 },
}

/// A blob's size and the chaining value of each group, checked against its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outline {
    total: u64,
    cvs: Vec<ChainingValue>,
}

/// The chaining value of one group that starts at byte `offset` of a multi-group blob.
fn group_cv(offset: u64, bytes: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset(offset)
        .update(bytes)
        .finalize_non_root()
}

impl Outline {
    /// Hashes a blob of `total` bytes group by group, reading it from `read`.
    pub fn compute(total: u64, mut read: impl std::io::Read) -> std::io::Result<Outline> {
        let groups = group_count(total);
        let mut buf = vec![0u8; GROUP_BYTES.min(total) as usize];
        let mut cvs = Vec::with_capacity(groups as usize);
        for index in 0..groups {
            let range = group_range(total, index);
            let bytes = &mut buf[..(range.end - range.start) as usize];
            read.read_exact(bytes)?;
            cvs.push(if groups == 1 {
                *blake3::hash(bytes).as_bytes()
            } else {
                group_cv(range.start, bytes)
            });
        }
        Ok(Outline { total, cvs })
    }

    /// Accepts an outline sent by a peer only if it is the outline of blob `id`.
    pub fn verify(
        id: &ContentId,
        total: u64,
        cvs: Vec<ChainingValue>,
    ) -> Result<Self, OutlineError> {
        if total > MAX_BLOB_BYTES {
            return Err(OutlineError::TooLarge(total));
        }
        let expected = group_count(total);
        if cvs.len() as u64 != expected {
            return Err(OutlineError::WrongCount {
                total,
                expected,
                got: cvs.len() as u64,
            });
        }
        let outline = Outline { total, cvs };
        if outline.root() != *id {
            return Err(OutlineError::WrongRoot);
        }
        Ok(outline)
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn groups(&self) -> u64 {
        self.cvs.len() as u64
    }

    /// The chaining values from group `first` on, at most `max` of them.
    pub fn page(&self, first: u64, max: usize) -> &[ChainingValue] {
        let start = (first as usize).min(self.cvs.len());
        &self.cvs[start..(start + max).min(self.cvs.len())]
    }

    /// The blob's content id, rebuilt from the groups by blake3's tree rule.
    pub fn root(&self) -> ContentId {
        if self.cvs.len() == 1 {
            return ContentId(self.cvs[0]);
        }
        let split = hazmat::left_subtree_len(self.total);
        let left = self.subtree(0, split);
        let right = self.subtree(split, self.total - split);
        ContentId(*hazmat::merge_subtrees_root(&left, &right, Mode::Hash).as_bytes())
    }

    /// The chaining value of the subtree covering `len` bytes from `start` (a group boundary).
    fn subtree(&self, start: u64, len: u64) -> ChainingValue {
        if len <= GROUP_BYTES {
            return self.cvs[(start / GROUP_BYTES) as usize];
        }
        let split = hazmat::left_subtree_len(len);
        let left = self.subtree(start, split);
        let right = self.subtree(start + split, len - split);
        hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash)
    }

    /// Whether `bytes` are exactly group `index` of this blob.
    pub fn check_group(&self, index: u64, bytes: &[u8]) -> Result<(), OutlineError> {
        let Some(cv) = self.cvs.get(index as usize) else {
            return Err(OutlineError::NoSuchGroup { index });
        };
        let range = group_range(self.total, index);
        let expected = range.end - range.start;
        if bytes.len() as u64 != expected {
            return Err(OutlineError::WrongLength {
                index,
                expected,
                got: bytes.len() as u64,
            });
        }
        let got = if self.cvs.len() == 1 {
            *blake3::hash(bytes).as_bytes()
        } else {
            group_cv(range.start, bytes)
        };
        if got != *cv {
            return Err(OutlineError::WrongHash { index });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn the_outline_hashes_to_the_blake3_of_the_whole_blob() {
        let g = GROUP_BYTES as usize;
        for len in [
            0,
            1,
            1024,
            g - 1,
            g,
            g + 1,
            2 * g,
            3 * g + 17,
            5 * g,
            8 * g + 1,
        ] {
            let bytes = blob(len);
            let outline = Outline::compute(len as u64, bytes.as_slice()).unwrap();
            let id = ContentId::of(&bytes);
            assert_eq!(outline.root(), id, "len {len}");
            let checked = Outline::verify(&id, len as u64, outline.cvs.clone()).unwrap();
            for index in 0..checked.groups() {
                let r = group_range(len as u64, index);
                checked
                    .check_group(index, &bytes[r.start as usize..r.end as usize])
                    .unwrap();
            }
        }
    }

    #[test]
    fn lies_are_caught() {
        let g = GROUP_BYTES as usize;
        let bytes = blob(3 * g + 5);
        let id = ContentId::of(&bytes);
        let outline = Outline::compute(bytes.len() as u64, bytes.as_slice()).unwrap();
        // A size that changes the tree's shape, a missing group, a swapped group: refused.
        assert_eq!(
            Outline::verify(&id, 2 * GROUP_BYTES + 5, outline.cvs[..3].to_vec()),
            Err(OutlineError::WrongRoot)
        );
        // A size off by a few bytes keeps the shape and the root, so the outline passes; but
        // no bytes of that length match the last group's hash (it commits to its length), so
        // a downloader checks the last group along with the outline.
        let lying = Outline::verify(&id, bytes.len() as u64 - 1, outline.cvs.clone()).unwrap();
        assert!(lying.check_group(3, &bytes[3 * g..3 * g + 4]).is_err());
        assert!(lying.check_group(3, &bytes[3 * g..]).is_err());
        assert!(matches!(
            Outline::verify(&id, bytes.len() as u64, outline.cvs[..3].to_vec()),
            Err(OutlineError::WrongCount { .. })
        ));
        let mut swapped = outline.cvs.clone();
        swapped.swap(0, 1);
        assert_eq!(
            Outline::verify(&id, bytes.len() as u64, swapped),
            Err(OutlineError::WrongRoot)
        );
        assert_eq!(
            Outline::verify(&id, MAX_BLOB_BYTES + 1, Vec::new()),
            Err(OutlineError::TooLarge(MAX_BLOB_BYTES + 1))
        );
        // A group that is another group's bytes, or one flipped bit, or short: refused.
        assert_eq!(
            outline.check_group(1, &bytes[..g]),
            Err(OutlineError::WrongHash { index: 1 })
        );
        let mut flipped = bytes[g..2 * g].to_vec();
        flipped[7] ^= 1;
        assert_eq!(
            outline.check_group(1, &flipped),
            Err(OutlineError::WrongHash { index: 1 })
        );
        assert!(matches!(
            outline.check_group(3, &bytes[3 * g..3 * g + 4]),
            Err(OutlineError::WrongLength { .. })
        ));
        assert_eq!(
            outline.check_group(4, &[]),
            Err(OutlineError::NoSuchGroup { index: 4 })
        );
    }

    #[test]
    fn pages_cover_the_outline() {
        let bytes = blob(5 * GROUP_BYTES as usize);
        let outline = Outline::compute(bytes.len() as u64, bytes.as_slice()).unwrap();
        assert_eq!(outline.page(0, 2).len(), 2);
        assert_eq!(outline.page(4, 2).len(), 1);
        assert!(outline.page(9, 2).is_empty());
    }
}
