//! The HTTP client as a [`KvBackend`]: where HTTP statuses, Cloudflare error codes and the wire's
//! quirks turn into bytes and errors by meaning.

use super::{Client, Error};
use crate::api::{BulkResult, BulkWriteItem, Namespace};
use crate::backend::{
    self, BackendError, ErrorKind, Fetched, KeyPage, KvBackend, PutOptions, RequestCounts,
    ValueResponse, ValueStream, WriteItem,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;

/// Cloudflare's code for "a namespace with this account ID and title already exists".
const TITLE_EXISTS: u32 = 10014;
/// Cloudflare's code for "namespace not found".
const NAMESPACE_NOT_FOUND: u32 = 10013;

impl From<Error> for BackendError {
    fn from(e: Error) -> Self {
        let kind = match (e.status(), e.code()) {
            (Some(404), _) => ErrorKind::NotFound,
            (Some(400), Some(TITLE_EXISTS)) => ErrorKind::Exists,
            (Some(413), _) => ErrorKind::TooLarge,
            (Some(414), _) => ErrorKind::NameTooLong,
            (Some(401 | 403), _) => ErrorKind::Denied,
            // 408 and 429 are worth another try, as are 5xx and transport failures.
            (Some(s), _) if (400..500).contains(&s) && s != 408 && s != 429 => ErrorKind::Invalid,
            _ => ErrorKind::Unavailable,
        };
        BackendError::new(kind, e.to_string())
    }
}

/// One bulk-write pair: text when the value is UTF-8, base64 otherwise.
fn wire_item(item: &WriteItem) -> BulkWriteItem {
    use base64::Engine;
    let (value, base64) = match std::str::from_utf8(&item.value) {
        Ok(s) => (s.to_string(), false),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&item.value),
            true,
        ),
    };
    BulkWriteItem {
        key: item.key.clone(),
        value,
        base64,
        expiration: item.opts.expiration,
        expiration_ttl: item.opts.expiration_ttl,
        metadata: item.opts.metadata.clone(),
    }
}

#[async_trait]
impl KvBackend for Client {
    fn describe(&self) -> String {
        format!("the Workers KV API at {}", self.base_url())
    }

    fn request_counts(&self) -> RequestCounts {
        Client::request_counts(self)
    }

    async fn list_namespaces(&self) -> backend::Result<Vec<Namespace>> {
        Ok(Client::list_namespaces(self).await?)
    }

    async fn create_namespace(&self, title: &str) -> backend::Result<Namespace> {
        Ok(Client::create_namespace(self, title).await?)
    }

    async fn rename_namespace(&self, id: &str, title: &str) -> backend::Result<()> {
        Ok(Client::rename_namespace(self, id, title).await?)
    }

    async fn delete_namespace(&self, id: &str) -> backend::Result<()> {
        Ok(Client::delete_namespace(self, id).await?)
    }

    async fn list_keys(
        &self,
        ns: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> backend::Result<KeyPage> {
        let prefix = (!prefix.is_empty()).then_some(prefix);
        Ok(self.list_keys_page(ns, prefix, cursor, limit).await?)
    }

    async fn get_value(&self, ns: &str, key: &str) -> backend::Result<ValueResponse> {
        Ok(Client::get_value(self, ns, key).await?)
    }

    async fn get_value_stream(&self, ns: &str, key: &str) -> backend::Result<ValueStream> {
        Ok(Client::get_value_stream(self, ns, key).await?)
    }

    async fn bulk_get(
        &self,
        ns: &str,
        keys: &[String],
    ) -> backend::Result<HashMap<String, Fetched>> {
        let got = Client::bulk_get(self, ns, keys).await?;
        Ok(got
            .into_iter()
            .map(|(k, v)| {
                let fetched = match v {
                    None => Fetched::Missing,
                    // Bulk get answers text: U+FFFD may stand for bytes that were not UTF-8.
                    Some(v) if v.value.contains('\u{FFFD}') => Fetched::FetchAlone,
                    Some(v) => Fetched::Value {
                        bytes: Bytes::from(v.value),
                        metadata: v.metadata,
                        expiration: v.expiration,
                    },
                };
                (k, fetched)
            })
            .collect())
    }

    async fn put_value(
        &self,
        ns: &str,
        key: &str,
        value: Bytes,
        opts: &PutOptions,
    ) -> backend::Result<()> {
        Ok(Client::put_value(self, ns, key, value, opts).await?)
    }

    async fn put_file(
        &self,
        ns: &str,
        key: &str,
        file: std::sync::Arc<std::fs::File>,
        len: u64,
        opts: &PutOptions,
    ) -> backend::Result<()> {
        Ok(Client::put_file(self, ns, key, file, len, opts).await?)
    }

    async fn bulk_write(&self, ns: &str, items: &[WriteItem]) -> backend::Result<BulkResult> {
        let wire: Vec<BulkWriteItem> = items.iter().map(wire_item).collect();
        Ok(Client::bulk_write(self, ns, &wire).await?)
    }

    async fn delete_value(&self, ns: &str, key: &str) -> backend::Result<()> {
        match Client::delete_value(self, ns, key).await {
            // A missing key is deleted already; a missing namespace is an error.
            Err(e) if e.is_not_found() && e.code() != Some(NAMESPACE_NOT_FOUND) => Ok(()),
            other => Ok(other?),
        }
    }

    async fn bulk_delete(&self, ns: &str, keys: &[String]) -> backend::Result<BulkResult> {
        Ok(Client::bulk_delete(self, ns, keys).await?)
    }
}
