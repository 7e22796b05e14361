//! The command tree. Each command's arguments are the library's own option structs
//! (they derive `clap::Args`), so this layer parses, calls and prints; one file per
//! group of commands.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use trustflow_engine::plan::Overrides;
use trustflow_engine::runtime::CancelToken;

/// `print!` to stdout through [`output::write_stdout`]; returns its `Result`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` to stdout through [`output::write_stdout`]; returns its `Result`.
macro_rules! outln {
    () => {
        $crate::cli::output::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `outln!` of a value as pretty JSON.
macro_rules! out_json {
    ($value:expr) => {
        outln!("{}", serde_json::to_string_pretty(&$value)?)
    };
}

mod bench;
mod demo;
pub mod output;
mod pipeline;
#[cfg(feature = "train")]
mod train;

/// Streaming image-caption pipelines over Parquet shards (TRUST domain adaptation).
#[derive(Parser)]
#[command(name = "trustflow", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline file over its shards (resumes: finished shards are skipped).
    Run(pipeline::RunArgs),
    /// Check a pipeline file and print the resolved plan and output schema (reads
    /// shard footers, not data).
    Validate {
        pipeline: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Print the plan as JSON: the shards in index order (what `--part I/N` splits),
    /// the output folder, the pipeline hash, the threads a run keeps busy and whether
    /// a stage wants a GPU. Cluster runners list shards through it, so that they and
    /// the engine agree on the shard set. Reads footers, not data.
    Plan {
        pipeline: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Print the JSON Schema of pipeline files (`--train`: of training files).
    Schema {
        #[arg(long)]
        train: bool,
        /// Write it to FILE instead, whole or not at all (a shell redirect would empty
        /// the file when the command fails).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Summarise an output folder: rows per shard, quarantine reasons, columns.
    Inspect {
        out_dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write one self-contained HTML page about an output folder (the run, the
    /// invariant per shard, quarantine reasons with samples, weight distributions
    /// and AUROC, galleries of the lowest- and highest-weight rows, training curves)
    /// and print its summary as JSON. Reads a bounded sample (`--max-rows`).
    Report {
        out_dir: PathBuf,
        #[command(flatten)]
        options: trustflow_engine::report::ReportOptions,
    },
    /// The embedded demo: the whole TRUST chain on real digit images. Builds the MNIST
    /// source and the MNIST-M-style target, enriches them (captioner for missing
    /// captions, pseudo-labels from the text head fitted on source captions, CLIP
    /// weights), trains source-only and TRUST, and prints target accuracy,
    /// pseudo-label accuracy and weight AUROC. `--engine` runs the older engine demo
    /// instead (a generated corpus with bad rows through decode and caption cleaning).
    Demo(demo::DemoArgs),
    /// Benchmark tools.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Train the vision model with TRUST's losses over enriched shards (a training
    /// file: source, target, model, loss, optimizer, data). Writes checkpoints,
    /// `metrics.jsonl` and `_report.json` under its `output`.
    #[cfg(feature = "train")]
    Train(train::TrainArgs),
    /// Check a training file and its shards (columns, labels, weights, features)
    /// without training; prints the plan as JSON.
    #[cfg(feature = "train")]
    ValidateTrain { train_file: PathBuf },
    /// Fit a text head (pseudo_label's `head`) on frozen MiniLM sentence embeddings of
    /// captions with integer labels; prints train and held-out accuracy as JSON.
    #[cfg(feature = "train")]
    FitText(train::FitTextArgs),
    /// Not in this build (the engine only, as in the pip wheel): says what to install.
    #[cfg(not(feature = "train"))]
    #[command(aliases = ["validate-train", "fit-text"])]
    Train {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
    /// The calibration file of the uncertainty stage's `method: class_max_cosine`: per
    /// class, the largest image-caption cosine over labelled source shards that
    /// `clip_score` has enriched. Prints it as JSON.
    CalibrateWeights(pipeline::CalibrateArgs),
}

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => pipeline::run(args),
        Command::Validate {
            pipeline,
            overrides,
        } => pipeline::validate(&pipeline, &overrides),
        Command::Plan {
            pipeline,
            overrides,
        } => pipeline::plan_json(&pipeline, &overrides),
        Command::Schema { train, out } => schema(train, out.as_deref()),
        Command::Inspect { out_dir, json } => pipeline::inspect(&out_dir, json),
        Command::Report { out_dir, options } => pipeline::report(&out_dir, &options),
        Command::Demo(args) => demo::demo(args),
        Command::Bench(command) => bench::dispatch(command),
        #[cfg(feature = "train")]
        Command::Train(args) => train::train(args),
        #[cfg(feature = "train")]
        Command::ValidateTrain { train_file } => train::validate_train(&train_file),
        #[cfg(feature = "train")]
        Command::FitText(args) => train::fit_text(args),
        #[cfg(not(feature = "train"))]
        Command::Train { .. } => anyhow::bail!("{NO_TRAINER}"),
        Command::CalibrateWeights(args) => pipeline::calibrate_weights(args),
    }
}

fn schema(train: bool, file: Option<&std::path::Path>) -> Result<()> {
    let text = match train {
        true => train_schema()?,
        false => trustflow_engine::spec::json_schema(),
    };
    match file {
        Some(file) => {
            trustflow_engine::sink::folder::write_atomically(file, text.as_bytes())?;
            Ok(())
        }
        None => out!("{text}"),
    }
}

#[cfg(feature = "train")]
fn train_schema() -> Result<String> {
    Ok(trustflow_train::spec::json_schema())
}

#[cfg(not(feature = "train"))]
fn train_schema() -> Result<String> {
    anyhow::bail!("{NO_TRAINER}")
}

/// Why a trainer-only request fails in an engine-only build.
#[cfg(not(feature = "train"))]
const NO_TRAINER: &str = "this trustflow is the engine without the trainer (the pip \
     wheel, or a build with cargo's `train` feature off). Training needs libtorch 2.13.0: \
     from a checkout, `source scripts/setup.sh && cargo build --release --bin trustflow` \
     builds the full binary (README, \"Two commands\"). The wheel has no `[train]` \
     extra: the full binary links libtorch at build time, and the torch wheel's \
     libraries would have to be found at the path it was linked against";

/// SIGINT/SIGTERM set the cancel flag (a run stops cleanly, discarding unfinished
/// shards; training saves a checkpoint); a second signal exits at once.
fn cancel_on_signals() -> Result<CancelToken> {
    let token = CancelToken::new();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, token.flag())
            .context("installing signal handler")?;
        signal_hook::flag::register(sig, token.flag()).context("installing signal handler")?;
    }
    Ok(token)
}
