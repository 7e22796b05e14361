//! The trainer's image augmentations (docs/method.md section 4), seeded and
//! deterministic.
//!
//! - [`weak`]: resize to `size` x `size`, then normalise. No randomness.
//! - [`strong`] (docs/method.md's A(x)): torchvision's semantics, in this order:
//!   RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter), RandomGrayscale,
//!   RandomApply(GaussianBlur), then normalise. [`StrongParams::sample`] draws every
//!   random choice up front and [`apply_strong`] applies them, so a view can also be
//!   rebuilt from recorded parameters.
//!
//! Input is an [`RgbImage`] (from [`trustflow_engine::models::image::decode_rgb`]); output is a
//! [`Chw`]: `3 * size * size` floats in channel-major order (R, G, B planes), turned
//! into a `[N, 3, H, W]` tensor by [`batch_tensor`].
//!
//! # Conventions this module fixes
//!
//! - **Resampling** ([`weak`] and the crop of [`strong`]) is bilinear with
//!   antialiasing, i.e. PIL's `Image.resize(..., BILINEAR)` (what torchvision does for
//!   PIL images and for tensors with `antialias=True`): a triangle filter whose support
//!   widens with the downscale factor, pixel centres at `i + 0.5`, edge pixels clamped
//!   inside the crop. It is separable; the pass order is chosen to keep the intermediate
//!   buffer small, so extreme aspect ratios cost memory in proportion to the source.
//!   Weights are non-negative, so resized values stay in [0, 1] (up to rounding).
//!   [`weak`] resizes the whole image to `size` x `size` (no aspect-preserving crop).
//! - **Colour** is computed in f32 on planes in [0, 1], after the crop and resize, each
//!   op clamped to [0, 1] like torchvision's tensor ops (PIL additionally rounds to 8
//!   bits between ops; we do not). Grey is ITU-R 601-2 luma,
//!   `0.299 R + 0.587 G + 0.114 B` (PIL's `L`; torchvision's tensor path uses 0.2989).
//!   Brightness scales, contrast blends with the mean of the grey image, saturation
//!   blends with the per-pixel grey, hue rotates H in HSV (torchvision's
//!   `_rgb2hsv`/`_hsv2rgb`). The four jitter ops run in a fresh random order per call;
//!   an op whose strength is 0 is skipped, so all-zero jitter is the identity.
//! - **Blur** `sigma` is in output pixels (as torchvision's, which runs after the
//!   crop). The kernel is a sampled Gaussian of radius `ceil(3 sigma)` (size
//!   `2 ceil(3 sigma) + 1`, 13 taps at sigma 2), normalised to sum 1, applied
//!   separably with reflect padding (torch's `reflect`, which does not repeat the edge
//!   pixel, extended periodically for kernels wider than the image).
//! - **Probabilities**: an op with probability `p` is applied when a uniform draw in
//!   [0, 1) is below `p`, so `p = 0` never and `p = 1` always applies it. Every
//!   Bernoulli draw is made whatever `p` is.
//! - **Seeding** ([`rng_for`]): each row's strong view uses its own ChaCha8 stream keyed
//!   by SHA-256 of (run seed, epoch, row key), so it is the same whatever worker or
//!   batch the row lands in, and different in every epoch. Views drawn from one stream
//!   in sequence (e.g. two strong views of one row) are deterministic too.
//! - **Configuration** is assumed validated ([`AugmentConfig::validate`], as the spec
//!   layer does for stage configs); a debug build asserts it. No input image panics:
//!   1 x 1, 1 x N and extreme aspect ratios work, and an image with no pixels (which
//!   `decode_rgb` never produces) gives a black view.

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

/// Largest output side [`AugmentConfig::validate`] accepts.
pub const MAX_SIZE: u32 = 4096;
/// Largest blur sigma (in output pixels) [`AugmentConfig::validate`] accepts.
pub const MAX_BLUR_SIGMA: f64 = 100.0;
/// Tries of RandomResizedCrop's sampling before its centre-crop fallback (torchvision).
pub const CROP_TRIES: usize = 10;
/// ITU-R 601-2 luma weights for R, G, B.
pub const LUMA: [f32; 3] = [0.299, 0.587, 0.114];
/// Domain separator of [`rng_for`]; changing it changes every strong view.
const RNG_DOMAIN: &[u8] = b"trustflow.train.augment.v1\0";
const INV_255: f32 = 1.0 / 255.0;

/// Augmentation settings. Defaults are docs/method.md section 4's (and torchvision's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Output side in pixels: every view is `size` x `size`. Default 224.
    #[schemars(range(min = 1, max = 4096))]
    pub size: u32,
    /// Per-channel (R, G, B) mean subtracted after scaling pixels to [0, 1].
    /// Default ImageNet's 0.485, 0.456, 0.406.
    pub mean: [f64; 3],
    /// Per-channel (R, G, B) standard deviation divided by after the mean; each > 0.
    /// Default ImageNet's 0.229, 0.224, 0.225.
    pub std: [f64; 3],
    /// Random resized crop: range of the crop's area as a fraction of the image's,
    /// `[min, max]` with 0 < min <= max <= 1. Default [0.2, 1.0].
    pub scale: [f64; 2],
    /// Random resized crop: range of the crop's aspect ratio (width / height), sampled
    /// log-uniformly, `[min, max]` with 0 < min <= max. Default [3/4, 4/3].
    pub ratio: [f64; 2],
    /// Probability of a horizontal flip. Default 0.5.
    pub flip_p: f64,
    /// Colour jitter: brightness factor drawn from [max(0, 1 - b), 1 + b]; 0 turns it
    /// off. Default 0.4.
    pub brightness: f64,
    /// Colour jitter: contrast factor drawn from [max(0, 1 - c), 1 + c]; 0 turns it
    /// off. Default 0.4.
    pub contrast: f64,
    /// Colour jitter: saturation factor drawn from [max(0, 1 - s), 1 + s]; 0 turns it
    /// off. Default 0.4.
    pub saturation: f64,
    /// Colour jitter: hue shift drawn from [-h, h] (a fraction of the hue circle),
    /// 0 <= h <= 0.5; 0 turns it off. Default 0.1.
    pub hue: f64,
    /// Probability of applying colour jitter at all. Default 0.8.
    pub jitter_p: f64,
    /// Probability of turning the view grey (all three channels equal). Default 0.2.
    pub grayscale_p: f64,
    /// Gaussian blur: range of sigma in output pixels, `[min, max]` with
    /// 0 < min <= max <= 100; the kernel has radius ceil(3 sigma). Default [0.1, 2.0].
    pub blur_sigma: [f64; 2],
    /// Probability of applying the Gaussian blur. Default 0.5.
    pub blur_p: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            size: 224,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            scale: [0.2, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip_p: 0.5,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
            jitter_p: 0.8,
            grayscale_p: 0.2,
            blur_sigma: [0.1, 2.0],
            blur_p: 0.5,
        }
    }
}

fn problem(problems: &mut Vec<(String, String)>, field: &str, message: String) {
    problems.push((field.to_string(), message));
}

/// Checks a `[min, max]` range: both finite, `min > 0` (or `>= 0` when `zero_ok`),
/// `min <= max`, `max <= upper` when given.
fn check_range(
    problems: &mut Vec<(String, String)>,
    field: &str,
    [lo, hi]: [f64; 2],
    upper: Option<f64>,
) {
    if !lo.is_finite() || !hi.is_finite() {
        problem(
            problems,
            field,
            format!("must be two finite numbers, got [{lo}, {hi}]"),
        );
        return;
    }
    if lo <= 0.0 {
        problem(
            problems,
            field,
            format!("minimum must be greater than 0, got {lo}"),
        );
    }
    if lo > hi {
        problem(
            problems,
            field,
            format!("minimum {lo} is greater than maximum {hi}"),
        );
    }
    if let Some(upper) = upper
        && hi > upper
    {
        problem(
            problems,
            field,
            format!("maximum must be at most {upper}, got {hi}"),
        );
    }
}

impl AugmentConfig {
    /// Problems with this configuration, as (field, message); empty when valid.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.size == 0 || self.size > MAX_SIZE {
            problem(
                &mut problems,
                "size",
                format!("must be between 1 and {MAX_SIZE}, got {}", self.size),
            );
        }
        for (c, m) in self.mean.iter().enumerate() {
            if !m.is_finite() {
                problem(
                    &mut problems,
                    "mean",
                    format!("channel {c} must be finite, got {m}"),
                );
            }
        }
        for (c, s) in self.std.iter().enumerate() {
            // NaN is not finite, so this catches it too.
            if !s.is_finite() || *s <= 0.0 {
                problem(
                    &mut problems,
                    "std",
                    format!("channel {c} must be finite and greater than 0, got {s}"),
                );
            }
        }
        check_range(&mut problems, "scale", self.scale, Some(1.0));
        check_range(&mut problems, "ratio", self.ratio, None);
        check_range(
            &mut problems,
            "blur_sigma",
            self.blur_sigma,
            Some(MAX_BLUR_SIGMA),
        );
        for (field, p) in [
            ("flip_p", self.flip_p),
            ("jitter_p", self.jitter_p),
            ("grayscale_p", self.grayscale_p),
            ("blur_p", self.blur_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                problem(
                    &mut problems,
                    field,
                    format!("is a probability and must be in [0, 1], got {p}"),
                );
            }
        }
        for (field, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if !v.is_finite() || v < 0.0 {
                problem(
                    &mut problems,
                    field,
                    format!("must be finite and at least 0, got {v}"),
                );
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            problem(
                &mut problems,
                "hue",
                format!("must be in [0, 0.5], got {}", self.hue),
            );
        }
        problems
    }

    fn debug_check(&self) {
        debug_assert!(
            self.validate().is_empty(),
            "invalid AugmentConfig (call validate() first): {:?}",
            self.validate()
        );
    }
}

/// Why augmented views could not be turned into a tensor. Converts into
/// [`trustflow_engine::Error`] (as a `train` stage error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AugmentError {
    #[error("cannot make a batch tensor from zero views")]
    EmptyBatch,

    #[error("view {index} has shape {found:?} but view 0 has {expected:?}")]
    ShapeMismatch {
        index: usize,
        expected: (usize, usize, usize),
        found: (usize, usize, usize),
    },

    #[error("view {index} holds {found} values but its shape {shape:?} needs {expected}")]
    BadLength {
        index: usize,
        shape: (usize, usize, usize),
        expected: usize,
        found: usize,
    },
}

impl From<AugmentError> for trustflow_engine::error::Error {
    fn from(e: AugmentError) -> Self {
        trustflow_engine::error::Error::stage("train", e)
    }
}

/// One augmented view: `3 * height * width` floats, channel-major (the R plane, then
/// G, then B, each row-major), normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Chw {
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

impl Chw {
    /// Number of channels (always 3).
    pub const CHANNELS: usize = 3;

    /// `(3, height, width)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (Self::CHANNELS, self.height, self.width)
    }

    /// The `height * width` values of channel `channel` (0 = R, 1 = G, 2 = B), or
    /// `None` when there is no such channel or `data` is too short.
    pub fn plane(&self, channel: usize) -> Option<&[f32]> {
        let n = self.height * self.width;
        if channel >= Self::CHANNELS {
            return None;
        }
        self.data.get(channel * n..(channel + 1) * n)
    }

    fn check(&self, index: usize) -> Result<(), AugmentError> {
        let expected = Self::CHANNELS * self.height * self.width;
        if self.data.len() != expected {
            return Err(AugmentError::BadLength {
                index,
                shape: self.shape(),
                expected,
                found: self.data.len(),
            });
        }
        Ok(())
    }

    /// This view as a float32 CPU tensor `[3, H, W]`.
    pub fn to_tensor(&self) -> Result<Tensor, AugmentError> {
        self.check(0)?;
        Ok(Tensor::from_slice(&self.data).view([
            Self::CHANNELS as i64,
            self.height as i64,
            self.width as i64,
        ]))
    }
}

/// Stacks views of one shape into a float32 CPU tensor `[N, 3, H, W]` (one copy into
/// a staging buffer, one into the tensor).
pub fn batch_tensor(views: &[Chw]) -> Result<Tensor, AugmentError> {
    let first = views.first().ok_or(AugmentError::EmptyBatch)?;
    let expected = first.shape();
    for (index, view) in views.iter().enumerate() {
        if view.shape() != expected {
            return Err(AugmentError::ShapeMismatch {
                index,
                expected,
                found: view.shape(),
            });
        }
        view.check(index)?;
    }
    let mut staging = Vec::with_capacity(views.len() * first.data.len());
    for view in views {
        staging.extend_from_slice(&view.data);
    }
    Ok(Tensor::from_slice(&staging).view([
        views.len() as i64,
        Chw::CHANNELS as i64,
        first.height as i64,
        first.width as i64,
    ]))
}

/// The random-number stream of one row's strong view(s): ChaCha8 seeded with
/// SHA-256 of a domain tag, `seed` and `epoch` (little-endian u64 each), the key's
/// byte length (u64) and the key's UTF-8 bytes. Stable across Rust versions,
/// platforms and processes (unlike `std`'s `DefaultHasher`), independent of which
/// worker or batch handles the row, and different for every (seed, epoch, key).
pub fn rng_for(seed: u64, epoch: u64, row_key: &str) -> ChaCha8Rng {
    let mut hasher = Sha256::new();
    hasher.update(RNG_DOMAIN);
    hasher.update(seed.to_le_bytes());
    hasher.update(epoch.to_le_bytes());
    hasher.update((row_key.len() as u64).to_le_bytes());
    hasher.update(row_key.as_bytes());
    ChaCha8Rng::from_seed(hasher.finalize().into())
}

/// A crop rectangle in source pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

impl CropBox {
    /// The whole of a `width` x `height` image.
    pub fn full(width: u32, height: u32) -> Self {
        Self {
            top: 0,
            left: 0,
            height,
            width,
        }
    }

    /// This box intersected with a `width` x `height` image (possibly empty).
    fn clamped(self, width: u32, height: u32) -> Self {
        let top = self.top.min(height);
        let left = self.left.min(width);
        Self {
            top,
            left,
            height: self.height.min(height - top),
            width: self.width.min(width - left),
        }
    }
}

/// `lo + (hi - lo) * u` with `u` uniform in [0, 1) (`lo` when `lo == hi`).
fn uniform<R: Rng + ?Sized>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// torchvision's `RandomResizedCrop.get_params`: up to [`CROP_TRIES`] draws of an
/// area in `scale * area` and a log-uniform aspect ratio in `ratio`, sides rounded
/// half to even (Python's `round`), kept when the crop fits, its corner uniform;
/// otherwise a centre crop of the whole image clamped to the ratio range (sides at
/// least 1). An image with no pixels gives an empty box.
pub fn sample_crop<R: Rng + ?Sized>(
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut R,
) -> CropBox {
    if width == 0 || height == 0 {
        return CropBox::full(0, 0);
    }
    let (wf, hf) = (f64::from(width), f64::from(height));
    let area = wf * hf;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..CROP_TRIES {
        let target = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = (target * aspect).sqrt().round_ties_even();
        let h = (target / aspect).sqrt().round_ties_even();
        // NaN fails these comparisons and falls through to the next try.
        if w > 0.0 && w <= wf && h > 0.0 && h <= hf {
            let (w, h) = (w as u32, h as u32);
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = wf / hf;
    let side = |x: f64, max: u32| (x.round_ties_even() as u32).clamp(1, max);
    let (w, h) = if in_ratio < ratio[0] {
        (width, side(wf / ratio[0], height))
    } else if in_ratio > ratio[1] {
        (side(hf * ratio[1], width), height)
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// One colour-jitter op with its drawn factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColorOp {
    /// Multiply by the factor.
    Brightness(f32),
    /// Blend with the mean grey level: `f x + (1 - f) mean(grey)`.
    Contrast(f32),
    /// Blend with the pixel's grey: `f x + (1 - f) grey`.
    Saturation(f32),
    /// Rotate the HSV hue by this fraction of the circle.
    Hue(f32),
}

/// Every random choice of one strong view.
#[derive(Debug, Clone, PartialEq)]
pub struct StrongParams {
    /// Random resized crop, in source pixels.
    pub crop: CropBox,
    /// Mirror left-right.
    pub flip: bool,
    /// Colour-jitter ops in the order they run; empty when jitter was not applied.
    pub jitter: Vec<ColorOp>,
    /// Turn the view grey.
    pub grayscale: bool,
    /// Blur sigma in output pixels, when the blur is applied.
    pub blur_sigma: Option<f64>,
}

impl StrongParams {
    /// Draws the parameters for a `width` x `height` source, in pipeline order: crop,
    /// flip, jitter (Bernoulli, then a random permutation of the four ops, then the
    /// factors of the enabled ops in the order brightness, contrast, saturation, hue,
    /// as torchvision's `ColorJitter.get_params`), greyscale, blur (Bernoulli, then
    /// sigma uniform in `blur_sigma`).
    pub fn sample<R: Rng + ?Sized>(
        width: u32,
        height: u32,
        cfg: &AugmentConfig,
        rng: &mut R,
    ) -> Self {
        let crop = sample_crop(width, height, cfg.scale, cfg.ratio, rng);
        let flip = rng.random::<f64>() < cfg.flip_p;
        let jitter = if rng.random::<f64>() < cfg.jitter_p {
            sample_jitter(cfg, rng)
        } else {
            Vec::new()
        };
        let grayscale = rng.random::<f64>() < cfg.grayscale_p;
        let blur_sigma = if rng.random::<f64>() < cfg.blur_p {
            Some(uniform(rng, cfg.blur_sigma[0], cfg.blur_sigma[1]))
        } else {
            None
        };
        Self {
            crop,
            flip,
            jitter,
            grayscale,
            blur_sigma,
        }
    }
}

fn sample_jitter<R: Rng + ?Sized>(cfg: &AugmentConfig, rng: &mut R) -> Vec<ColorOp> {
    let mut order = [0usize, 1, 2, 3];
    order.shuffle(rng);
    let mut factor = |strength: f64| {
        (strength > 0.0).then(|| uniform(rng, (1.0 - strength).max(0.0), 1.0 + strength) as f32)
    };
    let brightness = factor(cfg.brightness);
    let contrast = factor(cfg.contrast);
    let saturation = factor(cfg.saturation);
    let hue = (cfg.hue > 0.0).then(|| uniform(rng, -cfg.hue, cfg.hue) as f32);
    order
        .iter()
        .filter_map(|&op| match op {
            0 => brightness.map(ColorOp::Brightness),
            1 => contrast.map(ColorOp::Contrast),
            2 => saturation.map(ColorOp::Saturation),
            _ => hue.map(ColorOp::Hue),
        })
        .collect()
}

/// The deterministic view: the whole image resized to `size` x `size` (antialiased
/// bilinear, see the module docs), scaled to [0, 1] and normalised per channel.
pub fn weak(image: &RgbImage, cfg: &AugmentConfig) -> Chw {
    cfg.debug_check();
    let size = cfg.size as usize;
    let crop = CropBox::full(image.width(), image.height());
    let mut data = resize_region(image, crop, size, size);
    normalise(&mut data, size * size, cfg);
    Chw {
        data,
        height: size,
        width: size,
    }
}

/// A random strong view (docs/method.md's A(x)); `rng` is usually [`rng_for`] of the row.
/// Same as [`StrongParams::sample`] followed by [`apply_strong`].
pub fn strong(image: &RgbImage, cfg: &AugmentConfig, rng: &mut ChaCha8Rng) -> Chw {
    let params = StrongParams::sample(image.width(), image.height(), cfg, rng);
    apply_strong(image, cfg, &params)
}

/// Applies drawn parameters: crop and resize to `size` x `size`, flip, jitter ops in
/// order, greyscale, blur, normalise. A crop reaching outside the image is cut to it;
/// an empty one gives a black view.
pub fn apply_strong(image: &RgbImage, cfg: &AugmentConfig, params: &StrongParams) -> Chw {
    cfg.debug_check();
    let size = cfg.size as usize;
    let n = size * size;
    let crop = params.crop.clamped(image.width(), image.height());
    let mut data = resize_region(image, crop, size, size);
    if params.flip {
        for row in data.chunks_exact_mut(size) {
            row.reverse();
        }
    }
    for &op in &params.jitter {
        color_op(&mut data, n, op);
    }
    if params.grayscale {
        grayscale(&mut data, n);
    }
    if let Some(sigma) = params.blur_sigma {
        gaussian_blur(&mut data, size, size, sigma);
    }
    normalise(&mut data, n, cfg);
    Chw {
        data,
        height: size,
        width: size,
    }
}

/// `(x - mean) / std` per channel plane.
fn normalise(data: &mut [f32], n: usize, cfg: &AugmentConfig) {
    if n == 0 {
        return;
    }
    for (c, plane) in data.chunks_exact_mut(n).enumerate() {
        let (mean, std) = (cfg.mean[c] as f32, cfg.std[c] as f32);
        for v in plane {
            *v = (*v - mean) / std;
        }
    }
}

/// Resampling taps along one axis: output `o` reads inputs `start[o]..` with
/// `weights[offset[o]..offset[o + 1]]` (summing to 1).
struct Taps {
    start: Vec<usize>,
    offset: Vec<usize>,
    weights: Vec<f32>,
}

impl Taps {
    /// PIL's `precompute_coeffs` for the bilinear (triangle) filter, computed in f64,
    /// with zero weights at either end dropped. `in_len` and `out_len` are at least 1.
    fn new(in_len: usize, out_len: usize) -> Self {
        let scale = in_len as f64 / out_len as f64;
        let filter_scale = scale.max(1.0);
        let support = filter_scale;
        let inv_filter_scale = 1.0 / filter_scale;
        let mut start = Vec::with_capacity(out_len);
        let mut offset = Vec::with_capacity(out_len + 1);
        let mut weights = Vec::with_capacity(out_len * (2 * support.ceil() as usize + 1));
        let mut raw = Vec::new();
        offset.push(0);
        for o in 0..out_len {
            let center = (o as f64 + 0.5) * scale;
            // `as i64` truncates toward zero, like PIL's `(int)`.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).clamp(0, in_len as i64) as usize;
            raw.clear();
            raw.extend(
                (lo..hi)
                    .map(|x| (1.0 - ((x as f64 - center + 0.5) * inv_filter_scale).abs()).max(0.0)),
            );
            let sum: f64 = raw.iter().sum();
            match raw.iter().position(|&w| w > 0.0) {
                Some(first) if sum > 0.0 => {
                    let last = raw.iter().rposition(|&w| w > 0.0).unwrap_or(first);
                    start.push(lo + first);
                    weights.extend(raw[first..=last].iter().map(|&w| (w / sum) as f32));
                }
                // Unreachable for in_len, out_len >= 1; nearest pixel as a safe fallback.
                _ => {
                    start.push((center as usize).min(in_len - 1));
                    weights.push(1.0);
                }
            }
            offset.push(weights.len());
        }
        Self {
            start,
            offset,
            weights,
        }
    }

    fn get(&self, o: usize) -> (usize, &[f32]) {
        (
            self.start[o],
            &self.weights[self.offset[o]..self.offset[o + 1]],
        )
    }
}

/// Crops `crop` (inside the image) and resizes it to `out_w` x `out_h` with the
/// antialiased bilinear filter, into three planes of values in [0, 1]. An empty crop
/// or output gives zeros.
fn resize_region(image: &RgbImage, crop: CropBox, out_w: usize, out_h: usize) -> Vec<f32> {
    let n = out_w * out_h;
    let mut planes = vec![0f32; 3 * n];
    let (top, left) = (crop.top as usize, crop.left as usize);
    let (cw, ch) = (crop.width as usize, crop.height as usize);
    if n == 0 || cw == 0 || ch == 0 {
        return planes;
    }
    let raw: &[u8] = image.as_raw();
    let stride = image.width() as usize * 3;
    let xt = Taps::new(cw, out_w);
    let yt = Taps::new(ch, out_h);
    let (r, rest) = planes.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    // Two separable passes; the first works on source rows, the second writes planes.
    // Pick the order whose intermediate buffer is smaller.
    if ch * out_w <= out_h * cw {
        // Horizontal first: `mid` is ch rows of out_w interleaved pixels.
        let mid_row = out_w * 3;
        let mut mid = vec![0f32; ch * mid_row];
        for (y, dst) in mid.chunks_exact_mut(mid_row).enumerate() {
            let row0 = (top + y) * stride + left * 3;
            let src = &raw[row0..row0 + cw * 3];
            for (ox, d) in dst.chunks_exact_mut(3).enumerate() {
                let (s, ws) = xt.get(ox);
                let mut acc = [0f32; 3];
                for (&w, p) in ws.iter().zip(src[s * 3..].chunks_exact(3)) {
                    acc[0] += w * f32::from(p[0]);
                    acc[1] += w * f32::from(p[1]);
                    acc[2] += w * f32::from(p[2]);
                }
                d.copy_from_slice(&acc);
            }
        }
        for oy in 0..out_h {
            let (s, ws) = yt.get(oy);
            let span = oy * out_w..(oy + 1) * out_w;
            let (rr, gr, br) = (&mut r[span.clone()], &mut g[span.clone()], &mut b[span]);
            for (k, &w) in ws.iter().enumerate() {
                let w = w * INV_255;
                let m = &mid[(s + k) * mid_row..(s + k + 1) * mid_row];
                for (ox, p) in m.chunks_exact(3).enumerate() {
                    rr[ox] += w * p[0];
                    gr[ox] += w * p[1];
                    br[ox] += w * p[2];
                }
            }
        }
    } else {
        // Vertical first: `mid` is out_h rows of cw interleaved pixels.
        let mid_row = cw * 3;
        let mut mid = vec![0f32; out_h * mid_row];
        for (oy, dst) in mid.chunks_exact_mut(mid_row).enumerate() {
            let (s, ws) = yt.get(oy);
            for (k, &w) in ws.iter().enumerate() {
                let row0 = (top + s + k) * stride + left * 3;
                let src = &raw[row0..row0 + mid_row];
                for (d, &p) in dst.iter_mut().zip(src) {
                    *d += w * f32::from(p);
                }
            }
        }
        for (oy, m) in mid.chunks_exact(mid_row).enumerate() {
            for ox in 0..out_w {
                let (s, ws) = xt.get(ox);
                let mut acc = [0f32; 3];
                for (&w, p) in ws.iter().zip(m[s * 3..].chunks_exact(3)) {
                    acc[0] += w * p[0];
                    acc[1] += w * p[1];
                    acc[2] += w * p[2];
                }
                let i = oy * out_w + ox;
                r[i] = acc[0] * INV_255;
                g[i] = acc[1] * INV_255;
                b[i] = acc[2] * INV_255;
            }
        }
    }
    planes
}

fn luma(r: f32, g: f32, b: f32) -> f32 {
    LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
}

/// Splits `3 * n` values into the R, G and B planes.
fn rgb_planes(data: &mut [f32], n: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let (r, rest) = data.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    (r, g, b)
}

/// One colour-jitter op on planes in [0, 1] (torchvision's `adjust_*` on float
/// tensors), clamped to [0, 1].
fn color_op(data: &mut [f32], n: usize, op: ColorOp) {
    if n == 0 {
        return;
    }
    match op {
        ColorOp::Brightness(f) => {
            for v in data.iter_mut() {
                *v = (*v * f).clamp(0.0, 1.0);
            }
        }
        ColorOp::Contrast(f) => {
            let (r, g, b) = rgb_planes(data, n);
            let sum: f64 = (0..n).map(|i| f64::from(luma(r[i], g[i], b[i]))).sum();
            let offset = (1.0 - f) * (sum / n as f64) as f32;
            for v in data.iter_mut() {
                *v = (f * *v + offset).clamp(0.0, 1.0);
            }
        }
        ColorOp::Saturation(f) => {
            let (r, g, b) = rgb_planes(data, n);
            for i in 0..n {
                let grey = (1.0 - f) * luma(r[i], g[i], b[i]);
                r[i] = (f * r[i] + grey).clamp(0.0, 1.0);
                g[i] = (f * g[i] + grey).clamp(0.0, 1.0);
                b[i] = (f * b[i] + grey).clamp(0.0, 1.0);
            }
        }
        ColorOp::Hue(shift) => {
            let (r, g, b) = rgb_planes(data, n);
            for i in 0..n {
                (r[i], g[i], b[i]) = shift_hue(r[i], g[i], b[i], shift);
            }
        }
    }
}

/// torchvision's `_rgb2hsv`, hue + `shift` (mod 1), `_hsv2rgb`, for one pixel.
fn shift_hue(r: f32, g: f32, b: f32, shift: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        // Saturation 0: every hue maps back to (v, v, v), i.e. the input.
        return (r, g, b);
    }
    let cr = maxc - minc;
    let s = cr / maxc;
    let inv_cr = 1.0 / cr;
    let (rc, gc, bc) = (
        (maxc - r) * inv_cr,
        (maxc - g) * inv_cr,
        (maxc - b) * inv_cr,
    );
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    // h / 6 + 1 is in [5/6, 2): subtracting 1 from values >= 1 is torch's exact
    // `fmod(., 1)`, and h + shift is in [-0.5, 1.5), so one wrap is `% 1.0` (no libm
    // call in this per-pixel loop).
    let h = wrap_unit(h / 6.0 + 1.0) + shift;
    hsv_to_rgb(wrap_unit(h), s, maxc)
}

/// `x mod 1` for `x` in [-1, 2); other values (never produced here) still land in [0, 1).
fn wrap_unit(x: f32) -> f32 {
    let x = if x < 0.0 {
        x + 1.0
    } else if x >= 1.0 {
        x - 1.0
    } else {
        x
    };
    // `x + 1.0` can round up to exactly 1.0 for tiny negative x.
    if x < 1.0 { x.max(0.0) } else { 0.0 }
}

/// torchvision's `_hsv2rgb` for one pixel (h in [0, 1)).
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    // Truncation is floor for h6 >= 0 (and cheaper than `floor`, a libm call here).
    let sector = (h6 as i32) as f32;
    let f = h6 - sector;
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match (sector as i32).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Every channel set to the pixel's luma.
fn grayscale(data: &mut [f32], n: usize) {
    let (r, g, b) = rgb_planes(data, n);
    for i in 0..n {
        let grey = luma(r[i], g[i], b[i]).clamp(0.0, 1.0);
        (r[i], g[i], b[i]) = (grey, grey, grey);
    }
}

/// Index `i` (may be outside `0..n`) mirrored into `0..n` without repeating the edge
/// (torch's `reflect` padding: -1 -> 1, n -> n - 2), periodically for any distance.
fn reflect(i: isize, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

/// Sampled Gaussian of radius `ceil(3 sigma)` (at least 1 tap), normalised to sum 1.
fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil();
    let radius = if radius.is_finite() && radius > 0.0 {
        (radius as usize).min(3 * MAX_BLUR_SIGMA as usize)
    } else {
        0
    };
    let raw: Vec<f64> = (0..=2 * radius)
        .map(|i| {
            let x = (i as f64 - radius as f64) / sigma;
            (-0.5 * x * x).exp()
        })
        .collect();
    let sum: f64 = raw.iter().sum();
    // `sum` includes exp(0) = 1 unless sigma is NaN.
    if !sum.is_finite() || sum <= 0.0 {
        return vec![1.0];
    }
    raw.iter().map(|&w| (w / sum) as f32).collect()
}

/// Separable Gaussian blur of each `width` x `height` plane, reflect padding.
fn gaussian_blur(data: &mut [f32], width: usize, height: usize, sigma: f64) {
    let n = width * height;
    if n == 0 {
        return;
    }
    let kernel = gaussian_kernel(sigma);
    let radius = kernel.len() / 2;
    let xs: Vec<usize> = (0..width + 2 * radius)
        .map(|i| reflect(i as isize - radius as isize, width))
        .collect();
    let ys: Vec<usize> = (0..height + 2 * radius)
        .map(|i| reflect(i as isize - radius as isize, height))
        .collect();
    let mut padded = vec![0f32; width + 2 * radius];
    let mut tmp = vec![0f32; n];
    for plane in data.chunks_exact_mut(n) {
        for (row, out) in plane.chunks_exact(width).zip(tmp.chunks_exact_mut(width)) {
            for (p, &x) in padded.iter_mut().zip(&xs) {
                *p = row[x];
            }
            // One multiply-add sweep per tap (vectorisable, unlike a per-pixel sum).
            out.fill(0.0);
            for (k, &w) in kernel.iter().enumerate() {
                for (o, &v) in out.iter_mut().zip(&padded[k..k + width]) {
                    *o += w * v;
                }
            }
        }
        for (y, out) in plane.chunks_exact_mut(width).enumerate() {
            out.fill(0.0);
            for (&k, &sy) in kernel.iter().zip(&ys[y..y + kernel.len()]) {
                let src = &tmp[sy * width..(sy + 1) * width];
                for (o, &v) in out.iter_mut().zip(src) {
                    *o += k * v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sum_to_one_and_stay_inside() {
        for (input, output) in [(1, 1), (1, 224), (7, 3), (224, 224), (1000, 224), (3, 224)] {
            let taps = Taps::new(input, output);
            for o in 0..output {
                let (start, ws) = taps.get(o);
                assert!(!ws.is_empty());
                assert!(start + ws.len() <= input, "{input}->{output} o={o}");
                let sum: f32 = ws.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "{input}->{output} o={o}: {sum}");
                assert!(ws.iter().all(|&w| w > 0.0));
            }
        }
    }

    #[test]
    fn same_size_resize_is_exact() {
        let taps = Taps::new(5, 5);
        for o in 0..5 {
            assert_eq!(taps.get(o), (o, &[1.0f32][..]));
        }
    }

    #[test]
    fn halving_averages_pairs() {
        // Downscale by 2: support 2, weights 1/4, 3/4, 3/4, 1/4 (PIL's), normalised.
        let taps = Taps::new(8, 4);
        let (start, ws) = taps.get(1);
        assert_eq!(start, 1);
        let expected = [0.125f32, 0.375, 0.375, 0.125];
        assert_eq!(ws.len(), 4);
        for (w, e) in ws.iter().zip(expected) {
            assert!((w - e).abs() < 1e-7, "{ws:?}");
        }
    }

    #[test]
    fn reflect_matches_torch() {
        let n = 4;
        let got: Vec<usize> = (-3..7).map(|i| reflect(i, n)).collect();
        assert_eq!(got, vec![3, 2, 1, 0, 1, 2, 3, 2, 1, 0]);
        assert_eq!(reflect(-5, 1), 0);
        assert_eq!(reflect(9, 2), 1);
    }

    #[test]
    fn gaussian_kernel_shape() {
        let k = gaussian_kernel(2.0);
        assert_eq!(k.len(), 13);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(k[6] > k[5] && k[5] == k[7]);
        assert_eq!(gaussian_kernel(0.1).len(), 3);
    }

    #[test]
    fn hue_rotation() {
        // A third of the circle turns red into green and green into blue.
        let (r, g, b) = shift_hue(1.0, 0.0, 0.0, 1.0 / 3.0);
        assert!(r.abs() < 1e-6 && (g - 1.0).abs() < 1e-6 && b.abs() < 1e-6);
        let (r, g, b) = shift_hue(0.0, 0.5, 0.0, 1.0 / 3.0);
        assert!(r.abs() < 1e-6 && g.abs() < 1e-6 && (b - 0.5).abs() < 1e-6);
        // Shift 0 round-trips; grey is unchanged by any shift.
        for &(r0, g0, b0) in &[(0.2f32, 0.7, 0.4), (0.9, 0.1, 0.3), (0.3, 0.3, 0.8)] {
            let (r, g, b) = shift_hue(r0, g0, b0, 0.0);
            assert!((r - r0).abs() < 1e-6 && (g - g0).abs() < 1e-6 && (b - b0).abs() < 1e-6);
            let (r, g, b) = shift_hue(r0, g0, b0, 1.0);
            assert!((r - r0).abs() < 1e-5 && (g - g0).abs() < 1e-5 && (b - b0).abs() < 1e-5);
        }
        assert_eq!(shift_hue(0.4, 0.4, 0.4, 0.25), (0.4, 0.4, 0.4));
    }

    #[test]
    fn contrast_and_saturation_blend_with_grey() {
        // Two pixels: pure red and black; luma mean = 0.299 / 2.
        let mut data = vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        color_op(&mut data, 2, ColorOp::Contrast(0.0));
        let mean = 0.299f32 / 2.0;
        assert!(data.iter().all(|v| (v - mean).abs() < 1e-6), "{data:?}");

        let mut data = vec![1.0, 0.0, 0.0];
        color_op(&mut data, 1, ColorOp::Saturation(0.0));
        assert!(data.iter().all(|v| (v - 0.299).abs() < 1e-6), "{data:?}");

        let mut data = vec![0.5, 0.8, 0.1];
        color_op(&mut data, 1, ColorOp::Brightness(2.0));
        assert_eq!(data, vec![1.0, 1.0, 0.2]);
    }

    #[test]
    fn crop_fallback_clamps_to_ratio() {
        // Never fits (scale far above 1 is impossible), so the fallback runs.
        let mut rng = rng_for(0, 0, "fallback");
        let wide = sample_crop(1000, 10, [0.2, 1.0], [0.75, 4.0 / 3.0], &mut rng);
        assert_eq!(
            wide,
            CropBox {
                top: 0,
                left: (1000 - 13) / 2,
                height: 10,
                width: 13
            }
        );
        let tall = sample_crop(1, 100_000, [0.2, 1.0], [0.75, 4.0 / 3.0], &mut rng);
        assert_eq!(tall.width, 1);
        assert_eq!(tall.height, 1);
        assert_eq!(tall.top, (100_000 - 1) / 2);
        assert_eq!(
            sample_crop(1, 1, [0.2, 1.0], [0.75, 4.0 / 3.0], &mut rng),
            CropBox::full(1, 1)
        );
        assert_eq!(
            sample_crop(0, 5, [0.2, 1.0], [0.75, 4.0 / 3.0], &mut rng),
            CropBox::full(0, 0)
        );
        // Ratios far from the image's: sides never round to 0.
        let odd = sample_crop(3, 3, [0.2, 1.0], [100.0, 200.0], &mut rng);
        assert!(odd.width >= 1 && odd.height >= 1 && odd.width <= 3 && odd.height <= 3);
    }

    #[test]
    fn rng_for_is_pinned() {
        // Changing the derivation silently changes every training run: pin it.
        let mut rng = rng_for(42, 3, "row-7");
        let first: u64 = rng.random();
        assert_eq!(first, PINNED_FIRST_DRAW, "rng_for derivation changed");
    }

    const PINNED_FIRST_DRAW: u64 = 9_225_269_568_547_072_659;

    #[test]
    fn clamped_crop_stays_inside() {
        let c = CropBox {
            top: 8,
            left: 2,
            height: 10,
            width: 10,
        }
        .clamped(5, 10);
        assert_eq!(
            c,
            CropBox {
                top: 8,
                left: 2,
                height: 2,
                width: 3
            }
        );
        let empty = CropBox {
            top: 20,
            left: 20,
            height: 3,
            width: 3,
        }
        .clamped(5, 5);
        assert_eq!((empty.width, empty.height), (0, 0));
    }
}
