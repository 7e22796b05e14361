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

impl Fingerprint {
    pub fn of(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let size = meta.len();
        let modified_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let start = size.saturating_sub(TAIL_BYTES);
        file.seek(SeekFrom::Start(start))
            .map_err(|e| Error::io(path, e))?;
        let mut tail = Vec::with_capacity((size - start) as usize);
        file.read_to_end(&mut tail)
            .map_err(|e| Error::io(path, e))?;
        let tail_sha256 = format!("{:x}", Sha256::digest(&tail));
        Ok(Fingerprint {
            size,
            modified_ns,
            tail_sha256,
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

    /// [`Fingerprint::of`] plus a SHA-256 of the whole file, read sequentially.
    pub fn of_full(path: &Path) -> Result<Self> {
        let mut print = Self::of(path)?;
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
        print.content_sha256 = Some(format!("{:x}", hasher.finalize()));
        Ok(print)
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
