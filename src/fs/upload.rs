//! Write-back: recording changes in the journal, and the uploader that sends them in the
//! fewest requests (bulk write, bulk delete, a plain PUT for large values).

use super::state::State;
use super::{Fs, FsError, FsResult, KeyMeta};
use crate::api::limits::{self, now_secs};
use crate::api::KeyInfo;
use crate::backend::{BackendError, WriteItem};
use crate::writeback::journal::{Op, Row};
use crate::writeback::plan_batches;
use bytes::Bytes;
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Values larger than this go up alone with a plain PUT: a bulk body holds values whole in
/// memory, and the daemon's memory must stay bounded.
pub const SINGLE_PUT_BYTES: u64 = 1 << 20;
/// Most value bytes in one bulk write body (well under the API's 100 MB).
pub const BATCH_BYTES: u64 = 16 << 20;
/// KV accepts one write per second to the same key.
const SAME_KEY_INTERVAL: Duration = Duration::from_secs(1);
/// Pending changes listed by name in `kvfs status`.
const PENDING_SAMPLE: usize = 50;

/// Outcome of one upload round.
#[derive(Debug, Default)]
struct Round {
    done: usize,
    /// Left for a later round (transient failure, unsuccessful_keys, same-key interval).
    left: usize,
    /// Of `left`: held back only by KV's one-write-per-second-per-key limit.
    deferred: usize,
}

impl Fs {
    /// Journals `op` for (ns, key), replacing what was pending; wakes the uploader.
    pub(super) fn record(
        &self,
        st: &mut State,
        ns: &str,
        key: &str,
        op: Op,
        remote: bool,
    ) -> FsResult<()> {
        st.next_seq += 1;
        let row = Row {
            ns: ns.into(),
            key: key.into(),
            seq: st.next_seq,
            op,
            remote,
            error: None,
        };
        self.journal
            .upsert(&row)
            .map_err(|e| FsError::Io(format!("journal: {e}")))?;
        if let Some(old) = st.set_pending(row) {
            self.drop_blob_if_unused(st, &old);
        }
        *self.last_change.lock().unwrap() = Instant::now();
        self.wake.notify_one();
        Ok(())
    }

    /// Journals a delete, or just forgets a pending put of a key the server never had.
    pub(super) fn record_delete(
        &self,
        st: &mut State,
        ns: &str,
        key: &str,
        remote: bool,
    ) -> FsResult<()> {
        let remote = st
            .pending
            .get(&(ns.to_string(), key.to_string()))
            .map_or(remote, |r| r.remote || remote);
        if remote {
            return self.record(st, ns, key, Op::Delete, true);
        }
        // Created and deleted before upload: costs nothing.
        self.journal
            .remove(ns, key)
            .map_err(|e| FsError::Io(format!("journal: {e}")))?;
        if let Some(old) = st.remove_pending(ns, key) {
            self.drop_blob_if_unused(st, &old);
        }
        st.record_delete(ns, key);
        Ok(())
    }

    fn drop_blob_if_unused(&self, st: &State, row: &Row) {
        if let Op::Put { blob, .. } = &row.op {
            if !st.blob_in_journal(blob) && !st.staged.values().any(|s| &s.blob == blob) {
                let _ = std::fs::remove_file(self.staging_path(blob));
            }
        }
    }

    /// Whether the server may hold `key` (as far as this mount knows).
    pub(super) async fn remote_exists(&self, ns: &str, key: &str) -> FsResult<bool> {
        if let Some(r) = self
            .state
            .lock()
            .unwrap()
            .pending
            .get(&(ns.to_string(), key.to_string()))
        {
            return Ok(r.remote);
        }
        let listing = self.listing(ns, &super::parent_prefix(key)).await?;
        Ok(listing.contains_key(key))
    }

    /// Every key under `prefix`, remote and pending, in order.
    pub(super) async fn keys_under(&self, ns: &str, prefix: &str) -> FsResult<Vec<String>> {
        let listing = self.listing(ns, prefix).await?;
        let mut keys: BTreeMap<String, ()> = listing
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, i)| !super::expired(i))
            .map(|(k, _)| (k.clone(), ()))
            .collect();
        let st = self.state.lock().unwrap();
        for ((_, k), row) in st.pending_under(ns, prefix) {
            match row.op {
                Op::Put { .. } => keys.insert(k.clone(), ()),
                Op::Delete => keys.remove(k),
            };
        }
        Ok(keys.into_keys().collect())
    }

    // ---- the uploader -----------------------------------------------------------------------

    /// The background uploader: after `write_delay` without new changes (or when a full batch
    /// is waiting, or the oldest change has waited long enough), sends everything pending.
    pub async fn run_uploader(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            if self.pending_uploadable() == 0 {
                self.wake.notified().await;
            }
            let started = Instant::now();
            let max_wait = (self.cfg.write_delay * 10).max(Duration::from_secs(5));
            loop {
                let quiet = self.last_change.lock().unwrap().elapsed();
                if quiet >= self.cfg.write_delay
                    || self.pending_uploadable() >= limits::MAX_BULK_ITEMS
                    || started.elapsed() >= max_wait
                {
                    break;
                }
                tokio::time::sleep(self.cfg.write_delay - quiet).await;
            }
            let round = self.upload_round().await;
            if round.left > 0 {
                // Something stays: try again, sooner if the last round made progress.
                if round.done > 0 {
                    backoff = Duration::from_millis(500);
                } else {
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                tokio::time::sleep(backoff).await;
                self.wake.notify_one();
            }
        }
    }

    /// Pending rows the uploader may still send (refused ones wait for the user).
    pub fn pending_uploadable(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .pending
            .values()
            .filter(|r| r.error.is_none())
            .count()
    }

    /// One pass over everything pending: per namespace, puts (bulk, or alone when large), then
    /// deletes — held back while any put of that namespace failed, so a rename's old key is
    /// never removed before its new key is safe.
    async fn upload_round(&self) -> Round {
        let _one_round = self.round_lock.lock().await;
        let rows: Vec<Row> = {
            let st = self.state.lock().unwrap();
            st.pending
                .values()
                .filter(|r| r.error.is_none())
                .cloned()
                .collect()
        };
        let mut round = Round::default();
        let mut by_ns: BTreeMap<String, (Vec<Row>, Vec<Row>)> = BTreeMap::new();
        {
            let sent = self.sent.lock().unwrap();
            for r in rows {
                let recent = sent
                    .get(&(r.ns.clone(), r.key.clone()))
                    .is_some_and(|t| t.elapsed() < SAME_KEY_INTERVAL);
                if recent {
                    round.left += 1;
                    round.deferred += 1;
                    continue;
                }
                let e = by_ns.entry(r.ns.clone()).or_default();
                match r.op {
                    Op::Put { .. } => e.0.push(r),
                    Op::Delete => e.1.push(r),
                }
            }
        }
        for (ns, (puts, deletes)) in by_ns {
            let puts_ok = self.upload_puts(&ns, puts, &mut round).await;
            // A refused put may be the new name of a renamed key: its old key must stay.
            let refused = self
                .state
                .lock()
                .unwrap()
                .pending_under(&ns, "")
                .any(|(_, r)| r.error.is_some() && matches!(r.op, Op::Put { .. }));
            if !puts_ok || refused {
                round.left += deletes.len();
                continue;
            }
            self.upload_deletes(&ns, deletes, &mut round).await;
        }
        if round.done > 0 || round.left > 0 {
            debug!("upload round: {} done, {} left", round.done, round.left);
        }
        round
    }

    /// Sends puts; returns false if any is left for later.
    async fn upload_puts(&self, ns: &str, puts: Vec<Row>, round: &mut Round) -> bool {
        let (small, large): (Vec<Row>, Vec<Row>) = puts
            .into_iter()
            .partition(|r| matches!(r.op, Op::Put { len, .. } if len <= SINGLE_PUT_BYTES));
        let mut all_ok = true;
        let sizes: Vec<u64> = small
            .iter()
            .map(|r| put_len(r) + r.key.len() as u64)
            .collect();
        for batch in plan_batches(&sizes, limits::MAX_BULK_ITEMS, BATCH_BYTES) {
            let rows: Vec<&Row> = batch.iter().map(|&i| &small[i]).collect();
            all_ok &= self.upload_batch(ns, &rows, round).await;
        }
        for row in &large {
            all_ok &= self.upload_single(row, round).await;
        }
        all_ok
    }

    async fn upload_batch(&self, ns: &str, rows: &[&Row], round: &mut Round) -> bool {
        let mut items = Vec::with_capacity(rows.len());
        let mut values = HashMap::with_capacity(rows.len());
        for row in rows {
            let Op::Put {
                blob,
                metadata,
                expiration,
                ..
            } = &row.op
            else {
                continue;
            };
            let bytes = match std::fs::read(self.staging_path(blob)) {
                Ok(b) => Bytes::from(b),
                Err(e) => {
                    self.refuse(row, &format!("staged data unreadable: {e}"));
                    continue;
                }
            };
            let meta = KeyMeta {
                metadata: metadata.clone(),
                expiration: *expiration,
            };
            values.insert(row.key.clone(), bytes.clone());
            items.push(WriteItem {
                key: row.key.clone(),
                value: bytes,
                opts: self.put_options(&meta),
            });
        }
        if items.is_empty() {
            return true;
        }
        match self.backend.bulk_write(ns, &items).await {
            Ok(result) => {
                let failed: std::collections::HashSet<&String> =
                    result.unsuccessful_keys.iter().collect();
                let done: Vec<&Row> = rows
                    .iter()
                    .copied()
                    .filter(|r| !failed.contains(&r.key))
                    .collect();
                if !failed.is_empty() {
                    warn!(
                        "bulk write in namespace {ns}: {} keys unsuccessful, retrying later",
                        failed.len()
                    );
                    round.left += failed.len();
                }
                self.complete(&done, Some(&values));
                round.done += done.len();
                failed.is_empty()
            }
            Err(e) if e.is_permanent() => {
                // One bad pair fails the whole request: send them alone to find it.
                warn!(
                    "bulk write in namespace {ns} refused ({e}); sending {} keys one by one",
                    rows.len()
                );
                let mut ok = true;
                for row in rows {
                    ok &= self.upload_single(row, round).await;
                }
                ok
            }
            Err(e) => {
                warn!(
                    "bulk write of {} keys in namespace {ns} failed, will retry: {e}",
                    rows.len()
                );
                round.left += rows.len();
                false
            }
        }
    }

    /// A plain PUT (or DELETE) of one row. Returns false if it is left for later.
    async fn upload_single(&self, row: &Row, round: &mut Round) -> bool {
        match self.send_row(row).await {
            Ok(value) => {
                let values: HashMap<String, Bytes> =
                    value.into_iter().map(|v| (row.key.clone(), v)).collect();
                self.complete(&[row], Some(&values));
                round.done += 1;
                true
            }
            Err(SendError::Permanent(e)) => {
                self.refuse(row, &e.to_string());
                true
            }
            Err(SendError::Transient(msg)) => {
                warn!(
                    "upload of key {:?} in namespace {} failed, will retry: {msg}",
                    row.key, row.ns
                );
                round.left += 1;
                false
            }
        }
    }

    async fn send_row(&self, row: &Row) -> Result<Option<Bytes>, SendError> {
        match &row.op {
            Op::Put {
                blob,
                metadata,
                expiration,
                ..
            } => {
                let bytes = std::fs::read(self.staging_path(blob))
                    .map(Bytes::from)
                    .map_err(|e| {
                        SendError::Permanent(FsError::Io(format!("staged data unreadable: {e}")))
                    })?;
                let meta = KeyMeta {
                    metadata: metadata.clone(),
                    expiration: *expiration,
                };
                self.backend
                    .put_value(&row.ns, &row.key, bytes.clone(), &self.put_options(&meta))
                    .await
                    .map_err(SendError::from)?;
                Ok(Some(bytes))
            }
            Op::Delete => match self.backend.delete_value(&row.ns, &row.key).await {
                Ok(()) => Ok(None),
                Err(e) => Err(e.into()),
            },
        }
    }

    async fn upload_deletes(&self, ns: &str, deletes: Vec<Row>, round: &mut Round) {
        for chunk in deletes.chunks(limits::MAX_BULK_ITEMS) {
            let keys: Vec<String> = chunk.iter().map(|r| r.key.clone()).collect();
            match self.backend.bulk_delete(ns, &keys).await {
                Ok(result) => {
                    let failed: std::collections::HashSet<&String> =
                        result.unsuccessful_keys.iter().collect();
                    let done: Vec<&Row> =
                        chunk.iter().filter(|r| !failed.contains(&r.key)).collect();
                    round.left += failed.len();
                    round.done += done.len();
                    self.complete(&done, None);
                }
                Err(e) if e.is_permanent() => {
                    // E.g. the namespace was deleted elsewhere: retrying cannot help.
                    for row in chunk {
                        self.refuse(row, &e.to_string());
                    }
                }
                Err(e) => {
                    warn!(
                        "bulk delete of {} keys in namespace {ns} failed, will retry: {e}",
                        keys.len()
                    );
                    round.left += chunk.len();
                }
            }
        }
    }

    /// Retires rows the server confirmed, and makes the caches show the new remote state.
    fn complete(&self, rows: &[&Row], values: Option<&HashMap<String, Bytes>>) {
        if rows.is_empty() {
            return;
        }
        let done: Vec<(String, String, u64)> = rows
            .iter()
            .map(|r| (r.ns.clone(), r.key.clone(), r.seq))
            .collect();
        if let Err(e) = self.journal.complete(&done) {
            // The rows stay; they will be sent again, which is harmless.
            warn!("journal: {e}");
            return;
        }
        let now = Instant::now();
        let mut sent = self.sent.lock().unwrap();
        let mut st = self.state.lock().unwrap();
        for row in rows {
            sent.insert((row.ns.clone(), row.key.clone()), now);
            match &row.op {
                Op::Put {
                    metadata,
                    expiration,
                    ..
                } => {
                    let meta = KeyMeta {
                        metadata: metadata.clone(),
                        expiration: *expiration,
                    };
                    let opts = self.put_options(&meta);
                    let expiration = opts
                        .expiration
                        .or(opts.expiration_ttl.map(|t| now_secs() + t));
                    if let Some(v) = values.and_then(|m| m.get(&row.key)) {
                        let _ = self.cache.insert(
                            (row.ns.clone(), row.key.clone()),
                            v.clone(),
                            expiration,
                        );
                    }
                    st.record_put(
                        &row.ns,
                        KeyInfo {
                            name: row.key.clone(),
                            expiration,
                            metadata: metadata.clone(),
                        },
                    );
                }
                Op::Delete => st.record_delete(&row.ns, &row.key),
            }
            let key = (row.ns.clone(), row.key.clone());
            if st.pending.get(&key).is_some_and(|r| r.seq == row.seq) {
                let old = st.remove_pending(&row.ns, &row.key).unwrap();
                self.drop_blob_if_unused(&st, &old);
            }
        }
        sent.retain(|_, t| t.elapsed() < SAME_KEY_INTERVAL);
    }

    /// Marks a change the server refuses for good: kept in the journal, reported, not retried.
    fn refuse(&self, row: &Row, msg: &str) {
        warn!(
            "upload of key {:?} in namespace {} refused: {msg}; kept in the journal",
            row.key, row.ns
        );
        let _ = self.journal.set_error(&row.ns, &row.key, row.seq, msg);
        let mut st = self.state.lock().unwrap();
        if let Some(r) = st.pending.get_mut(&(row.ns.clone(), row.key.clone())) {
            if r.seq == row.seq {
                r.error = Some(msg.to_string());
            }
        }
    }

    /// fsync: sends the pending change of one key now and waits for the server.
    pub(super) async fn sync_key(&self, ns: &str, key: &str) -> FsResult<()> {
        for _ in 0..3 {
            let row = self
                .state
                .lock()
                .unwrap()
                .pending
                .get(&(ns.to_string(), key.to_string()))
                .cloned();
            let Some(row) = row else { return Ok(()) };
            if let Some(e) = &row.error {
                return Err(FsError::Io(format!("refused by the server earlier: {e}")));
            }
            // Respect the one-write-per-second limit of KV for this key.
            let wait = self
                .sent
                .lock()
                .unwrap()
                .get(&(ns.to_string(), key.to_string()))
                .map(|t| t.elapsed());
            if let Some(since) = wait.filter(|s| *s < SAME_KEY_INTERVAL) {
                tokio::time::sleep(SAME_KEY_INTERVAL - since).await;
            }
            match self.send_row(&row).await {
                Ok(v) => {
                    let values: HashMap<String, Bytes> =
                        v.into_iter().map(|v| (key.to_string(), v)).collect();
                    self.complete(&[&row], Some(&values));
                }
                Err(SendError::Permanent(e)) => {
                    self.refuse(&row, &e.to_string());
                    // The server's status picks the errno (413 → EFBIG, 400 → EINVAL, ...).
                    return Err(e);
                }
                Err(SendError::Transient(msg)) => return Err(FsError::Io(msg)),
            }
        }
        Ok(())
    }

    /// Uploads everything pending, retrying for a while. Returns what could not be uploaded.
    /// `max_fruitless`: rounds in a row without progress before giving up.
    pub async fn flush_all(&self, max_fruitless: u32) -> Vec<String> {
        // Open files first: what they hold now is what a close would record.
        let inos: Vec<u64> = self.state.lock().unwrap().staged.keys().copied().collect();
        for ino in inos {
            if let Err(e) = self.commit(ino) {
                warn!("recording inode {ino}: {e}");
            }
        }
        let mut backoff = Duration::from_millis(200);
        let mut fruitless = 0;
        while self.pending_uploadable() > 0 && fruitless < max_fruitless {
            let round = self.upload_round().await;
            if round.left == 0 {
                continue;
            }
            if round.done == 0 && round.deferred < round.left {
                fruitless += 1;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            tokio::time::sleep(backoff.max(SAME_KEY_INTERVAL / 2)).await;
        }
        let st = self.state.lock().unwrap();
        let left: Vec<String> = st
            .pending
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
            .collect();
        if !left.is_empty() {
            info!("{} changes stay in the journal", left.len());
        }
        left
    }

    /// What the journal holds, for `kvfs status`.
    /// The report fits in one xattr (64 KiB): totals, refused changes first, then a sample.
    pub(super) fn pending_report(&self, st: &State) -> Json {
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
}

fn put_len(r: &Row) -> u64 {
    match r.op {
        Op::Put { len, .. } => len,
        Op::Delete => 0,
    }
}

enum SendError {
    /// The server refused for good (a 4xx other than 429), or the staged data is gone.
    Permanent(FsError),
    /// Worth another try later (5xx, 429, transport), after the client's own retries.
    Transient(String),
}

impl From<BackendError> for SendError {
    fn from(e: BackendError) -> Self {
        if e.is_permanent() {
            SendError::Permanent(FsError::Backend(e))
        } else {
            SendError::Transient(e.to_string())
        }
    }
}
