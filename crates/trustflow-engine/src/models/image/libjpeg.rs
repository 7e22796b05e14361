//! JPEG decoding with libjpeg-turbo's decoder, so that the RGB pixels are byte-identical
//! to Pillow's `Image.open(f).convert("RGB")` (Pillow's wheels decode JPEG with
//! libjpeg-turbo; the CLIP reference preprocessing decodes that way).
//!
//! The decoder is the one vendored in mozjpeg (a libjpeg-turbo fork whose changes are
//! all on the encoder side), compiled from C by the `mozjpeg-sys` crate with `cc` at build
//! time, with its SIMD kernels assembled by nasm (scripts/setup.sh installs it): no cmake,
//! no system library. libjpeg-turbo's SIMD decoding routines are bit-exact with its C
//! ones, and tests/engine/jpeg_parity.rs checks this build against Pillow's libjpeg-turbo
//! 3.2.
//!
//! What Pillow does, and so what this does:
//! - the accurate integer IDCT (`JDCT_ISLOW`) and fancy (triangle-filter) chroma
//!   upsampling, libjpeg's defaults, set explicitly here;
//! - greyscale (1 component) and YCbCr/RGB (3 components) straight to RGB by libjpeg;
//! - CMYK and YCCK (4 components) to CMYK by libjpeg, then Pillow's two steps: the
//!   channels inverted ("assume Adobe conventions", `CMYK;I`), then `convert("RGB")`'s
//!   `cmyk2rgb` (`R = (255 - K) - (C * (255 - K)) / 255`, rounded as Pillow rounds);
//! - other component counts are refused (Pillow refuses them too).
//!
//! Safety: libjpeg reports fatal errors through `error_exit`, which the `mozjpeg` crate
//! turns into a Rust unwind (`resume_unwind` with the message; the C code is compiled
//! with `-fexceptions` by mozjpeg-sys's `unwinding` feature, and the FFI is declared
//! `C-unwind`), never `longjmp` or `abort`. [`run`] catches that unwind, and any panic,
//! and turns it into an [`ImageError`]; dropping the decoder on the way out calls
//! `jpeg_destroy_decompress`. This needs `panic = "unwind"` (Cargo's default; the
//! manifest sets no `panic` in any profile). Warnings (corrupt-but-decodable data) are
//! silenced, as Pillow ignores them. Everything the caller checks before decoding
//! (completeness, dimensions, scan count, arithmetic coding) comes from our own marker
//! walk in the parent module, before libjpeg sees the data.

use mozjpeg::{ColorSpace, CompInfo, DctMethod, Decompress};

use super::{ImageError, ImageFormatName, ImageLimits, JpegLayout, check_dimensions};

const FORMAT: ImageFormatName = ImageFormatName::Jpeg;

/// Most scans (SOS markers) accepted in one JPEG. Each scan costs a pass over the image
/// and a small file can declare thousands (a known decoder DoS); real progressive files
/// have about 10, mozjpeg's optimised ones a few dozen. libjpeg-turbo's fuzzers use 500
/// as their limit (`TJPARAM_SCANLIMIT`).
const MAX_SCANS: usize = 500;

/// Bytes of one 8x8 block of 16-bit DCT coefficients.
const BYTES_PER_BLOCK: u64 = 128;

/// The header checks of `probe` for a JPEG whose marker walk reached EOI: dimensions
/// from our own parse of the SOF segment (before libjpeg allocates anything), the scan
/// limit, arithmetic coding, then libjpeg's own header parse (tables, markers up to the
/// first scan), whose dimensions must agree. Returns (width, height).
pub(super) fn probe(
    bytes: &[u8],
    layout: &JpegLayout,
    limits: &ImageLimits,
) -> Result<(u32, u32), ImageError> {
    if let Some(frame) = layout.frame {
        check_dimensions(frame.width, frame.height, limits)?;
        if matches!(frame.marker, 0xC9..=0xCB | 0xCD..=0xCF) {
            return Err(ImageError::Unsupported {
                format: FORMAT,
                message: format!("arithmetic coding (SOF type 0x{:02x})", frame.marker),
            });
        }
    }
    if layout.scans > MAX_SCANS {
        return Err(ImageError::Unsupported {
            format: FORMAT,
            message: format!(
                "{} scans, more than the {MAX_SCANS} this decoder accepts",
                layout.scans
            ),
        });
    }
    let (width, height) = run(|| {
        let decompress = Decompress::builder().from_mem(bytes).map_err(io_error)?;
        Ok((decompress.width(), decompress.height()))
    })?;
    let width = u32::try_from(width).map_err(|_| corrupt("width out of range"))?;
    let height = u32::try_from(height).map_err(|_| corrupt("height out of range"))?;
    if let Some(frame) = layout.frame
        && (frame.width, frame.height) != (width, height)
    {
        return Err(corrupt(&format!(
            "libjpeg reads the frame as {width}x{height}, the first SOF segment says {}x{}",
            frame.width, frame.height
        )));
    }
    Ok((width, height))
}

/// Decode a JPEG that `probe` accepted (at `width` x `height`) to 8-bit RGB, as Pillow's
/// `Image.open(f).convert("RGB")` does; with `scale` 2, 4 or 8, at 1/`scale` of its
/// size in each dimension (rounded up), the IDCT itself scaled, as Pillow's
/// `draft("RGB", ...)` asks libjpeg to (scale 1: full size).
pub(super) fn decode(
    bytes: &[u8],
    (width, height): (u32, u32),
    layout: &JpegLayout,
    limits: &ImageLimits,
    scale: u32,
) -> Result<image::RgbImage, ImageError> {
    let numerator = match scale {
        1 => 8,
        2 => 4,
        4 => 2,
        8 => 1,
        other => {
            return Err(ImageError::Unsupported {
                format: FORMAT,
                message: format!("a DCT scale of 1/{other} (1, 2, 4 or 8 are possible)"),
            });
        }
    };
    run(|| {
        let mut decompress = Decompress::builder().from_mem(bytes).map_err(io_error)?;
        if (decompress.width(), decompress.height()) != (width as usize, height as usize) {
            return Err(corrupt("the header changed between probe and decode"));
        }
        decompress.dct_method(DctMethod::IntegerSlow);
        decompress.do_fancy_upsampling(true);
        // numerator / 8 picks the same scaled IDCT as Pillow's 1 / scale.
        decompress.scale(numerator);
        check_memory(decompress.components(), layout, (width, height), limits)?;

        let (width, height) = (width.div_ceil(scale), height.div_ceil(scale));
        let (w, h) = (width as usize, height as usize);
        let mut rgb = super::scratch::zeroed(w * h * 3).ok_or_else(|| ImageError::MemoryLimit {
            format: FORMAT,
            message: format!("could not allocate {} bytes", w * h * 3),
        })?;
        match decompress.components().len() {
            1 | 3 => {
                let mut started = decompress.rgb().map_err(io_error)?;
                if (started.width(), started.height()) != (w, h) {
                    return Err(corrupt("libjpeg's output size differs from the header"));
                }
                started.read_scanlines_into(&mut rgb).map_err(io_error)?;
                started.finish().map_err(io_error)?;
            }
            4 => {
                let mut started = decompress
                    .to_colorspace(ColorSpace::JCS_CMYK)
                    .map_err(io_error)?;
                if (started.width(), started.height()) != (w, h) {
                    return Err(corrupt("libjpeg's output size differs from the header"));
                }
                let mut cmyk = zeroed(w * 4)?;
                for out in rgb.chunks_exact_mut(w * 3) {
                    started.read_scanlines_into(&mut cmyk).map_err(io_error)?;
                    cmyk_row_to_rgb(&cmyk, out);
                }
                started.finish().map_err(io_error)?;
            }
            n => {
                return Err(ImageError::Unsupported {
                    format: FORMAT,
                    message: format!("{n} colour components (only 1, 3 or 4 are decoded)"),
                });
            }
        }
        image::RgbImage::from_raw(width, height, rgb)
            .ok_or_else(|| corrupt("decoded buffer has the wrong size"))
    })
}

/// Pillow's CMYK JPEG path on one row of libjpeg's CMYK output: invert every channel
/// (rawmode `CMYK;I`), then `cmyk2rgb` from libImaging/Convert.c:
/// `nk = 255 - k; out = CLIP8(nk - MULDIV255(c, nk))` with
/// `MULDIV255(a, b) = (t = a * b + 128, ((t >> 8) + t) >> 8)`.
fn cmyk_row_to_rgb(cmyk: &[u8], rgb: &mut [u8]) {
    for (inp, out) in cmyk.chunks_exact(4).zip(rgb.chunks_exact_mut(3)) {
        // After inversion k' = 255 - k, so Pillow's nk = 255 - k' is libjpeg's k.
        let nk = u32::from(inp[3]);
        for (o, &raw) in out.iter_mut().zip(&inp[..3]) {
            let c = 255 - u32::from(raw);
            let t = c * nk + 128;
            let muldiv = ((t >> 8) + t) >> 8;
            *o = nk.saturating_sub(muldiv).min(255) as u8;
        }
    }
}

/// Refuse images whose decoding would need more memory than the limits allow: the RGB
/// output, plus libjpeg's whole-image coefficient buffer when the file has several scans
/// (progressive, or components in separate scans), 128 bytes per 8x8 block per
/// component. The budget is the one the other formats' decoders get.
fn check_memory(
    components: &[CompInfo],
    layout: &JpegLayout,
    (width, height): (u32, u32),
    limits: &ImageLimits,
) -> Result<(), ImageError> {
    let round_up = |blocks: u32, factor: i32| {
        let factor = u64::from(factor.clamp(1, 4).unsigned_abs());
        u64::from(blocks).div_ceil(factor) * factor
    };
    let coefficients: u64 = if layout.buffered() {
        components
            .iter()
            .map(|c| {
                round_up(c.width_in_blocks, c.h_samp_factor)
                    .saturating_mul(round_up(c.height_in_blocks, c.v_samp_factor))
                    .saturating_mul(BYTES_PER_BLOCK)
            })
            .fold(0, u64::saturating_add)
    } else {
        0
    };
    let output = u64::from(width) * u64::from(height) * 3;
    let needed = coefficients.saturating_add(output);
    let budget = super::decoder_memory_budget(limits);
    if needed > budget {
        return Err(ImageError::MemoryLimit {
            format: FORMAT,
            message: format!("about {needed} bytes needed, {budget} allowed"),
        });
    }
    Ok(())
}

fn zeroed(len: usize) -> Result<Vec<u8>, ImageError> {
    let mut buffer = Vec::new();
    buffer
        .try_reserve_exact(len)
        .map_err(|_| ImageError::MemoryLimit {
            format: FORMAT,
            message: format!("could not allocate {len} bytes"),
        })?;
    buffer.resize(len, 0);
    Ok(buffer)
}

fn corrupt(message: &str) -> ImageError {
    ImageError::Corrupt {
        format: FORMAT,
        message: message.to_string(),
    }
}

/// Errors the `mozjpeg` wrapper returns (rather than unwinds with).
fn io_error(err: std::io::Error) -> ImageError {
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        ImageError::Truncated {
            format: FORMAT,
            detail: "libjpeg ran out of data".to_string(),
        }
    } else {
        corrupt(&err.to_string())
    }
}

/// Run libjpeg, turning its fatal errors (unwinds carrying "libjpeg fatal error: ..."),
/// and any other panic, into an [`ImageError`].
fn run<T>(call: impl FnOnce() -> Result<T, ImageError>) -> Result<T, ImageError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(result) => result,
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            match text.and_then(|t| t.strip_prefix("libjpeg fatal error: ")) {
                Some(message) => Err(libjpeg_error(message.trim())),
                None => Err(corrupt("the decoder crashed on this data")),
            }
        }
    }
}

/// Classify one of libjpeg's fatal error messages (jerror.h).
fn libjpeg_error(message: &str) -> ImageError {
    let message = message.to_string();
    if message.starts_with("Insufficient memory") {
        ImageError::MemoryLimit {
            format: FORMAT,
            message,
        }
    } else if message.starts_with("Unsupported")
        || message.starts_with("Sorry")
        || message.starts_with("Maximum supported image dimension")
        || message.contains("not supported")
        || message.contains("omitted at compile time")
    {
        ImageError::Unsupported {
            format: FORMAT,
            message,
        }
    } else {
        ImageError::Corrupt {
            format: FORMAT,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_conversion_matches_pillow_formula() {
        // Pillow: c' = 255 - c (CMYK;I), nk = 255 - k', out = nk - MULDIV255(c', nk).
        let pillow = |c: u8, k: u8| -> u8 {
            let (c, k) = (255 - i32::from(c), 255 - i32::from(k));
            let nk = 255 - k;
            let t = c * nk + 128;
            (nk - (((t >> 8) + t) >> 8)).clamp(0, 255) as u8
        };
        for c in 0..=255u8 {
            for k in [0u8, 1, 17, 128, 200, 254, 255] {
                let mut out = [0u8; 3];
                cmyk_row_to_rgb(&[c, c, c, k], &mut out);
                assert_eq!(out, [pillow(c, k); 3], "c {c} k {k}");
            }
        }
        let mut out = [0u8; 3];
        cmyk_row_to_rgb(&[255, 0, 128, 255], &mut out);
        assert_eq!(out, [255, 0, 128]);
    }

    #[test]
    fn libjpeg_messages_are_classified() {
        assert!(matches!(
            libjpeg_error("Unsupported JPEG data precision 12"),
            ImageError::Unsupported { .. }
        ));
        assert!(matches!(
            libjpeg_error("Sorry, arithmetic code support was not compiled"),
            ImageError::Unsupported { .. }
        ));
        assert!(matches!(
            libjpeg_error("Insufficient memory (case 4)"),
            ImageError::MemoryLimit { .. }
        ));
        let err = libjpeg_error("Bogus Huffman table definition");
        assert_eq!(
            err.to_string(),
            "corrupt jpeg image: Bogus Huffman table definition"
        );
    }

    #[test]
    fn panics_become_errors() {
        let err = run::<()>(|| panic!("boom")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "corrupt jpeg image: the decoder crashed on this data"
        );
        let err = run::<()>(|| {
            std::panic::resume_unwind(Box::new(
                "libjpeg fatal error: Bogus marker length".to_string(),
            ))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "corrupt jpeg image: Bogus marker length");
    }
}
