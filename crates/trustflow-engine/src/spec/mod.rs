//! The pipeline file: YAML -> typed spec ([`load`]) -> semantic checks ([`validate`]).
//! Every type here derives `JsonSchema`; `schemas/pipeline.schema.json` is generated
//! from them ([`json_schema`]) and a test keeps the checked-in file in sync.

mod load;
mod locate;
mod validate;

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::stages::StageSpec;

pub use load::paths_as_list;
pub use load::{MAX_PIPELINE_BYTES, interpolate_env, load_file, parse_str, read_spec_text};
pub use validate::{check_source, validate};

/// A whole pipeline: where rows come from, what happens to them, where they go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "trustflow pipeline")]
pub struct PipelineSpec {
    /// Name shown in progress and reports (defaults to the file stem).
    #[serde(default)]
    pub name: Option<String>,
    /// Where rows come from.
    pub source: SourceSpec,
    /// Stages in order; each appends columns and may quarantine rows.
    #[serde(default)]
    pub stages: Vec<StageSpec>,
    /// Where enriched rows (and quarantined ones) go.
    pub sink: SinkSpec,
    /// Batch size and queue depths.
    #[serde(default)]
    pub runtime: RuntimeSpec,
    /// How a rerun decides that a finished shard's input is unchanged.
    #[serde(default)]
    pub resume: ResumeSpec,
    /// How to reach S3-compatible object stores, for `s3://` paths in `source.paths`
    /// and `sink.path` (credentials come from the environment or an AWS profile).
    #[serde(default)]
    pub storage: crate::storage::StorageSpec,
}

/// How a rerun decides that a finished shard's input is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeSpec {
    /// `quick` (default): the input's size, modification time and a SHA-256 of its last
    /// 64 KiB (the Parquet footer). `full`: also a SHA-256 of the whole file; it
    /// catches an edit in the middle of a file whose size and modification time were
    /// kept. A shard to process is hashed by the read that processes it (held in
    /// memory while read; over 2 GiB or in an object store: a read of its own); a
    /// finished shard is verified by reading it whole.
    #[serde(default)]
    pub verify: ResumeVerify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResumeVerify {
    #[default]
    Quick,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SourceType {
    /// Apache Parquet shards.
    #[default]
    Parquet,
}

/// Parquet shards read through DataFusion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Source kind (only `parquet` for now).
    #[serde(rename = "type", default)]
    pub kind: SourceType,
    /// Shard files, folders or glob patterns (`data/*.parquet`), relative to the
    /// pipeline file, or `s3://` URIs. A folder is searched at every depth (Hive-style
    /// `key=value/` folders included; folders named `.*` or `_*` are passed over), and
    /// each output keeps the shard's path relative to it. Each matching file is one
    /// shard; shards are processed in sorted path order. A single string is a list of
    /// one.
    #[schemars(with = "PathsSchema")]
    pub paths: Vec<String>,
    /// Optional SQL predicate over the shard's own column names, e.g.
    /// `split = 'train' AND length(caption) > 3`. Rows it rejects are not read at all
    /// (they are neither output nor quarantined).
    #[serde(default)]
    pub filter: Option<String>,
    /// Column naming convention of the shards. `img2dataset` maps `key`, `jpg`,
    /// `caption`; explicit `columns` entries still win.
    #[serde(default)]
    pub preset: Option<SourcePreset>,
    /// Which shard column holds each logical column. Unset entries default to the
    /// logical name (or the preset's) and are used only when the shard has them.
    #[serde(default)]
    pub columns: ColumnMap,
    /// Other shard columns to carry through unchanged (e.g. `url`, `license`), after
    /// the logical ones. Each must exist in every shard.
    #[serde(default)]
    pub keep_columns: Vec<String>,
    /// How the image column stores images; `auto` decides from its Arrow type.
    #[serde(default)]
    pub image_layout: ImageLayout,
    /// Folder that image paths are resolved in (default: the shard's own folder),
    /// relative to the pipeline file. Paths that escape it are bad rows.
    #[serde(default)]
    pub image_root: Option<String>,
    /// Largest image file read for path layouts, in bytes.
    #[serde(default = "default_max_image_file_bytes")]
    #[schemars(range(min = 1))]
    pub max_image_file_bytes: u64,
    /// What to do with rows whose label is null when a label column is mapped.
    #[serde(default)]
    pub null_labels: NullLabels,
    /// What a shard that cannot be read (unreadable footer, corrupt data page, file
    /// gone) does: `quarantine` (default) skips it, records it with the reason in the
    /// report, lets every other shard run and makes the run exit with code 3; `fail`
    /// stops the run with the error.
    #[serde(default)]
    pub on_unreadable: OnUnreadable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnUnreadable {
    /// Skip the shard, report it, exit 3 at the end.
    #[default]
    Quarantine,
    /// Stop the run.
    Fail,
}

/// Schema-only shape of `source.paths`: one pattern or a non-empty list.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum PathsSchema {
    One(String),
    Many(#[schemars(length(min = 1))] Vec<String>),
}

fn default_max_image_file_bytes() -> u64 {
    64 << 20
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SourcePreset {
    /// img2dataset's Parquet output: `key` -> id, `jpg` -> image, `caption` -> caption.
    Img2dataset,
}

/// Logical column -> shard column name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnMap {
    /// Unique row id (string or integer). Without one, ids are `<shard stem>:<row>`.
    #[serde(default)]
    pub id: Option<String>,
    /// Image: raw bytes, a Hugging Face `{bytes, path}` struct, or a relative path.
    #[serde(default)]
    pub image: Option<String>,
    /// Caption text (string, or binary holding UTF-8).
    #[serde(default)]
    pub caption: Option<String>,
    /// Integer class label.
    #[serde(default)]
    pub label: Option<String>,
    /// Domain name (e.g. `source`, `target`, a country).
    #[serde(default)]
    pub domain: Option<String>,
    /// Split name (e.g. `train`, `test`).
    #[serde(default)]
    pub split: Option<String>,
}

impl ColumnMap {
    /// The explicit mapping of a logical column, if any.
    pub fn get(&self, logical: &str) -> Option<&str> {
        match logical {
            "id" => self.id.as_deref(),
            "image" => self.image.as_deref(),
            "caption" => self.caption.as_deref(),
            "label" => self.label.as_deref(),
            "domain" => self.domain.as_deref(),
            "split" => self.split.as_deref(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageLayout {
    /// Decide from the column's Arrow type: binary -> bytes, struct -> hf_struct,
    /// string -> path.
    #[default]
    Auto,
    /// Encoded image bytes (Binary, LargeBinary, BinaryView).
    Bytes,
    /// Hugging Face datasets' Image feature: a struct with `bytes` and `path`.
    HfStruct,
    /// A path relative to the shard's folder (or `image_root`).
    Path,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NullLabels {
    /// Rows with a null label go to quarantine (`error_stage: source`).
    #[default]
    Quarantine,
    /// Keep them (e.g. unlabelled target rows mixed with labelled ones).
    Keep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SinkType {
    /// Apache Parquet shards.
    #[default]
    Parquet,
}

/// Output shards: one per input shard (same stem), plus a quarantine shard and a
/// manifest; written under temporary names and renamed when complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SinkSpec {
    /// Sink kind (only `parquet` for now).
    #[serde(rename = "type", default)]
    pub kind: SinkType,
    /// Output folder, relative to the pipeline file; created if absent.
    pub path: String,
    /// Parquet compression codec.
    #[serde(default)]
    pub compression: Compression,
    /// Columns written without compression, whatever `compression` says. Left out:
    /// every binary column (the images: JPEG, PNG and WebP bytes are compressed
    /// already, so compressing them again costs CPU and saves nothing). `[]` compresses
    /// every column. Applies to output and quarantine shards alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncompressed_columns: Option<Vec<String>>,
    /// Rows per Parquet row group at most.
    #[serde(default = "default_row_group_rows")]
    #[schemars(range(min = 1))]
    pub row_group_rows: usize,
    /// Bytes buffered for an open row group before it is flushed.
    #[serde(default = "default_row_group_bytes")]
    #[schemars(range(min = 1024))]
    pub row_group_bytes: usize,
    /// Columns left out of the output shards (e.g. `image` for metadata-only outputs).
    /// Quarantine shards keep every source column.
    #[serde(default)]
    pub drop_columns: Vec<String>,
    /// A training file (see `trustflow train`) that `trustflow run` runs too, relative
    /// to this file; its `target` section usually reads this sink's `path`. See
    /// `train_mode` for when it runs.
    #[serde(default)]
    pub train: Option<String>,
    /// `after`: training starts once every shard is written and reads them back.
    /// `one_pass`: the trainer is fed live: its first epoch trains on the rows as the
    /// sink writes them (its `target` must be this sink's `path`), later epochs read the
    /// written shards; a slow trainer slows the reader down.
    #[serde(default)]
    pub train_mode: TrainMode,
    /// Depth, in batches, of the queue between the sink and the one-pass trainer
    /// (default: `runtime.queue_depth`).
    #[serde(default)]
    #[schemars(range(min = 1, max = 4096))]
    pub train_queue_depth: Option<usize>,
}

/// When `sink.train` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainMode {
    #[default]
    After,
    OnePass,
}

fn default_row_group_rows() -> usize {
    1024
}

fn default_row_group_bytes() -> usize {
    128 << 20
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    Zstd,
    Snappy,
    None,
}

/// How batches flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    /// Rows per batch read from the source.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 1048576))]
    pub batch_size: usize,
    /// Default depth, in batches, of every queue between two steps. Rows in flight are
    /// bounded by about (queues x depth + workers) x batch_size.
    #[serde(default = "default_queue_depth")]
    #[schemars(range(min = 1, max = 4096))]
    pub queue_depth: usize,
}

fn default_batch_size() -> usize {
    256
}

fn default_queue_depth() -> usize {
    4
}

impl Default for RuntimeSpec {
    fn default() -> Self {
        RuntimeSpec {
            batch_size: default_batch_size(),
            queue_depth: default_queue_depth(),
        }
    }
}

/// A spec together with the file it came from (paths in it are relative to that file).
#[derive(Debug, Clone)]
pub struct LoadedPipeline {
    pub file: PathBuf,
    pub spec: PipelineSpec,
    /// Where each field path (`stages[1].workers`) was written, for later errors.
    pub locations: locate::Locations,
}

/// A spec file that was read from disk: relative paths in it are resolved against its
/// folder, and problems are located in it. Pipeline and training files both are.
pub trait SpecOrigin {
    /// The file the spec came from.
    fn file(&self) -> &Path;
    /// Where each field path was written.
    fn locations(&self) -> &locate::Locations;

    /// The folder relative paths in the spec are resolved against.
    fn base_dir(&self) -> &Path {
        match self.file().parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    fn resolve(&self, relative: &str) -> PathBuf {
        let p = Path::new(relative);
        if p.is_absolute() || crate::storage::is_remote(p) {
            p.to_path_buf()
        } else {
            self.base_dir().join(p)
        }
    }

    /// A spec issue at `field`, located in the file when possible.
    fn issue_at(&self, field: &str, message: String) -> crate::error::SpecIssue {
        self.locations().issue(self.file(), field, message)
    }
}

impl SpecOrigin for LoadedPipeline {
    fn file(&self) -> &Path {
        &self.file
    }
    fn locations(&self) -> &locate::Locations {
        &self.locations
    }
}

impl LoadedPipeline {
    pub fn base_dir(&self) -> &Path {
        SpecOrigin::base_dir(self)
    }

    pub fn resolve(&self, relative: &str) -> PathBuf {
        SpecOrigin::resolve(self, relative)
    }

    pub fn name(&self) -> String {
        self.spec.name.clone().unwrap_or_else(|| {
            self.file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "pipeline".into())
        })
    }

    /// A spec issue at `field`, located in the file when possible.
    pub fn issue(&self, field: &str, message: impl Into<String>) -> crate::error::SpecIssue {
        self.locations.issue(&self.file, field, message)
    }
}

pub use locate::Locations;

/// The JSON Schema of pipeline files, as checked in at `schemas/pipeline.schema.json`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(PipelineSpec);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
