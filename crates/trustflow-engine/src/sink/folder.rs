//! The output folder: a local folder, or a prefix in an object store. Both commit a
//! file the same way as far as a reader can tell: it appears whole under its final
//! name or not at all. Locally that is a rename of a finished temporary file; in a
//! store, which has no rename, it is one PUT or one multipart upload, which the store
//! makes visible only when completed. The shard's manifest is written after its
//! files, so it is the commit point on both.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::multipart::{MultipartStore, PartId};
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::columns::output_names;
use crate::error::{Error, Result};
use crate::storage::{self, ObjectUri, Storage};

/// Where a multipart upload in flight is recorded (`<prefix>/<UPLOADS>/<name>.json`),
/// so that the next run can abort it if this one dies before completing it.
const UPLOADS: &str = ".trustflow/uploads";

/// The record of a multipart upload in flight.
#[derive(Debug, Serialize, Deserialize)]
struct PendingUpload {
    key: String,
    upload_id: String,
}

/// A run's output folder.
#[derive(Debug, Clone)]
pub enum OutputFolder {
    Local(PathBuf),
    Remote {
        uri: ObjectUri,
        storage: Arc<Storage>,
        /// Local folder where files are written before they are uploaded.
        staging: PathBuf,
    },
}

impl OutputFolder {
    /// `path` as given by the pipeline or `--out`; `s3://` URIs go to `storage`.
    pub fn new(path: &Path, storage: Arc<Storage>) -> Result<Self> {
        if !storage::is_remote(path) {
            return Ok(OutputFolder::Local(path.to_path_buf()));
        }
        let uri = ObjectUri::of_path(path)?;
        // One staging folder per output prefix and process: parts of a job on one
        // machine never share temporary files.
        let tag = crate::digest::text_digest(&uri.to_string());
        let staging = std::env::temp_dir().join(format!(
            "trustflow-staging-{}-{}",
            &tag[..16],
            std::process::id()
        ));
        Ok(OutputFolder::Remote {
            uri,
            storage,
            staging,
        })
    }

    /// The folder as users name it (the URI for a store).
    pub fn path(&self) -> PathBuf {
        match self {
            OutputFolder::Local(dir) => dir.clone(),
            OutputFolder::Remote { uri, .. } => uri.to_path(),
        }
    }

    /// `name` inside the folder, for messages and reports.
    pub fn display(&self, name: &str) -> PathBuf {
        match self {
            OutputFolder::Local(dir) => dir.join(name),
            OutputFolder::Remote { uri, .. } => uri.join(name).to_path(),
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, OutputFolder::Remote { .. })
    }

    /// Create the folder (locally) or the staging folder (for a store), clearing the
    /// staging folders that dead runs of this prefix left on this machine.
    pub fn prepare(&self) -> Result<()> {
        if let OutputFolder::Remote { staging, .. } = self {
            remove_dead_staging(staging);
        }
        let dir = self.staging();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
    }

    /// Remove the staging folder once the run is over (its files were uploaded or
    /// discarded by then).
    pub fn finish(&self) {
        if let OutputFolder::Remote { staging, .. } = self {
            let _ = std::fs::remove_dir_all(staging);
        }
    }

    /// Where temporary files are written before they are committed.
    pub fn staging(&self) -> &Path {
        match self {
            OutputFolder::Local(dir) => dir,
            OutputFolder::Remote { staging, .. } => staging,
        }
    }

    fn object(&self, name: &str) -> Option<(ObjectUri, &Arc<Storage>)> {
        match self {
            OutputFolder::Local(_) => None,
            OutputFolder::Remote { uri, storage, .. } => Some((uri.join(name), storage)),
        }
    }

    /// Make the finished temporary file `tmp` visible as `name`, whole; returns its
    /// size. The temporary file is gone afterwards, whatever the outcome.
    pub fn commit_file(&self, tmp: &Path, name: &str) -> Result<u64> {
        let size = std::fs::metadata(tmp)
            .map(|m| m.len())
            .map_err(|e| Error::io(tmp, e));
        let committed = size.and_then(|size| match self.object(name) {
            None => {
                let target = self.display(name);
                std::fs::rename(tmp, &target)
                    .map(|()| size)
                    .map_err(|e| Error::io(&target, e))
            }
            Some((uri, storage)) => self.upload(storage, &uri, name, tmp, size).map(|()| size),
        });
        let _ = std::fs::remove_file(tmp);
        committed
    }

    fn upload(
        &self,
        storage: &Storage,
        uri: &ObjectUri,
        name: &str,
        file: &Path,
        size: u64,
    ) -> Result<()> {
        let part_bytes = storage.spec().part_bytes.max(storage::MIN_PART_BYTES);
        let store = storage.store(uri)?;
        let path = uri.object_path()?;
        let read_error = |e: std::io::Error| Error::io(file, e);
        let mut reader = std::fs::File::open(file).map_err(read_error)?;
        if size <= part_bytes as u64 {
            let mut data = Vec::with_capacity(size as usize);
            reader.read_to_end(&mut data).map_err(read_error)?;
            return storage.block_on(async {
                store
                    .put(&path, PutPayload::from(data))
                    .await
                    .map(|_| ())
                    .map_err(|e| storage.error(uri, "cannot upload", e))
            })?;
        }
        let id = storage
            .block_on(store.create_multipart(&path))?
            .map_err(|e| storage.error(uri, "cannot start a multipart upload", e))?;
        // Named by the output's own relative name: `a/part-0` and `b/part-0` differ.
        let marker = self.upload_marker(name);
        let record = PendingUpload {
            key: uri.key.clone(),
            upload_id: id.clone(),
        };
        let uploaded = (|| -> Result<()> {
            let record =
                serde_json::to_vec(&record).map_err(|e| Error::output(self.display(&marker), e))?;
            self.put_small(&marker, &record)?;
            let mut parts: Vec<PartId> = Vec::new();
            let mut buffer = vec![0u8; part_bytes];
            loop {
                let filled = fill(&mut reader, &mut buffer).map_err(read_error)?;
                if filled == 0 {
                    break;
                }
                let chunk = Bytes::copy_from_slice(&buffer[..filled]);
                let part = storage
                    .block_on(store.put_part(&path, &id, parts.len(), chunk.into()))?
                    .map_err(|e| storage.error(uri, "cannot upload a part", e))?;
                parts.push(part);
            }
            storage
                .block_on(store.complete_multipart(&path, &id, parts))?
                .map(|_| ())
                .map_err(|e| storage.error(uri, "cannot complete the multipart upload", e))
        })();
        if uploaded.is_err() {
            let _ = storage.block_on(store.abort_multipart(&path, &id));
        }
        self.remove(&marker);
        uploaded
    }

    fn upload_marker(&self, name: &str) -> String {
        format!("{UPLOADS}/{name}.json")
    }

    /// What resume needs to know of the folder, read once. Locally that is nothing:
    /// files are looked at when asked for. In a store, for a run over every shard of
    /// the plan (`whole`): one listing of the prefix (names and sizes), then the
    /// manifests among `stems`' that exist. For a part, so that its cost does not grow
    /// with the whole output: one listing of the upload records, a GET of each of its
    /// shards' manifests, and the sizes of the outputs of those that have one.
    /// Requests go `storage.footer_reads_in_flight` at a time either way: deciding a
    /// thousand shards costs a listing and a batch of GETs, not four requests a shard
    /// in series.
    pub fn view(&self, stems: &[&str], whole: bool) -> Result<FolderView<'_>> {
        let OutputFolder::Remote { uri, storage, .. } = self else {
            return Ok(FolderView {
                folder: self,
                known: None,
                complete: false,
                fetched: HashMap::new(),
            });
        };
        let manifest_names = stems.iter().map(|stem| crate::columns::manifest_name(stem));
        let mut known: HashMap<String, Option<u64>> = HashMap::new();
        let manifests: Vec<String> = if whole {
            known.extend(
                names_under(storage, uri, uri)?
                    .into_iter()
                    .map(|(n, b)| (n, Some(b))),
            );
            manifest_names
                .filter(|name| known.contains_key(name))
                .collect()
        } else {
            // Upload records exist only while a multipart upload is in flight: one
            // listing of their folder says which there are (usually none).
            let recorded = names_under(storage, uri, &uri.join(UPLOADS))?;
            for output in stems.iter().flat_map(|stem| output_names(stem)) {
                let marker = self.upload_marker(&output);
                let there = recorded.get(&marker).copied();
                known.insert(marker, there);
            }
            manifest_names.collect()
        };
        let fetched = storage.block_on(get_all(storage, uri, &manifests))?;
        for (name, bytes) in &fetched {
            known.insert(name.clone(), bytes.as_ref().map(|b| b.len() as u64));
        }
        if !whole {
            // A finished shard's outputs are checked against its manifest: their sizes.
            let finished: std::collections::HashSet<&String> = fetched
                .iter()
                .filter_map(|(name, bytes)| bytes.as_ref().map(|_| name))
                .collect();
            let outputs: Vec<String> = stems
                .iter()
                .filter(|stem| finished.contains(&crate::columns::manifest_name(stem)))
                .flat_map(|stem| {
                    [
                        crate::columns::output_name(stem),
                        crate::columns::quarantine_name(stem),
                    ]
                })
                .collect();
            known.extend(storage.block_on(sizes_of(storage, uri, &outputs))?);
        }
        Ok(FolderView {
            folder: self,
            known: Some(known),
            complete: whole,
            fetched: fetched
                .into_iter()
                .filter_map(|(name, bytes)| Some((name, bytes?)))
                .collect(),
        })
    }

    /// Write a small file (a manifest, the report) whole under `name`.
    pub fn put_small(&self, name: &str, bytes: &[u8]) -> Result<()> {
        match self.object(name) {
            None => write_atomically(&self.display(name), bytes),
            Some((uri, storage)) => {
                let store = storage.store(&uri)?;
                let path = uri.object_path()?;
                let payload = PutPayload::from(bytes.to_vec());
                storage.block_on(async {
                    store
                        .put(&path, payload)
                        .await
                        .map(|_| ())
                        .map_err(|e| storage.error(&uri, "cannot write", e))
                })?
            }
        }
    }

    /// Write a small file under `name` only if nothing is there yet; false when
    /// something is. In a store this is a conditional write (`If-None-Match: *`), which
    /// only stores that enforce it make safe against a racing writer.
    pub fn create_small(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        match self.object(name) {
            None => {
                use std::io::Write;
                let path = self.display(name);
                let created = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .and_then(|mut file| file.write_all(bytes));
                match created {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(Error::io(&path, e)),
                }
            }
            Some((uri, storage)) => {
                use object_store::{ObjectStore, PutMode, PutOptions};
                let store = storage.store(&uri)?;
                let put = storage.block_on(store.put_opts(
                    &uri.object_path()?,
                    PutPayload::from(bytes.to_vec()),
                    PutOptions::from(PutMode::Create),
                ))?;
                match put {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. })
                    | Err(object_store::Error::Precondition { .. }) => Ok(false),
                    Err(e) => Err(storage.error(&uri, "cannot create", e)),
                }
            }
        }
    }

    /// A small file's bytes, if it is there and readable.
    pub fn read_small(&self, name: &str) -> Option<Vec<u8>> {
        match self.object(name) {
            None => std::fs::read(self.display(name)).ok(),
            Some((uri, storage)) => {
                let store = storage.store(&uri).ok()?;
                let path = uri.object_path().ok()?;
                storage
                    .block_on(async {
                        let got = store.get(&path).await.ok()?;
                        got.bytes().await.ok()
                    })
                    .ok()
                    .flatten()
                    .map(|b| b.to_vec())
            }
        }
    }

    /// Size of `name`, if it is there.
    pub fn size_of(&self, name: &str) -> Option<u64> {
        match self.object(name) {
            None => std::fs::metadata(self.display(name)).ok().map(|m| m.len()),
            Some((uri, storage)) => storage
                .block_on(storage.head(&uri))
                .ok()?
                .ok()
                .map(|m| m.size),
        }
    }

    /// Delete `name` if it is there.
    pub fn remove(&self, name: &str) {
        match self.object(name) {
            None => {
                let _ = std::fs::remove_file(self.display(name));
            }
            Some((uri, storage)) => {
                if let (Ok(store), Ok(path)) = (storage.store(&uri), uri.object_path()) {
                    let _ = storage.block_on(store.delete(&path));
                }
            }
        }
    }

    /// Make the folder's entries durable (locally; a store's writes already are).
    pub fn sync(&self) {
        if let OutputFolder::Local(dir) = self
            && let Ok(handle) = std::fs::File::open(dir)
        {
            let _ = handle.sync_all();
        }
    }
}

/// The objects under `listed` (a prefix of the store), by name relative to the output
/// prefix `root`, with their sizes. A prefix that does not exist yet lists as nothing.
fn names_under(
    storage: &Storage,
    root: &ObjectUri,
    listed: &ObjectUri,
) -> Result<HashMap<String, u64>> {
    let prefix = root.folder_key();
    Ok(storage
        .block_on(storage.list(listed))??
        .into_iter()
        .filter_map(|m| Some((m.key.strip_prefix(prefix.as_str())?.to_string(), m.size)))
        .collect())
}

/// The bytes of each of `names` under `root` (None: absent or unreadable).
async fn get_all(
    storage: &Storage,
    root: &ObjectUri,
    names: &[String],
) -> Vec<(String, Option<Vec<u8>>)> {
    concurrently(storage, names.iter(), |name| async move {
        let (Ok(store), Ok(path)) = (storage.store(root), root.join(name).object_path()) else {
            return (name.clone(), None);
        };
        let bytes = match object_store::ObjectStoreExt::get(store.as_ref(), &path).await {
            Ok(got) => got.bytes().await.ok().map(|b| b.to_vec()),
            Err(_) => None,
        };
        (name.clone(), bytes)
    })
    .await
}

/// The size of each of `names` under `root` (None: absent).
async fn sizes_of(
    storage: &Storage,
    root: &ObjectUri,
    names: &[String],
) -> Vec<(String, Option<u64>)> {
    concurrently(storage, names.iter(), |name| async move {
        let meta = storage.head(&root.join(name)).await.ok();
        (name.clone(), meta.map(|m| m.size))
    })
    .await
}

/// `work` on each of `items`, `storage.footer_reads_in_flight` at a time.
async fn concurrently<'a, T: 'a, F, Fut, R>(
    storage: &Storage,
    items: impl Iterator<Item = &'a T>,
    work: F,
) -> Vec<R>
where
    F: Fn(&'a T) -> Fut,
    Fut: std::future::Future<Output = R>,
{
    use futures::StreamExt;
    futures::stream::iter(items.map(work))
        .buffer_unordered(storage.spec().footer_reads_in_flight.max(1))
        .collect()
        .await
}

/// The output folder as resume sees it ([`OutputFolder::view`]).
pub struct FolderView<'a> {
    folder: &'a OutputFolder,
    /// For a store: what is known of names under the prefix (Some(size): there; None:
    /// absent). A name not in it is asked for, unless the map is `complete`.
    known: Option<HashMap<String, Option<u64>>>,
    /// `known` comes from a listing of the whole prefix: a name not in it is absent.
    complete: bool,
    /// For a store: the manifests asked for that exist, by name.
    fetched: HashMap<String, Vec<u8>>,
}

impl FolderView<'_> {
    /// What is known of `name`: Some(Some(size)) there, Some(None) absent, None unknown.
    fn known(&self, name: &str) -> Option<Option<u64>> {
        match self.known.as_ref()?.get(name) {
            Some(size) => Some(*size),
            None if self.complete => Some(None),
            None => None,
        }
    }

    /// A small file's bytes, if it is there and readable.
    pub fn read_small(&self, name: &str) -> Option<Vec<u8>> {
        if let Some(bytes) = self.fetched.get(name) {
            return Some(bytes.clone());
        }
        match self.known(name) {
            Some(None) => None,
            _ => self.folder.read_small(name),
        }
    }

    /// Size of `name`, if it is there.
    pub fn size_of(&self, name: &str) -> Option<u64> {
        match self.known(name) {
            Some(size) => size,
            None => self.folder.size_of(name),
        }
    }

    /// Delete `name` if it is there.
    pub fn remove(&self, name: &str) {
        if self.known(name) != Some(None) {
            self.folder.remove(name);
        }
    }

    /// Abort the multipart uploads a killed run left for `stem`'s outputs, and remove
    /// its temporary files (a store never shows an incomplete upload, but keeps and
    /// bills its parts until it is aborted).
    pub fn clean_up_after(&self, stem: &str) {
        match self.folder {
            OutputFolder::Local(dir) => super::remove_stale_tmp(dir, stem),
            OutputFolder::Remote { uri, storage, .. } => {
                for name in output_names(stem) {
                    let marker = self.folder.upload_marker(&name);
                    let Some(bytes) = self.read_small(&marker) else {
                        continue;
                    };
                    if let Ok(pending) = serde_json::from_slice::<PendingUpload>(&bytes) {
                        let target = ObjectUri {
                            bucket: uri.bucket.clone(),
                            key: pending.key,
                        };
                        tracing::info!("aborting the unfinished upload of {target}");
                        if let (Ok(store), Ok(path)) =
                            (storage.store(&target), target.object_path())
                        {
                            let _ =
                                storage.block_on(store.abort_multipart(&path, &pending.upload_id));
                        }
                    }
                    self.remove(&marker);
                }
            }
        }
    }
}

/// Staging folders are `<name>-<pid>`: remove the siblings of `staging` whose process
/// is gone (a `kill -9` gives no chance to clean up).
fn remove_dead_staging(staging: &Path) {
    let (Some(parent), Some(name)) = (staging.parent(), staging.file_name()) else {
        return;
    };
    let name = name.to_string_lossy();
    let Some((prefix, _)) = name.rsplit_once('-') else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let other = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = other
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Read until `buffer` is full or the file ends.
fn fill(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Write `bytes` to `path` through a synced temporary file and a rename; a failure
/// (a full disk) leaves nothing behind.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = super::tmp_path(path);
    let written = std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
