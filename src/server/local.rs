//! `kvfs serve`'s SQLite store called in-process, as a [`KvBackend`]: the embedded default of
//! `kvfs mount`, with no listener and no token. The input checks are the routes' own
//! (`crate::api::limits`, through `crate::backend::inproc`), so it refuses what the server
//! refuses, with the error kinds the HTTP client would report.

use super::store::{self, NamespaceOrder, Store, StoreError, Write};
use crate::api::limits::{self, MAX_BULK_GET_KEYS, MAX_BULK_ITEMS};
use crate::api::{BulkResult, Namespace};
use crate::backend::inproc::{self, Clock};
use crate::backend::{
    op, BackendError, Counters, ErrorKind, Fetched, KeyPage, KvBackend, PutOptions, RequestCounts,
    Result, ValueResponse, WriteItem,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The SQLite store of one account, in-process.
pub struct LocalStore {
    store: Arc<Store>,
    account: String,
    dir: PathBuf,
    counters: Counters,
    clock: Clock,
}

impl LocalStore {
    /// Opens (creating if needed) `DIR/kv.sqlite3`, the data of `kvfs serve --data DIR`, for
    /// `account`. Blocking, as opening SQLite is.
    pub fn open(dir: &Path, account: &str) -> std::io::Result<LocalStore> {
        Ok(LocalStore {
            store: Arc::new(Store::open(dir)?),
            account: account.to_string(),
            dir: dir.to_path_buf(),
            counters: Counters::default(),
            clock: Clock::default(),
        })
    }

    /// Forgets the requests counted so far.
    pub fn reset_counts(&self) {
        self.counters.reset();
    }

    /// Moves this store's clock forward (whole seconds), to expire keys without waiting.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Runs one store call on a blocking thread. `what` names the namespace (or title) for
    /// error messages.
    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        what: &str,
        f: impl FnOnce(&Store, &str, i64) -> store::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (store, account, now) = (self.store.clone(), self.account.clone(), self.clock.now());
        match tokio::task::spawn_blocking(move || f(&store, &account, now)).await {
            Ok(r) => r.map_err(|e| store_error(op, what, e)),
            Err(e) => Err(BackendError::new(
                ErrorKind::Unavailable,
                format!("{op}: the store task failed: {e}"),
            )),
        }
    }

    async fn bulk_get_one(&self, ns: &str, keys: &[String]) -> Result<HashMap<String, Fetched>> {
        const OP: &str = op::BULK_GET;
        self.counters.bump(OP);
        inproc::check_namespace(OP, ns)?;
        inproc::check_keys(OP, keys)?;
        let (id, keys) = (ns.to_string(), keys.to_vec());
        let (keys, entries) = self
            .run(OP, ns, move |s, account, now| {
                let entries = s.bulk_get(account, &id, &keys, now)?;
                Ok((keys, entries))
            })
            .await?;
        let found = keys
            .into_iter()
            .zip(entries)
            .map(|(k, e)| {
                (
                    k,
                    e.map(|e| (Bytes::from(e.value), e.metadata, e.expiration)),
                )
            })
            .collect();
        inproc::bulk_answer(OP, found)
    }

    async fn bulk_write_one(&self, ns: &str, items: &[WriteItem]) -> Result<BulkResult> {
        const OP: &str = op::BULK_WRITE;
        self.counters.bump(OP);
        inproc::check_namespace(OP, ns)?;
        let now = self.clock.now();
        // One invalid pair fails the whole request, as the API answers 400 for it.
        let writes = items
            .iter()
            .map(|i| write(OP, &i.key, &i.value, &i.opts, now))
            .collect::<Result<Vec<_>>>()?;
        let id = ns.to_string();
        let n = writes.len() as u64;
        self.run(OP, ns, move |s, account, now| {
            s.bulk_put(account, &id, &writes, now)
        })
        .await?;
        Ok(all_succeeded(n))
    }

    async fn bulk_delete_one(&self, ns: &str, keys: &[String]) -> Result<BulkResult> {
        const OP: &str = op::BULK_DELETE;
        self.counters.bump(OP);
        inproc::check_namespace(OP, ns)?;
        inproc::check_keys(OP, keys)?;
        let (id, keys) = (ns.to_string(), keys.to_vec());
        let n = keys.len() as u64;
        self.run(OP, ns, move |s, account, _| {
            s.bulk_delete(account, &id, &keys)
        })
        .await?;
        Ok(all_succeeded(n))
    }
}

fn all_succeeded(n: u64) -> BulkResult {
    BulkResult {
        successful_key_count: n,
        unsuccessful_keys: vec![],
    }
}

/// One checked write, as the store takes it.
fn write(op: &str, key: &str, value: &Bytes, opts: &PutOptions, now: i64) -> Result<Write> {
    let c = inproc::check_write(op, key, value.len(), opts, now)?;
    Ok(Write {
        key: key.to_string(),
        value: value.to_vec(),
        metadata: c.metadata,
        expiration: c.expiration,
    })
}

fn store_error(op: &str, what: &str, e: StoreError) -> BackendError {
    match e {
        StoreError::NamespaceNotFound => inproc::namespace_not_found(op, what),
        StoreError::DuplicateTitle => inproc::title_exists(op, what),
        StoreError::TooManyNamespaces => inproc::too_many_namespaces(op),
        // What the server answers 500 for: maybe better on another try (busy, disk full).
        StoreError::Db(e) => {
            BackendError::new(ErrorKind::Unavailable, format!("{op}: database error: {e}"))
        }
    }
}

#[async_trait]
impl KvBackend for LocalStore {
    fn describe(&self) -> String {
        format!("the local store in {}", self.dir.display())
    }

    fn request_counts(&self) -> RequestCounts {
        self.counters.snapshot()
    }

    async fn list_namespaces(&self) -> Result<Vec<Namespace>> {
        const OP: &str = op::LIST_NAMESPACES;
        self.counters.bump(OP);
        let per_page = limits::MAX_PER_PAGE as u64;
        let mut all = Vec::new();
        for page in 1u64.. {
            let (rows, _) = self
                .run(OP, "", move |s, account, _| {
                    s.list_namespaces(account, NamespaceOrder::Title, false, page, per_page)
                })
                .await?;
            let last = (rows.len() as u64) < per_page;
            all.extend(rows.into_iter().map(|r| Namespace {
                id: r.id,
                title: r.title,
                supports_url_encoding: true,
            }));
            if last {
                break;
            }
        }
        Ok(all)
    }

    async fn create_namespace(&self, title: &str) -> Result<Namespace> {
        const OP: &str = op::CREATE_NAMESPACE;
        self.counters.bump(OP);
        inproc::check_title(OP, title)?;
        // The server's own generator: 32 random lowercase hex characters.
        let id = super::random_hex(16).map_err(|e| {
            BackendError::new(
                ErrorKind::Unavailable,
                format!("{OP}: cannot read /dev/urandom: {e}"),
            )
        })?;
        let (i, t) = (id.clone(), title.to_string());
        self.run(OP, title, move |s, account, _| {
            s.create_namespace(account, &i, &t)
        })
        .await?;
        Ok(Namespace {
            id,
            title: title.to_string(),
            supports_url_encoding: true,
        })
    }

    async fn rename_namespace(&self, id: &str, title: &str) -> Result<()> {
        const OP: &str = op::RENAME_NAMESPACE;
        self.counters.bump(OP);
        inproc::check_namespace(OP, id)?;
        inproc::check_title(OP, title)?;
        let (i, t) = (id.to_string(), title.to_string());
        let r = self
            .run(OP, id, move |s, account, _| {
                s.rename_namespace(account, &i, &t)
            })
            .await;
        match r {
            // The store's duplicate names the title, not the namespace.
            Err(e) if e.kind == ErrorKind::Exists => Err(inproc::title_exists(OP, title)),
            other => other.map(drop),
        }
    }

    async fn delete_namespace(&self, id: &str) -> Result<()> {
        const OP: &str = op::DELETE_NAMESPACE;
        self.counters.bump(OP);
        inproc::check_namespace(OP, id)?;
        let i = id.to_string();
        self.run(OP, id, move |s, account, _| s.delete_namespace(account, &i))
            .await
    }

    async fn list_keys(
        &self,
        ns: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<KeyPage> {
        const OP: &str = op::LIST_KEYS;
        self.counters.bump(OP);
        inproc::check_namespace(OP, ns)?;
        let req = inproc::list_request(OP, cursor, limit)?;
        let (id, prefix) = (ns.to_string(), prefix.as_bytes().to_vec());
        let (keys, more) = self
            .run(OP, ns, move |s, account, now| {
                s.list_keys(account, &id, &prefix, req.after.as_deref(), req.limit, now)
            })
            .await?;
        let keys = keys
            .iter()
            .map(|k| inproc::key_info(&k.name, k.expiration, k.metadata.as_deref()))
            .collect();
        Ok(inproc::key_page(keys, more))
    }

    async fn get_value(&self, ns: &str, key: &str) -> Result<ValueResponse> {
        const OP: &str = op::GET_VALUE;
        self.counters.bump(OP);
        inproc::check_namespace(OP, ns)?;
        inproc::check_key(OP, key)?;
        let (id, k) = (ns.to_string(), key.to_string());
        let entry = self
            .run(OP, ns, move |s, account, now| s.get(account, &id, &k, now))
            .await?
            .ok_or_else(|| inproc::key_not_found(OP, key))?;
        Ok(ValueResponse {
            bytes: Bytes::from(entry.value),
            expiration: inproc::expiration_u64(entry.expiration),
        })
    }

    async fn bulk_get(&self, ns: &str, keys: &[String]) -> Result<HashMap<String, Fetched>> {
        let mut out = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_BULK_GET_KEYS) {
            out.extend(self.bulk_get_one(ns, chunk).await?);
        }
        Ok(out)
    }

    async fn put_value(&self, ns: &str, key: &str, value: Bytes, opts: &PutOptions) -> Result<()> {
        const OP: &str = op::PUT_VALUE;
        self.counters.bump(OP);
        inproc::check_namespace(OP, ns)?;
        let w = write(OP, key, &value, opts, self.clock.now())?;
        let id = ns.to_string();
        self.run(OP, ns, move |s, account, now| s.put(account, &id, &w, now))
            .await
    }

    async fn bulk_write(&self, ns: &str, items: &[WriteItem]) -> Result<BulkResult> {
        let mut total = BulkResult::default();
        for chunk in items.chunks(MAX_BULK_ITEMS) {
            inproc::merge(&mut total, self.bulk_write_one(ns, chunk).await?);
        }
        Ok(total)
    }

    async fn delete_value(&self, ns: &str, key: &str) -> Result<()> {
        const OP: &str = op::DELETE_VALUE;
        self.counters.bump(OP);
        inproc::check_namespace(OP, ns)?;
        inproc::check_key(OP, key)?;
        let (id, k) = (ns.to_string(), key.to_string());
        // Deleting a missing key succeeds; a missing namespace does not.
        self.run(OP, ns, move |s, account, _| s.delete(account, &id, &k))
            .await
    }

    async fn bulk_delete(&self, ns: &str, keys: &[String]) -> Result<BulkResult> {
        let mut total = BulkResult::default();
        for chunk in keys.chunks(MAX_BULK_ITEMS) {
            inproc::merge(&mut total, self.bulk_delete_one(ns, chunk).await?);
        }
        Ok(total)
    }
}
