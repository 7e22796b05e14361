//! The HTTP client under the S3 stores: object_store's reqwest client with its I/O on
//! the storage runtime (so any caller's runtime may drive a request), counting what
//! goes over the wire for the run report.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService,
    SpawnedReqwestConnector,
};
use serde::{Deserialize, Serialize};

/// Requests to the object store during a run, as the report shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StorageStats {
    /// Every HTTP request sent, retries included.
    pub requests: u64,
    /// Listings (GETs of a bucket with `list-type`).
    pub lists: u64,
    /// GETs of objects, and those of them that asked for a byte range (footers, row
    /// groups).
    pub gets: u64,
    pub ranged_gets: u64,
    /// PUTs and POSTs (objects, multipart parts, completions).
    pub writes: u64,
    /// Requests that failed in a way object_store retries (throttling, 5xx, a broken
    /// connection): each was followed by a retry unless the retry budget was spent.
    pub retried_failures: u64,
    /// Seconds spent waiting for answers, summed over requests (concurrent requests
    /// each count: compare with the run's wall time to see how much was overlapped).
    #[serde(default)]
    pub request_s: f64,
    /// Seconds the reader waited for a shard's bytes (what read-ahead did not hide).
    #[serde(default)]
    pub reader_wait_s: f64,
    /// Seconds the sink waited for uploads: for a free upload slot, and for the last
    /// uploads at the end of the run (what background uploads did not hide).
    #[serde(default)]
    pub sink_wait_s: f64,
    /// Most bytes of shards fetched ahead and not yet dropped by the reader at once
    /// (part of the run's memory, beside `peak_bytes_in_flight`).
    #[serde(default)]
    pub read_ahead_peak_bytes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests: AtomicU64,
    lists: AtomicU64,
    gets: AtomicU64,
    ranged_gets: AtomicU64,
    writes: AtomicU64,
    retried_failures: AtomicU64,
    request_ns: AtomicU64,
    pub(crate) reader_wait_ns: AtomicU64,
    pub(crate) sink_wait_ns: AtomicU64,
    pub(crate) read_ahead_peak: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> StorageStats {
        StorageStats {
            requests: self.requests.load(Relaxed),
            lists: self.lists.load(Relaxed),
            gets: self.gets.load(Relaxed),
            ranged_gets: self.ranged_gets.load(Relaxed),
            writes: self.writes.load(Relaxed),
            retried_failures: self.retried_failures.load(Relaxed),
            request_s: self.request_ns.load(Relaxed) as f64 * 1e-9,
            reader_wait_s: self.reader_wait_ns.load(Relaxed) as f64 * 1e-9,
            sink_wait_s: self.sink_wait_ns.load(Relaxed) as f64 * 1e-9,
            read_ahead_peak_bytes: self.read_ahead_peak.load(Relaxed),
        }
    }
}

#[derive(Debug)]
pub(crate) struct CountingConnector {
    inner: SpawnedReqwestConnector,
    counters: Arc<Counters>,
}

impl CountingConnector {
    pub(crate) fn new(runtime: tokio::runtime::Handle, counters: Arc<Counters>) -> Self {
        Self {
            inner: SpawnedReqwestConnector::new(runtime),
            counters,
        }
    }
}

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(CountingService {
            inner: self.inner.connect(options)?,
            counters: self.counters.clone(),
        }))
    }
}

#[derive(Debug)]
struct CountingService {
    inner: HttpClient,
    counters: Arc<Counters>,
}

#[async_trait::async_trait]
impl HttpService for CountingService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let c = &self.counters;
        c.requests.fetch_add(1, Relaxed);
        match *req.method() {
            http::Method::GET if req.uri().query().is_some_and(|q| q.contains("list-type")) => {
                c.lists.fetch_add(1, Relaxed);
            }
            http::Method::GET => {
                c.gets.fetch_add(1, Relaxed);
                if req.headers().contains_key(http::header::RANGE) {
                    c.ranged_gets.fetch_add(1, Relaxed);
                }
            }
            http::Method::PUT | http::Method::POST => {
                c.writes.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        let started = std::time::Instant::now();
        let response = self.inner.execute(req).await;
        c.request_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
        let retryable = match &response {
            Ok(r) => r.status().is_server_error() || r.status().as_u16() == 429,
            Err(_) => true,
        };
        if retryable {
            c.retried_failures.fetch_add(1, Relaxed);
        }
        response
    }
}
