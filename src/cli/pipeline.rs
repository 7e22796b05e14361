//! `run`, `validate`, `inspect`, `report` and `calibrate-weights`: the pipeline commands.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use trustflow::progress::{Progress, progress_line};
use trustflow_engine::plan::{self, Overrides};
use trustflow_engine::run::{ProgressFn, RunOptions, RunReport, RunSettings, execute};
use trustflow_engine::runtime::RunSnapshot;
use trustflow_engine::spec::TrainMode;
use trustflow_engine::{Error, inspect as inspect_out};

use super::cancel_on_signals;

#[derive(Args)]
pub struct RunArgs {
    pipeline: PathBuf,
    #[command(flatten)]
    overrides: Overrides,
    #[command(flatten)]
    settings: RunSettings,
    /// No live progress display.
    #[arg(long)]
    quiet: bool,
    /// A one-pass trainer sleeps this long in every step (tests of backpressure).
    #[arg(long, hide = true)]
    slow_train_steps_ms: Option<u64>,
}

#[derive(Args)]
pub struct CalibrateArgs {
    /// Enriched source shards: files, folders or globs.
    #[arg(required = true, num_args = 1.., value_name = "SHARDS")]
    source: Vec<String>,
    /// The calibration file to write (JSON).
    #[arg(long)]
    out: PathBuf,
    /// Number of classes C (labels are 0..C-1).
    #[arg(long)]
    classes: usize,
    /// Integer label column.
    #[arg(long, default_value = "label")]
    label_column: String,
    /// The image-caption cosine column `clip_score` writes.
    #[arg(long, default_value = "clip_similarity")]
    similarity_column: String,
}

pub fn run(args: RunArgs) -> Result<()> {
    let plan = plan::load_and_plan(&args.pipeline, &args.overrides)?;
    let then_train = plan
        .pipeline
        .spec
        .sink
        .train
        .as_deref()
        .map(|t| plan.pipeline.resolve(t));
    // A part (`--part`, or a driver's `--shards` list) writes only some shards.
    let is_part = args.settings.part.is_some() || plan.listed_part.is_some();
    if let Some(train_file) = &then_train
        && plan.pipeline.spec.sink.train_mode == TrainMode::OnePass
    {
        if is_part {
            return Err(Error::Invalid(format!(
                "sink.train_mode `one_pass` trains on every shard of the run, but this \
                 run is a part; run the pipeline whole, or use `train_mode: after` and \
                 `trustflow train {}` when all parts are done",
                train_file.display()
            ))
            .into());
        }
        return one_pass(plan, args, train_file.clone());
    }
    let report = run_with_progress(plan, args.settings, args.quiet)?;
    out!("{report}")?;
    check_complete(&report)?;
    if let Some(train_file) = then_train {
        if is_part {
            eprintln!(
                "sink.train: not run with --part (the other parts' shards are not written \
                 yet); run `trustflow train {}` when all parts are done",
                train_file.display()
            );
        } else {
            then_train_with(train_file)?;
        }
    }
    Ok(())
}

/// `sink.train_mode: one_pass`: the pipeline and its trainer together.
#[cfg(feature = "train")]
fn one_pass(plan: plan::Plan, args: RunArgs, train_file: PathBuf) -> Result<()> {
    super::train::run_one_pass(
        plan,
        args.settings,
        args.quiet,
        train_file,
        args.slow_train_steps_ms,
    )
}

#[cfg(not(feature = "train"))]
fn one_pass(_: plan::Plan, _: RunArgs, train_file: PathBuf) -> Result<()> {
    anyhow::bail!(
        "sink.train names {} with `train_mode: one_pass`, but {}",
        train_file.display(),
        super::NO_TRAINER
    )
}

/// The training file of a one-pass pipeline against the pipeline's output schema.
#[cfg(feature = "train")]
fn check_one_pass(plan: &plan::Plan, train_file: &Path) -> Result<()> {
    let loaded = trustflow_train::load_train_file(train_file)?;
    Ok(trustflow_train::one_pass::check(&loaded, plan)?)
}

#[cfg(not(feature = "train"))]
fn check_one_pass(_: &plan::Plan, train_file: &Path) -> Result<()> {
    anyhow::bail!(
        "sink.train names {} with `train_mode: one_pass`, but {}",
        train_file.display(),
        super::NO_TRAINER
    )
}

/// `sink.train`: resumes a run of the same training file and shards, as `run` skips
/// finished shards.
#[cfg(feature = "train")]
fn then_train_with(train_file: PathBuf) -> Result<()> {
    eprintln!("sink.train: training with {}", train_file.display());
    super::train::train(super::train::TrainArgs::resuming(train_file))
}

#[cfg(not(feature = "train"))]
fn then_train_with(train_file: PathBuf) -> Result<()> {
    anyhow::bail!(
        "sink.train names {}, but {}",
        train_file.display(),
        super::NO_TRAINER
    )
}

/// A run that broke the row invariant or skipped unreadable shards is a failure of
/// the command, after its report is out.
pub fn check_complete(report: &RunReport) -> Result<()> {
    if !report.invariant_holds {
        anyhow::bail!("row accounting invariant broken (see report)");
    }
    if !report.unreadable.is_empty() {
        return Err(Error::Incomplete {
            skipped: report.unreadable.len(),
        }
        .into());
    }
    Ok(())
}

pub fn validate(pipeline: &Path, overrides: &Overrides) -> Result<()> {
    let plan = plan::load_and_plan(pipeline, overrides)?;
    let sink = &plan.pipeline.spec.sink;
    if let Some(train) = &sink.train
        && sink.train_mode == TrainMode::OnePass
    {
        check_one_pass(&plan, &plan.pipeline.resolve(train))?;
    }
    outln!("{}", plan.describe())?;
    outln!("ok: {} is valid", pipeline.display())
}

pub fn plan_json(pipeline: &Path, overrides: &Overrides) -> Result<()> {
    out_json!(plan::load_and_plan(pipeline, overrides)?.summary())
}

pub fn inspect(out_dir: &Path, json: bool) -> Result<()> {
    let found = inspect_out::inspect(out_dir)?;
    match json {
        true => out_json!(found),
        false => out!("{}", found.to_text()),
    }
}

pub fn report(out_dir: &Path, options: &trustflow_engine::report::ReportOptions) -> Result<()> {
    let built = trustflow_engine::report::build(out_dir, options)?;
    let bytes = trustflow_engine::report::write(&built)?;
    out_json!(built)?;
    for c in &built.corrupt_manifests {
        eprintln!(
            "warning: {}: corrupt manifest, its shard is not finished (a rerun redoes it): {}",
            out_dir.join(&c.manifest).display(),
            c.error
        );
    }
    eprintln!(
        "wrote {} ({:.1} MiB; {} of {} output rows read, {} thumbnails, {:.1} s)",
        built.html.display(),
        bytes as f64 / 1048576.0,
        built.budget.output_rows_read,
        built.budget.output_rows_total,
        built.budget.thumbnails,
        built.budget.seconds
    );
    Ok(())
}

pub fn calibrate_weights(args: CalibrateArgs) -> Result<()> {
    let shards = trustflow_engine::source::shards::discover(
        &trustflow_engine::storage::Storage::default(),
        Path::new("."),
        &args.source,
    )?;
    let calibration = trustflow_engine::stages::class_max::calibrate(
        &shards,
        &args.label_column,
        &args.similarity_column,
        args.classes,
    )?;
    calibration.save(&args.out)?;
    out_json!(calibration)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Execute a plan with the live display on a terminal, a plain line every few seconds
/// elsewhere (CI, logs), or nothing with `quiet`.
pub fn run_with_progress(
    plan: plan::Plan,
    settings: RunSettings,
    quiet: bool,
) -> Result<RunReport> {
    let (options, progress) = display_options(&plan, settings, quiet, cancel_on_signals()?, false);
    let result = execute(plan, options);
    if let Some(p) = &progress {
        p.finish();
    }
    Ok(result?)
}

/// Options for running `plan` with the live display (see [`run_with_progress`]); the
/// display is finished by the returned handle. `with_trainer` adds its step.
pub fn display_options(
    plan: &plan::Plan,
    settings: RunSettings,
    quiet: bool,
    cancel: trustflow_engine::runtime::CancelToken,
    with_trainer: bool,
) -> (RunOptions, Option<Progress>) {
    let mut names = vec!["source".to_string()];
    names.extend(plan.stages.iter().map(|s| s.stage.name().to_string()));
    names.push("sink".into());
    if with_trainer {
        names.push("train".into());
    }
    let total = plan.source.shards.len() as u64;
    let tty = std::io::stderr().is_terminal();
    let progress = (!quiet && tty).then(|| Progress::new(&names, total));
    let on_progress: Option<ProgressFn> = match (&progress, quiet) {
        (Some(p), _) => {
            let p = p.clone();
            Some(Box::new(move |s: &RunSnapshot| p.update(s)))
        }
        (None, false) => {
            let last = std::sync::Mutex::new(Instant::now());
            Some(Box::new(move |s: &RunSnapshot| {
                if let Ok(mut t) = last.lock()
                    && t.elapsed().as_secs() >= 5
                {
                    *t = Instant::now();
                    eprintln!("{}", progress_line(s));
                }
            }))
        }
        (None, true) => None,
    };
    let options = RunOptions {
        settings,
        cancel,
        on_progress,
        feed: None,
    };
    (options, progress)
}
