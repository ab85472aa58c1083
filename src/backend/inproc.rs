//! What the in-process backends ([`super::mem::MemBackend`], [`crate::server::local::LocalStore`])
//! share: the API's checks with errors by meaning, the listing cursor, the shape of a bulk get
//! answer, and a clock tests can move. The checks are those of `kvfs serve`'s routes
//! (`crate::api::limits`), so all backends refuse the same input for the same reason.

use super::{BackendError, ErrorKind, Fetched, KeyPage, PutOptions, Result};
use crate::api::limits::{self, CheckedWrite, KeyError, WriteError};
use crate::api::{BulkResult, KeyInfo};
use bytes::Bytes;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// The error kind of a refused write, as the HTTP client reads the API's status for it.
pub(crate) fn write_error(op: &str, key: &str, e: WriteError) -> BackendError {
    let kind = match &e {
        WriteError::Key(KeyError::TooLong(_)) => ErrorKind::NameTooLong,
        WriteError::Key(_) | WriteError::ExpirationTtl(_) | WriteError::Expiration(_) => {
            ErrorKind::Invalid
        }
        WriteError::ValueTooLarge(_) | WriteError::MetadataTooLarge(_) => ErrorKind::TooLarge,
    };
    BackendError::new(kind, format!("{op} {key:?}: {e}"))
}

/// Checks one write and makes its expiration absolute.
pub(crate) fn check_write(
    op: &str,
    key: &str,
    value_len: usize,
    opts: &PutOptions,
    now: i64,
) -> Result<CheckedWrite> {
    limits::check_write(
        key,
        value_len,
        opts.metadata.as_ref(),
        expiration_i64(opts.expiration),
        expiration_i64(opts.expiration_ttl),
        now,
    )
    .map_err(|e| write_error(op, key, e))
}

/// Checks a key named by a read or a delete.
pub(crate) fn check_key(op: &str, key: &str) -> Result<()> {
    limits::check_key(key).map_err(|e| write_error(op, key, WriteError::Key(e)))
}

/// A namespace id that is not 32 lowercase hex characters is refused before any lookup.
pub(crate) fn check_namespace(op: &str, id: &str) -> Result<()> {
    if limits::is_namespace_id(id) {
        Ok(())
    } else {
        Err(BackendError::new(
            ErrorKind::Invalid,
            format!("{op}: invalid namespace id {id:?}"),
        ))
    }
}

pub(crate) fn check_title(op: &str, title: &str) -> Result<()> {
    limits::check_title(title)
        .map_err(|m| BackendError::new(ErrorKind::Invalid, format!("{op} {title:?}: {m}")))
}

pub(crate) fn namespace_not_found(op: &str, id: &str) -> BackendError {
    BackendError::not_found(format!("{op}: namespace {id} not found"))
}

pub(crate) fn title_exists(op: &str, title: &str) -> BackendError {
    BackendError::new(
        ErrorKind::Exists,
        format!("{op}: a namespace titled {title:?} already exists"),
    )
}

pub(crate) fn too_many_namespaces(op: &str) -> BackendError {
    BackendError::new(
        ErrorKind::Invalid,
        format!(
            "{op}: this account already has the maximum of {} namespaces",
            limits::MAX_NAMESPACES
        ),
    )
}

/// A listing request, checked: the page size and the key to start after.
pub(crate) struct ListRequest {
    pub limit: usize,
    pub after: Option<Vec<u8>>,
}

pub(crate) fn list_request(
    op: &str,
    cursor: Option<&str>,
    limit: Option<u32>,
) -> Result<ListRequest> {
    let limit = limit.unwrap_or(limits::DEFAULT_LIST_LIMIT);
    limits::check_list_limit(limit as i64)
        .map_err(|m| BackendError::new(ErrorKind::Invalid, format!("{op}: {m}")))?;
    let after = match cursor.filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(limits::decode_cursor(c).ok_or_else(|| {
            BackendError::new(ErrorKind::Invalid, format!("{op}: invalid cursor {c:?}"))
        })?),
    };
    Ok(ListRequest {
        limit: limit as usize,
        after,
    })
}

/// A page of keys; `more` says whether live keys follow the last one.
pub(crate) fn key_page(keys: Vec<KeyInfo>, more: bool) -> KeyPage {
    let cursor = match keys.last() {
        Some(last) if more => limits::encode_cursor(last.name.as_bytes()),
        _ => String::new(),
    };
    KeyPage { keys, cursor }
}

/// One listed key as the API shows it.
pub(crate) fn key_info(name: &[u8], expiration: Option<i64>, metadata: Option<&str>) -> KeyInfo {
    KeyInfo {
        name: String::from_utf8_lossy(name).into_owned(),
        expiration: expiration_u64(expiration),
        metadata: parse_metadata(metadata),
    }
}

pub(crate) fn parse_metadata(m: Option<&str>) -> Option<serde_json::Value> {
    m.and_then(|m| serde_json::from_str(m).ok())
}

pub(crate) fn expiration_u64(e: Option<i64>) -> Option<u64> {
    e.map(|e| e.max(0) as u64)
}

/// Checks the keys of one bulk request (get or delete).
pub(crate) fn check_keys(op: &str, keys: &[String]) -> Result<()> {
    keys.iter().try_for_each(|k| check_key(op, k))
}

/// Checks the size of one bulk get answer.
pub(crate) fn check_bulk_get_size(op: &str, total: usize) -> Result<()> {
    if total > limits::MAX_BULK_GET_BYTES {
        return Err(BackendError::new(
            ErrorKind::TooLarge,
            format!("{op}: {}", limits::bulk_get_too_large(total)),
        ));
    }
    Ok(())
}

/// What a bulk get says of a stored value: KV's bulk get answers text, so a value that is not
/// UTF-8 must be read alone.
pub(crate) fn fetched(value: Bytes, metadata: Option<&str>, expiration: Option<i64>) -> Fetched {
    if std::str::from_utf8(&value).is_err() {
        return Fetched::FetchAlone;
    }
    Fetched::Value {
        bytes: value,
        metadata: parse_metadata(metadata),
        expiration: expiration_u64(expiration),
    }
}

/// One stored entry a bulk get found: value, serialized metadata, absolute expiration.
pub(crate) type Found = (Bytes, Option<String>, Option<i64>);

/// A bulk get's answer from what was found of each key (None: missing or expired); refused
/// whole when the values pass the answer's size limit.
pub(crate) fn bulk_answer(
    op: &str,
    found: Vec<(String, Option<Found>)>,
) -> Result<std::collections::HashMap<String, Fetched>> {
    let total = found.iter().flat_map(|(_, f)| f).map(|f| f.0.len()).sum();
    check_bulk_get_size(op, total)?;
    Ok(found
        .into_iter()
        .map(|(k, f)| {
            let f = match f {
                None => Fetched::Missing,
                Some((value, metadata, expiration)) => {
                    fetched(value, metadata.as_deref(), expiration)
                }
            };
            (k, f)
        })
        .collect())
}

/// The wall clock plus an offset tests move forward to expire keys without waiting.
#[derive(Debug, Default)]
pub struct Clock {
    offset: AtomicI64,
}

impl Clock {
    /// Now, in UNIX seconds.
    pub fn now(&self) -> i64 {
        limits::now_secs() as i64 + self.offset.load(Ordering::Relaxed)
    }

    /// Moves the clock forward by `by` (whole seconds).
    pub fn advance(&self, by: Duration) {
        let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
        self.offset.fetch_add(secs, Ordering::Relaxed);
    }
}

pub(crate) fn expiration_i64(e: Option<u64>) -> Option<i64> {
    e.map(|e| i64::try_from(e).unwrap_or(i64::MAX))
}

pub(crate) fn key_not_found(op: &str, key: &str) -> BackendError {
    BackendError::not_found(format!("{op} {key:?}: key not found"))
}

/// Adds one request's bulk result to the total of a split bulk call.
pub(crate) fn merge(total: &mut BulkResult, r: BulkResult) {
    total.successful_key_count += r.successful_key_count;
    total.unsuccessful_keys.extend(r.unsuccessful_keys);
}
