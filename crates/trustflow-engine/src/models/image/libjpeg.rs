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
//! Safety: libjpeg reports fatal errors through `error_exit`, which [`Decoder`] points
//! at a Rust function that unwinds (`resume_unwind` with a [`Fatal`]; the C code is
//! compiled with `-fexceptions` by mozjpeg-sys's `unwinding` feature, and the FFI is
//! declared `C-unwind`), never `longjmp` or `abort`. [`run`] catches that unwind, and
//! any panic, and turns it into an [`ImageError`]; dropping the decoder on the way out
//! calls `jpeg_destroy_decompress`. This needs `panic = "unwind"` (Cargo's default; the
//! manifest sets no `panic` in any profile). Warnings (corrupt-but-decodable data) are
//! silenced, as Pillow ignores them. Everything the caller checks before decoding
//! (completeness, dimensions, scan count, arithmetic coding) comes from our own marker
//! walk in the parent module, before libjpeg sees the data.
//!
//! Decoding part of an image: a caller that reads only a rectangle (a centre crop and
//! the resize filter's reach) gets [`decode`] to skip the rest with libjpeg-turbo's
//! `jpeg_crop_scanline` (the IDCT, upsampling and colour conversion of columns outside
//! it) and `jpeg_skip_scanlines` (those of the rows above and below; the entropy-coded
//! data is still read to the end, so a file is accepted or refused exactly as by a
//! whole decode). The rectangle it returns holds the whole decode's bytes: libjpeg
//! treats a crop's edges as the image's, so it decodes a margin of columns around the
//! rectangle asked for and drops the edge columns that can differ ([`CROP_MARGIN`],
//! [`CROP_EDGE`]), and one iMCU row above it. tests/engine/jpeg_parity.rs checks
//! thousands of rectangles of every fixture class against Pillow's pixels.

use std::marker::PhantomData;
use std::os::raw::{c_int, c_ulong};

use mozjpeg_sys as ffi;

use super::{
    DecodedPart, ImageError, ImageFormatName, ImageLimits, JpegLayout, ReadWindow, Window,
    check_dimensions,
};

const FORMAT: ImageFormatName = ImageFormatName::Jpeg;

/// Most scans (SOS markers) accepted in one JPEG. Each scan costs a pass over the image
/// and a small file can declare thousands (a known decoder DoS); real progressive files
/// have about 10, mozjpeg's optimised ones a few dozen. libjpeg-turbo's fuzzers use 500
/// as their limit (`TJPARAM_SCANLIMIT`).
const MAX_SCANS: usize = 500;

/// Bytes of one 8x8 block of 16-bit DCT coefficients.
const BYTES_PER_BLOCK: u64 = 128;

/// Columns decoded on each side of what a caller reads when a decode is cropped (more
/// than [`CROP_EDGE`], and enough to keep a cropped chroma component as wide as
/// libjpeg needs to keep the same upsampler: it changes method below three samples).
const CROP_MARGIN: usize = 16;

/// Columns dropped at each edge of a cropped decode that is not the image's own edge.
/// There libjpeg's fancy (triangle) upsampling of 2:1 subsampled chroma replicates the
/// edge sample instead of reading its neighbour, so the outermost output column can
/// differ from the whole decode's (measured: that column only, on 4:2:0 and 4:2:2
/// images); one more is dropped for good measure.
const CROP_EDGE: usize = 2;

/// `jpeg_read_header`'s answer for a stream with an image (`JPEG_HEADER_OK`).
const HEADER_OK: c_int = 1;

/// The payload of libjpeg's fatal errors as they unwind: the formatted message.
struct Fatal(String);

/// One libjpeg decompressor reading `bytes` from memory. Dropping it (also while an
/// error unwinds) calls `jpeg_destroy_decompress`, which frees everything libjpeg
/// allocated. Every method may unwind with a [`Fatal`]: call them inside [`run`].
struct Decoder<'a> {
    cinfo: Box<ffi::jpeg_decompress_struct>,
    /// Pointed to by `cinfo.common.err`; a field, so it is freed after `drop` has
    /// destroyed `cinfo`.
    err: Box<ffi::jpeg_error_mgr>,
    /// libjpeg reads `bytes` until the decoder is destroyed.
    _bytes: PhantomData<&'a [u8]>,
}

impl<'a> Decoder<'a> {
    /// A decompressor over `bytes`, with the header read (tables and markers up to the
    /// first scan).
    fn read_header(bytes: &'a [u8]) -> Result<Self, ImageError> {
        let len = c_ulong::try_from(bytes.len()).map_err(|_| corrupt("too many bytes"))?;
        // SAFETY: zeroed structs are the state libjpeg expects before
        // `jpeg_std_error` and `jpeg_create_decompress` fill them in. Both boxes keep
        // their addresses when moved into `decoder`; `err` is pointed to only after
        // that, and outlives `cinfo` (see the field). `bytes` outlives the decoder
        // (its lifetime), and libjpeg only reads it.
        unsafe {
            let mut decoder = Decoder {
                cinfo: Box::new(std::mem::zeroed()),
                err: Box::new(std::mem::zeroed()),
                _bytes: PhantomData,
            };
            ffi::jpeg_std_error(&mut decoder.err);
            decoder.err.error_exit = Some(unwind_error_exit);
            decoder.err.emit_message = Some(silence_message);
            decoder.cinfo.common.err = std::ptr::addr_of_mut!(*decoder.err);
            ffi::jpeg_create_decompress(&mut *decoder.cinfo);
            ffi::jpeg_mem_src(&mut decoder.cinfo, bytes.as_ptr(), len);
            if ffi::jpeg_read_header(&mut decoder.cinfo, 1) != HEADER_OK {
                return Err(corrupt("the data holds no image"));
            }
            Ok(decoder)
        }
    }

    fn components(&self) -> &[ffi::jpeg_component_info] {
        let count = usize::try_from(self.cinfo.num_components).unwrap_or(0);
        if self.cinfo.comp_info.is_null() || count == 0 {
            return &[];
        }
        // SAFETY: after `jpeg_read_header`, `comp_info` points at `num_components`
        // entries that live as long as the decompressor.
        unsafe { std::slice::from_raw_parts(self.cinfo.comp_info, count) }
    }

    /// Output rows libjpeg decodes together (an iMCU row) at the chosen scale.
    fn rows_per_imcu(&self, scale: u32) -> usize {
        let factor = usize::try_from(self.cinfo.max_v_samp_factor.clamp(1, 4)).unwrap_or(1);
        factor * (8 / scale as usize).max(1)
    }

    /// Limit the decode to the columns of `reads` (plus the margin), when that leaves
    /// some out; returns the first decoded column and how many there are.
    fn crop_columns(&mut self, reads: Window) -> (usize, usize) {
        let width = self.cinfo.output_width as usize;
        let left = reads.left.saturating_sub(CROP_MARGIN);
        let right = (reads.left + reads.width + CROP_MARGIN).min(width);
        if left == 0 && right == width {
            return (0, width);
        }
        // Both fit: they are at most the output width, a JDIMENSION.
        let (mut xoffset, mut cropped) = (left as u32, (right - left) as u32);
        // SAFETY: called after `jpeg_start_decompress`, before any row is read, with
        // a range inside the output width; libjpeg moves `xoffset` left to an iMCU
        // boundary and widens `cropped` to match.
        unsafe { ffi::jpeg_crop_scanline(&mut self.cinfo, &mut xoffset, &mut cropped) };
        (xoffset as usize, cropped as usize)
    }

    /// Skip `rows` output rows; libjpeg still reads their entropy-coded data.
    fn skip_rows(&mut self, rows: usize) -> Result<(), ImageError> {
        if rows == 0 {
            return Ok(());
        }
        let wanted = u32::try_from(rows).map_err(|_| corrupt("too many rows"))?;
        // SAFETY: the source is in memory (not suspending), and the decompressor is
        // scanning.
        let skipped = unsafe { ffi::jpeg_skip_scanlines(&mut self.cinfo, wanted) };
        if skipped != wanted {
            return Err(corrupt("libjpeg skipped fewer rows than asked"));
        }
        Ok(())
    }

    /// Decode the next `out.len() / row_len` rows into `out`, `row_len` bytes each.
    fn read_rows(&mut self, out: &mut [u8], row_len: usize) -> Result<(), ImageError> {
        let mut rows: Vec<*mut u8> = out
            .chunks_exact_mut(row_len)
            .map(<[u8]>::as_mut_ptr)
            .collect();
        let mut done = 0;
        while done < rows.len() {
            let left = u32::try_from(rows.len() - done).map_err(|_| corrupt("too many rows"))?;
            // SAFETY: each pointer is the start of `row_len` writable bytes of `out`,
            // the width libjpeg writes per row (checked by the caller against
            // `output_width` and the component count).
            let read = unsafe {
                ffi::jpeg_read_scanlines(&mut self.cinfo, rows[done..].as_mut_ptr(), left)
            };
            if read == 0 {
                return Err(ImageError::Truncated {
                    format: FORMAT,
                    detail: "libjpeg ran out of data".to_string(),
                });
            }
            done += read as usize;
        }
        Ok(())
    }

    /// Start decoding as Pillow does (accurate integer IDCT, fancy upsampling) at
    /// `numerator` / 8 of the size, to RGB (or to CMYK, converted row by row later);
    /// returns the output size.
    fn start(&mut self, numerator: u32, cmyk: bool) -> Result<(usize, usize), ImageError> {
        let cinfo = &mut *self.cinfo;
        cinfo.dct_method = ffi::J_DCT_METHOD::JDCT_ISLOW;
        cinfo.do_fancy_upsampling = 1;
        cinfo.scale_num = numerator;
        cinfo.scale_denom = 8;
        cinfo.out_color_space = if cmyk {
            ffi::J_COLOR_SPACE::JCS_CMYK
        } else {
            ffi::J_COLOR_SPACE::JCS_RGB
        };
        // SAFETY: the header is read and the parameters set; the source is in memory.
        if unsafe { ffi::jpeg_start_decompress(cinfo) } == 0 {
            return Err(corrupt("libjpeg could not start decoding"));
        }
        if cinfo.output_components != if cmyk { 4 } else { 3 } {
            return Err(corrupt("libjpeg's output has another number of channels"));
        }
        Ok((cinfo.output_width as usize, cinfo.output_height as usize))
    }

    /// Decode a rectangle holding `wanted` (of the started output) to RGB and go
    /// through the rest of the data; returns the rectangle held and its pixels.
    fn read_window(
        &mut self,
        wanted: Window,
        scale: u32,
        cmyk: bool,
    ) -> Result<(Window, Vec<u8>), ImageError> {
        let (width, height) = (
            self.cinfo.output_width as usize,
            self.cinfo.output_height as usize,
        );
        let (left, cropped) = self.crop_columns(wanted);
        if self.cinfo.output_width as usize != cropped {
            return Err(corrupt(
                "libjpeg's cropped width differs from the one it gave",
            ));
        }
        // One iMCU row above the rows asked for is decoded too. Skipping is exact
        // without it on every fixture class (tests/engine/jpeg_parity.rs, measured
        // with no margin), but the first rows after a skip with chroma upsampling are
        // where libjpeg-turbo's skip has needed fixes before, and a row costs little.
        let top = wanted.top.saturating_sub(self.rows_per_imcu(scale));
        let bottom = wanted.top + wanted.height;
        let decoded = Window {
            left,
            top,
            width: cropped,
            height: bottom - top,
        };
        let len = decoded.width * decoded.height * 3;
        let mut rgb = super::scratch::zeroed(len).ok_or_else(|| ImageError::MemoryLimit {
            format: FORMAT,
            message: format!("could not allocate {len} bytes"),
        })?;
        let channels = if cmyk { 4 } else { 3 };
        self.skip_rows(top)?;
        if cmyk {
            let mut row = zeroed(decoded.width * 4)?;
            for out in rgb.chunks_exact_mut(decoded.width * 3) {
                self.read_rows(&mut row, decoded.width * 4)?;
                cmyk_row_to_rgb(&row, out);
            }
        } else {
            self.read_rows(&mut rgb, decoded.width * 3)?;
        }
        // The rows below are skipped but for the last, which is read so that libjpeg
        // goes through all the data and the end of the file as a whole decode does
        // (skipping to the end would mark the input finished unread).
        if bottom < height {
            self.skip_rows(height - bottom - 1)?;
            let mut row = zeroed(decoded.width * channels)?;
            self.read_rows(&mut row, decoded.width * channels)?;
        }
        // SAFETY: every output row has been read or skipped.
        if unsafe { ffi::jpeg_finish_decompress(&mut self.cinfo) } == 0 {
            return Err(corrupt("libjpeg could not finish decoding"));
        }
        let held = drop_crop_edges(&mut rgb, decoded, width);
        Ok((held, rgb))
    }
}

impl Drop for Decoder<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `read_header` (a decompressor that was never created
        // is all zeros, which `jpeg_destroy_decompress` also accepts: it frees
        // nothing when `mem` is null).
        unsafe { ffi::jpeg_destroy_decompress(&mut self.cinfo) };
    }
}

/// libjpeg's `error_exit`: unwind with the formatted message.
extern "C-unwind" fn unwind_error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    let message = formatted_message(cinfo);
    std::panic::resume_unwind(Box::new(Fatal(message)));
}

/// libjpeg's `emit_message`: warnings and traces are dropped, as Pillow drops them.
extern "C-unwind" fn silence_message(_cinfo: &mut ffi::jpeg_common_struct, _level: c_int) {}

/// The message of the error being reported, from libjpeg's own table.
fn formatted_message(cinfo: &mut ffi::jpeg_common_struct) -> String {
    /// `JMSG_LENGTH_MAX`.
    type Buffer = [u8; 80];
    // SAFETY: `err` is the manager `Decoder::read_header` installed. `format_message`
    // writes a NUL-terminated message of at most `JMSG_LENGTH_MAX` bytes into its
    // buffer; the binding declares that buffer `&[u8; 80]` although it is written, so
    // the function is called through a pointer type that says `&mut`.
    unsafe {
        let Some(format) = cinfo.err.as_ref().and_then(|err| err.format_message) else {
            return "unknown error".to_string();
        };
        let format = std::mem::transmute::<
            unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, &Buffer),
            unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, &mut Buffer),
        >(format);
        let mut buffer: Buffer = [0; 80];
        format(cinfo, &mut buffer);
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    }
}

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
        let decoder = Decoder::read_header(bytes)?;
        Ok((decoder.cinfo.image_width, decoder.cinfo.image_height))
    })?;
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
/// `draft("RGB", ...)` asks libjpeg to (scale 1: full size). With `reads`, only a
/// rectangle holding the one it names is decoded (see the module's notes).
pub(super) fn decode(
    bytes: &[u8],
    (width, height): (u32, u32),
    layout: &JpegLayout,
    limits: &ImageLimits,
    scale: u32,
    reads: Option<ReadWindow<'_>>,
) -> Result<DecodedPart, ImageError> {
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
        let mut decoder = Decoder::read_header(bytes)?;
        if (decoder.cinfo.image_width, decoder.cinfo.image_height) != (width, height) {
            return Err(corrupt("the header changed between probe and decode"));
        }
        let cmyk = match decoder.cinfo.num_components {
            1 | 3 => false,
            4 => true,
            n => {
                return Err(ImageError::Unsupported {
                    format: FORMAT,
                    message: format!("{n} colour components (only 1, 3 or 4 are decoded)"),
                });
            }
        };
        check_memory(decoder.components(), layout, (width, height), limits)?;
        let (w, h) = decoder.start(numerator, cmyk)?;
        if (w, h)
            != (
                width.div_ceil(scale) as usize,
                height.div_ceil(scale) as usize,
            )
        {
            return Err(corrupt("libjpeg's output size differs from the header"));
        }
        let whole = Window::whole(w, h);
        let wanted = reads.map_or(whole, |reads| reads((w, h), (width, height)).within(whole));
        let (held, pixels) = decoder.read_window(wanted, scale, cmyk)?;
        Ok(DecodedPart {
            width: w,
            height: h,
            held,
            pixels,
        })
    })
}

/// Drop the columns at a crop's edges that may differ from the whole decode
/// ([`CROP_EDGE`] at each edge that is not the image's), packing the rows of `rgb`
/// (`decoded`'s pixels, in an image `width` wide) in place; returns what is left.
fn drop_crop_edges(rgb: &mut Vec<u8>, decoded: Window, width: usize) -> Window {
    let cut_left = if decoded.left > 0 { CROP_EDGE } else { 0 };
    let cut_right = if decoded.left + decoded.width < width {
        CROP_EDGE
    } else {
        0
    };
    if cut_left + cut_right == 0 {
        return decoded;
    }
    // The margin keeps a cropped decode wider than the cut.
    let kept = decoded.width.saturating_sub(cut_left + cut_right);
    for y in 0..decoded.height {
        let from = (y * decoded.width + cut_left) * 3;
        rgb.copy_within(from..from + kept * 3, y * kept * 3);
    }
    rgb.truncate(decoded.height * kept * 3);
    Window {
        left: decoded.left + cut_left,
        width: kept,
        ..decoded
    }
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
    components: &[ffi::jpeg_component_info],
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

/// Run libjpeg, turning its fatal errors (unwinds carrying a [`Fatal`]), and any other
/// panic, into an [`ImageError`].
fn run<T>(call: impl FnOnce() -> Result<T, ImageError>) -> Result<T, ImageError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(result) => result,
        Err(payload) => match payload.downcast_ref::<Fatal>() {
            Some(Fatal(message)) => Err(libjpeg_error(message.trim())),
            None => Err(corrupt("the decoder crashed on this data")),
        },
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
            std::panic::resume_unwind(Box::new(Fatal("Bogus marker length".to_string())))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "corrupt jpeg image: Bogus marker length");
    }
}
