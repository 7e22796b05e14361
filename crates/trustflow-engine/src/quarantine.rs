//! Moving rejected rows out of the main flow. One place, used by the source and by the
//! runtime after every stage, so a quarantined row looks the same wherever it failed.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::columns::{ERROR, ERROR_STAGE};
use crate::error::{Error, Result};

/// Split `batch` into the rows that carry on and a quarantine batch (in
/// `quarantine_schema`) for the `rejected` rows, tagged with `stage` and the reason.
pub fn split_rows(
    batch: &RecordBatch,
    rejected: &[(usize, String)],
    stage: &str,
    quarantine_schema: &SchemaRef,
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

    let mut columns: Vec<ArrayRef> = Vec::with_capacity(quarantine_schema.fields().len());
    for field in quarantine_schema.fields() {
        let name = field.name();
        let column: ArrayRef = if name == ERROR_STAGE {
            Arc::new(StringArray::from(vec![stage; reasons.len()]))
        } else if name == ERROR {
            Arc::new(StringArray::from_iter_values(
                reasons.iter().map(|(_, r)| r.as_str()),
            ))
        } else {
            bad.column_by_name(name)
                .cloned()
                .ok_or_else(|| Error::stage(stage, format!("quarantine lost column `{name}`")))?
        };
        columns.push(column);
    }
    let quarantined = RecordBatch::try_new(quarantine_schema.clone(), columns)
        .map_err(|e| Error::stage(stage, e))?;
    Ok((ok, Some(quarantined)))
}
