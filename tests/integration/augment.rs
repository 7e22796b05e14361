//! The trainer's augmentations (crates/trustflow-train/src/augment.rs): determinism of
//! the seeded streams, the exact values of the weak view, each strong op in isolation
//! (all other ops switched off through the config), the crop sampler's statistics,
//! shapes and finiteness on tiny and extreme-aspect images, the tensor helper, and
//! config checks.

use std::time::Instant;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trustflow_train::augment::{
    AugmentConfig, AugmentError, CROP_TRIES, Chw, LUMA, StrongParams, apply_strong, batch_tensor,
    rng_for, sample_crop, strong, weak,
};

/// Every random op off, crop = whole (square) image, no normalisation: outputs are the
/// resized pixels in [0, 1].
fn plain(size: u32) -> AugmentConfig {
    AugmentConfig {
        size,
        mean: [0.0; 3],
        std: [1.0; 3],
        scale: [1.0, 1.0],
        ratio: [1.0, 1.0],
        flip_p: 0.0,
        jitter_p: 0.0,
        grayscale_p: 0.0,
        blur_p: 0.0,
        ..AugmentConfig::default()
    }
}

fn noise(width: u32, height: u32, seed: u64) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    RgbImage::from_fn(width, height, |_, _| {
        Rgb([rng.random(), rng.random(), rng.random()])
    })
}

fn constant(width: u32, height: u32, colour: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(width, height, Rgb(colour))
}

fn bits(view: &Chw) -> Vec<u32> {
    view.data.iter().map(|v| v.to_bits()).collect()
}

fn plane(view: &Chw, c: usize) -> &[f32] {
    view.plane(c).expect("plane")
}

fn mean_var(values: &[f32]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var)
}

fn assert_view_ok(view: &Chw, size: usize, what: &str) {
    assert_eq!(view.shape(), (3, size, size), "{what}");
    assert_eq!(view.data.len(), 3 * size * size, "{what}");
    assert!(
        view.data.iter().all(|v| v.is_finite()),
        "{what}: non-finite"
    );
}

#[test]
fn same_seed_epoch_key_gives_bit_identical_views() {
    let cfg = AugmentConfig::default();
    let image = noise(300, 200, 1);
    let a = strong(&image, &cfg, &mut rng_for(7, 2, "shard-3:41"));
    let b = strong(&image, &cfg, &mut rng_for(7, 2, "shard-3:41"));
    assert_eq!(bits(&a), bits(&b));
    // Views drawn in sequence from one row's stream are reproducible too.
    let mut r1 = rng_for(7, 2, "shard-3:41");
    let mut r2 = rng_for(7, 2, "shard-3:41");
    for _ in 0..3 {
        assert_eq!(
            bits(&strong(&image, &cfg, &mut r1)),
            bits(&strong(&image, &cfg, &mut r2))
        );
    }
}

#[test]
fn views_differ_across_epoch_key_and_seed() {
    let cfg = AugmentConfig::default();
    let image = noise(300, 200, 2);
    let base = bits(&strong(&image, &cfg, &mut rng_for(7, 2, "row")));
    for (seed, epoch, key) in [(7, 3, "row"), (7, 2, "row2"), (8, 2, "row"), (7, 2, "")] {
        let other = bits(&strong(&image, &cfg, &mut rng_for(seed, epoch, key)));
        assert_ne!(base, other, "seed {seed} epoch {epoch} key {key:?}");
    }
    let mut a = rng_for(0, 0, "ab");
    let mut b = rng_for(0, 0, "a");
    assert_ne!(a.random::<u64>(), b.random::<u64>());
}

#[test]
fn a_rows_view_does_not_depend_on_batch_order() {
    let cfg = AugmentConfig::default();
    let images: Vec<(String, RgbImage)> = (0..4)
        .map(|i| (format!("row-{i}"), noise(120 + 10 * i, 90, u64::from(i))))
        .collect();
    let forward: Vec<Vec<u32>> = images
        .iter()
        .map(|(key, img)| bits(&strong(img, &cfg, &mut rng_for(5, 1, key))))
        .collect();
    let backward: Vec<Vec<u32>> = images
        .iter()
        .rev()
        .map(|(key, img)| bits(&strong(img, &cfg, &mut rng_for(5, 1, key))))
        .collect();
    for (f, b) in forward.iter().zip(backward.iter().rev()) {
        assert_eq!(f, b);
    }
}

#[test]
fn sampled_params_reproduce_the_view() {
    let cfg = AugmentConfig::default();
    let image = noise(257, 131, 3);
    for key in ["a", "b", "c", "d", "e"] {
        let view = strong(&image, &cfg, &mut rng_for(1, 1, key));
        let params = StrongParams::sample(257, 131, &cfg, &mut rng_for(1, 1, key));
        assert_eq!(bits(&view), bits(&apply_strong(&image, &cfg, &params)));
    }
}

#[test]
fn weak_normalises_a_constant_image_exactly() {
    let cfg = AugmentConfig::default();
    let colour = [10u8, 128, 250];
    for (w, h) in [(37, 23), (224, 224), (1, 1), (1000, 3)] {
        let view = weak(&constant(w, h, colour), &cfg);
        assert_view_ok(&view, 224, "weak");
        for (c, &value) in colour.iter().enumerate() {
            let expected = (f64::from(value) / 255.0 - cfg.mean[c]) / cfg.std[c];
            for &v in plane(&view, c) {
                assert!(
                    (f64::from(v) - expected).abs() < 1e-5,
                    "{w}x{h} channel {c}: {v} vs {expected}"
                );
            }
        }
    }
}

#[test]
fn weak_at_the_source_size_keeps_pixels_and_is_deterministic() {
    let image = noise(16, 16, 4);
    let cfg = plain(16);
    let view = weak(&image, &cfg);
    for (i, p) in image.pixels().enumerate() {
        for c in 0..3 {
            let expected = f32::from(p.0[c]) / 255.0;
            assert!((plane(&view, c)[i] - expected).abs() < 1e-6);
        }
    }
    let cfg = AugmentConfig::default();
    let other = noise(333, 250, 4);
    assert_eq!(bits(&weak(&other, &cfg)), bits(&weak(&other, &cfg)));
}

#[test]
fn weak_downscale_averages() {
    // Alternating black and white columns resized to 1 px: the widened triangle filter
    // weighs the columns 5/8, 7/8, 7/8, 5/8, so black and white get equal mass.
    let image = RgbImage::from_fn(4, 4, |x, _| {
        if x % 2 == 0 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let view = weak(&image, &plain(1));
    for &v in &view.data {
        assert!((v - 0.5).abs() < 1e-6, "{v}");
    }
}

#[test]
fn flip_mirrors_the_view() {
    let image = noise(64, 64, 5);
    let off = plain(32);
    let on = AugmentConfig {
        flip_p: 1.0,
        ..plain(32)
    };
    let a = strong(&image, &off, &mut rng_for(0, 0, "flip"));
    let b = strong(&image, &on, &mut rng_for(0, 0, "flip"));
    assert_ne!(bits(&a), bits(&b));
    for c in 0..3 {
        let (pa, pb) = (plane(&a, c), plane(&b, c));
        for y in 0..32 {
            for x in 0..32 {
                assert_eq!(pa[y * 32 + x].to_bits(), pb[y * 32 + 31 - x].to_bits());
            }
        }
    }
}

#[test]
fn grayscale_gives_equal_channels() {
    let cfg = AugmentConfig {
        grayscale_p: 1.0,
        ..plain(48)
    };
    let view = strong(&noise(48, 48, 6), &cfg, &mut rng_for(0, 0, "grey"));
    assert_eq!(plane(&view, 0), plane(&view, 1));
    assert_eq!(plane(&view, 1), plane(&view, 2));

    let colour = [200u8, 50, 90];
    let view = strong(&constant(8, 8, colour), &cfg, &mut rng_for(0, 0, "grey"));
    let luma: f32 = (0..3).map(|c| LUMA[c] * f32::from(colour[c]) / 255.0).sum();
    for &v in &view.data {
        assert!((v - luma).abs() < 1e-6, "{v} vs {luma}");
    }
    // Normalisation still runs per channel after greyscale.
    let normalised = AugmentConfig {
        grayscale_p: 1.0,
        mean: [0.1, 0.2, 0.3],
        std: [0.5, 0.25, 2.0],
        ..plain(8)
    };
    let view = strong(
        &constant(8, 8, colour),
        &normalised,
        &mut rng_for(0, 0, "g"),
    );
    for c in 0..3 {
        let expected = (luma - normalised.mean[c] as f32) / normalised.std[c] as f32;
        assert!((plane(&view, c)[0] - expected).abs() < 1e-5);
    }
}

#[test]
fn jitter_with_all_factors_zero_is_identity() {
    let image = noise(40, 40, 7);
    let zero = AugmentConfig {
        jitter_p: 1.0,
        brightness: 0.0,
        contrast: 0.0,
        saturation: 0.0,
        hue: 0.0,
        ..plain(40)
    };
    for key in ["a", "b", "c"] {
        let params = StrongParams::sample(40, 40, &zero, &mut rng_for(0, 0, key));
        assert!(params.jitter.is_empty());
        let with = strong(&image, &zero, &mut rng_for(0, 0, key));
        let without = strong(&image, &plain(40), &mut rng_for(0, 0, key));
        assert_eq!(bits(&with), bits(&without));
    }
}

#[test]
fn jitter_changes_colours_within_range() {
    let image = noise(40, 40, 8);
    let jitter = AugmentConfig {
        jitter_p: 1.0,
        ..plain(40)
    };
    let base = strong(&image, &plain(40), &mut rng_for(0, 0, "j"));
    for key in ["a", "b", "c", "d"] {
        let params = StrongParams::sample(40, 40, &jitter, &mut rng_for(0, 0, key));
        assert_eq!(params.jitter.len(), 4, "all four ops on");
        let view = strong(&image, &jitter, &mut rng_for(0, 0, key));
        assert_ne!(bits(&view), bits(&base));
        assert!(view.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}

#[test]
fn jitter_order_varies_between_calls() {
    let cfg = AugmentConfig {
        jitter_p: 1.0,
        ..plain(8)
    };
    let orders: std::collections::HashSet<Vec<u8>> = (0..64)
        .map(|i| {
            let params = StrongParams::sample(8, 8, &cfg, &mut rng_for(0, 0, &i.to_string()));
            params
                .jitter
                .iter()
                .map(|op| match op {
                    trustflow_train::augment::ColorOp::Brightness(_) => 0,
                    trustflow_train::augment::ColorOp::Contrast(_) => 1,
                    trustflow_train::augment::ColorOp::Saturation(_) => 2,
                    trustflow_train::augment::ColorOp::Hue(_) => 3,
                })
                .collect()
        })
        .collect();
    assert!(orders.len() > 10, "only {} orders seen", orders.len());
}

#[test]
fn blur_preserves_a_constant_image() {
    let cfg = AugmentConfig {
        blur_p: 1.0,
        blur_sigma: [2.0, 2.0],
        ..plain(32)
    };
    let colour = [30u8, 140, 255];
    let view = strong(&constant(32, 32, colour), &cfg, &mut rng_for(0, 0, "blur"));
    for (c, &value) in colour.iter().enumerate() {
        let expected = f32::from(value) / 255.0;
        for &v in plane(&view, c) {
            assert!((v - expected).abs() < 1e-5, "{v} vs {expected}");
        }
    }
}

#[test]
fn blur_reduces_the_variance_of_noise() {
    let image = noise(64, 64, 9);
    let blur = AugmentConfig {
        blur_p: 1.0,
        blur_sigma: [1.0, 2.0],
        ..plain(64)
    };
    let sharp = strong(&image, &plain(64), &mut rng_for(0, 0, "n"));
    for key in ["a", "b", "c"] {
        let blurred = strong(&image, &blur, &mut rng_for(0, 0, key));
        for c in 0..3 {
            let (m0, v0) = mean_var(plane(&sharp, c));
            let (m1, v1) = mean_var(plane(&blurred, c));
            assert!(v1 < 0.3 * v0, "variance {v1} vs {v0}");
            assert!((m1 - m0).abs() < 0.01, "mean {m1} vs {m0}");
        }
    }
}

#[test]
fn blur_wider_than_the_image_is_fine() {
    let cfg = AugmentConfig {
        size: 3,
        blur_p: 1.0,
        blur_sigma: [100.0, 100.0],
        ..plain(3)
    };
    let view = strong(&noise(5, 5, 10), &cfg, &mut rng_for(0, 0, "wide"));
    assert_view_ok(&view, 3, "wide blur");
}

#[test]
fn crop_area_fraction_is_within_scale_and_plausible() {
    let cfg = AugmentConfig::default();
    for ((w, h), (lo, hi)) in [((256u32, 256u32), (0.51, 0.57)), ((640, 480), (0.46, 0.53))] {
        let area = f64::from(w) * f64::from(h);
        let mut rng = rng_for(11, 0, "crop");
        let draws = 4000;
        let mut sum = 0.0;
        for _ in 0..draws {
            let c = sample_crop(w, h, cfg.scale, cfg.ratio, &mut rng);
            assert!(c.width >= 1 && c.height >= 1);
            assert!(c.left + c.width <= w && c.top + c.height <= h, "{c:?}");
            let got = f64::from(c.width) * f64::from(c.height);
            // Sides are rounded to whole pixels, so allow half a pixel on each side.
            let slack = 0.5 * f64::from(c.width + c.height) + 0.25;
            assert!(got >= 0.2 * area - slack, "{c:?} below 0.2");
            assert!(got <= area, "{c:?} above 1.0");
            let ratio = f64::from(c.width) / f64::from(c.height);
            assert!((0.7..=1.4).contains(&ratio), "{c:?} ratio {ratio}");
            sum += got / area;
        }
        let mean = sum / f64::from(draws);
        // torchvision's sampler (simulated in Python): 0.540 for 256x256, 0.495 for
        // 640x480 (large crops with the wrong orientation are rejected and redrawn).
        assert!((lo..=hi).contains(&mean), "{w}x{h}: mean fraction {mean}");
    }
}

#[test]
fn crop_fallback_is_a_centre_crop() {
    // A scale range that never fits forces all tries to fail.
    let mut rng = rng_for(0, 0, "fallback");
    let c = sample_crop(100, 60, [1.0, 1.0], [2.0, 3.0], &mut rng);
    // in ratio 1.67 < 2: full width, height round(100 / 2) = 50, centred.
    assert_eq!((c.width, c.height, c.left, c.top), (100, 50, 0, 5));
    assert_eq!(CROP_TRIES, 10);
}

#[test]
fn outputs_have_the_right_shape_on_any_image() {
    let sizes = [
        (1, 1),
        (1, 7),
        (7, 1),
        (2, 3),
        (3, 2000),
        (2000, 3),
        (1, 200_000),
        (200_000, 1),
        (224, 224),
        (300, 200),
        (513, 1023),
    ];
    for size in [224u32, 7, 1] {
        let cfg = AugmentConfig {
            size,
            ..AugmentConfig::default()
        };
        for &(w, h) in &sizes {
            let image = noise(w, h, u64::from(w) * 31 + u64::from(h));
            let what = format!("{w}x{h} -> {size}");
            assert_view_ok(&weak(&image, &cfg), size as usize, &what);
            for key in 0..4 {
                let mut rng = rng_for(3, key, &what);
                assert_view_ok(&strong(&image, &cfg, &mut rng), size as usize, &what);
            }
        }
    }
}

#[test]
fn every_op_on_tiny_images() {
    let all = AugmentConfig {
        flip_p: 1.0,
        jitter_p: 1.0,
        grayscale_p: 1.0,
        blur_p: 1.0,
        ..AugmentConfig::default()
    };
    for (w, h) in [(1, 1), (1, 2), (2, 1), (1, 9999)] {
        for size in [1u32, 2, 5] {
            let cfg = AugmentConfig {
                size,
                ..all.clone()
            };
            let view = strong(&noise(w, h, 12), &cfg, &mut rng_for(0, 0, "tiny"));
            assert_view_ok(&view, size as usize, &format!("{w}x{h} -> {size}"));
        }
    }
}

#[test]
fn an_image_without_pixels_gives_a_black_view() {
    let cfg = AugmentConfig::default();
    for image in [
        RgbImage::new(0, 0),
        RgbImage::new(0, 5),
        RgbImage::new(5, 0),
    ] {
        for view in [
            weak(&image, &cfg),
            strong(&image, &cfg, &mut rng_for(0, 0, "empty")),
        ] {
            assert_view_ok(&view, 224, "empty");
            for c in 0..3 {
                let black = (-cfg.mean[c] / cfg.std[c]) as f32;
                assert!(plane(&view, c).iter().all(|&v| (v - black).abs() < 1e-6));
            }
        }
    }
}

#[test]
fn params_crop_outside_the_image_is_cut_to_it() {
    let image = noise(10, 10, 13);
    let cfg = plain(4);
    let mut params = StrongParams::sample(10, 10, &cfg, &mut rng_for(0, 0, "p"));
    params.crop.left = 8;
    params.crop.width = 50;
    assert_view_ok(&apply_strong(&image, &cfg, &params), 4, "cut");
    params.crop.top = 40;
    assert_view_ok(&apply_strong(&image, &cfg, &params), 4, "outside");
}

#[test]
fn batch_tensor_is_n_3_h_w_with_the_same_values() {
    let cfg = AugmentConfig {
        size: 32,
        ..AugmentConfig::default()
    };
    let image = noise(50, 40, 14);
    let views: Vec<Chw> = (0..3)
        .map(|i| strong(&image, &cfg, &mut rng_for(0, 0, &i.to_string())))
        .collect();
    let tensor = batch_tensor(&views).expect("batch");
    assert_eq!(tensor.size(), vec![3, 3, 32, 32]);
    assert_eq!(tensor.kind(), tch::Kind::Float);
    let flat: Vec<f32> = Vec::<f32>::try_from(tensor.flatten(0, -1)).expect("to vec");
    let expected: Vec<f32> = views.iter().flat_map(|v| v.data.iter().copied()).collect();
    assert_eq!(flat, expected);
    // Element [n, c, y, x] is view n's plane c at (y, x).
    let v = tensor.double_value(&[2, 1, 5, 7]) as f32;
    assert_eq!(v, plane(&views[2], 1)[5 * 32 + 7]);

    let single = views[0].to_tensor().expect("one view");
    assert_eq!(single.size(), vec![3, 32, 32]);

    assert_eq!(batch_tensor(&[]).unwrap_err(), AugmentError::EmptyBatch);
    let other = weak(&image, &plain(16));
    assert!(matches!(
        batch_tensor(&[views[0].clone(), other]),
        Err(AugmentError::ShapeMismatch { index: 1, .. })
    ));
    let mut short = views[1].clone();
    short.data.pop();
    assert!(matches!(
        batch_tensor(&[views[0].clone(), short.clone()]),
        Err(AugmentError::BadLength { index: 1, .. })
    ));
    assert!(short.to_tensor().is_err());
    assert!(short.plane(2).is_none() && views[0].plane(3).is_none());
}

fn fields(cfg: &AugmentConfig) -> Vec<String> {
    cfg.validate().into_iter().map(|(f, _)| f).collect()
}

#[test]
fn validation_accepts_defaults_and_catches_bad_values() {
    assert!(AugmentConfig::default().validate().is_empty());
    assert!(plain(1).validate().is_empty());
    let d = AugmentConfig::default;
    let cases: Vec<(AugmentConfig, &str)> = vec![
        (AugmentConfig { size: 0, ..d() }, "size"),
        (AugmentConfig { size: 5000, ..d() }, "size"),
        (AugmentConfig { flip_p: 1.5, ..d() }, "flip_p"),
        (
            AugmentConfig {
                jitter_p: -0.1,
                ..d()
            },
            "jitter_p",
        ),
        (
            AugmentConfig {
                grayscale_p: f64::NAN,
                ..d()
            },
            "grayscale_p",
        ),
        (AugmentConfig { blur_p: 2.0, ..d() }, "blur_p"),
        (
            AugmentConfig {
                scale: [0.8, 0.5],
                ..d()
            },
            "scale",
        ),
        (
            AugmentConfig {
                scale: [0.0, 1.0],
                ..d()
            },
            "scale",
        ),
        (
            AugmentConfig {
                scale: [0.5, 1.5],
                ..d()
            },
            "scale",
        ),
        (
            AugmentConfig {
                ratio: [-1.0, 1.0],
                ..d()
            },
            "ratio",
        ),
        (
            AugmentConfig {
                ratio: [2.0, 1.0],
                ..d()
            },
            "ratio",
        ),
        (
            AugmentConfig {
                ratio: [1.0, f64::INFINITY],
                ..d()
            },
            "ratio",
        ),
        (
            AugmentConfig {
                std: [0.2, 0.0, 0.2],
                ..d()
            },
            "std",
        ),
        (
            AugmentConfig {
                std: [-1.0, 0.2, 0.2],
                ..d()
            },
            "std",
        ),
        (
            AugmentConfig {
                mean: [f64::NAN, 0.0, 0.0],
                ..d()
            },
            "mean",
        ),
        (
            AugmentConfig {
                brightness: -0.1,
                ..d()
            },
            "brightness",
        ),
        (
            AugmentConfig {
                contrast: f64::NAN,
                ..d()
            },
            "contrast",
        ),
        (
            AugmentConfig {
                saturation: f64::INFINITY,
                ..d()
            },
            "saturation",
        ),
        (AugmentConfig { hue: 0.6, ..d() }, "hue"),
        (AugmentConfig { hue: -0.1, ..d() }, "hue"),
        (
            AugmentConfig {
                blur_sigma: [3.0, 1.0],
                ..d()
            },
            "blur_sigma",
        ),
        (
            AugmentConfig {
                blur_sigma: [0.0, 1.0],
                ..d()
            },
            "blur_sigma",
        ),
        (
            AugmentConfig {
                blur_sigma: [1.0, 1000.0],
                ..d()
            },
            "blur_sigma",
        ),
    ];
    for (cfg, field) in cases {
        assert_eq!(fields(&cfg), vec![field.to_string()], "{cfg:?}");
    }
    let many = AugmentConfig {
        size: 0,
        flip_p: -1.0,
        std: [0.0; 3],
        ..d()
    };
    let f = fields(&many);
    assert!(f.contains(&"size".to_string()) && f.contains(&"flip_p".to_string()));
    assert_eq!(f.iter().filter(|f| *f == "std").count(), 3);
}

#[test]
fn config_deserialises_with_defaults_and_rejects_unknown_fields() {
    let cfg: AugmentConfig = serde_json::from_str("{}").expect("empty");
    assert_eq!(cfg, AugmentConfig::default());
    assert_eq!(cfg.size, 224);
    assert_eq!(cfg.scale, [0.2, 1.0]);
    assert_eq!(cfg.ratio, [0.75, 4.0 / 3.0]);
    assert_eq!(
        (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue),
        (0.4, 0.4, 0.4, 0.1)
    );
    assert_eq!(
        (cfg.flip_p, cfg.jitter_p, cfg.grayscale_p, cfg.blur_p),
        (0.5, 0.8, 0.2, 0.5)
    );
    assert_eq!(cfg.blur_sigma, [0.1, 2.0]);

    let cfg: AugmentConfig = serde_json::from_str(r#"{"size": 32, "blur_p": 0}"#).expect("partial");
    assert_eq!((cfg.size, cfg.blur_p, cfg.flip_p), (32, 0.0, 0.5));
    assert!(serde_json::from_str::<AugmentConfig>(r#"{"sise": 32}"#).is_err());

    let json = serde_json::to_string(&cfg).expect("serialise");
    assert_eq!(
        serde_json::from_str::<AugmentConfig>(&json).expect("round trip"),
        cfg
    );

    let schema = serde_json::to_value(schemars::schema_for!(AugmentConfig)).expect("schema");
    let size = &schema["properties"]["size"];
    assert!(size["description"].as_str().unwrap_or("").contains("224"));
    assert_eq!(schema["additionalProperties"], serde_json::json!(false));
}

#[test]
#[ignore = "timing; run with --ignored --nocapture"]
fn time_per_strong_view() {
    let cfg = AugmentConfig::default();
    let always = AugmentConfig {
        jitter_p: 1.0,
        blur_p: 1.0,
        ..AugmentConfig::default()
    };
    let image = noise(500, 375, 15);
    for (name, cfg) in [("default p", &cfg), ("jitter+blur always", &always)] {
        let n = 200;
        let start = Instant::now();
        for i in 0..n {
            let view = strong(&image, cfg, &mut rng_for(0, 0, &i.to_string()));
            std::hint::black_box(view);
        }
        let per = start.elapsed().as_secs_f64() / f64::from(n);
        println!("strong view 500x375 -> 224 ({name}): {:.3} ms", per * 1e3);
    }
    let n = 200;
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(weak(&image, &cfg));
    }
    let per = start.elapsed().as_secs_f64() / f64::from(n);
    println!("weak view 500x375 -> 224: {:.3} ms", per * 1e3);
}
