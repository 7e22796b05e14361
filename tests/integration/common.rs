//! Helpers shared by the integration tests: corpora, pipeline files, the binary, and
//! reading Parquet back.
#![allow(dead_code)]

pub use trustflow_testutil::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use parquet::arrow::ArrowWriter;

use trustflow::bench::corpus::{GenLayout, GenOptions, GenSummary, generate};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trustflow"))
}

/// A small corpus: images 48..=`max_side` px so debug tests stay quick.
pub fn corpus(dir: &Path, rows: usize, shards: usize, seed: u64, max_side: u32) -> GenSummary {
    corpus_with(dir, rows, shards, seed, max_side, GenLayout::Bytes, 0.08)
}

pub fn corpus_with(
    dir: &Path,
    rows: usize,
    shards: usize,
    seed: u64,
    max_side: u32,
    layout: GenLayout,
    corrupt_rate: f64,
) -> GenSummary {
    let opts = GenOptions {
        rows,
        shards,
        out: dir.to_path_buf(),
        seed,
        min_side: 48,
        max_side,
        layout,
        corrupt_rate,
        ..GenOptions::default()
    };
    generate(&opts).expect("corpus generation")
}

/// Write a pipeline file into `dir` and return its path.
pub fn pipeline(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write pipeline");
    path
}

/// decode -> clean_caption over `input`, writing to `out`.
pub fn standard_pipeline(input: &Path, out: &Path, extra_source: &str) -> String {
    format!(
        "source:\n  paths: [\"{}\"]\n{extra_source}stages:\n  - type: decode\n    workers: 2\n  - type: clean_caption\nsink:\n  path: \"{}\"\nruntime:\n  batch_size: 16\n  queue_depth: 2\n",
        input.display(),
        out.display()
    )
}

/// stdout and stderr of a finished command, together (for messages and assertions).
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The binary with the environment that reaches `server` (and no AWS setting of ours).
pub fn trustflow(server: &trustflow_testutil::s3::S3Server) -> Command {
    let mut command = bin();
    server.configure(&mut command);
    command
}

pub fn run_ok(args: &[&str]) -> Output {
    run_ok_with(bin(), args)
}

/// `command` (trustflow with its environment set) with `args`, which must succeed.
pub fn run_ok_with(mut command: Command, args: &[&str]) -> Output {
    let out = command.args(args).output().expect("run trustflow");
    assert!(
        out.status.success(),
        "trustflow {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// id -> corruption kind for the bad rows the generator planted.
pub fn planted_corruptions(corpus: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for shard in shard_files(corpus) {
        let batch = read_parquet(&shard);
        let id_col = if batch.column_by_name("id").is_some() {
            "id"
        } else {
            "key"
        };
        let ids = strings(&batch, id_col);
        for (id, kind) in ids.into_iter().zip(strings(&batch, "corruption")) {
            if let (Some(id), Some(kind)) = (id, kind) {
                out.insert(id, kind);
            }
        }
    }
    out
}

/// Read every output and quarantine shard of a folder into comparable form.
pub fn all_outputs(out: &Path) -> Vec<(String, arrow::array::RecordBatch)> {
    let mut files: Vec<_> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                read_parquet(&p),
            )
        })
        .collect()
}

pub fn count_manifests(out: &Path) -> usize {
    std::fs::read_dir(out)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".manifest.json"))
                .count()
        })
        .unwrap_or(0)
}

/// Start a run and stop it with `signal` once `after` shards are finished.
pub fn interrupt(
    pipeline: &Path,
    out: &Path,
    signal: &str,
    after: usize,
) -> std::process::ExitStatus {
    let mut child = bin()
        .args(["run", "--quiet", pipeline.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while count_manifests(out) < after {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "run made no progress"
        );
        if let Ok(Some(status)) = child.try_wait() {
            panic!("run ended ({status}) before it could be interrupted; make the corpus bigger");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let pid = child.id().to_string();
    let ok = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(ok.success());
    child.wait().unwrap()
}

pub fn slow_corpus(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let corpus_dir = dir.join("corpus");
    corpus(&corpus_dir, 480, 12, 8, 200);
    let out = dir.join("out");
    // One worker and tiny batches make a run long enough to interrupt mid-way.
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\nstages:\n  - type: decode\n  - type: clean_caption\nsink:\n  path: \"{}\"\nruntime:\n  batch_size: 2\n  queue_depth: 1\n",
        corpus_dir.display(),
        out.display()
    );
    (pipeline(dir, "p.yaml", &yaml), out)
}

pub fn write_parquet(path: &Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// [`slow_corpus`], plus the outputs of an uninterrupted run of it in `reference`.
pub fn slow_corpus_with_reference(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (file, out) = slow_corpus(dir);
    let reference = dir.join("reference");
    run_ok(&[
        "run",
        "--quiet",
        "--out",
        reference.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    (file, out, reference)
}

/// Headless Chromium for the browser tests: `TRUSTFLOW_CHROMIUM`, else `chromium` on
/// the PATH (scripts/setup.sh installs Debian's).
pub fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TRUSTFLOW_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
}

/// Render `page` in headless Chromium through scripts/browser_check.py, evaluate each
/// `(name, expression)` and save a screenshot; the script's JSON (errors, evals). `None`
/// (with a message) where no Chromium is installed, unless
/// `TRUSTFLOW_REQUIRE_BROWSER=1`, which makes that a failure.
pub fn browser_check(
    page: &Path,
    screenshot: &Path,
    evals: &[(&str, &str)],
) -> Option<serde_json::Value> {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var("TRUSTFLOW_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "TRUSTFLOW_REQUIRE_BROWSER=1 but no chromium (apt-get install chromium)"
        );
        eprintln!(
            "SKIPPED the browser check of {}: no chromium on this machine (scripts/setup.sh \
             installs Debian's `chromium`; it could not here)",
            page.display()
        );
        return None;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/browser_check.py");
    let mut command = Command::new("python3");
    command
        .arg(script)
        .arg(page)
        .arg("--screenshot")
        .arg(screenshot)
        .arg("--chromium")
        .arg(chromium);
    for (name, expression) in evals {
        command.arg("--eval").arg(format!("{name}={expression}"));
    }
    let out = command
        .output()
        .expect("run python3 scripts/browser_check.py");
    assert!(
        out.status.success(),
        "browser_check failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("browser_check prints JSON"))
}
