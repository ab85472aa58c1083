//! Write-back: the journal of changes not yet confirmed by the server, the staged content their
//! values live in ([`blob::Blob`]: in memory and inline in the journal while small, a staging
//! file past that), and the uploader that sends them in the fewest requests.
//!
//! One lock (`state`) guards the in-memory mirror of the journal and the staged content's holds;
//! every change goes to the journal (SQLite, committed) before the mirror, so the mirror is never
//! ahead of what a crash would keep. Nothing here is held across an `.await`.

pub mod blob;
pub mod journal;
mod uploader;

use super::remote::Remote;
use super::{FsError, FsResult, KeyMeta};
use crate::api::limits::{self, now_secs};
use crate::backend::{KvBackend, PutOptions};
use blob::{Blob, Budget};
use bytes::Bytes;
use journal::{Journal, Op, Row};
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
// tokio's clock, the one the uploader sleeps on: a paused clock (tests) moves both.
use tokio::time::Instant;
use tracing::{info, warn};

/// Pending changes listed by name in `kvfs status`.
const PENDING_SAMPLE: usize = 50;

/// (namespace id, key)
type Key = (String, String);

/// Settings of the write-back.
#[derive(Debug, Clone)]
pub struct WriteBackConfig {
    /// How long the uploader gathers changes before sending them.
    pub write_delay: Duration,
    /// `--expiration-ttl`: applied to keys written without an expiration of their own.
    pub expiration_ttl: Option<u64>,
}

/// Guarded by `WriteBack::state`.
struct State {
    /// Mirror of the journal: the pending change of each key.
    pending: BTreeMap<Key, Row>,
    /// Staged content by name, and how many holders each has (journal rows and files open for
    /// writing); it goes (with its staging file, if it has one) when its last holder lets go.
    blobs: HashMap<String, Held>,
    /// The last sequence number given to a change.
    next_seq: u64,
    /// When each key was last written, for KV's one-write-per-second-per-key limit.
    sent: HashMap<Key, Instant>,
    /// When the last change was recorded (the uploader waits for a quiet moment).
    last_change: Instant,
    /// Keys with an upload in flight outside a round (a large value sent on its own): no
    /// other upload of the key starts until it ends, so the server's order is the journal's.
    sending: HashSet<Key>,
    /// Large values waiting to go up on their own, and when each was recorded.
    large: HashMap<Key, Instant>,
}

struct Held {
    holds: usize,
    blob: Arc<Blob>,
}

pub struct WriteBack {
    backend: Arc<dyn KvBackend>,
    /// Where uploads are reflected (listings, value cache), so reads see the new remote state.
    remote: Arc<Remote>,
    cfg: WriteBackConfig,
    journal: Journal,
    staging_dir: PathBuf,
    /// Staged content held in memory, across all blobs.
    budget: Arc<Budget>,
    state: Mutex<State>,
    /// Wakes the uploader when a change is recorded.
    wake: tokio::sync::Notify,
    /// One upload round at a time (the uploader, unmount and fsync may all ask).
    round: tokio::sync::Mutex<()>,
    /// Wakes the sender of large values when one is recorded or a key's upload ends.
    large_wake: tokio::sync::Notify,
    /// Tells those waiting for a key's upload in flight (a round, fsync) that one ended.
    sent_one: tokio::sync::Notify,
}

impl WriteBack {
    /// Opens the journal in `cache_dir` and resumes what it holds; staging files that no journal
    /// row needs (left by a crash) are deleted.
    pub fn open(
        cache_dir: &Path,
        backend: Arc<dyn KvBackend>,
        remote: Arc<Remote>,
        cfg: WriteBackConfig,
    ) -> std::io::Result<WriteBack> {
        let staging_dir = cache_dir.join("staging");
        std::fs::create_dir_all(&staging_dir)?;
        let journal =
            Journal::open(&cache_dir.join("journal.sqlite3")).map_err(std::io::Error::other)?;
        let mut state = State {
            pending: BTreeMap::new(),
            blobs: HashMap::new(),
            next_seq: journal.max_seq().map_err(std::io::Error::other)?,
            sent: HashMap::new(),
            last_change: Instant::now(),
            sending: HashSet::new(),
            large: HashMap::new(),
        };
        let budget = Arc::new(Budget::default());
        let rows = journal.load().map_err(std::io::Error::other)?;
        // Staging files no row names are left by a crash: they go before any content is staged.
        let named: std::collections::HashSet<&str> = rows
            .iter()
            .filter_map(|(r, inline)| match &r.op {
                Op::Put { blob, .. } if inline.is_none() => Some(blob.as_str()),
                _ => None,
            })
            .collect();
        for entry in std::fs::read_dir(&staging_dir)?.flatten() {
            if !named.contains(entry.file_name().to_string_lossy().as_ref()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        for (mut row, inline) in rows {
            if let Op::Put {
                blob: name, len, ..
            } = &mut row.op
            {
                if !state.blobs.contains_key(name.as_str()) {
                    let path = staging_dir.join(&*name);
                    let blob = match inline {
                        Some(bytes) => {
                            let b = Blob::new(name.clone(), path, budget.clone());
                            b.write_at(&bytes, 0).map(|_| b)
                        }
                        None => Blob::open_file(name.clone(), path, budget.clone()),
                    };
                    match blob {
                        Ok(b) => {
                            let blob = Arc::new(b);
                            state.blobs.insert(name.clone(), Held { holds: 0, blob });
                        }
                        // Left without content: its upload is refused as unreadable.
                        Err(e) => warn!("journal: staged data of {:?} unreadable: {e}", row.key),
                    }
                }
                // A file still open at the crash was written after its row was recorded (the row
                // and the open file shared the staging file): that content is what gets
                // uploaded, so its length is the value's.
                if let Some(h) = state.blobs.get(name.as_str()) {
                    *len = h.blob.len();
                }
            }
            hold(&mut state.blobs, &row);
            uploader::queue_large(&mut state, &row);
            state.pending.insert((row.ns.clone(), row.key.clone()), row);
        }
        if !state.pending.is_empty() {
            info!(
                "journal holds {} from an earlier run",
                crate::text::count(state.pending.len() as u64, "change")
            );
        }
        Ok(WriteBack {
            backend,
            remote,
            cfg,
            journal,
            staging_dir,
            budget,
            state: Mutex::new(state),
            wake: tokio::sync::Notify::new(),
            round: tokio::sync::Mutex::new(()),
            large_wake: tokio::sync::Notify::new(),
            sent_one: tokio::sync::Notify::new(),
        })
    }

    // ---- staged content -----------------------------------------------------------------------

    /// New, empty staged content, held once by the caller (who lets go with `release_blob`).
    /// Its name is an id, so no key name reaches the local disk.
    pub fn new_blob(&self) -> Arc<Blob> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut st = self.state.lock().unwrap();
        loop {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("s{}-{n}", std::process::id());
            // A name of an earlier run with the same process id may still be journaled.
            if st.blobs.contains_key(&name) {
                continue;
            }
            let path = self.staging_dir.join(&name);
            let blob = Arc::new(Blob::new(name.clone(), path, self.budget.clone()));
            st.blobs.insert(
                name,
                Held {
                    holds: 1,
                    blob: blob.clone(),
                },
            );
            return blob;
        }
    }

    /// New staged content holding `bytes`, held once by the caller.
    pub fn blob_of(&self, bytes: &[u8]) -> FsResult<Arc<Blob>> {
        let blob = self.new_blob();
        if let Err(e) = blob.write_at(bytes, 0) {
            self.release_blob(blob.name());
            return Err(e.into());
        }
        Ok(blob)
    }

    /// The whole staged content of `name` (a pending put's value).
    pub fn blob_bytes(&self, name: &str) -> std::io::Result<Bytes> {
        let blob = self
            .state
            .lock()
            .unwrap()
            .blobs
            .get(name)
            .map(|h| h.blob.clone());
        match blob {
            Some(b) => b.bytes().map(Bytes::from),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no staged content",
            )),
        }
    }

    /// The staging file of `name`, opened again to be read from the start (a large value is
    /// sent from it as it is read); None when the content is in memory (or gone).
    pub fn blob_file(&self, name: &str) -> Option<std::io::Result<std::fs::File>> {
        let st = self.state.lock().unwrap();
        st.blobs.get(name)?.blob.reopen()
    }

    /// Whether more than one holder (a journal row besides an open file) holds staged content.
    pub fn is_shared(&self, name: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .blobs
            .get(name)
            .is_some_and(|h| h.holds > 1)
    }

    /// Lets go of one hold on staged content.
    pub fn release_blob(&self, name: &str) {
        let mut st = self.state.lock().unwrap();
        self.unhold(&mut st, name);
    }

    fn unhold(&self, st: &mut State, name: &str) {
        if let Some(h) = st.blobs.get_mut(name) {
            h.holds -= 1;
            if h.holds == 0 {
                // The content goes with the last reference (an open read handle may keep it).
                h.blob.discard();
                st.blobs.remove(name);
            }
        }
    }

    fn unhold_row(&self, st: &mut State, row: Option<&Row>) {
        if let Some(Row {
            op: Op::Put { blob, .. },
            ..
        }) = row
        {
            self.unhold(st, blob);
        }
    }

    // ---- recording changes ------------------------------------------------------------------

    /// Journals `op` for (ns, key), replacing what was pending; wakes the uploader.
    pub fn record(&self, ns: &str, key: &str, op: Op, remote: bool) -> FsResult<()> {
        let mut st = self.state.lock().unwrap();
        st.next_seq += 1;
        let row = Row {
            ns: ns.into(),
            key: key.into(),
            seq: st.next_seq,
            op,
            remote,
            error: None,
        };
        // Content held in memory goes into the row itself; a staging file is named by it.
        let inline = match &row.op {
            Op::Put { blob, .. } => st.blobs.get(blob).and_then(|h| h.blob.inline()),
            Op::Delete => None,
        };
        self.journal
            .upsert(&row, inline.as_deref())
            .map_err(|e| FsError::Io(format!("journal: {e}")))?;
        hold(&mut st.blobs, &row);
        let large = uploader::queue_large(&mut st, &row);
        let old = st.pending.insert((row.ns.clone(), row.key.clone()), row);
        self.unhold_row(&mut st, old.as_ref());
        st.last_change = Instant::now();
        drop(st);
        self.wake.notify_one();
        if large {
            self.large_wake.notify_one();
        }
        Ok(())
    }

    /// Journals a delete, or just forgets a pending put of a key the server never had.
    pub fn record_delete(&self, ns: &str, key: &str, remote: bool) -> FsResult<()> {
        let k = (ns.to_string(), key.to_string());
        let remote = {
            let st = self.state.lock().unwrap();
            st.pending.get(&k).map_or(remote, |r| r.remote || remote)
        };
        if remote {
            return self.record(ns, key, Op::Delete, true);
        }
        // Created and deleted before upload: costs nothing.
        self.journal
            .remove(ns, key)
            .map_err(|e| FsError::Io(format!("journal: {e}")))?;
        {
            let mut st = self.state.lock().unwrap();
            let old = st.pending.remove(&k);
            st.large.remove(&k);
            self.unhold_row(&mut st, old.as_ref());
        }
        self.remote.record_delete(ns, key);
        Ok(())
    }

    // ---- what is pending --------------------------------------------------------------------

    /// The pending change of a key.
    pub fn pending(&self, ns: &str, key: &str) -> Option<Row> {
        let st = self.state.lock().unwrap();
        st.pending.get(&(ns.to_string(), key.to_string())).cloned()
    }

    /// The pending value of a key: (staging file, length, metadata and expiration).
    pub fn pending_put(&self, ns: &str, key: &str) -> Option<(String, u64, KeyMeta)> {
        match self.pending(ns, key)?.op {
            Op::Put {
                blob,
                len,
                metadata,
                expiration,
            } => Some((
                blob,
                len,
                KeyMeta {
                    metadata,
                    expiration,
                },
            )),
            Op::Delete => None,
        }
    }

    pub fn is_pending(&self, ns: &str, key: &str) -> bool {
        let st = self.state.lock().unwrap();
        st.pending.contains_key(&(ns.to_string(), key.to_string()))
    }

    /// Keys under `prefix` with a pending change: (key, true for a put, false for a delete).
    pub fn pending_under(&self, ns: &str, prefix: &str) -> Vec<(String, bool)> {
        let st = self.state.lock().unwrap();
        under(&st.pending, ns, prefix)
            .map(|((_, k), r)| (k.clone(), matches!(r.op, Op::Put { .. })))
            .collect()
    }

    /// Whether anything under `prefix` is pending, and whether it includes a put.
    pub fn any_under(&self, ns: &str, prefix: &str, puts_only: bool) -> bool {
        let st = self.state.lock().unwrap();
        let any = under(&st.pending, ns, prefix).any(|((_, k), r)| {
            !puts_only || (matches!(r.op, Op::Put { .. }) && super::names::representable(k))
        });
        any
    }

    /// Pending rows the uploader may still send (refused ones wait for the user).
    pub fn uploadable(&self) -> usize {
        let st = self.state.lock().unwrap();
        st.pending.values().filter(|r| r.error.is_none()).count()
    }

    /// What the journal holds, for `kvfs status`; fits in one xattr (64 KiB): totals, refused
    /// changes first, then a sample.
    pub fn report(&self) -> Json {
        let st = self.state.lock().unwrap();
        let (mut writes, mut deletes, mut bytes, mut refused) = (0u64, 0u64, 0u64, 0u64);
        for r in st.pending.values() {
            match &r.op {
                Op::Put { len, .. } => {
                    writes += 1;
                    bytes += len;
                }
                Op::Delete => deletes += 1,
            }
            refused += r.error.is_some() as u64;
        }
        let mut rows: Vec<&Row> = st.pending.values().collect();
        rows.sort_by_key(|r| r.error.is_none());
        let sample: Vec<Json> = rows
            .into_iter()
            .take(PENDING_SAMPLE)
            .map(|r| {
                let (op, bytes) = match &r.op {
                    Op::Put { len, .. } => ("write", *len),
                    Op::Delete => ("delete", 0),
                };
                serde_json::json!({"namespace": r.ns, "key": r.key, "op": op, "bytes": bytes, "error": r.error})
            })
            .collect();
        serde_json::json!({
            "writes": writes, "deletes": deletes, "bytes": bytes, "refused": refused, "first": sample,
        })
    }

    /// Everything still pending, one line each, for unmount's report.
    pub fn leftovers(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.pending
            .values()
            .map(|r| {
                let what = if matches!(r.op, Op::Delete) {
                    "delete"
                } else {
                    "write"
                };
                let why = r.error.as_deref().unwrap_or("not reachable");
                format!("{what} of {:?} in namespace {} ({why})", r.key, r.ns)
            })
            .collect()
    }

    /// The expiration options a put is sent with. The key's own expiration wins;
    /// --expiration-ttl applies to keys without one. A key about to expire keeps the soonest
    /// expiration KV accepts.
    pub fn put_options(&self, meta: &KeyMeta) -> PutOptions {
        let min_exp = now_secs() + limits::MIN_EXPIRATION_TTL;
        PutOptions {
            expiration: meta.expiration.map(|e| e.max(min_exp)),
            expiration_ttl: self
                .cfg
                .expiration_ttl
                .filter(|_| meta.expiration.is_none()),
            metadata: meta.metadata.clone(),
        }
    }
}

/// Takes a hold on the staged content a row points at.
fn hold(blobs: &mut HashMap<String, Held>, row: &Row) {
    if let Op::Put { blob, .. } = &row.op {
        if let Some(h) = blobs.get_mut(blob) {
            h.holds += 1;
        }
    }
}

/// Pending changes of keys under `prefix` in `ns`, in key order.
fn under<'a>(
    pending: &'a BTreeMap<Key, Row>,
    ns: &'a str,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a Key, &'a Row)> + 'a {
    pending
        .range((ns.to_string(), prefix.to_string())..)
        .take_while(move |((n, k), _)| n == ns && k.starts_with(prefix))
}
