//! PNG decoding gives Pillow's `Image.open(f).convert("RGB")` byte for byte, and CLIP
//! preprocessing of it CLIPImageProcessor's pixel_values, for every bit depth and
//! colour type: the cases of tests/fixtures/png (made by
//! scripts/fixtures/make_png_parity.py: greyscale at 1, 2, 4, 8 and 16 bits, RGB,
//! palette, grey with alpha and RGBA at 8 and 16 bits, tRNS chunks, Adam7 interlacing).
//! The 16-bit cases are the ones that matter: Pillow keeps the high byte of 16-bit
//! colour samples and clamps 16-bit greyscale to 0..255, where a plain conversion
//! would scale. No Python at test time.

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};
use trustflow_engine::models::clip_preprocess::ClipImageConfig;
use trustflow_engine::models::image::{ImageFormatName, ImageLimits, decode_rgb};

fn dir() -> PathBuf {
    trustflow_testutil::repo_root().join("tests/fixtures/png")
}

fn decode(path: &Path) -> image::RgbImage {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    decode_rgb(&bytes, &ImageLimits::default(), &ImageFormatName::ALL)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .1
}

fn cases() -> (Value, Vec<Value>) {
    let text = std::fs::read_to_string(dir().join("cases.json")).unwrap();
    let document: Value = serde_json::from_str(&text).unwrap();
    let cases = document["cases"].as_array().unwrap().clone();
    (document, cases)
}

#[test]
fn every_bit_depth_and_colour_type_decodes_as_pillow_does() {
    let (_, cases) = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let file = case["file"].as_str().unwrap();
        let ours = decode(&dir().join(file));
        let pillow = decode(&dir().join(case["decoded"].as_str().unwrap()));
        let size = (u64::from(ours.width()), u64::from(ours.height()));
        let want = (
            case["width"].as_u64().unwrap(),
            case["height"].as_u64().unwrap(),
        );
        let digest: String = Sha256::digest(ours.as_raw())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if size != want || digest != case["rgb_sha256"].as_str().unwrap() {
            let max = ours
                .as_raw()
                .iter()
                .zip(pillow.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            failures.push(format!(
                "{file} ({} bits, colour type {}, Pillow mode {}): differs by up to {max}",
                case["bit_depth"], case["colour_type"], case["pillow_mode"]
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Every layout PNG allows is covered, with tRNS and interlacing.
    for (depth, colour) in [
        (1, 0),
        (2, 0),
        (4, 0),
        (8, 0),
        (16, 0),
        (8, 2),
        (16, 2),
        (1, 3),
        (2, 3),
        (4, 3),
        (8, 3),
        (8, 4),
        (16, 4),
        (8, 6),
        (16, 6),
    ] {
        assert!(
            cases
                .iter()
                .any(|c| c["bit_depth"] == depth && c["colour_type"] == colour),
            "no case with {depth} bits and colour type {colour}"
        );
    }
    for flag in ["trns", "interlaced"] {
        assert!(
            cases
                .iter()
                .any(|c| c["bit_depth"] == 16 && c[flag] == true)
        );
    }
}

#[test]
fn clip_pixel_values_match_clip_image_processor() {
    let (document, cases) = cases();
    let config = ClipImageConfig::load(
        &trustflow_testutil::repo_root().join("tests/fixtures/clip/model/preprocessor_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(dir().join("pixel_values.bin")).unwrap();
    let expected: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let shape = &document["pixel_values_shape"];
    assert_eq!(shape, &serde_json::json!([cases.len(), 3, 32, 32]));
    let per_image = 3 * 32 * 32;
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let file = case["file"].as_str().unwrap();
        let mut ours = Vec::new();
        config
            .preprocess_into(&decode(&dir().join(file)), &mut ours)
            .unwrap();
        let want = &expected[i * per_image..(i + 1) * per_image];
        let diff = ours
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        if diff != 0.0 {
            failures.push(format!("{file}: max abs diff {diff}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
