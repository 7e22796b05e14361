//! Stages: one file per stage, one small trait. A stage reads named input columns of an
//! Arrow batch and returns its own output columns for every row, plus the rows it
//! rejects (with a reason). It never sees channels, threads or other stages' columns it
//! does not read; the runtime appends its columns and moves rejected rows to quarantine.
//!
//! The YAML registry is the tagged enum [`StageKind`]: `type: decode` maps to one
//! variant, exhaustively.

pub mod caption;
pub mod class_max;
pub mod clean_caption;
pub mod clip_score;
pub mod decode;
pub mod pseudo_label;
pub mod uncertainty;

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a stage made of one batch.
#[derive(Debug)]
pub struct StageOutput {
    /// One array per field of [`Stage::output_fields`], each as long as the input batch.
    /// Values at rejected rows are ignored (null is customary).
    pub columns: Vec<ArrayRef>,
    /// Rows this stage rejects, as (row index in the input batch, reason), ascending.
    pub rejected: Vec<(usize, String)>,
}

/// A built stage, shared by all of its workers.
pub trait Stage: Send + Sync {
    /// The stage's name in the pipeline (unique; used in metrics and quarantine rows).
    fn name(&self) -> &str;

    /// The fields this stage appends, given the schema it receives. Fails (naming the
    /// missing or mistyped column) when the input lacks what the stage reads; called at
    /// plan time, so `validate` knows the whole output schema before any row is read.
    fn output_fields(&self, input: &Schema) -> Result<Vec<Field>>;

    /// Process one batch. An `Err` is a whole-run failure; bad rows go in `rejected`.
    fn process(&self, batch: &RecordBatch) -> Result<StageOutput>;

    /// A digest of the external files (models, tokenizers) the outputs depend on, so
    /// that replacing a model in place invalidates finished shards. None for stages
    /// that read no files.
    fn content_digest(&self) -> Option<String> {
        None
    }
}

/// The `stages:` entries of a pipeline file. (Files are loaded by `spec::load`, which
/// splits the common keys from the type's own; this derive describes the same shape for
/// the JSON Schema.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("unevaluatedProperties" = false))]
pub struct StageSpec {
    /// Unique name of this stage (defaults to its type). Shown in metrics and in the
    /// `error_stage` column of quarantined rows.
    #[serde(default)]
    pub name: Option<String>,
    /// Worker threads for this stage (default 1).
    #[serde(default)]
    #[schemars(range(min = 1, max = 256))]
    pub workers: Option<usize>,
    /// Depth, in batches, of this stage's input queue (default: `runtime.queue_depth`).
    #[serde(default)]
    #[schemars(range(min = 1, max = 4096))]
    pub queue_depth: Option<usize>,
    /// What the stage does, selected by `type`.
    #[serde(flatten)]
    pub kind: StageKind,
}

/// Every stage type, selected by the `type` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum StageKind {
    /// Validate and decode images (JPEG, PNG, WebP); adds `width`, `height`, `image_format`.
    Decode(decode::DecodeConfig),
    /// Clean captions (URLs, HTML, handles, digits, punctuation); adds `caption_clean`
    /// and `caption_missing`.
    CleanCaption(clean_caption::CleanCaptionConfig),
    /// CLIP image-caption agreement (ONNX Runtime): adds `clip_similarity` and, by
    /// default, the unit embeddings `clip_image_embedding` and `clip_text_embedding`.
    ClipScore(clip_score::ClipScoreConfig),
    /// TRUST's trust weight from CLIP image and caption embeddings (softmax over groups
    /// of `group_size` rows, or a named alternative); adds `pseudo_weight`.
    Uncertainty(uncertainty::UncertaintyConfig),
    /// Pseudo-labels from the user's ONNX text classifier (e.g. a fine-tuned DistilBERT):
    /// adds `pseudo_label` (argmax), `pseudo_prob` (its softmax probability),
    /// `text_feature` (the pooled caption feature before the last linear layer) and, when
    /// class names are given, `pseudo_label_name`.
    PseudoLabel(pseudo_label::PseudoLabelConfig),
    /// Captions for rows without one (`caption_missing` true or a null caption) from an
    /// ONNX image-to-text model (VisionEncoderDecoder, greedy decoding): adds
    /// `caption_final` (the given cleaned caption or the generated one) and
    /// `caption_source` (`given` or `generated`).
    Caption(caption::CaptionConfig),
}

impl StageKind {
    /// Every `type:` a stage entry may have.
    pub const TYPES: [&'static str; 6] = [
        "decode",
        "clean_caption",
        "clip_score",
        "uncertainty",
        "pseudo_label",
        "caption",
    ];

    /// Build the variant named by `type_name` from the entry's remaining keys; errors
    /// carry the field path under `at` (e.g. `stages[1].max_pixels`).
    pub fn from_value(
        type_name: &str,
        config: serde_json::Value,
        at: &str,
    ) -> std::result::Result<Self, (String, String)> {
        use crate::spec::from_value_at;
        match type_name {
            "decode" => from_value_at(config, at).map(StageKind::Decode),
            "clean_caption" => from_value_at(config, at).map(StageKind::CleanCaption),
            "clip_score" => from_value_at(config, at).map(StageKind::ClipScore),
            "uncertainty" => from_value_at(config, at).map(StageKind::Uncertainty),
            "pseudo_label" => from_value_at(config, at).map(StageKind::PseudoLabel),
            "caption" => from_value_at(config, at).map(StageKind::Caption),
            other => Err((
                format!("{at}.type"),
                format!(
                    "unknown stage type `{other}`; expected one of {}",
                    Self::TYPES.join(", ")
                ),
            )),
        }
    }

    /// Problems in the type's own settings, as (field, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        match self {
            StageKind::Decode(c) => c.validate(),
            StageKind::CleanCaption(c) => c.validate(),
            StageKind::ClipScore(c) => c.validate(),
            StageKind::Uncertainty(c) => c.validate(),
            StageKind::PseudoLabel(c) => c.validate(),
            StageKind::Caption(c) => c.validate(),
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            StageKind::Decode(_) => "decode",
            StageKind::CleanCaption(_) => "clean_caption",
            StageKind::ClipScore(_) => "clip_score",
            StageKind::Uncertainty(_) => "uncertainty",
            StageKind::PseudoLabel(_) => "pseudo_label",
            StageKind::Caption(_) => "caption",
        }
    }
}

impl StageSpec {
    pub fn resolved_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.kind.type_name().to_string())
    }

    /// Turn the configuration into a runnable stage; relative file paths in it (models)
    /// are resolved against `base`, the pipeline file's folder.
    pub fn build(&self, base: &std::path::Path) -> Result<Arc<dyn Stage>> {
        let name = self.resolved_name();
        Ok(match &self.kind {
            StageKind::Decode(config) => Arc::new(decode::DecodeStage::new(name, config.clone())),
            StageKind::CleanCaption(config) => {
                Arc::new(clean_caption::CleanCaptionStage::new(name, config.clone())?)
            }
            StageKind::ClipScore(config) => {
                let mut config = config.clone();
                config.resolve_paths(base);
                Arc::new(clip_score::ClipScoreStage::new(name, config)?)
            }
            StageKind::Uncertainty(config) => {
                let mut config = config.clone();
                config.resolve_paths(base);
                Arc::new(uncertainty::UncertaintyStage::new(name, config)?)
            }
            StageKind::PseudoLabel(config) => {
                let mut config = config.clone();
                config.resolve_paths(base);
                Arc::new(pseudo_label::PseudoLabelStage::new(name, config)?)
            }
            StageKind::Caption(config) => {
                let mut config = config.clone();
                config.resolve_paths(base);
                Arc::new(caption::CaptionStage::new(name, config)?)
            }
        })
    }
}

/// Look up a column a stage reads and check its type, with an error that says which
/// stage wanted what.
pub fn require_column<'a>(
    stage: &str,
    input: &'a Schema,
    column: &str,
    accepted: &[DataType],
) -> Result<&'a Field> {
    let field = input.field_with_name(column).map_err(|_| {
        Error::stage(
            stage,
            format!(
                "needs input column `{column}`, which the stages before it do not provide \
                 (available: {})",
                input
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    if !accepted.contains(field.data_type()) {
        return Err(Error::stage(
            stage,
            format!(
                "input column `{column}` has type {}, expected one of {:?}",
                field.data_type(),
                accepted
            ),
        ));
    }
    Ok(field)
}
