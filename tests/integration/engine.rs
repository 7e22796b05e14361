//! End-to-end behaviour of the engine: quarantine with reasons, the row invariant,
//! every input layout, ordering, resume, kill -9, SIGINT.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use arrow::array::AsArray;
use common::*;
use trustflow::bench::corpus::GenLayout;

/// The reason the engine must give for each kind of planted corruption.
fn expected_reason(kind: &str) -> &'static str {
    match kind {
        "truncated_jpeg" => "truncated",
        "random_bytes" => "not a recognised image format",
        "zero_bytes" => "empty",
        "huge_dimensions" => "exceed the limit",
        other => panic!("unknown corruption kind {other}"),
    }
}

fn check_quarantine_matches_ground_truth(corpus_dir: &Path, out: &Path) {
    let planted = planted_corruptions(corpus_dir);
    let found = quarantined(out);
    let found_bad_images: BTreeSet<&String> = found
        .iter()
        .filter(|(_, (stage, _))| stage == "decode")
        .map(|(id, _)| id)
        .collect();
    let planted_ids: BTreeSet<&String> = planted.keys().collect();
    assert_eq!(
        found_bad_images, planted_ids,
        "decode must quarantine exactly the corrupt images"
    );
    for (id, kind) in &planted {
        let (_, error) = &found[id];
        assert!(
            error.contains(expected_reason(kind)),
            "{id} ({kind}) quarantined with `{error}`"
        );
    }
}

#[test]
fn bad_rows_are_quarantined_with_reasons_and_the_invariant_holds() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    let out = dir.path().join("out");
    let summary = corpus(&corpus_dir, 300, 3, 1, 160);
    let bad: usize = summary.bad_rows.values().sum();
    assert!(
        bad * 100 >= 5 * 300,
        "corpus must have >= 5% bad rows, has {bad}"
    );

    let file = pipeline(
        dir.path(),
        "p.yaml",
        &standard_pipeline(&corpus_dir, &out, "  keep_columns: [caption_quality]\n"),
    );
    let stdout = run_ok(&["run", "--quiet", file.to_str().unwrap()]).stdout;
    let stdout = String::from_utf8_lossy(&stdout);
    assert!(stdout.contains("invariant holds"), "{stdout}");

    let r = report(&out);
    assert_eq!(r["rows_in"], 300);
    assert_eq!(r["invariant_holds"], true);
    assert_eq!(r["shards"].as_array().unwrap().len(), 3);
    for shard in r["shards"].as_array().unwrap() {
        let (i, o, q) = (
            shard["rows_in"].as_u64().unwrap(),
            shard["rows_out"].as_u64().unwrap(),
            shard["rows_quarantined"].as_u64().unwrap(),
        );
        assert_eq!(i, o + q, "{shard}");
        assert_eq!(shard["invariant_holds"], true);
    }
    assert_eq!(r["rows_quarantined"].as_u64().unwrap() as usize, bad);
    check_quarantine_matches_ground_truth(&corpus_dir, &out);

    // Rows that passed carry the decode and caption columns; missing captions are
    // marked for the captioner, not dropped.
    let mut missing_marked = 0;
    for shard in shard_files(&out) {
        let batch = read_parquet(&shard);
        let quality = strings(&batch, "caption_quality");
        let missing = batch
            .column_by_name("caption_missing")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::BooleanArray>()
            .unwrap()
            .clone();
        for (i, q) in quality.iter().enumerate() {
            if q.as_deref() == Some("missing") {
                assert!(
                    missing.value(i),
                    "row {i} of {} should be marked",
                    shard.display()
                );
                missing_marked += 1;
            }
        }
        assert_eq!(batch.column_by_name("width").unwrap().null_count(), 0);
    }
    assert!(
        missing_marked > 0,
        "the corpus has missing captions to mark"
    );
}

#[test]
fn every_input_layout_gives_the_same_quarantine() {
    for layout in [GenLayout::HfStruct, GenLayout::Path, GenLayout::Img2dataset] {
        let dir = tempfile::tempdir().unwrap();
        let corpus_dir = dir.path().join("corpus");
        let out = dir.path().join("out");
        corpus_with(&corpus_dir, 80, 2, 3, 96, layout, 0.15);
        let extra = match layout {
            GenLayout::Img2dataset => "  preset: img2dataset\n",
            _ => "",
        };
        let file = pipeline(
            dir.path(),
            "p.yaml",
            &standard_pipeline(&corpus_dir, &out, extra),
        );
        run_ok(&["run", "--quiet", file.to_str().unwrap()]);
        let r = report(&out);
        assert_eq!(r["rows_in"], 80, "{layout}");
        assert_eq!(r["invariant_holds"], true, "{layout}");
        check_quarantine_matches_ground_truth(&corpus_dir, &out);
    }
}

#[test]
fn outputs_keep_input_order_whatever_the_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 120, 1, 5, 96);
    let input = read_parquet(&shard_files(&corpus_dir)[0]);
    let input_ids = ids(&input);
    let bad = planted_corruptions(&corpus_dir);
    let expected: Vec<&String> = input_ids
        .iter()
        .filter(|id| !bad.contains_key(*id))
        .collect();
    for workers in [1, 3] {
        let out = dir.path().join(format!("out{workers}"));
        let yaml = format!(
            "source:\n  paths: [\"{}\"]\nstages:\n  - type: decode\n    workers: {workers}\nsink:\n  path: \"{}\"\nruntime:\n  batch_size: 7\n  queue_depth: 1\n",
            corpus_dir.display(),
            out.display()
        );
        let file = pipeline(dir.path(), &format!("p{workers}.yaml"), &yaml);
        run_ok(&["run", "--quiet", file.to_str().unwrap()]);
        let got = ids(&read_parquet(&out.join("part-00000.parquet")));
        assert_eq!(
            got.iter().collect::<Vec<_>>(),
            expected,
            "{workers} workers"
        );
    }
}

#[test]
fn outputs_open_with_pyarrow_with_sane_types() {
    let pylibs = std::env::var("TRUSTFLOW_PYLIBS")
        .expect("TRUSTFLOW_PYLIBS unset: run the tests through scripts/test.sh");
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    let out = dir.path().join("out");
    corpus(&corpus_dir, 40, 1, 9, 96);
    let file = pipeline(
        dir.path(),
        "p.yaml",
        &standard_pipeline(&corpus_dir, &out, ""),
    );
    run_ok(&["run", "--quiet", file.to_str().unwrap()]);
    let script = r#"
import json, sys, pyarrow.parquet as pq
out = sys.argv[1]
t = pq.read_table(out + "/part-00000.parquet")
q = pq.read_table(out + "/part-00000.quarantine.parquet")
print(json.dumps({"out": {f.name: str(f.type) for f in t.schema}, "rows": t.num_rows,
                  "q": {f.name: str(f.type) for f in q.schema}, "qrows": q.num_rows}))
"#;
    let res = std::process::Command::new("python3")
        .args(["-c", script, out.to_str().unwrap()])
        .env("PYTHONPATH", pylibs)
        .output()
        .expect("python3");
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    let expect = [
        ("id", "string"),
        ("image", "large_binary"),
        ("caption", "string"),
        ("label", "int64"),
        ("width", "uint32"),
        ("height", "uint32"),
        ("image_format", "string"),
        ("caption_clean", "string"),
        ("caption_missing", "bool"),
    ];
    for (name, ty) in expect {
        assert_eq!(v["out"][name], ty, "output column {name}: {v}");
    }
    assert_eq!(v["q"]["error_stage"], "string");
    assert_eq!(v["q"]["error"], "string");
    let r = report(&out);
    assert_eq!(v["rows"], r["rows_out"]);
    assert_eq!(v["qrows"], r["rows_quarantined"]);
}

/// Each column's codec in the first row group of a Parquet file.
fn codecs_of(path: &Path) -> std::collections::BTreeMap<String, String> {
    use parquet::file::reader::FileReader;
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
    let metadata = reader.metadata();
    assert!(metadata.num_row_groups() > 0, "{} has rows", path.display());
    metadata
        .row_group(0)
        .columns()
        .iter()
        .map(|c| (c.column_path().string(), format!("{:?}", c.compression())))
        .collect()
}

/// Image bytes (JPEG, PNG, WebP) do not compress: binary columns are written
/// uncompressed by default, in output and quarantine shards; `uncompressed_columns`
/// names other columns or none; an unknown name is refused with the field's path.
#[test]
fn image_bytes_are_written_uncompressed_unless_the_sink_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 60, 1, 9, 96);
    let run = |name: &str, sink_extra: &str| {
        let out = dir.path().join(name);
        let yaml = standard_pipeline(&corpus_dir, &out, "")
            .replace("sink:\n", &format!("sink:\n{sink_extra}"));
        let file = pipeline(dir.path(), &format!("{name}.yaml"), &yaml);
        (
            out,
            bin()
                .args(["run", "--quiet", file.to_str().unwrap()])
                .output()
                .unwrap(),
        )
    };
    let (out, done) = run("default", "");
    assert!(done.status.success(), "{}", text(&done));
    assert!(report(&out)["rows_quarantined"].as_u64().unwrap() > 0);
    for file in ["part-00000.parquet", "part-00000.quarantine.parquet"] {
        let codecs = codecs_of(&out.join(file));
        assert_eq!(codecs["image"], "UNCOMPRESSED", "{file}: {codecs:?}");
        assert!(codecs["caption"].starts_with("ZSTD"), "{file}: {codecs:?}");
    }
    let (out, done) = run("none", "  uncompressed_columns: []\n");
    assert!(done.status.success(), "{}", text(&done));
    let codecs = codecs_of(&out.join("part-00000.parquet"));
    assert!(codecs["image"].starts_with("ZSTD"), "{codecs:?}");
    let (out, done) = run("caption", "  uncompressed_columns: [caption]\n");
    assert!(done.status.success(), "{}", text(&done));
    let codecs = codecs_of(&out.join("part-00000.parquet"));
    assert_eq!(codecs["caption"], "UNCOMPRESSED", "{codecs:?}");
    assert!(codecs["image"].starts_with("ZSTD"), "{codecs:?}");
    let (out, refused) = run("unknown", "  uncompressed_columns: [caption, nope]\n");
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let message = text(&refused);
    assert!(
        message.contains("sink.uncompressed_columns[1]") && message.contains("no column `nope`"),
        "{message}"
    );
    assert!(!out.join("part-00000.parquet").exists());
}

#[test]
fn rerun_skips_finished_shards_and_redoes_changed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    let out = dir.path().join("out");
    corpus(&corpus_dir, 60, 3, 2, 96);
    let yaml = standard_pipeline(&corpus_dir, &out, "");
    let file = pipeline(dir.path(), "p.yaml", &yaml);
    let path = file.to_str().unwrap();
    run_ok(&["run", "--quiet", path]);
    assert_eq!(report(&out)["shards_processed"], 3);

    run_ok(&["run", "--quiet", path]);
    let r = report(&out);
    assert_eq!(
        (r["shards_processed"].as_u64(), r["shards_skipped"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(r["rows_in"], 60, "skipped shards still count in the totals");

    // Worker counts do not change outputs: still skipped.
    pipeline(
        dir.path(),
        "p.yaml",
        &yaml.replace("workers: 2", "workers: 1"),
    );
    run_ok(&["run", "--quiet", path]);
    assert_eq!(report(&out)["shards_skipped"], 3);

    // A setting that changes outputs redoes everything.
    pipeline(
        dir.path(),
        "p.yaml",
        &yaml.replace(
            "type: clean_caption",
            "type: clean_caption\n    lowercase: true",
        ),
    );
    run_ok(&["run", "--quiet", path]);
    assert_eq!(report(&out)["shards_processed"], 3);

    // A changed input shard is redone; the others are not.
    let shard = corpus_dir.join("part-00001.parquet");
    let bytes = std::fs::read(&shard).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&shard, bytes).unwrap();
    run_ok(&["run", "--quiet", path]);
    let r = report(&out);
    assert_eq!(
        (r["shards_processed"].as_u64(), r["shards_skipped"].as_u64()),
        (Some(1), Some(2))
    );

    // A deleted output is noticed.
    std::fs::remove_file(out.join("part-00002.parquet")).unwrap();
    run_ok(&["run", "--quiet", path]);
    assert_eq!(report(&out)["shards_processed"], 1);
}

#[test]
fn filter_and_parts_select_rows_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 90, 3, 4, 96);
    let mut low_labels = 0;
    for shard in shard_files(&corpus_dir) {
        let b = read_parquet(&shard);
        let labels = b.column_by_name("label").unwrap();
        let labels = labels.as_primitive::<arrow::datatypes::Int64Type>();
        low_labels += labels.iter().flatten().filter(|l| *l < 5).count();
    }
    let out = dir.path().join("out");
    let file = pipeline(
        dir.path(),
        "p.yaml",
        &standard_pipeline(&corpus_dir, &out, "  filter: \"label < 5\"\n"),
    );
    run_ok(&["run", "--quiet", file.to_str().unwrap()]);
    assert_eq!(
        report(&out)["rows_in"].as_u64().unwrap() as usize,
        low_labels
    );
    for shard in shard_files(&out) {
        let b = read_parquet(&shard);
        let labels = b.column_by_name("label").unwrap();
        assert!(
            labels
                .as_primitive::<arrow::datatypes::Int64Type>()
                .iter()
                .flatten()
                .all(|l| l < 5)
        );
    }

    // A filter that keeps nothing still yields complete (empty) shards.
    let none = dir.path().join("none");
    let file = pipeline(
        dir.path(),
        "n.yaml",
        &standard_pipeline(&corpus_dir, &none, "  filter: \"label > 100\"\n"),
    );
    run_ok(&["run", "--quiet", file.to_str().unwrap()]);
    let r = report(&none);
    assert_eq!(
        (r["rows_in"].as_u64(), r["invariant_holds"].as_bool()),
        (Some(0), Some(true))
    );
    assert_eq!(read_parquet(&none.join("part-00000.parquet")).num_rows(), 0);

    let part = dir.path().join("part");
    let file = pipeline(
        dir.path(),
        "part.yaml",
        &standard_pipeline(&corpus_dir, &part, ""),
    );
    run_ok(&["run", "--quiet", "--part", "1/2", file.to_str().unwrap()]);
    // Parts of one job share the folder, each with its own report.
    assert!(!part.join("_report.json").exists());
    let part_report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(part.join("_report.part-1-of-2.json")).unwrap(),
    )
    .unwrap();
    let stems: Vec<String> = part_report["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stem"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stems, vec!["part-00001".to_string()]);
}

#[test]
fn kill_9_then_rerun_gives_the_uninterrupted_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out, reference) = slow_corpus_with_reference(dir.path());

    for after in [2, 5] {
        let status = interrupt(&file, &out, "-KILL", after);
        assert!(!status.success());
        // Whatever carries a final name opens as a complete Parquet file.
        for (name, batch) in all_outputs(&out) {
            assert!(batch.num_columns() > 0, "{name}");
        }
    }
    let killed_partway = count_manifests(&out);
    assert!(
        killed_partway < 12,
        "the kill came too late to test anything"
    );

    run_ok(&["run", "--quiet", file.to_str().unwrap()]);
    let r = report(&out);
    assert!(r["shards_skipped"].as_u64().unwrap() >= 5, "{r}");
    assert_eq!(r["invariant_holds"], true);
    let got = all_outputs(&out);
    let want = all_outputs(&reference);
    assert_eq!(got.len(), want.len());
    for ((gn, gb), (wn, wb)) in got.iter().zip(&want) {
        assert_eq!(gn, wn);
        assert_eq!(gb, wb, "{gn} differs from the uninterrupted run");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn sigint_stops_cleanly_and_keeps_only_complete_shards() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = slow_corpus(dir.path());
    let status = interrupt(&file, &out, "-INT", 2);
    assert_eq!(status.code(), Some(130), "SIGINT exits with 130");
    for entry in std::fs::read_dir(&out).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "clean stop left {name}");
        if let Some(stem) = name
            .strip_suffix(".quarantine.parquet")
            .or(name.strip_suffix(".parquet"))
        {
            let manifest = out.join(format!("{stem}.manifest.json"));
            assert!(
                manifest.exists(),
                "{name} has no manifest: it looks complete but is not"
            );
        }
    }
    assert!(count_manifests(&out) < 12);
}

#[test]
fn inspect_reads_back_what_the_run_reported() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    let out = dir.path().join("out");
    corpus(&corpus_dir, 100, 2, 12, 96);
    let file = pipeline(
        dir.path(),
        "p.yaml",
        &standard_pipeline(&corpus_dir, &out, ""),
    );
    run_ok(&["run", "--quiet", file.to_str().unwrap()]);
    let r = report(&out);
    let json = run_ok(&["inspect", "--json", out.to_str().unwrap()]).stdout;
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["rows_out"], r["rows_out"]);
    assert_eq!(v["rows_quarantined"], r["rows_quarantined"]);
    assert_eq!(v["quarantine_reasons"], r["quarantine_reasons"]);
    assert_eq!(v["shards"].as_array().unwrap().len(), 2);
    let width = v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "width")
        .expect("width summary");
    assert!(width["min"].as_f64().unwrap() >= 48.0 && width["max"].as_f64().unwrap() <= 96.0);
    let image = v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "image")
        .unwrap();
    assert!(image["stored_bytes"].as_u64().unwrap() > 0);
    let text = String::from_utf8(run_ok(&["inspect", out.to_str().unwrap()]).stdout).unwrap();
    assert!(
        text.contains("part-00001") && text.contains("quarantine reasons"),
        "{text}"
    );
}

#[test]
fn the_demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let res = run_ok(&[
        "demo",
        "--engine",
        "--rows",
        "120",
        "--shards",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(stdout.contains("invariant holds"), "{stdout}");
    let r = report(&out.join("enriched"));
    assert_eq!(r["rows_in"], 120);
    assert_eq!(r["invariant_holds"], true);
    assert!(
        r["rows_quarantined"].as_u64().unwrap() > 0,
        "the demo corpus has bad rows"
    );
    check_quarantine_matches_ground_truth(&out.join("corpus"), &out.join("enriched"));
}

#[test]
fn the_enrichment_pipeline_runs_on_a_generated_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    let out = dir.path().join("out");
    corpus_with(&corpus_dir, 96, 2, 21, 96, GenLayout::Bytes, 0.1);
    let enrich = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/enrich.yaml");
    run_ok(&[
        "run",
        "--quiet",
        "--input",
        corpus_dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        enrich.to_str().unwrap(),
    ]);
    let r = report(&out);
    assert_eq!(r["rows_in"], 96);
    assert_eq!(r["invariant_holds"], true, "{r}");
    check_quarantine_matches_ground_truth(&corpus_dir, &out);
    let mut generated = 0;
    for shard in shard_files(&out) {
        let b = read_parquet(&shard);
        for column in [
            "caption_final",
            "pseudo_label",
            "pseudo_prob",
            "text_feature",
            "clip_similarity",
            "pseudo_weight",
        ] {
            let col = b
                .column_by_name(column)
                .unwrap_or_else(|| panic!("no {column}"));
            assert_eq!(
                col.null_count(),
                0,
                "{column} has nulls in {}",
                shard.display()
            );
        }
        let missing = b
            .column_by_name("caption_missing")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::BooleanArray>()
            .unwrap()
            .clone();
        for (i, source) in strings(&b, "caption_source").iter().enumerate() {
            let expect = if missing.value(i) {
                "generated"
            } else {
                "given"
            };
            assert_eq!(source.as_deref(), Some(expect), "row {i}");
            generated += usize::from(missing.value(i));
        }
        let weights = b.column_by_name("pseudo_weight").unwrap();
        let weights = weights.as_primitive::<arrow::datatypes::Float32Type>();
        assert!(weights.values().iter().all(|w| (0.0..=1.0).contains(w)));
    }
    assert!(
        generated > 0,
        "the corpus has missing captions for the captioner"
    );
}

/// One pipeline's output folder is the next one's input: folders and globs skip the
/// quarantine shards written beside the outputs (an explicit file is still read).
#[test]
fn an_output_folder_feeds_the_next_pipeline_without_its_quarantine() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    corpus(&corpus_dir, 120, 2, 5, 96);
    let file = pipeline(
        dir.path(),
        "first.yaml",
        &standard_pipeline(&corpus_dir, &first, ""),
    );
    run_ok(&["run", "--quiet", file.to_str().unwrap()]);
    let r1 = report(&first);
    assert!(r1["rows_quarantined"].as_u64().unwrap() > 0);
    assert!(std::fs::read_dir(&first).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".quarantine.parquet")
    }));
    for input in [
        first.display().to_string(),
        format!("{}/*.parquet", first.display()),
    ] {
        let yaml = standard_pipeline(Path::new(&input), &second, "");
        let file = pipeline(dir.path(), "second.yaml", &yaml);
        run_ok(&["run", "--quiet", "--force", file.to_str().unwrap()]);
        let r2 = report(&second);
        assert_eq!(r2["rows_in"], r1["rows_out"], "input {input}");
        assert_eq!(r2["shards"].as_array().unwrap().len(), 2);
    }
}
