//! The engine's safety contract as a fault suite (docs/safety.md): whatever a user
//! does, no row and no input file is lost, and nothing half-written carries a final
//! name. Each test is a mistake or a fault a real run meets. A longer kill soak runs
//! with TRUSTFLOW_SOAK=N (N kills; default 3).

use crate::common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Int32Array, Int64Array, LargeBinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use sha2::{Digest, Sha256};

/// Content hash of every file under `dir`, by relative path.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            out.insert(
                path.strip_prefix(dir).unwrap().to_path_buf(),
                format!("{:x}", Sha256::digest(&bytes)),
            );
        }
    }
    out
}

fn fails_with(args: &[&str], needles: &[&str]) -> String {
    fails_with_code(1, args, needles)
}

fn fails_with_code(code: i32, args: &[&str], needles: &[&str]) -> String {
    let out = bin().args(args).output().expect("run trustflow");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert_contains(&stderr, needles);
    stderr
}

fn small_corpus(dir: &Path) -> PathBuf {
    let corpus_dir = dir.join("corpus");
    corpus(&corpus_dir, 40, 2, 3, 64);
    corpus_dir
}

#[test]
fn an_output_folder_over_the_inputs_is_refused_by_validate_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = small_corpus(dir.path());
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::os::unix::fs::symlink(&corpus_dir, dir.path().join("link")).unwrap();
    let before = snapshot(&corpus_dir);
    let p = pipeline(
        dir.path(),
        "p.yaml",
        &standard_pipeline(&corpus_dir, &dir.path().join("unused"), ""),
    );
    let p = p.to_str().unwrap();
    let same = corpus_dir.display().to_string();
    let dotted = dir.path().join("sub/../corpus").display().to_string();
    let linked = dir.path().join("link").display().to_string();
    let inside = corpus_dir.join("out").display().to_string();
    let around = dir.path().display().to_string();
    for out in [&same, &dotted, &linked, &inside, &around] {
        for verb in ["validate", "run"] {
            fails_with(&[verb, p, "--out", out], &["the output folder", "corpus"]);
        }
    }
    assert_eq!(snapshot(&corpus_dir), before, "an input file changed");
}

#[test]
fn inputs_whose_output_names_collide_are_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = small_corpus(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    // A shard named like another's quarantine shard.
    std::fs::copy(
        corpus_dir.join("part-00000.parquet"),
        other.join("part-00000.quarantine.parquet"),
    )
    .unwrap();
    let a = corpus_dir.join("part-00000.parquet");
    let b = other.join("part-00000.quarantine.parquet");
    let yaml = format!(
        "source:\n  paths: [\"{}\", \"{}\"]\nsink:\n  path: \"{}\"\n",
        a.display(),
        b.display(),
        dir.path().join("out").display()
    );
    let p = pipeline(dir.path(), "p.yaml", &yaml);
    for verb in ["validate", "run"] {
        fails_with(
            &[verb, p.to_str().unwrap()],
            &[&a.display().to_string(), &b.display().to_string()],
        );
    }
    assert!(
        !dir.path().join("out").exists(),
        "refused runs write nothing"
    );
}

/// Take the output lock from this test process. Other tests of this binary fork
/// children concurrently, and a child holds a copy of every open descriptor, our lock
/// file's included, until it execs: a lock just released can stay held for that
/// instant, so this waits for it (a real second process has no such window).
fn lock_eventually(
    out: &Path,
    part: Option<(usize, usize)>,
) -> trustflow_engine::sink::lock::OutputLock {
    let started = std::time::Instant::now();
    loop {
        match trustflow_engine::sink::lock::lock_output(out, part) {
            Ok(lock) => return lock,
            Err(e) if started.elapsed() > std::time::Duration::from_secs(10) => panic!("{e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

#[test]
fn a_second_writer_is_refused_while_the_folder_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = small_corpus(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let p = pipeline(
        dir.path(),
        "p.yaml",
        &standard_pipeline(&corpus_dir, &out, ""),
    );
    let p = p.to_str().unwrap();
    // This process plays the first writer.
    let held = lock_eventually(&out, None);
    let pid = format!("pid {}", std::process::id());
    // Exit 2: another run writes the folder, so retrying at once cannot help.
    fails_with_code(
        2,
        &["run", "--quiet", p],
        &["in use by another trustflow run", &pid],
    );
    fails_with_code(2, &["run", "--quiet", "--part", "0/2", p], &[&pid]);
    drop(held);
    // Parts of one job share the folder; together they write every shard.
    let part = lock_eventually(&out, Some((1, 2)));
    run_ok(&["run", "--quiet", "--part", "0/2", p]);
    fails_with_code(
        2,
        &["run", "--quiet", "--part", "1/2", p],
        &["part 1/2", &pid],
    );
    drop(part);
    run_ok(&["run", "--quiet", "--part", "1/2", p]);
    assert_eq!(count_manifests(&out), 2);
}

#[test]
fn a_full_disk_leaves_no_temporary_or_uncommitted_file() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 120, 3, 5, 160);
    let out = dir.path().join("out");
    let reference = dir.path().join("reference");
    let p = pipeline(
        dir.path(),
        "p.yaml",
        &standard_pipeline(&corpus_dir, &out, ""),
    );
    let p = p.to_str().unwrap();
    run_ok(&["run", "--quiet", "--out", reference.to_str().unwrap(), p]);
    // Files may not grow past 64 KiB: writes fail with EFBIG, as on a full disk
    // (SIGXFSZ ignored, as a disk-full error is not a signal).
    let script = format!(
        "trap '' XFSZ; ulimit -f 128; exec \"{}\" run --quiet \"{p}\"",
        env!("CARGO_BIN_EXE_trustflow")
    );
    let status = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(!status.status.success(), "the limit did not bite");
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".tmp")),
        "temporary files left: {names:?}"
    );
    for name in names.iter().filter(|n| n.ends_with(".parquet")) {
        let stem = name
            .trim_end_matches(".parquet")
            .trim_end_matches(".quarantine");
        assert!(
            names.contains(&format!("{stem}.manifest.json")),
            "{name} carries a final name without its manifest: {names:?}"
        );
    }
    run_ok(&["run", "--quiet", p]);
    assert_eq!(all_outputs(&out), all_outputs(&reference));
}

#[test]
fn random_kills_rerun_to_the_uninterrupted_outputs() {
    let kills: usize = std::env::var("TRUSTFLOW_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let (file, out, reference) = slow_corpus_with_reference(dir.path());
    let want = all_outputs(&reference);
    // Kill points spread over the run, the same every time (no flakiness, no seed).
    for k in 0..kills {
        let after = 1 + (k * 7) % 10;
        if count_manifests(&out) >= after {
            std::fs::remove_dir_all(&out).unwrap();
        }
        let status = interrupt(&file, &out, "-KILL", after);
        assert!(!status.success());
        run_ok(&["run", "--quiet", file.to_str().unwrap()]);
        assert_eq!(all_outputs(&out), want, "kill {k} after {after} shards");
        assert_eq!(report(&out)["invariant_holds"], true);
    }
}

fn write_shard(path: &Path, ids: Vec<Option<&str>>, extra: Arc<dyn arrow::array::Array>) {
    let n = ids.len();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("image", DataType::LargeBinary, true),
        Field::new("caption", DataType::Utf8, true),
        Field::new("extra", extra.data_type().clone(), true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(LargeBinaryArray::from_iter_values(
                (0..n).map(|_| b"x".to_vec()),
            )),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("a cat {i}")),
            )),
            extra,
        ],
    )
    .unwrap();
    write_parquet(path, &batch);
}

#[test]
fn kept_columns_of_different_types_are_refused_naming_both_shards() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_shard(
        &data.join("a.parquet"),
        vec![Some("1")],
        Arc::new(Int32Array::from(vec![1])),
    );
    write_shard(
        &data.join("b.parquet"),
        vec![Some("2")],
        Arc::new(Int64Array::from(vec![2])),
    );
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\n  keep_columns: [extra]\nsink:\n  path: \"{}\"\n",
        data.display(),
        dir.path().join("out").display()
    );
    let p = pipeline(dir.path(), "p.yaml", &yaml);
    fails_with(
        &["validate", p.to_str().unwrap()],
        &["a.parquet", "b.parquet", "`extra`", "Int32", "Int64"],
    );
}

#[test]
fn made_up_ids_never_equal_real_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // A real id that looks like the old made-up id of the null row, and one that
    // claims the reserved prefix.
    write_shard(
        &data.join("s.parquet"),
        vec![Some("s:1"), None, Some("~row:mine")],
        Arc::new(Int32Array::from(vec![0, 1, 2])),
    );
    let out = dir.path().join("out");
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\nsink:\n  path: \"{}\"\n",
        data.display(),
        out.display()
    );
    let p = pipeline(dir.path(), "p.yaml", &yaml);
    run_ok(&["run", "--quiet", p.to_str().unwrap()]);
    let kept = strings(&read_parquet(&out.join("s.parquet")), "id");
    assert_eq!(kept, vec![Some("s:1".to_string())]);
    let q = quarantined(&out);
    assert_eq!(q.len(), 2, "{q:?}");
    // As it came: the row without an id is still without one in the quarantine.
    assert!(q["<null id, row 0>"].1.contains("id is null"), "{q:?}");
    assert!(q["~row:mine"].1.contains("reserved"), "{q:?}");
}

/// Overwrite bytes inside the first data page of `shard`'s first column chunk, leaving
/// the footer intact: the file plans, and fails when its data is read.
fn corrupt_a_data_page(shard: &Path) {
    corrupt_row_group(shard, 0);
}

/// Overwrite bytes inside the first data page of the first column chunk of row group
/// `group` of `shard`, leaving the footer intact.
fn corrupt_row_group(shard: &Path, group: usize) {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(std::fs::File::open(shard).unwrap()).unwrap();
    let offset = reader
        .metadata()
        .row_group(group)
        .column(0)
        .data_page_offset() as usize;
    let mut bytes = std::fs::read(shard).unwrap();
    for b in &mut bytes[offset..offset + 24] {
        *b = 0xff;
    }
    std::fs::write(shard, bytes).unwrap();
}

#[test]
fn an_unreadable_shard_is_skipped_and_reported_or_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 90, 3, 9, 64);
    corrupt_a_data_page(&corpus_dir.join("part-00001.parquet"));
    // A shard whose footer is gone.
    std::fs::write(corpus_dir.join("part-00003.parquet"), b"PAR1 not really").unwrap();
    let out = dir.path().join("out");
    let p = pipeline(
        dir.path(),
        "p.yaml",
        &standard_pipeline(&corpus_dir, &out, ""),
    );
    let run = bin()
        .args(["run", "--quiet", p.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(3), "{stderr}");
    let r = report(&out);
    let unreadable: Vec<String> = r["unreadable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["input"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(unreadable.len(), 2, "{r}");
    assert!(unreadable.iter().any(|u| u.ends_with("part-00001.parquet")));
    assert!(unreadable.iter().any(|u| u.ends_with("part-00003.parquet")));
    // The readable shards are whole. The one with a corrupt page (its only row group)
    // is done with no rows and says so in its manifest; the one without a footer has
    // nothing committed.
    assert_eq!(count_manifests(&out), 3);
    assert!(!out.join("part-00003.parquet").exists());
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("part-00001.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["rows_in"], 0, "{manifest}");
    assert_eq!(manifest["skipped"][0]["row_group"], 0, "{manifest}");
    assert_eq!(r["invariant_holds"], true);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");

    // `on_unreadable: fail` stops the run, naming the file.
    let strict = pipeline(
        dir.path(),
        "strict.yaml",
        &standard_pipeline(
            &corpus_dir,
            &dir.path().join("out2"),
            "  on_unreadable: fail\n",
        ),
    );
    fails_with(
        &["run", "--quiet", strict.to_str().unwrap()],
        &["part-00003.parquet"],
    );
}

/// A shard with a corrupt data page in one row group of three: the rows of the other
/// two still flow (filtered or not), the skipped row group is in the manifest and the
/// report with its reason, the run exits 3, and a rerun keeps saying so.
#[test]
fn the_readable_row_groups_of_a_partly_corrupt_shard_still_flow() {
    use parquet::file::properties::WriterProperties;
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("generated");
    corpus(&generated, 30, 1, 21, 64);
    let rows = read_parquet(&generated.join("part-00000.parquet"));
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let shard = data.join("s.parquet");
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(10))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&shard).unwrap(),
        rows.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&rows).unwrap();
    w.close().unwrap();
    corrupt_row_group(&shard, 1);
    let all_ids = ids(&rows);
    let bad = planted_corruptions(&generated);
    let expected: Vec<&String> = all_ids
        .iter()
        .enumerate()
        .filter(|(i, id)| !(10..20).contains(i) && !bad.contains_key(*id))
        .map(|(_, id)| id)
        .collect();
    for (name, filter) in [("plain", ""), ("filtered", "  filter: \"id <> 'none'\"\n")] {
        let out = dir.path().join(name);
        let p = pipeline(
            dir.path(),
            &format!("{name}.yaml"),
            &standard_pipeline(&data, &out, filter),
        );
        for attempt in ["first", "rerun"] {
            let run = bin()
                .args(["run", "--quiet", p.to_str().unwrap()])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(run.status.code(), Some(3), "{name} {attempt}: {stderr}");
            let r = report(&out);
            let unreadable = r["unreadable"].as_array().unwrap();
            assert_eq!(unreadable.len(), 1, "{name} {attempt}: {r}");
            assert_eq!(unreadable[0]["row_group"], 1, "{r}");
            assert!(
                unreadable[0]["input"]
                    .as_str()
                    .unwrap()
                    .ends_with("s.parquet")
            );
            assert_eq!(r["invariant_holds"], true);
        }
        let got = ids(&read_parquet(&out.join("s.parquet")));
        assert_eq!(got.iter().collect::<Vec<_>>(), expected, "{name}");
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("s.manifest.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["rows_in"], 20, "{name}: {manifest}");
        assert_eq!(manifest["skipped"][0]["row_group"], 1, "{manifest}");
    }
}

#[test]
fn resume_verify_full_catches_an_edit_that_keeps_size_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let shard = data.join("s.parquet");
    // A column after the captions, big enough to push them out of the last 64 KiB
    // that the quick check hashes.
    let padding = LargeBinaryArray::from_iter_values((0..3u8).map(|i| vec![i; 100 << 10]));
    write_shard(
        &shard,
        vec![Some("a"), Some("b"), Some("c")],
        Arc::new(padding),
    );
    let run = |verify: &str, out: &str| -> serde_json::Value {
        let yaml = format!(
            "source:\n  paths: [\"{}\"]\nsink:\n  path: \"{}\"\nresume:\n  verify: {verify}\n",
            data.display(),
            dir.path().join(out).display()
        );
        let p = pipeline(dir.path(), &format!("{out}.yaml"), &yaml);
        run_ok(&["run", "--quiet", p.to_str().unwrap()]);
        report(&dir.path().join(out))
    };
    run("quick", "quick");
    run("full", "full");
    // The hash in the manifest is of the file's bytes, taken by the read that
    // processed them (no pass of its own); an unchanged rerun skips the shard.
    let manifest_hash = || -> String {
        let text = std::fs::read_to_string(dir.path().join("full/s.manifest.json")).unwrap();
        let m: serde_json::Value = serde_json::from_str(&text).unwrap();
        m["input_fingerprint"]["content_sha256"]
            .as_str()
            .expect("a whole-file hash")
            .to_string()
    };
    let file_hash = |path: &Path| format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()));
    assert_eq!(manifest_hash(), file_hash(&shard));
    assert_eq!(run("full", "full")["shards_skipped"], 1);
    // Edit a caption in the middle of the file, in place, and put the time back.
    let modified = std::fs::metadata(&shard).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes
        .windows(7)
        .position(|w| w == b"a cat 1")
        .expect("the caption is stored as plain bytes");
    bytes[at + 3] = b'o';
    std::fs::write(&shard, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    // The quick check trusts size, time and footer (documented); the full one sees it.
    assert_eq!(run("quick", "quick")["shards_skipped"], 1);
    let full = run("full", "full");
    assert_eq!(full["shards_processed"], 1, "{full}");
    let captions = strings(&read_parquet(&dir.path().join("full/s.parquet")), "caption");
    assert_eq!(captions[1].as_deref(), Some("a cot 1"));
    assert_eq!(manifest_hash(), file_hash(&shard), "the new content's hash");
}
