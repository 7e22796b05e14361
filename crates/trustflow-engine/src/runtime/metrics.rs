//! Per-step counters, shared by a step's workers and read by the monitor. Everything is
//! an atomic so the hot path never takes a lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Counters of one step (the source, a stage, or the sink).
#[derive(Debug, Default)]
pub struct StepMetrics {
    pub name: String,
    pub workers: usize,
    pub rows_in: AtomicU64,
    pub rows_out: AtomicU64,
    pub rows_quarantined: AtomicU64,
    pub batches: AtomicU64,
    /// Time spent doing the step's own work, summed over workers.
    pub busy_ns: AtomicU64,
    /// Time spent waiting for room in a full output queue (backpressure).
    pub blocked_ns: AtomicU64,
    /// Time spent waiting on an empty input queue.
    pub starved_ns: AtomicU64,
}

impl StepMetrics {
    pub fn new(name: impl Into<String>, workers: usize) -> Self {
        StepMetrics {
            name: name.into(),
            workers,
            ..Default::default()
        }
    }

    /// One batch through this step: `rows_in` rows came, `rows_out` went on and
    /// `quarantined` were set aside.
    pub fn count_batch(&self, rows_in: u64, rows_out: u64, quarantined: u64) {
        self.rows_in.fetch_add(rows_in, Relaxed);
        self.rows_out.fetch_add(rows_out, Relaxed);
        self.rows_quarantined.fetch_add(quarantined, Relaxed);
        self.batches.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, d: Duration) {
        counter.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    /// Time `f`, adding it to `counter`.
    pub fn timed<T>(counter: &AtomicU64, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        Self::add(counter, t0.elapsed());
        out
    }

    pub fn snapshot(&self, wall: Duration) -> StepReport {
        let secs = wall.as_secs_f64().max(1e-9);
        let capacity = secs * self.workers.max(1) as f64;
        let f = |c: &AtomicU64| c.load(Relaxed) as f64 / 1e9 / capacity;
        let rows_out = self.rows_out.load(Relaxed);
        StepReport {
            name: self.name.clone(),
            workers: self.workers,
            rows_in: self.rows_in.load(Relaxed),
            rows_out,
            rows_quarantined: self.rows_quarantined.load(Relaxed),
            batches: self.batches.load(Relaxed),
            rows_per_s: rows_out as f64 / secs,
            busy_s: self.busy_ns.load(Relaxed) as f64 / 1e9,
            busy_fraction: f(&self.busy_ns),
            blocked_fraction: f(&self.blocked_ns),
            starved_fraction: f(&self.starved_ns),
            queue_fill_mean: 0.0,
            queue_fill_max: 0.0,
        }
    }
}

/// A step's figures at one moment (and in the final report).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    pub name: String,
    pub workers: usize,
    pub rows_in: u64,
    pub rows_out: u64,
    pub rows_quarantined: u64,
    pub batches: u64,
    pub rows_per_s: f64,
    pub busy_s: f64,
    /// Fractions of wall time x workers.
    pub busy_fraction: f64,
    pub blocked_fraction: f64,
    pub starved_fraction: f64,
    /// Fill of the step's input queue (0..1), sampled by the monitor; 0 for the source.
    pub queue_fill_mean: f64,
    pub queue_fill_max: f64,
}

/// Rows and bytes between the reader and the sink, with their peaks: the quantity that
/// backpressure bounds.
#[derive(Debug, Default)]
pub struct InFlight {
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
    pub peak_rows: AtomicU64,
    pub peak_bytes: AtomicU64,
}

impl InFlight {
    pub fn enter(&self, rows: u64, bytes: u64) {
        let r = self.rows.fetch_add(rows, Relaxed) + rows;
        let b = self.bytes.fetch_add(bytes, Relaxed) + bytes;
        self.peak_rows.fetch_max(r, Relaxed);
        self.peak_bytes.fetch_max(b, Relaxed);
    }

    pub fn leave(&self, rows: u64, bytes: u64) {
        self.rows.fetch_sub(rows, Relaxed);
        self.bytes.fetch_sub(bytes, Relaxed);
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Current resident set size (Linux `VmRSS`), in bytes.
pub fn rss_bytes() -> Option<u64> {
    proc_status_kb("VmRSS:").map(|kb| kb * 1024)
}

fn proc_status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Process CPU time (user + system), for utilisation figures.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may contain spaces, closed by ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
