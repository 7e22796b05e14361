//! The `trustflow` command line: a thin layer over the library (anyhow lives here only).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use trustflow::bench::corpus::{GenLayout, GenOptions, generate};
use trustflow::progress::Progress;
use trustflow_engine::plan::{self, Overrides};
use trustflow_engine::run::{ProgressFn, RunOptions, RunReport, execute};
use trustflow_engine::runtime::{CancelToken, RunSnapshot};
use trustflow_engine::{Error, inspect, spec};

/// Streaming image-caption pipelines over Parquet shards (TRUST domain adaptation).
#[derive(Parser)]
#[command(name = "trustflow", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline file over its shards (resumes: finished shards are skipped).
    Run(RunArgs),
    /// Check a pipeline file and print the resolved plan and output schema (reads
    /// shard footers, not data).
    Validate {
        pipeline: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Print the JSON Schema of pipeline files (`--train`: of training files).
    Schema {
        #[arg(long)]
        train: bool,
    },
    /// Summarise an output folder: rows per shard, quarantine reasons, columns.
    Inspect {
        out_dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The embedded demo: the whole TRUST chain on real digit images. Builds the MNIST
    /// source and the MNIST-M-style target, enriches them (captioner for missing
    /// captions, pseudo-labels from the text head fitted on source captions, CLIP
    /// weights), trains source-only and TRUST, and prints target accuracy,
    /// pseudo-label accuracy and weight AUROC. `--engine` runs the older engine demo
    /// instead (a generated corpus with bad rows through decode and caption cleaning).
    Demo {
        /// Where the data and outputs go.
        #[arg(long, default_value = "out/demo")]
        out: PathBuf,
        /// Rows per domain (default: all; the engine demo: rows of its corpus, 2000).
        #[arg(long)]
        rows: Option<usize>,
        /// Training epochs (default: the training file's).
        #[arg(long)]
        epochs: Option<u64>,
        /// The engine demo instead of the TRUST demo.
        #[arg(long)]
        engine: bool,
        /// Shards of the engine demo's corpus.
        #[arg(long, default_value_t = 4)]
        shards: usize,
    },
    /// Benchmark tools.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Train the vision model with TRUST's losses over enriched shards (a training
    /// file: source, target, model, loss, optimizer, data). Writes checkpoints,
    /// `metrics.jsonl` and `_report.json` under its `output`.
    Train(TrainArgs),
    /// Check a training file and its shards (columns, labels, weights, features)
    /// without training; prints the plan as JSON.
    ValidateTrain { train_file: PathBuf },
    /// Fit a text head (pseudo_label's `head`) on frozen MiniLM sentence embeddings of
    /// captions with integer labels; prints train and held-out accuracy as JSON.
    FitText(FitTextArgs),
    /// The calibration file of the uncertainty stage's `method: class_max_cosine`: per
    /// class, the largest image-caption cosine over labelled source shards that
    /// `clip_score` has enriched. Prints it as JSON.
    CalibrateWeights(CalibrateArgs),
}

#[derive(Args)]
struct CalibrateArgs {
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

#[derive(Args)]
struct TrainArgs {
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
}

#[derive(Args)]
struct FitTextArgs {
    /// Parquet shards with captions and labels.
    #[arg(long, required = true, num_args = 1.., value_name = "SHARD")]
    train: Vec<PathBuf>,
    /// The head file to write (safetensors; the sidecar `<file>.json` goes beside it).
    #[arg(long, value_name = "HEAD_FILE")]
    out: PathBuf,
    /// Caption column. Default: `caption_clean` when present, else `caption`.
    #[arg(long)]
    caption_column: Option<String>,
    /// Integer label column.
    #[arg(long, default_value = "label")]
    label_column: String,
    /// Keep only rows whose `split` column equals this (e.g. `train`); shorthand for
    /// `--where split=VALUE`.
    #[arg(long)]
    split: Option<String>,
    /// Keep only rows where COLUMN (compared as text) equals VALUE, e.g.
    /// `--where domain=source`; may repeat (all must hold).
    #[arg(long = "where", value_name = "COLUMN=VALUE")]
    filters: Vec<String>,
    /// ONNX sentence encoder (file or folder). Default: $TRUSTFLOW_MINILM_DIR.
    #[arg(long)]
    encoder: Option<PathBuf>,
    /// The encoder's tokenizer.json. Default: $TRUSTFLOW_MINILM_TOKENIZER.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Class names in label order, comma-separated. Default: 0..C-1.
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    #[arg(long, default_value_t = 8)]
    epochs: usize,
    /// Hidden width H (the caption feature's size).
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
    /// Share of rows held out (seeded) for the held-out accuracy.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the metrics JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Generate a realistic, deterministic corpus of Parquet shards.
    Gen(GenArgs),
    /// Generate small enriched training shards (source/, target/, eval/) with
    /// learnable synthetic images, noisy pseudo-labels, weights and text features.
    GenTrain(GenTrainArgs),
    /// Write the digits benchmark's three domains (MNIST, MNIST-M-style, UCI digits)
    /// with generated noisy captions; see docs/digits.md.
    GenDigits(GenDigitsArgs),
    /// The accuracy benchmark: fit the text head on source captions, enrich every
    /// domain, train each ablation for each shift and seed; writes accuracy.json,
    /// accuracy.md and weights.png.
    Accuracy(AccuracyArgs),
    /// The benchmark harness: a bench spec (benches/specs/) runs a pipeline over
    /// Parquet shards with per-stage throughput, utilisation, queue fill and RSS over
    /// time, the Python baseline side by side, the model-only ceiling and the scaling
    /// series; writes harness.json and PNG plots.
    Run(BenchRunArgs),
    /// clip_score end to end vs the same models on pre-made inputs (the ceiling),
    /// alternating in one process; prints JSON.
    Ceiling(CeilingArgs),
    /// The trainer fed from shards (idle fraction, steps/s) vs fed from steps already
    /// in memory, alternating in one process; prints JSON.
    Train(BenchTrainArgs),
}

#[derive(Args)]
struct GenDigitsArgs {
    #[arg(long, default_value = "out/digits/data")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Keep only this many rows of each domain (a reduced run).
    #[arg(long)]
    max_rows_per_domain: Option<usize>,
}

#[derive(Args)]
struct AccuracyArgs {
    /// Digits data (made with `bench gen-digits` when absent).
    #[arg(long, default_value = "out/digits/data")]
    data: PathBuf,
    /// Head, enriched shards, runs and reports.
    #[arg(long, default_value = "out/digits")]
    work: PathBuf,
    /// The target domains' enrichment pipeline.
    #[arg(long, default_value = "pipelines/digits/enrich.yaml")]
    enrich_pipeline: PathBuf,
    /// The source domain's enrichment pipeline.
    #[arg(long, default_value = "pipelines/digits/enrich-source.yaml")]
    source_pipeline: PathBuf,
    /// Override the target pipeline's weight method: batch_softmax, clamped_cosine or
    /// class_max_cosine.
    #[arg(long)]
    weights: Option<String>,
    #[arg(long, default_value = "pipelines/digits/train.yaml")]
    train_file: PathBuf,
    /// Target domains, comma-separated.
    #[arg(long, default_value = "target_a,target_b", value_delimiter = ',')]
    shifts: Vec<String>,
    /// Ablations, comma-separated: source_only, lagtran, weighted, self_train, trust.
    #[arg(
        long,
        default_value = "source_only,lagtran,weighted,self_train,trust",
        value_delimiter = ','
    )]
    ablations: Vec<String>,
    #[arg(long, default_value = "0,1,2", value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Override the training file's epochs.
    #[arg(long)]
    epochs: Option<u64>,
    /// With generated data: rows per domain (default all).
    #[arg(long)]
    max_rows_per_domain: Option<usize>,
}

#[derive(Args)]
struct BenchRunArgs {
    spec: PathBuf,
    /// Output folder (reports, plots, the runs' outputs).
    #[arg(long, default_value = "out/harness")]
    out: PathBuf,
    /// Override the spec's repetitions.
    #[arg(long)]
    repetitions: Option<usize>,
    #[arg(long)]
    skip_baseline: bool,
    #[arg(long)]
    skip_ceiling: bool,
    #[arg(long)]
    skip_scaling: bool,
    /// Python for the baseline (default $TRUSTFLOW_BASELINE_PYTHON or the reference venv).
    #[arg(long)]
    python: Option<PathBuf>,
}

#[derive(Args)]
struct CeilingArgs {
    pipeline: PathBuf,
    /// The clip_score stage to measure (default: the first).
    #[arg(long)]
    stage: Option<String>,
    #[arg(long, default_value_t = 2)]
    repetitions: usize,
    /// Model calls per caller per ceiling measurement.
    #[arg(long, default_value_t = 8)]
    calls: usize,
    /// Scratch output folder of the end-to-end runs.
    #[arg(long, default_value = "out/bench-ceiling")]
    scratch: PathBuf,
}

#[derive(Args)]
struct BenchTrainArgs {
    train_file: PathBuf,
    #[arg(long, default_value_t = 2)]
    repetitions: usize,
    /// Scratch output folder of the shard-fed runs (replaces the file's `output`).
    #[arg(long, default_value = "out/bench-train")]
    scratch: PathBuf,
}

#[derive(Args)]
struct GenTrainArgs {
    #[arg(long, default_value = "out/train-corpus")]
    out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    rows_source: usize,
    #[arg(long, default_value_t = 1000)]
    rows_target: usize,
    #[arg(long, default_value_t = 400)]
    rows_eval: usize,
    #[arg(long, default_value_t = 2)]
    shards: usize,
    #[arg(long, default_value_t = 4)]
    classes: usize,
    #[arg(long, default_value_t = 16)]
    image_size: u32,
    /// Share of target pseudo-labels that are wrong.
    #[arg(long, default_value_t = 0.3)]
    pseudo_noise: f64,
    /// Share of rows whose image bytes are not an image.
    #[arg(long, default_value_t = 0.0)]
    bad_image_rate: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct RunArgs {
    pipeline: PathBuf,
    #[command(flatten)]
    overrides: Overrides,
    /// Redo every shard, even those whose manifest matches.
    #[arg(long)]
    force: bool,
    /// Process only part I of N (shards with index % N == I), e.g. `--part 0/4`.
    #[arg(long, value_parser = parse_part)]
    part: Option<(usize, usize)>,
    /// Where to write the JSON report (default: OUT_DIR/_report.json).
    #[arg(long)]
    report: Option<PathBuf>,
    /// No live progress display.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct GenArgs {
    #[arg(long)]
    rows: usize,
    #[arg(long, default_value_t = 1)]
    shards: usize,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Share of rows whose caption is missing (null, empty or unusable).
    #[arg(long, default_value_t = 0.05)]
    missing_caption_rate: f64,
    /// Share of rows with corrupt images (truncated, random bytes, empty, bomb header).
    #[arg(long, default_value_t = 0.06)]
    corrupt_rate: f64,
    #[arg(long, default_value_t = 64)]
    min_side: u32,
    #[arg(long, default_value_t = 1024)]
    max_side: u32,
    /// Share of PNG images (the rest are JPEG).
    #[arg(long, default_value_t = 0.25)]
    png_share: f64,
    /// bytes | hf | path | img2dataset
    #[arg(long, default_value = "bytes")]
    layout: GenLayout,
}

fn parse_part(s: &str) -> std::result::Result<(usize, usize), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("expected I/N, e.g. 0/4, found `{s}`"))?;
    let i: usize = i
        .trim()
        .parse()
        .map_err(|_| format!("bad part index `{i}`"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| format!("bad part count `{n}`"))?;
    if n == 0 || i >= n {
        return Err(format!("part {i}/{n}: expected 0 <= I < N"));
    }
    Ok((i, n))
}

fn main() -> ExitCode {
    // The engine's own threads (the shard reader evaluates `source.filter` again) take
    // std's default stack, 2 MiB, unless RUST_MIN_STACK says otherwise; see `main`'s
    // command thread for why that is too little. std reads the variable when it
    // spawns its first thread, which has not happened yet.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: no other thread exists yet, so none can read the environment while it
        // changes.
        unsafe { std::env::set_var("RUST_MIN_STACK", ENGINE_THREAD_STACK_BYTES.to_string()) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRUSTFLOW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Deeply nested input must not abort the process: a `source.filter` of 1,000 `OR`
    // terms is an expression tree 1,000 levels deep, which DataFusion's recursive
    // passes walk with large (debug) frames, far past the main thread's 8 MiB. So the
    // command runs on a thread with a large stack; only address space is reserved, and
    // pages are touched only as deep as the input really goes.
    let command = std::thread::Builder::new()
        .name("trustflow".into())
        .stack_size(COMMAND_STACK_BYTES)
        .spawn(move || dispatch(cli));
    let result = match command.map(std::thread::JoinHandle::join) {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => {
            // The panic hook has printed where it happened; say what it means.
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            eprintln!("error: internal error (please report it): {what}");
            return ExitCode::FAILURE;
        }
        Err(e) => Err(anyhow::Error::new(e).context("starting the command thread")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::from(e.downcast_ref::<Error>().map_or(1, Error::exit_code))
        }
    }
}

/// Stack of the thread that runs the command (see `main`).
const COMMAND_STACK_BYTES: usize = 256 << 20;

/// Default stack of every other thread this process starts (see `main`): enough for the
/// deepest `source.filter` that `validate` lets through, in a debug build.
const ENGINE_THREAD_STACK_BYTES: usize = 64 << 20;

/// The error and its causes, joined by `: `, each distinct message once: some errors'
/// own text already ends with their source's (`Error::Io` is `{path}: {source}`), and
/// anyhow's `{:#}` would print that source a second time.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

/// Set once stdout's reader has gone away; later output is dropped.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Write to stdout. A reader that closed the pipe early (`trustflow validate x | head
/// -1`) got what it wanted: that is not an error of ours, so the output is dropped
/// quietly and the command goes on (`print!` would panic on EPIPE). Resetting SIGPIPE
/// to its default instead would kill the process by a signal, mid-run for `run`,
/// before its report and `sink.train` step.
fn write_stdout(args: std::fmt::Arguments) -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::Ordering::Relaxed;
    if STDOUT_CLOSED.load(Relaxed) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Relaxed);
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

/// `print!` through [`write_stdout`]; returns its `Result`.
macro_rules! out {
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*))
    };
}

/// `println!` through [`write_stdout`]; returns its `Result`.
macro_rules! outln {
    () => {
        write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// SIGINT/SIGTERM set the cancel flag (the run stops cleanly, discarding unfinished
/// shards); a second signal exits at once.
fn cancel_on_signals() -> Result<CancelToken> {
    let token = CancelToken::new();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, token.flag())
            .context("installing signal handler")?;
        signal_hook::flag::register(sig, token.flag()).context("installing signal handler")?;
    }
    Ok(token)
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let plan = plan::load_and_plan(&args.pipeline, &args.overrides)?;
            let then_train = plan
                .pipeline
                .spec
                .sink
                .train
                .as_deref()
                .map(|t| plan.pipeline.resolve(t));
            let report = run_with_progress(plan, args.force, args.part, args.report, args.quiet)?;
            out!("{report}")?;
            if !report.invariant_holds {
                anyhow::bail!("row accounting invariant broken (see report)");
            }
            if !report.unreadable.is_empty() {
                return Err(Error::Incomplete {
                    skipped: report.unreadable.len(),
                }
                .into());
            }
            if let Some(train_file) = then_train {
                if args.part.is_some() {
                    eprintln!(
                        "sink.train: not run with --part (the other parts' shards are not \
                         written yet); run `trustflow train {}` when all parts are done",
                        train_file.display()
                    );
                } else {
                    // Resumes a run of the same training file and shards, as `run` skips
                    // finished shards.
                    eprintln!("sink.train: training with {}", train_file.display());
                    train(TrainArgs {
                        train_file,
                        resume: true,
                        fresh: false,
                        abort_after_steps: None,
                    })?;
                }
            }
            Ok(())
        }
        Command::Validate {
            pipeline,
            overrides,
        } => {
            let plan = plan::load_and_plan(&pipeline, &overrides)?;
            outln!("{}", plan.describe())?;
            outln!("ok: {} is valid", pipeline.display())?;
            Ok(())
        }
        Command::Schema { train } => {
            match train {
                true => out!("{}", trustflow_train::spec::json_schema())?,
                false => out!("{}", spec::json_schema())?,
            }
            Ok(())
        }
        Command::Inspect { out_dir, json } => {
            let found = inspect::inspect(&out_dir)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&found)?)?;
            } else {
                out!("{}", found.to_text())?;
            }
            Ok(())
        }
        Command::Demo {
            out,
            rows,
            epochs,
            engine,
            shards,
        } => match engine {
            true => demo(&out, rows.unwrap_or(2000), shards),
            false => trust_demo(&out, rows, epochs),
        },
        Command::CalibrateWeights(args) => {
            let shards = trustflow_engine::source::shards::discover(Path::new("."), &args.source)?;
            let calibration = trustflow_engine::stages::class_max::calibrate(
                &shards,
                &args.label_column,
                &args.similarity_column,
                args.classes,
            )?;
            calibration.save(&args.out)?;
            outln!("{}", serde_json::to_string_pretty(&calibration)?)?;
            eprintln!("wrote {}", args.out.display());
            Ok(())
        }
        Command::FitText(args) => {
            use trustflow_train::text_head::{FitOptions, FitTextOptions, fit_text};
            anyhow::ensure!(
                (0.0..1.0).contains(&args.holdout),
                "--holdout must be in [0, 1)"
            );
            anyhow::ensure!(
                args.hidden >= 1 && args.epochs >= 1,
                "--hidden and --epochs must be >= 1"
            );
            let mut filters = Vec::new();
            for filter in &args.filters {
                let (column, value) = filter
                    .split_once('=')
                    .with_context(|| format!("--where {filter:?}: expected COLUMN=VALUE"))?;
                filters.push((column.trim().to_string(), value.to_string()));
            }
            if let Some(split) = args.split {
                filters.push(("split".to_string(), split));
            }
            let opts = FitTextOptions {
                train: args.train,
                out: args.out,
                caption_column: args.caption_column,
                label_column: args.label_column,
                filters,
                encoder: args.encoder,
                tokenizer: args.tokenizer,
                classes: args.classes,
                holdout: args.holdout,
                fit: FitOptions {
                    hidden: args.hidden,
                    epochs: args.epochs,
                    lr: args.lr,
                    seed: args.seed,
                    ..FitOptions::default()
                },
            };
            let metrics = fit_text(&opts)?;
            let text = serde_json::to_string_pretty(&metrics)?;
            outln!("{text}")?;
            if let Some(path) = args.report {
                std::fs::write(&path, &text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Train(args) => train(args),
        Command::ValidateTrain { train_file } => {
            let loaded = trustflow_train::load_train_file(&train_file)?;
            let plan = trustflow_train::trainer::check_only(&loaded)?;
            outln!("{}", serde_json::to_string_pretty(&plan)?)?;
            Ok(())
        }
        Command::Bench(BenchCommand::Ceiling(a)) => {
            let report =
                trustflow::bench::ceiling::run(&trustflow::bench::ceiling::CeilingOptions {
                    pipeline: a.pipeline,
                    stage: a.stage,
                    repetitions: a.repetitions,
                    calls: a.calls,
                    scratch: a.scratch,
                })?;
            outln!("{}", serde_json::to_string_pretty(&report)?)?;
            Ok(())
        }
        Command::Bench(BenchCommand::Train(a)) => bench_train(a),
        Command::Bench(BenchCommand::Run(a)) => {
            use trustflow::bench::harness::{self, HarnessOptions};
            let opts = HarnessOptions {
                repetitions: a.repetitions,
                skip_baseline: a.skip_baseline,
                skip_ceiling: a.skip_ceiling,
                skip_scaling: a.skip_scaling,
                python: a.python,
                on_message: Some(Box::new(|m| eprintln!("{m}"))),
                ..Default::default()
            };
            out!(
                "{}",
                harness::run_spec_with(&a.spec, &a.out, &opts)?.to_text()
            )?;
            Ok(())
        }
        Command::Bench(BenchCommand::GenDigits(a)) => {
            let summary = gen_digits(&a.out, a.seed, a.shards, a.max_rows_per_domain)?;
            outln!("{}", serde_json::to_string_pretty(&summary)?)?;
            Ok(())
        }
        Command::Bench(BenchCommand::Accuracy(a)) => bench_accuracy(a),
        Command::Bench(BenchCommand::GenTrain(a)) => {
            let opts = trustflow::bench::train_corpus::TrainCorpusOptions {
                rows_source: a.rows_source,
                rows_target: a.rows_target,
                rows_eval: a.rows_eval,
                shards: a.shards,
                classes: a.classes,
                image_size: a.image_size,
                pseudo_noise: a.pseudo_noise,
                bad_image_rate: a.bad_image_rate,
                seed: a.seed,
                out: a.out,
                ..Default::default()
            };
            let summary = trustflow::bench::train_corpus::generate_train_corpus(&opts)?;
            outln!("{}", serde_json::to_string_pretty(&summary)?)?;
            Ok(())
        }
        Command::Bench(BenchCommand::Gen(args)) => {
            let opts = GenOptions {
                rows: args.rows,
                shards: args.shards,
                out: args.out,
                seed: args.seed,
                missing_caption_rate: args.missing_caption_rate,
                corrupt_rate: args.corrupt_rate,
                min_side: args.min_side,
                max_side: args.max_side,
                png_share: args.png_share,
                layout: args.layout,
                ..GenOptions::default()
            };
            let summary = generate(&opts)?;
            outln!("{}", serde_json::to_string_pretty(&summary)?)?;
            Ok(())
        }
    }
}

fn train(args: TrainArgs) -> Result<()> {
    use trustflow_train::{TrainOptions, TrainProgress};
    let loaded = trustflow_train::load_train_file(&args.train_file)?;
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
    let terminal = std::io::stderr().is_terminal();
    let last_line = std::sync::Mutex::new(Instant::now());
    let progress = move |p: &TrainProgress| {
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
    };
    let options = TrainOptions {
        resume: args.resume,
        fresh: args.fresh,
        cancel: Some(cancel_on_signals()?),
        abort_after_steps: args.abort_after_steps,
        progress: Some(std::sync::Arc::new(progress)),
    };
    let report = trustflow_train::train(&loaded, &options)?;
    eprintln!();
    let last = report.history.last();
    outln!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "status": report.status,
            "output": report.output,
            "global_step": report.global_step,
            "total_steps": report.total_steps,
            "steps_per_s": report.steps_per_s,
            "trainer_idle_fraction": report.trainer_idle_fraction,
            "last_epoch": last,
            "checkpoint": report.checkpoint,
        }))?
    )?;
    if report.status == trustflow_train::TrainStatus::Interrupted {
        return Err(Error::Cancelled.into());
    }
    Ok(())
}

fn gen_digits(
    out: &Path,
    seed: u64,
    shards: usize,
    max_rows_per_domain: Option<usize>,
) -> Result<trustflow::bench::digits::DigitsSummary> {
    use trustflow::bench::digits::{DigitsOptions, generate_digits};
    Ok(generate_digits(&DigitsOptions {
        out: out.to_path_buf(),
        seed,
        shards,
        max_rows_per_domain,
        ..DigitsOptions::default()
    })?)
}

fn bench_accuracy(a: AccuracyArgs) -> Result<()> {
    use trustflow::bench::accuracy::{self, Ablation, AccuracyOptions};
    let ablations = a
        .ablations
        .iter()
        .map(|n| {
            Ablation::parse(n).with_context(|| {
                format!(
                    "--ablations: unknown `{n}` (source_only, lagtran, weighted, self_train, trust)"
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if !a.data.join("source").is_dir() {
        eprintln!(
            "bench accuracy: generating the digits data in {}",
            a.data.display()
        );
        gen_digits(&a.data, 0, 1, a.max_rows_per_domain)?;
    }
    let opts = AccuracyOptions {
        data: a.data,
        work: a.work.clone(),
        enrich_pipeline: a.enrich_pipeline,
        source_pipeline: a.source_pipeline,
        weights: a
            .weights
            .as_deref()
            .map(|w| {
                serde_json::from_value(serde_json::Value::String(w.to_string())).with_context(
                    || {
                        format!(
                            "--weights: unknown `{w}` (batch_softmax, clamped_cosine, \
                             class_max_cosine)"
                        )
                    },
                )
            })
            .transpose()?,
        train_file: a.train_file,
        source: "source".into(),
        shifts: a.shifts,
        ablations,
        seeds: a.seeds,
        epochs: a.epochs,
        log: |line| eprintln!("bench accuracy: {line}"),
    };
    let started = Instant::now();
    let report = accuracy::run(&opts)?;
    let (written, skipped) = accuracy::write_outputs(&report, &opts, &a.work)?;
    outln!(
        "{}",
        accuracy::markdown(&report, &opts.shifts, &opts.ablations)
    )?;
    if let Some(why) = skipped {
        eprintln!("bench accuracy: no plot: {why}");
    }
    for f in written {
        eprintln!("bench accuracy: wrote {}", f.display());
    }
    eprintln!("bench accuracy: {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn bench_train(a: BenchTrainArgs) -> Result<()> {
    use trustflow_train::{TrainOptions, trainer};
    let mut loaded = trustflow_train::load_train_file(&a.train_file)?;
    std::fs::create_dir_all(&a.scratch)
        .with_context(|| format!("creating {}", a.scratch.display()))?;
    loaded.spec.output = std::fs::canonicalize(&a.scratch)?.display().to_string();
    let mut shards_fed = Vec::new();
    let mut memory_fed = Vec::new();
    for rep in 0..a.repetitions.max(1) {
        eprintln!("bench train: repetition {}: fed from shards", rep + 1);
        let report = trustflow_train::train(
            &loaded,
            &TrainOptions {
                fresh: true,
                ..TrainOptions::default()
            },
        )?;
        eprintln!("bench train: repetition {}: fed from memory", rep + 1);
        let memory = trainer::memory_fed(&loaded, report.global_step)?;
        shards_fed.push(serde_json::json!({
            "steps": report.global_step,
            "steps_per_s": report.steps_per_s,
            "trainer_idle_fraction": report.trainer_idle_fraction,
            "wall_s": report.wall_s,
        }));
        memory_fed.push(memory);
    }
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let shard_rate = mean(
        shards_fed
            .iter()
            .filter_map(|r| r["steps_per_s"].as_f64())
            .collect(),
    );
    let memory_rate = mean(memory_fed.iter().map(|m| m.steps_per_s).collect());
    let idle = mean(
        shards_fed
            .iter()
            .filter_map(|r| r["trainer_idle_fraction"].as_f64())
            .collect(),
    );
    let spec = &loaded.spec;
    outln!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "train_file": a.train_file,
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "batch_size": spec.data.batch_size,
            "workers": spec.data.workers,
            "prefetch": spec.data.prefetch,
            "torch_threads": spec.model.threads,
            "shards_fed": shards_fed,
            "memory_fed": memory_fed,
            "mean_shards_fed_steps_per_s": shard_rate,
            "mean_memory_fed_steps_per_s": memory_rate,
            "mean_trainer_idle_fraction": idle,
            "ratio": if memory_rate > 0.0 { shard_rate / memory_rate } else { 0.0 },
        }))?
    )?;
    Ok(())
}

fn run_with_progress(
    plan: plan::Plan,
    force: bool,
    part: Option<(usize, usize)>,
    report_path: Option<PathBuf>,
    quiet: bool,
) -> Result<RunReport> {
    let mut names = vec!["source".to_string()];
    names.extend(plan.stages.iter().map(|s| s.stage.name().to_string()));
    names.push("sink".into());
    let total = plan.source.shards.len() as u64;
    let tty = std::io::stderr().is_terminal();
    let progress = (!quiet && tty).then(|| Progress::new(&names, total));
    let on_progress: Option<ProgressFn> = match (&progress, quiet) {
        (Some(p), _) => {
            let p = p.clone();
            Some(Box::new(move |s: &RunSnapshot| p.update(s)))
        }
        (None, false) => {
            // Not a terminal (CI, logs): a plain line every few seconds.
            let last = std::sync::Mutex::new(Instant::now());
            Some(Box::new(move |s: &RunSnapshot| {
                if let Ok(mut t) = last.lock()
                    && t.elapsed().as_secs() >= 5
                {
                    *t = Instant::now();
                    eprintln!("{}", trustflow::progress::progress_line(s));
                }
            }))
        }
        (None, true) => None,
    };
    let options = RunOptions {
        cancel: cancel_on_signals()?,
        force,
        part,
        report_path,
        on_progress,
    };
    let result = execute(plan, options);
    if let Some(p) = &progress {
        p.finish();
    }
    Ok(result?)
}

const DEMO_PIPELINE: &str = include_str!("../pipelines/demo.yaml");

/// A file of this repository: relative to the current folder when run from the
/// checkout, else where the binary was built from.
fn repo_file(relative: &str) -> PathBuf {
    let here = PathBuf::from(relative);
    if here.exists() {
        here
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }
}

fn trust_demo(out: &Path, rows: Option<usize>, epochs: Option<u64>) -> Result<()> {
    use trustflow::bench::accuracy::{self, Ablation, AccuracyOptions};
    let started = Instant::now();
    let data = out.join("data");
    eprintln!(
        "1/4 building the digit domains under {} (MNIST source, MNIST-M-style target)",
        data.display()
    );
    let summary = gen_digits(&data, 0, 1, rows)?;
    for f in &summary.folders {
        eprintln!(
            "    {}/{}: {} rows, captions {:?}",
            f.domain, f.split, f.rows, f.caption_kinds
        );
    }
    let opts = AccuracyOptions {
        data,
        work: out.to_path_buf(),
        enrich_pipeline: repo_file("pipelines/digits/enrich.yaml"),
        source_pipeline: repo_file("pipelines/digits/enrich-source.yaml"),
        weights: None,
        train_file: repo_file("pipelines/digits/train.yaml"),
        source: "source".into(),
        shifts: vec!["target_a".into()],
        ablations: vec![Ablation::SourceOnly, Ablation::Trust],
        seeds: vec![0],
        epochs,
        log: |line| eprintln!("    {line}"),
    };
    eprintln!("2/4 fitting the text head on source captions (MiniLM + ReLU head)");
    let (head, head_metrics) = accuracy::fit_source_head(&opts)?;
    eprintln!(
        "    held-out caption accuracy {}",
        head_metrics["held_out_accuracy"]
    );
    eprintln!(
        "3/4 enriching source and target: caption -> pseudo_label -> clip_score -> uncertainty"
    );
    let (mut enriched, weight_method) = accuracy::enrich_all(&opts, &head, &opts.shifts)?;
    for e in &enriched {
        eprintln!(
            "    {}: {} rows in, {} out, {} quarantined ({:.1} s)",
            e.domain, e.rows_in, e.rows_out, e.rows_quarantined, e.wall_s
        );
        anyhow::ensure!(
            e.rows_in == e.rows_out + e.rows_quarantined,
            "row accounting invariant broken for {}",
            e.domain
        );
    }
    eprintln!("4/4 training source-only and TRUST (built-in CNN)");
    let mut runs = Vec::new();
    for ablation in [Ablation::SourceOnly, Ablation::Trust] {
        eprintln!("    {}", ablation.label());
        let (result, report) = accuracy::train_one(&opts, "target_a", ablation, 0)?;
        if let Some(e) = enriched.iter_mut().find(|e| e.domain == "target_a") {
            e.pseudo_labels = report.history.last().and_then(|m| m.pseudo_labels.clone());
        }
        runs.push(result);
    }
    let report = accuracy::AccuracyReport {
        weight_method,
        text_head: head_metrics,
        table: accuracy::aggregate(&runs),
        enriched,
        runs,
    };
    let (written, skipped) = accuracy::write_outputs(&report, &opts, out)?;
    outln!()?;
    outln!("Target accuracy (MNIST -> MNIST-M-style), %:")?;
    out!(
        "{}",
        accuracy::markdown(&report, &opts.shifts, &opts.ablations)
    )?;
    if let Some(why) = skipped {
        eprintln!("no weight plot: {why}");
    }
    outln!()?;
    for f in written {
        outln!("wrote {}", f.display())?;
    }
    outln!(
        "runs (checkpoints, metrics.jsonl, _report.json) under {}",
        out.join("runs").display()
    )?;
    outln!("done in {:.0} s", started.elapsed().as_secs_f64())?;
    Ok(())
}

fn demo(out: &Path, rows: usize, shards: usize) -> Result<()> {
    let corpus = out.join("corpus");
    let enriched = out.join("enriched");
    eprintln!(
        "1/3 generating {rows} rows in {shards} shard(s) under {}",
        corpus.display()
    );
    let opts = GenOptions {
        rows,
        shards,
        out: corpus.clone(),
        seed: 7,
        max_side: 512,
        ..GenOptions::default()
    };
    let summary = generate(&opts)?;
    eprintln!(
        "    {} rows, bad images planted: {:?}, missing captions: {}",
        summary.rows, summary.bad_rows, summary.missing_captions
    );
    eprintln!("2/3 running pipelines/demo.yaml (decode -> clean_caption -> Parquet)");
    let pipeline = spec::parse_str(DEMO_PIPELINE, Path::new("pipelines/demo.yaml"))?;
    spec::validate(&pipeline)?;
    let overrides = Overrides {
        inputs: Some(vec![corpus.to_string_lossy().into_owned()]),
        out_dir: Some(enriched.clone()),
    };
    let plan = plan::build(pipeline, &overrides)?;
    let report = run_with_progress(plan, true, None, None, false)?;
    out!("{report}")?;
    eprintln!("3/3 inspecting {}", enriched.display());
    out!("{}", inspect::inspect(&enriched)?.to_text())?;
    if !report.invariant_holds {
        anyhow::bail!("row accounting invariant broken (see report)");
    }
    outln!(
        "done: outputs in {}, report {}",
        enriched.display(),
        enriched.join("_report.json").display()
    )?;
    Ok(())
}
