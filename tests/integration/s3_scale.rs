//! Object stores as users have them, against a real S3 server (moto_server on
//! 127.0.0.1, and scripts/s3_proxy.py in front of it where latency or faults matter):
//! keys with any character, Hive-style folders, a part that reads only its own shards,
//! and a share of failed requests that changes nothing in the outputs.

use std::path::{Path, PathBuf};

use crate::common::*;
use trustflow_testutil::s3::{ProxyOptions, S3Server, url_key};

const BUCKET: &str = "corpora";

/// clean_caption only, so outputs are written fast.
fn caption_pipeline(dir: &Path, name: &str, input: &str, out: &str) -> PathBuf {
    pipeline(
        dir,
        name,
        &format!(
            "source:\n  paths: [\"{input}\"]\nstages:\n  - type: clean_caption\nsink:\n  path: \"{out}\"\nruntime:\n  batch_size: 16\n"
        ),
    )
}

/// Every `.parquet` file under `dir`, by its path relative to `dir`.
fn outputs_tree(dir: &Path) -> Vec<(String, arrow::array::RecordBatch)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, arrow::array::RecordBatch)>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                let name = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push((name, read_parquet(&path)));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Download every object under `prefix/` into `dir`, keeping relative paths.
fn fetch_tree(server: &S3Server, prefix: &str, dir: &Path) {
    for key in server.keys(BUCKET, &url_key(&format!("{prefix}/"))) {
        let relative = key.strip_prefix(&format!("{prefix}/")).unwrap();
        let target = dir.join(relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let bytes = server.get(BUCKET, &url_key(&key)).expect("listed key");
        std::fs::write(target, bytes).unwrap();
    }
}

/// Upload every file under `dir` to `prefix/`, keeping relative paths.
fn put_tree(server: &S3Server, prefix: &str, dir: &Path) {
    fn walk(server: &S3Server, prefix: &str, root: &Path, dir: &Path) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(server, prefix, root, &path);
            } else {
                let relative = path.strip_prefix(root).unwrap().to_string_lossy();
                let key = format!("{prefix}/{relative}");
                server.put(BUCKET, &url_key(&key), &std::fs::read(&path).unwrap());
            }
        }
    }
    walk(server, prefix, dir, dir);
}

/// A small corpus whose shards are then moved to `names` (relative paths, in order).
fn corpus_named(dir: &Path, names: &[&str], seed: u64) {
    let generated = dir.with_extension("generated");
    corpus(&generated, 12 * names.len(), names.len(), seed, 56);
    for (file, name) in shard_files(&generated).into_iter().zip(names) {
        let target = dir.join(name);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::rename(file, target).unwrap();
    }
    std::fs::remove_dir_all(generated).unwrap();
}

#[test]
fn keys_with_every_character_class_round_trip() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    // Spaces, non-ASCII, `+`, `=`, `%`, `#`, `?`, and glob characters, in folder and
    // file names alike.
    let names = [
        "part 00.parquet",
        "a+b=c.parquet",
        "100%.parquet",
        "hash#1.parquet",
        "why?.parquet",
        "star*[1].parquet",
        "déjà vu/été.parquet",
    ];
    let local = dir.path().join("année 2024");
    corpus_named(&local, &names, 5);
    put_tree(&server, "raw/année 2024", &local);

    let local_out = dir.path().join("local-out");
    let p = caption_pipeline(
        dir.path(),
        "local.yaml",
        local.to_str().unwrap(),
        local_out.to_str().unwrap(),
    );
    run_ok(&["run", "--quiet", p.to_str().unwrap()]);

    let out_prefix = "out/é t+=%#?";
    let remote = caption_pipeline(
        dir.path(),
        "remote.yaml",
        "s3://corpora/raw/année 2024",
        &format!("s3://corpora/{out_prefix}"),
    );
    let first = run_ok_with(
        trustflow(&server),
        &["run", "--quiet", remote.to_str().unwrap()],
    );
    let fetched = dir.path().join("fetched");
    fetch_tree(&server, out_prefix, &fetched);
    let got = outputs_tree(&fetched);
    assert_eq!(got.len(), 2 * names.len(), "{}", text(&first));
    assert_eq!(got, outputs_tree(&local_out));

    let again = run_ok_with(
        trustflow(&server),
        &["run", "--quiet", remote.to_str().unwrap()],
    );
    assert_contains(
        &text(&again),
        &[&format!("0 shard(s) processed, {} skipped", names.len())],
    );
}

#[test]
fn a_hive_corpus_runs_from_its_root_locally_and_on_s3_and_keeps_its_layout() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("hive");
    // The same file name in several partitions, as Spark and pyarrow write them, plus
    // what a recursive search must pass over.
    corpus_named(
        &root,
        &[
            "year=2024/month=05/part-0.parquet",
            "year=2024/month=06/part-0.parquet",
            "year=2025/month=01/part-0.parquet",
            "_temporary/0/part-0.parquet",
            ".staging/part-0.parquet",
        ],
        9,
    );
    std::fs::write(root.join("_SUCCESS"), b"").unwrap();
    std::fs::write(root.join("year=2024/_SUCCESS"), b"").unwrap();
    put_tree(&server, "hive", &root);
    let expected = [
        "year=2024/month=05/part-0",
        "year=2024/month=06/part-0",
        "year=2025/month=01/part-0",
    ];

    let local_out = dir.path().join("out");
    let p = caption_pipeline(
        dir.path(),
        "local.yaml",
        root.to_str().unwrap(),
        local_out.to_str().unwrap(),
    );
    let first = run_ok(&["run", "--quiet", p.to_str().unwrap()]);
    for stem in expected {
        for suffix in [".parquet", ".quarantine.parquet", ".manifest.json"] {
            let file = local_out.join(format!("{stem}{suffix}"));
            assert!(
                file.is_file(),
                "{} missing: {}",
                file.display(),
                text(&first)
            );
        }
    }
    let report = report(&local_out);
    assert_eq!(report["shards_processed"], 3, "{report}");
    let again = run_ok(&["run", "--quiet", p.to_str().unwrap()]);
    assert_contains(&text(&again), &["0 shard(s) processed, 3 skipped"]);
    let inspected = run_ok(&["inspect", local_out.to_str().unwrap()]);
    assert_contains(&text(&inspected), &expected);
    assert!(
        !text(&inspected).contains("unfinished"),
        "{}",
        text(&inspected)
    );

    let remote = caption_pipeline(
        dir.path(),
        "remote.yaml",
        "s3://corpora/hive",
        "s3://corpora/hive-out",
    );
    run_ok_with(
        trustflow(&server),
        &["run", "--quiet", remote.to_str().unwrap()],
    );
    let fetched = dir.path().join("fetched");
    fetch_tree(&server, "hive-out", &fetched);
    assert_eq!(outputs_tree(&fetched), outputs_tree(&local_out));
    let again = run_ok_with(
        trustflow(&server),
        &["run", "--quiet", remote.to_str().unwrap()],
    );
    assert_contains(&text(&again), &["0 shard(s) processed, 3 skipped"]);
}

#[test]
fn a_part_given_its_shards_reads_only_their_footers_and_lists_no_source() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("corpus");
    corpus(&local, 12 * 8, 8, 13, 56);
    server.put_dir(BUCKET, "raw", &local);
    let p = caption_pipeline(dir.path(), "p.yaml", "s3://corpora/raw", "s3://corpora/out");

    let planned = run_ok_with(trustflow(&server), &["plan", p.to_str().unwrap()]);
    let plan: serde_json::Value = serde_json::from_slice(&planned.stdout).unwrap();
    let own: Vec<serde_json::Value> = plan["shards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["index"].as_u64().unwrap() % 4 == 1)
        .cloned()
        .collect();
    assert_eq!(own.len(), 2);
    let list = dir.path().join("part-1.json");
    let write_list = |hash: &serde_json::Value| {
        let body = serde_json::json!({"pipeline_hash": hash, "part": [1, 4], "shards": own});
        std::fs::write(&list, body.to_string()).unwrap();
    };
    write_list(&plan["pipeline_hash"]);
    let report_path = dir.path().join("part-1-report.json");
    run_ok_with(
        trustflow(&server),
        &[
            "run",
            "--quiet",
            p.to_str().unwrap(),
            "--shards",
            list.to_str().unwrap(),
            "--report",
            report_path.to_str().unwrap(),
        ],
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(report["shards_processed"], 2, "{report}");
    let storage = &report["storage"];
    // Three listings, neither of the source nor of the whole output: one key under the
    // output prefix at planning (the bucket exists), the writers' leases (docs/safety.md,
    // 5) and the upload records; a part asks for its own shards' files.
    assert_eq!(storage["lists"], 3, "{storage}");
    // One ranged GET per own shard: its footer (the data comes in one whole GET).
    assert_eq!(storage["ranged_gets"], 2, "{storage}");
    let inputs: Vec<&str> = report["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["input"].as_str().unwrap())
        .collect();
    let wanted: Vec<&str> = own.iter().map(|s| s["input"].as_str().unwrap()).collect();
    assert_eq!(inputs, wanted);

    // `--part 1/4` reads every footer to find its own.
    let part_report = dir.path().join("part-report.json");
    run_ok_with(
        trustflow(&server),
        &[
            "run",
            "--quiet",
            "--force",
            p.to_str().unwrap(),
            "--part",
            "1/4",
            "--report",
            part_report.to_str().unwrap(),
        ],
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&part_report).unwrap()).unwrap();
    assert_eq!(report["storage"]["ranged_gets"], 8, "{report}");

    // A list planned for another pipeline is refused before any work.
    write_list(&serde_json::json!("0000"));
    let refused = trustflow(&server)
        .args([
            "run",
            "--quiet",
            p.to_str().unwrap(),
            "--shards",
            list.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    // Exit 2: retrying cannot help (the cluster runner does not retry it).
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert_contains(&text(&refused), &["part-1.json", "plan again"]);
}

#[test]
fn failed_requests_are_retried_and_change_nothing() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("corpus");
    corpus(&local, 12 * 6, 6, 17, 56);
    server.put_dir(BUCKET, "raw", &local);
    let reference = caption_pipeline(
        dir.path(),
        "ref.yaml",
        "s3://corpora/raw",
        "s3://corpora/ref",
    );
    run_ok_with(
        trustflow(&server),
        &["run", "--quiet", reference.to_str().unwrap()],
    );

    // 5% of every request class fails before reaching the store: 503 SlowDown or a
    // reset connection. Retries start at 100 ms, so the run takes a few seconds longer.
    let mut proxy = server.behind_proxy(&ProxyOptions {
        delay_ms: 2,
        fail_share: 0.05,
        fail_kinds: "slowdown,reset".into(),
        seed: 3,
    });
    let faulty = caption_pipeline(
        dir.path(),
        "faulty.yaml",
        "s3://corpora/raw",
        "s3://corpora/faulty",
    );
    let mut command = bin();
    proxy.configure(&mut command);
    let first = run_ok_with(command, &["run", "--quiet", faulty.to_str().unwrap()]);
    let stats = proxy.stop();
    let failed = stats["failed_slowdown"].as_u64().unwrap_or(0)
        + stats["failed_reset"].as_u64().unwrap_or(0);
    assert!(failed > 0, "no request failed: {stats}; {}", text(&first));

    let (want, got) = (dir.path().join("want"), dir.path().join("got"));
    fetch_tree(&server, "ref", &want);
    fetch_tree(&server, "faulty", &got);
    assert_eq!(outputs_tree(&got), outputs_tree(&want));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(got.join("_report.json")).unwrap()).unwrap();
    assert!(
        report["storage"]["retried_failures"].as_u64().unwrap() > 0,
        "retries not counted: {}",
        report["storage"]
    );
    assert!(
        server.pending_uploads(BUCKET).is_empty(),
        "dangling multipart uploads"
    );
}

#[test]
fn one_file_reached_by_a_folder_and_a_glob_is_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 24, 2, 31, 56);
    let out = dir.path().join("out");
    // Two spellings of the same files: the folder, and a glob through `./`.
    let p = pipeline(
        dir.path(),
        "p.yaml",
        &format!(
            "source:\n  paths: [\"corpus\", \"./corpus/*.parquet\"]\nstages:\n  - type: clean_caption\nsink:\n  path: \"{}\"\n",
            out.display()
        ),
    );
    let run = run_ok(&["run", "--quiet", p.to_str().unwrap()]);
    assert_contains(&text(&run), &["2 shard(s) processed"]);
}

/// Listings are the engine's own ListObjectsV2 requests: a prefix of more than one page
/// (1,000 keys) is followed to its end with continuation tokens, and a listing that
/// fails (503 SlowDown, or a reset connection) is retried, not fatal.
#[test]
fn listings_follow_every_page_and_retry_failures() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("corpus");
    corpus(&local, 40, 2, 5, 48);
    // 1,001 other objects sort before the shards, so these are on the second page.
    for i in 0..1001 {
        server.put(BUCKET, &format!("paged/a-{i:04}.txt"), b"x");
    }
    server.put_dir(BUCKET, "paged/z", &local);
    let p = caption_pipeline(
        dir.path(),
        "p.yaml",
        "s3://corpora/paged",
        "s3://corpora/out",
    );
    let listings = |message: &str| -> u64 {
        let at = message
            .find(" listing(s)")
            .unwrap_or_else(|| panic!("no listing count in {message}"));
        let digits: String = message[..at]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.chars().rev().collect::<String>().parse().unwrap()
    };
    let out = run_ok_with(trustflow(&server), &["validate", p.to_str().unwrap()]);
    let message = text(&out);
    assert_contains(&message, &["source: 2 shard(s), 40 rows"]);
    // Two pages of the source, one request for the output prefix.
    assert_eq!(listings(&message), 3, "{message}");

    // Seed 1 fails the first request through the proxy (the source's first page) and
    // lets its retry through.
    for kind in ["slowdown", "reset"] {
        let mut proxy = server.behind_proxy(&ProxyOptions {
            delay_ms: 1,
            fail_share: 0.5,
            fail_kinds: kind.into(),
            seed: 1,
        });
        let mut command = bin();
        proxy.configure(&mut command);
        let out = run_ok_with(command, &["validate", p.to_str().unwrap()]);
        let stats = proxy.stop();
        let message = text(&out);
        assert_contains(&message, &["source: 2 shard(s), 40 rows"]);
        assert!(
            listings(&message) > 3,
            "{kind}: no listing retried: {message}"
        );
        assert!(
            stats[format!("failed_{kind}")].as_u64().unwrap_or(0) > 0,
            "{stats}"
        );
    }
}
