//! Finding shards (files, folders, globs) and fingerprinting them for resume.

use std::collections::HashMap;
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

fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Expand `patterns` (resolved against `base`) into a sorted, de-duplicated list of
/// shard files. A folder means every `*.parquet` file directly inside it. Folders and
/// globs skip the quarantine shards a sink writes beside its outputs
/// (`*.quarantine.parquet`), so one pipeline's output folder is another's input; name
/// a quarantine shard explicitly to read it.
pub fn discover(base: &Path, patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for pattern in patterns {
        let full = if Path::new(pattern).is_absolute() {
            PathBuf::from(pattern)
        } else {
            base.join(pattern)
        };
        // Only the user's pattern is a pattern: `[`, `*`, `?` in the base folder's
        // name are literal.
        let glob_text = if Path::new(pattern).is_absolute() {
            pattern.clone()
        } else {
            format!(
                "{}/{pattern}",
                glob::Pattern::escape(&base.to_string_lossy())
            )
        };
        let before = found.len();
        if has_glob_chars(pattern) {
            let paths = glob::glob(&glob_text)
                .map_err(|e| Error::input(&full, format!("invalid glob pattern: {e}")))?;
            for entry in paths {
                let path = entry.map_err(|e| Error::input(e.path(), e.error().to_string()))?;
                if path.is_file() && !is_quarantine_shard(&path) {
                    found.push(path);
                }
            }
        } else if full.is_dir() {
            let entries = std::fs::read_dir(&full).map_err(|e| Error::io(&full, e))?;
            for entry in entries {
                let path = entry.map_err(|e| Error::io(&full, e))?.path();
                if path.is_file()
                    && path.extension().is_some_and(|e| e == "parquet")
                    && !is_quarantine_shard(&path)
                {
                    found.push(path);
                }
            }
        } else if full.is_file() {
            found.push(full.clone());
        } else {
            return Err(Error::input(&full, "no such shard file or folder"));
        }
        if found.len() == before {
            return Err(Error::input(
                &full,
                format!("`{pattern}` matches no Parquet shard"),
            ));
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}

fn is_quarantine_shard(path: &Path) -> bool {
    path.file_name().is_some_and(|n| {
        n.to_string_lossy()
            .ends_with(crate::sink::QUARANTINE_SUFFIX)
    })
}

/// Output names derive from shard stems, so two shards may not share one.
pub fn check_unique_stems(shards: &[PathBuf]) -> Result<()> {
    let mut seen: HashMap<String, &PathBuf> = HashMap::new();
    for path in shards {
        let stem = stem_of(path);
        if let Some(first) = seen.insert(stem.clone(), path) {
            return Err(Error::input(
                path,
                format!(
                    "shard stem `{stem}` is also the stem of {}; outputs are named by stem, \
                     so rename one of them",
                    first.display()
                ),
            ));
        }
    }
    Ok(())
}

pub fn stem_of(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "shard".into())
}
