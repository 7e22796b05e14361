//! The benchmark harness (`trustflow::bench::harness::run_spec_with`) on tiny specs:
//! the decode-only and tiny-CLIP pipelines over 60 generated rows, one repetition, a
//! scaling series of 1 and 2 shards in child `trustflow run` processes, the ceiling
//! for CLIP, the decode ceiling for both, and the Python baseline when its interpreter can import numpy, Pillow,
//! pyarrow, onnxruntime and tokenizers (skipped with a message otherwise). Checks the
//! schema and invariants of `harness.json`, never timings.
//!
//! Needs ONNX Runtime: `source scripts/setup.sh` (sets ORT_DYLIB_PATH, and
//! TRUSTFLOW_PYLIBS for the baseline's pyarrow).

use std::path::{Path, PathBuf};

use serde_json::Value;
use trustflow::bench::harness::{
    BaselineDecoder, HarnessOptions, check_baseline_python, default_baseline_python, run_spec_with,
};

fn clip_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip/model")
}

/// Whether the baseline can run here with `decoder`; prints why not.
fn baseline_available(decoder: BaselineDecoder) -> bool {
    match check_baseline_python(&default_baseline_python(), decoder) {
        Ok(()) => true,
        Err(why) => {
            eprintln!("Python baseline skipped: {why}");
            false
        }
    }
}

fn options() -> HarnessOptions {
    HarnessOptions {
        trustflow_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_trustflow"))),
        ..HarnessOptions::default()
    }
}

/// Writes the pipeline and the bench spec into `dir`; returns the spec's path.
fn write_spec(dir: &Path, stage: &str, batch: usize, baseline: &str, ceiling: bool) -> PathBuf {
    let pipeline = format!(
        "source:\n  paths: [\"unused/*.parquet\"]\nstages:\n{stage}sink:\n  path: unused-out\n  \
         compression: snappy\nruntime:\n  batch_size: {batch}\n  queue_depth: 2\n"
    );
    std::fs::write(dir.join("pipeline.yaml"), pipeline).unwrap();
    let mut spec = String::from(
        "pipeline: pipeline.yaml\n\
         corpus:\n  path: corpus\n  generate:\n    rows: 60\n    shards: 2\n    seed: 7\n    \
         min_side: 48\n    max_side: 160\n\
         repetitions: 1\n\
         scaling:\n  shards: [1, 2]\n  rows_per_shard: 20\n  corpus_dir: scaling\n  seed: 3\n",
    );
    if !baseline.is_empty() {
        spec.push_str(&format!(
            "baseline:\n  pool: thread\n  decoders: {baseline}\n"
        ));
    }
    if ceiling {
        spec.push_str("ceiling:\n  calls: 1\n  min_seconds: 0\n");
    }
    spec.push_str("decode_ceiling:\n  min_seconds: 0.2\n");
    let path = dir.join("bench.yaml");
    std::fs::write(&path, spec).unwrap();
    path
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a count in {v}"))
}

fn arr<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("`{key}` is not a list in {v}"))
}

/// The decode ceiling: measured once per repetition on the stage's own work, with the
/// stage's workers, over the images that reach it; its ratio is end to end / ceiling.
fn check_decode_ceiling(r: &Value, stage: &str) {
    let d = &r["decode_ceiling"];
    assert_eq!(d["stage"], stage, "{d}");
    assert_eq!(u(d, "workers"), 2);
    assert_eq!(arr(&d["rows_per_s"], "values").len(), 1);
    assert!(f(&d["rows_per_s"], "mean") > 0.0, "{d}");
    let run = &arr(&r["engine"], "runs")[0];
    let step = arr(run, "steps")
        .iter()
        .find(|s| s["name"] == stage)
        .unwrap_or_else(|| panic!("no step {stage} in {run}"));
    // Every row that reached the stage with image bytes is held (a null image is not).
    let reached = u(step, "rows_in");
    let images = u(d, "images");
    assert!(
        images > 0 && images <= reached,
        "{images} images, {reached} rows"
    );
    assert!(
        images as f64 >= 0.8 * reached as f64,
        "{images} of {reached}"
    );
    let end_to_end = f(&d["end_to_end_rows_per_s"], "mean");
    let expected = reached as f64 / f(run, "wall_s");
    assert!(
        (end_to_end - expected).abs() <= 1e-6 * expected,
        "{end_to_end} vs {expected}"
    );
    let ratio = f(d, "end_to_end_over_decode_ceiling");
    assert!((ratio - end_to_end / f(&d["rows_per_s"], "mean")).abs() < 1e-9);
}

fn share(what: &str, x: f64) {
    assert!((0.0..=1.0).contains(&x), "{what} = {x} is not in [0, 1]");
}

/// Schema and invariants of harness.json common to both pipelines.
fn check_report(out: &Path, stage: &str, baseline: bool) -> Value {
    let text = std::fs::read_to_string(out.join("harness.json")).expect("harness.json written");
    let r: Value = serde_json::from_str(&text).unwrap();
    let steps: Vec<&str> = arr(&r, "steps")
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(steps, ["source", stage, "sink"]);
    assert_eq!(u(&r, "repetitions"), 1);
    assert_eq!(u(&r["corpus"], "shards"), 2);
    assert!(r["machine"]["build_profile"].is_string());

    // The engine run.
    let runs = arr(&r["engine"], "runs");
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(u(run, "rows_in"), 60);
    assert_eq!(
        u(run, "rows_in"),
        u(run, "rows_out") + u(run, "rows_quarantined")
    );
    assert!(u(run, "rows_quarantined") > 0, "the corpus plants bad rows");
    assert_eq!(run["invariant_holds"], true);
    assert!(f(run, "rows_per_s") > 0.0 && f(run, "wall_s") > 0.0);
    assert!(u(run, "peak_rss_bytes") > 0);
    let step_reports = arr(run, "steps");
    let names: Vec<&str> = step_reports
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, steps, "every step present, in order");
    for s in step_reports {
        for k in [
            "busy_fraction",
            "blocked_fraction",
            "starved_fraction",
            "queue_fill_mean",
            "queue_fill_max",
        ] {
            share(k, f(s, k));
        }
    }
    assert_eq!(u(&step_reports[2], "rows_out"), u(run, "rows_out"));
    let mut stats = r["engine"]["rows_per_s"].clone();
    assert_eq!(arr(&stats, "values").len(), 1);
    assert!(f(&stats, "mean") > 0.0);
    stats = r["engine"]["wall_s"].clone();
    assert_eq!(arr(&stats, "values").len(), 1);

    // Its timeline: one entry per sample in every series.
    let tl = &run["timeline"];
    let t = arr(tl, "t");
    let n = t.len();
    assert!(n >= 1);
    let times: Vec<f64> = t.iter().map(|x| x.as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(
        (times[n - 1] - f(run, "wall_s")).abs() < 1e-9,
        "ends at wall_s"
    );
    for k in ["rss_bytes", "rows_in_flight", "bytes_in_flight"] {
        assert_eq!(arr(tl, k).len(), n, "{k}");
    }
    let tl_steps = arr(tl, "steps");
    assert_eq!(tl_steps.len(), 3);
    for (s, report) in tl_steps.iter().zip(step_reports) {
        assert_eq!(s["name"], report["name"]);
        for k in ["rows_out", "rows_per_s", "busy", "blocked", "starved"] {
            assert_eq!(arr(s, k).len(), n, "{k} of {}", s["name"]);
        }
        for k in ["busy", "blocked", "starved"] {
            for x in arr(s, k) {
                share(k, x.as_f64().unwrap());
            }
        }
        let rows: Vec<u64> = arr(s, "rows_out")
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert!(
            rows.windows(2).all(|w| w[0] <= w[1]),
            "cumulative: {rows:?}"
        );
        assert_eq!(rows[n - 1], u(report, "rows_out"));
        assert!(
            arr(s, "rows_per_s")
                .iter()
                .all(|x| x.as_f64().unwrap() >= 0.0)
        );
    }
    let queues = arr(tl, "queues");
    assert_eq!(queues.len(), 2, "one input queue per step but the source");
    let qn = arr(tl, "queue_t").len();
    for (q, step) in queues.iter().zip(&steps[1..]) {
        assert_eq!(q["step"], *step);
        let fill = arr(q, "fill");
        assert_eq!(fill.len(), qn);
        for x in fill {
            share("queue fill", x.as_f64().unwrap());
        }
    }

    // The scaling series: 20 rows per shard, each point in its own process.
    let sc = &r["scaling"];
    assert_eq!(sc["isolation"], "process", "{sc}");
    let points = arr(sc, "points");
    assert_eq!(
        points.iter().map(|p| u(p, "shards")).collect::<Vec<_>>(),
        [1, 2]
    );
    for p in points {
        assert_eq!(u(p, "rows"), 20 * u(p, "shards"));
        let runs = arr(p, "runs");
        assert_eq!(runs.len(), 1);
        assert!(u(&runs[0], "peak_rss_bytes") > 0);
        assert!(f(&runs[0], "wall_s") > 0.0);
        assert!(u(p, "peak_rss_bytes") > 0);
        // RSS over time of each child run: pairs of (seconds, bytes), and its median.
        let samples = arr(&runs[0], "rss_bytes");
        assert_eq!(arr(&runs[0], "rss_t").len(), samples.len());
        if let Some(first) = samples.first() {
            assert!(first.as_u64().unwrap() > 0);
            assert!(u(&runs[0], "median_rss_bytes") > 0);
        }
    }
    assert!(f(sc, "peak_rss_spread") >= 1.0);

    // The baseline, when it ran.
    if baseline {
        let b = &r["baseline"];
        let runs = arr(b, "runs");
        assert_eq!(runs.len(), 1);
        assert_eq!(u(&runs[0], "rows_in"), 60);
        assert_eq!(
            u(&runs[0], "rows_in"),
            u(&runs[0], "rows_out") + u(&runs[0], "rows_quarantined")
        );
        assert!(f(&runs[0], "rows_per_s") > 0.0);
        assert!(u(&runs[0], "peak_rss_bytes") > 0);
        assert_eq!(
            arr(&runs[0], "rss_t").len(),
            arr(&runs[0], "rss_bytes").len()
        );
        assert!(f(b, "engine_over_baseline") > 0.0);
        assert_eq!(arr(b, "ratio_per_repetition").len(), 1);
        let a = &b["agreement"];
        assert!(u(a, "rows_compared") > 0, "{a}");
    } else {
        assert!(r["baseline"].is_null());
    }

    // Plots: drawn, or the reason recorded (no font); the JSON is complete either way.
    match r["plot_error"].as_str() {
        None => {
            let plots = arr(&r, "plots");
            assert_eq!(plots.len(), 2, "harness.png and harness-scaling.png");
            for p in plots {
                let bytes = std::fs::read(p.as_str().unwrap()).unwrap();
                assert_eq!(&bytes[1..4], b"PNG");
            }
        }
        Some(why) => eprintln!("plots not drawn: {why}"),
    }
    r
}

#[test]
fn decode_only_spec_gives_a_complete_report() {
    let dir = tempfile::tempdir().unwrap();
    let baseline = baseline_available(BaselineDecoder::Pillow);
    let spec = write_spec(
        dir.path(),
        "  - type: decode\n    workers: 2\n",
        16,
        if baseline { "[pillow]" } else { "" },
        false,
    );
    let out = dir.path().join("out");
    let report = run_spec_with(&spec, &out, &options()).unwrap();
    assert!(report.ceiling.is_none());
    let r = check_report(&out, "decode", baseline);
    check_decode_ceiling(&r, "decode");
    if baseline {
        // Pillow and the engine's decoders agree on every planted corruption and size.
        let a = &r["baseline"]["agreement"];
        assert_eq!(u(a, "only_engine"), 0, "{a}");
        assert_eq!(u(a, "only_baseline"), 0, "{a}");
        assert_eq!(u(a, "rows_differing"), 0, "{a}");
        assert_eq!(r["baseline"]["mode"], "decode");
    }
}

#[test]
fn tiny_clip_spec_gives_a_complete_report_with_the_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let baseline = baseline_available(BaselineDecoder::Pillow);
    let opencv = baseline && baseline_available(BaselineDecoder::Opencv);
    let stage = format!(
        "  - type: clip_score\n    model: \"{}\"\n    workers: 2\n    intra_op_threads: 1\n    \
         emit_embeddings: false\n",
        clip_model().display()
    );
    let decoders = match (baseline, opencv) {
        (true, true) => "[pillow, opencv]",
        (true, false) => "[pillow]",
        _ => "",
    };
    let spec = write_spec(dir.path(), &stage, 8, decoders, true);
    let out = dir.path().join("out");
    let report = run_spec_with(&spec, &out, &options()).unwrap();
    let text = report.to_text();
    assert!(
        text.contains("engine:") && text.contains("ceiling:") && text.contains("scaling"),
        "{text}"
    );
    eprintln!("{text}");
    assert!(text.contains("decode ceiling:"), "{text}");
    let r = check_report(&out, "clip_score", baseline);
    check_decode_ceiling(&r, "clip_score");
    let c = &r["ceiling"];
    assert_eq!(c["stage"], "clip_score");
    assert_eq!(u(c, "batch_size"), 8);
    assert_eq!(u(c, "workers"), 2);
    assert_eq!(arr(&c["rows_per_s"], "values").len(), 1);
    assert!(f(&c["rows_per_s"], "mean") > 0.0);
    assert!(f(c, "end_to_end_over_ceiling") > 0.0);
    // The ceiling bounds the rows the stage scored, never more than the rows read (the
    // corpus plants corrupt images, which never reach the models).
    let scored = f(&c["end_to_end_scored_rows_per_s"], "mean");
    let all_rows = f(&r["engine"]["rows_per_s"], "mean");
    assert!(scored > 0.0 && scored < all_rows, "{scored} vs {all_rows}");
    assert!((f(c, "end_to_end_over_ceiling") - scored / f(&c["rows_per_s"], "mean")).abs() < 1e-9);
    if opencv {
        let peers = arr(&r, "peers");
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0]["decoder"], "opencv");
        assert_eq!(arr(&peers[0], "runs").len(), 1);
        assert!(f(&peers[0], "engine_over_baseline") > 0.0);
        // Another decoder and resize: the same rows, not the same values.
        assert!(u(&peers[0]["agreement"], "rows_compared") > 0);
        assert!(out.join("baseline-opencv").is_dir());
    } else {
        assert!(arr(&r, "peers").is_empty());
    }
    if baseline {
        let a = &r["baseline"]["agreement"];
        assert_eq!(r["baseline"]["mode"], "clip");
        assert_eq!(r["baseline"]["decoder"], "pillow");
        assert_eq!(u(a, "only_engine"), 0, "{a}");
        assert_eq!(u(a, "only_baseline"), 0, "{a}");
        assert!(f(a, "max_abs_diff") < 1e-4, "{a}");
    }
}

#[test]
fn baseline_and_ceiling_refuse_pipelines_they_cannot_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        dir.path(),
        "  - type: decode\n  - type: clean_caption\n",
        16,
        "[pillow]",
        false,
    );
    let err = run_spec_with(&spec, &dir.path().join("out"), &options())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("baseline") && err.contains("clean_caption"),
        "{err}"
    );

    let spec = write_spec(dir.path(), "  - type: decode\n", 16, "", true);
    let err = run_spec_with(&spec, &dir.path().join("out"), &options())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ceiling") && err.contains("clip_score"),
        "{err}"
    );

    // The decode ceiling needs a stage that decodes images.
    let spec = write_spec(dir.path(), "  - type: clean_caption\n", 16, "", false);
    let err = run_spec_with(&spec, &dir.path().join("out"), &options())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the decode ceiling needs a decode or clip_score stage")
            && err.contains("pipeline.yaml"),
        "{err}"
    );
}

#[test]
fn the_example_specs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/specs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let loaded = trustflow::bench::harness::load_spec(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                loaded.resolve(&loaded.spec.pipeline).is_file(),
                "{}: pipeline not found",
                path.display()
            );
            seen += 1;
        }
    }
    assert!(seen >= 3, "benches/specs has {seen} specs");
}
