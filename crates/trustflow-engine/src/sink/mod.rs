//! Parquet output, exactly once per shard: for input `<stem>.parquet` the sink writes
//! `<stem>.parquet` (rows that passed), `<stem>.quarantine.parquet` (rows that failed,
//! with `error_stage` and `error`), then `<stem>.manifest.json`. Each file is written
//! under a temporary name and committed (renamed, or uploaded to a store) only when
//! complete, so a killed run never leaves a partial file under a final name, and the
//! manifest (last) marks completion.

pub mod folder;
pub mod lease;
pub mod lock;
pub mod manifest;
pub mod safety;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::columns::{ERROR, ERROR_STAGE};
pub use crate::columns::{QUARANTINE_SUFFIX, output_name, quarantine_name};
use crate::digest::Fingerprint;
use crate::error::{Error, Result};
use crate::quarantine::as_it_came;
use crate::runtime::{ShardCounts, ShardEnding, Sink};
use crate::spec::{Compression, SinkSpec};
pub use folder::OutputFolder;
pub use manifest::{Manifest, reason_key};

/// Temporary sibling of `path`, unique to this process, hidden, ending in `.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Remove temporary files that runs now dead left for `stem`. A stem may
/// name a subfolder (`year=2024/part-0`): its files are in that folder.
pub fn remove_stale_tmp(out_dir: &Path, stem: &str) {
    let (folder, stem) = match stem.rsplit_once('/') {
        Some((folder, last)) => (out_dir.join(folder), last),
        None => (out_dir.to_path_buf(), stem),
    };
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return;
    };
    let prefixes = crate::columns::output_names(stem).map(|name| format!(".{name}."));
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = prefixes.iter().find_map(|p| {
            name.strip_prefix(p.as_str())?
                .strip_suffix(".tmp")?
                .parse::<u32>()
                .ok()
        }) else {
            continue;
        };
        // Only a dead writer's: a live one's temporary file is never touched.
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

struct OpenShard {
    out: ArrowWriter<File>,
    out_tmp: PathBuf,
    quarantine: ArrowWriter<File>,
    quarantine_tmp: PathBuf,
    reasons: BTreeMap<String, u64>,
}

/// What the sink needs to know of an input shard: the stem its outputs are named
/// after, and the input's identity for the manifest.
#[derive(Debug, Clone)]
pub struct ShardTarget {
    pub stem: String,
    pub input: PathBuf,
    pub fingerprint: Fingerprint,
    /// The input's own columns plus the reason (`ShardPlan::quarantine_schema`).
    pub quarantine_schema: SchemaRef,
    /// The input column restored from the canonical `image` (`Mapping::image_bytes_column`).
    pub image_column: Option<String>,
    /// The input column that fed each canonical one (for the manifest).
    pub source_columns: BTreeMap<String, String>,
}

/// A shard whose files are written and closed, waiting to be committed.
struct ClosedShard {
    target: ShardTarget,
    out_tmp: PathBuf,
    quarantine_tmp: PathBuf,
    reasons: BTreeMap<String, u64>,
    counts: ShardCounts,
    ending: ShardEnding,
}

/// An upload in the background: the shard's index and manifest once committed.
type Upload = std::thread::JoinHandle<Result<(usize, Manifest)>>;

/// Commits going on in the background (to a store: uploads while the next shards are
/// processed), at most `limit` shards and `byte_limit` staged bytes at once.
struct Commits {
    limit: usize,
    byte_limit: u64,
    /// Each upload and the bytes it staged, oldest first.
    running: std::collections::VecDeque<(Upload, u64)>,
    staged_bytes: u64,
}

/// The Parquet [`Sink`].
pub struct ParquetSink {
    /// The source's shards, by index.
    shards: Vec<ShardTarget>,
    folder: OutputFolder,
    output_schema: SchemaRef,
    props: WriterProperties,
    /// `sink.uncompressed_columns` (None: every binary column).
    uncompressed: Option<Vec<String>>,
    row_group_bytes: usize,
    pipeline_hash: String,
    open: HashMap<usize, OpenShard>,
    /// For a store: uploads in the background. None: commit in place (a rename).
    commits: Option<Commits>,
    /// Manifests of the shards finished by this run, by shard index.
    finished: Vec<(usize, Manifest)>,
}

impl ParquetSink {
    pub fn new(
        spec: &SinkSpec,
        folder: OutputFolder,
        output_schema: SchemaRef,
        pipeline_hash: String,
        shards: Vec<ShardTarget>,
    ) -> Self {
        let compression = match spec.compression {
            Compression::Zstd => PqCompression::ZSTD(ZstdLevel::default()),
            Compression::Snappy => PqCompression::SNAPPY,
            Compression::None => PqCompression::UNCOMPRESSED,
        };
        let props = WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_row_count(Some(spec.row_group_rows.max(1)))
            .set_created_by(format!("trustflow {}", env!("CARGO_PKG_VERSION")))
            .build();
        let commits = match &folder {
            OutputFolder::Local(_) => None,
            OutputFolder::Remote { storage, .. } => Some(Commits {
                limit: storage.spec().uploads_in_flight.max(1),
                byte_limit: storage.spec().upload_bytes_in_flight,
                running: Default::default(),
                staged_bytes: 0,
            }),
        };
        ParquetSink {
            shards,
            folder,
            output_schema,
            props,
            uncompressed: spec.uncompressed_columns.clone(),
            row_group_bytes: spec.row_group_bytes,
            pipeline_hash,
            open: HashMap::new(),
            commits,
            finished: Default::default(),
        }
    }

    /// The writer properties of a file of `schema`: the sink's, with the columns of
    /// `sink.uncompressed_columns` (by default the binary ones) left uncompressed.
    fn properties(&self, schema: &SchemaRef) -> WriterProperties {
        let plain = schema
            .fields()
            .iter()
            .filter(|field| match &self.uncompressed {
                Some(names) => names.contains(field.name()),
                None => matches!(
                    field.data_type(),
                    DataType::Binary | DataType::LargeBinary | DataType::BinaryView
                ),
            });
        plain
            .fold(self.props.clone().into_builder(), |builder, field| {
                let column = ColumnPath::from(field.name().as_str());
                builder.set_column_compression(column, PqCompression::UNCOMPRESSED)
            })
            .build()
    }

    fn writer(&self, path: &Path, schema: &SchemaRef) -> Result<ArrowWriter<File>> {
        // A shard found in a subfolder keeps it under the output folder.
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        ArrowWriter::try_new(file, schema.clone(), Some(self.properties(schema)))
            .map_err(|e| Error::output(path, e))
    }

    fn target(&self, index: usize) -> Result<ShardTarget> {
        self.shards
            .get(index)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("the sink knows no shard #{index}")))
    }

    fn open_shard(&mut self, index: usize) -> Result<&mut OpenShard> {
        if !self.open.contains_key(&index) {
            let shard = self.target(index)?;
            let staging = self.folder.staging();
            let out_tmp = tmp_path(&staging.join(output_name(&shard.stem)));
            let quarantine_tmp = tmp_path(&staging.join(quarantine_name(&shard.stem)));
            let entry = OpenShard {
                out: self.writer(&out_tmp, &self.output_schema)?,
                quarantine: self.writer(&quarantine_tmp, &shard.quarantine_schema)?,
                out_tmp,
                quarantine_tmp,
                reasons: BTreeMap::new(),
            };
            self.open.insert(index, entry);
        }
        self.open
            .get_mut(&index)
            .ok_or_else(|| Error::Internal("shard writer vanished".into()))
    }
}

fn write_batch(
    writer: &mut ArrowWriter<File>,
    path: &Path,
    batch: RecordBatch,
    row_group_bytes: usize,
) -> Result<()> {
    writer.write(&batch).map_err(|e| Error::output(path, e))?;
    // Big images make row groups big; cap the buffered bytes, not just the rows.
    if writer.in_progress_size() >= row_group_bytes {
        writer.flush().map_err(|e| Error::output(path, e))?;
    }
    Ok(())
}

fn close(writer: ArrowWriter<File>, path: &Path) -> Result<()> {
    let file = writer.into_inner().map_err(|e| Error::output(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

impl Sink for ParquetSink {
    fn write(
        &mut self,
        shard: usize,
        batch: &RecordBatch,
        quarantine: &[RecordBatch],
    ) -> Result<()> {
        let output_schema = self.output_schema.clone();
        let target = self.target(shard)?;
        let row_group_bytes = self.row_group_bytes;
        let open = self.open_shard(shard)?;
        if batch.num_rows() > 0 {
            let projected =
                project(batch, &output_schema).map_err(|e| Error::output(&open.out_tmp, e))?;
            write_batch(&mut open.out, &open.out_tmp, projected, row_group_bytes)?;
        }
        for q in quarantine.iter().filter(|q| q.num_rows() > 0) {
            let projected =
                as_it_came(q, &target.quarantine_schema, target.image_column.as_deref())
                    .map_err(|e| Error::output(&open.quarantine_tmp, e))?;
            count_reasons(&projected, &mut open.reasons);
            write_batch(
                &mut open.quarantine,
                &open.quarantine_tmp,
                projected,
                row_group_bytes,
            )?;
        }
        Ok(())
    }

    fn finish_shard(
        &mut self,
        index: usize,
        counts: ShardCounts,
        ending: &ShardEnding,
    ) -> Result<()> {
        // A shard whose every batch was empty still gets (empty) outputs.
        self.open_shard(index)?;
        let target = self.target(index)?;
        let Some(open) = self.open.remove(&index) else {
            return Err(Error::Internal("shard writer vanished".into()));
        };
        let closed = ClosedShard {
            target,
            out_tmp: open.out_tmp.clone(),
            quarantine_tmp: open.quarantine_tmp.clone(),
            reasons: open.reasons,
            counts,
            ending: ending.clone(),
        };
        if let Err(e) = close(open.out, &closed.out_tmp)
            .and_then(|()| close(open.quarantine, &closed.quarantine_tmp))
        {
            // The writer is out of `open` now, so `abort` would not see its files.
            let _ = std::fs::remove_file(&closed.out_tmp);
            let _ = std::fs::remove_file(&closed.quarantine_tmp);
            return Err(e);
        }
        let (folder, hash) = (self.folder.clone(), self.pipeline_hash.clone());
        if self.commits.is_none() {
            let manifest = commit(&folder, &hash, closed)?;
            self.record(index, manifest);
            return Ok(());
        }
        // A store: upload while the next shards are processed, within the limits.
        let staged: u64 = [&closed.out_tmp, &closed.quarantine_tmp]
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let full = |c: &Commits| {
            !c.running.is_empty()
                && (c.running.len() >= c.limit || c.staged_bytes + staged > c.byte_limit)
        };
        while self.commits.as_ref().is_some_and(full) {
            self.wait_for_oldest_commit()?;
        }
        let upload = std::thread::Builder::new()
            .name("trustflow-upload".into())
            .spawn(move || commit(&folder, &hash, closed).map(|m| (index, m)))
            .map_err(|e| Error::Internal(format!("cannot start an upload thread: {e}")))?;
        if let Some(commits) = self.commits.as_mut() {
            commits.running.push_back((upload, staged));
            commits.staged_bytes += staged;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        while self.commits.as_ref().is_some_and(|c| !c.running.is_empty()) {
            self.wait_for_oldest_commit()?;
        }
        Ok(())
    }

    fn discard_shard(&mut self, shard: usize) {
        if let Some(open) = self.open.remove(&shard) {
            drop(open.out);
            drop(open.quarantine);
            let _ = std::fs::remove_file(&open.out_tmp);
            let _ = std::fs::remove_file(&open.quarantine_tmp);
        }
    }

    fn abort(&mut self) {
        let open: Vec<usize> = self.open.keys().copied().collect();
        for shard in open {
            self.discard_shard(shard);
        }
        // Shards already handed to an upload are finished: let them commit, so that a
        // stopped run keeps every shard it finished.
        while self.commits.as_ref().is_some_and(|c| !c.running.is_empty()) {
            if let Err(e) = self.wait_for_oldest_commit() {
                tracing::warn!("while stopping: {e}");
            }
        }
    }
}

impl ParquetSink {
    fn record(&mut self, index: usize, manifest: Manifest) {
        self.finished.push((index, manifest));
    }

    /// The manifests of the shards this run finished (committed), by shard index;
    /// taken once the run is over.
    pub fn take_finished(&mut self) -> Vec<(usize, Manifest)> {
        std::mem::take(&mut self.finished)
    }

    /// Wait for the oldest background commit; its failure is the run's.
    fn wait_for_oldest_commit(&mut self) -> Result<()> {
        let Some(oldest) = self.commits.as_mut().and_then(|c| {
            let (upload, staged) = c.running.pop_front()?;
            c.staged_bytes -= staged;
            Some(upload)
        }) else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let joined = oldest.join();
        if let OutputFolder::Remote { storage, .. } = &self.folder {
            storage.note_wait(crate::storage::Waiter::Sink, started.elapsed());
        }
        let (index, manifest) =
            joined.map_err(|_| Error::Internal("an upload thread panicked".into()))??;
        self.record(index, manifest);
        Ok(())
    }
}

/// Make a closed shard's files visible under their final names, then write its
/// manifest (the commit point). On failure nothing of the shard is left under a final
/// name, and its temporary files are gone.
fn commit(folder: &OutputFolder, pipeline_hash: &str, closed: ClosedShard) -> Result<Manifest> {
    let shard = &closed.target;
    let (out_name, quarantine_name) = (output_name(&shard.stem), quarantine_name(&shard.stem));
    let committed = folder
        .commit_file(&closed.out_tmp, &out_name)
        .and_then(|out| {
            Ok((
                out,
                folder.commit_file(&closed.quarantine_tmp, &quarantine_name)?,
            ))
        });
    let (out_bytes, quarantine_bytes) = match committed {
        Ok(sizes) => sizes,
        Err(e) => {
            for tmp in [&closed.out_tmp, &closed.quarantine_tmp] {
                let _ = std::fs::remove_file(tmp);
            }
            // Locally the folder lock makes the files ours: leave no output without its
            // manifest. In a store an object under a final name may be another
            // writer's; one of ours left without a manifest is not committed and is
            // redone by the next run, so nothing is deleted there.
            if !folder.is_remote() {
                folder.remove(&out_name);
                folder.remove(&quarantine_name);
            }
            return Err(e);
        }
    };
    // The manifest commits the files as written: check they are there, whole.
    for (name, bytes) in [(&out_name, out_bytes), (&quarantine_name, quarantine_bytes)] {
        let found = folder.size_of(name);
        if found != Some(bytes) {
            return Err(Error::output(
                folder.display(name),
                format!(
                    "is {} after it was written with {bytes} bytes; another writer may have \
                     replaced or removed it, so the shard is not committed",
                    found.map_or("missing".to_string(), |b| format!("{b} bytes"))
                ),
            ));
        }
    }
    let manifest = Manifest {
        trustflow_version: env!("CARGO_PKG_VERSION").into(),
        pipeline_hash: pipeline_hash.to_string(),
        input: shard.input.clone(),
        input_fingerprint: Fingerprint {
            // The hash of the bytes this run processed, when its read took one.
            content_sha256: closed
                .ending
                .content_sha256
                .clone()
                .or_else(|| shard.fingerprint.content_sha256.clone()),
            ..shard.fingerprint.clone()
        },
        rows_in: closed.counts.rows_in,
        rows_out: closed.counts.rows_out,
        rows_quarantined: closed.counts.rows_quarantined,
        output: manifest::FileEntry {
            file: out_name,
            bytes: out_bytes,
        },
        quarantine: manifest::FileEntry {
            file: quarantine_name,
            bytes: quarantine_bytes,
        },
        quarantine_reasons: closed.reasons,
        skipped: closed.ending.skipped,
        source_columns: shard.source_columns.clone(),
    };
    manifest.write_to(folder, &shard.stem)?;
    folder.sync();
    Ok(manifest)
}

impl Drop for ParquetSink {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Select `schema`'s columns from `batch` by name.
fn project(batch: &RecordBatch, schema: &SchemaRef) -> std::result::Result<RecordBatch, String> {
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            batch
                .column_by_name(f.name())
                .cloned()
                .ok_or_else(|| format!("batch lacks column `{}`", f.name()))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

fn count_reasons(quarantine: &RecordBatch, reasons: &mut BTreeMap<String, u64>) {
    let (Some(stages), Some(errors)) = (
        quarantine.column_by_name(ERROR_STAGE),
        quarantine.column_by_name(ERROR),
    ) else {
        return;
    };
    let (Some(stages), Some(errors)) =
        (stages.as_string_opt::<i32>(), errors.as_string_opt::<i32>())
    else {
        return;
    };
    for i in 0..quarantine.num_rows() {
        if stages.is_valid(i) && errors.is_valid(i) {
            *reasons
                .entry(reason_key(stages.value(i), errors.value(i)))
                .or_default() += 1;
        }
    }
}
