//! The `caption` stage: captions for the rows that have none (docs/method.md section 1),
//! from an ONNX image-to-text model (a Hugging Face `VisionEncoderDecoderModel`, e.g. a
//! ViT encoder with a GPT-2 decoder) with greedy decoding.
//!
//! **Which rows.** A row needs a caption when the missing column (`caption_missing`,
//! from `clean_caption` with `on_missing: mark`) is true, or when its caption is null.
//! Only those rows' images are decoded and run through the model; the others keep their
//! caption and never touch the model.
//!
//! **Output.** One design: `caption_final` (Utf8) is the caption to use downstream, the
//! given (cleaned) caption or the generated one, never null for a row that is kept; and
//! `caption_source` (Utf8) says which: `given` or `generated`. A row that needs a caption
//! but whose image is null or cannot be decoded is rejected with the reason.
//!
//! **Decoding.** Exactly transformers' `generate(do_sample=False, num_beams=1,
//! max_new_tokens=max_length)`: the encoder runs once per batch on the rows that need a
//! caption; every row starts from `decoder_start_token_id`; each step takes the argmax
//! of the last position's logits (the first index on ties, as `torch.argmax`), a row
//! stops at EOS (which is not part of the text), and decoding stops when every row has
//! stopped or `max_length` new tokens are made. Finished rows leave the batch rather than
//! being padded (each row's logits depend only on its own prefix, so this is the same).
//! The decoder export has no KV cache: each step re-runs the decoder on the whole prefix,
//! so a caption of `n` tokens costs `n` decoder calls over prefixes of 1..n tokens
//! (O(n^2) attention work instead of O(n)); simple, exact, and cheap at caption lengths.

use crate::models::files::{self, ModelFiles, model_files};
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use ort::value::TensorElementType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;

use super::{Stage, StageConfig, StageOutput, require_column};
use crate::columns::{CAPTION, IMAGE};
use crate::error::{Error, Result};
use crate::models::clip_preprocess::{ClipImageConfig, ResizeTarget};
use crate::models::image::{ImageSettings, decode_rgb};
use crate::models::onnx::{InputTensor, OnnxModel, SessionConfig, TensorSpec};

/// Output column: the given (cleaned) caption, or the generated one (Utf8).
pub const CAPTION_FINAL: &str = "caption_final";
/// Output column: `given` or `generated` (Utf8).
pub const CAPTION_SOURCE: &str = "caption_source";
/// `caption_source` of a row that kept its caption.
pub const SOURCE_GIVEN: &str = "given";
/// `caption_source` of a row whose caption the model wrote.
pub const SOURCE_GENERATED: &str = "generated";

const CAPTION_CLEAN: &str = "caption_clean";
const CAPTION_MISSING: &str = "caption_missing";

const IMAGE_TYPES: [DataType; 3] = [
    DataType::LargeBinary,
    DataType::Binary,
    DataType::BinaryView,
];
const TEXT_TYPES: [DataType; 3] = [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View];

fn default_max_length() -> usize {
    20
}

model_files! {
    /// Where the `caption` stage finds its model files (flattened into its settings).
    pub struct CaptionFiles {
        /// Folder of an image-to-text export (VisionEncoderDecoder): `encoder_model.onnx`
        /// (input `pixel_values`, output `last_hidden_state`), `decoder_model.onnx` (inputs
        /// `input_ids` and `encoder_hidden_states`, optionally `attention_mask`, output
        /// `logits`; no KV cache),
        /// `tokenizer.json`, `config.json`, `generation_config.json` (optional: token ids
        /// fall back to `config.json`), `preprocessor_config.json`. A relative path is
        /// resolved against the pipeline file's folder. Optional when every file is given.
        model,
        /// Path of the encoder, overriding `<model>/encoder_model.onnx`.
        encoder_model: needed "encoder_model.onnx",
        /// Path of the decoder, overriding `<model>/decoder_model.onnx`.
        decoder_model: needed "decoder_model.onnx",
        /// Path of the tokenizer, overriding `<model>/tokenizer.json`.
        tokenizer: needed "tokenizer.json",
        /// Path of the model configuration, overriding `<model>/config.json`.
        config: needed "config.json",
        /// Path of the generation settings, overriding `<model>/generation_config.json`.
        generation_config: optional "generation_config.json",
        /// Path of the image processor settings, overriding
        /// `<model>/preprocessor_config.json`.
        preprocessor_config: needed "preprocessor_config.json",
    }
}

/// Settings of the `caption` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CaptionConfig {
    /// The export folder `model` and the paths that override its files.
    #[serde(flatten)]
    pub files: CaptionFiles,
    /// Most new tokens per caption (transformers' `max_new_tokens`). Default 20; at most
    /// the decoder's `n_positions`.
    #[serde(default = "default_max_length")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_length: usize,
    /// Column holding the given captions. Default: `caption_clean` when an earlier stage
    /// provides it, else `caption`.
    #[serde(default)]
    pub caption_column: Option<String>,
    /// Boolean column marking rows whose caption is missing or unusable. Default:
    /// `caption_missing` when an earlier stage provides it; otherwise only null captions
    /// count as missing.
    #[serde(default)]
    pub missing_column: Option<String>,
    /// ONNX Runtime settings: `execution_provider`, `fallback`, `intra_op_threads`,
    /// `sessions`.
    #[serde(flatten)]
    pub session: SessionConfig,
    /// Image limits and formats: `max_pixels`, `max_bytes`, `formats`.
    #[serde(flatten)]
    pub image: ImageSettings,
}

impl CaptionConfig {
    /// A configuration reading the export folder `model`, every other field default.
    pub fn for_model(model: impl Into<String>) -> Self {
        Self {
            files: CaptionFiles::in_folder(model),
            session: SessionConfig::default(),
            image: ImageSettings::default(),
            max_length: default_max_length(),
            caption_column: None,
            missing_column: None,
        }
    }

    /// Make every relative model path relative to `base` (the pipeline file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        self.files.resolve_paths(base);
    }
}

impl StageConfig for CaptionConfig {
    fn session(&self) -> Option<&SessionConfig> {
        Some(&self.session)
    }

    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = self.files.validate();
        let mut problem = |field: &str, message: String| problems.push((field.into(), message));
        for (field, message) in files::blank_fields(&[
            ("caption_column", &self.caption_column),
            ("missing_column", &self.missing_column),
        ]) {
            problem(&field, message);
        }
        if !(1..=4096).contains(&self.max_length) {
            problem(
                "max_length",
                format!("expected 1 to 4096 new tokens, found {}", self.max_length),
            );
        }
        for (field, message) in self.session.validate() {
            problem(&field, message);
        }
        for (field, message) in self.image.validate() {
            problem(&field, message);
        }
        problems
    }

    fn build(&self, name: String, base: &std::path::Path) -> Result<Arc<dyn Stage>> {
        let mut config = self.clone();
        config.resolve_paths(base);
        Ok(Arc::new(CaptionStage::new(name, config)?))
    }
}

/// Token ids and limits from `generation_config.json` and `config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationFacts {
    pub decoder_start: i64,
    pub eos: Vec<i64>,
    /// The decoder's position limit (`decoder.n_positions` or
    /// `decoder.max_position_embeddings`), when given.
    pub positions: Option<usize>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::input(path, format!("not valid JSON: {e}")))
}

fn read_generation_facts(config_path: &Path, generation_path: &Path) -> Result<GenerationFacts> {
    let config = read_json(config_path)?;
    let generation = if generation_path.is_file() {
        Some(read_json(generation_path)?)
    } else {
        None
    };
    let decoder = config.get("decoder");
    // Where to look, in order: generation_config.json, config.json, config.json's decoder.
    let sources: Vec<&Value> = generation.iter().chain([&config]).chain(decoder).collect();
    let find = |key: &str| {
        sources
            .iter()
            .find_map(|v| v.get(key).filter(|v| !v.is_null()))
    };
    let id = |v: &Value, key: &str| -> Result<i64> {
        v.as_i64().filter(|n| *n >= 0).ok_or_else(|| {
            Error::input(
                config_path,
                format!("`{key}` must be a token id (a non-negative integer), found {v}"),
            )
        })
    };
    let start = find("decoder_start_token_id")
        .or_else(|| find("bos_token_id"))
        .ok_or_else(|| {
            Error::input(
                generation_path,
                "no `decoder_start_token_id` (nor `bos_token_id`) in generation_config.json or \
                 config.json",
            )
        })?;
    let decoder_start = id(start, "decoder_start_token_id")?;
    let eos = match find("eos_token_id") {
        None => {
            return Err(Error::input(
                generation_path,
                "no `eos_token_id` in generation_config.json or config.json",
            ));
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| id(v, "eos_token_id"))
            .collect::<Result<Vec<_>>>()?,
        Some(v) => vec![id(v, "eos_token_id")?],
    };
    let positions = decoder
        .and_then(|d| {
            d.get("n_positions")
                .or_else(|| d.get("max_position_embeddings"))
        })
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    Ok(GenerationFacts {
        decoder_start,
        eos,
        positions,
    })
}

/// The built `caption` stage.
#[derive(Debug)]
pub struct CaptionStage {
    name: String,
    config: CaptionConfig,
    encoder: OnnxModel,
    decoder: OnnxModel,
    tokenizer: TokenizerBox,
    image: ClipImageConfig,
    /// (height, width) of `pixel_values`.
    pixel_size: (usize, usize),
    facts: GenerationFacts,
    /// The decoder takes an `attention_mask` (fed all ones: prefixes are never padded).
    decoder_has_mask: bool,
    digest: String,
}

/// `tokenizers::Tokenizer` without its vocabulary in `Debug`.
struct TokenizerBox(Tokenizer);

impl std::fmt::Debug for TokenizerBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.0.get_vocab_size(true))
            .finish_non_exhaustive()
    }
}

impl CaptionStage {
    /// Load and check the models, tokenizer and settings; every problem is an error
    /// naming the file.
    pub fn new(name: String, config: CaptionConfig) -> Result<Self> {
        let err = |e: Error| Error::stage(&name, e);
        let paths = &config.files;
        paths
            .check_folder(
                "an image-to-text export folder holding encoder_model.onnx, \
                 decoder_model.onnx, tokenizer.json, config.json, preprocessor_config.json",
            )
            .map_err(err)?;
        let encoder_path = paths.file_or_name("encoder_model");
        let decoder_path = paths.file_or_name("decoder_model");
        let config_path = paths.file_or_name("config");
        let generation_path = paths.file_or_name("generation_config");
        if paths.generation_config.is_some() && !generation_path.is_file() {
            return Err(err(Error::input(&generation_path, "file not found")));
        }
        let facts = read_generation_facts(&config_path, &generation_path).map_err(err)?;
        if let Some(positions) = facts.positions
            && config.max_length > positions
        {
            return Err(err(Error::input(
                &config_path,
                format!(
                    "the decoder takes at most {positions} positions, fewer than \
                     max_length {} (lower max_length)",
                    config.max_length
                ),
            )));
        }

        let preprocessor_path = paths.file_or_name("preprocessor_config");
        let mut processor = read_json(&preprocessor_path).map_err(err)?;
        // ViTImageProcessor (the usual encoder's) does not centre-crop; the CLIP defaults
        // that ClipImageConfig starts from do, so say so when the file is silent.
        if let Some(map) = processor.as_object_mut() {
            map.entry("do_center_crop").or_insert(Value::Bool(false));
        }
        let image = ClipImageConfig::from_json(&processor)
            .map_err(|m| err(Error::input(&preprocessor_path, m)))?;
        let pixel_size = match (image.do_center_crop, image.do_resize, image.size) {
            (true, _, _) => (image.crop_size.0 as usize, image.crop_size.1 as usize),
            (false, true, ResizeTarget::Exact { height, width }) => {
                (height as usize, width as usize)
            }
            _ => {
                return Err(err(Error::input(
                    &preprocessor_path,
                    "images would keep different sizes (no centre crop and no fixed size), \
                     so they cannot be batched; caption needs a {height, width} size or \
                     do_center_crop",
                )));
            }
        };

        let tokenizer_path = paths.file_or_name("tokenizer");
        if !tokenizer_path.is_file() {
            return Err(err(Error::input(
                &tokenizer_path,
                "tokenizer file not found",
            )));
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            err(Error::input(
                &tokenizer_path,
                format!("not a usable tokenizer.json: {e}"),
            ))
        })?;

        let session = config.session;
        let encoder = OnnxModel::load(&encoder_path, &session).map_err(err)?;
        encoder
            .check(
                &[TensorSpec::new(
                    "pixel_values",
                    TensorElementType::Float32,
                    4,
                )],
                &[],
                &[TensorSpec::new(
                    "last_hidden_state",
                    TensorElementType::Float32,
                    3,
                )],
            )
            .map_err(err)?;
        let decoder = OnnxModel::load(&decoder_path, &session).map_err(err)?;
        decoder
            .check(
                &[
                    TensorSpec::new("input_ids", TensorElementType::Int64, 2),
                    TensorSpec::new("encoder_hidden_states", TensorElementType::Float32, 3),
                ],
                &[TensorSpec::new(
                    "attention_mask",
                    TensorElementType::Int64,
                    2,
                )],
                &[TensorSpec::new("logits", TensorElementType::Float32, 3)],
            )
            .map_err(err)?;
        let decoder_has_mask = decoder.input_names().iter().any(|n| n == "attention_mask");
        if let Some(shape) = encoder.shape_of("pixel_values") {
            let want = [3, pixel_size.0 as i64, pixel_size.1 as i64];
            if shape[1..]
                .iter()
                .zip(want)
                .any(|(&have, want)| have > 0 && have != want)
            {
                return Err(err(Error::input(
                    &encoder_path,
                    format!(
                        "input `pixel_values` has shape {shape:?} but preprocessor_config.json \
                         gives [_, 3, {}, {}]",
                        pixel_size.0, pixel_size.1
                    ),
                )));
            }
        }

        let mut files = vec![
            encoder_path,
            decoder_path,
            tokenizer_path,
            config_path,
            preprocessor_path,
        ];
        if generation_path.is_file() {
            files.push(generation_path);
        }
        let digest = crate::digest::files_digest(files).map_err(err)?;
        Ok(Self {
            name,
            config,
            encoder,
            decoder,
            tokenizer: TokenizerBox(tokenizer),
            image,
            pixel_size,
            facts,
            decoder_has_mask,
            digest,
        })
    }

    /// Token ids and limits read from the model's configuration.
    pub fn generation_facts(&self) -> &GenerationFacts {
        &self.facts
    }

    /// The caption column read for an input with `schema`.
    pub fn caption_column(&self, schema: &Schema) -> String {
        match &self.config.caption_column {
            Some(c) => c.clone(),
            None if schema.field_with_name(CAPTION_CLEAN).is_ok() => CAPTION_CLEAN.to_string(),
            None => CAPTION.to_string(),
        }
    }

    /// The missing-caption column read for an input with `schema`, if any.
    pub fn missing_column(&self, schema: &Schema) -> Option<String> {
        match &self.config.missing_column {
            Some(c) => Some(c.clone()),
            None if schema.field_with_name(CAPTION_MISSING).is_ok() => {
                Some(CAPTION_MISSING.to_string())
            }
            None => None,
        }
    }

    /// Decode and preprocess one image into `out` (`3 * h * w` values appended).
    pub fn pixels(&self, bytes: &[u8], out: &mut Vec<f32>) -> std::result::Result<(), String> {
        let limits = self.config.image.limits();
        let (_, rgb) =
            decode_rgb(bytes, &limits, &self.config.image.formats).map_err(|e| e.to_string())?;
        let start = out.len();
        let size = self.image.preprocess_into(&rgb, out)?;
        if size != self.pixel_size {
            out.truncate(start);
            return Err(format!(
                "preprocessed image is {}x{}, the model takes {}x{}",
                size.1, size.0, self.pixel_size.1, self.pixel_size.0
            ));
        }
        Ok(())
    }

    /// Greedy decoding for `n` preprocessed images (`pixels` is `[n, 3, h, w]`). Returns
    /// each row's token ids as `generate` does: the decoder start token first, then the
    /// new tokens, ending with EOS when the row stopped there.
    pub fn generate_ids(&self, n: usize, pixels: Vec<f32>) -> Result<Vec<Vec<i64>>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let (h, w) = self.pixel_size;
        let hidden = self
            .encoder
            .run(
                vec![(
                    "pixel_values",
                    InputTensor::F32 {
                        shape: vec![n, 3, h, w],
                        data: pixels,
                    },
                )],
                &["last_hidden_state"],
            )?
            .remove(0);
        let [rows, seq, dim] = hidden.shape[..] else {
            return Err(Error::input(
                self.encoder.path(),
                format!("`last_hidden_state` has shape {:?}", hidden.shape),
            ));
        };
        if rows != n {
            return Err(Error::input(
                self.encoder.path(),
                format!("`last_hidden_state` has {rows} rows for {n} images"),
            ));
        }
        let per_row = seq * dim;
        let mut ids: Vec<Vec<i64>> = vec![vec![self.facts.decoder_start]; n];
        let mut active: Vec<usize> = (0..n).collect();
        for step in 1..=self.config.max_length {
            if active.is_empty() {
                break;
            }
            let b = active.len();
            let mut input = Vec::with_capacity(b * step);
            let mut states = Vec::with_capacity(b * per_row);
            for &row in &active {
                input.extend_from_slice(&ids[row]);
                states.extend_from_slice(&hidden.data[row * per_row..(row + 1) * per_row]);
            }
            let mut inputs = vec![
                (
                    "input_ids",
                    InputTensor::I64 {
                        shape: vec![b, step],
                        data: input,
                    },
                ),
                (
                    "encoder_hidden_states",
                    InputTensor::F32 {
                        shape: vec![b, seq, dim],
                        data: states,
                    },
                ),
            ];
            if self.decoder_has_mask {
                inputs.push((
                    "attention_mask",
                    InputTensor::I64 {
                        shape: vec![b, step],
                        data: vec![1; b * step],
                    },
                ));
            }
            let logits = self.decoder.run(inputs, &["logits"])?.remove(0);
            let [lb, lt, vocab] = logits.shape[..] else {
                return Err(Error::input(
                    self.decoder.path(),
                    format!("`logits` has shape {:?}", logits.shape),
                ));
            };
            if lb != b || lt != step || vocab == 0 {
                return Err(Error::input(
                    self.decoder.path(),
                    format!(
                        "`logits` has shape {:?} for input_ids of shape [{b}, {step}]",
                        logits.shape
                    ),
                ));
            }
            let mut still = Vec::with_capacity(b);
            for (i, &row) in active.iter().enumerate() {
                let last = &logits.data[(i * step + step - 1) * vocab..(i * step + step) * vocab];
                let mut best = 0;
                for (j, &v) in last.iter().enumerate() {
                    // `>` keeps the first maximum, as torch.argmax; NaN never wins.
                    if v > last[best] || (last[best].is_nan() && !v.is_nan()) {
                        best = j;
                    }
                }
                let token = best as i64;
                ids[row].push(token);
                if !self.facts.eos.contains(&token) {
                    still.push(row);
                }
            }
            active = still;
        }
        Ok(ids)
    }

    /// The text of generated ids (start token and EOS dropped, special tokens skipped).
    pub fn decode_text(&self, ids: &[i64]) -> std::result::Result<String, String> {
        let body: Vec<u32> = ids
            .iter()
            .skip(1)
            .filter(|t| !self.facts.eos.contains(t))
            .map(|&t| t as u32)
            .collect();
        self.tokenizer
            .0
            .decode(&body, true)
            .map_err(|e| format!("cannot decode the generated tokens: {e}"))
    }

    /// Captions for preprocessed images (`pixels` is `[n, 3, h, w]`).
    pub fn generate(&self, n: usize, pixels: Vec<f32>) -> Result<Vec<String>> {
        self.generate_ids(n, pixels)?
            .iter()
            .map(|ids| {
                self.decode_text(ids)
                    .map_err(|m| Error::stage(&self.name, m))
            })
            .collect()
    }
}

impl Stage for CaptionStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn output_fields(&self, input: &Schema) -> Result<Vec<Field>> {
        require_column(&self.name, input, IMAGE, &IMAGE_TYPES)?;
        require_column(&self.name, input, &self.caption_column(input), &TEXT_TYPES)?;
        if let Some(missing) = self.missing_column(input) {
            require_column(&self.name, input, &missing, &[DataType::Boolean])?;
        }
        Ok(vec![
            Field::new(CAPTION_FINAL, DataType::Utf8, true),
            Field::new(CAPTION_SOURCE, DataType::Utf8, true),
        ])
    }

    fn process(&self, batch: &RecordBatch) -> Result<StageOutput> {
        let schema = batch.schema();
        let fail = |e: &dyn std::fmt::Display| Error::stage(&self.name, e.to_string());
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| Error::stage(&self.name, format!("input lacks column `{name}`")))
        };
        let caption_name = self.caption_column(&schema);
        let captions = cast(column(&caption_name)?, &DataType::Utf8).map_err(|e| fail(&e))?;
        let captions = captions.as_string::<i32>();
        let missing = match self.missing_column(&schema) {
            Some(name) => Some(column(&name)?.as_boolean().clone()),
            None => None,
        };
        let images = cast(column(IMAGE)?, &DataType::LargeBinary).map_err(|e| fail(&e))?;
        let images = images.as_binary::<i64>();

        let rows = batch.num_rows();
        let mut rejected = Vec::new();
        let mut needed = Vec::new();
        let mut pixels = Vec::new();
        for row in 0..rows {
            let needs = captions.is_null(row)
                || missing
                    .as_ref()
                    .is_some_and(|m| m.is_valid(row) && m.value(row));
            if !needs {
                continue;
            }
            let outcome = if images.is_null(row) {
                Err("image is null (needed to generate the missing caption)".to_string())
            } else {
                self.pixels(images.value(row), &mut pixels)
                    .map_err(|e| format!("cannot generate a caption: {e}"))
            };
            match outcome {
                Ok(()) => needed.push(row),
                Err(reason) => rejected.push((row, reason)),
            }
        }
        let generated = self.generate(needed.len(), pixels)?;
        let mut text: Vec<Option<String>> = (0..rows)
            .map(|row| (!captions.is_null(row)).then(|| captions.value(row).to_string()))
            .collect();
        let mut source: Vec<Option<&str>> = vec![Some(SOURCE_GIVEN); rows];
        for (&row, caption) in needed.iter().zip(generated) {
            text[row] = Some(caption);
            source[row] = Some(SOURCE_GENERATED);
        }
        for (row, _) in &rejected {
            text[*row] = None;
            source[*row] = None;
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(text)),
            Arc::new(StringArray::from(source)),
        ];
        debug_assert!(columns.iter().all(|c| c.len() == rows));
        Ok(StageOutput { columns, rejected })
    }

    fn content_digest(&self) -> Option<String> {
        Some(self.digest.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let parsed: CaptionConfig = serde_json::from_str(r#"{"model": "m"}"#).unwrap();
        assert_eq!(parsed, CaptionConfig::for_model("m"));
        assert!(parsed.validate().is_empty());
        let typo = serde_json::json!({"model": "m", "beams": 2});
        let (field, message) =
            crate::stages::StageKind::from_value("caption", typo, "s").unwrap_err();
        assert_eq!(field, "s.beams");
        assert!(message.contains("unknown field `beams`"), "{message}");
        let none: CaptionConfig = serde_json::from_str(r#"{"max_length": 0}"#).unwrap();
        let fields: Vec<String> = none.validate().into_iter().map(|(f, _)| f).collect();
        assert!(fields.contains(&"model".to_string()), "{fields:?}");
        assert!(fields.contains(&"max_length".to_string()), "{fields:?}");
    }

    #[test]
    fn relative_paths_resolve_against_base() {
        let mut config = CaptionConfig::for_model("models/cap");
        config.files.decoder_model = Some("/abs/decoder.onnx".into());
        config.resolve_paths(Path::new("/pipes"));
        assert_eq!(config.files.model.as_deref(), Some("/pipes/models/cap"));
        assert_eq!(
            config.files.decoder_model.as_deref(),
            Some("/abs/decoder.onnx")
        );
    }
}
