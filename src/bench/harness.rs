//! `trustflow bench run SPEC`: the benchmark harness. A small YAML bench spec names a
//! pipeline, a corpus of Parquet shards (made by the corpus generator when absent) and
//! what to measure; [`run_spec`] runs it and writes `<out>/harness.json` and PNG plots.
//!
//! What one invocation measures, alternating within each repetition so that drifts of
//! the machine (other load, thermal state, page cache) hit every contender alike:
//!
//! 1. **the ceiling** (optional, `clip_score` pipelines): the stage's two ONNX models
//!    alone on pre-made inputs, with the pipeline's sessions, batch size, `workers`
//!    concurrent callers and `intra_op_threads`, warmed up and for at least
//!    `min_seconds` (`super::ceiling::models_rows_per_s`, as `trustflow bench
//!    ceiling` does), against the rows the stage scored end to end. The stage is built
//!    for this and dropped before the engine runs, so its sessions do not count in the
//!    engine's memory.
//! 2. **the engine**, in this process: per step rows/s and busy / blocked / starved
//!    shares over time (sampled from the run's progress callback, about 4 times a
//!    second, as rates over a trailing [`RATE_WINDOW_S`] window: busy time is booked
//!    when a batch completes, so shorter windows would be lumpy), input-queue fill over
//!    time, resident memory over time (`VmRSS`), and the whole-run figures of
//!    [`RunReport`]. The peak RSS of each run is its own: the kernel's high-water mark
//!    is reset before the run (`/proc/self/clear_refs`, recorded as `peak_rss_reset`).
//! 3. **the Python baseline** (optional): `scripts/bench/python_baseline.py`, the same
//!    work written with pyarrow + Pillow + onnxruntime + numpy + tokenizers, with the
//!    same batch size, workers and intra-op threads, in a child process whose memory
//!    is sampled from `/proc/<pid>/status`. The report gives engine / baseline rows/s,
//!    and after the last repetition compares the two outputs row by row (by `id`).
//!    `baseline.decoders` runs it once per decoder in every repetition (`pillow`, the
//!    reference; `opencv`, as img2dataset decodes); the first is the report's
//!    `baseline`, the others its `peers`.
//!
//! Then **the scaling series** (optional): the same pipeline over generated corpora of
//! growing shard counts with the same rows per shard, reporting wall time, rows/s and
//! peak RSS per shard count. Peak RSS should stay flat (memory is bounded by queue
//! depth, batch size and row groups, not by corpus size). Each point runs in a child
//! process by default (`isolation: process`: the `trustflow` executable's `run
//! --quiet --force`, reading its `_report.json`), so that every peak RSS is that of a
//! fresh process, with no allocator state or model sessions left by earlier runs;
//! `isolation: in_process` runs them here (peak reset as above), for when no
//! executable is at hand.
//!
//! Timings from a debug build are meaningless; the report records the build profile.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bench::corpus::{self, GenLayout, GenOptions};
use crate::bench::decode_ceiling::{DecodeCeiling, DecodeCeilingSpec};
use crate::bench::plot::{self, Series};
use trustflow_engine::error::{Error, Result, SpecIssue, SpecIssues};
use trustflow_engine::plan::{self, Overrides, Plan};
use trustflow_engine::run::{ProgressFn, RunOptions, RunReport, RunSettings, execute};
use trustflow_engine::runtime::{RunSnapshot, StepReport, metrics};
use trustflow_engine::spec::Locations;
use trustflow_engine::stages::StageKind;
use trustflow_engine::stages::clip_score::{ClipScoreConfig, ClipScoreStage};

/// Trailing window of the rates and shares over time, in seconds.
pub const RATE_WINDOW_S: f64 = 1.0;

/// How often the memory of a baseline child process is sampled.
const CHILD_SAMPLE_EVERY: Duration = Duration::from_millis(250);

// ------------------------------------------------------------------------ the spec

fn one() -> usize {
    1
}
/// Serde's default for the `enabled` flags of bench spec sections.
pub(super) fn yes() -> bool {
    true
}
fn default_calls() -> usize {
    10
}

/// A bench spec file (see `benches/specs/*.yaml`). Relative paths are resolved against
/// the spec file's folder; `${VAR}` and `${VAR:-default}` are replaced from the
/// environment, as in pipeline files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchSpec {
    /// Name of the benchmark (default: the spec file's stem).
    #[serde(default)]
    pub name: Option<String>,
    /// The pipeline file to run. Its `source.paths` and `sink.path` are replaced by the
    /// corpus and a folder under the output folder.
    pub pipeline: String,
    /// The Parquet shards to run the pipeline over.
    pub corpus: CorpusSpec,
    /// Repetitions of (ceiling, engine, baseline). Default 1.
    #[serde(default = "one")]
    pub repetitions: usize,
    /// Run the engine once, unrecorded, before the repetitions (warms the page cache
    /// and the allocator). Default false.
    #[serde(default)]
    pub warmup: bool,
    /// The Python baseline; absent: not run.
    #[serde(default)]
    pub baseline: Option<BaselineSpec>,
    /// The model-only ceiling (`clip_score` pipelines); absent: not measured.
    #[serde(default)]
    pub ceiling: Option<CeilingSpec>,
    /// The decode ceiling (a `decode` or `clip_score` stage's per-image work alone, on
    /// images held in memory); absent: not measured.
    #[serde(default)]
    pub decode_ceiling: Option<DecodeCeilingSpec>,
    /// The scaling series; absent: not run.
    #[serde(default)]
    pub scaling: Option<ScalingSpec>,
}

/// Where the corpus is, and how to make it when it is not there.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusSpec {
    /// Folder of Parquet shards.
    pub path: String,
    /// Generator options (`trustflow bench gen`) used when `path` holds no corpus, or
    /// holds one the generator made with other options (its `_gen.json` says so).
    #[serde(default)]
    pub generate: Option<GenerateSpec>,
}

/// The corpus generator's options; unset ones keep `trustflow bench gen`'s defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateSpec {
    pub rows: usize,
    #[serde(default = "one")]
    pub shards: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub min_side: Option<u32>,
    #[serde(default)]
    pub max_side: Option<u32>,
    #[serde(default)]
    pub corrupt_rate: Option<f64>,
    #[serde(default)]
    pub missing_caption_rate: Option<f64>,
    #[serde(default)]
    pub png_share: Option<f64>,
    /// `bytes` (default), `hf`, `path` or `img2dataset`.
    #[serde(default)]
    pub layout: Option<String>,
}

/// How the Python baseline is parallelised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselinePool {
    /// A thread pool sharing one ONNX Runtime session per model (what a user writes
    /// first).
    #[default]
    Thread,
    /// A process pool, one pair of sessions per process.
    Process,
}

impl BaselinePool {
    fn name(self) -> &'static str {
        match self {
            Self::Thread => "thread",
            Self::Process => "process",
        }
    }
}

/// How the Python baseline decodes and resizes images (`--decoder`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineDecoder {
    /// Pillow, as transformers' `CLIPImageProcessor` does: the reference the engine
    /// matches byte for byte.
    #[default]
    Pillow,
    /// OpenCV (`cv2.imdecode`, `cv2.resize` with area interpolation when shrinking),
    /// as img2dataset does: faster, and not the reference's pixels.
    Opencv,
}

impl BaselineDecoder {
    fn name(self) -> &'static str {
        match self {
            Self::Pillow => "pillow",
            Self::Opencv => "opencv",
        }
    }
}

fn default_decoders() -> Vec<BaselineDecoder> {
    vec![BaselineDecoder::Pillow]
}

/// The Python baseline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineSpec {
    /// Default true; false keeps the section but skips the baseline.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `thread` (default) or `process`.
    #[serde(default)]
    pub pool: BaselinePool,
    /// Python interpreter (default: `$TRUSTFLOW_BASELINE_PYTHON`, else
    /// `~/.cache/trustflow/refvenv/bin/python`).
    #[serde(default)]
    pub python: Option<String>,
    /// The baseline script (default: `scripts/bench/python_baseline.py` of this
    /// repository).
    #[serde(default)]
    pub script: Option<String>,
    /// The peers to run, each in every repetition: `pillow` (default) and/or `opencv`.
    /// The first is the report's `baseline`; the others are its `peers`.
    #[serde(default = "default_decoders")]
    pub decoders: Vec<BaselineDecoder>,
}

/// The model-only ceiling of a `clip_score` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CeilingSpec {
    /// Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The `clip_score` stage to measure (default: the first).
    #[serde(default)]
    pub stage: Option<String>,
    /// Least model calls per caller per measurement. Default 10.
    #[serde(default = "default_calls")]
    pub calls: usize,
    /// Least seconds per measurement, after one warm-up call per caller. Default 10.
    #[serde(default = "default_ceiling_seconds")]
    pub min_seconds: f64,
}

fn default_ceiling_seconds() -> f64 {
    10.0
}

/// Where each scaling point runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// A fresh `trustflow run` process per point (clean peak RSS).
    #[default]
    Process,
    /// In this process, the peak RSS reset before each run.
    InProcess,
}

/// The scaling series: one generated corpus per shard count, each with
/// `rows_per_shard` rows per shard. Corpora use `corpus.generate`'s image sizes, rates
/// and layout (defaults without it) and are kept for later runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingSpec {
    /// Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Shard counts, e.g. `[4, 16, 64]`.
    pub shards: Vec<usize>,
    pub rows_per_shard: usize,
    /// Runs per shard count. Default 1.
    #[serde(default = "one")]
    pub repetitions: usize,
    #[serde(default)]
    pub isolation: Isolation,
    /// Generator seed (default: `corpus.generate.seed`, else 0).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Where the corpora go, one `shards-<N>x<rows_per_shard>` folder per point
    /// (default: the corpus path with `-scaling` appended).
    #[serde(default)]
    pub corpus_dir: Option<String>,
}

/// A spec with the file it came from.
#[derive(Debug, Clone)]
pub struct LoadedBenchSpec {
    pub file: PathBuf,
    pub spec: BenchSpec,
    pub locations: Locations,
}

impl LoadedBenchSpec {
    /// `path` as written in the spec, resolved against the spec file's folder.
    pub fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            return p.to_path_buf();
        }
        match self.file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }

    pub fn name(&self) -> String {
        self.spec.name.clone().unwrap_or_else(|| {
            self.file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "bench".into())
        })
    }

    fn issue(&self, field: &str, message: impl Into<String>) -> SpecIssue {
        self.locations.issue(&self.file, field, message)
    }
}

/// Read, parse and check a bench spec (everything that does not need the pipeline).
pub fn load_spec(path: &Path) -> Result<LoadedBenchSpec> {
    let text = trustflow_engine::spec::read_spec_text(path, "bench spec")?;
    let locations = Locations::index(&text);
    let options = serde_saphyr::options! { with_snippet: false, strict_booleans: true };
    let value: Value = serde_saphyr::from_str_with_options(&text, options).map_err(|e| {
        Error::Spec(SpecIssues(vec![SpecIssue::whole_file(
            path,
            format!("not valid YAML: {e}"),
        )]))
    })?;
    let spec: BenchSpec =
        trustflow_engine::fields::from_value_at(value, "").map_err(|(field, message)| {
            Error::Spec(SpecIssues(vec![locations.issue(path, &field, message)]))
        })?;
    let loaded = LoadedBenchSpec {
        file: path.to_path_buf(),
        spec,
        locations,
    };
    let issues = check_spec(&loaded);
    if issues.is_empty() {
        Ok(loaded)
    } else {
        Err(Error::Spec(SpecIssues(issues)))
    }
}

/// Checks the types cannot express.
fn check_spec(l: &LoadedBenchSpec) -> Vec<SpecIssue> {
    let s = &l.spec;
    let mut issues = Vec::new();
    if !(1..=1000).contains(&s.repetitions) {
        issues.push(l.issue(
            "repetitions",
            format!("expected 1 to 1000, found {}", s.repetitions),
        ));
    }
    if s.pipeline.trim().is_empty() {
        issues.push(l.issue("pipeline", "expected a pipeline file, found nothing"));
    }
    if s.corpus.path.trim().is_empty() {
        issues.push(l.issue("corpus.path", "expected a folder, found nothing"));
    }
    if let Some(g) = &s.corpus.generate
        && (g.rows == 0 || g.shards == 0 || g.shards > g.rows)
    {
        issues.push(l.issue(
            "corpus.generate",
            format!(
                "need rows >= 1 and 1 <= shards <= rows, found rows {} and shards {}",
                g.rows, g.shards
            ),
        ));
    }
    if let Some(g) = &s.corpus.generate
        && let Some(layout) = &g.layout
        && layout.parse::<GenLayout>().is_err()
    {
        issues.push(l.issue(
            "corpus.generate.layout",
            format!("unknown layout `{layout}`; expected bytes, hf, path or img2dataset"),
        ));
    }
    if let Some(c) = &s.ceiling
        && c.calls == 0
    {
        issues.push(l.issue("ceiling.calls", "must be at least 1"));
    }
    if let Some(c) = &s.ceiling
        && !(c.min_seconds.is_finite() && c.min_seconds >= 0.0)
    {
        issues.push(l.issue(
            "ceiling.min_seconds",
            format!("must be a number of seconds >= 0, got {}", c.min_seconds),
        ));
    }
    if let Some(sc) = &s.scaling {
        if sc.shards.is_empty() || sc.shards.contains(&0) {
            issues.push(l.issue(
                "scaling.shards",
                "expected a list of shard counts, each at least 1",
            ));
        }
        if sc.rows_per_shard == 0 {
            issues.push(l.issue("scaling.rows_per_shard", "must be at least 1"));
        }
        if sc.repetitions == 0 {
            issues.push(l.issue("scaling.repetitions", "must be at least 1"));
        }
    }
    issues
}

// ------------------------------------------------------------------------ options

/// A line of progress for the caller to show (the CLI prints them to stderr).
pub type MessageFn = Box<dyn Fn(&str) + Send + Sync>;

/// Everything [`run_spec_with`] takes besides the spec (also `trustflow bench run`'s
/// flags); `Default` is what [`run_spec`] uses.
#[derive(Default, clap::Args)]
pub struct HarnessOptions {
    /// The `trustflow` executable for the scaling series (default:
    /// `$TRUSTFLOW_EXE`, else this process's executable when it is `trustflow`;
    /// without one the series runs in process, as the report then says).
    #[arg(skip)]
    pub trustflow_exe: Option<PathBuf>,
    /// Python interpreter of the baseline, overriding the spec's (default
    /// $TRUSTFLOW_BASELINE_PYTHON or the reference venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Replaces the spec's `repetitions`.
    #[arg(long)]
    pub repetitions: Option<usize>,
    #[arg(long)]
    pub skip_baseline: bool,
    #[arg(long)]
    pub skip_ceiling: bool,
    #[arg(long)]
    pub skip_scaling: bool,
    /// Progress lines (one per measurement).
    #[arg(skip)]
    pub on_message: Option<MessageFn>,
}

impl HarnessOptions {
    fn say(&self, message: &str) {
        tracing::info!("{message}");
        if let Some(f) = &self.on_message {
            f(message);
        }
    }
}

/// The interpreter the baseline runs with: `$TRUSTFLOW_BASELINE_PYTHON`, else the
/// reference venv's (`$TRUSTFLOW_CACHE/refvenv`, default `~/.cache/trustflow/refvenv`).
pub fn default_baseline_python() -> PathBuf {
    if let Some(p) = std::env::var_os("TRUSTFLOW_BASELINE_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("TRUSTFLOW_CACHE")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/trustflow")))
        .unwrap_or_else(|| PathBuf::from(".cache/trustflow"));
    cache.join("refvenv/bin/python")
}

/// This repository's baseline script (found through the crate's source folder, which
/// is where `cargo` builds run from).
pub fn default_baseline_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/python_baseline.py")
}

/// `PYTHONPATH` for the baseline: `$TRUSTFLOW_PYLIBS` (pyarrow, from scripts/setup.sh)
/// before whatever is set already.
fn baseline_pythonpath() -> Option<std::ffi::OsString> {
    let parts: Vec<PathBuf> = [
        std::env::var_os("TRUSTFLOW_PYLIBS"),
        std::env::var_os("PYTHONPATH"),
    ]
    .into_iter()
    .flatten()
    .filter(|p| !p.is_empty())
    .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
    .collect();
    std::env::join_paths(parts).ok()
}

/// Whether `python` can run the baseline with `decoder` (imports numpy, PIL, pyarrow,
/// onnxruntime and tokenizers, and cv2 for OpenCV, with the baseline's `PYTHONPATH`);
/// the reason when it cannot.
pub fn check_baseline_python(
    python: &Path,
    decoder: BaselineDecoder,
) -> std::result::Result<(), String> {
    let mut imports =
        "import numpy, PIL, pyarrow, pyarrow.parquet, onnxruntime, tokenizers".to_string();
    if decoder == BaselineDecoder::Opencv {
        imports.push_str(", cv2");
    }
    let mut cmd = Command::new(python);
    cmd.args(["-c", &imports]);
    if let Some(pp) = baseline_pythonpath() {
        cmd.env("PYTHONPATH", pp);
    }
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{} cannot import the baseline's packages: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {}: {e}", python.display())),
    }
}

// ------------------------------------------------------------------------ the report

/// Mean, smallest and largest of one figure over repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub values: Vec<f64>,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    fn of(values: Vec<f64>) -> Self {
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
        Stats {
            values,
            mean,
            min: finite(min),
            max: finite(max),
        }
    }
}

/// Everything one invocation measured (`<out>/harness.json`).
#[derive(Debug, Clone, Serialize)]
pub struct HarnessReport {
    pub name: String,
    pub spec_file: PathBuf,
    pub spec: BenchSpec,
    pub pipeline_file: PathBuf,
    pub out_dir: PathBuf,
    pub machine: Machine,
    pub corpus: CorpusInfo,
    pub repetitions: usize,
    /// The pipeline's steps in order (`source`, stages, `sink`).
    pub steps: Vec<String>,
    pub engine: EngineSummary,
    pub baseline: Option<BaselineSummary>,
    /// The other peers of `baseline.decoders` (the same script with another decoder).
    pub peers: Vec<BaselineSummary>,
    pub ceiling: Option<CeilingSummary>,
    pub decode_ceiling: Option<DecodeCeilingSummary>,
    pub scaling: Option<ScalingSummary>,
    /// Plots written (PNG).
    pub plots: Vec<PathBuf>,
    /// Why a plot could not be drawn (the JSON is complete without it).
    pub plot_error: Option<String>,
    /// Wall seconds of the whole invocation (corpus generation included).
    pub total_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub os: &'static str,
    pub arch: &'static str,
    /// `release` or `debug` (debug timings are meaningless).
    pub build_profile: &'static str,
    pub trustflow_version: &'static str,
    /// The 1, 5 and 15-minute load averages when the harness started and when it
    /// finished (`/proc/loadavg`): well above `cores` means other work shared the
    /// machine and the timings are suspect.
    pub load_average_start: Option<[f64; 3]>,
    pub load_average_end: Option<[f64; 3]>,
}

/// The 1, 5 and 15-minute load averages (Linux).
fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

impl Machine {
    fn here() -> Self {
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
            build_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            trustflow_version: env!("CARGO_PKG_VERSION"),
            load_average_start: load_average(),
            load_average_end: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CorpusInfo {
    pub path: PathBuf,
    pub shards: usize,
    /// Whether this invocation generated it.
    pub generated: bool,
    pub generate_s: Option<f64>,
}

/// The engine's repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct EngineSummary {
    pub runs: Vec<EngineRun>,
    pub rows_per_s: Stats,
    pub wall_s: Stats,
    pub peak_rss_bytes: Option<u64>,
}

/// One engine run.
#[derive(Debug, Clone, Serialize)]
pub struct EngineRun {
    pub repetition: usize,
    /// Loading and planning the pipeline (models included), before `wall_s`.
    pub startup_s: f64,
    pub wall_s: f64,
    pub rows_in: u64,
    pub rows_out: u64,
    pub rows_quarantined: u64,
    pub invariant_holds: bool,
    pub rows_per_s: f64,
    pub cpu_seconds: Option<f64>,
    pub cpu_utilisation: Option<f64>,
    /// High-water mark of this process's RSS during the run (see `peak_rss_reset`).
    pub peak_rss_bytes: Option<u64>,
    /// Whether the high-water mark was reset before the run; if not, `peak_rss_bytes`
    /// covers the process's life so far.
    pub peak_rss_reset: bool,
    /// Largest RSS sampled during the run.
    pub sampled_peak_rss_bytes: Option<u64>,
    pub peak_rows_in_flight: u64,
    pub peak_bytes_in_flight: u64,
    pub bottleneck: Option<String>,
    /// Whole-run figures per step, in step order.
    pub steps: Vec<StepReport>,
    pub timeline: Timeline,
}

/// Figures over time of one engine run; every vector has one entry per entry of `t`
/// (seconds since the run started), rates and shares over the trailing
/// [`RATE_WINDOW_S`].
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    pub window_s: f64,
    pub t: Vec<f64>,
    pub rss_bytes: Vec<Option<u64>>,
    pub rows_in_flight: Vec<u64>,
    pub bytes_in_flight: Vec<u64>,
    pub steps: Vec<StepTimeline>,
    /// Input-queue fill (0..1) of every step but the source, sampled by the runtime
    /// every 100 ms; each `fill` has one entry per entry of `queue_t`.
    pub queue_t: Vec<f64>,
    pub queues: Vec<QueueTimeline>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepTimeline {
    pub name: String,
    pub workers: usize,
    /// Cumulative rows out.
    pub rows_out: Vec<u64>,
    pub rows_per_s: Vec<f64>,
    /// Shares of window x workers, each in [0, 1].
    pub busy: Vec<f64>,
    pub blocked: Vec<f64>,
    pub starved: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueTimeline {
    /// The step the queue feeds.
    pub step: String,
    pub fill: Vec<f64>,
}

/// The Python baseline's repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineSummary {
    pub python: PathBuf,
    pub script: PathBuf,
    pub mode: String,
    pub pool: BaselinePool,
    pub decoder: BaselineDecoder,
    pub runs: Vec<BaselineRun>,
    pub rows_per_s: Stats,
    /// Mean engine rows/s / mean baseline rows/s (> 1: the engine is faster).
    pub engine_over_baseline: f64,
    /// Per repetition, engine rows/s / baseline rows/s of the same repetition.
    pub ratio_per_repetition: Vec<f64>,
    /// The two outputs of the last repetition compared row by row.
    pub agreement: Option<Agreement>,
}

/// One baseline run, as the script reports it, plus what the harness saw.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineRun {
    pub repetition: usize,
    pub rows_in: u64,
    pub rows_out: u64,
    pub rows_quarantined: u64,
    /// From the first read to the last write (models loaded before).
    pub wall_s: f64,
    /// From the interpreter's start.
    pub total_s: f64,
    pub rows_per_s: f64,
    pub cpu_seconds: Option<f64>,
    pub cpu_utilisation: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    /// Largest pool process (process pool only).
    pub children_peak_rss_bytes: Option<u64>,
    /// Wall time of the child process as the harness timed it.
    pub process_wall_s: f64,
    /// RSS of the child process over time (seconds since it was started).
    pub rss_t: Vec<f64>,
    pub rss_bytes: Vec<u64>,
    /// The script's JSON line, as printed.
    pub raw: Value,
}

/// The engine's and the baseline's outputs compared by `id`.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    /// The value columns compared (`clip_similarity`, or `width` and `height`).
    pub columns: Vec<String>,
    pub rows_compared: usize,
    /// Output rows only one side has (the other quarantined them).
    pub only_engine: usize,
    pub only_baseline: usize,
    pub max_abs_diff: f64,
    /// Rows differing by more than `tolerance` in some column.
    pub rows_differing: usize,
    pub tolerance: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CeilingSummary {
    pub stage: String,
    pub batch_size: usize,
    pub workers: usize,
    pub intra_op_threads: usize,
    pub calls: usize,
    pub min_seconds: f64,
    /// Model-only rows/s per repetition.
    pub rows_per_s: Stats,
    /// Rows the stage scored per second of the engine's wall time, per repetition: the
    /// figure the ceiling bounds (the engine's rows/s also counts rows quarantined
    /// before they reach the models).
    pub end_to_end_scored_rows_per_s: Stats,
    /// Mean scored rows/s end to end / mean ceiling rows/s (1.0: the engine costs
    /// nothing beyond the models).
    pub end_to_end_over_ceiling: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeCeilingSummary {
    /// The stage whose per-image work was measured, and its workers (the threads).
    pub stage: String,
    pub workers: usize,
    /// Images held in memory and taken in turn.
    pub images: usize,
    /// Decode-only rows/s per repetition.
    pub rows_per_s: Stats,
    /// Rows the stage handled per second of the engine's wall time, per repetition.
    pub end_to_end_rows_per_s: Stats,
    /// Mean end to end / mean decode ceiling (1.0: the rest of the pipeline is free).
    pub end_to_end_over_decode_ceiling: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScalingSummary {
    pub isolation: Isolation,
    /// Why the isolation differs from the spec's, if it does.
    pub note: Option<String>,
    pub rows_per_shard: usize,
    pub points: Vec<ScalingPoint>,
    /// Largest / smallest peak RSS over the points (1.0 = perfectly flat).
    pub peak_rss_spread: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScalingPoint {
    pub shards: usize,
    pub rows: u64,
    pub corpus: PathBuf,
    pub runs: Vec<ScalingRun>,
    pub wall_s: Stats,
    pub rows_per_s: Stats,
    /// Largest over the runs.
    pub peak_rss_bytes: Option<u64>,
    /// Largest over the runs of each run's median RSS (child processes only).
    pub median_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScalingRun {
    pub wall_s: f64,
    pub rows_in: u64,
    pub rows_per_s: f64,
    pub peak_rss_bytes: Option<u64>,
    pub cpu_utilisation: Option<f64>,
    /// RSS over time, sampled every 250 ms (child processes only; empty in process):
    /// seconds since the start and `VmRSS`.
    pub rss_t: Vec<f64>,
    pub rss_bytes: Vec<u64>,
    /// The median of `rss_bytes`: the level of the plateau, where the peak is its
    /// highest spike.
    pub median_rss_bytes: Option<u64>,
}

impl HarnessReport {
    /// A few lines for a terminal: the headline figures of `harness.json`.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mib = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{} MiB", b >> 20));
        let mut s = String::new();
        let e = &self.engine;
        let _ = writeln!(
            s,
            "{} ({} build, {} cores): {} shard(s), {} repetition(s)",
            self.name,
            self.machine.build_profile,
            self.machine.cores,
            self.corpus.shards,
            self.repetitions
        );
        let _ = writeln!(
            s,
            "  engine:   {:.1} rows/s (min {:.1}, max {:.1}), wall {:.2} s, peak RSS {}",
            e.rows_per_s.mean,
            e.rows_per_s.min,
            e.rows_per_s.max,
            e.wall_s.mean,
            mib(e.peak_rss_bytes)
        );
        if let Some(run) = e.runs.last() {
            for st in &run.steps {
                let _ = writeln!(
                    s,
                    "    {:<14} x{:<2} {:>9.1} rows/s  busy {:>3.0}%  blocked {:>3.0}%  starved {:>3.0}%",
                    st.name,
                    st.workers,
                    st.rows_per_s,
                    st.busy_fraction * 100.0,
                    st.blocked_fraction * 100.0,
                    st.starved_fraction * 100.0
                );
            }
        }
        for b in self.baseline.iter().chain(&self.peers) {
            let peak = b.runs.iter().filter_map(|r| r.peak_rss_bytes).max();
            let _ = writeln!(
                s,
                "  python ({}): {:.1} rows/s ({} pool), peak RSS {}; engine / python = {:.2}",
                b.decoder.name(),
                b.rows_per_s.mean,
                b.pool.name(),
                mib(peak),
                b.engine_over_baseline
            );
            if let Some(a) = &b.agreement {
                let _ = writeln!(
                    s,
                    "    outputs: {} rows compared, {} differ (max |diff| {:.2e}), {} only in the \
                     engine's, {} only in python's",
                    a.rows_compared,
                    a.rows_differing,
                    a.max_abs_diff,
                    a.only_engine,
                    a.only_baseline
                );
            }
        }
        if let Some(c) = &self.ceiling {
            let _ = writeln!(
                s,
                "  ceiling:  {:.1} rows/s (models alone); end to end / ceiling = {:.2}",
                c.rows_per_s.mean, c.end_to_end_over_ceiling
            );
        }
        if let Some(d) = &self.decode_ceiling {
            let _ = writeln!(
                s,
                "  decode ceiling: {:.1} rows/s ({} alone, {} thread(s), {} images); end to \
                 end / decode ceiling = {:.2}",
                d.rows_per_s.mean, d.stage, d.workers, d.images, d.end_to_end_over_decode_ceiling
            );
        }
        if let Some(sc) = &self.scaling {
            let _ = writeln!(
                s,
                "  scaling ({} rows per shard, {}):",
                sc.rows_per_shard,
                match sc.isolation {
                    Isolation::Process => "a process per point",
                    Isolation::InProcess => "in process",
                }
            );
            for p in &sc.points {
                let _ = writeln!(
                    s,
                    "    {:>4} shards {:>7} rows  {:>8.2} s  {:>9.1} rows/s  peak RSS {}  median RSS {}",
                    p.shards,
                    p.rows,
                    p.wall_s.mean,
                    p.rows_per_s.mean,
                    mib(p.peak_rss_bytes),
                    mib(p.median_rss_bytes)
                );
            }
        }
        if let Some(err) = &self.plot_error {
            let _ = writeln!(s, "  plots not drawn: {err}");
        }
        s
    }
}

// ------------------------------------------------------------------------ running

/// [`run_spec_with`] with default options.
pub fn run_spec(spec_file: &Path, out_dir: &Path) -> Result<HarnessReport> {
    run_spec_with(spec_file, out_dir, &HarnessOptions::default())
}

/// Run the bench spec `spec_file`, writing outputs, `harness.json` and the plots under
/// `out_dir`. A plot that cannot be drawn is reported in `plot_error`, not as an error.
pub fn run_spec_with(
    spec_file: &Path,
    out_dir: &Path,
    options: &HarnessOptions,
) -> Result<HarnessReport> {
    let started = Instant::now();
    let machine = Machine::here();
    let loaded = load_spec(spec_file)?;
    let spec = &loaded.spec;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let setup = Setup::prepare(&loaded, out_dir, options)?;
    let repetitions = options.repetitions.unwrap_or(spec.repetitions).max(1);
    let runs = setup.repeat(repetitions, options)?;
    let engine_rps = Stats::of(runs.engine.iter().map(|r| r.rows_per_s).collect());
    let mut summaries = setup.baseline_summaries(&runs, &engine_rps);
    let baseline = summaries.next();
    let peers: Vec<BaselineSummary> = summaries.collect();
    let ceiling = setup.ceiling_summary(&runs);
    let decode_ceiling = setup.decode_ceiling_summary(&runs);
    let scaling = match &spec.scaling {
        Some(s) if s.enabled && !options.skip_scaling => Some(run_scaling(
            &loaded,
            s,
            &setup.pipeline_file,
            &setup.corpus_dir,
            out_dir,
            options,
        )?),
        _ => None,
    };
    let engine = EngineSummary {
        rows_per_s: engine_rps,
        wall_s: Stats::of(runs.engine.iter().map(|r| r.wall_s).collect()),
        peak_rss_bytes: runs.engine.iter().filter_map(|r| r.peak_rss_bytes).max(),
        runs: runs.engine,
    };
    let report = HarnessReport {
        name: loaded.name(),
        spec_file: spec_file.to_path_buf(),
        spec: spec.clone(),
        pipeline_file: setup.pipeline_file,
        out_dir: out_dir.to_path_buf(),
        machine: Machine {
            load_average_end: load_average(),
            ..machine
        },
        corpus: setup.corpus,
        repetitions,
        steps: setup.step_names,
        engine,
        baseline,
        peers,
        ceiling,
        decode_ceiling,
        scaling,
        plots: Vec::new(),
        plot_error: None,
        total_s: started.elapsed().as_secs_f64(),
    };
    write_with_plots(report, out_dir)
}

/// Write `harness.json`, draw the plots, and write it again with them: the figures are
/// safe on disk before any plot is tried, and a plot failure is recorded, never fatal.
fn write_with_plots(mut report: HarnessReport, out_dir: &Path) -> Result<HarnessReport> {
    let json_path = out_dir.join("harness.json");
    write_json(&json_path, &report)?;
    let (plots, errors) = draw_plots(&report, out_dir);
    report.plots = plots;
    if !errors.is_empty() {
        let message = errors.join("; ");
        tracing::warn!("harness plot: {message}");
        report.plot_error = Some(message);
    }
    write_json(&json_path, &report)?;
    Ok(report)
}

/// What a harness run measures, ready before the first repetition: the corpus, the
/// engine's pipeline and output folder, the peers and the ceiling.
struct Setup {
    pipeline_file: PathBuf,
    corpus_dir: PathBuf,
    corpus: CorpusInfo,
    inputs: Vec<String>,
    engine_out: PathBuf,
    out_dir: PathBuf,
    step_names: Vec<String>,
    baselines: Vec<BaselineSetup>,
    ceiling: Option<CeilingSetup>,
    decode_ceiling: Option<DecodeCeiling>,
    warmup: bool,
}

/// Every repetition's figures.
struct Runs {
    engine: Vec<EngineRun>,
    /// One list per peer, in the spec's order.
    baselines: Vec<Vec<BaselineRun>>,
    ceiling: Vec<f64>,
    decode_ceiling: Vec<f64>,
}

impl Setup {
    fn prepare(loaded: &LoadedBenchSpec, out_dir: &Path, options: &HarnessOptions) -> Result<Self> {
        let spec = &loaded.spec;
        // The corpus first: planning needs its shards.
        let corpus_dir = loaded.resolve(&spec.corpus.path);
        let gen_options = spec
            .corpus
            .generate
            .as_ref()
            .map(|g| gen_options(g, &corpus_dir))
            .transpose()?;
        let corpus = ensure_corpus(&corpus_dir, gen_options.as_ref(), options)?;
        let inputs = vec![corpus_dir.to_string_lossy().into_owned()];
        let pipeline_file = loaded.resolve(&spec.pipeline);
        let engine_out = out_dir.join("engine");
        let probe = plan::load_and_plan(
            &pipeline_file,
            &Overrides {
                inputs: Some(inputs.clone()),
                out_dir: Some(engine_out.clone()),
                ..Overrides::default()
            },
        )?;
        let baselines = match &spec.baseline {
            Some(b) if b.enabled && !options.skip_baseline => b
                .decoders
                .iter()
                .map(|d| prepare_baseline(loaded, b, *d, &probe, options))
                .collect::<Result<Vec<_>>>()?,
            _ => Vec::new(),
        };
        let ceiling = match &spec.ceiling {
            Some(c) if c.enabled && !options.skip_ceiling => {
                Some(prepare_ceiling(loaded, c, &probe)?)
            }
            _ => None,
        };
        let decode_ceiling = match &spec.decode_ceiling {
            Some(d) if d.enabled && !options.skip_ceiling => {
                Some(DecodeCeiling::prepare(&probe, d)?)
            }
            _ => None,
        };
        Ok(Setup {
            decode_ceiling,
            step_names: step_names(&probe),
            pipeline_file,
            corpus_dir,
            corpus,
            inputs,
            engine_out,
            out_dir: out_dir.to_path_buf(),
            baselines,
            ceiling,
            warmup: spec.warmup,
        })
    }

    /// The output folder of peer `i` (the first keeps the name it always had).
    fn baseline_out(&self, i: usize) -> PathBuf {
        self.out_dir.join(match i {
            0 => "baseline".to_string(),
            _ => format!("baseline-{}", self.baselines[i].decoder.name()),
        })
    }

    /// The warm-up, then each repetition: the ceiling, the engine, every peer.
    fn repeat(&self, repetitions: usize, options: &HarnessOptions) -> Result<Runs> {
        if self.warmup {
            options.say("warm-up run of the engine");
            engine_run(&self.pipeline_file, &self.inputs, &self.engine_out, 0)?;
        }
        let mut runs = Runs {
            engine: Vec::new(),
            baselines: self.baselines.iter().map(|_| Vec::new()).collect(),
            ceiling: Vec::new(),
            decode_ceiling: Vec::new(),
        };
        for rep in 1..=repetitions {
            let say =
                |what: String| options.say(&format!("repetition {rep}/{repetitions}: {what}"));
            if let Some(c) = &self.ceiling {
                let v = ceiling_once(c)?;
                say(format!("ceiling {v:.1} rows/s"));
                runs.ceiling.push(v);
            }
            if let Some(d) = &self.decode_ceiling {
                let v = d.rows_per_s()?;
                say(format!("decode ceiling {v:.1} rows/s"));
                runs.decode_ceiling.push(v);
            }
            let run = engine_run(&self.pipeline_file, &self.inputs, &self.engine_out, rep)?;
            say(format!(
                "engine {:.1} rows/s ({} rows in {:.2} s)",
                run.rows_per_s, run.rows_in, run.wall_s
            ));
            runs.engine.push(run);
            for (i, b) in self.baselines.iter().enumerate() {
                let run = baseline_run(b, &self.corpus_dir, &self.baseline_out(i), rep)?;
                say(format!(
                    "python baseline ({}) {:.1} rows/s ({} rows in {:.2} s)",
                    b.decoder.name(),
                    run.rows_per_s,
                    run.rows_in,
                    run.wall_s
                ));
                runs.baselines[i].push(run);
            }
        }
        Ok(runs)
    }

    /// Each peer's figures beside the engine's, with the outputs compared.
    fn baseline_summaries<'a>(
        &'a self,
        runs: &'a Runs,
        engine_rps: &'a Stats,
    ) -> impl Iterator<Item = BaselineSummary> + 'a {
        self.baselines
            .iter()
            .zip(&runs.baselines)
            .enumerate()
            .map(move |(i, (b, peer_runs))| {
                let rps = Stats::of(peer_runs.iter().map(|r| r.rows_per_s).collect());
                let ratio_per_repetition = runs
                    .engine
                    .iter()
                    .zip(peer_runs)
                    .map(|(e, p)| ratio(e.rows_per_s, p.rows_per_s))
                    .collect();
                let agreement =
                    compare_outputs(&self.engine_out, &self.baseline_out(i), &b.value_columns)
                        .map_err(|e| {
                            tracing::warn!(
                                "cannot compare the engine's and the baseline's outputs: {e}"
                            )
                        })
                        .ok();
                BaselineSummary {
                    python: b.python.clone(),
                    script: b.script.clone(),
                    mode: b.mode.to_string(),
                    pool: b.pool,
                    decoder: b.decoder,
                    runs: peer_runs.clone(),
                    engine_over_baseline: ratio(engine_rps.mean, rps.mean),
                    rows_per_s: rps,
                    ratio_per_repetition,
                    agreement,
                }
            })
    }

    /// The decode ceiling's figures beside the rows/s the stage handled end to end.
    fn decode_ceiling_summary(&self, runs: &Runs) -> Option<DecodeCeilingSummary> {
        let d = self.decode_ceiling.as_ref()?;
        let rps = Stats::of(runs.decode_ceiling.clone());
        let end_to_end = Stats::of(
            runs.engine
                .iter()
                .map(|r| super::ceiling::stage_rows_in_per_s(&r.steps, &d.stage, r.wall_s))
                .collect(),
        );
        Some(DecodeCeilingSummary {
            stage: d.stage.clone(),
            workers: d.workers,
            images: d.images(),
            end_to_end_over_decode_ceiling: ratio(end_to_end.mean, rps.mean),
            end_to_end_rows_per_s: end_to_end,
            rows_per_s: rps,
        })
    }

    /// The ceiling's figures beside the engine's scored rows/s.
    fn ceiling_summary(&self, runs: &Runs) -> Option<CeilingSummary> {
        let c = self.ceiling.as_ref()?;
        let rps = Stats::of(runs.ceiling.clone());
        let scored = Stats::of(
            runs.engine
                .iter()
                .map(|r| super::ceiling::scored_rows_per_s(&r.steps, &c.stage_name, r.wall_s))
                .collect(),
        );
        Some(CeilingSummary {
            stage: c.stage_name.clone(),
            batch_size: c.batch_size,
            workers: c.workers,
            intra_op_threads: c.config.session.intra_op_threads,
            calls: c.effort.min_calls,
            min_seconds: c.effort.min_seconds,
            end_to_end_over_ceiling: ratio(scored.mean, rps.mean),
            end_to_end_scored_rows_per_s: scored,
            rows_per_s: rps,
        })
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn write_json(path: &Path, report: &HarnessReport) -> Result<()> {
    let text = serde_json::to_string_pretty(report).map_err(|e| Error::output(path, e))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn step_names(plan: &Plan) -> Vec<String> {
    let mut names = vec!["source".to_string()];
    names.extend(plan.stages.iter().map(|s| s.stage.name().to_string()));
    names.push("sink".into());
    names
}

// ------------------------------------------------------------------------ corpora

fn gen_options(g: &GenerateSpec, out: &Path) -> Result<GenOptions> {
    let mut o = GenOptions {
        rows: g.rows,
        shards: g.shards,
        out: out.to_path_buf(),
        seed: g.seed,
        ..GenOptions::default()
    };
    if let Some(v) = g.min_side {
        o.min_side = v;
    }
    if let Some(v) = g.max_side {
        o.max_side = v;
    }
    if let Some(v) = g.corrupt_rate {
        o.corrupt_rate = v;
    }
    if let Some(v) = g.missing_caption_rate {
        o.missing_caption_rate = v;
    }
    if let Some(v) = g.png_share {
        o.png_share = v;
    }
    if let Some(layout) = &g.layout {
        o.layout = layout.parse()?;
    }
    Ok(o)
}

/// Parquet shards directly in `dir` (quarantine shards excluded).
fn shard_files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                    name.is_some_and(|n| {
                        n.ends_with(".parquet")
                            && !n.ends_with(trustflow_engine::sink::QUARANTINE_SUFFIX)
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Whether `dir/_gen.json` records exactly `opts` (the output path aside) and every
/// shard it lists is there.
fn generated_with(dir: &Path, opts: &GenOptions) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("_gen.json")) else {
        return false;
    };
    let Ok(meta) = serde_json::from_str::<Value>(&text) else {
        return false;
    };
    let strip = |v: Option<Value>| {
        v.map(|mut v| {
            if let Some(map) = v.as_object_mut() {
                map.remove("out");
            }
            v
        })
    };
    let recorded = strip(meta.get("options").cloned());
    let wanted = strip(serde_json::to_value(opts).ok());
    let shards_present = meta
        .pointer("/summary/shards")
        .and_then(Value::as_array)
        .is_some_and(|s| {
            s.iter().all(|p| {
                p.as_str()
                    .and_then(|p| Path::new(p).file_name().map(|n| dir.join(n)))
                    .is_some_and(|p| p.is_file())
            })
        });
    recorded.is_some() && recorded == wanted && shards_present
}

/// Use the corpus in `dir`, generating it first when `generate` says how and the
/// folder lacks it (or holds one generated with other options).
fn ensure_corpus(
    dir: &Path,
    generate: Option<&GenOptions>,
    options: &HarnessOptions,
) -> Result<CorpusInfo> {
    let existing = shard_files(dir);
    let mut info = CorpusInfo {
        path: dir.to_path_buf(),
        shards: existing.len(),
        generated: false,
        generate_s: None,
    };
    match generate {
        None if existing.is_empty() => Err(Error::input(
            dir,
            "no Parquet shards here, and the bench spec has no `corpus.generate` to make them",
        )),
        None => Ok(info),
        Some(opts) if generated_with(dir, opts) => Ok(info),
        Some(_) if !existing.is_empty() && !dir.join("_gen.json").exists() => Err(Error::input(
            dir,
            "holds Parquet shards the generator did not make (no _gen.json); refusing to \
                 overwrite them: point corpus.path at another folder or drop corpus.generate",
        )),
        Some(opts) => {
            options.say(&format!(
                "generating {} rows in {} shard(s) into {}",
                opts.rows,
                opts.shards,
                dir.display()
            ));
            let summary = corpus::generate(opts)?;
            info.shards = summary.shards.len();
            info.generated = true;
            info.generate_s = Some(summary.seconds);
            Ok(info)
        }
    }
}

// ------------------------------------------------------------------------ engine

/// Resets the kernel's RSS high-water mark of this process (`VmHWM`), so that the next
/// [`metrics::peak_rss_bytes`] covers only what follows. Linux 4.0+; false elsewhere.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Cumulative figures of one step at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct StepPoint {
    rows_out: u64,
    busy_s: f64,
    blocked_s: f64,
    starved_s: f64,
}

#[derive(Debug, Clone)]
struct Sample {
    t: f64,
    rss: Option<u64>,
    rows_in_flight: u64,
    bytes_in_flight: u64,
    steps: Vec<StepPoint>,
}

fn step_points(steps: &[StepReport], elapsed: f64) -> Vec<StepPoint> {
    steps
        .iter()
        .map(|r| {
            let capacity = elapsed * r.workers.max(1) as f64;
            StepPoint {
                rows_out: r.rows_out,
                busy_s: r.busy_s,
                blocked_s: r.blocked_fraction * capacity,
                starved_s: r.starved_fraction * capacity,
            }
        })
        .collect()
}

impl Sample {
    fn of(s: &RunSnapshot) -> Self {
        Sample {
            t: s.elapsed_s,
            rss: metrics::rss_bytes(),
            rows_in_flight: s.rows_in_flight,
            bytes_in_flight: s.bytes_in_flight,
            steps: step_points(&s.steps, s.elapsed_s),
        }
    }
}

/// Rates over the trailing window from cumulative samples (the origin is t = 0 with
/// every counter at zero).
fn timeline(samples: &[Sample], report: &RunReport) -> Timeline {
    let names: Vec<(String, usize)> = report
        .steps
        .iter()
        .map(|s| (s.name.clone(), s.workers.max(1)))
        .collect();
    let origin = Sample {
        t: 0.0,
        rss: None,
        rows_in_flight: 0,
        bytes_in_flight: 0,
        steps: vec![StepPoint::default(); names.len()],
    };
    let mut steps: Vec<StepTimeline> = names
        .iter()
        .map(|(name, workers)| StepTimeline {
            name: name.clone(),
            workers: *workers,
            rows_out: Vec::new(),
            rows_per_s: Vec::new(),
            busy: Vec::new(),
            blocked: Vec::new(),
            starved: Vec::new(),
        })
        .collect();
    let mut t = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        // The latest earlier sample at least a window back, else the origin.
        let base = samples[..i]
            .iter()
            .rev()
            .find(|b| s.t - b.t >= RATE_WINDOW_S)
            .unwrap_or(&origin);
        let dt = (s.t - base.t).max(1e-9);
        t.push(s.t);
        for (k, st) in steps.iter_mut().enumerate() {
            let now = s.steps.get(k).copied().unwrap_or_default();
            let then = base.steps.get(k).copied().unwrap_or_default();
            let share = |a: f64, b: f64| ((a - b) / (dt * st.workers as f64)).clamp(0.0, 1.0);
            st.rows_out.push(now.rows_out);
            st.rows_per_s
                .push(now.rows_out.saturating_sub(then.rows_out) as f64 / dt);
            st.busy.push(share(now.busy_s, then.busy_s));
            st.blocked.push(share(now.blocked_s, then.blocked_s));
            st.starved.push(share(now.starved_s, then.starved_s));
        }
    }
    let queue_t = report.queue_samples.iter().map(|(t, _)| *t).collect();
    let queues = names
        .iter()
        .skip(1)
        .enumerate()
        .map(|(q, (name, _))| QueueTimeline {
            step: name.clone(),
            fill: report
                .queue_samples
                .iter()
                .map(|(_, fills)| fills.get(q).copied().unwrap_or(0.0))
                .collect(),
        })
        .collect();
    Timeline {
        window_s: RATE_WINDOW_S,
        t,
        rss_bytes: samples.iter().map(|s| s.rss).collect(),
        rows_in_flight: samples.iter().map(|s| s.rows_in_flight).collect(),
        bytes_in_flight: samples.iter().map(|s| s.bytes_in_flight).collect(),
        steps,
        queue_t,
        queues,
    }
}

/// One recorded run of the engine in this process.
fn engine_run(pipeline: &Path, inputs: &[String], out: &Path, rep: usize) -> Result<EngineRun> {
    let t0 = Instant::now();
    let plan = plan::load_and_plan(
        pipeline,
        &Overrides {
            inputs: Some(inputs.to_vec()),
            out_dir: Some(out.to_path_buf()),
            ..Overrides::default()
        },
    )?;
    let startup_s = t0.elapsed().as_secs_f64();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let sink = samples.clone();
    let on_progress: ProgressFn = Box::new(move |s: &RunSnapshot| {
        let sample = Sample::of(s);
        if let Ok(mut v) = sink.lock() {
            v.push(sample);
        }
    });
    let peak_rss_reset = reset_peak_rss();
    let report = execute(
        plan,
        RunOptions {
            settings: RunSettings {
                force: true,
                ..RunSettings::default()
            },
            on_progress: Some(on_progress),
            ..RunOptions::default()
        },
    )?;
    let mut samples = match samples.lock() {
        Ok(mut v) => std::mem::take(&mut *v),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    // The final figures close the series, so cumulative counts end at the totals.
    samples.push(Sample {
        t: report.wall_s,
        rss: metrics::rss_bytes(),
        rows_in_flight: 0,
        bytes_in_flight: 0,
        steps: step_points(&report.steps, report.wall_s),
    });
    samples.sort_by(|a, b| a.t.total_cmp(&b.t));
    let timeline = timeline(&samples, &report);
    Ok(EngineRun {
        repetition: rep,
        startup_s,
        wall_s: report.wall_s,
        rows_in: report.rows_in,
        rows_out: report.rows_out,
        rows_quarantined: report.rows_quarantined,
        invariant_holds: report.invariant_holds,
        rows_per_s: report.rows_per_s,
        cpu_seconds: report.cpu_seconds,
        cpu_utilisation: report.cpu_utilisation,
        peak_rss_bytes: report.peak_rss_bytes,
        peak_rss_reset,
        sampled_peak_rss_bytes: samples.iter().filter_map(|s| s.rss).max(),
        peak_rows_in_flight: report.peak_rows_in_flight,
        peak_bytes_in_flight: report.peak_bytes_in_flight,
        bottleneck: report.bottleneck.clone(),
        steps: report.steps.clone(),
        timeline,
    })
}

// ------------------------------------------------------------------------ ceiling

struct CeilingSetup {
    stage_name: String,
    config: ClipScoreConfig,
    workers: usize,
    batch_size: usize,
    effort: super::ceiling::Effort,
    captions: Vec<String>,
}

fn prepare_ceiling(l: &LoadedBenchSpec, c: &CeilingSpec, plan: &Plan) -> Result<CeilingSetup> {
    let spec = &plan.pipeline.spec;
    let found = spec.stages.iter().find_map(|s| match &s.kind {
        StageKind::ClipScore(config) => {
            let name = s.common.name.clone().unwrap_or_else(|| "clip_score".into());
            let wanted = c.stage.as_deref().is_none_or(|w| w == name);
            wanted.then(|| (name, s.common.workers.unwrap_or(1).max(1), config.clone()))
        }
        _ => None,
    });
    let Some((stage_name, workers, mut config)) = found else {
        let what = c
            .stage
            .as_ref()
            .map(|s| format!("a clip_score stage named `{s}`"))
            .unwrap_or_else(|| "a clip_score stage".into());
        return Err(Error::Spec(SpecIssues(vec![l.issue(
            "ceiling",
            format!(
                "the ceiling needs {what}, and {} has none",
                plan.pipeline.file.display()
            ),
        )])));
    };
    config.resolve_paths(plan.pipeline.base_dir());
    let batch_size = spec.runtime.batch_size.max(1);
    let captions = super::ceiling::sample_captions(plan, batch_size)?;
    Ok(CeilingSetup {
        stage_name,
        config,
        workers,
        batch_size,
        effort: super::ceiling::Effort {
            min_calls: c.calls,
            min_seconds: c.min_seconds,
        },
        captions,
    })
}

/// One ceiling measurement: `workers` callers share one stage's sessions, as the
/// pipeline's workers do. The stage is built here and dropped on return.
fn ceiling_once(c: &CeilingSetup) -> Result<f64> {
    let stage = ClipScoreStage::new(c.stage_name.clone(), c.config.clone())?;
    super::ceiling::models_rows_per_s(&stage, &c.captions, c.workers, c.effort)
}

// ------------------------------------------------------------------------ baseline

struct BaselineSetup {
    python: PathBuf,
    script: PathBuf,
    pool: BaselinePool,
    decoder: BaselineDecoder,
    mode: &'static str,
    /// Arguments besides --input and --out.
    args: Vec<String>,
    value_columns: Vec<String>,
}

fn prepare_baseline(
    l: &LoadedBenchSpec,
    b: &BaselineSpec,
    decoder: BaselineDecoder,
    plan: &Plan,
    options: &HarnessOptions,
) -> Result<BaselineSetup> {
    let spec = &plan.pipeline.spec;
    let unsupported = || {
        Error::Spec(SpecIssues(vec![l.issue(
            "baseline",
            format!(
                "the Python baseline does the work of a pipeline with one `clip_score` or one \
                 `decode` stage; {} has {}",
                plan.pipeline.file.display(),
                if spec.stages.is_empty() {
                    "none".to_string()
                } else {
                    spec.stages
                        .iter()
                        .map(|s| format!("`{}`", s.kind.type_name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        )]))
    };
    let [stage] = spec.stages.as_slice() else {
        return Err(unsupported());
    };
    let workers = stage.common.workers.unwrap_or(1).max(1);
    let compression = match spec.sink.compression {
        trustflow_engine::spec::Compression::Zstd => "zstd",
        trustflow_engine::spec::Compression::Snappy => "snappy",
        trustflow_engine::spec::Compression::None => "none",
    };
    let mut args: Vec<String> = vec![
        "--batch-size".into(),
        spec.runtime.batch_size.to_string(),
        "--workers".into(),
        workers.to_string(),
        "--pool".into(),
        b.pool.name().into(),
        "--compression".into(),
        compression.into(),
    ];
    let formats = |f: &[trustflow_engine::models::image::ImageFormatName]| {
        f.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(",")
    };
    let (mode, value_columns) = match &stage.kind {
        StageKind::Decode(c) => {
            args.extend([
                "--max-pixels".into(),
                c.image.max_pixels.to_string(),
                "--max-bytes".into(),
                c.image.max_bytes.to_string(),
                "--formats".into(),
                formats(&c.image.formats),
            ]);
            ("decode", vec!["width".to_string(), "height".to_string()])
        }
        StageKind::ClipScore(c) => {
            let mut c = c.clone();
            c.resolve_paths(plan.pipeline.base_dir());
            args.extend([
                "--intra-op-threads".into(),
                c.session.intra_op_threads.to_string(),
                "--max-pixels".into(),
                c.image.max_pixels.to_string(),
                "--max-bytes".into(),
                c.image.max_bytes.to_string(),
                "--formats".into(),
                formats(&c.image.formats),
                "--text-output".into(),
                c.text_output.clone(),
                "--caption-column".into(),
                c.caption_column
                    .clone()
                    .unwrap_or_else(|| trustflow_engine::columns::CAPTION.into()),
            ]);
            if c.emit_embeddings {
                args.push("--emit-embeddings".into());
            }
            for (flag, value) in [
                ("--model", &c.files.model),
                ("--vision-model", &c.files.vision_model),
                ("--text-model", &c.files.text_model),
                ("--tokenizer", &c.files.tokenizer),
                ("--config", &c.files.config),
                ("--preprocessor-config", &c.files.preprocessor_config),
            ] {
                if let Some(v) = value {
                    args.extend([flag.to_string(), v.clone()]);
                }
            }
            (
                "clip",
                vec![trustflow_engine::stages::clip_score::CLIP_SIMILARITY.to_string()],
            )
        }
        _ => return Err(unsupported()),
    };
    args.extend([
        "--mode".into(),
        mode.into(),
        "--decoder".into(),
        decoder.name().into(),
    ]);
    let python = options
        .python
        .clone()
        .or_else(|| b.python.as_ref().map(|p| l.resolve(p)))
        .unwrap_or_else(default_baseline_python);
    let script = b
        .script
        .as_ref()
        .map(|p| l.resolve(p))
        .unwrap_or_else(default_baseline_script);
    if !script.is_file() {
        return Err(Error::input(&script, "baseline script not found"));
    }
    check_baseline_python(&python, decoder).map_err(|m| {
        Error::Spec(SpecIssues(vec![l.issue(
            "baseline",
            format!(
                "{m} (set baseline.python or $TRUSTFLOW_BASELINE_PYTHON; \
                 scripts/fixtures/setup-venv.sh makes the reference venv, and $TRUSTFLOW_PYLIBS \
                 from scripts/setup.sh provides pyarrow)"
            ),
        )]))
    })?;
    Ok(BaselineSetup {
        python,
        script,
        pool: b.pool,
        decoder,
        mode,
        args,
        value_columns,
    })
}

/// RSS of another process (Linux `VmRSS` of `/proc/<pid>/status`).
fn process_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process run to its end, with its resident memory sampled while it ran.
struct SampledChild {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
    wall_s: f64,
    /// Seconds since the start, and `VmRSS` then, every [`CHILD_SAMPLE_EVERY`].
    rss_t: Vec<f64>,
    rss_bytes: Vec<u64>,
}

/// Run `cmd` (`what` names it in errors) with piped output, sampling its RSS.
fn run_sampled(cmd: &mut Command, program: &Path, what: &str) -> Result<SampledChild> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| Error::Program {
        program: program.to_path_buf(),
        message: format!("cannot start: {e}"),
    })?;
    // Pipes are drained on their own threads so a chatty child never blocks on them.
    let reader = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let pid = child.id();
    let (mut rss_t, mut rss_bytes) = (Vec::new(), Vec::new());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {
                if let Some(rss) = process_rss_bytes(pid) {
                    rss_t.push(started.elapsed().as_secs_f64());
                    rss_bytes.push(rss);
                }
                std::thread::sleep(CHILD_SAMPLE_EVERY);
            }
            Err(e) => {
                return Err(Error::Program {
                    program: program.to_path_buf(),
                    message: format!("waiting for {what}: {e}"),
                });
            }
        }
    };
    Ok(SampledChild {
        status,
        wall_s: started.elapsed().as_secs_f64(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        rss_t,
        rss_bytes,
    })
}

fn baseline_run(b: &BaselineSetup, corpus: &Path, out: &Path, rep: usize) -> Result<BaselineRun> {
    // Stale outputs of an earlier run would be compared as this one's.
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    let mut cmd = Command::new(&b.python);
    cmd.arg(&b.script)
        .args(&b.args)
        .arg("--input")
        .arg(corpus)
        .arg("--out")
        .arg(out);
    if let Some(pp) = baseline_pythonpath() {
        cmd.env("PYTHONPATH", pp);
    }
    let SampledChild {
        status,
        stdout,
        stderr,
        wall_s: process_wall_s,
        rss_t,
        rss_bytes,
    } = run_sampled(&mut cmd, &b.python, "the Python baseline")?;
    if !status.success() {
        return Err(Error::Program {
            program: b.python.clone(),
            message: format!(
                "the Python baseline failed ({status}): {}",
                tail(&stderr, 15)
            ),
        });
    }
    let raw: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(Value::is_object)
        .ok_or_else(|| Error::Program {
            program: b.python.clone(),
            message: format!(
                "the Python baseline printed no JSON line; stderr: {}",
                tail(&stderr, 15)
            ),
        })?;
    let u = |k: &str| raw.get(k).and_then(Value::as_u64);
    let f = |k: &str| raw.get(k).and_then(Value::as_f64);
    let wall_s = f("wall_s").unwrap_or(0.0);
    Ok(BaselineRun {
        repetition: rep,
        rows_in: u("rows_in").unwrap_or(0),
        rows_out: u("rows_out").unwrap_or(0),
        rows_quarantined: u("rows_quarantined").unwrap_or(0),
        wall_s,
        total_s: f("total_s").unwrap_or(process_wall_s),
        rows_per_s: f("rows_per_s").unwrap_or(0.0),
        cpu_seconds: f("cpu_seconds"),
        cpu_utilisation: f("cpu_utilisation"),
        peak_rss_bytes: u("peak_rss_bytes"),
        children_peak_rss_bytes: u("children_peak_rss_bytes"),
        process_wall_s,
        rss_t,
        rss_bytes,
        raw,
    })
}

/// `id` -> values of `columns` (as f64) over the output shards in `dir`.
fn read_values(dir: &Path, columns: &[String]) -> Result<HashMap<String, Vec<Option<f64>>>> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = HashMap::new();
    for path in shard_files(dir) {
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::input(&path, e.to_string()))?;
        let mut names = vec![trustflow_engine::columns::ID];
        names.extend(columns.iter().map(String::as_str));
        let mask = ProjectionMask::columns(builder.parquet_schema(), names.iter().copied());
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(|e| Error::input(&path, e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| Error::input(&path, e.to_string()))?;
            let ids = batch
                .column_by_name(trustflow_engine::columns::ID)
                .ok_or_else(|| Error::input(&path, "no `id` column"))?;
            let ids = arrow::compute::cast(ids, &DataType::Utf8)
                .map_err(|e| Error::input(&path, e.to_string()))?;
            let ids = ids.as_string::<i32>();
            let mut values = Vec::new();
            for c in columns {
                let col = batch
                    .column_by_name(c)
                    .ok_or_else(|| Error::input(&path, format!("no `{c}` column")))?;
                let col = arrow::compute::cast(col, &DataType::Float64)
                    .map_err(|e| Error::input(&path, e.to_string()))?;
                values.push(col);
            }
            for row in 0..batch.num_rows() {
                if ids.is_null(row) {
                    continue;
                }
                let v = values
                    .iter()
                    .map(|c| {
                        let c = c.as_primitive::<Float64Type>();
                        c.is_valid(row).then(|| c.value(row))
                    })
                    .collect();
                out.insert(ids.value(row).to_string(), v);
            }
        }
    }
    Ok(out)
}

/// Row-by-row comparison of the engine's and the baseline's outputs.
fn compare_outputs(engine: &Path, baseline: &Path, columns: &[String]) -> Result<Agreement> {
    let tolerance = 1e-4;
    let a = read_values(engine, columns)?;
    let b = read_values(baseline, columns)?;
    let mut agreement = Agreement {
        columns: columns.to_vec(),
        rows_compared: 0,
        only_engine: 0,
        only_baseline: b.keys().filter(|k| !a.contains_key(*k)).count(),
        max_abs_diff: 0.0,
        rows_differing: 0,
        tolerance,
    };
    for (id, va) in &a {
        let Some(vb) = b.get(id) else {
            agreement.only_engine += 1;
            continue;
        };
        agreement.rows_compared += 1;
        let mut worst: f64 = 0.0;
        for (x, y) in va.iter().zip(vb) {
            let d = match (x, y) {
                (Some(x), Some(y)) => (x - y).abs(),
                (None, None) => 0.0,
                _ => f64::INFINITY,
            };
            worst = worst.max(d);
        }
        if worst > tolerance {
            agreement.rows_differing += 1;
        }
        if worst.is_finite() {
            agreement.max_abs_diff = agreement.max_abs_diff.max(worst);
        }
    }
    Ok(agreement)
}

// ------------------------------------------------------------------------ scaling

/// The executable for isolated scaling runs, or why there is none.
fn trustflow_exe(options: &HarnessOptions) -> std::result::Result<PathBuf, String> {
    if let Some(p) = &options.trustflow_exe {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("TRUSTFLOW_EXE").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().map_err(|e| format!("cannot tell this executable: {e}"))?;
    if me.file_stem().is_some_and(|s| s == "trustflow") {
        Ok(me)
    } else {
        Err(format!(
            "this process ({}) is not the trustflow executable and neither \
             HarnessOptions::trustflow_exe nor $TRUSTFLOW_EXE names one",
            me.display()
        ))
    }
}

fn run_scaling(
    l: &LoadedBenchSpec,
    s: &ScalingSpec,
    pipeline: &Path,
    corpus_dir: &Path,
    out_dir: &Path,
    options: &HarnessOptions,
) -> Result<ScalingSummary> {
    let base_dir = match &s.corpus_dir {
        Some(d) => l.resolve(d),
        None => {
            let mut name = corpus_dir.as_os_str().to_os_string();
            name.push("-scaling");
            PathBuf::from(name)
        }
    };
    let (mut isolation, mut note) = (s.isolation, None);
    let exe = match (s.isolation, trustflow_exe(options)) {
        (Isolation::Process, Ok(exe)) => Some(exe),
        (Isolation::Process, Err(why)) => {
            isolation = Isolation::InProcess;
            note = Some(format!("ran in process: {why}"));
            tracing::warn!("scaling series: {why}; running it in this process");
            None
        }
        (Isolation::InProcess, _) => None,
    };
    let knobs = l.spec.corpus.generate.as_ref();
    let mut points = Vec::new();
    for &shards in &s.shards {
        let dir = base_dir.join(format!("shards-{shards}x{}", s.rows_per_shard));
        let mut opts = match knobs {
            Some(g) => gen_options(g, &dir)?,
            None => GenOptions {
                out: dir.clone(),
                ..GenOptions::default()
            },
        };
        opts.rows = shards * s.rows_per_shard;
        opts.shards = shards;
        opts.seed = s.seed.or(knobs.map(|g| g.seed)).unwrap_or(0);
        ensure_corpus(&dir, Some(&opts), options)?;
        let run_out = out_dir.join("scaling").join(format!("shards-{shards}"));
        let mut runs = Vec::new();
        for rep in 1..=s.repetitions.max(1) {
            let run = match &exe {
                Some(exe) => scaling_run_process(exe, pipeline, &dir, &run_out)?,
                None => scaling_run_in_process(pipeline, &dir, &run_out)?,
            };
            options.say(&format!(
                "scaling {shards} shard(s), run {rep}: {:.2} s, {:.1} rows/s, peak RSS {} MiB, \
                 median RSS {} MiB",
                run.wall_s,
                run.rows_per_s,
                run.peak_rss_bytes.map_or(0, |b| b >> 20),
                run.median_rss_bytes.map_or(0, |b| b >> 20)
            ));
            runs.push(run);
        }
        points.push(ScalingPoint {
            shards,
            rows: runs.first().map_or(0, |r| r.rows_in),
            corpus: dir,
            wall_s: Stats::of(runs.iter().map(|r| r.wall_s).collect()),
            rows_per_s: Stats::of(runs.iter().map(|r| r.rows_per_s).collect()),
            peak_rss_bytes: runs.iter().filter_map(|r| r.peak_rss_bytes).max(),
            median_rss_bytes: runs.iter().filter_map(|r| r.median_rss_bytes).max(),
            runs,
        });
    }
    let peaks: Vec<u64> = points.iter().filter_map(|p| p.peak_rss_bytes).collect();
    let peak_rss_spread = match (peaks.iter().max(), peaks.iter().min()) {
        (Some(&hi), Some(&lo)) if lo > 0 && peaks.len() == points.len() => {
            Some(hi as f64 / lo as f64)
        }
        _ => None,
    };
    Ok(ScalingSummary {
        isolation,
        note,
        rows_per_shard: s.rows_per_shard,
        points,
        peak_rss_spread,
    })
}

fn scaling_run_process(
    exe: &Path,
    pipeline: &Path,
    corpus: &Path,
    out: &Path,
) -> Result<ScalingRun> {
    let report_path = out.join("_report.json");
    let _ = std::fs::remove_file(&report_path);
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg(pipeline)
        .args(["--quiet", "--force", "--input"])
        .arg(corpus)
        .arg("--out")
        .arg(out)
        .arg("--report")
        .arg(&report_path)
        .stdin(Stdio::null());
    let child = run_sampled(&mut cmd, exe, "the scaling run")?;
    if !child.status.success() {
        return Err(Error::Program {
            program: exe.to_path_buf(),
            message: format!(
                "run {} failed ({}): {}",
                pipeline.display(),
                child.status,
                tail(&child.stderr, 15)
            ),
        });
    }
    let text = std::fs::read_to_string(&report_path).map_err(|e| Error::io(&report_path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(&report_path, format!("not a run report: {e}")))?;
    Ok(ScalingRun {
        wall_s: v.get("wall_s").and_then(Value::as_f64).unwrap_or(0.0),
        rows_in: v.get("rows_in").and_then(Value::as_u64).unwrap_or(0),
        rows_per_s: v.get("rows_per_s").and_then(Value::as_f64).unwrap_or(0.0),
        peak_rss_bytes: v.get("peak_rss_bytes").and_then(Value::as_u64),
        cpu_utilisation: v.get("cpu_utilisation").and_then(Value::as_f64),
        median_rss_bytes: median(&child.rss_bytes),
        rss_t: child.rss_t,
        rss_bytes: child.rss_bytes,
    })
}

/// The middle value (the upper one of an even count); `None` when empty.
fn median(values: &[u64]) -> Option<u64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied()
}

fn scaling_run_in_process(pipeline: &Path, corpus: &Path, out: &Path) -> Result<ScalingRun> {
    let plan = plan::load_and_plan(
        pipeline,
        &Overrides {
            inputs: Some(vec![corpus.to_string_lossy().into_owned()]),
            out_dir: Some(out.to_path_buf()),
            ..Overrides::default()
        },
    )?;
    reset_peak_rss();
    let report = execute(
        plan,
        RunOptions {
            settings: RunSettings {
                force: true,
                ..RunSettings::default()
            },
            ..RunOptions::default()
        },
    )?;
    Ok(ScalingRun {
        wall_s: report.wall_s,
        rows_in: report.rows_in,
        rows_per_s: report.rows_per_s,
        peak_rss_bytes: report.peak_rss_bytes,
        cpu_utilisation: report.cpu_utilisation,
        rss_t: Vec::new(),
        rss_bytes: Vec::new(),
        median_rss_bytes: None,
    })
}

// ------------------------------------------------------------------------ plots

const MIB: f64 = 1024.0 * 1024.0;

/// `harness.png` (the last engine run over time, with the baseline's memory) and,
/// with a scaling series, `harness-scaling.png`. Returns the plots written and the
/// errors of those that were not.
fn draw_plots(r: &HarnessReport, out_dir: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let (mut written, mut errors) = (Vec::new(), Vec::new());
    if let Some(run) = r.engine.runs.last() {
        let path = out_dir.join("harness.png");
        match plot::line_panels(&path, "seconds", &time_panels(r, run)) {
            Ok(()) => written.push(path),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    if let Some(s) = &r.scaling {
        let path = out_dir.join("harness-scaling.png");
        match plot::line_panels(&path, "shards", &scaling_panels(s)) {
            Ok(()) => written.push(path),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    (written, errors)
}

fn time_panels(r: &HarnessReport, run: &EngineRun) -> Vec<(String, String, Vec<Series>)> {
    let tl = &run.timeline;
    let over_time = |values: &[f64]| -> Vec<(f64, f64)> {
        tl.t.iter().copied().zip(values.iter().copied()).collect()
    };
    let mut panels = Vec::new();
    panels.push((
        format!(
            "{}: rows/s per step (engine, repetition {}, {:.0} s window)",
            r.name, run.repetition, tl.window_s
        ),
        "rows/s".to_string(),
        tl.steps
            .iter()
            .map(|s| (s.name.clone(), over_time(&s.rows_per_s)))
            .collect(),
    ));
    let mut memory: Vec<Series> = vec![(
        "engine (in process)".to_string(),
        tl.t.iter()
            .zip(&tl.rss_bytes)
            .filter_map(|(t, b)| b.map(|b| (*t, b as f64 / MIB)))
            .collect(),
    )];
    if let Some(b) = r.baseline.as_ref().and_then(|b| b.runs.last()) {
        memory.push((
            "python baseline (from its start)".to_string(),
            b.rss_t
                .iter()
                .zip(&b.rss_bytes)
                .map(|(t, v)| (*t, *v as f64 / MIB))
                .collect(),
        ));
    }
    panels.push((
        "resident memory (VmRSS)".to_string(),
        "MiB".to_string(),
        memory,
    ));
    panels.push((
        "input-queue fill".to_string(),
        "share of capacity".to_string(),
        tl.queues
            .iter()
            .map(|q| {
                (
                    q.step.clone(),
                    tl.queue_t
                        .iter()
                        .copied()
                        .zip(q.fill.iter().copied())
                        .collect(),
                )
            })
            .collect(),
    ));
    for s in &tl.steps {
        panels.push((
            format!("{} ({} worker(s)): share of time", s.name, s.workers),
            "share".to_string(),
            vec![
                ("busy".to_string(), over_time(&s.busy)),
                ("blocked (output full)".to_string(), over_time(&s.blocked)),
                ("starved (input empty)".to_string(), over_time(&s.starved)),
            ],
        ));
    }
    panels
}

fn scaling_panels(s: &ScalingSummary) -> Vec<(String, String, Vec<Series>)> {
    let series = |f: &dyn Fn(&ScalingPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        s.points
            .iter()
            .filter_map(|p| f(p).map(|v| (p.shards as f64, v)))
            .collect()
    };
    vec![
        (
            format!("wall time ({} rows per shard)", s.rows_per_shard),
            "seconds".to_string(),
            vec![("wall".to_string(), series(&|p| Some(p.wall_s.mean)))],
        ),
        (
            "throughput".to_string(),
            "rows/s".to_string(),
            vec![("rows/s".to_string(), series(&|p| Some(p.rows_per_s.mean)))],
        ),
        (
            "peak RSS (should stay flat)".to_string(),
            "MiB".to_string(),
            vec![(
                "peak RSS".to_string(),
                series(&|p| p.peak_rss_bytes.map(|b| b as f64 / MIB)),
            )],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(text: &str) -> Result<LoadedBenchSpec> {
        let dir = tempfile::tempdir().map_err(|e| Error::Internal(e.to_string()))?;
        let path = dir.path().join("bench.yaml");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        load_spec(&path)
    }

    #[test]
    fn spec_parses_with_defaults() {
        let l = loaded(
            "pipeline: p.yaml\ncorpus:\n  path: c\n  generate: {rows: 10, shards: 2}\n\
             baseline: {}\nscaling: {shards: [1, 2], rows_per_shard: 5}\n",
        )
        .unwrap();
        let s = &l.spec;
        assert_eq!(s.repetitions, 1);
        assert!(!s.warmup);
        let b = s.baseline.as_ref().unwrap();
        assert!(b.enabled);
        assert_eq!(b.pool, BaselinePool::Thread);
        let sc = s.scaling.as_ref().unwrap();
        assert_eq!(sc.isolation, Isolation::Process);
        assert_eq!(sc.repetitions, 1);
        assert!(s.ceiling.is_none());
        assert_eq!(l.name(), "bench");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_located() {
        let err = loaded("pipeline: p.yaml\ncorpus: {path: c}\nrepetition: 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("repetition"), "{err}");
        let err = loaded(
            "pipeline: p.yaml\ncorpus:\n  path: c\nrepetitions: 0\nscaling:\n  shards: []\n  rows_per_shard: 0\n",
        )
        .unwrap_err()
        .to_string();
        for want in ["repetitions", "scaling.shards", "scaling.rows_per_shard"] {
            assert!(err.contains(want), "{want} in {err}");
        }
        let err = loaded("pipeline: p.yaml\ncorpus:\n  path: c\n  generate: {rows: 2, shards: 3, layout: tiff}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("corpus.generate") && err.contains("tiff"),
            "{err}"
        );
    }

    #[test]
    fn generated_corpora_are_recognised_by_their_options() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("c");
        let spec = GenerateSpec {
            rows: 4,
            shards: 2,
            seed: 5,
            min_side: Some(16),
            max_side: Some(24),
            corrupt_rate: None,
            missing_caption_rate: None,
            png_share: None,
            layout: None,
        };
        let opts = gen_options(&spec, &out).unwrap();
        assert!(!generated_with(&out, &opts));
        corpus::generate(&opts).unwrap();
        assert!(generated_with(&out, &opts));
        // The output path does not matter, every other option does.
        let mut moved = opts.clone();
        moved.out = dir.path().join("elsewhere");
        assert!(generated_with(&out, &moved));
        let mut other = opts.clone();
        other.seed = 6;
        assert!(!generated_with(&out, &other));
        assert_eq!(shard_files(&out).len(), 2);
    }

    #[test]
    #[ignore = "one-off: the machine's bench corpora match the example specs"]
    fn example_specs_reuse_the_bench_corpora() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/specs");
        for name in ["decode-only.yaml", "clip-tiny.yaml", "clip-vitb32.yaml"] {
            let l = load_spec(&dir.join(name)).unwrap();
            let path = l.resolve(&l.spec.corpus.path);
            let opts = gen_options(l.spec.corpus.generate.as_ref().unwrap(), &path).unwrap();
            assert!(generated_with(&path, &opts), "{name}");
        }
    }

    fn snapshot_steps(rows: &[u64], busy: &[f64], t: f64) -> Vec<StepPoint> {
        rows.iter()
            .zip(busy)
            .map(|(&rows_out, &busy_s)| StepPoint {
                rows_out,
                busy_s,
                blocked_s: 0.0,
                starved_s: 0.0,
            })
            .chain(std::iter::once(StepPoint {
                rows_out: 0,
                busy_s: 0.0,
                blocked_s: t,
                starved_s: 0.0,
            }))
            .collect()
    }

    #[test]
    fn timeline_rates_use_the_trailing_window() {
        let step = |name: &str, workers| StepReport {
            name: name.into(),
            workers,
            rows_in: 0,
            rows_out: 0,
            rows_quarantined: 0,
            batches: 0,
            rows_per_s: 0.0,
            busy_s: 0.0,
            busy_fraction: 0.0,
            blocked_fraction: 0.0,
            starved_fraction: 0.0,
            queue_fill_mean: 0.0,
            queue_fill_max: 0.0,
        };
        let report = RunReport {
            pipeline: "p".into(),
            pipeline_file: "p.yaml".into(),
            pipeline_hash: String::new(),
            out_dir: "o".into(),
            report: "o/_report.json".into(),
            wall_s: 2.0,
            rows_in: 200,
            rows_out: 200,
            rows_quarantined: 0,
            invariant_holds: true,
            shards_processed: 1,
            shards_skipped: 0,
            cancelled: false,
            shards_below_group_size: 0,
            unreadable: Vec::new(),
            rows_per_s: 100.0,
            cpu_seconds: None,
            cpu_utilisation: None,
            peak_rss_bytes: None,
            storage: None,
            peak_rows_in_flight: 0,
            peak_bytes_in_flight: 0,
            bottleneck: None,
            steps: vec![step("source", 1), step("decode", 2), step("sink", 1)],
            quarantine_reasons: Default::default(),
            shards: Vec::new(),
            queue_samples: vec![(0.1, vec![0.5, 0.25]), (0.2, vec![1.0, 0.0])],
        };
        let samples: Vec<Sample> = [
            (0.5, 50u64, 0.5),
            (1.0, 100, 1.0),
            (1.5, 150, 1.5),
            (2.0, 200, 2.0),
        ]
        .iter()
        .map(|&(t, rows, busy)| Sample {
            t,
            rss: Some(1 << 20),
            rows_in_flight: 0,
            bytes_in_flight: 0,
            steps: snapshot_steps(&[rows, rows], &[busy, busy * 2.0], t),
        })
        .collect();
        let tl = timeline(&samples, &report);
        assert_eq!(tl.t, vec![0.5, 1.0, 1.5, 2.0]);
        assert_eq!(tl.steps.len(), 3);
        for s in &tl.steps {
            assert_eq!(s.rows_per_s.len(), 4);
            assert_eq!(s.busy.len(), 4);
        }
        // 50 rows per half second: 100 rows/s, from the origin and over the window.
        assert!(
            tl.steps[1]
                .rows_per_s
                .iter()
                .all(|r| (r - 100.0).abs() < 1e-9)
        );
        // decode: 2 busy seconds per second over 2 workers = 1.0; source: 1 over 1.
        assert!(tl.steps[0].busy.iter().all(|b| (b - 1.0).abs() < 1e-9));
        assert!(tl.steps[1].busy.iter().all(|b| (b - 1.0).abs() < 1e-9));
        assert!(tl.steps[2].blocked.iter().all(|b| (b - 1.0).abs() < 1e-9));
        assert_eq!(tl.queues.len(), 2);
        assert_eq!(tl.queues[0].step, "decode");
        assert_eq!(tl.queues[1].fill, vec![0.25, 0.0]);
    }
}
