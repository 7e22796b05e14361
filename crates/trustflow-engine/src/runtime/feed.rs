//! The one-pass trainer's feed: the rows the sink writes, handed on through one more
//! bounded queue, in shard order, to a consumer on another thread (the trainer).
//!
//! ```text
//! ... -> sink -> FeedingSink -> feed queue (bounded) -> trainer's sampler
//!                    \-> the wrapped sink writes every row exactly once, as without a feed
//! ```
//!
//! The feed is in *shard order*: every shard of the run, in index order, including those
//! an earlier run already wrote (sent as [`FeedEvent::Written`], for the consumer to
//! read back). Batches of a later shard that reach the sink first are held until the
//! shards before it are finished, so the sequence of rows a consumer sees depends on
//! the data alone, not on worker timing, and a rerun after a kill sees the same
//! sequence. A full feed queue blocks the sink, and through the pipeline's queues the
//! reader: the trainer's speed reaches the source. Rows in the feed (queued or held)
//! stay counted in the run's rows in flight until the consumer takes them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use crossbeam_channel::{Receiver, Sender, bounded};

use super::metrics::{InFlight, StepMetrics};
use super::{ShardCounts, ShardEnding, Sink};
use crate::error::Result;

/// What the feed says, in shard order.
#[derive(Debug)]
pub enum FeedEvent {
    /// `shard` was written by an earlier run and is not processed again: its rows come
    /// back from the output file of `stem`.
    Written { shard: usize, stem: String },
    /// Rows of `shard`, in order: what the sink wrote (before `sink.drop_columns`).
    Rows { shard: usize, batch: RecordBatch },
    /// Every row of `shard` has been sent, and the shard is committed.
    Finished { shard: usize },
    /// `shard` could not be read to its end and is not in the output. Rows of it sent
    /// before stay sent.
    Discarded { shard: usize },
    /// Every shard of the run has been sent: the stream is complete. A feed that closes
    /// without it ended with the run's failure or cancellation.
    End,
}

/// State the two ends share: the run's rows in flight (the feed's rows are in it),
/// the consumer's step figures, and the queue's fill.
#[derive(Debug)]
pub struct FeedShared {
    pub in_flight: Arc<InFlight>,
    /// The consumer's step (`train`): it adds its busy and starved time here.
    pub consumer: StepMetrics,
    /// Time the sink spent blocked on a full feed queue.
    pub sink_blocked_ns: AtomicU64,
    queued: AtomicIsize,
    capacity: usize,
}

impl FeedShared {
    /// Fill of the feed queue, 0..1.
    pub fn fill(&self) -> f64 {
        let n = self.queued.load(Relaxed).clamp(0, self.capacity as isize);
        n as f64 / self.capacity as f64
    }
}

/// An event with the rows and bytes it holds in flight.
type Carried = (FeedEvent, u64, u64);

/// The producing end, given to [`FeedingSink`].
#[derive(Debug)]
pub struct FeedSender {
    tx: Sender<Carried>,
    shared: Arc<FeedShared>,
}

/// The consuming end.
#[derive(Debug)]
pub struct FeedReceiver {
    rx: Receiver<Carried>,
    shared: Arc<FeedShared>,
}

/// A feed whose queue holds `depth` events (batches) at most; `consumer` names the
/// consuming step in the run report.
pub fn channel(depth: usize, consumer: &str) -> (FeedSender, FeedReceiver) {
    let (tx, rx) = bounded(depth.max(1));
    let shared = Arc::new(FeedShared {
        in_flight: Arc::new(InFlight::default()),
        consumer: StepMetrics::new(consumer, 1),
        sink_blocked_ns: AtomicU64::new(0),
        queued: AtomicIsize::new(0),
        capacity: depth.max(1),
    });
    (
        FeedSender {
            tx,
            shared: shared.clone(),
        },
        FeedReceiver { rx, shared },
    )
}

impl FeedSender {
    pub fn shared(&self) -> &Arc<FeedShared> {
        &self.shared
    }
}

impl FeedReceiver {
    /// The next event; `None` once the feed is closed.
    pub fn recv(&self) -> Option<FeedEvent> {
        let (event, rows, bytes) = self.rx.recv().ok()?;
        self.shared.queued.fetch_sub(1, Relaxed);
        self.shared.in_flight.leave(rows, bytes);
        Some(event)
    }

    pub fn shared(&self) -> &Arc<FeedShared> {
        &self.shared
    }
}

/// How a shard of the run reaches the feed.
#[derive(Debug, Clone)]
pub enum FeedShard {
    /// Processed by this run: its rows come live from the sink.
    Live { shard: usize },
    /// Written by an earlier run: announced as [`FeedEvent::Written`].
    Written { shard: usize, stem: String },
}

/// A [`Sink`] that writes through `inner` and hands every written batch on to the
/// feed, in shard order.
pub struct FeedingSink<'a> {
    inner: &'a mut dyn Sink,
    feed: Option<FeedSender>,
    /// Every shard of the run in index order, and the position of the one being fed.
    order: Vec<FeedShard>,
    next: usize,
    /// Events of shards after the one being fed, until their turn.
    held: BTreeMap<usize, Vec<Carried>>,
}

impl<'a> FeedingSink<'a> {
    pub fn new(inner: &'a mut dyn Sink, feed: FeedSender, mut order: Vec<FeedShard>) -> Self {
        order.sort_by_key(|s| match s {
            FeedShard::Live { shard } | FeedShard::Written { shard, .. } => *shard,
        });
        FeedingSink {
            inner,
            feed: Some(feed),
            order,
            next: 0,
            held: BTreeMap::new(),
        }
    }

    /// Send, blocking while the queue is full; a consumer that has gone away makes the
    /// rest of the feed a no-op (the run itself goes on and writes every shard).
    fn send(&mut self, carried: Carried) {
        let Some(feed) = &self.feed else { return };
        let rows = carried.1;
        let t0 = Instant::now();
        let sent = feed.tx.send(carried).is_ok();
        StepMetrics::add(&feed.shared.sink_blocked_ns, t0.elapsed());
        match sent {
            true => {
                feed.shared.queued.fetch_add(1, Relaxed);
                // The consumer's rows in: what was handed to it (the run's report is
                // written when the last rows are handed over, not taken).
                if rows > 0 {
                    feed.shared.consumer.rows_in.fetch_add(rows, Relaxed);
                    feed.shared.consumer.batches.fetch_add(1, Relaxed);
                }
            }
            false => self.feed = None,
        }
    }

    fn carried(&self, event: FeedEvent) -> Carried {
        let (rows, bytes) = match &event {
            FeedEvent::Rows { batch, .. } => (
                batch.num_rows() as u64,
                batch.get_array_memory_size() as u64,
            ),
            _ => (0, 0),
        };
        if let Some(feed) = &self.feed {
            feed.shared.in_flight.enter(rows, bytes);
        }
        (event, rows, bytes)
    }

    fn current(&self) -> Option<usize> {
        self.order.get(self.next).map(|s| match s {
            FeedShard::Live { shard } | FeedShard::Written { shard, .. } => *shard,
        })
    }

    /// Send `event` of `shard` now if it is the shard being fed, else hold it.
    fn offer(&mut self, shard: usize, event: FeedEvent) {
        let ends = matches!(
            event,
            FeedEvent::Finished { .. } | FeedEvent::Discarded { .. }
        );
        self.catch_up();
        let carried = self.carried(event);
        if self.current() == Some(shard) {
            self.send(carried);
            if ends {
                self.next += 1;
                self.catch_up();
            }
        } else {
            self.held.entry(shard).or_default().push(carried);
        }
    }

    /// Send what the shards now at the front have ready: earlier runs' shards, and held
    /// events, moving on past every shard that has ended.
    fn catch_up(&mut self) {
        while let Some(front) = self.order.get(self.next).cloned() {
            match front {
                FeedShard::Written { shard, stem } => {
                    let carried = self.carried(FeedEvent::Written { shard, stem });
                    self.send(carried);
                    self.next += 1;
                }
                FeedShard::Live { shard } => {
                    let Some(events) = self.held.remove(&shard) else {
                        return;
                    };
                    let mut ended = false;
                    for carried in events {
                        ended |= matches!(
                            carried.0,
                            FeedEvent::Finished { .. } | FeedEvent::Discarded { .. }
                        );
                        self.send(carried);
                    }
                    if !ended {
                        return;
                    }
                    self.next += 1;
                }
            }
        }
    }
}

impl Sink for FeedingSink<'_> {
    fn write(
        &mut self,
        shard: usize,
        batch: &RecordBatch,
        quarantine: &[RecordBatch],
    ) -> Result<()> {
        self.catch_up();
        self.inner.write(shard, batch, quarantine)?;
        if batch.num_rows() > 0 {
            let batch = batch.clone();
            self.offer(shard, FeedEvent::Rows { shard, batch });
        }
        Ok(())
    }

    fn finish_shard(
        &mut self,
        shard: usize,
        counts: ShardCounts,
        ending: &ShardEnding,
    ) -> Result<()> {
        self.inner.finish_shard(shard, counts, ending)?;
        self.offer(shard, FeedEvent::Finished { shard });
        Ok(())
    }

    fn discard_shard(&mut self, shard: usize) {
        self.inner.discard_shard(shard);
        self.offer(shard, FeedEvent::Discarded { shard });
    }

    fn abort(&mut self) {
        self.inner.abort();
        // No `End`: the consumer learns the stream is incomplete.
        self.release_held();
        self.feed = None;
    }

    fn close(&mut self) -> Result<()> {
        self.inner.close()?;
        self.catch_up();
        if self.next == self.order.len() {
            let end = self.carried(FeedEvent::End);
            self.send(end);
        }
        self.release_held();
        self.feed = None;
        Ok(())
    }
}

impl FeedingSink<'_> {
    /// Held rows never sent leave the in-flight count.
    fn release_held(&mut self) {
        if let Some(feed) = &self.feed {
            for (_, rows, bytes) in self.held.values().flatten() {
                feed.shared.in_flight.leave(*rows, *bytes);
            }
        }
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl Sink for Recorder {
        fn write(&mut self, shard: usize, b: &RecordBatch, _: &[RecordBatch]) -> Result<()> {
            self.0.push(format!("write {shard}:{}", b.num_rows()));
            Ok(())
        }
        fn finish_shard(&mut self, shard: usize, _: ShardCounts, _: &ShardEnding) -> Result<()> {
            self.0.push(format!("finish {shard}"));
            Ok(())
        }
        fn discard_shard(&mut self, shard: usize) {
            self.0.push(format!("discard {shard}"));
        }
        fn abort(&mut self) {}
    }

    fn rows(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))]).unwrap()
    }

    fn drain(rx: &FeedReceiver) -> Vec<String> {
        let mut seen = Vec::new();
        while let Some(e) = rx.recv() {
            seen.push(match e {
                FeedEvent::Written { shard, stem } => format!("written {shard} {stem}"),
                FeedEvent::Rows { shard, batch } => format!("rows {shard}:{}", batch.num_rows()),
                FeedEvent::Finished { shard } => format!("finished {shard}"),
                FeedEvent::Discarded { shard } => format!("discarded {shard}"),
                FeedEvent::End => "end".into(),
            });
        }
        seen
    }

    #[test]
    fn later_shards_wait_for_earlier_ones_and_written_ones_take_their_place() {
        let (tx, rx) = channel(64, "train");
        let shared = tx.shared().clone();
        let mut inner = Recorder::default();
        {
            let order = vec![
                FeedShard::Written {
                    shard: 0,
                    stem: "a".into(),
                },
                FeedShard::Live { shard: 1 },
                FeedShard::Live { shard: 2 },
                FeedShard::Written {
                    shard: 3,
                    stem: "d".into(),
                },
                FeedShard::Live { shard: 4 },
            ];
            let mut sink = FeedingSink::new(&mut inner, tx, order);
            sink.write(2, &rows(3), &[]).unwrap();
            sink.write(1, &rows(2), &[]).unwrap();
            sink.finish_shard(2, ShardCounts::default(), &ShardEnding::default())
                .unwrap();
            sink.write(4, &rows(1), &[]).unwrap();
            sink.discard_shard(4);
            sink.finish_shard(1, ShardCounts::default(), &ShardEnding::default())
                .unwrap();
            sink.close().unwrap();
        }
        // The wrapped sink saw everything at once, in arrival order.
        assert_eq!(
            inner.0,
            [
                "write 2:3",
                "write 1:2",
                "finish 2",
                "write 4:1",
                "discard 4",
                "finish 1"
            ]
        );
        assert_eq!(
            drain(&rx),
            [
                "written 0 a",
                "rows 1:2",
                "finished 1",
                "rows 2:3",
                "finished 2",
                "written 3 d",
                "rows 4:1",
                "discarded 4",
                "end"
            ]
        );
        assert_eq!(shared.in_flight.rows.load(Relaxed), 0);
        assert_eq!(shared.in_flight.peak_rows.load(Relaxed), 6);
    }

    #[test]
    fn an_aborted_run_sends_no_end() {
        let (tx, rx) = channel(8, "train");
        let mut inner = Recorder::default();
        {
            let mut sink = FeedingSink::new(&mut inner, tx, vec![FeedShard::Live { shard: 0 }]);
            sink.write(0, &rows(2), &[]).unwrap();
            sink.abort();
        }
        assert_eq!(drain(&rx), ["rows 0:2"]);
    }
}
