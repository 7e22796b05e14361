//! The trainer's data side: enriched shards -> rows -> steps -> decoded, augmented
//! tensors, through bounded queues so that a slow trainer slows the readers.
//!
//! ```text
//! sampler (1 thread)        -> jobs (bounded) -> workers (decode + augment) -> ready (prefetch, bounded) -> training loop
//! reads both domains' shards,                                                     reorders by step
//! shuffles, cuts steps of B + B rows
//! ```
//!
//! An epoch is `max(ceil(n_source / B), ceil(n_target / B))` steps, each with exactly
//! B rows of each domain read so far: the shorter domain (and the longer one's last
//! step) wraps into a new pass over its shards. Every pass shuffles the shard order and
//! streams rows through a shuffle buffer, both seeded by (seed, epoch, domain, pass),
//! so the rows of step k of epoch e are a pure function of the data and the seed. That
//! is what makes resuming in the middle of an epoch exact: the sampler replays the
//! epoch's row order and skips the finished steps without decoding them. Strong views
//! are seeded per row ([`super::augment::rng_for`]), so they do not depend on which
//! worker builds them either.
//!
//! A row whose image cannot be decoded is left out of its step (the step is then
//! smaller) and counted with its reason; it never stops training.

use std::collections::VecDeque;
use std::sync::Arc;
use trustflow_engine::runtime::THREAD_STACK_BYTES;

use arrow::array::{
    Array, AsArray, FixedSizeListArray, Float64Array, Int64Array, LargeBinaryArray, ListArray,
    RecordBatch,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type};
use futures::StreamExt;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::augment::{self, AugmentConfig, Chw};
use trustflow_engine::columns;
use trustflow_engine::error::{Error, Result};
use trustflow_engine::models::image::{ImageFormatName, ImageLimits, decode_rgb};
use trustflow_engine::source::{ShardPlan, SourcePlan};

/// Domain separator of the shuffling streams; changing it changes every row order.
const SHUFFLE_DOMAIN: &[u8] = b"trustflow.train.shuffle.v1\0";

/// Which of the training file's readers a row came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    Source,
    Target,
    Eval,
}

impl Domain {
    pub fn section(self) -> &'static str {
        match self {
            Domain::Source => "source",
            Domain::Target => "target",
            Domain::Eval => "eval",
        }
    }
}

/// The columns one domain must provide, by canonical or kept name.
#[derive(Debug, Clone, Default)]
pub struct Needs {
    pub label: bool,
    pub pseudo_label: Option<String>,
    pub pseudo_weight: Option<String>,
    pub text_feature: Option<String>,
}

/// What a step needs from one row. `image` holds the encoded bytes.
#[derive(Debug, Clone)]
pub struct TrainRow {
    /// `domain/pass/id`: keys the row's strong-view stream (a row seen twice in an
    /// epoch gets different views).
    pub key: String,
    pub image: Option<Vec<u8>>,
    pub label: Option<i64>,
    pub pseudo_label: Option<i64>,
    pub weight: Option<f32>,
    pub feature: Option<Vec<f32>>,
    /// Why the source rejected the row (null id, a path escaping its root, ...): it
    /// takes its place in a step like any row and is reported there as dropped.
    pub rejected: Option<String>,
}

/// One domain's shards and the columns read from them.
#[derive(Debug, Clone)]
pub struct DomainData {
    pub domain: Domain,
    pub plan: SourcePlan,
    pub needs: Needs,
}

/// Plans one domain's section of a training file with the columns `needs` names kept.
pub(crate) fn plan_domain(
    loaded: &super::spec::LoadedTrain,
    spec: &trustflow_engine::spec::SourceSpec,
    domain: Domain,
    needs: Needs,
    batch_size: usize,
) -> Result<DomainData> {
    let section = domain.section();
    // Plan once as written (so the user's own mistakes are located), then with the
    // enriched columns the losses need added to keep_columns.
    let plain =
        trustflow_engine::source::plan_section(loaded, spec, section, batch_size, None, storage())?;
    let needed: Vec<&String> = [
        &needs.pseudo_label,
        &needs.pseudo_weight,
        &needs.text_feature,
    ]
    .into_iter()
    .flatten()
    .collect();
    for name in &needed {
        for shard in &plain.shards {
            if shard.file_schema.field_with_name(name).is_err() {
                return Err(Error::input(
                    &shard.path,
                    format!(
                        "{section}: no column `{name}`, which the switched-on loss terms \
                         need (run the enrichment stages first, or rename it under `columns`, \
                         or set the terms that need it to 0 under `loss`)"
                    ),
                ));
            }
        }
    }
    let mut with_columns = spec.clone();
    for name in needed {
        if !with_columns.keep_columns.contains(name) {
            with_columns.keep_columns.push(name.clone());
        }
    }
    let plan = trustflow_engine::source::plan_section(
        loaded,
        &with_columns,
        section,
        batch_size,
        None,
        storage(),
    )?;
    Ok(DomainData {
        domain,
        plan,
        needs,
    })
}

/// The stores of `s3://` shards in a training file: configured by the environment (or
/// an AWS profile) alone.
pub(crate) fn storage() -> std::sync::Arc<trustflow_engine::storage::Storage> {
    trustflow_engine::storage::Storage::new(Default::default())
}

/// The single-threaded runtime a reader of shards drives DataFusion's streams with
/// (with the engine's thread stack, for deep filters); `what` names it in the error.
pub(crate) fn reader_runtime(what: &str) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .thread_stack_size(THREAD_STACK_BYTES)
        .build()
        .map_err(|e| Error::Internal(format!("cannot start {what}: {e}")))
}

/// A SHA-256-keyed ChaCha8 stream for one (seed, epoch, domain, pass).
pub(crate) fn shuffle_rng(seed: u64, epoch: u64, domain: Domain, pass: u64) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(SHUFFLE_DOMAIN);
    h.update(seed.to_le_bytes());
    h.update(epoch.to_le_bytes());
    h.update(domain.section().as_bytes());
    h.update(pass.to_le_bytes());
    ChaCha8Rng::from_seed(h.finalize().into())
}

/// Rows of one pass over a domain's shards, in the pass's shuffled order.
struct PassReader<'a> {
    data: &'a DomainData,
    rt: &'a tokio::runtime::Runtime,
    pass: u64,
    shard_order: Vec<usize>,
    next_shard: usize,
    stream: Option<(
        datafusion::execution::SendableRecordBatchStream,
        trustflow_engine::source::Converter,
        &'a ShardPlan,
        u64,
    )>,
    pending: VecDeque<TrainRow>,
    buffer: Vec<TrainRow>,
    capacity: usize,
    rng: ChaCha8Rng,
    upstream_done: bool,
}

impl<'a> PassReader<'a> {
    fn new(
        data: &'a DomainData,
        rt: &'a tokio::runtime::Runtime,
        seed: u64,
        epoch: u64,
        pass: u64,
        shuffle_buffer: usize,
    ) -> Self {
        let mut rng = shuffle_rng(seed, epoch, data.domain, pass);
        let mut shard_order: Vec<usize> = (0..data.plan.shards.len()).collect();
        if shuffle_buffer > 1 {
            shard_order.shuffle(&mut rng);
        }
        PassReader {
            data,
            rt,
            pass,
            shard_order,
            next_shard: 0,
            stream: None,
            pending: VecDeque::new(),
            buffer: Vec::with_capacity(shuffle_buffer.min(1 << 16)),
            capacity: shuffle_buffer.max(1),
            rng,
            upstream_done: false,
        }
    }

    /// The next row of the pass in file order (before shuffling); `None` at its end.
    fn next_in_order(&mut self) -> Result<Option<TrainRow>> {
        loop {
            if let Some(row) = self.pending.pop_front() {
                return Ok(Some(row));
            }
            if self.stream.is_none() {
                let Some(&index) = self.shard_order.get(self.next_shard) else {
                    return Ok(None);
                };
                self.next_shard += 1;
                let Some(shard) = self.data.plan.shards.get(index) else {
                    continue;
                };
                let converter = self.data.plan.converter(shard)?;
                let stream = self.rt.block_on(self.data.plan.open(shard))?;
                self.stream = Some((stream, converter, shard, 0));
            }
            let Some((stream, converter, shard, rows_in)) = self.stream.as_mut() else {
                continue;
            };
            match self.rt.block_on(stream.next()) {
                None => self.stream = None,
                Some(batch) => {
                    let batch = batch.map_err(|source| Error::Scan {
                        path: shard.path.clone(),
                        source,
                    })?;
                    let n = batch.num_rows() as u64;
                    // Rows the source rejects (null ids, bad paths) never reach a step.
                    let (ok, rejected) = converter.convert(&batch, *rows_in)?;
                    let (domain, needs) = (self.data.domain, &self.data.needs);
                    let rows = extract_rows(&ok, domain, needs, self.pass, &shard.path)?;
                    self.pending.extend(rows);
                    self.pending.extend(rejected_rows(
                        rejected.as_ref(),
                        self.data,
                        self.pass,
                        &shard.stem,
                        *rows_in,
                    ));
                    *rows_in += n;
                }
            }
        }
    }

    /// The next row of the pass after the shuffle buffer; `None` at its end.
    fn next(&mut self) -> Result<Option<TrainRow>> {
        while !self.upstream_done && self.buffer.len() < self.capacity {
            match self.next_in_order()? {
                Some(row) => self.buffer.push(row),
                None => self.upstream_done = true,
            }
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let i = self.rng.random_range(0..self.buffer.len());
        Ok(Some(self.buffer.swap_remove(i)))
    }
}

/// Cuts the canonical batch into [`TrainRow`]s of `domain`'s pass `pass`.
pub(crate) fn extract_rows(
    batch: &RecordBatch,
    domain: Domain,
    needs: &Needs,
    pass: u64,
    shard: &std::path::Path,
) -> Result<Vec<TrainRow>> {
    let data = DataNeeds { domain, needs };
    let n = batch.num_rows();
    let bad = |m: String| Error::input(shard, m);
    let ids = batch
        .column_by_name(columns::ID)
        .ok_or_else(|| bad("no id column".into()))?
        .as_string::<i32>();
    let images = batch
        .column_by_name(columns::IMAGE)
        .and_then(|c| c.as_any().downcast_ref::<LargeBinaryArray>())
        .ok_or_else(|| bad("no image column".into()))?;
    let labels = match data.needs.label {
        true => batch
            .column_by_name(columns::LABEL)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned()),
        false => None,
    };
    let int_column = |name: &Option<String>| -> Result<Option<Int64Array>> {
        let Some(name) = name else { return Ok(None) };
        let col = batch
            .column_by_name(name)
            .ok_or_else(|| bad(format!("no column `{name}`")))?;
        let col = cast(col, &DataType::Int64).map_err(|e| bad(format!("`{name}`: {e}")))?;
        Ok(col.as_any().downcast_ref::<Int64Array>().cloned())
    };
    let pseudo = int_column(&data.needs.pseudo_label)?;
    let weights = match &data.needs.pseudo_weight {
        Some(name) => {
            let col = batch
                .column_by_name(name)
                .ok_or_else(|| bad(format!("no column `{name}`")))?;
            let col = cast(col, &DataType::Float64).map_err(|e| bad(format!("`{name}`: {e}")))?;
            col.as_any().downcast_ref::<Float64Array>().cloned()
        }
        None => None,
    };
    let features = match &data.needs.text_feature {
        Some(name) => Some(feature_rows(batch, name).map_err(bad)?),
        None => None,
    };
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let get_i64 =
            |a: &Option<Int64Array>| a.as_ref().filter(|a| a.is_valid(i)).map(|a| a.value(i));
        rows.push(TrainRow {
            key: format!("{}/{pass}/{}", data.domain.section(), ids.value(i)),
            image: images.is_valid(i).then(|| images.value(i).to_vec()),
            label: get_i64(&labels),
            pseudo_label: get_i64(&pseudo),
            weight: weights
                .as_ref()
                .filter(|a| a.is_valid(i))
                .map(|a| a.value(i) as f32),
            feature: features.as_ref().and_then(|f| f[i].clone()),
            rejected: None,
        });
    }
    Ok(rows)
}

/// What [`extract_rows`] reads of a domain.
struct DataNeeds<'a> {
    domain: Domain,
    needs: &'a Needs,
}

/// The rows the source rejected in one batch, keyed by shard and row so they show up
/// among the dropped rows with the source's reason.
fn rejected_rows(
    rejected: Option<&RecordBatch>,
    data: &DomainData,
    pass: u64,
    stem: &str,
    first_row: u64,
) -> Vec<TrainRow> {
    let Some(batch) = rejected else {
        return Vec::new();
    };
    let reasons = batch
        .column_by_name(columns::ERROR)
        .and_then(|c| c.as_string_opt::<i32>().cloned());
    (0..batch.num_rows())
        .map(|i| TrainRow {
            key: format!(
                "{}/{pass}/{stem}:rejected:{}",
                data.domain.section(),
                first_row + i as u64
            ),
            image: None,
            label: None,
            pseudo_label: None,
            weight: None,
            feature: None,
            rejected: Some(
                reasons
                    .as_ref()
                    .filter(|r| r.is_valid(i))
                    .map_or("rejected by the source".into(), |r| r.value(i).to_string()),
            ),
        })
        .collect()
}

/// A (fixed-size) list column of floats as one vector per row (`None` for nulls).
pub fn feature_rows(
    batch: &RecordBatch,
    name: &str,
) -> std::result::Result<Vec<Option<Vec<f32>>>, String> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| format!("no column `{name}`"))?;
    let to_f32 = |values: &Arc<dyn Array>| -> std::result::Result<Vec<f32>, String> {
        let v = cast(values, &DataType::Float32).map_err(|e| format!("`{name}`: {e}"))?;
        Ok(v.as_primitive::<Float32Type>().values().to_vec())
    };
    let n = col.len();
    let mut out = Vec::with_capacity(n);
    if let Some(list) = col.as_any().downcast_ref::<FixedSizeListArray>() {
        for i in 0..n {
            out.push(match list.is_valid(i) {
                true => Some(to_f32(&list.value(i))?),
                false => None,
            });
        }
    } else if let Some(list) = col.as_any().downcast_ref::<ListArray>() {
        for i in 0..n {
            out.push(match list.is_valid(i) {
                true => Some(to_f32(&list.value(i))?),
                false => None,
            });
        }
    } else {
        return Err(format!(
            "`{name}` is {}, expected a (fixed-size) list of floats",
            col.data_type()
        ));
    }
    Ok(out)
}

/// Steps of one epoch, as rows: what the sampler sends to the workers.
#[derive(Debug)]
pub struct StepJob {
    pub epoch: u64,
    pub step: u64,
    pub source: Vec<TrainRow>,
    pub target: Vec<TrainRow>,
}

/// Which steps of which epoch [`sample_epoch`] produces, and how.
#[derive(Debug, Clone, Copy)]
pub struct EpochSampling {
    pub seed: u64,
    pub epoch: u64,
    /// Steps in the epoch.
    pub steps: u64,
    /// Steps before this one are skipped without being sent (a resumed epoch).
    pub first_step: u64,
    /// Rows per domain per step.
    pub batch_size: usize,
    pub shuffle_buffer: usize,
}

/// Produces the row lists of the steps of one epoch, calling `send` for each (which
/// blocks when the queue is full; `false` stops).
pub fn sample_epoch(
    source: &DomainData,
    target: &DomainData,
    plan: EpochSampling,
    mut send: impl FnMut(StepJob) -> bool,
) -> Result<()> {
    let EpochSampling {
        seed,
        epoch,
        steps,
        first_step,
        batch_size,
        shuffle_buffer,
    } = plan;
    let rt = reader_runtime("the trainer's reader")?;
    let mut readers = [
        CyclicReader::new(source, &rt, seed, epoch, shuffle_buffer),
        CyclicReader::new(target, &rt, seed, epoch, shuffle_buffer),
    ];
    for step in 0..steps {
        let take = |r: &mut CyclicReader| -> Result<Vec<TrainRow>> {
            (0..batch_size).map(|_| r.next()).collect()
        };
        let [s, t] = &mut readers;
        let source_rows = take(s)?;
        let target_rows = take(t)?;
        if step < first_step {
            continue;
        }
        let job = StepJob {
            epoch,
            step,
            source: source_rows,
            target: target_rows,
        };
        if !send(job) {
            break;
        }
    }
    Ok(())
}

/// Endless rows of one domain: pass after pass.
pub(crate) struct CyclicReader<'a> {
    data: &'a DomainData,
    rt: &'a tokio::runtime::Runtime,
    seed: u64,
    epoch: u64,
    shuffle_buffer: usize,
    current: PassReader<'a>,
}

impl<'a> CyclicReader<'a> {
    pub(crate) fn new(
        data: &'a DomainData,
        rt: &'a tokio::runtime::Runtime,
        seed: u64,
        epoch: u64,
        shuffle_buffer: usize,
    ) -> Self {
        Self::from_pass(data, rt, seed, epoch, 0, shuffle_buffer)
    }

    /// Starting at pass `pass` (the one-pass trainer's first epoch wraps into the
    /// written shards after pass 0, which came from the stream).
    pub(crate) fn from_pass(
        data: &'a DomainData,
        rt: &'a tokio::runtime::Runtime,
        seed: u64,
        epoch: u64,
        pass: u64,
        shuffle_buffer: usize,
    ) -> Self {
        CyclicReader {
            data,
            rt,
            seed,
            epoch,
            shuffle_buffer,
            current: PassReader::new(data, rt, seed, epoch, pass, shuffle_buffer),
        }
    }

    pub(crate) fn next(&mut self) -> Result<TrainRow> {
        if let Some(row) = self.current.next()? {
            return Ok(row);
        }
        let pass = self.current.pass + 1;
        self.current = PassReader::new(
            self.data,
            self.rt,
            self.seed,
            self.epoch,
            pass,
            self.shuffle_buffer,
        );
        self.current.next()?.ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no rows to train on (after the filter and the source checks)",
                self.data.domain.section()
            ))
        })
    }
}

/// Every row of one pass of `data` in file order, without shuffling (evaluation).
pub fn read_all(data: &DomainData, mut each: impl FnMut(TrainRow) -> Result<()>) -> Result<()> {
    let rt = reader_runtime("the evaluation reader")?;
    let mut reader = PassReader::new(data, &rt, 0, 0, 0, 1);
    while let Some(row) = reader.next_in_order()? {
        each(row)?;
    }
    Ok(())
}

/// One side of a ready step: views and per-row values, rows in the job's order
/// minus those whose image failed.
#[derive(Debug)]
pub struct SideTensors {
    pub weak: Tensor,
    pub strong: Option<Tensor>,
    pub labels: Option<Tensor>,
    pub pseudo_labels: Option<Tensor>,
    pub weights: Option<Tensor>,
    pub features: Option<Tensor>,
    pub rows: usize,
}

/// A step ready for the training loop.
#[derive(Debug)]
pub struct ReadyStep {
    pub epoch: u64,
    pub step: u64,
    /// `None` when every row of the side failed to decode.
    pub source: Option<SideTensors>,
    pub target: Option<SideTensors>,
    /// Rows left out, with the reason.
    pub dropped: Vec<(String, String)>,
}

/// Settings the workers need.
#[derive(Debug, Clone)]
pub struct ViewSettings {
    pub augment: AugmentConfig,
    pub seed: u64,
    pub strong_source: bool,
    pub strong_target: bool,
    /// Use weight 1 for every target row (the unweighted ablation).
    pub unit_weights: bool,
}

/// Decodes one image to RGB with the engine's default limits; errors are reasons.
pub fn decode(bytes: Option<&[u8]>) -> std::result::Result<image::RgbImage, String> {
    let bytes = bytes.ok_or_else(|| "image is null".to_string())?;
    decode_rgb(bytes, &ImageLimits::default(), &ImageFormatName::ALL)
        .map(|(_, img)| img)
        .map_err(|e| e.to_string())
}

/// Decodes and augments one job into tensors (a worker's whole job).
pub fn build_step(job: StepJob, views: &ViewSettings) -> Result<ReadyStep> {
    let mut dropped = Vec::new();
    let source = build_side(
        &job.source,
        job.epoch,
        views,
        views.strong_source,
        false,
        &mut dropped,
    )?;
    let target = build_side(
        &job.target,
        job.epoch,
        views,
        views.strong_target,
        views.unit_weights,
        &mut dropped,
    )?;
    Ok(ReadyStep {
        epoch: job.epoch,
        step: job.step,
        source,
        target,
        dropped,
    })
}

fn build_side(
    rows: &[TrainRow],
    epoch: u64,
    views: &ViewSettings,
    strong: bool,
    unit_weights: bool,
    dropped: &mut Vec<(String, String)>,
) -> Result<Option<SideTensors>> {
    let mut weak: Vec<Chw> = Vec::with_capacity(rows.len());
    let mut strong_views: Vec<Chw> = Vec::new();
    let mut kept: Vec<&TrainRow> = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(reason) = &row.rejected {
            dropped.push((row.key.clone(), reason.clone()));
            continue;
        }
        match decode(row.image.as_deref()) {
            Ok(img) => {
                weak.push(augment::weak(&img, &views.augment));
                if strong {
                    let mut rng = augment::rng_for(views.seed, epoch, &row.key);
                    strong_views.push(augment::strong(&img, &views.augment, &mut rng));
                }
                kept.push(row);
            }
            Err(reason) => dropped.push((row.key.clone(), reason)),
        }
    }
    if kept.is_empty() {
        return Ok(None);
    }
    let tensor_err = |e: augment::AugmentError| Error::stage("train", e);
    let ints = |get: fn(&TrainRow) -> Option<i64>| -> Option<Tensor> {
        let v: Option<Vec<i64>> = kept.iter().map(|r| get(r)).collect();
        v.map(|v| Tensor::from_slice(&v))
    };
    let weights = if unit_weights {
        Some(Tensor::ones(
            [kept.len() as i64],
            (Kind::Float, tch::Device::Cpu),
        ))
    } else {
        let v: Option<Vec<f32>> = kept.iter().map(|r| r.weight).collect();
        v.map(|v| Tensor::from_slice(&v))
    };
    let features = {
        let v: Option<Vec<&Vec<f32>>> = kept.iter().map(|r| r.feature.as_ref()).collect();
        match v {
            Some(v) => {
                let dim = v.first().map_or(0, |f| f.len());
                if v.iter().any(|f| f.len() != dim) {
                    return Err(Error::stage(
                        "train",
                        "text features of different lengths in one step",
                    ));
                }
                let flat: Vec<f32> = v.iter().flat_map(|f| f.iter().copied()).collect();
                Some(Tensor::from_slice(&flat).reshape([kept.len() as i64, dim as i64]))
            }
            None => None,
        }
    };
    Ok(Some(SideTensors {
        weak: augment::batch_tensor(&weak).map_err(tensor_err)?,
        strong: match strong {
            true => Some(augment::batch_tensor(&strong_views).map_err(tensor_err)?),
            false => None,
        },
        labels: ints(|r| r.label),
        pseudo_labels: ints(|r| r.pseudo_label),
        weights,
        features,
        rows: kept.len(),
    }))
}
