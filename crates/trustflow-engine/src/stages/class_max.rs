//! Source calibration for the `uncertainty` stage's `class_max_cosine` weights: the
//! largest image-caption cosine seen for each class on the labelled **source** domain
//! (docs/method.md section 3 names "the cosine divided by the largest cosine seen for that
//! class on the source" as an alternative to the batch softmax).
//!
//! Why it exists: the batch-softmax weight is only as wide as the CLIP model's logit
//! scale allows. A small CLIP trained here learned s = 22.3 (OpenAI's is 100), and its
//! weights all fall below about 0.2, so the weighted pseudo-label loss keeps a
//! sixteenth of its signal. Dividing by a per-class source maximum keeps the ranking of
//! the cosine and puts the weights on [0, 1] whatever the scale.
//!
//! `trustflow calibrate-weights` reads shards that `clip_score` has enriched (their
//! `clip_similarity` and `label` columns) and writes the JSON file this module loads.

use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The calibration file: per class, the largest cosine of a source row of that class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassMax {
    /// `class_max_cosine[c]`: the largest `similarity_column` value over source rows
    /// whose `label_column` is c; each is > 0.
    pub class_max_cosine: Vec<f64>,
    /// Source rows seen per class.
    pub rows_per_class: Vec<u64>,
    /// Rows skipped because their label or similarity was null.
    pub rows_skipped_null: u64,
    pub label_column: String,
    pub similarity_column: String,
    /// The shards read.
    pub source: Vec<PathBuf>,
}

impl ClassMax {
    pub fn classes(&self) -> usize {
        self.class_max_cosine.len()
    }

    /// Loads and checks a calibration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::input(
                path,
                "no calibration file here; write it with `trustflow calibrate-weights \
                 ENRICHED_SOURCE_SHARDS --classes C --out FILE` first",
            ),
            _ => Error::io(path, e),
        })?;
        let parsed: ClassMax = serde_json::from_str(&text).map_err(|e| {
            Error::input(
                path,
                format!(
                    "not a class-max calibration file (write one with `trustflow \
                     calibrate-weights`): {e}"
                ),
            )
        })?;
        parsed.check().map_err(|m| Error::input(path, m))?;
        Ok(parsed)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.class_max_cosine.len() < 2 {
            return Err(format!(
                "`class_max_cosine` needs 2 or more classes, found {}",
                self.class_max_cosine.len()
            ));
        }
        if let Some((c, v)) = self
            .class_max_cosine
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v > 0.0 && **v <= 1.0 + 1e-6))
        {
            return Err(format!(
                "`class_max_cosine[{c}]` is {v}; each must lie in (0, 1] (a class whose best \
                 source pair has cosine <= 0 cannot normalise anything)"
            ));
        }
        Ok(())
    }

    /// `max(0, cos) / class_max_cosine[class]`, clipped to [0, 1]; `None` when `class`
    /// is not a calibrated class.
    pub fn weight(&self, cosine: f64, class: usize) -> Option<f64> {
        let max = *self.class_max_cosine.get(class)?;
        Some((cosine.max(0.0) / max).clamp(0.0, 1.0))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Internal(format!("cannot serialise the calibration: {e}")))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }
}

/// Reads `label_column` (integers in `0..classes`) and `similarity_column` (floats)
/// from `shards` and takes the per-class maximum. Every class needs at least one row
/// with a positive cosine; errors name the shard, row and column.
pub fn calibrate(
    shards: &[PathBuf],
    label_column: &str,
    similarity_column: &str,
    classes: usize,
) -> Result<ClassMax> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    if shards.is_empty() {
        return Err(Error::Invalid(
            "calibrate-weights: no source shards to read".into(),
        ));
    }
    if classes < 2 {
        return Err(Error::Invalid(format!(
            "calibrate-weights: needs 2 or more classes, got {classes}"
        )));
    }
    let mut max = vec![f64::NEG_INFINITY; classes];
    let mut rows_per_class = vec![0u64; classes];
    let mut rows_skipped_null = 0u64;
    for path in shards {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::input(path, format!("not a Parquet file: {e}")))?;
        for (column, what) in [
            (label_column, "the class labels"),
            (
                similarity_column,
                "the image-caption cosine (run `clip_score` first)",
            ),
        ] {
            if builder.schema().field_with_name(column).is_err() {
                return Err(Error::input(path, format!("no column `{column}` ({what})")));
            }
        }
        let mask =
            ProjectionMask::columns(builder.parquet_schema(), [label_column, similarity_column]);
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(|e| Error::input(path, format!("cannot read: {e}")))?;
        let mut row_base = 0usize;
        for batch in reader {
            let batch = batch.map_err(|e| Error::input(path, format!("cannot read: {e}")))?;
            let as_type = |name: &str, to: &DataType| {
                let column = batch
                    .column_by_name(name)
                    .ok_or_else(|| Error::input(path, format!("no column `{name}`")))?;
                arrow::compute::cast(column, to).map_err(|e| {
                    Error::input(
                        path,
                        format!("column `{name}` has type {}: {e}", column.data_type()),
                    )
                })
            };
            let labels = as_type(label_column, &DataType::Int64)?;
            let labels = labels.as_primitive::<Int64Type>();
            let cosines = as_type(similarity_column, &DataType::Float64)?;
            let cosines = cosines.as_primitive::<Float64Type>();
            for row in 0..batch.num_rows() {
                if labels.is_null(row) || cosines.is_null(row) {
                    rows_skipped_null += 1;
                    continue;
                }
                let (label, cosine) = (labels.value(row), cosines.value(row));
                let at = || format!("row {}", row_base + row);
                let class = usize::try_from(label)
                    .ok()
                    .filter(|c| *c < classes)
                    .ok_or_else(|| {
                        Error::input(
                            path,
                            format!(
                                "{}: `{label_column}` is {label}, expected 0..{classes}",
                                at()
                            ),
                        )
                    })?;
                if !cosine.is_finite() {
                    return Err(Error::input(
                        path,
                        format!("{}: `{similarity_column}` is {cosine}", at()),
                    ));
                }
                rows_per_class[class] += 1;
                max[class] = max[class].max(cosine);
            }
            row_base += batch.num_rows();
        }
    }
    let calibration = ClassMax {
        class_max_cosine: max,
        rows_per_class,
        rows_skipped_null,
        label_column: label_column.into(),
        similarity_column: similarity_column.into(),
        source: shards.to_vec(),
    };
    if let Some(c) = calibration.rows_per_class.iter().position(|n| *n == 0) {
        return Err(Error::Invalid(format!(
            "calibrate-weights: no source row of class {c} (`{label_column}` = {c}); every \
             class needs one to normalise its weights"
        )));
    }
    calibration
        .check()
        .map_err(|m| Error::Invalid(format!("calibrate-weights: {m}")))?;
    Ok(calibration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calibration(max: Vec<f64>) -> ClassMax {
        ClassMax {
            rows_per_class: vec![1; max.len()],
            class_max_cosine: max,
            rows_skipped_null: 0,
            label_column: "label".into(),
            similarity_column: "clip_similarity".into(),
            source: Vec::new(),
        }
    }

    #[test]
    fn weights_divide_by_the_class_maximum_and_stay_in_the_unit_interval() {
        let c = calibration(vec![0.25, 0.5]);
        assert_eq!(c.weight(0.125, 0), Some(0.5));
        assert_eq!(c.weight(0.125, 1), Some(0.25));
        // Above the source maximum: 1; negative cosine: 0; unknown class: none.
        assert_eq!(c.weight(0.3, 0), Some(1.0));
        assert_eq!(c.weight(-0.2, 1), Some(0.0));
        assert_eq!(c.weight(0.1, 2), None);
    }

    #[test]
    fn a_class_whose_maximum_is_not_positive_is_refused() {
        assert!(calibration(vec![0.3, 0.0]).check().is_err());
        assert!(calibration(vec![0.3, f64::NAN]).check().is_err());
        assert!(calibration(vec![0.3]).check().is_err());
        assert!(calibration(vec![0.3, 0.2]).check().is_ok());
    }
}
