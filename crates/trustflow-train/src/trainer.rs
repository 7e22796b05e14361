//! The training loop (docs/method.md sections 4-6) fed by [`super::data`]: plan and check
//! both domains, build or restore the model, then for every step take the next ready
//! batch from the prefetch queue (the wait is the trainer's idle time), run one forward
//! pass over all views, compute the switched-on TRUST terms, and take an SGD step on
//! the cosine schedule. Each epoch ends with evaluation (when an `eval` split is
//! given; reported only), a line in `metrics.jsonl` and a checkpoint.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use trustflow_engine::runtime::StepMetrics;
use trustflow_engine::runtime::spawn_scoped;

use crossbeam_channel::{Receiver, bounded};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

pub use super::checkpoint::EpochSums;
use super::checkpoint::{self, CheckpointState};
use super::data::{
    self, DomainData, Needs, ReadyStep, SideTensors, StepJob, ViewSettings, plan_domain, storage,
};
use super::losses::{LossError, TrustBatch, trust_loss};
use super::metrics::{self, ClassAccuracy, WeightSeparation};
use super::model::VisionModel;
use super::one_pass::{self, LiveReader, OnePass, WrittenTarget};
use super::scan::{self, DomainScan};
use super::sgd::{Sgd, learning_rate};
use super::spec::{LoadedTrain, TrainDevice};
use trustflow_engine::error::{Error, Result};
use trustflow_engine::runtime::CancelToken;
use trustflow_engine::source;
use trustflow_engine::spec::SpecOrigin;

/// Called with the run's progress after every step and at every epoch's end.
pub type ProgressFn = std::sync::Arc<dyn Fn(&TrainProgress) + Send + Sync>;

/// How a training run is started.
#[derive(Clone, Default)]
pub struct TrainOptions {
    /// Continue from the output's latest checkpoint (it must come from the same
    /// training file and shards).
    pub resume: bool,
    /// Delete earlier checkpoints and metrics in the output folder first.
    pub fresh: bool,
    /// Checked between steps: save a checkpoint and stop.
    pub cancel: Option<CancelToken>,
    /// Stop abruptly after this many steps in total, writing nothing (what a kill
    /// does; for tests of resuming).
    pub abort_after_steps: Option<u64>,
    /// Called after every step and at every epoch's end.
    pub progress: Option<ProgressFn>,
    /// Sleep this long in every step (a deliberately slow trainer, for tests of
    /// backpressure).
    pub slow_steps: Option<Duration>,
}

impl std::fmt::Debug for TrainOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainOptions")
            .field("resume", &self.resume)
            .field("fresh", &self.fresh)
            .field("abort_after_steps", &self.abort_after_steps)
            .finish()
    }
}

/// A live view of the run for progress displays.
#[derive(Debug, Clone, Serialize)]
pub struct TrainProgress {
    pub epoch: u64,
    pub epochs: u64,
    pub step: u64,
    pub steps_per_epoch: u64,
    pub global_step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub lr: f64,
    pub idle_fraction: f64,
    pub steps_per_s: f64,
    /// At an epoch's end: that epoch's accuracy on the eval split (reported only).
    pub eval_accuracy: Option<f64>,
}

/// Mean of each switched-on term over an epoch's steps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LossMeans {
    pub total: f64,
    pub src: Option<f64>,
    pub tgt: Option<f64>,
    pub self_train: Option<f64>,
    pub ctr: Option<f64>,
}

/// Pseudo-label quality on target rows that carry a label (evaluation only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PseudoLabelQuality {
    pub rows: usize,
    pub accuracy: Option<f64>,
    pub weights: WeightSeparation,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    pub epoch: u64,
    pub global_step: u64,
    pub steps: u64,
    pub skipped_steps: u64,
    pub lr_end: f64,
    pub loss: LossMeans,
    /// Top-1 accuracy on the `eval` split (reported only; never used to choose a
    /// checkpoint).
    pub target_eval: Option<ClassAccuracy>,
    pub pseudo_labels: Option<PseudoLabelQuality>,
    /// Share of the epoch's step time (waiting included; evaluation and checkpoints
    /// not) that the loop spent waiting on the prefetch queue.
    pub trainer_idle_fraction: f64,
    /// Steps per second of step time.
    pub steps_per_s: f64,
    /// The whole epoch, evaluation and checkpoint included.
    pub wall_s: f64,
    pub eval_s: f64,
    pub rows_dropped: u64,
}

/// How a training run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainStatus {
    /// Every epoch ran.
    Finished,
    /// Stopped on purpose after a given number of steps (tests of resume); no report
    /// file is written.
    Aborted,
    /// Stopped by a signal; the last checkpoint resumes it.
    Interrupted,
}

/// `_report.json` of a training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub name: String,
    pub status: TrainStatus,
    pub spec_hash: String,
    pub output: PathBuf,
    pub device: String,
    pub classes: i64,
    pub feature_dim: i64,
    pub source_rows: u64,
    pub target_rows: u64,
    pub eval_rows: Option<u64>,
    pub epochs: u64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub global_step: u64,
    pub resumed_from_step: Option<u64>,
    pub wall_s: f64,
    /// Steps per second of step time (waiting on data included; evaluation and
    /// checkpoints not).
    pub steps_per_s: f64,
    /// Share of step time spent waiting on the prefetch queue.
    pub trainer_idle_fraction: f64,
    /// Time in steps, in evaluation and in writing checkpoints (this process).
    pub step_s: f64,
    pub eval_s: f64,
    pub checkpoint_s: f64,
    pub rows_dropped: u64,
    /// Up to 20 examples of rows left out, with the reason.
    pub dropped_examples: Vec<(String, String)>,
    pub checkpoint: Option<PathBuf>,
    pub history: Vec<EpochMetrics>,
}

const DROPPED_EXAMPLES: usize = 20;

/// Whether the first shard of `spec` has column `name` (for optional columns).
fn has_column(plan: &source::SourcePlan, name: &str) -> bool {
    plan.shards
        .first()
        .is_some_and(|s| s.file_schema.field_with_name(name).is_ok())
}

fn spec_hash(loaded: &LoadedTrain, domains: &[&DomainData], stream: Option<&str>) -> String {
    let mut h = Sha256::new();
    let mut spec = loaded.spec.clone();
    // Where checkpoints go does not change what is trained.
    spec.output.clear();
    h.update(serde_json::to_vec(&spec).unwrap_or_default());
    for d in domains {
        for shard in &d.plan.shards {
            h.update(shard.path.to_string_lossy().as_bytes());
            h.update(format!("{:?}", shard.fingerprint).as_bytes());
        }
    }
    if let Some(stream) = stream {
        h.update(b"one-pass target\0");
        h.update(stream.as_bytes());
    }
    format!("{:x}", h.finalize())[..16].to_string()
}

/// Where the target's rows come from.
enum TargetSupply {
    Written(Box<WrittenTarget>),
    /// The first epoch's from a pipeline's feed, later epochs' from what it wrote.
    Live(OnePass),
}

/// Both domains planned and scanned: what a run needs before its first step.
struct Prepared {
    source: DomainData,
    target: TargetSupply,
    eval: Option<DomainData>,
    source_scan: DomainScan,
    eval_scan: Option<DomainScan>,
    /// Exact for written targets; for a live one, estimated from the pipeline's
    /// planned rows until its first epoch ends.
    steps_per_epoch: u64,
    total_steps: u64,
    hash: String,
}

/// Steps in an epoch: every row of the longer domain once.
fn epoch_steps(source_rows: u64, target_rows: u64, batch_size: usize) -> u64 {
    let b = batch_size as u64;
    source_rows.div_ceil(b).max(target_rows.div_ceil(b))
}

/// Plans the target as the training file reads it and scans it. Pseudo-labels and
/// weights are read when present even if no term needs them, to report their quality.
fn plan_target(loaded: &LoadedTrain) -> Result<WrittenTarget> {
    let spec = &loaded.spec;
    let loss = &spec.loss;
    let cols = &spec.columns;
    let batch_size = spec.data.batch_size;
    let target_plain =
        source::plan_section(loaded, &spec.target, "target", batch_size, None, storage())?;
    let target_needs = Needs {
        label: false,
        pseudo_label: (loss.needs_pseudo_labels() || has_column(&target_plain, &cols.pseudo_label))
            .then(|| cols.pseudo_label.clone()),
        pseudo_weight: (loss.needs_weights() || has_column(&target_plain, &cols.pseudo_weight))
            .then(|| cols.pseudo_weight.clone()),
        text_feature: loss
            .needs_text_features()
            .then(|| cols.text_feature.clone()),
    };
    let data = plan_domain(
        loaded,
        &spec.target,
        data::Domain::Target,
        target_needs,
        batch_size,
    )?;
    let scan = scan::scan(&data, spec.model.classes)?;
    if scan.rows == 0 {
        return Err(Error::Invalid(format!(
            "{}: `target` has no rows (after its filter)",
            loaded.file.display()
        )));
    }
    Ok(WrittenTarget { data, scan })
}

/// The source and eval domains, planned and scanned.
fn plan_source_and_eval(
    loaded: &LoadedTrain,
) -> Result<(
    DomainData,
    DomainScan,
    Option<DomainData>,
    Option<DomainScan>,
)> {
    let spec = &loaded.spec;
    let loss = &spec.loss;
    let batch_size = spec.data.batch_size;
    let feature = loss
        .needs_text_features()
        .then(|| spec.columns.text_feature.clone());
    let source = plan_domain(
        loaded,
        &spec.source,
        data::Domain::Source,
        Needs {
            label: loss.src != 0.0,
            text_feature: feature,
            ..Needs::default()
        },
        batch_size,
    )?;
    let eval = match &spec.eval {
        Some(e) => Some(plan_domain(
            loaded,
            e,
            data::Domain::Eval,
            Needs {
                label: true,
                ..Needs::default()
            },
            batch_size,
        )?),
        None => None,
    };
    let classes = spec.model.classes;
    let source_scan = scan::scan(&source, classes)?;
    if source_scan.rows == 0 {
        return Err(Error::Invalid(format!(
            "{}: `source` has no rows (after its filter)",
            loaded.file.display()
        )));
    }
    let eval_scan = match &eval {
        Some(e) => Some(scan::scan(e, classes)?),
        None => None,
    };
    Ok((source, source_scan, eval, eval_scan))
}

/// Plans every domain and checks its data (columns, labels, weights, features).
fn prepare(loaded: &LoadedTrain) -> Result<Prepared> {
    let spec = &loaded.spec;
    let (source, source_scan, eval, eval_scan) = plan_source_and_eval(loaded)?;
    let target = plan_target(loaded)?;
    if let (Some(a), Some(b)) = (source_scan.feature_dim, target.scan.feature_dim)
        && a != b
    {
        return Err(Error::Invalid(format!(
            "{}: source rows' `{}` have {a} values but target rows' have {b}; both must \
             come from the same text encoder",
            loaded.file.display(),
            spec.columns.text_feature
        )));
    }
    let steps_per_epoch = epoch_steps(source_scan.rows, target.scan.rows, spec.data.batch_size);
    let mut domains = vec![&source, &target.data];
    domains.extend(eval.as_ref());
    let hash = spec_hash(loaded, &domains, None);
    Ok(Prepared {
        source,
        target: TargetSupply::Written(Box::new(target)),
        eval,
        source_scan,
        eval_scan,
        steps_per_epoch,
        total_steps: steps_per_epoch * spec.optimizer.epochs,
        hash,
    })
}

/// A one-pass run's plan: the target is not written yet, so its size is the
/// pipeline's planned rows until the stream ends, and checkpoints are keyed by the
/// pipeline's hash and inputs instead of the target's shards.
fn prepare_one_pass(loaded: &LoadedTrain, one: OnePass) -> Result<Prepared> {
    let spec = &loaded.spec;
    let (source, source_scan, eval, eval_scan) = plan_source_and_eval(loaded)?;
    let steps_per_epoch = epoch_steps(source_scan.rows, one.planned_rows, spec.data.batch_size);
    let mut domains = vec![&source];
    domains.extend(eval.as_ref());
    let hash = spec_hash(loaded, &domains, Some(&one.stream_hash));
    Ok(Prepared {
        source,
        target: TargetSupply::Live(one),
        eval,
        source_scan,
        eval_scan,
        steps_per_epoch,
        total_steps: steps_per_epoch * spec.optimizer.epochs,
        hash,
    })
}

/// What `trustflow validate-train` prints.
#[derive(Debug, Clone, Serialize)]
pub struct TrainPlan {
    pub name: String,
    pub spec_hash: String,
    pub source_rows: u64,
    pub source_shards: usize,
    pub target_rows: u64,
    pub target_shards: usize,
    pub eval_rows: Option<u64>,
    pub text_feature_dim: Option<usize>,
    pub feature_dim: i64,
    pub classes: i64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub pseudo_labels: Option<PseudoLabelQuality>,
}

/// Every check `train` makes before its first step (data scan, model build and the
/// TorchScript probe), without training.
pub fn check_only(loaded: &LoadedTrain) -> Result<TrainPlan> {
    let p = prepare(loaded)?;
    let TargetSupply::Written(target) = &p.target else {
        return Err(Error::Internal(
            "a prepared training run reads a live target".into(),
        ));
    };
    let spec = &loaded.spec;
    let model = VisionModel::new(
        &spec.model.backbone,
        |f| loaded.resolve(f),
        spec.model.classes,
        i64::from(spec.augment.size),
        Device::Cpu,
        None,
        spec.seed,
    )?;
    Ok(TrainPlan {
        name: loaded.name(),
        spec_hash: p.hash,
        source_rows: p.source_scan.rows,
        source_shards: p.source.plan.shards.len(),
        target_rows: target.scan.rows,
        target_shards: target.data.plan.shards.len(),
        eval_rows: p.eval_scan.as_ref().map(|s| s.rows),
        text_feature_dim: p.source_scan.feature_dim.or(target.scan.feature_dim),
        feature_dim: model.feature_dim,
        classes: spec.model.classes,
        steps_per_epoch: p.steps_per_epoch,
        total_steps: p.total_steps,
        pseudo_labels: pseudo_label_quality(&target.scan),
    })
}

/// Runs (or resumes) the training described by `loaded`.
pub fn train(loaded: &LoadedTrain, options: &TrainOptions) -> Result<TrainReport> {
    let started = Instant::now();
    run_training(loaded, options, prepare(loaded)?, started)
}

/// Runs (or resumes) the training of `loaded` fed live by a pipeline
/// ([`super::one_pass`]); call [`super::one_pass::check`] first, before the pipeline
/// reads a row.
pub fn train_one_pass(
    loaded: &LoadedTrain,
    options: &TrainOptions,
    one: OnePass,
) -> Result<TrainReport> {
    let started = Instant::now();
    run_training(loaded, options, prepare_one_pass(loaded, one)?, started)
}

/// Runs `plan` with the one-pass trainer of `loaded`: the pipeline on this thread, the
/// trainer on its own, fed by the run's sink and stopped by the run's cancel token.
/// Checks the training file against the pipeline first (the outer error); then both
/// outcomes, as each side ends on its own (a failed trainer leaves the pipeline to
/// finish writing; a failed pipeline ends the trainer's stream).
pub fn train_with_pipeline(
    plan: trustflow_engine::plan::Plan,
    loaded: &LoadedTrain,
    mut run: trustflow_engine::run::RunOptions,
    train: &TrainOptions,
) -> Result<(
    Result<trustflow_engine::run::RunReport>,
    Result<TrainReport>,
)> {
    one_pass::check(loaded, &plan)?;
    let spec = &plan.pipeline.spec;
    let depth = spec
        .sink
        .train_queue_depth
        .unwrap_or(spec.runtime.queue_depth);
    let (feed, rows) = trustflow_engine::runtime::feed::channel(depth, "train");
    let one = OnePass::of(&plan, rows);
    let options = TrainOptions {
        cancel: Some(run.cancel.clone()),
        ..train.clone()
    };
    run.feed = Some(feed);
    Ok(std::thread::scope(|scope| {
        let trainer = trustflow_engine::runtime::spawn_scoped(scope, "trustflow-trainer", || {
            train_one_pass(loaded, &options, one)
        });
        let ran = trustflow_engine::run::execute(plan, run);
        let trained = match trainer {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("the trainer panicked".into()))),
            Err(e) => Err(e),
        };
        (ran, trained)
    }))
}

fn run_training(
    loaded: &LoadedTrain,
    options: &TrainOptions,
    prepared: Prepared,
    started: Instant,
) -> Result<TrainReport> {
    let spec = &loaded.spec;
    let loss = &spec.loss;
    let batch_size = spec.data.batch_size;
    let device = match spec.model.device {
        TrainDevice::Cpu => Device::Cpu,
        TrainDevice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
        TrainDevice::Cuda => {
            return Err(Error::Environment(format!(
                "{}: model.device is `cuda` but libtorch sees no CUDA device (the default \
                 setup installs libtorch without its CUDA libraries: set up with \
                 `TRUSTFLOW_CUDA=1 source scripts/setup.sh` on a machine with a GPU), or \
                 use `device: cpu`",
                loaded.file.display()
            )));
        }
    };
    if let Some(threads) = spec.model.threads {
        tch::set_num_threads(threads as i32);
    }

    let Prepared {
        source,
        target,
        eval,
        source_scan,
        eval_scan,
        mut steps_per_epoch,
        mut total_steps,
        hash,
    } = prepared;
    // The target as written: known now, or (one pass) planned by the sampler when the
    // stream ends.
    let written: OnceLock<WrittenTarget> = OnceLock::new();
    let live = match target {
        TargetSupply::Written(t) => {
            let _ = written.set(*t);
            None
        }
        TargetSupply::Live(one) => Some(one),
    };
    let consumer = live.as_ref().map(|one| one.feed.shared().clone());
    let classes = spec.model.classes;
    let epochs = spec.optimizer.epochs;

    // Output folder, earlier state.
    let output = loaded.resolve(&spec.output);
    if options.fresh && output.exists() {
        for name in ["checkpoints", "metrics.jsonl", "_report.json"] {
            let p = output.join(name);
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            if let Err(e) = r
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(Error::io(&p, e));
            }
        }
    }
    std::fs::create_dir_all(&output).map_err(|e| Error::io(&output, e))?;
    let existing = checkpoint::latest(&output)?;
    let resume_from = match (existing, options.resume) {
        (Some(dir), true) => {
            let state = checkpoint::read_state(&dir)?;
            if state.spec_hash != hash {
                return Err(Error::input(
                    &dir,
                    format!(
                        "this checkpoint comes from another training file or other shards \
                         (hash {} vs {hash}); use --fresh to start over",
                        state.spec_hash
                    ),
                ));
            }
            Some((dir, state))
        }
        (Some(dir), false) => {
            return Err(Error::input(
                &output,
                format!(
                    "holds checkpoints of an earlier run (latest {}); pass --resume to \
                     continue it or --fresh to start over",
                    dir.display()
                ),
            ));
        }
        (None, _) => None,
    };

    let mut model = VisionModel::new(
        &spec.model.backbone,
        |p| loaded.resolve(p),
        classes,
        i64::from(spec.augment.size),
        device,
        resume_from
            .as_ref()
            .and_then(|(dir, _)| checkpoint::backbone_file(dir))
            .as_deref(),
        spec.seed,
    )?;
    let mut sgd = Sgd::new(
        &model.vs,
        spec.optimizer.momentum,
        spec.optimizer.weight_decay,
    );
    let metrics_path = output.join("metrics.jsonl");
    let (start_epoch, start_step, mut global_step, mut sums, resumed_from_step) = match &resume_from
    {
        Some((dir, state)) => {
            checkpoint::restore(dir, &mut model, &mut sgd)?;
            truncate_lines(&metrics_path, state.metrics_lines)?;
            // Past a live first epoch the schedule is exact and only the checkpoint
            // knows it (the stream's length is not replayed).
            if live.is_some() && state.epoch >= 1 {
                steps_per_epoch = state.steps_per_epoch;
                total_steps = state.total_steps;
            }
            (
                state.epoch,
                state.step,
                state.global_step,
                state.partial.clone(),
                Some(state.global_step),
            )
        }
        None => {
            std::fs::write(&metrics_path, b"").map_err(|e| Error::io(&metrics_path, e))?;
            (0, 0, 0, EpochSums::default(), None)
        }
    };
    let mut history = read_history(&metrics_path)?;

    let views = ViewSettings {
        augment: spec.augment.clone(),
        seed: spec.seed,
        strong_source: loss.needs_strong_source(),
        strong_target: loss.needs_strong_target(),
        unit_weights: loss.unweighted,
    };
    let workers = spec.data.workers;
    let (jobs_tx, jobs_rx) = bounded::<StepJob>(workers);
    let (ready_tx, ready_rx) = bounded::<Result<Ready>>(spec.data.prefetch);
    let shuffle_buffer = spec.data.shuffle_buffer;
    let seed = spec.seed;
    let mut dropped_examples: Vec<(String, String)> = Vec::new();
    let mut rows_dropped_total = 0u64;
    let mut idle_total = Duration::ZERO;
    let mut step_total = Duration::ZERO;
    let mut eval_total = Duration::ZERO;
    let mut checkpoint_total = Duration::ZERO;
    let mut last_checkpoint: Option<PathBuf> = None;
    let mut status = TrainStatus::Finished;
    let steps_before = global_step;

    let outcome: Result<()> = std::thread::scope(|scope| {
        let (source, written, live) = (&source, &written, &live);
        let sampler_ready = ready_tx.clone();
        let cancel = options.cancel.clone();
        let source_rows = source_scan.rows;
        spawn_scoped(scope, "trustflow-sampler", move || {
            let plan_written = || plan_target(loaded);
            let sample = || -> Result<()> {
                for epoch in start_epoch..epochs {
                    let mut plan = data::EpochSampling {
                        seed,
                        epoch,
                        steps: 0,
                        first_step: if epoch == start_epoch { start_step } else { 0 },
                        batch_size,
                        shuffle_buffer,
                    };
                    let send = |job| jobs_tx.send(job).is_ok();
                    let steps = match live {
                        Some(one) if epoch == 0 => {
                            let needs = one_pass::target_needs(loaded);
                            let mut reader = LiveReader::new(
                                &one.feed,
                                loaded,
                                needs,
                                &one.out_dir,
                                cancel.clone(),
                            );
                            let n = one_pass::sample_live_epoch(
                                source,
                                source_rows,
                                &mut reader,
                                written,
                                &plan_written,
                                plan,
                                send,
                            )?;
                            let Some(n) = n else { return Ok(()) };
                            n
                        }
                        _ => {
                            if let Some(one) = live
                                && written.get().is_none()
                            {
                                one_pass::drain(&one.feed, cancel.as_ref())?;
                                let _ = written.set(plan_written()?);
                            }
                            let target = written.get().ok_or_else(|| {
                                Error::Internal("the target was not planned".into())
                            })?;
                            plan.steps = epoch_steps(source_rows, target.scan.rows, batch_size);
                            data::sample_epoch(source, &target.data, plan, send)?;
                            plan.steps
                        }
                    };
                    if sampler_ready
                        .send(Ok(Ready::EpochEnd { epoch, steps }))
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                Ok(())
            };
            if let Err(e) = sample() {
                let _ = sampler_ready.send(Err(e));
            }
        })?;
        for i in 0..workers {
            let (jobs_rx, ready_tx, views) = (jobs_rx.clone(), ready_tx.clone(), &views);
            spawn_scoped(scope, &format!("trustflow-batch-{i}"), move || {
                for job in jobs_rx.iter() {
                    if ready_tx
                        .send(data::build_step(job, views).map(|s| Ready::Step(Box::new(s))))
                        .is_err()
                    {
                        return;
                    }
                }
            })?;
        }
        drop((ready_tx, jobs_rx));
        let ready = ready_rx;
        let mut reorder: BTreeMap<(u64, u64), Ready> = BTreeMap::new();
        let mut epoch_started = Instant::now();
        let mut epoch_wall_before = sums.wall_s;
        for epoch in start_epoch..epochs {
            let terms = loss.terms_in_epoch(epoch);
            let first = if epoch == start_epoch { start_step } else { 0 };
            model.set_train(true)?;
            // A live first epoch's length is known when the stream ends.
            let epoch_length = match (&live, epoch) {
                (Some(_), 0) => None,
                _ => Some(steps_per_epoch),
            };
            let mut step = first;
            loop {
                let t0 = Instant::now();
                let batch = match next_ready(&ready, &mut reorder, (epoch, step)) {
                    Ok(Ready::Step(batch)) => batch,
                    Ok(Ready::EpochEnd { .. }) => break,
                    // The pipeline feeding a live epoch was interrupted.
                    Err(Error::Cancelled) => {
                        sums.wall_s = epoch_wall_before + epoch_started.elapsed().as_secs_f64();
                        let state = CheckpointState {
                            format: checkpoint::STATE_FORMAT,
                            spec_hash: hash.clone(),
                            epoch,
                            step,
                            global_step,
                            steps_per_epoch,
                            total_steps,
                            metrics_lines: history.len(),
                            partial: sums.clone(),
                        };
                        last_checkpoint = Some(checkpoint::save(&output, &state, &model, &sgd)?);
                        status = TrainStatus::Interrupted;
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                let waited = t0.elapsed();
                if let Some(slow) = options.slow_steps {
                    std::thread::sleep(slow);
                }
                idle_total += waited;
                sums.idle_s += waited.as_secs_f64();
                sums.rows_dropped += batch.dropped.len() as u64;
                rows_dropped_total += batch.dropped.len() as u64;
                for d in batch.dropped.iter() {
                    if dropped_examples.len() < DROPPED_EXAMPLES {
                        dropped_examples.push(d.clone());
                    }
                }
                let lr = learning_rate(&spec.optimizer, global_step, total_steps);
                match (&batch.source, &batch.target) {
                    (Some(s), Some(t)) => {
                        let values =
                            step_loss(&model, s, t, &terms, loss, device).map_err(|e| {
                                describe_loss_error(e, global_step, epoch, step, &last_checkpoint)
                            })?;
                        sgd.zero_grad();
                        values.0.backward();
                        sgd.step(lr);
                        let v = values.1;
                        sums.steps += 1;
                        sums.total += v[0];
                        sums.src += v[1];
                        sums.tgt += v[2];
                        sums.self_train += v[3];
                        sums.ctr += v[4];
                    }
                    // Every image of one side failed to decode: nothing to learn from.
                    _ => sums.skipped_steps += 1,
                }
                global_step += 1;
                let took = t0.elapsed();
                if let Some(c) = consumer.as_ref().filter(|_| epoch_length.is_none()) {
                    StepMetrics::add(&c.consumer.starved_ns, waited);
                    StepMetrics::add(&c.consumer.busy_ns, took.saturating_sub(waited));
                    c.consumer.rows_out.fetch_add(batch_size as u64, Relaxed);
                }
                step_total += took;
                sums.step_s += took.as_secs_f64();
                let elapsed = step_total.as_secs_f64();
                if let Some(report) = &options.progress {
                    report(&TrainProgress {
                        epoch,
                        epochs,
                        step: step + 1,
                        steps_per_epoch,
                        global_step,
                        total_steps,
                        loss: sums.total / sums.steps.max(1) as f64,
                        lr,
                        idle_fraction: idle_total.as_secs_f64() / elapsed.max(1e-9),
                        steps_per_s: (global_step - steps_before) as f64 / elapsed.max(1e-9),
                        eval_accuracy: None,
                    });
                }
                if options.abort_after_steps == Some(global_step) {
                    status = TrainStatus::Aborted;
                    return Ok(());
                }
                let at_epoch_end = epoch_length == Some(step + 1);
                let every = spec
                    .checkpoint_every_steps
                    .is_some_and(|n| global_step % n == 0);
                let cancelled = options.cancel.as_ref().is_some_and(|c| c.is_cancelled());
                if (every || cancelled) && !at_epoch_end {
                    sums.wall_s = epoch_wall_before + epoch_started.elapsed().as_secs_f64();
                    let state = CheckpointState {
                        format: checkpoint::STATE_FORMAT,
                        spec_hash: hash.clone(),
                        epoch,
                        step: step + 1,
                        global_step,
                        steps_per_epoch,
                        total_steps,
                        metrics_lines: history.len(),
                        partial: sums.clone(),
                    };
                    let t = Instant::now();
                    last_checkpoint = Some(checkpoint::save(&output, &state, &model, &sgd)?);
                    checkpoint_total += t.elapsed();
                }
                if cancelled && !at_epoch_end {
                    status = TrainStatus::Interrupted;
                    return Ok(());
                }
                step += 1;
            }
            // A live first epoch is over: the stream's length makes the schedule exact.
            if epoch_length.is_none()
                && let Some(target) = written.get()
            {
                steps_per_epoch = epoch_steps(source_scan.rows, target.scan.rows, batch_size);
                total_steps = step + epochs.saturating_sub(1) * steps_per_epoch;
            }
            let pseudo_quality = written.get().and_then(|t| pseudo_label_quality(&t.scan));
            // End of epoch: evaluate, report, checkpoint.
            sums.wall_s = epoch_wall_before + epoch_started.elapsed().as_secs_f64();
            let t = Instant::now();
            let target_eval = match &eval {
                Some(e) => Some(evaluate(&mut model, e, batch_size, &spec.augment, device)?),
                None => None,
            };
            let eval_s = t.elapsed();
            eval_total += eval_s;
            let steps = sums.steps.max(1) as f64;
            let on = |scale: f64, sum: f64| (scale != 0.0).then_some(sum / steps);
            let record = EpochMetrics {
                epoch,
                global_step,
                steps: sums.steps,
                skipped_steps: sums.skipped_steps,
                lr_end: learning_rate(&spec.optimizer, global_step, total_steps),
                loss: LossMeans {
                    total: sums.total / steps,
                    src: on(terms.src, sums.src),
                    tgt: on(terms.tgt, sums.tgt),
                    self_train: on(terms.self_train, sums.self_train),
                    ctr: on(terms.ctr, sums.ctr),
                },
                target_eval,
                pseudo_labels: pseudo_quality,
                trainer_idle_fraction: sums.idle_s / sums.step_s.max(1e-9),
                steps_per_s: (sums.steps + sums.skipped_steps) as f64 / sums.step_s.max(1e-9),
                wall_s: sums.wall_s + eval_s.as_secs_f64(),
                eval_s: eval_s.as_secs_f64(),
                rows_dropped: sums.rows_dropped,
            };
            append_line(&metrics_path, &record)?;
            history.push(record);
            sums = EpochSums::default();
            let state = CheckpointState {
                format: checkpoint::STATE_FORMAT,
                spec_hash: hash.clone(),
                epoch: epoch + 1,
                step: 0,
                global_step,
                steps_per_epoch,
                total_steps,
                metrics_lines: history.len(),
                partial: EpochSums::default(),
            };
            let t = Instant::now();
            last_checkpoint = Some(checkpoint::save(&output, &state, &model, &sgd)?);
            checkpoint_total += t.elapsed();
            if let Some(report) = &options.progress {
                report(&TrainProgress {
                    epoch: epoch + 1,
                    epochs,
                    step: 0,
                    steps_per_epoch,
                    global_step,
                    total_steps,
                    loss: history.last().map_or(0.0, |h| h.loss.total),
                    lr: learning_rate(&spec.optimizer, global_step, total_steps),
                    idle_fraction: idle_total.as_secs_f64() / step_total.as_secs_f64().max(1e-9),
                    steps_per_s: 0.0,
                    eval_accuracy: history
                        .last()
                        .and_then(|h| h.target_eval.as_ref())
                        .and_then(|e| e.accuracy),
                });
            }
            epoch_started = Instant::now();
            epoch_wall_before = 0.0;
            if options.cancel.as_ref().is_some_and(|c| c.is_cancelled()) && epoch + 1 < epochs {
                status = TrainStatus::Interrupted;
                return Ok(());
            }
        }
        Ok(())
    });
    outcome?;

    let step_s = step_total.as_secs_f64();
    let report = TrainReport {
        name: loaded.name(),
        status,
        spec_hash: hash,
        output: output.clone(),
        device: format!("{device:?}"),
        classes,
        feature_dim: model.feature_dim,
        source_rows: source_scan.rows,
        target_rows: written.get().map_or(0, |t| t.scan.rows),
        eval_rows: eval_scan.map(|s| s.rows),
        epochs,
        steps_per_epoch,
        total_steps,
        global_step,
        resumed_from_step,
        wall_s: started.elapsed().as_secs_f64(),
        steps_per_s: (global_step - steps_before) as f64 / step_s.max(1e-9),
        trainer_idle_fraction: idle_total.as_secs_f64() / step_s.max(1e-9),
        step_s,
        eval_s: eval_total.as_secs_f64(),
        checkpoint_s: checkpoint_total.as_secs_f64(),
        rows_dropped: rows_dropped_total,
        dropped_examples,
        checkpoint: last_checkpoint.or_else(|| checkpoint::latest(&output).ok().flatten()),
        history,
    };
    if report.status != TrainStatus::Aborted {
        let file = output.join("_report.json");
        let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::output(&file, e))?;
        std::fs::write(&file, json).map_err(|e| Error::io(&file, e))?;
    }
    Ok(report)
}

/// What the data side hands the training loop: a step, or the end of an epoch after
/// its last step.
enum Ready {
    Step(Box<ReadyStep>),
    EpochEnd { epoch: u64, steps: u64 },
}

impl Ready {
    fn key(&self) -> (u64, u64) {
        match self {
            Ready::Step(s) => (s.epoch, s.step),
            Ready::EpochEnd { epoch, steps } => (*epoch, *steps),
        }
    }
}

/// Waits for step `want` (or the epoch's end in its place), keeping what arrives early
/// (workers finish out of order).
fn next_ready(
    ready: &Receiver<Result<Ready>>,
    reorder: &mut BTreeMap<(u64, u64), Ready>,
    want: (u64, u64),
) -> Result<Ready> {
    loop {
        if let Some(step) = reorder.remove(&want) {
            return Ok(step);
        }
        match ready.recv() {
            Ok(Ok(item)) => {
                reorder.insert(item.key(), item);
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::Internal(format!(
                    "the data side stopped before epoch {} step {}",
                    want.0, want.1
                )));
            }
        }
    }
}

/// Forward pass over every view of the step at once, then the TRUST terms. Returns
/// the scaled total (with its graph) and [total, src, tgt, self_train, ctr] values.
fn step_loss(
    model: &VisionModel,
    s: &SideTensors,
    t: &SideTensors,
    terms: &super::losses::LossTerms,
    loss: &super::spec::LossSpec,
    device: Device,
) -> std::result::Result<(Tensor, [f64; 5]), StepError> {
    let mut views = vec![&s.weak, &t.weak];
    views.extend(s.strong.iter());
    views.extend(t.strong.iter());
    let x = Tensor::cat(&views, 0).to_device(device);
    let out = model.forward(&x).map_err(StepError::Engine)?;
    let (ns, nt) = (s.rows as i64, t.rows as i64);
    let mut offset = 0;
    let mut take = |n: i64| {
        let r = (
            out.logits.narrow(0, offset, n),
            out.features.narrow(0, offset, n),
        );
        offset += n;
        r
    };
    let (source_logits, source_features) = take(ns);
    let (target_logits, target_features) = take(nt);
    let source_strong = s.strong.as_ref().map(|_| take(ns));
    let target_strong = t.strong.as_ref().map(|_| take(nt));
    let on = |x: &Option<Tensor>| x.as_ref().map(|t| t.to_device(device));
    let batch = TrustBatch {
        source_logits: Some(source_logits),
        source_labels: on(&s.labels),
        source_features: Some(source_features),
        source_features_strong: source_strong.as_ref().map(|(_, f)| f.shallow_clone()),
        source_caption_features: on(&s.features),
        target_logits: Some(target_logits),
        target_strong_logits: target_strong.as_ref().map(|(l, _)| l.shallow_clone()),
        pseudo_labels: on(&t.pseudo_labels),
        weights: on(&t.weights),
        target_features: Some(target_features),
        target_features_strong: target_strong.as_ref().map(|(_, f)| f.shallow_clone()),
        target_caption_features: on(&t.features),
    };
    let values = trust_loss(&batch, terms, loss.tau, loss.tau_base).map_err(StepError::Loss)?;
    let v = [
        values.total.double_value(&[]),
        values.src.unwrap_or(0.0),
        values.tgt.unwrap_or(0.0),
        values.self_train.unwrap_or(0.0),
        values.ctr.unwrap_or(0.0),
    ];
    Ok((values.total, v))
}

enum StepError {
    Engine(Error),
    Loss(LossError),
}

fn describe_loss_error(
    e: StepError,
    global_step: u64,
    epoch: u64,
    step: u64,
    last_checkpoint: &Option<PathBuf>,
) -> Error {
    let kept = match last_checkpoint {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint was written by this run yet".into(),
    };
    match e {
        StepError::Engine(e) => e,
        StepError::Loss(
            e @ (LossError::NonFiniteLoss { .. } | LossError::NonFiniteInput { .. }),
        ) => Error::stage(
            "train",
            format!(
                "step {global_step} (epoch {epoch}, step {step}): {e}; training stopped, {kept}"
            ),
        ),
        StepError::Loss(e) => Error::stage(
            "train",
            format!("step {global_step} (epoch {epoch}, step {step}): {e}"),
        ),
    }
}

/// Top-1 accuracy of the model on the eval split (weak views, eval mode, no grad).
fn evaluate(
    model: &mut VisionModel,
    eval: &DomainData,
    batch_size: usize,
    augment: &super::augment::AugmentConfig,
    device: Device,
) -> Result<ClassAccuracy> {
    model.set_train(false)?;
    let mut predictions = Vec::new();
    let mut labels = Vec::new();
    let mut views = Vec::with_capacity(batch_size);
    let mut batch_labels = Vec::with_capacity(batch_size);
    let mut flush =
        |views: &mut Vec<super::augment::Chw>, batch_labels: &mut Vec<i64>| -> Result<()> {
            if views.is_empty() {
                return Ok(());
            }
            let x = super::augment::batch_tensor(views)
                .map_err(|e| Error::stage("train", e))?
                .to_device(device);
            let out = tch::no_grad(|| model.forward(&x))?;
            let pred = Vec::<i64>::try_from(out.logits.argmax(-1, false).to_kind(Kind::Int64))
                .map_err(|e| Error::stage("train", e))?;
            predictions.extend(pred);
            labels.append(batch_labels);
            views.clear();
            Ok(())
        };
    data::read_all(eval, |row| {
        if let (Ok(img), Some(label)) = (data::decode(row.image.as_deref()), row.label) {
            views.push(super::augment::weak(&img, augment));
            batch_labels.push(label);
            if views.len() == batch_size {
                flush(&mut views, &mut batch_labels)?;
            }
        }
        Ok(())
    })?;
    flush(&mut views, &mut batch_labels)?;
    model.set_train(true)?;
    Ok(metrics::accuracy(
        &predictions,
        &labels,
        model.classes as usize,
    ))
}

fn pseudo_label_quality(target: &DomainScan) -> Option<PseudoLabelQuality> {
    if target.pseudo_vs_label.is_empty() {
        return None;
    }
    let pseudo: Vec<i64> = target.pseudo_vs_label.iter().map(|r| r.0).collect();
    let labels: Vec<i64> = target.pseudo_vs_label.iter().map(|r| r.2).collect();
    let right = pseudo.iter().zip(&labels).filter(|(p, l)| p == l).count();
    let weighted: Vec<(f64, i64, i64)> = target
        .pseudo_vs_label
        .iter()
        .filter_map(|&(p, w, l)| w.map(|w| (w, p, l)))
        .collect();
    let w: Vec<f64> = weighted.iter().map(|r| r.0).collect();
    let p: Vec<i64> = weighted.iter().map(|r| r.1).collect();
    let l: Vec<i64> = weighted.iter().map(|r| r.2).collect();
    Some(PseudoLabelQuality {
        rows: pseudo.len(),
        accuracy: Some(right as f64 / pseudo.len() as f64),
        weights: metrics::weight_separation(&w, &p, &l),
    })
}

fn append_line(path: &Path, record: &EpochMetrics) -> Result<()> {
    let mut line = serde_json::to_vec(record).map_err(|e| Error::output(path, e))?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(&line).map_err(|e| Error::io(path, e))
}

/// Keeps the first `keep` lines (a resumed run rewrites the epochs after its
/// checkpoint).
fn truncate_lines(path: &Path, keep: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    let kept: String = text.lines().take(keep).map(|l| format!("{l}\n")).collect();
    std::fs::write(path, kept).map_err(|e| Error::io(path, e))
}

fn read_history(path: &Path) -> Result<Vec<EpochMetrics>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| Error::input(path, format!("not a metrics line: {e}")))
        })
        .collect()
}

/// What [`memory_fed`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryFed {
    pub steps: u64,
    pub distinct_batches: usize,
    pub wall_s: f64,
    pub steps_per_s: f64,
}

/// The trainer's own ceiling: the same model, losses and optimiser as [`train`], fed
/// from steps decoded and augmented before the clock starts (the first
/// `min(steps, steps_per_epoch)` steps of epoch 0, cycled). `trustflow bench train`
/// sets it beside a run fed from the shards.
pub fn memory_fed(loaded: &LoadedTrain, steps: u64) -> Result<MemoryFed> {
    let spec = &loaded.spec;
    if let Some(threads) = spec.model.threads {
        tch::set_num_threads(threads as i32);
    }
    let p = prepare(loaded)?;
    let device = match spec.model.device {
        TrainDevice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
        _ => Device::Cpu,
    };
    let model = VisionModel::new(
        &spec.model.backbone,
        |f| loaded.resolve(f),
        spec.model.classes,
        i64::from(spec.augment.size),
        device,
        None,
        spec.seed,
    )?;
    let mut sgd = Sgd::new(
        &model.vs,
        spec.optimizer.momentum,
        spec.optimizer.weight_decay,
    );
    let views = ViewSettings {
        augment: spec.augment.clone(),
        seed: spec.seed,
        strong_source: spec.loss.needs_strong_source(),
        strong_target: spec.loss.needs_strong_target(),
        unit_weights: spec.loss.unweighted,
    };
    let wanted = steps.min(p.steps_per_epoch).max(1);
    let TargetSupply::Written(target) = &p.target else {
        return Err(Error::Internal(
            "a prepared training run reads a live target".into(),
        ));
    };
    let mut jobs = Vec::new();
    data::sample_epoch(
        &p.source,
        &target.data,
        data::EpochSampling {
            seed: spec.seed,
            epoch: 0,
            steps: wanted,
            first_step: 0,
            batch_size: spec.data.batch_size,
            shuffle_buffer: spec.data.shuffle_buffer,
        },
        |job| {
            jobs.push(job);
            true
        },
    )?;
    let cached = jobs
        .into_iter()
        .map(|job| data::build_step(job, &views))
        .collect::<Result<Vec<_>>>()?;
    let terms = spec.loss.terms();
    let started = Instant::now();
    for i in 0..steps {
        let Some(batch) = cached.get(i as usize % cached.len()) else {
            break;
        };
        let (Some(s), Some(t)) = (&batch.source, &batch.target) else {
            continue;
        };
        let lr = learning_rate(&spec.optimizer, i, steps);
        let (total, _) = step_loss(&model, s, t, &terms, &spec.loss, device)
            .map_err(|e| describe_loss_error(e, i, 0, i, &None))?;
        sgd.zero_grad();
        total.backward();
        sgd.step(lr);
    }
    let wall_s = started.elapsed().as_secs_f64();
    Ok(MemoryFed {
        steps,
        distinct_batches: cached.len(),
        wall_s,
        steps_per_s: steps as f64 / wall_s.max(1e-9),
    })
}
