//! `bench ...`: corpus generators and measurements.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use trustflow::bench::ceiling::{self, CeilingOptions};
use trustflow::bench::corpus::{GenOptions, generate};
use trustflow::bench::digits::{DigitsOptions, generate_digits};
use trustflow::bench::harness::{self, HarnessOptions};
use trustflow::bench::train_corpus::{TrainCorpusOptions, generate_train_corpus};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Generate a realistic, deterministic corpus of Parquet shards.
    Gen(GenOptions),
    /// Generate small enriched training shards (source/, target/, eval/) with
    /// learnable synthetic images, noisy pseudo-labels, weights and text features.
    GenTrain(TrainCorpusOptions),
    /// Write the digits benchmark's three domains (MNIST, MNIST-M-style, UCI digits)
    /// with generated noisy captions; see docs/digits.md.
    GenDigits(DigitsOptions),
    /// The accuracy benchmark: fit the text head on source captions, enrich every
    /// domain, train each ablation for each shift and seed; writes accuracy.json,
    /// accuracy.md and weights.png.
    #[cfg(feature = "train")]
    Accuracy(accuracy::AccuracyArgs),
    /// The benchmark harness: a bench spec (benches/specs/) runs a pipeline over
    /// Parquet shards with per-stage throughput, utilisation, queue fill and RSS over
    /// time, the Python baseline side by side, the model-only ceiling and the scaling
    /// series; writes harness.json and PNG plots.
    Run(BenchRunArgs),
    /// clip_score end to end vs the same models on pre-made inputs (the ceiling),
    /// alternating in one process; prints JSON.
    Ceiling(CeilingOptions),
    /// The trainer fed from shards (idle fraction, steps/s) vs fed from steps already
    /// in memory, alternating in one process; prints JSON.
    #[cfg(feature = "train")]
    Train(accuracy::BenchTrainArgs),
    /// Enrichment then training (two steps) against one pass (the trainer fed by the
    /// pipeline), side by side for each seed on the digits target; prints JSON.
    #[cfg(feature = "train")]
    OnePass(accuracy::OnePassArgs),
}

#[derive(Args)]
pub struct BenchRunArgs {
    spec: PathBuf,
    /// Output folder (reports, plots, the runs' outputs).
    #[arg(long, default_value = "out/harness")]
    out: PathBuf,
    #[command(flatten)]
    options: HarnessOptions,
}

pub fn dispatch(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Gen(options) => out_json!(generate(&options)?),
        BenchCommand::GenTrain(options) => out_json!(generate_train_corpus(&options)?),
        BenchCommand::GenDigits(options) => out_json!(generate_digits(&options)?),
        #[cfg(feature = "train")]
        BenchCommand::Accuracy(args) => accuracy::accuracy(args),
        BenchCommand::Run(mut args) => {
            args.options.on_message = Some(Box::new(|m| eprintln!("{m}")));
            out!(
                "{}",
                harness::run_spec_with(&args.spec, &args.out, &args.options)?.to_text()
            )
        }
        BenchCommand::Ceiling(options) => out_json!(ceiling::run(&options)?),
        #[cfg(feature = "train")]
        BenchCommand::Train(args) => accuracy::bench_train(args),
        #[cfg(feature = "train")]
        BenchCommand::OnePass(args) => accuracy::one_pass(args),
    }
}

/// The benchmarks that train.
#[cfg(feature = "train")]
mod accuracy {
    use std::path::PathBuf;
    use std::time::Instant;

    use anyhow::{Context, Result};
    use clap::Args;
    use trustflow::bench::accuracy::{self, Ablation, AccuracyOptions};
    use trustflow::bench::digits::{DigitsOptions, generate_digits};
    use trustflow_train::{TrainOptions, trainer};

    #[derive(Args)]
    pub struct AccuracyArgs {
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
        /// Override the target pipeline's weight method: batch_softmax, clamped_cosine
        /// or class_max_cosine.
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
    pub struct OnePassArgs {
        /// Digits data (made with `bench gen-digits` when absent).
        #[arg(long, default_value = "out/digits/data")]
        data: PathBuf,
        /// Head, enriched shards and runs of this benchmark.
        #[arg(long, default_value = "out/bench-one-pass")]
        work: PathBuf,
        #[arg(long, default_value = "pipelines/digits/enrich.yaml")]
        enrich_pipeline: PathBuf,
        #[arg(long, default_value = "pipelines/digits/enrich-source.yaml")]
        source_pipeline: PathBuf,
        #[arg(long, default_value = "pipelines/digits/train.yaml")]
        train_file: PathBuf,
        /// The target domain enriched and trained on.
        #[arg(long, default_value = "target_a")]
        shift: String,
        #[arg(long, default_value = "0,1,2", value_delimiter = ',')]
        seeds: Vec<u64>,
        /// Training epochs of both modes.
        #[arg(long, default_value_t = 1)]
        epochs: u64,
        /// The built-in backbone's width (sizes the trainer's share of the work).
        #[arg(long)]
        width: Option<i64>,
        /// libtorch threads of the trainer.
        #[arg(long)]
        train_threads: Option<usize>,
        /// Rows of the trainer's shuffle buffer.
        #[arg(long)]
        shuffle_buffer: Option<usize>,
        /// With generated data: rows per domain (default all).
        #[arg(long)]
        max_rows_per_domain: Option<usize>,
    }

    pub fn one_pass(a: OnePassArgs) -> Result<()> {
        ensure_digits(&a.data, a.max_rows_per_domain)?;
        let options = trustflow::bench::one_pass::OnePassBenchOptions {
            digits: AccuracyOptions {
                data: a.data,
                work: a.work,
                enrich_pipeline: a.enrich_pipeline,
                source_pipeline: a.source_pipeline,
                weights: None,
                train_file: a.train_file,
                source: "source".into(),
                shifts: vec![a.shift.clone()],
                ablations: vec![Ablation::Trust],
                seeds: a.seeds.clone(),
                epochs: Some(a.epochs),
                log: |line| eprintln!("bench one-pass: {line}"),
            },
            shift: a.shift,
            seeds: a.seeds,
            width: a.width,
            train_threads: a.train_threads,
            shuffle_buffer: a.shuffle_buffer,
        };
        out_json!(trustflow::bench::one_pass::run(&options)?)
    }

    /// The digits data in `data`, generated when absent.
    fn ensure_digits(data: &std::path::Path, max_rows_per_domain: Option<usize>) -> Result<()> {
        if !data.join("source").is_dir() {
            eprintln!("bench: generating the digits data in {}", data.display());
            generate_digits(&DigitsOptions {
                out: data.to_path_buf(),
                max_rows_per_domain,
                ..DigitsOptions::default()
            })?;
        }
        Ok(())
    }

    #[derive(Args)]
    pub struct BenchTrainArgs {
        train_file: PathBuf,
        #[arg(long, default_value_t = 2)]
        repetitions: usize,
        /// Scratch output folder of the shard-fed runs (replaces the file's `output`).
        #[arg(long, default_value = "out/bench-train")]
        scratch: PathBuf,
    }

    pub fn accuracy(a: AccuracyArgs) -> Result<()> {
        let ablations = a
            .ablations
            .iter()
            .map(|n| {
                Ablation::parse(n).with_context(|| {
                    format!(
                        "--ablations: unknown `{n}` (source_only, lagtran, weighted, \
                         self_train, trust)"
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        ensure_digits(&a.data, a.max_rows_per_domain)?;
        let weights = a
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
            .transpose()?;
        let opts = AccuracyOptions {
            data: a.data,
            work: a.work.clone(),
            enrich_pipeline: a.enrich_pipeline,
            source_pipeline: a.source_pipeline,
            weights,
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

    pub fn bench_train(a: BenchTrainArgs) -> Result<()> {
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
        out_json!(serde_json::json!({
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
        }))
    }
}
