//! Writers of an output prefix in an object store, without locks: each writer keeps a
//! lease, an empty object `.trustflow/writers/<who>` whose key says which part of which
//! job it writes and who it is, refreshed every heartbeat and deleted when the
//! run ends. A store has no locks, and conditional writes are not everywhere, so the
//! protocol needs neither:
//!
//! First a writer writes its lease (a `.start` object once, a `.beat` object
//! refreshed), then it lists the leases. A live lease that conflicts with ours (a whole
//! run against anything, parts of jobs of another width, or the same part twice) and
//! started before ours, by the store's clock, refuses this run, naming its holder. Two
//! writers starting together both see both leases in the listing (listings are
//! strongly consistent in S3 and its peers), and only the earlier one goes on.
//!
//! A lease is live while its holder refreshes it: one whose `.beat` is older than
//! the expiry (by the store's clock, against our own fresh `.beat`) belongs to a dead
//! writer, and its successor takes over (`storage.lease_expiry_s`, 90 s by default)
//! and deletes it. A lease of this host whose process is gone is dead at once, so a
//! rerun after `kill -9` on the same machine does not wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use super::folder::OutputFolder;
use crate::error::{Error, Result};
use crate::storage::{ObjectUri, Storage};

/// Where leases live under the output prefix.
const WRITERS: &str = ".trustflow/writers";
/// How long a lease lives without a refresh (`storage.lease_expiry_s`), and how often
/// its writer refreshes it (a sixth of that, so a slow request or two do not lose it).
#[derive(Debug, Clone, Copy)]
struct Timing {
    expiry: Duration,
    heartbeat: Duration,
}

impl Timing {
    fn of(storage: &Storage) -> Self {
        let expiry = Duration::from_secs(storage.spec().lease_expiry_s.max(1));
        Timing {
            expiry,
            heartbeat: expiry / 6,
        }
    }
}

/// One writer, as its lease's key names it (`.trustflow/writers/<key>.start|.beat`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Writer {
    /// None: a whole run; Some((I, N)): part I of N.
    part: Option<(usize, usize)>,
    host: String,
    pid: u32,
    /// When it started (milliseconds since the epoch, its own clock), then its pid:
    /// the order that decides between two writers that start together.
    started_ms: u128,
}

impl Writer {
    fn key(&self) -> String {
        let what = match self.part {
            None => "whole".to_string(),
            Some((i, n)) => format!("part-{i}-of-{n}"),
        };
        format!(
            "{what}--{}--{}--{:015}",
            self.host.replace("--", "-"),
            self.pid,
            self.started_ms
        )
    }

    fn parse(key: &str) -> Option<Writer> {
        let mut fields = key.split("--");
        let what = fields.next()?;
        let host = fields.next()?.to_string();
        let pid = fields.next()?.parse().ok()?;
        let started_ms = fields.next()?.parse().ok()?;
        let part = match what {
            "whole" => None,
            part => {
                let (i, n) = part.strip_prefix("part-")?.split_once("-of-")?;
                Some((i.parse().ok()?, n.parse().ok()?))
            }
        };
        Some(Writer {
            part,
            host,
            pid,
            started_ms,
        })
    }

    /// Whether the two may not write one prefix at once: a whole run shares it with
    /// nothing; parts share it only with the other parts of a job of their width.
    fn conflicts_with(&self, other: &Writer) -> bool {
        match (self.part, other.part) {
            (Some((i, n)), Some((j, m))) => n != m || i == j,
            _ => true,
        }
    }

    fn describe(&self) -> String {
        let what = match self.part {
            None => "a whole run".to_string(),
            Some((i, n)) => format!("part {i}/{n}"),
        };
        format!("{what}, pid {} on {}", self.pid, self.host)
    }
}

/// This run's lease; dropping it stops the heartbeat and deletes the lease. Its
/// heartbeat refreshes it every sixth of the expiry.
pub struct Lease {
    folder: OutputFolder,
    key: String,
    stop: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(beat) = self.heartbeat.take() {
            beat.thread().unpark();
            let _ = beat.join();
        }
        self.folder.remove(&beat_name(&self.key));
        self.folder.remove(&start_name(&self.key));
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.key)
    }
}

/// Written once when a writer starts: the store's time of it orders writers (host
/// clocks may disagree; the store's is one).
fn start_name(key: &str) -> String {
    format!("{WRITERS}/{key}.start")
}

/// Rewritten every heartbeat while the writer lives.
fn beat_name(key: &str) -> String {
    format!("{WRITERS}/{key}.beat")
}

/// Take this run's lease on the prefix of `folder`, or refuse the run naming the
/// writer it would race with.
pub fn take(
    folder: &OutputFolder,
    uri: &ObjectUri,
    storage: &Arc<Storage>,
    part: Option<(usize, usize)>,
) -> Result<Lease> {
    let me = Writer {
        part,
        host: super::lock::host_name(),
        pid: std::process::id(),
        started_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()),
    };
    let key = me.key();
    folder.put_small(&start_name(&key), b"")?;
    let lease = Lease {
        folder: folder.clone(),
        key: key.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        heartbeat: None,
    };
    folder.put_small(&beat_name(&key), b"")?;
    let timing = Timing::of(storage);
    // Every writer that started before us is in this listing, and so are we. An
    // earlier writer of the same part is most likely an attempt of this job that died
    // on a lost node (its lease outlives it): wait for it to end or expire, refreshing
    // our own lease meanwhile. Any other conflict refuses the run at once.
    let waited = std::time::Instant::now();
    loop {
        let survey = survey(storage, uri, &me, timing)?;
        for dead in &survey.dead {
            folder.remove(&beat_name(dead));
            folder.remove(&start_name(dead));
        }
        let Some(holder) = survey.earlier_conflict else {
            break;
        };
        // Only a part waits: a Ray retry of it may start while the lost attempt's
        // lease lives on.
        if holder.part != me.part
            || me.part.is_none()
            || waited.elapsed() > timing.expiry + timing.heartbeat
        {
            return Err(refusal(folder, &holder, timing));
        }
        tracing::warn!(
            "waiting for the earlier writer of this part ({}) to finish, or its lease to \
             expire ({} s after its last heartbeat)",
            holder.describe(),
            timing.expiry.as_secs()
        );
        std::thread::sleep(timing.heartbeat / 3);
        folder.put_small(&beat_name(&key), b"")?;
    }
    Ok(start_heartbeat(lease, timing.heartbeat))
}

fn start_heartbeat(mut lease: Lease, every: Duration) -> Lease {
    let (folder, name, stop) = (
        lease.folder.clone(),
        beat_name(&lease.key),
        lease.stop.clone(),
    );
    lease.heartbeat = std::thread::Builder::new()
        .name("trustflow-lease".into())
        .spawn(move || {
            while !stop.load(Relaxed) {
                std::thread::park_timeout(every);
                if !stop.load(Relaxed)
                    && let Err(e) = folder.put_small(&name, b"")
                {
                    tracing::warn!("cannot refresh the output lease {name}: {e}");
                }
            }
        })
        .ok();
    lease
}

/// What the leases under a prefix say to a writer.
struct Survey {
    /// The first live writer that conflicts with it and started before it, by the
    /// store's clock ("live": a heartbeat within the expiry of its own).
    earlier_conflict: Option<Writer>,
    /// Keys of leases whose writer is dead (expired, or of this host and gone).
    dead: Vec<String>,
}

fn survey(storage: &Storage, uri: &ObjectUri, me: &Writer, timing: Timing) -> Result<Survey> {
    let prefix = uri.join(WRITERS);
    let folder_key = prefix.folder_key();
    let mut starts = std::collections::HashMap::new();
    let mut beats = std::collections::HashMap::new();
    for meta in storage.block_on(storage.list(&prefix))?? {
        let Some(name) = meta.key.strip_prefix(folder_key.as_str()) else {
            continue;
        };
        if let Some(key) = name.strip_suffix(".start") {
            starts.insert(key.to_string(), meta.last_modified);
        } else if let Some(key) = name.strip_suffix(".beat") {
            beats.insert(key.to_string(), meta.last_modified);
        }
    }
    let key = me.key();
    let (Some(&my_start), Some(&now)) = (starts.get(&key), beats.get(&key)) else {
        return Err(Error::Internal(format!(
            "the lease {key} just written is not in the listing of {prefix}"
        )));
    };
    let expiry = chrono::Duration::from_std(timing.expiry).unwrap_or(chrono::Duration::MAX);
    let this_host = super::lock::host_name();
    let mut dead = Vec::new();
    let mut earlier: Vec<(chrono::DateTime<chrono::Utc>, String, Writer)> = Vec::new();
    for (other, beat) in beats.iter().filter(|(other, _)| **other != key) {
        let Some(writer) = Writer::parse(other) else {
            continue;
        };
        // A writer of this host whose process is gone is dead, lease or not.
        let gone = writer.host == this_host
            && !std::path::Path::new(&format!("/proc/{}", writer.pid)).exists();
        if gone || now - *beat >= expiry {
            dead.push(other.clone());
            continue;
        }
        // The store's clock orders writers; within one of its ticks (S3 lists times to
        // the second) the writers' own start times and pids do.
        let order = |start, w: &Writer| (start, w.started_ms, w.pid);
        if let Some(&start) = starts.get(other)
            && order(start, &writer) < order(my_start, me)
            && writer.conflicts_with(me)
        {
            earlier.push((start, other.clone(), writer));
        }
    }
    earlier.sort_by_key(|(start, _, w)| (*start, w.started_ms, w.pid));
    Ok(Survey {
        earlier_conflict: earlier.into_iter().next().map(|(_, _, w)| w),
        dead,
    })
}

fn refusal(folder: &OutputFolder, holder: &Writer, timing: Timing) -> Error {
    Error::Busy {
        path: folder.path(),
        message: format!(
            "the output prefix is being written by another trustflow run ({}); wait for it \
             to finish, or write elsewhere. A writer that died without ending its lease \
             ({}) is taken over {} s after its last heartbeat",
            holder.describe(),
            folder.display(&beat_name(&holder.key())).display(),
            timing.expiry.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(part: Option<(usize, usize)>) -> Writer {
        Writer {
            part,
            host: "node-a.example".into(),
            pid: 42,
            started_ms: 1_765_000_000_123,
        }
    }

    #[test]
    fn keys_round_trip_and_conflicts_follow_the_job_width() {
        for part in [None, Some((0, 3)), Some((2, 3))] {
            let w = writer(part);
            assert_eq!(Writer::parse(&w.key()), Some(w));
        }
        let (whole, p0of2, p1of2, p0of3) = (
            writer(None),
            writer(Some((0, 2))),
            writer(Some((1, 2))),
            writer(Some((0, 3))),
        );
        assert!(whole.conflicts_with(&p0of2) && p0of2.conflicts_with(&whole));
        assert!(
            !p0of2.conflicts_with(&p1of2),
            "parts of one job share a prefix"
        );
        assert!(p0of2.conflicts_with(&p0of2.clone()), "the same part twice");
        assert!(
            p0of2.conflicts_with(&p0of3),
            "jobs of another width overlap"
        );
    }
}
