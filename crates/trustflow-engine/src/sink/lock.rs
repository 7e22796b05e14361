//! One writer per output folder. A run takes an advisory lock on
//! `<out>/.trustflow.lock` for as long as it writes there (the OS releases it when the
//! process dies, so a crash leaves no stale lock). A whole run holds it exclusively; a
//! `--part I/N` run holds it shared, plus `<out>/.trustflow.part-I-of-N.lock`
//! exclusively, so parts of one job share a folder while a second whole run, or a
//! second copy of the same part, is refused with the holder's pid and host.
//!
//! Parts of jobs of different widths (`--part 0/2` and `--part 0/3`) overlap in
//! shards: the first part of a job records its width N in `<out>/.trustflow.width.lock`
//! and holds that file shared, so a part of another width is refused while any part of
//! the first job runs.
//!
//! In an object store there are no advisory locks: every writer takes a lease with a
//! heartbeat instead (`lease.rs`), with the same rules, with or without conditional
//! writes. With `storage.conditional_writes` (stores that enforce `If-None-Match: *`)
//! the lock files are also objects created only if absent and deleted when the run
//! ends; a run killed with `kill -9` leaves its lock object, and the refusal says which
//! object to delete.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::folder::OutputFolder;
use crate::error::{Error, Result};

const FOLDER_LOCK: &str = ".trustflow.lock";
/// Holds the width N of the job whose parts write the folder.
const WIDTH_LOCK: &str = ".trustflow.width.lock";

fn part_lock(i: usize, n: usize) -> String {
    format!(".trustflow.part-{i}-of-{n}.lock")
}

/// Held locks; dropping it releases them.
#[derive(Debug, Default)]
pub struct OutputLock {
    _folder: Option<File>,
    _part: Option<File>,
    _width: Option<File>,
    /// A lock object in a store.
    _object: Option<LockObject>,
    /// The writer's lease on a store's prefix.
    _lease: Option<super::lease::Lease>,
}

/// A lock object in a store (the folder and its name), deleted on drop.
#[derive(Debug)]
struct LockObject(OutputFolder, String);

impl Drop for LockObject {
    fn drop(&mut self) {
        self.0.remove(&self.1);
    }
}

/// Lock the run's output folder; `part` is `--part I/N`.
pub fn lock_folder(folder: &OutputFolder, part: Option<(usize, usize)>) -> Result<OutputLock> {
    match folder {
        OutputFolder::Local(dir) => lock_output(dir, part),
        OutputFolder::Remote { uri, storage, .. } => {
            let lease = super::lease::take(folder, uri, storage, part)?;
            let mut lock = match storage.spec().conditional_writes {
                true => lock_object(folder, part)?,
                false => OutputLock::default(),
            };
            lock._lease = Some(lease);
            Ok(lock)
        }
    }
}

/// The lock as an object created only if absent (conditional writes).
fn lock_object(folder: &OutputFolder, part: Option<(usize, usize)>) -> Result<OutputLock> {
    let name = match part {
        None => FOLDER_LOCK.to_string(),
        Some((i, n)) => part_lock(i, n),
    };
    if folder.create_small(&name, holder_line().as_bytes())? {
        return Ok(OutputLock {
            _object: Some(LockObject(folder.clone(), name)),
            ..OutputLock::default()
        });
    }
    let held_by = folder
        .read_small(&name)
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "another trustflow process".into());
    Err(Error::Busy {
        path: folder.path(),
        message: format!(
            "the output prefix is in use by another trustflow run ({held_by}); wait for it \
             to finish, or, if that run is dead, delete {}",
            folder.display(&name).display()
        ),
    })
}

/// This machine's name, as messages and leases give it.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "an unknown host".into())
}

fn holder_line() -> String {
    format!("pid {} on {}", std::process::id(), host_name())
}

fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Record who holds an exclusive lock, for the message a refused run prints.
fn sign(file: &mut File, path: &Path) -> Result<()> {
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(holder_line().as_bytes()))
        .map_err(|e| Error::io(path, e))
}

fn holder_of(path: &Path) -> String {
    let mut text = String::new();
    let _ = File::open(path).and_then(|mut f| f.read_to_string(&mut text));
    let text = text.trim();
    if text.is_empty() {
        "another trustflow process".into()
    } else {
        text.to_string()
    }
}

/// Holders of part locks in `out_dir`, for the message when a whole run is refused.
fn part_holders(out_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(".trustflow.part-") && name.ends_with(".lock")
        })
        .filter_map(|e| {
            let file = File::open(e.path()).ok()?;
            // Only parts still running hold their lock.
            match file.try_lock_shared() {
                Ok(()) => None,
                Err(_) => Some(holder_of(&e.path())),
            }
        })
        .collect();
    found.sort();
    found
}

fn busy(out_dir: &Path, holder: String) -> Error {
    Error::Busy {
        path: out_dir.to_path_buf(),
        message: format!(
            "the output folder is in use by another trustflow run ({holder}); wait for it to \
             finish, or write to another folder"
        ),
    }
}

/// Lock `out_dir` (which must exist) for this run; `part` is `--part I/N`.
pub fn lock_output(out_dir: &Path, part: Option<(usize, usize)>) -> Result<OutputLock> {
    let folder_path = out_dir.join(FOLDER_LOCK);
    let mut folder = open(&folder_path)?;
    let Some((i, n)) = part else {
        return match folder.try_lock() {
            Ok(()) => {
                sign(&mut folder, &folder_path)?;
                Ok(OutputLock {
                    _folder: Some(folder),
                    ..OutputLock::default()
                })
            }
            Err(TryLockError::WouldBlock) => {
                let parts = part_holders(out_dir);
                let holder = if parts.is_empty() {
                    holder_of(&folder_path)
                } else {
                    format!("parts held by {}", parts.join(", "))
                };
                Err(busy(out_dir, holder))
            }
            Err(TryLockError::Error(e)) => Err(Error::io(&folder_path, e)),
        };
    };
    match folder.try_lock_shared() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(busy(out_dir, holder_of(&folder_path))),
        Err(TryLockError::Error(e)) => return Err(Error::io(&folder_path, e)),
    }
    let width = lock_width(out_dir, n)?;
    let part_path: PathBuf = out_dir.join(part_lock(i, n));
    let mut part_file = open(&part_path)?;
    match part_file.try_lock() {
        Ok(()) => {
            sign(&mut part_file, &part_path)?;
            Ok(OutputLock {
                _folder: Some(folder),
                _part: Some(part_file),
                _width: Some(width),
                ..OutputLock::default()
            })
        }
        Err(TryLockError::WouldBlock) => Err(busy(
            out_dir,
            format!("part {i}/{n} held by {}", holder_of(&part_path)),
        )),
        Err(TryLockError::Error(e)) => Err(Error::io(&part_path, e)),
    }
}

/// Hold `.trustflow.width.lock` shared for a part of a job of `n` parts: the first part
/// of a job (no one holds the file) records `n` in it; a part of another width is
/// refused, naming the parts that run.
fn lock_width(out_dir: &Path, n: usize) -> Result<File> {
    let path = out_dir.join(WIDTH_LOCK);
    let mut file = open(&path)?;
    // Alone: record our width, then hold it shared like every other part.
    if file.try_lock().is_ok() {
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(n.to_string().as_bytes()))
            .and_then(|()| file.unlock())
            .map_err(|e| Error::io(&path, e))?;
    }
    file.lock_shared().map_err(|e| Error::io(&path, e))?;
    let mut recorded = String::new();
    file.rewind()
        .and_then(|_| file.read_to_string(&mut recorded))
        .map_err(|e| Error::io(&path, e))?;
    if recorded.trim() == n.to_string() {
        return Ok(file);
    }
    let parts = part_holders(out_dir);
    Err(busy(
        out_dir,
        format!(
            "parts of a job of {} part(s) are writing it ({}), and this part is of a job of \
             {n}: jobs of other widths would write the same shards",
            recorded.trim(),
            parts.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holder_and_parts_share() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_output(dir.path(), None).unwrap();
        let err = lock_output(dir.path(), None).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(lock_output(dir.path(), Some((0, 2))).is_err());
        drop(first);
        let p0 = lock_output(dir.path(), Some((0, 2))).unwrap();
        let p1 = lock_output(dir.path(), Some((1, 2))).unwrap();
        let again = lock_output(dir.path(), Some((1, 2)))
            .unwrap_err()
            .to_string();
        assert!(again.contains("part 1/2"), "{again}");
        let whole = lock_output(dir.path(), None).unwrap_err().to_string();
        assert!(whole.contains("parts held by"), "{whole}");
        let other_width = lock_output(dir.path(), Some((0, 3)))
            .unwrap_err()
            .to_string();
        assert!(other_width.contains("a job of 2 part(s)"), "{other_width}");
        drop((p0, p1));
        lock_output(dir.path(), None).unwrap();
        // Once the first job is gone, a job of another width may start.
        lock_output(dir.path(), Some((0, 3))).unwrap();
    }
}
