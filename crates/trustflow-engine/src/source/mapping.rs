//! Shard columns -> the canonical table (`crate::columns`). Resolved once per shard
//! from its footer (so a wrong name or type fails before any work), then applied to
//! every batch. Per-row problems (an image path escaping its root, a caption that is
//! not UTF-8, a null label) become quarantine reasons, never errors.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, LargeBinaryBuilder, StringArray, StringBuilder, StructArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::columns::{self, CAPTION, ID, IMAGE, LABEL, SYNTHETIC_ID_PREFIX};
use crate::error::{Error, Result};
use crate::quarantine::split_rows;
use crate::spec::{ImageLayout, NullLabels, SourcePreset, SourceSpec};

/// How a shard stores its images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSource {
    Bytes,
    HfStruct,
    Path,
}

/// Which shard column feeds each logical column, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// (logical, physical) in canonical order.
    pub columns: Vec<(&'static str, String)>,
    pub image: Option<ImageSource>,
    /// Shard columns carried through as they are (`source.keep_columns`).
    pub kept: Vec<arrow::datatypes::Field>,
}

impl Mapping {
    pub fn logical_columns(&self) -> Vec<&'static str> {
        self.columns.iter().map(|(l, _)| *l).collect()
    }

    /// The shard column that feeds `image` as plain bytes, if any: the canonical
    /// `image` holds its bytes, so a quarantined row restores it from there.
    pub fn image_bytes_column(&self) -> Option<&str> {
        match self.image {
            Some(ImageSource::Bytes) | None => self
                .columns
                .iter()
                .find(|(l, _)| *l == IMAGE)
                .map(|(_, p)| p.as_str()),
            Some(ImageSource::HfStruct | ImageSource::Path) => None,
        }
    }

    pub fn canonical_schema(&self) -> SchemaRef {
        let base = columns::canonical_schema(&self.logical_columns());
        let mut fields: Vec<arrow::datatypes::Field> =
            base.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.extend(self.kept.iter().cloned());
        Arc::new(Schema::new(fields))
    }
}

fn preset_name(preset: Option<SourcePreset>, logical: &str) -> Option<&'static str> {
    match (preset, logical) {
        (Some(SourcePreset::Img2dataset), "id") => Some("key"),
        (Some(SourcePreset::Img2dataset), "image") => Some("jpg"),
        (Some(SourcePreset::Img2dataset), "caption") => Some("caption"),
        _ => None,
    }
}

fn is_string(t: &DataType) -> bool {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => is_string(v),
        _ => false,
    }
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

fn is_hf_struct(t: &DataType) -> bool {
    match t {
        DataType::Struct(fields) => fields
            .iter()
            .any(|f| f.name() == "bytes" && is_binary(f.data_type())),
        _ => false,
    }
}

/// Decide the mapping for a shard with `schema`. Errors are (field path, message).
pub fn resolve(
    spec: &SourceSpec,
    schema: &Schema,
) -> std::result::Result<Mapping, Vec<(String, String)>> {
    let mut issues = Vec::new();
    let mut columns = Vec::new();
    let mut image = None;
    let available = || {
        schema
            .fields()
            .iter()
            .map(|f| format!("{} ({})", f.name(), f.data_type()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for logical in columns::LOGICAL {
        let explicit = spec.columns.get(logical);
        let physical = explicit
            .or(preset_name(spec.preset, logical))
            .unwrap_or(logical);
        let field_path = format!("source.columns.{logical}");
        let Ok(field) = schema.field_with_name(physical) else {
            if explicit.is_some() {
                issues.push((
                    field_path,
                    format!(
                        "column `{physical}` not found in the shard; it has: {}",
                        available()
                    ),
                ));
            }
            continue;
        };
        let t = field.data_type();
        let expected: Option<&str> = match logical {
            ID if !(is_string(t) || t.is_integer()) => Some("a string or integer column"),
            CAPTION if !(is_string(t) || is_binary(t)) => Some("a string (or UTF-8 binary) column"),
            LABEL if !t.is_integer() => Some("an integer column"),
            IMAGE => {
                let detected = if is_binary(t) {
                    Some(ImageSource::Bytes)
                } else if is_hf_struct(t) {
                    Some(ImageSource::HfStruct)
                } else if is_string(t) {
                    Some(ImageSource::Path)
                } else {
                    None
                };
                let wanted = match spec.image_layout {
                    ImageLayout::Auto => detected,
                    ImageLayout::Bytes => Some(ImageSource::Bytes),
                    ImageLayout::HfStruct => Some(ImageSource::HfStruct),
                    ImageLayout::Path => Some(ImageSource::Path),
                };
                image = wanted.filter(|w| Some(*w) == detected);
                match (wanted, image) {
                    (_, Some(_)) => None,
                    (None, _) => {
                        Some("binary image bytes, a {bytes, path} struct, or a string path column")
                    }
                    (Some(ImageSource::Bytes), None) => {
                        Some("a binary column (image_layout: bytes)")
                    }
                    (Some(ImageSource::HfStruct), None) => {
                        Some("a struct with a binary `bytes` field (image_layout: hf_struct)")
                    }
                    (Some(ImageSource::Path), None) => Some("a string column (image_layout: path)"),
                }
            }
            "domain" | "split" if !is_string(t) => Some("a string column"),
            _ => None,
        };
        // A layout the user chose explicitly is where the mismatch is.
        let field_path = if logical == IMAGE && spec.image_layout != ImageLayout::Auto {
            "source.image_layout".to_string()
        } else {
            field_path
        };
        match expected {
            Some(what) => issues.push((
                field_path,
                format!("column `{physical}` has type {t}; expected {what}"),
            )),
            None => columns.push((logical, physical.to_string())),
        }
    }
    let mut kept = Vec::new();
    for (i, name) in spec.keep_columns.iter().enumerate() {
        let at = format!("source.keep_columns[{i}]");
        if columns::LOGICAL.contains(&name.as_str()) || columns.iter().any(|(_, p)| p == name) {
            issues.push((
                at,
                format!("`{name}` is already a mapped column; list only other columns here"),
            ));
        } else if let Ok(field) = schema.field_with_name(name) {
            // Read back as stored; DataFusion's view types are cast to the file's types.
            kept.push(field.clone().with_nullable(true));
        } else {
            issues.push((
                at,
                format!(
                    "column `{name}` not found in the shard; it has: {}",
                    available()
                ),
            ));
        }
    }
    if issues.is_empty() {
        Ok(Mapping {
            columns,
            image,
            kept,
        })
    } else {
        Err(issues)
    }
}

/// Applies a [`Mapping`] to the batches of one shard.
pub struct Converter {
    pub mapping: Mapping,
    pub canonical: SchemaRef,
    pub stem: String,
    pub shard: PathBuf,
    /// Canonicalised folder that image paths must stay inside; None for a shard in an
    /// object store without `source.image_root` (its rows' image paths cannot be read).
    pub image_root: Option<PathBuf>,
    pub max_file_bytes: u64,
    pub null_labels: NullLabels,
}

/// The stage name quarantine rows carry when the source rejected them.
pub const SOURCE_STAGE: &str = "source";

impl Converter {
    /// An Arrow failure while converting this shard's columns, with its cause kept.
    fn arrow_error(&self, source: arrow::error::ArrowError) -> Error {
        Error::Arrow {
            context: format!("{}: converting the shard's columns", self.shard.display()),
            source,
        }
    }

    /// Canonicalise one batch read from the shard. `first_row` is the index (among rows
    /// read from this shard) of the batch's first row, used for synthesised ids.
    pub fn convert(
        &self,
        batch: &RecordBatch,
        first_row: u64,
    ) -> Result<(RecordBatch, Option<RecordBatch>)> {
        let n = batch.num_rows();
        let mut rejected: Vec<(usize, String)> = Vec::new();
        let mut out: Vec<ArrayRef> = Vec::with_capacity(self.canonical.fields().len());
        let shard_err = |m: String| Error::input(&self.shard, m);
        let arrow_err = |source| self.arrow_error(source);
        let mapped = |logical: &str| {
            self.mapping
                .columns
                .iter()
                .find(|(l, _)| *l == logical)
                .and_then(|(_, p)| batch.column_by_name(p))
        };
        for field in self.canonical.fields() {
            let logical = field.name().as_str();
            let column: ArrayRef = match (logical, mapped(logical)) {
                (ID, None) => Arc::new(StringArray::from_iter_values(
                    (0..n as u64).map(|i| format!("{}:{}", self.stem, first_row + i)),
                )),
                (ID, Some(col)) => {
                    let ids = cast(col, &DataType::Utf8).map_err(arrow_err)?;
                    let ids = ids.as_string::<i32>();
                    let mut b = StringBuilder::with_capacity(n, n * 16);
                    for i in 0..n {
                        if ids.is_null(i) {
                            rejected.push((i, "id is null".into()));
                            b.append_value(format!(
                                "{SYNTHETIC_ID_PREFIX}{}:{}",
                                self.stem,
                                first_row + i as u64
                            ));
                        } else {
                            let id = ids.value(i);
                            if id.starts_with(SYNTHETIC_ID_PREFIX) {
                                rejected.push((
                                    i,
                                    format!(
                                        "id `{id}` starts with `{SYNTHETIC_ID_PREFIX}`, which is \
                                         reserved for the ids the engine gives rows without one"
                                    ),
                                ));
                            }
                            b.append_value(id);
                        }
                    }
                    Arc::new(b.finish())
                }
                (IMAGE, Some(col)) => self.images(col, &mut rejected)?,
                (CAPTION, Some(col)) if is_binary(col.data_type()) => {
                    let bytes = cast(col, &DataType::LargeBinary).map_err(arrow_err)?;
                    let bytes = bytes.as_binary::<i64>();
                    let mut b = StringBuilder::with_capacity(n, n * 32);
                    for i in 0..n {
                        if bytes.is_null(i) {
                            b.append_null();
                        } else if let Ok(s) = std::str::from_utf8(bytes.value(i)) {
                            b.append_value(s);
                        } else {
                            rejected.push((i, "caption is not valid UTF-8".into()));
                            b.append_null();
                        }
                    }
                    Arc::new(b.finish())
                }
                (LABEL, Some(col)) => {
                    let labels = cast(col, &DataType::Int64).map_err(arrow_err)?;
                    if self.null_labels == NullLabels::Quarantine {
                        for i in 0..n {
                            if labels.is_null(i) {
                                rejected.push((i, "label is null".into()));
                            }
                        }
                    }
                    labels
                }
                (_, Some(col)) => cast(col, field.data_type()).map_err(arrow_err)?,
                (_, None) if self.mapping.kept.iter().any(|k| k.name() == logical) => {
                    let col = batch.column_by_name(logical).ok_or_else(|| {
                        shard_err(format!("kept column `{logical}` disappeared while reading"))
                    })?;
                    cast(col, field.data_type()).map_err(arrow_err)?
                }
                (_, None) => {
                    return Err(shard_err(format!(
                        "column for `{logical}` disappeared while reading"
                    )));
                }
            };
            out.push(column);
        }
        let (source_field, source_row) = self.source_row(batch)?;
        out.push(source_row);
        let mut fields: Vec<Field> = self
            .canonical
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(source_field);
        let canonical =
            RecordBatch::try_new(Arc::new(Schema::new(fields)), out).map_err(arrow_err)?;
        rejected.sort_by_key(|(row, _)| *row);
        rejected.dedup_by_key(|(row, _)| *row);
        split_rows(&canonical, &rejected, SOURCE_STAGE)
    }

    /// The batch's own columns as one struct (`columns::SOURCE_ROW`), so that a row
    /// quarantined later is written as it came. The plain image-bytes column is left
    /// out: the canonical `image` holds the same bytes ([`Mapping::image_bytes_column`]).
    fn source_row(&self, batch: &RecordBatch) -> Result<(Field, ArrayRef)> {
        let skip = self.mapping.image_bytes_column();
        let (fields, arrays): (Vec<Arc<Field>>, Vec<ArrayRef>) = batch
            .schema()
            .fields()
            .iter()
            .zip(batch.columns())
            .filter(|(f, _)| Some(f.name().as_str()) != skip)
            .map(|(f, c)| (f.clone(), c.clone()))
            .unzip();
        let row: ArrayRef = if fields.is_empty() {
            Arc::new(StructArray::new_empty_fields(batch.num_rows(), None))
        } else {
            let slices = StructArray::try_new(fields.into(), arrays, None)
                .map_err(|e| self.arrow_error(e))?;
            // A compact copy: DataFusion's batches are slices of a row group's buffers,
            // which a carried slice would keep alive (and count) until the last row
            // of the group leaves the sink. The image bytes are not among them.
            let all = arrow::array::UInt32Array::from_iter_values(0..batch.num_rows() as u32);
            arrow::compute::take(&slices, &all, None).map_err(|e| self.arrow_error(e))?
        };
        Ok((
            Field::new(columns::SOURCE_ROW, row.data_type().clone(), false),
            row,
        ))
    }

    fn images(&self, col: &ArrayRef, rejected: &mut Vec<(usize, String)>) -> Result<ArrayRef> {
        let shard_err = |m: String| Error::input(&self.shard, m);
        let arrow_err = |source| self.arrow_error(source);
        let n = col.len();
        match self.mapping.image {
            Some(ImageSource::Bytes) | None => cast(col, &DataType::LargeBinary).map_err(arrow_err),
            Some(ImageSource::HfStruct) => {
                let st: &StructArray = col
                    .as_struct_opt()
                    .ok_or_else(|| shard_err("image column is no longer a struct".into()))?;
                let bytes = st
                    .column_by_name("bytes")
                    .map(|b| cast(b, &DataType::LargeBinary))
                    .transpose()
                    .map_err(arrow_err)?;
                let paths = st
                    .column_by_name("path")
                    .filter(|p| is_string(p.data_type()))
                    .map(|p| cast(p, &DataType::Utf8))
                    .transpose()
                    .map_err(arrow_err)?;
                let mut b = LargeBinaryBuilder::with_capacity(n, 0);
                for i in 0..n {
                    let inline = bytes
                        .as_ref()
                        .map(|a| a.as_binary::<i64>())
                        .filter(|a| !st.is_null(i) && a.is_valid(i))
                        .map(|a| a.value(i));
                    let path = paths
                        .as_ref()
                        .map(|a| a.as_string::<i32>())
                        .filter(|a| !st.is_null(i) && a.is_valid(i))
                        .map(|a| a.value(i));
                    match (inline, path) {
                        (Some(v), _) => b.append_value(v),
                        (None, Some(p)) => self.read_image_file(p, i, &mut b, rejected),
                        (None, None) => b.append_null(),
                    }
                }
                Ok(Arc::new(b.finish()))
            }
            Some(ImageSource::Path) => {
                let paths = cast(col, &DataType::Utf8).map_err(arrow_err)?;
                let paths = paths.as_string::<i32>();
                let mut b = LargeBinaryBuilder::with_capacity(n, 0);
                for i in 0..n {
                    if paths.is_null(i) {
                        b.append_null();
                    } else {
                        self.read_image_file(paths.value(i), i, &mut b, rejected);
                    }
                }
                Ok(Arc::new(b.finish()))
            }
        }
    }

    fn read_image_file(
        &self,
        relative: &str,
        row: usize,
        out: &mut LargeBinaryBuilder,
        rejected: &mut Vec<(usize, String)>,
    ) {
        let Some(root) = &self.image_root else {
            rejected.push((
                row,
                "image paths of a shard in an object store are not read; store the image \
                 bytes in the shard, or set source.image_root to a local folder"
                    .into(),
            ));
            out.append_null();
            return;
        };
        match read_confined(root, relative, self.max_file_bytes) {
            Ok(bytes) => out.append_value(bytes),
            Err(reason) => {
                rejected.push((row, reason));
                out.append_null();
            }
        }
    }
}

/// Read `relative` inside `root` (already canonical). Data is untrusted: absolute
/// paths, `..`, and symlinks that lead outside the root are refused, not followed.
pub fn read_confined(
    root: &Path,
    relative: &str,
    max_bytes: u64,
) -> std::result::Result<Vec<u8>, String> {
    let rel = Path::new(relative);
    if relative.is_empty() {
        return Err("image path is empty".into());
    }
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "image path `{relative}` is absolute or contains `..`; paths must stay inside {}",
            root.display()
        ));
    }
    let full = root.join(rel);
    let real = full
        .canonicalize()
        .map_err(|e| format!("image file `{relative}` cannot be opened: {e}"))?;
    if !real.starts_with(root) {
        return Err(format!(
            "image path `{relative}` leads outside {} (symlink)",
            root.display()
        ));
    }
    let meta = std::fs::metadata(&real).map_err(|e| format!("image file `{relative}`: {e}"))?;
    if !meta.is_file() {
        return Err(format!("image path `{relative}` is not a file"));
    }
    if meta.len() > max_bytes {
        return Err(format!(
            "image file `{relative}` is {} bytes, over the limit of {max_bytes}",
            meta.len()
        ));
    }
    std::fs::read(&real).map_err(|e| format!("image file `{relative}`: {e}"))
}
