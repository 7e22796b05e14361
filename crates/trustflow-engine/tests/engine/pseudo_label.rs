//! Parity of the `pseudo_label` stage with Hugging Face transformers on a tiny random
//! DistilBERT sequence classifier (fixtures made by
//! scripts/fixtures/make_text_classifier.py; no Python at test time), its behaviour on
//! null captions, in a pipeline, and on bad models.
//!
//! Needs ONNX Runtime: `source scripts/setup.sh` (sets ORT_DYLIB_PATH).

use trustflow_testutil as common;

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, Schema};
use common::{floats, require_ort, rows_f32};
use serde_json::Value;
use trustflow_engine::plan::{self, Overrides};
use trustflow_engine::run::{self, RunOptions};
use trustflow_engine::stages::StageConfig;
use trustflow_engine::stages::pseudo_label::{
    PSEUDO_LABEL, PSEUDO_LABEL_NAME, PSEUDO_PROB, PseudoLabelConfig, PseudoLabelStage, TEXT_FEATURE,
};
use trustflow_engine::stages::{Stage, StageKind};

const LOGIT_TOLERANCE: f32 = 1e-4;
const PROB_TOLERANCE: f32 = 1e-5;

fn fixtures() -> PathBuf {
    trustflow_testutil::repo_root().join("tests/fixtures/text_classifier")
}

fn model_dir() -> PathBuf {
    fixtures().join("model")
}

fn reference() -> &'static Value {
    static REF: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    REF.get_or_init(|| {
        let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

fn ints(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn stage(config: PseudoLabelConfig) -> PseudoLabelStage {
    require_ort();
    PseudoLabelStage::new("pseudo_label".to_string(), config).unwrap()
}

fn default_stage() -> &'static PseudoLabelStage {
    static STAGE: std::sync::OnceLock<PseudoLabelStage> = std::sync::OnceLock::new();
    STAGE.get_or_init(|| {
        stage(PseudoLabelConfig::for_model(
            model_dir().display().to_string(),
        ))
    })
}

fn batch(captions: Vec<Option<String>>) -> RecordBatch {
    let captions: ArrayRef = Arc::new(StringArray::from(captions));
    let schema = Schema::new(vec![Field::new("caption", DataType::Utf8, true)]);
    RecordBatch::try_new(Arc::new(schema), vec![captions]).unwrap()
}

fn feature_rows(column: &ArrayRef) -> Vec<Option<Vec<f32>>> {
    let list: &FixedSizeListArray = column.as_fixed_size_list();
    (0..list.len())
        .map(|i| {
            list.is_valid(i).then(|| {
                list.value(i)
                    .as_primitive::<Float32Type>()
                    .values()
                    .to_vec()
            })
        })
        .collect()
}

#[test]
fn token_ids_match_transformers() {
    let stage = default_stage();
    let max_length = reference()["max_length"].as_u64().unwrap() as usize;
    assert_eq!(stage.max_length(), max_length);
    let captions = strings(&reference()["captions"]);
    let ids = reference()["input_ids"].as_array().unwrap();
    let masks = reference()["attention_mask"].as_array().unwrap();
    let mut truncated = 0;
    for (i, caption) in captions.iter().enumerate() {
        let want: Vec<u32> = ints(&ids[i])
            .into_iter()
            .zip(ints(&masks[i]))
            .filter(|(_, m)| *m == 1)
            .map(|(id, _)| id as u32)
            .collect();
        let have = stage.encode(caption).unwrap();
        assert_eq!(have, want, "caption {i}: {caption:?}");
        if have.len() == max_length {
            truncated += 1;
        }
    }
    assert!(truncated >= 1, "no caption reached max_length");
}

#[test]
fn logits_probabilities_labels_and_features_match_transformers() {
    let stage = default_stage();
    assert_eq!(stage.num_classes(), 10);
    assert_eq!(stage.feature_dim(), 32);
    let captions = strings(&reference()["captions"]);
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let (logits, features) = stage.classify(&refs).unwrap();
    let want_logits = rows_f32(&reference()["logits"]);
    let want_features = rows_f32(&reference()["features"]);
    let (mut dl, mut df) = (0f32, 0f32);
    for i in 0..captions.len() {
        dl = dl.max(max_abs_diff(&logits[i * 10..(i + 1) * 10], &want_logits[i]));
        df = df.max(max_abs_diff(
            &features[i * 32..(i + 1) * 32],
            &want_features[i],
        ));
    }
    eprintln!("batched ONNX vs transformers: logits {dl:e}, features {df:e}");
    assert!(dl <= LOGIT_TOLERANCE && df <= LOGIT_TOLERANCE);
    // Each caption alone (no padding) gives the same numbers.
    let (mut sl, mut sf) = (0f32, 0f32);
    for (i, caption) in refs.iter().enumerate() {
        let (l, f) = stage.classify(&[caption]).unwrap();
        sl = sl.max(max_abs_diff(&l, &want_logits[i]));
        sf = sf.max(max_abs_diff(&f, &want_features[i]));
    }
    eprintln!("one caption per ONNX call vs transformers: logits {sl:e}, features {sf:e}");
    assert!(sl <= LOGIT_TOLERANCE && sf <= LOGIT_TOLERANCE);
}

#[test]
fn stage_matches_transformers_and_rejects_null_captions() {
    let labels_names = strings(&reference()["labels_names"]);
    let mut config = PseudoLabelConfig::for_model(model_dir().display().to_string());
    config.labels = Some(labels_names.clone());
    let stage = stage(config);
    let captions = strings(&reference()["captions"]);
    let n = captions.len();
    // The reference captions with a null in the middle and at the end.
    let mut rows: Vec<Option<String>> = captions.iter().cloned().map(Some).collect();
    rows.insert(3, None);
    rows.push(None);
    let batch = batch(rows);
    let fields = stage.output_fields(&batch.schema()).unwrap();
    let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [PSEUDO_LABEL, PSEUDO_PROB, TEXT_FEATURE, PSEUDO_LABEL_NAME]
    );
    assert_eq!(fields[0].data_type(), &DataType::Int64);
    assert_eq!(fields[1].data_type(), &DataType::Float32);
    assert!(
        matches!(fields[2].data_type(), DataType::FixedSizeList(item, 32)
        if item.data_type() == &DataType::Float32)
    );

    let output = stage.process(&batch).unwrap();
    for (column, field) in output.columns.iter().zip(&fields) {
        assert_eq!(column.data_type(), field.data_type());
        assert_eq!(column.len(), batch.num_rows());
    }
    assert_eq!(
        output.rejected,
        [
            (3, "caption `caption` is null".to_string()),
            (n + 1, "caption `caption` is null".to_string()),
        ]
    );
    let label = output.columns[0].as_primitive::<Int64Type>();
    let prob = output.columns[1].as_primitive::<Float32Type>();
    let features = feature_rows(&output.columns[2]);
    let label_names = output.columns[3].as_string::<i32>();
    let want_labels = ints(&reference()["labels"]);
    let want_prob = floats(&reference()["pseudo_prob"]);
    let want_probabilities = rows_f32(&reference()["probabilities"]);
    let want_features = rows_f32(&reference()["features"]);
    let (mut dp, mut df) = (0f32, 0f32);
    for i in 0..n {
        let row = if i < 3 { i } else { i + 1 };
        assert_eq!(label.value(row), want_labels[i], "row {i}");
        assert_eq!(
            label_names.value(row),
            labels_names[want_labels[i] as usize]
        );
        assert_eq!(want_prob[i], want_probabilities[i][want_labels[i] as usize]);
        dp = dp.max((prob.value(row) - want_prob[i]).abs());
        let z = features[row].as_ref().unwrap();
        assert!(z.iter().all(|x| *x >= 0.0), "row {i}: negative feature");
        df = df.max(max_abs_diff(z, &want_features[i]));
    }
    eprintln!("stage vs transformers: pseudo_prob {dp:e}, text_feature {df:e}");
    assert!(dp <= PROB_TOLERANCE && df <= LOGIT_TOLERANCE);
    for row in [3, n + 1] {
        assert!(label.is_null(row) && prob.is_null(row) && features[row].is_none());
        assert!(label_names.is_null(row));
    }
    // A batch of nulls only: no ONNX call, every row rejected.
    let output = stage.process(&self::batch(vec![None, None])).unwrap();
    assert_eq!(output.rejected.len(), 2);
    assert_eq!(output.columns[0].null_count(), 2);
}

#[test]
fn caption_column_defaults_to_caption_clean() {
    let stage = default_stage();
    let schema = Schema::new(vec![
        Field::new("caption", DataType::Utf8, true),
        Field::new("caption_clean", DataType::Utf8, true),
    ]);
    assert_eq!(stage.caption_column(&schema), "caption_clean");
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(StringArray::from(vec![Some("raw"), Some("raw")])),
            Arc::new(StringArray::from(vec![Some("a dog"), None])),
        ],
    )
    .unwrap();
    let output = stage.process(&batch).unwrap();
    assert_eq!(
        output.rejected,
        [(1, "caption `caption_clean` is null".to_string())]
    );
    let no_caption = Schema::new(vec![Field::new("image", DataType::LargeBinary, true)]);
    let err = stage.output_fields(&no_caption).unwrap_err().to_string();
    assert!(err.contains("`caption`"), "{err}");
}

// ---------------------------------------------------------------------------- pipeline

#[test]
fn pipeline_decode_clean_pseudo_label_runs_on_the_sample_corpus() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let samples = trustflow_testutil::repo_root().join("pipelines/samples/bytes");
    let out = dir.path().join("out");
    // The model path is relative to the pipeline file's folder.
    let link = dir.path().join("classifier");
    std::os::unix::fs::symlink(model_dir(), &link).unwrap();
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\nstages:\n  - type: decode\n  - type: clean_caption\n    \
         on_missing: quarantine\n  - type: pseudo_label\n    workers: 2\n    model: classifier\n\
         sink:\n  path: \"{}\"\nruntime:\n  batch_size: 5\n",
        samples.display(),
        out.display()
    );
    let file = dir.path().join("labels.yaml");
    let pipeline = trustflow_engine::spec::parse_str(&yaml, &file).unwrap();
    trustflow_engine::spec::validate(&pipeline).unwrap();
    assert!(matches!(
        pipeline.spec.stages[2].kind,
        StageKind::PseudoLabel(_)
    ));
    let plan = plan::build(pipeline, &Overrides::default()).unwrap();
    for column in [PSEUDO_LABEL, PSEUDO_PROB, TEXT_FEATURE] {
        assert!(
            plan.output_schema.field_with_name(column).is_ok(),
            "{column}"
        );
    }
    assert!(
        plan.output_schema
            .field_with_name(PSEUDO_LABEL_NAME)
            .is_err()
    );
    let report = run::execute(plan, RunOptions::default()).unwrap();
    assert!(report.invariant_holds);
    assert_eq!(report.rows_in, report.rows_out + report.rows_quarantined);
    assert!(report.rows_out > 0);
    let mut rows = 0;
    for shard in common::shard_files(&out) {
        let batch = common::read_parquet(&shard);
        rows += batch.num_rows();
        let label = batch
            .column_by_name(PSEUDO_LABEL)
            .unwrap()
            .as_primitive::<Int64Type>();
        assert_eq!(label.null_count(), 0);
        assert!(label.values().iter().all(|l| (0..10).contains(l)));
        let prob = batch
            .column_by_name(PSEUDO_PROB)
            .unwrap()
            .as_primitive::<Float32Type>();
        assert_eq!(prob.null_count(), 0);
        assert!(prob.values().iter().all(|p| (0.1..=1.0).contains(p)));
        for z in feature_rows(batch.column_by_name(TEXT_FEATURE).unwrap()) {
            let z = z.unwrap();
            assert_eq!(z.len(), 32);
            assert!(z.iter().all(|x| *x >= 0.0 && x.is_finite()));
        }
    }
    assert_eq!(rows as u64, report.rows_out);
    let quarantined = common::quarantined(&out);
    assert_eq!(quarantined.len() as u64, report.rows_quarantined);
    for (stage, reason) in quarantined.values() {
        assert!(
            ["source", "decode", "clean_caption"].contains(&stage.as_str()),
            "{stage}: {reason}"
        );
    }
}

// ------------------------------------------------------------------------- bad models

fn build_error(config: PseudoLabelConfig) -> String {
    require_ort();
    PseudoLabelStage::new("labels".to_string(), config)
        .expect_err("stage build must fail")
        .to_string()
}

#[test]
fn plan_fails_before_reading_data_when_the_model_folder_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let samples = trustflow_testutil::repo_root().join("pipelines/samples/bytes");
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\nstages:\n  - type: pseudo_label\n    model: no-such-model\n\
         sink:\n  path: \"{}\"\n",
        samples.display(),
        dir.path().join("out").display()
    );
    let pipeline =
        trustflow_engine::spec::parse_str(&yaml, &dir.path().join("missing.yaml")).unwrap();
    trustflow_engine::spec::validate(&pipeline).unwrap();
    let err = plan::build(pipeline, &Overrides::default())
        .err()
        .expect("plan must fail")
        .to_string();
    let folder = dir.path().join("no-such-model");
    assert!(
        err.contains("stages[0]")
            && err.contains(&format!("{}: model folder not found", folder.display())),
        "{err}"
    );
    assert!(!dir.path().join("out").exists());
}

#[test]
fn model_errors_name_the_file_and_the_output() {
    // A classifier exported with `logits` only (what a plain Optimum export gives).
    let logits_only = fixtures().join("logits_only.onnx");
    let mut config = PseudoLabelConfig::for_model(model_dir().display().to_string());
    config.files.classifier_model = Some(logits_only.display().to_string());
    let err = build_error(config);
    assert!(
        err.contains(&format!(
            "{}: expected an output `features`, found outputs: logits",
            logits_only.display()
        )) && err.contains("Optimum"),
        "{err}"
    );
    // feature_output naming an output the model lacks.
    let mut config = PseudoLabelConfig::for_model(model_dir().display().to_string());
    config.feature_output = "pooled".into();
    let err = build_error(config);
    let model = model_dir().join("model.onnx");
    assert!(
        err.contains(&format!(
            "{}: expected an output `pooled`, found outputs: logits, features",
            model.display()
        )),
        "{err}"
    );
    // Class names that do not match the model.
    let mut config = PseudoLabelConfig::for_model(model_dir().display().to_string());
    config.labels = Some(vec!["a".into(), "b".into()]);
    let err = build_error(config);
    assert!(
        err.contains("output `logits` has 10 classes but `labels` names 2"),
        "{err}"
    );
    // max_length beyond the model's positions.
    let mut config = PseudoLabelConfig::for_model(model_dir().display().to_string());
    config.max_length = Some(41);
    let err = build_error(config);
    assert!(
        err.contains("config.json: max_length 41 exceeds the model's max_position_embeddings (40)"),
        "{err}"
    );
    // A missing folder.
    let err = build_error(PseudoLabelConfig::for_model("/nonexistent/classifier"));
    assert!(
        err.starts_with("stage `labels`: /nonexistent/classifier: model folder not found"),
        "{err}"
    );
    // Explicit files without a folder work (max_length given instead of config.json).
    let mut config = PseudoLabelConfig::for_model("unused");
    config.files.model = None;
    config.files.classifier_model = Some(model_dir().join("model.onnx").display().to_string());
    config.files.tokenizer = Some(model_dir().join("tokenizer.json").display().to_string());
    config.max_length = Some(16);
    assert!(config.validate().is_empty());
    let stage = stage(config);
    assert_eq!(stage.max_length(), 16);
    assert_eq!(stage.num_classes(), 10);
}

#[test]
fn config_parses_validates_and_describes_itself() {
    let kind = StageKind::from_value(
        "pseudo_label",
        serde_json::json!({"model": "m", "labels": ["x", "y"], "max_length": 64}),
        "stages[0]",
    )
    .unwrap();
    assert_eq!(kind.type_name(), "pseudo_label");
    assert!(kind.config().validate().is_empty());
    let err = StageKind::from_value(
        "pseudo_label",
        serde_json::json!({"model": "m", "feature": "z"}),
        "stages[0]",
    )
    .unwrap_err();
    assert!(err.1.contains("feature"), "{err:?}");
    let kind = StageKind::from_value(
        "pseudo_label",
        serde_json::json!({"model": "m", "logits_output": "z", "feature_output": "z"}),
        "stages[0]",
    )
    .unwrap();
    assert_eq!(kind.config().validate()[0].0, "feature_output");
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(
            trustflow_testutil::repo_root().join("schemas/pipeline.schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let text = schema.to_string();
    assert!(text.contains("\"pseudo_label\"") && text.contains("feature_output"));
}
