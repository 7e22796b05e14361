//! Criterion micro-benchmarks of the per-row hot paths: image validation + decoding,
//! caption cleaning, CLIP preprocessing (decode + resize + normalise), CLIP
//! tokenisation, the uncertainty stage's weights, the TRUST losses (forward +
//! backward), and whole stages applied to a batch (what a worker does).
//! Run with `cargo bench --bench hot_paths` (release build; needs `source
//! scripts/setup.sh` for libtorch).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, LargeBinaryArray, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};
use trustflow_engine::models::clip_preprocess::ClipImageConfig;
use trustflow_engine::models::image::{ImageFormatName, ImageLimits, decode_rgb};
use trustflow_engine::models::text::{CLIP_CAPTION_CHARS, TextTokenizer};
use trustflow_engine::stages::Stage;
use trustflow_engine::stages::clean_caption::{
    CleanCaptionConfig, CleanCaptionStage, clean_caption,
};
use trustflow_engine::stages::decode::{DecodeConfig, DecodeStage};
use trustflow_engine::stages::uncertainty::{UncertaintyConfig, UncertaintyStage, group_weights};
use trustflow_train::{LossTerms, TrustBatch, trust_loss};

fn jpeg(side: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 5) as u8, ((x ^ y) * 7) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg)
        .unwrap_or(());
    out.into_inner()
}

const CAPTIONS: [&str; 4] = [
    "a photo of a red car parked by the temple",
    "Check <b>this</b> out: https://x.co/a?b=1 by @jo_doe!! 2024 &amp; more #cars 🚗🚗",
    "",
    "A very long descriptive caption about a small brown dog sitting on a wooden porch \
     in the late afternoon sun, with flowers and a bicycle leaning against the railing",
];

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_rgb");
    let all = [
        ImageFormatName::Jpeg,
        ImageFormatName::Png,
        ImageFormatName::Webp,
    ];
    for side in [64u32, 256, 1024] {
        let bytes = jpeg(side);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("jpeg", side), &bytes, |b, bytes| {
            b.iter(|| decode_rgb(bytes, &ImageLimits::default(), &all))
        });
    }
    group.finish();

    let stage = DecodeStage::new("decode".into(), DecodeConfig::default());
    let images: Vec<Vec<u8>> = (0..64).map(|i| jpeg(128 + (i % 4) * 64)).collect();
    let schema = Arc::new(Schema::new(vec![Field::new(
        "image",
        DataType::LargeBinary,
        true,
    )]));
    let column: ArrayRef = Arc::new(LargeBinaryArray::from_iter_values(images.iter()));
    let batch = RecordBatch::try_new(schema, vec![column]).unwrap_or_else(|e| panic!("{e}"));
    let mut group = c.benchmark_group("decode_stage");
    group.throughput(Throughput::Elements(64));
    group.bench_function("batch_of_64", |b| b.iter(|| stage.process(&batch)));
    group.finish();
}

fn bench_clean(c: &mut Criterion) {
    let config = CleanCaptionConfig::default();
    let mut group = c.benchmark_group("clean_caption");
    group.throughput(Throughput::Elements(1));
    group.bench_function("noisy_caption", |b| {
        b.iter(|| clean_caption(CAPTIONS[1], &config))
    });
    let stage = CleanCaptionStage::new("clean".into(), config).unwrap_or_else(|e| panic!("{e}"));
    let schema = Arc::new(Schema::new(vec![Field::new(
        "caption",
        DataType::Utf8,
        true,
    )]));
    let column: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..1024).map(|i| CAPTIONS[i % CAPTIONS.len()]),
    ));
    let batch = RecordBatch::try_new(schema, vec![column]).unwrap_or_else(|e| panic!("{e}"));
    group.throughput(Throughput::Elements(1024));
    group.bench_function("stage_batch_of_1024", |b| b.iter(|| stage.process(&batch)));
    group.finish();
}

/// Decode + CLIP preprocessing (ViT-B/32's processor: shortest side to 224 with
/// bicubic, centre crop 224, rescale, normalise) of one image, as `clip_score` does per
/// row; and the preprocessing alone on an already decoded image.
fn bench_clip_preprocess(c: &mut Criterion) {
    let config = ClipImageConfig::default();
    let all = ImageFormatName::ALL;
    let mut group = c.benchmark_group("clip_preprocess");
    group.throughput(Throughput::Elements(1));
    for side in [256u32, 640, 1024] {
        let bytes = jpeg(side);
        group.bench_with_input(
            BenchmarkId::new("decode_resize_normalise", side),
            &bytes,
            |b, bytes| {
                let mut out = Vec::with_capacity(3 * 224 * 224);
                b.iter(|| {
                    out.clear();
                    let (_, rgb) = decode_rgb(bytes, &ImageLimits::default(), &all)
                        .unwrap_or_else(|e| panic!("{e}"));
                    config.preprocess_into(&rgb, &mut out)
                })
            },
        );
        let (_, rgb) =
            decode_rgb(&bytes, &ImageLimits::default(), &all).unwrap_or_else(|e| panic!("{e}"));
        group.bench_with_input(
            BenchmarkId::new("resize_normalise", side),
            &rgb,
            |b, rgb| {
                let mut out = Vec::with_capacity(3 * 224 * 224);
                b.iter(|| {
                    out.clear();
                    config.preprocess_into(rgb, &mut out)
                })
            },
        );
    }
    group.finish();
}

/// CLIP tokenisation with the test CLIP's tokenizer.json (CLIP's BPE vocabulary):
/// one caption, and a batch of 32 encoded and padded as `clip_score` does.
fn bench_tokenise(c: &mut Criterion) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip/model/tokenizer.json");
    let tokenizer =
        TextTokenizer::load(&path, 77, Some(CLIP_CAPTION_CHARS)).unwrap_or_else(|e| panic!("{e}"));
    let mut group = c.benchmark_group("tokenise");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_caption", |b| b.iter(|| tokenizer.encode(CAPTIONS[3])));
    let batch: Vec<&str> = (0..32).map(|i| CAPTIONS[i % CAPTIONS.len()]).collect();
    group.throughput(Throughput::Elements(32));
    group.bench_function("batch_of_32_encode_and_pad", |b| {
        b.iter(|| {
            let rows: Vec<Vec<u32>> = batch
                .iter()
                .map(|c| tokenizer.encode(c).unwrap_or_default())
                .collect();
            tokenizer.pad(&rows)
        })
    });
    group.finish();
}

/// `n` random unit-ish vectors of width `d` (normalised by the code under test).
fn embeddings(rng: &mut ChaCha8Rng, n: usize, d: usize) -> Vec<Vec<f64>> {
    (0..n)
        .map(|_| {
            let v: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter().map(|x| x / norm).collect()
        })
        .collect()
}

/// The uncertainty weights: one softmax group of 32 rows of 512-wide embeddings
/// (ViT-B/32's), and the stage on a batch of 256 rows (8 groups) from Arrow columns.
fn bench_uncertainty(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (d, rows) = (512usize, 256usize);
    let images = embeddings(&mut rng, rows, d);
    let texts = embeddings(&mut rng, rows, d);
    let mut group = c.benchmark_group("uncertainty");
    group.throughput(Throughput::Elements(32));
    group.bench_function("group_weights_32x512", |b| {
        b.iter(|| group_weights(&images[..32], &texts[..32], 100.0 / 3.0))
    });
    let list = |vs: &[Vec<f64>]| -> ArrayRef {
        let values = Float32Array::from_iter_values(vs.iter().flatten().map(|x| *x as f32));
        let item = Arc::new(Field::new_list_field(DataType::Float32, true));
        Arc::new(
            FixedSizeListArray::try_new(item, d as i32, Arc::new(values), None)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    };
    let (image_col, text_col) = (list(&images), list(&texts));
    let config = UncertaintyConfig::default();
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            &config.image_embedding_column,
            image_col.data_type().clone(),
            true,
        ),
        Field::new(
            &config.text_embedding_column,
            text_col.data_type().clone(),
            true,
        ),
    ]));
    let batch =
        RecordBatch::try_new(schema, vec![image_col, text_col]).unwrap_or_else(|e| panic!("{e}"));
    let stage =
        UncertaintyStage::new("uncertainty".into(), config).unwrap_or_else(|e| panic!("{e}"));
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function("stage_batch_of_256", |b| {
        b.iter(|| stage.process(&batch).unwrap_or_else(|e| panic!("{e}")))
    });
    group.finish();
}

/// The TRUST objective (all four terms) on a trainer-sized step: 32 source and 32
/// target rows, 10 classes, 512-wide image features, 384-wide caption features
/// (MiniLM's); forward and backward, as one training step computes them.
fn bench_trust_loss(c: &mut Criterion) {
    let (b, classes, d, dt) = (32i64, 10i64, 512i64, 384i64);
    tch::manual_seed(11);
    let opts = (Kind::Float, Device::Cpu);
    let leaf = |shape: [i64; 2]| Tensor::randn(shape, opts).set_requires_grad(true);
    let batch = TrustBatch {
        source_logits: Some(leaf([b, classes])),
        source_labels: Some(Tensor::randint(classes, [b], (Kind::Int64, Device::Cpu))),
        source_features: Some(leaf([b, d])),
        source_features_strong: Some(leaf([b, d])),
        source_caption_features: Some(Tensor::rand([b, dt], opts)),
        target_logits: Some(leaf([b, classes])),
        target_strong_logits: Some(leaf([b, classes])),
        pseudo_labels: Some(Tensor::randint(classes, [b], (Kind::Int64, Device::Cpu))),
        weights: Some(Tensor::rand([b], opts)),
        target_features: Some(leaf([b, d])),
        target_features_strong: Some(leaf([b, d])),
        target_caption_features: Some(Tensor::rand([b, dt], opts)),
    };
    let terms = LossTerms::default();
    let mut group = c.benchmark_group("trust_loss");
    group.throughput(Throughput::Elements(2 * b as u64));
    group.bench_function("forward_32x32", |bench| {
        bench.iter(|| trust_loss(&batch, &terms, 0.07, 0.07).unwrap_or_else(|e| panic!("{e}")))
    });
    group.bench_function("forward_backward_32x32", |bench| {
        bench.iter(|| {
            let out = trust_loss(&batch, &terms, 0.07, 0.07).unwrap_or_else(|e| panic!("{e}"));
            out.total.backward();
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_decode,
    bench_clean,
    bench_clip_preprocess,
    bench_tokenise,
    bench_uncertainty,
    bench_trust_loss
);
criterion_main!(benches);
