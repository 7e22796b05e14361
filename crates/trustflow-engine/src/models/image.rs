//! Safe image probing and decoding: size and pixel limits checked from the header
//! before any pixel buffer exists, formats restricted to an allow-list, and truncated
//! files rejected even where the underlying decoder would render them partially.
//!
//! JPEG goes through libjpeg-turbo's decoder (see [`libjpeg`]), so its RGB pixels are
//! byte-identical to Pillow's `Image.open(f).convert("RGB")`; PNG and WebP go through
//! the `image` crate, whose output for these lossless formats is exact.

mod libjpeg;

use std::io::Cursor;

use image::{ImageDecoder, ImageFormat, ImageReader, RgbImage};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Working memory a decoder may use beyond the output buffer (Huffman tables, row
/// buffers, ancillary PNG chunks); generous because the pixel limit is the real guard.
const DECODER_SLACK_BYTES: u64 = 64 * 1024 * 1024;

/// Widest pixel layout the allowed decoders can produce (16-bit RGBA PNG).
const MAX_BYTES_PER_PIXEL: u64 = 8;

/// Resource limits applied to every image before and during decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest encoded image accepted, in bytes.
    pub max_bytes: u64,
    /// Largest `width * height` accepted, checked from the header before decoding.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: 32 * 1024 * 1024,
            max_pixels: 40_000_000,
        }
    }
}

/// The image settings of every stage that decodes images, flattened into its config:
/// the limits checked before and during decoding and the formats accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ImageSettings {
    /// Largest `width * height` accepted, checked from the image header before any
    /// pixel is decoded (guards against decompression bombs). Default 40,000,000.
    #[serde(default = "default_max_pixels")]
    #[schemars(range(min = 1))]
    pub max_pixels: u64,
    /// Largest encoded image accepted, in bytes. Default 33,554,432 (32 MiB).
    #[serde(default = "default_max_bytes")]
    #[schemars(range(min = 1))]
    pub max_bytes: u64,
    /// Image formats accepted; others are quarantined. Default: jpeg, png, webp.
    #[serde(default = "default_formats")]
    pub formats: Vec<ImageFormatName>,
}

fn default_max_pixels() -> u64 {
    ImageLimits::default().max_pixels
}

fn default_max_bytes() -> u64 {
    ImageLimits::default().max_bytes
}

fn default_formats() -> Vec<ImageFormatName> {
    ImageFormatName::ALL.to_vec()
}

impl Default for ImageSettings {
    fn default() -> Self {
        Self {
            max_pixels: default_max_pixels(),
            max_bytes: default_max_bytes(),
            formats: default_formats(),
        }
    }
}

impl ImageSettings {
    /// Problems with these settings, as (field, message); empty when valid.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, message: String| problems.push((field.into(), message));
        if self.max_pixels == 0 {
            problem("max_pixels", "must be greater than 0".into());
        }
        if self.max_bytes == 0 {
            problem("max_bytes", "must be greater than 0".into());
        }
        if self.formats.is_empty() {
            problem(
                "formats",
                "must list at least one format (jpeg, png, webp)".into(),
            );
        }
        for (i, format) in self.formats.iter().enumerate() {
            if self.formats[..i].contains(format) {
                problem("formats", format!("`{format}` is listed more than once"));
            }
        }
        problems
    }

    pub fn limits(&self) -> ImageLimits {
        ImageLimits {
            max_bytes: self.max_bytes,
            max_pixels: self.max_pixels,
        }
    }
}

/// Image formats the engine can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormatName {
    /// JPEG (baseline and progressive).
    Jpeg,
    /// PNG, including 16-bit and palette images.
    Png,
    /// WebP, lossy or lossless.
    Webp,
}

impl ImageFormatName {
    /// All supported formats, in canonical order.
    pub const ALL: [ImageFormatName; 3] = [Self::Jpeg, Self::Png, Self::Webp];

    /// The lowercase name used in configs and in the `image_format` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jpeg => "jpeg",
            Self::Png => "png",
            Self::Webp => "webp",
        }
    }

    fn to_image_format(self) -> ImageFormat {
        match self {
            Self::Jpeg => ImageFormat::Jpeg,
            Self::Png => ImageFormat::Png,
            Self::Webp => ImageFormat::WebP,
        }
    }
}

impl std::fmt::Display for ImageFormatName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the header says about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// Format detected from the magic bytes.
    pub format: ImageFormatName,
    /// Width in pixels, as declared by the header.
    pub width: u32,
    /// Height in pixels, as declared by the header.
    pub height: u32,
}

/// Why an image was refused. Messages are shown to users as quarantine reasons.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// Zero bytes of data.
    #[error("image data is empty (0 bytes)")]
    Empty,

    /// More bytes than `ImageLimits::max_bytes`.
    #[error("image is {size} bytes, over the limit of {limit} bytes")]
    TooManyBytes { size: u64, limit: u64 },

    /// Magic bytes of no known image format.
    #[error("not a recognised image format (unknown magic bytes {magic})")]
    UnknownFormat { magic: String },

    /// A known format that is not in the allow-list (or not decodable here at all).
    #[error("image format {format} is not allowed (allowed: {allowed})")]
    FormatNotAllowed { format: String, allowed: String },

    /// An allowed format using a feature the decoder lacks (e.g. arithmetic coding).
    #[error("{format} image uses an unsupported feature: {message}")]
    Unsupported {
        format: ImageFormatName,
        message: String,
    },

    /// Header dimensions over `ImageLimits::max_pixels` (decompression-bomb guard).
    #[error(
        "image dimensions {width}x{height} ({pixels} pixels) exceed the limit of {limit} pixels"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },

    /// A header declaring a zero width or height.
    #[error("image has zero width or height ({width}x{height})")]
    ZeroDimension { width: u32, height: u32 },

    /// The data stops before the image does.
    #[error("{format} image is truncated: {detail}")]
    Truncated {
        format: ImageFormatName,
        detail: String,
    },

    /// The decoder rejected the data.
    #[error("corrupt {format} image: {message}")]
    Corrupt {
        format: ImageFormatName,
        message: String,
    },

    /// The decoder needed more working memory than the limits derived from `max_pixels`.
    #[error("decoding the {format} image needs more memory than the limits allow ({message})")]
    MemoryLimit {
        format: ImageFormatName,
        message: String,
    },
}

/// Check an image from its header only: size, format, allow-list, dimensions and
/// structural completeness. Never allocates a pixel buffer.
pub fn probe(
    bytes: &[u8],
    limits: &ImageLimits,
    allowed: &[ImageFormatName],
) -> Result<ImageInfo, ImageError> {
    probe_with_layout(bytes, limits, allowed).map(|(info, _)| info)
}

/// [`probe`], also returning what the JPEG marker walk found (for JPEG only).
fn probe_with_layout(
    bytes: &[u8],
    limits: &ImageLimits,
    allowed: &[ImageFormatName],
) -> Result<(ImageInfo, Option<JpegLayout>), ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let size = bytes.len() as u64;
    if size > limits.max_bytes {
        return Err(ImageError::TooManyBytes {
            size,
            limit: limits.max_bytes,
        });
    }
    let format = detect_format(bytes, allowed)?;

    // PNG's IHDR sits at a fixed offset, so check it before the decoder reads any
    // chunk (the decoder allocates row buffers from these numbers).
    if format == ImageFormatName::Png
        && let Some((width, height)) = png_ihdr_dimensions(bytes)
    {
        check_dimensions(width, height, limits)?;
    }

    let mut layout = None;
    let (width, height) = if format == ImageFormatName::Jpeg {
        // The walk runs first so a cut file reads as truncated whatever part is missing;
        // it also reads the SOF dimensions, checked before libjpeg sees the data.
        let walked = jpeg_layout(bytes).ok_or_else(|| ImageError::Truncated {
            format,
            detail: JPEG_NO_EOI.to_string(),
        })?;
        let dimensions = libjpeg::probe(bytes, &walked, limits)?;
        layout = Some(walked);
        dimensions
    } else {
        // Before the decoder so a cut file reads as truncated whatever part is missing.
        check_complete(format, bytes)?;
        guarded(format, || {
            let mut reader = ImageReader::with_format(Cursor::new(bytes), format.to_image_format());
            reader.limits(decoder_limits(limits));
            reader.into_dimensions()
        })?
    };
    check_dimensions(width, height, limits)?;
    Ok((
        ImageInfo {
            format,
            width,
            height,
        },
        layout,
    ))
}

/// Probe, then fully decode to 8-bit RGB under memory limits derived from
/// `limits.max_pixels`. JPEG output is byte-identical to Pillow's
/// `Image.open(f).convert("RGB")` (libjpeg-turbo's decoder; greyscale is replicated to
/// three channels, CMYK converted with Pillow's formula); PNG is Pillow's too at every
/// bit depth and colour type (16-bit samples as Pillow reduces them), WebP lossless.
pub fn decode_rgb(
    bytes: &[u8],
    limits: &ImageLimits,
    allowed: &[ImageFormatName],
) -> Result<(ImageInfo, RgbImage), ImageError> {
    decode_rgb_draft(bytes, limits, allowed, None)
}

/// A worker thread's reusable pixel buffer. Decoding allocates an output buffer of up
/// to megabytes per image; taking it from here, and handing it back with [`recycle`]
/// when the pixels are no longer needed, lets a worker reuse one block instead of
/// asking the allocator for a new one per image, which fragments glibc's heaps over a
/// long run (the peak RSS drift of the scaling benchmark).
pub mod scratch {
    use std::cell::Cell;

    /// Buffers above this capacity are freed rather than kept: one huge image must not
    /// pin its memory in a worker for the rest of the run.
    pub const KEEP_BYTES: usize = 32 << 20;

    thread_local! {
        static BUFFER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    }

    /// A zero-filled buffer of `len` bytes, reusing this thread's if it has one; `None`
    /// when the memory cannot be had.
    pub fn zeroed(len: usize) -> Option<Vec<u8>> {
        let mut buffer = BUFFER.take();
        buffer.clear();
        buffer.try_reserve_exact(len).ok()?;
        buffer.resize(len, 0);
        Some(buffer)
    }

    /// Hand a buffer back for this thread's next image.
    pub fn recycle(buffer: Vec<u8>) {
        if buffer.capacity() <= KEEP_BYTES {
            BUFFER.set(buffer);
        }
    }
}

/// Decode an image fully, as [`decode_rgb`] does, to prove it usable, without keeping
/// the pixels: the output goes to this thread's scratch buffer, and PNG and WebP
/// images are not converted to RGB. Accepts and refuses exactly the images
/// `decode_rgb` does.
pub fn decode_check(
    bytes: &[u8],
    limits: &ImageLimits,
    allowed: &[ImageFormatName],
) -> Result<ImageInfo, ImageError> {
    let (info, layout) = probe_with_layout(bytes, limits, allowed)?;
    if let Some(layout) = layout {
        let part = libjpeg::decode(bytes, (info.width, info.height), &layout, limits, 1, None)?;
        scratch::recycle(part.pixels);
        return Ok(info);
    }
    let pixels = guarded(info.format, || {
        let mut reader =
            ImageReader::with_format(Cursor::new(bytes), info.format.to_image_format());
        reader.limits(decoder_limits(limits));
        let decoder = reader.into_decoder()?;
        let (width, height) = decoder.dimensions();
        let len = usize::try_from(decoder.total_bytes()).unwrap_or(usize::MAX);
        let Some(mut pixels) = scratch::zeroed(len) else {
            return Err(image::ImageError::Limits(
                image::error::LimitError::from_kind(
                    image::error::LimitErrorKind::InsufficientMemory,
                ),
            ));
        };
        decoder.read_image(&mut pixels)?;
        Ok(((width, height), pixels))
    })?;
    let ((width, height), pixels) = pixels;
    scratch::recycle(pixels);
    if (width, height) != (info.width, info.height) {
        return Err(ImageError::Corrupt {
            format: info.format,
            message: format!(
                "decoded size {width}x{height} differs from header {}x{}",
                info.width, info.height
            ),
        });
    }
    Ok(info)
}

/// The size a caller will resize an image of (width, height) to.
pub type TargetSize<'a> = &'a dyn Fn(u32, u32) -> (u32, u32);

/// The DCT scale (1, 2, 4 or 8) Pillow's `draft("RGB", requested)` picks for a JPEG of
/// `width` x `height`: the largest that keeps both sides at least the requested ones
/// (`min(width // rw, height // rh)`, rounded down to a power of two up to 8).
pub fn draft_scale((width, height): (u32, u32), (rw, rh): (u32, u32)) -> u32 {
    if rw == 0 || rh == 0 {
        return 1;
    }
    let fits = (width / rw).min(height / rh);
    [8, 4, 2].into_iter().find(|&s| fits >= s).unwrap_or(1)
}

/// [`decode_rgb`], except that a JPEG is decoded at a reduced size when the size
/// `target` gives for its header's allows it: libjpeg scales the IDCT by 1/2, 1/4 or
/// 1/8 (the scale of [`draft_scale`]), which skips most of the decoding work for a
/// large photo bound to be shrunk. The pixels are Pillow's after `draft("RGB", target)`,
/// byte for byte, not those of a full decode. Other formats decode at full size. The
/// returned info keeps the header's size; the image has the decoded one.
pub fn decode_rgb_draft(
    bytes: &[u8],
    limits: &ImageLimits,
    allowed: &[ImageFormatName],
    target: Option<TargetSize<'_>>,
) -> Result<(ImageInfo, RgbImage), ImageError> {
    let (info, part) = decode_rgb_part(bytes, limits, allowed, target, None)?;
    let (width, height) = (part.width as u32, part.height as u32);
    let image = RgbImage::from_raw(width, height, part.pixels).ok_or(ImageError::Corrupt {
        format: info.format,
        message: "decoded buffer has the wrong size".to_string(),
    })?;
    Ok((info, image))
}

/// A rectangle of an image, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
}

impl Window {
    /// All of an image `width` x `height`.
    pub fn whole(width: usize, height: usize) -> Self {
        Window {
            left: 0,
            top: 0,
            width,
            height,
        }
    }

    /// The part of this rectangle inside `outer`.
    pub fn within(self, outer: Window) -> Window {
        let left = self.left.clamp(outer.left, outer.left + outer.width);
        let top = self.top.clamp(outer.top, outer.top + outer.height);
        let right = (self.left + self.width).clamp(left, outer.left + outer.width);
        let bottom = (self.top + self.height).clamp(top, outer.top + outer.height);
        Window {
            left,
            top,
            width: right - left,
            height: bottom - top,
        }
    }

    /// Whether `inner` lies inside this rectangle.
    pub fn contains(&self, inner: &Window) -> bool {
        inner.left >= self.left
            && inner.top >= self.top
            && inner.left + inner.width <= self.left + self.width
            && inner.top + inner.height <= self.top + self.height
    }
}

/// What a caller will read of an image, as a function of its decoded size (smaller
/// than the header's for a JPEG draft) and its header's size: the rectangle of the
/// decoded image.
pub type ReadWindow<'a> = &'a dyn Fn((usize, usize), (u32, u32)) -> Window;

/// A decoded image of `width` x `height` of which only the rectangle `held` is kept:
/// `pixels` are its 8-bit RGB, `held.width * held.height * 3` bytes, equal byte for
/// byte to that rectangle of the whole image's decode.
#[derive(Debug)]
pub struct DecodedPart {
    pub width: usize,
    pub height: usize,
    pub held: Window,
    pub pixels: Vec<u8>,
}

impl DecodedPart {
    /// A borrowed view of the pixels.
    pub fn view(&self) -> ImagePart<'_> {
        ImagePart {
            pixels: &self.pixels,
            width: self.width,
            height: self.height,
            held: self.held,
        }
    }
}

/// 8-bit RGB pixels of the rectangle `held` of an image `width` x `height`
/// (`held.width * held.height * 3` bytes, rows in order).
#[derive(Debug, Clone, Copy)]
pub struct ImagePart<'a> {
    pub pixels: &'a [u8],
    pub width: usize,
    pub height: usize,
    pub held: Window,
}

impl<'a> ImagePart<'a> {
    /// All of an image's pixels.
    pub fn whole(pixels: &'a [u8], width: usize, height: usize) -> Self {
        ImagePart {
            pixels,
            width,
            height,
            held: Window::whole(width, height),
        }
    }
}

/// [`decode_rgb_draft`] for a caller that reads only part of the image: `reads` names
/// that part, and a JPEG is decoded only over a rectangle holding it (libjpeg-turbo's
/// crop and skip; the bytes in it are the whole decode's). Other formats, and JPEGs
/// without `reads`, are held whole.
pub fn decode_rgb_part(
    bytes: &[u8],
    limits: &ImageLimits,
    allowed: &[ImageFormatName],
    target: Option<TargetSize<'_>>,
    reads: Option<ReadWindow<'_>>,
) -> Result<(ImageInfo, DecodedPart), ImageError> {
    let (info, layout) = probe_with_layout(bytes, limits, allowed)?;
    if let Some(layout) = layout {
        let header = (info.width, info.height);
        let scale = target.map_or(1, |t| draft_scale(header, t(info.width, info.height)));
        let part = libjpeg::decode(bytes, header, &layout, limits, scale, reads)?;
        return Ok((info, part));
    }
    let image = guarded(info.format, || {
        let mut reader =
            ImageReader::with_format(Cursor::new(bytes), info.format.to_image_format());
        reader.limits(decoder_limits(limits));
        reader.decode()
    })?;
    if (image.width(), image.height()) != (info.width, info.height) {
        // Defensive: a decoder disagreeing with its own header means a broken file.
        return Err(ImageError::Corrupt {
            format: info.format,
            message: format!(
                "decoded size {}x{} differs from header {}x{}",
                image.width(),
                image.height(),
                info.width,
                info.height
            ),
        });
    }
    let rgb = match info.format {
        ImageFormatName::Png => png_to_rgb8(image, png_ihdr_colour_type(bytes)),
        _ => image.into_rgb8(),
    };
    let (width, height) = (info.width as usize, info.height as usize);
    Ok((
        info,
        DecodedPart {
            width,
            height,
            held: Window::whole(width, height),
            pixels: rgb.into_raw(),
        },
    ))
}

/// 8-bit RGB from a decoded PNG, as Pillow's `convert("RGB")` makes it. Pillow does
/// not scale 16-bit samples: it keeps the high byte of 16-bit colour and grey-with-
/// alpha samples, and opens 16-bit greyscale as mode `I;16`, whose conversion clamps
/// each value to 0..255. `image`'s own conversion scales (v / 257), which differs by
/// up to 1 for colour and almost everywhere for greyscale. Lower depths and palettes
/// are expanded by both the same way. `colour_type` is the IHDR's: a 16-bit grey image
/// with a tRNS chunk arrives with an alpha channel but is still clamped.
fn png_to_rgb8(image: image::DynamicImage, colour_type: Option<u8>) -> RgbImage {
    use image::DynamicImage as D;
    const GREY: u8 = 0;
    let (width, height) = (image.width(), image.height());
    let high = |v: u16| (v >> 8) as u8;
    let clamp = |v: u16| v.min(255) as u8;
    let grey = |values: &mut dyn Iterator<Item = u16>, convert: &dyn Fn(u16) -> u8| {
        let pixels = values.flat_map(|v| [convert(v); 3]).collect();
        RgbImage::from_raw(width, height, pixels)
    };
    let converted = match &image {
        D::ImageLuma16(g) => grey(&mut g.pixels().map(|p| p.0[0]), &clamp),
        D::ImageLumaA16(ga) if colour_type == Some(GREY) => {
            grey(&mut ga.pixels().map(|p| p.0[0]), &clamp)
        }
        D::ImageLumaA16(ga) => grey(&mut ga.pixels().map(|p| p.0[0]), &high),
        D::ImageRgb16(rgb) => {
            RgbImage::from_raw(width, height, rgb.iter().map(|&v| high(v)).collect())
        }
        D::ImageRgba16(rgba) => RgbImage::from_raw(
            width,
            height,
            rgba.pixels()
                .flat_map(|p| [high(p.0[0]), high(p.0[1]), high(p.0[2])])
                .collect(),
        ),
        _ => None,
    };
    converted.unwrap_or_else(|| image.into_rgb8())
}

/// Memory a decoder may use for one image: the widest output buffer at the pixel limit
/// plus working memory.
fn decoder_memory_budget(limits: &ImageLimits) -> u64 {
    limits
        .max_pixels
        .saturating_mul(MAX_BYTES_PER_PIXEL)
        .saturating_add(DECODER_SLACK_BYTES)
}

fn decoder_limits(limits: &ImageLimits) -> image::Limits {
    let mut out = image::Limits::default();
    out.max_alloc = Some(decoder_memory_budget(limits));
    out
}

fn detect_format(bytes: &[u8], allowed: &[ImageFormatName]) -> Result<ImageFormatName, ImageError> {
    let allowed_list = || {
        allowed
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let guessed = image::guess_format(bytes).map_err(|_| ImageError::UnknownFormat {
        magic: bytes
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
    })?;
    let name = match guessed {
        ImageFormat::Jpeg => Some(ImageFormatName::Jpeg),
        ImageFormat::Png => Some(ImageFormatName::Png),
        ImageFormat::WebP => Some(ImageFormatName::Webp),
        _ => None,
    };
    match name {
        Some(name) if allowed.contains(&name) => Ok(name),
        _ => Err(ImageError::FormatNotAllowed {
            format: name.map_or_else(
                || {
                    guessed
                        .extensions_str()
                        .first()
                        .copied()
                        .unwrap_or("unknown")
                        .to_string()
                },
                |n| n.as_str().to_string(),
            ),
            allowed: allowed_list(),
        }),
    }
}

fn check_dimensions(width: u32, height: u32, limits: &ImageLimits) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroDimension { width, height });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    Ok(())
}

/// Width and height from a PNG's IHDR chunk, which the spec requires to come first.
fn png_ihdr_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(bytes.get(16..20)?.try_into().ok()?);
    let height = u32::from_be_bytes(bytes.get(20..24)?.try_into().ok()?);
    Some((width, height))
}

/// The IHDR's colour type (0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA).
fn png_ihdr_colour_type(bytes: &[u8]) -> Option<u8> {
    (bytes.get(12..16)? == b"IHDR").then(|| bytes.get(25).copied())?
}

/// Structural completeness checks for formats whose decoders accept truncated input.
fn check_complete(format: ImageFormatName, bytes: &[u8]) -> Result<(), ImageError> {
    let truncated = |detail: &str| ImageError::Truncated {
        format,
        detail: detail.to_string(),
    };
    match format {
        ImageFormatName::Jpeg => {
            if jpeg_reaches_eoi(bytes) {
                Ok(())
            } else {
                Err(truncated(JPEG_NO_EOI))
            }
        }
        ImageFormatName::Webp => {
            // The RIFF header declares the file length; libwebp refuses shorter files.
            let declared = bytes
                .get(4..8)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .map_or(u64::MAX, |size| u64::from(size) + 8);
            if (bytes.len() as u64) < declared {
                Err(truncated(&format!(
                    "the RIFF header declares {declared} bytes but only {} are present",
                    bytes.len()
                )))
            } else {
                Ok(())
            }
        }
        // The PNG decoder fails on a short IDAT stream by itself but accepts a file cut
        // inside IEND; a cut file is a failed download, so require the whole chunk list.
        ImageFormatName::Png => {
            if png_reaches_iend(bytes) {
                Ok(())
            } else {
                Err(truncated("the data ends before the IEND chunk"))
            }
        }
    }
}

/// The truncation message for a JPEG whose marker walk does not reach EOI.
const JPEG_NO_EOI: &str = "the data ends before the end-of-image marker";

/// What the marker walk of a complete JPEG found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JpegLayout {
    /// The first start-of-frame segment (the one decoders use), when it is long enough
    /// to hold the dimensions.
    frame: Option<JpegFrame>,
    /// Start-of-scan markers before EOI.
    scans: usize,
}

impl JpegLayout {
    /// Whether a decoder must buffer the whole image's coefficients: progressive
    /// frames, or several scans (components coded separately).
    fn buffered(&self) -> bool {
        self.scans > 1
            || self
                .frame
                .is_some_and(|f| matches!(f.marker, 0xC2 | 0xC6 | 0xCA | 0xCE))
    }
}

/// A JPEG start-of-frame segment's marker (0xC0 baseline, 0xC2 progressive, ...) and
/// dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JpegFrame {
    marker: u8,
    width: u32,
    height: u32,
}

/// Whether a JPEG's marker stream reaches its EOI (0xFFD9) marker.
fn jpeg_reaches_eoi(bytes: &[u8]) -> bool {
    jpeg_layout(bytes).is_some()
}

/// Walk a JPEG's marker structure to its EOI (0xFFD9) marker; `None` when the data
/// ends first.
///
/// Decoders render a file cut short (libjpeg, like zune-jpeg, fills the missing MCUs
/// and only warns), so we walk the marker structure ourselves: length-prefixed segments
/// are skipped by their length (so an EOI inside an EXIF thumbnail does not count),
/// entropy-coded data is scanned for the next real marker (0xFF followed by anything
/// but 0x00 stuffing, RST0-7 or fill bytes). The stream must reach EOI; bytes after it
/// (zero padding, appended motion-photo videos) are ignored, as every decoder ignores
/// them. On the way it records the first SOF segment and counts the scans.
fn jpeg_layout(bytes: &[u8]) -> Option<JpegLayout> {
    let mut layout = JpegLayout {
        frame: None,
        scans: 0,
    };
    let mut i = 2; // past SOI
    loop {
        // Find the next 0xFF; anything else is entropy-coded data or stray bytes.
        let offset = bytes.get(i..)?.iter().position(|&b| b == 0xFF)?;
        let mut j = i + offset + 1;
        while bytes.get(j) == Some(&0xFF) {
            j += 1; // fill bytes
        }
        let marker = *bytes.get(j)?;
        match marker {
            0xD9 => return Some(layout),
            // Stuffed zero, restart markers, TEM, SOI: no length field follows.
            0x00 | 0x01 | 0xD0..=0xD8 => i = j + 1,
            _ => {
                let len = bytes.get(j + 1..j + 3)?;
                let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                if len < 2 || j + 1 + len > bytes.len() {
                    return None;
                }
                let segment = &bytes[j + 3..j + 1 + len];
                match marker {
                    // SOF0-15 except DHT (C4), JPG (C8) and DAC (CC): precision,
                    // height, width, component count, ...
                    0xC0..=0xCF
                        if !matches!(marker, 0xC4 | 0xC8 | 0xCC)
                            && layout.frame.is_none()
                            && segment.len() >= 5 =>
                    {
                        layout.frame = Some(JpegFrame {
                            marker,
                            height: u32::from(u16::from_be_bytes([segment[1], segment[2]])),
                            width: u32::from(u16::from_be_bytes([segment[3], segment[4]])),
                        });
                    }
                    0xDA => layout.scans += 1,
                    _ => {}
                }
                i = j + 1 + len;
            }
        }
    }
}

/// Run a decoder call, turning a panic inside a third-party decoder into a row error:
/// one hostile image must not take a whole run down.
fn guarded<T>(
    format: ImageFormatName,
    call: impl FnOnce() -> image::ImageResult<T>,
) -> Result<T, ImageError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(result) => result.map_err(|e| map_decoder_error(format, e)),
        Err(_) => Err(ImageError::Corrupt {
            format,
            message: "the decoder crashed on this data".to_string(),
        }),
    }
}

/// Whether a PNG's chunk list (length, type, data, CRC each) reaches a complete IEND
/// chunk; bytes after it are ignored, as decoders ignore them.
fn png_reaches_iend(bytes: &[u8]) -> bool {
    let mut i: usize = 8; // past the signature
    loop {
        let Some(header) = bytes.get(i..i + 8) else {
            return false;
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|len| i.checked_add(12)?.checked_add(len))
        else {
            return false;
        };
        if end > bytes.len() {
            return false;
        }
        if &header[4..8] == b"IEND" {
            return true;
        }
        i = end;
    }
}

fn map_decoder_error(format: ImageFormatName, err: image::ImageError) -> ImageError {
    match err {
        image::ImageError::Limits(e) => ImageError::MemoryLimit {
            format,
            message: e.to_string().trim().to_string(),
        },
        image::ImageError::Unsupported(e) => ImageError::Unsupported {
            format,
            message: e.to_string().trim().to_string(),
        },
        image::ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Truncated {
                format,
                detail: e.to_string(),
            }
        }
        other => {
            let message = other.to_string().trim().to_string();
            let lower = message.to_lowercase();
            if ["eof", "end of", "truncated", "not enough"]
                .iter()
                .any(|needle| lower.contains(needle))
            {
                ImageError::Truncated {
                    format,
                    detail: message,
                }
            } else {
                ImageError::Corrupt { format, message }
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn draft_scale_follows_pillow() {
        // min(w // rw, h // rh), rounded down to 8, 4, 2 or 1.
        assert_eq!(draft_scale((1024, 768), (298, 224)), 2);
        assert_eq!(draft_scale((1024, 768), (53, 40)), 8);
        assert_eq!(draft_scale((1024, 768), (512, 384)), 2);
        assert_eq!(draft_scale((1023, 768), (512, 384)), 1);
        assert_eq!(draft_scale((900, 900), (224, 224)), 4);
        assert_eq!(draft_scale((100, 100), (224, 224)), 1);
        assert_eq!(draft_scale((5000, 300), (746, 224)), 1);
        assert_eq!(draft_scale((10, 10), (0, 5)), 1);
    }

    use super::*;
    use image::{ExtendedColorType, ImageEncoder, Rgb};
    use proptest::prelude::*;

    const ALL: &[ImageFormatName] = &ImageFormatName::ALL;

    fn sample_rgb(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x ^ y) % 256) as u8,
            ])
        })
    }

    fn jpeg_bytes(width: u32, height: u32) -> Vec<u8> {
        let img = sample_rgb(width, height);
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .write_image(img.as_raw(), width, height, ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    fn png_bytes(width: u32, height: u32) -> Vec<u8> {
        let img = sample_rgb(width, height);
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(img.as_raw(), width, height, ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    fn webp_bytes(width: u32, height: u32) -> Vec<u8> {
        let img = sample_rgb(width, height);
        let mut out = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut out)
            .write_image(img.as_raw(), width, height, ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    /// A real camera JPEG (sklearn's sample photo) when `scripts/setup.sh` provided it.
    fn photo() -> Option<Vec<u8>> {
        let dir = std::env::var("TRUSTFLOW_PHOTOS_DIR").ok()?;
        std::fs::read(format!("{dir}/china.jpg")).ok()
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// Rewrite the IHDR width/height of a PNG and fix its CRC.
    fn with_png_dimensions(mut png: Vec<u8>, width: u32, height: u32) -> Vec<u8> {
        assert_eq!(&png[12..16], b"IHDR");
        png[16..20].copy_from_slice(&width.to_be_bytes());
        png[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    }

    fn is_truncated(result: Result<impl std::fmt::Debug, ImageError>) -> bool {
        matches!(result, Err(ImageError::Truncated { .. }))
    }

    #[test]
    fn crc32_matches_reference() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn decodes_valid_images_of_each_format() {
        let limits = ImageLimits::default();
        for (bytes, format) in [
            (jpeg_bytes(64, 48), ImageFormatName::Jpeg),
            (png_bytes(64, 48), ImageFormatName::Png),
            (webp_bytes(64, 48), ImageFormatName::Webp),
        ] {
            let info = probe(&bytes, &limits, ALL).unwrap();
            assert_eq!(
                info,
                ImageInfo {
                    format,
                    width: 64,
                    height: 48
                }
            );
            let (info2, rgb) = decode_rgb(&bytes, &limits, ALL).unwrap();
            assert_eq!(info2, info);
            assert_eq!(rgb.dimensions(), (64, 48));
            assert_eq!(rgb.as_raw().len(), 64 * 48 * 3);
        }
    }

    #[test]
    fn lossless_formats_round_trip_pixels() {
        let expected = sample_rgb(20, 10);
        for bytes in [png_bytes(20, 10), webp_bytes(20, 10)] {
            let (_, rgb) = decode_rgb(&bytes, &ImageLimits::default(), ALL).unwrap();
            assert_eq!(rgb, expected);
        }
    }

    #[test]
    fn decodes_sixteen_bit_rgba_png_to_rgb8() {
        let raw: Vec<u8> = (0..8u32 * 4 * 4).map(|i| (i * 37 % 256) as u8).collect();
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&raw, 4, 4, ExtendedColorType::Rgba16)
            .unwrap();
        let (info, rgb) = decode_rgb(&png, &ImageLimits::default(), ALL).unwrap();
        assert_eq!((info.width, info.height), (4, 4));
        assert_eq!(rgb.as_raw().len(), 4 * 4 * 3);
    }

    /// `decode_check` (the decode stage's path, into a reused buffer) accepts and
    /// refuses exactly what `decode_rgb` does, and leaves this thread a buffer to reuse.
    #[test]
    fn decode_check_agrees_with_decode_rgb() {
        let mut rgba16 = Vec::new();
        let raw: Vec<u8> = (0..8u32 * 5 * 3).map(|i| (i * 37 % 256) as u8).collect();
        image::codecs::png::PngEncoder::new(&mut rgba16)
            .write_image(&raw, 5, 3, ExtendedColorType::Rgba16)
            .unwrap();
        let mut grey = Vec::new();
        image::codecs::png::PngEncoder::new(&mut grey)
            .write_image(&[7u8; 6 * 4], 6, 4, ExtendedColorType::L8)
            .unwrap();
        let mut inputs = vec![
            jpeg_bytes(64, 48),
            png_bytes(33, 17),
            webp_bytes(20, 10),
            rgba16,
            grey,
            b"not an image".to_vec(),
            with_png_dimensions(png_bytes(8, 8), 60_000, 60_000),
        ];
        // Every format cut short and with bytes flipped in the middle.
        for whole in [jpeg_bytes(40, 30), png_bytes(40, 30), webp_bytes(40, 30)] {
            inputs.push(whole[..whole.len() * 2 / 3].to_vec());
            let mut flipped = whole.clone();
            let mid = flipped.len() / 2;
            for b in &mut flipped[mid..mid + 16] {
                *b ^= 0x5A;
            }
            inputs.push(flipped);
        }
        let limits = ImageLimits::default();
        let (mut accepted, mut refused) = (0, 0);
        for (i, bytes) in inputs.iter().enumerate() {
            let full = decode_rgb(bytes, &limits, ALL).map(|(info, _)| info);
            let check = decode_check(bytes, &limits, ALL);
            assert_eq!(check, full, "input {i}");
            if full.is_ok() {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        assert!(
            accepted >= 5 && refused >= 5,
            "{accepted} accepted, {refused} refused"
        );
        decode_check(&jpeg_bytes(64, 48), &limits, ALL).unwrap();
        let reused = scratch::zeroed(10).unwrap();
        assert!(
            reused.capacity() >= 64 * 48 * 3,
            "the decode's buffer is kept"
        );
        scratch::recycle(vec![0; scratch::KEEP_BYTES + 1]);
        assert!(scratch::zeroed(1).unwrap().capacity() < scratch::KEEP_BYTES);
    }

    #[test]
    fn decodes_real_photo() {
        let Some(photo) = photo() else { return };
        let (info, rgb) = decode_rgb(&photo, &ImageLimits::default(), ALL).unwrap();
        assert_eq!(info.format, ImageFormatName::Jpeg);
        assert_eq!(rgb.dimensions(), (info.width, info.height));
    }

    #[test]
    fn rejects_truncated_jpeg_at_any_point() {
        let mut samples = vec![jpeg_bytes(640, 480)];
        samples.extend(photo());
        for full in samples {
            let limits = ImageLimits::default();
            for pct in [5, 10, 25, 50, 75, 90, 95, 99] {
                let cut = &full[..full.len() * pct / 100];
                assert!(is_truncated(decode_rgb(cut, &limits, ALL)), "cut at {pct}%");
                assert!(
                    is_truncated(probe(cut, &limits, ALL)),
                    "probe cut at {pct}%"
                );
            }
            // Every cut within the last bytes, including the one dropping only 0xD9.
            for len in full.len() - 64..full.len() {
                let result = decode_rgb(&full[..len], &limits, ALL);
                assert!(is_truncated(result), "cut at {len} of {}", full.len());
            }
        }
    }

    #[test]
    fn truncated_jpeg_message_is_readable() {
        let full = jpeg_bytes(320, 240);
        let err = decode_rgb(&full[..full.len() / 2], &ImageLimits::default(), ALL).unwrap_err();
        assert_eq!(
            err.to_string(),
            "jpeg image is truncated: the data ends before the end-of-image marker"
        );
    }

    #[test]
    fn jpeg_with_trailing_padding_or_appended_data_still_decodes() {
        let full = jpeg_bytes(64, 48);
        let mut zeros = full.clone();
        zeros.extend([0u8; 7]);
        let mut whitespace = full.clone();
        whitespace.extend(b" \r\n\t");
        // Motion photos append a video after EOI; decoders ignore it and so do we.
        let mut appended = full.clone();
        appended.extend(b"\x00\x00\x00\x18ftypmp42 and more \xff\xd8 bytes");
        for bytes in [zeros, whitespace, appended] {
            let (info, _) = decode_rgb(&bytes, &ImageLimits::default(), ALL).unwrap();
            assert_eq!((info.width, info.height), (64, 48));
        }
    }

    #[test]
    fn rejects_truncated_png_and_webp() {
        let limits = ImageLimits::default();
        for full in [png_bytes(300, 200), webp_bytes(300, 200)] {
            for pct in [10, 50, 90, 99] {
                let cut = &full[..full.len() * pct / 100];
                let result = decode_rgb(cut, &limits, ALL);
                assert!(is_truncated(result), "cut at {pct}%");
            }
            let result = decode_rgb(&full[..full.len() - 1], &limits, ALL);
            assert!(is_truncated(result), "one byte short");
        }
    }

    #[test]
    fn rejects_empty_and_unknown_data() {
        let limits = ImageLimits::default();
        assert_eq!(probe(&[], &limits, ALL), Err(ImageError::Empty));
        assert_eq!(
            ImageError::Empty.to_string(),
            "image data is empty (0 bytes)"
        );
        let err = probe(b"this is not an image at all", &limits, ALL).unwrap_err();
        assert!(matches!(err, ImageError::UnknownFormat { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "not a recognised image format (unknown magic bytes 74 68 69 73 20 69 73 20)"
        );
    }

    #[test]
    fn rejects_too_many_bytes() {
        let bytes = png_bytes(16, 16);
        let limits = ImageLimits {
            max_bytes: 10,
            ..ImageLimits::default()
        };
        let err = probe(&bytes, &limits, ALL).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("image is {} bytes, over the limit of 10 bytes", bytes.len())
        );
    }

    #[test]
    fn rejects_formats_not_allowed() {
        let limits = ImageLimits::default();
        let err = probe(&png_bytes(4, 4), &limits, &[ImageFormatName::Jpeg]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "image format png is not allowed (allowed: jpeg)"
        );
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        let err = probe(gif, &limits, ALL).unwrap_err();
        assert_eq!(
            err.to_string(),
            "image format gif is not allowed (allowed: jpeg, png, webp)"
        );
    }

    #[test]
    fn png_bomb_is_rejected_from_the_header() {
        let bomb = with_png_dimensions(png_bytes(8, 8), 100_000, 100_000);
        let started = std::time::Instant::now();
        let err = decode_rgb(&bomb, &ImageLimits::default(), ALL).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(
            err,
            ImageError::TooManyPixels {
                width: 100_000,
                height: 100_000,
                pixels: 10_000_000_000,
                limit: 40_000_000
            }
        );
        assert_eq!(
            err.to_string(),
            "image dimensions 100000x100000 (10000000000 pixels) exceed the limit of \
             40000000 pixels"
        );
    }

    #[test]
    fn jpeg_and_webp_bombs_are_rejected_from_the_header() {
        // JPEG: patch the SOF0 frame header to 60000x60000.
        let mut jpeg = jpeg_bytes(16, 16);
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 7].copy_from_slice(&60_000u16.to_be_bytes());
        jpeg[sof + 7..sof + 9].copy_from_slice(&60_000u16.to_be_bytes());
        // WebP lossless: 14-bit (width-1), (height-1) after the 0x2f signature.
        let mut webp = webp_bytes(16, 16);
        assert_eq!(&webp[12..16], b"VP8L");
        let bits = u32::from_le_bytes(webp[21..25].try_into().unwrap());
        let bits = (bits & !0x0FFF_FFFF) | 15_999 | (15_999 << 14);
        webp[21..25].copy_from_slice(&bits.to_le_bytes());
        for (bomb, side) in [(jpeg, 60_000), (webp, 16_000)] {
            let started = std::time::Instant::now();
            let err = decode_rgb(&bomb, &ImageLimits::default(), ALL).unwrap_err();
            assert!(started.elapsed() < std::time::Duration::from_secs(1));
            assert!(
                matches!(err, ImageError::TooManyPixels { width, height, .. }
                    if width == side && height == side),
                "{err:?}"
            );
        }
    }

    #[test]
    fn pixel_limit_applies_to_ordinary_images() {
        let limits = ImageLimits {
            max_pixels: 64 * 48 - 1,
            ..ImageLimits::default()
        };
        for bytes in [jpeg_bytes(64, 48), png_bytes(64, 48), webp_bytes(64, 48)] {
            let err = probe(&bytes, &limits, ALL).unwrap_err();
            assert!(matches!(err, ImageError::TooManyPixels { .. }), "{err:?}");
        }
        let exact = ImageLimits {
            max_pixels: 64 * 48,
            ..ImageLimits::default()
        };
        decode_rgb(&png_bytes(64, 48), &exact, ALL).unwrap();
    }

    #[test]
    fn zero_dimension_png_is_rejected() {
        let png = with_png_dimensions(png_bytes(8, 8), 0, 8);
        let err = probe(&png, &ImageLimits::default(), ALL).unwrap_err();
        assert_eq!(err.to_string(), "image has zero width or height (0x8)");
    }

    #[test]
    fn corrupt_data_reports_the_decoder_message() {
        let mut png = png_bytes(16, 16);
        png[29] ^= 0xFF; // the IHDR CRC no longer matches
        let err = probe(&png, &ImageLimits::default(), ALL).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().starts_with("corrupt png image: "), "{err}");
    }

    #[test]
    fn jpeg_marker_walk() {
        // SOI, a COM segment hiding an EOI, then a scan whose data has stuffing and RST.
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xFE, 0x00, 0x04, 0xFF, 0xD9];
        assert!(!jpeg_reaches_eoi(&jpeg));
        jpeg.extend([
            0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56,
        ]);
        assert!(!jpeg_reaches_eoi(&jpeg));
        jpeg.extend([0xFF, 0xFF, 0xD9]);
        assert!(jpeg_reaches_eoi(&jpeg));
        // A segment length running past the end.
        assert!(!jpeg_reaches_eoi(&[
            0xFF, 0xD8, 0xFF, 0xE1, 0x10, 0x00, 0xFF, 0xD9
        ]));
        assert!(!jpeg_reaches_eoi(&[0xFF, 0xD8, 0xFF]));
    }

    #[test]
    fn jpeg_layout_reads_frame_and_scans() {
        let layout = jpeg_layout(&jpeg_bytes(64, 48)).unwrap();
        assert_eq!(
            layout.frame,
            Some(JpegFrame {
                marker: 0xC0,
                width: 64,
                height: 48
            })
        );
        assert_eq!(layout.scans, 1);
        assert!(!layout.buffered());
    }

    /// Offset of the first SOF0 marker's 0xC0 byte in `jpeg_bytes` output.
    fn sof0(jpeg: &[u8]) -> usize {
        jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap() + 1
    }

    #[test]
    fn arithmetic_jpeg_is_unsupported() {
        let mut jpeg = jpeg_bytes(16, 16);
        let sof = sof0(&jpeg);
        jpeg[sof] = 0xC9;
        let err = decode_rgb(&jpeg, &ImageLimits::default(), ALL).unwrap_err();
        assert_eq!(
            err.to_string(),
            "jpeg image uses an unsupported feature: arithmetic coding (SOF type 0xc9)"
        );
    }

    /// A fatal libjpeg error (here in its header parser) unwinds out of the C code and
    /// comes back as an error, not an abort.
    #[test]
    fn libjpeg_fatal_errors_become_errors() {
        let mut jpeg = jpeg_bytes(16, 16);
        let sof = sof0(&jpeg);
        jpeg[sof + 3] = 12; // sample precision
        let err = decode_rgb(&jpeg, &ImageLimits::default(), ALL).unwrap_err();
        assert_eq!(
            err.to_string(),
            "jpeg image uses an unsupported feature: Unsupported JPEG data precision 12"
        );
        // Two components: neither Pillow nor we have a colour model for it.
        let mut jpeg = jpeg_bytes(16, 16);
        jpeg[sof + 8] = 2;
        assert!(decode_rgb(&jpeg, &ImageLimits::default(), ALL).is_err());
        // A Huffman table reference to a table that does not exist.
        let mut jpeg = jpeg_bytes(16, 16);
        let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        jpeg[sos + 6] = 0x33;
        let err = decode_rgb(&jpeg, &ImageLimits::default(), ALL).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { .. }), "{err:?}");
    }

    #[test]
    fn jpeg_with_too_many_scans_is_refused_before_decoding() {
        let jpeg = jpeg_bytes(16, 16);
        let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let eoi = jpeg.len() - 2;
        let mut many = jpeg[..eoi].to_vec();
        for _ in 0..500 {
            many.extend_from_slice(&jpeg[sos..eoi]);
        }
        many.extend_from_slice(&[0xFF, 0xD9]);
        assert_eq!(jpeg_layout(&many).unwrap().scans, 501);
        let err = probe(&many, &ImageLimits::default(), ALL).unwrap_err();
        assert_eq!(
            err.to_string(),
            "jpeg image uses an unsupported feature: 501 scans, more than the 500 this \
             decoder accepts"
        );
    }

    #[test]
    fn png_chunk_walk() {
        let png = png_bytes(8, 8);
        assert!(png_reaches_iend(&png));
        let mut padded = png.clone();
        padded.extend([0u8; 5]);
        decode_rgb(&padded, &ImageLimits::default(), ALL).unwrap();
        for len in [0, 8, 20, 33, png.len() - 12, png.len() - 1] {
            assert!(!png_reaches_iend(&png[..len]), "cut at {len}");
        }
        // A chunk length near u32::MAX must not overflow the walk.
        let mut huge = png[..33].to_vec();
        huge.extend([0xFF, 0xFF, 0xFF, 0xFF, b'I', b'D', b'A', b'T']);
        assert!(!png_reaches_iend(&huge));
    }

    fn jpeg_fixture() -> &'static [u8] {
        static JPEG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        JPEG.get_or_init(|| jpeg_bytes(48, 32))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let limits = ImageLimits::default();
            let _ = probe(&bytes, &limits, ALL);
            let _ = decode_rgb(&bytes, &limits, ALL);
        }

        #[test]
        fn arbitrary_bytes_behind_real_magic_never_panic(
            magic in prop_oneof![
                Just(&b"\xFF\xD8\xFF"[..]),
                Just(&b"\x89PNG\r\n\x1a\n"[..]),
                Just(&b"RIFF\x00\x01\x00\x00WEBPVP8L"[..]),
                Just(&b"RIFF\x00\x01\x00\x00WEBPVP8 "[..]),
            ],
            rest in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let mut bytes = magic.to_vec();
            bytes.extend(rest);
            let _ = decode_rgb(&bytes, &ImageLimits::default(), ALL);
        }

        #[test]
        fn damaged_jpeg_never_panics(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            keep in 0.0f64..=1.0,
        ) {
            let mut bytes = jpeg_fixture().to_vec();
            for (index, value) in flips {
                let i = index.index(bytes.len());
                bytes[i] = value;
            }
            bytes.truncate((bytes.len() as f64 * keep) as usize);
            let limits = ImageLimits::default();
            if let Ok((info, rgb)) = decode_rgb(&bytes, &limits, ALL) {
                prop_assert_eq!(rgb.dimensions(), (info.width, info.height));
            }
        }

        #[test]
        fn truncated_jpeg_is_never_accepted(cut in 0usize..1_000_000) {
            let full = jpeg_fixture();
            let cut = cut % full.len();
            prop_assert!(decode_rgb(&full[..cut], &ImageLimits::default(), ALL).is_err());
        }
    }
}
