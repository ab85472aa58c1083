//! SQLite storage of `kvfs serve`: one connection behind a mutex, used from blocking threads.

use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Why a store operation did not happen.
#[derive(Debug)]
pub enum StoreError {
    NamespaceNotFound,
    DuplicateTitle,
    TooManyNamespaces,
    Db(rusqlite::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(e)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub use crate::api::limits::MAX_NAMESPACES;

#[derive(Debug, Clone)]
pub struct NamespaceRow {
    pub id: String,
    pub title: String,
}

#[derive(Debug, Clone, Copy)]
pub enum NamespaceOrder {
    Id,
    Title,
}

/// A key as listed: name, absolute expiration, serialized metadata.
pub struct ListedKey {
    pub name: Vec<u8>,
    pub expiration: Option<i64>,
    pub metadata: Option<String>,
}

/// A stored value with what comes with it.
pub struct Entry {
    pub value: Vec<u8>,
    pub metadata: Option<String>,
    pub expiration: Option<i64>,
}

/// One validated write.
pub struct Write {
    pub key: String,
    pub value: Vec<u8>,
    pub metadata: Option<String>,
    pub expiration: Option<i64>,
}

struct Inner {
    conn: Connection,
    last_purge: i64,
}

pub struct Store {
    inner: Mutex<Inner>,
}

/// Expired rows are purged at most this often (reads already hide them).
const PURGE_INTERVAL_SECS: i64 = 60;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS namespaces (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    title TEXT NOT NULL,
    UNIQUE (account, title)
);
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    metadata TEXT,
    expiration INTEGER,
    PRIMARY KEY (ns, key)
);
CREATE INDEX IF NOT EXISTS kv_expiration ON kv (expiration) WHERE expiration IS NOT NULL;
";

impl Store {
    /// Opens (creating if needed) `DIR/kv.sqlite3`.
    pub fn open(dir: &Path) -> std::io::Result<Store> {
        std::fs::create_dir_all(dir)?;
        let conn = Connection::open(dir.join("kv.sqlite3")).map_err(std::io::Error::other)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .and_then(|_| conn.busy_timeout(std::time::Duration::from_secs(5)))
            .and_then(|_| conn.execute_batch(SCHEMA))
            .map_err(std::io::Error::other)?;
        Ok(Store {
            inner: Mutex::new(Inner {
                conn,
                last_purge: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave SQLite inconsistent: keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn list_namespaces(
        &self,
        account: &str,
        order: NamespaceOrder,
        desc: bool,
        page: u64,
        per_page: u64,
    ) -> Result<(Vec<NamespaceRow>, u64)> {
        let g = self.lock();
        let total: u64 = g.conn.query_row(
            "SELECT COUNT(*) FROM namespaces WHERE account = ?1",
            [account],
            |r| r.get::<_, i64>(0),
        )? as u64;
        let col = match order {
            NamespaceOrder::Id => "id",
            NamespaceOrder::Title => "title",
        };
        let dir = if desc { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT id, title FROM namespaces WHERE account = ?1 ORDER BY {col} {dir}, id {dir} LIMIT ?2 OFFSET ?3"
        );
        let offset = (page - 1).saturating_mul(per_page).min(i64::MAX as u64);
        let mut stmt = g.conn.prepare(&sql)?;
        let rows = stmt
            .query_map(params![account, per_page as i64, offset as i64], |r| {
                Ok(NamespaceRow {
                    id: r.get(0)?,
                    title: r.get(1)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok((rows, total))
    }

    pub fn create_namespace(&self, account: &str, id: &str, title: &str) -> Result<()> {
        let g = self.lock();
        let count: i64 = g.conn.query_row(
            "SELECT COUNT(*) FROM namespaces WHERE account = ?1",
            [account],
            |r| r.get(0),
        )?;
        if count as u64 >= MAX_NAMESPACES {
            return Err(StoreError::TooManyNamespaces);
        }
        if title_taken(&g.conn, account, title, None)? {
            return Err(StoreError::DuplicateTitle);
        }
        g.conn.execute(
            "INSERT INTO namespaces (id, account, title) VALUES (?1, ?2, ?3)",
            params![id, account, title],
        )?;
        Ok(())
    }

    pub fn get_namespace(&self, account: &str, id: &str) -> Result<NamespaceRow> {
        let g = self.lock();
        namespace(&g.conn, account, id)
    }

    pub fn rename_namespace(&self, account: &str, id: &str, title: &str) -> Result<NamespaceRow> {
        let g = self.lock();
        namespace(&g.conn, account, id)?;
        if title_taken(&g.conn, account, title, Some(id))? {
            return Err(StoreError::DuplicateTitle);
        }
        g.conn.execute(
            "UPDATE namespaces SET title = ?1 WHERE id = ?2",
            params![title, id],
        )?;
        Ok(NamespaceRow {
            id: id.to_string(),
            title: title.to_string(),
        })
    }

    pub fn delete_namespace(&self, account: &str, id: &str) -> Result<()> {
        let mut g = self.lock();
        namespace(&g.conn, account, id)?;
        let tx = g.conn.transaction()?;
        tx.execute("DELETE FROM kv WHERE ns = ?1", [id])?;
        tx.execute("DELETE FROM namespaces WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// Up to `limit` live keys starting with `prefix`, after `after` (exclusive), in byte
    /// order; the flag says whether more follow.
    pub fn list_keys(
        &self,
        account: &str,
        ns: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        now: i64,
    ) -> Result<(Vec<ListedKey>, bool)> {
        let g = self.lock();
        namespace(&g.conn, account, ns)?;
        // One lower bound, so the index seeks straight to it: with both `>= prefix` and
        // `> after`, SQLite ranges on one and filters the other, and a page deep into a
        // namespace would scan every key before it.
        let (sql, from): (&str, &[u8]) = match after {
            Some(after) if after >= prefix => (
                "SELECT key, expiration, metadata FROM kv
                 WHERE ns = ?1 AND key > ?2 AND (expiration IS NULL OR expiration > ?3)
                 ORDER BY key LIMIT ?4",
                after,
            ),
            _ => (
                "SELECT key, expiration, metadata FROM kv
                 WHERE ns = ?1 AND key >= ?2 AND (expiration IS NULL OR expiration > ?3)
                 ORDER BY key LIMIT ?4",
                prefix,
            ),
        };
        let mut stmt = g.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params![ns, from, now, (limit + 1) as i64])?;
        let mut keys = Vec::new();
        while let Some(r) = rows.next()? {
            let name: Vec<u8> = r.get(0)?;
            // Keys are sorted, so the first one without the prefix ends the range.
            if !name.starts_with(prefix) {
                return Ok((keys, false));
            }
            if keys.len() == limit {
                return Ok((keys, true));
            }
            keys.push(ListedKey {
                name,
                expiration: r.get(1)?,
                metadata: r.get(2)?,
            });
        }
        Ok((keys, false))
    }

    /// The live entry under `key`, or None; an expired entry found on the way is deleted.
    pub fn get(&self, account: &str, ns: &str, key: &str, now: i64) -> Result<Option<Entry>> {
        let g = self.lock();
        namespace(&g.conn, account, ns)?;
        get_entry(&g.conn, ns, key, now)
    }

    pub fn put(&self, account: &str, ns: &str, w: &Write, now: i64) -> Result<()> {
        let mut g = self.lock();
        namespace(&g.conn, account, ns)?;
        put_entry(&g.conn, ns, w)?;
        maybe_purge(&mut g, now)
    }

    /// Deleting a missing key succeeds, as on Cloudflare.
    pub fn delete(&self, account: &str, ns: &str, key: &str) -> Result<()> {
        let g = self.lock();
        namespace(&g.conn, account, ns)?;
        g.conn.execute(
            "DELETE FROM kv WHERE ns = ?1 AND key = ?2",
            params![ns, key.as_bytes()],
        )?;
        Ok(())
    }

    /// Writes all pairs in one transaction.
    pub fn bulk_put(&self, account: &str, ns: &str, writes: &[Write], now: i64) -> Result<()> {
        let mut g = self.lock();
        namespace(&g.conn, account, ns)?;
        let tx = g.conn.transaction()?;
        for w in writes {
            put_entry(&tx, ns, w)?;
        }
        tx.commit()?;
        maybe_purge(&mut g, now)
    }

    /// Deletes all keys in one transaction.
    pub fn bulk_delete(&self, account: &str, ns: &str, keys: &[String]) -> Result<()> {
        let mut g = self.lock();
        namespace(&g.conn, account, ns)?;
        let tx = g.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached("DELETE FROM kv WHERE ns = ?1 AND key = ?2")?;
            for k in keys {
                stmt.execute(params![ns, k.as_bytes()])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The live entries of `keys`, in order, None where missing.
    pub fn bulk_get(
        &self,
        account: &str,
        ns: &str,
        keys: &[String],
        now: i64,
    ) -> Result<Vec<Option<Entry>>> {
        let g = self.lock();
        namespace(&g.conn, account, ns)?;
        keys.iter()
            .map(|k| get_entry(&g.conn, ns, k, now))
            .collect()
    }
}

fn namespace(conn: &Connection, account: &str, id: &str) -> Result<NamespaceRow> {
    conn.prepare_cached("SELECT id, title FROM namespaces WHERE id = ?1 AND account = ?2")?
        .query_row([id, account], |r| {
            Ok(NamespaceRow {
                id: r.get(0)?,
                title: r.get(1)?,
            })
        })
        .optional()?
        .ok_or(StoreError::NamespaceNotFound)
}

fn title_taken(
    conn: &Connection,
    account: &str,
    title: &str,
    except: Option<&str>,
) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM namespaces WHERE account = ?1 AND title = ?2 AND id != ?3",
            params![account, title, except.unwrap_or("")],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

fn get_entry(conn: &Connection, ns: &str, key: &str, now: i64) -> Result<Option<Entry>> {
    let entry = conn
        .prepare_cached("SELECT value, metadata, expiration FROM kv WHERE ns = ?1 AND key = ?2")?
        .query_row(params![ns, key.as_bytes()], |r| {
            Ok(Entry {
                value: r.get(0)?,
                metadata: r.get(1)?,
                expiration: r.get(2)?,
            })
        })
        .optional()?;
    match entry {
        Some(e) if e.expiration.is_some_and(|x| x <= now) => {
            conn.execute(
                "DELETE FROM kv WHERE ns = ?1 AND key = ?2 AND expiration <= ?3",
                params![ns, key.as_bytes(), now],
            )?;
            Ok(None)
        }
        e => Ok(e),
    }
}

fn put_entry(conn: &Connection, ns: &str, w: &Write) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO kv (ns, key, value, metadata, expiration) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value,
             metadata = excluded.metadata, expiration = excluded.expiration",
    )?
    .execute(params![
        ns,
        w.key.as_bytes(),
        w.value,
        w.metadata,
        w.expiration
    ])?;
    Ok(())
}

fn maybe_purge(g: &mut Inner, now: i64) -> Result<()> {
    if now - g.last_purge >= PURGE_INTERVAL_SECS {
        g.conn.execute(
            "DELETE FROM kv WHERE expiration IS NOT NULL AND expiration <= ?1",
            [now],
        )?;
        g.last_purge = now;
    }
    Ok(())
}
