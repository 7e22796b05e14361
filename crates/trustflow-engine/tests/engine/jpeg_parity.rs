//! JPEG decoding is byte-identical to Pillow's `Image.open(f).convert("RGB")` (Pillow 13,
//! libjpeg-turbo): the cases of tests/fixtures/jpeg (made by
//! scripts/fixtures/make_jpeg_parity.py: baseline and progressive, 4:4:4, 4:2:2, 4:2:0,
//! greyscale, CMYK, RGB without the YCbCr transform, restart markers, tiny sizes,
//! saturated patterns) and the JPEG photo crops of tests/fixtures/clip. Pillow's pixels
//! are stored as PNG; no Python at test time.

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};
use trustflow_engine::models::image::{
    ImageFormatName, ImageLimits, ReadWindow, Window, decode_rgb, decode_rgb_part,
};

fn fixtures() -> PathBuf {
    trustflow_testutil::repo_root().join("tests/fixtures")
}

fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (info, rgb) = decode_rgb(&bytes, &ImageLimits::default(), &ImageFormatName::ALL)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(rgb.dimensions(), (info.width, info.height));
    (info.width, info.height, rgb.into_raw())
}

/// Compare our decode of `jpeg` with Pillow's pixels in `png`; `None` when identical,
/// else a description of the difference.
fn compare(jpeg: &Path, png: &Path) -> Option<String> {
    let (w, h, ours) = decode(jpeg);
    let (pw, ph, pillow) = decode(png);
    if (w, h) != (pw, ph) {
        return Some(format!("size {w}x{h}, Pillow {pw}x{ph}"));
    }
    let differing = ours.iter().zip(&pillow).filter(|(a, b)| a != b).count();
    if differing == 0 {
        return None;
    }
    let max = ours
        .iter()
        .zip(&pillow)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    Some(format!(
        "{differing} of {} bytes differ, by up to {max}",
        ours.len()
    ))
}

#[test]
fn generated_cases_match_pillow_byte_for_byte() {
    let dir = fixtures().join("jpeg");
    let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
    let document: Value = serde_json::from_str(&text).unwrap();
    let cases = document["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for case in cases {
        let file = case["file"].as_str().unwrap();
        let jpeg = dir.join(file);
        if let Some(problem) = compare(&jpeg, &dir.join(case["decoded"].as_str().unwrap())) {
            failures.push(format!("{file} ({}): {problem}", case["options"]));
            continue;
        }
        // The PNG holds exactly the bytes Pillow decoded.
        let (w, h, ours) = decode(&jpeg);
        assert_eq!(
            (u64::from(w), u64::from(h)),
            (
                case["width"].as_u64().unwrap(),
                case["height"].as_u64().unwrap()
            )
        );
        let digest: String = Sha256::digest(&ours)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if digest != case["rgb_sha256"].as_str().unwrap() {
            failures.push(format!("{file}: SHA-256 of the RGB bytes differs"));
        }
    }
    // Every kind of file the script writes is covered.
    for mode in ["RGB", "L", "CMYK"] {
        assert!(cases.iter().any(|c| c["mode"] == mode), "{mode}");
    }
    assert!(cases.iter().any(|c| c["progressive"] == true));
    assert!(failures.is_empty(), "{failures:#?}");
}

/// `decode_rgb_draft` (the `jpeg_draft` fast path) gives Pillow's pixels after
/// `draft("RGB", (w // s, h // s))` at scales 2, 4 and 8: same size, same bytes.
#[test]
fn draft_decodes_match_pillow_draft_byte_for_byte() {
    use trustflow_engine::models::image::{decode_rgb_draft, draft_scale};
    let dir = fixtures().join("jpeg");
    let document: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut failures = Vec::new();
    let mut checked = std::collections::BTreeMap::new();
    for case in document["cases"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(file)).unwrap();
        for draft in case["draft"].as_array().unwrap() {
            let scale = draft["scale"].as_u64().unwrap() as u32;
            let target = move |w: u32, h: u32| (w / scale, h / scale);
            let (info, rgb) = decode_rgb_draft(
                &bytes,
                &ImageLimits::default(),
                &ImageFormatName::ALL,
                Some(&target),
            )
            .unwrap_or_else(|e| panic!("{file} at 1/{scale}: {e}"));
            assert_eq!(
                draft_scale((info.width, info.height), target(info.width, info.height)),
                scale,
                "{file}"
            );
            let size = (u64::from(rgb.width()), u64::from(rgb.height()));
            let want = (
                draft["width"].as_u64().unwrap(),
                draft["height"].as_u64().unwrap(),
            );
            let digest: String = Sha256::digest(rgb.as_raw())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if size != want || digest != draft["rgb_sha256"].as_str().unwrap() {
                failures.push(format!("{file} at 1/{scale}: {size:?}, Pillow {want:?}"));
            }
            *checked.entry(scale).or_insert(0) += 1;
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(checked.values().all(|&n| n >= 15), "{checked:?}");
}

/// The rectangle `window` of an RGB image `width` pixels wide.
fn crop(pixels: &[u8], width: usize, window: Window) -> Vec<u8> {
    (window.top..window.top + window.height)
        .flat_map(|y| {
            let start = (y * width + window.left) * 3;
            pixels[start..start + window.width * 3].iter().copied()
        })
        .collect()
}

/// Rectangles of a `width` x `height` image to ask for: ones that hug each edge and
/// iMCU boundary (0, 1, 7, 8, 9, 15, 16, 17 from either side), a centre crop, and
/// random ones.
fn windows(width: usize, height: usize, next: &mut impl FnMut(usize) -> usize) -> Vec<Window> {
    let near = |n: usize| -> Vec<usize> {
        let mut at: Vec<usize> = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33]
            .into_iter()
            .flat_map(|d| [d, n.saturating_sub(d + 1)])
            .chain([n / 3, n / 2])
            .filter(|&i| i < n)
            .collect();
        at.sort_unstable();
        at.dedup();
        at
    };
    let (xs, ys) = (near(width), near(height));
    let mut out = vec![Window {
        left: width / 5,
        top: height / 5,
        width: (width * 3 / 5).max(1),
        height: (height * 3 / 5).max(1),
    }];
    for _ in 0..120 {
        let (a, b) = (xs[next(xs.len())], xs[next(xs.len())]);
        let (c, d) = (ys[next(ys.len())], ys[next(ys.len())]);
        out.push(Window {
            left: a.min(b),
            top: c.min(d),
            width: a.abs_diff(b) + 1,
            height: c.abs_diff(d) + 1,
        });
    }
    for _ in 0..40 {
        let (left, top) = (next(width), next(height));
        out.push(Window {
            left,
            top,
            width: 1 + next(width - left),
            height: 1 + next(height - top),
        });
    }
    out
}

/// Decoding part of a JPEG (libjpeg-turbo's crop and skip, with the margin the decoder
/// keeps) holds exactly the bytes of the same rectangle of the whole decode: against
/// Pillow's pixels at full size, and at each draft scale against our whole draft
/// decode (which `draft_decodes_match_pillow_draft_byte_for_byte` checks against
/// Pillow). Every fixture case, every subsampling and scan kind, rectangles at every
/// edge and iMCU boundary.
#[test]
fn decoding_part_of_a_jpeg_gives_the_whole_decodes_bytes() {
    use trustflow_engine::models::image::decode_rgb_draft;
    let dir = fixtures().join("jpeg");
    let document: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound.max(1) as u64) as usize
    };
    let limits = ImageLimits::default();
    let (mut checked, mut cropped, mut skipped) = (0, 0, 0);
    let mut failures = Vec::new();
    for case in document["cases"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let scales = std::iter::once(1).chain(
            case["draft"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["scale"].as_u64().unwrap() as u32),
        );
        for scale in scales {
            let target = move |w: u32, h: u32| (w / scale, h / scale);
            let (width, height, whole) = if scale == 1 {
                let (w, h, pillow) = decode(&dir.join(case["decoded"].as_str().unwrap()));
                (w as usize, h as usize, pillow)
            } else {
                let (_, rgb) =
                    decode_rgb_draft(&bytes, &limits, &ImageFormatName::ALL, Some(&target))
                        .unwrap();
                (rgb.width() as usize, rgb.height() as usize, rgb.into_raw())
            };
            for window in windows(width, height, &mut next) {
                let reads = move |_: (usize, usize), _: (u32, u32)| window;
                let (_, part) = decode_rgb_part(
                    &bytes,
                    &limits,
                    &ImageFormatName::ALL,
                    (scale > 1).then_some(&target as _),
                    Some(&reads as ReadWindow<'_>),
                )
                .unwrap_or_else(|e| panic!("{file} at 1/{scale}, {window:?}: {e}"));
                checked += 1;
                assert_eq!(
                    (part.width, part.height),
                    (width, height),
                    "{file} at 1/{scale}"
                );
                assert!(
                    part.held.contains(&window),
                    "{file}: {:?} misses {window:?}",
                    part.held
                );
                cropped += usize::from(part.held.width < width);
                skipped += usize::from(part.held.top > 0);
                if part.pixels != crop(&whole, width, part.held) {
                    failures.push(format!(
                        "{file} at 1/{scale}: {window:?} held as {:?}",
                        part.held
                    ));
                }
            }
        }
    }
    eprintln!("{checked} parts: {cropped} cropped, {skipped} skipped rows above");
    assert!(
        failures.is_empty(),
        "{} of {checked}: {failures:#?}",
        failures.len()
    );
    // The larger cases do make libjpeg crop and skip.
    assert!(
        cropped > checked / 10 && skipped > checked / 10,
        "{cropped} {skipped} of {checked}"
    );
}

#[test]
fn clip_fixture_jpegs_match_pillow_byte_for_byte() {
    let dir = fixtures().join("clip");
    let mut checked = 0;
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(dir.join("images")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("jpg") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let png = dir.join("decoded").join(format!("{stem}.png"));
        if let Some(problem) = compare(&path, &png) {
            failures.push(format!("{stem}: {problem}"));
        }
        checked += 1;
    }
    assert_eq!(checked, 5);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Damaged copies of every fixture JPEG (progressive, CMYK, restart markers, ...):
/// random bytes overwritten, segments cut out. libjpeg must either decode them at the
/// header's size or return an error; a panic, an abort, or a Rust panic caught inside
/// the decoder ("crashed") fails the test.
#[test]
fn damaged_fixture_jpegs_never_crash() {
    let mut files = Vec::new();
    for dir in [fixtures().join("jpeg"), fixtures().join("clip/images")] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) == Some("jpg") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound as u64) as usize
    };
    let (mut decoded, mut refused) = (0, 0);
    for path in &files {
        let original = std::fs::read(path).unwrap();
        for round in 0..150 {
            let mut bytes = original.clone();
            if round % 3 == 2 {
                // Cut a run of bytes out of the middle (EOI stays).
                let start = 2 + next(bytes.len() - 4);
                let end = (start + 1 + next(64)).min(bytes.len() - 2);
                bytes.drain(start..end);
            } else {
                // Overwrite a few bytes; the first round biased to the headers.
                let span = if round % 3 == 0 {
                    700.min(bytes.len())
                } else {
                    bytes.len()
                };
                for _ in 0..1 + next(4) {
                    let i = next(span);
                    bytes[i] = next(256) as u8;
                }
            }
            let whole = decode_rgb(&bytes, &ImageLimits::default(), &ImageFormatName::ALL);
            // A decode of the centre (crop and skip) reads all the data too: it accepts
            // and refuses the same files, with the same bytes.
            let centre = |(w, h): (usize, usize), _: (u32, u32)| Window {
                left: w / 4,
                top: h / 4,
                width: (w / 2).max(1),
                height: (h / 2).max(1),
            };
            let part = decode_rgb_part(
                &bytes,
                &ImageLimits::default(),
                &ImageFormatName::ALL,
                None,
                Some(&centre as ReadWindow<'_>),
            );
            match (&whole, &part) {
                (Ok((_, rgb)), Ok((_, part))) => {
                    let width = rgb.width() as usize;
                    assert_eq!(
                        part.pixels,
                        crop(rgb.as_raw(), width, part.held),
                        "{}",
                        path.display()
                    );
                }
                (Err(a), Err(b)) => assert_eq!(a, b, "{}", path.display()),
                _ => panic!(
                    "{}: whole {:?}, part {:?}",
                    path.display(),
                    whole.as_ref().err(),
                    part.as_ref().err()
                ),
            }
            match whole {
                Ok((info, rgb)) => {
                    assert_eq!(rgb.dimensions(), (info.width, info.height));
                    decoded += 1;
                }
                Err(e) => {
                    let message = e.to_string();
                    assert!(
                        !message.contains("crashed"),
                        "{}: {message}",
                        path.display()
                    );
                    refused += 1;
                }
            }
        }
    }
    eprintln!("damaged JPEGs: {decoded} decoded, {refused} refused");
    assert!(decoded > 0 && refused > 0);
}

fn zune_rgb(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
        .unwrap()
        .into_rgb8()
}

/// A diagnostic, not a check (`cargo test -p trustflow-engine --test engine
/// jpeg_parity -- --ignored --nocapture`): how far the `image` crate's zune-jpeg, the
/// JPEG decoder used before, is from Pillow on the fixtures, and the decode speed of two
/// real photos, ours (libjpeg-turbo's C code, no SIMD) against zune-jpeg's.
#[test]
#[ignore]
fn zune_jpeg_difference_and_speed() {
    let mut cases = Vec::new();
    let jpeg_dir = fixtures().join("jpeg");
    let clip_dir = fixtures().join("clip");
    for entry in std::fs::read_dir(&jpeg_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("jpg") {
            cases.push((path.clone(), path.with_extension("png")));
        }
    }
    for entry in std::fs::read_dir(clip_dir.join("images")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("jpg") {
            let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
            cases.push((path, clip_dir.join("decoded").join(format!("{stem}.png"))));
        }
    }
    cases.sort();
    for (jpeg, png) in cases {
        let zune = zune_rgb(&std::fs::read(&jpeg).unwrap()).into_raw();
        let (_, _, pillow) = decode(&png);
        let differing = zune.iter().zip(&pillow).filter(|(a, b)| a != b).count();
        let max = zune.iter().zip(&pillow).map(|(a, b)| a.abs_diff(*b)).max();
        eprintln!(
            "zune-jpeg vs Pillow, {}: {differing} of {} bytes differ, max {max:?}",
            jpeg.file_name().unwrap().to_string_lossy(),
            pillow.len()
        );
    }
    let Ok(dir) = std::env::var("TRUSTFLOW_PHOTOS_DIR") else {
        return;
    };
    for name in ["china.jpg", "flower.jpg"] {
        let bytes = std::fs::read(Path::new(&dir).join(name)).unwrap();
        let runs = 30;
        let started = std::time::Instant::now();
        for _ in 0..runs {
            decode_rgb(&bytes, &ImageLimits::default(), &ImageFormatName::ALL).unwrap();
        }
        let ours = started.elapsed() / runs;
        let started = std::time::Instant::now();
        for _ in 0..runs {
            zune_rgb(&bytes);
        }
        let zune = started.elapsed() / runs;
        eprintln!("{name}: decode_rgb {ours:?}, zune-jpeg {zune:?}");
    }
}
