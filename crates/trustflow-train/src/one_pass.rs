//! The trainer fed live by a pipeline (`sink.train_mode: one_pass`): the first epoch's
//! target rows are the rows the pipeline's sink writes, handed on through the run's
//! feed ([`trustflow_engine::runtime::feed`]) in shard order; later epochs read the
//! written shards like `trustflow train`.
//!
//! The first epoch is cut exactly as [`super::data::sample_epoch`] cuts one, with one
//! difference: the target's pass 0 is the stream in shard order through the shuffle
//! buffer (no shard-order shuffle: the shards arrive in index order). Its length is
//! known when the stream ends, so the sampler keeps cutting steps while the stream has
//! rows, then up to `max(ceil(n_source / B), ceil(n_target / B))` steps, the target
//! wrapping into pass 1 over the written shards. The row sequence depends only on the
//! data and the seed: a rerun after a kill feeds shards written before from disk, in
//! their place in the order, and replays the epoch to the checkpoint without decoding.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::data::{self, CyclicReader, Domain, DomainData, Needs, StepJob, TrainRow};
use super::spec::LoadedTrain;
use trustflow_engine::error::{Error, Result};
use trustflow_engine::plan::Plan;
use trustflow_engine::runtime::CancelToken;
use trustflow_engine::runtime::feed::{FeedEvent, FeedReceiver};
use trustflow_engine::spec::SpecOrigin;
use trustflow_engine::{columns, storage};

/// The target's shards as written, planned and scanned.
pub struct WrittenTarget {
    pub data: DomainData,
    pub scan: super::scan::DomainScan,
}

/// What the pipeline gives a one-pass trainer.
pub struct OnePass {
    pub feed: FeedReceiver,
    /// Rows the pipeline planned to read: the learning-rate schedule's estimate of the
    /// target's size until the stream ends (exact unless a filter or the stages drop
    /// rows).
    pub planned_rows: u64,
    /// The pipeline's hash and its inputs' fingerprints: with the training file, what
    /// a checkpoint must come from to be resumed.
    pub stream_hash: String,
    /// The pipeline's output folder (local path or `s3://` URI).
    pub out_dir: PathBuf,
}

impl OnePass {
    /// The feed and figures of `plan`.
    pub fn of(plan: &Plan, feed: FeedReceiver) -> Self {
        let mut h = Sha256::new();
        h.update(plan.pipeline_hash.as_bytes());
        for shard in &plan.source.shards {
            h.update(shard.stem.as_bytes());
            h.update(format!("{:?}", shard.fingerprint).as_bytes());
        }
        OnePass {
            feed,
            planned_rows: plan.source.shards.iter().map(|s| s.file_rows).sum(),
            stream_hash: format!("{:x}", h.finalize()),
            out_dir: plan.out_dir.clone(),
        }
    }
}

/// `p` absolute with `.` and `..` folded away (lexically: the folder may not exist
/// yet); an `s3://` URI as written, without a trailing `/`.
fn normal(p: &Path) -> String {
    if storage::is_remote(p) {
        return p.to_string_lossy().trim_end_matches('/').to_string();
    }
    let absolute = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out.to_string_lossy().into_owned()
}

/// Every check a one-pass run makes before any row is read: the training file's
/// `target` reads this pipeline's output as written (no filter, no renames), and the
/// output schema has what the switched-on loss terms need, with the trainer's class
/// count.
pub fn check(loaded: &LoadedTrain, plan: &Plan) -> Result<()> {
    let spec = &loaded.spec;
    let file = loaded.file.display();
    let out = normal(&plan.out_dir);
    let target = &spec.target;
    let resolved: Vec<String> = target
        .paths
        .iter()
        .map(|p| normal(&loaded.resolve(p)))
        .collect();
    if resolved.len() != 1 || resolved[0] != out {
        return Err(Error::Invalid(format!(
            "{file}: target.path must be the pipeline's sink.path ({out}) for \
             `train_mode: one_pass` (the first epoch trains on the rows as they are \
             written there, later epochs read them back), found {resolved:?}"
        )));
    }
    if let Some(filter) = &target.filter {
        return Err(Error::Invalid(format!(
            "{file}: target.filter (`{filter}`) cannot apply to live rows; filter in the \
             pipeline's source instead"
        )));
    }
    if target.columns != Default::default() || target.preset.is_some() {
        return Err(Error::Invalid(format!(
            "{file}: target.columns renames columns, but a one-pass trainer reads the \
             pipeline's output as written; rename in the training file's `columns` section"
        )));
    }
    let schema = &plan.sink_schema;
    let needs = target_needs(loaded);
    use arrow::datatypes::DataType as T;
    // (column, what it must hold, whether a type is that).
    type Kind = fn(&T) -> bool;
    let any: Kind = |_| true;
    let mut wanted: Vec<(&str, &str, Kind)> = vec![
        (columns::ID, "a string", any),
        (columns::IMAGE, "encoded image bytes", any),
    ];
    if let Some(c) = &needs.pseudo_label {
        wanted.push((c, "an integer pseudo-label", T::is_integer));
    }
    if let Some(c) = &needs.pseudo_weight {
        wanted.push((c, "a float weight", T::is_floating));
    }
    if let Some(c) = &needs.text_feature {
        wanted.push((c, "a list of floats", |t| {
            matches!(t, T::FixedSizeList(..) | T::List(..) | T::LargeList(..))
        }));
    }
    for (name, what, is_kind) in wanted {
        let Ok(field) = schema.field_with_name(name) else {
            return Err(Error::Invalid(format!(
                "{file}: the loss terms switched on need column `{name}` ({what}) in the \
                 target, but the pipeline's output has none; its columns are: {}",
                trustflow_engine::plan::column_names(schema)
            )));
        };
        if !is_kind(field.data_type()) {
            return Err(Error::Invalid(format!(
                "{file}: column `{name}` of the pipeline's output is {}, expected {what}",
                field.data_type()
            )));
        }
    }
    if let Some(c) = &needs.text_feature {
        check_feature_width(loaded, schema, c)?;
    }
    for slot in &plan.stages {
        if let Some(classes) = slot.stage.classes()
            && classes as i64 != spec.model.classes
        {
            return Err(Error::Invalid(format!(
                "{file}: model.classes is {}, but stage `{}` of the pipeline labels rows \
                 with {classes} classes",
                spec.model.classes,
                slot.stage.name()
            )));
        }
    }
    Ok(())
}

/// The source's `c` and the pipeline's must have the same width: both come from the
/// same text encoder.
fn check_feature_width(
    loaded: &LoadedTrain,
    schema: &arrow::datatypes::Schema,
    c: &str,
) -> Result<()> {
    use arrow::datatypes::DataType::FixedSizeList;
    let width = |t: &arrow::datatypes::DataType| match t {
        FixedSizeList(_, w) => Some(*w),
        _ => None,
    };
    let Some(out) = schema
        .field_with_name(c)
        .ok()
        .and_then(|f| width(f.data_type()))
    else {
        return Ok(());
    };
    let spec = &loaded.spec;
    let source = trustflow_engine::source::plan_section(
        loaded,
        &spec.source,
        "source",
        spec.data.batch_size,
        None,
        storage::Storage::new(Default::default()),
    )?;
    for shard in &source.shards {
        if let Some(w) = shard
            .file_schema
            .field_with_name(c)
            .ok()
            .and_then(|f| width(f.data_type()))
            && w != out
        {
            return Err(Error::input(
                &shard.path,
                format!(
                    "`{c}` holds {w} values per row but the pipeline's output holds {out}; \
                     source and target features must come from the same text encoder"
                ),
            ));
        }
    }
    Ok(())
}

/// The target columns the training file reads (as `prepare` decides them, with the
/// columns present in a pipeline's output counted as present).
pub(crate) fn target_needs(loaded: &LoadedTrain) -> Needs {
    let spec = &loaded.spec;
    let loss = &spec.loss;
    let cols = &spec.columns;
    Needs {
        label: false,
        pseudo_label: loss
            .needs_pseudo_labels()
            .then(|| cols.pseudo_label.clone()),
        pseudo_weight: loss.needs_weights().then(|| cols.pseudo_weight.clone()),
        text_feature: loss
            .needs_text_features()
            .then(|| cols.text_feature.clone()),
    }
}

/// Pass 0 of the first epoch's target rows: the feed, in shard order, through the
/// shuffle buffer seeded like any pass.
pub(crate) struct LiveReader<'a> {
    feed: &'a FeedReceiver,
    loaded: &'a LoadedTrain,
    needs: Needs,
    out_dir: String,
    cancel: Option<CancelToken>,
    pending: VecDeque<TrainRow>,
    buffer: Vec<TrainRow>,
    capacity: usize,
    rng: ChaCha8Rng,
    upstream_done: bool,
    /// Rows handed out so far (the target's size once the pass is over).
    pub emitted: u64,
}

impl<'a> LiveReader<'a> {
    pub(crate) fn new(
        feed: &'a FeedReceiver,
        loaded: &'a LoadedTrain,
        needs: Needs,
        out_dir: &Path,
        cancel: Option<CancelToken>,
    ) -> Self {
        let spec = &loaded.spec;
        let capacity = spec.data.shuffle_buffer.max(1);
        LiveReader {
            feed,
            loaded,
            needs,
            out_dir: normal(out_dir),
            cancel,
            pending: VecDeque::new(),
            buffer: Vec::with_capacity(capacity.min(1 << 16)),
            capacity,
            rng: data::shuffle_rng(spec.seed, 0, Domain::Target, 0),
            upstream_done: false,
            emitted: 0,
        }
    }

    /// The next row in stream order; `None` once the stream ended complete.
    fn next_in_order(&mut self) -> Result<Option<TrainRow>> {
        loop {
            if let Some(row) = self.pending.pop_front() {
                return Ok(Some(row));
            }
            let Some(event) = self.feed.recv() else {
                if self.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                    return Err(Error::Cancelled);
                }
                return Err(Error::Invalid(
                    "the pipeline stopped before its last shard, so the first epoch \
                     cannot end; see the run's error, then rerun to resume both"
                        .into(),
                ));
            };
            match event {
                FeedEvent::Rows { batch, .. } => {
                    let at = PathBuf::from(&self.out_dir);
                    let rows = data::extract_rows(&batch, Domain::Target, &self.needs, 0, &at)?;
                    self.pending.extend(rows);
                }
                FeedEvent::Written { stem, .. } => self.read_back(&stem)?,
                FeedEvent::Finished { .. } | FeedEvent::Discarded { .. } => {}
                FeedEvent::End => return Ok(None),
            }
        }
    }

    /// Rows of a shard an earlier run wrote, from its output file, in the order the
    /// stream gave them then (the sink writes rows in order).
    fn read_back(&mut self, stem: &str) -> Result<()> {
        let file = format!("{}/{}", self.out_dir, columns::output_name(stem));
        let mut spec = self.loaded.spec.target.clone();
        spec.paths = vec![file];
        let one = data::plan_domain(
            self.loaded,
            &spec,
            Domain::Target,
            self.needs.clone(),
            self.loaded.spec.data.batch_size,
        )?;
        // The keys of rows read back carry pass 0, as the live ones do.
        data::read_all(&one, |row| {
            self.pending.push_back(row);
            Ok(())
        })
    }

    /// Fills the shuffle buffer; true when the pass has no rows left.
    pub(crate) fn exhausted(&mut self) -> Result<bool> {
        while !self.upstream_done && self.buffer.len() < self.capacity {
            match self.next_in_order()? {
                Some(row) => self.buffer.push(row),
                None => self.upstream_done = true,
            }
        }
        Ok(self.buffer.is_empty())
    }

    /// The next row of the pass after the shuffle buffer; `None` at its end.
    pub(crate) fn next(&mut self) -> Result<Option<TrainRow>> {
        if self.exhausted()? {
            return Ok(None);
        }
        let i = self.rng.random_range(0..self.buffer.len());
        self.emitted += 1;
        Ok(Some(self.buffer.swap_remove(i)))
    }
}

/// Cuts the first epoch's steps from `source` and the live target (see the module
/// docs), calling `send` for each from `first_step` on (`false` stops); `written`
/// plans and scans the written target when the stream has ended. Returns the
/// epoch's step count, or `None` when `send` stopped it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sample_live_epoch<'w>(
    source: &DomainData,
    source_rows: u64,
    live: &mut LiveReader<'_>,
    written: &'w std::sync::OnceLock<WrittenTarget>,
    plan_written: &dyn Fn() -> Result<WrittenTarget>,
    plan: data::EpochSampling,
    mut send: impl FnMut(StepJob) -> bool,
) -> Result<Option<u64>> {
    let rt = data::reader_runtime("the trainer's reader")?;
    let b = plan.batch_size as u64;
    let mut src = CyclicReader::new(source, &rt, plan.seed, 0, plan.shuffle_buffer);
    let mut wrapped: Option<CyclicReader<'_>> = None;
    let ensure_written = || -> Result<&'w WrittenTarget> {
        if written.get().is_none() {
            let _ = written.set(plan_written()?);
        }
        written
            .get()
            .ok_or_else(|| Error::Internal("the written target was not planned".into()))
    };
    let mut step = 0u64;
    loop {
        if live.exhausted()? {
            ensure_written()?;
            if step >= source_rows.div_ceil(b).max(live.emitted.div_ceil(b)) {
                return Ok(Some(step));
            }
        }
        let source_rows: Vec<TrainRow> = (0..plan.batch_size)
            .map(|_| src.next())
            .collect::<Result<_>>()?;
        let mut target_rows = Vec::with_capacity(plan.batch_size);
        for _ in 0..plan.batch_size {
            let row = match live.next()? {
                Some(row) => row,
                None => {
                    if wrapped.is_none() {
                        let w = ensure_written()?;
                        wrapped = Some(CyclicReader::from_pass(
                            &w.data,
                            &rt,
                            plan.seed,
                            0,
                            1,
                            plan.shuffle_buffer,
                        ));
                    }
                    match wrapped.as_mut() {
                        Some(w) => w.next()?,
                        None => return Err(Error::Internal("no target reader".into())),
                    }
                }
            };
            target_rows.push(row);
        }
        if step >= plan.first_step {
            let job = StepJob {
                epoch: 0,
                step,
                source: source_rows,
                target: target_rows,
            };
            if !send(job) {
                return Ok(None);
            }
        }
        step += 1;
    }
}

/// Reads the feed to its end without training on it (a resumed run past the first
/// epoch): the written target is complete only once the pipeline is.
pub(crate) fn drain(feed: &FeedReceiver, cancel: Option<&CancelToken>) -> Result<()> {
    while let Some(event) = feed.recv() {
        if let FeedEvent::End = event {
            return Ok(());
        }
    }
    match cancel.is_some_and(|c| c.is_cancelled()) {
        true => Err(Error::Cancelled),
        false => Err(Error::Invalid(
            "the pipeline stopped before its last shard; see the run's error".into(),
        )),
    }
}
