//! Stages: one file per stage, one small trait. A stage reads named input columns of an
//! Arrow batch and returns its own output columns for every row, plus the rows it
//! rejects (with a reason). It never sees channels, threads or other stages' columns it
//! does not read; the runtime appends its columns and moves rejected rows to quarantine.
//!
//! Adding a stage: write `stages/<name>.rs` with a config struct that implements
//! [`StageConfig`] and a runtime struct that implements [`Stage`], then add one line to
//! the [`stages!`] registry at the bottom of this file. The registry generates the
//! tagged enum [`StageKind`] (`type: decode` maps to one variant, exhaustively), the list
//! of type names, and the dispatch from a pipeline entry to its config.

pub mod class_max;

use std::path::Path;
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

    /// How many classes the stage's labels range over, for a stage that assigns
    /// labels (a trainer fed by the pipeline checks its own class count against it).
    fn classes(&self) -> Option<usize> {
        None
    }
}

/// A stage's settings as written in a pipeline file: their checks, how they become a
/// running [`Stage`], and what they ask of the rest of the pipeline.
pub trait StageConfig {
    /// Problems in the type's own settings, as (field, message); empty when valid.
    fn validate(&self) -> Vec<(String, String)>;

    /// The runnable stage named `name`; relative file paths in the settings (models)
    /// are resolved against `base`, the pipeline file's folder.
    fn build(&self, name: String, base: &Path) -> Result<Arc<dyn Stage>>;

    /// Every batch must hold a multiple of this many rows (`runtime.batch_size` is
    /// checked against it at plan time), e.g. because the stage works on fixed groups
    /// of rows that must not straddle batches.
    fn batch_multiple(&self) -> Option<usize> {
        None
    }

    /// The ONNX session settings of a model stage (where its models run).
    fn session(&self) -> Option<&crate::models::onnx::SessionConfig> {
        None
    }
}

/// Keys every stage entry may carry besides its `type` and the type's own settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageCommon {
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
}

impl StageCommon {
    /// The keys of [`StageCommon`], read off its own schema so the list cannot drift.
    pub fn keys() -> Vec<String> {
        crate::fields::schema_property_names::<StageCommon>()
    }
}

/// The `stages:` entries of a pipeline file. (Files are loaded by `spec::load`, which
/// splits the common keys from the type's own; this derive describes the same shape for
/// the JSON Schema.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("unevaluatedProperties" = false))]
pub struct StageSpec {
    #[serde(flatten)]
    pub common: StageCommon,
    /// What the stage does, selected by `type`.
    #[serde(flatten)]
    pub kind: StageKind,
}

impl StageSpec {
    pub fn resolved_name(&self) -> String {
        self.common
            .name
            .clone()
            .unwrap_or_else(|| self.kind.type_name().to_string())
    }

    /// Turn the configuration into a runnable stage; relative file paths in it (models)
    /// are resolved against `base`, the pipeline file's folder.
    pub fn build(&self, base: &Path) -> Result<Arc<dyn Stage>> {
        self.kind.config().build(self.resolved_name(), base)
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

/// Checks one flattened block of a stage entry on its own (see [`parse_config`]).
type BlockCheck = fn(
    &serde_json::Map<String, serde_json::Value>,
    &[String],
    &str,
) -> std::result::Result<(), (String, String)>;

/// Every settings block that stage configs flatten: the one list [`parse_config`] reads.
/// A block whose keys a config does not all accept is not part of that config.
const FLATTENED_BLOCKS: &[BlockCheck] = &[
    check_block::<crate::models::onnx::SessionConfig>,
    check_block::<crate::models::image::ImageSettings>,
    check_block::<caption::CaptionFiles>,
    check_block::<clip_score::ClipScoreFiles>,
    check_block::<pseudo_label::PseudoLabelFiles>,
];

/// Deserialize the keys of block `B` in `entry` on their own, when the config (whose
/// keys are `accepted`) flattens `B`, so that an error names its field.
fn check_block<B: serde::de::DeserializeOwned + JsonSchema>(
    entry: &serde_json::Map<String, serde_json::Value>,
    accepted: &[String],
    at: &str,
) -> std::result::Result<(), (String, String)> {
    let keys = crate::fields::schema_property_names::<B>();
    if !keys.iter().all(|k| accepted.contains(k)) {
        return Ok(()); // this config does not flatten B
    }
    let block: serde_json::Map<_, _> = entry
        .iter()
        .filter(|(k, _)| keys.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    crate::fields::from_value_at::<B>(serde_json::Value::Object(block), at).map(|_| ())
}

/// A stage entry's settings (its `type` and common keys removed) as `T`. Unknown keys
/// are refused against `T`'s schema, and the blocks that configs flatten
/// ([`FLATTENED_BLOCKS`]) are read on their own first: serde loses the field path inside
/// a flattened block, and an error must point at `stages[0].formats[1]`, not at the
/// stage.
fn parse_config<T: serde::de::DeserializeOwned + JsonSchema>(
    value: serde_json::Value,
    at: &str,
) -> std::result::Result<T, (String, String)> {
    let accepted = crate::fields::schema_property_names::<T>();
    if let serde_json::Value::Object(entry) = &value {
        for check in FLATTENED_BLOCKS {
            check(entry, &accepted, at)?;
        }
    }
    crate::fields::from_value_checked(value, at, &accepted)
}

/// The stage registry: `Variant(module::Config) = "type_name"`, one line per stage. It
/// declares the module and generates [`StageKind`] with its dispatch.
macro_rules! stages {
    ($( $(#[$doc:meta])* $variant:ident($module:ident::$config:ident) = $type_name:literal, )*) => {
        $( pub mod $module; )*

        /// Every stage type, selected by the `type` field.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(tag = "type", deny_unknown_fields)]
        pub enum StageKind {
            $( $(#[$doc])* #[serde(rename = $type_name)] $variant($module::$config), )*
        }

        impl StageKind {
            /// Every `type:` a stage entry may have.
            pub const TYPES: &'static [&'static str] = &[$( $type_name ),*];

            /// Build the variant named by `type_name` from the entry's remaining keys;
            /// errors carry the field path under `at` (e.g. `stages[1].max_pixels`).
            pub fn from_value(
                type_name: &str,
                config: serde_json::Value,
                at: &str,
            ) -> std::result::Result<Self, (String, String)> {
                match type_name {
                    $( $type_name => parse_config(config, at).map(StageKind::$variant), )*
                    other => Err((
                        format!("{at}.type"),
                        format!(
                            "unknown stage type `{other}`; expected one of {}",
                            Self::TYPES.join(", ")
                        ),
                    )),
                }
            }

            pub fn type_name(&self) -> &'static str {
                match self {
                    $( StageKind::$variant(_) => $type_name, )*
                }
            }

            /// Whether the stage asks for a GPU (`execution_provider: cuda`).
            pub fn uses_cuda(&self) -> bool {
                self.config().session().is_some_and(|s| {
                    s.execution_provider == crate::models::onnx::ExecutionProviderName::Cuda
                })
            }

            /// The variant's settings, behind the one trait every stage config implements.
            pub fn config(&self) -> &dyn StageConfig {
                match self {
                    $( StageKind::$variant(config) => config, )*
                }
            }
        }
    };
}

stages! {
    /// Validate and decode images (JPEG, PNG, WebP); adds `width`, `height`, `image_format`.
    Decode(decode::DecodeConfig) = "decode",
    /// Clean captions (URLs, HTML, handles, digits, punctuation); adds `caption_clean`
    /// and `caption_missing`.
    CleanCaption(clean_caption::CleanCaptionConfig) = "clean_caption",
    /// CLIP image-caption agreement (ONNX Runtime): adds `clip_similarity` and, by
    /// default, the unit embeddings `clip_image_embedding` and `clip_text_embedding`.
    ClipScore(clip_score::ClipScoreConfig) = "clip_score",
    /// TRUST's trust weight from CLIP image and caption embeddings (softmax over groups
    /// of `group_size` rows, or a named alternative); adds `pseudo_weight`.
    Uncertainty(uncertainty::UncertaintyConfig) = "uncertainty",
    /// Pseudo-labels from the user's ONNX text classifier (e.g. a fine-tuned DistilBERT):
    /// adds `pseudo_label` (argmax), `pseudo_prob` (its softmax probability),
    /// `text_feature` (the pooled caption feature before the last linear layer) and, when
    /// class names are given, `pseudo_label_name`.
    PseudoLabel(pseudo_label::PseudoLabelConfig) = "pseudo_label",
    /// Captions for rows without one (`caption_missing` true or a null caption) from an
    /// ONNX image-to-text model (VisionEncoderDecoder, greedy decoding): adds
    /// `caption_final` (the given cleaned caption or the generated one) and
    /// `caption_source` (`given` or `generated`).
    Caption(caption::CaptionConfig) = "caption",
}
