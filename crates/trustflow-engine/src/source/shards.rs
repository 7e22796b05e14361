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

/// A shard found by [`find`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundShard {
    pub path: PathBuf,
    /// Where its outputs go, relative to the output folder and without the extension:
    /// the shard's path under the folder (or a glob's fixed leading part) it was found
    /// in, so `year=2024/part-0.parquet` and `year=2025/part-0.parquet` keep apart; a
    /// file named on its own gives its stem.
    pub name: String,
}

/// Expand `patterns` (resolved against `base`) into a sorted, de-duplicated list of
/// shard files. A path that exists is taken literally, even when its name has glob
/// characters (`shard[1].parquet`, `data[2024]/`); only other patterns are expanded as
/// globs. A folder means every `*.parquet` file in it and in its subfolders (Hive-style
/// `key=value/` folders included), skipping folders whose name starts with `.` or `_`
/// (`.trustflow/`, Spark's `_temporary/`, as Spark and pyarrow do). Folders and globs
/// skip the quarantine shards a sink writes beside its outputs (`*.quarantine.parquet`),
/// so one pipeline's output folder is another's input; name a quarantine shard
/// explicitly to read it. `s3://bucket/...` patterns are listed in their store with
/// the same rules (a key prefix acts as a folder).
pub fn discover(storage: &Storage, base: &Path, patterns: &[String]) -> Result<Vec<PathBuf>> {
    Ok(find(storage, base, patterns)?
        .into_iter()
        .map(|f| f.path)
        .collect())
}

/// [`discover`], with each shard's output name.
pub fn find(storage: &Storage, base: &Path, patterns: &[String]) -> Result<Vec<FoundShard>> {
    let mut found = Vec::new();
    for pattern in patterns {
        let before = found.len();
        if storage::is_remote(Path::new(pattern)) {
            found.extend(find_remote(storage, pattern)?);
        } else {
            found.extend(find_local(base, pattern)?);
        }
        if found.len() == before {
            let shown = match storage::is_remote(Path::new(pattern)) {
                true => PathBuf::from(pattern),
                false => base.join(pattern),
            };
            return Err(Error::input(
                &shown,
                format!("`{pattern}` matches no Parquet shard"),
            ));
        }
    }
    Ok(one_per_file(found))
}

/// `found` sorted by path, each file once: the same file reached twice (a folder and a
/// glob over it, `a/../a`, two overlapping patterns) is one shard.
pub(crate) fn one_per_file(mut found: Vec<FoundShard>) -> Vec<FoundShard> {
    let mut seen = std::collections::HashSet::new();
    found.retain(|f| seen.insert(identity(&f.path)));
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// What makes two paths one file: the resolved path locally, the URI in a store.
fn identity(path: &Path) -> PathBuf {
    match storage::is_remote(path) {
        true => path.to_path_buf(),
        false => path.canonicalize().unwrap_or_else(|_| path.to_path_buf()),
    }
}

fn find_local(base: &Path, pattern: &str) -> Result<Vec<FoundShard>> {
    let full = if Path::new(pattern).is_absolute() {
        PathBuf::from(pattern)
    } else {
        base.join(pattern)
    };
    let mut found = Vec::new();
    if full.is_dir() {
        walk_local(&full, &mut |path| {
            if is_listed_shard(path) {
                found.push(FoundShard {
                    name: relative_name(path.strip_prefix(&full).unwrap_or(path)),
                    path: path.to_path_buf(),
                });
            }
        })?;
    } else if full.is_file() {
        found.push(FoundShard {
            name: stem_of(&full),
            path: full,
        });
    } else if has_glob_chars(pattern) {
        // Only the user's pattern is a pattern: `[`, `*`, `?` in the base folder's
        // name are literal.
        let glob_text = if Path::new(pattern).is_absolute() {
            pattern.to_string()
        } else {
            format!(
                "{}/{pattern}",
                glob::Pattern::escape(&base.to_string_lossy())
            )
        };
        let root = match Path::new(pattern).is_absolute() {
            true => PathBuf::from(literal_prefix(pattern)),
            false => base.join(literal_prefix(pattern)),
        };
        let paths = glob::glob(&glob_text)
            .map_err(|e| Error::input(&full, format!("invalid glob pattern: {e}")))?;
        for entry in paths {
            let path = entry.map_err(|e| Error::input(e.path(), e.error().to_string()))?;
            if path.is_file() && !is_quarantine_shard(&path) {
                found.push(FoundShard {
                    name: relative_name(path.strip_prefix(&root).unwrap_or(&path)),
                    path,
                });
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
    Ok(found)
}

/// Call `visit` on every file under `dir`, depth first in name order, skipping hidden
/// and `_`-prefixed folders. Linked folders are not followed (no cycles, no escape).
fn walk_local(dir: &Path, visit: &mut dyn FnMut(&Path)) -> Result<()> {
    let mut entries: Vec<std::fs::DirEntry> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir {
            if !is_skipped_folder(&entry.file_name().to_string_lossy()) {
                walk_local(&path, visit)?;
            }
        } else if path.is_file() {
            visit(&path);
        }
    }
    Ok(())
}

/// Folders a recursive search passes over: hidden ones and `_`-prefixed ones (Spark's
/// `_temporary`, Delta's `_delta_log`), as Spark and pyarrow's dataset discovery do.
fn is_skipped_folder(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('_')
}

/// A `*.parquet` file that is not a quarantine shard.
fn is_listed_shard(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet") && !is_quarantine_shard(path)
}

/// `relative` (a shard's path under its search root) without its extension, `/`-joined.
fn relative_name(relative: &Path) -> String {
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.last_mut() {
        *last = stem_of(Path::new(last.as_str()));
    }
    parts.join("/")
}

/// [`find`] for one `s3://` pattern: an object, a prefix ("folder": its `*.parquet`
/// objects at every depth) or a glob over keys (`*` stays within one level, `**`
/// crosses levels).
fn find_remote(storage: &Storage, pattern: &str) -> Result<Vec<FoundShard>> {
    let uri = ObjectUri::parse(pattern)?;
    let shard = |key: &str, root: &str| {
        let relative = key
            .strip_prefix(root)
            .unwrap_or(key)
            .trim_start_matches('/');
        FoundShard {
            path: ObjectUri {
                bucket: uri.bucket.clone(),
                key: key.to_string(),
            }
            .to_path(),
            name: relative_name(Path::new(relative)),
        }
    };
    let mut found = Vec::new();
    if has_glob_chars(&uri.key) {
        let matcher = glob::Pattern::new(&uri.key)
            .map_err(|e| Error::input(uri.to_path(), format!("invalid glob pattern: {e}")))?;
        let options = glob::MatchOptions {
            require_literal_separator: true,
            ..glob::MatchOptions::new()
        };
        let root = literal_prefix(&uri.key);
        let prefix = ObjectUri {
            bucket: uri.bucket.clone(),
            key: root.clone(),
        };
        for object in storage.block_on(storage.list(&prefix))?? {
            let key = object.key.as_str();
            if matcher.matches_with(key, options) && !is_quarantine_shard(Path::new(key)) {
                found.push(shard(key, &root));
            }
        }
    } else if !uri.key.is_empty() && storage.block_on(storage.head(&uri))?.is_ok() {
        found.push(FoundShard {
            path: uri.to_path(),
            name: stem_of(Path::new(uri.name())),
        });
    } else {
        // A key prefix is listed as a folder: the keys under `key/`.
        let folder = uri.folder_key();
        for object in storage.block_on(storage.list(&uri))?? {
            let key = object.key.as_str();
            let Some(relative) = key.strip_prefix(folder.as_str()) else {
                continue;
            };
            let (folders, name) = relative.rsplit_once('/').unwrap_or(("", relative));
            if !folders.split('/').any(is_skipped_folder) && is_listed_shard(Path::new(name)) {
                found.push(shard(key, &folder));
            }
        }
    }
    Ok(found)
}

fn is_quarantine_shard(path: &Path) -> bool {
    path.file_name().is_some_and(|n| {
        n.to_string_lossy()
            .ends_with(crate::columns::QUARANTINE_SUFFIX)
    })
}

/// Output names derive from shards' names, so two shards may not share one.
pub fn check_unique_names(shards: &[FoundShard]) -> Result<()> {
    let mut seen: HashMap<&str, &PathBuf> = HashMap::new();
    for shard in shards {
        if let Some(first) = seen.insert(shard.name.as_str(), &shard.path) {
            return Err(Error::input(
                &shard.path,
                format!(
                    "its outputs would be named `{}`, as those of {}; outputs keep a shard's \
                     path under the folder it was found in, so rename one of them or name \
                     their common folder",
                    shard.name,
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
