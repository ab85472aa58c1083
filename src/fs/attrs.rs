//! The local attribute store. KV has no mtime, mode or owner; kvfs keeps them per
//! key in SQLite in the cache dir, next to a digest of the value they belong to. While the
//! value's digest matches, the stored mtime is reported; a value changed elsewhere gets the
//! time kvfs first saw it. So a second `rsync -a` in either direction finds nothing to do.

use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::warn;

/// What is known of one key's file attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub digest: u64,
    pub size: u64,
    pub mtime: SystemTime,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

type Key = (String, String);

pub struct AttrStore {
    conn: Mutex<Connection>,
    /// Entries of values seen in this run; the database remembers them across runs.
    seen: Mutex<HashMap<Key, Entry>>,
}

/// FNV-1a, 64 bits: only compares a key's value with its own earlier value.
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn to_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn from_nanos(n: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n.max(0) as u64)
}

impl AttrStore {
    pub fn open(path: &Path) -> rusqlite::Result<AttrStore> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS attrs (
                ns TEXT NOT NULL, key TEXT NOT NULL, digest INTEGER NOT NULL, size INTEGER NOT NULL,
                mtime INTEGER NOT NULL, mode INTEGER, uid INTEGER, gid INTEGER,
                PRIMARY KEY (ns, key));",
        )?;
        Ok(AttrStore {
            conn: Mutex::new(conn),
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// The attributes of the value `bytes` of a key. `changed` says this mount just wrote it
    /// (so its mtime is now); otherwise a value matching the stored digest keeps its mtime.
    pub fn observe(&self, ns: &str, key: &str, bytes: &[u8], changed: bool) -> Entry {
        let digest = digest(bytes);
        let size = bytes.len() as u64;
        let k = (ns.to_string(), key.to_string());
        let known = self
            .seen
            .lock()
            .unwrap()
            .get(&k)
            .cloned()
            .or_else(|| self.load(&k));
        let entry = match known {
            Some(e) if !changed && e.digest == digest && e.size == size => {
                self.seen.lock().unwrap().insert(k, e.clone());
                return e;
            }
            // Mode and owner are the user's choice and survive a new value; the mtime does not.
            Some(e) => Entry {
                digest,
                size,
                mtime: SystemTime::now(),
                ..e
            },
            None => Entry {
                digest,
                size,
                mtime: SystemTime::now(),
                mode: None,
                uid: None,
                gid: None,
            },
        };
        self.store(&k, &entry);
        self.seen.lock().unwrap().insert(k, entry.clone());
        entry
    }

    /// The attributes of the value last observed for this key in this run.
    pub fn current(&self, ns: &str, key: &str) -> Option<Entry> {
        self.seen
            .lock()
            .unwrap()
            .get(&(ns.to_string(), key.to_string()))
            .cloned()
    }

    /// chmod / chown / utimes of a file whose value has been observed.
    pub fn set(
        &self,
        ns: &str,
        key: &str,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        mtime: Option<SystemTime>,
    ) {
        let k = (ns.to_string(), key.to_string());
        let updated = {
            let mut seen = self.seen.lock().unwrap();
            let Some(e) = seen.get_mut(&k) else { return };
            e.mode = mode.or(e.mode);
            e.uid = uid.or(e.uid);
            e.gid = gid.or(e.gid);
            e.mtime = mtime.unwrap_or(e.mtime);
            e.clone()
        };
        self.store(&k, &updated);
    }

    pub fn rename(&self, ns: &str, src: &str, dst: &str) {
        let from = (ns.to_string(), src.to_string());
        let entry = self
            .seen
            .lock()
            .unwrap()
            .remove(&from)
            .or_else(|| self.load(&from));
        self.remove(ns, src);
        if let Some(e) = entry {
            let to = (ns.to_string(), dst.to_string());
            self.store(&to, &e);
            self.seen.lock().unwrap().insert(to, e);
        }
    }

    pub fn remove(&self, ns: &str, key: &str) {
        self.seen
            .lock()
            .unwrap()
            .remove(&(ns.to_string(), key.to_string()));
        let conn = self.conn.lock().unwrap();
        if let Err(e) = conn.execute(
            "DELETE FROM attrs WHERE ns = ?1 AND key = ?2",
            params![ns, key],
        ) {
            warn!("attribute store: {e}");
        }
    }

    fn load(&self, (ns, key): &Key) -> Option<Entry> {
        let conn = self.conn.lock().unwrap();
        conn.query_row(
            "SELECT digest, size, mtime, mode, uid, gid FROM attrs WHERE ns = ?1 AND key = ?2",
            params![ns, key],
            |r| {
                Ok(Entry {
                    digest: r.get::<_, i64>(0)? as u64,
                    size: r.get::<_, i64>(1)? as u64,
                    mtime: from_nanos(r.get(2)?),
                    mode: r.get(3)?,
                    uid: r.get(4)?,
                    gid: r.get(5)?,
                })
            },
        )
        .optional()
        .unwrap_or_else(|e| {
            warn!("attribute store: {e}");
            None
        })
    }

    fn store(&self, (ns, key): &Key, e: &Entry) {
        let conn = self.conn.lock().unwrap();
        let r = conn.execute(
            "INSERT OR REPLACE INTO attrs (ns, key, digest, size, mtime, mode, uid, gid)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                ns,
                key,
                e.digest as i64,
                e.size as i64,
                to_nanos(e.mtime),
                e.mode,
                e.uid,
                e.gid
            ],
        );
        if let Err(e) = r {
            warn!("attribute store: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtime_follows_the_value_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attrs.sqlite3");
        let store = AttrStore::open(&path).unwrap();
        let first = store.observe("n", "k", b"v1", false);
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        store.set("n", "k", Some(0o600), None, None, Some(t));
        drop(store);
        let store = AttrStore::open(&path).unwrap();
        // Same value next run: the stored mtime and mode come back.
        let again = store.observe("n", "k", b"v1", false);
        assert_eq!((again.mtime, again.mode), (t, Some(0o600)));
        assert_eq!(again.digest, first.digest);
        // Changed elsewhere: a new mtime, the mode stays.
        let changed = store.observe("n", "k", b"v2", false);
        assert_ne!(changed.mtime, t);
        assert_eq!(changed.mode, Some(0o600));
        store.rename("n", "k", "k2");
        assert!(store.current("n", "k").is_none());
        assert_eq!(store.current("n", "k2").unwrap().digest, digest(b"v2"));
    }
}
