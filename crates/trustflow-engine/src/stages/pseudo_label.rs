//! The `pseudo_label` stage: a pseudo-label for every caption from the user's text
//! classifier (docs/method.md section 2). The classifier is an ONNX sequence classifier, for
//! example a fine-tuned DistilBERT, that takes `input_ids` (and optionally
//! `attention_mask`) and gives two outputs: the class logits and the pooled caption
//! feature just before the last linear layer (for DistilBERT, `pre_classifier` after its
//! ReLU). Captions are tokenised with the model's `tokenizer.json` (truncated to
//! `max_length` tokens, special tokens included, as transformers does with
//! `truncation=True`), padded to the longest caption of the batch, and classified in one
//! ONNX call per batch. Adds `pseudo_label` (argmax), `pseudo_prob` (its softmax
//! probability), `text_feature` and, when class names are given, `pseudo_label_name`.
//!
//! A plain Optimum export of a sequence classifier has only the `logits` output; the
//! feature must be exported as a second output (scripts/fixtures/make_text_classifier.py
//! shows how: wrap the model in a module returning both).
//!
//! The second classifier kind is a text head fitted by `trustflow fit-text`
//! ([`crate::models::text_head`]): set `head` (the head file) instead of `model`. Captions
//! are embedded by the frozen ONNX sentence encoder `encoder` (default: the environment
//! variable `TRUSTFLOW_MINILM_DIR`) with the tokenizer `tokenizer` (default:
//! `TRUSTFLOW_MINILM_TOKENIZER`), both set by scripts/setup.sh; the head gives the logits
//! and `text_feature` is its ReLU hidden layer. The output columns are the same.

use crate::models::files::{self, ModelFiles, model_files};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, FixedSizeListArray, Float32Array, Int64Array, StringArray, StringArrayType,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use ort::value::TensorElementType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Stage, StageConfig, StageOutput, require_column};
use crate::columns::CAPTION;
use crate::error::{Error, Result};
use crate::models::onnx::{ExecutionProviderName, InputTensor, OnnxModel, SessionConfig, TensorSpec};
use crate::models::text::TextTokenizer;
use crate::models::text_head::{self, SentenceEncoder, TextHead};

/// Output column: the predicted class, `argmax` of the logits (Int64).
pub const PSEUDO_LABEL: &str = "pseudo_label";
/// Output column: the softmax probability of the predicted class (Float32).
pub const PSEUDO_PROB: &str = "pseudo_prob";
/// Output column: the caption feature z(t), `FixedSizeList<Float32, D>`.
pub const TEXT_FEATURE: &str = "text_feature";
/// Output column (only when `labels` is set): the predicted class's name (Utf8).
pub const PSEUDO_LABEL_NAME: &str = "pseudo_label_name";
/// Largest default `max_length` (BERT-family models have 512 positions).
pub const MAX_LENGTH_CAP: usize = 512;
/// The cleaned caption column, preferred when present.
const CAPTION_CLEAN: &str = "caption_clean";

const TEXT_TYPES: [DataType; 3] = [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View];

fn default_logits() -> String {
    "logits".to_string()
}
fn default_features() -> String {
    "features".to_string()
}

model_files! {
    /// Where the `pseudo_label` stage finds its classifier's files (flattened into its
    /// settings): an ONNX export folder, or a fitted text head with its encoder.
    pub struct PseudoLabelFiles {
        /// Folder of the exported classifier: `model.onnx` (inputs `input_ids` and
        /// optionally `attention_mask`; outputs `logits_output` [B, classes] and
        /// `feature_output` [B, D]), `tokenizer.json` and `config.json`. A relative path is
        /// resolved against the pipeline file's folder. Optional when `classifier_model`,
        /// `tokenizer` and `max_length` are given.
        model,
        /// A text head fitted by `trustflow fit-text` (safetensors, with its `<head>.json`
        /// sidecar beside it), used instead of `model`: exactly one of the two is set.
        /// `text_feature` is then the head's ReLU hidden layer.
        head: path,
        /// With `head`: the frozen ONNX sentence encoder, an `.onnx` file or a folder holding
        /// one. Default: the environment variable `TRUSTFLOW_MINILM_DIR` (set by
        /// scripts/setup.sh to paraphrase-MiniLM-L3-v2).
        encoder: path,
        /// Path of the ONNX classifier, overriding `<model>/model.onnx`.
        classifier_model: needed "model.onnx",
        /// Path of the tokenizer, overriding `<model>/tokenizer.json`. With `head`: the
        /// encoder's tokenizer, default the environment variable `TRUSTFLOW_MINILM_TOKENIZER`.
        tokenizer: needed "tokenizer.json",
        /// Path of the model configuration (read for `max_position_embeddings`),
        /// overriding `<model>/config.json`.
        // Optional: without `model`, `max_length` may stand in for it (see `validate`).
        config: optional "config.json",
    }
}

/// Settings of the `pseudo_label` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PseudoLabelConfig {
    /// The export folder `model` or the text head `head`, and the paths that go with
    /// them.
    #[serde(flatten)]
    pub files: PseudoLabelFiles,
    /// Column holding the captions. Default: `caption_clean` when an earlier stage
    /// provides it, else `caption`.
    #[serde(default)]
    pub caption_column: Option<String>,
    /// Tokens kept per caption, special tokens included (longer captions are truncated
    /// as transformers does with `truncation=True`). Default: `max_position_embeddings`
    /// from `config.json`, at most 512. Must not exceed `max_position_embeddings`.
    #[serde(default)]
    #[schemars(range(min = 2, max = 65536))]
    pub max_length: Option<usize>,
    /// Name of the model output holding the class logits [B, classes]. Default `logits`.
    #[serde(default = "default_logits")]
    pub logits_output: String,
    /// Name of the model output holding the caption feature [B, D] (the pooled vector
    /// before the last linear layer). Default `features`.
    #[serde(default = "default_features")]
    pub feature_output: String,
    /// Class names, one per logit, in class order. When given, the stage also outputs
    /// `pseudo_label_name`; the count must match the model's number of classes.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// ONNX Runtime settings: `execution_provider`, `fallback`, `intra_op_threads`,
    /// `sessions`.
    #[serde(flatten)]
    pub session: SessionConfig,
}

impl PseudoLabelConfig {
    /// A configuration reading the export folder `model`, every other field default.
    pub fn for_model(model: impl Into<String>) -> Self {
        Self {
            files: PseudoLabelFiles::in_folder(model),
            session: SessionConfig::default(),
            caption_column: None,
            max_length: None,
            logits_output: default_logits(),
            feature_output: default_features(),
            labels: None,
        }
    }

    /// Make every relative model path relative to `base` (the pipeline file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        self.files.resolve_paths(base);
    }
}

impl StageConfig for PseudoLabelConfig {
    fn session(&self) -> Option<&SessionConfig> {
        Some(&self.session)
    }

    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, message: String| problems.push((field.into(), message));
        let paths = &self.files;
        // Not the usual "folder or every file" rule: `head` replaces the folder, and
        // `max_length` can stand in for config.json.
        if paths.head.is_some() {
            if paths.model.is_some() {
                problem(
                    "head",
                    "set exactly one of `model` (an ONNX classifier) and `head` (a text head)"
                        .into(),
                );
            }
            for (field, value) in [
                ("classifier_model", &paths.classifier_model),
                ("config", &paths.config),
            ] {
                if value.is_some() {
                    problem(field, "applies to `model`, not to `head`".into());
                }
            }
        } else {
            let mut missing = paths.missing();
            if paths.model.is_none() && paths.config.is_none() && self.max_length.is_none() {
                missing.push("max_length (or config)");
            }
            if !missing.is_empty() {
                problem(
                    "model",
                    format!(
                        "is required (an export folder) unless `head` or the files are given; \
                         missing: {}",
                        missing.join(", ")
                    ),
                );
            }
        }
        for (field, message) in paths
            .blank()
            .into_iter()
            .chain(files::blank_fields(&[("caption_column", &self.caption_column)]))
        {
            problem(&field, message);
        }
        for (field, value) in [
            ("logits_output", &self.logits_output),
            ("feature_output", &self.feature_output),
        ] {
            if value.trim().is_empty() {
                problem(field, "must not be empty".into());
            }
        }
        if self.logits_output == self.feature_output {
            problem(
                "feature_output",
                format!(
                    "must differ from logits_output (both are `{}`)",
                    self.logits_output
                ),
            );
        }
        if let Some(n) = self.max_length
            && !(2..=65536).contains(&n)
        {
            problem(
                "max_length",
                format!("expected 2 to 65536 tokens, found {n}"),
            );
        }
        for (field, message) in self.session.validate() {
            problem(&field, message);
        }
        if let Some(labels) = &self.labels {
            if labels.len() < 2 {
                problem(
                    "labels",
                    format!("expected at least 2 class names, found {}", labels.len()),
                );
            }
            if labels.iter().any(|l| l.trim().is_empty()) {
                problem("labels", "class names must not be empty".into());
            }
        }
        problems
    }

    fn build(&self, name: String, base: &std::path::Path) -> Result<Arc<dyn Stage>> {
        let mut config = self.clone();
        config.resolve_paths(base);
        Ok(Arc::new(PseudoLabelStage::new(name, config)?))
    }
}

/// What `config.json` says about the classifier.
struct ModelFacts {
    max_positions: Option<usize>,
    num_labels: Option<usize>,
}

fn read_model_config(path: &Path) -> Result<ModelFacts> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(path, format!("not valid JSON: {e}")))?;
    let max_positions = match value.get("max_position_embeddings") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n >= 2)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    Error::input(
                        path,
                        "`max_position_embeddings` must be an integer of at least 2",
                    )
                })?,
        ),
    };
    let num_labels = value
        .get("id2label")
        .and_then(Value::as_object)
        .map(|m| m.len())
        .or_else(|| {
            value
                .get("num_labels")
                .and_then(Value::as_u64)
                .map(|n| n as usize)
        });
    Ok(ModelFacts {
        max_positions,
        num_labels,
    })
}

/// What computes the logits and features.
// One per stage, built once: the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Backend {
    /// An exported ONNX sequence classifier.
    Onnx {
        model: OnnxModel,
        has_mask: bool,
        tokenizer: TextTokenizer,
    },
    /// A frozen sentence encoder and a fitted text head.
    Head {
        encoder: SentenceEncoder,
        head: TextHead,
    },
}

/// The built `pseudo_label` stage.
#[derive(Debug)]
pub struct PseudoLabelStage {
    name: String,
    config: PseudoLabelConfig,
    backend: Backend,
    classes: usize,
    dim: usize,
    /// Fingerprints of the model files (see `Stage::content_digest`).
    digest: String,
}

/// The files of an exported classifier, resolved from the stage's settings.
struct ClassifierFiles {
    model: PathBuf,
    tokenizer: PathBuf,
    /// config.json, when there is one (class count and context length).
    config: Option<PathBuf>,
}

impl ClassifierFiles {
    fn resolve(paths: &PseudoLabelFiles) -> Result<Self> {
        paths.check_folder("an export folder holding model.onnx, tokenizer.json and config.json")?;
        let needs = |field: &str| {
            Error::Invalid(format!(
                "`{field}` is required when `model` (an export folder) is not given"
            ))
        };
        Ok(ClassifierFiles {
            model: paths
                .file("classifier_model")
                .ok_or_else(|| needs("classifier_model"))?,
            tokenizer: paths.file("tokenizer").ok_or_else(|| needs("tokenizer"))?,
            config: paths.file("config"),
        })
    }

    /// config.json's path, or its name, for messages about it.
    fn config_name(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| PathBuf::from("config.json"))
    }
}

/// Tokens per caption: `max_length` if set (within the model's positions), else the
/// model's positions capped at [`MAX_LENGTH_CAP`].
fn max_length(set: Option<usize>, facts: &ModelFacts, files: &ClassifierFiles) -> Result<usize> {
    match (set, facts.max_positions) {
        (Some(n), Some(positions)) if n > positions => Err(Error::input(
            files.config_name(),
            format!("max_length {n} exceeds the model's max_position_embeddings ({positions})"),
        )),
        (Some(n), _) => Ok(n),
        (None, Some(positions)) => Ok(positions.min(MAX_LENGTH_CAP)),
        (None, None) => Err(Error::input(
            files.config_name(),
            "no `max_position_embeddings`; set `max_length`",
        )),
    }
}

/// The classifier, loaded and checked against the tensors the stage feeds and reads.
fn load_classifier(path: &Path, config: &PseudoLabelConfig) -> Result<OnnxModel> {
    let model = OnnxModel::load(path, &config.session)?;
    let output = |name: &str| TensorSpec::new(name.to_string(), TensorElementType::Float32, 2);
    model
        .check(
            &[TensorSpec::new("input_ids", TensorElementType::Int64, 2)],
            &[TensorSpec::new("attention_mask", TensorElementType::Int64, 2)],
            &[output(&config.logits_output), output(&config.feature_output)],
        )
        .map_err(|e| {
            let hint = if config.feature_output == default_features()
                && model.output_names() == [config.logits_output.clone()]
            {
                " (a plain Optimum export gives only the logits: export the pooled feature \
                 before the last linear layer as a second output, or set `feature_output` \
                 to its name)"
            } else {
                ""
            };
            Error::Invalid(format!("{e}{hint}"))
        })?;
    Ok(model)
}

/// (classes, feature size): from the declared shapes, else from one probe call on an
/// empty caption ("[CLS] [SEP]").
fn output_sizes(
    model: &OnnxModel,
    has_mask: bool,
    tokenizer: &TextTokenizer,
    files: &ClassifierFiles,
    config: &PseudoLabelConfig,
) -> Result<(usize, usize)> {
    let (logits, features) = (&config.logits_output, &config.feature_output);
    let static_dim = |output: &str| {
        model
            .shape_of(output)
            .and_then(|s| s.last().copied())
            .filter(|&d| d > 0)
            .map(|d| d as usize)
    };
    match (static_dim(logits), static_dim(features)) {
        (Some(c), Some(d)) => Ok((c, d)),
        (c, d) => {
            let probe = tokenizer
                .encode("")
                .map_err(|e| Error::input(&files.tokenizer, format!("cannot encode: {e}")))?;
            let (l, f) = run_model(model, has_mask, tokenizer, &[probe], logits, features)?;
            Ok((
                c.unwrap_or(l.shape.last().copied().unwrap_or(0)),
                d.unwrap_or(f.shape.last().copied().unwrap_or(0)),
            ))
        }
    }
}

/// The class count agrees with config.json's labels and the stage's `labels`.
fn check_classes(
    classes: usize,
    dim: usize,
    facts: &ModelFacts,
    files: &ClassifierFiles,
    config: &PseudoLabelConfig,
) -> Result<()> {
    let (logits, features) = (&config.logits_output, &config.feature_output);
    if classes < 2 || dim == 0 {
        return Err(Error::input(
            &files.model,
            format!(
                "output `{logits}` has {classes} classes and `{features}` {dim} values per \
                 row; expected at least 2 classes and 1 value"
            ),
        ));
    }
    if let Some(n) = facts.num_labels
        && n != classes
    {
        return Err(Error::input(
            &files.model,
            format!(
                "output `{logits}` has {classes} classes but {} has {n} labels",
                files.config_name().display()
            ),
        ));
    }
    if let Some(labels) = &config.labels
        && labels.len() != classes
    {
        return Err(Error::input(
            &files.model,
            format!(
                "output `{logits}` has {classes} classes but `labels` names {}",
                labels.len()
            ),
        ));
    }
    Ok(())
}

impl PseudoLabelStage {
    /// Load and check the classifier, tokenizer and settings. Every problem (a missing
    /// folder or file, a file that is not ONNX, inputs or outputs that do not match, an
    /// execution provider that is not available, class names that do not match the
    /// model) is an error naming the file.
    pub fn new(name: String, config: PseudoLabelConfig) -> Result<Self> {
        if config.files.head.is_some() {
            return Self::new_head(name, config);
        }
        let err = |e: Error| Error::stage(&name, e);
        let files = ClassifierFiles::resolve(&config.files).map_err(err)?;
        let facts = match &files.config {
            Some(path) => read_model_config(path).map_err(err)?,
            None => ModelFacts {
                max_positions: None,
                num_labels: None,
            },
        };
        let max_length = max_length(config.max_length, &facts, &files).map_err(err)?;
        let tokenizer = TextTokenizer::load(&files.tokenizer, max_length, None).map_err(err)?;
        let model = load_classifier(&files.model, &config).map_err(err)?;
        let has_mask = model.input_names().iter().any(|n| n == "attention_mask");
        let (classes, dim) =
            output_sizes(&model, has_mask, &tokenizer, &files, &config).map_err(err)?;
        check_classes(classes, dim, &facts, &files, &config).map_err(err)?;
        let digest = crate::digest::files_digest(
            [files.model.clone(), files.tokenizer.clone()]
                .into_iter()
                .chain(files.config.clone()),
        )
        .map_err(err)?;
        Ok(Self {
            name,
            config,
            backend: Backend::Onnx {
                model,
                has_mask,
                tokenizer,
            },
            classes,
            dim,
            digest,
        })
    }

    /// Build the text-head kind: `head` with the sentence encoder and tokenizer.
    fn new_head(name: String, config: PseudoLabelConfig) -> Result<Self> {
        let err = |e: Error| Error::stage(&name, e);
        let head_path = PathBuf::from(config.files.head.clone().unwrap_or_default());
        let head = TextHead::load(&head_path).map_err(err)?;
        let encoder_path = text_head::path_or_env(
            config.files.encoder.as_deref(),
            text_head::MINILM_DIR_ENV,
            "`encoder`",
        )
        .map_err(err)?;
        let tokenizer_path = text_head::path_or_env(
            config.files.tokenizer.as_deref(),
            text_head::MINILM_TOKENIZER_ENV,
            "`tokenizer`",
        )
        .map_err(err)?;
        let session = config.session;
        let encoder =
            SentenceEncoder::load(&encoder_path, &tokenizer_path, &session).map_err(err)?;
        if encoder.dim() != head.input_dim() {
            return Err(err(Error::input(
                &head_path,
                format!(
                    "head expects {}-dimensional embeddings but the encoder {} gives {}",
                    head.input_dim(),
                    encoder.model().path().display(),
                    encoder.dim()
                ),
            )));
        }
        let classes = head.num_classes();
        if let Some(labels) = &config.labels
            && labels.len() != classes
        {
            return Err(err(Error::input(
                &head_path,
                format!(
                    "head has {classes} classes but `labels` names {}",
                    labels.len()
                ),
            )));
        }
        let digest = crate::digest::files_digest([
            head_path.clone(),
            text_head::sidecar_path(&head_path),
            encoder.model().path().to_path_buf(),
            tokenizer_path.clone(),
        ]).map_err(err)?;
        Ok(Self {
            name,
            config,
            dim: head.hidden(),
            classes,
            backend: Backend::Head { encoder, head },
            digest,
        })
    }

    fn tokenizer(&self) -> &TextTokenizer {
        match &self.backend {
            Backend::Onnx { tokenizer, .. } => tokenizer,
            Backend::Head { encoder, .. } => encoder.tokenizer(),
        }
    }

    /// Number of classes (logits per row).
    pub fn num_classes(&self) -> usize {
        self.classes
    }

    /// Size D of the caption feature.
    pub fn feature_dim(&self) -> usize {
        self.dim
    }

    /// Tokens kept per caption.
    pub fn max_length(&self) -> usize {
        self.tokenizer().max_length()
    }

    /// The execution provider the model runs on (CPU after a fallback).
    pub fn provider(&self) -> ExecutionProviderName {
        match &self.backend {
            Backend::Onnx { model, .. } => model.provider(),
            Backend::Head { encoder, .. } => encoder.model().provider(),
        }
    }

    /// The caption column read for an input with `schema`.
    pub fn caption_column(&self, schema: &Schema) -> String {
        match &self.config.caption_column {
            Some(c) => c.clone(),
            None if schema.field_with_name(CAPTION_CLEAN).is_ok() => CAPTION_CLEAN.to_string(),
            None => CAPTION.to_string(),
        }
    }

    /// Token ids of one caption, as the stage feeds them (before padding).
    pub fn encode(&self, caption: &str) -> std::result::Result<Vec<u32>, String> {
        self.tokenizer().encode(caption)
    }

    /// Raw logits and features of `captions`, in one ONNX call (row-major).
    pub fn classify(&self, captions: &[&str]) -> Result<(Vec<f32>, Vec<f32>)> {
        let tokens = captions
            .iter()
            .map(|c| self.encode(c).map_err(|e| Error::stage(&self.name, e)))
            .collect::<Result<Vec<_>>>()?;
        self.infer(&tokens)
    }

    fn infer(&self, tokens: &[Vec<u32>]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (model, has_mask, tokenizer) = match &self.backend {
            Backend::Onnx {
                model,
                has_mask,
                tokenizer,
            } => (model, *has_mask, tokenizer),
            Backend::Head { encoder, head } => {
                let x = encoder
                    .embed_tokens(tokens)
                    .map_err(|e| Error::stage(&self.name, e))?;
                return Ok(head.forward(&x));
            }
        };
        let (logits, features) = run_model(
            model,
            has_mask,
            tokenizer,
            tokens,
            &self.config.logits_output,
            &self.config.feature_output,
        )?;
        let n = tokens.len();
        for (output, out, width) in [
            (&self.config.logits_output, &logits, self.classes),
            (&self.config.feature_output, &features, self.dim),
        ] {
            if out.shape != [n, width] {
                return Err(Error::input(
                    model.path(),
                    format!(
                        "output `{output}` has shape {:?}, expected [{n}, {width}]",
                        out.shape
                    ),
                ));
            }
        }
        Ok((logits.data, features.data))
    }

    fn label<'a>(
        &self,
        captions: impl StringArrayType<'a>,
        rows: usize,
        caption_name: &str,
    ) -> Result<StageOutput> {
        let mut rejected = Vec::new();
        let mut kept = Vec::new();
        let mut tokens = Vec::new();
        for row in 0..rows {
            let outcome = if captions.is_null(row) {
                Err(format!("caption `{caption_name}` is null"))
            } else {
                self.tokenizer().encode(captions.value(row))
            };
            match outcome {
                Ok(ids) => {
                    kept.push(row);
                    tokens.push(ids);
                }
                Err(reason) => rejected.push((row, reason)),
            }
        }
        let (logits, features) = if kept.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            self.infer(&tokens)?
        };
        let (c, d) = (self.classes, self.dim);
        let mut label = vec![0i64; rows];
        let mut prob = vec![0f32; rows];
        let mut feature = vec![0f32; rows * d];
        let mut valid = vec![false; rows];
        for (i, &row) in kept.iter().enumerate() {
            let z = &features[i * d..(i + 1) * d];
            let Some((best, p)) = argmax_softmax(&logits[i * c..(i + 1) * c]) else {
                rejected.push((row, "classifier gave non-finite logits".into()));
                continue;
            };
            if !z.iter().all(|x| x.is_finite()) {
                rejected.push((row, "classifier gave a non-finite feature".into()));
                continue;
            }
            label[row] = best as i64;
            prob[row] = p;
            feature[row * d..(row + 1) * d].copy_from_slice(z);
            valid[row] = true;
        }
        rejected.sort_by_key(|(row, _)| *row);
        let nulls = NullBuffer::from(valid.clone());
        let item = Arc::new(Field::new_list_field(DataType::Float32, true));
        let features = FixedSizeListArray::try_new(
            item,
            d as i32,
            Arc::new(Float32Array::from(feature)),
            Some(nulls.clone()),
        )
        .map_err(|e| Error::stage(&self.name, e))?;
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::new(label.clone().into(), Some(nulls.clone()))),
            Arc::new(Float32Array::new(prob.into(), Some(nulls))),
            Arc::new(features),
        ];
        if let Some(names) = &self.config.labels {
            let column: StringArray = label
                .iter()
                .zip(&valid)
                .map(|(&l, &ok)| ok.then(|| names[l as usize].as_str()))
                .collect();
            columns.push(Arc::new(column));
        }
        Ok(StageOutput { columns, rejected })
    }
}

/// Pad `tokens` and run the model once; returns the logits and feature outputs.
fn run_model(
    model: &OnnxModel,
    has_mask: bool,
    tokenizer: &TextTokenizer,
    tokens: &[Vec<u32>],
    logits: &str,
    features: &str,
) -> Result<(
    crate::models::onnx::OutputTensor,
    crate::models::onnx::OutputTensor,
)> {
    let batch = tokenizer.pad(tokens);
    let shape = vec![batch.rows, batch.seq_len];
    let mut inputs = vec![(
        "input_ids",
        InputTensor::I64 {
            shape: shape.clone(),
            data: batch.input_ids,
        },
    )];
    if has_mask {
        inputs.push((
            "attention_mask",
            InputTensor::I64 {
                shape,
                data: batch.attention_mask,
            },
        ));
    }
    let outputs = model.run(inputs, &[logits, features])?;
    let [logits, features] = <[_; 2]>::try_from(outputs)
        .map_err(|_| Error::input(model.path(), "inference gave too few outputs"))?;
    Ok((logits, features))
}

/// The index of the largest logit (the first on ties, as `torch.argmax`) and its
/// softmax probability (computed in f64); None when a logit is not finite.
pub fn argmax_softmax(logits: &[f32]) -> Option<(usize, f32)> {
    if logits.is_empty() || !logits.iter().all(|x| x.is_finite()) {
        return None;
    }
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    let top = f64::from(logits[best]);
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - top).exp()).sum();
    Some((best, (1.0 / sum) as f32))
}

impl Stage for PseudoLabelStage {
    fn content_digest(&self) -> Option<String> {
        Some(self.digest.clone())
    }

    fn classes(&self) -> Option<usize> {
        Some(self.classes)
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn output_fields(&self, input: &Schema) -> Result<Vec<Field>> {
        require_column(&self.name, input, &self.caption_column(input), &TEXT_TYPES)?;
        let feature_type = DataType::FixedSizeList(
            Arc::new(Field::new_list_field(DataType::Float32, true)),
            self.dim as i32,
        );
        let mut fields = vec![
            Field::new(PSEUDO_LABEL, DataType::Int64, true),
            Field::new(PSEUDO_PROB, DataType::Float32, true),
            Field::new(TEXT_FEATURE, feature_type, true),
        ];
        if self.config.labels.is_some() {
            fields.push(Field::new(PSEUDO_LABEL_NAME, DataType::Utf8, true));
        }
        Ok(fields)
    }

    fn process(&self, batch: &RecordBatch) -> Result<StageOutput> {
        let schema = batch.schema();
        self.output_fields(&schema)?;
        let caption_name = self.caption_column(&schema);
        let captions = batch.column_by_name(&caption_name).ok_or_else(|| {
            Error::stage(&self.name, format!("batch lacks column `{caption_name}`"))
        })?;
        let rows = batch.num_rows();
        match captions.data_type() {
            DataType::Utf8 => self.label(captions.as_string::<i32>(), rows, &caption_name),
            DataType::LargeUtf8 => self.label(captions.as_string::<i64>(), rows, &caption_name),
            _ => self.label(captions.as_string_view(), rows, &caption_name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_softmax_matches_torch_conventions() {
        let (i, p) = argmax_softmax(&[1.0, 3.0, 3.0, -2.0]).unwrap();
        assert_eq!(i, 1);
        let want = 3f64.exp() / (1f64.exp() + 2.0 * 3f64.exp() + (-2f64).exp());
        assert!((f64::from(p) - want).abs() < 1e-7);
        assert!(argmax_softmax(&[1.0, f32::NAN]).is_none());
        assert!(argmax_softmax(&[]).is_none());
        assert_eq!(argmax_softmax(&[1000.0, 0.0]).unwrap(), (0, 1.0));
    }

    #[test]
    fn config_needs_a_folder_or_the_files() {
        let mut config = PseudoLabelConfig::for_model("m");
        assert!(config.validate().is_empty());
        config.files.model = None;
        let problems = config.validate();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .1
                .contains("classifier_model, tokenizer, max_length")
        );
        config.feature_output = "logits".into();
        config.labels = Some(vec!["a".into()]);
        let fields: Vec<String> = config.validate().into_iter().map(|p| p.0).collect();
        assert_eq!(fields, ["model", "feature_output", "labels"]);
    }
}
