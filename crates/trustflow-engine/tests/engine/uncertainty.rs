//! The `uncertainty` stage against the golden files of `scripts/fixtures/uncertainty.py`
//! (an independent NumPy/torch reference of docs/method.md section 3; no Python runs here),
//! plus its grouping, rejected rows, schema checks and pipeline-file settings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, ListArray, StringArray,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Float32Type, Schema};
use arrow::record_batch::RecordBatch;
use serde_json::Value;
use trustflow_engine::Error;
use trustflow_engine::columns::{ERROR, ERROR_STAGE, ID};
use trustflow_engine::error::SpecIssues;
use trustflow_engine::runtime::apply_stage;
use trustflow_engine::spec::{parse_str, validate};
use trustflow_engine::stages::StageConfig;
use trustflow_engine::stages::uncertainty::{
    PSEUDO_WEIGHT, UncertaintyConfig, UncertaintyStage, WeightMethod,
};
use trustflow_engine::stages::{Stage, StageKind, StageOutput};

const IMAGE: &str = "clip_image_embedding";
const TEXT: &str = "clip_text_embedding";
/// Largest accepted difference from the reference weight (the issue's parity bound).
const TOLERANCE: f64 = 1e-5;

/// Every golden file the fixture script writes.
const CASES: [&str; 8] = [
    "random_groups",
    "group_of_one",
    "group_size_one",
    "identical_captions",
    "own_caption_best",
    "large_logit_scale",
    "temperature_one",
    "clamped_cosine",
];

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

fn fixture_dir() -> PathBuf {
    trustflow_testutil::repo_root().join("tests/fixtures/uncertainty")
}

struct Case {
    name: String,
    config: UncertaintyConfig,
    dim: i32,
    images: Vec<Option<Vec<f32>>>,
    texts: Vec<Option<Vec<f32>>>,
    groups: Option<Vec<usize>>,
    expected: Vec<f64>,
}

fn matrix(value: &Value) -> Vec<Option<Vec<f32>>> {
    value
        .as_array()
        .expect("a list of rows")
        .iter()
        .map(|row| {
            // Each number is the exact decimal of a float32.
            let row: Vec<f32> = row
                .as_array()
                .expect("a row")
                .iter()
                .map(|x| x.as_f64().expect("a number") as f32)
                .collect();
            Some(row)
        })
        .collect()
}

fn load(name: &str) -> Case {
    let path = fixture_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/fixtures/uncertainty.py)",
            path.display()
        )
    });
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["case"], name);
    let method = match v["method"].as_str().unwrap() {
        "batch_softmax" => WeightMethod::BatchSoftmax,
        "clamped_cosine" => WeightMethod::ClampedCosine,
        other => panic!("unknown method {other}"),
    };
    let config = UncertaintyConfig {
        group_size: v["group_size"].as_u64().unwrap() as usize,
        temperature: v["temperature"].as_f64().unwrap(),
        logit_scale: v["logit_scale"].as_f64().unwrap(),
        method,
        ..UncertaintyConfig::default()
    };
    assert!(
        config.validate().is_empty(),
        "{name}: {:?}",
        config.validate()
    );
    let groups = v["groups"].as_array().map(|g| {
        g.iter()
            .map(|n| n.as_u64().unwrap() as usize)
            .collect::<Vec<_>>()
    });
    Case {
        name: name.to_string(),
        config,
        dim: v["dim"].as_i64().unwrap() as i32,
        images: matrix(&v["image_embeddings"]),
        texts: matrix(&v["text_embeddings"]),
        groups,
        expected: v["expected_weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect(),
    }
}

fn embeddings(rows: &[Option<Vec<f32>>], dim: i32) -> ArrayRef {
    Arc::new(
        FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
            rows.iter().map(|r| {
                r.as_ref()
                    .map(|v| v.iter().map(|x| Some(*x)).collect::<Vec<_>>())
            }),
            dim,
        ),
    )
}

/// A batch with an `id` column and the two embedding columns under the given names.
fn batch_named(
    images: &[Option<Vec<f32>>],
    texts: &[Option<Vec<f32>>],
    dim: i32,
    names: (&str, &str),
) -> RecordBatch {
    let ids: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..images.len()).map(|i| format!("row{i}")),
    ));
    let (i, t) = (embeddings(images, dim), embeddings(texts, dim));
    let schema = Schema::new(vec![
        Field::new(ID, DataType::Utf8, false),
        Field::new(names.0, i.data_type().clone(), true),
        Field::new(names.1, t.data_type().clone(), true),
    ]);
    RecordBatch::try_new(Arc::new(schema), vec![ids, i, t]).unwrap()
}

fn batch(images: &[Option<Vec<f32>>], texts: &[Option<Vec<f32>>], dim: i32) -> RecordBatch {
    batch_named(images, texts, dim, (IMAGE, TEXT))
}

fn stage(config: UncertaintyConfig) -> UncertaintyStage {
    UncertaintyStage::new("uncertainty".to_string(), config).unwrap()
}

fn weights(output: &StageOutput) -> Vec<Option<f32>> {
    assert_eq!(output.columns.len(), 1);
    let w = output.columns[0].as_primitive::<Float32Type>();
    (0..w.len())
        .map(|i| w.is_valid(i).then(|| w.value(i)))
        .collect()
}

fn assert_close(case: &str, got: &[Option<f32>], expected: &[f64]) {
    assert_eq!(got.len(), expected.len(), "{case}: row count");
    let mut worst = 0.0f64;
    for (row, (g, e)) in got.iter().zip(expected).enumerate() {
        let g = g.unwrap_or_else(|| panic!("{case}: row {row} has no weight"));
        let diff = (f64::from(g) - e).abs();
        worst = worst.max(diff);
        assert!(
            diff <= TOLERANCE,
            "{case}: row {row}: got {g}, reference {e} (difference {diff:e})"
        );
    }
    eprintln!(
        "{case}: {} rows, max |w - reference| = {worst:.1e}",
        got.len()
    );
}

// ---------------------------------------------------------------------------------
// Parity with the reference
// ---------------------------------------------------------------------------------

#[test]
fn fixture_folder_holds_every_case() {
    let mut on_disk: Vec<String> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = CASES.iter().map(|c| format!("{c}.json")).collect();
    expected.sort();
    assert_eq!(on_disk, expected);
}

#[test]
fn weights_match_the_reference() {
    for name in CASES {
        let case = load(name);
        let rows = case.images.len();
        if let Some(groups) = &case.groups {
            assert_eq!(groups.iter().sum::<usize>(), rows, "{name}");
        }
        let stage = stage(case.config.clone());
        let batch = batch(&case.images, &case.texts, case.dim);
        let fields = stage.output_fields(&batch.schema()).unwrap();
        assert_eq!(fields, [Field::new(PSEUDO_WEIGHT, DataType::Float32, true)]);
        let output = stage.process(&batch).unwrap();
        assert!(output.rejected.is_empty(), "{name}: {:?}", output.rejected);
        assert_eq!(output.columns[0].data_type(), &DataType::Float32);
        assert_eq!(output.columns[0].null_count(), 0, "{name}");
        assert_close(&case.name, &weights(&output), &case.expected);
    }
}

#[test]
fn the_cases_show_what_they_claim() {
    let w = |name| load(name).expected;
    assert_eq!(load("random_groups").groups, Some(vec![32, 32, 6]));
    assert_eq!(w("group_of_one"), [1.0]);
    assert!(w("group_size_one").iter().all(|x| *x == 1.0));
    // The short last group (8 rows) picks among 32 captions too: no position effect.
    let same = w("identical_captions");
    assert!(same.iter().all(|x| (x - 1.0 / 32.0).abs() < 1e-12));
    assert!(w("own_caption_best")[0] > 0.999);
    let large = w("large_logit_scale");
    assert!((large[0] - 0.5).abs() < 0.05 && (0.6..0.7).contains(&large[2]));
    assert_eq!(w("clamped_cosine")[0], 0.0);
}

#[test]
fn configurable_column_names() {
    let case = load("temperature_one");
    let config = UncertaintyConfig {
        image_embedding_column: "img_vec".into(),
        text_embedding_column: "txt_vec".into(),
        ..case.config.clone()
    };
    let batch = batch_named(&case.images, &case.texts, case.dim, ("img_vec", "txt_vec"));
    let output = stage(config).process(&batch).unwrap();
    assert_close("renamed columns", &weights(&output), &case.expected);
    // The default names are not there.
    let err = stage(case.config)
        .output_fields(&batch.schema())
        .unwrap_err();
    assert!(err.to_string().contains("`clip_image_embedding`"), "{err}");
}

// ---------------------------------------------------------------------------------
// Grouping
// ---------------------------------------------------------------------------------

/// Groups are cut in each batch the stage receives: batches whose size is a multiple
/// of `group_size` give the weights of one big batch; other cuts give other groups. (A
/// batch shorter than `group_size` has no rows before it to pick among; the reader
/// never cuts a shard's tail so, see runtime's Chunker.)
#[test]
fn groups_follow_batches() {
    let case = load("random_groups");
    let stage = stage(case.config.clone());
    let run = |cuts: &[usize]| -> Vec<Option<f32>> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&case.images.len()]) {
            let b = batch(&case.images[start..end], &case.texts[start..end], case.dim);
            out.extend(weights(&stage.process(&b).unwrap()));
            start = end;
        }
        out
    };
    let whole = run(&[]);
    assert_close("whole", &whole, &case.expected);
    assert_eq!(run(&[32]), whole);
    let halves = run(&[35]);
    assert_eq!(halves[..32], whole[..32], "the first group is the same");
    assert_ne!(
        halves[32..],
        whole[32..],
        "later groups are cut differently"
    );
}

// ---------------------------------------------------------------------------------
// Bad rows
// ---------------------------------------------------------------------------------

/// FixedSizeList<Float32, 2> rows where `bad` marks null entries inside the list.
fn with_null_entries(rows: &[Option<Vec<f32>>], null_entry: Option<(usize, usize)>) -> ArrayRef {
    let dim = 2;
    let values: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.clone().unwrap_or(vec![0.0; dim]))
        .collect();
    let mut valid = vec![true; values.len()];
    if let Some((row, k)) = null_entry {
        valid[row * dim + k] = false;
    }
    let values = Float32Array::new(values.into(), Some(NullBuffer::from(valid)));
    let nulls = NullBuffer::from(rows.iter().map(Option::is_some).collect::<Vec<_>>());
    Arc::new(
        FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, true)),
            dim as i32,
            Arc::new(values),
            Some(nulls),
        )
        .unwrap(),
    )
}

#[test]
fn bad_embeddings_go_to_quarantine_with_reasons() {
    let e = |a: f32, b: f32| Some(vec![a, b]);
    let images = vec![
        e(1.0, 0.1),               // 0 kept
        None,                      // 1 null image embedding
        e(0.0, 0.0),               // 2 zero image vector
        e(f32::NAN, 1.0),          // 3 NaN
        e(0.2, 1.0),               // 4 kept
        e(1.0, 1.0),               // 5 null entry in the text embedding (below)
        e(1.0, f32::NEG_INFINITY), // 6 -inf, and a zero text vector
        e(0.7, 0.7),               // 7 kept
    ];
    let texts = vec![
        e(1.0, 0.0),
        e(1.0, 0.0),
        e(1.0, 0.0),
        e(1.0, 0.0),
        e(0.0, 1.0),
        e(1.0, 1.0),
        e(0.0, 0.0),
        e(1.0, 1.0),
    ];
    let ids: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..8).map(|i| format!("row{i}")),
    ));
    let (i, t) = (
        with_null_entries(&images, None),
        with_null_entries(&texts, Some((5, 1))),
    );
    let schema = Schema::new(vec![
        Field::new(ID, DataType::Utf8, false),
        Field::new(IMAGE, i.data_type().clone(), true),
        Field::new(TEXT, t.data_type().clone(), true),
    ]);
    let batch = RecordBatch::try_new(Arc::new(schema), vec![ids, i, t]).unwrap();
    let stage = stage(UncertaintyConfig {
        group_size: 2,
        ..UncertaintyConfig::default()
    });
    let output = stage.process(&batch).unwrap();
    let reasons: Vec<(usize, &str)> = output
        .rejected
        .iter()
        .map(|(i, r)| (*i, r.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            (1, "embedding `clip_image_embedding` is null"),
            (
                2,
                "embedding `clip_image_embedding` is the zero vector and cannot be normalised"
            ),
            (
                3,
                "embedding `clip_image_embedding` has a non-finite entry (NaN) at index 0"
            ),
            (
                5,
                "embedding `clip_text_embedding` has a null entry at index 1"
            ),
            (
                6,
                "embedding `clip_image_embedding` has a non-finite entry (-inf) at index 1; \
                 embedding `clip_text_embedding` is the zero vector and cannot be normalised"
            ),
        ]
    );
    // Kept rows 0, 4, 7 form the groups {0, 4} and {7}: the same weights as those three
    // rows alone. Row 7, a group of one, still picks among two captions (its own and
    // row 4's), so it is not given w = 1 for where it sits.
    let got = weights(&output);
    let kept = [0, 4, 7];
    let pick = |v: &[Option<Vec<f32>>]| kept.map(|k| v[k].clone()).to_vec();
    let alone = weights(
        &stage
            .process(&batch_plain(&pick(&images), &pick(&texts)))
            .unwrap(),
    );
    assert_eq!(kept.map(|k| got[k]).to_vec(), alone);
    // u7 = (0.7, 0.7), v7 = (1, 1), v4 = (0, 1): cosines 1 and 1/sqrt(2).
    let k = 100.0 / 3.0;
    let w7 = 1.0 / (1.0 + (k * (std::f64::consts::FRAC_1_SQRT_2 - 1.0)).exp());
    assert!((f64::from(got[7].unwrap()) - w7).abs() < 1e-6, "{got:?}");
    for r in [1, 2, 3, 5, 6] {
        assert_eq!(got[r], None);
    }

    // Through the runtime: kept rows get `pseudo_weight`, the others are quarantined
    // with the stage's name and the reason.
    let (ok, bad) = apply_stage(&stage, &batch).unwrap();
    let bad = bad.expect("quarantined rows");
    assert_eq!(ok.num_rows(), 3);
    let w = ok.column_by_name(PSEUDO_WEIGHT).unwrap();
    assert_eq!(w.null_count(), 0);
    let ids = bad.column_by_name(ID).unwrap().as_string::<i32>();
    let ids: Vec<_> = ids.iter().map(Option::unwrap).collect();
    assert_eq!(ids, ["row1", "row2", "row3", "row5", "row6"]);
    let stages = bad.column_by_name(ERROR_STAGE).unwrap().as_string::<i32>();
    assert!(stages.iter().all(|s| s == Some("uncertainty")));
    let errors = bad.column_by_name(ERROR).unwrap().as_string::<i32>();
    assert_eq!(errors.value(0), "embedding `clip_image_embedding` is null");
}

fn batch_plain(images: &[Option<Vec<f32>>], texts: &[Option<Vec<f32>>]) -> RecordBatch {
    batch(images, texts, 2)
}

// ---------------------------------------------------------------------------------
// Input columns
// ---------------------------------------------------------------------------------

fn schema_of(image: DataType, text: DataType) -> Schema {
    Schema::new(vec![
        Field::new(ID, DataType::Utf8, false),
        Field::new(IMAGE, image, true),
        Field::new(TEXT, text, true),
    ])
}

fn output_error(schema: &Schema) -> String {
    stage(UncertaintyConfig::default())
        .output_fields(schema)
        .unwrap_err()
        .to_string()
}

#[test]
fn missing_or_mistyped_columns_fail_at_plan_time() {
    let emb = |d| DataType::new_fixed_size_list(DataType::Float32, d, true);
    let ok = stage(UncertaintyConfig::default())
        .output_fields(&schema_of(emb(512), emb(512)))
        .unwrap();
    assert_eq!(ok, [Field::new(PSEUDO_WEIGHT, DataType::Float32, true)]);

    let only_text = Schema::new(vec![Field::new(TEXT, emb(4), true)]);
    let err = output_error(&only_text);
    assert!(
        err.starts_with("stage `uncertainty`: needs input column `clip_image_embedding`")
            && err.contains("available: clip_text_embedding"),
        "{err}"
    );
    let only_image = Schema::new(vec![Field::new(IMAGE, emb(4), true)]);
    assert!(output_error(&only_image).contains("`clip_text_embedding`"));

    let cases = [
        (
            schema_of(emb(4), DataType::Utf8),
            "input column `clip_text_embedding` has type Utf8, expected FixedSizeList<Float32, D>",
        ),
        (
            schema_of(
                DataType::new_fixed_size_list(DataType::Float64, 4, true),
                emb(4),
            ),
            "input column `clip_image_embedding` has type FixedSizeList",
        ),
        (
            schema_of(DataType::new_list(DataType::Float32, true), emb(4)),
            "input column `clip_image_embedding` has type List",
        ),
        (
            schema_of(emb(4), emb(8)),
            "embedding widths differ: `clip_image_embedding` has 4, `clip_text_embedding` has 8",
        ),
        (
            schema_of(emb(0), emb(0)),
            "input column `clip_image_embedding` has embeddings of width 0",
        ),
    ];
    for (schema, message) in cases {
        let err = output_error(&schema);
        assert!(err.contains(message), "expected {message:?} in {err:?}");
    }

    // process() checks too: a batch of variable-length lists is an error, not a panic.
    let list: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Float32Type, _, _>([Some(
        vec![Some(1.0f32)],
    )]));
    let schema = Schema::new(vec![
        Field::new(IMAGE, list.data_type().clone(), true),
        Field::new(TEXT, list.data_type().clone(), true),
    ]);
    let b = RecordBatch::try_new(Arc::new(schema), vec![list.clone(), list]).unwrap();
    let err = stage(UncertaintyConfig::default())
        .process(&b)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has type List"), "{err}");
}

// ---------------------------------------------------------------------------------
// Pipeline files
// ---------------------------------------------------------------------------------

fn pipeline(stage_yaml: &str) -> String {
    format!(
        "source:\n  paths: [data.parquet]\nstages:\n{stage_yaml}sink:\n  path: out\nruntime:\n  batch_size: 256\n"
    )
}

/// (field, message) of every issue, from whichever phase rejected the file.
fn issues(text: &str) -> Vec<(String, String)> {
    let file = Path::new("p.yaml");
    let result = parse_str(text, file).and_then(|p| validate(&p));
    match result {
        Ok(()) => panic!("expected problems in\n{text}"),
        Err(Error::Spec(SpecIssues(issues))) => issues
            .into_iter()
            .map(|i| (i.location.field, i.message))
            .collect(),
        Err(other) => panic!("not a spec error: {other}"),
    }
}

#[test]
fn pipeline_file_with_an_uncertainty_stage() {
    let text = pipeline(
        "  - type: uncertainty
    name: weights
    workers: 2
    group_size: 64
    temperature: 2.5
    logit_scale: 50
    method: batch_softmax
    image_embedding_column: img
    text_embedding_column: txt
  - type: uncertainty
    name: cosine
    method: clamped_cosine
",
    );
    let loaded = parse_str(&text, Path::new("p.yaml")).unwrap();
    validate(&loaded).unwrap();
    let stages = &loaded.spec.stages;
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0].resolved_name(), "weights");
    assert_eq!(
        stages[0].kind,
        StageKind::Uncertainty(UncertaintyConfig {
            group_size: 64,
            temperature: 2.5,
            logit_scale: 50.0,
            method: WeightMethod::BatchSoftmax,
            class_max: None,
            pseudo_label_column: "pseudo_label".into(),
            image_embedding_column: "img".into(),
            text_embedding_column: "txt".into(),
        })
    );
    let StageKind::Uncertainty(second) = &stages[1].kind else {
        panic!("{:?}", stages[1].kind)
    };
    assert_eq!(second.method, WeightMethod::ClampedCosine);
    assert_eq!(second.group_size(), 32);
    assert_eq!(second.temperature, 3.0);
    assert_eq!(second.logit_scale, 100.0);
    assert_eq!(second.image_embedding_column, IMAGE);
    assert_eq!(second.text_embedding_column, TEXT);

    // The built stage is the one configured.
    let built = stages[0].build(Path::new(".")).unwrap();
    assert_eq!(built.name(), "weights");
    let emb = DataType::new_fixed_size_list(DataType::Float32, 3, true);
    let schema = Schema::new(vec![
        Field::new("img", emb.clone(), true),
        Field::new("txt", emb, true),
    ]);
    assert_eq!(built.output_fields(&schema).unwrap().len(), 1);
}

#[test]
fn bad_settings_are_reported_at_their_field() {
    let got = issues(&pipeline(
        "  - type: uncertainty
    group_size: 0
    temperature: 0
    logit_scale: -5
",
    ));
    assert_eq!(
        got,
        [
            (
                "stages[0].group_size".to_string(),
                "expected 1 to 65536 rows, found 0".to_string()
            ),
            (
                "stages[0].temperature".to_string(),
                "must be a finite number > 0, found 0.0".to_string()
            ),
            (
                "stages[0].logit_scale".to_string(),
                "must be a finite number > 0, found -5.0".to_string()
            ),
        ]
    );
    let got = issues(&pipeline(
        "  - type: uncertainty\n    temperature: -1.5\n    logit_scale: 1e308\n",
    ));
    assert_eq!(
        got,
        [(
            "stages[0].temperature".to_string(),
            "must be a finite number > 0, found -1.5".to_string()
        )]
    );
    let got = issues(&pipeline(
        "  - type: uncertainty\n    temperature: 0.001\n    logit_scale: 1e308\n",
    ));
    assert_eq!(
        got,
        [(
            "stages[0].logit_scale".to_string(),
            "logit_scale / temperature = 1e308 / 0.001 overflows".to_string()
        )]
    );
    // `.inf` and `.nan` are refused by the YAML loader itself, at their line.
    for value in [".inf", "-.inf", ".nan"] {
        let text = pipeline(&format!(
            "  - type: uncertainty\n    logit_scale: {value}\n"
        ));
        let err = parse_str(&text, Path::new("p.yaml")).unwrap_err();
        let Error::Spec(SpecIssues(found)) = err else {
            panic!("{err}")
        };
        assert!(found[0].message.contains("non-finite float"), "{found:?}");
        assert_eq!(found[0].location.line, Some(5), "{found:?}");
    }

    // Unknown keys and methods are parse errors naming the field.
    let got = issues(&pipeline("  - type: uncertainty\n    temperture: 2\n"));
    assert!(got[0].1.contains("temperture"), "{got:?}");
    let got = issues(&pipeline("  - type: uncertainty\n    method: cosine\n"));
    assert_eq!(got[0].0, "stages[0].method", "{got:?}");
    assert!(
        got[0].1.contains("batch_softmax") && got[0].1.contains("clamped_cosine"),
        "{got:?}"
    );
}

#[test]
fn the_plan_requires_batch_size_to_be_a_multiple_of_group_size() {
    let samples = trustflow_testutil::repo_root().join("pipelines/samples/bytes");
    let yaml = |batch: usize| {
        format!(
            "source:\n  paths: [\"{}\"]\nstages:\n  - type: uncertainty\n    group_size: 32\nsink:\n  path: out\nruntime:\n  batch_size: {batch}\n",
            samples.display()
        )
    };
    let issues = |batch: usize| -> Vec<trustflow_engine::error::SpecIssue> {
        let pipeline = parse_str(&yaml(batch), Path::new("u.yaml")).unwrap();
        validate(&pipeline).unwrap();
        match trustflow_engine::plan::build(pipeline, &trustflow_engine::plan::Overrides::default())
        {
            Err(Error::Spec(SpecIssues(issues))) => issues,
            Err(other) => panic!("expected spec issues, got {other}"),
            Ok(_) => Vec::new(),
        }
    };
    let bad = issues(100);
    let batch_issue = bad
        .iter()
        .find(|i| i.location.field == "runtime.batch_size")
        .unwrap_or_else(|| panic!("no batch_size issue in {bad:#?}"));
    assert!(
        batch_issue.message.contains("not a multiple"),
        "{}",
        batch_issue.message
    );
    assert_eq!(batch_issue.location.line, Some(9));
    assert!(
        issues(128)
            .iter()
            .all(|i| i.location.field != "runtime.batch_size"),
        "128 is a multiple of 32"
    );
}

// ---------------------------------------------------------------------------------
// class_max_cosine: the cosine over the source's best cosine for the row's class
// ---------------------------------------------------------------------------------

/// Writes `label` and `clip_similarity` columns to a Parquet file.
fn write_source_shard(path: &Path, labels: &[Option<i64>], cosines: &[Option<f64>]) {
    use arrow::array::{Float64Array, Int64Array};
    let schema = Arc::new(Schema::new(vec![
        Field::new("label", DataType::Int64, true),
        Field::new("clip_similarity", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(labels.to_vec())),
            Arc::new(Float64Array::from(cosines.to_vec())),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn calibration_takes_the_largest_source_cosine_per_class() {
    use trustflow_engine::stages::class_max::{ClassMax, calibrate};
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("part-00000.parquet");
    write_source_shard(
        &shard,
        &[Some(0), Some(1), Some(0), None, Some(1), Some(2)],
        &[
            Some(0.2),
            Some(0.4),
            Some(0.25),
            Some(0.9),
            Some(0.1),
            Some(0.5),
        ],
    );
    let c = calibrate(std::slice::from_ref(&shard), "label", "clip_similarity", 3).unwrap();
    assert_eq!(c.class_max_cosine, vec![0.25, 0.4, 0.5]);
    assert_eq!(c.rows_per_class, vec![2, 2, 1]);
    assert_eq!(c.rows_skipped_null, 1);
    let file = dir.path().join("class_max.json");
    c.save(&file).unwrap();
    assert_eq!(ClassMax::load(&file).unwrap(), c);

    // A class without a source row cannot be normalised: named in the error.
    let err = calibrate(std::slice::from_ref(&shard), "label", "clip_similarity", 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no source row of class 3"), "{err}");
    // A label outside the classes names the file and row.
    let err = calibrate(std::slice::from_ref(&shard), "label", "clip_similarity", 2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("part-00000.parquet") && err.contains("row 5") && err.contains("is 2"),
        "{err}"
    );
    // A missing column says what it is for.
    let err = calibrate(std::slice::from_ref(&shard), "label", "cos", 3)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no column `cos`") && err.contains("clip_score"),
        "{err}"
    );
}

#[test]
fn class_max_weights_divide_each_cosine_by_its_class_maximum() {
    use arrow::array::Int64Array;
    use trustflow_engine::stages::class_max::ClassMax;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("class_max.json");
    ClassMax {
        class_max_cosine: vec![0.5, 0.8],
        rows_per_class: vec![1, 1],
        rows_skipped_null: 0,
        label_column: "label".into(),
        similarity_column: "clip_similarity".into(),
        source: Vec::new(),
    }
    .save(&file)
    .unwrap();
    let config = UncertaintyConfig {
        method: WeightMethod::ClassMaxCosine,
        class_max: Some(file.display().to_string()),
        ..UncertaintyConfig::default()
    };
    assert!(config.validate().is_empty(), "{:?}", config.validate());
    let stage = stage(config);
    // Unit image (1, 0); captions at angles whose cosines are 0.3, 0.3, 0.9, -0.5, 0.3.
    let caption = |cos: f32| Some(vec![cos, (1.0 - cos * cos).sqrt()]);
    let images = vec![Some(vec![2.0f32, 0.0]); 6];
    let texts = vec![
        caption(0.3),
        caption(0.3),
        caption(0.9),
        caption(-0.5),
        caption(0.3),
        caption(0.3),
    ];
    let base = batch(&images, &texts, 2);
    let labels: ArrayRef = Arc::new(Int64Array::from(vec![
        Some(0),
        Some(1),
        Some(0),
        Some(1),
        None,
        Some(7),
    ]));
    let mut fields: Vec<Field> = base
        .schema()
        .fields()
        .iter()
        .map(|f| (**f).clone())
        .collect();
    fields.push(Field::new("pseudo_label", DataType::Int64, true));
    let mut columns = base.columns().to_vec();
    columns.push(labels);
    let input = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
    let out = stage.process(&input).unwrap();
    let w = weights(&out);
    // 0.3 / 0.5, 0.3 / 0.8, min(1, 0.9 / 0.5), max(0, -0.5) / 0.8.
    let want = [0.6, 0.375, 1.0, 0.0];
    for (row, want) in want.iter().enumerate() {
        let got = f64::from(w[row].unwrap());
        assert!((got - want).abs() < 1e-6, "row {row}: {got} vs {want}");
    }
    assert_eq!(w[4], None);
    assert_eq!(w[5], None);
    let reasons: Vec<(usize, String)> = out.rejected.clone();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].1.contains("`pseudo_label` is null"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].1.contains("`pseudo_label` is 7") && reasons[1].1.contains("0..2"),
        "{reasons:?}"
    );
    // Without the pseudo-label column the schema check names it.
    let err = stage.output_fields(&base.schema()).unwrap_err().to_string();
    assert!(err.contains("`pseudo_label`"), "{err}");
}

#[test]
fn class_max_settings_are_checked_where_they_are_written() {
    let text = "name: p\nsource: { paths: [x] }\nstages:\n  - type: uncertainty\n    method: class_max_cosine\nsink: { path: out }\n";
    let err = validate(&parse_str(text, Path::new("p.yaml")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("class_max") && err.contains("calibrate-weights"),
        "{err}"
    );
    let text = "name: p\nsource: { paths: [x] }\nstages:\n  - type: uncertainty\n    class_max: c.json\nsink: { path: out }\n";
    let err = validate(&parse_str(text, Path::new("p.yaml")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("only read by `method: class_max_cosine`"),
        "{err}"
    );
    // A calibration file that is not one: the stage names the file.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("c.json");
    std::fs::write(&bad, "{\"class_max_cosine\": [0.3, 0.0]}").unwrap();
    let err = UncertaintyStage::new(
        "w".into(),
        UncertaintyConfig {
            method: WeightMethod::ClassMaxCosine,
            class_max: Some(bad.display().to_string()),
            ..UncertaintyConfig::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("c.json") && err.contains("calibrate-weights"),
        "{err}"
    );
    let err = UncertaintyStage::new(
        "w".into(),
        UncertaintyConfig {
            method: WeightMethod::ClassMaxCosine,
            class_max: Some(dir.path().join("absent.json").display().to_string()),
            ..UncertaintyConfig::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("absent.json") && err.contains("no calibration file here"),
        "{err}"
    );
}
