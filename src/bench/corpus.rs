//! The corpus generator behind `trustflow bench gen`: deterministic (for a seed)
//! Parquet shards of image-caption rows built from crops of two real photos, with a
//! known share of corrupt images and bad captions and a ground-truth column for each,
//! so tests can check what a pipeline rejects and benchmarks get realistic bytes.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use arrow::array::{
    ArrayRef, BinaryBuilder, Int64Builder, RecordBatch, StringBuilder, StructArray,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, ExtendedColorType, ImageEncoder, RgbImage};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use trustflow_engine::error::{Error, Result};

/// Rows per Parquet row group (and per Arrow batch): keeps writer memory small even
/// with large images.
const ROW_GROUP_ROWS: usize = 64;

/// Ground-truth names of the corruption kinds, in the order `bad_rows` lists them.
pub const CORRUPTIONS: [&str; 4] = [
    "truncated_jpeg",
    "random_bytes",
    "zero_bytes",
    "huge_dimensions",
];
const TRUNCATED_JPEG: usize = 0;
const RANDOM_BYTES: usize = 1;
const ZERO_BYTES: usize = 2;
const HUGE_DIMENSIONS: usize = 3;

/// Class names for labels 0..10.
pub const CLASSES: [&str; 10] = [
    "airplane", "bicycle", "bird", "boat", "car", "cat", "dog", "flower", "house", "tree",
];

/// The real photos scikit-learn ships (427x640), looked up in `photos_dir`.
const PHOTOS: [&str; 2] = ["china.jpg", "flower.jpg"];

/// How the generated shards lay out their columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GenLayout {
    /// `image` is Binary holding the encoded bytes.
    #[default]
    Bytes,
    /// `image` is a Hugging Face `Image` struct `{bytes, path}`.
    #[serde(rename = "hf")]
    HfStruct,
    /// `image` is a Utf8 path relative to the shard's folder; files written beside it.
    Path,
    /// img2dataset's columns: `key`, `jpg`, `caption`, `url`, `status`, `width`, `height`.
    Img2dataset,
}

impl GenLayout {
    /// Every layout, in CLI order.
    pub const ALL: [GenLayout; 4] = [Self::Bytes, Self::HfStruct, Self::Path, Self::Img2dataset];

    /// The CLI name (`bytes`, `hf`, `path`, `img2dataset`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Bytes => "bytes",
            Self::HfStruct => "hf",
            Self::Path => "path",
            Self::Img2dataset => "img2dataset",
        }
    }
}

impl fmt::Display for GenLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GenLayout {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown layout `{s}` (expected bytes, hf, path or img2dataset)"
                ))
            })
    }
}

/// What to generate: also `trustflow bench gen`'s flags. `Default` gives the documented
/// defaults, on the command line too.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct GenOptions {
    /// Total rows over all shards (>= 1).
    #[arg(long)]
    pub rows: usize,
    /// Number of shards (1..=rows).
    #[arg(long, default_value_t = GenOptions::default().shards)]
    pub shards: usize,
    /// Output folder, created if absent.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed: same options and seed give byte-identical shards.
    #[arg(long, default_value_t = GenOptions::default().seed)]
    pub seed: u64,
    /// Share of rows whose caption is missing (null, empty, blank or punctuation).
    #[arg(long, default_value_t = GenOptions::default().missing_caption_rate)]
    pub missing_caption_rate: f64,
    /// Share of rows whose image bytes are corrupt (truncated, random bytes, empty,
    /// bomb header).
    #[arg(long, default_value_t = GenOptions::default().corrupt_rate)]
    pub corrupt_rate: f64,
    /// Smallest image side in pixels (>= 8).
    #[arg(long, default_value_t = GenOptions::default().min_side)]
    pub min_side: u32,
    /// Largest image side in pixels (<= 8192).
    #[arg(long, default_value_t = GenOptions::default().max_side)]
    pub max_side: u32,
    /// Share of good images encoded as PNG (the rest are JPEG).
    #[arg(long, default_value_t = GenOptions::default().png_share)]
    pub png_share: f64,
    /// Column layout of the shards: bytes | hf | path | img2dataset.
    #[arg(long, default_value = "bytes")]
    pub layout: GenLayout,
    /// Folder with `china.jpg` and `flower.jpg`; without them images are procedural.
    #[arg(long, env = "TRUSTFLOW_PHOTOS_DIR")]
    pub photos_dir: Option<PathBuf>,
    /// Domain names, drawn uniformly per row (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "source,target")]
    pub domains: Vec<String>,
    /// Share of rows in split `test` (the rest are `train`).
    #[arg(long, default_value_t = GenOptions::default().test_share)]
    pub test_share: f64,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            rows: 1000,
            shards: 1,
            out: PathBuf::from("corpus"),
            seed: 0,
            missing_caption_rate: 0.05,
            corrupt_rate: 0.06,
            min_side: 64,
            max_side: 1024,
            png_share: 0.25,
            layout: GenLayout::Bytes,
            photos_dir: std::env::var_os("TRUSTFLOW_PHOTOS_DIR").map(PathBuf::from),
            domains: vec!["source".to_string(), "target".to_string()],
            test_share: 0.2,
        }
    }
}

/// What a run wrote (also saved, with the options, as `out/_gen.json`).
#[derive(Debug, Clone, Serialize)]
pub struct GenSummary {
    /// Shard files, in order.
    pub shards: Vec<PathBuf>,
    /// Rows over all shards.
    pub rows: usize,
    /// Rows per corruption kind (every kind listed, zero included).
    pub bad_rows: BTreeMap<String, usize>,
    /// Rows whose caption quality is `missing`.
    pub missing_captions: usize,
    /// Whether real photos were found (false: procedural backgrounds).
    pub photos_used: bool,
    /// Bytes of shard files plus, for the path layout, image files.
    pub bytes_written: u64,
    /// Wall-clock seconds the run took.
    pub seconds: f64,
}

/// Generates the corpus `opts` describes; see the module docs.
pub fn generate(opts: &GenOptions) -> Result<GenSummary> {
    let started = Instant::now();
    validate(opts)?;
    fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    remove_stale_corpus_shards(opts)?;
    let (photos, photos_used) = load_photos(opts);
    let ctx = Ctx {
        opts,
        photos,
        schema: schema(opts.layout),
        props: writer_props(opts.layout)?,
    };

    // Workers pull shard indices; each shard has its own RNG, so the bytes do not
    // depend on the thread count or scheduling.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(opts.shards);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let joined: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let shard = next.fetch_add(1, Ordering::Relaxed);
                        if shard >= opts.shards || failed.load(Ordering::Relaxed) {
                            return Ok(done);
                        }
                        match write_shard(&ctx, shard, &failed) {
                            Ok(stats) => done.push((shard, stats)),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut stats = Vec::with_capacity(opts.shards);
    for result in joined {
        match result {
            Ok(Ok(done)) => stats.extend(done),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::Internal("a generator thread panicked".into())),
        }
    }
    stats.sort_by_key(|(shard, _)| *shard);

    let mut summary = GenSummary {
        shards: Vec::with_capacity(stats.len()),
        rows: 0,
        bad_rows: CORRUPTIONS.iter().map(|k| (k.to_string(), 0)).collect(),
        missing_captions: 0,
        photos_used,
        bytes_written: 0,
        seconds: 0.0,
    };
    for (_, s) in stats {
        summary.shards.push(s.path);
        summary.rows += s.rows;
        summary.missing_captions += s.missing;
        summary.bytes_written += s.bytes;
        for (kind, n) in CORRUPTIONS.iter().zip(s.bad) {
            *summary.bad_rows.entry(kind.to_string()).or_default() += n;
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    let meta = serde_json::json!({ "summary": &summary, "options": opts });
    let path = opts.out.join("_gen.json");
    let text = serde_json::to_vec_pretty(&meta).map_err(|e| Error::output(&path, e))?;
    fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(summary)
}

fn validate(o: &GenOptions) -> Result<()> {
    let bad = |msg: String| Err(Error::Invalid(format!("bench gen: {msg}")));
    if o.rows == 0 {
        return bad("--rows must be at least 1".into());
    }
    if o.shards == 0 || o.shards > o.rows {
        return bad(format!(
            "--shards must be in 1..={} (the row count), got {}",
            o.rows, o.shards
        ));
    }
    for (name, v) in [
        ("missing_caption_rate", o.missing_caption_rate),
        ("corrupt_rate", o.corrupt_rate),
        ("png_share", o.png_share),
        ("test_share", o.test_share),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return bad(format!("{name} must be within [0, 1], got {v}"));
        }
    }
    if o.missing_caption_rate + o.corrupt_rate > 1.0 {
        return bad("missing_caption_rate + corrupt_rate must not exceed 1".into());
    }
    if !(8 <= o.min_side && o.min_side <= o.max_side && o.max_side <= 8192) {
        return bad(format!(
            "need 8 <= min_side <= max_side <= 8192, got min_side {} and max_side {}",
            o.min_side, o.max_side
        ));
    }
    if o.domains.is_empty() {
        return bad("at least one domain is needed".into());
    }
    Ok(())
}

/// `part-NNNNN` for shard `i` (every generator in `bench` names its shards so).
pub(crate) fn shard_stem(i: usize) -> String {
    format!("part-{i:05}")
}

/// Shards `part-N.parquet` with N >= `keep` left in `dir` by an earlier, larger run
/// would silently join the corpus: remove them if the folder is ours (`ours`: it holds
/// the generator's marker file), otherwise refuse. Returns the names removed.
pub(crate) fn remove_stale_shards(dir: &Path, keep: usize, ours: bool) -> Result<Vec<String>> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut stale = Vec::new();
    for entry in entries {
        let name = entry.map_err(|e| Error::io(dir, e))?.file_name();
        let name = name.to_string_lossy();
        let index = name
            .strip_prefix("part-")
            .and_then(|r| r.strip_suffix(".parquet"))
            .and_then(|n| n.parse::<usize>().ok());
        if index.is_some_and(|i| i >= keep) {
            stale.push(name.into_owned());
        }
    }
    if stale.is_empty() {
        return Ok(stale);
    }
    if !ours {
        return Err(Error::Invalid(format!(
            "{} already holds other shards ({}); choose an empty folder",
            dir.display(),
            stale.join(", ")
        )));
    }
    for name in &stale {
        let path = dir.join(name);
        fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    }
    Ok(stale)
}

/// This corpus's stale shards, with their image folders (path layout).
fn remove_stale_corpus_shards(opts: &GenOptions) -> Result<()> {
    let ours = opts.out.join("_gen.json").exists();
    for name in remove_stale_shards(&opts.out, opts.shards, ours)? {
        let images = opts
            .out
            .join("images")
            .join(name.trim_end_matches(".parquet"));
        if images.is_dir() {
            fs::remove_dir_all(&images).map_err(|e| Error::io(&images, e))?;
        }
    }
    Ok(())
}

/// Loads the two photos as RGB, or makes procedural stand-ins (warning once).
fn load_photos(opts: &GenOptions) -> (Vec<DynamicImage>, bool) {
    let loaded = match &opts.photos_dir {
        None => Err("TRUSTFLOW_PHOTOS_DIR is not set".to_string()),
        Some(dir) => PHOTOS
            .iter()
            .map(|name| {
                let path = dir.join(name);
                image::open(&path)
                    .map(|img| DynamicImage::ImageRgb8(img.into_rgb8()))
                    .map_err(|e| format!("{}: {e}", path.display()))
            })
            .collect(),
    };
    match loaded {
        Ok(photos) => (photos, true),
        Err(why) => {
            tracing::warn!("bench gen: no real photos ({why}); using procedural backgrounds");
            let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
            let photos = (0..PHOTOS.len())
                .map(|_| DynamicImage::ImageRgb8(procedural(&mut rng, 640, 427)))
                .collect();
            (photos, false)
        }
    }
}

/// A stand-in photo: a two-colour gradient at a random angle, soft stripes, and noise.
fn procedural(rng: &mut ChaCha8Rng, w: u32, h: u32) -> RgbImage {
    let c0: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
    let c1: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
    let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    let span = (w as f32).hypot(h as f32);
    let freq: f32 = rng.random_range(0.01..0.05);
    let mut img = RgbImage::new(w, h);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32, y as f32);
        let t = ((fx * dx + fy * dy) / span + 0.5).clamp(0.0, 1.0);
        let stripe = 18.0 * (freq * (fx * dy - fy * dx)).sin();
        let noise = rng.next_u32();
        for (c, out) in px.0.iter_mut().enumerate() {
            let n = ((noise >> (8 * c)) & 0xff) as f32 / 255.0 * 30.0 - 15.0;
            *out = (c0[c] * (1.0 - t) + c1[c] * t + stripe + n).clamp(0.0, 255.0) as u8;
        }
    }
    img
}

fn schema(layout: GenLayout) -> SchemaRef {
    let utf8 = |name: &str| Field::new(name, DataType::Utf8, true);
    let int = |name: &str| Field::new(name, DataType::Int64, true);
    let tail = [
        int("label"),
        utf8("domain"),
        utf8("split"),
        utf8("corruption"),
        utf8("caption_quality"),
    ];
    let mut fields = match layout {
        GenLayout::Img2dataset => vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("jpg", DataType::Binary, true),
            utf8("caption"),
            utf8("url"),
            utf8("status"),
            int("width"),
            int("height"),
        ],
        _ => {
            let image = match layout {
                GenLayout::HfStruct => DataType::Struct(hf_fields()),
                GenLayout::Path => DataType::Utf8,
                _ => DataType::Binary,
            };
            vec![
                Field::new("id", DataType::Utf8, false),
                Field::new("image", image, true),
                utf8("caption"),
            ]
        }
    };
    fields.extend(tail);
    Arc::new(Schema::new(fields))
}

/// Fields of Hugging Face datasets' `Image` feature.
fn hf_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

/// One writer config for every shard; parquet-rs writes no timestamps, so equal rows
/// give equal bytes.
fn writer_props(layout: GenLayout) -> Result<WriterProperties> {
    let image = match layout {
        GenLayout::HfStruct => ColumnPath::new(vec!["image".into(), "bytes".into()]),
        GenLayout::Img2dataset => ColumnPath::from("jpg"),
        GenLayout::Bytes | GenLayout::Path => ColumnPath::from("image"),
    };
    image_writer_props(image, ROW_GROUP_ROWS)
}

/// zstd-compressed shards of `row_group_rows` rows, with neither dictionary nor
/// min/max statistics on the `image` column: both are useless on image bytes and cost
/// memory. Shared by every generator in `bench`.
pub(crate) fn image_writer_props(
    image: ColumnPath,
    row_group_rows: usize,
) -> Result<WriterProperties> {
    let zstd = ZstdLevel::try_new(3).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(zstd))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_column_dictionary_enabled(image.clone(), false)
        .set_column_statistics_enabled(image, EnabledStatistics::None)
        .build())
}

/// Shared, read-only state of a run.
struct Ctx<'a> {
    opts: &'a GenOptions,
    photos: Vec<DynamicImage>,
    schema: SchemaRef,
    props: WriterProperties,
}

/// Per-shard counts.
struct ShardStats {
    path: PathBuf,
    rows: usize,
    bad: [usize; 4],
    missing: usize,
    bytes: u64,
}

/// Caption qualities (ground truth).
const CLEAN: &str = "clean";
const NOISY: &str = "noisy";
const WRONG_LABEL: &str = "wrong_label";
const MISSING: &str = "missing";

/// One generated row; its image bytes live in the caller's reused buffer.
struct Row {
    label: usize,
    domain: usize,
    test: bool,
    corruption: Option<usize>,
    quality: &'static str,
    caption: Option<String>,
    ext: &'static str,
    dims: Option<(u32, u32)>,
}

/// Column builders for one batch; only those the layout uses are filled.
#[derive(Default)]
struct Columns {
    id: StringBuilder,
    image: BinaryBuilder,
    path: StringBuilder,
    caption: StringBuilder,
    url: StringBuilder,
    status: StringBuilder,
    width: Int64Builder,
    height: Int64Builder,
    label: Int64Builder,
    domain: StringBuilder,
    split: StringBuilder,
    corruption: StringBuilder,
    quality: StringBuilder,
}

impl Columns {
    fn finish(&mut self, ctx: &Ctx) -> Result<RecordBatch> {
        let id: ArrayRef = Arc::new(self.id.finish());
        let image: ArrayRef = match ctx.opts.layout {
            GenLayout::Bytes | GenLayout::Img2dataset => Arc::new(self.image.finish()),
            GenLayout::Path => Arc::new(self.path.finish()),
            GenLayout::HfStruct => Arc::new(StructArray::new(
                hf_fields(),
                vec![Arc::new(self.image.finish()), Arc::new(self.path.finish())],
                None,
            )),
        };
        let mut cols = vec![id, image, Arc::new(self.caption.finish())];
        if ctx.opts.layout == GenLayout::Img2dataset {
            cols.push(Arc::new(self.url.finish()));
            cols.push(Arc::new(self.status.finish()));
            cols.push(Arc::new(self.width.finish()));
            cols.push(Arc::new(self.height.finish()));
        }
        cols.push(Arc::new(self.label.finish()));
        cols.push(Arc::new(self.domain.finish()));
        cols.push(Arc::new(self.split.finish()));
        cols.push(Arc::new(self.corruption.finish()));
        cols.push(Arc::new(self.quality.finish()));
        RecordBatch::try_new(ctx.schema.clone(), cols).map_err(|source| Error::Arrow {
            context: "bench gen: building a batch".into(),
            source,
        })
    }
}

fn write_shard(ctx: &Ctx, shard: usize, failed: &AtomicBool) -> Result<ShardStats> {
    let opts = ctx.opts;
    let stem = shard_stem(shard);
    let path = opts.out.join(format!("{stem}.parquet"));
    let tmp = opts.out.join(format!(".{stem}.parquet.tmp"));
    let result = write_shard_to(ctx, shard, &stem, &tmp, failed);
    match result {
        Ok(mut stats) => {
            fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
            stats.bytes += fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
            stats.path = path;
            Ok(stats)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp); // best effort: the error is what matters
            Err(e)
        }
    }
}

fn write_shard_to(
    ctx: &Ctx,
    shard: usize,
    stem: &str,
    tmp: &Path,
    failed: &AtomicBool,
) -> Result<ShardStats> {
    let opts = ctx.opts;
    let base = opts.rows / opts.shards;
    let rows = base + usize::from(shard < opts.rows % opts.shards);
    let file = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut writer = ArrowWriter::try_new(file, ctx.schema.clone(), Some(ctx.props.clone()))
        .map_err(|e| Error::output(tmp, e))?;
    let image_dir = opts.out.join("images").join(stem);
    if opts.layout == GenLayout::Path {
        // This shard is being replaced, so are its images.
        if image_dir.is_dir() {
            fs::remove_dir_all(&image_dir).map_err(|e| Error::io(&image_dir, e))?;
        }
        fs::create_dir_all(&image_dir).map_err(|e| Error::io(&image_dir, e))?;
    }

    let seed = opts.seed ^ (shard as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut stats = ShardStats {
        path: PathBuf::new(),
        rows,
        bad: [0; 4],
        missing: 0,
        bytes: 0,
    };
    let mut cols = Columns::default();
    let (mut buf, mut id, mut text) = (Vec::new(), String::new(), String::new());
    for row_index in 0..rows {
        let row = gen_row(&mut rng, ctx, &mut buf)?;
        id.clear();
        let _ = write!(id, "s{shard:05}-{row_index:06}"); // writing to a String cannot fail
        cols.id.append_value(&id);
        match opts.layout {
            GenLayout::Bytes | GenLayout::Img2dataset => cols.image.append_value(&buf),
            GenLayout::HfStruct => {
                cols.image.append_value(&buf);
                cols.path.append_value(format!("{id}.{}", row.ext));
            }
            GenLayout::Path => {
                let file = image_dir.join(format!("{id}.{}", row.ext));
                fs::write(&file, &buf).map_err(|e| Error::io(&file, e))?;
                stats.bytes += buf.len() as u64;
                cols.path
                    .append_value(format!("images/{stem}/{id}.{}", row.ext));
            }
        }
        cols.caption.append_option(row.caption.as_deref());
        if opts.layout == GenLayout::Img2dataset {
            text.clear();
            fake_url(&mut rng, row.ext, &mut text);
            cols.url.append_value(&text);
            cols.status.append_value("success");
            cols.width.append_option(row.dims.map(|d| i64::from(d.0)));
            cols.height.append_option(row.dims.map(|d| i64::from(d.1)));
        }
        cols.label.append_value(row.label as i64);
        cols.domain.append_value(&opts.domains[row.domain]);
        cols.split
            .append_value(if row.test { "test" } else { "train" });
        cols.corruption
            .append_option(row.corruption.map(|k| CORRUPTIONS[k]));
        cols.quality.append_value(row.quality);
        if let Some(kind) = row.corruption {
            stats.bad[kind] += 1;
        }
        stats.missing += usize::from(row.quality == MISSING);

        if (row_index + 1).is_multiple_of(ROW_GROUP_ROWS) || row_index + 1 == rows {
            if failed.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let batch = cols.finish(ctx)?;
            writer.write(&batch).map_err(|e| Error::output(tmp, e))?;
        }
    }
    writer.close().map_err(|e| Error::output(tmp, e))?;
    Ok(stats)
}

/// Draws one row; the image bytes are left in `buf`.
fn gen_row(rng: &mut ChaCha8Rng, ctx: &Ctx, buf: &mut Vec<u8>) -> Result<Row> {
    let opts = ctx.opts;
    let label = rng.random_range(0..CLASSES.len());
    let domain = rng.random_range(0..opts.domains.len());
    let test = rng.random_bool(opts.test_share);
    // One draw splits rows into corrupt image / missing caption / fine, so the two
    // rates are exact shares of disjoint rows.
    let u: f64 = rng.random();
    let corruption = (u < opts.corrupt_rate).then(|| rng.random_range(0..CORRUPTIONS.len()));
    let missing = corruption.is_none() && u < opts.corrupt_rate + opts.missing_caption_rate;
    let png = rng.random_bool(opts.png_share);
    let mut ext = if png { "png" } else { "jpg" };
    let mut dims = None;
    buf.clear();
    match corruption {
        None => {
            let img = render(rng, ctx, label, opts.min_side, opts.max_side);
            dims = Some(img.dimensions());
            encode(rng, &img, png, buf)?;
        }
        Some(TRUNCATED_JPEG) => {
            ext = "jpg";
            let img = render(rng, ctx, label, opts.min_side, opts.max_side);
            encode(rng, &img, false, buf)?;
            let keep = (buf.len() as f64 * rng.random_range(0.3..0.9)) as usize;
            buf.truncate(keep);
        }
        Some(RANDOM_BYTES) => {
            buf.resize(rng.random_range(100..=5000), 0);
            rng.fill_bytes(buf);
        }
        Some(ZERO_BYTES) => {}
        Some(kind) => {
            debug_assert_eq!(kind, HUGE_DIMENSIONS);
            // A valid small PNG whose header claims a giant size: a bomb signature.
            ext = "png";
            let img = render(rng, ctx, label, 16, 48);
            encode(rng, &img, true, buf)?;
            let w = rng.random_range(50_000..=70_000);
            let h = rng.random_range(50_000..=70_000);
            patch_ihdr(buf, w, h)?;
        }
    }
    let (quality, caption) = caption(rng, label, missing);
    Ok(Row {
        label,
        domain,
        test,
        corruption,
        quality,
        caption,
        ext,
        dims,
    })
}

/// Log-uniform integer in `lo..=hi`, so small sizes are common and big ones rare.
fn log_uniform(rng: &mut ChaCha8Rng, lo: u32, hi: u32) -> u32 {
    if lo >= hi {
        return lo;
    }
    let (a, b) = (f64::from(lo).ln(), f64::from(hi + 1).ln());
    (rng.random_range(a..b).exp() as u32).clamp(lo, hi)
}

/// A random crop of a photo, resized to random sides in `min..=max`, with the class
/// overlay drawn on it.
fn render(rng: &mut ChaCha8Rng, ctx: &Ctx, label: usize, min: u32, max: u32) -> RgbImage {
    let photo = &ctx.photos[rng.random_range(0..ctx.photos.len())];
    let (pw, ph) = (photo.width(), photo.height());
    let aspect = rng.random_range(0.5f64.ln()..2f64.ln()).exp();
    let w = log_uniform(rng, min, max);
    let h = ((f64::from(w) / aspect).round() as u32).clamp(min, max);
    // Largest crop of the target aspect that fits, then a random share of it.
    let r = f64::from(w) / f64::from(h);
    let (fw, fh) = if f64::from(pw) / f64::from(ph) > r {
        (f64::from(ph) * r, f64::from(ph))
    } else {
        (f64::from(pw), f64::from(pw) / r)
    };
    let s = rng.random_range(0.35..=1.0);
    let cw = ((fw * s).round() as u32).clamp(1, pw);
    let ch = ((fh * s).round() as u32).clamp(1, ph);
    let x = rng.random_range(0..=pw - cw);
    let y = rng.random_range(0..=ph - ch);
    // DynamicImage's methods are compiled (optimised) inside `image`, unlike generic
    // imageops calls instantiated here, which matters for debug-build tests.
    let mut img = photo
        .crop_imm(x, y, cw, ch)
        .resize_exact(w, h, FilterType::Triangle)
        .into_rgb8();
    overlay(rng, &mut img, label);
    img
}

/// Class colours: the overlay makes labels visually grounded.
#[rustfmt::skip]
const CLASS_COLOURS: [[u8; 3]; 10] = [
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [250, 250, 250], [20, 20, 20],
];

/// A filled disc (even labels) or rectangle (odd) in the class colour, 15-40% of
/// the short side, at a random position.
fn overlay(rng: &mut ChaCha8Rng, img: &mut RgbImage, label: usize) {
    let (w, h) = img.dimensions();
    let size = ((f64::from(w.min(h)) * rng.random_range(0.15..=0.40)) as u32).max(2);
    let rect_h = if label.is_multiple_of(2) {
        size
    } else {
        ((f64::from(size) * rng.random_range(0.6..=1.0)) as u32).max(1)
    };
    let x0 = rng.random_range(0..=w - size);
    let y0 = rng.random_range(0..=h - rect_h);
    let colour = CLASS_COLOURS[label].map(|c| c.saturating_add_signed(rng.random_range(-12..=12)));
    let radius = f64::from(size) / 2.0;
    let stride = w as usize * 3;
    let raw: &mut [u8] = img;
    for y in 0..rect_h {
        let row = (y0 + y) as usize * stride;
        let dy = f64::from(y) + 0.5 - radius;
        for x in 0..size {
            let dx = f64::from(x) + 0.5 - radius;
            if label.is_multiple_of(2) && dx * dx + dy * dy > radius * radius {
                continue;
            }
            let i = row + (x0 + x) as usize * 3;
            raw[i..i + 3].copy_from_slice(&colour);
        }
    }
}

/// Encodes as PNG or JPEG (quality 60-95) into `buf`.
fn encode(rng: &mut ChaCha8Rng, img: &RgbImage, png: bool, buf: &mut Vec<u8>) -> Result<()> {
    let (w, h) = img.dimensions();
    let result = if png {
        PngEncoder::new(&mut *buf).write_image(img.as_raw(), w, h, ExtendedColorType::Rgb8)
    } else {
        JpegEncoder::new_with_quality(&mut *buf, rng.random_range(60..=95)).write_image(
            img.as_raw(),
            w,
            h,
            ExtendedColorType::Rgb8,
        )
    };
    result.map_err(|e| Error::Internal(format!("bench gen: encoding an image: {e}")))
}

/// Rewrites the IHDR width and height of a PNG and fixes the chunk CRC.
fn patch_ihdr(png: &mut [u8], w: u32, h: u32) -> Result<()> {
    if png.len() < 33 || &png[12..16] != b"IHDR" {
        return Err(Error::Internal("bench gen: PNG without IHDR".into()));
    }
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// CRC-32 (IEEE) as PNG chunks use it; bitwise is plenty for one chunk per image.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = (c >> 1) ^ (0xEDB8_8320 & (c & 1).wrapping_neg());
        }
    }
    !c
}

fn pick<'a>(rng: &mut ChaCha8Rng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

fn fake_url(rng: &mut ChaCha8Rng, ext: &str, out: &mut String) {
    const HOSTS: [&str; 5] = [
        "images.example.com",
        "cdn.photoshare.example.net",
        "static.pinboard.example.org",
        "i.imghost.example.com",
        "media.travelblog.example",
    ];
    let host = pick(rng, &HOSTS);
    let (year, month, n) = (
        rng.random_range(2009..=2023),
        rng.random_range(1..=12),
        rng.next_u64(),
    );
    let _ = write!(out, "https://{host}/{year}/{month:02}/{n:016x}.{ext}");
}

const SYNONYMS: [&[&str]; 10] = [
    &["airplane", "plane", "jet", "aircraft", "airliner"],
    &["bicycle", "bike", "road bike", "mountain bike"],
    &["bird", "sparrow", "pigeon", "seagull", "songbird"],
    &["boat", "sailboat", "fishing boat", "rowboat", "ferry"],
    &["car", "sedan", "hatchback", "taxi", "sports car"],
    &["cat", "kitten", "tabby cat", "house cat"],
    &["dog", "puppy", "labrador", "terrier", "sheepdog"],
    &["flower", "blossom", "rose", "tulip", "daisy"],
    &["house", "cottage", "villa", "farmhouse", "townhouse"],
    &["tree", "oak tree", "pine tree", "maple tree", "willow tree"],
];
#[rustfmt::skip]
const ADJECTIVES: [&str; 16] = [
    "red", "blue", "small", "large", "old", "white", "black", "bright", "weathered",
    "shiny", "tiny", "green", "yellow", "colourful", "lonely", "orange",
];
const SCENES: [&str; 14] = [
    "parked by the temple",
    "in front of an old temple",
    "in a garden",
    "near the river",
    "on a city street",
    "under a cloudy sky",
    "at sunset",
    "next to a stone wall",
    "in the morning light",
    "among pink petals",
    "beside a wooden fence",
    "in the park",
    "against a blue sky",
    "on a quiet afternoon",
];
const DETAILS: [&str; 10] = [
    "The background is slightly blurred and the colours are warm and soft.",
    "Long shadows fall across the ground from the left side of the frame.",
    "A few people can be seen walking in the distance behind it.",
    "The picture seems to have been taken with a wide angle lens.",
    "Green leaves and pink petals frame the scene on both sides.",
    "There is a traditional roof with curved eaves in the background.",
    "The image has a slightly grainy look, like an old film photograph.",
    "Everything in the scene looks calm, quiet and a little sleepy.",
    "Reflections shimmer on a wet surface just in front of it.",
    "The sky above is pale and hazy with a hint of rain.",
];

/// Picks the caption quality and writes the caption.
fn caption(rng: &mut ChaCha8Rng, label: usize, missing: bool) -> (&'static str, Option<String>) {
    if missing {
        let text = match rng.random_range(0..20) {
            0..12 => return (MISSING, None),
            12..15 => "",
            15..18 => pick(rng, &[" ", "   ", "\t", " \n "]),
            _ => pick(rng, &["!!! ...", "...", "???", "-", ". . .", "!!"]),
        };
        return (MISSING, Some(text.to_string()));
    }
    let mut out = String::new();
    // Weights 14:3:2 give the 70/15/10 clean/noisy/wrong mix next to ~5% missing.
    let quality = match rng.random_range(0..19) {
        0..14 => CLEAN,
        14..17 => NOISY,
        _ => WRONG_LABEL,
    };
    match quality {
        NOISY => noisy_caption(rng, label, &mut out),
        WRONG_LABEL => {
            let other = (label + rng.random_range(1..CLASSES.len())) % CLASSES.len();
            clean_caption(rng, other, &mut out);
        }
        _ => clean_caption(rng, label, &mut out),
    }
    (quality, Some(out))
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn clean_caption(rng: &mut ChaCha8Rng, label: usize, out: &mut String) {
    let noun = pick(rng, SYNONYMS[label]);
    let adj = pick(rng, &ADJECTIVES);
    let scene = pick(rng, &SCENES);
    let (a_adj, a_noun) = (article(adj), article(noun));
    let _ = match rng.random_range(0..8) {
        0 => write!(out, "{adj} {noun}"),
        1 | 2 => write!(out, "a photo of {a_adj} {adj} {noun} {scene}"),
        3 => write!(out, "{a_noun} {noun} {scene}"),
        4 => write!(out, "close-up of {a_adj} {adj} {noun}"),
        5 => write!(out, "An image showing {a_adj} {adj} {noun} {scene}."),
        _ => {
            let _ = write!(out, "This photograph shows {a_adj} {adj} {noun} {scene}.");
            for _ in 0..rng.random_range(1..=4) {
                out.push(' ');
                out.push_str(pick(rng, &DETAILS));
            }
            Ok(())
        }
    };
}

/// Web-crawl style: a short clean caption with 2-4 kinds of junk around it.
fn noisy_caption(rng: &mut ChaCha8Rng, label: usize, out: &mut String) {
    const HANDLES: [&str; 4] = ["travel", "snap", "daily", "lens"];
    const TAGS: [&str; 3] = ["instagood", "nofilter", "hd"];
    const EMOJI: [&str; 5] = ["📷", "✨✨", "😍", "🔥🔥🔥", "🌸 👍"];
    const BANGS: [&str; 5] = ["!!!", "??", "...", "!!1", " !!!!"];
    let (adj, noun, scene) = (
        pick(rng, &ADJECTIVES),
        pick(rng, SYNONYMS[label]),
        pick(rng, &SCENES),
    );
    let mut core = format!("{adj} {noun} {scene}");
    let (mut pre, mut post) = (String::new(), String::new());
    let kinds = rng.random_range(2..=4);
    // Distinct kinds, so no doubled tags.
    for kind in rand::seq::index::sample(rng, 8, kinds) {
        let (n, class) = (rng.random_range(0..10_000), CLASSES[label]);
        let _ = match kind {
            0 => write!(post, " https://t.example.co/{:08x}", rng.next_u32()),
            1 => {
                core = format!("<b>{core}</b>");
                write!(post, "<br/>")
            }
            2 => write!(post, " &amp; more &quot;pics&quot;"),
            3 => write!(pre, "@{}_{n} ", pick(rng, &HANDLES)),
            4 => write!(post, " #{class} #photography #{}", pick(rng, &TAGS)),
            5 => write!(pre, "IMG_{n:04} "),
            6 => write!(post, " {}", pick(rng, &EMOJI)),
            _ => write!(post, "{}", pick(rng, &BANGS)),
        };
    }
    let _ = write!(out, "{pre}{core}{post}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    fn small(out: &Path, rows: usize, shards: usize) -> GenOptions {
        GenOptions {
            rows,
            shards,
            out: out.to_path_buf(),
            seed: 7,
            min_side: 16,
            max_side: 64,
            ..GenOptions::default()
        }
    }

    fn read(path: &Path) -> RecordBatch {
        let file = File::open(path).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
        arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    }

    fn read_all(summary: &GenSummary) -> Vec<RecordBatch> {
        summary.shards.iter().map(|p| read(p)).collect()
    }

    fn strings(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
        let col = batch.column_by_name(name).unwrap().as_string::<i32>();
        (0..col.len())
            .map(|i| col.is_valid(i).then(|| col.value(i).to_string()))
            .collect()
    }

    #[test]
    fn same_seed_gives_identical_bytes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let opts = |out: &Path| GenOptions {
            max_side: 128,
            ..small(out, 40, 2)
        };
        let sa = generate(&opts(a.path())).unwrap();
        let sb = generate(&opts(b.path())).unwrap();
        assert_eq!(sa.shards.len(), 2);
        for (pa, pb) in sa.shards.iter().zip(&sb.shards) {
            assert_eq!(
                fs::read(pa).unwrap(),
                fs::read(pb).unwrap(),
                "{}",
                pa.display()
            );
        }
        let c = tempfile::tempdir().unwrap();
        let sc = generate(&GenOptions {
            seed: 8,
            ..opts(c.path())
        })
        .unwrap();
        assert_ne!(
            fs::read(&sa.shards[0]).unwrap(),
            fs::read(&sc.shards[0]).unwrap()
        );
    }

    #[test]
    fn rows_split_evenly_in_small_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let summary = generate(&small(dir.path(), 150, 4)).unwrap();
        let names: Vec<_> = summary
            .shards
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "part-00000.parquet",
                "part-00001.parquet",
                "part-00002.parquet",
                "part-00003.parquet"
            ]
        );
        let counts: Vec<_> = read_all(&summary).iter().map(|b| b.num_rows()).collect();
        assert_eq!(counts, [38, 38, 37, 37]);
        assert_eq!(summary.rows, 150);
        let reader = SerializedFileReader::new(File::open(&summary.shards[0]).unwrap()).unwrap();
        let groups: Vec<_> = reader
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        assert!(groups.iter().all(|n| *n <= 64), "{groups:?}");
        let mut ids: Vec<_> = read_all(&summary)
            .iter()
            .flat_map(|b| strings(b, "id"))
            .collect();
        assert_eq!(ids[0].as_deref(), Some("s00000-000000"));
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 150);
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join("_gen.json")).unwrap()).unwrap();
        assert_eq!(meta["summary"]["rows"], 150);
        assert_eq!(meta["options"]["layout"], "bytes");
        assert!(!dir.path().join(".part-00000.parquet.tmp").exists());
        // A smaller rerun into the same folder drops the shards it no longer makes.
        let again = generate(&small(dir.path(), 10, 2)).unwrap();
        assert_eq!(again.shards.len(), 2);
        assert!(!dir.path().join("part-00002.parquet").exists());
    }

    #[test]
    fn bad_rows_match_rates_and_ground_truth() {
        let dir = tempfile::tempdir().unwrap();
        let summary = generate(&GenOptions {
            max_side: 32,
            ..small(dir.path(), 400, 3)
        })
        .unwrap();
        let corrupt: usize = summary.bad_rows.values().sum();
        // Expected 24 and 20 (binomial sd ~5 and ~4.4).
        assert!((10..=40).contains(&corrupt), "{corrupt} corrupt rows");
        assert!(
            (8..=34).contains(&summary.missing_captions),
            "{}",
            summary.missing_captions
        );
        let (mut seen_corrupt, mut seen_missing) = (BTreeMap::new(), 0);
        let mut qualities = BTreeMap::new();
        for batch in read_all(&summary) {
            let images = batch.column_by_name("image").unwrap().as_binary::<i32>();
            let captions = strings(&batch, "caption");
            let labels = batch
                .column_by_name("label")
                .unwrap()
                .as_primitive::<Int64Type>();
            for (i, kind) in strings(&batch, "corruption").into_iter().enumerate() {
                let bytes = images.value(i);
                let quality = strings(&batch, "caption_quality")[i].clone().unwrap();
                *qualities.entry(quality.clone()).or_insert(0) += 1;
                match kind.as_deref() {
                    None => {
                        let img = image::load_from_memory(bytes).unwrap();
                        assert!(
                            (16..=32).contains(&img.width()) && (16..=32).contains(&img.height())
                        );
                    }
                    Some("zero_bytes") => assert!(bytes.is_empty() && images.is_valid(i)),
                    Some("truncated_jpeg") => assert!(bytes.starts_with(&[0xFF, 0xD8])),
                    Some("random_bytes") => {
                        assert!((100..=5000).contains(&bytes.len()));
                        assert!(image::load_from_memory(bytes).is_err());
                    }
                    Some("huge_dimensions") => assert!(bytes.starts_with(b"\x89PNG")),
                    Some(other) => panic!("unknown corruption {other}"),
                }
                if let Some(kind) = kind {
                    *seen_corrupt.entry(kind).or_insert(0) += 1;
                    assert_ne!(quality, "missing", "corrupt rows keep a caption");
                }
                let caption = captions[i].as_deref();
                let label = labels.value(i) as usize;
                match quality.as_str() {
                    "missing" => {
                        seen_missing += 1;
                        assert!(
                            caption.is_none_or(|c| !c.chars().any(char::is_alphanumeric)),
                            "{caption:?}"
                        );
                    }
                    "clean" | "noisy" => {
                        let c = caption.unwrap();
                        assert!(
                            SYNONYMS[label].iter().any(|s| c.contains(s)),
                            "{label}: {c}"
                        );
                        let words = c.split_whitespace().count();
                        assert!((2..=70).contains(&words), "{c}");
                    }
                    _ => assert_eq!(quality, "wrong_label"),
                }
            }
        }
        let expected: BTreeMap<_, _> = summary
            .bad_rows
            .clone()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(seen_corrupt, expected);
        assert_eq!(seen_missing, summary.missing_captions);
        assert!(
            qualities["clean"] > qualities["noisy"] && qualities["noisy"] > 10,
            "{qualities:?}"
        );
        assert!(qualities["wrong_label"] > 10, "{qualities:?}");
    }

    #[test]
    fn every_corruption_kind_appears_and_huge_png_lies() {
        let dir = tempfile::tempdir().unwrap();
        let opts = GenOptions {
            corrupt_rate: 0.6,
            ..small(dir.path(), 100, 1)
        };
        let summary = generate(&opts).unwrap();
        for kind in CORRUPTIONS {
            assert!(
                summary.bad_rows[kind] > 0,
                "{kind} missing: {:?}",
                summary.bad_rows
            );
        }
        let batch = read(&summary.shards[0]);
        let images = batch.column_by_name("image").unwrap().as_binary::<i32>();
        let mut huge = 0;
        for (i, kind) in strings(&batch, "corruption").into_iter().enumerate() {
            if kind.as_deref() != Some("huge_dimensions") {
                continue;
            }
            huge += 1;
            let png = images.value(i);
            assert_eq!(&png[12..16], b"IHDR");
            let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
            let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
            assert!(w >= 50_000 && h >= 50_000, "{w}x{h}");
            let crc = u32::from_be_bytes(png[29..33].try_into().unwrap());
            assert_eq!(crc, crc32(&png[12..29]), "IHDR CRC must be valid");
            // The data is a small real image, so only the header lies.
            assert!(png.len() < 20_000);
        }
        assert_eq!(huge, summary.bad_rows["huge_dimensions"]);
    }

    #[test]
    fn crc32_matches_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn layouts_have_documented_columns() {
        use DataType::{Binary, Int64, Struct, Utf8};
        let common = ["label", "domain", "split", "corruption", "caption_quality"];
        for layout in GenLayout::ALL {
            let dir = tempfile::tempdir().unwrap();
            let summary = generate(&GenOptions {
                layout,
                ..small(dir.path(), 12, 2)
            })
            .unwrap();
            let batch = read(&summary.shards[1]);
            let schema = batch.schema();
            let ty = |name: &str| schema.field_with_name(name).unwrap().data_type().clone();
            let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            assert_eq!(names[names.len() - 5..], common, "{layout}");
            assert_eq!(ty("label"), Int64);
            match layout {
                GenLayout::Bytes => assert_eq!(names[..3], ["id", "image", "caption"]),
                GenLayout::HfStruct => {
                    assert_eq!(ty("image"), Struct(hf_fields()));
                    let image = batch.column_by_name("image").unwrap().as_struct();
                    let paths = image.column_by_name("path").unwrap().as_string::<i32>();
                    let id = strings(&batch, "id")[0].clone().unwrap();
                    assert!(
                        paths.value(0) == format!("{id}.jpg")
                            || paths.value(0) == format!("{id}.png")
                    );
                }
                GenLayout::Path => assert_eq!(ty("image"), Utf8),
                GenLayout::Img2dataset => {
                    assert_eq!(
                        names[..7],
                        ["key", "jpg", "caption", "url", "status", "width", "height"]
                    );
                    assert_eq!(
                        (ty("jpg"), ty("width"), ty("height")),
                        (Binary, Int64, Int64)
                    );
                    let urls = strings(&batch, "url");
                    assert!(
                        urls.iter()
                            .all(|u| u.as_deref().unwrap().starts_with("https://"))
                    );
                    let jpg = batch.column_by_name("jpg").unwrap().as_binary::<i32>();
                    let width = batch
                        .column_by_name("width")
                        .unwrap()
                        .as_primitive::<Int64Type>();
                    for (i, kind) in strings(&batch, "corruption").iter().enumerate() {
                        if kind.is_none() {
                            let img = image::load_from_memory(jpg.value(i)).unwrap();
                            assert_eq!(width.value(i), i64::from(img.width()));
                        } else {
                            assert!(width.is_null(i));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn path_layout_writes_image_files_beside_the_shard() {
        let dir = tempfile::tempdir().unwrap();
        let opts = GenOptions {
            layout: GenLayout::Path,
            corrupt_rate: 0.5,
            ..small(dir.path(), 60, 2)
        };
        let summary = generate(&opts).unwrap();
        let mut total = 0;
        for shard in &summary.shards {
            let batch = read(shard);
            let folder = shard.parent().unwrap();
            let stem = shard.file_stem().unwrap().to_str().unwrap();
            let kinds = strings(&batch, "corruption");
            for (i, rel) in strings(&batch, "image").into_iter().enumerate() {
                let rel = rel.unwrap();
                assert!(rel.starts_with(&format!("images/{stem}/")), "{rel}");
                let meta = fs::metadata(folder.join(&rel)).unwrap();
                assert_eq!(
                    meta.len() == 0,
                    kinds[i].as_deref() == Some("zero_bytes"),
                    "{rel}"
                );
                total += meta.len();
            }
        }
        let shard_bytes: u64 = summary
            .shards
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(summary.bytes_written, shard_bytes + total);
    }

    #[test]
    fn procedural_fallback_without_photos() {
        let dir = tempfile::tempdir().unwrap();
        let opts = GenOptions {
            photos_dir: Some(dir.path().join("nope")),
            corrupt_rate: 0.0,
            ..small(dir.path(), 8, 1)
        };
        let summary = generate(&opts).unwrap();
        assert!(!summary.photos_used);
        let batch = read(&summary.shards[0]);
        let images = batch.column_by_name("image").unwrap().as_binary::<i32>();
        for i in 0..images.len() {
            image::load_from_memory(images.value(i)).unwrap();
        }
    }

    #[test]
    fn real_photos_are_used_when_available() {
        let Some(dir) = std::env::var_os("TRUSTFLOW_PHOTOS_DIR") else {
            eprintln!("TRUSTFLOW_PHOTOS_DIR unset; skipping");
            return;
        };
        if !Path::new(&dir).join("china.jpg").exists() {
            return;
        }
        let out = tempfile::tempdir().unwrap();
        assert!(generate(&small(out.path(), 4, 1)).unwrap().photos_used);
    }

    #[test]
    fn invalid_options_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let base = small(dir.path(), 10, 2);
        let cases = [
            GenOptions {
                rows: 0,
                ..base.clone()
            },
            GenOptions {
                shards: 0,
                ..base.clone()
            },
            GenOptions {
                shards: 11,
                ..base.clone()
            },
            GenOptions {
                corrupt_rate: 1.5,
                ..base.clone()
            },
            GenOptions {
                png_share: f64::NAN,
                ..base.clone()
            },
            GenOptions {
                corrupt_rate: 0.6,
                missing_caption_rate: 0.6,
                ..base.clone()
            },
            GenOptions {
                min_side: 4,
                ..base.clone()
            },
            GenOptions {
                min_side: 100,
                max_side: 50,
                ..base.clone()
            },
            GenOptions {
                max_side: 9000,
                ..base.clone()
            },
            GenOptions {
                domains: vec![],
                ..base.clone()
            },
        ];
        for opts in cases {
            let err = generate(&opts).unwrap_err();
            assert!(matches!(err, Error::Invalid(_)), "{err}");
        }
        assert!(
            fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing written"
        );
    }

    #[test]
    fn refuses_foreign_folder_with_other_shards() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("part-00005.parquet"), b"theirs").unwrap();
        assert!(generate(&small(dir.path(), 4, 2)).is_err());
        assert!(dir.path().join("part-00005.parquet").exists());
    }

    #[test]
    fn layout_names_round_trip() {
        for layout in GenLayout::ALL {
            assert_eq!(layout.to_string().parse::<GenLayout>().unwrap(), layout);
        }
        assert_eq!("HF".parse::<GenLayout>().unwrap(), GenLayout::HfStruct);
        assert!("parquet".parse::<GenLayout>().is_err());
    }

    /// Timing probe: `cargo test --lib bench:: -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn time_2000_default_rows() {
        let dir = tempfile::tempdir().unwrap();
        let opts = GenOptions {
            rows: 2000,
            shards: 4,
            out: dir.path().to_path_buf(),
            ..GenOptions::default()
        };
        let s = generate(&opts).unwrap();
        eprintln!(
            "2000 rows: {:.1}s, {} MB, photos {}",
            s.seconds,
            s.bytes_written / 1_000_000,
            s.photos_used
        );
    }
}
