//! A slow last stage must hold the reader back: rows in flight stay bounded by the
//! queue depths, not by the corpus. The runtime is driven through its source trait by
//! an in-memory source, so no Parquet file is involved.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{LargeBinaryArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use trustflow_engine::runtime::{
    self, BatchSource, CancelToken, RunSnapshot, ShardCounts, ShardReader, Sink, StageSlot,
    Topology,
};
use trustflow_engine::stages::{Stage, StageOutput};

/// Shards held in memory, each as the batches "storage" hands out (of any size).
struct MemorySource {
    shards: Vec<Vec<RecordBatch>>,
    batch_size: usize,
}

struct MemoryReader(std::vec::IntoIter<RecordBatch>);

impl ShardReader for MemoryReader {
    fn next_rows(&mut self) -> Option<trustflow_engine::Result<RecordBatch>> {
        self.0.next().map(Ok)
    }
    fn convert(
        &mut self,
        rows: &RecordBatch,
        _first_row: u64,
    ) -> trustflow_engine::Result<(RecordBatch, Option<RecordBatch>)> {
        // A compact copy, as a real conversion makes: a slice would keep the whole
        // stored batch's buffers alive and counted.
        let all = arrow::array::UInt32Array::from_iter_values(0..rows.num_rows() as u32);
        let copy = arrow::compute::take_record_batch(rows, &all)
            .map_err(|e| trustflow_engine::Error::Internal(e.to_string()))?;
        Ok((copy, None))
    }
}

impl BatchSource for MemorySource {
    fn batch_size(&self) -> usize {
        self.batch_size
    }
    fn shard_label(&self, index: usize) -> String {
        format!("memory shard {index}")
    }
    fn open_shard(&self, index: usize) -> trustflow_engine::Result<Box<dyn ShardReader + '_>> {
        Ok(Box::new(MemoryReader(
            self.shards[index].clone().into_iter(),
        )))
    }
}

/// `shards` shards of `rows` rows each, in stored batches of 50 rows with a 4 KiB
/// "image" per row.
fn memory_source(shards: usize, rows: usize, batch_size: usize) -> (MemorySource, u64) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("image", DataType::LargeBinary, true),
    ]));
    let mut total_bytes = 0;
    let shards = (0..shards)
        .map(|s| {
            (0..rows)
                .step_by(50)
                .map(|start| {
                    let n = 50.min(rows - start);
                    let ids = StringArray::from_iter_values(
                        (start..start + n).map(|r| format!("{s}:{r}")),
                    );
                    let images =
                        LargeBinaryArray::from_iter_values((0..n).map(|_| vec![7u8; 4096]));
                    total_bytes += 4096 * n as u64;
                    RecordBatch::try_new(schema.clone(), vec![Arc::new(ids), Arc::new(images)])
                        .unwrap()
                })
                .collect()
        })
        .collect();
    (MemorySource { shards, batch_size }, total_bytes)
}

struct SlowStage;

impl Stage for SlowStage {
    fn name(&self) -> &str {
        "slow"
    }
    fn output_fields(&self, _input: &Schema) -> trustflow_engine::Result<Vec<Field>> {
        Ok(Vec::new())
    }
    fn process(&self, _batch: &RecordBatch) -> trustflow_engine::Result<StageOutput> {
        std::thread::sleep(Duration::from_millis(15));
        Ok(StageOutput {
            columns: Vec::new(),
            rejected: Vec::new(),
        })
    }
}

#[derive(Default)]
struct CountingSink {
    rows: Arc<AtomicU64>,
}

impl Sink for CountingSink {
    fn write(
        &mut self,
        _: usize,
        batch: &RecordBatch,
        q: &[RecordBatch],
    ) -> trustflow_engine::Result<()> {
        let quarantined: usize = q.iter().map(|b| b.num_rows()).sum();
        self.rows
            .fetch_add((batch.num_rows() + quarantined) as u64, Relaxed);
        Ok(())
    }
    fn finish_shard(
        &mut self,
        _: usize,
        _: ShardCounts,
        _: &trustflow_engine::runtime::ShardEnding,
    ) -> trustflow_engine::Result<()> {
        Ok(())
    }
    fn discard_shard(&mut self, _: usize) {}
    fn abort(&mut self) {}
}

#[test]
fn a_slow_stage_holds_the_reader_back() {
    let batch_size = 8u64;
    let (source, total) = memory_source(2, 200, batch_size as usize);
    let topology = Topology {
        source: Box::new(source),
        shards: vec![0, 1],
        stages: vec![StageSlot {
            stage: Arc::new(SlowStage),
            workers: 1,
            queue_depth: 1,
        }],
        queue_depth: 1,
        min_tail_rows: 0,
        feed: None,
    };
    let mut sink = CountingSink::default();
    let written = sink.rows.clone();
    // The largest gap, at any sample, between rows the reader produced and rows the
    // sink has taken.
    let widest_gap = Mutex::new(0u64);
    let on_progress = |s: &RunSnapshot| {
        let read = s.steps.first().map_or(0, |x| x.rows_in);
        let gap = read.saturating_sub(written.load(Relaxed));
        let mut w = widest_gap.lock().unwrap();
        *w = (*w).max(gap);
    };
    let stats = runtime::run(
        topology,
        &mut sink,
        CancelToken::new(),
        Duration::from_millis(20),
        Some(&on_progress),
    )
    .unwrap();

    // Reader holding one batch, queue 1, the slow worker, queue 2, the sink: 5 batches.
    let bound = 5 * batch_size;
    let snap = &stats.snapshot;
    assert_eq!(snap.steps[0].rows_in, 400);
    assert_eq!(written.load(Relaxed), 400);
    assert!(
        snap.peak_rows_in_flight <= bound,
        "peak {} rows in flight, bound {bound}",
        snap.peak_rows_in_flight
    );
    assert!(
        snap.peak_rows_in_flight >= 2 * batch_size,
        "queues never filled: test is void"
    );
    let gap = *widest_gap.lock().unwrap();
    assert!(gap <= bound, "reader ran {gap} rows ahead of the sink");

    // The reader spent most of its time blocked on the full queue, the slow stage
    // was the one busy.
    let source = &snap.steps[0];
    let slow = &snap.steps[1];
    assert!(
        source.blocked_fraction > 0.6,
        "source blocked only {:.2}",
        source.blocked_fraction
    );
    assert!(
        slow.busy_fraction > 0.8,
        "slow stage busy only {:.2}",
        slow.busy_fraction
    );
    assert_eq!(snap.bottleneck.as_deref(), Some("slow"));
    // Queue fill is a share of capacity: a blocked producer is not counted in it.
    for step in &snap.steps {
        assert!(
            step.queue_fill_max <= 1.0,
            "{}: fill {}",
            step.name,
            step.queue_fill_max
        );
    }
    assert!(
        slow.queue_fill_mean > 0.5,
        "the slow stage's input queue should sit full"
    );

    // Bytes in flight are a small share of the corpus (the reader never buffered it).
    assert!(
        snap.peak_bytes_in_flight < total / 4,
        "peak {} bytes in flight of a {total}-byte corpus",
        snap.peak_bytes_in_flight
    );
}
