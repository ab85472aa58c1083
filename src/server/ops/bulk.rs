//! Bulk write, bulk delete (both routes) and bulk get: one SQLite transaction each.

use super::{exp_u64, number, parse_json, parse_metadata, Ctx};
use crate::api::{limits, BulkGetBody, BulkGetEntry, BulkResult, BulkWriteItem};
use crate::server::routes::{ok, ApiError, ApiResult};
use crate::server::store::{Entry, Write};
use axum::http::StatusCode;
use base64::Engine;
use serde_json::{json, Value as Json};

pub async fn write(c: &mut Ctx<'_>) -> ApiResult {
    let ns = c.namespace_id()?;
    let items: Vec<Json> = parse_json(&c.read_body().await?)?;
    if items.len() > limits::MAX_BULK_ITEMS {
        return Err(ApiError::bad_request(
            10026,
            format!(
                "You can write a maximum of {} key-value pairs at once",
                limits::MAX_BULK_ITEMS
            ),
        ));
    }
    let now = c.now;
    let writes = items
        .into_iter()
        .map(|it| write_item(it, now))
        .collect::<Result<Vec<_>, _>>()?;
    let n = writes.len() as u64;
    let (store, account) = (c.store(), c.account.clone());
    c.blocking(move || store.bulk_put(&account, &ns, &writes, now))
        .await?;
    ok(Some(result(n)), None)
}

pub async fn delete(c: &mut Ctx<'_>) -> ApiResult {
    let ns = c.namespace_id()?;
    let keys: Vec<String> = parse_json(&c.read_body().await?)?;
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
    let (store, account) = (c.store(), c.account.clone());
    c.blocking(move || store.bulk_delete(&account, &ns, &keys))
        .await?;
    ok(Some(result(n)), None)
}

pub async fn get(c: &mut Ctx<'_>) -> ApiResult {
    let ns = c.namespace_id()?;
    let body: BulkGetBody = parse_json(&c.read_body().await?)?;
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
    let (store, account, now) = (c.store(), c.account.clone(), c.now);
    let (keys, entries) = c
        .blocking(move || {
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
            Some(e) => get_value(e, as_json, with_metadata)?,
        };
        values.insert(k, v);
    }
    ok(Some(json!({ "values": values })), None)
}

fn result(n: u64) -> BulkResult {
    BulkResult {
        successful_key_count: n,
        unsuccessful_keys: vec![],
    }
}

fn write_item(mut item: Json, now: i64) -> Result<Write, ApiError> {
    // Expirations are JSON numbers, floats included (the Python SDK types them so); the
    // shared type holds integers, so take them out first. Their range is checked by
    // `expiration`, as for a single write.
    let mut take = |field: &str| -> Result<Option<i64>, ApiError> {
        match item.as_object_mut().and_then(|o| o.remove(field)) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .and_then(number)
                .map(Some)
                .ok_or_else(|| ApiError::body(format!("{field} must be a number, got {v}"))),
        }
    };
    let (abs, ttl) = (take("expiration")?, take("expiration_ttl")?);
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

fn get_value(e: Entry, as_json: bool, with_metadata: bool) -> Result<Json, ApiError> {
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
