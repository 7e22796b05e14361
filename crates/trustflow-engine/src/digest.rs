//! Cheap content identities of files: a shard's fingerprint in its manifest (resume)
//! and the digest of a stage's model files (so replacing a model in place invalidates
//! finished shards).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What identifies a shard's content cheaply: size, modification time, and a hash of
/// its last 64 KiB (the Parquet footer, which changes whenever the data does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub size: u64,
    pub modified_ns: u128,
    pub tail_sha256: String,
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
        })
    }
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
