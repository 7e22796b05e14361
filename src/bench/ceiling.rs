//! `trustflow bench ceiling PIPELINE.yaml`: how close the engine gets to the model.
//! The pipeline is run end to end (read, decode, preprocess, tokenise, both ONNX
//! models, write Parquet) and, alternating with it in the same process, the same
//! `clip_score` stage's models are called on pre-made inputs: the model-only ceiling.
//!
//! The ceiling is a subset of the pipeline's work on the same resources, so end to end
//! / ceiling is at most 1 up to noise:
//! - the same stage configuration: sessions, intra-op threads, execution provider;
//! - the same batch size and as many concurrent callers as the stage has `workers`;
//! - warmed up: each caller makes one untimed call first (a session's first calls
//!   allocate its arenas and choose kernels), then all start together;
//! - long enough: callers keep calling until `min_seconds` have passed and each made
//!   `calls` calls;
//! - the same rows counted: end to end is the rows the stage scored per second of the
//!   run's wall time. Rows quarantined before the stage (a corrupt image) or by it
//!   never reach the models, so counting them would inflate the pipeline's figure.

use std::path::{Path, PathBuf};
use std::time::Instant;

use arrow::array::{Array, AsArray, RecordBatch};
use serde::Serialize;

use trustflow_engine::error::{Error, Result};
use trustflow_engine::plan::{self, Overrides};
use trustflow_engine::run::{RunOptions, RunSettings, execute};
use trustflow_engine::runtime::BatchSource;
use trustflow_engine::runtime::metrics::StepReport;
use trustflow_engine::stages::StageKind;
use trustflow_engine::stages::clip_score::ClipScoreStage;

/// What to measure: also `trustflow bench ceiling`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CeilingOptions {
    pub pipeline: PathBuf,
    /// The `clip_score` stage to measure (default: the first one).
    #[arg(long)]
    pub stage: Option<String>,
    /// Alternating repetitions of (ceiling, end to end).
    #[arg(long, default_value_t = 2)]
    pub repetitions: usize,
    /// Least model calls per caller per ceiling measurement.
    #[arg(long, default_value_t = 4)]
    pub calls: usize,
    /// Least seconds per ceiling measurement (after the warm-up call).
    #[arg(long, default_value_t = 10.0)]
    pub min_seconds: f64,
    /// Scratch output folder for the end-to-end runs.
    #[arg(long, default_value = "out/bench-ceiling")]
    pub scratch: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct CeilingReport {
    pub pipeline: PathBuf,
    pub stage: String,
    pub batch_size: usize,
    pub workers: usize,
    pub intra_op_threads: usize,
    pub cores: usize,
    /// Rows per second of the models alone, one figure per repetition.
    pub ceiling_rows_per_s: Vec<f64>,
    /// Rows the stage scored per second of the whole pipeline's wall time, one figure
    /// per repetition: the figure the ceiling bounds.
    pub end_to_end_rows_per_s: Vec<f64>,
    /// Every input row per second (quarantined rows included), for reference.
    pub end_to_end_input_rows_per_s: Vec<f64>,
    pub end_to_end_rows: u64,
    /// Rows the stage scored in the last repetition.
    pub end_to_end_scored_rows: u64,
    pub min_calls: usize,
    pub min_seconds: f64,
    pub mean_ceiling_rows_per_s: f64,
    pub mean_end_to_end_rows_per_s: f64,
    /// mean end to end / mean ceiling.
    pub ratio: f64,
    /// The end-to-end runs' bottleneck step and CPU utilisation (last repetition).
    pub bottleneck: Option<String>,
    pub cpu_utilisation: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Hand the canonical batches of the plan's shards `shards` (as the engine's reader
/// makes them: mapped, filtered, rows the source quarantines left out) to `take`, in
/// order, until it returns true (enough) or the shards end.
pub(crate) fn read_canonical(
    plan: &plan::Plan,
    shards: std::ops::Range<usize>,
    mut take: impl FnMut(&RecordBatch) -> Result<bool>,
) -> Result<()> {
    let source = &plan.source;
    for index in shards.filter(|&i| i < source.shards.len()) {
        let mut reader = source.open_shard(index)?;
        let mut first_row = 0u64;
        while let Some(rows) = reader.next_rows() {
            let rows = rows?;
            let (canonical, _) = reader.convert(&rows, first_row)?;
            first_row += rows.num_rows() as u64;
            if take(&canonical)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Captions of the first shard's first rows (real token lengths for the ceiling),
/// cycled to a full batch of `rows`.
pub(crate) fn sample_captions(plan: &plan::Plan, rows: usize) -> Result<Vec<String>> {
    if plan.source.shards.is_empty() {
        return Err(Error::Invalid("the pipeline has no shards".into()));
    }
    let mut captions = Vec::with_capacity(rows);
    read_canonical(plan, 0..1, |batch| {
        if let Some(col) = batch.column_by_name(trustflow_engine::columns::CAPTION) {
            let col = col.as_string::<i32>();
            for i in 0..col.len() {
                if col.is_valid(i) && captions.len() < rows {
                    captions.push(col.value(i).to_string());
                }
            }
        }
        Ok(captions.len() >= rows)
    })?;
    if captions.is_empty() {
        captions.push("a photo".into());
    }
    // Cycle to a full batch so every call has `rows` rows.
    let have = captions.len();
    for i in 0..rows.saturating_sub(have) {
        captions.push(captions[i % have].clone());
    }
    Ok(captions)
}

/// How long one ceiling measurement calls the models.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Effort {
    /// Least calls per caller.
    pub min_calls: usize,
    /// Least seconds, from the common start after the warm-up.
    pub min_seconds: f64,
}

/// The ceiling: `workers` callers share the stage's sessions, as the pipeline's workers
/// do. Each makes one untimed warm-up call, then all start together and call until
/// `effort` is met. A caller's rate is its rows over its own time; the ceiling is the
/// sum of the rates, the steady rate of `workers` concurrent callers (the last calls'
/// uneven ends do not count as idle time).
pub(crate) fn models_rows_per_s(
    stage: &ClipScoreStage,
    captions: &[String],
    workers: usize,
    effort: Effort,
) -> Result<f64> {
    let batch = stage.premade_batch(captions)?;
    let workers = workers.max(1);
    let start = std::sync::Barrier::new(workers);
    let caller = || -> Result<f64> {
        let warmup = stage.call_models(&batch);
        // Every caller reaches the barrier, even after a failed warm-up, so none waits
        // forever.
        start.wait();
        warmup?;
        let started = Instant::now();
        let mut calls = 0usize;
        while calls < effort.min_calls.max(1)
            || started.elapsed().as_secs_f64() < effort.min_seconds
        {
            stage.call_models(&batch)?;
            calls += 1;
        }
        Ok((calls * batch.rows) as f64 / started.elapsed().as_secs_f64().max(1e-9))
    };
    let rates: Vec<Result<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers).map(|_| scope.spawn(caller)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Internal("a ceiling thread panicked".into())))
            })
            .collect()
    });
    rates.into_iter().sum()
}

/// Rows the step `stage` passed on (0 when the run has no such step).
/// The step named `stage`'s report.
fn step<'a>(steps: &'a [StepReport], stage: &str) -> Option<&'a StepReport> {
    steps.iter().find(|s| s.name == stage)
}

fn scored_rows(steps: &[StepReport], stage: &str) -> u64 {
    step(steps, stage).map_or(0, |s| s.rows_out)
}

/// Rows that reached the step `stage` per second of the run's wall time: the figure a
/// decode ceiling bounds (an image the stage refuses was decoded too).
pub(crate) fn stage_rows_in_per_s(steps: &[StepReport], stage: &str, wall_s: f64) -> f64 {
    step(steps, stage).map_or(0, |s| s.rows_in) as f64 / wall_s.max(1e-9)
}

/// Rows the step `stage` passed on per second of the run's wall time: the end-to-end
/// figure a model-only ceiling bounds.
pub(crate) fn scored_rows_per_s(steps: &[StepReport], stage: &str, wall_s: f64) -> f64 {
    scored_rows(steps, stage) as f64 / wall_s.max(1e-9)
}

pub fn run(opts: &CeilingOptions) -> Result<CeilingReport> {
    let overrides = Overrides {
        inputs: None,
        out_dir: Some(opts.scratch.clone()),
        ..Overrides::default()
    };
    let probe = plan::load_and_plan(&opts.pipeline, &overrides)?;
    let base = probe.pipeline.base_dir().to_path_buf();
    let batch_size = probe.pipeline.spec.runtime.batch_size;
    let (stage_name, workers, mut config) = probe
        .pipeline
        .spec
        .stages
        .iter()
        .find_map(|s| match &s.kind {
            StageKind::ClipScore(c) => {
                let name = s.common.name.clone().unwrap_or_else(|| "clip_score".into());
                let wanted = opts.stage.as_deref().is_none_or(|w| w == name);
                wanted.then(|| (name, s.common.workers.unwrap_or(1), c.clone()))
            }
            _ => None,
        })
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no clip_score stage{}",
                opts.pipeline.display(),
                opts.stage
                    .as_ref()
                    .map(|s| format!(" named `{s}`"))
                    .unwrap_or_default()
            ))
        })?;
    config.resolve_paths(&base);
    let intra_op_threads = config.session.intra_op_threads;
    let stage = ClipScoreStage::new(stage_name.clone(), config)?;
    let captions = sample_captions(&probe, batch_size)?;
    drop(probe);

    let mut ceiling = Vec::new();
    let mut end_to_end = Vec::new();
    let mut end_to_end_input = Vec::new();
    let mut last = None;
    let effort = Effort {
        min_calls: opts.calls,
        min_seconds: opts.min_seconds,
    };
    for _ in 0..opts.repetitions.max(1) {
        ceiling.push(models_rows_per_s(&stage, &captions, workers, effort)?);

        let plan = plan::load_and_plan(&opts.pipeline, &overrides)?;
        let report = execute(
            plan,
            RunOptions {
                settings: RunSettings {
                    force: true,
                    ..RunSettings::default()
                },
                ..RunOptions::default()
            },
        )?;
        end_to_end.push(scored_rows_per_s(&report.steps, &stage_name, report.wall_s));
        end_to_end_input.push(report.rows_per_s);
        last = Some(report);
    }
    let (mc, me) = (mean(&ceiling), mean(&end_to_end));
    let last_scored = last
        .as_ref()
        .map_or(0, |r| scored_rows(&r.steps, &stage_name));
    Ok(CeilingReport {
        pipeline: opts.pipeline.clone(),
        stage: stage_name,
        batch_size,
        workers,
        intra_op_threads,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ceiling_rows_per_s: ceiling,
        end_to_end_rows_per_s: end_to_end,
        end_to_end_input_rows_per_s: end_to_end_input,
        end_to_end_rows: last.as_ref().map_or(0, |r| r.rows_in),
        end_to_end_scored_rows: last_scored,
        min_calls: opts.calls,
        min_seconds: opts.min_seconds,
        mean_ceiling_rows_per_s: mc,
        mean_end_to_end_rows_per_s: me,
        ratio: if mc > 0.0 { me / mc } else { 0.0 },
        bottleneck: last.as_ref().and_then(|r| r.bottleneck.clone()),
        cpu_utilisation: last.as_ref().and_then(|r| r.cpu_utilisation),
        peak_rss_bytes: last.as_ref().and_then(|r| r.peak_rss_bytes),
    })
}

/// Where a report lands by default: beside the scratch output.
pub fn default_report_path(scratch: &Path) -> PathBuf {
    scratch.join("_ceiling.json")
}
