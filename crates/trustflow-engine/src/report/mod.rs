//! `trustflow report OUT_DIR`: what a run decided, as one self-contained HTML page
//! (inline styles, script and thumbnails; no network) plus a JSON summary.
//!
//! The page answers what a data engineer asks before training on an enriched corpus:
//! did every row come out somewhere (the invariant per shard), what went to quarantine
//! and why (with samples), which captions the engine distrusted (weight distributions,
//! per pseudo-label class, right/wrong split and AUROC when labels exist, galleries of
//! the lowest and highest weights and of generated captions), where the time went
//! (per-stage busy/blocked/starved shares) and how training went (loss terms and
//! accuracy per epoch).
//!
//! Reading is bounded (see [`sample`]): counts come from manifests, figures from at
//! most `max_rows` rows, images only for the rows shown, each through the engine's
//! decoder and its limits. Every text on the page is escaped, and the page's
//! Content-Security-Policy lets only its own script run (by hash), so a caption
//! holding markup shows as text.

mod html;
mod sample;
mod thumb;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::models::image::ImageSettings;
use crate::run::RunReport;
use crate::stats::auroc;

pub use sample::Card;
pub use thumb::Thumbnail;

/// What to read and where to write.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ReportOptions {
    /// Where the HTML page goes (default: OUT_DIR/report.html).
    #[cfg_attr(feature = "cli", arg(long))]
    pub html: Option<PathBuf>,
    /// Rows in each gallery (lowest and highest weight, generated captions).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReportOptions::default().gallery))]
    pub gallery: usize,
    /// Sample rows shown per quarantine reason.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReportOptions::default().per_reason))]
    pub per_reason: usize,
    /// Most output rows read for the trust figures and galleries (whole row groups
    /// spread over the folder), and most quarantine rows read for samples.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReportOptions::default().max_rows))]
    pub max_rows: u64,
    /// A folder of training runs (searched for `metrics.jsonl`); OUT_DIR is searched
    /// too.
    #[cfg_attr(feature = "cli", arg(long))]
    pub runs: Option<PathBuf>,
    /// Longest side of a thumbnail, in pixels.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = ReportOptions::default().thumbnail_px))]
    pub thumbnail_px: u32,
    /// A title for the page (default: the pipeline's name).
    #[cfg_attr(feature = "cli", arg(long))]
    pub title: Option<String>,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            html: None,
            gallery: 12,
            per_reason: 4,
            max_rows: 100_000,
            runs: None,
            thumbnail_px: 112,
            title: None,
        }
    }
}

/// Classes shown one by one in the per-class table; the rest are summed.
const MAX_CLASSES_SHOWN: usize = 40;
/// Shards listed one by one; the rest are summed.
const MAX_SHARDS_SHOWN: usize = 200;
/// Reasons shown with samples.
const MAX_REASONS_SAMPLED: usize = 30;
/// Bins of every histogram.
const BINS: usize = 20;
/// How deep the search for `metrics.jsonl` goes below a folder.
const RUNS_DEPTH: usize = 5;

/// The whole report: what the page shows, and (without pictures) the JSON summary.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub title: String,
    pub out_dir: PathBuf,
    pub html: PathBuf,
    pub trustflow_version: String,
    /// `_report.json` and the `_report.part-I-of-N.json` of `--part` runs.
    pub runs: Vec<RunFile>,
    pub totals: Totals,
    pub shards: Vec<ShardLine>,
    /// Shards past `MAX_SHARDS_SHOWN`, summed into `totals` but not listed.
    pub shards_not_listed: usize,
    /// Data files without a manifest (an interrupted or foreign run).
    pub unfinished: Vec<String>,
    /// Manifests that cannot be read, with the parse error (their shards are not
    /// finished).
    pub corrupt_manifests: Vec<crate::inspect::CorruptManifest>,
    pub quarantine: Vec<ReasonLine>,
    pub trust: Option<Trust>,
    pub galleries: Galleries,
    pub training: Vec<TrainingRun>,
    pub budget: Budget,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunFile {
    pub file: String,
    /// Shown on the page; left out of the JSON summary, which would only repeat it.
    #[serde(skip)]
    pub report: Option<RunReport>,
    /// Why the file could not be read, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub shards: usize,
    pub rows_in: u64,
    pub rows_out: u64,
    pub rows_quarantined: u64,
    /// `rows_in == rows_out + rows_quarantined` for every shard.
    pub invariant_holds: bool,
    pub shards_breaking_invariant: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShardLine {
    pub stem: String,
    pub input: PathBuf,
    pub rows_in: u64,
    pub rows_out: u64,
    pub rows_quarantined: u64,
    pub invariant_holds: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReasonLine {
    /// `stage: reason` with row specifics elided (as in manifests).
    pub reason: String,
    pub rows: u64,
    pub samples: Vec<Card>,
}

/// Counts of values in `bins` equal bins over `[lo, hi]`.
#[derive(Debug, Clone, Serialize)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    pub counts: Vec<u64>,
    pub rows: u64,
    pub mean: Option<f64>,
}

impl Histogram {
    fn new(lo: f64, hi: f64, values: impl Iterator<Item = f64>) -> Histogram {
        let mut counts = vec![0u64; BINS];
        let (mut rows, mut sum) = (0u64, 0.0);
        let width = (hi - lo).max(f64::MIN_POSITIVE);
        for v in values.filter(|v| v.is_finite()) {
            let bin = (((v - lo) / width) * BINS as f64).floor();
            counts[(bin.max(0.0) as usize).min(BINS - 1)] += 1;
            rows += 1;
            sum += v;
        }
        Histogram {
            lo,
            hi,
            counts,
            rows,
            mean: (rows > 0).then(|| sum / rows as f64),
        }
    }
}

/// Weight figures over the rows read.
#[derive(Debug, Clone, Serialize)]
pub struct Trust {
    /// Rows read that carry a weight.
    pub rows: u64,
    pub weight: Histogram,
    pub similarity: Option<Histogram>,
    pub classes: Vec<ClassTrust>,
    /// Classes past `MAX_CLASSES_SHOWN` (the least frequent), not listed.
    pub classes_not_listed: usize,
    /// Present when the outputs have a `label` column.
    pub labelled: Option<Labelled>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassTrust {
    pub class: i64,
    pub name: Option<String>,
    pub rows: u64,
    pub weight: Histogram,
    /// Share of the class's labelled rows whose label equals the pseudo-label.
    pub accuracy: Option<f64>,
}

/// Rows whose label is known: is the pseudo-label right, and does the weight say so?
#[derive(Debug, Clone, Serialize)]
pub struct Labelled {
    pub rows: u64,
    pub right: u64,
    pub wrong: u64,
    pub accuracy: Option<f64>,
    /// AUROC of the weight for telling right pseudo-labels from wrong ones.
    pub auroc: Option<f64>,
    pub weight_right: Histogram,
    pub weight_wrong: Histogram,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Galleries {
    pub lowest_weight: Vec<Card>,
    pub highest_weight: Vec<Card>,
    pub generated_captions: Vec<Card>,
    /// Rows as read, when the outputs carry no weight.
    pub sample: Vec<Card>,
}

/// One training run found beside the outputs.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingRun {
    pub name: String,
    pub metrics: PathBuf,
    pub epochs: Vec<EpochLine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochLine {
    pub epoch: u64,
    /// Loss terms by name (`total`, `src`, `tgt`, `self_train`, `ctr`), those present.
    pub loss: BTreeMap<String, f64>,
    pub target_accuracy: Option<f64>,
    pub pseudo_label_accuracy: Option<f64>,
    pub weight_auroc: Option<f64>,
}

/// What the report read, so its cost is visible.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Budget {
    pub max_rows: u64,
    pub output_rows_total: u64,
    pub output_rows_read: u64,
    pub row_groups_total: usize,
    pub row_groups_read: usize,
    pub quarantine_rows_read: u64,
    pub thumbnails: usize,
    pub thumbnails_failed: usize,
    pub seconds: f64,
}

impl Budget {
    /// Every output row was read, so galleries and figures are exact.
    pub fn complete(&self) -> bool {
        self.output_rows_read == self.output_rows_total
    }
}

/// Read `out_dir` and build the report (nothing written yet; see [`write`]).
pub fn build(out_dir: &Path, options: &ReportOptions) -> Result<Report> {
    let started = Instant::now();
    if crate::storage::is_remote(out_dir) {
        return Err(Error::input(
            out_dir,
            "report reads a local output folder; copy the prefix down first \
             (e.g. `aws s3 sync`), then run `trustflow report` on the copy",
        ));
    }
    if !out_dir.is_dir() {
        return Err(Error::input(
            out_dir,
            "is not a folder; give the output folder of a run (its `sink.path`)",
        ));
    }
    let folder = crate::inspect::list(out_dir)?;
    let runs = folder
        .reports
        .iter()
        .map(|name| read_run_file(out_dir, name))
        .collect::<Vec<_>>();

    let mut totals = Totals {
        invariant_holds: true,
        ..Totals::default()
    };
    let mut shards = Vec::new();
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut outputs = Vec::new();
    let mut quarantines = Vec::new();
    for (stem, manifest) in &folder.finished {
        let holds = manifest.rows_in == manifest.rows_out + manifest.rows_quarantined;
        totals.shards += 1;
        totals.rows_in += manifest.rows_in;
        totals.rows_out += manifest.rows_out;
        totals.rows_quarantined += manifest.rows_quarantined;
        totals.invariant_holds &= holds;
        totals.shards_breaking_invariant += usize::from(!holds);
        for (reason, n) in &manifest.quarantine_reasons {
            *reasons.entry(reason.clone()).or_default() += n;
        }
        if shards.len() < MAX_SHARDS_SHOWN {
            shards.push(ShardLine {
                stem: stem.clone(),
                input: manifest.input.clone(),
                rows_in: manifest.rows_in,
                rows_out: manifest.rows_out,
                rows_quarantined: manifest.rows_quarantined,
                invariant_holds: holds,
            });
        }
        outputs.push(sample::ShardFile::open(
            &out_dir.join(&manifest.output.file),
        )?);
        if manifest.rows_quarantined > 0 {
            quarantines.push(
                sample::ShardFile::open(&out_dir.join(&manifest.quarantine.file))?
                    .with_names(manifest.source_columns.clone()),
            );
        }
    }

    let read = sample::sample_outputs(&outputs, options.max_rows, options.gallery)?;
    let mut reason_list: Vec<(String, u64)> = reasons.into_iter().collect();
    reason_list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let sampled: BTreeSet<String> = reason_list
        .iter()
        .take(MAX_REASONS_SAMPLED)
        .map(|r| r.0.clone())
        .collect();
    let mut q =
        sample::sample_quarantine(&quarantines, &sampled, options.max_rows, options.per_reason)?;
    let mut quarantine: Vec<ReasonLine> = reason_list
        .into_iter()
        .map(|(reason, rows)| ReasonLine {
            samples: q.samples.remove(&reason).unwrap_or_default(),
            reason,
            rows,
        })
        .collect();

    let trust = trust_figures(&read);
    let mut galleries = Galleries {
        lowest_weight: read.lowest,
        highest_weight: read.highest,
        generated_captions: read.generated,
        sample: read.sample,
    };
    // Pictures last, only for the rows shown.
    let settings = ImageSettings::default();
    let mut shown: Vec<&mut Card> = galleries
        .lowest_weight
        .iter_mut()
        .chain(galleries.highest_weight.iter_mut())
        .chain(galleries.generated_captions.iter_mut())
        .chain(galleries.sample.iter_mut())
        .collect();
    let mut thumbnails =
        sample::attach_thumbnails(&outputs, &mut shown, options.thumbnail_px, &settings)?;
    let mut failed = shown.iter().filter(|c| c.no_thumbnail.is_some()).count();
    let mut quarantined: Vec<&mut Card> = quarantine
        .iter_mut()
        .flat_map(|r| r.samples.iter_mut())
        .collect();
    thumbnails += sample::attach_thumbnails(
        &quarantines,
        &mut quarantined,
        options.thumbnail_px,
        &settings,
    )?;
    failed += quarantined
        .iter()
        .filter(|c| c.no_thumbnail.is_some())
        .count();

    let mut run_folders = vec![out_dir.to_path_buf()];
    run_folders.extend(options.runs.clone());
    let training = find_training_runs(&run_folders);

    let title = options.title.clone().unwrap_or_else(|| {
        runs.iter()
            .find_map(|r| r.report.as_ref().map(|r| r.pipeline.clone()))
            .unwrap_or_else(|| out_dir.display().to_string())
    });
    Ok(Report {
        title,
        out_dir: out_dir.to_path_buf(),
        html: options
            .html
            .clone()
            .unwrap_or_else(|| out_dir.join("report.html")),
        trustflow_version: env!("CARGO_PKG_VERSION").to_string(),
        runs,
        shards_not_listed: totals.shards - shards.len(),
        totals,
        shards,
        unfinished: folder.unfinished,
        corrupt_manifests: folder.corrupt,
        quarantine,
        trust,
        galleries,
        training,
        budget: Budget {
            max_rows: options.max_rows,
            output_rows_total: read.rows_total,
            output_rows_read: read.rows_read,
            row_groups_total: read.row_groups_total,
            row_groups_read: read.row_groups_read,
            quarantine_rows_read: q.rows_read,
            thumbnails,
            thumbnails_failed: failed,
            seconds: started.elapsed().as_secs_f64(),
        },
    })
}

/// Write the page whole: to a temporary file beside it, then renamed over it, so a
/// reader never sees half a page.
pub fn write(report: &Report) -> Result<u64> {
    let page = html::render(report);
    let path = &report.html;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::input(path, "the HTML path names no file"))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = std::fs::write(&tmp, page.as_bytes()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(page.len() as u64)
}

fn read_run_file(out_dir: &Path, name: &str) -> RunFile {
    let path = out_dir.join(name);
    let parsed = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice::<RunReport>(&bytes).map_err(|e| e.to_string()));
    match parsed {
        Ok(report) => RunFile {
            file: name.to_string(),
            report: Some(report),
            error: None,
        },
        Err(e) => RunFile {
            file: name.to_string(),
            report: None,
            error: Some(e),
        },
    }
}

/// Weights, similarities, classes and the right/wrong split over the rows read.
fn trust_figures(read: &sample::OutputSample) -> Option<Trust> {
    if !read.has_weight {
        return None;
    }
    let weighted: Vec<&sample::TrustRow> =
        read.rows.iter().filter(|r| r.weight.is_some()).collect();
    let weight = |r: &&sample::TrustRow| r.weight.map(f64::from);
    let (lo, hi) = range(weighted.iter().filter_map(weight), (0.0, 1.0));
    let hist = |rows: &mut dyn Iterator<Item = &&sample::TrustRow>| {
        Histogram::new(lo, hi, rows.filter_map(weight))
    };
    let similarity = read.has_similarity.then(|| {
        let sims = || read.rows.iter().filter_map(|r| r.similarity.map(f64::from));
        let (slo, shi) = range(sims(), (-1.0, 1.0));
        Histogram::new(slo, shi, sims())
    });

    let mut by_class: BTreeMap<i64, Vec<&sample::TrustRow>> = BTreeMap::new();
    for r in &weighted {
        if let Some(k) = r.pseudo_label {
            by_class.entry(k).or_default().push(r);
        }
    }
    let mut classes: Vec<ClassTrust> = by_class
        .iter()
        .map(|(&class, rows)| {
            let labelled: Vec<bool> = rows
                .iter()
                .filter_map(|r| r.label.map(|l| l == class))
                .collect();
            ClassTrust {
                class,
                name: read.class_names.get(&class).cloned(),
                rows: rows.len() as u64,
                weight: hist(&mut rows.iter()),
                accuracy: share(labelled.iter().filter(|r| **r).count(), labelled.len()),
            }
        })
        .collect();
    classes.sort_by(|a, b| b.rows.cmp(&a.rows).then(a.class.cmp(&b.class)));
    let classes_not_listed = classes.len().saturating_sub(MAX_CLASSES_SHOWN);
    classes.truncate(MAX_CLASSES_SHOWN);
    classes.sort_by_key(|c| c.class);

    let labelled = read.has_label.then(|| {
        let known: Vec<(&&sample::TrustRow, bool)> = weighted
            .iter()
            .filter_map(|r| Some((r, r.label? == r.pseudo_label?)))
            .collect();
        let right = known.iter().filter(|k| k.1).count();
        let scores: Vec<f64> = known.iter().filter_map(|k| weight(k.0)).collect();
        let positives: Vec<bool> = known.iter().map(|k| k.1).collect();
        Labelled {
            rows: known.len() as u64,
            right: right as u64,
            wrong: (known.len() - right) as u64,
            accuracy: share(right, known.len()),
            auroc: auroc(&scores, &positives),
            weight_right: hist(&mut known.iter().filter(|k| k.1).map(|k| k.0)),
            weight_wrong: hist(&mut known.iter().filter(|k| !k.1).map(|k| k.0)),
        }
    });
    Some(Trust {
        rows: weighted.len() as u64,
        weight: hist(&mut weighted.iter()),
        similarity,
        classes,
        classes_not_listed,
        labelled,
    })
}

fn share(part: usize, whole: usize) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// `usual` when every value lies inside it (weights in [0, 1], cosines in [-1, 1]),
/// else the values' own range, so odd data is still drawn whole.
fn range(values: impl Iterator<Item = f64>, usual: (f64, f64)) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi || (lo >= usual.0 && hi <= usual.1) {
        usual
    } else if lo == hi {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

/// Training runs under `folders`: each folder holding a `metrics.jsonl` (the trainer's
/// per-epoch lines) is one run, named by its path below the folder searched.
fn find_training_runs(folders: &[PathBuf]) -> Vec<TrainingRun> {
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    for root in folders {
        let mut stack = vec![(root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let metrics = dir.join("metrics.jsonl");
            if metrics.is_file() && seen.insert(metrics.clone()) {
                let name = dir
                    .strip_prefix(root)
                    .ok()
                    .map(|p| p.display().to_string())
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| dir.display().to_string());
                found.push(TrainingRun {
                    name,
                    epochs: read_epochs(&metrics),
                    metrics,
                });
            }
            if depth < RUNS_DEPTH
                && let Ok(entries) = std::fs::read_dir(&dir)
            {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push((e.path(), depth + 1));
                    }
                }
            }
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Per-epoch lines of a `metrics.jsonl`; lines that are not epoch records are skipped
/// (the file is the trainer's, read as plain JSON so the engine needs no trainer).
fn read_epochs(path: &Path) -> Vec<EpochLine> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|v| {
            let loss = v
                .get("loss")?
                .as_object()?
                .iter()
                .filter_map(|(k, x)| Some((k.clone(), x.as_f64()?)))
                .collect();
            Some(EpochLine {
                epoch: v.get("epoch")?.as_u64()?,
                loss,
                target_accuracy: v.pointer("/target_eval/accuracy").and_then(|a| a.as_f64()),
                pseudo_label_accuracy: v
                    .pointer("/pseudo_labels/accuracy")
                    .and_then(|a| a.as_f64()),
                weight_auroc: v
                    .pointer("/pseudo_labels/weights/auroc")
                    .and_then(|a| a.as_f64()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_the_ends_inside() {
        let h = Histogram::new(0.0, 1.0, [0.0, 0.04, 0.05, 0.5, 1.0, f64::NAN].into_iter());
        assert_eq!(h.rows, 5);
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[10], 1);
        assert_eq!(h.counts[19], 1, "1.0 falls in the last bin");
        assert_eq!(h.counts.iter().sum::<u64>(), 5);
    }

    #[test]
    fn range_keeps_the_usual_scale_unless_values_leave_it() {
        assert_eq!(range([0.2, 0.9].into_iter(), (0.0, 1.0)), (0.0, 1.0));
        assert_eq!(range([-2.0, 3.0].into_iter(), (0.0, 1.0)), (-2.0, 3.0));
        assert_eq!(range(std::iter::empty(), (0.0, 1.0)), (0.0, 1.0));
    }

    #[test]
    fn epochs_are_read_from_trainer_lines_and_other_lines_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = dir.path().join("runs/a/seed0");
        std::fs::create_dir_all(&run).expect("mkdir");
        std::fs::write(
            run.join("metrics.jsonl"),
            concat!(
                r#"{"epoch":1,"loss":{"total":2.5,"src":1.0,"ctr":null},"target_eval":{"accuracy":0.5}}"#,
                "\nnot json\n",
                r#"{"epoch":2,"loss":{"total":1.5},"pseudo_labels":{"accuracy":0.8,"weights":{"auroc":0.7}}}"#,
                "\n"
            ),
        )
        .expect("write");
        let runs = find_training_runs(&[dir.path().join("runs")]);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].name, "a/seed0");
        let e = &runs[0].epochs;
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].loss.get("total"), Some(&2.5));
        assert!(!e[0].loss.contains_key("ctr"), "null terms are absent");
        assert_eq!(e[0].target_accuracy, Some(0.5));
        assert_eq!(e[1].weight_auroc, Some(0.7));
    }
}
