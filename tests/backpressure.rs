//! A slow last stage must hold the reader back: rows in flight stay bounded by the
//! queue depths, not by the corpus.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use trustflow::plan::{self, Overrides};
use trustflow::runtime::{self, CancelToken, RunSnapshot, ShardCounts, Sink, StageSlot, Topology};
use trustflow::source::ShardPlan;
use trustflow::stages::{Stage, StageOutput};

struct SlowStage;

impl Stage for SlowStage {
    fn name(&self) -> &str {
        "slow"
    }
    fn output_fields(&self, _input: &Schema) -> trustflow::Result<Vec<Field>> {
        Ok(Vec::new())
    }
    fn process(&self, _batch: &RecordBatch) -> trustflow::Result<StageOutput> {
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
        _: &ShardPlan,
        batch: &RecordBatch,
        q: &[RecordBatch],
    ) -> trustflow::Result<()> {
        let quarantined: usize = q.iter().map(|b| b.num_rows()).sum();
        self.rows
            .fetch_add((batch.num_rows() + quarantined) as u64, Relaxed);
        Ok(())
    }
    fn finish_shard(&mut self, _: &ShardPlan, _: ShardCounts) -> trustflow::Result<()> {
        Ok(())
    }
    fn abort(&mut self) {}
}

fn corpus_bytes(dir: &Path) -> u64 {
    common::shard_files(dir)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn a_slow_stage_holds_the_reader_back() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    common::corpus(&corpus_dir, 400, 2, 6, 128);
    let batch_size = 8u64;
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\nsink:\n  path: \"{}\"\nruntime:\n  batch_size: {batch_size}\n  queue_depth: 1\n",
        corpus_dir.display(),
        dir.path().join("unused").display()
    );
    let pipeline = trustflow::spec::parse_str(&yaml, Path::new("bp.yaml")).unwrap();
    let plan = plan::build(pipeline, &Overrides::default()).unwrap();
    let shards: Vec<usize> = (0..plan.source.shards.len()).collect();
    let topology = Topology {
        source: plan.source,
        shards,
        stages: vec![StageSlot {
            stage: Arc::new(SlowStage),
            workers: 1,
            queue_depth: 1,
        }],
        queue_depth: 1,
    };
    let sink = CountingSink::default();
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
        Box::new(sink),
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
    let total = corpus_bytes(&corpus_dir);
    assert!(
        snap.peak_bytes_in_flight < total / 4,
        "peak {} bytes in flight of a {total}-byte corpus",
        snap.peak_bytes_in_flight
    );
}
