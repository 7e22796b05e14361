//! `trustflow_train::metrics` against scikit-learn: the golden file
//! tests/fixtures/metrics/auroc.json comes from scripts/fixtures/auroc.py
//! (`roc_auc_score`, `accuracy_score`; see its header to regenerate; no Python runs
//! here). AUROC must agree within 1e-12, accuracies exactly up to 1e-12; plus the cases
//! scikit-learn refuses, which must be `None` here rather than a panic or NaN.

use std::path::PathBuf;

use serde_json::Value;
use trustflow_train::metrics::{accuracy, auroc, weight_separation};

const TOLERANCE: f64 = 1e-12;

fn golden() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics/auroc.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fixtures/auroc.py)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn cases<'a>(doc: &'a Value, key: &str) -> &'a [Value] {
    doc[key]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("no `{key}` cases"))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("integer"))
        .collect()
}

fn bools(v: &Value) -> Vec<bool> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_bool().expect("bool"))
        .collect()
}

fn close(got: Option<f64>, want: Option<f64>) -> bool {
    match (got, want) {
        (Some(g), Some(w)) => (g - w).abs() <= TOLERANCE,
        (None, None) => true,
        _ => false,
    }
}

#[test]
fn auroc_matches_scikit_learn() {
    let doc = golden();
    let cases = cases(&doc, "auroc");
    assert!(cases.len() >= 10, "expected the full case list");
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let scores = floats(&case["scores"]);
        let positives = bools(&case["positives"]);
        let want = case["auroc"].as_f64().expect("auroc");
        let got = auroc(&scores, &positives);
        assert!(
            close(got, Some(want)),
            "{name}: got {got:?}, scikit-learn {want}"
        );
        // Flipping the classes mirrors the curve (checked on every golden case).
        let flipped: Vec<bool> = positives.iter().map(|p| !p).collect();
        assert!(
            close(auroc(&scores, &flipped), Some(1.0 - want)),
            "{name}: flipped"
        );
        // Order of rows does not matter.
        let (mut s, mut p) = (scores.clone(), positives.clone());
        s.reverse();
        p.reverse();
        assert!(close(auroc(&s, &p), Some(want)), "{name}: reversed");
    }
}

#[test]
fn weight_separation_uses_the_same_auroc() {
    let doc = golden();
    for case in cases(&doc, "auroc") {
        let name = case["name"].as_str().expect("name");
        let weights = floats(&case["scores"]);
        let positives = bools(&case["positives"]);
        // Right pseudo-label <=> positive: label 0, pseudo-label 0 or 1.
        let labels = vec![0i64; weights.len()];
        let pseudo: Vec<i64> = positives.iter().map(|p| i64::from(!p)).collect();
        let sep = weight_separation(&weights, &pseudo, &labels);
        let want = case["auroc"].as_f64().expect("auroc");
        assert!(close(sep.auroc, Some(want)), "{name}: {sep:?}");
        let right = positives.iter().filter(|p| **p).count();
        assert_eq!(
            (sep.right, sep.wrong),
            (right, weights.len() - right),
            "{name}"
        );
        let mean = |keep: bool| {
            let picked: Vec<f64> = weights
                .iter()
                .zip(&positives)
                .filter(|(_, p)| **p == keep)
                .map(|(w, _)| *w)
                .collect();
            picked.iter().sum::<f64>() / picked.len() as f64
        };
        assert!(close(sep.mean_weight_right, Some(mean(true))), "{name}");
        assert!(close(sep.mean_weight_wrong, Some(mean(false))), "{name}");
    }
}

#[test]
fn accuracy_matches_scikit_learn() {
    let doc = golden();
    for case in cases(&doc, "accuracy") {
        let name = case["name"].as_str().expect("name");
        let predictions = ints(&case["predictions"]);
        let labels = ints(&case["labels"]);
        let classes = case["classes"].as_u64().expect("classes") as usize;
        let got = accuracy(&predictions, &labels, classes);
        assert_eq!(got.rows, labels.len(), "{name}");
        assert!(
            close(got.accuracy, case["accuracy"].as_f64()),
            "{name}: {got:?}"
        );
        let want: Vec<Option<f64>> = case["per_class"]
            .as_array()
            .expect("per_class")
            .iter()
            .map(Value::as_f64)
            .collect();
        assert_eq!(got.per_class.len(), classes, "{name}");
        for (k, (g, w)) in got.per_class.iter().zip(&want).enumerate() {
            assert!(
                close(*g, *w),
                "{name}: class {k}: got {g:?}, scikit-learn {w:?}"
            );
        }
    }
}

/// Inputs scikit-learn refuses (it raises) give `None` here.
#[test]
fn unmeasurable_inputs_are_none() {
    assert_eq!(auroc(&[], &[]), None);
    assert_eq!(auroc(&[0.3, 0.7, 0.1], &[true, true, true]), None);
    assert_eq!(auroc(&[0.3, 0.7, 0.1], &[false, false, false]), None);
    assert_eq!(auroc(&[0.3, 0.7], &[false, true, true]), None);
    assert_eq!(auroc(&[0.3, f64::NAN], &[false, true]), None);

    let sep = weight_separation(&[0.9, 0.2], &[1, 1], &[1, 1]);
    assert_eq!((sep.auroc, sep.mean_weight_wrong), (None, None));
    assert_eq!((sep.right, sep.wrong), (2, 0));
    let sep = weight_separation(&[0.9, 0.2], &[1, 1], &[1]);
    assert_eq!(
        (sep.auroc, sep.mean_weight_right, sep.right, sep.wrong),
        (None, None, 0, 0)
    );
    let sep = weight_separation(&[f64::NAN, 0.2], &[1, 0], &[1, 1]);
    assert_eq!(sep.auroc, None);

    let acc = accuracy(&[], &[], 3);
    assert_eq!((acc.accuracy, acc.rows), (None, 0));
    assert_eq!(acc.per_class, vec![None; 3]);
    let acc = accuracy(&[0, 1], &[0], 2);
    assert_eq!((acc.accuracy, acc.rows), (None, 0));
}

/// The report structs round-trip through JSON (the trainer writes them to its report).
/// The numbers are dyadic so that the comparison can be exact.
#[test]
fn reports_round_trip_through_json() {
    let sep = weight_separation(&[0.75, 0.25, 0.5], &[0, 1, 0], &[0, 0, 0]);
    let text = serde_json::to_string(&sep).expect("serialise");
    assert_eq!(
        serde_json::from_str::<trustflow_train::metrics::WeightSeparation>(&text).expect("parse"),
        sep
    );
    let acc = accuracy(&[0, 1, 1, 0], &[0, 1, 0, 0], 3);
    let text = serde_json::to_string(&acc).expect("serialise");
    assert_eq!(
        serde_json::from_str::<trustflow_train::metrics::ClassAccuracy>(&text).expect("parse"),
        acc
    );
}
