//! Request handling: routing on the raw path (keys may hold `%2F`), auth, the concurrency
//! bound, test aids, and Cloudflare's envelope, status codes, error codes and messages. The
//! operations themselves are in `ops`.

use super::admission::Admission;
use super::body::ReqBody;
use super::faults::{Fault, Faults};
use super::ops::{self, Ctx};
use super::stats::{Op, Stats};
use super::store::{self, Store, StoreError};
use crate::api::limits::{self, KeyError, WriteError};
use crate::api::{ApiMessage, Envelope};
use axum::body::{Body, Bytes, HttpBody};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use percent_encoding::percent_decode_str;
use serde::Serialize;
use serde_json::{json, Value as Json};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub struct AppState {
    pub store: Arc<Store>,
    pub token: String,
    pub latency: Option<Duration>,
    pub faults: Faults,
    pub stats: Stats,
    /// Seconds added to the wall clock (`POST /__kvfs/clock`), to test expiration without waiting.
    pub clock_offset: AtomicI64,
    /// `/__kvfs/*` is served (`kvfs serve --test-aids`); otherwise it is no route.
    pub test_aids: bool,
    /// The longest a request body may go without a byte arriving.
    pub body_timeout: Duration,
    pub admission: Admission,
}

impl AppState {
    pub fn now(&self) -> i64 {
        limits::now_secs() as i64 + self.clock_offset.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and envelopes

/// A failed request: status and one envelope error, or the gateway's plain 413.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
    plain: bool,
    /// The `Allow` header of a 405.
    allow: Option<String>,
    /// Answered with `Retry-After: 1` (a 429).
    retry: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: u32, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            plain: false,
            allow: None,
            retry: false,
        }
    }
    pub fn bad_request(code: u32, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
    fn auth() -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, 10000, "Authentication error")
    }
    fn no_route() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, 7003, "No route for the URI")
    }
    fn method_not_allowed(allowed: &[&str]) -> ApiError {
        ApiError {
            allow: Some(allowed.join(", ")),
            ..ApiError::new(StatusCode::METHOD_NOT_ALLOWED, 7001, "Method not allowed")
        }
    }
    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            10001,
            "Internal server error",
        )
    }
    pub fn body(detail: impl std::fmt::Display) -> ApiError {
        ApiError::bad_request(10012, format!("Could not parse request body: {detail}"))
    }
    pub fn query(detail: impl std::fmt::Display) -> ApiError {
        ApiError::bad_request(10027, format!("Invalid query parameter: {detail}"))
    }
    pub fn key_not_found(op: Op) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            10009,
            format!("{}: 'key not found'", op.verb()),
        )
    }
    /// What a proxy in front of the API answers for a body over 100 MB: not an envelope.
    pub fn gateway_too_large() -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: 0,
            message: String::new(),
            plain: true,
            allow: None,
            retry: false,
        }
    }
    /// Throttled (too many requests at once, or the body memory bound): try again in a second.
    pub fn throttled() -> ApiError {
        ApiError {
            retry: true,
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                971,
                "Please wait and consider throttling your request speed",
            )
        }
    }
    /// No body byte arrived for `idle`.
    pub fn body_timeout(idle: Duration) -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            6004,
            format!(
                "Request body timed out: no data for {} ms",
                idle.as_millis()
            ),
        )
    }
    /// A request hyper could not parse (it answers these itself; see `conn`).
    pub fn protocol(status: StatusCode) -> ApiError {
        let message = match status {
            StatusCode::URI_TOO_LONG => "Request URI too long",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "Request header fields too large",
            _ => "Malformed HTTP request",
        };
        ApiError::new(status, 6003, message)
    }
    pub fn from_store(op: Op, e: StoreError) -> ApiError {
        match e {
            StoreError::NamespaceNotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                10013,
                format!("{}: 'namespace not found'", op.verb()),
            ),
            StoreError::DuplicateTitle => ApiError::bad_request(
                10014,
                "a namespace with this account ID and title already exists",
            ),
            StoreError::TooManyNamespaces => ApiError::bad_request(
                10029,
                format!(
                    "this account already has the maximum of {} namespaces",
                    store::MAX_NAMESPACES
                ),
            ),
            StoreError::Db(e) => {
                tracing::error!("database error in {}: {e}", op.name());
                ApiError::internal()
            }
        }
    }
    pub fn from_key(e: KeyError) -> ApiError {
        let status = match e {
            KeyError::TooLong(_) => StatusCode::URI_TOO_LONG,
            _ => StatusCode::BAD_REQUEST,
        };
        let code = if status == StatusCode::URI_TOO_LONG {
            10021
        } else {
            10020
        };
        ApiError::new(status, code, e.to_string())
    }
    pub fn from_write(e: WriteError) -> ApiError {
        match e {
            WriteError::Key(k) => ApiError::from_key(k),
            WriteError::ValueTooLarge(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, 10022, e.to_string())
            }
            WriteError::MetadataTooLarge(m) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, 10023, m)
            }
            WriteError::ExpirationTtl(m) => ApiError::bad_request(10024, m),
            WriteError::Expiration(m) => ApiError::bad_request(10025, m),
        }
    }

    fn envelope(&self) -> Envelope<Json> {
        Envelope {
            result: None,
            success: false,
            errors: vec![ApiMessage {
                code: self.code,
                message: self.message.clone(),
            }],
            messages: vec![],
            result_info: None,
        }
    }

    /// The envelope alone, serialized.
    pub fn envelope_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.envelope()).unwrap_or_default()
    }

    pub fn into_response(self) -> Response<Body> {
        if self.plain {
            let mut r = Response::new(Body::from(
                "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n</body>\r\n</html>\r\n",
            ));
            *r.status_mut() = self.status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            return r;
        }
        let mut r = json_response(self.status, &self.envelope());
        if let Some(allow) = self.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
            r.headers_mut().insert(header::ALLOW, allow);
        }
        if self.retry {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

pub type ApiResult = Result<Response<Body>, ApiError>;

pub fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut r = Response::new(Body::from(bytes));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => {
            tracing::error!("cannot serialize a response: {e}");
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
    }
}

/// `{"result": ..., "success": true, "errors": [], "messages": [] (, "result_info")}`
pub fn ok<T: Serialize>(result: Option<T>, result_info: Option<Json>) -> ApiResult {
    Ok(json_response(
        StatusCode::OK,
        &Envelope {
            result,
            success: true,
            errors: vec![],
            messages: vec![],
            result_info,
        },
    ))
}

/// Writes and deletes answer `"result": null`.
pub fn ok_null() -> ApiResult {
    ok::<Json>(None, None)
}

// ---------------------------------------------------------------------------------------------
// Routing

struct Route {
    op: Op,
    account: String,
    /// Raw namespace id segment, validated by the handler.
    ns: String,
    /// Still percent-encoded key, decoded by the handler.
    key: String,
}

/// Maps METHOD + path (after `/client/v4`, still percent-encoded) to an operation.
fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let rest = path
        .strip_prefix("/accounts/")
        .ok_or_else(ApiError::no_route)?;
    let (account, rest) = rest.split_once('/').ok_or_else(ApiError::no_route)?;
    let account = percent_decode_str(account).decode_utf8_lossy().into_owned();
    if account.is_empty() {
        return Err(ApiError::no_route());
    }
    let rest = rest
        .strip_prefix("storage/kv/namespaces")
        .ok_or_else(ApiError::no_route)?;
    let pick = |allowed: &[(Method, Op)]| -> Result<Op, ApiError> {
        allowed
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, op)| *op)
            .ok_or_else(|| {
                let names: Vec<&str> = allowed.iter().map(|(m, _)| m.as_str()).collect();
                ApiError::method_not_allowed(&names)
            })
    };
    let mut r = Route {
        op: Op::ListNamespaces,
        account,
        ns: String::new(),
        key: String::new(),
    };
    if rest.is_empty() {
        r.op = pick(&[
            (Method::GET, Op::ListNamespaces),
            (Method::POST, Op::CreateNamespace),
        ])?;
        return Ok(r);
    }
    let rest = rest.strip_prefix('/').ok_or_else(ApiError::no_route)?;
    let (ns, tail) = match rest.split_once('/') {
        Some((ns, tail)) => (ns, Some(tail)),
        None => (rest, None),
    };
    if ns.is_empty() {
        return Err(ApiError::no_route());
    }
    r.ns = ns.to_string();
    r.op = match tail {
        None => pick(&[
            (Method::GET, Op::GetNamespace),
            (Method::PUT, Op::RenameNamespace),
            (Method::DELETE, Op::DeleteNamespace),
        ])?,
        Some("keys") => pick(&[(Method::GET, Op::ListKeys)])?,
        Some("bulk") => pick(&[
            (Method::PUT, Op::BulkWrite),
            (Method::DELETE, Op::BulkDelete),
        ])?,
        Some("bulk/delete") => pick(&[(Method::POST, Op::BulkDelete)])?,
        Some("bulk/get") => pick(&[(Method::POST, Op::BulkGet)])?,
        Some(t) => {
            if let Some(key) = t.strip_prefix("values/") {
                r.key = key.to_string();
                pick(&[
                    (Method::GET, Op::GetValue),
                    (Method::PUT, Op::PutValue),
                    (Method::DELETE, Op::DeleteValue),
                ])?
            } else if let Some(key) = t.strip_prefix("metadata/") {
                r.key = key.to_string();
                pick(&[(Method::GET, Op::GetMetadata)])?
            } else {
                return Err(ApiError::no_route());
            }
        }
    };
    Ok(r)
}

/// Every request: answered, then what is left of its body drained (bounded), so that a client
/// still uploading reads the answer; a body that cannot be drained closes the connection.
pub async fn handle(st: Arc<AppState>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let version = parts.version;
    let mut body = ReqBody::new(body, &parts.headers);
    let mut resp = respond(&st, parts, &mut body).await;
    if !body.finish(st.body_timeout).await && version <= Version::HTTP_11 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn respond(st: &AppState, parts: Parts, body: &mut ReqBody) -> Response<Body> {
    let path = parts.uri.path().to_string();
    if let Some(aid) = path.strip_prefix("/__kvfs/").filter(|_| st.test_aids) {
        return match test_aid(st, aid, &parts, body).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
    }
    let Some(api) = path.strip_prefix("/client/v4") else {
        return ApiError::no_route().into_response();
    };
    let r = match route(&parts.method, api) {
        Ok(r) => r,
        Err(e) => {
            st.stats.count(None);
            return e.into_response();
        }
    };
    st.stats.count(Some(r.op));
    st.stats.log(r.op, &r.ns);
    tracing::debug!("{} {}", r.op.name(), path);
    // Held until the answer is ready; the drain that may follow needs no slot.
    let _slot = match st.admission.slot().await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    if let Some(d) = st.latency {
        tokio::time::sleep(d).await;
    }
    // Decided before anything touches the store, so a faulted write changed nothing.
    if let Some(fault) = st.faults.next() {
        return fault_response(fault);
    }
    if !authorized(&st.token, &parts.headers) {
        return ApiError::auth().into_response();
    }
    let op = r.op;
    let mut c = Ctx::new(st, op, r.account, r.ns, r.key, parts, body);
    match ops::dispatch(&mut c).await {
        Ok(resp) => resp,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!("{} failed: {}", op.name(), e.message);
            }
            e.into_response()
        }
    }
}

fn authorized(token: &str, h: &HeaderMap) -> bool {
    let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let bearer = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim(), token));
    let key = header("x-auth-email").is_some_and(|e| !e.is_empty())
        && header("x-auth-key").is_some_and(|k| same(k, token));
    bearer || key
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn fault_response(fault: Fault) -> Response<Body> {
    match fault {
        Fault::Internal => ApiError::internal().into_response(),
        Fault::Unavailable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            10002,
            "Service temporarily unavailable",
        )
        .into_response(),
        Fault::RateLimited => ApiError::throttled().into_response(),
        Fault::Drop => Response::new(Body::new(Aborted)),
    }
}

/// A body that fails before its first byte: hyper then closes the connection without
/// having sent the status line, which is what a dropped connection looks like to a client.
struct Aborted;

impl HttpBody for Aborted {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(Some(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "injected fault: dropped connection",
        ))))
    }
}

/// The largest clock offset the test aid sets: 10 years. Beyond it, expirations would leave
/// the range JavaScript clients read exactly, and `i64` arithmetic could wrap.
const MAX_CLOCK_OFFSET: i64 = 10 * 366 * 86_400;

/// `/__kvfs/...` (`--test-aids` only): counters and the clock, with the API's token.
async fn test_aid(
    st: &AppState,
    path: &str,
    parts: &Parts,
    body: &mut ReqBody,
) -> Result<Response<Body>, ApiError> {
    let allowed: &[&str] = match path {
        "stats" => &["GET", "DELETE"],
        "stats/reset" => &["POST"],
        "clock" => &["GET", "POST"],
        "log" => &["GET"],
        _ => return Err(ApiError::no_route()),
    };
    if !allowed.contains(&parts.method.as_str()) {
        return Err(ApiError::method_not_allowed(allowed));
    }
    if !authorized(&st.token, &parts.headers) {
        return Err(ApiError::auth());
    }
    match (&parts.method, path) {
        (&Method::GET, "stats") => Ok(json_response(StatusCode::OK, &st.stats.snapshot())),
        (&Method::GET, "log") => Ok(json_response(StatusCode::OK, &st.stats.log_snapshot())),
        (_, "stats" | "stats/reset") => {
            st.stats.reset();
            Ok(json_response(StatusCode::OK, &st.stats.snapshot()))
        }
        (&Method::POST, _) => {
            // A few bytes of JSON: anything longer is not a clock request.
            let bytes = body.read(4096, st.body_timeout, |_| Ok(())).await?;
            let v: Json = serde_json::from_slice(&bytes).map_err(ApiError::body)?;
            let field = |name| v.get(name).and_then(Json::as_i64);
            let offset = match (field("offset"), field("advance")) {
                (Some(off), _) => off,
                (None, Some(adv)) => st.clock_offset.load(Ordering::Relaxed).saturating_add(adv),
                _ => {
                    return Err(ApiError::body(
                        "expected {\"offset\": N} or {\"advance\": N}",
                    ))
                }
            };
            if offset.unsigned_abs() > MAX_CLOCK_OFFSET as u64 {
                return Err(ApiError::body(format!(
                    "the clock offset must stay within ±{MAX_CLOCK_OFFSET} seconds (10 years), got {offset}"
                )));
            }
            st.clock_offset.store(offset, Ordering::Relaxed);
            Ok(clock_response(st))
        }
        _ => Ok(clock_response(st)),
    }
}

fn clock_response(st: &AppState) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"now": st.now(), "offset": st.clock_offset.load(Ordering::Relaxed)}),
    )
}
