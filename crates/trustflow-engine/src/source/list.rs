//! A part's own shards, as a driver planned them (`trustflow run --shards FILE`).
//!
//! A cluster job plans once: the driver lists the source and reads every footer
//! (`trustflow plan`), then hands each part the shards it is to process. A part that
//! gets its list reads only those shards' footers and lists nothing, so a job costs one
//! footer read per shard, not one per shard and part.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::shards::{FoundShard, stem_of};
use crate::error::{Error, Result};

/// The file a driver writes for one part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardList {
    /// The plan's pipeline hash: a part refuses a list planned for another pipeline.
    pub pipeline_hash: String,
    /// `[I, N]`: this is part I of N (names the part's lock and report).
    pub part: (usize, usize),
    /// The part's shards, in the order to process them.
    pub shards: Vec<ListedShard>,
}

/// One shard of a [`ShardList`], as `trustflow plan` printed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedShard {
    /// Its index in the job's plan.
    pub index: usize,
    pub input: PathBuf,
    /// Its output name (relative path without extension); default: the file's stem.
    #[serde(default)]
    pub stem: Option<String>,
    /// Rows from the footer, as planned (informative).
    #[serde(default)]
    pub rows: Option<u64>,
}

impl ShardList {
    /// Read and check a list file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let list: ShardList = serde_json::from_str(&text).map_err(|e| {
            Error::input(
                path,
                format!(
                    "not a shard list: {e}; expected {{\"pipeline_hash\": ..., \"part\": [I, N], \
                     \"shards\": [{{\"index\": ..., \"input\": ...}}]}}"
                ),
            )
        })?;
        let (i, n) = list.part;
        if n == 0 || i >= n {
            return Err(Error::input(
                path,
                format!("part [{i}, {n}]: expected 0 <= I < N"),
            ));
        }
        if list.shards.is_empty() {
            return Err(Error::input(path, "lists no shard"));
        }
        // A part processes the shards with index % N == I, whoever planned them: a list
        // that says otherwise would let two parts write one shard.
        if let Some(stray) = list.shards.iter().find(|s| s.index % n != i) {
            return Err(Error::StalePlan {
                path: path.to_path_buf(),
                message: format!(
                    "lists shard #{} ({}) for part {i}/{n}, which holds the shards with \
                     index % {n} == {i}",
                    stray.index,
                    stray.input.display()
                ),
            });
        }
        Ok(list)
    }

    /// Refuse a list planned for another pipeline (its file changed since planning).
    pub fn check_hash(&self, path: &Path, pipeline_hash: &str) -> Result<()> {
        if self.pipeline_hash == pipeline_hash {
            return Ok(());
        }
        Err(Error::StalePlan {
            path: path.to_path_buf(),
            message: format!(
                "was planned for pipeline hash {} but the pipeline now hashes to {}; the \
                 pipeline (or a model file) changed since the job was planned: plan again",
                self.pipeline_hash, pipeline_hash
            ),
        })
    }

    /// The shards as discovery would have found them.
    pub(crate) fn found(&self) -> Vec<FoundShard> {
        self.shards
            .iter()
            .map(|s| FoundShard {
                name: s.stem.clone().unwrap_or_else(|| stem_of(&s.input)),
                path: s.input.clone(),
            })
            .collect()
    }
}
