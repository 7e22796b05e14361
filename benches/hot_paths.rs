//! Criterion micro-benchmarks of the per-row hot paths: image validation + decoding,
//! caption cleaning, and a whole stage applied to a batch (what a worker does).
//! Run with `cargo bench --bench hot_paths` (release build).

use std::sync::Arc;

use arrow::array::{ArrayRef, LargeBinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use trustflow::models::image::{ImageFormatName, ImageLimits, decode_rgb};
use trustflow::stages::Stage;
use trustflow::stages::clean_caption::{CleanCaptionConfig, CleanCaptionStage, clean_caption};
use trustflow::stages::decode::{DecodeConfig, DecodeStage};

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

criterion_group!(benches, bench_decode, bench_clean);
criterion_main!(benches);
