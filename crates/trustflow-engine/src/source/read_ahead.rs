//! Fetching the next `s3://` shards while the current one is processed.
//!
//! A store answers each request in 10-50 ms; a reader that asks for a shard's row
//! groups only when it reaches them pays that latency in series, shard after shard.
//! Instead each remote shard is fetched whole (one GET, guarded by the ETag seen at
//! planning) ahead of the reader, a few at once, within a byte budget: the reader finds
//! the bytes waiting and reads them from memory. The budget's permits travel with the
//! bytes and are released when the reader drops the shard, so what is held ahead is
//! bounded by `storage.read_ahead_bytes` (plus the shard being read).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::{GetOptions, ObjectStore};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::error::{Error, Result};
use crate::storage::{ObjectUri, Storage};

/// A shard's bytes, and its share of the read-ahead budget (released on drop).
pub struct Fetched {
    pub bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
    held: Option<Arc<AtomicU64>>,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            held.fetch_sub(self.bytes.len() as u64, Relaxed);
        }
    }
}

/// One shard to fetch: its index in the plan, where it is, its planned size and ETag.
pub struct Wanted {
    pub index: usize,
    pub uri: ObjectUri,
    pub size: u64,
    pub etag: Option<String>,
}

/// The read-ahead of one run (none until [`ReadAhead::start`]). A copy of a plan starts
/// with none: the fetches belong to the run that started them.
#[derive(Default)]
pub struct ReadAhead(Mutex<Option<Fetcher>>);

struct Fetcher {
    pending: HashMap<usize, oneshot::Receiver<Result<Fetched>>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        // Cancel by dropping: the driver's fetches in flight stop with it.
        self.driver.abort();
    }
}

impl Clone for ReadAhead {
    fn clone(&self) -> Self {
        ReadAhead::default()
    }
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadAhead")
    }
}

/// Budget units are KiB, so a semaphore's u32 permits cover 4 TiB.
fn units(bytes: u64) -> u32 {
    bytes.div_ceil(1024).clamp(1, u64::from(u32::MAX)) as u32
}

impl ReadAhead {
    /// Start fetching `wanted`, in order, on the storage runtime.
    pub fn start(&self, storage: Arc<Storage>, wanted: Vec<Wanted>) -> Result<()> {
        let mut pending = HashMap::new();
        let mut jobs = Vec::new();
        for w in wanted {
            let (tx, rx) = oneshot::channel();
            pending.insert(w.index, rx);
            jobs.push((w, tx));
        }
        let spec = storage.spec().clone();
        let budget_units = units(spec.read_ahead_bytes.max(1));
        let budget = Arc::new(Semaphore::new(budget_units as usize));
        let slots = Arc::new(Semaphore::new(spec.read_ahead_shards.max(1)));
        let held = storage.read_ahead_gauge();
        let runtime = storage.clone();
        let driver = runtime.spawn(async move {
            let mut fetches = tokio::task::JoinSet::new();
            for (w, tx) in jobs {
                // In order: wait for budget (the reader dropping earlier shards), then
                // for a fetch slot.
                let Ok(permit) = budget
                    .clone()
                    .acquire_many_owned(units(w.size).min(budget_units))
                    .await
                else {
                    return;
                };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (storage, held) = (storage.clone(), held.clone());
                fetches.spawn(async move {
                    let fetched = fetch(&storage, &w.uri, w.etag).await.map(|bytes| {
                        let now = held.fetch_add(bytes.len() as u64, Relaxed) + bytes.len() as u64;
                        storage.note_read_ahead_peak(now);
                        Fetched {
                            bytes,
                            _budget: Some(permit),
                            held: Some(held),
                        }
                    });
                    drop(slot);
                    let _ = tx.send(fetched);
                });
                while fetches.try_join_next().is_some() {}
            }
            while fetches.join_next().await.is_some() {}
        })?;
        let mut slot = self
            .0
            .lock()
            .map_err(|_| Error::Internal("read-ahead lock poisoned".into()))?;
        *slot = Some(Fetcher { pending, driver });
        Ok(())
    }

    /// The fetch of shard `index`, if one was started for it.
    pub fn take(&self, index: usize) -> Option<oneshot::Receiver<Result<Fetched>>> {
        self.0.lock().ok()?.as_mut()?.pending.remove(&index)
    }
}

impl Fetched {
    /// Bytes read some other way (counted in no budget).
    pub fn unbudgeted(bytes: Bytes) -> Self {
        Fetched {
            bytes,
            _budget: None,
            held: None,
        }
    }
}

/// Fetch `uri` whole, outside any read-ahead (its bytes count against no budget).
pub async fn fetch_now(
    storage: &Storage,
    uri: &ObjectUri,
    etag: Option<String>,
) -> Result<Fetched> {
    Ok(Fetched::unbudgeted(fetch(storage, uri, etag).await?))
}

/// One GET of the whole object, refused by the store if it changed since planning
/// (`If-Match` the planned ETag).
async fn fetch(storage: &Storage, uri: &ObjectUri, etag: Option<String>) -> Result<Bytes> {
    let store = storage.store(uri)?;
    let path = uri.object_path()?;
    let options = GetOptions {
        if_match: etag,
        ..GetOptions::default()
    };
    let got = store.get_opts(&path, options).await.map_err(|e| match e {
        object_store::Error::Precondition { .. } => Error::input(
            uri.to_path(),
            "the object changed since the run was planned; rerun to plan it again",
        ),
        object_store::Error::NotFound { .. } => Error::input(
            uri.to_path(),
            "the object no longer exists (it was there when the run was planned); restore \
             it or rerun to plan without it",
        ),
        e => storage.error(uri, "cannot read", e),
    })?;
    got.bytes()
        .await
        .map_err(|e| storage.error(uri, "cannot read", e))
}
