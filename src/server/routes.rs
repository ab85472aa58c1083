//! Request handling: routing on the raw path (keys may hold `%2F`), auth, test aids, and the
//! 14 operations with Cloudflare's envelope, status codes, error codes and messages.

use super::faults::{Fault, Faults};
use super::stats::{Op, Stats};
use super::store::{self, Entry, NamespaceOrder, Store, StoreError, Write};
use crate::api::limits::{self, KeyError, WriteError};
use crate::api::{
    ApiMessage, BulkGetBody, BulkGetEntry, BulkResult, BulkWriteItem, CursorInfo, Envelope,
    KeyInfo, Namespace,
};
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use axum::Router;
use base64::Engine;
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
}

impl AppState {
    fn now(&self) -> i64 {
        limits::now_secs() as i64 + self.clock_offset.load(Ordering::Relaxed)
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    // Body limits are enforced by `read_body`, with Cloudflare's answers.
    Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
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
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            plain: false,
            allow: None,
        }
    }
    fn bad_request(code: u32, message: impl Into<String>) -> ApiError {
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
    fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            10001,
            "Internal server error",
        )
    }
    fn body(detail: impl std::fmt::Display) -> ApiError {
        ApiError::bad_request(10012, format!("Could not parse request body: {detail}"))
    }
    fn query(detail: impl std::fmt::Display) -> ApiError {
        ApiError::bad_request(10027, format!("Invalid query parameter: {detail}"))
    }
    fn key_not_found(op: Op) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            10009,
            format!("{}: 'key not found'", op.verb()),
        )
    }
    /// What a proxy in front of the API answers for a body over 100 MB: not an envelope.
    fn gateway_too_large() -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: 0,
            message: String::new(),
            plain: true,
            allow: None,
        }
    }
    fn from_store(op: Op, e: StoreError) -> ApiError {
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
    fn from_key(e: KeyError) -> ApiError {
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
    fn from_write(e: WriteError) -> ApiError {
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

    fn into_response(self) -> Response<Body> {
        if self.plain {
            let mut r = Response::new(Body::from(
                "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n</body>\r\n</html>\r\n",
            ));
            *r.status_mut() = self.status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            return r;
        }
        let env: Envelope<Json> = Envelope {
            result: None,
            success: false,
            errors: vec![ApiMessage {
                code: self.code,
                message: self.message,
            }],
            messages: vec![],
            result_info: None,
        };
        let mut r = json_response(self.status, &env);
        if let Some(allow) = self.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
            r.headers_mut().insert(header::ALLOW, allow);
        }
        r
    }
}

type ApiResult = Result<Response<Body>, ApiError>;

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
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
fn ok<T: Serialize>(result: Option<T>, result_info: Option<Json>) -> ApiResult {
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
fn ok_null() -> ApiResult {
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

async fn handle(State(st): State<Arc<AppState>>, req: Request<Body>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if let Some(aid) = path.strip_prefix("/__kvfs/") {
        return test_aid(&st, aid, req).await;
    }
    let Some(api) = path.strip_prefix("/client/v4") else {
        return ApiError::no_route().into_response();
    };
    let r = match route(req.method(), api) {
        Ok(r) => r,
        Err(e) => {
            st.stats.count(None);
            return e.into_response();
        }
    };
    st.stats.count(Some(r.op));
    tracing::debug!("{} {}", r.op.name(), path);
    if let Some(d) = st.latency {
        tokio::time::sleep(d).await;
    }
    // Decided before anything touches the store, so a faulted write changed nothing.
    if let Some(fault) = st.faults.next() {
        return fault_response(fault);
    }
    if !authorized(&st.token, req.headers()) {
        return ApiError::auth().into_response();
    }
    let op = r.op;
    match operation(&st, r, req).await {
        Ok(resp) => resp,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!("{} failed: {}", op.name(), e.message);
            }
            e.into_response()
        }
    }
}

/// Bearer token, or X-Auth-Email + X-Auth-Key where the key is the token.
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
        Fault::RateLimited => {
            let mut r = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                971,
                "Please wait and consider throttling your request speed",
            )
            .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
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

/// `/__kvfs/...`: loopback test aids, outside the API and without auth.
async fn test_aid(st: &AppState, path: &str, req: Request<Body>) -> Response<Body> {
    let method = req.method().clone();
    match (method, path) {
        (Method::GET, "stats") => json_response(StatusCode::OK, &st.stats.snapshot()),
        (Method::POST, "stats/reset") | (Method::DELETE, "stats") => {
            st.stats.reset();
            json_response(StatusCode::OK, &st.stats.snapshot())
        }
        (Method::GET, "clock") => clock_response(st),
        (Method::POST, "clock") => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(e) => return e.into_response(),
            };
            let v: Json = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return ApiError::body(e).into_response(),
            };
            if let Some(off) = v.get("offset").and_then(Json::as_i64) {
                st.clock_offset.store(off, Ordering::Relaxed);
            } else if let Some(adv) = v.get("advance").and_then(Json::as_i64) {
                st.clock_offset.fetch_add(adv, Ordering::Relaxed);
            } else {
                return ApiError::body("expected {\"offset\": N} or {\"advance\": N}")
                    .into_response();
            }
            clock_response(st)
        }
        (_, "stats") => ApiError::method_not_allowed(&["GET", "DELETE"]).into_response(),
        (_, "stats/reset") => ApiError::method_not_allowed(&["POST"]).into_response(),
        (_, "clock") => ApiError::method_not_allowed(&["GET", "POST"]).into_response(),
        _ => ApiError::no_route().into_response(),
    }
}

fn clock_response(st: &AppState) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"now": st.now(), "offset": st.clock_offset.load(Ordering::Relaxed)}),
    )
}

// ---------------------------------------------------------------------------------------------
// Request parsing

/// Reads the whole body; over 100 MB gets the gateway's 413.
async fn read_body(req: Request<Body>) -> Result<Bytes, ApiError> {
    read_limited(req.into_body()).await
}

async fn read_limited(body: Body) -> Result<Bytes, ApiError> {
    if body
        .size_hint()
        .exact()
        .is_some_and(|n| n > limits::MAX_BULK_BODY_BYTES as u64)
    {
        return Err(ApiError::gateway_too_large());
    }
    axum::body::to_bytes(body, limits::MAX_BULK_BODY_BYTES)
        .await
        .map_err(|e| {
            let inner = e.into_inner();
            if inner.is::<http_body_util::LengthLimitError>() {
                ApiError::gateway_too_large()
            } else {
                ApiError::body(inner)
            }
        })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(ApiError::body)
}

fn query_params(req: &Request<Body>) -> Result<Vec<(String, String)>, ApiError> {
    Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        .map(|q| q.0)
        .map_err(ApiError::query)
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter()
        .rev()
        .find(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// An integer query parameter. The spec types these as numbers and the Python SDK sends
/// floats (`time.time() + 3600`), so a finite number is accepted and truncated.
fn int_param(q: &[(String, String)], name: &str) -> Result<Option<i64>, ApiError> {
    param(q, name)
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .or_else(|| v.parse::<f64>().ok().and_then(number_to_i64))
                .ok_or_else(|| ApiError::query(format!("{name} must be a number, got {v:?}")))
        })
        .transpose()
}

fn number_to_i64(f: f64) -> Option<i64> {
    (f.is_finite() && f.abs() < 9e15).then(|| f.trunc() as i64)
}

/// Namespace ids are 32 lowercase hex characters.
fn namespace_id(raw: &str) -> Result<String, ApiError> {
    let id = percent_decode_str(raw).decode_utf8_lossy();
    if limits::is_namespace_id(&id) {
        Ok(id.into_owned())
    } else {
        Err(ApiError::bad_request(
            10011,
            format!(
                "could not parse UUID from request's namespace_id: 'invalid namespace format: {id}'"
            ),
        ))
    }
}

/// Key names arrive percent-encoded (`%2F` is `/`).
fn key_name(raw: &str) -> Result<String, ApiError> {
    let key = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request(10020, "Key names must be valid UTF-8"))?
        .into_owned();
    limits::check_key(&key).map_err(ApiError::from_key)?;
    Ok(key)
}

fn title(body: &[u8]) -> Result<String, ApiError> {
    let v: Json = parse_json(body)?;
    let title = match v.get("title") {
        Some(Json::String(t)) => t.clone(),
        _ => String::new(),
    };
    limits::check_title(&title).map_err(|m| ApiError::bad_request(10019, m))?;
    Ok(title)
}

// A single PUT checks its parts as they arrive (key in the path, expiration in the query,
// then the body); the checks are the shared ones of `limits`.

fn check_value(len: usize) -> Result<(), ApiError> {
    limits::check_value(len).map_err(ApiError::from_write)
}

fn metadata_text(meta: Option<&Json>) -> Result<Option<String>, ApiError> {
    limits::metadata_text(meta).map_err(ApiError::from_write)
}

fn expiration(abs: Option<i64>, ttl: Option<i64>, now: i64) -> Result<Option<i64>, ApiError> {
    limits::absolute_expiration(abs, ttl, now).map_err(ApiError::from_write)
}

fn parse_metadata(m: Option<&str>) -> Option<Json> {
    m.and_then(|m| serde_json::from_str(m).ok())
}

fn exp_u64(e: Option<i64>) -> Option<u64> {
    e.map(|e| e.max(0) as u64)
}

// ---------------------------------------------------------------------------------------------
// Operations

/// Runs a store call on a blocking thread.
async fn blocking<T: Send + 'static>(
    op: Op,
    f: impl FnOnce() -> store::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| ApiError::from_store(op, e)),
        Err(e) => {
            tracing::error!("store task failed in {}: {e}", op.name());
            Err(ApiError::internal())
        }
    }
}

async fn operation(st: &AppState, r: Route, req: Request<Body>) -> ApiResult {
    let op = r.op;
    let account = r.account;
    let store = st.store.clone();
    let now = st.now();

    match op {
        Op::ListNamespaces => {
            let q = query_params(&req)?;
            let page = int_param(&q, "page")?.unwrap_or(1);
            if page < 1 {
                return Err(ApiError::query("page must be at least 1"));
            }
            let per_page = int_param(&q, "per_page")?.unwrap_or(limits::DEFAULT_PER_PAGE as i64);
            if !(1..=limits::MAX_PER_PAGE as i64).contains(&per_page) {
                return Err(ApiError::query(format!(
                    "per_page must be between 1 and {}",
                    limits::MAX_PER_PAGE
                )));
            }
            let order = match param(&q, "order") {
                None | Some("id") => NamespaceOrder::Id,
                Some("title") => NamespaceOrder::Title,
                Some(o) => {
                    return Err(ApiError::query(format!(
                        "order must be id or title, got {o:?}"
                    )))
                }
            };
            let desc = match param(&q, "direction") {
                None | Some("asc") => false,
                Some("desc") => true,
                Some(d) => {
                    return Err(ApiError::query(format!(
                        "direction must be asc or desc, got {d:?}"
                    )))
                }
            };
            let (page, per_page) = (page as u64, per_page as u64);
            let (rows, total) = blocking(op, move || {
                store.list_namespaces(&account, order, desc, page, per_page)
            })
            .await?;
            let result: Vec<Namespace> = rows.into_iter().map(namespace).collect();
            let info = json!({
                "page": page,
                "per_page": per_page,
                "count": result.len(),
                "total_count": total,
                "total_pages": total.div_ceil(per_page),
            });
            ok(Some(result), Some(info))
        }
        Op::CreateNamespace => {
            let title = title(&read_body(req).await?)?;
            let id = random_id()?;
            let row = super::store::NamespaceRow {
                id: id.clone(),
                title: title.clone(),
            };
            blocking(op, move || store.create_namespace(&account, &id, &title)).await?;
            ok(Some(namespace(row)), None)
        }
        Op::GetNamespace => {
            let ns = namespace_id(&r.ns)?;
            let row = blocking(op, move || store.get_namespace(&account, &ns)).await?;
            ok(Some(namespace(row)), None)
        }
        Op::RenameNamespace => {
            let ns = namespace_id(&r.ns)?;
            let title = title(&read_body(req).await?)?;
            let row = blocking(op, move || store.rename_namespace(&account, &ns, &title)).await?;
            ok(Some(namespace(row)), None)
        }
        Op::DeleteNamespace => {
            let ns = namespace_id(&r.ns)?;
            blocking(op, move || store.delete_namespace(&account, &ns)).await?;
            ok_null()
        }
        Op::ListKeys => {
            let ns = namespace_id(&r.ns)?;
            let q = query_params(&req)?;
            let limit = int_param(&q, "limit")?.unwrap_or(limits::DEFAULT_LIST_LIMIT as i64);
            if limit < limits::MIN_LIST_LIMIT as i64 {
                return Err(ApiError::bad_request(
                    10028,
                    format!("limit argument must be at least {}", limits::MIN_LIST_LIMIT),
                ));
            }
            if limit > limits::MAX_LIST_LIMIT as i64 {
                return Err(ApiError::bad_request(
                    10028,
                    format!("limit argument must be at most {}", limits::MAX_LIST_LIMIT),
                ));
            }
            let prefix = param(&q, "prefix").unwrap_or("").as_bytes().to_vec();
            let after = param(&q, "cursor")
                .map(|c| {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(c)
                        .map_err(|_| ApiError::query(format!("invalid cursor {c:?}")))
                })
                .transpose()?;
            let (keys, more) = blocking(op, move || {
                store.list_keys(
                    &account,
                    &ns,
                    &prefix,
                    after.as_deref(),
                    limit as usize,
                    now,
                )
            })
            .await?;
            let cursor = match keys.last() {
                Some(last) if more => {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&last.name)
                }
                _ => String::new(),
            };
            let result: Vec<KeyInfo> = keys
                .into_iter()
                .map(|k| KeyInfo {
                    name: String::from_utf8_lossy(&k.name).into_owned(),
                    expiration: exp_u64(k.expiration),
                    metadata: parse_metadata(k.metadata.as_deref()),
                })
                .collect();
            let info = CursorInfo {
                count: result.len() as u64,
                cursor,
            };
            ok(Some(result), serde_json::to_value(info).ok())
        }
        Op::GetValue => {
            let ns = namespace_id(&r.ns)?;
            let key = key_name(&r.key)?;
            let entry = blocking(op, move || store.get(&account, &ns, &key, now))
                .await?
                .ok_or_else(|| ApiError::key_not_found(op))?;
            let mut resp = Response::new(Body::from(entry.value));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Some(exp) = entry.expiration {
                resp.headers_mut()
                    .insert("expiration", HeaderValue::from(exp.max(0)));
            }
            Ok(resp)
        }
        Op::PutValue => {
            let ns = namespace_id(&r.ns)?;
            let key = key_name(&r.key)?;
            let q = query_params(&req)?;
            let exp = expiration(
                int_param(&q, "expiration")?,
                int_param(&q, "expiration_ttl")?,
                now,
            )?;
            let (value, metadata) = value_and_metadata(req).await?;
            let w = Write {
                key,
                value,
                metadata,
                expiration: exp,
            };
            blocking(op, move || store.put(&account, &ns, &w, now)).await?;
            ok_null()
        }
        Op::DeleteValue => {
            let ns = namespace_id(&r.ns)?;
            let key = key_name(&r.key)?;
            blocking(op, move || store.delete(&account, &ns, &key)).await?;
            ok_null()
        }
        Op::GetMetadata => {
            let ns = namespace_id(&r.ns)?;
            let key = key_name(&r.key)?;
            let entry = blocking(op, move || store.get(&account, &ns, &key, now))
                .await?
                .ok_or_else(|| ApiError::key_not_found(op))?;
            ok(parse_metadata(entry.metadata.as_deref()), None)
        }
        Op::BulkWrite => {
            let ns = namespace_id(&r.ns)?;
            let items: Vec<Json> = parse_json(&read_body(req).await?)?;
            if items.len() > limits::MAX_BULK_ITEMS {
                return Err(ApiError::bad_request(
                    10026,
                    format!(
                        "You can write a maximum of {} key-value pairs at once",
                        limits::MAX_BULK_ITEMS
                    ),
                ));
            }
            let writes = items
                .into_iter()
                .map(|it| bulk_write_item(it, now))
                .collect::<Result<Vec<_>, _>>()?;
            let n = writes.len() as u64;
            blocking(op, move || store.bulk_put(&account, &ns, &writes, now)).await?;
            ok(Some(bulk_result(n)), None)
        }
        Op::BulkDelete => {
            let ns = namespace_id(&r.ns)?;
            let keys: Vec<String> = parse_json(&read_body(req).await?)?;
            if keys.len() > limits::MAX_BULK_ITEMS {
                return Err(ApiError::bad_request(
                    10026,
                    format!(
                        "You can delete a maximum of {} keys at once",
                        limits::MAX_BULK_ITEMS
                    ),
                ));
            }
            for k in &keys {
                limits::check_key(k).map_err(ApiError::from_key)?;
            }
            let n = keys.len() as u64;
            blocking(op, move || store.bulk_delete(&account, &ns, &keys)).await?;
            ok(Some(bulk_result(n)), None)
        }
        Op::BulkGet => {
            let ns = namespace_id(&r.ns)?;
            let body: BulkGetBody = parse_json(&read_body(req).await?)?;
            if body.keys.is_empty() || body.keys.len() > limits::MAX_BULK_GET_KEYS {
                return Err(ApiError::bad_request(
                    10026,
                    format!(
                        "You can request a minimum of 1 and a maximum of {} keys",
                        limits::MAX_BULK_GET_KEYS
                    ),
                ));
            }
            let as_json = match body.kind.as_deref() {
                None | Some("text") => false,
                Some("json") => true,
                Some(t) => {
                    return Err(ApiError::body(format!(
                        "type must be \"text\" or \"json\", got {t:?}"
                    )))
                }
            };
            let with_metadata = body.with_metadata.unwrap_or(false);
            for k in &body.keys {
                limits::check_key(k).map_err(ApiError::from_key)?;
            }
            let keys = body.keys;
            let (keys, entries) = blocking(op, move || {
                let entries = store.bulk_get(&account, &ns, &keys, now)?;
                Ok((keys, entries))
            })
            .await?;
            let total: usize = entries.iter().flatten().map(|e| e.value.len()).sum();
            if total > limits::MAX_BULK_GET_BYTES {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    10031,
                    format!(
                        "Total value length of {total} exceeds limit of {}.",
                        limits::MAX_BULK_GET_BYTES
                    ),
                ));
            }
            let mut values = serde_json::Map::new();
            for (k, e) in keys.into_iter().zip(entries) {
                let v = match e {
                    None => Json::Null,
                    Some(e) => bulk_get_value(e, as_json, with_metadata)?,
                };
                values.insert(k, v);
            }
            ok(Some(json!({ "values": values })), None)
        }
    }
}

fn namespace(row: super::store::NamespaceRow) -> Namespace {
    Namespace {
        id: row.id,
        title: row.title,
        supports_url_encoding: true,
    }
}

fn bulk_result(n: u64) -> BulkResult {
    BulkResult {
        successful_key_count: n,
        unsuccessful_keys: vec![],
    }
}

fn bulk_write_item(mut item: Json, now: i64) -> Result<Write, ApiError> {
    // Expirations are JSON numbers, floats included (the Python SDK types them so); the
    // shared type holds integers, so take them out first.
    let mut number = |field: &str| -> Result<Option<i64>, ApiError> {
        match item.as_object_mut().and_then(|o| o.remove(field)) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .and_then(number_to_i64)
                .map(Some)
                .ok_or_else(|| ApiError::body(format!("{field} must be a number, got {v}"))),
        }
    };
    let (abs, ttl) = (number("expiration")?, number("expiration_ttl")?);
    let it: BulkWriteItem = serde_json::from_value(item).map_err(ApiError::body)?;
    let value = if it.base64 {
        base64::engine::general_purpose::STANDARD
            .decode(it.value.as_bytes())
            .map_err(|e| ApiError::body(format!("invalid base64 value for {:?}: {e}", it.key)))?
    } else {
        it.value.into_bytes()
    };
    let checked = limits::check_write(&it.key, value.len(), it.metadata.as_ref(), abs, ttl, now)
        .map_err(ApiError::from_write)?;
    Ok(Write {
        metadata: checked.metadata,
        expiration: checked.expiration,
        key: it.key,
        value,
    })
}

fn bulk_get_value(e: Entry, as_json: bool, with_metadata: bool) -> Result<Json, ApiError> {
    let value = if as_json {
        serde_json::from_slice(&e.value).map_err(|_| {
            ApiError::bad_request(
                10030,
                "At least one of the requested keys corresponds to a non-JSON value",
            )
        })?
    } else {
        Json::String(String::from_utf8_lossy(&e.value).into_owned())
    };
    if !with_metadata {
        return Ok(value);
    }
    serde_json::to_value(BulkGetEntry {
        value,
        metadata: parse_metadata(e.metadata.as_deref()),
        expiration: exp_u64(e.expiration),
    })
    .map_err(|_| ApiError::internal())
}

/// The value (and metadata) of a single PUT: a raw body, or multipart/form-data with a `value`
/// part and an optional `metadata` part, with or without part content types.
async fn value_and_metadata(req: Request<Body>) -> Result<(Vec<u8>, Option<String>), ApiError> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    let (parts, body) = req.into_parts();
    let bytes = read_limited(body).await?;
    if !multipart {
        check_value(bytes.len())?;
        return Ok((bytes.to_vec(), None));
    }
    let req = Request::from_parts(parts, Body::from(bytes));
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::body(e.body_text()))?;
    let (mut value, mut metadata) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::body(e.body_text()))?
    {
        match field.name() {
            Some("value") => {
                value = Some(
                    field
                        .bytes()
                        .await
                        .map_err(|e| ApiError::body(e.body_text()))?,
                )
            }
            Some("metadata") => {
                let text = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::body(e.body_text()))?;
                let json: Json = serde_json::from_slice(&text).map_err(|e| {
                    ApiError::bad_request(10012, format!("metadata must be valid JSON: {e}"))
                })?;
                metadata = Some(json);
            }
            _ => {}
        }
    }
    let value = value.ok_or_else(|| ApiError::body("multipart form has no \"value\" part"))?;
    check_value(value.len())?;
    Ok((value.to_vec(), metadata_text(metadata.as_ref())?))
}

/// 32 random lowercase hex characters from the OS.
fn random_id() -> Result<String, ApiError> {
    super::random_hex(16).map_err(|e| {
        tracing::error!("cannot read /dev/urandom: {e}");
        ApiError::internal()
    })
}
