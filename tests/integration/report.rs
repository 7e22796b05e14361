//! `trustflow report`: the page of a small run with hostile rows (markup in captions
//! and ids, a decompression bomb, corrupt images), rendered in headless Chromium by
//! scripts/browser_check.py. The page must load with no console error, show the
//! invariant, the reason table and pictures that decoded, and run none of the markup.

use crate::common;

use std::sync::Arc;

use arrow::array::{ArrayRef, LargeBinaryArray, RecordBatch, StringArray};

/// Captions and ids that would run script if the page pasted them in as HTML.
const HOSTILE_CAPTIONS: [&str; 3] = [
    "<script>window.__pwned=1</script>a cat on a mat",
    "<img src=x onerror=\"window.__pwned=2\">a dog",
    "\"><svg onload=window.__pwned=3>a bird",
];

/// A PNG header claiming 60,000 x 60,000 pixels: refused from the header by the
/// decode stage and by the report's thumbnailer alike.
fn png_bomb() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    png.extend_from_slice(&60_000u32.to_be_bytes());
    png.extend_from_slice(&60_000u32.to_be_bytes());
    png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    png.extend_from_slice(b"\0\0\0\0IEND\xae\x42\x60\x82");
    png
}

/// A shard shaped like the generated ones (same schema): four of their rows with
/// hostile captions and ids, the last with a bomb for an image. Named to sort first,
/// so its rows lead the report's sample gallery.
fn write_hostile_shard(corpus: &std::path::Path) {
    let first = std::fs::read_dir(corpus)
        .expect("corpus")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .min()
        .expect("a shard");
    let rows = common::read_parquet(&first).slice(0, 4);
    let schema = rows.schema();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .zip(rows.columns())
        .map(|(field, column)| -> ArrayRef {
            match field.name().as_str() {
                "caption" => Arc::new(StringArray::from(vec![
                    HOSTILE_CAPTIONS[0],
                    HOSTILE_CAPTIONS[1],
                    HOSTILE_CAPTIONS[2],
                    "<script>window.__pwned=4</script>the bomb",
                ])),
                "id" => Arc::new(StringArray::from(vec![
                    "<b>id-0</b>",
                    "id-1'\"",
                    "id-2<!--",
                    "<script>window.__pwned=5</script>",
                ])),
                "image" => {
                    let images = column
                        .as_any()
                        .downcast_ref::<arrow::array::BinaryArray>()
                        .map(|b| (0..3).map(|i| b.value(i).to_vec()).collect::<Vec<_>>())
                        .or_else(|| {
                            column
                                .as_any()
                                .downcast_ref::<LargeBinaryArray>()
                                .map(|b| (0..3).map(|i| b.value(i).to_vec()).collect::<Vec<_>>())
                        })
                        .expect("a binary image column");
                    let mut all: Vec<Vec<u8>> = images;
                    all.push(png_bomb());
                    let values: Vec<&[u8]> = all.iter().map(Vec::as_slice).collect();
                    arrow::compute::cast(&LargeBinaryArray::from(values), column.data_type())
                        .expect("cast back to the corpus' binary type")
                }
                _ => column.clone(),
            }
        })
        .collect();
    let batch = RecordBatch::try_new(schema, columns).expect("hostile batch");
    common::write_parquet(&corpus.join("000-hostile.parquet"), &batch);
}

/// decode -> clean_caption over `corpus`, into `dir/out`.
fn run_standard_pipeline(dir: &std::path::Path, corpus: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("out");
    let pipeline = common::pipeline(dir, "p.yaml", &common::standard_pipeline(corpus, &out, ""));
    common::run_ok(&["run", "--quiet", pipeline.to_str().expect("utf8")]);
    out
}

#[test]
fn the_report_renders_in_a_browser_and_runs_no_caption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = dir.path().join("corpus");
    let summary = common::corpus(&corpus, 120, 2, 11, 96);
    write_hostile_shard(&corpus);
    let out = run_standard_pipeline(dir.path(), &corpus);

    let page = dir.path().join("page/report.html");
    let res = common::run_ok(&[
        "report",
        out.to_str().expect("utf8"),
        "--html",
        page.to_str().expect("utf8"),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&res.stdout).expect("JSON summary");
    assert_eq!(
        report["totals"]["rows_in"],
        summary.rows as u64 + 4,
        "{report}"
    );
    assert_eq!(report["totals"]["invariant_holds"], true);
    assert_eq!(
        report["budget"]["output_rows_read"], report["budget"]["output_rows_total"],
        "a small folder is read whole"
    );
    let reasons = report["quarantine"].as_array().expect("reasons");
    let bomb = reasons
        .iter()
        .find(|r| r["reason"].as_str().is_some_and(|r| r.contains("pixels")))
        .unwrap_or_else(|| panic!("the bomb's reason in {reasons:?}"));
    let sample = &bomb["samples"][0];
    assert!(sample["thumbnail"].is_null(), "{sample}");
    assert!(
        sample["no_thumbnail"]
            .as_str()
            .is_some_and(|why| why.contains("pixels")),
        "the thumbnailer refuses the bomb from its header too: {sample}"
    );
    let html = std::fs::read_to_string(&page).expect("page");
    assert!(!html.contains("<script>window"), "markup is escaped");
    assert!(html.contains("&lt;script&gt;window.__pwned=1&lt;/script&gt;"));
    assert_eq!(
        html.matches("<script>").count(),
        1,
        "only the page's own script"
    );

    let shot = dir.path().join("page/report.png");
    let Some(seen) = common::browser_check(
        &page,
        &shot,
        &[
            (
                "invariant",
                "document.getElementById('invariant').textContent",
            ),
            (
                "reasons",
                "document.querySelectorAll('#reasons tbody tr').length",
            ),
            (
                "loaded",
                "Array.from(document.querySelectorAll('.gallery img'))\
                 .filter(i => i.complete && i.naturalWidth > 0).length",
            ),
            ("pwned", "typeof window.__pwned"),
            ("text", "document.body.innerText"),
            (
                "injected",
                "document.querySelectorAll('svg[onload], img[onerror], b').length",
            ),
            (
                "sorted",
                "(document.querySelector('#reasons th').click(), 'ok')",
            ),
        ],
    ) else {
        return;
    };
    assert_eq!(seen["errors"], serde_json::json!([]), "{seen}");
    let evals = &seen["evals"];
    assert!(
        evals["invariant"]
            .as_str()
            .is_some_and(|t| t.contains("Every row is accounted for")),
        "{evals}"
    );
    assert!(evals["reasons"].as_u64().is_some_and(|n| n >= 2), "{evals}");
    assert!(evals["loaded"].as_u64().is_some_and(|n| n >= 1), "{evals}");
    assert_eq!(evals["pwned"], "undefined", "no caption or id ran");
    assert_eq!(evals["injected"], 0, "no caption became an element");
    assert_eq!(evals["sorted"], "ok");
    let text = evals["text"].as_str().expect("text");
    for caption in HOSTILE_CAPTIONS {
        assert!(text.contains(caption), "shown as text: {caption}");
    }
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
}

/// On a folder larger than `--max-rows`, the report reads only that many output rows,
/// as whole row groups spread over the shards, and says so.
#[test]
fn the_report_reads_within_its_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = dir.path().join("corpus");
    common::corpus(&corpus, 200, 5, 3, 64);
    let out = run_standard_pipeline(dir.path(), &corpus);
    let res = common::run_ok(&["report", out.to_str().expect("utf8"), "--max-rows", "60"]);
    let report: serde_json::Value = serde_json::from_slice(&res.stdout).expect("JSON summary");
    let budget = &report["budget"];
    let read = budget["output_rows_read"].as_u64().expect("read");
    let total = budget["output_rows_total"].as_u64().expect("total");
    assert!(read <= 60 && read > 0 && total > 150, "{budget}");
    assert!(
        budget["row_groups_read"].as_u64() < budget["row_groups_total"].as_u64(),
        "{budget}"
    );
    // Counts still come whole from the manifests.
    assert_eq!(report["totals"]["rows_in"], 200);
    let html = std::fs::read_to_string(out.join("report.html")).expect("default page path");
    assert!(html.contains("a sample spread over the folder"));
}

/// A missing folder is refused with its path in the message, not a panic.
#[test]
fn the_report_of_a_missing_folder_names_it() {
    let out = common::bin()
        .args(["report", "/nonexistent/trustflow-out"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/trustflow-out"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Quarantine shards keep their input's own column names (img2dataset: `key`, `txt`,
/// `jpg`); the manifest says which is which, so the report's samples still show the
/// id, the caption and the image's fate.
#[test]
fn quarantine_samples_follow_the_input_names() {
    use trustflow::bench::corpus::GenLayout;
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = dir.path().join("corpus");
    common::corpus_with(&corpus, 60, 1, 5, 64, GenLayout::Img2dataset, 0.2);
    let out = dir.path().join("out");
    let pipeline = common::pipeline(
        dir.path(),
        "p.yaml",
        &common::standard_pipeline(&corpus, &out, "  preset: img2dataset\n"),
    );
    common::run_ok(&["run", "--quiet", pipeline.to_str().expect("utf8")]);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("part-00000.manifest.json")).expect("manifest"),
    )
    .expect("JSON");
    assert_eq!(manifest["source_columns"]["id"], "key", "{manifest}");
    let res = common::run_ok(&["report", out.to_str().expect("utf8")]);
    let report: serde_json::Value = serde_json::from_slice(&res.stdout).expect("JSON summary");
    let samples: Vec<&serde_json::Value> = report["quarantine"]
        .as_array()
        .expect("reasons")
        .iter()
        .flat_map(|r| r["samples"].as_array().expect("samples"))
        .collect();
    assert!(!samples.is_empty(), "{report}");
    for s in samples {
        assert!(s["id"].is_string(), "{s}");
        assert!(s["caption"].is_string() || s["caption"].is_null(), "{s}");
        let why = s["no_thumbnail"].as_str().unwrap_or("");
        assert!(
            !why.contains("no image column"),
            "the image column was found: {s}"
        );
    }
}

/// A truncated manifest is not a finished shard, and not silently an unfinished one
/// either: `report` and `inspect` name it with the parse error.
#[test]
fn a_corrupt_manifest_is_shown_with_its_parse_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = dir.path().join("corpus");
    common::corpus(&corpus, 40, 2, 3, 64);
    let out = run_standard_pipeline(dir.path(), &corpus);
    let manifest = out.join("part-00001.manifest.json");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(&manifest, &text[..text.len() / 2]).expect("truncate");
    let res = common::run_ok(&["report", out.to_str().expect("utf8")]);
    let report: serde_json::Value = serde_json::from_slice(&res.stdout).expect("JSON summary");
    let corrupt = report["corrupt_manifests"].as_array().expect("a list");
    assert_eq!(corrupt.len(), 1, "{report}");
    assert_eq!(corrupt[0]["manifest"], "part-00001.manifest.json");
    assert!(
        corrupt[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("EOF while parsing")),
        "{corrupt:?}"
    );
    let html = std::fs::read_to_string(out.join("report.html")).expect("html");
    assert!(html.contains("Corrupt manifest part-00001.manifest.json"));
    let text = common::run_ok(&["inspect", out.to_str().expect("utf8")]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("corrupt manifest (the shard is not finished; a rerun redoes it): part-00001.manifest.json: EOF while parsing"),
        "{text}"
    );
}
