//! `train`, `validate-train` and `fit-text`: the trainer's commands.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use trustflow_engine::Error;
use trustflow_train::text_head::FitTextOptions;
use trustflow_train::{TrainOptions, TrainProgress, TrainStatus};

use super::cancel_on_signals;

#[derive(Args)]
pub struct TrainArgs {
    train_file: PathBuf,
    /// Continue from the latest checkpoint in the output folder.
    #[arg(long, conflicts_with = "fresh")]
    resume: bool,
    /// Delete the output folder's checkpoints and metrics first.
    #[arg(long)]
    fresh: bool,
    /// Stop abruptly after this many steps, writing nothing (simulates a kill; for
    /// testing resume).
    #[arg(long, hide = true)]
    abort_after_steps: Option<u64>,
    /// Sleep this long in every step (a deliberately slow trainer, for tests).
    #[arg(long, hide = true)]
    slow_steps_ms: Option<u64>,
}

impl TrainArgs {
    /// `train FILE --resume`.
    pub fn resuming(train_file: PathBuf) -> Self {
        Self {
            train_file,
            resume: true,
            fresh: false,
            abort_after_steps: None,
            slow_steps_ms: None,
        }
    }
}

#[derive(Args)]
pub struct FitTextArgs {
    #[command(flatten)]
    options: FitTextOptions,
    /// Also write the metrics JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn train(args: TrainArgs) -> Result<()> {
    let loaded = trustflow_train::load_train_file(&args.train_file)?;
    let options = TrainOptions {
        resume: args.resume,
        fresh: args.fresh,
        cancel: Some(cancel_on_signals()?),
        abort_after_steps: args.abort_after_steps,
        progress: Some(std::sync::Arc::new(progress_display(
            std::io::stderr().is_terminal(),
        ))),
        slow_steps: args.slow_steps_ms.map(std::time::Duration::from_millis),
    };
    let report = trustflow_train::train(&loaded, &options)?;
    eprintln!();
    trained_summary(&report)?;
    if report.status == TrainStatus::Interrupted {
        return Err(Error::Cancelled.into());
    }
    Ok(())
}

/// A bar on a terminal, a line every few seconds elsewhere.
fn progress_display(terminal: bool) -> impl Fn(&TrainProgress) + Send + Sync + 'static {
    let bar = indicatif::ProgressBar::with_draw_target(
        None,
        indicatif::ProgressDrawTarget::stderr_with_hz(4),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:.bold} [{bar:30}] {pos}/{len} steps  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix("train");
    let last_line = std::sync::Mutex::new(Instant::now());
    move |p: &TrainProgress| {
        let msg = format!(
            "epoch {}/{} step {}/{}  loss {:.4}  lr {:.2e}  idle {:.0}%  {:.1} steps/s",
            (p.epoch + 1).min(p.epochs),
            p.epochs,
            p.step,
            p.steps_per_epoch,
            p.loss,
            p.lr,
            100.0 * p.idle_fraction,
            p.steps_per_s
        );
        if terminal {
            bar.set_length(p.total_steps);
            bar.set_position(p.global_step);
            bar.set_message(msg);
        } else if let Ok(mut last) = last_line.lock()
            && (last.elapsed().as_secs() >= 5 || p.step == 0)
        {
            *last = Instant::now();
            eprintln!("train: {}/{} steps  {msg}", p.global_step, p.total_steps);
        }
    }
}

/// A pipeline and its trainer in one pass: the trainer on its own thread, fed by the
/// run's sink; both stop on Ctrl-C (exit 130) with a checkpoint and the finished
/// shards kept, and a rerun resumes both.
pub fn run_one_pass(
    plan: trustflow_engine::plan::Plan,
    settings: trustflow_engine::run::RunSettings,
    quiet: bool,
    train_file: PathBuf,
    slow_steps_ms: Option<u64>,
) -> Result<()> {
    let loaded = trustflow_train::load_train_file(&train_file)?;
    let cancel = cancel_on_signals()?;
    let options = TrainOptions {
        // A forced rerun of every shard trains from scratch too.
        resume: !settings.force,
        fresh: settings.force,
        cancel: None,
        abort_after_steps: None,
        // Lines, not a bar: the pipeline's display holds the terminal.
        progress: (!quiet).then(|| {
            std::sync::Arc::new(progress_display(false)) as trustflow_train::trainer::ProgressFn
        }),
        slow_steps: slow_steps_ms.map(std::time::Duration::from_millis),
    };
    let (run, display) = super::pipeline::display_options(&plan, settings, quiet, cancel, true);
    let outcome = trustflow_train::trainer::train_with_pipeline(plan, &loaded, run, &options);
    if let Some(p) = &display {
        p.finish();
    }
    let (ran, trained) = outcome?;
    let ran = ran.map_err(anyhow::Error::new);
    let report = match (ran, trained) {
        (Ok(report), Ok(trained)) => {
            out!("{report}")?;
            trained_summary(&trained)?;
            if trained.status == TrainStatus::Interrupted {
                return Err(Error::Cancelled.into());
            }
            report
        }
        // Cancelled: the pipeline's error says so; the trainer saved a checkpoint.
        (Err(e), Ok(trained)) => {
            trained_summary(&trained)?;
            return Err(e);
        }
        (Ok(report), Err(e)) => {
            out!("{report}")?;
            return Err(anyhow::Error::new(e).context("the one-pass trainer failed"));
        }
        (Err(e), Err(t)) => {
            eprintln!("the one-pass trainer stopped too: {t}");
            return Err(e);
        }
    };
    super::pipeline::check_complete(&report)
}

/// The trainer's figures as `train` prints them.
fn trained_summary(report: &trustflow_train::TrainReport) -> Result<()> {
    out_json!(serde_json::json!({
        "status": report.status,
        "output": report.output,
        "global_step": report.global_step,
        "total_steps": report.total_steps,
        "steps_per_s": report.steps_per_s,
        "trainer_idle_fraction": report.trainer_idle_fraction,
        "last_epoch": report.history.last(),
        "checkpoint": report.checkpoint,
    }))
}

pub fn validate_train(train_file: &Path) -> Result<()> {
    let loaded = trustflow_train::load_train_file(train_file)?;
    out_json!(trustflow_train::trainer::check_only(&loaded)?)
}

pub fn fit_text(args: FitTextArgs) -> Result<()> {
    let metrics = trustflow_train::text_head::fit_text(&args.options)?;
    let text = serde_json::to_string_pretty(&metrics)?;
    outln!("{text}")?;
    if let Some(path) = args.report {
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
