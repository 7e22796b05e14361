//! The TRUST objective (docs/method.md sections 4 and 5) on libtorch:
//!
//! ```text
//! L = L_src + L_tgt + L_self + L_ctr
//! ```
//!
//! each term its own function ([`source_ce`], [`weighted_target_ce`],
//! [`self_training_ce`], [`soft_contrastive`]) and [`trust_loss`], which checks a whole
//! [`TrustBatch`] up front and adds the terms that [`LossTerms`] switches on (that is
//! how the ablations of docs/method.md section 6 run).
//!
//! The per-term functions take well-formed tensors (2-D logits, 1-D integer labels and
//! float weights of the same length, at least one row, one device) and, like libtorch,
//! panic when shapes do not fit; [`trust_loss`] validates everything before it calls
//! them and never panics on its inputs.
//!
//! Parity with an independent PyTorch implementation is tested in
//! tests/integration/losses.rs against the golden files written by
//! scripts/fixtures/losses.py.
//!
//! # Conventions this module fixes
//!
//! - **Anchor order** of the contrastive loss: the step has R = B_s + B_t rows (source
//!   rows first, then target rows) and 2R anchors. Anchor rows `0..R` are the first
//!   (weak) views of the R rows, anchor rows `R..2R` their second (strong) views in the
//!   same row order, so anchor `a` belongs to row `a mod R`; [`contrastive_anchors`]
//!   builds that stack. With B_s = B_t = B this is docs/method.md's 4B anchors.
//! - **Caption similarity** ([`caption_similarity`]) is computed in float64 with no
//!   gradient, clamped to [0, 1] and rounded to float32: captions whose features are
//!   parallel (in particular identical captions) get exactly S = 1, so "every other
//!   view has S = 1" is an exact test rather than a rounding accident.
//! - An anchor with **no negative mass** (sum_k N_ak = 0) has loss 0 and no gradient;
//!   it is masked, never computed through log(0).

use tch::{Device, Kind, Tensor};

/// docs/method.md section 5: tau = 0.07.
pub const DEFAULT_TAU: f64 = 0.07;
/// docs/method.md section 5: tau_base = 0.07.
pub const DEFAULT_TAU_BASE: f64 = 0.07;
/// The temperatures [`trust_loss`] accepts (tau and tau_base alike; the paper uses
/// 0.07). The loss grows like tau / tau_base and its gradient like 1 / tau_base, so
/// within this range every value and gradient stays far inside float32 for any finite
/// input; [`soft_contrastive`] itself stays finite for any tau > 0 (tested down to
/// 1e-45) as long as tau_base is in range.
pub const TEMPERATURE_RANGE: (f64, f64) = (1e-6, 1e6);
/// As in `torch.nn.functional.normalize`: a feature whose norm is below this is divided
/// by it instead of by its norm (so a zero feature stays zero, with a finite gradient).
const NORM_EPS: f64 = 1e-12;

/// Why a TRUST loss could not be computed. Converts into [`trustflow_engine::Error`] (as a
/// `train` stage error), so `?` works in functions returning [`trustflow_engine::Result`].
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    #[error("loss term `{term}` needs `{input}`, which the batch does not have")]
    MissingInput {
        term: &'static str,
        input: &'static str,
    },

    #[error("`{input}`: {message}")]
    Shape {
        input: &'static str,
        message: String,
    },

    #[error("`{input}` has {value} {what} but `{first}` has {first_value}")]
    Mismatch {
        what: &'static str,
        first: &'static str,
        first_value: i64,
        input: &'static str,
        value: i64,
    },

    #[error("`{input}` must be {expected}, got {found:?}")]
    Kind {
        input: &'static str,
        expected: &'static str,
        found: Kind,
    },

    #[error("`{input}` is on {found:?} but `{first}` is on {expected:?}")]
    Device {
        first: &'static str,
        expected: Device,
        input: &'static str,
        found: Device,
    },

    #[error("`{input}`: label {label} at row {row} is outside [0, {classes})")]
    LabelOutOfRange {
        input: &'static str,
        row: usize,
        label: i64,
        classes: i64,
    },

    #[error("`weights`: {value} at row {row} is not a weight in [0, 1]")]
    WeightOutOfRange { row: usize, value: f64 },

    #[error("`{input}` holds {count} NaN or infinite value(s)")]
    NonFiniteInput { input: &'static str, count: i64 },

    #[error("{0}")]
    Setting(String),

    #[error("every loss term is switched off: nothing to train")]
    NoTerms,

    #[error("loss term `{term}` is {value}, not a finite number")]
    NonFiniteLoss { term: &'static str, value: f64 },

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl From<LossError> for trustflow_engine::error::Error {
    fn from(e: LossError) -> Self {
        trustflow_engine::error::Error::stage("train", e)
    }
}

/// Per-row cross-entropy, `-log softmax(logits_i)[labels_i]`, in the logits' kind.
fn row_cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    let log_probs = logits.log_softmax(-1, None::<Kind>);
    -log_probs
        .gather(1, &labels.to_kind(Kind::Int64).unsqueeze(1), false)
        .squeeze_dim(1)
}

/// `L_src = mean_i CE(g(x_s,i), y_s,i)` (docs/method.md section 4).
///
/// `logits` [B, C] float, `labels` [B] integer in [0, C). Panics on malformed shapes.
pub fn source_ce(logits: &Tensor, labels: &Tensor) -> Tensor {
    row_cross_entropy(logits, labels).mean(None::<Kind>)
}

/// `L_tgt = mean_i w_i * CE(g(x_t,i), pseudo_label_i)` (docs/method.md section 4): the mean
/// is over the B rows, not over the sum of the weights, so small weights shrink the
/// term. `weights` [B] float in [0, 1] (the CLIP weights of docs/method.md section 3).
pub fn weighted_target_ce(logits: &Tensor, pseudo_labels: &Tensor, weights: &Tensor) -> Tensor {
    let w = weights.detach().to_kind(logits.kind());
    (row_cross_entropy(logits, pseudo_labels) * w).mean(None::<Kind>)
}

/// `L_self = mean_i (1 - w_i) * CE(g(A(x_t,i)), argmax g(x_t,i))` (docs/method.md section
/// 4): self-training on the strong view, labelled by the weak view's argmax. The label
/// is taken from `weak_logits` detached, so no gradient reaches the weak logits
/// through this term (ties go to the lowest class index, as in PyTorch).
pub fn self_training_ce(strong_logits: &Tensor, weak_logits: &Tensor, weights: &Tensor) -> Tensor {
    let labels = weak_logits.detach().argmax(1, false);
    let w = weights.detach().to_kind(strong_logits.kind());
    (row_cross_entropy(strong_logits, &labels) * (w.ones_like() - &w)).mean(None::<Kind>)
}

/// Stacks the four views into the anchor order of [`soft_contrastive`]: first views
/// (source rows, then target rows), then second views in the same row order.
pub fn contrastive_anchors(
    source: &Tensor,
    target: &Tensor,
    source_strong: &Tensor,
    target_strong: &Tensor,
) -> Tensor {
    Tensor::cat(&[source, target, source_strong, target_strong], 0)
}

/// The caption-similarity matrix S of docs/method.md section 5, R x R for R caption
/// features [R, Dt]: cosine similarity clamped to [0, 1], without gradient. A caption
/// feature of norm 0 has S = 0 with every other row; every row has S = 1 with itself.
/// Computed in float64 and returned as float32 (see the module docs: parallel
/// captions get exactly 1).
pub fn caption_similarity(caption_features: &Tensor) -> Tensor {
    let z = caption_features.detach().to_kind(Kind::Double);
    let norms = z.norm_scalaropt_dim(2.0, 1i64, true);
    // float32 input cannot underflow a float64 norm: only an all-zero row has norm 0,
    // and it stays all-zero here.
    let unit = &z / norms.clamp_min(f64::MIN_POSITIVE);
    let mut cos = unit.mm(&unit.transpose(0, 1));
    let _ = cos.fill_diagonal_(1.0, false);
    cos.clamp(0.0, 1.0).to_kind(Kind::Float)
}

/// Row-wise L2 normalisation with `torch.nn.functional.normalize` semantics
/// (`x / max(||x||, 1e-12)`), but with the norm taken after dividing by the row's
/// largest |entry| (a constant, so the gradient is unchanged) so that squaring large
/// features cannot overflow.
fn l2_normalise(x: &Tensor) -> Tensor {
    let scale = x.detach().abs().amax(1i64, true);
    let scale = scale.masked_fill(&scale.le(0.0), 1.0);
    let norm = (x / &scale).norm_scalaropt_dim(2.0, 1i64, true) * &scale;
    x / norm.clamp_min(NORM_EPS)
}

/// The soft-contrastive loss `L_ctr` of docs/method.md section 5, with the gradient flowing
/// into `features` (the authors' released script computes it under no-grad; this does
/// not).
///
/// `features` [2R, D] in the anchor order of the module docs (rows `0..R` first views of
/// the R rows, rows `R..2R` their second views; see [`contrastive_anchors`]);
/// `caption_features` [R, Dt] one per row, in the same row order (no gradient is taken
/// through them). With f_a the L2-normalised features, S = [`caption_similarity`]
/// tiled to 2R x 2R, and
///
/// ```text
/// l_ab   = <f_a, f_b> / tau            (each row's max subtracted)
/// P_ab   = S_ab, N_ab = 1 - S_ab       (both 0 on the diagonal)
/// lp_ab  = l_ab - log sum_k N_ak exp(l_ak)
/// loss_a = -(tau / tau_base) * sum_b P_ab lp_ab / sum_b P_ab
/// L_ctr  = mean_a loss_a               (loss_a = 0 where sum_k N_ak = 0)
/// ```
///
/// It is evaluated as `-(1/tau_base) * sum_b P_ab (tau lp_ab) / sum_b P_ab`, with
/// `tau lp_ab = d_ab - tau log sum_k N_ak exp(d_ak / tau)` and `d_ab = <f_a, f_b> -
/// max_b <f_a, f_b>` (the same quantity with every intermediate bounded), and the
/// log-sum-exp taken over the negatives only, shifted by their largest `d`; so no
/// finite input and no temperature in [`TEMPERATURE_RANGE`] gives NaN or infinity, in
/// the value or in the gradient. `sum_b P_ab >= 1` always (the anchor's other view has
/// weight 1). Panics on malformed shapes (features not 2 x the caption rows).
pub fn soft_contrastive(
    features: &Tensor,
    caption_features: &Tensor,
    tau: f64,
    tau_base: f64,
) -> Tensor {
    let anchors = features.size().first().copied().unwrap_or(0);
    let device = features.device();
    let kind = features.kind();

    let f = l2_normalise(features);
    let cos = f.mm(&f.transpose(0, 1));
    // d = tau * l, row max subtracted: every entry in [-2, 0] up to rounding.
    let d = &cos - cos.detach().amax(1i64, true);

    let s = caption_similarity(caption_features)
        .to_kind(kind)
        .to_device(device)
        .repeat([2i64, 2]);
    let diagonal = Tensor::eye(anchors, (Kind::Bool, device));
    let pos = s.masked_fill(&diagonal, 0.0);
    let neg = (s.ones_like() - &s).masked_fill(&diagonal, 0.0);

    let not_negative = neg.le(0.0);
    let no_negatives = neg.sum_dim_intlist(1i64, true, None::<Kind>).le(0.0);
    // log sum_k N_ak exp(d_ak / tau) over the negatives only, shifted by their max.
    let neg_max = d
        .detach()
        .masked_fill(&not_negative, f64::NEG_INFINITY)
        .amax(1i64, true)
        .masked_fill(&no_negatives, 0.0);
    let shifted = ((&d - &neg_max) / tau).masked_fill(&not_negative, f64::NEG_INFINITY);
    let mass = (&neg * shifted.exp())
        .sum_dim_intlist(1i64, true, None::<Kind>)
        .masked_fill(&no_negatives, 1.0);
    let tau_log_z = &neg_max + mass.log() * tau;
    let tau_log_prob = &d - tau_log_z;

    let attraction = (&pos * tau_log_prob).sum_dim_intlist(1i64, false, None::<Kind>);
    let per_anchor =
        attraction / pos.sum_dim_intlist(1i64, false, None::<Kind>) * (-1.0 / tau_base);
    per_anchor
        .masked_fill(&no_negatives.squeeze_dim(1), 0.0)
        .mean(None::<Kind>)
}

/// The scale of each term in `L = src*L_src + tgt*L_tgt + self_train*L_self +
/// ctr*L_ctr`. A scale of 0 switches the term off: it is not computed, and the inputs
/// only it needs may be absent. Scales must be finite and >= 0. `Default` is the
/// paper's objective (all 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossTerms {
    pub src: f64,
    pub tgt: f64,
    pub self_train: f64,
    pub ctr: f64,
}

impl Default for LossTerms {
    fn default() -> Self {
        LossTerms {
            src: 1.0,
            tgt: 1.0,
            self_train: 1.0,
            ctr: 1.0,
        }
    }
}

impl LossTerms {
    fn check(&self) -> Result<(), LossError> {
        for (name, scale) in self.named() {
            if !scale.is_finite() || scale < 0.0 {
                return Err(LossError::Setting(format!(
                    "scale of loss term `{name}` must be a finite number >= 0, got {scale}"
                )));
            }
        }
        if self.named().iter().all(|(_, scale)| *scale == 0.0) {
            return Err(LossError::NoTerms);
        }
        Ok(())
    }

    fn named(&self) -> [(&'static str, f64); 4] {
        [
            ("src", self.src),
            ("tgt", self.tgt),
            ("self_train", self.self_train),
            ("ctr", self.ctr),
        ]
    }
}

/// One training step's tensors. Which fields are needed depends on the switched-on
/// terms (a missing one is an error only if a switched-on term needs it):
///
/// | term | needs |
/// |---|---|
/// | `src` | `source_logits` [B_s, C] float, `source_labels` [B_s] integer |
/// | `tgt` | `target_logits` [B_t, C], `pseudo_labels` [B_t] integer, `weights` [B_t] float in [0, 1] |
/// | `self_train` | `target_logits` (weak view), `target_strong_logits` [B_t, C], `weights` |
/// | `ctr` | `source_features`, `source_features_strong` [B_s, D], `target_features`, `target_features_strong` [B_t, D], `source_caption_features` [B_s, Dt], `target_caption_features` [B_t, Dt] |
///
/// `*_features` are h(x) of the weak view, `*_features_strong` h(A(x)) of the strong
/// view, row i of each the same image. B_s and B_t may differ (docs/method.md has both = B).
#[derive(Debug, Default)]
pub struct TrustBatch {
    pub source_logits: Option<Tensor>,
    pub source_labels: Option<Tensor>,
    pub source_features: Option<Tensor>,
    pub source_features_strong: Option<Tensor>,
    pub source_caption_features: Option<Tensor>,
    pub target_logits: Option<Tensor>,
    pub target_strong_logits: Option<Tensor>,
    pub pseudo_labels: Option<Tensor>,
    pub weights: Option<Tensor>,
    pub target_features: Option<Tensor>,
    pub target_features_strong: Option<Tensor>,
    pub target_caption_features: Option<Tensor>,
}

/// What [`trust_loss`] returns: the scaled total (with its autograd graph, ready for
/// `backward`) and each switched-on term's unscaled value (`None` when switched off).
#[derive(Debug)]
pub struct LossValues {
    pub total: Tensor,
    pub src: Option<f64>,
    pub tgt: Option<f64>,
    pub self_train: Option<f64>,
    pub ctr: Option<f64>,
}

fn need<'a>(
    input: &'a Option<Tensor>,
    name: &'static str,
    term: &'static str,
) -> Result<&'a Tensor, LossError> {
    input
        .as_ref()
        .ok_or(LossError::MissingInput { term, input: name })
}

/// One size that several inputs must agree on; the first input seen sets it.
struct Agree {
    what: &'static str,
    first: Option<(&'static str, i64)>,
}

impl Agree {
    fn new(what: &'static str) -> Self {
        Agree { what, first: None }
    }

    fn check(&mut self, input: &'static str, value: i64) -> Result<(), LossError> {
        match self.first {
            None => {
                self.first = Some((input, value));
                Ok(())
            }
            Some((first, first_value)) if first_value != value => Err(LossError::Mismatch {
                what: self.what,
                first,
                first_value,
                input,
                value,
            }),
            Some(_) => Ok(()),
        }
    }

    fn value(&self) -> Option<i64> {
        self.first.map(|(_, v)| v)
    }
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

fn is_integer(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
    )
}

fn shape_error(input: &'static str, message: String) -> LossError {
    LossError::Shape { input, message }
}

/// A 2-D float tensor with at least one row and one column: (rows, columns).
fn float_matrix(t: &Tensor, input: &'static str) -> Result<(i64, i64), LossError> {
    let kind = t.f_kind()?;
    if !is_float(kind) {
        return Err(LossError::Kind {
            input,
            expected: "a float tensor",
            found: kind,
        });
    }
    match t.size()[..] {
        [rows, cols] if rows > 0 && cols > 0 => Ok((rows, cols)),
        [0, _] => Err(shape_error(input, "has no rows (empty batch)".into())),
        [_, 0] => Err(shape_error(input, "has no columns".into())),
        ref size => Err(shape_error(
            input,
            format!("expected a 2-D tensor [rows, columns], got shape {size:?}"),
        )),
    }
}

/// A 1-D tensor with at least one entry, of an integer kind (`integer`) or a float
/// kind: its length.
fn vector(t: &Tensor, input: &'static str, integer: bool) -> Result<i64, LossError> {
    let kind = t.f_kind()?;
    let (ok, expected) = if integer {
        (is_integer(kind), "an integer tensor")
    } else {
        (is_float(kind), "a float tensor")
    };
    if !ok {
        return Err(LossError::Kind {
            input,
            expected,
            found: kind,
        });
    }
    match t.size()[..] {
        [len] if len > 0 => Ok(len),
        [_] => Err(shape_error(input, "has no rows (empty batch)".into())),
        ref size => Err(shape_error(
            input,
            format!("expected a 1-D tensor [rows], got shape {size:?}"),
        )),
    }
}

fn check_finite(t: &Tensor, input: &'static str) -> Result<(), LossError> {
    let bad = t
        .f_isfinite()?
        .f_logical_not()?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    if bad > 0 {
        return Err(LossError::NonFiniteInput { input, count: bad });
    }
    Ok(())
}

fn check_labels(t: &Tensor, input: &'static str, classes: i64) -> Result<(), LossError> {
    let labels = Vec::<i64>::try_from(&t.f_to_device(Device::Cpu)?)?;
    match labels
        .iter()
        .enumerate()
        .find(|(_, label)| !(0..classes).contains(*label))
    {
        Some((row, &label)) => Err(LossError::LabelOutOfRange {
            input,
            row,
            label,
            classes,
        }),
        None => Ok(()),
    }
}

fn check_weights(t: &Tensor) -> Result<(), LossError> {
    let weights = Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?)?;
    match weights
        .iter()
        .enumerate()
        .find(|(_, w)| !(0.0..=1.0).contains(*w))
    {
        Some((row, &value)) => Err(LossError::WeightOutOfRange { row, value }),
        None => Ok(()),
    }
}

fn check_temperature(name: &str, value: f64) -> Result<(), LossError> {
    let (lo, hi) = TEMPERATURE_RANGE;
    if !(lo..=hi).contains(&value) {
        return Err(LossError::Setting(format!(
            "{name} must lie in [{lo:e}, {hi:e}], got {value}"
        )));
    }
    Ok(())
}

impl TrustBatch {
    /// Checks everything the switched-on terms of `terms` need, before any loss is
    /// computed: presence, shapes (2-D logits and features, 1-D labels and weights, no
    /// empty batch), kinds, one device, equal row counts within each domain, one class
    /// count C and one feature width across domains, labels in [0, C), weights in
    /// [0, 1] (NaN rejected), finite logits and features. Also rejects scales that are
    /// negative or not finite, and all terms switched off.
    pub fn validate(&self, terms: &LossTerms) -> Result<(), LossError> {
        terms.check()?;
        let mut source_rows = Agree::new("source rows");
        let mut target_rows = Agree::new("target rows");
        let mut classes = Agree::new("classes");
        let mut feature_dim = Agree::new("feature columns");
        let mut caption_dim = Agree::new("caption-feature columns");
        // every input a switched-on term reads, for the device and finiteness checks
        let mut used: Vec<(&'static str, &Tensor)> = Vec::new();
        let mut labels: Vec<(&'static str, &Tensor)> = Vec::new();
        let mut weights: Option<&Tensor> = None;

        if terms.src != 0.0 {
            let logits = need(&self.source_logits, "source_logits", "src")?;
            let (rows, c) = float_matrix(logits, "source_logits")?;
            source_rows.check("source_logits", rows)?;
            classes.check("source_logits", c)?;
            let y = need(&self.source_labels, "source_labels", "src")?;
            source_rows.check("source_labels", vector(y, "source_labels", true)?)?;
            used.extend([("source_logits", logits), ("source_labels", y)]);
            labels.push(("source_labels", y));
        }
        if terms.tgt != 0.0 || terms.self_train != 0.0 {
            let term = if terms.tgt != 0.0 {
                "tgt"
            } else {
                "self_train"
            };
            let logits = need(&self.target_logits, "target_logits", term)?;
            let (rows, c) = float_matrix(logits, "target_logits")?;
            target_rows.check("target_logits", rows)?;
            classes.check("target_logits", c)?;
            let w = need(&self.weights, "weights", term)?;
            target_rows.check("weights", vector(w, "weights", false)?)?;
            used.extend([("target_logits", logits), ("weights", w)]);
            weights = Some(w);
        }
        if terms.tgt != 0.0 {
            let y = need(&self.pseudo_labels, "pseudo_labels", "tgt")?;
            target_rows.check("pseudo_labels", vector(y, "pseudo_labels", true)?)?;
            used.push(("pseudo_labels", y));
            labels.push(("pseudo_labels", y));
        }
        if terms.self_train != 0.0 {
            let name = "target_strong_logits";
            let logits = need(&self.target_strong_logits, name, "self_train")?;
            let (rows, c) = float_matrix(logits, name)?;
            target_rows.check(name, rows)?;
            classes.check(name, c)?;
            used.push((name, logits));
        }
        if terms.ctr != 0.0 {
            let views = [
                ("source_features", &self.source_features, true),
                ("source_features_strong", &self.source_features_strong, true),
                ("target_features", &self.target_features, false),
                (
                    "target_features_strong",
                    &self.target_features_strong,
                    false,
                ),
            ];
            for (name, input, source) in views {
                let t = need(input, name, "ctr")?;
                let (r, d) = float_matrix(t, name)?;
                let rows = if source {
                    &mut source_rows
                } else {
                    &mut target_rows
                };
                rows.check(name, r)?;
                feature_dim.check(name, d)?;
                used.push((name, t));
            }
            let captions = [
                (
                    "source_caption_features",
                    &self.source_caption_features,
                    true,
                ),
                (
                    "target_caption_features",
                    &self.target_caption_features,
                    false,
                ),
            ];
            for (name, input, source) in captions {
                let t = need(input, name, "ctr")?;
                let (r, d) = float_matrix(t, name)?;
                let rows = if source {
                    &mut source_rows
                } else {
                    &mut target_rows
                };
                rows.check(name, r)?;
                caption_dim.check(name, d)?;
                used.push((name, t));
            }
        }

        if let Some((first, t)) = used.first() {
            let expected = t.device();
            for (input, t) in &used {
                let found = t.device();
                if found != expected {
                    return Err(LossError::Device {
                        first,
                        expected,
                        input,
                        found,
                    });
                }
            }
        }
        if let Some(c) = classes.value() {
            for (input, y) in labels {
                check_labels(y, input, c)?;
            }
        }
        if let Some(w) = weights {
            check_weights(w)?;
        }
        for (input, t) in used {
            if is_float(t.f_kind()?) && input != "weights" {
                check_finite(t, input)?;
            }
        }
        Ok(())
    }
}

fn add_term(
    total: &mut Option<Tensor>,
    term: &'static str,
    scale: f64,
    loss: Tensor,
) -> Result<Option<f64>, LossError> {
    let value = loss.f_double_value(&[])?;
    if !value.is_finite() {
        return Err(LossError::NonFiniteLoss { term, value });
    }
    let scaled = loss * scale;
    *total = Some(match total.take() {
        Some(sum) => sum + scaled,
        None => scaled,
    });
    Ok(Some(value))
}

/// The TRUST objective of docs/method.md section 4 on one step's batch:
/// `total = src*L_src + tgt*L_tgt + self_train*L_self + ctr*L_ctr` over the terms
/// whose scale is not 0 (the others are not computed). Everything is validated first
/// ([`TrustBatch::validate`]; `tau` and `tau_base` must lie in [`TEMPERATURE_RANGE`]),
/// and a term that still comes out NaN or infinite is reported by name
/// ([`LossError::NonFiniteLoss`]) rather than returned.
pub fn trust_loss(
    inputs: &TrustBatch,
    terms: &LossTerms,
    tau: f64,
    tau_base: f64,
) -> Result<LossValues, LossError> {
    check_temperature("tau", tau)?;
    check_temperature("tau_base", tau_base)?;
    inputs.validate(terms)?;

    let mut total = None;
    let mut values = [None; 4];
    if terms.src != 0.0 {
        let loss = source_ce(
            need(&inputs.source_logits, "source_logits", "src")?,
            need(&inputs.source_labels, "source_labels", "src")?,
        );
        values[0] = add_term(&mut total, "src", terms.src, loss)?;
    }
    if terms.tgt != 0.0 {
        let loss = weighted_target_ce(
            need(&inputs.target_logits, "target_logits", "tgt")?,
            need(&inputs.pseudo_labels, "pseudo_labels", "tgt")?,
            need(&inputs.weights, "weights", "tgt")?,
        );
        values[1] = add_term(&mut total, "tgt", terms.tgt, loss)?;
    }
    if terms.self_train != 0.0 {
        let term = "self_train";
        let loss = self_training_ce(
            need(&inputs.target_strong_logits, "target_strong_logits", term)?,
            need(&inputs.target_logits, "target_logits", term)?,
            need(&inputs.weights, "weights", term)?,
        );
        values[2] = add_term(&mut total, term, terms.self_train, loss)?;
    }
    if terms.ctr != 0.0 {
        let features = contrastive_anchors(
            need(&inputs.source_features, "source_features", "ctr")?,
            need(&inputs.target_features, "target_features", "ctr")?,
            need(
                &inputs.source_features_strong,
                "source_features_strong",
                "ctr",
            )?,
            need(
                &inputs.target_features_strong,
                "target_features_strong",
                "ctr",
            )?,
        );
        let captions = Tensor::cat(
            &[
                need(
                    &inputs.source_caption_features,
                    "source_caption_features",
                    "ctr",
                )?,
                need(
                    &inputs.target_caption_features,
                    "target_caption_features",
                    "ctr",
                )?,
            ],
            0,
        );
        let loss = soft_contrastive(&features, &captions, tau, tau_base);
        values[3] = add_term(&mut total, "ctr", terms.ctr, loss)?;
    }
    let [src, tgt, self_train, ctr] = values;
    Ok(LossValues {
        total: total.ok_or(LossError::NoTerms)?,
        src,
        tgt,
        self_train,
        ctr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(rows: &[&[f32]]) -> Tensor {
        let cols = rows.first().map_or(0, |r| r.len()) as i64;
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).reshape([rows.len() as i64, cols])
    }

    fn value(t: &Tensor) -> f64 {
        t.double_value(&[])
    }

    fn full_batch() -> TrustBatch {
        let logits = || t2(&[&[1.0, 0.0, -1.0], &[0.5, 0.2, 0.1]]);
        let feats = || t2(&[&[1.0, 0.0], &[0.0, 1.0]]);
        TrustBatch {
            source_logits: Some(logits()),
            source_labels: Some(Tensor::from_slice(&[0i64, 2])),
            source_features: Some(feats()),
            source_features_strong: Some(feats()),
            source_caption_features: Some(t2(&[&[1.0, 0.0], &[0.0, 1.0]])),
            target_logits: Some(logits()),
            target_strong_logits: Some(logits()),
            pseudo_labels: Some(Tensor::from_slice(&[1i64, 1])),
            weights: Some(Tensor::from_slice(&[0.25f32, 0.75])),
            target_features: Some(feats()),
            target_features_strong: Some(feats()),
            target_caption_features: Some(t2(&[&[1.0, 1.0], &[0.0, 1.0]])),
        }
    }

    fn loss_err(batch: &TrustBatch, terms: &LossTerms) -> String {
        match trust_loss(batch, terms, DEFAULT_TAU, DEFAULT_TAU_BASE) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let logits = t2(&[&[0.0, 0.0], &[2.0, 0.0]]);
        let labels = Tensor::from_slice(&[0i64, 1]);
        let ce1 = std::f64::consts::LN_2;
        let ce2 = 2.0 + (1.0 + (-2.0f64).exp()).ln();
        assert!((value(&source_ce(&logits, &labels)) - (ce1 + ce2) / 2.0).abs() < 1e-6);
        let w = Tensor::from_slice(&[1.0f32, 0.5]);
        let got = value(&weighted_target_ce(&logits, &labels, &w));
        assert!((got - (ce1 + 0.5 * ce2) / 2.0).abs() < 1e-6);
        // labels from the weak view's argmax: row 0 ties -> class 0, row 1 -> class 0
        let got = value(&self_training_ce(&logits, &logits, &w));
        let ce2_as_0 = (1.0 + (-2.0f64).exp()).ln();
        assert!((got - (0.0 * ce1 + 0.5 * ce2_as_0) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn similarity_clamps_and_handles_zero_norm() {
        let z = t2(&[&[1.0, 0.0], &[-1.0, 0.0], &[0.0, 0.0], &[2.0, 0.0]]);
        let s = Vec::<Vec<f32>>::try_from(&caption_similarity(&z)).unwrap();
        assert_eq!(s[0], vec![1.0, 0.0, 0.0, 1.0]); // negative cosine clamps to 0
        assert_eq!(s[2], vec![0.0, 0.0, 1.0, 0.0]); // zero norm: 0 to others, 1 to itself
        assert_eq!(s[3][0], 1.0); // parallel: exactly 1
    }

    #[test]
    fn contrastive_matches_hand_computation_for_one_row_pair() {
        // two rows with orthogonal captions (S = 0 between them): for anchor a the only
        // positive is its other view, the negatives are the other row's two views.
        let feats = t2(&[&[1.0, 0.0], &[0.6, 0.8], &[0.8, 0.6], &[0.0, 1.0]]);
        let caps = t2(&[&[1.0, 0.0], &[0.0, 1.0]]);
        let tau = 0.5;
        let got = value(&soft_contrastive(&feats, &caps, tau, 0.25));
        let f = [[1.0f64, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]];
        let dot = |a: usize, b: usize| (f[a][0] * f[b][0] + f[a][1] * f[b][1]) / tau;
        let mut want = 0.0;
        for a in 0..4 {
            let other_view = (a + 2) % 4;
            let negs = [(a + 1) % 2, (a + 1) % 2 + 2];
            let log_z = negs.iter().map(|&k| dot(a, k).exp()).sum::<f64>().ln();
            want += -(tau / 0.25) * (dot(a, other_view) - log_z);
        }
        want /= 4.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn full_batch_computes_every_term() {
        let out = trust_loss(
            &full_batch(),
            &LossTerms::default(),
            DEFAULT_TAU,
            DEFAULT_TAU_BASE,
        )
        .unwrap();
        let sum = [out.src, out.tgt, out.self_train, out.ctr]
            .iter()
            .map(|v| v.unwrap())
            .sum::<f64>();
        assert!((value(&out.total) - sum).abs() < 1e-5);
    }

    #[test]
    fn validation_names_the_problem() {
        let terms = LossTerms::default();
        let mut b = full_batch();
        b.source_labels = Some(Tensor::from_slice(&[0i64, 3]));
        assert_eq!(
            loss_err(&b, &terms),
            "`source_labels`: label 3 at row 1 is outside [0, 3)"
        );
        let mut b = full_batch();
        b.pseudo_labels = Some(Tensor::from_slice(&[-1i64, 0]));
        assert!(loss_err(&b, &terms).contains("label -1 at row 0"));
        let mut b = full_batch();
        b.weights = Some(Tensor::from_slice(&[0.5f32, f32::NAN]));
        assert!(loss_err(&b, &terms).contains("NaN at row 1 is not a weight"));
        let mut b = full_batch();
        b.weights = Some(Tensor::from_slice(&[1.5f32, 0.0]));
        assert!(loss_err(&b, &terms).contains("1.5 at row 0"));
        let mut b = full_batch();
        b.weights = Some(Tensor::from_slice(&[0.5f32, 0.5, 0.5]));
        assert_eq!(
            loss_err(&b, &terms),
            "`weights` has 3 target rows but `target_logits` has 2"
        );
        let mut b = full_batch();
        b.target_strong_logits = Some(t2(&[&[1.0, 0.0], &[0.0, 1.0]]));
        assert!(loss_err(&b, &terms).contains("has 2 classes"));
        let mut b = full_batch();
        b.target_features = None;
        assert_eq!(
            loss_err(&b, &terms),
            "loss term `ctr` needs `target_features`, which the batch does not have"
        );
        let mut b = full_batch();
        b.source_logits = Some(t2(&[&[1.0, f32::INFINITY, 0.0], &[0.0, 0.0, 0.0]]));
        assert!(loss_err(&b, &terms).contains("1 NaN or infinite"));
        let mut b = full_batch();
        b.source_labels = Some(Tensor::from_slice(&[0.0f32, 1.0]));
        assert!(loss_err(&b, &terms).contains("must be an integer tensor"));
        let mut b = full_batch();
        b.source_logits = Some(Tensor::zeros([0, 3], (Kind::Float, Device::Cpu)));
        assert!(loss_err(&b, &terms).contains("empty batch"));
    }

    #[test]
    fn settings_are_checked() {
        let b = full_batch();
        let off = LossTerms {
            src: 0.0,
            tgt: 0.0,
            self_train: 0.0,
            ctr: 0.0,
        };
        assert!(matches!(
            trust_loss(&b, &off, 0.07, 0.07),
            Err(LossError::NoTerms)
        ));
        let negative = LossTerms {
            src: -1.0,
            ..LossTerms::default()
        };
        assert!(loss_err(&b, &negative).contains("scale of loss term `src`"));
        for tau in [0.0, -0.1, f64::NAN, f64::INFINITY, 1e-40] {
            assert!(trust_loss(&b, &LossTerms::default(), tau, 0.07).is_err());
            assert!(trust_loss(&b, &LossTerms::default(), 0.07, tau).is_err());
        }
    }

    #[test]
    fn converts_into_the_crate_error() {
        let e: trustflow_engine::error::Error = LossError::NoTerms.into();
        assert_eq!(
            e.to_string(),
            "stage `train`: every loss term is switched off: nothing to train"
        );
    }
}
