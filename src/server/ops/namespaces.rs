//! List, create, get, rename and delete namespaces.

use super::{int_param, param, parse_json, Ctx};
use crate::api::{limits, Namespace};
use crate::server::routes::{ok, ok_null, ApiError, ApiResult};
use crate::server::store::{NamespaceOrder, NamespaceRow};
use serde_json::{json, Value as Json};

pub async fn list(c: &mut Ctx<'_>) -> ApiResult {
    let q = c.query()?;
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
    let (store, account) = (c.store(), c.account.clone());
    let (rows, total) = c
        .blocking(move || store.list_namespaces(&account, order, desc, page, per_page))
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

pub async fn create(c: &mut Ctx<'_>) -> ApiResult {
    let title = title(&c.read_body().await?)?;
    let id = random_id()?;
    let row = NamespaceRow {
        id: id.clone(),
        title: title.clone(),
    };
    let (store, account) = (c.store(), c.account.clone());
    c.blocking(move || store.create_namespace(&account, &id, &title))
        .await?;
    ok(Some(namespace(row)), None)
}

pub async fn get(c: &mut Ctx<'_>) -> ApiResult {
    let ns = c.namespace_id()?;
    let (store, account) = (c.store(), c.account.clone());
    let row = c
        .blocking(move || store.get_namespace(&account, &ns))
        .await?;
    ok(Some(namespace(row)), None)
}

pub async fn rename(c: &mut Ctx<'_>) -> ApiResult {
    let ns = c.namespace_id()?;
    let title = title(&c.read_body().await?)?;
    let (store, account) = (c.store(), c.account.clone());
    let row = c
        .blocking(move || store.rename_namespace(&account, &ns, &title))
        .await?;
    ok(Some(namespace(row)), None)
}

pub async fn delete(c: &mut Ctx<'_>) -> ApiResult {
    let ns = c.namespace_id()?;
    let (store, account) = (c.store(), c.account.clone());
    c.blocking(move || store.delete_namespace(&account, &ns))
        .await?;
    ok_null()
}

fn namespace(row: NamespaceRow) -> Namespace {
    Namespace {
        id: row.id,
        title: row.title,
        supports_url_encoding: true,
    }
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

/// 32 random lowercase hex characters from the OS.
fn random_id() -> Result<String, ApiError> {
    crate::server::random_hex(16).map_err(|e| {
        tracing::error!("cannot read /dev/urandom: {e}");
        ApiError::internal()
    })
}
