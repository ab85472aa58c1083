//! The uploader: sends what the journal holds in the fewest requests (bulk write, bulk delete,
//! a plain PUT for large values), puts before deletes, and retires what the server confirmed.

use super::journal::{Op, Row};
use super::{Key, State, WriteBack};
use crate::api::limits::{self, now_secs};
use crate::api::KeyInfo;
use crate::backend::{BackendError, WriteItem};
use crate::fs::{FsError, FsResult, KeyMeta};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
// tokio's clock, the one the uploader sleeps on: a paused clock (tests) moves both.
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Values larger than this go up alone with a plain PUT: a bulk body holds values whole in
/// memory, and the daemon's memory must stay bounded.
pub const SINGLE_PUT_BYTES: u64 = 1 << 20;
/// Most value bytes in one bulk write body (well under the API's 100 MB).
pub const BATCH_BYTES: u64 = 16 << 20;
/// KV accepts one write per second to the same key.
const SAME_KEY_INTERVAL: Duration = Duration::from_secs(1);
/// Most large values going up on their own at once (each is read from its staging file as it
/// is sent, so memory does not bound this; the server and the link do).
const LARGE_IN_FLIGHT: usize = 4;
/// How long a large value waits after its close before it goes up on its own (at most
/// `--write-delay`): a rename that follows at once, as rsync's of its temporary file, still
/// finds it pending, so it goes up once, under its final name.
const LARGE_SETTLE: Duration = Duration::from_millis(100);

/// Outcome of one upload round.
#[derive(Debug, Default)]
struct Round {
    done: usize,
    /// Left for a later round (transient failure, unsuccessful_keys, same-key interval).
    left: usize,
    /// Of `left`: held back only by KV's one-write-per-second-per-key limit.
    deferred: usize,
    /// Not sent because an upload of the same key is in flight outside the round (a large
    /// value going up on its own); it retires its row, or leaves it for a later round.
    in_flight: usize,
}

enum SendError {
    /// The server refused for good, or the staged data is gone.
    Permanent(FsError),
    /// Worth another try later, after the client's own retries.
    Transient(String),
}

impl From<BackendError> for SendError {
    fn from(e: BackendError) -> Self {
        if e.is_permanent() {
            // Kept as the backend said it (the reason shown by status), not as a bare errno.
            SendError::Permanent(FsError::Backend(e))
        } else {
            SendError::Transient(e.to_string())
        }
    }
}

/// Packs items of the given sizes, in order, into batches of at most `max_items` items and
/// `max_bytes` bytes. An item larger than `max_bytes` gets a batch of its own.
pub fn plan_batches(sizes: &[u64], max_items: usize, max_bytes: u64) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut bytes = 0;
    for (i, &size) in sizes.iter().enumerate() {
        if !cur.is_empty() && (cur.len() >= max_items || bytes + size > max_bytes) {
            batches.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        cur.push(i);
        bytes += size;
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

impl WriteBack {
    /// The background uploader: after `write_delay` without new changes (or when a full batch
    /// is waiting, or the oldest change has waited long enough), sends everything pending.
    /// Runs until the runtime stops; tokio time, so tests can pause the clock.
    /// Large values go up meanwhile, on their own (`run_large_uploads`).
    pub async fn run_uploader(self: Arc<Self>) {
        tokio::join!(self.clone().run_large_uploads(), self.run_rounds());
    }

    async fn run_rounds(&self) {
        let mut backoff = Duration::from_millis(500);
        loop {
            if self.uploadable() == 0 {
                self.wake.notified().await;
            }
            let started = Instant::now();
            let delay = self.cfg.write_delay;
            let max_wait = (delay * 10).max(Duration::from_secs(5));
            loop {
                let quiet = self.state.lock().unwrap().last_change.elapsed();
                if quiet >= delay
                    || self.uploadable() >= limits::MAX_BULK_ITEMS
                    || started.elapsed() >= max_wait
                {
                    break;
                }
                tokio::time::sleep(delay - quiet).await;
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
            } else if round.in_flight > 0 {
                // Only large values on their way (still pending, so not a reason to wait for
                // a change): the next round when one of them ends, or when a change comes.
                tokio::select! {
                    _ = self.wait_sent(|st| !st.sending.is_empty()) => {}
                    _ = self.wake.notified() => {}
                }
            }
        }
    }

    /// Uploads everything pending, retrying for a while. Returns what could not be uploaded.
    /// `max_fruitless`: rounds in a row without progress before giving up.
    pub async fn flush(&self, max_fruitless: u32) -> Vec<String> {
        let mut backoff = Duration::from_millis(200);
        let mut fruitless = 0;
        while self.uploadable() > 0 && fruitless < max_fruitless {
            let round = self.upload_round().await;
            if round.in_flight > 0 {
                // Large values on their way: wait for one to end, then go again.
                self.wait_sent(|st| !st.sending.is_empty()).await;
                continue;
            }
            if round.left == 0 {
                continue;
            }
            if round.done == 0 && round.deferred < round.left {
                fruitless += 1;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            tokio::time::sleep(backoff.max(SAME_KEY_INTERVAL / 2)).await;
        }
        let left = self.leftovers();
        if !left.is_empty() {
            info!(
                "{} left in the journal",
                crate::text::count(left.len() as u64, "change")
            );
        }
        left
    }

    /// fsync: sends the pending change of one key now and waits for the server.
    pub async fn sync_key(&self, ns: &str, key: &str) -> FsResult<()> {
        let k = (ns.to_string(), key.to_string());
        for _ in 0..3 {
            // A large value going up on its own: wait for that upload, then look again.
            let _claim = loop {
                match self.claim(&k) {
                    Some(c) => break c,
                    None => self.wait_sent(|st| st.sending.contains(&k)).await,
                }
            };
            let Some(row) = self.pending(ns, key) else {
                return Ok(());
            };
            if let Some(e) = &row.error {
                return Err(FsError::Io(format!("refused by the server earlier: {e}")));
            }
            // Respect the one-write-per-second limit of KV for this key.
            let since = {
                let st = self.state.lock().unwrap();
                st.sent.get(&k).map(|t| t.elapsed())
            };
            if let Some(since) = since.filter(|s| *s < SAME_KEY_INTERVAL) {
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
                    // The kind of refusal picks the errno (too large → EFBIG, invalid → EINVAL).
                    return Err(e);
                }
                Err(SendError::Transient(msg)) => return Err(FsError::Io(msg)),
            }
        }
        Ok(())
    }

    /// One pass over everything pending: per namespace, puts (bulk, or alone when large), then
    /// deletes — held back while any put of that namespace failed, so a rename's old key is
    /// never removed before its new key is safe.
    async fn upload_round(&self) -> Round {
        let _one_round = self.round.lock().await;
        let mut round = Round::default();
        let mut by_ns: BTreeMap<String, (Vec<Row>, Vec<Row>)> = BTreeMap::new();
        // Namespaces with an upload in flight outside the round: their deletes wait for it.
        let mut busy: HashSet<String> = HashSet::new();
        {
            let st = self.state.lock().unwrap();
            for r in st.pending.values().filter(|r| r.error.is_none()) {
                if st.sending.contains(&(r.ns.clone(), r.key.clone())) {
                    round.in_flight += 1;
                    busy.insert(r.ns.clone());
                    continue;
                }
                let recent = st
                    .sent
                    .get(&(r.ns.clone(), r.key.clone()))
                    .is_some_and(|t| t.elapsed() < SAME_KEY_INTERVAL);
                if recent {
                    round.left += 1;
                    round.deferred += 1;
                    continue;
                }
                let e = by_ns.entry(r.ns.clone()).or_default();
                match r.op {
                    Op::Put { .. } => e.0.push(r.clone()),
                    Op::Delete => e.1.push(r.clone()),
                }
            }
        }
        for (ns, (puts, deletes)) in by_ns {
            let puts_ok = self.upload_puts(&ns, puts, &mut round).await;
            // A refused put may be the new name of a renamed key: its old key must stay.
            let refused = {
                let st = self.state.lock().unwrap();
                let any = super::under(&st.pending, &ns, "")
                    .any(|(_, r)| r.error.is_some() && matches!(r.op, Op::Put { .. }));
                any
            };
            if !puts_ok || refused || busy.contains(&ns) {
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
            // Claimed, so that the sender of large values does not send it too.
            let Some(_claim) = self.claim(&(row.ns.clone(), row.key.clone())) else {
                round.in_flight += 1;
                all_ok = false;
                continue;
            };
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
            let bytes = match self.blob_bytes(blob) {
                Ok(b) => b,
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
                let failed: HashSet<&String> = result.unsuccessful_keys.iter().collect();
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
        let unreadable = |e: std::io::Error| {
            SendError::Permanent(FsError::Io(format!("staged data unreadable: {e}")))
        };
        match &row.op {
            Op::Put {
                blob,
                len,
                metadata,
                expiration,
            } => {
                let meta = KeyMeta {
                    metadata: metadata.clone(),
                    expiration: *expiration,
                };
                // A large value has a staging file (content past `blob::SPILL_BYTES` spills).
                if let Some(file) = self.blob_file(blob).filter(|_| *len > SINGLE_PUT_BYTES) {
                    self.put_large(row, file.map_err(unreadable)?, *len, &meta)
                        .await?;
                    return Ok(None);
                }
                let bytes = self.blob_bytes(blob).map_err(unreadable)?;
                self.backend
                    .put_value(&row.ns, &row.key, bytes.clone(), &self.put_options(&meta))
                    .await?;
                Ok(Some(bytes))
            }
            Op::Delete => {
                self.backend.delete_value(&row.ns, &row.key).await?;
                Ok(None)
            }
        }
    }

    async fn upload_deletes(&self, ns: &str, deletes: Vec<Row>, round: &mut Round) {
        for chunk in deletes.chunks(limits::MAX_BULK_ITEMS) {
            let keys: Vec<String> = chunk.iter().map(|r| r.key.clone()).collect();
            match self.backend.bulk_delete(ns, &keys).await {
                Ok(result) => {
                    let failed: HashSet<&String> = result.unsuccessful_keys.iter().collect();
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

    /// Retires rows the server confirmed, and makes the read path show the new remote state.
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
        for row in rows {
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
                    let expiration = stored_expiration(&self.put_options(&meta));
                    if let Some(v) = values.and_then(|m| m.get(&row.key)) {
                        self.remote
                            .cache_value(&row.ns, &row.key, v.clone(), expiration);
                    }
                    self.remote.record_put(
                        &row.ns,
                        KeyInfo {
                            name: row.key.clone(),
                            expiration,
                            metadata: metadata.clone(),
                        },
                    );
                }
                Op::Delete => self.remote.record_delete(&row.ns, &row.key),
            }
        }
        let mut st = self.state.lock().unwrap();
        let mut orphans = Vec::new();
        for row in rows {
            let key = (row.ns.clone(), row.key.clone());
            st.sent.insert(key.clone(), now);
            match st.pending.get_mut(&key) {
                Some(r) if r.seq == row.seq => {
                    let old = st.pending.remove(&key);
                    self.unhold_row(&mut st, old.as_ref());
                }
                // Changed again while this went up: the server has the key now, so a delete
                // of it must be sent, not dropped as a never-uploaded key's.
                Some(r) if matches!(row.op, Op::Put { .. }) => r.remote = true,
                // Deleted (as never uploaded) while this went up: the delete must follow.
                None if matches!(row.op, Op::Put { .. }) => orphans.push(key),
                _ => {}
            }
        }
        st.sent.retain(|_, t| t.elapsed() < SAME_KEY_INTERVAL);
        drop(st);
        for (ns, key) in orphans {
            if let Err(e) = self.record(&ns, &key, Op::Delete, true) {
                warn!("key {key:?} in namespace {ns}: deleting it after its upload: {e}");
            }
        }
    }

    /// Marks a change the server refuses for good: kept in the journal, reported, not retried.
    fn refuse(&self, row: &Row, msg: &str) {
        warn!(
            "upload of key {:?} in namespace {} refused: {msg}; kept in the journal",
            row.key, row.ns
        );
        let _ = self.journal.set_error(&row.ns, &row.key, row.seq, msg);
        let mut st: std::sync::MutexGuard<'_, State> = self.state.lock().unwrap();
        if let Some(r) = st.pending.get_mut(&(row.ns.clone(), row.key.clone())) {
            if r.seq == row.seq {
                r.error = Some(msg.to_string());
            }
        }
    }
}

/// One key's upload in flight outside a round; ends (and wakes those waiting) when dropped.
struct Claim<'a> {
    wb: &'a WriteBack,
    key: Key,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.wb.state.lock().unwrap().sending.remove(&self.key);
        self.wb.sent_one.notify_waiters();
        self.wb.large_wake.notify_one();
    }
}

/// Whether a row is a large value's put, sent alone with a plain PUT.
fn is_large(row: &Row) -> bool {
    matches!(row.op, Op::Put { len, .. } if len > SINGLE_PUT_BYTES) && row.error.is_none()
}

/// Queues a row just recorded for the sender of large values if it is one (returns whether),
/// and forgets the key's earlier queued value otherwise.
pub(super) fn queue_large(st: &mut State, row: &Row) -> bool {
    let key = (row.ns.clone(), row.key.clone());
    if is_large(row) {
        st.large.insert(key, Instant::now());
        true
    } else {
        st.large.remove(&key);
        false
    }
}

/// What the sender of large values finds in the queue.
enum Next {
    Send(Row),
    /// Nothing to send before this moment (a value settling, a key written less than a
    /// second ago), or nothing at all.
    Wait(Option<Instant>),
}

impl WriteBack {
    /// Sends large values as they are recorded, each on its own with a plain PUT, up to
    /// `LARGE_IN_FLIGHT` at once: they cannot share a bulk write, so waiting for the quiet
    /// moment the uploader waits for would only delay them (a copy of many large files would
    /// upload them one by one after it ends). KV's one-write-per-second-per-key limit holds;
    /// a failed upload is left to the uploader's rounds.
    pub async fn run_large_uploads(self: Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let mut wake_at = None;
            while tasks.len() < LARGE_IN_FLIGHT {
                match self.next_large() {
                    Next::Send(row) => {
                        let me = self.clone();
                        tasks.spawn(async move { me.send_large(row).await });
                    }
                    Next::Wait(at) => {
                        wake_at = at;
                        break;
                    }
                }
            }
            let sleep = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now));
            tokio::select! {
                _ = self.large_wake.notified() => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = sleep, if wake_at.is_some() => {}
            }
        }
    }

    /// The next queued large value that may go now, claimed (in `sending`) for the caller.
    fn next_large(&self) -> Next {
        let settle = LARGE_SETTLE.min(self.cfg.write_delay);
        let mut st = self.state.lock().unwrap();
        let mut queued: Vec<(Key, Instant)> =
            st.large.iter().map(|(k, t)| (k.clone(), *t)).collect();
        queued.sort_by_key(|(_, t)| *t);
        let mut wake_at: Option<Instant> = None;
        let mut soonest = |at: Instant| wake_at = Some(wake_at.map_or(at, |w: Instant| w.min(at)));
        for (key, recorded) in queued {
            let row = match st.pending.get(&key) {
                Some(r) if is_large(r) => r.clone(),
                _ => {
                    st.large.remove(&key);
                    continue;
                }
            };
            if st.sending.contains(&key) {
                continue; // its claim's end wakes the sender
            }
            if recorded.elapsed() < settle {
                soonest(recorded + settle);
                continue;
            }
            if let Some(sent) = st
                .sent
                .get(&key)
                .filter(|t| t.elapsed() < SAME_KEY_INTERVAL)
            {
                soonest(*sent + SAME_KEY_INTERVAL);
                continue;
            }
            st.large.remove(&key);
            st.sending.insert(key);
            return Next::Send(row);
        }
        Next::Wait(wake_at)
    }

    /// A large value's PUT, sent from its staging file as it is read; once confirmed, the value
    /// is cached from that file. Never whole in memory.
    async fn put_large(
        &self,
        row: &Row,
        file: std::fs::File,
        len: u64,
        meta: &KeyMeta,
    ) -> Result<(), SendError> {
        let file = Arc::new(file);
        let opts = self.put_options(meta);
        self.backend
            .put_file(&row.ns, &row.key, file.clone(), len, &opts)
            .await?;
        // Before the row retires, so that reads go from the staged value to this one.
        let expiration = stored_expiration(&opts);
        self.remote
            .cache_file(&row.ns, &row.key, &file, len, expiration);
        Ok(())
    }

    /// Uploads one large value claimed by `next_large`.
    async fn send_large(&self, row: Row) {
        let _claim = Claim {
            wb: self,
            key: (row.ns.clone(), row.key.clone()),
        };
        let mut round = Round::default();
        self.upload_single(&row, &mut round).await;
        if round.left > 0 {
            // Left for the uploader's rounds, with their backoff.
            self.wake.notify_one();
        }
    }

    /// Claims `key` for one upload, unless one is in flight already.
    fn claim(&self, key: &Key) -> Option<Claim<'_>> {
        let mut st = self.state.lock().unwrap();
        if !st.sending.insert(key.clone()) {
            return None;
        }
        st.large.remove(key);
        Some(Claim {
            wb: self,
            key: key.clone(),
        })
    }

    /// Waits until an upload in flight ends, if `busy` says one is awaited.
    async fn wait_sent(&self, busy: impl Fn(&State) -> bool) {
        let ended = self.sent_one.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if busy(&self.state.lock().unwrap()) {
            ended.await;
        }
    }
}

/// When a value written with `opts` expires, as the cache and listings record it.
fn stored_expiration(opts: &crate::backend::PutOptions) -> Option<u64> {
    opts.expiration
        .or(opts.expiration_ttl.map(|t| now_secs() + t))
}

fn put_len(r: &Row) -> u64 {
    match r.op {
        Op::Put { len, .. } => len,
        Op::Delete => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{WriteBack, WriteBackConfig};
    use super::plan_batches;
    use super::{Op, Row};
    use crate::backend::mem::MemBackend;
    use crate::cache::ValueCache;
    use crate::fs::attrs::AttrStore;
    use crate::fs::remote::Remote;
    use std::sync::Arc;
    use std::time::Duration;

    fn write_back(dir: &std::path::Path) -> WriteBack {
        let backend = Arc::new(MemBackend::new());
        let attrs = Arc::new(AttrStore::open(&dir.join("attrs.sqlite3")).unwrap());
        let cache = ValueCache::new(1 << 20, dir.join("values")).unwrap();
        let remote = Arc::new(Remote::new(
            backend.clone(),
            cache,
            attrs,
            Duration::from_secs(30),
        ));
        let cfg = WriteBackConfig {
            write_delay: Duration::from_secs(60),
            expiration_ttl: None,
        };
        WriteBack::open(dir, backend, remote, cfg).unwrap()
    }

    fn put(wb: &WriteBack, key: &str) -> Row {
        let blob = wb.new_blob().name().to_string();
        let op = Op::Put {
            blob: blob.clone(),
            len: 0,
            metadata: None,
            expiration: None,
        };
        wb.record("ns", key, op, false).unwrap();
        wb.release_blob(&blob);
        wb.pending("ns", key).unwrap()
    }

    /// A put the server confirms after the key changed again, or was deleted as never
    /// uploaded, in the meantime: the server has the key, so its delete must be sent.
    #[test]
    fn changes_while_a_put_is_in_flight_keep_the_server_in_view() {
        let dir = tempfile::tempdir().unwrap();
        let wb = write_back(dir.path());
        let sent = put(&wb, "deleted");
        wb.record_delete("ns", "deleted", false).unwrap();
        assert!(wb.pending("ns", "deleted").is_none());
        wb.complete(&[&sent], None);
        let row = wb.pending("ns", "deleted").unwrap();
        assert_eq!((row.op, row.remote), (Op::Delete, true));

        let sent = put(&wb, "changed");
        put(&wb, "changed");
        wb.complete(&[&sent], None);
        assert!(wb.pending("ns", "changed").unwrap().remote);
    }

    #[test]
    fn batches_respect_count_and_bytes() {
        assert!(plan_batches(&[], 10, 100).is_empty());
        assert_eq!(
            plan_batches(&[1; 25], 10, 100),
            vec![
                (0..10).collect::<Vec<_>>(),
                (10..20).collect(),
                (20..25).collect()
            ]
        );
        assert_eq!(
            plan_batches(&[60, 60, 30, 200, 1], 10, 100),
            vec![vec![0], vec![1, 2], vec![3], vec![4]]
        );
        // 10,000 small values: one bulk write.
        assert_eq!(plan_batches(&vec![100; 10_000], 10_000, 16 << 20).len(), 1);
    }
}
