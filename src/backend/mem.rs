//! An in-memory Workers KV account: the behaviour of `kvfs serve` (limits, errors, expiration,
//! listing order and cursors, the text-only bulk get) without SQLite or HTTP, plus test aids.
//!
//! Test aids, all `pub` methods of [`MemBackend`]:
//! - counters: [`KvBackend::request_counts`] (one per request, failed ones included) and
//!   [`MemBackend::reset_counts`];
//! - an ordered, bounded log of requests with the keys they named: [`MemBackend::log`],
//!   [`MemBackend::ops`], [`MemBackend::clear_log`];
//! - scriptable faults, which fire before the store changes (a failed request changes nothing):
//!   [`MemBackend::fail_next`], [`MemBackend::fail_next_of`], [`MemBackend::fail_next_with`],
//!   [`MemBackend::refuse_key`], [`MemBackend::allow_key`],
//!   [`MemBackend::set_bulk_get_too_large`], [`MemBackend::unsuccessful_in_next_bulk_write`];
//! - a clock that starts at the system time and moves only forward: [`MemBackend::advance`],
//!   [`MemBackend::now`];
//! - direct access that neither counts, logs nor faults: [`MemBackend::add_namespace`],
//!   [`MemBackend::peek`], [`MemBackend::poke`], [`MemBackend::poke_entry`],
//!   [`MemBackend::keys`].
//!
//! Bulk calls over the API's per-request limits are split as the HTTP client splits them
//! (bulk get: 100 keys; bulk write and delete: 10,000 pairs); every request counts, logs and
//! may fault on its own, so a fault in the second request leaves the first one's writes.

use super::inproc::{self, Clock};
use super::{
    op, BackendError, Counters, ErrorKind, Fetched, KeyPage, KvBackend, PutOptions, RequestCounts,
    Result, ValueResponse, WriteItem,
};
use crate::api::limits::{self, MAX_BULK_GET_KEYS, MAX_BULK_ITEMS};
use crate::api::{BulkResult, Namespace};
use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Requests the log keeps; older ones are dropped first.
pub const LOG_CAPACITY: usize = 10_000;
/// Keys the log keeps over all its requests (bulk requests name up to 10,000 each); older
/// requests are dropped first.
pub const LOG_KEY_CAPACITY: usize = 200_000;

/// One request as the log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedOp {
    /// One of the names in [`super::op`].
    pub op: &'static str,
    /// The namespace id the request named; the title for `create_namespace`; empty for
    /// `list_namespaces`.
    pub ns: String,
    /// The keys the request named (for a bulk request, those of this request only); empty for
    /// namespace operations and listings.
    pub keys: Vec<String>,
    /// Why it failed, if it did.
    pub error: Option<ErrorKind>,
}

/// A stored value with what comes with it, as [`MemBackend::peek`] shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Entry {
    pub value: Bytes,
    pub metadata: Option<Json>,
    /// Absolute, in UNIX seconds.
    pub expiration: Option<u64>,
}

/// A value as stored: metadata as the compact JSON text that was size-checked.
#[derive(Debug, Clone)]
struct Stored {
    value: Bytes,
    metadata: Option<String>,
    expiration: Option<i64>,
}

impl Stored {
    fn live(&self, now: i64) -> bool {
        self.expiration.is_none_or(|e| e > now)
    }
}

#[derive(Debug, Default)]
struct Ns {
    title: String,
    /// `String` orders by bytes, as KV lists keys.
    keys: BTreeMap<String, Stored>,
}

#[derive(Debug)]
struct FaultRule {
    op: Option<String>,
    remaining: u32,
    kind: ErrorKind,
}

#[derive(Debug, Default)]
struct Inner {
    namespaces: BTreeMap<String, Ns>,
    next_id: u64,
    faults: Vec<FaultRule>,
    refused: HashMap<String, ErrorKind>,
    bulk_get_too_large: bool,
    unsuccessful: HashSet<String>,
    log: VecDeque<LoggedOp>,
    /// Keys named by the requests in `log`.
    log_keys: usize,
}

impl Inner {
    fn ns(&self, op: &str, id: &str) -> Result<&Ns> {
        self.namespaces
            .get(id)
            .ok_or_else(|| inproc::namespace_not_found(op, id))
    }

    fn ns_mut(&mut self, op: &str, id: &str) -> Result<&mut Ns> {
        self.namespaces
            .get_mut(id)
            .ok_or_else(|| inproc::namespace_not_found(op, id))
    }

    fn title_taken(&self, title: &str, except: Option<&str>) -> bool {
        self.namespaces
            .iter()
            .any(|(id, ns)| ns.title == title && Some(id.as_str()) != except)
    }

    /// Appends to the log, dropping the oldest requests past its bounds.
    fn record(&mut self, entry: LoggedOp) {
        self.log_keys += entry.keys.len();
        self.log.push_back(entry);
        while self.log.len() > LOG_CAPACITY
            || (self.log_keys > LOG_KEY_CAPACITY && self.log.len() > 1)
        {
            if let Some(old) = self.log.pop_front() {
                self.log_keys -= old.keys.len();
            }
        }
    }

    /// The first scripted fault that applies to `op`, used up by one request.
    fn take_fault(&mut self, op: &str) -> Option<ErrorKind> {
        let i = self
            .faults
            .iter()
            .position(|f| f.op.as_deref().is_none_or(|o| o == op))?;
        let kind = self.faults[i].kind;
        self.faults[i].remaining -= 1;
        if self.faults[i].remaining == 0 {
            self.faults.remove(i);
        }
        Some(kind)
    }

    fn add_namespace(&mut self, op: &str, title: &str) -> Result<Namespace> {
        if self.namespaces.len() as u64 >= limits::MAX_NAMESPACES {
            return Err(inproc::too_many_namespaces(op));
        }
        if self.title_taken(title, None) {
            return Err(inproc::title_exists(op, title));
        }
        self.next_id += 1;
        // Deterministic, so a failing test names the same ids on every run.
        let id = format!("{:032x}", self.next_id);
        self.namespaces.insert(
            id.clone(),
            Ns {
                title: title.to_string(),
                keys: BTreeMap::new(),
            },
        );
        Ok(Namespace {
            id,
            title: title.to_string(),
            supports_url_encoding: true,
        })
    }
}

/// An in-memory Workers KV account with test aids; see the module docs.
#[derive(Debug, Default)]
pub struct MemBackend {
    inner: Mutex<Inner>,
    counters: Counters,
    clock: Clock,
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not poison the store for the others.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One request: counted, then a scripted fault or `f`, then logged. `f` checks everything
    /// before it changes anything, so a refused request changes nothing.
    fn request<T>(
        &self,
        op: &'static str,
        ns: &str,
        keys: Vec<String>,
        f: impl FnOnce(&mut Inner, i64) -> Result<T>,
    ) -> Result<T> {
        self.counters.bump(op);
        let now = self.clock.now();
        let mut inner = self.lock();
        let result = match inner.take_fault(op) {
            Some(kind) => Err(BackendError::new(
                kind,
                format!("{op}: injected fault ({kind:?})"),
            )),
            None => f(&mut inner, now),
        };
        inner.record(LoggedOp {
            op,
            ns: ns.to_string(),
            keys,
            error: result.as_ref().err().map(|e| e.kind),
        });
        result
    }

    // -- test aids: counters and log ---------------------------------------------------------

    /// Forgets the requests counted so far.
    pub fn reset_counts(&self) {
        self.counters.reset();
    }

    /// The requests made, oldest first (at most [`LOG_CAPACITY`] requests naming at most
    /// [`LOG_KEY_CAPACITY`] keys in all, unless one request alone names more).
    pub fn log(&self) -> Vec<LoggedOp> {
        self.lock().log.iter().cloned().collect()
    }

    /// The operation names of [`MemBackend::log`], oldest first.
    pub fn ops(&self) -> Vec<&'static str> {
        self.lock().log.iter().map(|l| l.op).collect()
    }

    pub fn clear_log(&self) {
        let mut inner = self.lock();
        inner.log.clear();
        inner.log_keys = 0;
    }

    // -- test aids: faults --------------------------------------------------------------------

    /// The next `n` requests, of any operation, fail with `Unavailable`.
    pub fn fail_next(&self, n: u32) {
        self.fail_next_with(None, n, ErrorKind::Unavailable);
    }

    /// The next `n` requests of operation `op` (a name in [`super::op`]) fail with
    /// `Unavailable`.
    pub fn fail_next_of(&self, op: &str, n: u32) {
        self.fail_next_with(Some(op), n, ErrorKind::Unavailable);
    }

    /// The next `n` requests of `op` (any operation if None) fail with `kind`. Rules queue up:
    /// a request uses the first one that applies to it.
    pub fn fail_next_with(&self, op: Option<&str>, n: u32, kind: ErrorKind) {
        if n > 0 {
            self.lock().faults.push(FaultRule {
                op: op.map(str::to_string),
                remaining: n,
                kind,
            });
        }
    }

    /// Writes of `key` (`put_value`, and any bulk write holding it, whole) fail with `kind`
    /// until [`MemBackend::allow_key`].
    pub fn refuse_key(&self, key: &str, kind: ErrorKind) {
        self.lock().refused.insert(key.to_string(), kind);
    }

    pub fn allow_key(&self, key: &str) {
        self.lock().refused.remove(key);
    }

    /// While on, every bulk get request answers `TooLarge` (an answer over 25 MB).
    pub fn set_bulk_get_too_large(&self, on: bool) {
        self.lock().bulk_get_too_large = on;
    }

    /// The next bulk write request leaves those of `keys` it holds unwritten and reports them
    /// in `unsuccessful_keys`, as KV does under load; then the set is cleared.
    pub fn unsuccessful_in_next_bulk_write<S: AsRef<str>>(&self, keys: &[S]) {
        let mut inner = self.lock();
        inner.unsuccessful = keys.iter().map(|k| k.as_ref().to_string()).collect();
    }

    // -- test aids: clock ---------------------------------------------------------------------

    /// Moves the clock forward (whole seconds); keys whose expiration passes disappear.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// The backend's time, in UNIX seconds.
    pub fn now(&self) -> u64 {
        self.clock.now().max(0) as u64
    }

    // -- test aids: direct access (not counted, not logged, no faults) ------------------------

    /// Creates a namespace and returns its id; the API's title rules apply.
    pub fn add_namespace(&self, title: &str) -> Result<String> {
        inproc::check_title("add_namespace", title)?;
        Ok(self.lock().add_namespace("add_namespace", title)?.id)
    }

    /// The live entry of `key`, if any.
    pub fn peek(&self, ns: &str, key: &str) -> Option<Entry> {
        let now = self.clock.now();
        let inner = self.lock();
        let s = inner.namespaces.get(ns)?.keys.get(key)?;
        s.live(now).then(|| Entry {
            value: s.value.clone(),
            metadata: inproc::parse_metadata(s.metadata.as_deref()),
            expiration: inproc::expiration_u64(s.expiration),
        })
    }

    /// Stores `value` under `key` without metadata or expiration, unchecked.
    pub fn poke(&self, ns: &str, key: &str, value: impl Into<Bytes>) -> Result<()> {
        self.poke_entry(
            ns,
            key,
            Entry {
                value: value.into(),
                ..Entry::default()
            },
        )
    }

    /// Stores `entry` under `key`, unchecked (any size, any expiration).
    pub fn poke_entry(&self, ns: &str, key: &str, entry: Entry) -> Result<()> {
        let mut inner = self.lock();
        let stored = Stored {
            value: entry.value,
            metadata: entry.metadata.map(|m| m.to_string()),
            expiration: inproc::expiration_i64(entry.expiration),
        };
        inner
            .ns_mut("poke", ns)?
            .keys
            .insert(key.to_string(), stored);
        Ok(())
    }

    /// The live keys of a namespace, in byte order (empty if it does not exist).
    pub fn keys(&self, ns: &str) -> Vec<String> {
        let now = self.clock.now();
        let inner = self.lock();
        inner.namespaces.get(ns).map_or_else(Vec::new, |n| {
            n.keys
                .iter()
                .filter(|(_, s)| s.live(now))
                .map(|(k, _)| k.clone())
                .collect()
        })
    }

    // -- one request of each bulk operation ---------------------------------------------------

    fn bulk_get_one(&self, ns: &str, keys: &[String]) -> Result<HashMap<String, Fetched>> {
        const OP: &str = op::BULK_GET;
        self.request(OP, ns, keys.to_vec(), |inner, now| {
            inproc::check_namespace(OP, ns)?;
            inproc::check_keys(OP, keys)?;
            let n = inner.ns(OP, ns)?;
            if inner.bulk_get_too_large {
                inproc::check_bulk_get_size(OP, limits::MAX_BULK_GET_BYTES + 1)?;
            }
            let found = keys
                .iter()
                .map(|k| {
                    let live = n.keys.get(k).filter(|s| s.live(now));
                    let f = live.map(|s| (s.value.clone(), s.metadata.clone(), s.expiration));
                    (k.clone(), f)
                })
                .collect();
            inproc::bulk_answer(OP, found)
        })
    }

    fn bulk_write_one(&self, ns: &str, items: &[WriteItem]) -> Result<BulkResult> {
        const OP: &str = op::BULK_WRITE;
        let keys = items.iter().map(|i| i.key.clone()).collect();
        self.request(OP, ns, keys, |inner, now| {
            inproc::check_namespace(OP, ns)?;
            if let Some((key, kind)) = items
                .iter()
                .find_map(|i| inner.refused.get(&i.key).map(|k| (&i.key, *k)))
            {
                return Err(BackendError::new(
                    kind,
                    format!("{OP} {key:?}: refused (injected fault)"),
                ));
            }
            // One invalid pair fails the whole request, as the API answers 400 for it.
            let checked = items
                .iter()
                .map(|i| inproc::check_write(OP, &i.key, i.value.len(), &i.opts, now))
                .collect::<Result<Vec<_>>>()?;
            // Looked up first so that a refused request leaves the scripted set for the next.
            inner.ns(OP, ns)?;
            let unsuccessful = std::mem::take(&mut inner.unsuccessful);
            let n = inner.ns_mut(OP, ns)?;
            let mut result = BulkResult::default();
            for (item, c) in items.iter().zip(checked) {
                if unsuccessful.contains(&item.key) {
                    result.unsuccessful_keys.push(item.key.clone());
                    continue;
                }
                n.keys.insert(
                    item.key.clone(),
                    Stored {
                        value: item.value.clone(),
                        metadata: c.metadata,
                        expiration: c.expiration,
                    },
                );
                result.successful_key_count += 1;
            }
            Ok(result)
        })
    }

    fn bulk_delete_one(&self, ns: &str, keys: &[String]) -> Result<BulkResult> {
        const OP: &str = op::BULK_DELETE;
        self.request(OP, ns, keys.to_vec(), |inner, _| {
            inproc::check_namespace(OP, ns)?;
            inproc::check_keys(OP, keys)?;
            let n = inner.ns_mut(OP, ns)?;
            for k in keys {
                n.keys.remove(k);
            }
            Ok(BulkResult {
                successful_key_count: keys.len() as u64,
                unsuccessful_keys: vec![],
            })
        })
    }
}

#[async_trait]
impl KvBackend for MemBackend {
    fn describe(&self) -> String {
        "an in-memory store".to_string()
    }

    fn request_counts(&self) -> RequestCounts {
        self.counters.snapshot()
    }

    async fn list_namespaces(&self) -> Result<Vec<Namespace>> {
        self.request(op::LIST_NAMESPACES, "", vec![], |inner, _| {
            let mut all: Vec<Namespace> = inner
                .namespaces
                .iter()
                .map(|(id, n)| Namespace {
                    id: id.clone(),
                    title: n.title.clone(),
                    supports_url_encoding: true,
                })
                .collect();
            // As the HTTP client asks for them: by title.
            all.sort_by(|a, b| a.title.cmp(&b.title).then_with(|| a.id.cmp(&b.id)));
            Ok(all)
        })
    }

    async fn create_namespace(&self, title: &str) -> Result<Namespace> {
        const OP: &str = op::CREATE_NAMESPACE;
        self.request(OP, title, vec![], |inner, _| {
            inproc::check_title(OP, title)?;
            inner.add_namespace(OP, title)
        })
    }

    async fn rename_namespace(&self, id: &str, title: &str) -> Result<()> {
        const OP: &str = op::RENAME_NAMESPACE;
        self.request(OP, id, vec![], |inner, _| {
            inproc::check_namespace(OP, id)?;
            inproc::check_title(OP, title)?;
            inner.ns(OP, id)?;
            if inner.title_taken(title, Some(id)) {
                return Err(inproc::title_exists(OP, title));
            }
            inner.ns_mut(OP, id)?.title = title.to_string();
            Ok(())
        })
    }

    async fn delete_namespace(&self, id: &str) -> Result<()> {
        const OP: &str = op::DELETE_NAMESPACE;
        self.request(OP, id, vec![], |inner, _| {
            inproc::check_namespace(OP, id)?;
            inner
                .namespaces
                .remove(id)
                .map(drop)
                .ok_or_else(|| inproc::namespace_not_found(OP, id))
        })
    }

    async fn list_keys(
        &self,
        ns: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<KeyPage> {
        const OP: &str = op::LIST_KEYS;
        self.request(OP, ns, vec![], |inner, now| {
            inproc::check_namespace(OP, ns)?;
            let req = inproc::list_request(OP, cursor, limit)?;
            let n = inner.ns(OP, ns)?;
            let after = req.after.map(|a| String::from_utf8_lossy(&a).into_owned());
            let start = match after.as_deref() {
                Some(a) if a >= prefix => Bound::Excluded(a),
                _ => Bound::Included(prefix),
            };
            let mut live = n
                .keys
                .range::<str, _>((start, Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(_, s)| s.live(now));
            let keys: Vec<_> = live
                .by_ref()
                .take(req.limit)
                .map(|(k, s)| inproc::key_info(k.as_bytes(), s.expiration, s.metadata.as_deref()))
                .collect();
            let more = live.next().is_some();
            Ok(inproc::key_page(keys, more))
        })
    }

    async fn get_value(&self, ns: &str, key: &str) -> Result<ValueResponse> {
        const OP: &str = op::GET_VALUE;
        self.request(OP, ns, vec![key.to_string()], |inner, now| {
            inproc::check_namespace(OP, ns)?;
            inproc::check_key(OP, key)?;
            match inner.ns(OP, ns)?.keys.get(key) {
                Some(s) if s.live(now) => Ok(ValueResponse {
                    bytes: s.value.clone(),
                    expiration: inproc::expiration_u64(s.expiration),
                }),
                _ => Err(inproc::key_not_found(OP, key)),
            }
        })
    }

    async fn bulk_get(&self, ns: &str, keys: &[String]) -> Result<HashMap<String, Fetched>> {
        let mut out = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_BULK_GET_KEYS) {
            out.extend(self.bulk_get_one(ns, chunk)?);
        }
        Ok(out)
    }

    async fn put_value(&self, ns: &str, key: &str, value: Bytes, opts: &PutOptions) -> Result<()> {
        const OP: &str = op::PUT_VALUE;
        self.request(OP, ns, vec![key.to_string()], |inner, now| {
            inproc::check_namespace(OP, ns)?;
            if let Some(kind) = inner.refused.get(key) {
                return Err(BackendError::new(
                    *kind,
                    format!("{OP} {key:?}: refused (injected fault)"),
                ));
            }
            let c = inproc::check_write(OP, key, value.len(), opts, now)?;
            inner.ns_mut(OP, ns)?.keys.insert(
                key.to_string(),
                Stored {
                    value,
                    metadata: c.metadata,
                    expiration: c.expiration,
                },
            );
            Ok(())
        })
    }

    async fn bulk_write(&self, ns: &str, items: &[WriteItem]) -> Result<BulkResult> {
        let mut total = BulkResult::default();
        for chunk in items.chunks(MAX_BULK_ITEMS) {
            inproc::merge(&mut total, self.bulk_write_one(ns, chunk)?);
        }
        Ok(total)
    }

    async fn delete_value(&self, ns: &str, key: &str) -> Result<()> {
        const OP: &str = op::DELETE_VALUE;
        self.request(OP, ns, vec![key.to_string()], |inner, _| {
            inproc::check_namespace(OP, ns)?;
            inproc::check_key(OP, key)?;
            // Deleting a missing key succeeds; a missing namespace does not.
            inner.ns_mut(OP, ns)?.keys.remove(key);
            Ok(())
        })
    }

    async fn bulk_delete(&self, ns: &str, keys: &[String]) -> Result<BulkResult> {
        let mut total = BulkResult::default();
        for chunk in keys.chunks(MAX_BULK_ITEMS) {
            inproc::merge(&mut total, self.bulk_delete_one(ns, chunk)?);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &str, value: &str) -> WriteItem {
        WriteItem {
            key: key.to_string(),
            value: Bytes::from(value.to_string()),
            opts: PutOptions::default(),
        }
    }

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    async fn setup() -> (MemBackend, String) {
        let m = MemBackend::new();
        let ns = m.add_namespace("t").unwrap();
        (m, ns)
    }

    #[tokio::test]
    async fn a_faulted_request_changes_nothing_and_counts() {
        let (m, ns) = setup().await;
        m.fail_next(1);
        let e = m
            .put_value(&ns, "k", Bytes::from("v"), &PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(!e.is_permanent());
        assert_eq!(m.peek(&ns, "k"), None);
        m.put_value(&ns, "k", Bytes::from("v"), &PutOptions::default())
            .await
            .unwrap();
        assert_eq!(m.peek(&ns, "k").unwrap().value, Bytes::from("v"));
        assert_eq!(m.request_counts()[op::PUT_VALUE], 2);
        m.reset_counts();
        assert!(m.request_counts().is_empty());
    }

    #[tokio::test]
    async fn faults_of_one_operation_and_kind_queue_up() {
        let (m, ns) = setup().await;
        m.fail_next_of(op::DELETE_VALUE, 2);
        m.fail_next_with(Some(op::GET_VALUE), 1, ErrorKind::Denied);
        m.poke(&ns, "k", "v").unwrap();
        // Other operations pass while the delete rule waits.
        assert_eq!(
            m.get_value(&ns, "k").await.unwrap_err().kind,
            ErrorKind::Denied
        );
        assert_eq!(m.get_value(&ns, "k").await.unwrap().bytes, Bytes::from("v"));
        for _ in 0..2 {
            let e = m.delete_value(&ns, "k").await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Unavailable);
            assert!(m.peek(&ns, "k").is_some());
        }
        m.delete_value(&ns, "k").await.unwrap();
        assert_eq!(m.peek(&ns, "k"), None);
        // Any operation, by default.
        m.fail_next(1);
        assert!(m.list_namespaces().await.is_err());
        assert_eq!(m.list_namespaces().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_refused_key_fails_its_bulk_write_whole() {
        let (m, ns) = setup().await;
        m.refuse_key("bad", ErrorKind::TooLarge);
        let e = m
            .bulk_write(&ns, &[item("a", "1"), item("bad", "2"), item("c", "3")])
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooLarge);
        assert!(m.keys(&ns).is_empty());
        let e = m
            .put_value(&ns, "bad", Bytes::new(), &PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooLarge);
        m.put_value(&ns, "fine", Bytes::new(), &PutOptions::default())
            .await
            .unwrap();
        m.allow_key("bad");
        m.bulk_write(&ns, &[item("a", "1"), item("bad", "2")])
            .await
            .unwrap();
        assert_eq!(m.keys(&ns), keys(&["a", "bad", "fine"]));
    }

    #[tokio::test]
    async fn bulk_get_too_large_on_demand() {
        let (m, ns) = setup().await;
        m.poke(&ns, "k", "small").unwrap();
        m.set_bulk_get_too_large(true);
        let e = m.bulk_get(&ns, &keys(&["k"])).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooLarge);
        m.set_bulk_get_too_large(false);
        let got = m.bulk_get(&ns, &keys(&["k"])).await.unwrap();
        assert!(matches!(&got["k"], Fetched::Value { bytes, .. } if bytes == "small"));
    }

    #[tokio::test]
    async fn unsuccessful_keys_in_the_next_bulk_write_only() {
        let (m, ns) = setup().await;
        m.unsuccessful_in_next_bulk_write(&["b", "zz"]);
        let r = m
            .bulk_write(&ns, &[item("a", "1"), item("b", "2")])
            .await
            .unwrap();
        assert_eq!(r.successful_key_count, 1);
        assert_eq!(r.unsuccessful_keys, keys(&["b"]));
        assert_eq!(m.keys(&ns), keys(&["a"]));
        let r = m.bulk_write(&ns, &[item("b", "2")]).await.unwrap();
        assert_eq!(
            r,
            BulkResult {
                successful_key_count: 1,
                unsuccessful_keys: vec![]
            }
        );
        assert_eq!(m.keys(&ns), keys(&["a", "b"]));
    }

    #[tokio::test]
    async fn the_log_keeps_order_keys_and_outcomes() {
        let (m, ns) = setup().await;
        m.bulk_write(&ns, &[item("a", "1"), item("b", "2")])
            .await
            .unwrap();
        m.fail_next_of(op::BULK_DELETE, 1);
        m.bulk_delete(&ns, &keys(&["a"])).await.unwrap_err();
        m.bulk_delete(&ns, &keys(&["a"])).await.unwrap();
        let log = m.log();
        assert_eq!(
            log,
            vec![
                LoggedOp {
                    op: op::BULK_WRITE,
                    ns: ns.clone(),
                    keys: keys(&["a", "b"]),
                    error: None
                },
                LoggedOp {
                    op: op::BULK_DELETE,
                    ns: ns.clone(),
                    keys: keys(&["a"]),
                    error: Some(ErrorKind::Unavailable)
                },
                LoggedOp {
                    op: op::BULK_DELETE,
                    ns: ns.clone(),
                    keys: keys(&["a"]),
                    error: None
                },
            ]
        );
        m.clear_log();
        assert!(m.ops().is_empty());
        // Bounded: the oldest requests go first.
        for _ in 0..LOG_CAPACITY {
            m.list_namespaces().await.unwrap();
        }
        m.get_value(&ns, "b").await.unwrap();
        let ops = m.ops();
        assert_eq!(ops.len(), LOG_CAPACITY);
        assert_eq!(ops.last(), Some(&op::GET_VALUE));
        assert_eq!(ops[0], op::LIST_NAMESPACES);
        // Bounded in keys too: 21 bulk deletes of 10,000 keys keep the last 20.
        m.clear_log();
        let many: Vec<String> = (0..MAX_BULK_ITEMS).map(|i| format!("d{i}")).collect();
        for _ in 0..21 {
            m.bulk_delete(&ns, &many).await.unwrap();
        }
        let log = m.log();
        assert_eq!(log.len(), LOG_KEY_CAPACITY / MAX_BULK_ITEMS);
        assert!(log
            .iter()
            .all(|l| l.op == op::BULK_DELETE && l.keys.len() == MAX_BULK_ITEMS));
    }

    #[tokio::test]
    async fn split_bulk_requests_count_log_and_fault_one_by_one() {
        let (m, ns) = setup().await;
        let names: Vec<String> = (0..250).map(|i| format!("k{i:03}")).collect();
        let got = m.bulk_get(&ns, &names).await.unwrap();
        assert_eq!(got.len(), 250);
        assert!(got.values().all(|f| *f == Fetched::Missing));
        let sizes: Vec<usize> = m.log().iter().map(|l| l.keys.len()).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
        assert_eq!(m.request_counts()[op::BULK_GET], 3);
        // A refusal in the second request of a split bulk write leaves the first one's pairs.
        let items: Vec<WriteItem> = (0..MAX_BULK_ITEMS + 5)
            .map(|i| item(&format!("w{i:05}"), "x"))
            .collect();
        m.refuse_key("w10002", ErrorKind::Invalid);
        let e = m.bulk_write(&ns, &items).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert_eq!(m.keys(&ns).len(), MAX_BULK_ITEMS);
        assert!(m.peek(&ns, "w10000").is_none());
        m.allow_key("w10002");
        m.reset_counts();
        let r = m.bulk_write(&ns, &items).await.unwrap();
        assert_eq!(r.successful_key_count, (MAX_BULK_ITEMS + 5) as u64);
        assert_eq!(m.request_counts()[op::BULK_WRITE], 2);
    }

    #[tokio::test]
    async fn the_clock_expires_keys_and_direct_access_is_not_counted() {
        let (m, ns) = setup().await;
        let ttl = PutOptions {
            expiration_ttl: Some(60),
            ..PutOptions::default()
        };
        m.put_value(&ns, "k", Bytes::from("v"), &ttl).await.unwrap();
        let exp = m.peek(&ns, "k").unwrap().expiration.unwrap();
        assert_eq!(exp, m.now() + 60);
        m.advance(Duration::from_secs(59));
        assert!(m.get_value(&ns, "k").await.is_ok());
        m.advance(Duration::from_secs(1));
        assert_eq!(
            m.get_value(&ns, "k").await.unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(m.peek(&ns, "k"), None);
        assert!(m.keys(&ns).is_empty());
        m.poke_entry(
            &ns,
            "p",
            Entry {
                value: Bytes::from_static(&[0xff]),
                metadata: Some(serde_json::json!({"m": 1})),
                expiration: Some(m.now() + 5),
            },
        )
        .unwrap();
        assert_eq!(
            m.peek(&ns, "p").unwrap().metadata,
            Some(serde_json::json!({"m": 1}))
        );
        assert_eq!(m.request_counts()[op::PUT_VALUE], 1);
        assert_eq!(m.request_counts()[op::GET_VALUE], 2);
        assert_eq!(m.request_counts().len(), 2);
        assert!(m
            .poke("00000000000000000000000000000999", "k", "v")
            .is_err());
    }
}
