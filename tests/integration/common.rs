//! Helpers shared by the integration tests: corpora, pipeline files, the binary, and
//! reading Parquet back.
#![allow(dead_code)]

pub use trustflow_testutil::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
