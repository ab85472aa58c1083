//! The 13 operations, one handler each: parse the request, apply it to the store, reply.
//! Handlers get a `Ctx` once routing, auth and the test aids' latency and faults are done.

mod bulk;
mod namespaces;
mod values;

use super::admission::Reservation;
use super::body::ReqBody;
use super::routes::{ApiError, ApiResult, AppState};
use super::stats::Op;
use super::store::{self, Store};
use crate::api::limits;
use axum::extract::Query;
use axum::http::request::Parts;
use percent_encoding::percent_decode_str;
use serde_json::Value as Json;
use std::future::Future;
use std::sync::Arc;

/// One API request on its way through a handler.
pub struct Ctx<'a> {
    pub st: &'a AppState,
    pub op: Op,
    pub account: String,
    /// Raw namespace id segment, validated by the handler.
    pub ns: String,
    /// Still percent-encoded key, decoded by the handler.
    pub key: String,
    pub parts: Parts,
    pub body: &'a mut ReqBody,
    /// The server clock (with the test aid's offset) when the request arrived.
    pub now: i64,
    /// Memory held for the body read so far; released when the request is done.
    memory: Option<Reservation<'a>>,
}

impl<'a> Ctx<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        st: &'a AppState,
        op: Op,
        account: String,
        ns: String,
        key: String,
        parts: Parts,
        body: &'a mut ReqBody,
    ) -> Ctx<'a> {
        Ctx {
            now: st.now(),
            st,
            op,
            account,
            ns,
            key,
            parts,
            body,
            memory: None,
        }
    }

    fn store(&self) -> Arc<Store> {
        self.st.store.clone()
    }

    /// Runs a store call on a blocking thread. The future does not borrow `self`, whose body
    /// is not `Sync`.
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> store::Result<T> + Send + 'static,
    ) -> impl Future<Output = Result<T, ApiError>> + Send + 'static {
        let op = self.op;
        async move {
            match tokio::task::spawn_blocking(f).await {
                Ok(r) => r.map_err(|e| ApiError::from_store(op, e)),
                Err(e) => {
                    tracing::error!("store task failed in {}: {e}", op.name());
                    Err(ApiError::internal())
                }
            }
        }
    }

    /// Reads the whole body (at most 100 MB, else the gateway's 413) within the memory bound.
    async fn read_body(&mut self) -> Result<Vec<u8>, ApiError> {
        let admission = &self.st.admission;
        let mut memory = admission.reserve(self.body.declared).await?;
        let bytes = self
            .body
            .read(limits::MAX_BULK_BODY_BYTES, self.st.body_timeout, |len| {
                admission.grow(&mut memory, len)
            })
            .await;
        self.memory = Some(memory);
        bytes
    }

    fn query(&self) -> Result<Vec<(String, String)>, ApiError> {
        Query::<Vec<(String, String)>>::try_from_uri(&self.parts.uri)
            .map(|q| q.0)
            .map_err(ApiError::query)
    }

    fn namespace_id(&self) -> Result<String, ApiError> {
        namespace_id(&self.ns)
    }

    fn key_name(&self) -> Result<String, ApiError> {
        key_name(&self.key)
    }
}

pub async fn dispatch(c: &mut Ctx<'_>) -> ApiResult {
    match c.op {
        Op::ListNamespaces => namespaces::list(c).await,
        Op::CreateNamespace => namespaces::create(c).await,
        Op::GetNamespace => namespaces::get(c).await,
        Op::RenameNamespace => namespaces::rename(c).await,
        Op::DeleteNamespace => namespaces::delete(c).await,
        Op::ListKeys => values::list_keys(c).await,
        Op::GetValue => values::get(c).await,
        Op::PutValue => values::put(c).await,
        Op::DeleteValue => values::delete(c).await,
        Op::GetMetadata => values::metadata(c).await,
        Op::BulkWrite => bulk::write(c).await,
        Op::BulkDelete => bulk::delete(c).await,
        Op::BulkGet => bulk::get(c).await,
    }
}

// ---------------------------------------------------------------------------------------------
// Request parsing shared by the handlers

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(ApiError::body)
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter()
        .rev()
        .find(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// An integer query parameter (`page`, `per_page`, `limit`). The spec types these as numbers
/// and the Python SDK sends floats (`time.time() + 3600`), so a finite number is accepted and
/// truncated.
fn int_param(q: &[(String, String)], name: &str) -> Result<Option<i64>, ApiError> {
    param(q, name)
        .map(|v| {
            v.parse::<f64>()
                .ok()
                .and_then(number)
                .filter(|n| n.unsigned_abs() <= MAX_NUMBER as u64)
                .ok_or_else(|| ApiError::query(format!("{name} must be a number, got {v:?}")))
        })
        .transpose()
}

/// `expiration` / `expiration_ttl` from the query: any number, range-checked by `expiration`.
fn expiration_param(q: &[(String, String)], name: &str) -> Result<Option<i64>, ApiError> {
    param(q, name)
        .map(|v| {
            v.parse::<f64>()
                .ok()
                .and_then(number)
                .ok_or_else(|| ApiError::query(format!("{name} must be a number, got {v:?}")))
        })
        .transpose()
}

/// The largest `page`, `per_page` or `limit` read (beyond, it is not taken for a number):
/// the bound of expirations, the other numbers of the API.
const MAX_NUMBER: i64 = limits::MAX_EXPIRATION;

/// A finite number, truncated (and saturated) to an integer.
fn number(f: f64) -> Option<i64> {
    f.is_finite().then(|| f.trunc() as i64)
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

// A single PUT checks its parts as they arrive (key in the path, expiration in the query,
// then the body); the checks are the shared ones of `limits`.

fn check_value(len: usize) -> Result<(), ApiError> {
    limits::check_value(len).map_err(ApiError::from_write)
}

fn metadata_text(meta: Option<&Json>) -> Result<Option<String>, ApiError> {
    limits::metadata_text(meta).map_err(ApiError::from_write)
}

/// Single and bulk writes both come here (a bulk pair through `limits::check_write`), after
/// `number`, so they accept and refuse the same values.
fn expiration(abs: Option<i64>, ttl: Option<i64>, now: i64) -> Result<Option<i64>, ApiError> {
    limits::absolute_expiration(abs, ttl, now).map_err(ApiError::from_write)
}

fn parse_metadata(m: Option<&str>) -> Option<Json> {
    m.and_then(|m| serde_json::from_str(m).ok())
}

fn exp_u64(e: Option<i64>) -> Option<u64> {
    e.map(|e| e.max(0) as u64)
}
