//! The training file (`trustflow train TRAIN.yaml`): which enriched shards feed the
//! trainer, the vision model, the loss terms, the optimiser and the data side. Parsed
//! the way pipeline files are (serde-saphyr with its limits, then serde_path_to_error),
//! so every problem is reported as `file:line:col: field \`optimizer.lr\`: message`.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::augment::AugmentConfig;
use super::losses::{DEFAULT_TAU, DEFAULT_TAU_BASE, LossTerms, TEMPERATURE_RANGE};
use trustflow_engine::error::{Error, SpecIssue, SpecIssues};
use trustflow_engine::spec::{Locations, SourceSpec, SpecOrigin};

/// A training run over enriched shards (what an enrichment pipeline wrote).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "trustflow training file")]
pub struct TrainSpec {
    /// Name shown in progress and reports (defaults to the file stem).
    #[serde(default)]
    pub name: Option<String>,
    /// Labelled source-domain rows: `image`, `label`, and `text_feature` when the
    /// contrastive term is on (list it in `keep_columns`).
    pub source: SourceSpec,
    /// Target-domain rows: `image` and, as the switched-on terms need them,
    /// `pseudo_label`, `pseudo_weight`, `text_feature` (in `keep_columns`). A `label`
    /// column, when mapped, is used only to report pseudo-label accuracy and weight
    /// AUROC, never for training or model selection.
    pub target: SourceSpec,
    /// Optional labelled target rows (`image`, `label`) for the per-epoch target
    /// accuracy. Reported only; checkpoints are never chosen by it.
    #[serde(default)]
    pub eval: Option<SourceSpec>,
    /// Names of the enriched columns (the stages' defaults unless renamed).
    #[serde(default)]
    pub columns: EnrichedColumns,
    /// The vision model.
    pub model: ModelSpec,
    /// Weak and strong views (docs/method.md section 4); `size` is the model's input side.
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Which loss terms run and at what scale (the ablations).
    #[serde(default)]
    pub loss: LossSpec,
    /// SGD with a cosine schedule.
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    /// The data side: batch size, workers, prefetch depth, shuffling.
    #[serde(default)]
    pub data: DataSpec,
    /// Seed of everything random: initial weights, shuffling, strong views.
    #[serde(default)]
    pub seed: u64,
    /// Output folder (checkpoints, `metrics.jsonl`, `_report.json`), relative to the
    /// training file.
    pub output: String,
    /// Also checkpoint every this many steps (a checkpoint is always written at the end
    /// of every epoch).
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub checkpoint_every_steps: Option<u64>,
}

/// Column names of the enrichment stages' outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EnrichedColumns {
    /// Integer pseudo-label (pseudo_label stage). Default `pseudo_label`.
    pub pseudo_label: String,
    /// Weight in [0, 1] (uncertainty stage). Default `pseudo_weight`.
    pub pseudo_weight: String,
    /// Caption feature, FixedSizeList<Float32> (pseudo_label stage). Default
    /// `text_feature`.
    pub text_feature: String,
}

impl Default for EnrichedColumns {
    fn default() -> Self {
        EnrichedColumns {
            pseudo_label: "pseudo_label".into(),
            pseudo_weight: "pseudo_weight".into(),
            text_feature: "text_feature".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Number of classes C; labels and pseudo-labels must lie in [0, C).
    #[schemars(range(min = 2, max = 1000000))]
    pub classes: i64,
    /// Feature extractor; the engine adds the linear head on its features.
    #[serde(default)]
    pub backbone: BackboneSpec,
    /// `cpu` (default) or `cuda` (an error when libtorch sees no CUDA device).
    #[serde(default)]
    pub device: TrainDevice,
    /// libtorch intra-op threads (default: all cores).
    #[serde(default)]
    #[schemars(range(min = 1, max = 1024))]
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainDevice {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackboneSpec {
    /// A small convolutional network for small images (conv-BN-ReLU blocks, global
    /// average pooling); its feature width is `4 * width`.
    Builtin {
        /// Channels of the first block. Default 32.
        #[serde(default = "default_width")]
        #[schemars(range(min = 1, max = 1024))]
        width: i64,
    },
    /// A TorchScript module (e.g. a timm or torchvision model exported with
    /// `torch.jit.script`/`trace` and `num_classes=0`) mapping `[N, 3, size, size]`
    /// images to `[N, D]` features.
    Torchscript {
        /// The `.pt` file, relative to the training file.
        path: String,
    },
}

fn default_width() -> i64 {
    32
}

impl Default for BackboneSpec {
    fn default() -> Self {
        BackboneSpec::Builtin {
            width: default_width(),
        }
    }
}

/// Loss-term scales (0 switches a term off) and the contrastive temperatures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LossSpec {
    /// Source cross-entropy. Default 1.
    pub src: f64,
    /// `pseudo_weight`-weighted target cross-entropy on pseudo-labels. Default 1.
    pub tgt: f64,
    /// (1 - w)-weighted self-training on strong views. Default 1.
    pub self_train: f64,
    /// Soft-contrastive loss over caption similarities. Default 1.
    pub ctr: f64,
    /// Contrastive temperature tau. Default 0.07.
    pub tau: f64,
    /// Contrastive base temperature. Default 0.07.
    pub tau_base: f64,
    /// Use weights of 1 for every target row instead of `pseudo_weight` (LaGTran's
    /// unweighted pseudo-label loss, an ablation). Default false.
    pub unweighted: bool,
    /// Epochs at the start that train on L_src alone (a source-only warm start); the
    /// other switched-on terms join from the epoch after. The paper starts from an
    /// ImageNet-pretrained backbone; a backbone trained from scratch predicts nearly one
    /// class on the target at first, which self-training would then reinforce. Counted
    /// within `optimizer.epochs`. Default 0.
    pub warmup_epochs: u64,
}

impl Default for LossSpec {
    fn default() -> Self {
        LossSpec {
            src: 1.0,
            tgt: 1.0,
            self_train: 1.0,
            ctr: 1.0,
            tau: DEFAULT_TAU,
            tau_base: DEFAULT_TAU_BASE,
            unweighted: false,
            warmup_epochs: 0,
        }
    }
}

impl LossSpec {
    pub fn terms(&self) -> LossTerms {
        LossTerms {
            src: self.src,
            tgt: self.tgt,
            self_train: self.self_train,
            ctr: self.ctr,
        }
    }
    /// The terms switched on in `epoch` (0-based): L_src alone during the warm-up.
    pub fn terms_in_epoch(&self, epoch: u64) -> LossTerms {
        if epoch < self.warmup_epochs {
            LossTerms {
                src: self.src,
                tgt: 0.0,
                self_train: 0.0,
                ctr: 0.0,
            }
        } else {
            self.terms()
        }
    }
    /// Whether target rows need `pseudo_weight`.
    pub fn needs_weights(&self) -> bool {
        !self.unweighted && (self.tgt != 0.0 || self.self_train != 0.0)
    }
    pub fn needs_pseudo_labels(&self) -> bool {
        self.tgt != 0.0
    }
    pub fn needs_text_features(&self) -> bool {
        self.ctr != 0.0
    }
    /// Whether steps need strong views (self-training and contrastive terms).
    pub fn needs_strong_target(&self) -> bool {
        self.self_train != 0.0 || self.ctr != 0.0
    }
    pub fn needs_strong_source(&self) -> bool {
        self.ctr != 0.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// lr_t = lr_min + (lr - lr_min) (1 + cos(pi t / T)) / 2 over all T steps.
    #[default]
    Cosine,
    Constant,
}

/// SGD as torch.optim.SGD (dampening 0, no Nesterov). Defaults are the paper's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSpec {
    /// Base learning rate. Default 3e-4 (the paper's, for a pretrained backbone).
    pub lr: f64,
    /// Learning rate at the end of the cosine schedule. Default 0.
    pub lr_min: f64,
    /// Default 0.9.
    pub momentum: f64,
    /// L2 penalty added to gradients. Default 5e-4.
    pub weight_decay: f64,
    /// Default 30; an epoch is max(source, target) batches, the shorter side cycling.
    #[schemars(range(min = 1))]
    pub epochs: u64,
    pub schedule: Schedule,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec {
            lr: 3e-4,
            lr_min: 0.0,
            momentum: 0.9,
            weight_decay: 5e-4,
            epochs: 30,
            schedule: Schedule::Cosine,
        }
    }
}

/// The data side between the shards and the training loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// Rows per domain per step (B source + B target rows). Default 32.
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: usize,
    /// Threads decoding and augmenting images. Default 2.
    #[schemars(range(min = 1, max = 256))]
    pub workers: usize,
    /// Ready steps buffered ahead of the training loop (the prefetch queue). Default 4.
    #[schemars(range(min = 1, max = 1024))]
    pub prefetch: usize,
    /// Rows held in each domain's shuffle buffer (shard order is shuffled too); 1
    /// disables row shuffling. Default 1024.
    #[schemars(range(min = 1, max = 16777216))]
    pub shuffle_buffer: usize,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            batch_size: 32,
            workers: 2,
            prefetch: 4,
            shuffle_buffer: 1024,
        }
    }
}

/// A training spec with the file it came from.
#[derive(Debug, Clone)]
pub struct LoadedTrain {
    pub file: PathBuf,
    pub spec: TrainSpec,
    pub locations: Locations,
}

impl SpecOrigin for LoadedTrain {
    fn file(&self) -> &Path {
        &self.file
    }
    fn locations(&self) -> &Locations {
        &self.locations
    }
}

impl LoadedTrain {
    pub fn name(&self) -> String {
        self.spec.name.clone().unwrap_or_else(|| {
            self.file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "train".into())
        })
    }
}

/// Read, parse and check a training file.
pub fn load_train_file(path: &Path) -> Result<LoadedTrain, Error> {
    let text = trustflow_engine::spec::read_spec_text(path, "training file")?;
    let locations = Locations::index(&text);
    let options = serde_saphyr::options! { with_snippet: false, strict_booleans: true };
    let mut value: Value = serde_saphyr::from_str_with_options(&text, options).map_err(|e| {
        Error::Spec(SpecIssues(vec![SpecIssue::whole_file(
            path,
            format!("not valid YAML: {e}"),
        )]))
    })?;
    for section in ["source", "target", "eval"] {
        if let Some(v) = value.get_mut(section) {
            trustflow_engine::spec::paths_as_list(v);
        }
    }
    let spec: TrainSpec =
        trustflow_engine::fields::from_value_at(value, "").map_err(|(field, message)| {
            Error::Spec(SpecIssues(vec![locations.issue(path, &field, message)]))
        })?;
    let loaded = LoadedTrain {
        file: path.to_path_buf(),
        spec,
        locations,
    };
    let issues = check(&loaded);
    if issues.is_empty() {
        Ok(loaded)
    } else {
        Err(Error::Spec(SpecIssues(issues)))
    }
}

/// Semantic checks that the types cannot express; every problem, in file order.
fn check(t: &LoadedTrain) -> Vec<SpecIssue> {
    let s = &t.spec;
    let mut issues = Vec::new();
    let mut at = |field: &str, message: String| issues.push(t.issue_at(field, message));
    // The data sections take the pipeline's source checks (paths, the filter's size
    // limit, byte limits), under their own names.
    let sections = [
        ("source", Some(&s.source)),
        ("target", Some(&s.target)),
        ("eval", s.eval.as_ref()),
    ];
    for (section, spec) in sections {
        if let Some(spec) = spec {
            trustflow_engine::spec::check_source(spec, section, t.base_dir(), &mut at);
        }
    }
    for (name, value) in [
        ("loss.src", s.loss.src),
        ("loss.tgt", s.loss.tgt),
        ("loss.self_train", s.loss.self_train),
        ("loss.ctr", s.loss.ctr),
    ] {
        if !value.is_finite() || value < 0.0 {
            at(name, format!("must be a finite number >= 0, got {value}"));
        }
    }
    let terms = s.loss.terms();
    if [terms.src, terms.tgt, terms.self_train, terms.ctr]
        .iter()
        .all(|v| *v == 0.0)
    {
        at(
            "loss",
            "every loss term is 0: nothing to train (set at least `src: 1`)".into(),
        );
    }
    if s.loss.warmup_epochs > 0 {
        if terms.src == 0.0 {
            at(
                "loss.warmup_epochs",
                "a warm-up trains on L_src alone, but `loss.src` is 0".into(),
            );
        }
        if s.loss.warmup_epochs >= s.optimizer.epochs {
            at(
                "loss.warmup_epochs",
                format!(
                    "must be below optimizer.epochs ({}), got {}: the other terms would never run",
                    s.optimizer.epochs, s.loss.warmup_epochs
                ),
            );
        }
    }
    let (lo, hi) = TEMPERATURE_RANGE;
    for (name, value) in [("loss.tau", s.loss.tau), ("loss.tau_base", s.loss.tau_base)] {
        if !(lo..=hi).contains(&value) {
            at(name, format!("must lie in [{lo:e}, {hi:e}], got {value}"));
        }
    }
    let o = &s.optimizer;
    if !(o.lr.is_finite() && o.lr > 0.0) {
        at(
            "optimizer.lr",
            format!("must be a number > 0, got {}", o.lr),
        );
    }
    if !(o.lr_min.is_finite() && o.lr_min >= 0.0 && o.lr_min <= o.lr) {
        at(
            "optimizer.lr_min",
            format!("must lie in [0, lr = {}], got {}", o.lr, o.lr_min),
        );
    }
    if !(o.momentum.is_finite() && (0.0..1.0).contains(&o.momentum)) {
        at(
            "optimizer.momentum",
            format!("must lie in [0, 1), got {}", o.momentum),
        );
    }
    if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
        at(
            "optimizer.weight_decay",
            format!("must be a number >= 0, got {}", o.weight_decay),
        );
    }
    if o.epochs == 0 {
        at("optimizer.epochs", "must be at least 1".into());
    }
    if !(2..=1_000_000).contains(&s.model.classes) {
        at(
            "model.classes",
            format!("must lie in [2, 1000000], got {}", s.model.classes),
        );
    }
    match &s.model.backbone {
        BackboneSpec::Builtin { width } if !(1..=1024).contains(width) => at(
            "model.backbone.width",
            format!("must lie in [1, 1024], got {width}"),
        ),
        BackboneSpec::Torchscript { path } if path.trim().is_empty() => {
            at("model.backbone.path", "must name a TorchScript file".into())
        }
        _ => {}
    }
    if s.model.threads == Some(0) {
        at("model.threads", "must be at least 1".into());
    }
    let d = &s.data;
    for (name, value, max) in [
        ("data.batch_size", d.batch_size, 65536),
        ("data.workers", d.workers, 256),
        ("data.prefetch", d.prefetch, 1024),
        ("data.shuffle_buffer", d.shuffle_buffer, 1 << 24),
    ] {
        if !(1..=max).contains(&value) {
            at(name, format!("must lie in [1, {max}], got {value}"));
        }
    }
    if s.checkpoint_every_steps == Some(0) {
        at("checkpoint_every_steps", "must be at least 1".into());
    }
    if s.output.trim().is_empty() {
        at("output", "must name an output folder".into());
    }
    for (field, message) in s.augment.validate() {
        at(&format!("augment.{field}"), message);
    }
    issues
}

/// The JSON Schema of training files, as checked in at `schemas/train.schema.json`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(TrainSpec);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
