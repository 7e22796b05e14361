//! Executing a [`Plan`]: decide which shards still need work (resume), run the
//! topology into the Parquet sink, and write the JSON report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::digest::Fingerprint;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::runtime::feed::{FeedShard, FeedingSink};
use crate::runtime::{
    self, CancelToken, RunSnapshot, ShardCounts, SkippedPart, StepReport, Topology,
};
use crate::sink::{self, Manifest, OutputFolder, ParquetSink};

/// The run report's name in the output folder: `_report.json`, or
/// `_report.part-I-of-N.json` for `--part I/N` (the parts of one job share the folder
/// and must not overwrite each other's report; the cluster runner merges them).
pub fn report_name(part: Option<(usize, usize)>) -> String {
    match part {
        None => "_report.json".into(),
        Some((i, n)) => format!("_report.part-{i}-of-{n}.json"),
    }
}
use crate::spec::ResumeVerify;

/// A live-figures callback.
pub type ProgressFn = Box<dyn Fn(&RunSnapshot) + Sync>;

/// What a command line says of a run (with the `cli` feature, also its arguments:
/// `trustflow run` flattens this struct).
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct RunSettings {
    /// Redo every shard, even those whose manifest matches.
    #[cfg_attr(feature = "cli", arg(long))]
    pub force: bool,
    /// Process only part I of N (shards with index % N == I), e.g. `--part 0/4`: for
    /// splitting a run over processes or machines (each shard's output depends on that
    /// shard alone).
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "I/N", value_parser = parse_part, conflicts_with = "shards")
    )]
    pub part: Option<(usize, usize)>,
    /// Where to write the JSON report (default: OUT_DIR/_report.json).
    #[cfg_attr(feature = "cli", arg(long = "report", value_name = "FILE"))]
    pub report_path: Option<PathBuf>,
}

/// `I/N` with 0 <= I < N.
pub fn parse_part(s: &str) -> std::result::Result<(usize, usize), String> {
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

/// How to run: the command line's settings, and what only a program can give.
#[derive(Default)]
pub struct RunOptions {
    pub settings: RunSettings,
    pub cancel: CancelToken,
    /// Called with live figures about four times a second.
    pub on_progress: Option<ProgressFn>,
    /// Hand every written row on to this feed too, in shard order (the one-pass
    /// trainer); shards skipped as already done are announced for reading back.
    pub feed: Option<runtime::feed::FeedSender>,
}

/// What a run did with a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardStatus {
    /// Processed by this run.
    Done,
    /// A matching manifest was found: the outputs of an earlier run stand.
    Skipped,
}

impl std::fmt::Display for ShardStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShardStatus::Done => "done",
            ShardStatus::Skipped => "skipped",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardReport {
    pub stem: String,
    pub input: PathBuf,
    pub status: ShardStatus,
    pub rows_in: u64,
    pub rows_out: u64,
    pub rows_quarantined: u64,
    /// `rows_in == rows_out + rows_quarantined`.
    pub invariant_holds: bool,
    pub quarantine_reasons: BTreeMap<String, u64>,
    /// Parts of the input that could not be read and were skipped (from its manifest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedPart>,
}

/// A shard, or a part of one, that the run skipped because it could not be read
/// (`source.on_unreadable: quarantine`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnreadableShard {
    pub input: PathBuf,
    /// The row group skipped, when only part of the shard was (its other rows flowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_group: Option<usize>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub pipeline: String,
    pub pipeline_file: PathBuf,
    pub pipeline_hash: String,
    pub out_dir: PathBuf,
    /// Where this report is written.
    pub report: PathBuf,
    pub wall_s: f64,
    pub rows_in: u64,
    pub rows_out: u64,
    pub rows_quarantined: u64,
    pub invariant_holds: bool,
    pub shards_processed: usize,
    pub shards_skipped: usize,
    /// Stopped by SIGINT or SIGTERM (exit 130): `shards_processed` and the row counts
    /// cover the shards finished and kept before the stop; the others were discarded
    /// and a rerun processes them.
    #[serde(default)]
    pub cancelled: bool,
    /// Shards with fewer rows than a stage's group (`uncertainty.group_size`): their
    /// rows are weighed among fewer captions than the group size (docs/method.md).
    #[serde(default)]
    pub shards_below_group_size: usize,
    /// Shards that could not be read and were skipped; the command exits with code 3
    /// when there are any. Their rows are in no count above.
    pub unreadable: Vec<UnreadableShard>,
    /// Rows per second over the shards processed now.
    pub rows_per_s: f64,
    pub cpu_seconds: Option<f64>,
    /// CPU seconds / wall seconds (2.0 = both cores of this machine busy).
    pub cpu_utilisation: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    /// Requests to object stores (present when the run read or wrote `s3://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::storage::StorageStats>,
    pub peak_rows_in_flight: u64,
    pub peak_bytes_in_flight: u64,
    pub bottleneck: Option<String>,
    pub steps: Vec<StepReport>,
    pub quarantine_reasons: BTreeMap<String, u64>,
    pub shards: Vec<ShardReport>,
    /// Input-queue fill over time: (seconds, fill per queue in step order).
    pub queue_samples: Vec<(f64, Vec<f64>)>,
}

fn shard_report(stem: &str, input: &Path, status: ShardStatus, m: &Manifest) -> ShardReport {
    ShardReport {
        stem: stem.to_string(),
        input: input.to_path_buf(),
        status,
        rows_in: m.rows_in,
        rows_out: m.rows_out,
        rows_quarantined: m.rows_quarantined,
        invariant_holds: m.rows_in == m.rows_out + m.rows_quarantined,
        quarantine_reasons: m.quarantine_reasons.clone(),
        skipped: m.skipped.clone(),
    }
}

/// Run `plan` to completion. On error or cancellation, shards already finished keep
/// their outputs and manifests; the others leave nothing under a final name.
pub fn execute(mut plan: Plan, mut options: RunOptions) -> Result<RunReport> {
    let feed = options.feed.take();
    // A driver's list names the part and holds only its shards.
    let filter_part = options.settings.part.filter(|_| plan.listed_part.is_none());
    options.settings.part = options.settings.part.or(plan.listed_part);
    let settings = &options.settings;
    let folder = OutputFolder::new(&plan.out_dir, plan.source.storage.clone())?;
    folder.prepare()?;
    // Held until the run returns: a second writer is refused before it can touch
    // this run's temporary files.
    let _lock = sink::lock::lock_folder(&folder, settings.part)?;
    let cpu_start = runtime::metrics::process_cpu_seconds();

    let resume = decide_resume(&plan, &folder, settings.force, filter_part)?;
    let skipped = resume.done.len();
    tracing::info!(
        "{} shard(s) to process, {skipped} already done",
        resume.todo.len()
    );
    let feed_order = feed_order(&plan, &resume);
    let mut sink = parquet_sink(&plan, folder.clone(), resume.fingerprints);
    let group_rows = group_rows(&plan);
    let topology = Topology {
        source: Box::new(plan.source.clone()),
        shards: resume.todo,
        stages: std::mem::take(&mut plan.stages),
        queue_depth: plan.pipeline.spec.runtime.queue_depth,
        min_tail_rows: group_rows,
        feed: feed.as_ref().map(|f| f.shared().clone()),
    };
    let stats = drive(topology, &mut sink, feed, feed_order, &options)?;
    let ran = Ran {
        group_rows,
        shards: shard_reports(&plan, resume.done, sink.take_finished()),
        skipped,
        stats,
        cpu_start,
    };
    let report = write_report(&plan, &folder, &options.settings, ran)?;
    folder.finish();
    if report.cancelled {
        // The report says what was finished; the exit code says the run stopped.
        tracing::warn!(
            "stopped: {} shard(s) finished and kept; report at {}",
            report.shards_processed,
            report.report.display()
        );
        return Err(Error::Cancelled);
    }
    Ok(report)
}

/// The largest group of rows a stage works on (0: none): a shard's last batch gets at
/// least that many rows.
fn group_rows(plan: &Plan) -> usize {
    plan.pipeline
        .spec
        .stages
        .iter()
        .filter_map(|s| s.kind.config().batch_multiple())
        .max()
        .unwrap_or(0)
}

/// Run the topology into the sink, through the one-pass trainer's feed when there is
/// one.
fn drive(
    topology: Topology,
    sink: &mut sink::ParquetSink,
    feed: Option<runtime::feed::FeedSender>,
    feed_order: Vec<FeedShard>,
    options: &RunOptions,
) -> Result<runtime::RunStats> {
    let every = Duration::from_millis(250);
    let progress = options.on_progress.as_deref();
    let cancel = options.cancel.clone();
    match feed {
        Some(feed) => {
            let mut feeding = FeedingSink::new(sink, feed, feed_order);
            runtime::run(topology, &mut feeding, cancel, every, progress)
        }
        None => runtime::run(topology, sink, cancel, every, progress),
    }
}

/// Every shard of the run in index order: those done before (from their manifests)
/// and those this run committed.
fn shard_reports(
    plan: &Plan,
    mut reports: Vec<(usize, ShardReport)>,
    committed: Vec<(usize, Manifest)>,
) -> Vec<ShardReport> {
    for (index, manifest) in committed {
        if let Some(shard) = plan.source.shards.get(index) {
            let report = shard_report(&shard.stem, &shard.path, ShardStatus::Done, &manifest);
            reports.push((index, report));
        }
    }
    reports.sort_by_key(|(i, _)| *i);
    reports.into_iter().map(|(_, r)| r).collect()
}

/// Build the run's report and write it: to `--report`, else beside the outputs.
fn write_report(
    plan: &Plan,
    folder: &OutputFolder,
    settings: &RunSettings,
    ran: Ran,
) -> Result<RunReport> {
    let name = report_name(settings.part);
    let report_path = match &settings.report_path {
        Some(path) => path.clone(),
        None => folder.display(&name),
    };
    let report = build_report(
        &plan.pipeline,
        &plan.pipeline_hash,
        &plan.source,
        &plan.out_dir,
        report_path,
        ran,
    );
    let text =
        serde_json::to_string_pretty(&report).map_err(|e| Error::output(&report.report, e))?;
    match &settings.report_path {
        Some(path) => std::fs::write(path, text).map_err(|e| Error::io(path, e))?,
        None => folder.put_small(&name, text.as_bytes())?,
    }
    Ok(report)
}

/// Every shard of this run in the feed's order: those done before are read back by
/// the consumer, the others come live.
fn feed_order(plan: &Plan, resume: &Resume) -> Vec<FeedShard> {
    let done = resume.done.iter().filter_map(|(index, _)| {
        plan.source.shards.get(*index).map(|s| FeedShard::Written {
            shard: *index,
            stem: s.stem.clone(),
        })
    });
    let todo = resume.todo.iter().map(|&shard| FeedShard::Live { shard });
    done.chain(todo).collect()
}

/// What resume decided: shards already done (with their reports), shards to process,
/// and the fingerprints their manifests will record.
struct Resume {
    done: Vec<(usize, ShardReport)>,
    todo: Vec<usize>,
    fingerprints: std::collections::HashMap<usize, Fingerprint>,
}

/// For each shard of this run (`part`: I of N, shards with index % N == I), skip it if
/// its manifest matches, else clear what an earlier run left of it and schedule it.
fn decide_resume(
    plan: &Plan,
    folder: &OutputFolder,
    force: bool,
    part: Option<(usize, usize)>,
) -> Result<Resume> {
    let mut resume = Resume {
        done: Vec::new(),
        todo: Vec::new(),
        fingerprints: Default::default(),
    };
    let mine: Vec<&crate::source::ShardPlan> = plan
        .source
        .shards
        .iter()
        .filter(|s| part.is_none_or(|(part, count)| s.index_in_job % count == part))
        .collect();
    let stems: Vec<&str> = mine.iter().map(|s| s.stem.as_str()).collect();
    // A run over the whole plan lists the output once; a part asks for its own files.
    let whole = mine.len() == plan.source.shards.len() && plan.listed_part.is_none();
    let folder = &folder.view(&stems, whole)?;
    for shard in mine {
        let manifest = Manifest::read_from(folder, &shard.stem);
        let may_skip = manifest
            .as_ref()
            .is_some_and(|m| !force && m.input_fingerprint.still_matches(&shard.fingerprint));
        let fingerprint = match plan.pipeline.spec.resume.verify {
            ResumeVerify::Quick => shard.fingerprint.clone(),
            // Verifying a finished shard takes reading it whole; a shard to process is
            // hashed by the read that processes it (`source::hashes_in_memory`).
            ResumeVerify::Full if may_skip || !crate::source::hashes_in_memory(shard) => {
                plan.source.full_fingerprint(shard)?
            }
            ResumeVerify::Full => shard.fingerprint.clone(),
        };
        match manifest {
            Some(m) if !force && m.matches(folder, &plan.pipeline_hash, &fingerprint) => {
                resume.done.push((
                    shard.index,
                    shard_report(&shard.stem, &shard.path, ShardStatus::Skipped, &m),
                ));
            }
            _ => {
                // Whatever a previous run left for this shard is stale now.
                folder.clean_up_after(&shard.stem);
                folder.remove(&crate::columns::manifest_name(&shard.stem));
                resume.todo.push(shard.index);
                resume.fingerprints.insert(shard.index, fingerprint);
            }
        }
    }
    Ok(resume)
}

/// The sink of `plan`'s shards, each manifest to record `fingerprints` where given.
fn parquet_sink(
    plan: &Plan,
    folder: OutputFolder,
    mut fingerprints: std::collections::HashMap<usize, Fingerprint>,
) -> ParquetSink {
    let targets = plan
        .source
        .shards
        .iter()
        .map(|s| sink::ShardTarget {
            stem: s.stem.clone(),
            input: s.path.clone(),
            fingerprint: fingerprints
                .remove(&s.index)
                .unwrap_or_else(|| s.fingerprint.clone()),
            quarantine_schema: s.quarantine_schema(),
            image_column: s.mapping.image_bytes_column().map(str::to_string),
            source_columns: s
                .mapping
                .columns
                .iter()
                .map(|(logical, physical)| (logical.to_string(), physical.clone()))
                .collect(),
        })
        .collect();
    ParquetSink::new(
        &plan.pipeline.spec.sink,
        folder,
        plan.sink_schema.clone(),
        plan.pipeline_hash.clone(),
        targets,
    )
}

/// What a run did, for its report.
struct Ran {
    /// The largest group of rows a stage works on (0: none).
    group_rows: usize,
    /// Every shard of the run, done now or skipped, in index order.
    shards: Vec<ShardReport>,
    skipped: usize,
    stats: runtime::RunStats,
    cpu_start: Option<f64>,
}

fn build_report(
    pipeline: &crate::spec::LoadedPipeline,
    pipeline_hash: &str,
    source: &crate::source::SourcePlan,
    out_dir: &Path,
    report: PathBuf,
    ran: Ran,
) -> RunReport {
    let shards = ran.shards;
    let mut totals = ShardCounts::default();
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for s in &shards {
        totals.rows_in += s.rows_in;
        totals.rows_out += s.rows_out;
        totals.rows_quarantined += s.rows_quarantined;
        for (k, v) in &s.quarantine_reasons {
            *reasons.entry(k.clone()).or_default() += v;
        }
    }
    let snap = ran.stats.snapshot;
    let processed_rows: u64 = ran.stats.shards.iter().map(|(_, c)| c.rows_in).sum();
    let cpu_seconds = match (ran.cpu_start, runtime::metrics::process_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let unreadable = unreadable_inputs(source, &ran.stats.unreadable, &shards);
    RunReport {
        pipeline: pipeline.name(),
        pipeline_file: pipeline.file.clone(),
        pipeline_hash: pipeline_hash.to_string(),
        out_dir: out_dir.to_path_buf(),
        report,
        wall_s: snap.elapsed_s,
        rows_in: totals.rows_in,
        rows_out: totals.rows_out,
        rows_quarantined: totals.rows_quarantined,
        invariant_holds: shards.iter().all(|s| s.invariant_holds),
        // Committed by this run: a stopped run's unfinished shards are not counted.
        shards_processed: shards
            .iter()
            .filter(|s| s.status == ShardStatus::Done)
            .count(),
        cancelled: ran.stats.cancelled,
        shards_skipped: ran.skipped,
        shards_below_group_size: shards
            .iter()
            .filter(|s| (s.rows_in as usize) < ran.group_rows)
            .count(),
        unreadable,
        rows_per_s: processed_rows as f64 / snap.elapsed_s.max(1e-9),
        cpu_utilisation: cpu_seconds.map(|c| c / snap.elapsed_s.max(1e-9)),
        cpu_seconds,
        peak_rss_bytes: runtime::metrics::peak_rss_bytes(),
        storage: Some(source.storage.stats()).filter(|s| s.requests > 0),
        peak_rows_in_flight: snap.peak_rows_in_flight,
        peak_bytes_in_flight: snap.peak_bytes_in_flight,
        bottleneck: snap.bottleneck.clone(),
        steps: snap.steps,
        quarantine_reasons: reasons,
        shards,
        queue_samples: ran.stats.queue_samples,
    }
}

/// Inputs the run could not read: those found unreadable at planning, those skipped
/// while read, and the parts of finished shards (now or earlier) that were skipped.
fn unreadable_inputs(
    source: &crate::source::SourcePlan,
    skipped_while_read: &[runtime::Unreadable],
    shards: &[ShardReport],
) -> Vec<UnreadableShard> {
    let mut unreadable: Vec<UnreadableShard> = source
        .unreadable
        .iter()
        .map(|(input, reason)| UnreadableShard {
            input: input.clone(),
            row_group: None,
            reason: reason.clone(),
        })
        .collect();
    for (index, reason) in skipped_while_read {
        if let Some(shard) = source.shards.get(*index) {
            unreadable.push(UnreadableShard {
                input: shard.path.clone(),
                row_group: None,
                reason: reason.clone(),
            });
        }
    }
    // Shards done but not whole: the outputs lack rows.
    for shard in shards {
        for part in &shard.skipped {
            unreadable.push(UnreadableShard {
                input: shard.input.clone(),
                row_group: part.row_group,
                reason: part.reason.clone(),
            });
        }
    }
    unreadable
}

impl std::fmt::Display for RunReport {
    /// The run as a terminal shows it at the end: shards, invariant, reasons, steps.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self;
        writeln!(
            f,
            "{}: {} shard(s) processed, {} skipped (already done)",
            r.pipeline, r.shards_processed, r.shards_skipped
        )?;
        writeln!(
            f,
            "{:<28} {:>10} {:>10} {:>12}  rows_in = rows_out + rows_quarantined",
            "shard", "rows in", "rows out", "quarantined"
        )?;
        for s in &r.shards {
            writeln!(
                f,
                "{:<28} {:>10} {:>10} {:>12}  {} ({})",
                s.stem,
                s.rows_in,
                s.rows_out,
                s.rows_quarantined,
                if s.invariant_holds { "holds" } else { "BROKEN" },
                s.status
            )?;
        }
        writeln!(
            f,
            "total: {} in, {} out, {} quarantined; invariant {}",
            r.rows_in,
            r.rows_out,
            r.rows_quarantined,
            if r.invariant_holds { "holds" } else { "BROKEN" }
        )?;
        if !r.unreadable.is_empty() {
            writeln!(
                f,
                "UNREADABLE: {} shard(s) skipped, their rows are in no output:",
                r.unreadable.len()
            )?;
            for u in &r.unreadable {
                writeln!(f, "  {}: {}", u.input.display(), u.reason)?;
            }
        }
        if !r.quarantine_reasons.is_empty() {
            writeln!(f, "quarantine reasons:")?;
            for (reason, n) in &r.quarantine_reasons {
                writeln!(f, "  {n:>8}  {reason}")?;
            }
        }
        writeln!(f, "steps:")?;
        for s in &r.steps {
            writeln!(
                f,
                "  {:<16} {:>9} rows  {:>9.0} rows/s  busy {:>5.1}%  blocked {:>5.1}%  starved {:>5.1}%",
                s.name,
                s.rows_out,
                s.rows_per_s,
                s.busy_fraction * 100.0,
                s.blocked_fraction * 100.0,
                s.starved_fraction * 100.0
            )?;
        }
        writeln!(
            f,
            "wall {:.2}s, {:.0} rows/s, peak RSS {}, bottleneck {}",
            r.wall_s,
            r.rows_per_s,
            r.peak_rss_bytes
                .map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
                .unwrap_or_else(|| "n/a".into()),
            r.bottleneck.as_deref().unwrap_or("-")
        )?;
        writeln!(f, "report: {}", r.report.display())?;
        Ok(())
    }
}
