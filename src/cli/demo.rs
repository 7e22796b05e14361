//! `demo`: the TRUST demo on digit images (default) or the engine demo (`--engine`).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use trustflow::bench::corpus::{GenOptions, generate};
use trustflow_engine::plan::{self, Overrides};
use trustflow_engine::{inspect, report, spec};

use super::pipeline::{check_complete, run_with_progress};

#[derive(Args)]
pub struct DemoArgs {
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
}

pub fn demo(args: DemoArgs) -> Result<()> {
    match args.engine {
        true => engine_demo(&args.out, args.rows.unwrap_or(2000), args.shards),
        false => trust_demo(&args.out, args.rows, args.epochs),
    }
}

const DEMO_PIPELINE: &str = include_str!("../../pipelines/demo.yaml");

/// The engine demo: a generated corpus with bad rows through decode and caption
/// cleaning.
fn engine_demo(out: &Path, rows: usize, shards: usize) -> Result<()> {
    let corpus = out.join("corpus");
    let enriched = out.join("enriched");
    eprintln!(
        "1/3 generating {rows} rows in {shards} shard(s) under {}",
        corpus.display()
    );
    let summary = generate(&GenOptions {
        rows,
        shards,
        out: corpus.clone(),
        seed: 7,
        max_side: 512,
        ..GenOptions::default()
    })?;
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
        ..Overrides::default()
    };
    let plan = plan::build(pipeline, &overrides)?;
    let settings = trustflow_engine::run::RunSettings {
        force: true,
        ..Default::default()
    };
    let report = run_with_progress(plan, settings, false)?;
    out!("{report}")?;
    eprintln!("3/3 inspecting {}", enriched.display());
    out!("{}", inspect::inspect(&enriched)?.to_text())?;
    check_complete(&report)?;
    let page = write_report(
        &enriched,
        None,
        out.join("report.html"),
        "trustflow engine demo: decode and caption cleaning",
    )?;
    outln!(
        "done: outputs in {}, run report {}",
        enriched.display(),
        enriched.join("_report.json").display()
    )?;
    outln!("report: {}", page.display())
}

/// The HTML report of `enriched` (with the training runs under `runs`), at `html`.
fn write_report(
    enriched: &Path,
    runs: Option<PathBuf>,
    html: PathBuf,
    title: &str,
) -> Result<PathBuf> {
    let options = report::ReportOptions {
        html: Some(html),
        runs,
        title: Some(title.to_string()),
        ..report::ReportOptions::default()
    };
    let built = report::build(enriched, &options)?;
    report::write(&built)?;
    Ok(built.html)
}

#[cfg(not(feature = "train"))]
fn trust_demo(_out: &Path, _rows: Option<usize>, _epochs: Option<u64>) -> Result<()> {
    anyhow::bail!(
        "the TRUST demo trains: {} (try --engine)",
        super::NO_TRAINER
    )
}

/// The TRUST demo: MNIST source, MNIST-M-style target, enrichment and two trainings.
#[cfg(feature = "train")]
fn trust_demo(out: &Path, rows: Option<usize>, epochs: Option<u64>) -> Result<()> {
    use std::time::Instant;
    use trustflow::bench::accuracy::{self, Ablation, AccuracyOptions};
    use trustflow::bench::digits::{DigitsOptions, generate_digits};
    let started = Instant::now();
    let data = out.join("data");
    eprintln!(
        "1/4 building the digit domains under {} (MNIST source, MNIST-M-style target)",
        data.display()
    );
    let summary = generate_digits(&DigitsOptions {
        out: data.clone(),
        max_rows_per_domain: rows,
        ..DigitsOptions::default()
    })?;
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
        "3/4 enriching the source: caption -> pseudo_label -> clip_score (and calibrating \
         the weights on it)"
    );
    let source = accuracy::enrich_domain(&opts, &opts.source_pipeline, &head, &opts.source, None)?;
    let (class_max, weight_method) = accuracy::calibrate_weights(&opts, &source)?;
    eprintln!(
        "4/4 the target in one pass: caption -> pseudo_label -> clip_score -> uncertainty, \
         each row trained on (TRUST, built-in CNN) as it is written; then source-only"
    );
    let one = accuracy::enrich_and_train_one_pass(
        &opts,
        &head,
        class_max.as_deref(),
        ("target_a", Ablation::Trust, 0),
        &|_| {},
    )?;
    let (mut target, trust) = (one.enriched, one.result);
    target.pseudo_labels = one
        .report
        .history
        .last()
        .and_then(|m| m.pseudo_labels.clone());
    let (source_only, _) = accuracy::train_one(&opts, "target_a", Ablation::SourceOnly, 0)?;
    let enriched = vec![source, target];
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
    let runs = vec![source_only, trust];
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
    let page = write_report(
        &out.join("enriched").join("target_a"),
        Some(out.join("runs").join("target_a")),
        out.join("report.html"),
        "TRUST demo: the MNIST-M-style target domain",
    )?;
    outln!("done in {:.0} s", started.elapsed().as_secs_f64())?;
    outln!(
        "report: {} (open it in a browser: what the engine trusted in the target domain)",
        page.display()
    )
}

/// A file of this repository: relative to the current folder when run from the
/// checkout, else where the binary was built from.
#[cfg(feature = "train")]
fn repo_file(relative: &str) -> PathBuf {
    let here = PathBuf::from(relative);
    if here.exists() {
        here
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }
}
