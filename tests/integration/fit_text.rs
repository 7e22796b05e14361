//! `trustflow fit-text` and the `pseudo_label` stage's `head` kind with the real
//! paraphrase-MiniLM-L3-v2 encoder (issue 3, item 4, path (b)): fit on the generated
//! corpus's `train` split of the `source` domain, measure accuracy on its `test` split
//! (both domains) against the true labels, then label the corpus in a
//! decode -> clean_caption -> pseudo_label(head) pipeline.
//!
//! Needs `source scripts/setup.sh` (ORT_DYLIB_PATH, LIBTORCH, TRUSTFLOW_MINILM_DIR,
//! TRUSTFLOW_MINILM_TOKENIZER).

use crate::common;

use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, FixedSizeListArray};
use arrow::datatypes::{Float32Type, Int64Type};
use trustflow::bench::corpus::CLASSES;
use trustflow_engine::plan::{self, Overrides};
use trustflow_engine::run::{self, RunOptions};
use trustflow_engine::stages::StageConfig;
use trustflow_engine::stages::pseudo_label::{
    PSEUDO_LABEL, PSEUDO_LABEL_NAME, PSEUDO_PROB, PseudoLabelConfig, PseudoLabelStage, TEXT_FEATURE,
};
use trustflow_train::text_head::{
    MINILM_DIR_ENV, MINILM_TOKENIZER_ENV, SentenceEncoder, TextHead, accuracy, read_labelled,
};

/// Held-out accuracy the head must reach on the `test` split (captions are 10% of the
/// wrong class and 15% noisy, so about 0.85 is expected).
const MIN_TEST_ACCURACY: f64 = 0.75;

fn minilm() -> (PathBuf, PathBuf) {
    let get = |var: &str| {
        let value = std::env::var_os(var).unwrap_or_else(|| {
            panic!("{var} is unset: run `source scripts/setup.sh` (it installs MiniLM)")
        });
        let path = PathBuf::from(value);
        assert!(
            path.exists(),
            "{var}={} does not exist: rerun `source scripts/setup.sh`",
            path.display()
        );
        path
    };
    let ort = std::env::var("ORT_DYLIB_PATH").unwrap_or_default();
    assert!(
        Path::new(&ort).is_file(),
        "these tests need ONNX Runtime: run `source scripts/setup.sh` first"
    );
    (get(MINILM_DIR_ENV), get(MINILM_TOKENIZER_ENV))
}

#[test]
fn fit_text_reaches_held_out_accuracy_and_labels_a_pipeline() {
    let (encoder_dir, tokenizer) = minilm();
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    let summary = common::corpus(&corpus, 1500, 2, 7, 64);
    let shards: Vec<String> = summary
        .shards
        .iter()
        .map(|p| p.display().to_string())
        .collect();

    // Fit through the command line on the train split.
    let head_file = dir.path().join("heads/text_head.safetensors");
    let mut args = vec!["fit-text", "--train"];
    args.extend(shards.iter().map(String::as_str));
    let head_arg = head_file.display().to_string();
    let classes = CLASSES.join(",");
    args.extend([
        "--out",
        &head_arg,
        "--split",
        "train",
        "--where",
        "domain=source",
        "--classes",
        &classes,
        "--epochs",
        "8",
    ]);
    let output = common::run_ok(&args);
    let metrics: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    println!("fit-text metrics: {metrics}");
    let train_acc = metrics["train_accuracy"].as_f64().unwrap();
    let held_acc = metrics["held_out_accuracy"].as_f64().unwrap();
    assert!(metrics["rows_used"].as_u64().unwrap() > 400);
    assert!(metrics["rows_skipped_filter"].as_u64().unwrap() > 600);
    assert!(metrics["rows_skipped_null"].as_u64().unwrap() > 0);
    assert!(train_acc > 0.8, "train accuracy {train_acc}");
    assert!(held_acc > 0.7, "held-out accuracy {held_acc}");
    assert!(head_file.is_file());
    assert!(PathBuf::from(format!("{head_arg}.json")).is_file());

    // Evaluate on the test split against the true labels.
    let head = TextHead::load(&head_file).unwrap();
    assert_eq!(head.meta.classes, CLASSES);
    assert_eq!(head.hidden(), 128);
    let encoder = SentenceEncoder::load(&encoder_dir, &tokenizer, &Default::default()).unwrap();
    assert_eq!(encoder.dim(), 384);
    let test = read_labelled(
        &summary.shards,
        None,
        "label",
        &[("split".to_string(), "test".to_string())],
    )
    .unwrap();
    assert!(test.labels.len() > 200, "{} test rows", test.labels.len());
    let captions: Vec<&str> = test.captions.iter().map(String::as_str).collect();
    let x = encoder.embed(&captions).unwrap();
    let test_acc = accuracy(&head.predict(&x), &test.labels);
    println!(
        "test split: {} rows ({} skipped null), accuracy {test_acc:.4}",
        test.labels.len(),
        test.skipped_null
    );
    assert!(
        test_acc >= MIN_TEST_ACCURACY,
        "test accuracy {test_acc} < {MIN_TEST_ACCURACY}"
    );

    // The pipeline: decode -> clean_caption -> pseudo_label(head), encoder from the env.
    let out = dir.path().join("out");
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\nstages:\n  - type: decode\n  - type: clean_caption\n    \
         on_missing: quarantine\n  - type: pseudo_label\n    workers: 2\n    \
         head: heads/text_head.safetensors\n    labels: [{}]\n\
         sink:\n  path: \"{}\"\nruntime:\n  batch_size: 64\n",
        corpus.display(),
        CLASSES.join(", "),
        out.display()
    );
    let file = dir.path().join("labels.yaml");
    let pipeline = trustflow_engine::spec::parse_str(&yaml, &file).unwrap();
    trustflow_engine::spec::validate(&pipeline).unwrap();
    let plan = plan::build(pipeline, &Overrides::default()).unwrap();
    for column in [PSEUDO_LABEL, PSEUDO_PROB, TEXT_FEATURE, PSEUDO_LABEL_NAME] {
        assert!(
            plan.output_schema.field_with_name(column).is_ok(),
            "{column}"
        );
    }
    let report = run::execute(plan, RunOptions::default()).unwrap();
    assert!(report.invariant_holds);
    assert_eq!(report.rows_in, report.rows_out + report.rows_quarantined);
    assert!(report.rows_out > 1000);
    let (mut rows, mut hits) = (0usize, 0usize);
    for shard in common::shard_files(&out) {
        let batch = common::read_parquet(&shard);
        rows += batch.num_rows();
        let label = batch
            .column_by_name(PSEUDO_LABEL)
            .unwrap()
            .as_primitive::<Int64Type>();
        assert_eq!(label.null_count(), 0);
        let truth = batch
            .column_by_name("label")
            .unwrap()
            .as_primitive::<Int64Type>();
        hits += (0..batch.num_rows())
            .filter(|&i| label.value(i) == truth.value(i))
            .count();
        let names = common::strings(&batch, PSEUDO_LABEL_NAME);
        for (i, name) in names.iter().enumerate() {
            assert_eq!(name.as_deref(), Some(CLASSES[label.value(i) as usize]));
        }
        let prob = batch
            .column_by_name(PSEUDO_PROB)
            .unwrap()
            .as_primitive::<Float32Type>();
        assert_eq!(prob.null_count(), 0);
        assert!(prob.values().iter().all(|p| (0.1..=1.0).contains(p)));
        let features: &FixedSizeListArray = batch
            .column_by_name(TEXT_FEATURE)
            .unwrap()
            .as_fixed_size_list();
        assert_eq!(features.value_length(), 128);
        assert_eq!(features.null_count(), 0);
        let values = features.values().as_primitive::<Float32Type>();
        assert!(values.values().iter().all(|x| *x >= 0.0 && x.is_finite()));
    }
    assert_eq!(rows as u64, report.rows_out);
    let pipeline_acc = hits as f64 / rows as f64;
    println!("pipeline: {rows} rows labelled, accuracy vs true labels {pipeline_acc:.4}");
    assert!(pipeline_acc >= MIN_TEST_ACCURACY, "{pipeline_acc}");
}

#[test]
fn head_config_needs_exactly_one_classifier_and_names_missing_files() {
    let mut config = PseudoLabelConfig::for_model("m");
    config.files.head = Some("head.safetensors".into());
    let fields: Vec<String> = config.validate().into_iter().map(|p| p.0).collect();
    assert_eq!(fields, ["head"]);
    config.files.model = None;
    assert!(config.validate().is_empty());
    config.files.classifier_model = Some("x.onnx".into());
    let fields: Vec<String> = config.validate().into_iter().map(|p| p.0).collect();
    assert_eq!(fields, ["classifier_model"]);

    let mut config = PseudoLabelConfig::for_model("unused");
    config.files.model = None;
    config.files.head = Some("/nonexistent/head.safetensors".into());
    let err = PseudoLabelStage::new("label".into(), config)
        .expect_err("a missing head must fail")
        .to_string();
    assert!(err.contains("/nonexistent/head.safetensors"), "{err}");
    assert!(err.contains("fit-text"), "{err}");
}
