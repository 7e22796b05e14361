//! Finding shards (files, folders, globs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::storage::{self, ObjectUri, Storage};

pub(crate) fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The `/`-separated components of `pattern` before its first one with a glob
/// character: where a glob starts searching.
pub(crate) fn literal_prefix(pattern: &str) -> String {
    pattern
        .split('/')
        .take_while(|part| !has_glob_chars(part))
        .collect::<Vec<_>>()
        .join("/")
}

/// Expand `patterns` (resolved against `base`) into a sorted, de-duplicated list of
/// shard files. A path that exists is taken literally, even when its name has glob
/// characters (`shard[1].parquet`, `data[2024]/`); only other patterns are expanded as
/// globs. A folder means every `*.parquet` file directly inside it. Folders and globs
/// skip the quarantine shards a sink writes beside its outputs
/// (`*.quarantine.parquet`), so one pipeline's output folder is another's input; name
/// a quarantine shard explicitly to read it. `s3://bucket/...` patterns are listed in
/// their store with the same rules (a key prefix acts as a folder).
pub fn discover(storage: &Storage, base: &Path, patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for pattern in patterns {
        if storage::is_remote(Path::new(pattern)) {
            found.extend(discover_remote(storage, pattern)?);
            continue;
        }
        let full = if Path::new(pattern).is_absolute() {
            PathBuf::from(pattern)
        } else {
            base.join(pattern)
        };
        let before = found.len();
        if full.is_dir() {
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
        } else if has_glob_chars(pattern) {
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
            let paths = glob::glob(&glob_text)
                .map_err(|e| Error::input(&full, format!("invalid glob pattern: {e}")))?;
            for entry in paths {
                let path = entry.map_err(|e| Error::input(e.path(), e.error().to_string()))?;
                if path.is_file() && !is_quarantine_shard(&path) {
                    found.push(path);
                }
            }
        } else if std::fs::symlink_metadata(&full).is_ok() {
            return Err(Error::input(
                &full,
                "is neither a file nor a folder (a broken link?); expected a Parquet shard \
                 or a folder of them",
            ));
        } else {
            return Err(Error::input(
                &full,
                "does not exist; expected a Parquet shard, a folder of them or a glob pattern",
            ));
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

/// [`discover`] for one `s3://` pattern: an object, a prefix ("folder": its
/// `*.parquet` objects one level down) or a glob over keys (`*` stays within one
/// level, `**` crosses levels).
fn discover_remote(storage: &Storage, pattern: &str) -> Result<Vec<PathBuf>> {
    let uri = ObjectUri::parse(pattern)?;
    let shard = |key: &str| {
        ObjectUri {
            bucket: uri.bucket.clone(),
            key: key.to_string(),
        }
        .to_path()
    };
    let mut found: Vec<PathBuf> = Vec::new();
    if has_glob_chars(&uri.key) {
        let matcher = glob::Pattern::new(&uri.key)
            .map_err(|e| Error::input(uri.to_path(), format!("invalid glob pattern: {e}")))?;
        let options = glob::MatchOptions {
            require_literal_separator: true,
            ..glob::MatchOptions::new()
        };
        let prefix = ObjectUri {
            bucket: uri.bucket.clone(),
            key: literal_prefix(&uri.key),
        };
        for object in storage.block_on(storage.list(&prefix))?? {
            let key = object.location.as_ref();
            if matcher.matches_with(key, options) && !is_quarantine_shard(Path::new(key)) {
                found.push(shard(key));
            }
        }
    } else if !uri.key.is_empty() && storage.block_on(storage.head(&uri))?.is_ok() {
        found.push(uri.to_path());
    } else {
        // object_store lists a key prefix as a folder: the keys under `key/`.
        let folder = match uri.key.is_empty() {
            true => String::new(),
            false => format!("{}/", uri.key),
        };
        for object in storage.block_on(storage.list(&uri))?? {
            let key = object.location.as_ref();
            if let Some(name) = key.strip_prefix(folder.as_str())
                && !name.contains('/')
                && name.ends_with(".parquet")
                && !is_quarantine_shard(Path::new(name))
            {
                found.push(shard(key));
            }
        }
    }
    if found.is_empty() {
        return Err(Error::input(
            uri.to_path(),
            format!("`{pattern}` matches no Parquet shard"),
        ));
    }
    Ok(found)
}

fn is_quarantine_shard(path: &Path) -> bool {
    path.file_name().is_some_and(|n| {
        n.to_string_lossy()
            .ends_with(crate::columns::QUARANTINE_SUFFIX)
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
