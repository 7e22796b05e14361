//! The `uncertainty` stage: the weight `w` of TRUST (docs/method.md section 3), how far to
//! trust each row's pseudo-label, from the CLIP embeddings of its image and caption.
//!
//! With unit vectors u_i (image) and v_j (caption) and the rows of one group,
//! `w_i = softmax_j(s * <u_i, v_j> / T)[j = i]`: the probability that image i picks its
//! own caption among the group's captions. Groups are explicit and deterministic: the
//! rows of the batch the stage receives, in stream order, `group_size` at a time; rows
//! this stage rejects belong to no group (like rows quarantined upstream, which never
//! reach it). The last group of a batch may be shorter (rows quarantined before it, or
//! a shard's end): its rows are then weighed against their own captions plus those of
//! the rows just before the group in the batch, so that every row picks among
//! `group_size` captions whenever its batch has that many rows, wherever it sits (the
//! reader folds a shard's short tail into the batch before it). The named alternatives: `method: clamped_cosine` (`max(0, <u_i, v_i>)`, no
//! grouping) and `method: class_max_cosine` (that cosine divided by the largest cosine
//! seen for the row's pseudo-label class on the source, from a `class_max` calibration
//! file; see [`super::class_max`]). The stage never switches methods on its own.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Builder};
use arrow::datatypes::{DataType, Field, Float32Type, Schema};
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::class_max::ClassMax;
use super::{Stage, StageConfig, StageOutput};
use crate::error::{Error, Result};

/// Output column: the weight `w` of each kept row (Float32).
pub const PSEUDO_WEIGHT: &str = "pseudo_weight";
/// Default input column: CLIP image embeddings, as written by `clip_score`.
pub const DEFAULT_IMAGE_EMBEDDING: &str = "clip_image_embedding";
/// Default input column: CLIP caption embeddings, as written by `clip_score`.
pub const DEFAULT_TEXT_EMBEDDING: &str = "clip_text_embedding";
/// Integer types accepted for `pseudo_label_column`.
const PSEUDO_LABEL_TYPES: [DataType; 4] = [
    DataType::Int64,
    DataType::Int32,
    DataType::UInt32,
    DataType::UInt64,
];
/// Largest `group_size` accepted: a guard against typos (the cost is quadratic).
pub const MAX_GROUP_SIZE: usize = 65_536;

/// How the weight is computed from the two embeddings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WeightMethod {
    /// TRUST's weight (docs/method.md section 3): the diagonal of the row-wise softmax of
    /// `logit_scale * cos(image_i, caption_j) / temperature` over the rows of a group.
    #[default]
    BatchSoftmax,
    /// `max(0, cos(image_i, caption_i))` of the row alone; ignores `group_size`,
    /// `temperature` and `logit_scale`.
    ClampedCosine,
    /// `max(0, cos(image_i, caption_i)) / class_max[pseudo_label_i]`, clipped to
    /// [0, 1]: the cosine relative to the best one seen for that class on the source
    /// (docs/method.md section 3's other normalisation). Needs `class_max`; ignores
    /// `group_size`, `temperature` and `logit_scale`.
    ClassMaxCosine,
}

/// Settings of the `uncertainty` stage. Every field is optional; the defaults are
/// those of [`Default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct UncertaintyConfig {
    /// Rows per softmax group (`batch_softmax`): consecutive kept rows of each batch, in
    /// stream order; the last group of a batch may be smaller, and a group of one row
    /// gets weight 1. `runtime.batch_size` must be a multiple of it. Default 32 (the
    /// paper's batch).
    #[schemars(range(min = 1, max = 65536))]
    pub group_size: usize,
    /// Softmax temperature T (`batch_softmax`). Default 3.0.
    pub temperature: f64,
    /// CLIP's logit scale s, the exponential of the model's learned value
    /// (`batch_softmax`). Default 100.0 (OpenAI CLIP).
    pub logit_scale: f64,
    /// How the weight is computed: `batch_softmax` (default, TRUST), `clamped_cosine`
    /// or `class_max_cosine`.
    pub method: WeightMethod,
    /// `class_max_cosine` only: the calibration file `trustflow calibrate-weights`
    /// wrote from the enriched source shards, relative to the pipeline file.
    pub class_max: Option<String>,
    /// `class_max_cosine` only: the integer column whose class picks the divisor.
    /// Default `pseudo_label`.
    pub pseudo_label_column: String,
    /// Input column of image embeddings (FixedSizeList<Float32, D>; normalised here).
    /// Default `clip_image_embedding`.
    pub image_embedding_column: String,
    /// Input column of caption embeddings (FixedSizeList<Float32, D>, the same D as the
    /// images; normalised here). Default `clip_text_embedding`.
    pub text_embedding_column: String,
}

impl Default for UncertaintyConfig {
    fn default() -> Self {
        Self {
            group_size: 32,
            temperature: 3.0,
            logit_scale: 100.0,
            method: WeightMethod::BatchSoftmax,
            class_max: None,
            pseudo_label_column: super::pseudo_label::PSEUDO_LABEL.to_string(),
            image_embedding_column: DEFAULT_IMAGE_EMBEDDING.to_string(),
            text_embedding_column: DEFAULT_TEXT_EMBEDDING.to_string(),
        }
    }
}

impl UncertaintyConfig {
    /// Rows per softmax group (the plan checks that `runtime.batch_size` is a multiple).
    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// Make `class_max` relative to `base` (the pipeline file's folder).
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        crate::models::files::resolve_against(base, [&mut self.class_max]);
    }
}

impl StageConfig for UncertaintyConfig {
    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, message: String| problems.push((field.into(), message));
        if !(1..=MAX_GROUP_SIZE).contains(&self.group_size) {
            problem(
                "group_size",
                format!(
                    "expected 1 to {MAX_GROUP_SIZE} rows, found {}",
                    self.group_size
                ),
            );
        }
        let (t, s) = (self.temperature, self.logit_scale);
        if !(t.is_finite() && t > 0.0) {
            problem(
                "temperature",
                format!("must be a finite number > 0, found {t:?}"),
            );
        }
        if !(s.is_finite() && s > 0.0) {
            problem(
                "logit_scale",
                format!("must be a finite number > 0, found {s:?}"),
            );
        } else if t.is_finite() && t > 0.0 && !(s / t).is_finite() {
            problem(
                "logit_scale",
                format!("logit_scale / temperature = {s:?} / {t:?} overflows"),
            );
        }
        for (field, column) in [
            ("image_embedding_column", &self.image_embedding_column),
            ("text_embedding_column", &self.text_embedding_column),
        ] {
            if column.trim().is_empty() {
                problem(
                    field,
                    "expected a column name, found an empty string".into(),
                );
            }
        }
        match (self.method, &self.class_max) {
            (WeightMethod::ClassMaxCosine, None) => problem(
                "class_max",
                "`method: class_max_cosine` needs the calibration file (write one with \
                 `trustflow calibrate-weights` over the enriched source shards)"
                    .into(),
            ),
            (WeightMethod::ClassMaxCosine, Some(_)) => {
                if self.pseudo_label_column.trim().is_empty() {
                    problem(
                        "pseudo_label_column",
                        "expected a column name, found an empty string".into(),
                    );
                }
            }
            (_, Some(_)) => problem(
                "class_max",
                "is only read by `method: class_max_cosine`; remove it or set that method".into(),
            ),
            (_, None) => {}
        }
        if !self.image_embedding_column.is_empty()
            && self.image_embedding_column == self.text_embedding_column
        {
            problem(
                "text_embedding_column",
                format!(
                    "is the same column as image_embedding_column (`{}`)",
                    self.text_embedding_column
                ),
            );
        }
        problems
    }

    fn build(&self, name: String, base: &std::path::Path) -> Result<Arc<dyn Stage>> {
        let mut config = self.clone();
        config.resolve_paths(base);
        Ok(Arc::new(UncertaintyStage::new(name, config)?))
    }

    /// Groups are cut from batches; partial groups mid-shard would make weights depend
    /// on where the batches happen to end.
    fn batch_multiple(&self) -> Option<usize> {
        Some(self.group_size()).filter(|&g| g > 0)
    }
}

/// The built `uncertainty` stage.
#[derive(Debug)]
pub struct UncertaintyStage {
    name: String,
    config: UncertaintyConfig,
    /// Loaded for `class_max_cosine`.
    class_max: Option<ClassMax>,
}

impl UncertaintyStage {
    /// Build the stage, loading the calibration file of `class_max_cosine`; the rest of
    /// the configuration is checked again on the first schema it sees.
    pub fn new(name: String, config: UncertaintyConfig) -> Result<Self> {
        let class_max = match (config.method, &config.class_max) {
            (WeightMethod::ClassMaxCosine, Some(path)) => Some(
                ClassMax::load(std::path::Path::new(path))
                    .map_err(|e| Error::stage(&name, format!("class_max: {e}")))?,
            ),
            _ => None,
        };
        Ok(Self {
            name,
            config,
            class_max,
        })
    }

    /// The embedding width D of `column`, which must be FixedSizeList<Float32, D>.
    fn dim(&self, input: &Schema, column: &str) -> Result<usize> {
        let field = input.field_with_name(column).map_err(|_| {
            let available: Vec<&str> = input.fields().iter().map(|f| f.name().as_str()).collect();
            Error::stage(
                &self.name,
                format!(
                    "needs input column `{column}`, which the stages before it do not provide \
                     (available: {})",
                    available.join(", ")
                ),
            )
        })?;
        match field.data_type() {
            DataType::FixedSizeList(inner, d) if *inner.data_type() == DataType::Float32 => {
                if *d > 0 {
                    Ok(*d as usize)
                } else {
                    Err(Error::stage(
                        &self.name,
                        format!("input column `{column}` has embeddings of width {d}"),
                    ))
                }
            }
            other => Err(Error::stage(
                &self.name,
                format!(
                    "input column `{column}` has type {other}, expected FixedSizeList<Float32, D> \
                     (an embedding per row)"
                ),
            )),
        }
    }

    /// The common width D of both embedding columns; also refuses a configuration that
    /// skipped validation (it could only give NaN weights).
    fn common_dim(&self, input: &Schema) -> Result<usize> {
        if let Some((field, message)) = self.config.validate().into_iter().next() {
            return Err(Error::stage(&self.name, format!("`{field}` {message}")));
        }
        let (image, text) = (
            &self.config.image_embedding_column,
            &self.config.text_embedding_column,
        );
        let (di, dt) = (self.dim(input, image)?, self.dim(input, text)?);
        if di != dt {
            return Err(Error::stage(
                &self.name,
                format!("embedding widths differ: `{image}` has {di}, `{text}` has {dt}"),
            ));
        }
        Ok(di)
    }

    /// `class_max_cosine`: each row's class in the calibration, or why it has none.
    #[allow(clippy::type_complexity)]
    fn pseudo_label_classes(
        &self,
        batch: &RecordBatch,
    ) -> Result<Option<Vec<std::result::Result<usize, String>>>> {
        let Some(calibration) = &self.class_max else {
            return Ok(None);
        };
        let name = &self.config.pseudo_label_column;
        let column = batch
            .column_by_name(name)
            .ok_or_else(|| Error::stage(&self.name, format!("batch lacks column `{name}`")))?;
        let column = arrow::compute::cast(column, &DataType::Int64)
            .map_err(|e| Error::stage(&self.name, format!("column `{name}`: {e}")))?;
        let column = column.as_primitive::<arrow::datatypes::Int64Type>();
        let n = calibration.classes();
        Ok(Some(
            (0..batch.num_rows())
                .map(|row| {
                    if column.is_null(row) {
                        return Err(format!("`{name}` is null"));
                    }
                    let v = column.value(row);
                    usize::try_from(v).ok().filter(|c| *c < n).ok_or_else(|| {
                        format!("`{name}` is {v}; the class_max calibration has classes 0..{n}")
                    })
                })
                .collect(),
        ))
    }

    fn column<'a>(&self, batch: &'a RecordBatch, column: &str) -> Result<&'a FixedSizeListArray> {
        batch
            .column_by_name(column)
            .and_then(|c| c.as_fixed_size_list_opt())
            .ok_or_else(|| Error::stage(&self.name, format!("batch lacks column `{column}`")))
    }
}

/// Row `row` of `list` as a unit vector in f64, or why it cannot be one.
fn unit_vector(list: &FixedSizeListArray, column: &str, row: usize) -> Result<Vec<f64>, String> {
    if list.is_null(row) {
        return Err(format!("embedding `{column}` is null"));
    }
    let values = list.values().as_primitive::<Float32Type>();
    let start = list.value_offset(row) as usize;
    let d = list.value_length() as usize;
    let mut v = Vec::with_capacity(d);
    for k in 0..d {
        if values.is_null(start + k) {
            return Err(format!(
                "embedding `{column}` has a null entry at index {k}"
            ));
        }
        let x = values.value(start + k);
        if !x.is_finite() {
            return Err(format!(
                "embedding `{column}` has a non-finite entry ({x}) at index {k}"
            ));
        }
        v.push(f64::from(x));
    }
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        return Err(format!(
            "embedding `{column}` is the zero vector and cannot be normalised"
        ));
    }
    v.iter_mut().for_each(|x| *x /= norm);
    Ok(v)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `softmax_j(scale * <u_i, v_j>)[i]` for every row i of one group, by log-sum-exp.
pub fn group_weights(images: &[Vec<f64>], texts: &[Vec<f64>], scale: f64) -> Vec<f64> {
    weights_among(images, texts, 0, scale)
}

/// `softmax_j(scale * <u_i, v_j>)[first_own + i]` for every image i: each image picks
/// its own caption (`texts[first_own + i]`) among all of `texts`.
fn weights_among(images: &[Vec<f64>], texts: &[Vec<f64>], first_own: usize, scale: f64) -> Vec<f64> {
    let mut logits = vec![0.0; texts.len()];
    images
        .iter()
        .enumerate()
        .map(|(i, u)| {
            for (l, v) in logits.iter_mut().zip(texts) {
                *l = scale * dot(u, v);
            }
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            (logits[first_own + i] - max - sum.ln()).exp().min(1.0)
        })
        .collect()
}

/// The weights of `us`/`vs` (a batch's kept rows, in order) in groups of `g`. A short
/// last group also takes, as extra captions to pick among, those of the rows just
/// before it, up to `g` captions in all.
fn batch_softmax(us: &[Vec<f64>], vs: &[Vec<f64>], g: usize, scale: f64) -> Vec<f64> {
    let mut weights = Vec::with_capacity(us.len());
    for start in (0..us.len()).step_by(g.max(1)) {
        let end = (start + g).min(us.len());
        let from = end.saturating_sub(g).min(start);
        weights.extend(weights_among(&us[start..end], &vs[from..end], start - from, scale));
    }
    weights
}

impl Stage for UncertaintyStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn output_fields(&self, input: &Schema) -> Result<Vec<Field>> {
        self.common_dim(input)?;
        if self.config.method == WeightMethod::ClassMaxCosine {
            super::require_column(
                &self.name,
                input,
                &self.config.pseudo_label_column,
                &PSEUDO_LABEL_TYPES,
            )?;
        }
        Ok(vec![Field::new(PSEUDO_WEIGHT, DataType::Float32, true)])
    }

    fn process(&self, batch: &RecordBatch) -> Result<StageOutput> {
        self.common_dim(&batch.schema())?;
        let (image_col, text_col) = (
            &self.config.image_embedding_column,
            &self.config.text_embedding_column,
        );
        let (images, texts) = (
            self.column(batch, image_col)?,
            self.column(batch, text_col)?,
        );
        let rows = batch.num_rows();
        let classes = self.pseudo_label_classes(batch)?;
        // Kept rows in order, with their unit vectors (and class); the others are rejected.
        let mut kept = Vec::with_capacity(rows);
        let (mut us, mut vs) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        let mut kept_classes = Vec::new();
        let mut rejected = Vec::new();
        for row in 0..rows {
            let u = unit_vector(images, image_col, row);
            let v = unit_vector(texts, text_col, row);
            let class = classes.as_ref().map(|c| c[row].clone()).transpose();
            match (u, v, class) {
                (Ok(u), Ok(v), Ok(class)) => {
                    kept.push(row);
                    us.push(u);
                    vs.push(v);
                    kept_classes.extend(class);
                }
                (u, v, class) => {
                    let reasons: Vec<String> = [u.err(), v.err(), class.err()]
                        .into_iter()
                        .flatten()
                        .collect();
                    rejected.push((row, reasons.join("; ")));
                }
            }
        }
        let weights: Vec<f64> = match self.config.method {
            WeightMethod::BatchSoftmax => {
                let scale = self.config.logit_scale / self.config.temperature;
                batch_softmax(&us, &vs, self.config.group_size.max(1), scale)
            }
            WeightMethod::ClampedCosine => us
                .iter()
                .zip(&vs)
                .map(|(u, v)| dot(u, v).clamp(0.0, 1.0))
                .collect(),
            WeightMethod::ClassMaxCosine => {
                let calibration = self.class_max.as_ref().ok_or_else(|| {
                    Error::stage(&self.name, "`class_max_cosine` without a calibration")
                })?;
                us.iter()
                    .zip(&vs)
                    .zip(&kept_classes)
                    .map(|((u, v), &c)| calibration.weight(dot(u, v), c).unwrap_or(0.0))
                    .collect()
            }
        };
        let mut out = Float32Builder::with_capacity(rows);
        let mut next = kept.iter().zip(&weights).peekable();
        for row in 0..rows {
            match next.next_if(|(k, _)| **k == row) {
                Some((_, w)) => out.append_value(*w as f32),
                None => out.append_null(),
            }
        }
        Ok(StageOutput {
            columns: vec![Arc::new(out.finish()) as ArrayRef],
            rejected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::{StageKind, StageSpec};
    use proptest::prelude::*;

    fn list(rows: &[Option<Vec<f32>>], d: i32) -> ArrayRef {
        Arc::new(
            FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
                rows.iter().map(|r| {
                    r.as_ref()
                        .map(|v| v.iter().map(|x| Some(*x)).collect::<Vec<_>>())
                }),
                d,
            ),
        )
    }

    fn batch(images: &[Option<Vec<f32>>], texts: &[Option<Vec<f32>>], d: i32) -> RecordBatch {
        let (i, t) = (list(images, d), list(texts, d));
        let schema = Schema::new(vec![
            Field::new(DEFAULT_IMAGE_EMBEDDING, i.data_type().clone(), true),
            Field::new(DEFAULT_TEXT_EMBEDDING, t.data_type().clone(), true),
        ]);
        RecordBatch::try_new(Arc::new(schema), vec![i, t]).unwrap()
    }

    fn stage(config: UncertaintyConfig) -> UncertaintyStage {
        UncertaintyStage::new("uncertainty".into(), config).unwrap()
    }

    fn weights(output: &StageOutput) -> Vec<Option<f32>> {
        let w = output.columns[0].as_primitive::<Float32Type>();
        (0..w.len())
            .map(|i| w.is_valid(i).then(|| w.value(i)))
            .collect()
    }

    #[test]
    fn two_rows_match_the_closed_form() {
        // Unit vectors along the axes: <u0,v0> = 1, <u0,v1> = 0, <u1,v0> = 0.6, <u1,v1> = 0.8.
        let images = [Some(vec![2.0, 0.0]), Some(vec![0.6, 0.8])];
        let texts = [Some(vec![5.0, 0.0]), Some(vec![0.0, 0.5])];
        let output = stage(UncertaintyConfig::default())
            .process(&batch(&images, &texts, 2))
            .unwrap();
        let k = 100.0 / 3.0;
        let w0 = 1.0 / (1.0 + (-k * 1.0f64).exp());
        let w1 = 1.0 / (1.0 + (k * (0.6 - 0.8f64)).exp());
        let got = weights(&output);
        assert!((f64::from(got[0].unwrap()) - w0).abs() < 1e-7, "{got:?}");
        assert!((f64::from(got[1].unwrap()) - w1).abs() < 1e-7, "{got:?}");
        assert!(output.rejected.is_empty());
    }

    #[test]
    fn groups_are_consecutive_kept_rows_and_a_group_of_one_weighs_one() {
        let e = |a: f32, b: f32| Some(vec![a, b]);
        // Five rows, group_size 2: row 1 is rejected, so the groups are {0, 2}, {3, 4}.
        let images = [
            e(1.0, 0.0),
            e(0.0, 0.0),
            e(0.0, 1.0),
            e(1.0, 0.2),
            e(0.3, 1.0),
        ];
        let texts = [
            e(1.0, 0.1),
            e(1.0, 0.0),
            e(0.1, 1.0),
            e(1.0, 0.0),
            e(0.0, 1.0),
        ];
        let config = UncertaintyConfig {
            group_size: 2,
            ..UncertaintyConfig::default()
        };
        let out = stage(config.clone())
            .process(&batch(&images, &texts, 2))
            .unwrap();
        let got = weights(&out);
        assert_eq!(got[1], None);
        assert_eq!(
            out.rejected,
            vec![(
                1,
                "embedding `clip_image_embedding` is the zero vector and cannot be normalised"
                    .to_string()
            )]
        );
        // The same rows without row 1 give the same weights.
        let keep = |v: &[Option<Vec<f32>>]| [0, 2, 3, 4].map(|i| v[i].clone());
        let alone = stage(config.clone())
            .process(&batch(&keep(&images), &keep(&texts), 2))
            .unwrap();
        let expected: Vec<_> = weights(&alone);
        assert_eq!([got[0], got[2], got[3], got[4]].to_vec(), expected);
    }

    #[test]
    fn a_short_last_group_picks_among_group_size_captions() {
        let e = |a: f32, b: f32| Some(vec![a, b]);
        // Three rows, group_size 2: groups {0, 1} and {2}. Row 2 is not left alone
        // (which would give it w = 1): it picks its caption among its own and row 1's.
        let images = [e(1.0, 0.0), e(0.6, 0.8), e(0.8, 0.6)];
        let texts = [e(1.0, 0.0), e(0.0, 1.0), e(1.0, 0.0)];
        let config = UncertaintyConfig {
            group_size: 2,
            ..UncertaintyConfig::default()
        };
        let got = weights(&stage(config).process(&batch(&images, &texts, 2)).unwrap());
        let k = 100.0 / 3.0;
        // <u2, v2> = 0.8, <u2, v1> = 0.6.
        let w2 = 1.0 / (1.0 + (k * (0.6 - 0.8f64)).exp());
        assert!((f64::from(got[2].unwrap()) - w2).abs() < 1e-6, "{got:?}");
        // The full group is weighed as before.
        let w0 = 1.0 / (1.0 + (k * (0.0 - 1.0f64)).exp());
        assert!((f64::from(got[0].unwrap()) - w0).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn huge_logit_scale_is_stable() {
        let e = |a: f32, b: f32| Some(vec![a, b]);
        let images = [e(1.0, 0.0), e(1.0, 0.1), e(1.0, 1.0), e(1.0, 0.0)];
        let texts = [e(1.0, 0.0), e(0.0, 1.0), e(-1.0, 0.0), e(2.0, 0.0)];
        let config = UncertaintyConfig {
            logit_scale: 1e300,
            temperature: 1e-9,
            ..UncertaintyConfig::default()
        };
        assert_eq!(
            config.validate(),
            vec![(
                "logit_scale".to_string(),
                "logit_scale / temperature = 1e300 / 1e-9 overflows".to_string()
            )]
        );
        let config = UncertaintyConfig {
            logit_scale: 1e300,
            ..UncertaintyConfig::default()
        };
        assert!(config.validate().is_empty());
        let got = weights(&stage(config).process(&batch(&images, &texts, 2)).unwrap());
        // Rows 0 and 3 have the same caption, the best for both; rows 1 and 2 prefer it
        // to their own. Naive exp() would overflow to inf / inf = NaN.
        assert_eq!(got, vec![Some(0.5), Some(0.0), Some(0.0), Some(0.5)]);
    }

    #[test]
    fn clamped_cosine_ignores_the_group() {
        let images = [
            Some(vec![3.0, 4.0]),
            Some(vec![1.0, 0.0]),
            Some(vec![1.0, 1.0]),
        ];
        let texts = [
            Some(vec![6.0, 8.0]),
            Some(vec![-1.0, 0.1]),
            Some(vec![0.0, 2.0]),
        ];
        let config = UncertaintyConfig {
            method: WeightMethod::ClampedCosine,
            group_size: 1,
            ..UncertaintyConfig::default()
        };
        let got = weights(&stage(config).process(&batch(&images, &texts, 2)).unwrap());
        assert_eq!(got[0], Some(1.0));
        assert_eq!(got[1], Some(0.0));
        assert!((got[2].unwrap() - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7);
    }

    #[test]
    fn bad_embeddings_are_rejected_with_reasons() {
        let good = Some(vec![1.0, 0.0]);
        let images = [
            good.clone(),
            None,
            Some(vec![f32::NAN, 0.0]),
            good.clone(),
            None,
        ];
        let texts = [
            good.clone(),
            good.clone(),
            good.clone(),
            Some(vec![0.0, f32::INFINITY]),
            None,
        ];
        let out = stage(UncertaintyConfig::default())
            .process(&batch(&images, &texts, 2))
            .unwrap();
        let reasons: Vec<(usize, &str)> =
            out.rejected.iter().map(|(i, r)| (*i, r.as_str())).collect();
        assert_eq!(
            reasons,
            vec![
                (1, "embedding `clip_image_embedding` is null"),
                (
                    2,
                    "embedding `clip_image_embedding` has a non-finite entry (NaN) at index 0"
                ),
                (
                    3,
                    "embedding `clip_text_embedding` has a non-finite entry (inf) at index 1"
                ),
                (
                    4,
                    "embedding `clip_image_embedding` is null; embedding `clip_text_embedding` is null"
                ),
            ]
        );
        assert_eq!(weights(&out), vec![Some(1.0), None, None, None, None]);
    }

    #[test]
    fn output_fields_check_both_columns() {
        let s = stage(UncertaintyConfig::default());
        let emb = |d| DataType::new_fixed_size_list(DataType::Float32, d, true);
        let schema = |a: DataType, b: DataType| {
            Schema::new(vec![
                Field::new(DEFAULT_IMAGE_EMBEDDING, a, true),
                Field::new(DEFAULT_TEXT_EMBEDDING, b, true),
            ])
        };
        let fields = s.output_fields(&schema(emb(4), emb(4))).unwrap();
        assert_eq!(
            fields,
            vec![Field::new(PSEUDO_WEIGHT, DataType::Float32, true)]
        );
        let err = s
            .output_fields(&schema(emb(4), emb(8)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`clip_image_embedding` has 4, `clip_text_embedding` has 8"),
            "{err}"
        );
        let f64_list = DataType::new_fixed_size_list(DataType::Float64, 4, true);
        let err = s
            .output_fields(&schema(emb(4), f64_list))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`clip_text_embedding` has type FixedSizeList"),
            "{err}"
        );
        let only = Schema::new(vec![Field::new("caption", DataType::Utf8, true)]);
        let err = s.output_fields(&only).unwrap_err().to_string();
        assert!(
            err.contains("stage `uncertainty`") && err.contains("`clip_image_embedding`"),
            "{err}"
        );
    }

    #[test]
    fn an_unvalidated_config_fails_before_any_row() {
        let bad = stage(UncertaintyConfig {
            temperature: f64::NAN,
            ..UncertaintyConfig::default()
        });
        let b = batch(&[Some(vec![1.0])], &[Some(vec![1.0])], 1);
        for err in [
            bad.output_fields(&b.schema()).unwrap_err(),
            bad.process(&b).unwrap_err(),
        ] {
            assert_eq!(
                err.to_string(),
                "stage `uncertainty`: `temperature` must be a finite number > 0, found NaN"
            );
        }
    }

    #[test]
    fn empty_batch_gives_an_empty_column() {
        let out = stage(UncertaintyConfig::default())
            .process(&batch(&[], &[], 3))
            .unwrap();
        assert!(out.columns[0].is_empty() && out.rejected.is_empty());
    }

    #[test]
    fn config_defaults_serde_and_stage_spec() {
        let parsed: UncertaintyConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, UncertaintyConfig::default());
        assert_eq!(parsed.group_size(), 32);
        assert_eq!((parsed.temperature, parsed.logit_scale), (3.0, 100.0));
        assert_eq!(parsed.method, WeightMethod::BatchSoftmax);
        let parsed: UncertaintyConfig =
            serde_json::from_str(r#"{"method": "clamped_cosine", "group_size": 8}"#).unwrap();
        assert_eq!(
            (parsed.method, parsed.group_size),
            (WeightMethod::ClampedCosine, 8)
        );
        assert!(serde_json::from_str::<UncertaintyConfig>(r#"{"temperture": 2}"#).is_err());
        assert!(serde_json::from_str::<UncertaintyConfig>(r#"{"method": "cosine"}"#).is_err());
        let spec: StageSpec =
            serde_json::from_str(r#"{"type": "uncertainty", "temperature": 2.0}"#).unwrap();
        let StageKind::Uncertainty(config) = &spec.kind else {
            panic!("{spec:?}")
        };
        assert_eq!(config.temperature, 2.0);
        assert_eq!(spec.kind.type_name(), "uncertainty");
        assert_eq!(
            spec.build(std::path::Path::new(".")).unwrap().name(),
            "uncertainty"
        );
    }

    #[test]
    fn schema_describes_every_field() {
        let schema = serde_json::to_value(schemars::schema_for!(UncertaintyConfig)).unwrap();
        let fields = [
            "group_size",
            "temperature",
            "logit_scale",
            "method",
            "image_embedding_column",
            "text_embedding_column",
        ];
        for field in fields {
            let description = schema["properties"][field]["description"].as_str();
            assert!(description.is_some_and(|d| !d.is_empty()), "{field}");
        }
    }

    #[test]
    fn validate_reports_problems() {
        assert!(UncertaintyConfig::default().validate().is_empty());
        let bad = UncertaintyConfig {
            group_size: 0,
            temperature: 0.0,
            logit_scale: f64::NAN,
            image_embedding_column: "e".into(),
            text_embedding_column: "e".into(),
            ..UncertaintyConfig::default()
        };
        let fields: Vec<_> = bad.validate().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "group_size",
                "temperature",
                "logit_scale",
                "text_embedding_column"
            ]
        );
        let bad = UncertaintyConfig {
            temperature: f64::INFINITY,
            logit_scale: -1.0,
            image_embedding_column: " ".into(),
            ..UncertaintyConfig::default()
        };
        assert_eq!(
            bad.validate(),
            vec![
                (
                    "temperature".into(),
                    "must be a finite number > 0, found inf".into()
                ),
                (
                    "logit_scale".into(),
                    "must be a finite number > 0, found -1.0".into()
                ),
                (
                    "image_embedding_column".into(),
                    "expected a column name, found an empty string".into()
                ),
            ]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Weights are finite and in [0, 1], permuting a group permutes its weights, and
        /// rescaling an embedding changes nothing.
        #[test]
        fn weights_are_bounded_equivariant_and_scale_free(
            rows in proptest::collection::vec(
                (proptest::collection::vec(-1e3f32..1e3, 3), proptest::collection::vec(-1e3f32..1e3, 3)),
                1..12,
            ),
            scale_exp in -20i32..20,
            logit_scale in 1.0f64..1e5,
        ) {
            let config = UncertaintyConfig { group_size: 4, logit_scale, ..UncertaintyConfig::default() };
            let images: Vec<_> = rows.iter().map(|r| Some(r.0.clone())).collect();
            let texts: Vec<_> = rows.iter().map(|r| Some(r.1.clone())).collect();
            let out = stage(config.clone()).process(&batch(&images, &texts, 3)).unwrap();
            let w = weights(&out);
            for (row, weight) in w.iter().enumerate() {
                let zero = rows[row].0.iter().all(|x| *x == 0.0) || rows[row].1.iter().all(|x| *x == 0.0);
                prop_assert_eq!(weight.is_none(), zero);
                if let Some(x) = weight {
                    prop_assert!(x.is_finite() && (0.0..=1.0).contains(x));
                }
            }
            if out.rejected.is_empty() {
                // A power of two: rescaling is exact in f32.
                let scale = 2f32.powi(scale_exp);
                let scaled = |v: &[Option<Vec<f32>>]| -> Vec<_> {
                    v.iter().map(|r| r.as_ref().map(|x| x.iter().map(|a| a * scale).collect())).collect()
                };
                let again = weights(&stage(config.clone()).process(&batch(&scaled(&images), &texts, 3)).unwrap());
                for (a, b) in w.iter().zip(&again) {
                    prop_assert!((a.unwrap() - b.unwrap()).abs() < 1e-6);
                }
                // Reverse the first group.
                let n = rows.len().min(4);
                let rev = |v: &[Option<Vec<f32>>]| -> Vec<_> {
                    let mut v = v.to_vec();
                    v[..n].reverse();
                    v
                };
                let back = weights(&stage(config).process(&batch(&rev(&images), &rev(&texts), 3)).unwrap());
                for i in 0..n {
                    prop_assert!((w[i].unwrap() - back[n - 1 - i].unwrap()).abs() < 1e-6);
                }
            }
        }
    }
}
