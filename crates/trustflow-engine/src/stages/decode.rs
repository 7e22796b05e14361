//! The `decode` stage: proves every image is a usable JPEG, PNG or WebP within the
//! configured limits by fully decoding it, and records its size and format.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArrayType, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Stage, StageConfig, StageOutput, require_column};
use crate::columns::IMAGE;
use crate::error::{Error, Result};
use crate::models::image::{ImageSettings, decode_check};

/// Output column: image width in pixels.
pub const WIDTH: &str = "width";
/// Output column: image height in pixels.
pub const HEIGHT: &str = "height";
/// Output column: detected format (`jpeg`, `png`, `webp`).
pub const IMAGE_FORMAT: &str = "image_format";

/// Input types accepted for the `image` column (LargeBinary is canonical).
const ACCEPTED: [DataType; 3] = [
    DataType::LargeBinary,
    DataType::Binary,
    DataType::BinaryView,
];

/// Settings of the `decode` stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DecodeConfig {
    /// Image limits and formats: `max_pixels`, `max_bytes`, `formats`.
    #[serde(flatten)]
    pub image: ImageSettings,
}

impl StageConfig for DecodeConfig {
    fn validate(&self) -> Vec<(String, String)> {
        self.image.validate()
    }

    fn build(&self, name: String, _base: &std::path::Path) -> Result<Arc<dyn Stage>> {
        Ok(Arc::new(DecodeStage::new(name, self.clone())))
    }
}

/// The built `decode` stage.
#[derive(Debug)]
pub struct DecodeStage {
    name: String,
    config: DecodeConfig,
}

impl DecodeStage {
    /// Build the stage; the configuration is assumed validated by the spec layer.
    pub fn new(name: String, config: DecodeConfig) -> Self {
        Self { name, config }
    }

    fn decode_all<'a>(&self, images: impl BinaryArrayType<'a>, rows: usize) -> StageOutput {
        let limits = self.config.image.limits();
        let mut width = UInt32Builder::with_capacity(rows);
        let mut height = UInt32Builder::with_capacity(rows);
        let mut format = StringBuilder::with_capacity(rows, rows * 4);
        let mut rejected = Vec::new();
        for (row, image) in images.iter().enumerate() {
            let outcome = match image {
                None => Err("image is null".to_string()),
                Some(bytes) => decode_check(bytes, &limits, &self.config.image.formats)
                    .map_err(|e| e.to_string()),
            };
            match outcome {
                Ok(info) => {
                    width.append_value(info.width);
                    height.append_value(info.height);
                    format.append_value(info.format.as_str());
                }
                Err(reason) => {
                    width.append_null();
                    height.append_null();
                    format.append_null();
                    rejected.push((row, reason));
                }
            }
        }
        StageOutput {
            columns: vec![
                Arc::new(width.finish()) as ArrayRef,
                Arc::new(height.finish()),
                Arc::new(format.finish()),
            ],
            rejected,
        }
    }
}

impl Stage for DecodeStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn output_fields(&self, input: &Schema) -> Result<Vec<Field>> {
        require_column(&self.name, input, IMAGE, &ACCEPTED)?;
        Ok(vec![
            Field::new(WIDTH, DataType::UInt32, true),
            Field::new(HEIGHT, DataType::UInt32, true),
            Field::new(IMAGE_FORMAT, DataType::Utf8, true),
        ])
    }

    fn process(&self, batch: &RecordBatch) -> Result<StageOutput> {
        let schema = batch.schema();
        require_column(&self.name, &schema, IMAGE, &ACCEPTED)?;
        let column = batch
            .column_by_name(IMAGE)
            .ok_or_else(|| Error::stage(&self.name, format!("batch lacks column `{IMAGE}`")))?;
        let rows = batch.num_rows();
        Ok(match column.data_type() {
            DataType::LargeBinary => self.decode_all(column.as_binary::<i64>(), rows),
            DataType::Binary => self.decode_all(column.as_binary::<i32>(), rows),
            DataType::BinaryView => self.decode_all(column.as_binary_view(), rows),
            other => {
                return Err(Error::stage(
                    &self.name,
                    format!("input column `{IMAGE}` has unexpected type {other}"),
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::image::ImageFormatName;
    use crate::stages::{StageKind, StageSpec};
    use arrow::array::{Array, BinaryArray, BinaryViewArray, LargeBinaryArray};
    use image::{ExtendedColorType, ImageEncoder, RgbImage};
    use proptest::prelude::*;

    fn encode(format: ImageFormatName, width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        let (raw, color) = (img.as_raw(), ExtendedColorType::Rgb8);
        match format {
            ImageFormatName::Jpeg => image::codecs::jpeg::JpegEncoder::new(&mut out)
                .write_image(raw, width, height, color),
            ImageFormatName::Png => {
                image::codecs::png::PngEncoder::new(&mut out).write_image(raw, width, height, color)
            }
            ImageFormatName::Webp => image::codecs::webp::WebPEncoder::new_lossless(&mut out)
                .write_image(raw, width, height, color),
        }
        .unwrap();
        out
    }

    fn batch(images: ArrayRef) -> RecordBatch {
        let schema = Schema::new(vec![Field::new(IMAGE, images.data_type().clone(), true)]);
        RecordBatch::try_new(Arc::new(schema), vec![images]).unwrap()
    }

    fn stage() -> DecodeStage {
        DecodeStage::new("decode".to_string(), DecodeConfig::default())
    }

    fn rows() -> Vec<Option<Vec<u8>>> {
        let jpeg = encode(ImageFormatName::Jpeg, 40, 30);
        vec![
            Some(jpeg.clone()),
            None,
            Some(encode(ImageFormatName::Png, 5, 6)),
            Some(b"garbage".to_vec()),
            Some(Vec::new()),
            Some(jpeg[..jpeg.len() / 2].to_vec()),
            Some(encode(ImageFormatName::Webp, 7, 3)),
        ]
    }

    fn check_output(output: &StageOutput) {
        assert_eq!(output.columns.len(), 3);
        let width = output.columns[0].as_primitive::<arrow::datatypes::UInt32Type>();
        let height = output.columns[1].as_primitive::<arrow::datatypes::UInt32Type>();
        let format = output.columns[2].as_string::<i32>();
        let got: Vec<_> = (0..width.len())
            .map(|i| {
                (!width.is_null(i)).then(|| (width.value(i), height.value(i), format.value(i)))
            })
            .collect();
        assert_eq!(
            got,
            vec![
                Some((40, 30, "jpeg")),
                None,
                Some((5, 6, "png")),
                None,
                None,
                None,
                Some((7, 3, "webp")),
            ]
        );
        for i in [1, 3, 4, 5] {
            assert!(height.is_null(i) && format.is_null(i));
        }
        let reasons: Vec<(usize, &str)> = output
            .rejected
            .iter()
            .map(|(i, r)| (*i, r.as_str()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (1, "image is null"),
                (
                    3,
                    "not a recognised image format (unknown magic bytes 67 61 72 62 61 67 65)"
                ),
                (4, "image data is empty (0 bytes)"),
                (
                    5,
                    "jpeg image is truncated: the data ends before the end-of-image marker"
                ),
            ]
        );
    }

    #[test]
    fn decodes_large_binary_binary_and_binary_view() {
        let rows = rows();
        let as_slices = || rows.iter().map(|r| r.as_deref());
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(LargeBinaryArray::from_iter(as_slices())),
            Arc::new(BinaryArray::from_iter(as_slices())),
            Arc::new(BinaryViewArray::from_iter(as_slices())),
        ];
        for array in arrays {
            let batch = batch(array);
            let fields = stage().output_fields(&batch.schema()).unwrap();
            let names: Vec<_> = fields.iter().map(|f| f.name().as_str()).collect();
            assert_eq!(names, [WIDTH, HEIGHT, IMAGE_FORMAT]);
            assert!(fields.iter().all(|f| f.is_nullable()));
            let output = stage().process(&batch).unwrap();
            check_output(&output);
            for (column, field) in output.columns.iter().zip(&fields) {
                assert_eq!(column.data_type(), field.data_type());
            }
        }
    }

    #[test]
    fn respects_configured_formats_and_limits() {
        let config = DecodeConfig {
            image: ImageSettings {
                max_pixels: 100,
                max_bytes: 1 << 20,
                formats: vec![ImageFormatName::Png],
            },
        };
        let stage = DecodeStage::new("d".to_string(), config);
        let images = LargeBinaryArray::from_iter_values([
            encode(ImageFormatName::Jpeg, 4, 4),
            encode(ImageFormatName::Png, 4, 4),
            encode(ImageFormatName::Png, 20, 20),
        ]);
        let output = stage.process(&batch(Arc::new(images))).unwrap();
        assert_eq!(
            output.rejected,
            vec![
                (
                    0,
                    "image format jpeg is not allowed (allowed: png)".to_string()
                ),
                (
                    2,
                    "image dimensions 20x20 (400 pixels) exceed the limit of 100 pixels"
                        .to_string()
                ),
            ]
        );
    }

    #[test]
    fn output_fields_name_missing_or_mistyped_column() {
        let stage = stage();
        let schema = Schema::new(vec![Field::new("caption", DataType::Utf8, true)]);
        let err = stage.output_fields(&schema).unwrap_err().to_string();
        assert!(
            err.contains("stage `decode`") && err.contains("`image`"),
            "{err}"
        );
        let schema = Schema::new(vec![Field::new(IMAGE, DataType::Utf8, true)]);
        let err = stage.output_fields(&schema).unwrap_err().to_string();
        assert!(err.contains("has type Utf8"), "{err}");
    }

    #[test]
    fn empty_batch_gives_empty_columns() {
        let output = stage()
            .process(&batch(Arc::new(LargeBinaryArray::from_iter_values(Vec::<
                Vec<u8>,
            >::new(
            )))))
            .unwrap();
        assert!(output.columns.iter().all(|c| c.is_empty()));
        assert!(output.rejected.is_empty());
    }

    #[test]
    fn config_defaults_and_serde() {
        let parsed: DecodeConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, DecodeConfig::default());
        assert_eq!(parsed.image.max_pixels, 40_000_000);
        assert_eq!(parsed.image.max_bytes, 33_554_432);
        assert_eq!(parsed.image.formats, ImageFormatName::ALL.to_vec());
        let parsed: DecodeConfig =
            serde_json::from_str(r#"{"max_pixels": 5, "formats": ["webp", "png"]}"#).unwrap();
        assert_eq!(parsed.image.max_pixels, 5);
        assert_eq!(
            parsed.image.formats,
            vec![ImageFormatName::Webp, ImageFormatName::Png]
        );
        // Unknown keys are refused by the spec loader (the flattened image block rules
        // out serde's own check).
        let typo = serde_json::json!({"max_pixel": 5});
        let (field, message) = StageKind::from_value("decode", typo, "stages[0]").unwrap_err();
        assert_eq!(field, "stages[0].max_pixel");
        assert!(message.starts_with("unknown field `max_pixel`, expected one of"), "{message}");
        assert!(serde_json::from_str::<DecodeConfig>(r#"{"formats": ["gif"]}"#).is_err());
        let round = serde_json::to_string(&parsed).unwrap();
        assert_eq!(
            serde_json::from_str::<DecodeConfig>(&round).unwrap(),
            parsed
        );
    }

    #[test]
    fn config_through_stage_spec() {
        let spec: StageSpec =
            serde_json::from_str(r#"{"type": "decode", "max_pixels": 7}"#).unwrap();
        assert_eq!(
            spec.kind,
            StageKind::Decode(DecodeConfig {
                image: ImageSettings {
                    max_pixels: 7,
                    ..ImageSettings::default()
                },
            })
        );
        assert_eq!(
            spec.build(std::path::Path::new(".")).unwrap().name(),
            "decode"
        );
    }

    #[test]
    fn schema_describes_every_field() {
        let schema = serde_json::to_value(schemars::schema_for!(DecodeConfig)).unwrap();
        for field in ["max_pixels", "max_bytes", "formats"] {
            let description = schema["properties"][field]["description"].as_str();
            assert!(description.is_some_and(|d| !d.is_empty()), "{field}");
        }
    }

    #[test]
    fn validate_reports_problems() {
        assert!(DecodeConfig::default().validate().is_empty());
        let bad = DecodeConfig {
            image: ImageSettings {
                max_pixels: 0,
                max_bytes: 0,
                formats: vec![],
            },
        };
        let fields: Vec<_> = bad.validate().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["max_pixels", "max_bytes", "formats"]);
        let dup = DecodeConfig {
            image: ImageSettings {
                formats: vec![
                    ImageFormatName::Png,
                    ImageFormatName::Jpeg,
                    ImageFormatName::Png,
                ],
                ..ImageSettings::default()
            },
        };
        assert_eq!(
            dup.validate(),
            vec![(
                "formats".to_string(),
                "`png` is listed more than once".to_string()
            )]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn process_never_panics(
            images in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..512)),
                0..16,
            )
        ) {
            let array = LargeBinaryArray::from_iter(images.iter().map(|r| r.as_deref()));
            let output = stage().process(&batch(Arc::new(array))).unwrap();
            prop_assert!(output.columns.iter().all(|c| c.len() == images.len()));
            prop_assert!(output.rejected.windows(2).all(|w| w[0].0 < w[1].0));
            for (row, image) in images.iter().enumerate() {
                let rejected = output.rejected.iter().any(|(i, _)| *i == row);
                prop_assert_eq!(rejected, output.columns[0].is_null(row));
                if image.is_none() {
                    prop_assert!(rejected);
                }
            }
        }
    }
}
