//! A synthetic *enriched* training corpus for the TRUST trainer (`trustflow-train`): Parquet
//! shards that look like the output of the enrichment pipeline (captions, pseudo-labels,
//! CLIP weights, caption features), with a known ground truth, so the trainer can be
//! built and tested end to end without GeoNet or DomainNet (tens of GB, not reachable
//! here). See docs/method.md sections 4-6 for what the trainer does with each column.
//!
//! Layout under `out`: `source/` (labelled source rows, split `train`), `target/`
//! (target rows, split `train`; `label` is kept for evaluation only) and `eval/` (labelled
//! target rows, split `test`), plus `_train_corpus.json` (the options and the summary).
//! `source/` and `target/` hold `shards` files each, `eval/` one, all named
//! `part-NNNNN.parquet` (zstd).
//!
//! The images are tiny RGB pictures whose class is a bright blob at a class-specific
//! position (on a circle around the centre), so a small CNN can learn them. The target
//! domain keeps the classes but changes the background (coloured stripes instead of grey
//! noise), the blob's colour and its contrast, so a source-only model transfers
//! imperfectly: that gap is what TRUST's target terms should close.
//!
//! Pseudo-labels are the true label except for an exact `pseudo_noise` share of target
//! rows, replaced by another class. `pseudo_weight` plays CLIP's weight w: Beta(4, 2)
//! draws for right pseudo-labels and Beta(2, 3) for wrong ones, whose AUROC for right vs
//! wrong is about 0.83, the kind of separation docs/method.md section 6 measures.
//!
//! Everything comes from `seed` through ChaCha8 streams, one per folder; parquet-rs writes
//! no timestamps, so the same options give byte-identical shards.

use std::f64::consts::TAU;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, FixedSizeListBuilder, Float32Builder, Int64Builder, LargeBinaryBuilder, RecordBatch,
    StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::corpus::{image_writer_props, remove_stale_shards, shard_stem};
use trustflow_engine::error::{Error, Result};

/// Rows per Parquet row group (and per Arrow batch). The images are tiny, so groups
/// can be larger than the general corpus generator's.
const ROW_GROUP_ROWS: usize = 256;

/// File written at the top of `out`; its presence also marks the folder as ours, so
/// stale shards of an earlier, larger run may be removed (see [`remove_stale_shards`]).
pub const MARKER: &str = "_train_corpus.json";

/// Caption templates; `{}` is the class number.
const CAPTION_TEMPLATES: [&str; 5] = [
    "a photo of class {}",
    "an image of class {}",
    "a picture showing class {}",
    "class {}, seen up close",
    "a small photo of a class {} object",
];

/// Beta parameters of `pseudo_weight` (and of the spread of `pseudo_prob`) for right
/// and wrong pseudo-labels; chosen so that the AUROC of right vs wrong is about 0.83.
const BETA_RIGHT: (u32, u32) = (4, 2);
const BETA_WRONG: (u32, u32) = (2, 3);

/// Standard deviation of the per-component noise added to a class's caption feature.
const FEATURE_NOISE: f64 = 0.05;

/// What to generate: also `trustflow bench gen-train`'s flags. `Default` gives the
/// documented defaults, on the command line too.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct TrainCorpusOptions {
    /// Rows in `source/` (>= `shards`).
    #[arg(long, default_value_t = TrainCorpusOptions::default().rows_source)]
    pub rows_source: usize,
    /// Rows in `target/` (>= `shards`).
    #[arg(long, default_value_t = TrainCorpusOptions::default().rows_target)]
    pub rows_target: usize,
    /// Rows in `eval/` (>= 1), written as one shard.
    #[arg(long, default_value_t = TrainCorpusOptions::default().rows_eval)]
    pub rows_eval: usize,
    /// Shards in `source/` and in `target/` (>= 1).
    #[arg(long, default_value_t = TrainCorpusOptions::default().shards)]
    pub shards: usize,
    /// Number of classes (2..=1000); labels are balanced over them.
    #[arg(long, default_value_t = TrainCorpusOptions::default().classes)]
    pub classes: usize,
    /// Side of the square RGB images in pixels (8..=512).
    #[arg(long, default_value_t = TrainCorpusOptions::default().image_size)]
    pub image_size: u32,
    /// Length of `text_feature` (1..=4096).
    #[arg(long, default_value_t = TrainCorpusOptions::default().feature_dim)]
    pub feature_dim: usize,
    /// Exact share (rounded to whole rows) of target and eval rows whose pseudo-label
    /// is wrong, within [0, 1].
    #[arg(long, default_value_t = TrainCorpusOptions::default().pseudo_noise)]
    pub pseudo_noise: f64,
    /// Exact share (rounded to whole rows) of rows of every folder whose image bytes are
    /// undecodable, within [0, 1].
    #[arg(long, default_value_t = TrainCorpusOptions::default().bad_image_rate)]
    pub bad_image_rate: f64,
    /// Seed: the same options give byte-identical shards.
    #[arg(long, default_value_t = TrainCorpusOptions::default().seed)]
    pub seed: u64,
    /// Output folder, created if absent.
    #[arg(long, default_value = "out/train-corpus")]
    pub out: PathBuf,
}

impl Default for TrainCorpusOptions {
    fn default() -> Self {
        Self {
            rows_source: 1000,
            rows_target: 1000,
            rows_eval: 400,
            shards: 2,
            classes: 4,
            image_size: 16,
            feature_dim: 16,
            pseudo_noise: 0.3,
            bad_image_rate: 0.0,
            seed: 0,
            out: PathBuf::from("train-corpus"),
        }
    }
}

/// What was written to one folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FolderSummary {
    /// The folder (`out/source`, `out/target` or `out/eval`).
    pub path: PathBuf,
    /// Its shard files, in order.
    pub shards: Vec<PathBuf>,
    /// Rows over all its shards.
    pub rows: usize,
    /// Rows whose image bytes are undecodable.
    pub bad_rows: usize,
    /// Share of rows whose `pseudo_label` equals `label` (1 on source).
    pub pseudo_label_accuracy: f64,
}

/// What a run wrote (also saved, with the options, as `out/_train_corpus.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainCorpusSummary {
    pub source: FolderSummary,
    pub target: FolderSummary,
    pub eval: FolderSummary,
    /// Pseudo-label accuracy on the target training rows (`target/`).
    pub pseudo_label_accuracy: f64,
}

/// The three folders, in generation order (the order fixes each folder's RNG stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Folder {
    Source,
    Target,
    Eval,
}

impl Folder {
    const ALL: [Folder; 3] = [Self::Source, Self::Target, Self::Eval];

    fn dir(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Target => "target",
            Self::Eval => "eval",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Self::Source => "src",
            Self::Target => "tgt",
            Self::Eval => "tgt-test",
        }
    }

    fn domain(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Target | Self::Eval => "target",
        }
    }

    fn split(self) -> &'static str {
        match self {
            Self::Source | Self::Target => "train",
            Self::Eval => "test",
        }
    }

    fn is_target(self) -> bool {
        self != Self::Source
    }

    fn rows(self, o: &TrainCorpusOptions) -> usize {
        match self {
            Self::Source => o.rows_source,
            Self::Target => o.rows_target,
            Self::Eval => o.rows_eval,
        }
    }

    fn shards(self, o: &TrainCorpusOptions) -> usize {
        match self {
            Self::Source | Self::Target => o.shards,
            Self::Eval => 1,
        }
    }
}

/// Generates the corpus `opts` describes; see the module docs.
pub fn generate_train_corpus(opts: &TrainCorpusOptions) -> Result<TrainCorpusSummary> {
    validate(opts)?;
    fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let ours = opts.out.join(MARKER).exists();
    for folder in Folder::ALL {
        let dir = opts.out.join(folder.dir());
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        remove_stale_shards(&dir, folder.shards(opts), ours)?;
    }
    let ctx = Ctx {
        opts,
        schema: schema(opts.feature_dim),
        props: image_writer_props(ColumnPath::from("image"), ROW_GROUP_ROWS)?,
        class_vectors: class_vectors(opts),
    };
    let mut folders = Vec::with_capacity(Folder::ALL.len());
    for (index, folder) in Folder::ALL.into_iter().enumerate() {
        folders.push(write_folder(&ctx, folder, index)?);
    }
    let mut folders = folders.into_iter();
    let (Some(source), Some(target), Some(eval)) = (folders.next(), folders.next(), folders.next())
    else {
        return Err(Error::Internal(
            "train corpus: a folder was not written".into(),
        ));
    };
    let summary = TrainCorpusSummary {
        pseudo_label_accuracy: target.pseudo_label_accuracy,
        source,
        target,
        eval,
    };
    let meta = serde_json::json!({ "summary": &summary, "options": opts });
    let path = opts.out.join(MARKER);
    let text = serde_json::to_vec_pretty(&meta).map_err(|e| Error::output(&path, e))?;
    fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(summary)
}

fn validate(o: &TrainCorpusOptions) -> Result<()> {
    let bad = |msg: String| Err(Error::Invalid(format!("train corpus: {msg}")));
    if o.shards == 0 {
        return bad("shards must be at least 1".into());
    }
    for (name, rows) in [
        ("rows_source", o.rows_source),
        ("rows_target", o.rows_target),
    ] {
        if rows < o.shards {
            return bad(format!(
                "{name} ({rows}) must be at least the shard count ({})",
                o.shards
            ));
        }
    }
    if o.rows_eval == 0 {
        return bad("rows_eval must be at least 1".into());
    }
    if !(2..=1000).contains(&o.classes) {
        return bad(format!("classes must be in 2..=1000, got {}", o.classes));
    }
    if !(8..=512).contains(&o.image_size) {
        return bad(format!(
            "image_size must be in 8..=512, got {}",
            o.image_size
        ));
    }
    if !(1..=4096).contains(&o.feature_dim) {
        return bad(format!(
            "feature_dim must be in 1..=4096, got {}",
            o.feature_dim
        ));
    }
    for (name, v) in [
        ("pseudo_noise", o.pseudo_noise),
        ("bad_image_rate", o.bad_image_rate),
    ] {
        // Also rejects NaN.
        if !(0.0..=1.0).contains(&v) {
            return bad(format!("{name} must be within [0, 1], got {v}"));
        }
    }
    Ok(())
}

/// The enriched schema: `id` is never null; the other columns are nullable like the
/// enrichment pipeline's output, though this generator never writes a null.
fn schema(feature_dim: usize) -> SchemaRef {
    let utf8 = |name: &str| Field::new(name, DataType::Utf8, true);
    let int = |name: &str| Field::new(name, DataType::Int64, true);
    let float = |name: &str| Field::new(name, DataType::Float32, true);
    // feature_dim <= 4096 (validated), so the cast is lossless.
    let feature = DataType::FixedSizeList(
        Arc::new(Field::new_list_field(DataType::Float32, true)),
        feature_dim as i32,
    );
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("image", DataType::LargeBinary, true),
        utf8("caption"),
        int("label"),
        utf8("domain"),
        utf8("split"),
        int("pseudo_label"),
        float("pseudo_prob"),
        float("pseudo_weight"),
        Field::new("text_feature", feature, true),
    ]))
}

/// One random unit vector per class, from a stream of its own so that every folder
/// shares them (the caption feature of a class must not depend on the folder).
fn class_vectors(o: &TrainCorpusOptions) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed ^ 0x5EED_FEA7_0000_0000);
    (0..o.classes)
        .map(|_| {
            let mut v: Vec<f64> = (0..o.feature_dim).map(|_| gaussian(&mut rng)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            } else {
                // Practically impossible; keeps the vector a unit one all the same.
                v[0] = 1.0;
            }
            v
        })
        .collect()
}

/// A standard normal draw (Box-Muller); `rand_distr` is not a dependency.
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // (0, 1], so the log is finite
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// A Beta(a, b) draw for whole a and b, as Ga / (Ga + Gb) with Gamma(k, 1) variables
/// made of k exponentials. In [0, 1].
fn beta(rng: &mut ChaCha8Rng, (a, b): (u32, u32)) -> f64 {
    let mut gamma = |k: u32| -> f64 { (0..k).map(|_| -(1.0 - rng.random::<f64>()).ln()).sum() };
    let (ga, gb) = (gamma(a), gamma(b));
    if ga + gb > 0.0 { ga / (ga + gb) } else { 0.5 }
}

/// `n` flags of which exactly `round(rate * n)` are true, in random order: exact shares
/// keep small test corpora close to the requested rates.
fn exact_flags(rng: &mut ChaCha8Rng, n: usize, rate: f64) -> Vec<bool> {
    let k = ((rate * n as f64).round() as usize).min(n);
    let mut flags: Vec<bool> = (0..n).map(|i| i < k).collect();
    flags.shuffle(rng);
    flags
}

/// Shared, read-only state of a run.
struct Ctx<'a> {
    opts: &'a TrainCorpusOptions,
    schema: SchemaRef,
    props: WriterProperties,
    class_vectors: Vec<Vec<f64>>,
}

/// Column builders for one batch.
struct Columns {
    id: StringBuilder,
    image: LargeBinaryBuilder,
    caption: StringBuilder,
    label: Int64Builder,
    domain: StringBuilder,
    split: StringBuilder,
    pseudo_label: Int64Builder,
    pseudo_prob: Float32Builder,
    pseudo_weight: Float32Builder,
    text_feature: FixedSizeListBuilder<Float32Builder>,
}

impl Columns {
    fn new(feature_dim: usize) -> Self {
        let item = Arc::new(Field::new_list_field(DataType::Float32, true));
        Self {
            id: StringBuilder::new(),
            image: LargeBinaryBuilder::new(),
            caption: StringBuilder::new(),
            label: Int64Builder::new(),
            domain: StringBuilder::new(),
            split: StringBuilder::new(),
            pseudo_label: Int64Builder::new(),
            pseudo_prob: Float32Builder::new(),
            pseudo_weight: Float32Builder::new(),
            // feature_dim <= 4096 (validated), so the cast is lossless.
            text_feature: FixedSizeListBuilder::new(Float32Builder::new(), feature_dim as i32)
                .with_field(item),
        }
    }

    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.id.finish()),
            Arc::new(self.image.finish()),
            Arc::new(self.caption.finish()),
            Arc::new(self.label.finish()),
            Arc::new(self.domain.finish()),
            Arc::new(self.split.finish()),
            Arc::new(self.pseudo_label.finish()),
            Arc::new(self.pseudo_prob.finish()),
            Arc::new(self.pseudo_weight.finish()),
            Arc::new(self.text_feature.finish()),
        ];
        RecordBatch::try_new(schema.clone(), cols).map_err(|source| Error::Arrow {
            context: "train corpus: building a batch".into(),
            source,
        })
    }
}

/// The per-row plan of a folder, drawn up front so that labels are balanced and the
/// noise and bad-image shares are exact over the folder.
struct Plan {
    labels: Vec<usize>,
    wrong: Vec<bool>,
    bad: Vec<bool>,
}

fn plan(rng: &mut ChaCha8Rng, folder: Folder, o: &TrainCorpusOptions) -> Plan {
    let n = folder.rows(o);
    let mut labels: Vec<usize> = (0..n).map(|i| i % o.classes).collect();
    labels.shuffle(rng);
    let noise = if folder.is_target() {
        o.pseudo_noise
    } else {
        0.0
    };
    let wrong = exact_flags(rng, n, noise);
    let bad = exact_flags(rng, n, o.bad_image_rate);
    Plan { labels, wrong, bad }
}

fn write_folder(ctx: &Ctx, folder: Folder, index: usize) -> Result<FolderSummary> {
    let opts = ctx.opts;
    let dir = opts.out.join(folder.dir());
    let seed = opts.seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let plan = plan(&mut rng, folder, opts);
    let rows = plan.labels.len();
    let shards = folder.shards(opts);
    let mut summary = FolderSummary {
        path: dir.clone(),
        shards: Vec::with_capacity(shards),
        rows,
        bad_rows: plan.bad.iter().filter(|b| **b).count(),
        pseudo_label_accuracy: plan.wrong.iter().filter(|w| !**w).count() as f64 / rows as f64,
    };
    let mut start = 0;
    for shard in 0..shards {
        let len = rows / shards + usize::from(shard < rows % shards);
        let stem = shard_stem(shard);
        let path = dir.join(format!("{stem}.parquet"));
        let tmp = dir.join(format!(".{stem}.parquet.tmp"));
        match write_shard(ctx, folder, &plan, start..start + len, &tmp, &mut rng) {
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

fn write_shard(
    ctx: &Ctx,
    folder: Folder,
    plan: &Plan,
    range: std::ops::Range<usize>,
    tmp: &Path,
    rng: &mut ChaCha8Rng,
) -> Result<()> {
    let opts = ctx.opts;
    let file = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut writer = ArrowWriter::try_new(file, ctx.schema.clone(), Some(ctx.props.clone()))
        .map_err(|e| Error::output(tmp, e))?;
    let mut cols = Columns::new(opts.feature_dim);
    let (mut buf, mut text) = (Vec::new(), String::new());
    let end = range.end;
    for row in range {
        let label = plan.labels[row];
        text.clear();
        let _ = write!(text, "{}-{row:06}", folder.id_prefix()); // a String cannot fail
        cols.id.append_value(&text);

        buf.clear();
        if plan.bad[row] {
            bad_bytes(rng, &mut buf);
        } else {
            let img = render(
                rng,
                label,
                opts.classes,
                opts.image_size,
                folder.is_target(),
            );
            PngEncoder::new(&mut buf)
                .write_image(
                    img.as_raw(),
                    img.width(),
                    img.height(),
                    ExtendedColorType::Rgb8,
                )
                .map_err(|e| Error::output(tmp, format!("encoding a PNG: {e}")))?;
        }
        cols.image.append_value(&buf);

        let template = CAPTION_TEMPLATES[rng.random_range(0..CAPTION_TEMPLATES.len())];
        cols.caption
            .append_value(template.replace("{}", &label.to_string()));
        cols.label.append_value(label as i64);
        cols.domain.append_value(folder.domain());
        cols.split.append_value(folder.split());

        let (pseudo, prob, weight) = if folder.is_target() {
            let wrong = plan.wrong[row];
            let pseudo = if wrong {
                (label + rng.random_range(1..opts.classes)) % opts.classes
            } else {
                label
            };
            let params = if wrong { BETA_WRONG } else { BETA_RIGHT };
            // An argmax softmax probability is at least 1 / C, so never 0.
            let floor = 1.0 / opts.classes as f64;
            let prob = floor + (1.0 - floor) * beta(rng, params);
            (pseudo, prob, beta(rng, params))
        } else {
            (label, 1.0, 1.0)
        };
        cols.pseudo_label.append_value(pseudo as i64);
        cols.pseudo_prob.append_value(prob as f32);
        cols.pseudo_weight.append_value(weight as f32);
        for &x in &ctx.class_vectors[pseudo] {
            let noisy = x + FEATURE_NOISE * gaussian(rng);
            cols.text_feature.values().append_value(noisy as f32);
        }
        cols.text_feature.append(true);

        if (row + 1).is_multiple_of(ROW_GROUP_ROWS) || row + 1 == end {
            let batch = cols.finish(&ctx.schema)?;
            writer.write(&batch).map_err(|e| Error::output(tmp, e))?;
        }
    }
    writer.close().map_err(|e| Error::output(tmp, e))?;
    Ok(())
}

/// Random bytes whose first byte is 0, which no supported format (PNG 0x89, JPEG 0xFF,
/// WebP `R`) starts with, so the row is undecodable for certain, not just very likely.
fn bad_bytes(rng: &mut ChaCha8Rng, buf: &mut Vec<u8>) {
    buf.resize(rng.random_range(16..=256), 0);
    rng.fill_bytes(buf);
    buf[0] = 0;
}

/// The picture of class `label`: a Gaussian blob at angle `2 pi label / classes` on a
/// circle around the centre, jittered, over a domain-specific background.
///
/// Source: grey noise, a near-white high-contrast blob. Target: purple background with
/// diagonal stripes at a random angle, a yellowish blob of lower contrast, more jitter.
fn render(rng: &mut ChaCha8Rng, label: usize, classes: usize, size: u32, target: bool) -> RgbImage {
    let s = f64::from(size);
    let angle = TAU * label as f64 / classes as f64;
    let jitter = s * if target { 0.09 } else { 0.06 };
    let centre = s / 2.0 - 0.5;
    let cx = centre + 0.28 * s * angle.cos() + rng.random_range(-jitter..=jitter);
    let cy = centre + 0.28 * s * angle.sin() + rng.random_range(-jitter..=jitter);
    let sigma = s * if target { 0.11 } else { 0.09 };
    let contrast = rng.random_range(0.85..=1.0);
    let (background, blob, noise) = if target {
        ([110.0, 80.0, 140.0], [150.0, 140.0, 60.0], 15.0)
    } else {
        ([40.0, 40.0, 40.0], [200.0, 200.0, 200.0], 25.0)
    };
    let stripe_angle = rng.random_range(0.0..std::f64::consts::PI);
    let (sx, sy) = (stripe_angle.cos(), stripe_angle.sin());
    let phase = rng.random_range(0.0..TAU);
    let mut img = RgbImage::new(size, size);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (f64::from(x), f64::from(y));
        let d2 = (fx - cx).powi(2) + (fy - cy).powi(2);
        let bump = contrast * (-d2 / (2.0 * sigma * sigma)).exp();
        let stripe = if target {
            30.0 * (TAU * (fx * sx + fy * sy) / 4.0 + phase).sin()
        } else {
            0.0
        };
        let bits = rng.next_u32();
        for (c, out) in px.0.iter_mut().enumerate() {
            let n = f64::from((bits >> (8 * c)) & 0xff) / 255.0 * 2.0 * noise - noise;
            *out = (background[c] + stripe + n + blob[c] * bump).clamp(0.0, 255.0) as u8;
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Array, AsArray, FixedSizeListArray, Float32Array, Int64Array, LargeBinaryArray,
    };
    use arrow::datatypes::{Float32Type, Int64Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use trustflow_engine::models::image::{ImageFormatName, ImageLimits, decode_rgb};
    use trustflow_train::metrics::auroc;

    fn opts(out: &Path) -> TrainCorpusOptions {
        TrainCorpusOptions {
            rows_source: 40,
            rows_target: 40,
            rows_eval: 20,
            shards: 2,
            seed: 7,
            out: out.to_path_buf(),
            ..TrainCorpusOptions::default()
        }
    }

    /// Every row of a folder's shards, as one batch per shard.
    fn read(paths: &[PathBuf]) -> Vec<RecordBatch> {
        paths
            .iter()
            .flat_map(|p| {
                let file = File::open(p).unwrap();
                ParquetRecordBatchReaderBuilder::try_new(file)
                    .unwrap()
                    .build()
                    .unwrap()
                    .map(|b| b.unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn column<'a>(batch: &'a RecordBatch, name: &str) -> &'a ArrayRef {
        batch.column_by_name(name).unwrap()
    }

    #[test]
    fn schema_layout_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let summary = generate_train_corpus(&o).unwrap();
        let expected = schema(o.feature_dim);
        let mut ids = std::collections::HashSet::new();
        for (folder, written) in [
            (Folder::Source, &summary.source),
            (Folder::Target, &summary.target),
            (Folder::Eval, &summary.eval),
        ] {
            assert_eq!(written.path, dir.path().join(folder.dir()));
            let names: Vec<_> = written
                .shards
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            let want: Vec<_> = (0..folder.shards(&o))
                .map(|i| format!("part-{i:05}.parquet"))
                .collect();
            assert_eq!(names, want);
            let batches = read(&written.shards);
            let mut rows = 0;
            for b in &batches {
                assert_eq!(b.schema().as_ref(), expected.as_ref());
                rows += b.num_rows();
                for (i, id) in b.column(0).as_string::<i32>().iter().enumerate() {
                    let id = id.unwrap();
                    assert!(id.starts_with(&format!("{}-", folder.id_prefix())), "{id}");
                    assert!(ids.insert(id.to_string()), "duplicate id {id}");
                    let label = b.column(3).as_primitive::<Int64Type>().value(i);
                    let caption = b.column(2).as_string::<i32>().value(i);
                    assert!(caption.contains(&format!("class {label}")), "{caption}");
                    assert_eq!(b.column(4).as_string::<i32>().value(i), folder.domain());
                    assert_eq!(b.column(5).as_string::<i32>().value(i), folder.split());
                }
                for name in [
                    "label",
                    "pseudo_label",
                    "pseudo_prob",
                    "pseudo_weight",
                    "text_feature",
                ] {
                    assert_eq!(column(b, name).null_count(), 0, "{name}");
                }
                let label: &Int64Array = column(b, "label").as_primitive();
                let pseudo: &Int64Array = column(b, "pseudo_label").as_primitive();
                let prob: &Float32Array = column(b, "pseudo_prob").as_primitive();
                let weight: &Float32Array = column(b, "pseudo_weight").as_primitive();
                for i in 0..b.num_rows() {
                    assert!((0..o.classes as i64).contains(&label.value(i)));
                    assert!((0..o.classes as i64).contains(&pseudo.value(i)));
                    assert!(prob.value(i) > 0.0 && prob.value(i) <= 1.0);
                    assert!((0.0..=1.0).contains(&weight.value(i)));
                    if folder == Folder::Source {
                        assert_eq!(pseudo.value(i), label.value(i));
                        assert_eq!(weight.value(i), 1.0);
                    }
                }
                let features: &FixedSizeListArray = column(b, "text_feature").as_fixed_size_list();
                assert_eq!(features.value_length(), o.feature_dim as i32);
                let values = features.values().as_primitive::<Float32Type>();
                assert!(values.values().iter().all(|v| v.is_finite()));
            }
            assert_eq!(rows, folder.rows(&o));
            assert_eq!(written.rows, rows);
            assert_eq!(written.bad_rows, 0);
        }
        assert_eq!(summary.source.pseudo_label_accuracy, 1.0);
        // 40 rows at noise 0.3: exactly 12 wrong.
        assert_eq!(summary.pseudo_label_accuracy, 28.0 / 40.0);
        assert!(dir.path().join(MARKER).is_file());
    }

    #[test]
    fn same_options_give_identical_bytes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = generate_train_corpus(&opts(a.path())).unwrap();
        let sb = generate_train_corpus(&opts(b.path())).unwrap();
        let files = |s: &TrainCorpusSummary| {
            [&s.source, &s.target, &s.eval]
                .iter()
                .flat_map(|f| f.shards.clone())
                .collect::<Vec<_>>()
        };
        let (fa, fb) = (files(&sa), files(&sb));
        assert_eq!(fa.len(), 5);
        for (x, y) in fa.iter().zip(&fb) {
            assert_eq!(
                fs::read(x).unwrap(),
                fs::read(y).unwrap(),
                "{}",
                x.display()
            );
        }
        // A different seed changes the bytes.
        let c = tempfile::tempdir().unwrap();
        let sc = generate_train_corpus(&TrainCorpusOptions {
            seed: 8,
            ..opts(c.path())
        })
        .unwrap();
        assert_ne!(fs::read(&fa[0]).unwrap(), fs::read(&files(&sc)[0]).unwrap());
    }

    /// Pseudo-label accuracy matches 1 - noise, and the weights separate right from
    /// wrong pseudo-labels (AUROC near the designed 0.83) on a larger target folder.
    #[test]
    fn pseudo_labels_and_weights() {
        let dir = tempfile::tempdir().unwrap();
        let o = TrainCorpusOptions {
            rows_target: 1000,
            rows_source: 2,
            rows_eval: 1,
            shards: 2,
            image_size: 8,
            seed: 3,
            out: dir.path().to_path_buf(),
            ..TrainCorpusOptions::default()
        };
        let summary = generate_train_corpus(&o).unwrap();
        assert!((summary.pseudo_label_accuracy - 0.7).abs() < 1e-12);
        let (mut weights, mut right) = (Vec::new(), Vec::new());
        let (mut correct, mut rows) = (0, 0);
        for b in read(&summary.target.shards) {
            let label: &Int64Array = column(&b, "label").as_primitive();
            let pseudo: &Int64Array = column(&b, "pseudo_label").as_primitive();
            let weight: &Float32Array = column(&b, "pseudo_weight").as_primitive();
            for i in 0..b.num_rows() {
                let ok = label.value(i) == pseudo.value(i);
                correct += usize::from(ok);
                rows += 1;
                right.push(ok);
                weights.push(f64::from(weight.value(i)));
            }
        }
        assert_eq!(rows, 1000);
        assert_eq!(correct, 700);
        let a = auroc(&weights, &right).unwrap();
        assert!((0.75..0.9).contains(&a), "AUROC {a}");
    }

    #[test]
    fn bad_rows_are_undecodable_and_good_ones_decode() {
        let dir = tempfile::tempdir().unwrap();
        let o = TrainCorpusOptions {
            bad_image_rate: 0.25,
            ..opts(dir.path())
        };
        let summary = generate_train_corpus(&o).unwrap();
        assert_eq!(summary.source.bad_rows, 10);
        assert_eq!(summary.target.bad_rows, 10);
        assert_eq!(summary.eval.bad_rows, 5);
        let limits = ImageLimits::default();
        for folder in [&summary.source, &summary.target, &summary.eval] {
            let (mut good, mut bad) = (0, 0);
            for b in read(&folder.shards) {
                let images: &LargeBinaryArray = column(&b, "image").as_binary();
                for bytes in images.iter() {
                    match decode_rgb(bytes.unwrap(), &limits, &ImageFormatName::ALL) {
                        Ok((_, img)) => {
                            assert_eq!(img.dimensions(), (o.image_size, o.image_size));
                            good += 1;
                        }
                        Err(_) => bad += 1,
                    }
                }
            }
            assert_eq!(bad, folder.bad_rows, "{}", folder.path.display());
            assert_eq!(good + bad, folder.rows);
        }
    }

    #[test]
    fn stale_shards_and_bad_options() {
        let dir = tempfile::tempdir().unwrap();
        let stray = dir.path().join("source").join("part-00007.parquet");
        fs::create_dir_all(stray.parent().unwrap()).unwrap();
        fs::write(&stray, b"not ours").unwrap();
        // Not our folder (no marker): refuse rather than delete someone's file.
        assert!(generate_train_corpus(&opts(dir.path())).is_err());
        assert!(stray.exists());
        fs::remove_file(&stray).unwrap();
        generate_train_corpus(&opts(dir.path())).unwrap();
        // Ours now: a smaller rerun removes the extra shard.
        let one = generate_train_corpus(&TrainCorpusOptions {
            shards: 1,
            ..opts(dir.path())
        })
        .unwrap();
        assert_eq!(one.source.shards.len(), 1);
        assert!(
            !dir.path()
                .join("source")
                .join("part-00001.parquet")
                .exists()
        );

        for bad in [
            TrainCorpusOptions {
                shards: 0,
                ..opts(dir.path())
            },
            TrainCorpusOptions {
                rows_source: 1,
                ..opts(dir.path())
            },
            TrainCorpusOptions {
                rows_eval: 0,
                ..opts(dir.path())
            },
            TrainCorpusOptions {
                classes: 1,
                ..opts(dir.path())
            },
            TrainCorpusOptions {
                pseudo_noise: f64::NAN,
                ..opts(dir.path())
            },
            TrainCorpusOptions {
                bad_image_rate: 1.5,
                ..opts(dir.path())
            },
            TrainCorpusOptions {
                image_size: 4,
                ..opts(dir.path())
            },
            TrainCorpusOptions {
                feature_dim: 0,
                ..opts(dir.path())
            },
        ] {
            assert!(generate_train_corpus(&bad).is_err(), "{bad:?}");
        }
    }

    /// Generation speed with the default options (2400 rows, 16x16 images); prints
    /// rows per second. `cargo test --lib generation_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a check"]
    fn generation_speed() {
        let dir = tempfile::tempdir().unwrap();
        let o = TrainCorpusOptions {
            out: dir.path().to_path_buf(),
            ..TrainCorpusOptions::default()
        };
        let started = std::time::Instant::now();
        let summary = generate_train_corpus(&o).unwrap();
        let seconds = started.elapsed().as_secs_f64();
        let rows = summary.source.rows + summary.target.rows + summary.eval.rows;
        println!(
            "train corpus: {rows} rows in {seconds:.3} s = {:.0} rows/s",
            rows as f64 / seconds
        );
    }

    /// The caption features cluster by pseudo-label: rows of one class are much closer
    /// to each other than to another class's rows.
    #[test]
    fn text_features_follow_pseudo_labels() {
        let dir = tempfile::tempdir().unwrap();
        let summary = generate_train_corpus(&opts(dir.path())).unwrap();
        let mut by_class: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 4];
        for b in read(&summary.target.shards) {
            let pseudo: &Int64Array = column(&b, "pseudo_label").as_primitive();
            let features = column(&b, "text_feature").as_fixed_size_list();
            for i in 0..b.num_rows() {
                let v = features.value(i);
                let v = v.as_primitive::<Float32Type>().values().to_vec();
                by_class[pseudo.value(i) as usize].push(v);
            }
        }
        let cos = |a: &[f32], b: &[f32]| {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
            let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
            dot / (na * nb)
        };
        for class in &by_class {
            assert!(class.len() >= 2);
            assert!(cos(&class[0], &class[1]) > 0.9);
        }
        assert!(cos(&by_class[0][0], &by_class[1][0]) < 0.9);
    }
}
