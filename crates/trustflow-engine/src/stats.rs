//! Small statistics shared by the run report and the trainer's metrics.

/// Area under the ROC curve of `scores` for telling `positives` (true) from negatives.
///
/// Ties are handled as scikit-learn's `roc_auc_score` does: rows with equal scores form
/// one threshold, and the curve between distinct thresholds is a straight line
/// (trapezoid), which equals the Mann-Whitney statistic with ties counting 1/2. The
/// area is accumulated in exact integer arithmetic and divided once, so the result is
/// within a few ulps of the exact rational value. `-0.0` and `0.0` are one threshold.
///
/// `None` when the lengths differ, the input is empty, a score is NaN, or either class
/// has no rows (scikit-learn raises there). Infinite scores are ordered like any other
/// (scikit-learn rejects them; a weight is never infinite). O(n log n).
pub fn auroc(scores: &[f64], positives: &[bool]) -> Option<f64> {
    if scores.len() != positives.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let pos = positives.iter().filter(|p| **p).count() as u128;
    let neg = positives.len() as u128 - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut rows: Vec<(f64, bool)> = scores
        .iter()
        .copied()
        .zip(positives.iter().copied())
        .collect();
    // Descending; total_cmp keeps -0.0 and 0.0 adjacent, and the grouping below uses
    // `==`, so they end up in the same threshold.
    rows.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));

    // Twice the area under the un-normalised curve (false positives on x, true
    // positives on y), summed over the distinct thresholds.
    let (mut tp, mut fp, mut area2) = (0u128, 0u128, 0u128);
    let mut i = 0;
    while i < rows.len() {
        let threshold = rows[i].0;
        let (tp_before, fp_before) = (tp, fp);
        while i < rows.len() && rows[i].0 == threshold {
            if rows[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        area2 += (fp - fp_before) * (tp + tp_before);
    }
    Some(area2 as f64 / (2 * pos * neg) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_basic_cases() {
        assert_eq!(auroc(&[0.1, 0.9], &[false, true]), Some(1.0));
        assert_eq!(auroc(&[0.9, 0.1], &[false, true]), Some(0.0));
        assert_eq!(auroc(&[0.5, 0.5], &[false, true]), Some(0.5));
        // One positive tied with one of two negatives: (1 + 0.5) / 2.
        assert_eq!(auroc(&[0.2, 0.5, 0.5], &[false, false, true]), Some(0.75));
        assert_eq!(auroc(&[-0.0, 0.0], &[false, true]), Some(0.5));
        assert_eq!(
            auroc(&[f64::NEG_INFINITY, f64::INFINITY], &[false, true]),
            Some(1.0)
        );
        assert_eq!(auroc(&[], &[]), None);
        assert_eq!(auroc(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(auroc(&[0.1, 0.2], &[false, false]), None);
        assert_eq!(auroc(&[0.1], &[false, true]), None);
        assert_eq!(auroc(&[0.1, f64::NAN], &[false, true]), None);
    }

    /// The sort-based AUROC equals the O(n^2) pair count with ties as 1/2.
    #[test]
    fn auroc_matches_pair_count() {
        let scores: Vec<f64> = (0..97).map(|i| f64::from((i * 37) % 11) / 10.0).collect();
        let positives: Vec<bool> = (0..97).map(|i| (i * 13) % 7 < 3).collect();
        let (mut wins, mut pairs) = (0.0, 0.0);
        for (s, _) in scores.iter().zip(&positives).filter(|(_, p)| **p) {
            for (t, _) in scores.iter().zip(&positives).filter(|(_, q)| !**q) {
                pairs += 1.0;
                wins += match s.partial_cmp(t) {
                    Some(std::cmp::Ordering::Greater) => 1.0,
                    Some(std::cmp::Ordering::Equal) => 0.5,
                    _ => 0.0,
                };
            }
        }
        let a = auroc(&scores, &positives).unwrap();
        assert!((a - wins / pairs).abs() < 1e-15, "{a} vs {}", wins / pairs);
    }
}
