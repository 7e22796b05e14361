//! The numbers every run reports (docs/method.md section 6): top-1 accuracy overall
//! and per class, and how well the CLIP weight w separates right from wrong
//! pseudo-labels (AUROC of w, mean w of each group).
//!
//! `auroc` (in the engine's `stats`) matches scikit-learn's `roc_auc_score` (ties
//! included); the golden values in tests/fixtures/metrics/ come from scikit-learn
//! itself (scripts/fixtures/auroc.py).
//! Values that cannot be measured (an empty class, mismatched inputs, NaN scores) are
//! `None` rather than NaN or a panic, so a report always serialises to valid JSON.

use serde::{Deserialize, Serialize};

/// Kept here too so the trainer's callers keep one import; it lives in the engine,
/// whose run report uses it as well.
pub use trustflow_engine::stats::auroc;

/// How well the weights w separate right pseudo-labels from wrong ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightSeparation {
    /// AUROC of w for right (positive) vs wrong pseudo-labels; `None` when either group
    /// is empty or a weight is NaN.
    pub auroc: Option<f64>,
    /// Mean w over rows with a right pseudo-label; `None` when there are none.
    pub mean_weight_right: Option<f64>,
    /// Mean w over rows with a wrong pseudo-label; `None` when there are none.
    pub mean_weight_wrong: Option<f64>,
    /// Rows whose pseudo-label equals the label.
    pub right: usize,
    /// Rows whose pseudo-label differs from the label.
    pub wrong: usize,
}

/// Separation of right (`pseudo_label == label`) and wrong pseudo-labels by `weights`
/// (docs/method.md section 6).
///
/// The three slices are parallel, one entry per target row. When their lengths differ
/// the rows cannot be paired, so nothing is measured: every field is `None` and both
/// counts are 0 (a caller bug shows up as a missing number, not as a wrong one).
pub fn weight_separation(
    weights: &[f64],
    pseudo_labels: &[i64],
    labels: &[i64],
) -> WeightSeparation {
    if weights.len() != pseudo_labels.len() || weights.len() != labels.len() {
        return WeightSeparation {
            auroc: None,
            mean_weight_right: None,
            mean_weight_wrong: None,
            right: 0,
            wrong: 0,
        };
    }
    let right: Vec<bool> = pseudo_labels
        .iter()
        .zip(labels)
        .map(|(p, l)| p == l)
        .collect();
    let (mut sum_right, mut sum_wrong, mut n_right, mut n_wrong) = (0.0, 0.0, 0usize, 0usize);
    for (&w, &ok) in weights.iter().zip(&right) {
        if ok {
            sum_right += w;
            n_right += 1;
        } else {
            sum_wrong += w;
            n_wrong += 1;
        }
    }
    let mean = |sum: f64, n: usize| (n > 0).then(|| sum / n as f64);
    WeightSeparation {
        auroc: auroc(weights, &right),
        mean_weight_right: mean(sum_right, n_right),
        mean_weight_wrong: mean(sum_wrong, n_wrong),
        right: n_right,
        wrong: n_wrong,
    }
}

/// Top-1 accuracy overall and per class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassAccuracy {
    /// Share of rows whose prediction equals the label; `None` with no rows.
    pub accuracy: Option<f64>,
    /// For each class k in `0..classes`: share of rows labelled k that are predicted k
    /// (the class's recall); `None` where no row is labelled k.
    pub per_class: Vec<Option<f64>>,
    /// Rows measured.
    pub rows: usize,
}

/// Top-1 accuracy of `predictions` against `labels` over `classes` classes.
///
/// Rows whose label lies outside `0..classes` count towards the overall accuracy (as in
/// scikit-learn's `accuracy_score`) but belong to no class. When the lengths differ the
/// rows cannot be paired: `rows` is 0, `accuracy` and every per-class entry `None`.
pub fn accuracy(predictions: &[i64], labels: &[i64], classes: usize) -> ClassAccuracy {
    if predictions.len() != labels.len() {
        return ClassAccuracy {
            accuracy: None,
            per_class: vec![None; classes],
            rows: 0,
        };
    }
    let (mut correct, mut class_rows, mut class_correct) =
        (0usize, vec![0usize; classes], vec![0usize; classes]);
    for (&p, &l) in predictions.iter().zip(labels) {
        let ok = p == l;
        correct += usize::from(ok);
        if let Some(k) = usize::try_from(l).ok().filter(|k| *k < classes) {
            class_rows[k] += 1;
            class_correct[k] += usize::from(ok);
        }
    }
    let share = |hit: usize, n: usize| (n > 0).then(|| hit as f64 / n as f64);
    ClassAccuracy {
        accuracy: share(correct, labels.len()),
        per_class: class_correct
            .iter()
            .zip(&class_rows)
            .map(|(&hit, &n)| share(hit, n))
            .collect(),
        rows: labels.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separation_and_accuracy() {
        let s = weight_separation(&[0.9, 0.8, 0.2, 0.4], &[1, 2, 0, 3], &[1, 2, 1, 1]);
        assert_eq!(s.right, 2);
        assert_eq!(s.wrong, 2);
        assert_eq!(s.auroc, Some(1.0));
        assert!((s.mean_weight_right.unwrap() - 0.85).abs() < 1e-12);
        assert!((s.mean_weight_wrong.unwrap() - 0.3).abs() < 1e-12);
        let all_right = weight_separation(&[0.5], &[1], &[1]);
        assert_eq!((all_right.auroc, all_right.mean_weight_wrong), (None, None));
        assert_eq!(weight_separation(&[0.5], &[1, 2], &[1]).right, 0);

        let acc = accuracy(&[0, 1, 1, 2, 7], &[0, 1, 2, 2, 7], 4);
        assert_eq!(acc.rows, 5);
        assert_eq!(acc.accuracy, Some(0.8));
        assert_eq!(acc.per_class, vec![Some(1.0), Some(1.0), Some(0.5), None]);
        let empty = accuracy(&[], &[], 2);
        assert_eq!((empty.accuracy, empty.per_class), (None, vec![None, None]));
        assert_eq!(accuracy(&[1], &[1, 2], 3).rows, 0);
    }
}
