//! The accuracy benchmark of issue 5 (and the demo's core): digits across domains with
//! noisy captions, through the whole TRUST chain.
//!
//! 1. Fit the text head (`fit-text`) on the source domain's training captions only.
//! 2. Enrich the source's training rows with the source pipeline (a captioner for
//!    missing captions, pseudo-labels and caption features, CLIP similarity); when the
//!    target pipeline's weights are `class_max_cosine`, calibrate them on the enriched
//!    source (`calibrate-weights`); then enrich each target's training rows with the
//!    target pipeline (the same stages, then the weights). These are the pipeline files
//!    a user would run, with `pseudo_label.head` pointed at the fitted head and
//!    `uncertainty.class_max` at the calibration.
//! 3. For each target domain (shift), each ablation and each seed, train the vision
//!    model from the base training file with the ablation's loss terms, and record the
//!    last epoch's target accuracy on the target's test split (reported, never used to
//!    pick anything), pseudo-label accuracy and weight AUROC.
//! 4. Aggregate mean and standard deviation per (shift, ablation).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use trustflow_engine::storage::Storage;

use serde::Serialize;

use trustflow_engine::error::{Error, Result};
use trustflow_engine::plan::{self, Overrides};
use trustflow_engine::run::{RunOptions, execute};
use trustflow_engine::stages::StageKind;
use trustflow_engine::stages::class_max::calibrate;
use trustflow_engine::stages::uncertainty::WeightMethod;
use trustflow_train::spec::LossSpec;
use trustflow_train::text_head::{FitOptions, FitTextOptions, fit_text};
use trustflow_train::trainer::TrainProgress;
use trustflow_train::{TrainOptions, load_train_file, train};

/// The ablation grid of docs/method.md section 6, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ablation {
    /// L_src only.
    SourceOnly,
    /// + unweighted pseudo-label CE (LaGTran).
    Lagtran,
    /// + CLIP weights on the pseudo-label CE.
    Weighted,
    /// + the (1 - w)-weighted self-training term.
    SelfTrain,
    /// + the soft-contrastive term: full TRUST.
    Trust,
}

impl Ablation {
    pub const ALL: [Ablation; 5] = [
        Ablation::SourceOnly,
        Ablation::Lagtran,
        Ablation::Weighted,
        Ablation::SelfTrain,
        Ablation::Trust,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Ablation::SourceOnly => "source_only",
            Ablation::Lagtran => "lagtran",
            Ablation::Weighted => "weighted",
            Ablation::SelfTrain => "self_train",
            Ablation::Trust => "trust",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Ablation::SourceOnly => "source only",
            Ablation::Lagtran => "+ pseudo-labels, unweighted (LaGTran)",
            Ablation::Weighted => "+ CLIP weights",
            Ablation::SelfTrain => "+ self-training",
            Ablation::Trust => "+ soft-contrastive (TRUST)",
        }
    }

    pub fn parse(name: &str) -> Option<Ablation> {
        Ablation::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The loss terms of this ablation; temperatures stay as the base file has them.
    pub fn apply(self, loss: &mut LossSpec) {
        let (tgt, self_train, ctr, unweighted) = match self {
            Ablation::SourceOnly => (0.0, 0.0, 0.0, false),
            Ablation::Lagtran => (1.0, 0.0, 0.0, true),
            Ablation::Weighted => (1.0, 0.0, 0.0, false),
            Ablation::SelfTrain => (1.0, 1.0, 0.0, false),
            Ablation::Trust => (1.0, 1.0, 1.0, false),
        };
        loss.src = 1.0;
        loss.tgt = tgt;
        loss.self_train = self_train;
        loss.ctr = ctr;
        loss.unweighted = unweighted;
    }
}

#[derive(Debug, Clone)]
pub struct AccuracyOptions {
    /// The digits data (`bench gen-digits`): `<domain>/<split>/*.parquet`.
    pub data: PathBuf,
    /// Where the head, the enriched shards and the runs go.
    pub work: PathBuf,
    /// The enrichment pipeline of the target domains (its `pseudo_label` stage gets
    /// `head` set, its `uncertainty` stage `class_max`).
    pub enrich_pipeline: PathBuf,
    /// The enrichment pipeline of the source domain (no weights: only target rows use
    /// them; its `clip_similarity` calibrates `class_max_cosine`).
    pub source_pipeline: PathBuf,
    /// Overrides the target pipeline's weight method (the file's when `None`).
    pub weights: Option<WeightMethod>,
    /// The base training file (paths, loss terms, seed and output are set per run).
    pub train_file: PathBuf,
    pub source: String,
    pub shifts: Vec<String>,
    pub ablations: Vec<Ablation>,
    pub seeds: Vec<u64>,
    /// Overrides the training file's epochs (a reduced demo).
    pub epochs: Option<u64>,
    /// Called with one line per finished step of the benchmark.
    pub log: fn(&str),
}

/// One training run's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub shift: String,
    pub ablation: Ablation,
    pub seed: u64,
    pub target_accuracy: Option<f64>,
    pub per_class: Vec<Option<f64>>,
    pub steps: u64,
    pub wall_s: f64,
    pub trainer_idle_fraction: f64,
    pub output: PathBuf,
}

/// Mean and sample standard deviation over seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub shift: String,
    pub ablation: Ablation,
    pub runs: usize,
    pub mean: Option<f64>,
    pub std: Option<f64>,
}

/// What enrichment made of one domain's training rows.
#[derive(Debug, Clone, Serialize)]
pub struct EnrichedDomain {
    pub domain: String,
    pub out_dir: PathBuf,
    pub rows_in: u64,
    pub rows_out: u64,
    pub rows_quarantined: u64,
    pub wall_s: f64,
    /// Pseudo-label accuracy and weight AUROC over the rows (labels used for
    /// evaluation only), from the trainer's pre-training scan.
    pub pseudo_labels: Option<trustflow_train::trainer::PseudoLabelQuality>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccuracyReport {
    /// How the target weights were computed (the `uncertainty` stage's method).
    pub weight_method: Option<WeightMethod>,
    pub text_head: serde_json::Value,
    pub enriched: Vec<EnrichedDomain>,
    pub runs: Vec<RunResult>,
    pub table: Vec<Cell>,
}

/// `dir/*.parquet`, absolute: spec files resolve relative paths against their own
/// folder, not the current one.
fn glob_of(dir: &Path) -> String {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    format!("{}/*.parquet", dir.display())
}

/// Step 1: the text head, fitted on source training captions.
pub fn fit_source_head(opts: &AccuracyOptions) -> Result<(PathBuf, serde_json::Value)> {
    let head = opts.work.join("text_head.safetensors");
    let shards = trustflow_engine::source::shards::discover(
        &Storage::default(),
        Path::new("."),
        &[glob_of(&opts.data.join(&opts.source).join("train"))],
    )?;
    let metrics = fit_text(&FitTextOptions {
        train: shards,
        out: head.clone(),
        caption_column: Some(trustflow_engine::columns::CAPTION.into()),
        label_column: trustflow_engine::columns::LABEL.into(),
        filters: Vec::new(),
        split: None,
        encoder: None,
        tokenizer: None,
        classes: Some((0..CLASSES).map(|d| d.to_string()).collect()),
        holdout: 0.1,
        fit: FitOptions::default(),
    })?;
    Ok((head, metrics))
}

/// Step 2: every domain's training rows through its enrichment pipeline (the source
/// first), with the `class_max_cosine` calibration in between when the target
/// pipeline's weights need it. Returns the domains in order, and the weight method the
/// targets got.
pub fn enrich_all(
    opts: &AccuracyOptions,
    head: &Path,
    targets: &[String],
) -> Result<(Vec<EnrichedDomain>, Option<WeightMethod>)> {
    (opts.log)(&format!("enriching {}/train", opts.source));
    let mut enriched = vec![enrich_domain(
        opts,
        &opts.source_pipeline,
        head,
        &opts.source,
        None,
    )?];
    let (class_max, method) = calibrate_weights(opts, &enriched[0])?;
    for domain in targets {
        (opts.log)(&format!("enriching {domain}/train"));
        enriched.push(enrich_domain(
            opts,
            &opts.enrich_pipeline,
            head,
            domain,
            class_max.as_deref(),
        )?);
    }
    Ok((enriched, method))
}

/// When the target pipeline's weights are `class_max_cosine`: calibrates them on the
/// enriched source rows and returns the calibration file, with the weight method the
/// targets get.
pub fn calibrate_weights(
    opts: &AccuracyOptions,
    source: &EnrichedDomain,
) -> Result<(Option<PathBuf>, Option<WeightMethod>)> {
    let method = target_weight_method(opts)?;
    if method != Some(WeightMethod::ClassMaxCosine) {
        return Ok((None, method));
    }
    let file = opts.work.join("class_max.json");
    (opts.log)(&format!(
        "calibrating class_max_cosine weights on the enriched {} rows",
        opts.source
    ));
    let shards = trustflow_engine::source::shards::discover(
        &Storage::default(),
        Path::new("."),
        &[glob_of(&source.out_dir)],
    )?;
    let calibration = calibrate(
        &shards,
        trustflow_engine::columns::LABEL,
        trustflow_engine::stages::clip_score::CLIP_SIMILARITY,
        CLASSES,
    )?;
    calibration.save(&file)?;
    Ok((Some(file), method))
}

/// The digits have ten classes.
const CLASSES: usize = 10;

/// The weight method the target enrichment will use: the override, else the file's.
fn target_weight_method(opts: &AccuracyOptions) -> Result<Option<WeightMethod>> {
    if opts.weights.is_some() {
        return Ok(opts.weights);
    }
    let pipeline = trustflow_engine::spec::load_file(&opts.enrich_pipeline)?;
    Ok(pipeline.spec.stages.iter().find_map(|s| match &s.kind {
        StageKind::Uncertainty(c) => Some(c.method),
        _ => None,
    }))
}

/// One domain's training rows through `pipeline_file`, its `pseudo_label` stage given
/// the fitted head and its `uncertainty` stage the weight override and calibration.
pub fn enrich_domain(
    opts: &AccuracyOptions,
    pipeline_file: &Path,
    head: &Path,
    domain: &str,
    class_max: Option<&Path>,
) -> Result<EnrichedDomain> {
    let (plan, out_dir) = enrichment_plan(opts, pipeline_file, head, domain, class_max)?;
    let report = execute(plan, RunOptions::default())?;
    Ok(EnrichedDomain {
        domain: domain.to_string(),
        out_dir,
        rows_in: report.rows_in,
        rows_out: report.rows_out,
        rows_quarantined: report.rows_quarantined,
        wall_s: report.wall_s,
        pseudo_labels: None,
    })
}

/// The plan of [`enrich_domain`] (writing to `WORK/enriched/<domain>`), and its output
/// folder.
pub fn enrichment_plan(
    opts: &AccuracyOptions,
    pipeline_file: &Path,
    head: &Path,
    domain: &str,
    class_max: Option<&Path>,
) -> Result<(plan::Plan, PathBuf)> {
    let mut pipeline = trustflow_engine::spec::load_file(pipeline_file)?;
    // Paths in a pipeline resolve against its own folder: give files absolutely.
    let absolute = |p: &Path| std::path::absolute(p).map_err(|e| Error::io(p, e));
    let head = absolute(head)?;
    let class_max = class_max.map(absolute).transpose()?;
    let mut found = false;
    for stage in &mut pipeline.spec.stages {
        match &mut stage.kind {
            StageKind::PseudoLabel(c) => {
                c.files.head = Some(head.display().to_string());
                c.files.model = None;
                found = true;
            }
            StageKind::Uncertainty(c) => {
                if let Some(method) = opts.weights {
                    c.method = method;
                }
                c.class_max = match c.method {
                    WeightMethod::ClassMaxCosine => {
                        class_max.as_ref().map(|p| p.display().to_string())
                    }
                    _ => None,
                };
            }
            _ => {}
        }
    }
    if !found {
        return Err(Error::Invalid(format!(
            "{}: no pseudo_label stage to give the fitted head",
            pipeline_file.display()
        )));
    }
    trustflow_engine::spec::validate(&pipeline)?;
    let out_dir = opts.work.join("enriched").join(domain);
    let plan = plan::build(
        pipeline,
        &Overrides {
            inputs: Some(vec![
                opts.data.join(domain).join("train").display().to_string(),
            ]),
            out_dir: Some(out_dir.clone()),
            ..Overrides::default()
        },
    )?;
    Ok((plan, out_dir))
}

/// The training file of one run (its paths, loss terms, seed and output set), and the
/// run's output folder.
pub fn training_file(
    opts: &AccuracyOptions,
    shift: &str,
    ablation: Ablation,
    seed: u64,
) -> Result<(trustflow_train::LoadedTrain, PathBuf)> {
    let mut loaded = load_train_file(&opts.train_file)?;
    let spec = &mut loaded.spec;
    let enriched = opts.work.join("enriched");
    spec.source.paths = vec![glob_of(&enriched.join(&opts.source))];
    spec.target.paths = vec![glob_of(&enriched.join(shift))];
    if let Some(eval) = &mut spec.eval {
        eval.paths = vec![glob_of(&opts.data.join(shift).join("test"))];
    }
    ablation.apply(&mut spec.loss);
    spec.seed = seed;
    if let Some(epochs) = opts.epochs {
        spec.optimizer.epochs = epochs;
    }
    let output = opts
        .work
        .join("runs")
        .join(shift)
        .join(ablation.name())
        .join(format!("seed{seed}"));
    spec.output = std::path::absolute(&output)
        .map_err(|e| Error::io(&output, e))?
        .display()
        .to_string();
    Ok((loaded, output))
}

/// Step 3: one training run.
pub fn train_one(
    opts: &AccuracyOptions,
    shift: &str,
    ablation: Ablation,
    seed: u64,
) -> Result<(RunResult, trustflow_train::TrainReport)> {
    let (loaded, output) = training_file(opts, shift, ablation, seed)?;
    let report = train(&loaded, &fresh_with_epoch_lines(opts.log))?;
    Ok((run_result(shift, ablation, seed, &report, output), report))
}

/// What [`enrich_and_train_one_pass`] did.
pub struct OnePassRun {
    pub enriched: EnrichedDomain,
    /// The step the enrichment run found slowest (`train` when the trainer held it back).
    pub bottleneck: Option<String>,
    pub result: RunResult,
    pub report: trustflow_train::TrainReport,
}

/// Steps 2 and 3 of one target domain in one pass (`sink.train_mode: one_pass`): its
/// training rows enriched as [`enrich_domain`] does, feeding the training run of
/// `ablation` and `seed` (its file changed by `adjust`) as they are written.
pub fn enrich_and_train_one_pass(
    opts: &AccuracyOptions,
    head: &Path,
    class_max: Option<&Path>,
    (shift, ablation, seed): (&str, Ablation, u64),
    adjust: &dyn Fn(&mut trustflow_train::LoadedTrain),
) -> Result<OnePassRun> {
    let (plan, out_dir) = enrichment_plan(opts, &opts.enrich_pipeline, head, shift, class_max)?;
    let (mut loaded, output) = training_file(opts, shift, ablation, seed)?;
    adjust(&mut loaded);
    // The trainer's target is the enrichment's own output folder.
    loaded.spec.target.paths = vec![
        std::path::absolute(&out_dir)
            .map_err(|e| Error::io(&out_dir, e))?
            .display()
            .to_string(),
    ];
    let (ran, trained) = trustflow_train::trainer::train_with_pipeline(
        plan,
        &loaded,
        RunOptions::default(),
        &fresh_with_epoch_lines(opts.log),
    )?;
    let (ran, trained) = (ran?, trained?);
    let enriched = EnrichedDomain {
        domain: shift.to_string(),
        out_dir,
        rows_in: ran.rows_in,
        rows_out: ran.rows_out,
        rows_quarantined: ran.rows_quarantined,
        wall_s: ran.wall_s,
        pseudo_labels: None,
    };
    Ok(OnePassRun {
        enriched,
        bottleneck: ran.bottleneck.clone(),
        result: run_result(shift, ablation, seed, &trained, output),
        report: trained,
    })
}

/// A fresh training run that logs one line per finished epoch, so a long grid shows it
/// is alive.
fn fresh_with_epoch_lines(log: fn(&str)) -> TrainOptions {
    let progress = move |p: &TrainProgress| {
        if p.step == 0 && p.epoch > 0 {
            log(&format!(
                "  epoch {}/{}  loss {:.3}  target accuracy {}",
                p.epoch,
                p.epochs,
                p.loss,
                p.eval_accuracy
                    .map_or("-".into(), |a| format!("{:.1}%", 100.0 * a))
            ));
        }
    };
    TrainOptions {
        fresh: true,
        progress: Some(std::sync::Arc::new(progress)),
        ..TrainOptions::default()
    }
}

fn run_result(
    shift: &str,
    ablation: Ablation,
    seed: u64,
    report: &trustflow_train::TrainReport,
    output: PathBuf,
) -> RunResult {
    let eval = report.history.last().and_then(|m| m.target_eval.as_ref());
    RunResult {
        shift: shift.to_string(),
        ablation,
        seed,
        target_accuracy: eval.and_then(|e| e.accuracy),
        per_class: eval.map(|e| e.per_class.clone()).unwrap_or_default(),
        steps: report.global_step,
        wall_s: report.wall_s,
        trainer_idle_fraction: report.trainer_idle_fraction,
        output,
    }
}

/// Mean and sample standard deviation of the runs of each (shift, ablation).
pub fn aggregate(runs: &[RunResult]) -> Vec<Cell> {
    let mut groups: BTreeMap<(String, Ablation), Vec<f64>> = BTreeMap::new();
    let mut counts: BTreeMap<(String, Ablation), usize> = BTreeMap::new();
    for r in runs {
        let key = (r.shift.clone(), r.ablation);
        *counts.entry(key.clone()).or_default() += 1;
        if let Some(a) = r.target_accuracy {
            groups.entry(key).or_default().push(a);
        }
    }
    counts
        .into_iter()
        .map(|((shift, ablation), runs)| {
            let values = groups
                .get(&(shift.clone(), ablation))
                .cloned()
                .unwrap_or_default();
            let n = values.len();
            let mean = (n > 0).then(|| values.iter().sum::<f64>() / n as f64);
            let std = mean.filter(|_| n > 1).map(|m| {
                (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
            });
            Cell {
                shift,
                ablation,
                runs,
                mean,
                std,
            }
        })
        .collect()
}

/// The whole benchmark.
pub fn run(opts: &AccuracyOptions) -> Result<AccuracyReport> {
    std::fs::create_dir_all(&opts.work).map_err(|e| Error::io(&opts.work, e))?;
    (opts.log)("fitting the text head on source captions");
    let (head, text_head) = fit_source_head(opts)?;
    let (mut enriched, weight_method) = enrich_all(opts, &head, &opts.shifts)?;
    let mut runs = Vec::new();
    for shift in &opts.shifts {
        for &ablation in &opts.ablations {
            for &seed in &opts.seeds {
                (opts.log)(&format!(
                    "training {shift} / {} / seed {seed}",
                    ablation.name()
                ));
                let (result, report) = train_one(opts, shift, ablation, seed)?;
                if let Some(e) = enriched.iter_mut().find(|e| &e.domain == shift)
                    && e.pseudo_labels.is_none()
                {
                    e.pseudo_labels = report.history.last().and_then(|m| m.pseudo_labels.clone());
                }
                runs.push(result);
            }
        }
    }
    let table = aggregate(&runs);
    Ok(AccuracyReport {
        weight_method,
        text_head,
        enriched,
        runs,
        table,
    })
}

fn percent(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}", 100.0 * v))
}

/// The report as a Markdown table: one row per ablation, one column per shift
/// (target accuracy, mean +- std over seeds, in %), then the enrichment figures.
pub fn markdown(report: &AccuracyReport, shifts: &[String], ablations: &[Ablation]) -> String {
    let mut out = String::new();
    out.push_str("| method |");
    for s in shifts {
        out.push_str(&format!(" {s} |"));
    }
    out.push_str("\n|---|");
    for _ in shifts {
        out.push_str("---|");
    }
    out.push('\n');
    for &a in ablations {
        out.push_str(&format!("| {} |", a.label()));
        for s in shifts {
            let cell = report
                .table
                .iter()
                .find(|c| &c.shift == s && c.ablation == a);
            let text = match cell {
                Some(c) => match (c.mean, c.std) {
                    (Some(m), Some(sd)) => format!("{:.1} ± {:.1}", 100.0 * m, 100.0 * sd),
                    (Some(m), None) => format!("{:.1}", 100.0 * m),
                    _ => "-".into(),
                },
                None => "-".into(),
            };
            out.push_str(&format!(" {text} |"));
        }
        out.push('\n');
    }
    out.push_str("\n| domain | rows | pseudo-label accuracy | weight AUROC | mean w (right / wrong) |\n|---|---|---|---|---|\n");
    for e in &report.enriched {
        let (acc, auroc, means) = match &e.pseudo_labels {
            Some(p) => (
                percent(p.accuracy),
                p.weights.auroc.map_or("-".into(), |a| format!("{a:.3}")),
                match (p.weights.mean_weight_right, p.weights.mean_weight_wrong) {
                    (Some(r), Some(w)) => format!("{r:.3} / {w:.3}"),
                    _ => "-".into(),
                },
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "| {} | {} | {acc} | {auroc} | {means} |\n",
            e.domain, e.rows_out
        ));
    }
    out
}

/// `pseudo_weight` of the rows of an enriched folder, split by whether the
/// pseudo-label is right (labels read for evaluation only).
pub fn weight_split(dir: &Path) -> Result<(Vec<f64>, Vec<f64>)> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, Float64Type, Int64Type};
    let shards = trustflow_engine::source::shards::discover(
        &Storage::default(),
        Path::new("."),
        &[glob_of(dir)],
    )?;
    let (mut right, mut wrong) = (Vec::new(), Vec::new());
    for shard in shards {
        let file = std::fs::File::open(&shard).map_err(|e| Error::io(&shard, e))?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| Error::input(&shard, e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| Error::input(&shard, e.to_string()))?;
            let column = |name: &str, to: &DataType| {
                batch
                    .column_by_name(name)
                    .ok_or_else(|| Error::input(&shard, format!("no column `{name}`")))
                    .and_then(|c| {
                        arrow::compute::cast(c, to).map_err(|e| Error::input(&shard, e.to_string()))
                    })
            };
            let w = column("pseudo_weight", &DataType::Float64)?;
            let p = column("pseudo_label", &DataType::Int64)?;
            let l = column("label", &DataType::Int64)?;
            let (w, p, l) = (
                w.as_primitive::<Float64Type>(),
                p.as_primitive::<Int64Type>(),
                l.as_primitive::<Int64Type>(),
            );
            for i in 0..batch.num_rows() {
                if w.is_valid(i) && p.is_valid(i) && l.is_valid(i) {
                    if p.value(i) == l.value(i) {
                        right.push(w.value(i));
                    } else {
                        wrong.push(w.value(i));
                    }
                }
            }
        }
    }
    Ok((right, wrong))
}

/// Writes `accuracy.json`, `accuracy.md` and `weights.png` into `dir`; returns their
/// paths (the plot is skipped, with the reason, when it cannot be drawn).
pub fn write_outputs(
    report: &AccuracyReport,
    opts: &AccuracyOptions,
    dir: &Path,
) -> Result<(Vec<PathBuf>, Option<String>)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = dir.join("accuracy.json");
    let text = serde_json::to_vec_pretty(report).map_err(|e| Error::output(&json, e))?;
    std::fs::write(&json, text).map_err(|e| Error::io(&json, e))?;
    let md = dir.join("accuracy.md");
    std::fs::write(&md, markdown(report, &opts.shifts, &opts.ablations))
        .map_err(|e| Error::io(&md, e))?;
    let mut written = vec![json, md];
    let png = dir.join("weights.png");
    let mut groups = Vec::new();
    for shift in &opts.shifts {
        let (right, wrong) = weight_split(&opts.work.join("enriched").join(shift))?;
        groups.push((shift.clone(), right, wrong));
    }
    let skipped = match super::plot::weight_histograms(&png, &groups) {
        Ok(()) => {
            written.push(png);
            None
        }
        Err(e) => Some(e.to_string()),
    };
    Ok((written, skipped))
}
