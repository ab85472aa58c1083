//! List keys; get, put and delete one value; read one key's metadata.

use super::{
    check_value, exp_u64, expiration, expiration_param, int_param, metadata_text, param,
    parse_metadata, Ctx,
};
use crate::api::{limits, CursorInfo, KeyInfo};
use crate::server::routes::{ok, ok_null, ApiError, ApiResult};
use crate::server::store::{Entry, Write};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart};
use axum::http::{header, HeaderValue, Request, Response};
use base64::Engine;
use serde_json::Value as Json;
use tower::{service_fn, Layer, ServiceExt};

pub async fn list_keys(c: &mut Ctx<'_>) -> ApiResult {
    let ns = c.namespace_id()?;
    let q = c.query()?;
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
    let (store, account, now) = (c.store(), c.account.clone(), c.now);
    let (keys, more) = c
        .blocking(move || {
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
        Some(last) if more => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&last.name),
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

pub async fn get(c: &mut Ctx<'_>) -> ApiResult {
    let entry = entry(c).await?;
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

pub async fn metadata(c: &mut Ctx<'_>) -> ApiResult {
    let entry = entry(c).await?;
    ok(parse_metadata(entry.metadata.as_deref()), None)
}

/// The live entry the request's namespace and key name, or 404 / 10009.
async fn entry(c: &mut Ctx<'_>) -> Result<Entry, ApiError> {
    let ns = c.namespace_id()?;
    let key = c.key_name()?;
    let (store, account, now, op) = (c.store(), c.account.clone(), c.now, c.op);
    c.blocking(move || store.get(&account, &ns, &key, now))
        .await?
        .ok_or_else(|| ApiError::key_not_found(op))
}

pub async fn put(c: &mut Ctx<'_>) -> ApiResult {
    let ns = c.namespace_id()?;
    let key = c.key_name()?;
    let q = c.query()?;
    let exp = expiration(
        expiration_param(&q, "expiration")?,
        expiration_param(&q, "expiration_ttl")?,
        c.now,
    )?;
    let (value, metadata) = value_and_metadata(c).await?;
    let w = Write {
        key,
        value,
        metadata,
        expiration: exp,
    };
    let (store, account, now) = (c.store(), c.account.clone(), c.now);
    c.blocking(move || store.put(&account, &ns, &w, now))
        .await?;
    ok_null()
}

pub async fn delete(c: &mut Ctx<'_>) -> ApiResult {
    let ns = c.namespace_id()?;
    let key = c.key_name()?;
    let (store, account) = (c.store(), c.account.clone());
    c.blocking(move || store.delete(&account, &ns, &key))
        .await?;
    ok_null()
}

/// The value (and metadata) of a single PUT: a raw body, or multipart/form-data with a `value`
/// part and an optional `metadata` part, with or without part content types.
async fn value_and_metadata(c: &mut Ctx<'_>) -> Result<(Vec<u8>, Option<String>), ApiError> {
    let multipart = c
        .parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    let bytes = c.read_body().await?;
    if !multipart {
        check_value(bytes.len())?;
        return Ok((bytes, None));
    }
    let mut req = Request::new(Body::from(bytes));
    *req.headers_mut() = c.parts.headers.clone();
    // The body is read already, within the server's own bounds: without this, axum's default
    // 2 MB limit for extractors would refuse a 25 MiB value sent as multipart (as the SDKs do).
    let extract = DefaultBodyLimit::disable().layer(service_fn(|req: Request<Body>| async move {
        Ok::<_, std::convert::Infallible>(Multipart::from_request(req, &()).await)
    }));
    let mut form = match extract.oneshot(req).await {
        Ok(form) => form.map_err(|e| ApiError::body(e.body_text()))?,
        Err(never) => match never {},
    };
    let (mut value, mut metadata): (Option<Bytes>, Option<Json>) = (None, None);
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
    Ok((Vec::from(value), metadata_text(metadata.as_ref())?))
}
