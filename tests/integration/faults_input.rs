//! Inputs that must never take the process down: a huge SQL filter (deep expression
//! trees), a reader that closes stdout early, paths with glob characters, and OS errors
//! that must be reported once, in words.

use crate::common::*;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Output, Stdio};

/// `id = 'a0' OR id = 'a1' OR ...`: a left-deep expression tree `terms` levels deep.
fn long_or_filter(terms: usize) -> String {
    (0..terms)
        .map(|i| format!("id = 'a{i}'"))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// The process ended by itself (no signal), and not by a panic.
fn assert_ended_cleanly(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        None,
        "{what}: killed by a signal: {:?}\nstderr:\n{stderr}",
        out.status
    );
    assert_ne!(out.status.code(), Some(101), "{what}: panicked:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{what}: panicked:\n{stderr}");
    assert!(!stderr.contains("overflow"), "{what}: {stderr}");
}

#[test]
fn a_filter_of_a_thousand_or_terms_does_not_overflow_the_stack() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    corpus(&data, 40, 1, 3, 64);
    // 1,000 terms run; 20,000 (a 330 KB filter) are refused in words. Both used to
    // abort the process with a stack overflow.
    for (terms, expect_ok) in [(1000, true), (20_000, false)] {
        let out = dir.path().join(format!("out-{terms}"));
        let filter = format!("  filter: \"{}\"\n", long_or_filter(terms));
        let file = pipeline(
            dir.path(),
            &format!("long-filter-{terms}.yaml"),
            &standard_pipeline(&data, &out, &filter),
        );
        let file = file.to_str().unwrap();
        for args in [vec!["validate", file], vec!["run", "--quiet", file]] {
            let result = bin().args(&args).output().unwrap();
            let what = format!("{terms} terms: {args:?}");
            assert_ended_cleanly(&what, &result);
            let stderr = String::from_utf8_lossy(&result.stderr);
            if expect_ok {
                assert_eq!(result.status.code(), Some(0), "{what}: {stderr}");
            } else {
                assert_eq!(result.status.code(), Some(1), "{what}: {stderr}");
                assert_contains(
                    &stderr,
                    &["field `source.filter`", "expected at most", "IN ("],
                );
            }
        }
        if expect_ok {
            // The generated ids are not `a0`...: no row passes, and none is lost.
            let r = report(&out);
            assert_eq!(r["invariant_holds"], true, "{r}");
        }
    }
}

/// Spawn `trustflow args`, read one line of its stdout, close the pipe and wait.
fn read_one_line_then_close(args: &[&str]) -> (String, Output) {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        let stdout = child.stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut first).unwrap();
        // Dropping the reader closes our end of the pipe, as `| head -1` does.
    }
    (first, child.wait_with_output().unwrap())
}

#[test]
fn a_reader_that_closes_stdout_early_is_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    corpus(&data, 20, 1, 4, 64);
    let out = dir.path().join("out");
    // `validate` prints the filter in its plan: a 100 KiB literal makes the output far
    // larger than a pipe holds, so the writer must meet the closed pipe.
    let filter = format!("  filter: \"caption <> '{}'\"\n", "x".repeat(100 << 10));
    let file = pipeline(
        dir.path(),
        "big-plan.yaml",
        &standard_pipeline(&data, &out, &filter),
    );
    let (first, result) = read_one_line_then_close(&["validate", file.to_str().unwrap()]);
    assert!(first.starts_with("pipeline `big-plan`"), "{first}");
    assert_ended_cleanly("validate | head -1", &result);
    assert_eq!(
        result.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );

    // `inspect --json` of a run with many quarantine reasons, and `schema`, the same.
    run_ok(&[
        "run",
        "--quiet",
        pipeline(
            dir.path(),
            "plain.yaml",
            &standard_pipeline(&data, &out, ""),
        )
        .to_str()
        .unwrap(),
    ]);
    for args in [
        vec!["inspect", "--json", out.to_str().unwrap()],
        vec!["schema"],
    ] {
        let (_, result) = read_one_line_then_close(&args);
        assert_ended_cleanly(&format!("{args:?} | head -1"), &result);
        assert_eq!(result.status.code(), Some(0), "{args:?}");
    }
}

#[test]
fn an_os_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    corpus(&data, 10, 1, 5, 64);
    // The output folder would sit under a dangling symlink: creating it fails with
    // EEXIST at run time (a read-only root would not stop the root user the tests may
    // run as, and a path under a regular file is refused before the run).
    let blocker = dir.path().join("not-a-folder");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &blocker).unwrap();
    let file = pipeline(
        dir.path(),
        "p.yaml",
        &standard_pipeline(&data, &dir.path().join("out"), ""),
    );
    let result = bin()
        .args(["run", "--quiet", file.to_str().unwrap(), "--out"])
        .arg(blocker.join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    let os_error = std::io::Error::from_raw_os_error(17).to_string();
    assert_eq!(
        stderr.matches(&os_error).count(),
        1,
        "`{os_error}` should appear once in:\n{stderr}"
    );
    assert_contains(&stderr, &["not-a-folder"]);
}

fn pipeline_over(dir: &Path, shards: &str) -> std::path::PathBuf {
    let yaml = format!(
        "source:\n  paths: [\"{shards}\"]\nstages:\n  - type: decode\nsink:\n  path: out\n"
    );
    pipeline(dir, "p.yaml", &yaml)
}

#[test]
fn existing_paths_with_glob_characters_are_taken_literally() {
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("gen");
    corpus(&generated, 10, 1, 6, 64);
    let shard = shard_files(&generated).remove(0);

    // A file whose name has `[` and `]`, and a folder whose name has them.
    let odd_folder = dir.path().join("data[2024]");
    std::fs::create_dir(&odd_folder).unwrap();
    std::fs::copy(&shard, odd_folder.join("part-0.parquet")).unwrap();
    std::fs::copy(&shard, dir.path().join("shard[1].parquet")).unwrap();
    // An unclosed `[` is not even a valid pattern.
    std::fs::copy(&shard, dir.path().join("odd[.parquet")).unwrap();

    for (shards, expect) in [
        ("shard[1].parquet", "shard[1].parquet"),
        ("data[2024]", "data[2024]/part-0.parquet"),
        ("data[2024]/part-0.parquet", "data[2024]/part-0.parquet"),
        ("odd[.parquet", "odd[.parquet"),
    ] {
        let file = pipeline_over(dir.path(), shards);
        let result = run_ok(&["validate", file.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert_contains(&stdout, &["source: 1 shard(s)", "is valid"]);
        let plan = trustflow_engine::plan::load_and_plan(&file, &Default::default())
            .unwrap_or_else(|e| panic!("{shards}: {e}"));
        assert_eq!(
            plan.source.shards[0].path,
            dir.path().join(expect),
            "{shards}"
        );
    }
}

#[test]
fn environment_values_stay_inside_their_field() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    corpus(&data, 10, 1, 7, 64);
    let out = dir.path().join("out");
    let yaml = format!(
        "# written for ${{TF_FAULTS_UNSET}}: a comment is not interpolated\n\
         name: ${{TF_FAULTS_NAME}}\n\
         source:\n  paths: [\"{}\"]\n\
         stages:\n  - type: decode\n    workers: ${{TF_FAULTS_WORKERS}}\n\
         sink:\n  path: \"{}\"\n\
         runtime:\n  batch_size: ${{TF_FAULTS_BATCH}}\n",
        data.display(),
        out.display()
    );
    let file = pipeline(dir.path(), "env.yaml", &yaml);
    // A value with a line break tries to add a `sink` of its own.
    let evil = dir.path().join("evil");
    let result = bin()
        .args(["validate", file.to_str().unwrap()])
        .env_remove("TF_FAULTS_UNSET")
        .env(
            "TF_FAULTS_NAME",
            format!("x\nsink:\n  path: \"{}\"", evil.display()),
        )
        .env("TF_FAULTS_WORKERS", "3")
        .env("TF_FAULTS_BATCH", "8")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(0), "{stderr}");
    assert_contains(
        &stdout,
        &[
            &format!("sink: {}", out.display()),
            "batch_size 8",
            "decode (3 worker(s)",
        ],
    );
    assert!(!stdout.contains(&format!("sink: {}", evil.display())));

    // Set to the empty string is set: the empty value reaches the usual checks.
    let yaml = yaml.replace(
        &format!("  path: \"{}\"", out.display()),
        "  path: \"${TF_FAULTS_EMPTY}\"",
    );
    let file = pipeline(dir.path(), "empty.yaml", &yaml);
    let result = bin()
        .args(["validate", file.to_str().unwrap()])
        .env("TF_FAULTS_NAME", "n")
        .env("TF_FAULTS_WORKERS", "1")
        .env("TF_FAULTS_BATCH", "8")
        .env("TF_FAULTS_EMPTY", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert_contains(
        &stderr,
        &[
            "empty.yaml:9:3: field `sink.path`",
            "expected an output folder, found an empty string",
        ],
    );
}

/// A profile whose credentials come from role assumption is named with what to do,
/// not called a profile without credentials.
#[test]
fn a_role_chaining_profile_says_what_to_export() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::write(
        &config,
        "[profile base]\nregion = us-east-1\n\n[profile chained]\nrole_arn = \
         arn:aws:iam::123456789012:role/reader\nsource_profile = base\n",
    )
    .unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::write(&credentials, "").unwrap();
    let file = pipeline(
        dir.path(),
        "s3.yaml",
        "source:\n  paths: [\"s3://corpus/raw/\"]\nsink:\n  path: out\n",
    );
    let out = bin()
        .args(["validate", file.to_str().unwrap()])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_PROFILE", "chained")
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("through `role_arn`"), "{err}");
    assert!(
        err.contains("export-credentials --profile chained"),
        "{err}"
    );
}
