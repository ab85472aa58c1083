//! The Workers KV REST API client. The only module that knows reqwest.
//!
//! Its inherent methods are the wire API, one per REST operation (tests/client.rs checks them
//! against scripted and real servers); `backend.rs` implements [`crate::backend::KvBackend`] on
//! top of them, turning statuses and Cloudflare codes into errors by meaning.
//!
//! Inside: `http` sends one request (budget, concurrency bound, retries, counters, log line),
//! `retry` decides waits, `ratelimit` keeps the request budget, `encode` builds URLs.

mod backend;
mod encode;
mod http;
mod ratelimit;
mod retry;

pub use crate::backend::{KeyPage, PutOptions, RequestCounts, ValueResponse};
pub use encode::encode_component;

use crate::api::limits::{self, KeyError};
use crate::api::{
    BulkGetBody, BulkResult, BulkWriteItem, CursorInfo, KeyInfo, Namespace, PageInfo, TitleBody,
};
use http::{Body, Content, Inner, Req};
use reqwest::Method;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Default base URL of the Cloudflare API.
pub const CLOUDFLARE_API: &str = "https://api.cloudflare.com/client/v4";

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
            Auth::Key { email, .. } => {
                write!(f, "Auth::Key {{ email: {email:?}, key: <redacted> }}")
            }
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

/// Cloudflare's budget: about 1,200 requests per 5 minutes per user.
pub const CLOUDFLARE_RATE_LIMIT: (u32, Duration) = (1200, Duration::from_secs(300));

impl ClientConfig {
    /// Settings with the defaults: 16 concurrent, 1200/300 s only against api.cloudflare.com.
    pub fn new(base_url: impl Into<String>, account_id: impl Into<String>, auth: Auth) -> Self {
        let base_url = base_url.into().trim_end_matches('/').to_string();
        let is_cloudflare = reqwest::Url::parse(&base_url)
            .ok()
            .and_then(|u| {
                u.host_str()
                    .map(|h| h.eq_ignore_ascii_case("api.cloudflare.com"))
            })
            .unwrap_or(false);
        ClientConfig {
            base_url,
            account_id: account_id.into(),
            auth,
            max_concurrent: 16,
            rate_limit: is_cloudflare.then_some(CLOUDFLARE_RATE_LIMIT),
            max_retries: 8,
            base_backoff: Duration::from_millis(100),
        }
    }

    /// Reads CLOUDFLARE_API_TOKEN (or CLOUDFLARE_API_KEY + CLOUDFLARE_EMAIL) and
    /// CLOUDFLARE_ACCOUNT_ID; base URL from `base_url` or the default. None when not all set.
    pub fn from_env(base_url: Option<String>) -> Option<Self> {
        Self::from_lookup(base_url, |name| std::env::var(name).ok())
    }

    /// `from_env` over any variable source (tests must not race on the process environment).
    /// The base URL falls back to CLOUDFLARE_API_BASE_URL (wrangler's name), then Cloudflare.
    pub fn from_lookup(
        base_url: Option<String>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Option<Self> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let account = var("CLOUDFLARE_ACCOUNT_ID")?;
        let auth = match var("CLOUDFLARE_API_TOKEN") {
            Some(token) => Auth::Token(token),
            None => Auth::Key {
                email: var("CLOUDFLARE_EMAIL")?,
                key: var("CLOUDFLARE_API_KEY")?,
            },
        };
        let base = base_url
            .filter(|b| !b.trim().is_empty())
            .or_else(|| var("CLOUDFLARE_API_BASE_URL"))
            .unwrap_or_else(|| CLOUDFLARE_API.to_string());
        Some(Self::new(base, account, auth))
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
    Api {
        status: u16,
        code: Option<u32>,
        message: String,
    },
    /// Connection failed, timed out, or was dropped (after retries).
    Transport(String),
    /// The response did not parse.
    Decode(String),
}

impl Error {
    pub fn status(&self) -> Option<u16> {
        match self.kind {
            ErrorKind::Api { status, .. } => Some(status),
            _ => None,
        }
    }
    pub fn code(&self) -> Option<u32> {
        match self.kind {
            ErrorKind::Api { code, .. } => code,
            _ => None,
        }
    }
    /// 404 of a key or namespace.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    fn decode(op: &'static str, key: Option<&str>, why: impl std::fmt::Display) -> Self {
        Error {
            op,
            key: key.map(str::to_string),
            kind: ErrorKind::Decode(why.to_string()),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.op)?;
        if let Some(key) = &self.key {
            // Debug quoting shows control characters in odd key names unambiguously.
            write!(f, " {key:?}")?;
        }
        match &self.kind {
            ErrorKind::Api {
                status,
                code: Some(code),
                message,
            } => {
                write!(f, ": HTTP {status} (code {code}): {message}")
            }
            ErrorKind::Api {
                status,
                code: None,
                message,
            } => write!(f, ": HTTP {status}: {message}"),
            ErrorKind::Transport(why) => write!(f, ": {why}"),
            ErrorKind::Decode(why) => write!(f, ": unexpected response: {why}"),
        }
    }
}
impl std::error::Error for Error {}

/// The `expiration` header of a value read alone.
fn expiration_header(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    headers
        .get("expiration")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The body of a value read alone, chunk by chunk as reqwest receives it.
struct ResponseBody {
    resp: reqwest::Response,
    key: String,
}

#[async_trait::async_trait]
impl crate::backend::ValueBody for ResponseBody {
    async fn next_chunk(&mut self) -> crate::backend::Result<Option<bytes::Bytes>> {
        self.resp.chunk().await.map_err(|e| {
            // Worth another try: the connection dropped or timed out mid-body.
            crate::backend::BackendError::new(
                crate::backend::ErrorKind::Unavailable,
                format!("get_value {:?}: {}", self.key, http::describe(&e)),
            )
        })
    }
}

/// One value of a bulk get with metadata: text value (lossy for binary), metadata, expiration.
#[derive(Debug, Clone)]
pub struct BulkValue {
    pub value: String,
    pub metadata: Option<Json>,
    pub expiration: Option<u64>,
}

#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Shows where the client points, never its credentials.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.base_url())
            .field("account_id", &self.account_id())
            .finish_non_exhaustive()
    }
}

/// Namespace listing page size: the API's maximum, so most accounts take one request.
const NAMESPACE_PAGE: u32 = limits::MAX_PER_PAGE;

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self, Error> {
        Ok(Client {
            inner: Arc::new(Inner::new(config)?),
        })
    }
    pub fn account_id(&self) -> &str {
        &self.inner.config.account_id
    }
    pub fn base_url(&self) -> &str {
        &self.inner.config.base_url
    }

    pub async fn list_namespaces(&self) -> Result<Vec<Namespace>, Error> {
        const OP: &str = "list_namespaces";
        let mut all: Vec<Namespace> = Vec::new();
        for page in 1u64.. {
            let query = [
                ("page", page.to_string()),
                ("per_page", NAMESPACE_PAGE.to_string()),
                ("order", "title".to_string()),
                ("direction", "asc".to_string()),
            ];
            let req = Req::new(OP, None, Method::GET, self.inner.namespaces_url("", &query));
            let (items, info): (Vec<Namespace>, Option<PageInfo>) =
                self.inner.call_json_info(req).await?;
            let got = items.len();
            // A server that ignores `page` would repeat page 1 forever.
            if page > 1 && items.first().map(|n| &n.id) == all.first().map(|n| &n.id) {
                return Err(Error::decode(
                    OP,
                    None,
                    "the server repeated the first page",
                ));
            }
            all.extend(items);
            // Stop at a short (or empty) page, or once the announced total is in hand.
            let total = info.map(|i| i.total_count).unwrap_or(0);
            if got < NAMESPACE_PAGE as usize || (total > 0 && all.len() as u64 >= total) {
                break;
            }
        }
        Ok(all)
    }

    pub async fn create_namespace(&self, title: &str) -> Result<Namespace, Error> {
        const OP: &str = "create_namespace";
        let url = self.inner.namespaces_url("", &[]);
        let req = Req::new(OP, Some(title), Method::POST, url).json(&TitleBody {
            title: title.into(),
        })?;
        self.inner.call_result(req).await
    }

    pub async fn get_namespace(&self, id: &str) -> Result<Namespace, Error> {
        const OP: &str = "get_namespace";
        let url = self.inner.namespace_url(OP, id, "", &[])?;
        self.inner
            .call_result(Req::new(OP, Some(id), Method::GET, url))
            .await
    }

    pub async fn rename_namespace(&self, id: &str, title: &str) -> Result<(), Error> {
        const OP: &str = "rename_namespace";
        let url = self.inner.namespace_url(OP, id, "", &[])?;
        let req = Req::new(OP, Some(id), Method::PUT, url).json(&TitleBody {
            title: title.into(),
        })?;
        self.inner.call_unit(req).await
    }

    pub async fn delete_namespace(&self, id: &str) -> Result<(), Error> {
        const OP: &str = "delete_namespace";
        let url = self.inner.namespace_url(OP, id, "", &[])?;
        self.inner
            .call_unit(Req::new(OP, Some(id), Method::DELETE, url))
            .await
    }

    /// One page; `limit` None = server default (1000).
    pub async fn list_keys_page(
        &self,
        ns: &str,
        prefix: Option<&str>,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<KeyPage, Error> {
        const OP: &str = "list_keys";
        let mut query = Vec::new();
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        // The cursor does not remember the prefix: send it with every page.
        if let Some(prefix) = prefix.filter(|p| !p.is_empty()) {
            query.push(("prefix", prefix.to_string()));
        }
        if let Some(cursor) = cursor.filter(|c| !c.is_empty()) {
            query.push(("cursor", cursor.to_string()));
        }
        let url = self.inner.namespace_url(OP, ns, "/keys", &query)?;
        let req = Req::new(OP, prefix, Method::GET, url);
        let (keys, info): (Vec<KeyInfo>, Option<CursorInfo>) =
            self.inner.call_json_info(req).await?;
        Ok(KeyPage {
            keys,
            cursor: info.map(|i| i.cursor).unwrap_or_default(),
        })
    }

    /// Every key under `prefix`, following the cursor to the end.
    pub async fn list_all_keys(
        &self,
        ns: &str,
        prefix: Option<&str>,
    ) -> Result<Vec<KeyInfo>, crate::backend::BackendError> {
        crate::backend::list_all(self, ns, prefix.unwrap_or("")).await
    }

    pub async fn get_value(&self, ns: &str, key: &str) -> Result<ValueResponse, Error> {
        const OP: &str = "get_value";
        let url = self.inner.key_url(OP, ns, "/values/", key)?;
        let resp = self
            .inner
            .call(&Req::new(OP, Some(key), Method::GET, url))
            .await?;
        Ok(ValueResponse {
            expiration: expiration_header(&resp.headers),
            bytes: resp.body,
        })
    }

    /// `get_value`, with the body handed out as it arrives (reqwest's chunks).
    pub async fn get_value_stream(
        &self,
        ns: &str,
        key: &str,
    ) -> Result<crate::backend::ValueStream, Error> {
        const OP: &str = "get_value";
        let url = self.inner.key_url(OP, ns, "/values/", key)?;
        let (headers, resp) = self
            .inner
            .call_streamed(&Req::new(OP, Some(key), Method::GET, url))
            .await?;
        let len = resp.content_length();
        let body = ResponseBody {
            resp,
            key: key.to_string(),
        };
        Ok(crate::backend::ValueStream::new(
            len,
            expiration_header(&headers),
            Box::new(body),
        ))
    }

    /// `Ok(None)` when the key exists without metadata; Err not-found when the key does not exist.
    pub async fn get_metadata(&self, ns: &str, key: &str) -> Result<Option<Json>, Error> {
        const OP: &str = "get_metadata";
        let url = self.inner.key_url(OP, ns, "/metadata/", key)?;
        let req = Req::new(OP, Some(key), Method::GET, url);
        let meta: Option<Json> = self.inner.call_result_opt(req).await?;
        Ok(meta.filter(|m| !m.is_null()))
    }

    /// Raw body without metadata, multipart when `opts.metadata` is set.
    pub async fn put_value(
        &self,
        ns: &str,
        key: &str,
        value: bytes::Bytes,
        opts: &PutOptions,
    ) -> Result<(), Error> {
        self.put_content(ns, key, Content::Bytes(value), opts).await
    }

    /// `put_value` of the first `len` bytes of `file`, read as they are sent (so a large value
    /// is never whole in memory), from the start again for each attempt.
    pub async fn put_file(
        &self,
        ns: &str,
        key: &str,
        file: Arc<std::fs::File>,
        len: u64,
        opts: &PutOptions,
    ) -> Result<(), Error> {
        self.put_content(ns, key, Content::File { file, len }, opts)
            .await
    }

    async fn put_content(
        &self,
        ns: &str,
        key: &str,
        value: Content,
        opts: &PutOptions,
    ) -> Result<(), Error> {
        const OP: &str = "put_value";
        let mut query = Vec::new();
        if let Some(e) = opts.expiration {
            query.push(("expiration", e.to_string()));
        }
        if let Some(ttl) = opts.expiration_ttl {
            query.push(("expiration_ttl", ttl.to_string()));
        }
        let url = self.inner.key_url_query(OP, ns, "/values/", key, &query)?;
        let body = match &opts.metadata {
            Some(meta) => Body::Multipart {
                value,
                metadata: meta.to_string(),
            },
            None => Body::Raw(value),
        };
        self.inner
            .call_unit(Req::new(OP, Some(key), Method::PUT, url).body(body))
            .await
    }

    pub async fn delete_value(&self, ns: &str, key: &str) -> Result<(), Error> {
        const OP: &str = "delete_value";
        let url = self.inner.key_url(OP, ns, "/values/", key)?;
        self.inner
            .call_unit(Req::new(OP, Some(key), Method::DELETE, url))
            .await
    }

    /// Bulk write. More than 10,000 pairs, or a body over 100 MB, is split into several
    /// requests; the results are summed.
    pub async fn bulk_write(&self, ns: &str, items: &[BulkWriteItem]) -> Result<BulkResult, Error> {
        let size = |i: &BulkWriteItem| i.key.len() + i.value.len();
        self.bulk("bulk_write", Method::PUT, ns, "/bulk", items, size)
            .await
    }

    /// Bulk delete (`POST .../bulk/delete`), split into requests of at most 10,000 keys.
    pub async fn bulk_delete(&self, ns: &str, keys: &[String]) -> Result<BulkResult, Error> {
        self.bulk(
            "bulk_delete",
            Method::POST,
            ns,
            "/bulk/delete",
            keys,
            String::len,
        )
        .await
    }

    /// Sends `items` in as many bulk requests as the limits need, summing the results.
    async fn bulk<T: serde::Serialize>(
        &self,
        op: &'static str,
        method: Method,
        ns: &str,
        route: &str,
        items: &[T],
        size: impl Fn(&T) -> usize,
    ) -> Result<BulkResult, Error> {
        let url = self.inner.namespace_url(op, ns, route, &[])?;
        let mut total = BulkResult::default();
        for chunk in bulk_chunks(items, size) {
            let req = Req::new(op, None, method.clone(), url.clone()).json(chunk)?;
            // A bare `result: null` on 200 (older API versions) means every item went through.
            let result = self.inner.call_result_opt::<BulkResult>(req).await?;
            let result = result.unwrap_or(BulkResult {
                successful_key_count: chunk.len() as u64,
                unsuccessful_keys: vec![],
            });
            total.successful_key_count += result.successful_key_count;
            total.unsuccessful_keys.extend(result.unsuccessful_keys);
        }
        Ok(total)
    }

    /// Bulk get with `withMetadata: true`, `type: text`; a missing key maps to None.
    /// More than 100 keys are fetched in several requests.
    pub async fn bulk_get(
        &self,
        ns: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Option<BulkValue>>, Error> {
        const OP: &str = "bulk_get";
        let mut out = HashMap::with_capacity(keys.len());
        let url = self.inner.namespace_url(OP, ns, "/bulk/get", &[])?;
        for chunk in keys.chunks(limits::MAX_BULK_GET_KEYS) {
            let body = BulkGetBody {
                keys: chunk.to_vec(),
                kind: Some("text".into()),
                with_metadata: Some(true),
            };
            let req = Req::new(OP, None, Method::POST, url.clone()).json(&body)?;
            let result: Option<Json> = self.inner.call_result_opt(req).await?;
            let mut values = match result {
                Some(Json::Object(mut r)) => match r.remove("values") {
                    Some(Json::Object(v)) => v,
                    Some(Json::Null) | None => Default::default(),
                    Some(other) => {
                        return Err(Error::decode(
                            OP,
                            None,
                            format!("`values` is not an object: {other}"),
                        ))
                    }
                },
                Some(Json::Null) | None => Default::default(),
                Some(other) => {
                    return Err(Error::decode(
                        OP,
                        None,
                        format!("`result` is not an object: {other}"),
                    ))
                }
            };
            for key in chunk {
                // Keys the server left out are as missing as keys it answered `null` for.
                let entry = values.remove(key).and_then(bulk_value);
                out.insert(key.clone(), entry);
            }
        }
        Ok(out)
    }

    /// Requests made so far, by operation.
    pub fn request_counts(&self) -> RequestCounts {
        self.inner.counts()
    }

    /// Requests made so far, all operations, retries included.
    pub fn total_requests(&self) -> u64 {
        self.inner.counts().values().sum()
    }

    /// Attempts that were retries of an earlier failed attempt.
    pub fn retry_count(&self) -> u64 {
        self.inner.retries()
    }
}

/// One entry of a bulk get answer: `{value, metadata, expiration?}`, or a bare value from a
/// server that ignored `withMetadata`. A value that is not a JSON string is stringified.
fn bulk_value(entry: Json) -> Option<BulkValue> {
    let text = |v: Json| match v {
        Json::String(s) => s,
        other => other.to_string(),
    };
    match entry {
        Json::Null => None,
        Json::Object(mut o) if o.contains_key("value") => Some(BulkValue {
            value: text(o.remove("value").unwrap_or(Json::Null)),
            metadata: o.remove("metadata").filter(|m| !m.is_null()),
            expiration: o.get("expiration").and_then(Json::as_u64),
        }),
        other => Some(BulkValue {
            value: text(other),
            metadata: None,
            expiration: None,
        }),
    }
}

/// Splits a bulk request into chunks within the API's item count and body size limits.
/// `size` estimates an item's share of the JSON body; a margin covers field names and escaping.
fn bulk_chunks<T>(items: &[T], size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    const OVERHEAD: usize = 256;
    let budget = limits::MAX_BULK_BODY_BYTES * 9 / 10;
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let s = size(item) + OVERHEAD;
        if i > start && (i - start == limits::MAX_BULK_ITEMS || bytes + s > budget) {
            chunks.push(&items[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += s;
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

/// Key names (and namespace ids) that cannot be put in a URL path: an empty segment, `.` or
/// `..` would address another route after URL normalization (`values/..` is the namespace
/// itself). KV refuses these keys anyway; refuse them here with KV's status and message.
fn check_segment(op: &'static str, key: &str) -> Result<(), Error> {
    match limits::check_key(key) {
        Err(e @ (KeyError::Empty | KeyError::Dots(_))) => Err(Error {
            op,
            key: Some(key.to_string()),
            kind: ErrorKind::Api {
                status: 400,
                code: None,
                message: e.to_string(),
            },
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
