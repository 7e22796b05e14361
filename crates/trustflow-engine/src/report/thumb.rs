//! Thumbnails for the report. Images come from the corpus, so they are untrusted: they
//! go through the engine's own decoder under the same limits as the pipeline (a
//! decompression bomb fails here from its header, as it does there), then shrink and
//! become a small inline JPEG, so the page needs no file beside it.

use base64::Engine as _;
use image::codecs::jpeg::JpegEncoder;
use serde::Serialize;

use crate::models::image::{ImageSettings, decode_rgb};

/// A decoded, shrunk image as a `data:` URI.
#[derive(Debug, Clone, Serialize)]
pub struct Thumbnail {
    /// Never serialised into the JSON summary (it is the picture itself).
    #[serde(skip)]
    pub data_uri: String,
    pub width: u32,
    pub height: u32,
    /// The decoded image's size.
    pub source_width: u32,
    pub source_height: u32,
}

/// JPEG quality of thumbnails: small files, artefacts invisible at this size.
const QUALITY: u8 = 85;

/// Decode `bytes` under `settings` and fit the picture in `max_side` x `max_side`
/// (never enlarged; the page scales small images up with crisp pixels). The error is
/// the decoder's message, shown in place of the picture.
pub fn thumbnail(
    bytes: &[u8],
    max_side: u32,
    settings: &ImageSettings,
) -> Result<Thumbnail, String> {
    let (info, rgb) =
        decode_rgb(bytes, &settings.limits(), &settings.formats).map_err(|e| e.to_string())?;
    let (width, height) = fit(info.width, info.height, max_side.max(1));
    let small = if (width, height) == (info.width, info.height) {
        rgb
    } else {
        image::imageops::thumbnail(&rgb, width, height)
    };
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, QUALITY)
        .encode_image(&small)
        .map_err(|e| format!("cannot encode the thumbnail: {e}"))?;
    Ok(Thumbnail {
        data_uri: format!(
            "data:image/jpeg;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&jpeg)
        ),
        width,
        height,
        source_width: info.width,
        source_height: info.height,
    })
}

/// The largest size within `max_side` x `max_side` with the aspect ratio of
/// `width` x `height` (each side at least 1).
fn fit(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let longest = width.max(height);
    if longest <= max_side {
        return (width, height);
    }
    let scale = |side: u32| {
        ((u64::from(side) * u64::from(max_side) + u64::from(longest) / 2) / u64::from(longest))
            .max(1) as u32
    };
    (scale(width), scale(height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_the_aspect_and_never_enlarges() {
        assert_eq!(fit(28, 28, 96), (28, 28));
        assert_eq!(fit(1000, 500, 100), (100, 50));
        assert_eq!(fit(500, 1000, 100), (50, 100));
        assert_eq!(fit(10_000, 1, 100), (100, 1));
    }

    #[test]
    fn a_png_becomes_a_small_jpeg_and_garbage_becomes_a_reason() {
        let img = image::RgbImage::from_fn(300, 150, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        let t = thumbnail(&png, 96, &ImageSettings::default()).expect("thumbnail");
        assert_eq!((t.width, t.height, t.source_width), (96, 48, 300));
        assert!(t.data_uri.starts_with("data:image/jpeg;base64,/9j/"));

        let err = thumbnail(b"not an image", 96, &ImageSettings::default()).unwrap_err();
        assert!(!err.is_empty());
    }

    #[test]
    fn a_bomb_is_refused_from_its_header() {
        let settings = ImageSettings {
            max_pixels: 1_000,
            ..ImageSettings::default()
        };
        let img = image::RgbImage::new(100, 100);
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        let err = thumbnail(&png, 96, &settings).unwrap_err();
        assert!(err.contains("pixels"), "{err}");
    }
}
