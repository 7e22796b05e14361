//! Parquet shards -> canonical Arrow batches. Planning opens every shard's footer and
//! resolves its column mapping (so bad names, types or footers stop the run before any
//! work); reading streams one shard at a time through DataFusion, in file order.

pub mod mapping;
pub mod shards;

use std::path::PathBuf;

use arrow::datatypes::SchemaRef;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use arrow::record_batch::RecordBatch;
use futures::StreamExt;

use crate::columns;
pub use crate::digest::Fingerprint;
use crate::error::{Error, Result, SpecIssues};
use crate::runtime::{BatchSource, ShardReader};
use crate::spec::{LoadedPipeline, NullLabels, OnUnreadable, SourceSpec, SpecOrigin};
pub use mapping::{Converter, Mapping, SOURCE_STAGE};

/// One input shard, as planned.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    pub index: usize,
    pub path: PathBuf,
    pub stem: String,
    pub fingerprint: Fingerprint,
    /// Rows in the file (before any filter), from its footer.
    pub file_rows: u64,
    /// Rows per row group, from the footer (to say where a read failed).
    pub row_group_rows: Vec<u64>,
    pub mapping: Mapping,
}

/// Everything the reader needs, resolved before any data is read.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    pub shards: Vec<ShardPlan>,
    pub canonical: SchemaRef,
    pub quarantine: SchemaRef,
    pub filter: Option<String>,
    pub batch_size: usize,
    pub image_root: Option<PathBuf>,
    pub max_file_bytes: u64,
    pub null_labels: NullLabels,
    pub on_unreadable: OnUnreadable,
    /// Shards found but skipped at planning because they cannot be read (with
    /// `on_unreadable: quarantine`): (path, reason).
    pub unreadable: Vec<(PathBuf, String)>,
    /// Folders the inputs are searched in: those named in the paths, and the fixed
    /// part of each glob (an output folder may not lie inside one).
    pub search_roots: Vec<PathBuf>,
}

/// The folder `pattern` searches, if it searches one: a folder named as an input, or
/// the fixed leading part of a glob that can descend into subfolders (`**`, or a glob
/// character before the last component). An existing file, or a glob within one
/// folder, searches nothing beyond the shards' own folders, which are checked apart.
fn search_root(base: &std::path::Path, pattern: &str) -> Option<PathBuf> {
    let full = base.join(pattern);
    if full.is_dir() {
        return Some(full);
    }
    let parent_has_glob = std::path::Path::new(pattern)
        .parent()
        .is_some_and(|p| p.to_string_lossy().contains(['*', '?', '[']));
    if full.exists() || !parent_has_glob {
        return None;
    }
    // The base folder's own name is literal, whatever characters it has.
    let mut root = if std::path::Path::new(pattern).is_absolute() {
        PathBuf::new()
    } else {
        base.to_path_buf()
    };
    for part in std::path::Path::new(pattern).components() {
        if part.as_os_str().to_string_lossy().contains(['*', '?', '[']) {
            break;
        }
        root.push(part);
    }
    Some(root)
}

/// Resolve shards and their mappings. `paths_override` replaces `source.paths`
/// (resolved against the current directory instead of the pipeline file).
pub fn plan(p: &LoadedPipeline, paths_override: Option<&[String]>) -> Result<SourcePlan> {
    plan_section(
        p,
        &p.spec.source,
        "source",
        p.spec.runtime.batch_size,
        paths_override,
    )
}

/// [`plan`] for any section of a spec file that has a [`SourceSpec`]'s shape (the
/// trainer's `source`, `target` and `eval`); errors are located at `section.*`.
pub fn plan_section(
    p: &dyn SpecOrigin,
    spec: &SourceSpec,
    section: &str,
    batch_size: usize,
    paths_override: Option<&[String]>,
) -> Result<SourcePlan> {
    // mapping::resolve names fields as `source.*`
    let field_in_section = |field: &str| match field.strip_prefix("source") {
        Some(rest) => format!("{section}{rest}"),
        None => field.to_string(),
    };
    let (base, patterns) = match paths_override {
        Some(paths) => (std::path::Path::new("."), paths),
        None => (p.base_dir(), spec.paths.as_slice()),
    };
    let mut files = Vec::new();
    let mut issues = Vec::new();
    for (i, pattern) in patterns.iter().enumerate() {
        match shards::discover(base, std::slice::from_ref(pattern)) {
            Ok(found) => files.extend(found),
            // Patterns from the file are located in it; command-line ones are not.
            Err(e) if paths_override.is_none() => {
                issues.push(p.issue_at(&format!("{section}.paths[{i}]"), e.to_string()))
            }
            Err(e) => return Err(e),
        }
    }
    if !issues.is_empty() {
        return Err(Error::Spec(SpecIssues(issues)));
    }
    files.sort();
    files.dedup();
    shards::check_unique_stems(&files)?;

    let mut planned: Vec<ShardPlan> = Vec::with_capacity(files.len());
    let mut unreadable: Vec<(PathBuf, String)> = Vec::new();
    for path in files {
        let opened = std::fs::File::open(&path)
            .map_err(|e| format!("cannot open: {e}"))
            .and_then(|file| {
                ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| format!("not a readable Parquet file: {e}"))
            });
        let builder = match opened {
            Ok(builder) => builder,
            Err(reason) if spec.on_unreadable == OnUnreadable::Quarantine => {
                tracing::warn!("{}: skipped, {reason}", path.display());
                unreadable.push((path, reason));
                continue;
            }
            Err(reason) => return Err(Error::input(&path, reason)),
        };
        let index = planned.len();
        let file_rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
        let row_group_rows: Vec<u64> = builder
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows().max(0) as u64)
            .collect();
        let mapping = mapping::resolve(spec, builder.schema()).map_err(|issues| {
            Error::Spec(SpecIssues(
                issues
                    .into_iter()
                    .map(|(field, m)| {
                        p.issue_at(
                            &field_in_section(&field),
                            format!("{}: {m}", path.display()),
                        )
                    })
                    .collect(),
            ))
        })?;
        if let Some(first) = planned.first()
            && first.mapping.logical_columns() != mapping.logical_columns()
        {
            return Err(Error::input(
                &path,
                format!(
                    "provides columns {:?} but {} provides {:?}; all shards of a run must map \
                     the same columns (set source.columns explicitly)",
                    mapping.logical_columns(),
                    first.path.display(),
                    first.mapping.logical_columns()
                ),
            ));
        }
        // The first shard's types are the output's: another type would be cast
        // silently (or fail mid-run).
        if let Some(first) = planned.first() {
            for (kept, theirs) in mapping.kept.iter().zip(&first.mapping.kept) {
                if kept.data_type() != theirs.data_type() {
                    return Err(Error::input(
                        &path,
                        format!(
                            "keep_columns: column `{}` has type {} here but {} in {}; every \
                             shard of a run must store a kept column with one type",
                            kept.name(),
                            kept.data_type(),
                            theirs.data_type(),
                            first.path.display()
                        ),
                    ));
                }
            }
        }
        planned.push(ShardPlan {
            index,
            stem: shards::stem_of(&path),
            fingerprint: Fingerprint::of(&path)?,
            file_rows,
            row_group_rows,
            mapping,
            path,
        });
    }
    let Some(first) = planned.first() else {
        return Err(match unreadable.first() {
            Some((path, reason)) => Error::input(
                path,
                format!(
                    "{reason}; no input shard of the run can be read ({} tried)",
                    unreadable.len()
                ),
            ),
            None => Error::Invalid("no input shards".into()),
        });
    };
    let canonical = first.mapping.canonical_schema();
    if let Some(filter) = &spec.filter {
        check_filter(&first.path, filter).map_err(|m| {
            Error::Spec(SpecIssues(vec![p.issue_at(
                &format!("{section}.filter"),
                format!("{}: {m}", first.path.display()),
            )]))
        })?;
    }
    Ok(SourcePlan {
        quarantine: columns::quarantine_schema(&canonical),
        canonical,
        shards: planned,
        filter: spec.filter.clone(),
        batch_size,
        image_root: spec.image_root.as_deref().map(|r| p.resolve(r)),
        max_file_bytes: spec.max_image_file_bytes,
        null_labels: spec.null_labels,
        on_unreadable: spec.on_unreadable,
        unreadable,
        search_roots: patterns
            .iter()
            .filter_map(|p| search_root(base, p))
            .collect(),
    })
}

fn session(batch_size: usize) -> SessionContext {
    // One partition and no repartitioning: rows come out in file order, which makes
    // outputs reproducible and resumable.
    let config = SessionConfig::new()
        .with_target_partitions(1)
        .with_repartition_file_scans(false)
        .with_batch_size(batch_size.max(1));
    SessionContext::new_with_config(config)
}

fn extension_of(path: &std::path::Path) -> String {
    path.extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default()
}

async fn dataframe(
    ctx: &SessionContext,
    shard: &std::path::Path,
    filter: Option<&str>,
) -> datafusion::error::Result<datafusion::prelude::DataFrame> {
    let ext = extension_of(shard);
    let options = ParquetReadOptions::default().file_extension(&ext);
    let df = ctx
        .read_parquet(shard.to_string_lossy().as_ref(), options)
        .await?;
    match filter {
        Some(sql) => {
            let expr = df.parse_sql_expr(sql)?;
            df.filter(expr)
        }
        None => Ok(df),
    }
}

fn check_filter(shard: &std::path::Path, filter: &str) -> std::result::Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let ctx = session(1);
        dataframe(&ctx, shard, Some(filter))
            .await
            .map(|_| ())
            .map_err(|e| format!("invalid filter: {}", tidy_datafusion_error(&e.to_string())))
    })
}

/// DataFusion's messages span lines and name its internal `?table?`.
fn tidy_datafusion_error(message: &str) -> String {
    let mut m = message.replace('\n', " ").replace("\"?table?\".", "");
    if let Some(start) = m.find("ParserError(\"")
        && m.ends_with("\")")
    {
        let inner = m[start + "ParserError(\"".len()..m.len() - 2].to_string();
        m.replace_range(start.., &inner);
    }
    m
}

impl SourcePlan {
    /// Open a stream of the shard's mapped columns (filtered), in file order.
    pub async fn open(&self, shard: &ShardPlan) -> Result<SendableRecordBatchStream> {
        vanished_check(&shard.path)?;
        let ctx = session(self.batch_size);
        let err = |e: datafusion::error::DataFusionError| Error::input(&shard.path, e.to_string());
        let df = dataframe(&ctx, &shard.path, self.filter.as_deref())
            .await
            .map_err(err)?;
        let df = df
            .select_columns(&shard.mapping.physical_columns())
            .map_err(err)?;
        df.execute_stream().await.map_err(err)
    }

    /// Open a stream of some of the shard's physical columns (filtered), in file order:
    /// for scans that must not read the images.
    pub async fn open_projected(
        &self,
        shard: &ShardPlan,
        columns: &[&str],
    ) -> Result<SendableRecordBatchStream> {
        vanished_check(&shard.path)?;
        let ctx = session(self.batch_size);
        let err = |e: datafusion::error::DataFusionError| Error::input(&shard.path, e.to_string());
        let df = dataframe(&ctx, &shard.path, self.filter.as_deref())
            .await
            .map_err(err)?;
        df.select_columns(columns)
            .map_err(err)?
            .execute_stream()
            .await
            .map_err(err)
    }

    pub fn converter(&self, shard: &ShardPlan) -> Result<Converter> {
        let root = match &self.image_root {
            Some(root) => root.clone(),
            None => shard
                .path
                .parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        let root = if root.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            root
        };
        let image_root = root.canonicalize().map_err(|e| Error::io(&root, e))?;
        Ok(Converter {
            mapping: shard.mapping.clone(),
            canonical: self.canonical.clone(),
            quarantine: self.quarantine.clone(),
            stem: shard.stem.clone(),
            shard: shard.path.clone(),
            image_root,
            max_file_bytes: self.max_file_bytes,
            null_labels: self.null_labels,
        })
    }
}

/// One Parquet shard being read for the runtime: DataFusion's stream driven on a
/// current-thread tokio runtime of its own, and the shard's column mapping.
struct ParquetShardReader {
    rt: tokio::runtime::Runtime,
    stream: SendableRecordBatchStream,
    converter: Converter,
    path: PathBuf,
    /// Rows read so far, to say where a read failed.
    rows: u64,
    /// Rows per row group when rows read map onto row groups (no filter): a failure
    /// then names its row group.
    row_groups: Option<Vec<u64>>,
}

impl ParquetShardReader {
    fn where_failed(&self) -> String {
        let mut start = 0u64;
        for (group, rows) in self.row_groups.iter().flatten().enumerate() {
            if self.rows < start + rows {
                return format!("in row group {group} (rows {start}..{})", start + rows);
            }
            start += rows;
        }
        format!("after {} row(s)", self.rows)
    }
}

impl ShardReader for ParquetShardReader {
    fn next_rows(&mut self) -> Option<Result<RecordBatch>> {
        let next = self.rt.block_on(self.stream.next())?;
        Some(match next {
            Ok(batch) => {
                self.rows += batch.num_rows() as u64;
                Ok(batch)
            }
            Err(e) => Err(Error::Unreadable {
                path: self.path.clone(),
                reason: format!(
                    "{}: {}",
                    self.where_failed(),
                    tidy_datafusion_error(&e.to_string())
                ),
            }),
        })
    }

    fn convert(
        &mut self,
        rows: &RecordBatch,
        first_row: u64,
    ) -> Result<(RecordBatch, Option<RecordBatch>)> {
        self.converter.convert(rows, first_row)
    }
}

impl BatchSource for SourcePlan {
    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn quarantine_schema(&self) -> SchemaRef {
        self.quarantine.clone()
    }

    fn shard_label(&self, index: usize) -> String {
        self.shards.get(index).map_or_else(
            || format!("shard #{index}"),
            |s| s.path.display().to_string(),
        )
    }

    fn open_shard(&self, index: usize) -> Result<Box<dyn ShardReader + '_>> {
        let shard = self
            .shards
            .get(index)
            .ok_or_else(|| Error::Internal(format!("shard #{index} is not in the plan")))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the reader's runtime: {e}")))?;
        let converter = self.converter(shard)?;
        let stream = rt
            .block_on(self.open(shard))
            .map_err(|e| Error::Unreadable {
                path: shard.path.clone(),
                reason: match e {
                    Error::Input { message, .. } => message,
                    other => other.to_string(),
                },
            })?;
        Ok(Box::new(ParquetShardReader {
            rt,
            stream,
            converter,
            path: shard.path.clone(),
            rows: 0,
            row_groups: self.filter.is_none().then(|| shard.row_group_rows.clone()),
        }))
    }

    fn skip_unreadable(&self) -> bool {
        self.on_unreadable == OnUnreadable::Quarantine
    }
}

/// A shard deleted after planning would otherwise surface as DataFusion's "cannot infer
/// schema".
fn vanished_check(path: &std::path::Path) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(Error::input(
            path,
            "the file no longer exists (it was there when the run was planned); restore it \
             or rerun to plan without it",
        ))
    }
}
