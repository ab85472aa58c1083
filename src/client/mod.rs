//! The Workers KV REST API client. The only module that knows reqwest.
//!
//! CONTRACT (the filesystem core codes against these signatures; keep them):
//! every method is async, takes `&self`, and returns `Result<_, Error>`; `Client` is cheap to clone.

use crate::api::{BulkResult, BulkWriteItem, KeyInfo, Namespace};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::time::Duration;

/// How the client authenticates. Debug never shows the secret.
#[derive(Clone)]
pub enum Auth {
    Token(String),
    Key { email: String, key: String },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Token(_) => f.write_str("Auth::Token(<redacted>)"),
            Auth::Key { email, .. } => write!(f, "Auth::Key {{ email: {email:?}, key: <redacted> }}"),
        }
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// e.g. `https://api.cloudflare.com/client/v4` (no trailing slash needed).
    pub base_url: String,
    pub account_id: String,
    pub auth: Auth,
    /// Most requests in flight at once.
    pub max_concurrent: usize,
    /// (requests, window); None = no client-side limiter.
    pub rate_limit: Option<(u32, Duration)>,
    /// Retries after the first attempt for retryable failures.
    pub max_retries: u32,
    /// First backoff step; doubles each retry, with jitter, capped.
    pub base_backoff: Duration,
}

impl ClientConfig {
    /// Settings with the defaults: 16 concurrent, 1200/300 s only against api.cloudflare.com.
    pub fn new(base_url: impl Into<String>, account_id: impl Into<String>, auth: Auth) -> Self {
        todo!()
    }

    /// Reads CLOUDFLARE_API_TOKEN (or CLOUDFLARE_API_KEY + CLOUDFLARE_EMAIL) and
    /// CLOUDFLARE_ACCOUNT_ID; base URL from `base_url` or the default. None when not all set.
    pub fn from_env(base_url: Option<String>) -> Option<Self> {
        todo!()
    }
}

/// A failed operation: which one, on which key, and why.
#[derive(Debug, Clone)]
pub struct Error {
    pub op: &'static str,
    pub key: Option<String>,
    pub kind: ErrorKind,
}

#[derive(Debug, Clone)]
pub enum ErrorKind {
    /// The server answered with an error envelope (or a bare status).
    Api { status: u16, code: Option<u32>, message: String },
    /// Connection failed, timed out, or was dropped (after retries).
    Transport(String),
    /// The response did not parse.
    Decode(String),
}

impl Error {
    pub fn status(&self) -> Option<u16> { todo!() }
    pub fn code(&self) -> Option<u32> { todo!() }
    /// 404 of a key or namespace.
    pub fn is_not_found(&self) -> bool { todo!() }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { todo!() }
}
impl std::error::Error for Error {}

/// Options of a single PUT.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    pub expiration: Option<u64>,
    pub expiration_ttl: Option<u64>,
    pub metadata: Option<Json>,
}

/// A value read with GET.
#[derive(Debug, Clone)]
pub struct ValueResponse {
    pub bytes: bytes::Bytes,
    /// From the `expiration` header.
    pub expiration: Option<u64>,
}

/// One page of a key listing. `cursor` is empty on the last page.
#[derive(Debug, Clone, Default)]
pub struct KeyPage {
    pub keys: Vec<KeyInfo>,
    pub cursor: String,
}

/// One value of a bulk get with metadata: text value (lossy for binary), metadata, expiration.
#[derive(Debug, Clone)]
pub struct BulkValue {
    pub value: String,
    pub metadata: Option<Json>,
    pub expiration: Option<u64>,
}

/// Requests made, by operation name (e.g. "list_keys", "get_value", "bulk_write"), counting retries.
pub type RequestCounts = std::collections::BTreeMap<String, u64>;

#[derive(Clone)]
pub struct Client {
    // implementation-defined, behind an Arc
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self, Error> { todo!() }
    pub fn account_id(&self) -> &str { todo!() }
    pub fn base_url(&self) -> &str { todo!() }

    pub async fn list_namespaces(&self) -> Result<Vec<Namespace>, Error> { todo!() }
    pub async fn create_namespace(&self, title: &str) -> Result<Namespace, Error> { todo!() }
    pub async fn get_namespace(&self, id: &str) -> Result<Namespace, Error> { todo!() }
    pub async fn rename_namespace(&self, id: &str, title: &str) -> Result<(), Error> { todo!() }
    pub async fn delete_namespace(&self, id: &str) -> Result<(), Error> { todo!() }

    /// One page; `limit` None = server default (1000).
    pub async fn list_keys_page(&self, ns: &str, prefix: Option<&str>, cursor: Option<&str>, limit: Option<u32>) -> Result<KeyPage, Error> { todo!() }
    /// Follows the cursor to the end (empty pages with a cursor are not the end).
    pub fn list_keys(&self, ns: &str, prefix: Option<&str>) -> KeyLister { todo!() }
    /// All keys under `prefix`.
    pub async fn list_all_keys(&self, ns: &str, prefix: Option<&str>) -> Result<Vec<KeyInfo>, Error> { todo!() }

    pub async fn get_value(&self, ns: &str, key: &str) -> Result<ValueResponse, Error> { todo!() }
    /// `Ok(None)` when the key exists without metadata; Err not-found when the key does not exist.
    pub async fn get_metadata(&self, ns: &str, key: &str) -> Result<Option<Json>, Error> { todo!() }
    /// Raw body without metadata, multipart when `opts.metadata` is set.
    pub async fn put_value(&self, ns: &str, key: &str, value: bytes::Bytes, opts: &PutOptions) -> Result<(), Error> { todo!() }
    pub async fn delete_value(&self, ns: &str, key: &str) -> Result<(), Error> { todo!() }

    pub async fn bulk_write(&self, ns: &str, items: &[BulkWriteItem]) -> Result<BulkResult, Error> { todo!() }
    pub async fn bulk_delete(&self, ns: &str, keys: &[String]) -> Result<BulkResult, Error> { todo!() }
    /// Bulk get with `withMetadata: true`, `type: text`; a missing key maps to None.
    pub async fn bulk_get(&self, ns: &str, keys: &[String]) -> Result<HashMap<String, Option<BulkValue>>, Error> { todo!() }

    /// Requests made so far, by operation.
    pub fn request_counts(&self) -> RequestCounts { todo!() }
}

/// Iterates a key listing page by page.
pub struct KeyLister { /* implementation-defined */ }

impl KeyLister {
    /// The next non-empty batch of keys, or None at the end.
    pub async fn next_page(&mut self) -> Result<Option<Vec<KeyInfo>>, Error> { todo!() }
}
