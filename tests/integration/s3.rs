//! Object stores, against a real S3 server (moto_server on 127.0.0.1, started and
//! stopped by each test): S3 to S3, local to S3 and back, kill -9 and rerun, a corrupt
//! object, missing credentials, a wrong endpoint, validate on footers only, and no
//! secret in anything written or printed.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::*;
use trustflow_testutil::s3::S3Server;

const BUCKET: &str = "corpora";

fn run_s3(server: &S3Server, args: &[&str]) -> Output {
    run_ok_with(trustflow(server), args)
}

/// clean_caption only, so the image bytes pass through (outputs of real size) fast.
fn caption_pipeline(dir: &Path, input: &str, out: &str, storage: &str) -> std::path::PathBuf {
    pipeline(
        dir,
        "p.yaml",
        &format!(
            "source:\n  paths: [\"{input}\"]\nstages:\n  - type: clean_caption\nsink:\n  path: \"{out}\"\nruntime:\n  batch_size: 32\n{storage}"
        ),
    )
}

fn assert_no_secret(server: &S3Server, what: &str, text: &str) {
    assert!(
        !text.contains(S3Server::SECRET),
        "the secret access key appears in {what}"
    );
    let _ = server;
}

#[test]
fn s3_to_s3_equals_the_local_run_and_reruns_skip() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 90, 3, 11, 96);
    server.put_dir(BUCKET, "raw/corpus", &corpus_dir);

    let local_out = dir.path().join("local-out");
    let p = pipeline(
        dir.path(),
        "local.yaml",
        &standard_pipeline(&corpus_dir, &local_out, ""),
    );
    run_ok(&["run", "--quiet", p.to_str().unwrap()]);

    let remote = pipeline(
        dir.path(),
        "remote.yaml",
        &standard_pipeline(
            Path::new("s3://corpora/raw/corpus"),
            Path::new("s3://corpora/enriched/run1"),
            "",
        ),
    );
    let first = run_s3(&server, &["run", "--quiet", remote.to_str().unwrap()]);
    assert_no_secret(&server, "the run's output", &text(&first));

    let keys = server.keys(BUCKET, "enriched/run1/");
    for stem in ["part-00000", "part-00001", "part-00002"] {
        for name in [
            format!("{stem}.parquet"),
            format!("{stem}.quarantine.parquet"),
            format!("{stem}.manifest.json"),
        ] {
            assert!(
                keys.contains(&format!("enriched/run1/{name}")),
                "{name} missing from {keys:?}"
            );
        }
    }
    assert!(
        !keys.iter().any(|k| k.contains(".trustflow/uploads")),
        "upload records left: {keys:?}"
    );
    let fetched = dir.path().join("fetched");
    server.get_dir(BUCKET, "enriched/run1", &fetched);
    assert_eq!(all_outputs(&fetched), all_outputs(&local_out));

    let report = report(&fetched);
    assert_eq!(report["invariant_holds"], true);
    assert_eq!(report["shards_processed"], 3);
    assert!(
        report["storage"]["requests"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(
        report["shards"][0]["input"],
        "s3://corpora/raw/corpus/part-00000.parquet"
    );
    for key in server.keys(BUCKET, "enriched/run1/") {
        let bytes = server.get(BUCKET, &key).unwrap();
        assert_no_secret(&server, &key, &String::from_utf8_lossy(&bytes));
    }

    // A rerun finds every manifest and skips every shard.
    let again = run_s3(&server, &["run", "--quiet", remote.to_str().unwrap()]);
    assert_contains(&text(&again), &["0 shard(s) processed, 3 skipped"]);
}

#[test]
fn local_to_s3_and_back() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 60, 2, 5, 80);
    let up = caption_pipeline(
        dir.path(),
        corpus_dir.to_str().unwrap(),
        "s3://corpora/stage1",
        "",
    );
    run_s3(&server, &["run", "--quiet", up.to_str().unwrap()]);
    // The enriched shards in the store are the next pipeline's input (its quarantine
    // shards are skipped by the folder listing, as on disk).
    let back = dir.path().join("back");
    let down = dir.path().join("down.yaml");
    std::fs::write(
        &down,
        format!(
            "source:\n  paths: [\"s3://corpora/stage1/*.parquet\"]\nstages: []\nsink:\n  path: \"{}\"\n",
            back.display()
        ),
    )
    .unwrap();
    run_s3(&server, &["run", "--quiet", down.to_str().unwrap()]);
    let first = dir.path().join("first");
    server.get_dir(BUCKET, "stage1", &first);
    let rows_in: usize = shard_files(&first)
        .iter()
        .filter(|p| !p.to_string_lossy().contains("quarantine"))
        .map(|p| read_parquet(p).num_rows())
        .sum();
    let report = report(&back);
    assert_eq!(report["rows_in"].as_u64().unwrap() as usize, rows_in);
    assert_eq!(report["shards_processed"], 2);
    assert_eq!(report["invariant_holds"], true);
}

/// A corpus whose output shards each need several 5 MiB parts (a multipart upload is
/// in flight for a good while), its reference run to `s3://corpora/reference`, and the
/// same pipeline writing to `s3://corpora/killed`.
fn upload_heavy_corpus(server: &S3Server, dir: &Path) -> std::path::PathBuf {
    server.create_bucket(BUCKET);
    let corpus_dir = dir.join("corpus");
    corpus_with(
        &corpus_dir,
        360,
        3,
        21,
        1024,
        trustflow::bench::corpus::GenLayout::Bytes,
        0.02,
    );
    let storage = "storage:\n  part_bytes: 5242880\n";
    let reference = caption_pipeline(
        dir,
        corpus_dir.to_str().unwrap(),
        "s3://corpora/reference",
        storage,
    );
    run_s3(server, &["run", "--quiet", reference.to_str().unwrap()]);
    let p = dir.join("killed.yaml");
    std::fs::write(
        &p,
        std::fs::read_to_string(&reference)
            .unwrap()
            .replace("s3://corpora/reference", "s3://corpora/killed"),
    )
    .unwrap();
    p
}

/// Start `p` and return once a multipart upload is in flight.
fn spawn_until_mid_upload(server: &S3Server, p: &Path) -> std::process::Child {
    let mut child = trustflow(server)
        .args(["run", "--quiet", p.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        if !server.pending_uploads(BUCKET).is_empty() {
            return child;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the run ended before any multipart upload was seen");
}

/// The outputs under `killed/` equal the reference's.
fn assert_same_outputs(server: &S3Server, dir: &Path) {
    let (want, got) = (dir.join("want"), dir.join("got"));
    server.get_dir(BUCKET, "reference", &want);
    server.get_dir(BUCKET, "killed", &got);
    assert_eq!(all_outputs(&got), all_outputs(&want));
}

#[test]
fn kill_9_mid_upload_then_rerun_is_identical_and_leaves_no_upload_behind() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let p = upload_heavy_corpus(&server, dir.path());
    let mut child = spawn_until_mid_upload(&server, &p);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !server.pending_uploads(BUCKET).is_empty(),
        "the kill left no upload to clean up"
    );

    run_s3(&server, &["run", "--quiet", p.to_str().unwrap()]);
    assert!(
        server.pending_uploads(BUCKET).is_empty(),
        "dangling multipart uploads: {:?}",
        server.pending_uploads(BUCKET)
    );
    assert_same_outputs(&server, dir.path());
    assert!(
        !server
            .keys(BUCKET, "killed/")
            .iter()
            .any(|k| k.contains(".trustflow/")),
        "upload records left"
    );
}

/// SIGTERM while an upload is in flight: exit 130, and `_report.json` says the run was
/// stopped and lists exactly the shards whose manifests were committed; a rerun
/// skips those and ends with the reference's outputs.
#[test]
fn sigterm_mid_upload_writes_the_report_of_what_was_kept() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let p = upload_heavy_corpus(&server, dir.path());
    let mut child = spawn_until_mid_upload(&server, &p);
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let report: serde_json::Value = serde_json::from_slice(
        &server
            .get(BUCKET, "killed/_report.json")
            .expect("a stopped run writes its report"),
    )
    .unwrap();
    assert_eq!(report["cancelled"], true, "{report:#}");
    let manifests = server
        .keys(BUCKET, "killed/")
        .into_iter()
        .filter(|k| k.ends_with(".manifest.json"))
        .count();
    assert_eq!(report["shards_processed"], manifests, "{report:#}");
    assert_eq!(report["shards"].as_array().unwrap().len(), manifests);
    assert!(manifests < 3, "the stop came too late to test anything");
    let rows: u64 = report["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["rows_in"].as_u64().unwrap())
        .sum();
    assert_eq!(report["rows_in"], rows);
    assert!(
        server.pending_uploads(BUCKET).is_empty(),
        "a clean stop leaves no upload: {:?}",
        server.pending_uploads(BUCKET)
    );

    run_s3(&server, &["run", "--quiet", p.to_str().unwrap()]);
    let rerun: serde_json::Value =
        serde_json::from_slice(&server.get(BUCKET, "killed/_report.json").unwrap()).unwrap();
    assert_eq!(rerun["cancelled"], false);
    assert_eq!(rerun["shards_skipped"], manifests);
    assert_same_outputs(&server, dir.path());
}

#[test]
fn a_corrupt_object_is_skipped_and_reported() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 40, 2, 3, 64);
    server.put_dir(BUCKET, "mixed", &corpus_dir);
    server.put(
        BUCKET,
        "mixed/broken.parquet",
        b"PAR1 this is not parquet at all PAR1",
    );
    let p = caption_pipeline(
        dir.path(),
        "s3://corpora/mixed",
        "s3://corpora/mixed-out",
        "",
    );
    let out = trustflow(&server)
        .args(["run", "--quiet", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let report: serde_json::Value =
        serde_json::from_slice(&server.get(BUCKET, "mixed-out/_report.json").unwrap()).unwrap();
    assert_eq!(report["shards_processed"], 2);
    assert_eq!(
        report["unreadable"][0]["input"],
        "s3://corpora/mixed/broken.parquet"
    );
    assert_contains(
        report["unreadable"][0]["reason"].as_str().unwrap(),
        &["not a readable Parquet file"],
    );
}

#[test]
fn missing_credentials_and_a_wrong_endpoint_fail_clearly_without_secrets() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let p = caption_pipeline(
        dir.path(),
        "s3://corpora/nothing-here",
        "s3://corpora/out",
        "storage:\n  max_retries: 1\n  retry_timeout_s: 5\n",
    );
    // No key pair and no profile (HOME without ~/.aws).
    let mut command = bin();
    server.configure(&mut command);
    let out = command
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("HOME", dir.path())
        .args(["validate", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_contains(
        &text(&out),
        &[
            "s3://corpora/nothing-here",
            "no credentials",
            "AWS_ACCESS_KEY_ID",
        ],
    );

    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let out = trustflow(&server)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .args(["validate", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let message = text(&out);
    assert_contains(&message, &["s3://corpora/nothing-here", "endpoint"]);
    assert_no_secret(&server, "the wrong-endpoint error", &message);

    // The right endpoint but a wrong secret: refused, and the secret is not shown.
    let out = trustflow(&server)
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-1234")
        .args(["validate", p.to_str().unwrap()])
        .output()
        .unwrap();
    let message = text(&out);
    assert!(!message.contains("wrong-secret-value-1234"), "{message}");
}

#[test]
fn validate_reads_only_footers_from_the_store() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 60, 3, 9, 96);
    server.put_dir(BUCKET, "v", &corpus_dir);
    let p = caption_pipeline(dir.path(), "s3://corpora/v/", "s3://corpora/v-out", "");
    let out = run_s3(&server, &["validate", p.to_str().unwrap()]);
    let message = text(&out);
    assert_contains(
        &message,
        &[
            "source: 3 shard(s), 60 rows",
            // One listing of the source, one of at most one key under the output
            // prefix (its bucket must exist), and the footers.
            "2 listing(s), 3 GET(s) of which 3 ranged (footers)",
        ],
    );
    // Nothing was written.
    assert!(server.keys(BUCKET, "v-out").is_empty());
}

#[test]
fn an_output_prefix_over_the_inputs_is_refused() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 20, 1, 1, 64);
    server.put_dir(BUCKET, "in/data", &corpus_dir);
    for out in [
        "s3://corpora/in/data",
        "s3://corpora/in",
        "s3://corpora/in/data/out",
    ] {
        let p = caption_pipeline(dir.path(), "s3://corpora/in/data", out, "");
        let result = trustflow(&server)
            .args(["validate", p.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!result.status.success(), "{out} accepted");
        assert_contains(&text(&result), &["output prefix"]);
    }
}

#[test]
fn the_documented_example_runs_with_only_the_uri_and_credentials_changed() {
    let server = S3Server::start();
    server.create_bucket("your-bucket");
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 40, 2, 4, 64);
    server.put_dir("your-bucket", "raw", &corpus_dir);
    let example = repo_root().join("pipelines/s3/enrich.yaml");
    let out = run_s3(
        &server,
        &[
            "run",
            "--quiet",
            example.to_str().unwrap(),
            "--input",
            "s3://your-bucket/raw/",
            "--out",
            "s3://your-bucket/enriched/",
        ],
    );
    assert_contains(&text(&out), &["2 shard(s) processed"]);
    let report: serde_json::Value =
        serde_json::from_slice(&server.get("your-bucket", "enriched/_report.json").unwrap())
            .unwrap();
    assert_eq!(report["rows_in"], 40);
    assert_eq!(report["invariant_holds"], true);
}

#[test]
fn training_reads_its_shards_from_the_store() {
    use trustflow::bench::train_corpus::{TrainCorpusOptions, generate_train_corpus};
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("train");
    generate_train_corpus(&TrainCorpusOptions {
        rows_source: 64,
        rows_target: 64,
        rows_eval: 32,
        shards: 2,
        seed: 9,
        out: local.clone(),
        ..TrainCorpusOptions::default()
    })
    .unwrap();
    for part in ["source", "target", "eval"] {
        server.put_dir(BUCKET, &format!("train/{part}"), &local.join(part));
    }
    let file = pipeline(
        dir.path(),
        "train.yaml",
        "source:\n  paths: \"s3://corpora/train/source/*.parquet\"\ntarget:\n  paths: \"s3://corpora/train/target/\"\n\
         eval:\n  paths: \"s3://corpora/train/eval/*.parquet\"\nmodel:\n  classes: 4\n  threads: 1\n\
         augment:\n  size: 16\noptimizer:\n  lr: 0.05\n  epochs: 1\n\
         data:\n  batch_size: 16\n  workers: 2\n  prefetch: 2\n  shuffle_buffer: 32\n\
         seed: 5\noutput: out-s3\n",
    );
    let out = run_s3(&server, &["validate-train", file.to_str().unwrap()]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["steps_per_epoch"], 4);
    let out = run_s3(&server, &["train", file.to_str().unwrap(), "--fresh"]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"], "finished");
    assert_eq!(summary["global_step"], 4);
}

#[test]
fn with_conditional_writes_a_held_lock_object_refuses_a_second_writer() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 20, 1, 2, 64);
    server.put_dir(BUCKET, "locked-in", &corpus_dir);
    let p = caption_pipeline(
        dir.path(),
        "s3://corpora/locked-in",
        "s3://corpora/locked-out",
        "storage:\n  conditional_writes: true\n",
    );
    // What a run killed with kill -9 leaves: its lock object.
    server.put(BUCKET, "locked-out/.trustflow.lock", b"pid 4242 on node-7");
    let out = trustflow(&server)
        .args(["run", "--quiet", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_contains(
        &text(&out),
        &[
            "pid 4242 on node-7",
            "delete s3://corpora/locked-out/.trustflow.lock",
        ],
    );
    assert!(
        server
            .get(BUCKET, "locked-out/part-00000.manifest.json")
            .is_none()
    );
    // Once it is deleted the run goes through, and releases its own lock at the end.
    server
        .request("DELETE", "/corpora/locked-out/.trustflow.lock", &[])
        .unwrap();
    run_s3(&server, &["run", "--quiet", p.to_str().unwrap()]);
    assert!(
        server
            .get(BUCKET, "locked-out/part-00000.manifest.json")
            .is_some()
    );
    assert!(server.get(BUCKET, "locked-out/.trustflow.lock").is_none());
}

/// A key object_store cannot address (an empty `//` segment, a `.` segment) is an
/// unreadable shard like a corrupt one: reported with its reason and skipped, exit 3,
/// while every other shard is processed.
#[test]
fn an_unaddressable_key_is_skipped_and_reported() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 40, 2, 3, 64);
    server.put_dir(BUCKET, "odd", &corpus_dir);
    let shard = std::fs::read_dir(&corpus_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "parquet"))
        .unwrap();
    let bytes = std::fs::read(&shard).unwrap();
    server.put(BUCKET, "odd/deep//empty-segment.parquet", &bytes);
    // `%2E`: a literal `.` segment would be folded away on the way to the server.
    let (status, _) = server
        .request("PUT", "/corpora/odd/dot/%2E/segment.parquet", &bytes)
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        server
            .keys(BUCKET, "odd")
            .contains(&"odd/dot/./segment.parquet".to_string()),
        "{:?}",
        server.keys(BUCKET, "odd")
    );
    // A glob: discovery of a folder skips `.`-named folders as hidden.
    let p = caption_pipeline(
        dir.path(),
        "s3://corpora/odd/**/*.parquet",
        "s3://corpora/odd-out",
        "",
    );
    for command in [&["validate"][..], &["run", "--quiet"]] {
        let out = trustflow(&server).args(command).arg(&p).output().unwrap();
        let expected = if command[0] == "run" { 3 } else { 0 };
        assert_eq!(
            out.status.code(),
            Some(expected),
            "{command:?}: {}",
            text(&out)
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&server.get(BUCKET, "odd-out/_report.json").unwrap()).unwrap();
    assert_eq!(report["shards_processed"], 2, "{report:#}");
    let unreadable = report["unreadable"].as_array().unwrap();
    let inputs: Vec<&str> = unreadable
        .iter()
        .map(|u| u["input"].as_str().unwrap())
        .collect();
    assert_eq!(
        inputs,
        [
            "s3://corpora/odd/deep//empty-segment.parquet",
            "s3://corpora/odd/dot/./segment.parquet"
        ],
        "{report:#}"
    );
    for u in unreadable {
        assert_contains(u["reason"].as_str().unwrap(), &["cannot be addressed"]);
    }
}

/// An output bucket that does not exist is refused while planning, by `validate` as by
/// `run`, before any shard's work: nothing is written anywhere.
#[test]
fn a_missing_output_bucket_is_refused_at_planning() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 40, 2, 3, 64);
    server.put_dir(BUCKET, "in", &corpus_dir);
    let p = caption_pipeline(dir.path(), "s3://corpora/in", "s3://no-such-bucket/out", "");
    let before = server.keys(BUCKET, "");
    for command in [&["validate"][..], &["run", "--quiet"]] {
        let out = trustflow(&server).args(command).arg(&p).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{command:?}: {}", text(&out));
        assert_contains(
            &text(&out),
            &[
                "s3://no-such-bucket/out",
                "bucket `no-such-bucket` does not exist",
            ],
        );
    }
    // Nothing of the run reached the store: only the inputs are there.
    assert_eq!(server.keys(BUCKET, ""), before);
}
