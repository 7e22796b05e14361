//! The README's first command, reduced: `trustflow demo` on 200 rows per domain and one
//! epoch runs the whole TRUST chain (digit domains, text head, enrichment with the
//! committed captioner and CLIP tower, source-only and TRUST training) and leaves
//! outputs with the documented schema and the row-accounting invariant.

use crate::common;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float32Type};

#[test]
fn reduced_demo_runs_the_whole_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("demo");
    let res = common::run_ok(&[
        "demo",
        "--rows",
        "200",
        "--epochs",
        "1",
        "--out",
        out.to_str().expect("utf8"),
    ]);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        stdout.contains("source only") && stdout.contains("TRUST"),
        "{stdout}"
    );
    let page = out.join("report.html");
    assert!(
        stdout.contains(&format!("report: {}", page.display())),
        "the demo ends by printing its report's path: {stdout}"
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("accuracy.json")).expect("report"))
            .expect("JSON");
    let table = report["table"].as_array().expect("table");
    assert_eq!(table.len(), 2, "source-only and TRUST");
    for cell in table {
        let acc = cell["mean"].as_f64().expect("an accuracy");
        assert!((0.0..=1.0).contains(&acc), "{cell}");
    }
    for e in report["enriched"].as_array().expect("enriched") {
        let (i, o, q) = (
            e["rows_in"].as_u64().expect("in"),
            e["rows_out"].as_u64().expect("out"),
            e["rows_quarantined"].as_u64().expect("quarantined"),
        );
        assert_eq!(i, o + q, "{e}");
        assert_eq!(i, 160, "80% of 200 rows are training rows");
    }
    assert!(out.join("accuracy.md").is_file());
    assert_eq!(report["weight_method"], "class_max_cosine");

    // The weights were calibrated on the enriched source: one positive maximum per digit.
    let calibration: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("class_max.json")).expect("calibration"))
            .expect("JSON");
    let maxima = calibration["class_max_cosine"].as_array().expect("maxima");
    assert_eq!(maxima.len(), 10);
    assert!(
        maxima
            .iter()
            .all(|m| m.as_f64().is_some_and(|m| m > 0.0 && m <= 1.0)),
        "{calibration}"
    );
    // The source carries the cosine it was calibrated from, and no weights.
    let source = common::read_parquet(&out.join("enriched/source/part-00000.parquet"));
    assert!(source.column_by_name("clip_similarity").is_some());
    assert!(source.column_by_name("pseudo_weight").is_none());

    // The enriched target rows carry every column the trainer reads.
    let target = common::read_parquet(&out.join("enriched/target_a/part-00000.parquet"));
    let schema = target.schema();
    let field = |name: &str| {
        schema
            .field_with_name(name)
            .unwrap_or_else(|_| panic!("no `{name}` in {schema:?}"))
            .data_type()
            .clone()
    };
    assert_eq!(field("pseudo_label"), DataType::Int64);
    assert_eq!(field("pseudo_weight"), DataType::Float32);
    assert!(matches!(
        field("text_feature"),
        DataType::FixedSizeList(_, _)
    ));
    let weights = target
        .column_by_name("pseudo_weight")
        .expect("weights")
        .as_primitive::<Float32Type>();
    assert_eq!(weights.null_count(), 0);
    assert!(weights.values().iter().all(|w| (0.0..=1.0).contains(w)));
    // 5% of target captions are missing: the captioner wrote those.
    let sources = common::strings(&target, "caption_source");
    assert!(sources.iter().any(|s| s.as_deref() == Some("generated")));
    assert!(sources.iter().all(|s| s.is_some()));

    for run in ["source_only", "trust"] {
        let run_dir = out.join("runs/target_a").join(run).join("seed0");
        let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics");
        assert_eq!(metrics.lines().count(), 1, "{run}: one epoch");
        let line: serde_json::Value =
            serde_json::from_str(metrics.lines().next().expect("line")).expect("JSON line");
        assert!(line["target_eval"]["accuracy"].is_number(), "{line}");
        let auroc = line["pseudo_labels"]["weights"]["auroc"]
            .as_f64()
            .expect("auroc");
        assert!((0.0..=1.0).contains(&auroc));
    }

    demo_report_shows_the_target_domain(&out, &page);
}

/// The demo's page: the AUROC it shows is the AUROC of the target's weights for right
/// vs wrong pseudo-labels (the metric is checked against scikit-learn in metrics.rs),
/// both training runs have their curves, and it renders in a browser.
fn demo_report_shows_the_target_domain(out: &std::path::Path, page: &std::path::Path) {
    let target = out.join("enriched/target_a");
    let res = common::run_ok(&[
        "report",
        target.to_str().expect("utf8"),
        "--runs",
        out.join("runs/target_a").to_str().expect("utf8"),
        "--html",
        out.join("again.html").to_str().expect("utf8"),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&res.stdout).expect("JSON summary");
    let rows = common::read_parquet(&target.join("part-00000.parquet"));
    let weights = rows
        .column_by_name("pseudo_weight")
        .expect("weights")
        .as_primitive::<Float32Type>();
    let pseudo = rows
        .column_by_name("pseudo_label")
        .expect("pseudo-labels")
        .as_primitive::<arrow::datatypes::Int64Type>();
    let labels = rows
        .column_by_name("label")
        .expect("labels")
        .as_primitive::<arrow::datatypes::Int64Type>();
    let scores: Vec<f64> = weights.values().iter().map(|w| f64::from(*w)).collect();
    let right: Vec<bool> = (0..rows.num_rows())
        .map(|i| pseudo.value(i) == labels.value(i))
        .collect();
    let want = trustflow_train::metrics::auroc(&scores, &right).expect("both classes");
    let got = report["trust"]["labelled"]["auroc"]
        .as_f64()
        .expect("auroc");
    assert!((got - want).abs() < 1e-12, "report {got} vs {want}");
    let runs: Vec<&str> = report["training"]
        .as_array()
        .expect("runs")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(runs, ["source_only/seed0", "trust/seed0"]);

    let Some(seen) = common::browser_check(
        page,
        &out.join("report.png"),
        &[
            (
                "loaded",
                "Array.from(document.querySelectorAll('#lowest-weight img'))\
                 .filter(i => i.complete && i.naturalWidth > 0).length",
            ),
            (
                "training",
                "document.querySelectorAll('table.training').length",
            ),
            ("auroc", "document.getElementById('auroc').textContent"),
        ],
    ) else {
        return;
    };
    assert_eq!(seen["errors"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["evals"]["loaded"], 12, "{seen}");
    assert_eq!(seen["evals"]["training"], 2, "{seen}");
    assert_eq!(seen["evals"]["auroc"], format!("{got:.3}"));
}
