//! `trustflow bench ceiling PIPELINE.yaml`: how close the engine gets to the model.
//! The pipeline is run end to end (read, decode, preprocess, tokenise, both ONNX
//! models, write Parquet) and, alternating with it in the same process, the same
//! `clip_score` stage's models are called on pre-made inputs with the same batch size,
//! the same number of concurrent callers (the stage's `workers`) and the same
//! intra-op threads: the model-only ceiling. The report gives both rows/s and
//! end-to-end / ceiling.

use std::path::{Path, PathBuf};
use std::time::Instant;

use arrow::array::{Array, AsArray};
use futures::StreamExt;
use serde::Serialize;

use trustflow_engine::error::{Error, Result};
use trustflow_engine::plan::{self, Overrides};
use trustflow_engine::run::{RunOptions, execute};
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
    /// Model calls per ceiling measurement (per caller).
    #[arg(long, default_value_t = 8)]
    pub calls: usize,
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
    /// Rows per second of the whole pipeline, one figure per repetition.
    pub end_to_end_rows_per_s: Vec<f64>,
    pub end_to_end_rows: u64,
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

/// Captions of the first shard's first rows (real token lengths for the ceiling),
/// cycled to a full batch of `rows`.
pub(crate) fn sample_captions(plan: &plan::Plan, rows: usize) -> Result<Vec<String>> {
    let source = &plan.source;
    let Some(shard) = source.shards.first() else {
        return Err(Error::Invalid("the pipeline has no shards".into()));
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start a reader: {e}")))?;
    let converter = source.converter(shard)?;
    let mut stream = rt.block_on(source.open(shard))?;
    let mut captions = Vec::with_capacity(rows);
    let mut first_row = 0u64;
    while captions.len() < rows {
        let Some(batch) = rt.block_on(stream.next()) else {
            break;
        };
        let batch = batch.map_err(|e| Error::input(&shard.path, e.to_string()))?;
        let (ok, _) = converter.convert(&batch, first_row)?;
        first_row += batch.num_rows() as u64;
        if let Some(col) = ok.column_by_name(trustflow_engine::columns::CAPTION) {
            let col = col.as_string::<i32>();
            for i in 0..col.len() {
                if col.is_valid(i) && captions.len() < rows {
                    captions.push(col.value(i).to_string());
                }
            }
        }
    }
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

/// The ceiling: `workers` callers share the stage's sessions, as the pipeline's workers
/// do, each making `calls` calls on a batch of `captions.len()` pre-made rows.
pub(crate) fn models_rows_per_s(
    stage: &ClipScoreStage,
    captions: &[String],
    workers: usize,
    calls: usize,
) -> Result<f64> {
    let started = Instant::now();
    let results: Vec<Result<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| scope.spawn(|| stage.time_models_on_premade(captions, calls)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Internal("a ceiling thread panicked".into())))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    let rows = (workers * calls * captions.len()) as f64;
    Ok(rows / started.elapsed().as_secs_f64().max(1e-9))
}

pub fn run(opts: &CeilingOptions) -> Result<CeilingReport> {
    let overrides = Overrides {
        inputs: None,
        out_dir: Some(opts.scratch.clone()),
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
    let mut last = None;
    for _ in 0..opts.repetitions.max(1) {
        ceiling.push(models_rows_per_s(&stage, &captions, workers, opts.calls)?);

        let plan = plan::load_and_plan(&opts.pipeline, &overrides)?;
        let report = execute(
            plan,
            RunOptions {
                force: true,
                ..RunOptions::default()
            },
        )?;
        end_to_end.push(report.rows_per_s);
        last = Some(report);
    }
    let (mc, me) = (mean(&ceiling), mean(&end_to_end));
    Ok(CeilingReport {
        pipeline: opts.pipeline.clone(),
        stage: stage_name,
        batch_size,
        workers,
        intra_op_threads,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ceiling_rows_per_s: ceiling,
        end_to_end_rows_per_s: end_to_end,
        end_to_end_rows: last.as_ref().map_or(0, |r| r.rows_in),
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
