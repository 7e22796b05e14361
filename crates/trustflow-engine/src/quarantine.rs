//! Moving rejected rows out of the main flow. One place, used by the source and by the
//! runtime after every stage, so a quarantined row looks the same wherever it failed:
//! [`split_rows`] keeps the whole row (its canonical columns and the source's own,
//! `columns::SOURCE_ROW`) with the stage and reason, and [`as_it_came`] turns that back
//! into the input shard's columns for the quarantine shard.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::columns::{ERROR, ERROR_STAGE, IMAGE, SOURCE_ROW};
use crate::error::{Error, Result};

/// Split `batch` into the rows that carry on and a batch of the `rejected` rows, whole,
/// with `error_stage` (`stage`) and `error` (the reason) appended.
pub fn split_rows(
    batch: &RecordBatch,
    rejected: &[(usize, String)],
    stage: &str,
) -> Result<(RecordBatch, Option<RecordBatch>)> {
    if rejected.is_empty() {
        return Ok((batch.clone(), None));
    }
    let n = batch.num_rows();
    let mut keep = vec![true; n];
    for (row, _) in rejected {
        match keep.get_mut(*row) {
            Some(k) => *k = false,
            None => {
                return Err(Error::stage(
                    stage,
                    format!("rejected row {row} of a batch of {n} rows"),
                ));
            }
        }
    }
    let ok = filter_record_batch(batch, &BooleanArray::from(keep.clone()))
        .map_err(|e| Error::stage(stage, e))?;
    let bad_mask = BooleanArray::from(keep.iter().map(|k| !k).collect::<Vec<_>>());
    let bad = filter_record_batch(batch, &bad_mask).map_err(|e| Error::stage(stage, e))?;

    // Reasons in row order, matching the filtered rows.
    let mut reasons: Vec<&(usize, String)> = rejected.iter().collect();
    reasons.sort_by_key(|(row, _)| *row);
    reasons.dedup_by_key(|(row, _)| *row);

    let mut fields: Vec<Field> = bad
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(ERROR_STAGE, DataType::Utf8, false));
    fields.push(Field::new(ERROR, DataType::Utf8, false));
    let mut columns: Vec<ArrayRef> = bad.columns().to_vec();
    columns.push(Arc::new(StringArray::from(vec![stage; reasons.len()])));
    columns.push(Arc::new(StringArray::from_iter_values(
        reasons.iter().map(|(_, r)| r.as_str()),
    )));
    let quarantined = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| Error::stage(stage, e))?;
    Ok((ok, Some(quarantined)))
}

/// A batch from [`split_rows`] as the input shard held those rows: every column of
/// `schema` (the shard's quarantine schema) taken from the carried source row, except
/// `image_column`, which is restored from the canonical `image`; then the reason.
/// Types are cast back to the shard's (a view type read by DataFusion becomes the
/// stored type again, with the same bytes).
pub fn as_it_came(
    batch: &RecordBatch,
    schema: &SchemaRef,
    image_column: Option<&str>,
) -> std::result::Result<RecordBatch, String> {
    let source = batch
        .column_by_name(SOURCE_ROW)
        .and_then(|c| c.as_struct_opt())
        .ok_or_else(|| "the quarantined rows lost the source's columns".to_string())?;
    let columns = schema
        .fields()
        .iter()
        .map(|field| {
            let name = field.name().as_str();
            let column = match name {
                ERROR_STAGE | ERROR => batch.column_by_name(name),
                _ if Some(name) == image_column => batch.column_by_name(IMAGE),
                _ => source.column_by_name(name),
            }
            .ok_or_else(|| format!("the quarantined rows lost column `{name}`"))?;
            if column.data_type() == field.data_type() {
                Ok(column.clone())
            } else {
                arrow::compute::cast(column, field.data_type())
                    .map_err(|e| format!("column `{name}` cannot return to its stored type: {e}"))
            }
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}
