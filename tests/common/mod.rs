//! Helpers shared by the integration tests: corpora, pipeline files, the binary, and
//! reading Parquet back.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::concat_batches;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use trustflow::bench::corpus::{GenLayout, GenOptions, GenSummary, generate};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trustflow"))
}

/// A small corpus: images 48..=`max_side` px so debug tests stay quick.
pub fn corpus(dir: &Path, rows: usize, shards: usize, seed: u64, max_side: u32) -> GenSummary {
    corpus_with(dir, rows, shards, seed, max_side, GenLayout::Bytes, 0.08)
}

pub fn corpus_with(
    dir: &Path,
    rows: usize,
    shards: usize,
    seed: u64,
    max_side: u32,
    layout: GenLayout,
    corrupt_rate: f64,
) -> GenSummary {
    let opts = GenOptions {
        rows,
        shards,
        out: dir.to_path_buf(),
        seed,
        min_side: 48,
        max_side,
        layout,
        corrupt_rate,
        ..GenOptions::default()
    };
    generate(&opts).expect("corpus generation")
}

/// Write a pipeline file into `dir` and return its path.
pub fn pipeline(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write pipeline");
    path
}

/// decode -> clean_caption over `input`, writing to `out`.
pub fn standard_pipeline(input: &Path, out: &Path, extra_source: &str) -> String {
    format!(
        "source:\n  paths: [\"{}\"]\n{extra_source}stages:\n  - type: decode\n    workers: 2\n  - type: clean_caption\nsink:\n  path: \"{}\"\nruntime:\n  batch_size: 16\n  queue_depth: 2\n",
        input.display(),
        out.display()
    )
}

pub fn run_ok(args: &[&str]) -> Output {
    let out = bin().args(args).output().expect("run trustflow");
    assert!(
        out.status.success(),
        "trustflow {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn read_parquet(path: &Path) -> RecordBatch {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder
        .build()
        .expect("reader")
        .collect::<Result<_, _>>()
        .expect("batches");
    concat_batches(&schema, &batches).expect("concat")
}

/// Values of a string column (nulls as None).
pub fn strings(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
    let col = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"));
    let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Utf8).expect("cast");
    let col = col.as_string::<i32>();
    (0..col.len())
        .map(|i| col.is_valid(i).then(|| col.value(i).to_string()))
        .collect()
}

pub fn ids(batch: &RecordBatch) -> Vec<String> {
    strings(batch, "id").into_iter().flatten().collect()
}

/// Every shard file of a corpus folder, sorted.
pub fn shard_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .filter(|p| !p.to_string_lossy().ends_with(".quarantine.parquet"))
        .collect();
    files.sort();
    files
}

/// id -> corruption kind for the bad rows the generator planted.
pub fn planted_corruptions(corpus: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for shard in shard_files(corpus) {
        let batch = read_parquet(&shard);
        let id_col = if batch.column_by_name("id").is_some() {
            "id"
        } else {
            "key"
        };
        let ids = strings(&batch, id_col);
        for (id, kind) in ids.into_iter().zip(strings(&batch, "corruption")) {
            if let (Some(id), Some(kind)) = (id, kind) {
                out.insert(id, kind);
            }
        }
    }
    out
}

/// id -> (error_stage, error) over every quarantine shard of an output folder.
pub fn quarantined(out: &Path) -> BTreeMap<String, (String, String)> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(out).expect("read out").flatten() {
        let path = entry.path();
        if path.to_string_lossy().ends_with(".quarantine.parquet") {
            let batch = read_parquet(&path);
            let ids = strings(&batch, "id");
            let stages = strings(&batch, "error_stage");
            let errors = strings(&batch, "error");
            for ((id, stage), error) in ids.into_iter().zip(stages).zip(errors) {
                found.insert(
                    id.expect("quarantine id"),
                    (stage.expect("stage"), error.expect("error")),
                );
            }
        }
    }
    found
}

pub fn report(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("_report.json")).expect("report");
    serde_json::from_str(&text).expect("report json")
}

/// Model tests need the ONNX Runtime library that scripts/setup.sh installs.
pub fn require_ort() {
    let path = std::env::var("ORT_DYLIB_PATH").unwrap_or_default();
    assert!(
        Path::new(&path).is_file(),
        "these tests need ONNX Runtime: run `source scripts/setup.sh` first (ORT_DYLIB_PATH={path:?})"
    );
}

/// A JSON array of numbers from a reference fixture, as f32.
pub fn floats(value: &serde_json::Value) -> Vec<f32> {
    value
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| v.as_f64().expect("a number") as f32)
        .collect()
}

/// A JSON array of number arrays, as rows of f32.
pub fn rows_f32(value: &serde_json::Value) -> Vec<Vec<f32>> {
    value
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(floats)
        .collect()
}
