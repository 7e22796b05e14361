//! `bench one-pass`: a freshly enriched target corpus (caption, pseudo_label,
//! clip_score, uncertainty) and its training, as two steps (`run`, then `train`)
//! against one pass (`sink.train_mode: one_pass`), side by side in one process on the
//! same machine, for each seed. The shared preparation (the digits data, the text
//! head, the enriched source and the weight calibration) runs once, first, and is not
//! timed.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::accuracy::{self, Ablation, AccuracyOptions};
use trustflow_engine::error::{Error, Result};
use trustflow_engine::run::{RunOptions, execute};
use trustflow_train::{TrainOptions, TrainReport, train};

/// What to compare.
pub struct OnePassBenchOptions {
    /// The digits paths and pipelines (`epochs` sets the runs' epochs).
    pub digits: AccuracyOptions,
    /// The target domain enriched and trained on.
    pub shift: String,
    pub seeds: Vec<u64>,
    /// The built-in backbone's width (the trainer's share of the work), if not the
    /// training file's.
    pub width: Option<i64>,
    /// libtorch threads of the trainer, if not the training file's.
    pub train_threads: Option<usize>,
    /// Rows of the trainer's shuffle buffer, if not the training file's. A web-scale
    /// corpus is many times the buffer; the digits target (2,000 rows) is only twice the
    /// default 1,024, and the first step waits for a full buffer.
    pub shuffle_buffer: Option<usize>,
}

/// One mode's run for one seed.
#[derive(Debug, Clone, Serialize)]
pub struct ModeRun {
    pub seed: u64,
    /// Two steps: the enrichment's and the training's wall time apart.
    pub enrich_s: Option<f64>,
    pub train_s: Option<f64>,
    pub total_s: f64,
    /// Process CPU time (user + system) of the run; two steps: of each step.
    pub enrich_cpu_s: Option<f64>,
    pub train_cpu_s: Option<f64>,
    pub cpu_s: f64,
    /// Two steps: the shortest a perfect overlap could take on this machine's cores,
    /// over the two steps' total: max(enrich, train, CPU seconds / cores) / total.
    pub overlap_bound: Option<f64>,
    pub target_accuracy: Option<f64>,
    pub steps: u64,
    /// One pass: the run report's bottleneck step while both ran.
    pub bottleneck: Option<String>,
}

/// Mean and sample standard deviation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub mean: f64,
    pub std: f64,
}

fn spread(values: &[f64]) -> Spread {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = match values.len() {
        0 | 1 => 0.0,
        k => values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (k - 1) as f64,
    };
    Spread {
        mean,
        std: var.sqrt(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OnePassBenchReport {
    pub shift: String,
    pub epochs: u64,
    pub target_rows: u64,
    pub width: Option<i64>,
    pub train_threads: Option<usize>,
    pub shuffle_buffer: Option<usize>,
    pub prepare_s: f64,
    pub two_step: Vec<ModeRun>,
    pub one_pass: Vec<ModeRun>,
    /// One pass's total over two steps' total, per seed, and its spread.
    pub ratios: Vec<f64>,
    pub ratio: Spread,
    /// The two steps' `overlap_bound`: what a perfect overlap would reach.
    pub overlap_bound: Spread,
    /// Target accuracy after the last epoch, per mode.
    pub accuracy_two_step: Spread,
    pub accuracy_one_pass: Spread,
    pub enrich_s: Spread,
    pub train_s: Spread,
}

fn remove(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

fn cpu() -> f64 {
    trustflow_engine::runtime::metrics::process_cpu_seconds().unwrap_or(0.0)
}

fn accuracy_of(report: &TrainReport) -> Option<f64> {
    report
        .history
        .last()
        .and_then(|m| m.target_eval.as_ref())
        .and_then(|e| e.accuracy)
}

/// The bench's width and threads in a training file.
fn adjust(o: &OnePassBenchOptions, loaded: &mut trustflow_train::LoadedTrain) {
    if let Some(width) = o.width
        && let trustflow_train::spec::BackboneSpec::Builtin { width: w } =
            &mut loaded.spec.model.backbone
    {
        *w = width;
    }
    if let Some(threads) = o.train_threads {
        loaded.spec.model.threads = Some(threads);
    }
    if let Some(rows) = o.shuffle_buffer {
        loaded.spec.data.shuffle_buffer = rows;
    }
}

pub fn run(o: &OnePassBenchOptions) -> Result<OnePassBenchReport> {
    let d = &o.digits;
    let log = d.log;
    let started = Instant::now();
    log("preparing: the text head, the enriched source, the weight calibration");
    let (head, _) = accuracy::fit_source_head(d)?;
    let source = accuracy::enrich_domain(d, &d.source_pipeline, &head, &d.source, None)?;
    let (class_max, _) = accuracy::calibrate_weights(d, &source)?;
    let prepare_s = started.elapsed().as_secs_f64();
    let plan =
        || accuracy::enrichment_plan(d, &d.enrich_pipeline, &head, &o.shift, class_max.as_deref());
    let mut two_step = Vec::new();
    let mut one_pass = Vec::new();
    let mut target_rows = 0;
    for &seed in &o.seeds {
        // Two steps: enrich, then train on what was written.
        let (p, out_dir) = plan()?;
        let (mut loaded, output) = accuracy::training_file(d, &o.shift, Ablation::Trust, seed)?;
        adjust(o, &mut loaded);
        remove(&out_dir)?;
        remove(&output)?;
        let t = Instant::now();
        let cpu0 = cpu();
        let ran = execute(p, RunOptions::default())?;
        let enrich_s = t.elapsed().as_secs_f64();
        let enrich_cpu_s = cpu() - cpu0;
        target_rows = ran.rows_out;
        let t = Instant::now();
        let trained = train(
            &loaded,
            &TrainOptions {
                fresh: true,
                ..TrainOptions::default()
            },
        )?;
        let train_s = t.elapsed().as_secs_f64();
        let train_cpu_s = cpu() - cpu0 - enrich_cpu_s;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let shortest = enrich_s
            .max(train_s)
            .max((enrich_cpu_s + train_cpu_s) / cores);
        log(&format!(
            "seed {seed}: two steps {:.1} s (enrich {enrich_s:.1} s + train {train_s:.1} s), \
             accuracy {:?}",
            enrich_s + train_s,
            accuracy_of(&trained)
        ));
        two_step.push(ModeRun {
            seed,
            enrich_s: Some(enrich_s),
            train_s: Some(train_s),
            total_s: enrich_s + train_s,
            enrich_cpu_s: Some(enrich_cpu_s),
            train_cpu_s: Some(train_cpu_s),
            cpu_s: enrich_cpu_s + train_cpu_s,
            overlap_bound: Some(shortest / (enrich_s + train_s)),
            target_accuracy: accuracy_of(&trained),
            steps: trained.global_step,
            bottleneck: None,
        });

        // One pass: the same pipeline and training file, the trainer fed by the sink.
        remove(&out_dir)?;
        remove(&output)?;
        let t = Instant::now();
        let cpu0 = cpu();
        let one = accuracy::enrich_and_train_one_pass(
            d,
            &head,
            class_max.as_deref(),
            (&o.shift, Ablation::Trust, seed),
            &|loaded| adjust(o, loaded),
        )?;
        let total_s = t.elapsed().as_secs_f64();
        let cpu_s = cpu() - cpu0;
        let trained = &one.report;
        log(&format!(
            "seed {seed}: one pass {total_s:.1} s, bottleneck {:?}, accuracy {:?}",
            one.bottleneck,
            accuracy_of(trained)
        ));
        one_pass.push(ModeRun {
            seed,
            enrich_s: None,
            train_s: None,
            total_s,
            enrich_cpu_s: None,
            train_cpu_s: None,
            cpu_s,
            overlap_bound: None,
            target_accuracy: accuracy_of(trained),
            steps: trained.global_step,
            bottleneck: one.bottleneck.clone(),
        });
    }
    let ratios: Vec<f64> = one_pass
        .iter()
        .zip(&two_step)
        .map(|(one, two)| one.total_s / two.total_s.max(1e-9))
        .collect();
    let acc = |runs: &[ModeRun]| {
        spread(
            &runs
                .iter()
                .filter_map(|r| r.target_accuracy)
                .collect::<Vec<_>>(),
        )
    };
    Ok(OnePassBenchReport {
        shift: o.shift.clone(),
        epochs: d.epochs.unwrap_or(0),
        target_rows,
        width: o.width,
        train_threads: o.train_threads,
        shuffle_buffer: o.shuffle_buffer,
        prepare_s,
        ratio: spread(&ratios),
        overlap_bound: spread(
            &two_step
                .iter()
                .filter_map(|r| r.overlap_bound)
                .collect::<Vec<_>>(),
        ),
        ratios,
        accuracy_two_step: acc(&two_step),
        accuracy_one_pass: acc(&one_pass),
        enrich_s: spread(
            &two_step
                .iter()
                .filter_map(|r| r.enrich_s)
                .collect::<Vec<_>>(),
        ),
        train_s: spread(
            &two_step
                .iter()
                .filter_map(|r| r.train_s)
                .collect::<Vec<_>>(),
        ),
        two_step,
        one_pass,
    })
}
