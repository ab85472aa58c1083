//! One API request, sent with the budget, the concurrency bound, retries and counters.

use super::encode::{encode_component, query_string};
use super::ratelimit::RateLimiter;
use super::retry::{self, MAX_BACKOFF};
use super::{check_segment, ClientConfig, Error, ErrorKind, RequestCounts};
use crate::api::Envelope;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::multipart::{Form, Part};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value as Json;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// A TCP connection that cannot be made in this long is as good as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole request, generous because a value may be 25 MiB (and a bulk body 100 MB).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A request body, kept so that every attempt can send it again.
pub enum Body {
    Empty,
    Json(Bytes),
    Raw(Content),
    /// `value` and `metadata` parts, as the SDKs send a PUT with metadata.
    Multipart {
        value: Content,
        metadata: String,
    },
}

/// A value to send: in memory, or the first `len` bytes of a file, read as they are sent so
/// that a large value is never whole in memory.
pub enum Content {
    Bytes(Bytes),
    File { file: Arc<File>, len: u64 },
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::File { len, .. } => *len,
        }
    }

    /// The body of one attempt, from the start.
    fn body(&self) -> reqwest::Body {
        match self {
            Content::Bytes(b) => reqwest::Body::from(b.clone()),
            Content::File { file, len } => reqwest::Body::wrap(FileBody {
                file: file.clone(),
                at: 0,
                len: *len,
            }),
        }
    }
}

/// The bytes of a file, a piece per frame.
struct FileBody {
    file: Arc<File>,
    at: u64,
    len: u64,
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        // Pieces of 256 KiB: few frames, little memory. The read is a positional read of a
        // staging file the OS has cached, as the uploader's other reads are.
        const PIECE: u64 = 256 << 10;
        let n = PIECE.min(self.len - self.at) as usize;
        if n == 0 {
            return std::task::Poll::Ready(None);
        }
        let mut buf = vec![0; n];
        let read = self.file.read_exact_at(&mut buf, self.at);
        std::task::Poll::Ready(Some(read.map(|()| {
            self.at += n as u64;
            http_body::Frame::data(Bytes::from(buf))
        })))
    }

    fn is_end_stream(&self) -> bool {
        self.at >= self.len
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len - self.at)
    }
}

pub struct Req {
    pub op: &'static str,
    pub key: Option<String>,
    pub method: Method,
    pub url: String,
    pub body: Body,
}

impl Req {
    pub fn new(op: &'static str, key: Option<&str>, method: Method, url: String) -> Self {
        Req {
            op,
            key: key.map(str::to_string),
            method,
            url,
            body: Body::Empty,
        }
    }

    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    pub fn json(self, value: &(impl Serialize + ?Sized)) -> Result<Self, Error> {
        match serde_json::to_vec(value) {
            Ok(v) => Ok(self.body(Body::Json(v.into()))),
            Err(e) => Err(Error {
                op: self.op,
                key: self.key,
                kind: ErrorKind::Decode(e.to_string()),
            }),
        }
    }

    fn error(&self, kind: ErrorKind) -> Error {
        Error {
            op: self.op,
            key: self.key.clone(),
            kind,
        }
    }
}

/// A successful (2xx) response, read in full.
pub struct Resp {
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What an attempt brought: the body read in full, or, for a successful response asked for
/// as a stream, the response with its body still to read.
enum Payload {
    Full(Bytes),
    Stream(reqwest::Response),
}

impl Payload {
    fn len(&self) -> u64 {
        match self {
            Payload::Full(b) => b.len() as u64,
            Payload::Stream(r) => r.content_length().unwrap_or(0),
        }
    }

    /// The body of a response that is not a success (never streamed).
    fn full(self) -> Bytes {
        match self {
            Payload::Full(b) => b,
            Payload::Stream(_) => Bytes::new(),
        }
    }
}

pub struct Inner {
    pub config: ClientConfig,
    http: reqwest::Client,
    /// Credentials, marked sensitive so that no Debug output of a request shows them.
    auth: Vec<(HeaderName, HeaderValue)>,
    /// `{base}/accounts/{account}/storage/kv/namespaces`
    ns_base: String,
    in_flight: Semaphore,
    limiter: Option<RateLimiter>,
    counts: Mutex<RequestCounts>,
    retries: AtomicU64,
}

impl Inner {
    pub fn new(mut config: ClientConfig) -> Result<Self, Error> {
        let fail = |why: String| Error {
            op: "new_client",
            key: None,
            kind: ErrorKind::Transport(why),
        };
        config.base_url = config.base_url.trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            .user_agent(concat!("kvfs/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| fail(describe(&e)))?;
        let header = |value: &str| {
            let mut v = HeaderValue::from_str(value).map_err(|_| {
                fail("the API credentials contain characters not allowed in an HTTP header".into())
            })?;
            v.set_sensitive(true);
            Ok::<_, Error>(v)
        };
        let auth = match &config.auth {
            super::Auth::Token(token) => {
                vec![(
                    reqwest::header::AUTHORIZATION,
                    header(&format!("Bearer {token}"))?,
                )]
            }
            super::Auth::Key { email, key } => vec![
                (HeaderName::from_static("x-auth-email"), header(email)?),
                (HeaderName::from_static("x-auth-key"), header(key)?),
            ],
        };
        let ns_base = format!(
            "{}/accounts/{}/storage/kv/namespaces",
            config.base_url,
            encode_component(&config.account_id)
        );
        Ok(Inner {
            http,
            auth,
            ns_base,
            in_flight: Semaphore::new(config.max_concurrent.max(1)),
            limiter: config
                .rate_limit
                .map(|(n, window)| RateLimiter::new(n, window)),
            counts: Mutex::new(RequestCounts::new()),
            retries: AtomicU64::new(0),
            config,
        })
    }

    /// `.../namespaces{suffix}{?query}`
    pub fn namespaces_url(&self, suffix: &str, query: &[(&str, String)]) -> String {
        format!("{}{suffix}{}", self.ns_base, query_string(query))
    }

    /// `.../namespaces/{id}{suffix}{?query}`
    pub fn namespace_url(
        &self,
        op: &'static str,
        id: &str,
        suffix: &str,
        query: &[(&str, String)],
    ) -> Result<String, Error> {
        check_segment(op, id)?;
        Ok(self.namespaces_url(&format!("/{}{suffix}", encode_component(id)), query))
    }

    /// `.../namespaces/{ns}{route}{key}`, route being `/values/` or `/metadata/`.
    pub fn key_url(
        &self,
        op: &'static str,
        ns: &str,
        route: &str,
        key: &str,
    ) -> Result<String, Error> {
        self.key_url_query(op, ns, route, key, &[])
    }

    pub fn key_url_query(
        &self,
        op: &'static str,
        ns: &str,
        route: &str,
        key: &str,
        query: &[(&str, String)],
    ) -> Result<String, Error> {
        check_segment(op, key)?;
        self.namespace_url(op, ns, &format!("{route}{}", encode_component(key)), query)
    }

    pub fn counts(&self) -> RequestCounts {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn count(&self, op: &'static str, retry: bool) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(op.to_string())
            .or_default() += 1;
        if retry {
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends `req` until it succeeds, fails for good, or runs out of retries.
    pub async fn call(&self, req: &Req) -> Result<Resp, Error> {
        let (headers, payload) = self.call_payload(req, false).await?;
        Ok(Resp {
            headers,
            body: payload.full(),
        })
    }

    /// `call` that hands out a successful response before its body is read. A body that fails
    /// on its way is not retried here: the caller has it in part.
    pub async fn call_streamed(&self, req: &Req) -> Result<(HeaderMap, reqwest::Response), Error> {
        match self.call_payload(req, true).await? {
            (headers, Payload::Stream(resp)) => Ok((headers, resp)),
            // Not reached: a successful response asked for as a stream is one.
            (_, Payload::Full(_)) => Err(req.error(ErrorKind::Decode("body read early".into()))),
        }
    }

    async fn call_payload(&self, req: &Req, stream: bool) -> Result<(HeaderMap, Payload), Error> {
        let mut attempt = 0u32;
        loop {
            if let Some(limiter) = &self.limiter {
                limiter.acquire().await;
            }
            let outcome = {
                // Never closed; should it be, the request just goes unbounded.
                let _permit = self.in_flight.acquire().await.ok();
                self.count(req.op, attempt > 0);
                let started = Instant::now();
                let outcome = self.send_once(req, stream).await;
                let elapsed_ms = started.elapsed().as_millis() as u64;
                match &outcome {
                    Ok((status, _, body)) => tracing::debug!(
                        op = req.op, key = ?req.key, status = status.as_u16(), elapsed_ms, attempt,
                        bytes = body.len(), streamed = stream, "kv request"
                    ),
                    Err(e) => tracing::debug!(
                        op = req.op, key = ?req.key, error = %describe(e), elapsed_ms, attempt, "kv request failed"
                    ),
                }
                outcome
            };
            let last = attempt >= self.config.max_retries;
            match outcome {
                Ok((status, headers, body)) if status.is_success() => return Ok((headers, body)),
                Ok((status, headers, body)) => {
                    if last || !retry::retryable_status(status.as_u16()) {
                        return Err(req.error(api_error(status, &body.full())));
                    }
                    let wait = self.retry_wait(attempt, &headers);
                    tracing::debug!(op = req.op, key = ?req.key, status = status.as_u16(), wait_ms = wait.as_millis() as u64, "retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    if last || e.is_builder() {
                        let tries = attempt + 1;
                        let why = describe(&e);
                        let why = if tries > 1 {
                            format!("{why} (after {tries} attempts)")
                        } else {
                            why
                        };
                        return Err(req.error(ErrorKind::Transport(why)));
                    }
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
            }
            attempt += 1;
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        retry::backoff(
            self.config.base_backoff,
            MAX_BACKOFF,
            attempt,
            retry::random_u64(),
        )
    }

    /// How long to wait after a retryable status: `Retry-After` when given (429, or a 503 from a
    /// gateway), plus a little jitter so that waiters do not all return at once; else backoff.
    fn retry_wait(&self, attempt: u32, headers: &HeaderMap) -> Duration {
        let retry_after = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry::parse_retry_after);
        match retry_after {
            Some(wait) => wait + self.backoff(0),
            None => self.backoff(attempt),
        }
    }

    async fn send_once(
        &self,
        req: &Req,
        stream: bool,
    ) -> Result<(StatusCode, HeaderMap, Payload), reqwest::Error> {
        let mut rb = self.http.request(req.method.clone(), &req.url);
        for (name, value) in &self.auth {
            rb = rb.header(name.clone(), value.clone());
        }
        rb = match &req.body {
            Body::Empty => rb,
            Body::Json(b) => rb.header(CONTENT_TYPE, "application/json").body(b.clone()),
            Body::Raw(c) => rb
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, c.len())
                .body(c.body()),
            Body::Multipart { value, metadata } => {
                let value = Part::stream_with_length(value.body(), value.len())
                    .file_name("upload")
                    .mime_str("application/octet-stream")?;
                let metadata = Part::text(metadata.clone()).mime_str("application/json")?;
                rb.multipart(Form::new().part("value", value).part("metadata", metadata))
            }
        };
        let resp = rb.send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        if stream && status.is_success() {
            return Ok((status, headers, Payload::Stream(resp)));
        }
        // Reading the body is part of the attempt: a connection dropped mid-body is retried.
        let body = resp.bytes().await?;
        Ok((status, headers, Payload::Full(body)))
    }

    /// The envelope of a successful response; `success: false` with errors is still a failure.
    async fn envelope<T: DeserializeOwned>(&self, req: &Req) -> Result<Envelope<T>, Error> {
        let resp = self.call(req).await?;
        parse_envelope(req, &resp.body)
    }

    /// `result`, which may be null.
    pub async fn call_result_opt<T: DeserializeOwned>(&self, req: Req) -> Result<Option<T>, Error> {
        Ok(self.envelope::<T>(&req).await?.result)
    }

    /// `result`, which must be there.
    pub async fn call_result<T: DeserializeOwned>(&self, req: Req) -> Result<T, Error> {
        let env = self.envelope::<T>(&req).await?;
        env.result
            .ok_or_else(|| req.error(ErrorKind::Decode("no `result`".into())))
    }

    /// `result` and `result_info`, of a listing.
    pub async fn call_json_info<T: DeserializeOwned, I: DeserializeOwned>(
        &self,
        req: Req,
    ) -> Result<(T, Option<I>), Error> {
        let env = self.envelope::<T>(&req).await?;
        let result = env
            .result
            .ok_or_else(|| req.error(ErrorKind::Decode("no `result`".into())))?;
        let info = match env.result_info {
            None | Some(Json::Null) => None,
            Some(info) => Some(
                serde_json::from_value(info)
                    .map_err(|e| req.error(ErrorKind::Decode(format!("result_info: {e}"))))?,
            ),
        };
        Ok((result, info))
    }

    /// Success without a result worth reading (writes and deletes answer `null` or `{}`).
    pub async fn call_unit(&self, req: Req) -> Result<(), Error> {
        let resp = self.call(&req).await?;
        // Tolerate an empty 2xx body: there is nothing in it to miss.
        if resp.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        parse_envelope::<serde::de::IgnoredAny>(&req, &resp.body).map(drop)
    }
}

fn parse_envelope<T: DeserializeOwned>(req: &Req, body: &[u8]) -> Result<Envelope<T>, Error> {
    let env: Envelope<T> = serde_json::from_slice(body)
        .map_err(|e| req.error(ErrorKind::Decode(format!("{e}; body: {}", snippet(body)))))?;
    if !env.success && !env.errors.is_empty() {
        return Err(req.error(ErrorKind::Api {
            status: 200,
            code: env.errors.first().map(|e| e.code),
            message: join_messages(env.errors.iter().map(|e| e.message.as_str())),
        }));
    }
    Ok(env)
}

/// The error of a non-2xx response: from its envelope when it has one, else from the status
/// (a gateway's plain 413 or an HTML 502 page).
pub(super) fn api_error(status: StatusCode, body: &[u8]) -> ErrorKind {
    let errors = serde_json::from_slice::<Json>(body).ok().and_then(|mut j| {
        match j.get_mut("errors").map(Json::take) {
            Some(Json::Array(errors)) if !errors.is_empty() => Some(errors),
            _ => None,
        }
    });
    let (code, message) = match errors {
        Some(errors) => {
            let code = errors
                .iter()
                .find_map(|e| e.get("code").and_then(Json::as_u64))
                .and_then(|c| u32::try_from(c).ok());
            let messages: Vec<String> = errors
                .iter()
                .map(|e| match e.get("message") {
                    Some(Json::String(m)) => m.clone(),
                    _ => e.to_string(),
                })
                .collect();
            (code, join_messages(messages.iter().map(String::as_str)))
        }
        None => {
            let text = snippet(body);
            let reason = status.canonical_reason().unwrap_or("error").to_string();
            // A short plain-text body says more than the reason phrase; HTML pages do not.
            let plain = !text.is_empty() && !text.starts_with('<') && !text.starts_with('{');
            (None, if plain { text } else { reason })
        }
    };
    ErrorKind::Api {
        status: status.as_u16(),
        code,
        message,
    }
}

fn join_messages<'a>(messages: impl Iterator<Item = &'a str>) -> String {
    messages.collect::<Vec<_>>().join("; ")
}

/// The start of a body, as one line of text, for error messages.
fn snippet(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    let mut line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if body.len() > MAX {
        line.push('…');
    }
    line
}

/// A reqwest error with its causes ("error sending request ...: connection refused"). It may
/// name the URL, never the headers.
pub(super) fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        format!("timed out: {e}")
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !out.contains(&cause_text) {
            out.push_str(": ");
            out.push_str(&cause_text);
        }
        source = cause.source();
    }
    out
}
