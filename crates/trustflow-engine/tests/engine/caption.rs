//! Parity of the `caption` stage with Hugging Face transformers' greedy `generate` on a
//! tiny random VisionEncoderDecoder (ViT + GPT-2; fixtures made by
//! scripts/fixtures/make_captioner.py; no Python at test time), and its behaviour on
//! mixed batches, in a pipeline, and on bad models.
//!
//! Needs ONNX Runtime: `source scripts/setup.sh` (sets ORT_DYLIB_PATH).

use trustflow_testutil as common;

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, LargeBinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use common::require_ort;
use serde_json::Value;
use trustflow_engine::plan::{self, Overrides};
use trustflow_engine::run::{self, RunOptions};
use trustflow_engine::stages::Stage;
use trustflow_engine::stages::caption::{
    CAPTION_FINAL, CAPTION_SOURCE, CaptionConfig, CaptionStage, SOURCE_GENERATED, SOURCE_GIVEN,
};

fn fixtures() -> PathBuf {
    trustflow_testutil::repo_root().join("tests/fixtures/captioner")
}

fn images_dir() -> PathBuf {
    trustflow_testutil::repo_root().join("tests/fixtures/clip")
}

fn model_dir() -> PathBuf {
    fixtures().join("model")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn max_new_tokens() -> usize {
    reference()["max_new_tokens"].as_u64().unwrap() as usize
}

fn stage() -> CaptionStage {
    require_ort();
    let mut config = CaptionConfig::for_model(model_dir().to_string_lossy());
    config.max_length = max_new_tokens();
    CaptionStage::new("caption".into(), config).unwrap()
}

struct Case {
    bytes: Vec<u8>,
    ids: Vec<i64>,
    text: String,
}

fn cases() -> Vec<Case> {
    reference()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Case {
            bytes: std::fs::read(images_dir().join(r["file"].as_str().unwrap())).unwrap(),
            ids: r["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect(),
            text: r["text"].as_str().unwrap().to_string(),
        })
        .collect()
}

#[test]
fn preprocessing_matches_the_vit_image_processor() {
    let stage = stage();
    let bytes = std::fs::read(fixtures().join("pixel_values.bin")).unwrap();
    let want: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let mut have = Vec::new();
    for case in cases() {
        stage.pixels(&case.bytes, &mut have).unwrap();
    }
    assert_eq!(have.len(), want.len());
    let worst = have
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "largest pixel difference {worst}");
}

#[test]
fn greedy_ids_match_generate_batched_and_one_at_a_time() {
    let stage = stage();
    let cases = cases();
    let mut pixels = Vec::new();
    for case in &cases {
        stage.pixels(&case.bytes, &mut pixels).unwrap();
    }
    let batched = stage.generate_ids(cases.len(), pixels).unwrap();
    let mut early = 0;
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(batched[i], case.ids, "image {i} (batched)");
        let mut one = Vec::new();
        stage.pixels(&case.bytes, &mut one).unwrap();
        assert_eq!(
            stage.generate_ids(1, one).unwrap()[0],
            case.ids,
            "image {i} (alone)"
        );
        assert_eq!(
            stage.decode_text(&case.ids).unwrap(),
            case.text,
            "image {i}"
        );
        if case.ids.len() <= max_new_tokens() {
            early += 1;
        }
    }
    // The fixture has rows that stop at EOS and rows that run to the limit.
    assert!(early > 0 && early < cases.len());
    assert!(stage.generate_ids(0, Vec::new()).unwrap().is_empty());
}

fn batch(
    captions: Vec<Option<&str>>,
    missing: Vec<Option<bool>>,
    images: Vec<Option<Vec<u8>>>,
) -> RecordBatch {
    let schema = Schema::new(vec![
        Field::new("image", DataType::LargeBinary, true),
        Field::new("caption_clean", DataType::Utf8, true),
        Field::new("caption_missing", DataType::Boolean, true),
    ]);
    RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(LargeBinaryArray::from(
                images.iter().map(|i| i.as_deref()).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(captions)),
            Arc::new(BooleanArray::from(missing)),
        ],
    )
    .unwrap()
}

#[test]
fn only_rows_without_a_caption_are_generated() {
    let stage = stage();
    let cases = cases();
    let input = batch(
        vec![
            Some("a given caption"),
            None,
            None,
            Some("another one"),
            None,
        ],
        vec![
            Some(false),
            Some(true),
            Some(false),
            Some(false),
            Some(true),
        ],
        vec![
            // A given caption's image is never read, so garbage is fine.
            Some(b"not an image".to_vec()),
            Some(cases[1].bytes.clone()),
            Some(cases[2].bytes.clone()),
            None,
            Some(b"not an image".to_vec()),
        ],
    );
    let fields = stage.output_fields(&input.schema()).unwrap();
    assert_eq!(fields[0].name(), CAPTION_FINAL);
    assert_eq!(fields[1].name(), CAPTION_SOURCE);
    let output = stage.process(&input).unwrap();
    assert_eq!(output.rejected.len(), 1, "{:?}", output.rejected);
    assert_eq!(output.rejected[0].0, 4);
    assert!(
        output.rejected[0]
            .1
            .starts_with("cannot generate a caption: "),
        "{}",
        output.rejected[0].1
    );
    let text = output.columns[0].as_string::<i32>();
    let source = output.columns[1].as_string::<i32>();
    assert_eq!(text.value(0), "a given caption");
    assert_eq!(source.value(0), SOURCE_GIVEN);
    assert_eq!(text.value(1), cases[1].text);
    assert_eq!(source.value(1), SOURCE_GENERATED);
    // A null caption counts as missing even when the flag says otherwise.
    assert_eq!(text.value(2), cases[2].text);
    assert_eq!(source.value(2), SOURCE_GENERATED);
    assert_eq!(text.value(3), "another one");
    assert_eq!(source.value(3), SOURCE_GIVEN);
    assert!(text.is_null(4) && source.is_null(4));
}

#[test]
fn pipeline_decode_clean_caption_generates_missing_captions() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let samples = trustflow_testutil::repo_root().join("pipelines/samples/bytes");
    let out = dir.path().join("out");
    // The model path is relative: resolved against the pipeline file's folder.
    let link = dir.path().join("captioner");
    std::os::unix::fs::symlink(model_dir(), &link).unwrap();
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\nstages:\n  - type: decode\n  - type: clean_caption\n    \
         on_missing: mark\n  - type: caption\n    workers: 2\n    model: captioner\n    \
         max_length: 8\nsink:\n  path: \"{}\"\nruntime:\n  batch_size: 5\n",
        samples.display(),
        out.display()
    );
    let file = dir.path().join("caption.yaml");
    let pipeline = trustflow_engine::spec::parse_str(&yaml, &file).unwrap();
    trustflow_engine::spec::validate(&pipeline).unwrap();
    let plan = plan::build(pipeline, &Overrides::default()).unwrap();
    assert!(plan.output_schema.field_with_name(CAPTION_FINAL).is_ok());
    let report = run::execute(plan, RunOptions::default()).unwrap();
    assert!(report.invariant_holds);
    assert_eq!(report.rows_in, report.rows_out + report.rows_quarantined);
    assert!(report.rows_out > 0);
    let (mut generated, mut given, mut rows) = (0, 0, 0);
    for shard in common::shard_files(&out) {
        let batch = common::read_parquet(&shard);
        rows += batch.num_rows();
        let missing = batch
            .column_by_name("caption_missing")
            .unwrap()
            .as_boolean()
            .clone();
        let clean = common::strings(&batch, "caption_clean");
        let finals = common::strings(&batch, CAPTION_FINAL);
        let sources = common::strings(&batch, CAPTION_SOURCE);
        for row in 0..batch.num_rows() {
            let final_caption = finals[row]
                .as_deref()
                .expect("every kept row has a caption");
            if missing.value(row) || clean[row].is_none() {
                assert_eq!(sources[row].as_deref(), Some(SOURCE_GENERATED));
                assert!(!final_caption.is_empty());
                generated += 1;
            } else {
                assert_eq!(sources[row].as_deref(), Some(SOURCE_GIVEN));
                assert_eq!(Some(final_caption), clean[row].as_deref());
                given += 1;
            }
        }
    }
    assert_eq!(rows as u64, report.rows_out);
    assert!(given > 0, "the sample corpus has given captions");
    assert!(generated > 0, "the sample corpus has missing captions");
}

#[test]
fn missing_model_folder_is_named_at_plan_time() {
    let dir = tempfile::tempdir().unwrap();
    let samples = trustflow_testutil::repo_root().join("pipelines/samples/bytes");
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\nstages:\n  - type: decode\n  - type: caption\n    \
         model: no-such-model\nsink:\n  path: \"{}\"\n",
        samples.display(),
        dir.path().join("out").display()
    );
    let file = dir.path().join("missing.yaml");
    let pipeline = trustflow_engine::spec::parse_str(&yaml, &file).unwrap();
    trustflow_engine::spec::validate(&pipeline).unwrap();
    let err = plan::build(pipeline, &Overrides::default())
        .err()
        .expect("plan must fail")
        .to_string();
    assert!(
        err.contains("stages[1]") && err.contains("no-such-model: model folder not found"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists());
}

#[test]
fn decoder_with_other_inputs_is_rejected_naming_the_file() {
    require_ort();
    let mut config = CaptionConfig::for_model(model_dir().to_string_lossy());
    config.max_length = 8;
    config.files.decoder_model = Some(
        fixtures()
            .join("wrong_decoder.onnx")
            .to_string_lossy()
            .into(),
    );
    let err = CaptionStage::new("caption".into(), config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("wrong_decoder.onnx"), "{err}");
    assert!(err.contains("input_ids"), "{err}");
}

#[test]
fn max_length_beyond_the_decoder_positions_is_refused() {
    require_ort();
    let mut config = CaptionConfig::for_model(model_dir().to_string_lossy());
    config.max_length = 33;
    let err = CaptionStage::new("caption".into(), config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("32 positions"),
        "{err}"
    );
}
