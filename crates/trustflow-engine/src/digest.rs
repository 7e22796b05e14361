//! Cheap content identities of files: a shard's fingerprint in its manifest (resume)
//! and the digest of a stage's model files (so replacing a model in place invalidates
//! finished shards).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What identifies a shard's content cheaply: size, modification time, and a hash of
/// its last 64 KiB (the Parquet footer, which changes whenever the data does). For an
/// object in a store, `tail_sha256` holds the object's ETag instead (`etag:"..."`),
/// which the store changes whenever the object is written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub size: u64,
    pub modified_ns: u128,
    pub tail_sha256: String,
    /// SHA-256 of the whole file, with `resume.verify: full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_sha256: Option<String>,
}

const TAIL_BYTES: u64 = 64 << 10;
/// Read size of [`Fingerprint::of_full`].
const READ_BYTES: usize = 256 << 10;

/// A file's size and modification time (0 where the platform gives none).
fn size_and_mtime(file: &std::fs::File, path: &Path) -> Result<(u64, u128)> {
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let modified_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((meta.len(), modified_ns))
}

/// The last [`TAIL_BYTES`] of a stream seen in pieces of any size.
#[derive(Default)]
struct TailWindow {
    bytes: Vec<u8>,
}

impl TailWindow {
    fn push(&mut self, piece: &[u8]) {
        let keep = TAIL_BYTES as usize;
        if piece.len() >= keep {
            // The piece alone fills the window: copy only its end.
            self.bytes.clear();
            self.bytes.extend_from_slice(&piece[piece.len() - keep..]);
        } else {
            self.bytes.extend_from_slice(piece);
            let excess = self.bytes.len().saturating_sub(keep);
            self.bytes.drain(..excess);
        }
    }
}

impl Fingerprint {
    pub fn of(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let (size, modified_ns) = size_and_mtime(&file, path)?;
        let start = size.saturating_sub(TAIL_BYTES);
        file.seek(SeekFrom::Start(start))
            .map_err(|e| Error::io(path, e))?;
        let mut tail = Vec::with_capacity((size - start) as usize);
        file.read_to_end(&mut tail)
            .map_err(|e| Error::io(path, e))?;
        Ok(Fingerprint {
            size,
            modified_ns,
            tail_sha256: format!("{:x}", Sha256::digest(&tail)),
            content_sha256: None,
        })
    }

    /// The fingerprint of an object in a store, from its metadata (no data read).
    pub fn of_object(meta: &object_store::ObjectMeta) -> Self {
        Fingerprint {
            size: meta.size,
            modified_ns: meta
                .last_modified
                .timestamp_nanos_opt()
                .map_or(0, |ns| ns.max(0) as u128),
            tail_sha256: format!("etag:{}", meta.e_tag.as_deref().unwrap_or("")),
            content_sha256: None,
        }
    }

    /// The ETag of an object's fingerprint (None for a local file, or a store that
    /// gave none).
    pub fn etag(&self) -> Option<String> {
        self.tail_sha256
            .strip_prefix("etag:")
            .filter(|tag| !tag.is_empty())
            .map(str::to_string)
    }

    /// [`Fingerprint::of`] plus a SHA-256 of the whole file, in one sequential read: the
    /// tail hash comes from the last 64 KiB of that same read, so the file is not read
    /// twice (its values are those of `of`, which manifests compare against).
    pub fn of_full(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let (size, modified_ns) = size_and_mtime(&file, path)?;
        let mut content = Sha256::new();
        let mut tail = TailWindow::default();
        let mut buffer = vec![0u8; READ_BYTES];
        loop {
            let read = match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(path, e)),
            };
            content.update(&buffer[..read]);
            tail.push(&buffer[..read]);
        }
        Ok(Fingerprint {
            size,
            modified_ns,
            tail_sha256: format!("{:x}", Sha256::digest(&tail.bytes)),
            content_sha256: Some(format!("{:x}", content.finalize())),
        })
    }

    /// Whether `current` (the input now) is the input this fingerprint recorded. A
    /// whole-file hash is compared when `current` has one: a manifest without one does
    /// not satisfy a full check.
    pub fn still_matches(&self, current: &Fingerprint) -> bool {
        self.size == current.size
            && self.modified_ns == current.modified_ns
            && self.tail_sha256 == current.tail_sha256
            && match &current.content_sha256 {
                Some(hash) => self.content_sha256.as_ref() == Some(hash),
                None => true,
            }
    }
}

/// SHA-256 of `text`, in hex.
pub fn text_digest(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// One string that changes whenever any of `files` does (size and tail hash of each,
/// in order).
pub fn files_digest(files: impl IntoIterator<Item = PathBuf>) -> Result<String> {
    let mut digest = String::new();
    for path in files {
        let print = Fingerprint::of(&path)?;
        digest.push_str(&print.tail_sha256);
        digest.push_str(&print.size.to_string());
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `of_full` takes its tail hash from its single read; it must equal `of`'s (which
    /// seeks to the tail), or manifests written by one would not match the other.
    #[test]
    fn full_read_gives_the_same_tail_hash_as_of() {
        let dir = tempfile::tempdir().unwrap();
        let tail = TAIL_BYTES as usize;
        let sizes = [
            0,
            1,
            1000,
            tail - 1,
            tail,
            tail + 1,
            READ_BYTES - 7,
            READ_BYTES + tail / 2 + 3, // the window spans the last two reads
            3 * READ_BYTES + 12_345,
        ];
        for size in sizes {
            // Bytes that differ along the file, so a window in the wrong place shows.
            let bytes: Vec<u8> = (0..size).map(|i| (i * 31 + i / 251) as u8).collect();
            let path = dir.path().join(format!("f{size}"));
            std::fs::write(&path, &bytes).unwrap();
            let quick = Fingerprint::of(&path).unwrap();
            let full = Fingerprint::of_full(&path).unwrap();
            assert_eq!(full.tail_sha256, quick.tail_sha256, "size {size}");
            assert_eq!(
                (full.size, full.modified_ns),
                (quick.size, quick.modified_ns)
            );
            assert_eq!(quick.content_sha256, None);
            let last = format!("{:x}", Sha256::digest(&bytes[size.saturating_sub(tail)..]));
            assert_eq!(quick.tail_sha256, last, "size {size}");
            let whole = format!("{:x}", Sha256::digest(&bytes));
            assert_eq!(
                full.content_sha256.as_deref(),
                Some(whole.as_str()),
                "size {size}"
            );
        }
    }
}
