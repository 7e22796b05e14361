//! Where shards live: local paths, or S3-compatible object stores named by
//! `s3://bucket/key` URIs. A remote location travels through the engine as a `PathBuf`
//! holding the URI (so names, stems and messages work unchanged); the places that do
//! I/O ask [`is_remote`] and go through a [`Storage`].
//!
//! Credentials come the AWS way (environment variables, or a profile of the shared
//! credentials file); the pipeline's `storage:` block holds only where and how to
//! connect, never a secret, and every error message is scrubbed of the secrets in use.

mod credentials;
mod http;
mod list;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::client::HttpConnector;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use credentials::Credentials;
pub use http::StorageStats;
pub use list::Listed;

/// The URI scheme of S3-compatible object stores.
pub const S3_SCHEME: &str = "s3://";

/// Whether `path` names an object in a store rather than a local file.
pub fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.starts_with(S3_SCHEME))
}

/// `s3://bucket/key`, split.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectUri {
    pub bucket: String,
    /// The key, without a leading or trailing `/` (empty: the whole bucket).
    pub key: String,
}

impl ObjectUri {
    pub fn parse(uri: &str) -> Result<Self> {
        let rest = uri.strip_prefix(S3_SCHEME).ok_or_else(|| {
            Error::Invalid(format!("`{uri}` is not an s3:// URI (s3://bucket/key)"))
        })?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::Invalid(format!(
                "`{uri}` names no bucket; expected s3://bucket/key"
            )));
        }
        Ok(ObjectUri {
            bucket: bucket.to_string(),
            key: key.trim_matches('/').to_string(),
        })
    }

    pub fn of_path(path: &Path) -> Result<Self> {
        Self::parse(&path.to_string_lossy())
    }

    /// The key as object_store's path, byte for byte: a key is taken as the store
    /// lists it (spaces, non-ASCII, `+`, `=`, `%`, `#`, `?` included), never
    /// percent-encoded a second time. object_store cannot address keys with an empty
    /// segment (`a//b`) or a `.`/`..` segment: those are an error naming the key.
    pub fn object_path(&self) -> Result<ObjectPath> {
        ObjectPath::parse(&self.key).map_err(|e| {
            Error::input(
                self.to_path(),
                format!(
                    "this key cannot be addressed ({e}); keys with an empty segment (`//`) \
                     or a `.` or `..` segment are not supported: copy the object to a key \
                     without them"
                ),
            )
        })
    }

    /// The key prefix of the objects under this URI taken as a folder: `key/`, or empty
    /// for the whole bucket (a listing of `a` must not return `ab`).
    pub fn folder_key(&self) -> String {
        match self.key.is_empty() {
            true => String::new(),
            false => format!("{}/", self.key),
        }
    }

    /// `self/name`.
    pub fn join(&self, name: &str) -> ObjectUri {
        let key = match self.key.is_empty() {
            true => name.trim_matches('/').to_string(),
            false => format!("{}/{}", self.key, name.trim_matches('/')),
        };
        ObjectUri {
            bucket: self.bucket.clone(),
            key,
        }
    }

    /// The URI as a path value, the way the engine carries locations.
    pub fn to_path(&self) -> PathBuf {
        PathBuf::from(self.to_string())
    }

    /// The prefix holding this key (the bucket itself for a top-level key).
    pub fn parent(&self) -> ObjectUri {
        ObjectUri {
            bucket: self.bucket.clone(),
            key: self
                .key
                .rsplit_once('/')
                .map_or(String::new(), |(folder, _)| folder.to_string()),
        }
    }

    /// The last component of the key.
    pub fn name(&self) -> &str {
        self.key.rsplit('/').next().unwrap_or("")
    }
}

impl std::fmt::Display for ObjectUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.key.is_empty() {
            true => write!(f, "{S3_SCHEME}{}", self.bucket),
            false => write!(f, "{S3_SCHEME}{}/{}", self.bucket, self.key),
        }
    }
}

/// The pipeline's `storage:` block: how to reach S3-compatible stores. Credentials are
/// not set here (they would end up in files people share): they come from
/// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), or from the
/// profile `AWS_PROFILE` names in the shared credentials file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StorageSpec {
    /// Endpoint URL of an S3-compatible store (MinIO, R2, Ceph, a local server).
    /// Default: `$AWS_ENDPOINT_URL`, else the profile's `endpoint_url`, else AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region. Default: `$AWS_REGION`, `$AWS_DEFAULT_REGION`, the profile's, else
    /// `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// Address buckets by path (`endpoint/bucket/key`) rather than by host name
    /// (`bucket.endpoint/key`). Default: path style when an endpoint is set (what
    /// most S3-compatible stores expect), host style on AWS.
    #[serde(default)]
    pub path_style: Option<bool>,
    /// Allow plain `http://` endpoints. Default: only when the endpoint is
    /// `http://127.0.0.1`, `http://localhost` or `http://[::1]`.
    #[serde(default)]
    pub allow_http: Option<bool>,
    /// Requests without credentials, for public buckets.
    #[serde(default)]
    pub anonymous: bool,
    /// The store enforces conditional writes (`If-None-Match: *`), as AWS S3, MinIO
    /// and R2 do: the output-folder lock is then an object created only if absent.
    /// Without it no lock is taken on a store; correctness never depends on it.
    #[serde(default)]
    pub conditional_writes: bool,
    /// Retries of a failed request (throttling, 5xx, broken connections), with
    /// exponential backoff.
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// Give up retrying a request after this many seconds.
    #[serde(default = "default_retry_timeout_s")]
    pub retry_timeout_s: u64,
    /// Outputs up to this size go up in one PUT; larger ones in parts of this size
    /// (a multipart upload, visible only once completed). At least 5 MiB.
    #[serde(default = "default_part_bytes")]
    pub part_bytes: usize,
    /// Shard footers read at once while planning (one ranged GET each): at 25 ms a
    /// request, 10,000 shards take about 10,000 / 32 x 25 ms = 8 s instead of 4 min.
    #[serde(default = "default_footer_reads_in_flight")]
    pub footer_reads_in_flight: usize,
    /// Bytes of upcoming `s3://` shards fetched while the current one is processed.
    /// Each shard is fetched whole into memory (one GET) and read from there; what is
    /// fetched ahead is counted in the run's memory bound. A shard larger than this is
    /// fetched on its own when its turn comes.
    #[serde(default = "default_read_ahead_bytes")]
    pub read_ahead_bytes: u64,
    /// Shards fetched at once ahead of the reader (within `read_ahead_bytes`).
    #[serde(default = "default_read_ahead_shards")]
    pub read_ahead_shards: usize,
    /// Finished shards uploading at once while the next ones are processed (their
    /// staged files wait on local disk until uploaded); a full set of uploads makes
    /// the sink wait, which slows the reader (backpressure).
    #[serde(default = "default_uploads_in_flight")]
    pub uploads_in_flight: usize,
    /// Bytes of staged files uploading at once (a bound on the staging disk, whatever
    /// the shards' size); one shard larger than this uploads on its own.
    #[serde(default = "default_upload_bytes_in_flight")]
    pub upload_bytes_in_flight: u64,
    /// A writer's lease on the output prefix (refreshed every sixth of this) is taken
    /// over by another writer once it has not been refreshed for this many seconds: how
    /// long a writer that died on another machine blocks the prefix.
    #[serde(default = "default_lease_expiry_s")]
    pub lease_expiry_s: u64,
}

fn default_max_retries() -> usize {
    10
}
fn default_retry_timeout_s() -> u64 {
    180
}
fn default_part_bytes() -> usize {
    16 << 20
}
fn default_footer_reads_in_flight() -> usize {
    32
}
fn default_read_ahead_bytes() -> u64 {
    256 << 20
}
fn default_read_ahead_shards() -> usize {
    16
}
fn default_uploads_in_flight() -> usize {
    16
}
fn default_upload_bytes_in_flight() -> u64 {
    1 << 30
}
fn default_lease_expiry_s() -> u64 {
    90
}

/// S3's smallest part but the last.
pub const MIN_PART_BYTES: usize = 5 << 20;

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            endpoint: None,
            region: None,
            path_style: None,
            allow_http: None,
            anonymous: false,
            conditional_writes: false,
            max_retries: default_max_retries(),
            retry_timeout_s: default_retry_timeout_s(),
            part_bytes: default_part_bytes(),
            footer_reads_in_flight: default_footer_reads_in_flight(),
            read_ahead_bytes: default_read_ahead_bytes(),
            read_ahead_shards: default_read_ahead_shards(),
            uploads_in_flight: default_uploads_in_flight(),
            upload_bytes_in_flight: default_upload_bytes_in_flight(),
            lease_expiry_s: default_lease_expiry_s(),
        }
    }
}

/// The runtime every store's HTTP I/O runs on. One per process and never dropped:
/// requests are started from the reader's own runtimes and from plain threads alike,
/// and a pooled connection must outlive whichever runtime first opened it.
fn io_runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("trustflow-storage")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Environment(format!("cannot start the storage runtime: {e}")))
}

/// The object stores of one run, by bucket, built on first use from the `storage:`
/// block and the environment, and what went over the wire.
#[derive(Debug, Default)]
pub struct Storage {
    spec: StorageSpec,
    buckets: Mutex<HashMap<String, Arc<Bucket>>>,
    counters: Arc<http::Counters>,
    /// Secret values in use, scrubbed from every message.
    secrets: Mutex<Vec<String>>,
    /// Bytes fetched ahead and not yet dropped by the reader.
    read_ahead_held: Arc<std::sync::atomic::AtomicU64>,
}

/// One bucket's store, and what its listings need.
#[derive(Debug)]
struct Bucket {
    store: Arc<AmazonS3>,
    lister: list::BucketLister,
}

/// Who waited on the store (see [`StorageStats`]).
#[derive(Debug, Clone, Copy)]
pub enum Waiter {
    Reader,
    Sink,
}

impl Storage {
    pub fn new(spec: StorageSpec) -> Arc<Self> {
        Arc::new(Storage {
            spec,
            ..Storage::default()
        })
    }

    pub fn spec(&self) -> &StorageSpec {
        &self.spec
    }

    pub fn stats(&self) -> StorageStats {
        self.counters.snapshot()
    }

    /// Start `future` on the storage runtime (work that goes on while the caller does
    /// other things: read-ahead, uploads).
    pub fn spawn<F>(&self, future: F) -> Result<tokio::task::JoinHandle<F::Output>>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        Ok(io_runtime()?.spawn(future))
    }

    pub(crate) fn read_ahead_gauge(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.read_ahead_held.clone()
    }

    pub(crate) fn note_read_ahead_peak(&self, held: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.counters.read_ahead_peak.fetch_max(held, Relaxed);
    }

    /// Count `waited` as time `who` spent waiting on the store.
    pub fn note_wait(&self, who: Waiter, waited: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let counter = match who {
            Waiter::Reader => &self.counters.reader_wait_ns,
            Waiter::Sink => &self.counters.sink_wait_ns,
        };
        counter.fetch_add(waited.as_nanos() as u64, Relaxed);
    }

    /// Run `future` to completion on the storage runtime, from a thread that is not
    /// inside a runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> Result<F::Output> {
        Ok(io_runtime()?.block_on(future))
    }

    /// The store of `uri`'s bucket.
    pub fn store(&self, uri: &ObjectUri) -> Result<Arc<AmazonS3>> {
        Ok(self.bucket(uri)?.store.clone())
    }

    fn bucket(&self, uri: &ObjectUri) -> Result<Arc<Bucket>> {
        let mut buckets = self
            .buckets
            .lock()
            .map_err(|_| Error::Internal("storage lock poisoned".into()))?;
        if let Some(bucket) = buckets.get(&uri.bucket) {
            return Ok(bucket.clone());
        }
        let bucket = Arc::new(self.build(uri)?);
        buckets.insert(uri.bucket.clone(), bucket.clone());
        Ok(bucket)
    }

    fn build(&self, uri: &ObjectUri) -> Result<Bucket> {
        let spec = &self.spec;
        let found =
            credentials::resolve(spec).map_err(|m| Error::input(uri.to_path(), self.scrub(&m)))?;
        let endpoint = spec.endpoint.clone().or(found.endpoint.clone());
        let region = spec
            .region
            .clone()
            .or(found.region.clone())
            .unwrap_or_else(|| "us-east-1".into());
        let connector =
            http::CountingConnector::new(io_runtime()?.handle().clone(), self.counters.clone());
        let client_options = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(300));
        let mut virtual_hosted = false;
        let mut allow_http = false;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&uri.bucket)
            .with_region(&region)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(15),
                    base: 2.0,
                },
                max_retries: spec.max_retries,
                retry_timeout: Duration::from_secs(spec.retry_timeout_s),
            })
            .with_client_options(client_options.clone());
        if let Some(endpoint) = &endpoint {
            let local_http = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                .iter()
                .any(|p| endpoint.starts_with(p));
            virtual_hosted = !spec.path_style.unwrap_or(true);
            allow_http = spec.allow_http.unwrap_or(local_http);
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(virtual_hosted)
                .with_allow_http(allow_http);
        } else if let Some(path_style) = spec.path_style {
            virtual_hosted = !path_style;
            builder = builder.with_virtual_hosted_style_request(virtual_hosted);
        }
        if spec.conditional_writes {
            builder = builder.with_conditional_put(S3ConditionalPut::ETagMatch);
        }
        let signed = found.credentials.is_some();
        match found.credentials {
            Some(c) => {
                if let Ok(mut secrets) = self.secrets.lock() {
                    secrets.push(c.secret_access_key.clone());
                    secrets.extend(c.session_token.clone());
                }
                builder = builder
                    .with_access_key_id(c.access_key_id)
                    .with_secret_access_key(c.secret_access_key);
                if let Some(token) = c.session_token {
                    builder = builder.with_token(token);
                }
            }
            None => builder = builder.with_skip_signature(true),
        }
        let built =
            |e: object_store::Error| Error::input(uri.to_path(), self.scrub(&e.to_string()));
        let lister = list::BucketLister {
            bucket_url: list::bucket_url(endpoint.as_deref(), &uri.bucket, &region, virtual_hosted),
            region,
            signed,
            client: connector
                .connect(&client_options.with_allow_http(allow_http))
                .map_err(built)?,
            max_retries: spec.max_retries,
            retry_timeout: Duration::from_secs(spec.retry_timeout_s),
        };
        let store = builder
            .with_http_connector(connector)
            .build()
            .map_err(built)?;
        Ok(Bucket {
            store: Arc::new(store),
            lister,
        })
    }

    /// `message` with every secret in use replaced by `***`.
    pub fn scrub(&self, message: &str) -> String {
        let mut out = message.to_string();
        if let Ok(secrets) = self.secrets.lock() {
            for secret in secrets.iter().filter(|s| s.len() >= 4) {
                out = out.replace(secret.as_str(), "***");
            }
        }
        out
    }

    /// An object_store error about `uri`, as the engine's error: what failed, where,
    /// and what to check; no secret.
    pub fn error(&self, uri: &ObjectUri, what: &str, e: object_store::Error) -> Error {
        let hint = match &e {
            object_store::Error::NotFound { .. } => String::new(),
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                " (check the credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or \
                 AWS_PROFILE)"
                    .into()
            }
            _ => " (check storage.endpoint or AWS_ENDPOINT_URL, and that the bucket \
                   exists)"
                .into(),
        };
        let reason = self.scrub(&one_line(&e.to_string()));
        Error::input(uri.to_path(), format!("{what}: {reason}{hint}"))
    }

    /// Metadata of one object.
    pub async fn head(&self, uri: &ObjectUri) -> Result<ObjectMeta> {
        let store = self.store(uri)?;
        store
            .head(&uri.object_path()?)
            .await
            .map_err(|e| self.error(uri, "cannot read the object's metadata", e))
    }

    /// Every object under `prefix/` (all depths), sorted by key. Keys object_store
    /// cannot address are listed too (see [`list`]); reading one fails for that object.
    pub async fn list(&self, prefix: &ObjectUri) -> Result<Vec<Listed>> {
        let bucket = self.bucket(prefix)?;
        let mut found = bucket
            .lister
            .list(&bucket.store, &prefix.folder_key())
            .await
            .map_err(|e| self.list_error(prefix, "cannot list", e))?;
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    /// Check that `prefix`'s bucket exists and may be listed with these credentials,
    /// with one request for one key: an output the run could not write is refused at
    /// planning (by `validate` too), not after a shard's work.
    pub fn check_listable(&self, prefix: &ObjectUri) -> Result<()> {
        let bucket = self.bucket(prefix)?;
        self.block_on(bucket.lister.probe(&bucket.store, &prefix.folder_key()))?
            .map_err(|e| match e.status {
                Some(404) => Error::input(
                    prefix.to_path(),
                    format!(
                        "bucket `{}` does not exist ({}); create it first, or check \
                         storage.endpoint or AWS_ENDPOINT_URL",
                        prefix.bucket,
                        self.scrub(&one_line(&e.message))
                    ),
                ),
                _ => self.list_error(prefix, "cannot list", e),
            })
    }

    /// A failed listing as the engine's error, with what to check; no secret.
    fn list_error(&self, prefix: &ObjectUri, what: &str, e: list::ListError) -> Error {
        let hint = match e.status {
            Some(401 | 403) => {
                " (check the credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or \
                 AWS_PROFILE, and that they may list this bucket)"
            }
            _ => " (check storage.endpoint or AWS_ENDPOINT_URL, and that the bucket exists)",
        };
        let reason = self.scrub(&one_line(&e.message));
        Error::input(prefix.to_path(), format!("{what}: {reason}{hint}"))
    }

    /// Register every bucket's store on a DataFusion session, so that it reads
    /// `s3://` paths through them (ranged GETs: footers first, then row groups).
    pub fn register_on(&self, ctx: &datafusion::prelude::SessionContext) -> Result<()> {
        let buckets = self
            .buckets
            .lock()
            .map_err(|_| Error::Internal("storage lock poisoned".into()))?;
        for (bucket, entry) in buckets.iter() {
            let store = &entry.store;
            let url = url::Url::parse(&format!("{S3_SCHEME}{bucket}"))
                .map_err(|e| Error::Invalid(format!("bucket name `{bucket}`: {e}")))?;
            ctx.register_object_store(&url, store.clone() as Arc<dyn ObjectStore>);
        }
        Ok(())
    }
}

/// Object-store messages can span lines (XML bodies); a report line cannot.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_listed_as_a_folder() {
        let uri = ObjectUri::parse("s3://b/data/part").unwrap();
        assert_eq!(uri.folder_key(), "data/part/");
        assert_eq!(ObjectUri::parse("s3://b").unwrap().folder_key(), "");
        assert_eq!(ObjectUri::parse("s3://b/").unwrap().folder_key(), "");
    }
}
