//! The runtime moves batches; it knows nothing about models. Source -> stages -> sink,
//! each step on its own threads, joined by bounded crossbeam queues: a full queue blocks
//! its producer, so a slow step slows everything upstream down to the Parquet reader
//! (backpressure) and rows in flight stay bounded by queue depth x batch size.
//!
//! Order is restored before the sink (batches carry a per-shard sequence number), so
//! the output does not depend on worker counts or timing. The first hard error, or a
//! cancellation, stops the reader; the queues then drain and close, and the sink
//! discards every shard it had not completed.

pub mod feed;
pub mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use crossbeam_channel::{Receiver, Sender, bounded};

use crate::error::{Error, Result};
use crate::quarantine::split_rows;
use crate::stages::Stage;
pub use metrics::{InFlight, StepMetrics, StepReport};

/// Stack of the engine's threads. The shard reader evaluates `source.filter` through
/// DataFusion, whose recursive passes walk a filter near the operator limit
/// (`spec::MAX_FILTER_SIZE`) with large frames in a debug build, far past std's 2 MiB
/// default. Only address space is reserved; pages are touched as deep as a filter goes.
pub const THREAD_STACK_BYTES: usize = 64 << 20;

/// Start `f` on a thread of `scope` named `name`, with [`THREAD_STACK_BYTES`] of stack.
pub fn spawn_scoped<'scope, T, F>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    name: &str,
    f: F,
) -> Result<std::thread::ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK_BYTES)
        .spawn_scoped(scope, f)
        .map_err(|e| Error::Internal(format!("cannot start thread `{name}`: {e}")))
}

/// A batch on its way through the pipeline.
#[derive(Debug)]
pub struct Envelope {
    pub shard: usize,
    pub seq: u64,
    /// Rows still in the main flow, with every stage's columns so far.
    pub batch: RecordBatch,
    /// Rows rejected so far (quarantine schema).
    pub quarantine: Vec<RecordBatch>,
    /// Rows and bytes this envelope entered with (for in-flight accounting).
    pub rows_in: u64,
    pub bytes_in: u64,
}

#[derive(Debug)]
pub enum Message {
    Batch(Envelope),
    /// `shard` could not be read to its end and is skipped (the source's
    /// `skip_unreadable`); whatever of it is in flight is dropped, nothing is committed.
    ShardFailed {
        shard: usize,
        reason: String,
    },
    /// The reader has sent every batch of `shard`.
    ShardEnd {
        shard: usize,
        batches: u64,
        rows_in: u64,
        ending: ShardEnding,
    },
}

/// What the reader learnt of a shard by reading it to its end, for its manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardEnding {
    /// Parts that could not be read (their rows are in no count).
    pub skipped: Vec<SkippedPart>,
    /// SHA-256 of the whole input, hashed by the read that processed it
    /// (`resume.verify: full`).
    pub content_sha256: Option<String>,
}

/// A part of a shard the reader could not read and skipped, reading on after it
/// (`source.on_unreadable: quarantine`): recorded in the shard's manifest and the run
/// report, and the run exits with code 3.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SkippedPart {
    /// The row group, when the part is one.
    pub row_group: Option<usize>,
    pub reason: String,
}

/// Shared stop flag: set by a signal handler, or by the first hard error.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Relaxed)
    }

    /// The flag itself, for `signal_hook::flag::register`.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

/// Row counts of one finished shard. `rows_in = rows_out + rows_quarantined` holds for
/// every shard the runtime hands to [`Sink::finish_shard`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardCounts {
    pub rows_in: u64,
    pub rows_out: u64,
    pub rows_quarantined: u64,
}

/// Where batches come from: shards, each read on its own, in order. The runtime knows
/// shards only by index; what a shard is (a Parquet file, a list in a test) is the
/// source's business.
pub trait BatchSource: Send + Sync {
    /// Rows per batch leaving the reader (the last batch of a shard may be shorter).
    fn batch_size(&self) -> usize;
    /// A name for shard `index` in messages (its path).
    fn shard_label(&self, index: usize) -> String;
    /// Start reading shard `index`.
    fn open_shard(&self, index: usize) -> Result<Box<dyn ShardReader + '_>>;
    /// Whether a shard whose reading fails with [`Error::Unreadable`] is skipped (and
    /// reported) instead of failing the run.
    fn skip_unreadable(&self) -> bool {
        false
    }
    /// The shards will be opened in this order: a source may start fetching them
    /// (bounded) so that opening finds them ready.
    fn read_ahead(&self, _order: &[usize]) -> Result<()> {
        Ok(())
    }
}

/// One shard being read.
pub trait ShardReader {
    /// The next rows as stored (any number of them); None at the end of the shard.
    fn next_rows(&mut self) -> Option<Result<RecordBatch>>;
    /// Split `rows` (starting at row `first_row` of the shard) into the canonical rows
    /// that flow on and the rows the source rejects (quarantine schema).
    fn convert(
        &mut self,
        rows: &RecordBatch,
        first_row: u64,
    ) -> Result<(RecordBatch, Option<RecordBatch>)>;
    /// What reading the shard to its end found (asked at its end).
    fn ending(&self) -> ShardEnding {
        ShardEnding::default()
    }
}

/// Where finished batches go. Called from one thread, in order per shard; shards are
/// named by their index in the source.
pub trait Sink: Send {
    /// Rows of `shard` that passed every stage, and rows that were quarantined.
    fn write(
        &mut self,
        shard: usize,
        batch: &RecordBatch,
        quarantine: &[RecordBatch],
    ) -> Result<()>;
    /// Every batch of `shard` has been written: make the output durable.
    fn finish_shard(
        &mut self,
        shard: usize,
        counts: ShardCounts,
        ending: &ShardEnding,
    ) -> Result<()>;
    /// `shard` will not be finished (it could not be read): drop what was written.
    fn discard_shard(&mut self, shard: usize);
    /// The run is stopping: discard every shard not finished.
    fn abort(&mut self);
    /// Every shard is finished or discarded: complete what is still pending (such as
    /// uploads going on in the background) and report its first failure.
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A built stage with its parallelism.
pub struct StageSlot {
    pub stage: Arc<dyn Stage>,
    pub workers: usize,
    pub queue_depth: usize,
}

/// What [`run`] needs.
pub struct Topology {
    pub source: Box<dyn BatchSource>,
    /// Indices of the source's shards to process, in order.
    pub shards: Vec<usize>,
    pub stages: Vec<StageSlot>,
    /// Depth of the queue between the reader and the first stage (and into the sink).
    pub queue_depth: usize,
    /// A shard's last batch holds at least this many rows when the shard has them (a
    /// shorter tail is folded into the batch before it); 0: no folding.
    pub min_tail_rows: usize,
    /// The feed the sink hands rows on to (a [`feed::FeedingSink`]), if any: its rows
    /// count as in flight, its consumer is a step of the report and its queue's fill
    /// is that step's.
    pub feed: Option<Arc<feed::FeedShared>>,
}

/// Live view handed to a progress callback, and the final figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSnapshot {
    pub elapsed_s: f64,
    pub steps: Vec<StepReport>,
    pub rows_in_flight: u64,
    pub bytes_in_flight: u64,
    pub peak_rows_in_flight: u64,
    pub peak_bytes_in_flight: u64,
    pub shards_done: u64,
    pub shards_total: u64,
    /// Name of the step with the highest busy fraction (the one to give workers to).
    pub bottleneck: Option<String>,
}

/// A shard skipped because it could not be read: (shard index, reason).
pub type Unreadable = (usize, String);

/// Figures of a whole run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunStats {
    pub snapshot: RunSnapshot,
    pub shards: Vec<(usize, ShardCounts)>,
    /// Shards skipped because they could not be read, with the reason.
    pub unreadable: Vec<Unreadable>,
    /// Queue fill samples over time: (seconds, fill 0..1 per queue in step order).
    pub queue_samples: Vec<(f64, Vec<f64>)>,
    /// Stopped by the cancel token: the figures are those of the shards finished
    /// before the stop (the others were discarded).
    pub cancelled: bool,
}

struct Shared {
    cancel: CancelToken,
    first_error: Mutex<Option<Error>>,
    in_flight: Arc<InFlight>,
    shards_done: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn new(cancel: CancelToken, in_flight: Arc<InFlight>) -> Self {
        Shared {
            cancel,
            first_error: Mutex::new(None),
            in_flight,
            shards_done: Default::default(),
        }
    }

    fn fail(&self, e: Error) {
        if let Ok(mut slot) = self.first_error.lock()
            && slot.is_none()
        {
            *slot = Some(e);
        }
        self.cancel.cancel();
    }
}

/// Run the topology to completion, to the first error, or to a cancellation (then `Ok`
/// with [`RunStats::cancelled`] set, so the caller can report what was finished).
/// `on_progress` is called about every `progress_every` from a monitor thread.
pub fn run(
    topology: Topology,
    sink: &mut dyn Sink,
    cancel: CancelToken,
    progress_every: Duration,
    on_progress: Option<&(dyn Fn(&RunSnapshot) + Sync)>,
) -> Result<RunStats> {
    let Topology {
        source,
        shards,
        stages,
        queue_depth,
        min_tail_rows,
        feed,
    } = topology;
    // A feed's rows count in the run's rows in flight.
    let in_flight = feed.as_ref().map(|f| f.in_flight.clone());
    let shared = Shared::new(cancel.clone(), in_flight.unwrap_or_default());
    let steps = step_metrics(&stages);
    let (senders, receivers, gauges) = queues(&stages, queue_depth);
    let view = RunView {
        started: Instant::now(),
        steps: &steps,
        shared: &shared,
        feed: feed.as_deref(),
        shards_total: shards.len() as u64,
    };
    let threads = Threads {
        source: source.as_ref(),
        shards: &shards,
        min_tail_rows,
        stages: &stages,
        gauges: &gauges,
        steps: &steps,
        shared: &shared,
    };
    let done = AtomicBool::new(false);
    let monitor = Monitor {
        view: &view,
        gauges: &gauges,
        on_progress,
        every: progress_every,
        done: &done,
    };
    let ((shard_counts, unreadable), (queue_samples, fills)) = std::thread::scope(|scope| {
        let monitoring = scope.spawn(|| monitor.run());
        let (workers, sink_rx) = threads.start(scope, senders, receivers);
        let outcome = sink_worker(
            sink,
            &sink_rx,
            source.as_ref(),
            &steps[steps.len() - 1],
            &shared,
        );
        drop(sink_rx);
        for worker in workers {
            let _ = worker.join();
        }
        done.store(true, Relaxed);
        let monitored = monitoring.join().unwrap_or_default();
        (outcome, monitored)
    });

    if let Ok(mut slot) = shared.first_error.lock()
        && let Some(e) = slot.take()
    {
        return Err(e);
    }
    Ok(RunStats {
        snapshot: view.snapshot(&fills),
        shards: shard_counts,
        unreadable,
        queue_samples,
        cancelled: cancel.is_cancelled(),
    })
}

/// One [`StepMetrics`] per step: the source, each stage, the sink.
fn step_metrics(stages: &[StageSlot]) -> Vec<StepMetrics> {
    let mut steps = vec![StepMetrics::new("source", 1)];
    for slot in stages {
        steps.push(StepMetrics::new(slot.stage.name(), slot.workers.max(1)));
    }
    steps.push(StepMetrics::new("sink", 1));
    steps
}

/// The bounded queues between the steps, with a fill gauge each: queue i feeds step
/// i+1 (stage i, or the sink after the last stage). Fill is counted beside the channels
/// because holding a Sender clone to ask for `len()` would keep a queue open after its
/// producers ended.
fn queues(
    stages: &[StageSlot],
    queue_depth: usize,
) -> (
    Vec<Sender<Message>>,
    Vec<Receiver<Message>>,
    Vec<QueueGauge>,
) {
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut gauges = Vec::new();
    for i in 0..=stages.len() {
        let depth = stages.get(i).map_or(queue_depth, |s| s.queue_depth).max(1);
        let (tx, rx) = bounded(depth);
        senders.push(tx);
        receivers.push(rx);
        gauges.push(QueueGauge::new(depth));
    }
    (senders, receivers, gauges)
}

/// What the live figures of a run are made of.
struct RunView<'a> {
    started: Instant,
    steps: &'a [StepMetrics],
    shared: &'a Shared,
    feed: Option<&'a feed::FeedShared>,
    shards_total: u64,
}

impl RunView<'_> {
    /// The run as of now, with each queue's (mean, max) fill so far.
    fn snapshot(&self, fills: &[(f64, f64)]) -> RunSnapshot {
        let elapsed = self.started.elapsed();
        let mut reports: Vec<StepReport> = self.steps.iter().map(|s| s.snapshot(elapsed)).collect();
        for (i, (mean, max)) in fills.iter().enumerate() {
            if let Some(r) = reports.get_mut(i + 1) {
                r.queue_fill_mean = *mean;
                r.queue_fill_max = *max;
            }
        }
        if let Some(feed) = self.feed {
            with_feed(&mut reports, feed, elapsed, fills.last());
        }
        let bottleneck = reports
            .iter()
            .max_by(|a, b| a.busy_fraction.total_cmp(&b.busy_fraction))
            .filter(|r| r.busy_fraction > 0.0)
            .map(|r| r.name.clone());
        let in_flight = &self.shared.in_flight;
        RunSnapshot {
            elapsed_s: elapsed.as_secs_f64(),
            steps: reports,
            rows_in_flight: in_flight.rows.load(Relaxed),
            bytes_in_flight: in_flight.bytes.load(Relaxed),
            peak_rows_in_flight: in_flight.peak_rows.load(Relaxed),
            peak_bytes_in_flight: in_flight.peak_bytes.load(Relaxed),
            shards_done: self.shared.shards_done.load(Relaxed),
            shards_total: self.shards_total,
            bottleneck,
        }
    }
}

/// Queue fill samples over time: (seconds, fill 0..1 per queue in step order).
type QueueSamples = Vec<(f64, Vec<f64>)>;

/// Samples every queue's fill (the feed's last) and drives the progress callback, on a
/// thread of its own until `done`.
struct Monitor<'a> {
    view: &'a RunView<'a>,
    gauges: &'a [QueueGauge],
    on_progress: Option<&'a (dyn Fn(&RunSnapshot) + Sync)>,
    every: Duration,
    done: &'a AtomicBool,
}

impl Monitor<'_> {
    /// Sleeps in short steps so the run ends promptly; returns the samples and each
    /// queue's (mean, max) fill.
    fn run(&self) -> (QueueSamples, Vec<(f64, f64)>) {
        let sampled = self.gauges.len() + usize::from(self.view.feed.is_some());
        let mut samples = Vec::new();
        let mut sums = vec![0.0f64; sampled];
        let mut maxes = vec![0.0f64; sampled];
        let mut count = 0u64;
        let mut last_progress = Instant::now();
        let fills = |sums: &[f64], maxes: &[f64], count: u64| -> Vec<(f64, f64)> {
            let n = count.max(1) as f64;
            sums.iter().zip(maxes).map(|(s, m)| (s / n, *m)).collect()
        };
        while !self.done.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            let mut now: Vec<f64> = self.gauges.iter().map(QueueGauge::fill).collect();
            now.extend(self.view.feed.map(|f| f.fill()));
            for (i, f) in now.iter().enumerate() {
                sums[i] += f;
                maxes[i] = maxes[i].max(*f);
            }
            count += 1;
            if count.is_multiple_of(5) {
                samples.push((self.view.started.elapsed().as_secs_f64(), now));
            }
            if let Some(callback) = self.on_progress
                && last_progress.elapsed() >= self.every
            {
                last_progress = Instant::now();
                callback(&self.view.snapshot(&fills(&sums, &maxes, count)));
            }
        }
        (samples, fills(&sums, &maxes, count))
    }
}

/// The reader and the stage workers, and what they share.
struct Threads<'a> {
    source: &'a dyn BatchSource,
    shards: &'a [usize],
    min_tail_rows: usize,
    stages: &'a [StageSlot],
    gauges: &'a [QueueGauge],
    steps: &'a [StepMetrics],
    shared: &'a Shared,
}

impl<'a> Threads<'a> {
    /// Start the reader and every stage worker on `scope`; returns their handles and
    /// the sink's end of the last queue. The queue ends passed in are dropped here, so
    /// from now on only the threads hold them and a queue closes when its producers end.
    /// A thread that cannot start fails the run.
    fn start<'scope>(
        &self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        senders: Vec<Sender<Message>>,
        receivers: Vec<Receiver<Message>>,
    ) -> (Vec<std::thread::ScopedJoinHandle<'scope, ()>>, Inlet<'a>)
    where
        'a: 'scope,
    {
        let Threads {
            source,
            shards,
            min_tail_rows,
            stages,
            gauges,
            steps,
            shared,
        } = *self;
        let mut handles = Vec::new();
        let reader_tx = Outlet {
            tx: senders[0].clone(),
            gauge: &gauges[0],
        };
        let reader = move || {
            if let Err(e) = read_all(source, min_tail_rows, shards, &reader_tx, &steps[0], shared) {
                shared.fail(e);
            }
        };
        match spawn_scoped(scope, "trustflow-reader", reader) {
            Ok(handle) => handles.push(handle),
            Err(e) => shared.fail(e),
        }
        for (i, slot) in stages.iter().enumerate() {
            for _ in 0..slot.workers.max(1) {
                let rx = Inlet {
                    rx: receivers[i].clone(),
                    gauge: &gauges[i],
                };
                let tx = Outlet {
                    tx: senders[i + 1].clone(),
                    gauge: &gauges[i + 1],
                };
                let stage = slot.stage.clone();
                let metrics = &steps[i + 1];
                let name = format!("trustflow-{}", stage.name());
                let work = move || stage_worker(stage.as_ref(), &rx, &tx, metrics, shared);
                match spawn_scoped(scope, &name, work) {
                    Ok(handle) => handles.push(handle),
                    Err(e) => shared.fail(e),
                }
            }
        }
        let sink_rx = Inlet {
            rx: receivers[stages.len()].clone(),
            gauge: &gauges[stages.len()],
        };
        (handles, sink_rx)
    }
}

/// The feed's consumer as the last step, and the sink's time blocked on the feed
/// moved from its busy time (it is spent inside `Sink::write`) to its blocked time.
fn with_feed(
    reports: &mut Vec<StepReport>,
    feed: &feed::FeedShared,
    elapsed: Duration,
    feed_fill: Option<&(f64, f64)>,
) {
    let blocked_s = feed.sink_blocked_ns.load(Relaxed) as f64 / 1e9;
    if let Some(sink) = reports.last_mut() {
        let wall = elapsed.as_secs_f64().max(1e-9);
        let moved = blocked_s.min(sink.busy_s);
        sink.busy_s -= moved;
        sink.busy_fraction = (sink.busy_fraction - moved / wall).max(0.0);
        sink.blocked_fraction += moved / wall;
    }
    let mut consumer = feed.consumer.snapshot(elapsed);
    if let Some((mean, max)) = feed_fill {
        consumer.queue_fill_mean = *mean;
        consumer.queue_fill_max = *max;
    }
    reports.push(consumer);
}

/// Fill of one queue, kept beside the channel. Counted after a send completes (a
/// producer blocked on a full queue is not "in" it) and before the matching receive is
/// counted, so the value can dip below zero for an instant: it is clamped when read.
struct QueueGauge {
    len: std::sync::atomic::AtomicIsize,
    capacity: usize,
}

impl QueueGauge {
    fn new(capacity: usize) -> Self {
        QueueGauge {
            len: Default::default(),
            capacity: capacity.max(1),
        }
    }

    fn fill(&self) -> f64 {
        let len = self.len.load(Relaxed).clamp(0, self.capacity as isize);
        len as f64 / self.capacity as f64
    }
}

/// The producing end of a queue.
struct Outlet<'a> {
    tx: Sender<Message>,
    gauge: &'a QueueGauge,
}

impl Outlet<'_> {
    /// Blocks while the queue is full (backpressure); false once the consumers are gone.
    fn send(&self, msg: Message, metrics: &StepMetrics) -> bool {
        let ok = StepMetrics::timed(&metrics.blocked_ns, || self.tx.send(msg)).is_ok();
        if ok {
            self.gauge.len.fetch_add(1, Relaxed);
        }
        ok
    }
}

/// The consuming end of a queue.
struct Inlet<'a> {
    rx: Receiver<Message>,
    gauge: &'a QueueGauge,
}

impl Inlet<'_> {
    fn recv(&self, metrics: &StepMetrics) -> Option<Message> {
        let msg = StepMetrics::timed(&metrics.starved_ns, || self.rx.recv()).ok()?;
        self.gauge.len.fetch_sub(1, Relaxed);
        Some(msg)
    }
}

fn read_all(
    source: &dyn BatchSource,
    min_tail: usize,
    shards: &[usize],
    tx: &Outlet<'_>,
    metrics: &StepMetrics,
    shared: &Shared,
) -> Result<()> {
    source.read_ahead(shards)?;
    for &index in shards {
        match read_shard(source, min_tail, index, tx, metrics, shared) {
            Ok(true) => {}
            Ok(false) => return Ok(()), // stopped: cancelled, or downstream ended
            Err(Error::Unreadable { path, reason }) if source.skip_unreadable() => {
                tracing::warn!("{}: skipped, cannot be read: {reason}", path.display());
                let failed = Message::ShardFailed {
                    shard: index,
                    reason,
                };
                if !tx.send(failed, metrics) {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Send every batch of shard `index`, then its end; false when the run stopped.
fn read_shard(
    source: &dyn BatchSource,
    min_tail: usize,
    index: usize,
    tx: &Outlet<'_>,
    metrics: &StepMetrics,
    shared: &Shared,
) -> Result<bool> {
    {
        let t0 = Instant::now();
        let mut reader = source.open_shard(index)?;
        StepMetrics::add(&metrics.busy_ns, t0.elapsed());
        let (mut seq, mut rows_in) = (0u64, 0u64);
        // Batches leave the reader with exactly `batch_size` rows (the last of a shard
        // may be shorter, or longer by a folded tail), whatever the shard's row groups:
        // batch-level behaviour (such as uncertainty groups) then depends on the data
        // alone.
        let mut chunker = Chunker::new(source.batch_size(), min_tail);
        let mut upstream_done = false;
        loop {
            if shared.cancel.is_cancelled() {
                return Ok(false);
            }
            let t0 = Instant::now();
            let next = match chunker.take_full() {
                Some(full) => full,
                None if upstream_done => match chunker.flush() {
                    Some(rest) => rest,
                    None => break,
                },
                None => {
                    match reader.next_rows() {
                        Some(rows) => chunker.push(rows?),
                        None => upstream_done = true,
                    }
                    StepMetrics::add(&metrics.busy_ns, t0.elapsed());
                    continue;
                }
            };
            let batch = next.map_err(|e| Error::input(source.shard_label(index), e.to_string()))?;
            let rows = batch.num_rows() as u64;
            let (ok, bad) = reader.convert(&batch, rows_in)?;
            StepMetrics::add(&metrics.busy_ns, t0.elapsed());
            let quarantined = bad.as_ref().map_or(0, |b| b.num_rows() as u64);
            metrics.count_batch(rows, rows - quarantined, quarantined);
            // Measured after conversion: DataFusion's batches are slices sharing a row
            // group's buffers, so their own size would count those buffers many times.
            let bytes = (ok.get_array_memory_size()
                + bad.as_ref().map_or(0, |b| b.get_array_memory_size()))
                as u64;
            shared.in_flight.enter(rows, bytes);
            let envelope = Envelope {
                shard: index,
                seq,
                batch: ok,
                quarantine: bad.into_iter().collect(),
                rows_in: rows,
                bytes_in: bytes,
            };
            if !tx.send(Message::Batch(envelope), metrics) {
                return Ok(false); // downstream stopped; its error (if any) is recorded
            }
            seq += 1;
            rows_in += rows;
        }
        let end = Message::ShardEnd {
            shard: index,
            batches: seq,
            rows_in,
            ending: reader.ending(),
        };
        Ok(tx.send(end, metrics))
    }
}

/// Re-cuts a stream of batches into batches of exactly `size` rows.
/// Cuts a shard's rows into batches of exactly `size` rows. The shard's last rows form
/// a shorter batch, unless fewer than `min_tail` would be left there: those are folded
/// into the batch before it (so a stage working on groups of rows, such as
/// `uncertainty`, finds at least a group's worth in every batch of a shard that has it).
struct Chunker {
    size: usize,
    min_tail: usize,
    pending: Vec<RecordBatch>,
    rows: usize,
}

impl Chunker {
    fn new(size: usize, min_tail: usize) -> Self {
        Chunker {
            size: size.max(1),
            min_tail: min_tail.min(size),
            pending: Vec::new(),
            rows: 0,
        }
    }

    fn push(&mut self, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.rows += batch.num_rows();
            self.pending.push(batch);
        }
    }

    /// A batch of exactly `size` rows, if enough are pending that a tail of at least
    /// `min_tail` rows would still follow.
    fn take_full(&mut self) -> Option<Result<RecordBatch, arrow::error::ArrowError>> {
        (self.rows >= self.size + self.min_tail).then(|| self.take(self.size))
    }

    /// Whatever is pending (the end of a shard): with a `min_tail`, one batch of fewer
    /// than `size + min_tail` rows.
    fn flush(&mut self) -> Option<Result<RecordBatch, arrow::error::ArrowError>> {
        let most = match self.min_tail {
            0 => self.size,
            tail => self.size + tail,
        };
        (self.rows > 0).then(|| self.take(self.rows.min(most)))
    }

    fn take(&mut self, n: usize) -> Result<RecordBatch, arrow::error::ArrowError> {
        let schema = self.pending[0].schema();
        let all = arrow::compute::concat_batches(&schema, &self.pending)?;
        let out = all.slice(0, n);
        self.pending.clear();
        self.rows -= n;
        if self.rows > 0 {
            self.pending.push(all.slice(n, self.rows));
        }
        Ok(out)
    }
}

fn stage_worker(
    stage: &dyn Stage,
    rx: &Inlet<'_>,
    tx: &Outlet<'_>,
    metrics: &StepMetrics,
    shared: &Shared,
) {
    loop {
        let Some(msg) = rx.recv(metrics) else { return };
        if shared.cancel.is_cancelled() {
            return;
        }
        let msg = match msg {
            Message::Batch(mut env) => {
                let t0 = Instant::now();
                match apply_stage(stage, &env.batch) {
                    Ok((ok, bad)) => {
                        let rows = env.batch.num_rows() as u64;
                        let quarantined = bad.as_ref().map_or(0, |b| b.num_rows() as u64);
                        metrics.count_batch(rows, rows - quarantined, quarantined);
                        env.batch = ok;
                        env.quarantine.extend(bad);
                    }
                    Err(e) => {
                        shared.fail(e);
                        return;
                    }
                }
                StepMetrics::add(&metrics.busy_ns, t0.elapsed());
                Message::Batch(env)
            }
            other => other,
        };
        if !tx.send(msg, metrics) {
            return;
        }
    }
}

/// Run one stage on a batch: append its columns, move its rejected rows out (whole,
/// with the stage and reason; see `quarantine::split_rows`).
pub fn apply_stage(
    stage: &dyn Stage,
    batch: &RecordBatch,
) -> Result<(RecordBatch, Option<RecordBatch>)> {
    let name = stage.name();
    if batch.num_rows() == 0 {
        // Still append (empty) columns so every output batch has the same schema.
        let fields = stage.output_fields(&batch.schema())?;
        let columns = fields
            .iter()
            .map(|f| arrow::array::new_empty_array(f.data_type()))
            .collect();
        return Ok((append_columns(name, batch, &fields, columns)?, None));
    }
    let out = stage.process(batch)?;
    let fields = stage.output_fields(&batch.schema())?;
    if out.columns.len() != fields.len() {
        return Err(Error::stage(
            name,
            format!(
                "returned {} columns but declared {}",
                out.columns.len(),
                fields.len()
            ),
        ));
    }
    let full = append_columns(name, batch, &fields, out.columns)?;
    split_rows(&full, &out.rejected, name)
}

fn append_columns(
    stage: &str,
    batch: &RecordBatch,
    fields: &[arrow::datatypes::Field],
    columns: Vec<arrow::array::ArrayRef>,
) -> Result<RecordBatch> {
    let mut all_fields: Vec<arrow::datatypes::FieldRef> = batch.schema().fields().to_vec();
    all_fields.extend(fields.iter().map(|f| Arc::new(f.clone())));
    let mut all_columns = batch.columns().to_vec();
    all_columns.extend(columns);
    RecordBatch::try_new(
        Arc::new(arrow::datatypes::Schema::new(all_fields)),
        all_columns,
    )
    .map_err(|e| Error::stage(stage, e))
}

#[derive(Default)]
struct ShardProgress {
    next_seq: u64,
    pending: BTreeMap<u64, Envelope>,
    expected: Option<(u64, u64)>,
    counts: ShardCounts,
    ending: ShardEnding,
}

/// Write `shard`'s batches that are next in sequence; once every batch it read is
/// written, check its row accounting and finish it (true).
fn write_in_order(
    sink: &mut dyn Sink,
    shard: usize,
    progress: &mut ShardProgress,
    source: &dyn BatchSource,
    metrics: &StepMetrics,
    shared: &Shared,
) -> Result<bool> {
    while let Some(env) = progress.pending.remove(&progress.next_seq) {
        let quarantined: u64 = env.quarantine.iter().map(|b| b.num_rows() as u64).sum();
        let rows_out = env.batch.num_rows() as u64;
        sink.write(shard, &env.batch, &env.quarantine)?;
        progress.counts.rows_in += env.rows_in;
        progress.counts.rows_out += rows_out;
        progress.counts.rows_quarantined += quarantined;
        metrics.count_batch(env.rows_in, rows_out, quarantined);
        shared.in_flight.leave(env.rows_in, env.bytes_in);
        progress.next_seq += 1;
    }
    let Some((batches, rows_in)) = progress.expected else {
        return Ok(false);
    };
    if progress.next_seq != batches {
        return Ok(false);
    }
    let counts = progress.counts;
    if counts.rows_in != rows_in || counts.rows_in != counts.rows_out + counts.rows_quarantined {
        return Err(Error::Internal(format!(
            "{}: row accounting broken: read {rows_in}, received {}, wrote {} + quarantined {}",
            source.shard_label(shard),
            counts.rows_in,
            counts.rows_out,
            counts.rows_quarantined
        )));
    }
    sink.finish_shard(shard, counts, &progress.ending)?;
    Ok(true)
}

fn sink_worker(
    sink: &mut dyn Sink,
    rx: &Inlet<'_>,
    source: &dyn BatchSource,
    metrics: &StepMetrics,
    shared: &Shared,
) -> (Vec<(usize, ShardCounts)>, Vec<Unreadable>) {
    let mut open: HashMap<usize, ShardProgress> = HashMap::new();
    let mut finished = Vec::new();
    let mut unreadable: Vec<Unreadable> = Vec::new();
    let result = (|| -> Result<()> {
        loop {
            let Some(msg) = rx.recv(metrics) else { break };
            if shared.cancel.is_cancelled() {
                break;
            }
            let t0 = Instant::now();
            let shard_index = match msg {
                Message::Batch(env) if unreadable.iter().any(|(s, _)| *s == env.shard) => {
                    // A batch of a skipped shard that was still in a stage.
                    shared.in_flight.leave(env.rows_in, env.bytes_in);
                    continue;
                }
                Message::ShardFailed { shard, reason } => {
                    if let Some(progress) = open.remove(&shard) {
                        for env in progress.pending.values() {
                            shared.in_flight.leave(env.rows_in, env.bytes_in);
                        }
                    }
                    sink.discard_shard(shard);
                    unreadable.push((shard, reason));
                    StepMetrics::add(&metrics.busy_ns, t0.elapsed());
                    continue;
                }
                Message::Batch(env) => {
                    let shard = env.shard;
                    let entry = open.entry(shard).or_default();
                    entry.pending.insert(env.seq, env);
                    shard
                }
                Message::ShardEnd {
                    shard,
                    batches,
                    rows_in,
                    ending,
                } => {
                    let progress = open.entry(shard).or_default();
                    progress.expected = Some((batches, rows_in));
                    progress.ending = ending;
                    shard
                }
            };
            let Some(progress) = open.get_mut(&shard_index) else {
                continue;
            };
            if write_in_order(sink, shard_index, progress, source, metrics, shared)? {
                let counts = progress.counts;
                open.remove(&shard_index);
                finished.push((shard_index, counts));
                shared.shards_done.fetch_add(1, Relaxed);
            }
            StepMetrics::add(&metrics.busy_ns, t0.elapsed());
        }
        if open.is_empty() && !shared.cancel.is_cancelled() {
            let t0 = Instant::now();
            sink.close()?;
            StepMetrics::add(&metrics.busy_ns, t0.elapsed());
        }
        Ok(())
    })();
    if let Err(e) = result {
        shared.fail(e);
    }
    if !open.is_empty() || shared.cancel.is_cancelled() {
        sink.abort();
    }
    if !open.is_empty() && !shared.cancel.is_cancelled() {
        shared.fail(Error::Internal(format!(
            "{} shard(s) ended incomplete without an error",
            open.len()
        )));
    }
    (finished, unreadable)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::Chunker;

    fn batch(values: std::ops::Range<i64>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(values))]).unwrap()
    }

    fn cut(size: usize, min_tail: usize, rows: i64) -> Vec<RecordBatch> {
        let mut c = Chunker::new(size, min_tail);
        let mut out = Vec::new();
        let splits = [0, 3.min(rows), 13.min(rows), 13.min(rows), rows];
        for w in splits.windows(2) {
            c.push(batch(w[0]..w[1]));
            while let Some(full) = c.take_full() {
                out.push(full.unwrap());
            }
        }
        while let Some(rest) = c.flush() {
            out.push(rest.unwrap());
        }
        out
    }

    fn sizes(batches: &[RecordBatch]) -> Vec<usize> {
        batches.iter().map(|b| b.num_rows()).collect()
    }

    #[test]
    fn a_short_tail_is_folded_into_the_batch_before_it() {
        assert_eq!(sizes(&cut(4, 3, 14)), vec![4, 4, 6]);
        assert_eq!(sizes(&cut(4, 2, 14)), vec![4, 4, 4, 2]);
        assert_eq!(sizes(&cut(4, 4, 16)), vec![4, 4, 4, 4]);
        assert_eq!(sizes(&cut(4, 4, 17)), vec![4, 4, 4, 5]);
        assert_eq!(
            sizes(&cut(4, 3, 2)),
            vec![2],
            "a shard smaller than the tail"
        );
    }

    #[test]
    fn chunker_recuts_to_exact_sizes_in_order() {
        let out = cut(4, 0, 14);
        assert_eq!(sizes(&out), vec![4, 4, 4, 2]);
        let values: Vec<i64> = out
            .iter()
            .flat_map(|b| {
                let col = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                col.values().to_vec()
            })
            .collect();
        assert_eq!(values, (0..14).collect::<Vec<_>>());
    }
}
