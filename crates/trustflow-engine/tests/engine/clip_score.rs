//! Parity of the `clip_score` stage with Hugging Face transformers on a tiny random CLIP
//! (fixtures made by scripts/fixtures/make_clip.py; no Python at test time), and its
//! behaviour on bad rows, bad models and unavailable execution providers.
//!
//! Needs ONNX Runtime: `source scripts/setup.sh` (sets ORT_DYLIB_PATH).

use trustflow_testutil as common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, LargeBinaryArray, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Float32Type, Schema};
use common::{floats, require_ort, rows_f32};
use serde_json::Value;
use sha2::{Digest, Sha256};
use trustflow_engine::models::clip_preprocess::{ClipImageConfig, PilFilter, resize_rgb};
use trustflow_engine::models::image::{ImageFormatName, ImageLimits, decode_rgb};
use trustflow_engine::models::onnx::{
    ExecutionProviderName, Fallback, InputTensor, OnnxModel, SessionConfig,
};
use trustflow_engine::models::text::TextTokenizer;
use trustflow_engine::plan::{self, Overrides};
use trustflow_engine::run::{self, RunOptions};
use trustflow_engine::stages::StageConfig;
use trustflow_engine::stages::clip_score::{
    CLIP_IMAGE_EMBEDDING, CLIP_SIMILARITY, CLIP_TEXT_EMBEDDING, ClipScoreConfig, ClipScoreStage,
    LOGIT_SCALE_METADATA,
};
use trustflow_engine::stages::{Stage, StageKind, StageSpec};

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    trustflow_testutil::repo_root().join("tests/fixtures/clip")
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

fn rows_i64(value: &Value) -> Vec<Vec<i64>> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        })
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

fn image_meta() -> Vec<&'static Value> {
    reference()["images"].as_array().unwrap().iter().collect()
}

fn pixel_values() -> Vec<f32> {
    let bytes = std::fs::read(fixtures().join("pixel_values.bin")).unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn decode(path: &Path) -> image::RgbImage {
    let bytes = std::fs::read(path).unwrap();
    decode_rgb(&bytes, &ImageLimits::default(), &ImageFormatName::ALL)
        .unwrap()
        .1
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn processor() -> ClipImageConfig {
    ClipImageConfig::load(&model_dir().join("preprocessor_config.json")).unwrap()
}

// ------------------------------------------------------------------------- preprocessing

#[test]
fn resize_matches_pillow_byte_for_byte() {
    let cases = serde_json::from_str::<Value>(
        &std::fs::read_to_string(fixtures().join("resize_cases.json")).unwrap(),
    )
    .unwrap();
    let cases = cases["resize"].as_array().unwrap();
    assert!(cases.len() > 400);
    let mut failures = Vec::new();
    let mut sources = std::collections::HashMap::new();
    for case in cases {
        let source = case["source"].as_str().unwrap();
        let image = sources
            .entry(source.to_string())
            .or_insert_with(|| decode(&fixtures().join(source)));
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let filter = PilFilter::from_name(case["filter"].as_str().unwrap()).unwrap();
        let out = resize_rgb(
            image.as_raw(),
            image.width() as usize,
            image.height() as usize,
            w,
            h,
            filter,
        );
        if sha256_hex(&out) != case["sha256"].as_str().unwrap() {
            failures.push(format!(
                "{source} {}x{} -> {w}x{h} {filter:?}",
                image.width(),
                image.height()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} resizes differ from Pillow: {failures:#?}",
        failures.len(),
        cases.len()
    );
}

#[test]
fn preprocessing_matches_transformers_exactly_under_other_settings() {
    let cases = serde_json::from_str::<Value>(
        &std::fs::read_to_string(fixtures().join("resize_cases.json")).unwrap(),
    )
    .unwrap();
    let cases = cases["preprocess"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let config = ClipImageConfig::from_json(&case["config"]).unwrap();
        let source = case["source"].as_str().unwrap();
        let image = decode(&fixtures().join(source));
        let mut out = Vec::new();
        let (h, w) = config.preprocess_into(&image, &mut out).unwrap();
        let shape: Vec<u64> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        if shape != [3, h as u64, w as u64]
            || sha256_hex(&bytes) != case["sha256"].as_str().unwrap()
        {
            failures.push(format!("{source} with {}", case["config"]));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Preprocessing the same pixels Pillow decoded gives CLIPProcessor's pixel_values to
/// the bit, and so does our own decoder: PNG is lossless, and JPEG goes through
/// libjpeg-turbo's decoder, whose output is Pillow's byte for byte (jpeg_parity.rs).
#[test]
fn pixel_values_match_clip_processor() {
    let config = processor();
    let expected = pixel_values();
    let per_image = 3 * 32 * 32;
    let shape: Vec<u64> = reference()["pixel_values_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(shape, [image_meta().len() as u64, 3, 32, 32]);
    let mut jpeg_diff = 0f32;
    for (i, meta) in image_meta().into_iter().enumerate() {
        let want = &expected[i * per_image..(i + 1) * per_image];
        let decoded = decode(&fixtures().join(meta["decoded"].as_str().unwrap()));
        let resized: Vec<u64> = meta["resized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let (rw, rh) = config.resized_size(decoded.width(), decoded.height());
        assert_eq!([u64::from(rw), u64::from(rh)].as_slice(), resized, "{meta}");
        let mut out = Vec::new();
        assert_eq!(
            config.preprocess_into(&decoded, &mut out).unwrap(),
            (32, 32)
        );
        let diff = max_abs_diff(&out, want);
        assert!(diff <= 1e-6, "{}: max abs diff {diff}", meta["file"]);

        let file = meta["file"].as_str().unwrap();
        let mut ours = Vec::new();
        config
            .preprocess_into(&decode(&fixtures().join(file)), &mut ours)
            .unwrap();
        let diff = max_abs_diff(&ours, want);
        if file.ends_with(".png") {
            assert_eq!(diff, 0.0, "{file}");
        } else {
            jpeg_diff = jpeg_diff.max(diff);
        }
    }
    eprintln!("pixel_values through our JPEG decoder: max abs diff {jpeg_diff}");
    assert_eq!(jpeg_diff, 0.0);
}

// --------------------------------------------------------------------------- tokenizer

#[test]
fn token_ids_match_transformers() {
    let tokenizer = TextTokenizer::load(&model_dir().join("tokenizer.json"), 77, Some(75)).unwrap();
    let captions = strings(&reference()["captions"]);
    let want_ids = rows_i64(&reference()["input_ids"]);
    let want_mask = rows_i64(&reference()["attention_mask"]);
    let encoded: Vec<Vec<u32>> = captions
        .iter()
        .map(|c| tokenizer.encode(c).unwrap())
        .collect();
    // One caption is long enough to be truncated to the 77-token context.
    assert!(encoded.iter().any(|e| e.len() == 77));
    let batch = tokenizer.pad(&encoded);
    assert_eq!(batch.seq_len, want_ids[0].len());
    assert_eq!(batch.input_ids, want_ids.concat());
    assert_eq!(batch.attention_mask, want_mask.concat());
    // The cut to 75 characters happens before tokenisation.
    let cut = strings(&reference()["captions_cut"]);
    assert!(captions[1].chars().count() > 75 && cut[1].chars().count() == 75);
    assert_eq!(tokenizer.encode(&cut[1]).unwrap(), encoded[1]);
    // Padding a subset pads to its own longest row.
    let short = tokenizer.pad(&encoded[2..3]);
    assert_eq!(short.seq_len, encoded[2].len());
    assert!(short.attention_mask.iter().all(|&m| m == 1));
}

// -------------------------------------------------------------------------- embeddings

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|x| (f64::from(*x) / n) as f32).collect()
}

#[test]
fn embeddings_match_transformers() {
    require_ort();
    let config = SessionConfig::default();
    let vision = OnnxModel::load(&model_dir().join("vision_model.onnx"), &config).unwrap();
    let text = OnnxModel::load(&model_dir().join("text_model.onnx"), &config).unwrap();
    let n = image_meta().len();
    let out = vision
        .run(
            vec![(
                "pixel_values",
                InputTensor::F32 {
                    shape: vec![n, 3, 32, 32],
                    data: pixel_values(),
                },
            )],
            &["image_embeds"],
        )
        .unwrap();
    assert_eq!(out[0].shape, [n, 16]);
    let ids = rows_i64(&reference()["input_ids"]);
    let mask = rows_i64(&reference()["attention_mask"]);
    let seq = ids[0].len();
    let text_out = text
        .run(
            vec![
                (
                    "input_ids",
                    InputTensor::I64 {
                        shape: vec![n, seq],
                        data: ids.concat(),
                    },
                ),
                (
                    "attention_mask",
                    InputTensor::I64 {
                        shape: vec![n, seq],
                        data: mask.concat(),
                    },
                ),
            ],
            &["text_embeds"],
        )
        .unwrap();
    let want_image = rows_f32(&reference()["image_embeds"]);
    let want_text = rows_f32(&reference()["text_embeds"]);
    let want_sim = floats(&reference()["clip_similarity"]);
    let (mut di, mut dt, mut ds) = (0f32, 0f32, 0f32);
    for i in 0..n {
        let u = unit(&out[0].data[i * 16..(i + 1) * 16]);
        let v = unit(&text_out[0].data[i * 16..(i + 1) * 16]);
        di = di.max(max_abs_diff(&u, &want_image[i]));
        dt = dt.max(max_abs_diff(&v, &want_text[i]));
        let s: f32 = u.iter().zip(&v).map(|(a, b)| a * b).sum();
        ds = ds.max((s - want_sim[i]).abs());
    }
    eprintln!("max abs diff: image embeds {di:e}, text embeds {dt:e}, similarity {ds:e}");
    assert!(di <= TOLERANCE && dt <= TOLERANCE && ds <= TOLERANCE);

    // Row by row (batch 1, text padded only to its own length) gives the same.
    for i in [0, 4, 5] {
        let len = mask[i].iter().filter(|&&m| m == 1).count();
        let single = text
            .run(
                vec![
                    (
                        "input_ids",
                        InputTensor::I64 {
                            shape: vec![1, len],
                            data: ids[i][..len].to_vec(),
                        },
                    ),
                    (
                        "attention_mask",
                        InputTensor::I64 {
                            shape: vec![1, len],
                            data: vec![1; len],
                        },
                    ),
                ],
                &["text_embeds"],
            )
            .unwrap();
        let d = max_abs_diff(&unit(&single[0].data), &want_text[i]);
        assert!(d <= TOLERANCE, "row {i}: {d}");
    }
}

// ------------------------------------------------------------------------------- stage

fn stage(config: ClipScoreConfig) -> ClipScoreStage {
    require_ort();
    ClipScoreStage::new("clip_score".to_string(), config).unwrap()
}

fn default_stage() -> &'static ClipScoreStage {
    static STAGE: std::sync::OnceLock<ClipScoreStage> = std::sync::OnceLock::new();
    STAGE.get_or_init(|| {
        stage(ClipScoreConfig::for_model(
            model_dir().display().to_string(),
        ))
    })
}

fn batch(images: Vec<Option<Vec<u8>>>, captions: Vec<Option<String>>) -> RecordBatch {
    let images: ArrayRef = Arc::new(LargeBinaryArray::from_iter(images));
    let captions: ArrayRef = Arc::new(StringArray::from(captions));
    let schema = Schema::new(vec![
        Field::new("image", DataType::LargeBinary, true),
        Field::new("caption", DataType::Utf8, true),
    ]);
    RecordBatch::try_new(Arc::new(schema), vec![images, captions]).unwrap()
}

fn embedding_rows(column: &ArrayRef) -> Vec<Option<Vec<f32>>> {
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
fn stage_matches_transformers_and_rejects_bad_rows() {
    let stage = default_stage();
    assert_eq!(stage.embedding_dim(), 16);
    let reference_scale = reference()["logit_scale"].as_f64().unwrap();
    assert!((stage.logit_scale() - reference_scale).abs() < 1e-4);
    let captions = strings(&reference()["captions"]);
    let metas = image_meta();
    // Rows 0..9: the fixture images as Pillow decoded them (lossless PNGs), then bad rows.
    let mut images: Vec<Option<Vec<u8>>> = metas
        .iter()
        .map(|m| Some(std::fs::read(fixtures().join(m["decoded"].as_str().unwrap())).unwrap()))
        .collect();
    let mut texts: Vec<Option<String>> = captions.iter().cloned().map(Some).collect();
    images.push(None);
    texts.push(Some("a caption without an image".into()));
    images.push(images[0].clone());
    texts.push(None);
    images.push(Some(b"not an image at all".to_vec()));
    texts.push(Some("garbage".into()));
    let batch = batch(images, texts);

    let fields = stage.output_fields(&batch.schema()).unwrap();
    let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [CLIP_SIMILARITY, CLIP_IMAGE_EMBEDDING, CLIP_TEXT_EMBEDDING]
    );
    assert_eq!(fields[0].data_type(), &DataType::Float32);
    assert!(
        matches!(fields[1].data_type(), DataType::FixedSizeList(item, 16)
        if item.data_type() == &DataType::Float32)
    );
    assert!(fields[0].metadata().contains_key(LOGIT_SCALE_METADATA));

    let output = stage.process(&batch).unwrap();
    for (column, field) in output.columns.iter().zip(&fields) {
        assert_eq!(column.data_type(), field.data_type());
        assert_eq!(column.len(), batch.num_rows());
    }
    let reasons: Vec<(usize, &str)> = output
        .rejected
        .iter()
        .map(|(i, r)| (*i, r.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            (9, "image is null"),
            (10, "caption `caption` is null"),
            (
                11,
                "not a recognised image format (unknown magic bytes 6e 6f 74 20 61 6e 20 69)"
            ),
        ]
    );
    let similarity = output.columns[0].as_primitive::<Float32Type>();
    let want_sim = floats(&reference()["clip_similarity"]);
    let image_rows = embedding_rows(&output.columns[1]);
    let text_rows = embedding_rows(&output.columns[2]);
    let want_image = rows_f32(&reference()["image_embeds"]);
    let want_text = rows_f32(&reference()["text_embeds"]);
    let (mut ds, mut di, mut dt) = (0f32, 0f32, 0f32);
    for i in 0..metas.len() {
        ds = ds.max((similarity.value(i) - want_sim[i]).abs());
        let u = image_rows[i].as_ref().unwrap();
        let v = text_rows[i].as_ref().unwrap();
        di = di.max(max_abs_diff(u, &want_image[i]));
        dt = dt.max(max_abs_diff(v, &want_text[i]));
        let norm: f32 = u.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    eprintln!("stage vs transformers: similarity {ds:e}, image {di:e}, text {dt:e}");
    assert!(ds <= TOLERANCE && di <= TOLERANCE && dt <= TOLERANCE);
    for i in 9..12 {
        assert!(similarity.is_null(i) && image_rows[i].is_none() && text_rows[i].is_none());
    }
}

/// The fixture files themselves, decoded by the stage: JPEGs (libjpeg-turbo, as in
/// Pillow) are held to the same tolerance as PNGs.
#[test]
fn stage_on_original_files_matches_transformers() {
    let stage = default_stage();
    let metas = image_meta();
    let images = metas
        .iter()
        .map(|m| Some(std::fs::read(fixtures().join(m["file"].as_str().unwrap())).unwrap()))
        .collect();
    let captions = strings(&reference()["captions"])
        .into_iter()
        .map(Some)
        .collect();
    let output = stage.process(&batch(images, captions)).unwrap();
    assert!(output.rejected.is_empty());
    let similarity = output.columns[0].as_primitive::<Float32Type>();
    let want = floats(&reference()["clip_similarity"]);
    let mut png_diff = 0f32;
    let mut jpeg_diff = 0f32;
    for (i, meta) in metas.iter().enumerate() {
        let d = (similarity.value(i) - want[i]).abs();
        if meta["file"].as_str().unwrap().ends_with(".png") {
            png_diff = png_diff.max(d);
        } else {
            jpeg_diff = jpeg_diff.max(d);
        }
    }
    eprintln!("similarity from the original files: PNG max diff {png_diff:e}, JPEG {jpeg_diff:e}");
    assert!(png_diff <= TOLERANCE, "{png_diff}");
    assert!(jpeg_diff <= TOLERANCE, "{jpeg_diff}");
}

#[test]
fn caption_column_defaults_to_caption_clean_and_embeddings_are_optional() {
    let mut config = ClipScoreConfig::for_model(model_dir().display().to_string());
    config.emit_embeddings = false;
    config.logit_scale = Some(100.0);
    let stage = stage(config);
    assert_eq!(stage.logit_scale(), 100.0);
    let image = std::fs::read(fixtures().join("images/03_flower_square.png")).unwrap();
    let schema = Schema::new(vec![
        Field::new("image", DataType::LargeBinary, true),
        Field::new("caption", DataType::Utf8, true),
        Field::new("caption_clean", DataType::Utf8, true),
    ]);
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(LargeBinaryArray::from_iter_values([image.clone(), image])),
            Arc::new(StringArray::from(vec![Some("raw"), Some("raw")])),
            Arc::new(StringArray::from(vec![Some("a pink flower"), None])),
        ],
    )
    .unwrap();
    assert_eq!(stage.caption_column(&batch.schema()), "caption_clean");
    let fields = stage.output_fields(&batch.schema()).unwrap();
    assert_eq!(fields.len(), 1);
    assert_eq!(fields[0].metadata()[LOGIT_SCALE_METADATA], "100");
    let output = stage.process(&batch).unwrap();
    assert_eq!(output.columns.len(), 1);
    assert_eq!(
        output.rejected,
        [(1, "caption `caption_clean` is null".to_string())]
    );
    // A missing caption column is a plan-time error naming it.
    let no_caption = Schema::new(vec![Field::new("image", DataType::LargeBinary, true)]);
    let err = stage.output_fields(&no_caption).unwrap_err().to_string();
    assert!(err.contains("`caption`"), "{err}");
}

/// A caption the tokenizer cannot encode costs only its own row. (CLIP's byte-level BPE
/// encodes any text; a word-level vocabulary without an unknown token does not.)
#[test]
fn caption_the_tokenizer_rejects_is_quarantined_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(
        &tokenizer,
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "[UNK]",
                      "vocab": {"a": 0, "pink": 1, "flower": 2, "<|endoftext|>": 3}}}"#,
    )
    .unwrap();
    let stage = stage(with_files(|c| {
        c.files.tokenizer = Some(tokenizer.display().to_string())
    }));
    let image = std::fs::read(fixtures().join("images/03_flower_square.png")).unwrap();
    let output = stage
        .process(&batch(
            vec![Some(image.clone()), Some(image)],
            vec![Some("a pink flower".into()), Some("a blue flower".into())],
        ))
        .unwrap();
    assert_eq!(output.rejected.len(), 1, "{:?}", output.rejected);
    let (row, reason) = &output.rejected[0];
    assert_eq!(*row, 1);
    assert!(
        reason.starts_with("tokenizer cannot encode the caption: "),
        "{reason}"
    );
    assert!(output.columns[0].is_valid(0) && output.columns[0].is_null(1));
}

// ---------------------------------------------------------------------------- pipeline

#[test]
fn pipeline_decode_clean_clip_score_runs_on_the_sample_corpus() {
    require_ort();
    let dir = tempfile::tempdir().unwrap();
    let samples = trustflow_testutil::repo_root().join("pipelines/samples/bytes");
    let out = dir.path().join("out");
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\nstages:\n  - type: decode\n  - type: clean_caption\n  \
         - type: clip_score\n    workers: 2\n    model: \"{}\"\nsink:\n  path: \"{}\"\n\
         runtime:\n  batch_size: 5\n",
        samples.display(),
        model_dir().display(),
        out.display()
    );
    let file = dir.path().join("clip.yaml");
    let pipeline = trustflow_engine::spec::parse_str(&yaml, &file).unwrap();
    trustflow_engine::spec::validate(&pipeline).unwrap();
    let plan = plan::build(pipeline, &Overrides::default()).unwrap();
    for column in [CLIP_SIMILARITY, CLIP_IMAGE_EMBEDDING, CLIP_TEXT_EMBEDDING] {
        assert!(
            plan.output_schema.field_with_name(column).is_ok(),
            "{column}"
        );
    }
    let report = run::execute(plan, RunOptions::default()).unwrap();
    assert!(report.invariant_holds);
    assert_eq!(report.rows_in, report.rows_out + report.rows_quarantined);
    assert!(report.rows_out > 0);
    let mut rows = 0;
    for shard in common::shard_files(&out) {
        let batch = common::read_parquet(&shard);
        rows += batch.num_rows();
        let similarity = batch
            .column_by_name(CLIP_SIMILARITY)
            .unwrap()
            .as_primitive::<Float32Type>();
        assert_eq!(similarity.null_count(), 0);
        assert!(similarity.values().iter().all(|s| (-1.0..=1.0).contains(s)));
        for name in [CLIP_IMAGE_EMBEDDING, CLIP_TEXT_EMBEDDING] {
            let column = batch.column_by_name(name).unwrap();
            for row in embedding_rows(column) {
                let row = row.unwrap();
                assert_eq!(row.len(), 16);
                let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-5);
            }
        }
    }
    assert_eq!(rows as u64, report.rows_out);
    // Rows whose caption cleaning marked missing reach clip_score with a null
    // `caption_clean` and are quarantined by it.
    let quarantined = common::quarantined(&out);
    assert_eq!(quarantined.len() as u64, report.rows_quarantined);
    for (stage, reason) in quarantined.values() {
        assert!(
            ["source", "decode", "clean_caption", "clip_score"].contains(&stage.as_str()),
            "{stage}: {reason}"
        );
        if stage == "clip_score" {
            assert_eq!(reason, "caption `caption_clean` is null");
        }
    }
}

#[test]
fn plan_fails_before_reading_data_when_the_model_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let samples = trustflow_testutil::repo_root().join("pipelines/samples/bytes");
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\nstages:\n  - type: decode\n  - type: clip_score\n    \
         model: \"{}\"\nsink:\n  path: \"{}\"\n",
        samples.display(),
        dir.path().join("no-such-model").display(),
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

// ------------------------------------------------------------------------- bad models

fn build_error(config: ClipScoreConfig) -> String {
    require_ort();
    ClipScoreStage::new("clip".to_string(), config)
        .expect_err("stage build must fail")
        .to_string()
}

fn with_files(edit: impl FnOnce(&mut ClipScoreConfig)) -> ClipScoreConfig {
    let mut config = ClipScoreConfig::for_model(model_dir().display().to_string());
    edit(&mut config);
    config
}

#[test]
fn model_errors_name_the_file_and_the_mismatch() {
    let err = build_error(ClipScoreConfig::for_model("/nonexistent/clip-export"));
    assert!(
        err.starts_with("stage `clip`: /nonexistent/clip-export: model folder not found"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("vision_model.onnx");
    std::fs::write(&garbage, b"this is not a protobuf").unwrap();
    let err = build_error(with_files(|c| {
        c.files.vision_model = Some(garbage.display().to_string())
    }));
    assert!(
        err.contains(&format!(
            "{}: cannot load as an ONNX model",
            garbage.display()
        )),
        "{err}"
    );

    let missing = dir.path().join("absent.onnx");
    let err = build_error(with_files(|c| {
        c.files.text_model = Some(missing.display().to_string())
    }));
    assert!(
        err.contains(&format!(
            "{}: cannot open the ONNX model",
            missing.display()
        )),
        "{err}"
    );

    let wrong = fixtures().join("wrong_inputs.onnx");
    let err = build_error(with_files(|c| {
        c.files.vision_model = Some(wrong.display().to_string())
    }));
    assert!(
        err.contains("wrong_inputs.onnx: expected an input `pixel_values`, found inputs: x, y"),
        "{err}"
    );

    // The text model where the vision model belongs, and the other way round.
    let err = build_error(with_files(|c| {
        c.files.vision_model = Some(model_dir().join("text_model.onnx").display().to_string())
    }));
    assert!(
        err.contains(
            "text_model.onnx: expected an input `pixel_values`, found inputs: input_ids, \
             attention_mask"
        ),
        "{err}"
    );
    let err = build_error(with_files(|c| {
        c.files.text_model = Some(model_dir().join("vision_model.onnx").display().to_string())
    }));
    assert!(
        err.contains(
            "vision_model.onnx: expected an input `input_ids`, found inputs: pixel_values"
        ),
        "{err}"
    );

    // Settings that disagree with the models' static shapes.
    let preprocessor = dir.path().join("preprocessor_config.json");
    std::fs::write(
        &preprocessor,
        r#"{"size": {"shortest_edge": 24}, "crop_size": {"height": 24, "width": 24}}"#,
    )
    .unwrap();
    let err = build_error(with_files(|c| {
        c.files.preprocessor_config = Some(preprocessor.display().to_string())
    }));
    assert!(
        err.contains(
            "vision_model.onnx: input `pixel_values` has shape [-1, 3, 32, 32] but \
             preprocessor_config.json gives [_, 3, 24, 24] (axis 2 differs)"
        ),
        "{err}"
    );
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("config.json")).unwrap())
            .unwrap();
    config["projection_dim"] = 8.into();
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = build_error(with_files(|c| {
        c.files.config = Some(config_path.display().to_string())
    }));
    assert!(
        err.contains(
            "vision_model.onnx: output `image_embeds` has 16 values per row but config.json's \
             projection_dim is 8"
        ),
        "{err}"
    );

    let err = build_error(with_files(|c| {
        c.files.tokenizer = Some(dir.path().join("tokenizer.json").display().to_string())
    }));
    assert!(
        err.contains("tokenizer.json: tokenizer file not found"),
        "{err}"
    );
}

/// Captures what `tracing` logs on this thread while `f` runs.
fn capture_logs<R>(f: impl FnOnce() -> R) -> (R, String) {
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let result = tracing::subscriber::with_default(subscriber, f);
    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    (result, logs)
}

#[test]
fn cuda_without_fallback_fails_clearly_and_with_fallback_runs_on_cpu() {
    require_ort();
    // The ONNX Runtime of scripts/setup.sh is the CPU build from PyPI.
    let err = build_error(with_files(|c| {
        c.session.execution_provider = ExecutionProviderName::Cuda
    }));
    assert!(
        err.contains("vision_model.onnx: execution_provider `cuda` is not available")
            && err.contains("Set `fallback: cpu`"),
        "{err}"
    );

    let (stage, logs) = capture_logs(|| {
        ClipScoreStage::new(
            "clip".to_string(),
            with_files(|c| {
                c.session.execution_provider = ExecutionProviderName::Cuda;
                c.session.fallback = Fallback::Cpu;
            }),
        )
    });
    let stage = stage.unwrap();
    assert_eq!(stage.provider(), ExecutionProviderName::Cpu);
    assert!(
        logs.contains("execution_provider `cuda` is not available")
            && logs.contains("running on CPU because `fallback: cpu` is set"),
        "{logs}"
    );
    // And it scores.
    let image = std::fs::read(fixtures().join("images/03_flower_square.png")).unwrap();
    let output = stage
        .process(&batch(vec![Some(image)], vec![Some("a flower".into())]))
        .unwrap();
    assert!(output.rejected.is_empty() && output.columns[0].is_valid(0));
}

// ------------------------------------------------------------------------------ config

#[test]
fn config_parses_validates_and_describes_itself() {
    let spec: StageSpec = serde_json::from_value(serde_json::json!({
        "type": "clip_score", "model": "models/clip", "execution_provider": "cuda",
        "fallback": "cpu", "intra_op_threads": 2
    }))
    .unwrap();
    let StageKind::ClipScore(config) = &spec.kind else {
        panic!("{spec:?}")
    };
    assert_eq!(config.files.model.as_deref(), Some("models/clip"));
    assert_eq!(config.session.fallback, Fallback::Cpu);
    assert!(config.emit_embeddings);
    assert_eq!(config.image.max_pixels, 40_000_000);
    assert!(config.validate().is_empty());
    let typo = serde_json::json!({"model": "m", "modle": 1});
    let (field, message) = StageKind::from_value("clip_score", typo, "stages[0]").unwrap_err();
    assert_eq!(field, "stages[0].modle");
    assert!(message.contains("unknown field `modle`"), "{message}");
    let mut bad = ClipScoreConfig::for_model("m");
    bad.files.model = None;
    bad.files.vision_model = Some("v.onnx".into());
    bad.logit_scale = Some(-1.0);
    bad.session.intra_op_threads = 1000;
    bad.image.formats.clear();
    let fields: Vec<String> = bad.validate().into_iter().map(|(f, _)| f).collect();
    assert_eq!(
        fields,
        ["model", "intra_op_threads", "logit_scale", "formats"]
    );
    let schema = serde_json::to_value(schemars::schema_for!(ClipScoreConfig)).unwrap();
    for (field, _) in schema["properties"].as_object().unwrap() {
        let description = schema["properties"][field]["description"].as_str();
        assert!(description.is_some_and(|d| !d.is_empty()), "{field}");
    }
}

/// `text_output` names the text model's embedding output (a sentence encoder's own
/// output name); a name the model lacks is refused at build time, naming the outputs
/// it has.
#[test]
fn text_output_names_the_text_embedding() {
    let err = build_error(with_files(|c| c.text_output = "sentence_embedding".into()));
    assert!(
        err.contains("text_model.onnx") && err.contains("sentence_embedding"),
        "{err}"
    );
    require_ort();
    let stage = ClipScoreStage::new(
        "clip".to_string(),
        with_files(|c| c.text_output = "text_embeds".into()),
    );
    assert!(stage.is_ok(), "the default name, given explicitly");
}

/// `sessions: 2` serves concurrent callers; 0 sessions is a configuration error.
#[test]
fn several_sessions_serve_concurrent_callers() {
    require_ort();
    let one = ClipScoreStage::new("clip".to_string(), with_files(|_| {})).unwrap();
    let two =
        ClipScoreStage::new("clip".to_string(), with_files(|c| c.session.sessions = 2)).unwrap();
    let captions: Vec<String> = (0..8).map(|i| format!("a photo of thing {i}")).collect();
    let batch = two.premade_batch(&captions).unwrap();
    assert_eq!(batch.rows, 8);
    std::thread::scope(|s| {
        let calls = || (0..3).try_for_each(|_| two.call_models(&batch));
        let a = s.spawn(calls);
        let b = s.spawn(calls);
        assert!(a.join().unwrap().is_ok() && b.join().unwrap().is_ok());
    });
    assert!(
        one.call_models(&one.premade_batch(&captions).unwrap())
            .is_ok()
    );
    let problems = with_files(|c| c.session.sessions = 0).validate();
    assert!(
        problems.iter().any(|(f, _)| f == "sessions"),
        "{problems:?}"
    );
}

/// `jpeg_draft`: large JPEGs are decoded at a reduced scale, so their embeddings move a
/// little; images it cannot shrink (a small JPEG, a PNG) are scored exactly as without it.
#[test]
fn jpeg_draft_changes_only_the_jpegs_it_shrinks_and_only_slightly() {
    let mut config = ClipScoreConfig::for_model(model_dir().display().to_string());
    config.jpeg_draft = true;
    let draft = stage(config);
    // 320x240 and 200x150 JPEGs (target 53x40: scales 4 and 2), a 33x21 JPEG and a PNG
    // (scale 1).
    let files = [
        "05_flower_large.jpg",
        "00_temple_landscape.jpg",
        "02_pagoda_tiny.jpg",
        "03_flower_square.png",
    ];
    let images: Vec<Option<Vec<u8>>> = files
        .iter()
        .map(|f| Some(std::fs::read(fixtures().join("images").join(f)).unwrap()))
        .collect();
    let captions = vec![Some("a photo".to_string()); files.len()];
    let input = batch(images, captions);
    let exact = default_stage().process(&input).unwrap();
    let fast = draft.process(&input).unwrap();
    assert!(exact.rejected.is_empty() && fast.rejected.is_empty());
    let (exact, fast) = (
        embedding_rows(&exact.columns[1]),
        embedding_rows(&fast.columns[1]),
    );
    let cosine = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for (i, file) in files.iter().enumerate() {
        let (e, f) = (exact[i].as_ref().unwrap(), fast[i].as_ref().unwrap());
        let c = cosine(e, f);
        eprintln!("{file}: cosine {c}");
        if i < 2 {
            assert_ne!(e, f, "{file} is decoded smaller");
            assert!(c > 0.95, "{file}: cosine {c}");
        } else {
            assert_eq!(e, f, "{file} is not shrunk");
        }
    }
}
