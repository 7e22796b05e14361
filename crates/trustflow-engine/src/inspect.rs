//! `trustflow inspect OUT_DIR`: what a run produced, read back from the files alone
//! (manifests, output and quarantine shards), so it works on any output folder.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type, UInt32Type};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

use crate::columns::{ERROR, ERROR_STAGE};
use crate::error::{Error, Result};
use crate::sink::{Manifest, reason_key};

#[derive(Debug, Clone, Serialize)]
pub struct ShardSummary {
    pub stem: String,
    pub rows_in: u64,
    pub rows_out: u64,
    pub rows_quarantined: u64,
    pub invariant_holds: bool,
}

/// Summary of one output column over every output shard.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ColumnSummary {
    pub name: String,
    pub data_type: String,
    pub rows: u64,
    pub nulls: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    /// Most frequent values of string/bool/integer columns (at most 5).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_values: Vec<(String, u64)>,
    /// Stored (compressed) bytes, for binary columns that are not read back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub out_dir: PathBuf,
    pub shards: Vec<ShardSummary>,
    pub rows_out: u64,
    pub rows_quarantined: u64,
    pub quarantine_reasons: BTreeMap<String, u64>,
    pub columns: Vec<ColumnSummary>,
    /// Output files without a manifest (from an interrupted or foreign run).
    pub unfinished: Vec<String>,
    /// Manifests that cannot be read, with the parse error.
    pub corrupt_manifests: Vec<CorruptManifest>,
}

#[derive(Default)]
struct Acc {
    summary: ColumnSummary,
    sum: f64,
    counted: u64,
    values: BTreeMap<String, u64>,
}

impl Acc {
    fn number(&mut self, v: f64) {
        let s = &mut self.summary;
        s.min = Some(s.min.map_or(v, |m| m.min(v)));
        s.max = Some(s.max.map_or(v, |m| m.max(v)));
        self.sum += v;
        self.counted += 1;
    }

    fn value(&mut self, v: String) {
        // Cap distinct values tracked so a free-text column cannot blow up memory.
        if self.values.len() < 10_000 || self.values.contains_key(&v) {
            *self.values.entry(v).or_default() += 1;
        }
    }
}

pub fn inspect(out_dir: &Path) -> Result<Inspection> {
    if crate::storage::is_remote(out_dir) {
        return Err(Error::input(
            out_dir,
            "inspect reads a local output folder; the run's summary is the `_report.json` \
             object beside the outputs (or copy the prefix down first)",
        ));
    }
    let listing = list(out_dir)?;
    let mut shards = Vec::new();
    let mut reasons = BTreeMap::new();
    let mut accs: Vec<Acc> = Vec::new();
    for (stem, m) in &listing.finished {
        shards.push(ShardSummary {
            stem: stem.clone(),
            rows_in: m.rows_in,
            rows_out: m.rows_out,
            rows_quarantined: m.rows_quarantined,
            invariant_holds: m.rows_in == m.rows_out + m.rows_quarantined,
        });
        summarise_columns(&out_dir.join(&m.output.file), &mut accs)?;
        let q = out_dir.join(&m.quarantine.file);
        count_quarantine(&q, &mut reasons)?;
    }
    let columns = accs
        .into_iter()
        .map(|mut a| {
            if a.counted > 0 {
                a.summary.mean = Some(a.sum / a.counted as f64);
            }
            let mut top: Vec<(String, u64)> = a.values.into_iter().collect();
            top.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
            top.truncate(5);
            a.summary.top_values = top;
            a.summary
        })
        .collect();
    Ok(Inspection {
        out_dir: out_dir.to_path_buf(),
        rows_out: shards.iter().map(|s| s.rows_out).sum(),
        rows_quarantined: shards.iter().map(|s| s.rows_quarantined).sum(),
        shards,
        quarantine_reasons: reasons,
        columns,
        unfinished: listing.unfinished,
        corrupt_manifests: listing.corrupt,
    })
}

/// A manifest file that is there but is not a manifest: its shard is not finished,
/// and a rerun redoes it.
#[derive(Debug, Clone, Serialize)]
pub struct CorruptManifest {
    pub manifest: String,
    pub error: String,
}

/// What an output folder holds, by name.
pub(crate) struct Listing {
    /// (stem, manifest) of finished shards, in name order.
    pub finished: Vec<(String, Manifest)>,
    /// Data files without a manifest (an interrupted or foreign run).
    pub unfinished: Vec<String>,
    /// Manifests that are there but cannot be read, with why.
    pub corrupt: Vec<CorruptManifest>,
    /// Run reports: `_report.json` and the `_report.part-I-of-N.json` of `--part` runs.
    pub reports: Vec<String>,
}

/// The files under `dir`, by `/`-joined path relative to `root`, at every depth but in
/// folders named `.*` or `_*` (outputs keep the subfolders their inputs were found in).
fn relative_files(root: &Path, dir: &Path, names: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if !name.starts_with('.') && !name.starts_with('_') {
                relative_files(root, &entry.path(), names)?;
            }
        } else if let Ok(relative) = entry.path().strip_prefix(root) {
            let parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            names.push(parts.join("/"));
        }
    }
    Ok(())
}

/// List a local output folder.
pub(crate) fn list(out_dir: &Path) -> Result<Listing> {
    let mut names = Vec::new();
    relative_files(out_dir, out_dir, &mut names)?;
    names.sort();
    let mut listing = Listing {
        finished: Vec::new(),
        unfinished: Vec::new(),
        corrupt: Vec::new(),
        reports: Vec::new(),
    };
    for name in names {
        if name.starts_with("_report") && name.ends_with(".json") {
            listing.reports.push(name);
            continue;
        }
        let Some(stem) = name.strip_suffix(".parquet") else {
            continue;
        };
        let file_name = name.rsplit('/').next().unwrap_or(&name);
        if file_name.starts_with('.') || name.ends_with(crate::columns::QUARANTINE_SUFFIX) {
            continue;
        }
        match Manifest::read_checked(&Manifest::path_for(out_dir, stem)) {
            Ok(Some(m)) => listing.finished.push((stem.to_string(), m)),
            Ok(None) => listing.unfinished.push(name),
            Err(error) => listing.corrupt.push(CorruptManifest {
                manifest: crate::columns::manifest_name(stem),
                error,
            }),
        }
    }
    Ok(listing)
}

fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::input(path, format!("not a readable Parquet file: {e}")))
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

fn summarise_columns(path: &Path, accs: &mut Vec<Acc>) -> Result<()> {
    let builder = open(path)?;
    let schema = builder.schema().clone();
    if accs.is_empty() {
        *accs = schema
            .fields()
            .iter()
            .map(|f| Acc {
                summary: ColumnSummary {
                    name: f.name().clone(),
                    data_type: f.data_type().to_string(),
                    ..Default::default()
                },
                ..Default::default()
            })
            .collect();
    }
    // Binary columns (images) are summarised from the footer, not read back.
    let meta = builder.metadata().clone();
    let mut read = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        if is_binary(f.data_type()) {
            let bytes: i64 = meta
                .row_groups()
                .iter()
                .filter_map(|rg| rg.columns().get(i))
                .map(|c| c.compressed_size())
                .sum();
            if let Some(acc) = accs.iter_mut().find(|a| &a.summary.name == f.name()) {
                *acc.summary.stored_bytes.get_or_insert(0) += bytes.max(0) as u64;
                acc.summary.rows += meta.file_metadata().num_rows().max(0) as u64;
            }
        } else {
            read.push(i);
        }
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), read);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| Error::parquet(path, e))?;
    for batch in reader {
        let batch = batch.map_err(|e| Error::Arrow {
            context: path.display().to_string(),
            source: e,
        })?;
        for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
            let Some(acc) = accs.iter_mut().find(|a| &a.summary.name == field.name()) else {
                continue;
            };
            acc.summary.rows += col.len() as u64;
            acc.summary.nulls += col.null_count() as u64;
            match col.data_type() {
                DataType::Int64 => {
                    for v in col.as_primitive::<Int64Type>().iter().flatten() {
                        acc.number(v as f64);
                        acc.value(v.to_string());
                    }
                }
                DataType::UInt32 => {
                    for v in col.as_primitive::<UInt32Type>().iter().flatten() {
                        acc.number(v as f64);
                    }
                }
                DataType::Float32 | DataType::Float64 => {
                    if let Ok(c) = arrow::compute::cast(col, &DataType::Float64) {
                        for v in c
                            .as_primitive::<arrow::datatypes::Float64Type>()
                            .iter()
                            .flatten()
                        {
                            acc.number(v);
                        }
                    }
                }
                // Every other integer width (Int8..Int32, UInt8, UInt16, UInt64) reads as
                // Int64 (values beyond its range are skipped).
                t if t.is_integer() => {
                    let options = arrow::compute::CastOptions {
                        safe: true,
                        ..Default::default()
                    };
                    if let Ok(c) =
                        arrow::compute::cast_with_options(col, &DataType::Int64, &options)
                    {
                        for v in c.as_primitive::<Int64Type>().iter().flatten() {
                            acc.number(v as f64);
                            acc.value(v.to_string());
                        }
                    }
                }
                DataType::Boolean => {
                    for v in col.as_boolean().iter().flatten() {
                        acc.value(v.to_string());
                    }
                }
                DataType::Utf8 => {
                    for v in col.as_string::<i32>().iter().flatten() {
                        // Mean length for free text; top values help for domain/split.
                        acc.number(v.chars().count() as f64);
                        acc.value(v.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn count_quarantine(path: &Path, reasons: &mut BTreeMap<String, u64>) -> Result<()> {
    let builder = open(path)?;
    let schema = builder.schema().clone();
    let wanted: Vec<usize> = [ERROR_STAGE, ERROR]
        .iter()
        .filter_map(|n| schema.index_of(n).ok())
        .collect();
    if wanted.len() != 2 {
        return Err(Error::input(
            path,
            "quarantine shard lacks error_stage/error columns",
        ));
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| Error::parquet(path, e))?;
    for batch in reader {
        let batch = batch.map_err(|e| Error::Arrow {
            context: path.display().to_string(),
            source: e,
        })?;
        let stages = batch.column(0).as_string::<i32>();
        let errors = batch.column(1).as_string::<i32>();
        for i in 0..batch.num_rows() {
            *reasons
                .entry(reason_key(stages.value(i), errors.value(i)))
                .or_default() += 1;
        }
    }
    Ok(())
}

impl Inspection {
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.out_dir.display());
        let _ = writeln!(
            s,
            "{:<28} {:>10} {:>10} {:>12}  invariant",
            "shard", "rows in", "rows out", "quarantined"
        );
        for sh in &self.shards {
            let _ = writeln!(
                s,
                "{:<28} {:>10} {:>10} {:>12}  {}",
                sh.stem,
                sh.rows_in,
                sh.rows_out,
                sh.rows_quarantined,
                if sh.invariant_holds { "ok" } else { "BROKEN" }
            );
        }
        let _ = writeln!(
            s,
            "total rows out {}, quarantined {}",
            self.rows_out, self.rows_quarantined
        );
        if !self.quarantine_reasons.is_empty() {
            let _ = writeln!(s, "quarantine reasons:");
            for (reason, n) in &self.quarantine_reasons {
                let _ = writeln!(s, "  {n:>8}  {reason}");
            }
        }
        let _ = writeln!(s, "columns:");
        for c in &self.columns {
            let mut line = format!("  {:<16} {:<12} nulls {:>6}", c.name, c.data_type, c.nulls);
            if let (Some(min), Some(max), Some(mean)) = (c.min, c.max, c.mean) {
                let what = if c.data_type == "Utf8" { "length " } else { "" };
                let _ = write!(line, "  {what}min {min:.3} max {max:.3} mean {mean:.3}");
            }
            if let Some(b) = c.stored_bytes {
                let _ = write!(line, "  stored {:.1} MiB", b as f64 / (1 << 20) as f64);
            }
            if !c.top_values.is_empty() && c.top_values.len() < 5 || c.data_type != "Utf8" {
                let tops: Vec<String> = c
                    .top_values
                    .iter()
                    .map(|(v, n)| format!("{v}: {n}"))
                    .collect();
                if !tops.is_empty() {
                    let _ = write!(line, "  top {}", tops.join(", "));
                }
            }
            let _ = writeln!(s, "{line}");
        }
        if !self.unfinished.is_empty() {
            let _ = writeln!(
                s,
                "without manifest (unfinished or foreign): {}",
                self.unfinished.join(", ")
            );
        }
        for c in &self.corrupt_manifests {
            let _ = writeln!(
                s,
                "corrupt manifest (the shard is not finished; a rerun redoes it): {}: {}",
                c.manifest, c.error
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int8Array, Int32Array, RecordBatch, StringArray, UInt16Array};
    use parquet::arrow::ArrowWriter;

    use super::*;
    use crate::sink::manifest::FileEntry;

    fn write(path: &Path, columns: Vec<(&str, ArrayRef)>) -> u64 {
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let file = File::create(path).unwrap();
        let mut writer = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        std::fs::metadata(path).unwrap().len()
    }

    /// Columns of any integer width are summarised, not just Int64 and UInt32 (a stage
    /// adding an Int32 column must see its range in `inspect`).
    #[test]
    fn every_integer_width_is_summarised() {
        let dir = tempfile::tempdir().unwrap();
        let out = write(
            &dir.path().join("a.parquet"),
            vec![
                (
                    "chars",
                    Arc::new(Int32Array::from(vec![3, 5, 10])) as ArrayRef,
                ),
                (
                    "small",
                    Arc::new(Int8Array::from(vec![-1, 0, 1])) as ArrayRef,
                ),
                (
                    "wide",
                    Arc::new(UInt16Array::from(vec![7, 7, 9])) as ArrayRef,
                ),
            ],
        );
        let empty: ArrayRef = Arc::new(StringArray::from(Vec::<&str>::new()));
        let quarantine = write(
            &dir.path().join("a.quarantine.parquet"),
            vec![(ERROR_STAGE, empty.clone()), (ERROR, empty)],
        );
        let manifest = Manifest {
            trustflow_version: "test".into(),
            pipeline_hash: "h".into(),
            input: "a.parquet".into(),
            input_fingerprint: crate::digest::Fingerprint::default(),
            rows_in: 3,
            rows_out: 3,
            rows_quarantined: 0,
            output: FileEntry {
                file: "a.parquet".into(),
                bytes: out,
            },
            quarantine: FileEntry {
                file: "a.quarantine.parquet".into(),
                bytes: quarantine,
            },
            quarantine_reasons: BTreeMap::new(),
            skipped: Vec::new(),
            source_columns: BTreeMap::new(),
        };
        std::fs::write(
            dir.path().join("a.manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        let inspection = inspect(dir.path()).unwrap();
        let column = |name: &str| {
            inspection
                .columns
                .iter()
                .find(|c| c.name == name)
                .unwrap()
                .clone()
        };
        let chars = column("chars");
        assert_eq!((chars.min, chars.max), (Some(3.0), Some(10.0)));
        assert_eq!(chars.mean, Some(6.0));
        assert_eq!(column("small").min, Some(-1.0));
        assert_eq!(column("wide").top_values[0], ("7".to_string(), 2));
    }
}
