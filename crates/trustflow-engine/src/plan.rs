//! Phases three and four of validation (after parsing and the semantic checks of
//! `spec::validate`, which [`load_and_plan`] runs first): resolve the shards and their
//! columns, build every stage and chain their output fields, so the whole output
//! schema is known before any row is read. `validate` prints this; `run` executes it.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result, SpecIssues};
use crate::runtime::StageSlot;
use crate::source::{self, SourcePlan};
use crate::spec::{self, LoadedPipeline};

/// Command-line replacements for parts of the pipeline file (with the `cli` feature,
/// also the `--input`/`--out` arguments themselves).
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Overrides {
    /// Replace `source.paths` (files, folders or globs, relative to the current
    /// directory; may repeat).
    #[cfg_attr(feature = "cli", arg(long = "input", value_name = "PATH"))]
    pub inputs: Option<Vec<String>>,
    /// Replace `sink.path`.
    #[cfg_attr(feature = "cli", arg(long = "out", value_name = "DIR"))]
    pub out_dir: Option<PathBuf>,
    /// Process exactly the shards a driver planned for this part (a JSON file: the
    /// plan's pipeline hash, `part: [I, N]` and the shards); nothing is listed and only
    /// their footers are read. Instead of `--input` and `--part`.
    #[cfg_attr(
        feature = "cli",
        arg(long = "shards", value_name = "FILE", conflicts_with = "inputs")
    )]
    pub shards: Option<PathBuf>,
}

/// A pipeline ready to run.
pub struct Plan {
    pub pipeline: LoadedPipeline,
    pub source: SourcePlan,
    pub stages: Vec<StageSlot>,
    /// Schema after the last stage.
    pub output_schema: SchemaRef,
    /// What the output shards hold (`output_schema` minus `sink.drop_columns`).
    pub sink_schema: SchemaRef,
    pub out_dir: PathBuf,
    /// Hash of everything in the spec that can change output values (not paths,
    /// workers or queue depths); part of every manifest.
    pub pipeline_hash: String,
    /// `Some((I, N))` when the shards came from a driver's list for part I of N
    /// (`--shards`): the run processes them all, as that part.
    pub listed_part: Option<(usize, usize)>,
}

/// Parse, check and plan `file`.
pub fn load_and_plan(file: &std::path::Path, overrides: &Overrides) -> Result<Plan> {
    let pipeline = spec::load_file(file)?;
    spec::validate(&pipeline)?;
    build(pipeline, overrides)
}

pub fn build(pipeline: LoadedPipeline, overrides: &Overrides) -> Result<Plan> {
    let list = overrides
        .shards
        .as_deref()
        .map(source::ShardList::read)
        .transpose()?;
    let choice = match (&list, &overrides.inputs) {
        (Some(list), _) => source::ShardChoice::Listed(list),
        (None, Some(paths)) => source::ShardChoice::Paths(paths),
        (None, None) => source::ShardChoice::Spec,
    };
    let source = source::plan(&pipeline, choice)?;
    let spec = &pipeline.spec;

    let mut issues = Vec::new();
    let mut stages = Vec::new();
    let mut schema: Schema = source.canonical.as_ref().clone();
    for (i, stage_spec) in spec.stages.iter().enumerate() {
        let at = format!("stages[{i}]");
        let stage = match stage_spec.build(pipeline.base_dir()) {
            Ok(s) => s,
            Err(e) => {
                issues.push(pipeline.issue(&at, e.to_string()));
                continue;
            }
        };
        match stage.output_fields(&schema) {
            Ok(fields) => {
                let mut all: Vec<Field> =
                    schema.fields().iter().map(|f| f.as_ref().clone()).collect();
                for field in fields {
                    if schema.field_with_name(field.name()).is_ok() {
                        issues.push(pipeline.issue(
                            &at,
                            format!(
                                "stage `{}` would add column `{}`, which already exists; a stage \
                                 never rewrites columns it does not own",
                                stage.name(),
                                field.name()
                            ),
                        ));
                    }
                    all.push(field);
                }
                schema = Schema::new(all);
            }
            Err(e) => issues.push(pipeline.issue(&at, e.to_string())),
        }
        if let Some(multiple) = stage_spec.kind.config().batch_multiple() {
            let batch = spec.runtime.batch_size;
            if !batch.is_multiple_of(multiple) {
                issues.push(pipeline.issue(
                    "runtime.batch_size",
                    format!(
                        "batch_size {batch} is not a multiple of {multiple}, which stage `{}` \
                         needs; use e.g. {}",
                        stage.name(),
                        batch.div_ceil(multiple) * multiple
                    ),
                ));
            }
        }
        stages.push(StageSlot {
            workers: stage_spec.common.workers.unwrap_or(1),
            queue_depth: stage_spec
                .common
                .queue_depth
                .unwrap_or(spec.runtime.queue_depth),
            stage,
        });
    }
    let output_schema = Arc::new(schema);
    let mut kept: Vec<Field> = Vec::new();
    for field in output_schema.fields() {
        if !spec.sink.drop_columns.contains(field.name()) {
            kept.push(field.as_ref().clone());
        }
    }
    let sink_columns = [
        ("sink.drop_columns", &spec.sink.drop_columns[..], "to drop"),
        (
            "sink.uncompressed_columns",
            spec.sink
                .uncompressed_columns
                .as_deref()
                .unwrap_or_default(),
            "to leave uncompressed",
        ),
    ];
    for (field, names, purpose) in sink_columns {
        for (i, col) in names.iter().enumerate() {
            if output_schema.field_with_name(col).is_err() {
                issues.push(pipeline.issue(
                    &format!("{field}[{i}]"),
                    format!(
                        "no column `{col}` {purpose}; the output has: {}",
                        column_names(&output_schema)
                    ),
                ));
            }
        }
    }
    if !issues.is_empty() {
        return Err(Error::Spec(SpecIssues(issues)));
    }
    let out_dir = overrides
        .out_dir
        .clone()
        .unwrap_or_else(|| pipeline.resolve(&spec.sink.path));
    let inputs: Vec<(String, PathBuf)> = source
        .shards
        .iter()
        .map(|s| (s.stem.clone(), s.path.clone()))
        .collect();
    crate::sink::safety::check_outputs(&out_dir, &inputs, &source.search_roots)?;
    if crate::storage::is_remote(&out_dir) {
        let prefix = crate::storage::ObjectUri::of_path(&out_dir)?;
        source.storage.check_listable(&prefix)?;
    }
    // Model files are part of what a shard's output depends on.
    let digests: Vec<String> = stages
        .iter()
        .filter_map(|slot| slot.stage.content_digest())
        .collect();
    let pipeline_hash = pipeline_hash(spec, &digests);
    if let (Some(list), Some(file)) = (&list, &overrides.shards) {
        list.check_hash(file, &pipeline_hash)?;
    }
    Ok(Plan {
        listed_part: list.as_ref().map(|l| l.part),
        source,
        stages,
        sink_schema: Arc::new(Schema::new(kept)),
        output_schema,
        out_dir,
        pipeline_hash,
        pipeline,
    })
}

/// A schema's column names, comma-separated (for messages).
pub fn column_names(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Hash of the output-relevant part of the spec.
pub fn pipeline_hash(spec: &spec::PipelineSpec, content_digests: &[String]) -> String {
    let mut value = serde_json::to_value(spec).unwrap_or_default();
    if let Some(top) = value.as_object_mut() {
        top.remove("name");
        // Queue depth changes timing, never values; batch size can (batch-level
        // stages such as uncertainty groups), so it stays in the hash.
        if let Some(rt) = top.get_mut("runtime").and_then(|r| r.as_object_mut()) {
            rt.remove("queue_depth");
        }
        if let Some(src) = top.get_mut("source").and_then(|s| s.as_object_mut()) {
            src.remove("paths");
        }
        if let Some(sink) = top.get_mut("sink").and_then(|s| s.as_object_mut()) {
            sink.remove("path");
            sink.remove("row_group_bytes");
            // What runs after the shards are written does not change them.
            sink.remove("train");
            sink.remove("train_mode");
            sink.remove("train_queue_depth");
        }
        if let Some(stages) = top.get_mut("stages").and_then(|s| s.as_array_mut()) {
            for stage in stages.iter_mut().filter_map(|s| s.as_object_mut()) {
                stage.remove("workers");
                stage.remove("queue_depth");
            }
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(env!("CARGO_PKG_VERSION").as_bytes());
    hasher.update(value.to_string().as_bytes());
    for digest in content_digests {
        hasher.update(digest.as_bytes());
    }
    format!("{:x}", hasher.finalize())
}

/// The plan as data (`trustflow plan`): what a scheduler needs to split a run into
/// parts that agree with the engine on the shard set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanSummary {
    pub pipeline: String,
    pub pipeline_file: PathBuf,
    pub pipeline_hash: String,
    pub out_dir: PathBuf,
    /// The shards in index order (`--part I/N` runs those with index % N == I).
    pub shards: Vec<PlannedShard>,
    /// Shards found but unreadable at planning (skipped with `on_unreadable:
    /// quarantine`).
    pub unreadable: Vec<PathBuf>,
    /// Threads a run keeps busy: every stage's workers, the reader and the sink.
    pub threads: usize,
    /// Whether a stage asks for a GPU (`execution_provider: cuda`).
    pub uses_cuda: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedShard {
    pub index: usize,
    pub input: PathBuf,
    pub stem: String,
    pub rows: u64,
}

impl Plan {
    pub fn summary(&self) -> PlanSummary {
        PlanSummary {
            pipeline: self.pipeline.name(),
            pipeline_file: self.pipeline.file.clone(),
            pipeline_hash: self.pipeline_hash.clone(),
            out_dir: self.out_dir.clone(),
            shards: self
                .source
                .shards
                .iter()
                .map(|s| PlannedShard {
                    index: s.index,
                    input: s.path.clone(),
                    stem: s.stem.clone(),
                    rows: s.file_rows,
                })
                .collect(),
            unreadable: self
                .source
                .unreadable
                .iter()
                .map(|(p, _)| p.clone())
                .collect(),
            threads: self.stages.iter().map(|s| s.workers).sum::<usize>() + 2,
            uses_cuda: self.pipeline.spec.stages.iter().any(|s| s.kind.uses_cuda()),
        }
    }

    /// A human-readable description of the plan (what `validate` prints).
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "pipeline `{}` ({})",
            self.pipeline.name(),
            self.pipeline.file.display()
        );
        let total_rows: u64 = self.source.shards.iter().map(|s| s.file_rows).sum();
        let _ = writeln!(
            s,
            "source: {} shard(s), {} rows before filter{}",
            self.source.shards.len(),
            total_rows,
            self.source
                .filter
                .as_ref()
                .map(|f| format!(", filter: {f}"))
                .unwrap_or_default()
        );
        if let Some(first) = self.source.shards.first() {
            for (logical, physical) in &first.mapping.columns {
                let _ = writeln!(s, "  {logical:<8} <- {physical}");
            }
            if !first.mapping.kept.is_empty() {
                let kept: Vec<&str> = first
                    .mapping
                    .kept
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect();
                let _ = writeln!(s, "  kept as is: {}", kept.join(", "));
            }
            if let Some(image) = first.mapping.image {
                let _ = writeln!(s, "  image layout: {image:?}");
            }
        }
        let _ = writeln!(
            s,
            "runtime: batch_size {}, queue depth {}",
            self.source.batch_size, self.pipeline.spec.runtime.queue_depth
        );
        for (i, slot) in self.stages.iter().enumerate() {
            let _ = writeln!(
                s,
                "stage {}: {} ({} worker(s), input queue {} batches)",
                i + 1,
                slot.stage.name(),
                slot.workers,
                slot.queue_depth
            );
        }
        let _ = writeln!(s, "sink: {}", self.out_dir.display());
        let io = self.source.storage.stats();
        if io.requests > 0 {
            // Planning reads listings and footers only: every GET is a ranged one.
            let _ = writeln!(
                s,
                "object store: {} request(s) while planning: {} listing(s), {} GET(s) of \
                 which {} ranged (footers), {} retried failure(s)",
                io.requests, io.lists, io.gets, io.ranged_gets, io.retried_failures
            );
        }
        let _ = writeln!(s, "output schema:");
        for f in self.sink_schema.fields() {
            let _ = writeln!(
                s,
                "  {:<16} {}{}",
                f.name(),
                f.data_type(),
                if f.is_nullable() { "" } else { " not null" }
            );
        }
        // Each shard's quarantine holds its own columns as stored; the first's stand
        // for all here.
        if let Some(first) = self.source.shards.first() {
            let _ = writeln!(
                s,
                "quarantine schema (rows as they came, with the reason; of {}):",
                first.path.display()
            );
            for f in first.quarantine_schema().fields() {
                let _ = writeln!(s, "  {:<16} {}", f.name(), f.data_type());
            }
        }
        let _ = write!(s, "pipeline hash: {}", self.pipeline_hash);
        s
    }
}
