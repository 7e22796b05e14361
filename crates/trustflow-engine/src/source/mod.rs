//! Parquet shards -> canonical Arrow batches. Planning opens every shard's footer and
//! resolves its column mapping (so bad names, types or footers stop the run before any
//! work); reading streams one shard at a time through DataFusion, in file order.

pub mod list;
pub mod mapping;
mod read_ahead;
pub mod shards;

pub use list::ShardList;
pub use read_ahead::ReadAhead;

use crate::runtime::THREAD_STACK_BYTES;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
use crate::storage::{self, ObjectUri, Storage};
pub use mapping::{Converter, Mapping, SOURCE_STAGE};

/// One input shard, as planned.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    /// Its place in this plan's shards (how the runtime names it).
    pub index: usize,
    /// Its place in the whole job's plan: `index`, except for a part given its shards
    /// by a driver (`--shards`), where it is the driver's index.
    pub index_in_job: usize,
    pub path: PathBuf,
    /// Where its outputs go, relative to the output folder, without an extension
    /// (`part-0`, or `year=2024/part-0` for a shard found in a subfolder).
    pub stem: String,
    pub fingerprint: Fingerprint,
    /// Rows in the file (before any filter), from its footer.
    pub file_rows: u64,
    /// Rows per row group, from the footer (to say where a read failed).
    pub row_group_rows: Vec<u64>,
    /// The file's own Arrow schema, from the footer.
    pub file_schema: SchemaRef,
    pub mapping: Mapping,
}

impl ShardPlan {
    /// The schema of this shard's quarantine shard: its own columns as stored, then
    /// `error_stage` and `error`.
    pub fn quarantine_schema(&self) -> SchemaRef {
        columns::quarantine_schema(&self.file_schema)
    }
}

/// Everything the reader needs, resolved before any data is read.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    pub shards: Vec<ShardPlan>,
    pub canonical: SchemaRef,
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
    /// The object stores of `s3://` shards.
    pub storage: Arc<Storage>,
    /// Hash each local input whole with the read that processes it
    /// (`resume.verify: full`).
    pub hash_inputs: bool,
    /// Upcoming `s3://` shards being fetched (started by the runtime's
    /// [`BatchSource::read_ahead`]).
    pub read_ahead: ReadAhead,
}

/// What planning reads of a shard: its footer and identity.
struct Footer {
    schema: SchemaRef,
    file_rows: u64,
    row_group_rows: Vec<u64>,
    fingerprint: Fingerprint,
}

impl Footer {
    fn of(metadata: &parquet::file::metadata::ParquetMetaData, schema: &SchemaRef) -> Self {
        Footer {
            schema: schema.clone(),
            file_rows: metadata.file_metadata().num_rows().max(0) as u64,
            row_group_rows: metadata
                .row_groups()
                .iter()
                .map(|g| g.num_rows().max(0) as u64)
                .collect(),
            fingerprint: Fingerprint::default(),
        }
    }
}

/// Read a shard's footer: `Ok(Err(reason))` when the file is there but is not
/// readable Parquet, or is a key the store cannot address (the shard is skipped or
/// fails the run, per `on_unreadable`), `Err` when the store or disk cannot be reached.
async fn read_footer(
    storage: &Storage,
    path: &Path,
) -> Result<std::result::Result<Footer, String>> {
    if storage::is_remote(path) {
        return remote_footer(storage, &ObjectUri::of_path(path)?).await;
    }
    let opened = std::fs::File::open(path)
        .map_err(|e| format!("cannot open: {e}"))
        .and_then(|file| {
            ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| format!("not a readable Parquet file: {e}"))
        });
    Ok(match opened {
        Ok(builder) => Ok(Footer {
            fingerprint: Fingerprint::of(path)?,
            ..Footer::of(builder.metadata(), builder.schema())
        }),
        Err(reason) => Err(reason),
    })
}

/// Every shard's footer, in the order of `paths`. Remote footers are read
/// `storage.footer_reads_in_flight` at a time: a store's latency is paid once per
/// batch of requests, not once per shard.
fn read_footers(
    storage: &Storage,
    paths: &[PathBuf],
) -> Result<Vec<std::result::Result<Footer, String>>> {
    let in_flight = match paths.iter().any(|p| storage::is_remote(p)) {
        true => storage.spec().footer_reads_in_flight.max(1),
        false => 1,
    };
    storage
        .block_on(
            futures::stream::iter(paths.iter().map(|path| read_footer(storage, path)))
                .buffered(in_flight)
                .collect::<Vec<_>>(),
        )?
        .into_iter()
        .collect()
}

/// The footer of a Parquet object and its fingerprint, in one GET of the object's last
/// 64 KiB (the answer's headers give its size, ETag and modification time; a second
/// GET only when the metadata is larger): planning never downloads the data.
async fn remote_footer(
    storage: &Storage,
    uri: &ObjectUri,
) -> Result<std::result::Result<Footer, String>> {
    use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
    const TAIL: u64 = 64 << 10;
    let path = match uri.object_path() {
        Ok(path) => path,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let store = storage.store(uri)?;
    let read_error = |e| storage.error(uri, "cannot read the footer", e);
    let options = GetOptions {
        range: Some(GetRange::Suffix(TAIL)),
        ..GetOptions::default()
    };
    let got = store.get_opts(&path, options).await.map_err(read_error)?;
    let fingerprint = Fingerprint::of_object(&got.meta);
    let size = got.meta.size;
    let tail = got.bytes().await.map_err(read_error)?;
    let n = tail.len();
    if size < 12 || n < 12 {
        return Ok(Err(format!(
            "not a readable Parquet file: {size} bytes is too small"
        )));
    }
    if &tail[n - 4..] != b"PAR1" {
        return Ok(Err(
            "not a readable Parquet file: no PAR1 magic at the end".into()
        ));
    }
    let footer_len = u64::from(u32::from_le_bytes([
        tail[n - 8],
        tail[n - 7],
        tail[n - 6],
        tail[n - 5],
    ]));
    if footer_len + 8 > size {
        return Ok(Err(format!(
            "not a readable Parquet file: footer of {footer_len} bytes in a file of {size}"
        )));
    }
    let metadata_bytes = match (footer_len + 8) as usize <= n {
        true => tail.slice(n - 8 - footer_len as usize..n - 8),
        false => store
            .get_range(&path, size - 8 - footer_len..size - 8)
            .await
            .map_err(read_error)?,
    };
    let decoded = parquet::file::metadata::ParquetMetaDataReader::decode_metadata(&metadata_bytes)
        .and_then(|metadata| {
            let file = metadata.file_metadata();
            parquet::arrow::parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata())
                .map(|schema| Footer::of(&metadata, &Arc::new(schema)))
        });
    Ok(decoded
        .map(|footer| Footer {
            fingerprint,
            ..footer
        })
        .map_err(|e| format!("not a readable Parquet file: {e}")))
}

/// The folder `pattern` searches, if it searches one: a folder named as an input, or
/// the fixed leading part of a glob that can descend into subfolders (`**`, or a glob
/// character before the last component). An existing file, or a glob within one
/// folder, searches nothing beyond the shards' own folders, which are checked apart.
fn search_root(base: &std::path::Path, pattern: &str) -> Option<PathBuf> {
    if storage::is_remote(Path::new(pattern)) {
        // A key prefix that is not a shard is listed like a folder; a glob searches
        // from its fixed leading part.
        return match shards::has_glob_chars(pattern) || !pattern.ends_with(".parquet") {
            true => Some(PathBuf::from(shards::literal_prefix(pattern))),
            false => None,
        };
    }
    let full = base.join(pattern);
    if full.is_dir() {
        return Some(full);
    }
    let parent_has_glob = std::path::Path::new(pattern)
        .parent()
        .is_some_and(|p| shards::has_glob_chars(&p.to_string_lossy()));
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
        if shards::has_glob_chars(&part.as_os_str().to_string_lossy()) {
            break;
        }
        root.push(part);
    }
    Some(root)
}

/// Which shards a run reads.
#[derive(Debug, Clone, Copy, Default)]
pub enum ShardChoice<'a> {
    /// `source.paths` of the pipeline file.
    #[default]
    Spec,
    /// Paths from the command line (`--input`), resolved against the current directory.
    Paths(&'a [String]),
    /// Exactly these shards, as a driver planned them (`--shards FILE`): nothing is
    /// listed, and only their footers are read.
    Listed(&'a ShardList),
}

/// Resolve shards and their mappings.
pub fn plan(p: &LoadedPipeline, choice: ShardChoice<'_>) -> Result<SourcePlan> {
    let mut plan = plan_choice(p, choice)?;
    // Under `resume.verify: full` a local shard is hashed by the read that processes it.
    plan.hash_inputs = p.spec.resume.verify == crate::spec::ResumeVerify::Full;
    Ok(plan)
}

fn plan_choice(p: &LoadedPipeline, choice: ShardChoice<'_>) -> Result<SourcePlan> {
    let storage = Storage::new(p.spec.storage.clone());
    let spec = &p.spec.source;
    let batch_size = p.spec.runtime.batch_size;
    match choice {
        ShardChoice::Spec => plan_section(p, spec, "source", batch_size, None, storage),
        ShardChoice::Paths(paths) => {
            plan_section(p, spec, "source", batch_size, Some(paths), storage)
        }
        ShardChoice::Listed(list) => {
            let found = list.found();
            shards::check_unique_names(&found)?;
            let mut plan = plan_found(p, spec, "source", batch_size, found, storage)?;
            // Unreadable listed shards are not in `plan.shards`: match by path.
            let listed: std::collections::HashMap<&Path, usize> = list
                .shards
                .iter()
                .map(|s| (s.input.as_path(), s.index))
                .collect();
            for shard in &mut plan.shards {
                shard.index_in_job = listed
                    .get(shard.path.as_path())
                    .copied()
                    .unwrap_or(shard.index);
            }
            Ok(plan)
        }
    }
}

/// [`plan`] for any section of a spec file that has a [`SourceSpec`]'s shape (the
/// trainer's `source`, `target` and `eval`); errors are located at `section.*`.
/// `paths_override` replaces the section's paths (resolved against the current
/// directory instead of the pipeline file).
pub fn plan_section(
    p: &dyn SpecOrigin,
    spec: &SourceSpec,
    section: &str,
    batch_size: usize,
    paths_override: Option<&[String]>,
    storage: Arc<Storage>,
) -> Result<SourcePlan> {
    let (base, patterns) = match paths_override {
        Some(paths) => (std::path::Path::new("."), paths),
        None => (p.base_dir(), spec.paths.as_slice()),
    };
    let found = discover_section(
        p,
        section,
        &storage,
        base,
        patterns,
        paths_override.is_some(),
    )?;
    let mut plan = plan_found(p, spec, section, batch_size, found, storage)?;
    plan.search_roots = patterns
        .iter()
        .filter_map(|p| search_root(base, p))
        .collect();
    Ok(plan)
}

/// Every shard `patterns` name, each pattern's problems located in the spec file
/// (command-line patterns are not in it).
fn discover_section(
    p: &dyn SpecOrigin,
    section: &str,
    storage: &Storage,
    base: &Path,
    patterns: &[String],
    from_command_line: bool,
) -> Result<Vec<shards::FoundShard>> {
    let mut found = Vec::new();
    let mut issues = Vec::new();
    for (i, pattern) in patterns.iter().enumerate() {
        match shards::find(storage, base, std::slice::from_ref(pattern)) {
            Ok(shards) => found.extend(shards),
            Err(e) if from_command_line => return Err(e),
            Err(e) => issues.push(p.issue_at(&format!("{section}.paths[{i}]"), e.to_string())),
        }
    }
    if !issues.is_empty() {
        return Err(Error::Spec(SpecIssues(issues)));
    }
    // Patterns may overlap: one file is one shard.
    let found = shards::one_per_file(found);
    shards::check_unique_names(&found)?;
    Ok(found)
}

/// Read the footers of `found` (concurrently for a store), resolve each shard's
/// mapping and check the shards agree; unreadable ones are skipped or fail the run,
/// per `on_unreadable`.
fn plan_found(
    p: &dyn SpecOrigin,
    spec: &SourceSpec,
    section: &str,
    batch_size: usize,
    found: Vec<shards::FoundShard>,
    storage: Arc<Storage>,
) -> Result<SourcePlan> {
    let paths: Vec<PathBuf> = found.iter().map(|f| f.path.clone()).collect();
    let footers = read_footers(&storage, &paths)?;
    let mut planned: Vec<ShardPlan> = Vec::with_capacity(found.len());
    let mut unreadable: Vec<(PathBuf, String)> = Vec::new();
    for (shard, footer) in found.into_iter().zip(footers) {
        let footer = match footer {
            Ok(footer) => footer,
            Err(reason) if spec.on_unreadable == OnUnreadable::Quarantine => {
                tracing::warn!("{}: skipped, {reason}", shard.path.display());
                unreadable.push((shard.path, reason));
                continue;
            }
            Err(reason) => return Err(Error::input(&shard.path, reason)),
        };
        let next = plan_shard(p, spec, section, planned.len(), shard, footer)?;
        if let Some(first) = planned.first() {
            check_agrees(first, &next)?;
        }
        planned.push(next);
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
        check_filter(&storage, &first.path, filter).map_err(|m| {
            Error::Spec(SpecIssues(vec![p.issue_at(
                &format!("{section}.filter"),
                format!("{}: {m}", first.path.display()),
            )]))
        })?;
    }
    Ok(SourcePlan {
        canonical,
        shards: planned,
        filter: spec.filter.clone(),
        batch_size,
        image_root: spec.image_root.as_deref().map(|r| p.resolve(r)),
        max_file_bytes: spec.max_image_file_bytes,
        null_labels: spec.null_labels,
        on_unreadable: spec.on_unreadable,
        unreadable,
        search_roots: Vec::new(),
        storage,
        hash_inputs: false,
        read_ahead: ReadAhead::default(),
    })
}

/// One readable shard, planned: its column mapping resolved against its own schema.
fn plan_shard(
    p: &dyn SpecOrigin,
    spec: &SourceSpec,
    section: &str,
    index: usize,
    shard: shards::FoundShard,
    footer: Footer,
) -> Result<ShardPlan> {
    let path = shard.path;
    let mapping = mapping::resolve(spec, &footer.schema).map_err(|issues| {
        Error::Spec(SpecIssues(
            issues
                .into_iter()
                .map(|(field, m)| {
                    // mapping::resolve names fields as `source.*`.
                    let field = match field.strip_prefix("source") {
                        Some(rest) => format!("{section}{rest}"),
                        None => field,
                    };
                    p.issue_at(&field, format!("{}: {m}", path.display()))
                })
                .collect(),
        ))
    })?;
    // The engine carries each row's own columns under this name.
    if footer.schema.index_of(columns::SOURCE_ROW).is_ok() {
        return Err(Error::input(
            &path,
            format!(
                "has a column named `{}`, a name trustflow reserves; rename it",
                columns::SOURCE_ROW
            ),
        ));
    }
    Ok(ShardPlan {
        index,
        index_in_job: index,
        stem: shard.name,
        fingerprint: footer.fingerprint,
        file_rows: footer.file_rows,
        row_group_rows: footer.row_group_rows,
        file_schema: footer.schema,
        mapping,
        path,
    })
}

/// Every shard of a run maps the same columns, and stores each kept column with the
/// first shard's type (another type would be cast silently, or fail mid-run).
fn check_agrees(first: &ShardPlan, shard: &ShardPlan) -> Result<()> {
    if first.mapping.logical_columns() != shard.mapping.logical_columns() {
        return Err(Error::input(
            &shard.path,
            format!(
                "provides columns {:?} but {} provides {:?}; all shards of a run must map \
                 the same columns (set source.columns explicitly)",
                shard.mapping.logical_columns(),
                first.path.display(),
                first.mapping.logical_columns()
            ),
        ));
    }
    for (kept, theirs) in shard.mapping.kept.iter().zip(&first.mapping.kept) {
        if kept.data_type() != theirs.data_type() {
            return Err(Error::input(
                &shard.path,
                format!(
                    "keep_columns: column `{}` has type {} here but {} in {}; every shard of \
                     a run must store a kept column with one type",
                    kept.name(),
                    kept.data_type(),
                    theirs.data_type(),
                    first.path.display()
                ),
            ));
        }
    }
    Ok(())
}

fn session(batch_size: usize, storage: &Storage) -> Result<SessionContext> {
    // One partition and no repartitioning: rows come out in file order, which makes
    // outputs reproducible and resumable.
    let config = SessionConfig::new()
        .with_target_partitions(1)
        .with_repartition_file_scans(false)
        .with_batch_size(batch_size.max(1));
    let ctx = SessionContext::new_with_config(config);
    storage.register_on(&ctx)?;
    Ok(ctx)
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
    let df = ctx.read_parquet(table_url(shard), options).await?;
    filtered(df, filter)
}

/// How DataFusion is to be told where `shard` is: as a URL whose path is
/// percent-encoded segment by segment (DataFusion decodes it back), so that any file
/// name or key is read as it is: spaces, non-ASCII, `%`, `#`, `?`, and `*` or `[` that
/// DataFusion would otherwise take for a glob. Other URLs (`memory:///`) pass as they are.
fn table_url(shard: &Path) -> String {
    let text = shard.to_string_lossy();
    let url = match ObjectUri::parse(&text) {
        Ok(uri) => url::Url::parse(&format!("{}{}", storage::S3_SCHEME, uri.bucket))
            .ok()
            .map(|mut url| {
                if let Ok(mut segments) = url.path_segments_mut() {
                    segments.extend(uri.key.split('/'));
                }
                url
            }),
        Err(_) if text.contains("://") => None,
        Err(_) => std::path::absolute(shard)
            .ok()
            .and_then(|path| url::Url::from_file_path(path).ok()),
    };
    match url {
        Some(url) => url
            .as_str()
            .replace('*', "%2A")
            .replace('[', "%5B")
            .replace(']', "%5D"),
        None => text.into_owned(),
    }
}

#[cfg(test)]
mod table_url_tests {
    use super::*;
    use datafusion::datasource::listing::ListingTableUrl;

    /// DataFusion reads back exactly the key or file name, whatever its characters.
    #[test]
    fn any_key_or_file_name_reaches_datafusion_as_it_is() {
        let odd = "raw/année 2024/a+b=c 100% #1 why? star*[1].parquet";
        let url =
            ListingTableUrl::parse(table_url(Path::new(&format!("s3://bucket/{odd}")))).unwrap();
        assert_eq!(url.prefix().as_ref(), odd);
        assert!(!url.is_collection());
        let local = format!("/tmp/{odd}");
        let url = ListingTableUrl::parse(table_url(Path::new(&local))).unwrap();
        assert_eq!(format!("/{}", url.prefix().as_ref()), local);
        assert_eq!(
            table_url(Path::new("memory:///shard.parquet")),
            "memory:///shard.parquet"
        );
    }
}

/// `df` with `source.filter` applied, if there is one.
fn filtered(
    df: datafusion::prelude::DataFrame,
    filter: Option<&str>,
) -> datafusion::error::Result<datafusion::prelude::DataFrame> {
    match filter {
        Some(sql) => {
            let expr = df.parse_sql_expr(sql)?;
            df.filter(expr)
        }
        None => Ok(df),
    }
}

fn check_filter(
    storage: &Storage,
    shard: &std::path::Path,
    filter: &str,
) -> std::result::Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .thread_stack_size(THREAD_STACK_BYTES)
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let ctx = session(1, storage).map_err(|e| e.to_string())?;
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
    /// Open a stream of all the shard's columns (filtered), in file order: the mapped
    /// ones become the canonical table, and every one is carried for the quarantine
    /// (`columns::SOURCE_ROW`).
    pub async fn open(&self, shard: &ShardPlan) -> Result<SendableRecordBatchStream> {
        self.stream(shard, None, None).await
    }

    /// [`SourcePlan::open`] over the shard's bytes, already read into memory.
    async fn open_bytes(
        &self,
        shard: &ShardPlan,
        bytes: bytes::Bytes,
    ) -> Result<SendableRecordBatchStream> {
        self.stream(shard, Some(bytes), None).await
    }

    /// Open a stream of some of the shard's physical columns (filtered), in file order:
    /// for scans that must not read the images.
    pub async fn open_projected(
        &self,
        shard: &ShardPlan,
        columns: &[&str],
    ) -> Result<SendableRecordBatchStream> {
        self.stream(shard, None, Some(columns)).await
    }

    /// The one way a shard is read: from its path (checked to be still there) or from
    /// its `bytes` already in memory (an in-memory store registered on the session),
    /// with `source.filter`, all columns or `columns`, in file order.
    async fn stream(
        &self,
        shard: &ShardPlan,
        bytes: Option<bytes::Bytes>,
        columns: Option<&[&str]>,
    ) -> Result<SendableRecordBatchStream> {
        let ctx = session(self.batch_size, &self.storage)?;
        let err = |e: datafusion::error::DataFusionError| Error::input(&shard.path, e.to_string());
        let location = match bytes {
            None => {
                vanished_check(&self.storage, &shard.path).await?;
                shard.path.clone()
            }
            Some(bytes) => {
                use object_store::ObjectStoreExt;
                let store = Arc::new(object_store::memory::InMemory::new());
                let name = format!("shard{}", extension_of(&shard.path));
                store
                    .put(&object_store::path::Path::from(name.as_str()), bytes.into())
                    .await
                    .map_err(|e| Error::input(&shard.path, e.to_string()))?;
                let url =
                    url::Url::parse("memory://").map_err(|e| Error::Internal(e.to_string()))?;
                ctx.register_object_store(&url, store);
                PathBuf::from(format!("memory:///{name}"))
            }
        };
        let mut df = dataframe(&ctx, &location, self.filter.as_deref())
            .await
            .map_err(err)?;
        if let Some(columns) = columns {
            df = df.select_columns(columns).map_err(err)?;
        }
        df.execute_stream().await.map_err(err)
    }

    /// The shard's fingerprint with a SHA-256 of its whole content (`resume.verify:
    /// full`), streamed from disk or from the store.
    pub fn full_fingerprint(&self, shard: &ShardPlan) -> Result<Fingerprint> {
        if !storage::is_remote(&shard.path) {
            return Fingerprint::of_full(&shard.path);
        }
        use futures::StreamExt;
        use object_store::ObjectStoreExt;
        use sha2::{Digest, Sha256};
        let uri = ObjectUri::of_path(&shard.path)?;
        let storage = &self.storage;
        let store = storage.store(&uri)?;
        storage.block_on(async {
            let read_error = |e| storage.error(&uri, "cannot read", e);
            let got = store.get(&uri.object_path()?).await.map_err(read_error)?;
            let mut print = Fingerprint::of_object(&got.meta);
            let mut hasher = Sha256::new();
            let mut chunks = got.into_stream();
            while let Some(chunk) = chunks.next().await {
                hasher.update(chunk.map_err(read_error)?);
            }
            print.content_sha256 = Some(format!("{:x}", hasher.finalize()));
            Ok(print)
        })?
    }

    pub fn converter(&self, shard: &ShardPlan) -> Result<Converter> {
        let root = match &self.image_root {
            Some(root) => Some(root.clone()),
            None if storage::is_remote(&shard.path) => None,
            None => Some(
                shard
                    .path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), |p| p.to_path_buf()),
            ),
        };
        let image_root = root
            .map(|root| root.canonicalize().map_err(|e| Error::io(&root, e)))
            .transpose()?;
        Ok(Converter {
            mapping: shard.mapping.clone(),
            canonical: self.canonical.clone(),
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
    /// How to salvage the shard if its read fails (`on_unreadable: quarantine`, a local
    /// file); None: a failure skips the whole shard or fails the run.
    salvage_plan: Option<SalvagePlan>,
    /// Reading row group by row group, after a failure.
    salvage: Option<Salvage>,
    /// SHA-256 of the whole file, when the read hashed it.
    content_sha256: Option<String>,
    /// The shard's bytes when it is read from memory (kept until the reader is
    /// dropped: its read-ahead budget is released then).
    _whole: Option<WholeShard>,
}

/// A shard read whole into memory before it is processed.
struct WholeShard {
    fetched: read_ahead::Fetched,
    /// SHA-256 of those bytes (`resume.verify: full` on a local shard).
    content_sha256: Option<String>,
}

impl SourcePlan {
    /// The shard's bytes when it is processed from memory: an `s3://` shard always
    /// (fetched ahead by the read-ahead, or now), and a local one under
    /// `resume.verify: full`, read once into memory, hashed, and processed from that
    /// copy (the manifest's hash is of the very bytes processed; no second pass).
    fn whole_shard(&self, index: usize, shard: &ShardPlan) -> Result<Option<WholeShard>> {
        if storage::is_remote(&shard.path) {
            let started = std::time::Instant::now();
            let fetched = match self.read_ahead.take(index) {
                Some(pending) => self.storage.block_on(pending)?.map_err(|_| {
                    Error::Internal("the read-ahead stopped before the shard came".into())
                })??,
                None => {
                    let uri = ObjectUri::of_path(&shard.path)?;
                    let fetch =
                        read_ahead::fetch_now(&self.storage, &uri, shard.fingerprint.etag());
                    self.storage.block_on(fetch)??
                }
            };
            self.storage
                .note_wait(storage::Waiter::Reader, started.elapsed());
            return Ok(Some(WholeShard {
                fetched,
                content_sha256: None,
            }));
        }
        if !(self.hash_inputs && hashes_in_memory(shard)) {
            return Ok(None);
        }
        let (bytes, hash) = read_hashing(&shard.path)?;
        Ok(Some(WholeShard {
            fetched: read_ahead::Fetched::unbudgeted(bytes),
            content_sha256: Some(hash),
        }))
    }
}

#[derive(Debug, Clone)]
struct SalvagePlan {
    filter: Option<String>,
    batch_size: usize,
}

/// A shard read again from its start, one row group at a time with the parquet reader,
/// after DataFusion's read of it failed: the rows already delivered are passed over
/// (same file order, same batches), a row group that fails is recorded and skipped,
/// and every readable row after it still flows. `source.filter` is applied to each
/// batch through DataFusion, and batches take the types of the stream they continue.
struct Salvage {
    file: std::fs::File,
    meta: parquet::arrow::arrow_reader::ArrowReaderMetadata,
    plan: SalvagePlan,
    /// The schema of the batches already delivered.
    schema: SchemaRef,
    next_group: usize,
    current: Option<(
        usize,
        parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    )>,
    /// Rows of the salvaged sequence still to pass over (delivered before the failure).
    to_pass: u64,
    ctx: SessionContext,
    skipped: Vec<crate::runtime::SkippedPart>,
}

impl Salvage {
    fn start(path: &Path, plan: SalvagePlan, schema: SchemaRef, delivered: u64) -> Result<Self> {
        use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::default())
            .map_err(|e| Error::parquet(path, e))?;
        Ok(Salvage {
            file,
            meta,
            plan,
            schema,
            next_group: 0,
            current: None,
            to_pass: delivered,
            ctx: SessionContext::new(),
            skipped: Vec::new(),
        })
    }

    /// The next batch to deliver; None at the end; Err when salvage cannot continue
    /// safely (the shard is then skipped whole).
    fn next(&mut self, rt: &tokio::runtime::Runtime, path: &Path) -> Option<Result<RecordBatch>> {
        loop {
            if self.current.is_none() {
                if self.next_group >= self.meta.metadata().num_row_groups() {
                    return None;
                }
                let group = self.next_group;
                self.next_group += 1;
                let opened = self
                    .file
                    .try_clone()
                    .map_err(|e| e.to_string())
                    .and_then(|file| {
                        ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.meta.clone())
                            .with_row_groups(vec![group])
                            .with_batch_size(self.plan.batch_size.max(1))
                            .build()
                            .map_err(|e| e.to_string())
                    });
                match opened {
                    Ok(reader) => self.current = Some((group, reader)),
                    Err(reason) => {
                        if let Some(e) = self.skip(group, reason, path) {
                            return Some(Err(e));
                        }
                    }
                }
                continue;
            }
            let Some((group, reader)) = self.current.as_mut() else {
                continue;
            };
            let group = *group;
            match reader.next() {
                None => self.current = None,
                Some(Err(e)) => {
                    self.current = None;
                    if let Some(e) = self.skip(group, e.to_string(), path) {
                        return Some(Err(e));
                    }
                }
                Some(Ok(batch)) => {
                    let batch = match self.filtered(rt, batch) {
                        Ok(b) => b,
                        Err(reason) => return Some(Err(unreadable(path, reason))),
                    };
                    let rows = batch.num_rows() as u64;
                    if self.to_pass >= rows {
                        self.to_pass -= rows;
                        continue;
                    }
                    let from = self.to_pass as usize;
                    self.to_pass = 0;
                    return Some(Ok(batch.slice(from, batch.num_rows() - from)));
                }
            }
        }
    }

    /// Record row group `group` as skipped; an error instead when rows delivered
    /// before the failure are not all accounted for (the salvaged sequence would not
    /// line up with what was delivered).
    fn skip(&mut self, group: usize, reason: String, path: &Path) -> Option<Error> {
        if self.to_pass > 0 {
            return Some(unreadable(
                path,
                format!(
                    "row group {group}: {reason} (and the rows read before it cannot be                      lined up again, so the shard is skipped whole)"
                ),
            ));
        }
        tracing::warn!("{}: row group {group} skipped: {reason}", path.display());
        self.skipped.push(crate::runtime::SkippedPart {
            row_group: Some(group),
            reason: tidy_datafusion_error(&reason),
        });
        None
    }

    /// `batch` with `source.filter` applied, in the types of the delivered stream.
    fn filtered(
        &self,
        rt: &tokio::runtime::Runtime,
        batch: RecordBatch,
    ) -> std::result::Result<RecordBatch, String> {
        let kept = match &self.plan.filter {
            None => batch,
            Some(sql) => rt.block_on(async {
                let df = self
                    .ctx
                    .read_batch(batch.clone())
                    .map_err(|e| e.to_string())?;
                let parts = filtered(df, Some(sql))
                    .map_err(|e| e.to_string())?
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                arrow::compute::concat_batches(&batch.schema(), &parts).map_err(|e| e.to_string())
            })?,
        };
        let columns = self
            .schema
            .fields()
            .iter()
            .map(|field| {
                let column = kept
                    .column_by_name(field.name())
                    .ok_or_else(|| format!("column `{}` is missing", field.name()))?;
                arrow::compute::cast(column, field.data_type()).map_err(|e| e.to_string())
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| e.to_string())
    }
}

fn unreadable(path: &Path, reason: String) -> Error {
    Error::Unreadable {
        path: path.to_path_buf(),
        reason,
    }
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
        if let Some(salvage) = self.salvage.as_mut() {
            return salvage.next(&self.rt, &self.path);
        }
        let next = self.rt.block_on(self.stream.next())?;
        Some(match next {
            Ok(batch) => {
                self.rows += batch.num_rows() as u64;
                Ok(batch)
            }
            Err(e) => {
                let reason = format!(
                    "{}: {}",
                    self.where_failed(),
                    tidy_datafusion_error(&e.to_string())
                );
                let Some(plan) = self.salvage_plan.take() else {
                    return Some(Err(unreadable(&self.path, reason)));
                };
                tracing::warn!(
                    "{}: {reason}; reading on row group by row group",
                    self.path.display()
                );
                match Salvage::start(&self.path, plan, self.stream.schema(), self.rows) {
                    Ok(salvage) => {
                        let salvage = self.salvage.insert(salvage);
                        return salvage.next(&self.rt, &self.path);
                    }
                    Err(_) => Err(unreadable(&self.path, reason)),
                }
            }
        })
    }

    fn ending(&self) -> crate::runtime::ShardEnding {
        crate::runtime::ShardEnding {
            skipped: self
                .salvage
                .as_ref()
                .map(|s| s.skipped.clone())
                .unwrap_or_default(),
            content_sha256: self.content_sha256.clone(),
        }
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
            .thread_stack_size(THREAD_STACK_BYTES)
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the reader's runtime: {e}")))?;
        let converter = self.converter(shard)?;
        let unreadable_shard = |e: Error| Error::Unreadable {
            path: shard.path.clone(),
            reason: match e {
                Error::Input { message, .. } => message,
                other => other.to_string(),
            },
        };
        let whole = self.whole_shard(index, shard).map_err(unreadable_shard)?;
        let content_sha256 = whole.as_ref().and_then(|w| w.content_sha256.clone());
        let opened = match &whole {
            Some(w) => rt.block_on(self.open_bytes(shard, w.fetched.bytes.clone())),
            None => rt.block_on(self.open(shard)),
        };
        let stream = opened.map_err(unreadable_shard)?;
        // Salvage reads a local file's row groups one by one once a read fails.
        let salvage = (self.on_unreadable == OnUnreadable::Quarantine
            && !storage::is_remote(&shard.path))
        .then(|| SalvagePlan {
            filter: self.filter.clone(),
            batch_size: self.batch_size,
        });
        Ok(Box::new(ParquetShardReader {
            rt,
            stream,
            converter,
            path: shard.path.clone(),
            rows: 0,
            row_groups: self.filter.is_none().then(|| shard.row_group_rows.clone()),
            salvage_plan: salvage,
            salvage: None,
            content_sha256,
            _whole: whole,
        }))
    }

    fn read_ahead(&self, order: &[usize]) -> Result<()> {
        let wanted: Vec<read_ahead::Wanted> = order
            .iter()
            .filter_map(|&index| {
                let shard = self.shards.get(index)?;
                let uri = ObjectUri::of_path(&shard.path).ok()?;
                Some(read_ahead::Wanted {
                    index,
                    uri,
                    size: shard.fingerprint.size,
                    etag: shard.fingerprint.etag(),
                })
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        self.read_ahead.start(self.storage.clone(), wanted)
    }

    fn skip_unreadable(&self) -> bool {
        self.on_unreadable == OnUnreadable::Quarantine
    }
}

/// Largest shard hashed by its processing read (it is held in memory while read);
/// a larger one is hashed by a read of its own before the run.
pub const MAX_HASHED_IN_MEMORY_BYTES: u64 = 2 << 30;

/// Whether `shard` is hashed by the read that processes it (a local file, not larger
/// than [`MAX_HASHED_IN_MEMORY_BYTES`]).
pub fn hashes_in_memory(shard: &ShardPlan) -> bool {
    !storage::is_remote(&shard.path) && shard.fingerprint.size <= MAX_HASHED_IN_MEMORY_BYTES
}

/// The whole file, and its SHA-256, from one sequential read.
fn read_hashing(path: &Path) -> Result<(bytes::Bytes, String)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let hash = format!("{:x}", Sha256::digest(&bytes));
    Ok((bytes.into(), hash))
}

/// A shard deleted after planning would otherwise surface as DataFusion's "cannot infer
/// schema".
async fn vanished_check(storage: &Storage, path: &std::path::Path) -> Result<()> {
    let there = match storage::is_remote(path) {
        true => storage.head(&ObjectUri::of_path(path)?).await.is_ok(),
        false => path.is_file(),
    };
    if there {
        Ok(())
    } else {
        Err(Error::input(
            path,
            "the file no longer exists (it was there when the run was planned); restore it \
             or rerun to plan without it",
        ))
    }
}
