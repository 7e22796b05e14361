//! `sink.train_mode: one_pass`: the trainer fed live by the pipeline's sink. The rows
//! are written once and trained on in the same pass; a slow trainer slows the reader
//! down with rows in flight within the documented bound; `kill -9` at any point, then
//! a rerun, ends with the weights of an uninterrupted run; and `validate` refuses a
//! training file that does not fit the pipeline's output before any row is read.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tch::Tensor;
use trustflow::bench::train_corpus::{TrainCorpusOptions, generate_train_corpus};

use crate::train::max_abs_diff;

/// 4 classes, 16 px; `target_rows` target rows in `shards` shards, 5% bad images.
fn corpus(dir: &Path, target_rows: usize, shards: usize) -> PathBuf {
    let out = dir.join("corpus");
    generate_train_corpus(&TrainCorpusOptions {
        rows_source: 64,
        rows_target: target_rows,
        rows_eval: 32,
        shards,
        bad_image_rate: 0.05,
        seed: 3,
        out: out.clone(),
        ..TrainCorpusOptions::default()
    })
    .expect("train corpus");
    out
}

/// A pipeline that decodes the target rows into `enriched/` and trains on them in one
/// pass with the training file `train.yaml` (appended with `train_extra`).
fn one_pass_pipeline(
    dir: &Path,
    c: &Path,
    sink_extra: &str,
    runtime: &str,
    train_extra: &str,
) -> PathBuf {
    let train = format!(
        "source:\n  paths: \"{c}/source/*.parquet\"\ntarget:\n  paths: enriched\n\
         eval:\n  paths: \"{c}/eval/*.parquet\"\nmodel:\n  classes: 4\n  threads: 1\n\
         augment:\n  size: 16\noptimizer:\n  lr: 0.05\n  epochs: 2\n\
         data:\n  batch_size: 8\n  workers: 2\n  prefetch: 2\n  shuffle_buffer: 16\n\
         seed: 5\noutput: run\n{train_extra}",
        c = c.display()
    );
    common::pipeline(dir, "train.yaml", &train);
    common::pipeline(
        dir,
        "one-pass.yaml",
        &format!(
            "source:\n  paths: [\"{c}/target\"]\n  keep_columns: [pseudo_label, pseudo_weight, text_feature]\n\
             stages:\n  - type: decode\n    workers: 1\nsink:\n  path: enriched\n  train: train.yaml\n  \
             train_mode: one_pass\n{sink_extra}runtime:\n{runtime}",
            c = c.display()
        ),
    )
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read JSON")).expect("JSON")
}

/// The model's variables in the run's latest checkpoint, by name.
fn weights(run: &Path) -> Vec<(String, Tensor)> {
    let latest = std::fs::read_to_string(run.join("checkpoints/LATEST")).expect("LATEST");
    let dir = run.join("checkpoints").join(latest.trim());
    let mut named = Tensor::read_safetensors(dir.join("model.safetensors")).expect("weights");
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

fn step<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step `{name}` in {report}"))
}

#[test]
fn one_pass_writes_every_row_once_and_trains_on_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 64, 2);
    let p = one_pass_pipeline(dir.path(), &c, "", "  batch_size: 8\n", "");
    let out = common::run_ok(&["run", "--quiet", p.to_str().expect("utf8")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("invariant holds"), "{stdout}");
    let trained = json(&dir.path().join("run/_report.json"));
    assert_eq!(trained["status"], "finished");
    // Bad images went to quarantine, so the written target (and the trainer) has 61.
    assert_eq!(trained["target_rows"], 61);
    assert_eq!(trained["history"].as_array().map(Vec::len), Some(2));
    // 64 source rows, 61 target rows, B = 8: 8 steps an epoch, in both epochs.
    assert_eq!(trained["steps_per_epoch"], 8);
    assert_eq!(trained["global_step"], 16);
    let run = json(&dir.path().join("enriched/_report.json"));
    assert_eq!(step(&run, "train")["rows_in"], 61);
    assert_eq!(common::count_manifests(&dir.path().join("enriched")), 2);
    // A rerun finds both the shards and the training done.
    common::run_ok(&["run", "--quiet", p.to_str().expect("utf8")]);
    let again = json(&dir.path().join("run/_report.json"));
    assert_eq!(again["global_step"], 16);
    assert_eq!(again["resumed_from_step"], 16);
}

#[test]
fn a_slow_trainer_blocks_the_reader_with_rows_in_flight_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 480, 4);
    // docs/architecture.md's bound: (queues x depth + workers + 2) x batch size in the
    // pipeline, (train_queue_depth + 2) x batch size in the feed (the batch being
    // handed over, and one that enters as the consumer takes one): here (2 + 1 + 2) x 8
    // and (2 + 2) x 8, with one decode worker.
    let p = one_pass_pipeline(
        dir.path(),
        &c,
        "  train_queue_depth: 2\n",
        "  batch_size: 8\n  queue_depth: 1\n",
        "",
    );
    common::run_ok(&[
        "run",
        "--quiet",
        "--slow-train-steps-ms",
        "40",
        p.to_str().expect("utf8"),
    ]);
    let run = json(&dir.path().join("enriched/_report.json"));
    assert_eq!(run["bottleneck"], "train", "{run}");
    let source = step(&run, "source");
    let train = step(&run, "train");
    assert!(
        source["blocked_fraction"].as_f64().expect("f64") > 0.5,
        "the reader waits on the trainer: {source}"
    );
    assert!(
        train["busy_fraction"].as_f64().expect("f64") > 0.5,
        "the trainer is busy: {train}"
    );
    let bound = (2 + 1 + 2) * 8 + (2 + 2) * 8;
    let peak = run["peak_rows_in_flight"].as_u64().expect("u64");
    assert!(
        peak <= bound,
        "{peak} rows in flight, bound {bound}: {}",
        run["peak_rows_in_flight"]
    );
    assert!(peak > 0);
}

/// `kill -9` at spread-out moments (during enrichment, at the switch to the written
/// shards, in the last epoch), each followed by a rerun to the end: the final weights
/// are those of an uninterrupted one-pass run, bit for bit.
#[test]
fn random_kills_of_a_one_pass_run_end_with_the_uninterrupted_weights() {
    let kills: usize = std::env::var("TRUSTFLOW_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 160, 5);
    let p = one_pass_pipeline(
        dir.path(),
        &c,
        "",
        "  batch_size: 8\n  queue_depth: 2\n",
        "checkpoint_every_steps: 1\n",
    );
    let file = p.to_str().expect("utf8");
    let started = Instant::now();
    common::run_ok(&["run", "--quiet", "--slow-train-steps-ms", "15", file]);
    let whole = started.elapsed();
    let reference = weights(&dir.path().join("run"));
    let finished = json(&dir.path().join("run/_report.json"));
    assert_eq!(finished["status"], "finished");

    for k in 0..kills {
        for name in ["enriched", "run"] {
            std::fs::remove_dir_all(dir.path().join(name)).expect("clean");
        }
        // Kill points spread over the run, the same every time.
        let at = whole.mul_f64(0.05 + 0.9 * ((k * 7) % kills) as f64 / kills as f64);
        let mut child = common::bin()
            .args(["run", "--quiet", "--slow-train-steps-ms", "15", file])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        let t0 = Instant::now();
        while t0.elapsed() < at {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        common::run_ok(&["run", "--quiet", file]);
        let got = weights(&dir.path().join("run"));
        assert_eq!(
            max_abs_diff(&got, &reference),
            0.0,
            "kill {k} after {at:?} of {whole:?}"
        );
    }
}

#[test]
fn validate_refuses_a_training_file_that_does_not_fit_the_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 32, 1);
    let p = one_pass_pipeline(dir.path(), &c, "", "  batch_size: 8\n", "");
    let file = p.to_str().expect("utf8");
    common::run_ok(&["validate", file]);
    // The target must be the sink's folder.
    let train = dir.path().join("train.yaml");
    let text = std::fs::read_to_string(&train).expect("read");
    std::fs::write(&train, text.replace("paths: enriched", "paths: elsewhere")).expect("write");
    let out = common::bin()
        .args(["validate", file])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("target.path must be the pipeline's sink.path"),
        "{err}"
    );
    let pipeline = std::fs::read_to_string(&p).expect("read");
    // Without pseudo-labels in the output, the terms that need them name the column.
    std::fs::write(
        &p,
        pipeline.replace(
            "keep_columns: [pseudo_label, pseudo_weight, text_feature]",
            "keep_columns: []",
        ),
    )
    .expect("write");
    std::fs::write(&train, &text).expect("write");
    let out = common::bin()
        .args(["validate", file])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("need column `pseudo_label`"), "{err}");
    assert!(!dir.path().join("enriched").exists(), "no row was read");
}

#[test]
fn ctrl_c_exits_130_with_a_checkpoint_and_the_finished_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 160, 5);
    let p = one_pass_pipeline(
        dir.path(),
        &c,
        "",
        "  batch_size: 8\n  queue_depth: 1\n",
        "",
    );
    let child = common::bin()
        .args(["run", "--quiet", "--slow-train-steps-ms", "30"])
        .arg(&p)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let enriched = dir.path().join("enriched");
    let started = Instant::now();
    while common::count_manifests(&enriched) < 1 {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ok = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept = common::count_manifests(&enriched);
    assert!((1..5).contains(&kept), "{kept} shards kept");
    assert!(dir.path().join("run/checkpoints/LATEST").exists());
    // The rerun resumes both and finishes.
    common::run_ok(&["run", "--quiet", p.to_str().expect("utf8")]);
    let trained = json(&dir.path().join("run/_report.json"));
    assert_eq!(trained["status"], "finished");
    assert!(trained["resumed_from_step"].as_u64().is_some());
    assert_eq!(common::count_manifests(&enriched), 5);
}

#[test]
fn the_example_one_pass_pipeline_validates() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/one-pass/pipeline.yaml");
    let out = common::run_ok(&["validate", file.to_str().expect("utf8")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("is valid"));
}
