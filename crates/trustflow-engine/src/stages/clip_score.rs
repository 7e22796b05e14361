//! The `clip_score` stage: how well each caption fits its image according to CLIP
//! (docs/method.md section 3). Every row's image is decoded and preprocessed exactly as
//! transformers' `CLIPImageProcessor` does, its caption cut to 75 characters and
//! tokenised to the model's context; one ONNX call per batch for each of the vision and
//! text models gives the embeddings, which are unit-normalised. Adds `clip_similarity`
//! (the cosine of the pair) and, by default, the two unit embeddings, which the
//! `uncertainty` stage turns into weights.

use crate::models::files::{self, ModelFiles, model_files};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, BinaryArrayType, FixedSizeListArray, Float32Array, StringArrayType,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use ort::value::TensorElementType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Stage, StageConfig, StageOutput, require_column};
use crate::columns::{CAPTION, IMAGE};
use crate::error::{Error, Result};
use crate::models::clip_preprocess::{ClipImageConfig, ResizeTarget};
use crate::models::image::{ImageSettings, ReadWindow, TargetSize, decode_rgb_part, scratch};
use crate::models::onnx::{ExecutionProviderName, InputTensor, OnnxModel, SessionConfig, TensorSpec};
use crate::models::text::{CLIP_CAPTION_CHARS, TextTokenizer};

/// Output column: cosine similarity of the unit image and text embeddings (Float32).
pub const CLIP_SIMILARITY: &str = "clip_similarity";
/// Output column: unit image embedding, `FixedSizeList<Float32, D>`.
pub const CLIP_IMAGE_EMBEDDING: &str = "clip_image_embedding";
/// Output column: unit text embedding, `FixedSizeList<Float32, D>`.
pub const CLIP_TEXT_EMBEDDING: &str = "clip_text_embedding";
/// Field metadata key on the output columns holding the logit scale `s` (decimal).
pub const LOGIT_SCALE_METADATA: &str = "logit_scale";
/// The cleaned caption column, preferred when present.
const CAPTION_CLEAN: &str = "caption_clean";

const IMAGE_TYPES: [DataType; 3] = [
    DataType::LargeBinary,
    DataType::Binary,
    DataType::BinaryView,
];
const TEXT_TYPES: [DataType; 3] = [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View];

fn default_true() -> bool {
    true
}
fn default_text_output() -> String {
    "text_embeds".into()
}

model_files! {
    /// Where the `clip_score` stage finds its model files (flattened into its settings).
    pub struct ClipScoreFiles {
        /// Folder of a CLIP export in Hugging Face Optimum's layout: `vision_model.onnx`
        /// (input `pixel_values`, output `image_embeds`), `text_model.onnx` (inputs
        /// `input_ids` and optionally `attention_mask`, output `text_embeds`),
        /// `tokenizer.json`, `config.json`, `preprocessor_config.json`. A relative path is
        /// resolved against the pipeline file's folder. Optional when all five files are given.
        model,
        /// Path of the vision model, overriding `<model>/vision_model.onnx`.
        vision_model: needed "vision_model.onnx",
        /// Path of the text model, overriding `<model>/text_model.onnx`.
        text_model: needed "text_model.onnx",
        /// Path of the tokenizer, overriding `<model>/tokenizer.json`.
        tokenizer: needed "tokenizer.json",
        /// Path of the model configuration, overriding `<model>/config.json`.
        config: needed "config.json",
        /// Path of the image processor settings, overriding
        /// `<model>/preprocessor_config.json`.
        preprocessor_config: needed "preprocessor_config.json",
    }
}

/// Settings of the `clip_score` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClipScoreConfig {
    /// The export folder `model` and the paths that override its files.
    #[serde(flatten)]
    pub files: ClipScoreFiles,
    /// Name of the text model's embedding output [B, D]. Default `text_embeds`; set it
    /// to use a sentence encoder as the text tower (e.g. `461` for the
    /// paraphrase-MiniLM ONNX that setup.sh installs).
    #[serde(default = "default_text_output")]
    pub text_output: String,
    /// Column holding the captions. Default: `caption_clean` when an earlier stage
    /// provides it, else `caption`.
    #[serde(default)]
    pub caption_column: Option<String>,
    /// CLIP's logit scale `s` (the exponential of the learned parameter; 100 for OpenAI
    /// CLIP), recorded as `logit_scale` metadata on the output columns for the
    /// `uncertainty` stage. Default: `exp(logit_scale_init_value)` from `config.json`,
    /// which is the value *before* training: for a trained model, give its learned
    /// scale here.
    #[serde(default)]
    pub logit_scale: Option<f64>,
    /// Also output the unit embeddings `clip_image_embedding` and `clip_text_embedding`
    /// (needed by the `uncertainty` stage). Default true.
    #[serde(default = "default_true")]
    pub emit_embeddings: bool,
    /// Decode large JPEGs at 1/2, 1/4 or 1/8 of their size in the DCT domain, as
    /// Pillow's `draft` does, when the resize target stays at most that small; then
    /// resize exactly as usual. Several times faster for photos much larger than the
    /// model's input, and approximate: the pixels are not the reference
    /// preprocessing's (docs/performance.md gives the agreement measured). Default
    /// false: Pillow-exact.
    #[serde(default)]
    pub jpeg_draft: bool,
    /// ONNX Runtime settings: `execution_provider`, `fallback`, `intra_op_threads`,
    /// `sessions`.
    #[serde(flatten)]
    pub session: SessionConfig,
    /// Image limits and formats: `max_pixels`, `max_bytes`, `formats`.
    #[serde(flatten)]
    pub image: ImageSettings,
}

/// A batch of model inputs made ahead of time ([`ClipScoreStage::premade_batch`]).
pub struct PremadeBatch {
    pub rows: usize,
    pixels: Vec<f32>,
    tokens: Vec<Vec<u32>>,
}

impl ClipScoreConfig {
    /// A configuration reading the export folder `model`, every other field default.
    pub fn for_model(model: impl Into<String>) -> Self {
        Self {
            files: ClipScoreFiles::in_folder(model),
            session: SessionConfig::default(),
            image: ImageSettings::default(),
            text_output: default_text_output(),
            caption_column: None,
            logit_scale: None,
            emit_embeddings: true,
            jpeg_draft: false,
        }
    }

    /// Make every relative model path relative to `base` (the pipeline file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        self.files.resolve_paths(base);
    }
}

impl StageConfig for ClipScoreConfig {
    fn session(&self) -> Option<&SessionConfig> {
        Some(&self.session)
    }

    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = self.files.validate();
        let mut problem = |field: &str, message: String| problems.push((field.into(), message));
        for (field, message) in files::blank_fields(&[("caption_column", &self.caption_column)]) {
            problem(&field, message);
        }
        for (field, message) in self.session.validate() {
            problem(&field, message);
        }
        if let Some(s) = self.logit_scale
            && !(s.is_finite() && s > 0.0)
        {
            problem(
                "logit_scale",
                format!("must be a positive number, found {s}"),
            );
        }
        for (field, message) in self.image.validate() {
            problem(&field, message);
        }
        problems
    }

    fn build(&self, name: String, base: &std::path::Path) -> Result<Arc<dyn Stage>> {
        let mut config = self.clone();
        config.resolve_paths(base);
        Ok(Arc::new(ClipScoreStage::new(name, config)?))
    }
}

/// What `config.json` says about the model.
struct ModelFacts {
    projection_dim: Option<usize>,
    context: usize,
    logit_scale_init: f64,
}

fn read_model_config(path: &Path) -> Result<ModelFacts> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(path, format!("not valid JSON: {e}")))?;
    let positive = |v: Option<&Value>, what: &str| -> Result<Option<usize>> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|n| *n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| Error::input(path, format!("`{what}` must be a positive integer"))),
        }
    };
    let text_config = value.get("text_config");
    Ok(ModelFacts {
        projection_dim: positive(value.get("projection_dim"), "projection_dim")?,
        context: positive(
            text_config.and_then(|t| t.get("max_position_embeddings")),
            "text_config.max_position_embeddings",
        )?
        .unwrap_or(77),
        logit_scale_init: value
            .get("logit_scale_init_value")
            .and_then(Value::as_f64)
            .unwrap_or(2.6592),
    })
}

/// The built `clip_score` stage.
#[derive(Debug)]
pub struct ClipScoreStage {
    name: String,
    config: ClipScoreConfig,
    vision: OnnxModel,
    text: OnnxModel,
    text_has_mask: bool,
    tokenizer: TextTokenizer,
    image: ClipImageConfig,
    /// (height, width) of `pixel_values`.
    pixel_size: (usize, usize),
    dim: usize,
    logit_scale: f64,
    /// Fingerprints of the five model files (see `Stage::content_digest`).
    digest: String,
}

/// The five files of a CLIP export, resolved from the stage's settings.
struct ClipFiles {
    vision: PathBuf,
    text: PathBuf,
    tokenizer: PathBuf,
    config: PathBuf,
    preprocessor: PathBuf,
}

impl ClipFiles {
    fn resolve(paths: &ClipScoreFiles) -> Result<Self> {
        paths.check_folder(
            "an export folder holding vision_model.onnx, text_model.onnx, \
             tokenizer.json, config.json, preprocessor_config.json",
        )?;
        let files = ClipFiles {
            vision: paths.file_or_name("vision_model"),
            text: paths.file_or_name("text_model"),
            tokenizer: paths.file_or_name("tokenizer"),
            config: paths.file_or_name("config"),
            preprocessor: paths.file_or_name("preprocessor_config"),
        };
        if let Some(folder) = &paths.model
            && !files.vision.exists()
            && Path::new(folder).join("model.onnx").is_file()
        {
            return Err(Error::input(
                &files.vision,
                "not found; the folder holds a combined model.onnx, but clip_score needs the \
                 separate vision_model.onnx and text_model.onnx (or set vision_model and \
                 text_model)",
            ));
        }
        Ok(files)
    }

    /// Every file the outputs depend on (for the stage's content digest).
    fn all(&self) -> [PathBuf; 5] {
        [
            self.vision.clone(),
            self.text.clone(),
            self.tokenizer.clone(),
            self.config.clone(),
            self.preprocessor.clone(),
        ]
    }
}

/// (height, width) of every preprocessed image: batching needs one size for all.
fn batch_pixel_size(image: &ClipImageConfig, preprocessor: &Path) -> Result<(usize, usize)> {
    match (image.do_center_crop, image.do_resize, image.size) {
        (true, _, _) => Ok((image.crop_size.0 as usize, image.crop_size.1 as usize)),
        (false, true, ResizeTarget::Exact { height, width }) => {
            Ok((height as usize, width as usize))
        }
        _ => Err(Error::input(
            preprocessor,
            "images would keep different sizes (no centre crop and no fixed size), so they \
             cannot be batched; clip_score needs do_center_crop or a {height, width} size",
        )),
    }
}

/// The vision and text models, loaded and checked against the tensors the stage feeds
/// and reads.
fn load_towers(files: &ClipFiles, config: &ClipScoreConfig) -> Result<(OnnxModel, OnnxModel)> {
    let vision = OnnxModel::load(&files.vision, &config.session)?;
    vision.check(
        &[TensorSpec::new("pixel_values", TensorElementType::Float32, 4)],
        &[],
        &[TensorSpec::new("image_embeds", TensorElementType::Float32, 2)],
    )?;
    let text = OnnxModel::load(&files.text, &config.session)?;
    text.check(
        &[TensorSpec::new("input_ids", TensorElementType::Int64, 2)],
        &[TensorSpec::new("attention_mask", TensorElementType::Int64, 2)],
        &[TensorSpec::new(
            config.text_output.clone(),
            TensorElementType::Float32,
            2,
        )],
    )?;
    Ok((vision, text))
}

/// A static `pixel_values` shape in the vision model must be the preprocessor's size.
fn check_pixel_shape(
    vision: &OnnxModel,
    (height, width): (usize, usize),
    files: &ClipFiles,
) -> Result<()> {
    let Some(shape) = vision.shape_of("pixel_values") else {
        return Ok(());
    };
    let want = [3, height as i64, width as i64];
    for (axis, (&have, want)) in shape[1..].iter().zip(want).enumerate() {
        if have > 0 && have != want {
            let preprocessor = files.preprocessor.file_name().map_or_else(
                || files.preprocessor.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            return Err(Error::input(
                &files.vision,
                format!(
                    "input `pixel_values` has shape {shape:?} but {preprocessor} gives \
                     [_, 3, {height}, {width}] (axis {} differs)",
                    axis + 1
                ),
            ));
        }
    }
    Ok(())
}

/// The embedding size D: config.json's `projection_dim`, else a static size of the
/// models' outputs; static sizes must agree with it.
fn embedding_dim(
    vision: &OnnxModel,
    text: &OnnxModel,
    text_output: &str,
    facts: &ModelFacts,
    files: &ClipFiles,
) -> Result<usize> {
    let static_dim = |model: &OnnxModel, output: &str| {
        model
            .shape_of(output)
            .and_then(|s| s.last().copied())
            .filter(|&d| d > 0)
            .map(|d| d as usize)
    };
    let image_dim = static_dim(vision, "image_embeds");
    let text_dim = static_dim(text, text_output);
    let dim = facts
        .projection_dim
        .or(image_dim)
        .or(text_dim)
        .ok_or_else(|| {
            Error::input(
                &files.config,
                "no `projection_dim`, and the models' embedding sizes are dynamic; cannot \
                 tell the embedding size",
            )
        })?;
    for (path, output, have) in [
        (&files.vision, "image_embeds", image_dim),
        (&files.text, text_output, text_dim),
    ] {
        if let Some(have) = have
            && have != dim
        {
            return Err(Error::input(
                path,
                format!(
                    "output `{output}` has {have} values per row but config.json's \
                     projection_dim is {dim}"
                ),
            ));
        }
    }
    Ok(dim)
}

impl ClipScoreStage {
    /// Load and check the models, tokenizer and settings. Every problem (a missing
    /// folder or file, a file that is not ONNX, inputs or outputs that do not match, an
    /// execution provider that is not available) is an error naming the file.
    pub fn new(name: String, config: ClipScoreConfig) -> Result<Self> {
        let err = |e: Error| Error::stage(&name, e);
        let files = ClipFiles::resolve(&config.files).map_err(err)?;
        let facts = read_model_config(&files.config).map_err(err)?;
        let image = ClipImageConfig::load(&files.preprocessor).map_err(err)?;
        let pixel_size = batch_pixel_size(&image, &files.preprocessor).map_err(err)?;
        let tokenizer =
            TextTokenizer::load(&files.tokenizer, facts.context, Some(CLIP_CAPTION_CHARS))
                .map_err(err)?;
        let (vision, text) = load_towers(&files, &config).map_err(err)?;
        check_pixel_shape(&vision, pixel_size, &files).map_err(err)?;
        let dim = embedding_dim(&vision, &text, &config.text_output, &facts, &files)
            .map_err(err)?;
        let logit_scale = config
            .logit_scale
            .unwrap_or_else(|| facts.logit_scale_init.exp());
        let digest = crate::digest::files_digest(files.all()).map_err(err)?;
        Ok(Self {
            digest,
            name,
            text_has_mask: text.input_names().iter().any(|n| n == "attention_mask"),
            config,
            vision,
            text,
            tokenizer,
            image,
            pixel_size,
            dim,
            logit_scale,
        })
    }

    /// Embedding size D.
    pub fn embedding_dim(&self) -> usize {
        self.dim
    }

    /// The logit scale `s` (configured, or `exp(logit_scale_init_value)`).
    pub fn logit_scale(&self) -> f64 {
        self.logit_scale
    }

    /// The execution provider the models run on (CPU after a fallback).
    pub fn provider(&self) -> ExecutionProviderName {
        self.vision.provider()
    }

    /// The caption column read for an input with `schema`.
    pub fn caption_column(&self, schema: &Schema) -> String {
        match &self.config.caption_column {
            Some(c) => c.clone(),
            None if schema.field_with_name(CAPTION_CLEAN).is_ok() => CAPTION_CLEAN.to_string(),
            None => CAPTION.to_string(),
        }
    }

    fn embedding_type(&self) -> DataType {
        DataType::FixedSizeList(
            Arc::new(Field::new_list_field(DataType::Float32, true)),
            self.dim as i32,
        )
    }

    /// Preprocess one row's image, appending the model's input to `out`; the reason
    /// when it cannot be used. (Public for the bench's decode ceiling.)
    pub fn pixels(&self, bytes: &[u8], out: &mut Vec<f32>) -> std::result::Result<(), String> {
        let limits = self.config.image.limits();
        let target = |w, h| self.image.resized_size(w, h);
        let draft = self.config.jpeg_draft.then_some(&target as TargetSize<'_>);
        // Only the rows and columns the centre crop and the resize filter read are
        // decoded (for JPEG; the bytes are the whole decode's).
        let reads = |decoded, header| self.image.source_window(decoded, header);
        let (info, part) = decode_rgb_part(
            bytes,
            &limits,
            &self.config.image.formats,
            draft,
            Some(&reads as ReadWindow<'_>),
        )
        .map_err(|e| e.to_string())?;
        let (w, h) = self.image.resized_size(info.width, info.height);
        if u64::from(w) * u64::from(h) > self.config.image.max_pixels {
            return Err(format!(
                "image of {}x{} would be resized to {w}x{h}, over the limit of {} pixels",
                info.width, info.height, self.config.image.max_pixels
            ));
        }
        let start = out.len();
        let size = self
            .image
            .preprocess_part_into(part.view(), (info.width, info.height), out);
        scratch::recycle(part.pixels);
        let size = size?;
        if size != self.pixel_size {
            out.truncate(start);
            return Err(format!(
                "preprocessed image is {}x{}, the model takes {}x{}",
                size.1, size.0, self.pixel_size.1, self.pixel_size.0
            ));
        }
        Ok(())
    }

    fn score<'a, 'b>(
        &self,
        images: impl BinaryArrayType<'a>,
        captions: impl StringArrayType<'b>,
        rows: usize,
        caption_name: &str,
    ) -> Result<StageOutput> {
        let mut rejected = Vec::new();
        let mut kept = Vec::new();
        let mut pixels = Vec::new();
        let mut tokens = Vec::new();
        for row in 0..rows {
            let outcome = (|| {
                if images.is_null(row) {
                    return Err("image is null".to_string());
                }
                if captions.is_null(row) {
                    return Err(format!("caption `{caption_name}` is null"));
                }
                let ids = self.tokenizer.encode(captions.value(row))?;
                self.pixels(images.value(row), &mut pixels)?;
                Ok(ids)
            })();
            match outcome {
                Ok(ids) => {
                    kept.push(row);
                    tokens.push(ids);
                }
                Err(reason) => rejected.push((row, reason)),
            }
        }
        let (image_embeds, text_embeds) = if kept.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            self.embed(kept.len(), pixels, &tokens)?
        };
        let d = self.dim;
        let mut similarity = vec![0f32; rows];
        let mut image_values = vec![0f32; rows * d];
        let mut text_values = vec![0f32; rows * d];
        let mut valid = vec![false; rows];
        for (i, &row) in kept.iter().enumerate() {
            let (u, v) = (
                &image_embeds[i * d..(i + 1) * d],
                &text_embeds[i * d..(i + 1) * d],
            );
            let (Some(u), Some(v)) = (unit(u), unit(v)) else {
                rejected.push((
                    row,
                    "CLIP gave an embedding of zero (or non-finite) norm".into(),
                ));
                continue;
            };
            similarity[row] = u
                .iter()
                .zip(&v)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>() as f32;
            image_values[row * d..(row + 1) * d].copy_from_slice(&u);
            text_values[row * d..(row + 1) * d].copy_from_slice(&v);
            valid[row] = true;
        }
        rejected.sort_by_key(|(row, _)| *row);
        let nulls = NullBuffer::from(valid);
        let mut columns: Vec<ArrayRef> = vec![Arc::new(Float32Array::new(
            similarity.into(),
            Some(nulls.clone()),
        ))];
        if self.config.emit_embeddings {
            let item = Arc::new(Field::new_list_field(DataType::Float32, true));
            for values in [image_values, text_values] {
                let list = FixedSizeListArray::try_new(
                    item.clone(),
                    d as i32,
                    Arc::new(Float32Array::from(values)),
                    Some(nulls.clone()),
                )
                .map_err(|e| Error::stage(&self.name, e))?;
                columns.push(Arc::new(list));
            }
        }
        Ok(StageOutput { columns, rejected })
    }

    /// Inputs for the model-only ceiling: a batch of `captions.len()` rows made before
    /// any clock starts (pixels already preprocessed, captions already tokenised), the
    /// same inputs `process` gives the models per batch. Used by `trustflow bench
    /// ceiling` and the harness, with [`Self::call_models`].
    pub fn premade_batch(&self, captions: &[String]) -> Result<PremadeBatch> {
        let rows = captions.len();
        let (h, w) = self.pixel_size;
        // Any finite values cost the same; a ramp avoids an all-zero special case.
        let pixels: Vec<f32> = (0..rows * 3 * h * w)
            .map(|i| (i % 255) as f32 / 127.5 - 1.0)
            .collect();
        let tokens = captions
            .iter()
            .map(|c| self.tokenizer.encode(c))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::stage(&self.name, e))?;
        Ok(PremadeBatch {
            rows,
            pixels,
            tokens,
        })
    }

    /// One call of both models on a premade batch, as `process` makes per batch.
    pub fn call_models(&self, batch: &PremadeBatch) -> Result<()> {
        self.embed(batch.rows, batch.pixels.clone(), &batch.tokens)
            .map(|_| ())
    }

    /// One ONNX call per model for `n` rows; returns the raw (not normalised) embeddings.
    fn embed(
        &self,
        n: usize,
        pixels: Vec<f32>,
        tokens: &[Vec<u32>],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (h, w) = self.pixel_size;
        let image = self.vision.run(
            vec![(
                "pixel_values",
                InputTensor::F32 {
                    shape: vec![n, 3, h, w],
                    data: pixels,
                },
            )],
            &["image_embeds"],
        )?;
        let batch = self.tokenizer.pad(tokens);
        let shape = vec![batch.rows, batch.seq_len];
        let mut inputs = vec![(
            "input_ids",
            InputTensor::I64 {
                shape: shape.clone(),
                data: batch.input_ids,
            },
        )];
        if self.text_has_mask {
            inputs.push((
                "attention_mask",
                InputTensor::I64 {
                    shape,
                    data: batch.attention_mask,
                },
            ));
        }
        let text = self.text.run(inputs, &[&self.config.text_output])?;
        let [image] = <[_; 1]>::try_from(image)
            .map_err(|_| Error::stage(&self.name, "vision model output missing"))?;
        let [text] = <[_; 1]>::try_from(text)
            .map_err(|_| Error::stage(&self.name, "text model output missing"))?;
        for (model, out) in [(&self.vision, &image), (&self.text, &text)] {
            if out.shape != [n, self.dim] {
                return Err(Error::input(
                    model.path(),
                    format!(
                        "gave an output of shape {:?}, expected [{n}, {}]",
                        out.shape, self.dim
                    ),
                ));
            }
        }
        Ok((image.data, text.data))
    }
}

/// `v / |v|` (the norm in f64), or None for a zero or non-finite norm.
fn unit(v: &[f32]) -> Option<Vec<f32>> {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    (norm.is_finite() && norm > 0.0)
        .then(|| v.iter().map(|x| (f64::from(*x) / norm) as f32).collect())
}

impl Stage for ClipScoreStage {
    fn content_digest(&self) -> Option<String> {
        Some(self.digest.clone())
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn output_fields(&self, input: &Schema) -> Result<Vec<Field>> {
        require_column(&self.name, input, IMAGE, &IMAGE_TYPES)?;
        require_column(&self.name, input, &self.caption_column(input), &TEXT_TYPES)?;
        let metadata = std::collections::HashMap::from([(
            LOGIT_SCALE_METADATA.to_string(),
            self.logit_scale.to_string(),
        )]);
        let mut fields = vec![
            Field::new(CLIP_SIMILARITY, DataType::Float32, true).with_metadata(metadata.clone()),
        ];
        if self.config.emit_embeddings {
            for name in [CLIP_IMAGE_EMBEDDING, CLIP_TEXT_EMBEDDING] {
                fields.push(
                    Field::new(name, self.embedding_type(), true).with_metadata(metadata.clone()),
                );
            }
        }
        Ok(fields)
    }

    fn process(&self, batch: &RecordBatch) -> Result<StageOutput> {
        let schema = batch.schema();
        self.output_fields(&schema)?;
        let caption_name = self.caption_column(&schema);
        let missing = |c: &str| Error::stage(&self.name, format!("batch lacks column `{c}`"));
        let images = batch.column_by_name(IMAGE).ok_or_else(|| missing(IMAGE))?;
        let captions = batch
            .column_by_name(&caption_name)
            .ok_or_else(|| missing(&caption_name))?;
        let rows = batch.num_rows();
        macro_rules! with_captions {
            ($images:expr) => {
                match captions.data_type() {
                    DataType::Utf8 => {
                        self.score($images, captions.as_string::<i32>(), rows, &caption_name)
                    }
                    DataType::LargeUtf8 => {
                        self.score($images, captions.as_string::<i64>(), rows, &caption_name)
                    }
                    _ => self.score($images, captions.as_string_view(), rows, &caption_name),
                }
            };
        }
        match images.data_type() {
            DataType::LargeBinary => with_captions!(images.as_binary::<i64>()),
            DataType::Binary => with_captions!(images.as_binary::<i32>()),
            _ => with_captions!(images.as_binary_view()),
        }
    }
}
