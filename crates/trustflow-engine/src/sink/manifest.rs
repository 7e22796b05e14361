//! The small JSON file written after a shard's outputs are renamed into place. Its
//! presence (and match) is what makes a shard "done": a rerun skips exactly those.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::folder::{FolderView, OutputFolder};
use crate::digest::Fingerprint;
use crate::error::{Error, Result};
use crate::runtime::{ShardCounts, SkippedPart};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub trustflow_version: String,
    pub pipeline_hash: String,
    pub input: PathBuf,
    pub input_fingerprint: Fingerprint,
    pub rows_in: u64,
    pub rows_out: u64,
    pub rows_quarantined: u64,
    pub output: FileEntry,
    pub quarantine: FileEntry,
    /// Quarantined rows per `stage: reason` (reasons with their specifics elided).
    pub quarantine_reasons: BTreeMap<String, u64>,
    /// Parts of the input that could not be read and were skipped (their rows are in
    /// no count): the shard is done, but not whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedPart>,
    /// The input column that fed each canonical one (`id`, `image`, `caption`, ...):
    /// the quarantine shard keeps the input's own names, and tools read it by these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_columns: BTreeMap<String, String>,
}

impl Manifest {
    pub fn counts(&self) -> ShardCounts {
        ShardCounts {
            rows_in: self.rows_in,
            rows_out: self.rows_out,
            rows_quarantined: self.rows_quarantined,
        }
    }

    pub fn path_for(out_dir: &Path, stem: &str) -> PathBuf {
        out_dir.join(crate::columns::manifest_name(stem))
    }

    pub fn read(path: &Path) -> Option<Manifest> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The manifest at `path`: `Ok(None)` when there is none, `Err(why)` when a file is
    /// there but is not a manifest (truncated, corrupt, another format).
    pub fn read_checked(path: &Path) -> std::result::Result<Option<Manifest>, String> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// The manifest of `stem` in the folder, if there is a readable one.
    pub fn read_from(folder: &FolderView<'_>, stem: &str) -> Option<Manifest> {
        let bytes = folder.read_small(&crate::columns::manifest_name(stem))?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Write it whole (the shard's commit point).
    pub fn write_to(&self, folder: &OutputFolder, stem: &str) -> Result<()> {
        let name = crate::columns::manifest_name(stem);
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| Error::output(folder.display(&name), e))?;
        folder.put_small(&name, &text)
    }

    /// True when this manifest describes a finished shard of the same input under the
    /// same pipeline, and its outputs are still there, whole.
    pub fn matches(
        &self,
        folder: &FolderView<'_>,
        pipeline_hash: &str,
        input: &Fingerprint,
    ) -> bool {
        let intact = |entry: &FileEntry| folder.size_of(&entry.file) == Some(entry.bytes);
        self.pipeline_hash == pipeline_hash
            && self.input_fingerprint.still_matches(input)
            && intact(&self.output)
            && intact(&self.quarantine)
    }
}

/// Group reasons that differ only in specifics (sizes, file names) for summaries.
pub fn reason_key(stage: &str, reason: &str) -> String {
    let mut out = String::with_capacity(reason.len() + stage.len() + 2);
    out.push_str(stage);
    out.push_str(": ");
    let mut in_quote = false;
    let mut depth = 0usize;
    let mut last_digit = false;
    for c in reason.chars() {
        // Parenthesised details (sizes, magic bytes) vary row to row.
        if c == '(' {
            if depth == 0 {
                out.push_str("(…)");
            }
            depth += 1;
            continue;
        }
        if depth > 0 {
            depth -= usize::from(c == ')');
            continue;
        }
        if c == '`' {
            if !in_quote {
                out.push_str("`…`");
            }
            in_quote = !in_quote;
            continue;
        }
        if in_quote {
            continue;
        }
        // Names such as UTF-8 are words, not quantities.
        if c.is_ascii_digit() && !out.ends_with("UTF-") {
            if !last_digit {
                out.push('N');
            }
            last_digit = true;
            continue;
        }
        last_digit = false;
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::reason_key;

    #[test]
    fn reason_keys_elide_specifics() {
        assert_eq!(
            reason_key(
                "decode",
                "declared 60000x60000 pixels, over the limit of 40000000"
            ),
            "decode: declared NxN pixels, over the limit of N"
        );
        assert_eq!(
            reason_key("source", "image file `a/b.jpg` cannot be opened"),
            "source: image file `…` cannot be opened"
        );
        assert_eq!(
            reason_key(
                "decode",
                "not a recognised image format (magic bytes 1f 8b (x))"
            ),
            "decode: not a recognised image format (…)"
        );
        assert_eq!(
            reason_key("source", "caption is not valid UTF-8 at byte 3"),
            "source: caption is not valid UTF-8 at byte N"
        );
    }
}
