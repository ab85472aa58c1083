//! The seam between the filesystem core and a Workers KV store.
//!
//! The core (`crate::fs`) speaks only [`KvBackend`]: bytes in and out, errors by meaning. Three
//! stores implement it:
//! - [`crate::client::Client`], the REST API over HTTP (Cloudflare or `kvfs serve`): every HTTP
//!   status, Cloudflare error code and wire quirk (base64 bulk pairs, text-only bulk get) stays
//!   inside it;
//! - [`crate::server::local::LocalStore`], the SQLite store of `kvfs serve` called in-process
//!   (the embedded default: no listener, no token);
//! - [`mem::MemBackend`], in memory, with per-operation counters, scriptable faults and a clock
//!   that tests move.
//!
//! The two in-process stores check their input with the routes' own checks
//! ([`crate::api::limits::check_write`] and its neighbours) and report what the HTTP client would
//! report for the server's answer. `tests/backend_conformance.rs` runs one suite against all
//! three, so they cannot drift.

pub(crate) mod inproc;
pub mod mem;

use crate::api::{BulkResult, KeyInfo, Namespace};
use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Why a backend operation failed, by meaning. The filesystem picks the errno from this alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The key or namespace does not exist.
    NotFound,
    /// A namespace with that title exists.
    Exists,
    /// A value, metadata or answer over KV's size limits (a bulk get over 25 MB too).
    TooLarge,
    /// A key name over 512 bytes.
    NameTooLong,
    /// Input KV refuses for good: bad key name, expiration too soon, bad JSON, ...
    Invalid,
    /// The credentials were refused.
    Denied,
    /// Not reached, rate limited or failing (5xx, 429, transport) after the client's retries:
    /// worth another try later.
    Unavailable,
}

/// A failed backend operation: what kind of failure, and a message for the log that names the
/// operation and key (never a credential).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError {
    pub kind: ErrorKind,
    pub message: String,
}

impl BackendError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Whether retrying the same request can never succeed.
    pub fn is_permanent(&self) -> bool {
        self.kind != ErrorKind::Unavailable
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BackendError {}

pub type Result<T> = std::result::Result<T, BackendError>;

/// Expiration and metadata of a write. `expiration_ttl` wins over `expiration`, as in KV.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PutOptions {
    pub expiration: Option<u64>,
    pub expiration_ttl: Option<u64>,
    pub metadata: Option<Json>,
}

/// One pair of a bulk write.
#[derive(Debug, Clone)]
pub struct WriteItem {
    pub key: String,
    pub value: Bytes,
    pub opts: PutOptions,
}

/// A value read alone.
#[derive(Debug, Clone)]
pub struct ValueResponse {
    pub bytes: Bytes,
    pub expiration: Option<u64>,
}

/// A value read alone, handed out piece by piece as it arrives ([`KvBackend::get_value_stream`]).
pub struct ValueStream {
    /// The value's length, when the store says it before the value (HTTP's Content-Length).
    pub len: Option<u64>,
    pub expiration: Option<u64>,
    body: Box<dyn ValueBody>,
}

/// Where the pieces of a [`ValueStream`] come from.
#[async_trait]
pub trait ValueBody: Send {
    /// The next piece of the value; None at its end.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>>;
}

/// A value read whole: one piece.
struct Whole(Option<Bytes>);

#[async_trait]
impl ValueBody for Whole {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        Ok(self.0.take())
    }
}

impl ValueStream {
    pub fn new(len: Option<u64>, expiration: Option<u64>, body: Box<dyn ValueBody>) -> Self {
        ValueStream {
            len,
            expiration,
            body,
        }
    }

    /// A value already read whole.
    pub fn whole(v: ValueResponse) -> Self {
        let len = Some(v.bytes.len() as u64);
        Self::new(len, v.expiration, Box::new(Whole(Some(v.bytes))))
    }

    /// The next piece of the value; None at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        self.body.next_chunk().await
    }
}

/// What a bulk get says of one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    Value {
        bytes: Bytes,
        metadata: Option<Json>,
        expiration: Option<u64>,
    },
    /// No such key (or it expired).
    Missing,
    /// The key exists but a bulk get cannot carry its value (KV's bulk get returns text, so a
    /// value that is not UTF-8 would come back altered): read it with `get_value`.
    FetchAlone,
}

/// One page of a key listing. `cursor` is empty on the last page; a page may be empty and
/// still have a cursor (expired or deleted keys were walked past).
#[derive(Debug, Clone, Default)]
pub struct KeyPage {
    pub keys: Vec<KeyInfo>,
    pub cursor: String,
}

/// Requests made, by operation name ("list_keys", "get_value", "bulk_write", ...).
pub type RequestCounts = BTreeMap<String, u64>;

/// Operation names, the same for every backend, so request budgets read alike.
pub mod op {
    pub const LIST_NAMESPACES: &str = "list_namespaces";
    pub const CREATE_NAMESPACE: &str = "create_namespace";
    pub const RENAME_NAMESPACE: &str = "rename_namespace";
    pub const DELETE_NAMESPACE: &str = "delete_namespace";
    pub const LIST_KEYS: &str = "list_keys";
    pub const GET_VALUE: &str = "get_value";
    pub const PUT_VALUE: &str = "put_value";
    pub const DELETE_VALUE: &str = "delete_value";
    pub const BULK_GET: &str = "bulk_get";
    pub const BULK_WRITE: &str = "bulk_write";
    pub const BULK_DELETE: &str = "bulk_delete";
}

/// The operations the filesystem needs from a Workers KV store.
///
/// Every method is one request to the store (the bulk ones may take several when the input
/// passes the API's per-request limits); none retries beyond what its transport does.
#[async_trait]
pub trait KvBackend: Send + Sync + 'static {
    /// Where the data lives, for one log line (no secrets).
    fn describe(&self) -> String;

    /// Requests made so far, by operation.
    fn request_counts(&self) -> RequestCounts;

    async fn list_namespaces(&self) -> Result<Vec<Namespace>>;
    /// `Exists` when the title is taken.
    async fn create_namespace(&self, title: &str) -> Result<Namespace>;
    async fn rename_namespace(&self, id: &str, title: &str) -> Result<()>;
    async fn delete_namespace(&self, id: &str) -> Result<()>;

    /// One page of keys starting with `prefix` ("" for all), in byte order; `limit` None is the
    /// API's default (1000).
    async fn list_keys(
        &self,
        ns: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<KeyPage>;

    /// `NotFound` when the key does not exist.
    async fn get_value(&self, ns: &str, key: &str) -> Result<ValueResponse>;
    /// `get_value` (one request, counted as one), handing the value out as it arrives, so a
    /// large one need not be held whole in memory. In-process stores hand it out whole.
    async fn get_value_stream(&self, ns: &str, key: &str) -> Result<ValueStream> {
        Ok(ValueStream::whole(self.get_value(ns, key).await?))
    }
    /// At most 100 keys per request; more are split. Every key asked for is in the answer.
    async fn bulk_get(&self, ns: &str, keys: &[String]) -> Result<HashMap<String, Fetched>>;

    async fn put_value(&self, ns: &str, key: &str, value: Bytes, opts: &PutOptions) -> Result<()>;
    /// `put_value` of the first `len` bytes of `file` (one request, counted as `put_value`):
    /// the HTTP client sends it as it reads it, so a large value is never whole in memory.
    /// In-process stores read it whole.
    async fn put_file(
        &self,
        ns: &str,
        key: &str,
        file: std::sync::Arc<std::fs::File>,
        len: u64,
        opts: &PutOptions,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let mut bytes = vec![0; len as usize];
        file.read_exact_at(&mut bytes, 0).map_err(|e| {
            BackendError::new(ErrorKind::Invalid, format!("put_value {key:?}: {e}"))
        })?;
        self.put_value(ns, key, Bytes::from(bytes), opts).await
    }
    /// Keys in `unsuccessful_keys` were not written and should be sent again.
    async fn bulk_write(&self, ns: &str, items: &[WriteItem]) -> Result<BulkResult>;
    /// Deleting a missing key succeeds.
    async fn delete_value(&self, ns: &str, key: &str) -> Result<()>;
    async fn bulk_delete(&self, ns: &str, keys: &[String]) -> Result<BulkResult>;
}

/// Follows a key listing page by page to its end.
pub struct KeyLister<'a, B: KvBackend + ?Sized> {
    backend: &'a B,
    ns: String,
    prefix: String,
    cursor: Option<String>,
    done: bool,
}

impl<'a, B: KvBackend + ?Sized> KeyLister<'a, B> {
    pub fn new(backend: &'a B, ns: &str, prefix: &str) -> Self {
        KeyLister {
            backend,
            ns: ns.to_string(),
            prefix: prefix.to_string(),
            cursor: None,
            done: false,
        }
    }

    /// The next non-empty batch of keys, or None at the end. An empty page with a cursor is not
    /// the end; a cursor that comes back unchanged is an error (it would loop forever).
    pub async fn next_page(&mut self) -> Result<Option<Vec<KeyInfo>>> {
        while !self.done {
            let page = self
                .backend
                .list_keys(&self.ns, &self.prefix, self.cursor.as_deref(), None)
                .await?;
            if !page.cursor.is_empty() && self.cursor.as_deref() == Some(page.cursor.as_str()) {
                return Err(BackendError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "list_keys {:?}: the listing cursor did not advance",
                        self.prefix
                    ),
                ));
            }
            self.done = page.cursor.is_empty();
            self.cursor = Some(page.cursor);
            if !page.keys.is_empty() {
                return Ok(Some(page.keys));
            }
        }
        Ok(None)
    }
}

/// Every key under `prefix`.
pub async fn list_all<B: KvBackend + ?Sized>(
    backend: &B,
    ns: &str,
    prefix: &str,
) -> Result<Vec<KeyInfo>> {
    let mut lister = KeyLister::new(backend, ns, prefix);
    let mut all = Vec::new();
    while let Some(keys) = lister.next_page().await? {
        all.extend(keys);
    }
    Ok(all)
}

/// Per-operation request counters, shared by the in-process backends.
#[derive(Debug, Default)]
pub struct Counters(Mutex<RequestCounts>);

impl Counters {
    pub fn bump(&self, op: &str) {
        *self.0.lock().unwrap().entry(op.to_string()).or_default() += 1;
    }

    pub fn snapshot(&self) -> RequestCounts {
        self.0.lock().unwrap().clone()
    }

    /// Forgets every count.
    pub fn reset(&self) {
        self.0.lock().unwrap().clear();
    }
}
