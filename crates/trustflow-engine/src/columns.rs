//! The canonical table that flows between stages. The source maps whatever columns a
//! shard has onto these names and types, so stages never care about input layouts.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

pub const ID: &str = "id";
/// Ids the engine makes up for rows whose id is null start with this; real ids that
/// start with it are rejected, so a made-up id can never equal a real one.
pub const SYNTHETIC_ID_PREFIX: &str = "~row:";
pub const IMAGE: &str = "image";
pub const CAPTION: &str = "caption";
pub const LABEL: &str = "label";
pub const DOMAIN: &str = "domain";
pub const SPLIT: &str = "split";

/// The row as the source read it: a struct of the shard's own columns (names, types
/// and bytes as stored), carried beside the canonical columns so that a quarantined
/// row is written back as it came and can be repaired and fed again. Outputs never
/// hold it. The column that feeds `image` as plain bytes is left out (carrying it
/// would double the images in memory) and is restored from `image` instead.
pub const SOURCE_ROW: &str = "__trustflow_source_row";

/// Quarantine-only columns: which stage rejected the row and why.
pub const ERROR_STAGE: &str = "error_stage";
pub const ERROR: &str = "error";

/// The logical columns a source can map, in canonical order.
pub const LOGICAL: [&str; 6] = [ID, IMAGE, CAPTION, LABEL, DOMAIN, SPLIT];

/// Canonical Arrow type of a logical column. Images are LargeBinary so a batch of big
/// images never overflows 32-bit offsets.
pub fn canonical_type(logical: &str) -> DataType {
    match logical {
        IMAGE => DataType::LargeBinary,
        LABEL => DataType::Int64,
        _ => DataType::Utf8,
    }
}

/// Canonical schema holding `present` logical columns (always `id` first).
pub fn canonical_schema(present: &[&str]) -> SchemaRef {
    let fields: Vec<Field> = LOGICAL
        .iter()
        .filter(|name| **name == ID || present.contains(name))
        .map(|name| Field::new(*name, canonical_type(name), *name != ID))
        .collect();
    Arc::new(Schema::new(fields))
}

/// Schema of a quarantine shard: the input shard's own columns as stored, plus the
/// reason. An input that is itself a quarantine shard (repaired and fed again) has
/// its old reason replaced by the new one.
pub fn quarantine_schema(source: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = source
        .fields()
        .iter()
        .filter(|f| f.name() != ERROR_STAGE && f.name() != ERROR)
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(ERROR_STAGE, DataType::Utf8, false));
    fields.push(Field::new(ERROR, DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

// Output file names: for input `<stem>.parquet` the sink writes these beside each
// other; the source needs them too, to skip quarantine shards in folders and globs.

pub fn output_name(stem: &str) -> String {
    format!("{stem}.parquet")
}

/// How quarantine shards' names end (the source skips them in folders and globs).
pub const QUARANTINE_SUFFIX: &str = ".quarantine.parquet";

pub fn quarantine_name(stem: &str) -> String {
    format!("{stem}{QUARANTINE_SUFFIX}")
}

pub fn manifest_name(stem: &str) -> String {
    format!("{stem}.manifest.json")
}

/// Every file a shard's outputs take in the output folder.
pub fn output_names(stem: &str) -> [String; 3] {
    [
        output_name(stem),
        quarantine_name(stem),
        manifest_name(stem),
    ]
}
