//! The digits benchmark (src/bench/digits.rs, docs/digits.md) and its committed demo
//! models (models/digits/, trained by scripts/demo_models/train_demo_models.py) from
//! outside the crate: the models load in the engine's `clip_score` and `caption` stages
//! and do what they were trained for on a reduced benchmark.
//!
//! Needs `source scripts/setup.sh` (TRUSTFLOW_MNIST_CSV, TRUSTFLOW_SKLEARN_DATA,
//! ORT_DYLIB_PATH, TRUSTFLOW_MINILM_DIR, TRUSTFLOW_MINILM_TOKENIZER).
//!
//! `write_full_benchmark` is ignored: it writes the full benchmark where
//! `TRUSTFLOW_DIGITS_OUT` says, for scripts/demo_models/train_demo_models.py:
//!
//!     TRUSTFLOW_DIGITS_OUT=/tmp/digits cargo test --test integration -- --ignored write_full

use crate::common;

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, Int64Type};
use common::require_ort;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use trustflow::bench::digits::{DigitsOptions, DigitsSummary, digits_named, generate_digits};
use trustflow_engine::stages::Stage;
use trustflow_engine::stages::caption::{CAPTION_FINAL, CaptionConfig, CaptionStage};
use trustflow_engine::stages::clip_score::{CLIP_SIMILARITY, ClipScoreConfig, ClipScoreStage};
use trustflow_train::metrics::auroc;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits")
}

fn env_path(var: &str) -> PathBuf {
    let value = std::env::var_os(var)
        .unwrap_or_else(|| panic!("{var} is unset: run `source scripts/setup.sh`"));
    PathBuf::from(value)
}

/// A reduced benchmark: `rows` per domain, one shard per folder.
fn benchmark(dir: &Path, rows: usize) -> DigitsSummary {
    generate_digits(&DigitsOptions {
        out: dir.to_path_buf(),
        max_rows_per_domain: Some(rows),
        ..DigitsOptions::default()
    })
    .unwrap()
}

/// All rows of a folder as one batch.
fn read_folder(summary: &DigitsSummary, domain: &str, split: &str) -> RecordBatch {
    let folder = summary.folder(domain, split).unwrap();
    let batches: Vec<RecordBatch> = folder
        .shards
        .iter()
        .flat_map(|p| {
            ParquetRecordBatchReaderBuilder::try_new(File::open(p).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .map(|b| b.unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn clip_stage() -> ClipScoreStage {
    require_ort();
    let mut config = ClipScoreConfig::for_model(models().join("clip").to_string_lossy());
    let minilm = env_path("TRUSTFLOW_MINILM_DIR").join("paraphrase-MiniLM-L3-v2.onnx");
    config.files.text_model = Some(minilm.to_string_lossy().into_owned());
    config.files.tokenizer = Some(
        env_path("TRUSTFLOW_MINILM_TOKENIZER")
            .to_string_lossy()
            .into_owned(),
    );
    config.text_output = "461".into();
    ClipScoreStage::new("clip_score".into(), config).unwrap()
}

/// The CLIP image tower with MiniLM as its text tower: cos(image, caption) separates
/// right from wrong captions on target rows (the point of TRUST's weights), and the
/// learned logit scale comes from config.json.
#[test]
fn demo_clip_separates_right_from_wrong_captions_on_targets() {
    let dir = tempfile::tempdir().unwrap();
    let summary = benchmark(dir.path(), 300);
    let stage = clip_stage();
    assert_eq!(stage.embedding_dim(), 384);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models().join("clip/config.json")).unwrap())
            .unwrap();
    let learned = config["learned_logit_scale"].as_f64().unwrap();
    assert!((stage.logit_scale() - learned).abs() < 1e-3 * learned);
    for domain in ["target_a", "target_b"] {
        let batch = read_folder(&summary, domain, "train");
        let output = stage.process(&batch).unwrap();
        let fields = stage.output_fields(&batch.schema()).unwrap();
        let at = fields
            .iter()
            .position(|f| f.name() == CLIP_SIMILARITY)
            .unwrap();
        let cos = output.columns[at].as_primitive::<Float32Type>();
        let kind = batch
            .column_by_name("caption_kind")
            .unwrap()
            .as_string::<i32>();
        let (mut scores, mut right) = (Vec::new(), Vec::new());
        for i in 0..batch.num_rows() {
            match kind.value(i) {
                "right" | "wrong" => {
                    assert!(cos.is_valid(i));
                    scores.push(f64::from(cos.value(i)));
                    right.push(kind.value(i) == "right");
                }
                // Missing captions are rejected (no caption to score).
                "missing" => assert!(output.rejected.iter().any(|(r, _)| *r == i)),
                _ => {}
            }
        }
        let a = auroc(&scores, &right).unwrap();
        eprintln!("{domain}: AUROC of cos for right vs wrong captions {a:.3}");
        assert!(a >= 0.75, "{domain}: AUROC {a}");
    }
}

/// The captioner names the right digit for most source test images (its training
/// domain) and for more than chance on the targets.
#[test]
fn demo_captioner_names_digits() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let summary = benchmark(dir.path(), 200);
    let stage = CaptionStage::new(
        "caption".into(),
        CaptionConfig::for_model(models().join("captioner").to_string_lossy()),
    )
    .unwrap();
    for (domain, floor) in [("source", 0.8), ("target_a", 0.4), ("target_b", 0.4)] {
        let batch = read_folder(&summary, domain, "test");
        let images = batch.column_by_name("image").unwrap().as_binary::<i64>();
        let labels = batch
            .column_by_name("label")
            .unwrap()
            .as_primitive::<Int64Type>();
        let mut pixels = Vec::new();
        for i in 0..batch.num_rows() {
            stage.pixels(images.value(i), &mut pixels).unwrap();
        }
        let captions = stage.generate(batch.num_rows(), pixels).unwrap();
        let right = captions
            .iter()
            .enumerate()
            .filter(|(i, c)| digits_named(c) == [labels.value(*i) as u8])
            .count();
        let share = right as f64 / captions.len() as f64;
        eprintln!(
            "{domain}: {right}/{} captions name the right digit, e.g. {:?}",
            captions.len(),
            &captions[..3]
        );
        assert!(share >= floor, "{domain}: {share}");
    }
    // In a batch, only rows without a caption get one.
    let batch = read_folder(&summary, "target_a", "train");
    let output = stage.process(&batch).unwrap();
    let fields = stage.output_fields(&batch.schema()).unwrap();
    let at = fields
        .iter()
        .position(|f| f.name() == CAPTION_FINAL)
        .unwrap();
    let finals = output.columns[at].as_string::<i32>();
    let given = batch.column_by_name("caption").unwrap().as_string::<i32>();
    for i in 0..batch.num_rows() {
        assert!(finals.is_valid(i));
        if given.is_valid(i) {
            assert_eq!(finals.value(i), given.value(i));
        }
    }
}

#[test]
#[ignore = "writes the full benchmark to $TRUSTFLOW_DIGITS_OUT"]
fn write_full_benchmark() {
    let out = std::env::var_os("TRUSTFLOW_DIGITS_OUT")
        .map(PathBuf::from)
        .expect("set TRUSTFLOW_DIGITS_OUT to the output folder");
    let summary = generate_digits(&DigitsOptions {
        out,
        ..DigitsOptions::default()
    })
    .unwrap();
    for f in &summary.folders {
        println!(
            "{}/{}: {} rows {:?}",
            f.domain, f.split, f.rows, f.caption_kinds
        );
    }
}
