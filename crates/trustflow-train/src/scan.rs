//! The check before training: one pass over each domain's non-image columns (the
//! images are not read) that counts rows and rejects values the losses cannot take:
//! labels and pseudo-labels outside [0, C), null or out-of-range weights, null,
//! non-finite or ragged text features. Errors name the shard, the row and the column,
//! and stop the run before the first step.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use futures::StreamExt;

use super::data::{DomainData, feature_rows};
use trustflow_engine::columns;
use trustflow_engine::error::{Error, Result};

/// What one domain holds.
#[derive(Debug, Clone, Default)]
pub struct DomainScan {
    pub rows: u64,
    pub feature_dim: Option<usize>,
    /// Target rows with a label: (pseudo_label, pseudo_weight, label), for the
    /// pseudo-label accuracy and weight AUROC of docs/method.md section 6.
    pub pseudo_vs_label: Vec<(i64, Option<f64>, i64)>,
}

/// Scans `data`; `classes` bounds labels and pseudo-labels.
pub fn scan(data: &DomainData, classes: i64) -> Result<DomainScan> {
    let rt = super::data::reader_runtime("the scan")?;
    let mut out = DomainScan::default();
    let section = data.domain.section();
    for shard in &data.plan.shards {
        let label_physical = shard
            .mapping
            .columns
            .iter()
            .find(|(l, _)| *l == columns::LABEL)
            .map(|(_, p)| p.clone());
        if data.needs.label && label_physical.is_none() {
            return Err(Error::input(
                &shard.path,
                format!(
                    "{section}: no label column (map one with `{section}.columns.label`); \
                     the {section} rows need labels"
                ),
            ));
        }
        let mut projected: Vec<String> = Vec::new();
        projected.extend(label_physical.iter().cloned());
        for name in [
            &data.needs.pseudo_label,
            &data.needs.pseudo_weight,
            &data.needs.text_feature,
        ]
        .into_iter()
        .flatten()
        {
            projected.push(name.clone());
        }
        let mut row = 0u64;
        if projected.is_empty() {
            out.rows += count_rows(&rt, data, shard)?;
            continue;
        }
        let names: Vec<&str> = projected.iter().map(String::as_str).collect();
        let mut stream = rt.block_on(data.plan.open_projected(shard, &names))?;
        while let Some(batch) = rt.block_on(stream.next()) {
            let batch = batch.map_err(|source| Error::Scan {
                path: shard.path.clone(),
                source,
            })?;
            check_batch(
                &batch,
                data,
                label_physical.as_deref(),
                classes,
                row,
                &mut out,
            )
            .map_err(|m| Error::input(&shard.path, format!("{section}: {m}")))?;
            row += batch.num_rows() as u64;
        }
        out.rows += row;
    }
    Ok(out)
}

fn count_rows(
    rt: &tokio::runtime::Runtime,
    data: &DomainData,
    shard: &trustflow_engine::source::ShardPlan,
) -> Result<u64> {
    let Some((_, id)) = shard.mapping.columns.first() else {
        return Ok(0);
    };
    let mut stream = rt.block_on(data.plan.open_projected(shard, &[id.as_str()]))?;
    let mut rows = 0u64;
    while let Some(batch) = rt.block_on(stream.next()) {
        rows += batch
            .map_err(|source| Error::Scan {
                path: shard.path.clone(),
                source,
            })?
            .num_rows() as u64;
    }
    Ok(rows)
}

fn check_batch(
    batch: &RecordBatch,
    data: &DomainData,
    label: Option<&str>,
    classes: i64,
    first_row: u64,
    out: &mut DomainScan,
) -> std::result::Result<(), String> {
    let n = batch.num_rows();
    let ints = |name: &str| -> std::result::Result<arrow::array::Int64Array, String> {
        let col = batch
            .column_by_name(name)
            .ok_or_else(|| format!("no column `{name}`"))?;
        let col = cast(col, &DataType::Int64)
            .map_err(|e| format!("`{name}` is {}, expected integers: {e}", col.data_type()))?;
        Ok(col.as_primitive::<Int64Type>().clone())
    };
    let in_range = |name: &str, values: &arrow::array::Int64Array, nulls_ok: bool| {
        for i in 0..n {
            let row = first_row + i as u64;
            if values.is_null(i) {
                if nulls_ok {
                    continue;
                }
                return Err(format!("row {row}: `{name}` is null"));
            }
            let v = values.value(i);
            if !(0..classes).contains(&v) {
                return Err(format!(
                    "row {row}: `{name}` = {v} is outside [0, {classes}) (model.classes = \
                     {classes})"
                ));
            }
        }
        Ok(())
    };
    let labels = match label {
        Some(name) => {
            let v = ints(name)?;
            // Labels of target rows are for evaluation only: nulls are fine there.
            in_range(name, &v, !data.needs.label)?;
            Some(v)
        }
        None => None,
    };
    let pseudo = match &data.needs.pseudo_label {
        Some(name) => {
            let v = ints(name)?;
            in_range(name, &v, false)?;
            Some(v)
        }
        None => None,
    };
    let weights = match &data.needs.pseudo_weight {
        Some(name) => {
            let col = batch
                .column_by_name(name)
                .ok_or_else(|| format!("no column `{name}`"))?;
            let col = cast(col, &DataType::Float64)
                .map_err(|e| format!("`{name}` is {}, expected floats: {e}", col.data_type()))?;
            let v = col.as_primitive::<Float64Type>().clone();
            for i in 0..n {
                let row = first_row + i as u64;
                if v.is_null(i) {
                    return Err(format!("row {row}: `{name}` is null"));
                }
                let w = v.value(i);
                if !(0.0..=1.0).contains(&w) {
                    return Err(format!(
                        "row {row}: `{name}` = {w} is not a weight in [0, 1]"
                    ));
                }
            }
            Some(v)
        }
        None => None,
    };
    if let Some(name) = &data.needs.text_feature {
        for (i, feature) in feature_rows(batch, name)?.into_iter().enumerate() {
            let row = first_row + i as u64;
            let f = feature.ok_or_else(|| format!("row {row}: `{name}` is null"))?;
            if f.iter().any(|x| !x.is_finite()) {
                return Err(format!("row {row}: `{name}` holds NaN or infinite values"));
            }
            match out.feature_dim {
                None => out.feature_dim = Some(f.len()),
                Some(d) if d != f.len() => {
                    return Err(format!(
                        "row {row}: `{name}` has {} values, earlier rows {d}",
                        f.len()
                    ));
                }
                Some(_) => {}
            }
        }
    }
    if let (Some(labels), Some(pseudo)) = (&labels, &pseudo) {
        for i in 0..n {
            if labels.is_valid(i) {
                let weight = weights.as_ref().map(|w| w.value(i));
                out.pseudo_vs_label
                    .push((pseudo.value(i), weight, labels.value(i)));
            }
        }
    }
    Ok(())
}
