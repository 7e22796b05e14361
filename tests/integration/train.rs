//! The trainer end to end on generated enriched shards (`bench gen-train`): the loss
//! goes down, a killed run resumes from its checkpoint on the same schedule step and
//! ends with the same weights as an uninterrupted one, TorchScript backbones load (and
//! a wrong one is refused), and bad data stops the run before the first step with an
//! error naming the file, row and column.

use crate::common;

use std::path::{Path, PathBuf};

use tch::Tensor;
use trustflow::bench::train_corpus::{TrainCorpusOptions, generate_train_corpus};
use trustflow_train::{TrainOptions, TrainReport, load_train_file, train};

/// 4 classes, 16 px, 64 + 64 rows in 2 shards each, 32 eval rows, 5% bad images.
fn corpus(dir: &Path, seed: u64) -> PathBuf {
    let out = dir.join("corpus");
    generate_train_corpus(&TrainCorpusOptions {
        rows_source: 64,
        rows_target: 64,
        rows_eval: 32,
        shards: 2,
        bad_image_rate: 0.05,
        seed,
        out: out.clone(),
        ..TrainCorpusOptions::default()
    })
    .expect("train corpus");
    out
}

/// A training file over `corpus`; `extra` is appended (YAML at the top level).
fn train_file(dir: &Path, corpus: &Path, name: &str, model: &str, extra: &str) -> PathBuf {
    let yaml = format!(
        "source:\n  paths: \"{c}/source/*.parquet\"\ntarget:\n  paths: \"{c}/target/*.parquet\"\n\
         eval:\n  paths: \"{c}/eval/*.parquet\"\nmodel:\n  classes: 4\n  threads: 1\n{model}\
         augment:\n  size: 16\noptimizer:\n  lr: 0.05\n  epochs: 3\n\
         data:\n  batch_size: 16\n  workers: 2\n  prefetch: 2\n  shuffle_buffer: 32\n\
         seed: 5\noutput: out-{name}\n{extra}",
        c = corpus.display()
    );
    common::pipeline(dir, &format!("{name}.yaml"), &yaml)
}

fn run(file: &Path, options: &TrainOptions) -> trustflow_engine::Result<TrainReport> {
    train(&load_train_file(file)?, options)
}

fn fresh() -> TrainOptions {
    TrainOptions {
        fresh: true,
        ..TrainOptions::default()
    }
}

/// The model's variables in the latest checkpoint, by name.
fn weights(report: &TrainReport) -> Vec<(String, Tensor)> {
    let dir = report.checkpoint.as_ref().expect("a checkpoint");
    let mut named = Tensor::read_safetensors(dir.join("model.safetensors")).expect("weights");
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// The largest difference between two sets of named weights (0 when identical).
pub fn max_abs_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn builtin_backbone_learns_and_reports_every_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 1);
    let file = train_file(dir.path(), &c, "learn", "", "");
    let report = run(&file, &fresh()).expect("training runs");
    assert_eq!(report.status, trustflow_train::TrainStatus::Finished);
    assert_eq!(report.history.len(), 3);
    // 64 rows per domain in steps of 16: 4 steps per epoch, 3 epochs.
    assert_eq!((report.steps_per_epoch, report.total_steps), (4, 12));
    assert_eq!(report.global_step, 12);
    let first = &report.history[0];
    let last = &report.history[2];
    assert!(
        last.loss.total < first.loss.total,
        "total loss went from {} to {}",
        first.loss.total,
        last.loss.total
    );
    let src = |m: &trustflow_train::trainer::EpochMetrics| m.loss.src.expect("src on");
    assert!(src(last) < src(first), "{} -> {}", src(first), src(last));
    for m in &report.history {
        for term in [m.loss.src, m.loss.tgt, m.loss.self_train, m.loss.ctr] {
            let v = term.expect("every term is on");
            assert!(v.is_finite() && v >= 0.0, "{v}");
        }
        let eval = m.target_eval.as_ref().expect("eval split given");
        // 32 eval rows, 5% bad images: the undecodable ones are left out.
        assert!(eval.rows > 24 && eval.rows <= 32, "{}", eval.rows);
        let acc = eval.accuracy.expect("rows");
        assert!((0.0..=1.0).contains(&acc));
        assert_eq!(eval.per_class.len(), 4);
        let pl = m.pseudo_labels.as_ref().expect("target labels present");
        assert_eq!(pl.rows, 64);
        let auroc = pl.weights.auroc.expect("right and wrong rows");
        assert!(
            auroc > 0.5,
            "weights should separate right from wrong: {auroc}"
        );
        assert!((0.0..=1.0).contains(&m.trainer_idle_fraction));
    }
    // Bad images are left out of their steps and counted, never fatal.
    assert!(report.rows_dropped > 0);
    assert!(!report.dropped_examples.is_empty());
    let out = dir.path().join("out-learn");
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    assert_eq!(lines.lines().count(), 3);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_report.json")).expect("report written"))
            .expect("report is JSON");
    assert_eq!(saved["global_step"], 12);
    assert_eq!(saved["status"], "finished");
}

/// A run killed after step 7 (its last checkpoint at step 6, mid-epoch) resumes at
/// step 6 of the same schedule and ends with the weights of a run that was never interrupted.
#[test]
fn killed_run_resumes_on_the_same_schedule_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 2);
    let whole = train_file(dir.path(), &c, "whole", "", "checkpoint_every_steps: 2\n");
    let reference = run(&whole, &fresh()).expect("uninterrupted run");

    let killed = train_file(dir.path(), &c, "killed", "", "checkpoint_every_steps: 2\n");
    let aborted = run(
        &killed,
        &TrainOptions {
            fresh: true,
            abort_after_steps: Some(7),
            ..TrainOptions::default()
        },
    )
    .expect("runs until the simulated kill");
    assert_eq!(aborted.status, trustflow_train::TrainStatus::Aborted);
    assert_eq!(aborted.global_step, 7);
    // Without --resume an output with checkpoints is refused.
    let refused = run(&killed, &TrainOptions::default()).expect_err("needs --resume");
    assert!(refused.to_string().contains("--resume"), "{refused}");

    let resumed = run(
        &killed,
        &TrainOptions {
            resume: true,
            ..TrainOptions::default()
        },
    )
    .expect("resumed run");
    assert_eq!(resumed.resumed_from_step, Some(6));
    assert_eq!(resumed.global_step, 12);
    assert_eq!(resumed.history.len(), 3);
    // The same weights and the same metrics, to the bit: the resumed epoch's loss sums
    // continue from the checkpoint exactly as they were.
    let diff = max_abs_diff(&weights(&reference), &weights(&resumed));
    assert_eq!(diff, 0.0, "resumed weights differ by {diff}");
    for (a, b) in reference.history.iter().zip(&resumed.history) {
        let (x, y) = (&a.loss, &b.loss);
        assert_eq!(
            (x.total, x.src, x.tgt, x.self_train, x.ctr),
            (y.total, y.src, y.tgt, y.self_train, y.ctr),
            "epoch {}",
            a.epoch
        );
        assert_eq!(a.lr_end, b.lr_end);
    }
    // A changed training file does not resume someone else's checkpoint.
    let text = std::fs::read_to_string(&killed).expect("read");
    std::fs::write(&killed, text.replace("seed: 5", "seed: 6")).expect("write");
    let other = run(
        &killed,
        &TrainOptions {
            resume: true,
            ..TrainOptions::default()
        },
    )
    .expect_err("different spec");
    assert!(
        other.to_string().contains("another training file"),
        "{other}"
    );
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train")
        .join(name)
}

#[test]
fn torchscript_backbone_trains_with_the_engine_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 3);
    let model = format!(
        "  backbone:\n    type: torchscript\n    path: \"{}\"\n",
        fixture("tiny_backbone.pt").display()
    );
    let file = train_file(
        dir.path(),
        &c,
        "script",
        &model,
        "checkpoint_every_steps: 5\n",
    );
    let report = run(&file, &fresh()).expect("training with a TorchScript backbone");
    assert_eq!(report.feature_dim, 6);
    assert_eq!(report.global_step, 12);
    let ckpt = report.checkpoint.as_ref().expect("checkpoint");
    assert!(
        ckpt.join("backbone.pt").is_file(),
        "the module is checkpointed"
    );
    let first = report.history[0].loss.src.expect("src");
    let last = report.history[2].loss.src.expect("src");
    assert!(last < first, "{first} -> {last}");
}

#[test]
fn torchscript_backbone_with_spatial_output_is_refused_before_training() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 4);
    let model = format!(
        "  backbone:\n    type: torchscript\n    path: \"{}\"\n",
        fixture("spatial_backbone.pt").display()
    );
    let file = train_file(dir.path(), &c, "spatial", &model, "");
    let err = run(&file, &fresh()).expect_err("[N, C, H, W] output");
    let msg = err.to_string();
    assert!(msg.contains("spatial_backbone.pt"), "{msg}");
    assert!(
        msg.contains("[2, 6, 16, 16]") && msg.contains("[N, D]"),
        "{msg}"
    );
    assert!(!dir.path().join("out-spatial/checkpoints").exists());
}

#[test]
fn labels_outside_the_classes_stop_before_training() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 5);
    let file = train_file(dir.path(), &c, "classes", "", "");
    let text = std::fs::read_to_string(&file).expect("read");
    std::fs::write(&file, text.replace("classes: 4", "classes: 2")).expect("write");
    let err = run(&file, &fresh()).expect_err("labels up to 3 with 2 classes");
    let msg = err.to_string();
    assert!(msg.contains("source") && msg.contains("part-0000"), "{msg}");
    assert!(
        msg.contains("outside [0, 2)") && msg.contains("row "),
        "{msg}"
    );
    assert!(!dir.path().join("out-classes/checkpoints").exists());
}

#[test]
fn missing_enrichment_columns_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 6);
    // The contrastive term needs text features; point it at a column that is absent.
    let file = train_file(
        dir.path(),
        &c,
        "columns",
        "",
        "columns:\n  text_feature: caption_embedding\n",
    );
    let err = run(&file, &fresh()).expect_err("no caption_embedding column");
    let msg = err.to_string();
    assert!(
        msg.contains("caption_embedding") && msg.contains("part-0000"),
        "{msg}"
    );
    // Switching the term off makes the column unnecessary.
    let text = std::fs::read_to_string(&file).expect("read");
    std::fs::write(&file, format!("{text}loss:\n  ctr: 0\n")).expect("write");
    let report = run(&file, &fresh()).expect("no contrastive term, no text features needed");
    assert!(report.history.iter().all(|m| m.loss.ctr.is_none()));
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_keeps_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 7);
    let file = train_file(dir.path(), &c, "nan", "", "checkpoint_every_steps: 1\n");
    let text = std::fs::read_to_string(&file).expect("read");
    std::fs::write(&file, text.replace("lr: 0.05", "lr: 1.0e+30")).expect("write");
    let err = run(&file, &fresh()).expect_err("diverges");
    let msg = err.to_string();
    assert!(msg.contains("step ") && msg.contains("checkpoint"), "{msg}");
    assert!(
        msg.contains("NaN") || msg.contains("infinite") || msg.contains("not a finite"),
        "{msg}"
    );
    let ckpts = dir.path().join("out-nan/checkpoints");
    assert!(
        ckpts.join("LATEST").is_file(),
        "the last good checkpoint is kept"
    );
}

#[test]
fn training_file_errors_are_located() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 8);
    let file = train_file(dir.path(), &c, "bad", "", "");
    let text = std::fs::read_to_string(&file).expect("read");
    std::fs::write(&file, text.replace("lr: 0.05", "lr: -1")).expect("write");
    let err = load_train_file(&file).expect_err("negative lr");
    let msg = err.to_string();
    assert!(
        msg.contains("optimizer.lr") && msg.contains("bad.yaml:"),
        "{msg}"
    );
    std::fs::write(&file, text.replace("epochs: 3", "epochs: 3\n  lr_sched: 1")).expect("write");
    let err = load_train_file(&file).expect_err("unknown key");
    assert!(err.to_string().contains("lr_sched"), "{err}");
}

#[test]
fn cli_trains_and_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 9);
    let file = train_file(dir.path(), &c, "cli", "", "");
    let out = common::run_ok(&["validate-train", file.to_str().expect("utf8")]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON plan");
    assert_eq!(plan["steps_per_epoch"], 4);
    assert_eq!(plan["text_feature_dim"], 16);
    let out = common::run_ok(&["train", file.to_str().expect("utf8"), "--fresh"]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!(summary["status"], "finished");
    assert_eq!(summary["global_step"], 12);
}

#[test]
fn checked_in_training_schema_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/train.schema.json");
    let on_disk = std::fs::read_to_string(&path).expect("schemas/train.schema.json is checked in");
    assert!(
        on_disk == trustflow_train::spec::json_schema(),
        "schemas/train.schema.json is out of date; regenerate it with\n    \
         cargo run -- schema --train --out schemas/train.schema.json"
    );
}

/// The example training files under pipelines/train/ load, plan and pass every
/// pre-training check over the committed sample shards.
#[test]
fn example_training_files_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/train");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("pipelines/train") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let loaded = load_train_file(&path).expect("example loads");
            trustflow_train::trainer::check_only(&loaded)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 1);
}

/// `sink.train`: `trustflow run` writes the pipeline's shards, then trains on them.
#[test]
fn a_pipeline_sink_can_train_on_what_it_wrote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 10);
    let enriched = dir.path().join("enriched");
    // The target side is re-validated by `decode` before training reads it.
    let train = train_file(dir.path(), &c, "after", "", "");
    let text = std::fs::read_to_string(&train).expect("read");
    let target = format!("{}/target/*.parquet", c.display());
    std::fs::write(
        &train,
        text.replace(&target, &format!("{}/*.parquet", enriched.display())),
    )
    .expect("write");
    let pipeline = common::pipeline(
        dir.path(),
        "decode-then-train.yaml",
        &format!(
            "source:\n  paths: [\"{c}/target\"]\n  keep_columns: [pseudo_label, pseudo_weight, text_feature]\n\
             stages:\n  - type: decode\nsink:\n  path: \"{e}\"\n  train: after.yaml\n\
             runtime:\n  batch_size: 16\n",
            c = c.display(),
            e = enriched.display()
        ),
    );
    let out = common::run_ok(&["run", "--quiet", pipeline.to_str().expect("utf8")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("invariant holds"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("out-after/_report.json")).expect("training ran"),
    )
    .expect("JSON");
    assert_eq!(report["status"], "finished");
    // Bad images were quarantined by `decode`, so training drops none on the target.
    assert_eq!(report["target_rows"], 61);
    // A second run resumes the finished training instead of starting over.
    common::run_ok(&["run", "--quiet", pipeline.to_str().expect("utf8")]);
}

/// A row the source rejects (here: a null id) never reaches the model and is not lost
/// either: it is counted among the dropped rows with the source's reason.
#[test]
fn rows_the_source_rejects_are_reported_as_dropped() {
    use std::sync::Arc;

    use arrow::array::{Array, StringArray};
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 11);
    for shard in ["part-00000", "part-00001"] {
        let path = c.join("target").join(format!("{shard}.parquet"));
        let batch = common::read_parquet(&path);
        let index = batch.schema().index_of("id").expect("id column");
        let ids = batch
            .column(index)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("utf8 ids");
        // The first row of each shard loses its id.
        let nulled: StringArray = (0..ids.len())
            .map(|i| (i > 0).then(|| ids.value(i)))
            .collect();
        let mut columns = batch.columns().to_vec();
        columns[index] = Arc::new(nulled);
        let mut fields: Vec<_> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields[index] = fields[index].clone().with_nullable(true);
        let schema = Arc::new(arrow::datatypes::Schema::new(fields));
        let batch = arrow::array::RecordBatch::try_new(schema, columns).expect("batch");
        let file = std::fs::File::create(&path).expect("rewrite");
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
    }
    let file = train_file(dir.path(), &c, "rejected", "", "");
    let report = run(&file, &fresh()).expect("training runs");
    let rejected: Vec<_> = report
        .dropped_examples
        .iter()
        .filter(|(key, _)| key.contains(":rejected:"))
        .collect();
    assert!(!rejected.is_empty(), "{:?}", report.dropped_examples);
    assert!(
        rejected.iter().all(|(_, why)| why.contains("id")),
        "{rejected:?}"
    );
}

/// `loss.warmup_epochs`: the first epochs train on L_src alone (the other terms are
/// not computed, so not reported), then every switched-on term joins; a warm-up that
/// would cover the whole run, or with L_src off, is refused where it is written.
#[test]
fn a_warm_up_trains_on_the_source_alone_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 12);
    let file = train_file(dir.path(), &c, "warm", "", "loss:\n  warmup_epochs: 2\n");
    let report = run(&file, &fresh()).expect("training runs");
    assert_eq!(report.history.len(), 3);
    for m in &report.history[..2] {
        assert!(m.loss.src.is_some(), "epoch {}", m.epoch);
        assert_eq!(
            (m.loss.tgt, m.loss.self_train, m.loss.ctr),
            (None, None, None),
            "epoch {} is a warm-up epoch",
            m.epoch
        );
        let src = m.loss.src.expect("src on");
        assert!((m.loss.total - src).abs() < 1e-9, "total is L_src alone");
    }
    let last = &report.history[2];
    for term in [last.loss.tgt, last.loss.self_train, last.loss.ctr] {
        assert!(term.is_some_and(f64::is_finite), "{:?}", last.loss);
    }

    let text = std::fs::read_to_string(&file).expect("read");
    std::fs::write(&file, text.replace("warmup_epochs: 2", "warmup_epochs: 3")).expect("write");
    let err = load_train_file(&file).expect_err("warm-up covers every epoch");
    assert!(
        err.to_string().contains("loss.warmup_epochs")
            && err.to_string().contains("below optimizer.epochs (3)"),
        "{err}"
    );
    std::fs::write(
        &file,
        text.replace("warmup_epochs: 2", "warmup_epochs: 1\n  src: 0"),
    )
    .expect("write");
    let err = load_train_file(&file).expect_err("warm-up without L_src");
    assert!(err.to_string().contains("`loss.src` is 0"), "{err}");
}

/// A training file's data sections take the pipeline's source checks: a filter past
/// the operator limit is refused with its field named (it used to reach DataFusion and
/// overflow the stack); a long one within the limit validates and trains.
#[test]
fn training_filters_are_held_to_the_pipeline_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = corpus(dir.path(), 4);
    let base = train_file(dir.path(), &c, "filter", "", "");
    let text = std::fs::read_to_string(&base).expect("read");
    for (terms, expect_ok) in [(1000, true), (20_000, false)] {
        // Every target row has a non-empty id, so the 1,000-term filter keeps them all.
        let filter = std::iter::once("id <> ''".to_string())
            .chain((0..terms).map(|i| format!("id = 'no-such-{i}'")))
            .collect::<Vec<_>>()
            .join(" OR ");
        let file = dir.path().join(format!("filter-{terms}.yaml"));
        std::fs::write(
            &file,
            text.replacen("\neval:", &format!("\n  filter: \"{filter}\"\neval:"), 1),
        )
        .expect("write");
        let out = common::bin()
            .args(["validate-train", file.to_str().expect("utf8")])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("overflow"),
            "{stderr}"
        );
        if expect_ok {
            assert_eq!(out.status.code(), Some(0), "{terms} terms: {stderr}");
        } else {
            assert_eq!(out.status.code(), Some(1), "{terms} terms: {stderr}");
            assert!(
                stderr.contains("target.filter") && stderr.contains("expected at most"),
                "{stderr}"
            );
        }
    }
}
