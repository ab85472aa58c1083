//! The local attribute store. KV has no mtime, mode or owner; kvfs keeps them per
//! key in SQLite in the cache dir, next to a digest of the value they belong to. While the
//! value's digest matches, the stored mtime is reported; a value changed elsewhere gets the
//! time kvfs first saw it. So a second `rsync -a` in either direction finds nothing to do.

use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::warn;

/// What is known of one key's file attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Digest and size of the value these attributes belong to; `UNKNOWN` until the value is
    /// first seen (attributes set on a key whose value was never read).
    pub digest: u64,
    pub size: u64,
    pub mtime: SystemTime,
    /// Last status change: content, mode, owner or times.
    pub ctime: SystemTime,
    /// Set only by utimens (reads do not update it); None reads as the mtime.
    pub atime: Option<SystemTime>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Size of an entry whose value has not been seen yet.
const UNKNOWN: u64 = u64::MAX;

/// Attributes set by chmod, chown, utimens or a write, to keep for a key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }

    /// Lays `newer` over these: what it sets wins.
    pub fn merge(&mut self, newer: &Changes) {
        self.mode = newer.mode.or(self.mode);
        self.uid = newer.uid.or(self.uid);
        self.gid = newer.gid.or(self.gid);
        self.atime = newer.atime.or(self.atime);
        self.mtime = newer.mtime.or(self.mtime);
    }
}

impl Entry {
    /// A new entry for a value, with times `now` and nothing set.
    fn new(digest: u64, size: u64, now: SystemTime) -> Entry {
        Entry {
            digest,
            size,
            mtime: now,
            ctime: now,
            atime: None,
            mode: None,
            uid: None,
            gid: None,
        }
    }

    fn apply(&mut self, c: &Changes) {
        self.mode = c.mode.or(self.mode);
        self.uid = c.uid.or(self.uid);
        self.gid = c.gid.or(self.gid);
        self.atime = c.atime.or(self.atime);
        self.mtime = c.mtime.unwrap_or(self.mtime);
    }
}

/// An entry as the store keeps it in memory: times in nanoseconds, no `Option`s (one is kept
/// per key seen in a run, so a walk of a million keys holds a million of them).
#[derive(Debug, Clone, Copy)]
struct Compact {
    digest: u64,
    size: u64,
    mtime: i64,
    ctime: i64,
    /// `NONE_TIME`: none.
    atime: i64,
    /// `NONE_ID`: none (not a mode, and no uid or gid chown can set).
    mode: u32,
    uid: u32,
    gid: u32,
}

const NONE_TIME: i64 = i64::MIN;
const NONE_ID: u32 = u32::MAX;

impl From<&Entry> for Compact {
    fn from(e: &Entry) -> Compact {
        Compact {
            digest: e.digest,
            size: e.size,
            mtime: to_nanos(e.mtime),
            ctime: to_nanos(e.ctime),
            atime: e.atime.map_or(NONE_TIME, to_nanos),
            mode: e.mode.unwrap_or(NONE_ID),
            uid: e.uid.unwrap_or(NONE_ID),
            gid: e.gid.unwrap_or(NONE_ID),
        }
    }
}

impl From<Compact> for Entry {
    fn from(c: Compact) -> Entry {
        let id = |v: u32| (v != NONE_ID).then_some(v);
        Entry {
            digest: c.digest,
            size: c.size,
            mtime: from_nanos(c.mtime),
            ctime: from_nanos(c.ctime),
            atime: (c.atime != NONE_TIME).then(|| from_nanos(c.atime)),
            mode: id(c.mode),
            uid: id(c.uid),
            gid: id(c.gid),
        }
    }
}

/// The in-run entries. Most keys of a walk have nothing set and were first seen now (ctime =
/// mtime): those keep only digest, size and mtime, half of a full entry.
#[derive(Default)]
struct Seen {
    plain: HashMap<u64, (u64, u64, i64)>,
    full: HashMap<u64, Compact>,
}

impl Seen {
    fn get(&self, id: u64) -> Option<Compact> {
        if let Some(&(digest, size, mtime)) = self.plain.get(&id) {
            return Some(Compact {
                digest,
                size,
                mtime,
                ctime: mtime,
                atime: NONE_TIME,
                mode: NONE_ID,
                uid: NONE_ID,
                gid: NONE_ID,
            });
        }
        self.full.get(&id).copied()
    }

    fn insert(&mut self, id: u64, e: &Entry) {
        let c = Compact::from(e);
        let plain = c.ctime == c.mtime
            && c.atime == NONE_TIME
            && (c.mode, c.uid, c.gid) == (NONE_ID, NONE_ID, NONE_ID);
        if plain {
            self.full.remove(&id);
            self.plain.insert(id, (c.digest, c.size, c.mtime));
        } else {
            self.plain.remove(&id);
            self.full.insert(id, c);
        }
    }

    fn remove(&mut self, id: u64) -> Option<Compact> {
        let found = self.get(id);
        self.plain.remove(&id);
        self.full.remove(&id);
        found
    }

    fn len(&self) -> usize {
        self.plain.len() + self.full.len()
    }
}

pub struct AttrStore {
    /// Taken before `seen` when both are needed.
    conn: Mutex<Connection>,
    /// Entries of values seen in this run, by a keyed hash of (namespace, key): the database
    /// remembers them across runs. The hash's keys are random per run, so names cannot be
    /// made to collide, and by chance two of a million keys share one with odds of ~1e-8.
    seen: Mutex<Seen>,
    hasher: RandomState,
}

/// FNV-1a, 64 bits: compares a key's value with its own earlier value, and names cache
/// dirs; not a defence against collisions made on purpose.
pub fn digest(bytes: &[u8]) -> u64 {
    digest_extend(DIGEST_START, bytes)
}

/// The digest of nothing; [`digest_extend`] continues a digest with more bytes, so a file
/// written front to back is digested as it is written.
pub const DIGEST_START: u64 = 0xcbf2_9ce4_8422_2325;

pub fn digest_extend(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

fn to_nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

fn from_nanos(n: i64) -> SystemTime {
    if n >= 0 {
        UNIX_EPOCH + Duration::from_nanos(n as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(n.unsigned_abs())
    }
}

impl AttrStore {
    pub fn open(path: &Path) -> rusqlite::Result<AttrStore> {
        let conn = Connection::open(path)?;
        // EXCLUSIVE, as the journal: the cache dir has one mount at a time.
        conn.execute_batch(
            "PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS attrs (
                ns TEXT NOT NULL, key TEXT NOT NULL, digest INTEGER NOT NULL, size INTEGER NOT NULL,
                mtime INTEGER NOT NULL, mode INTEGER, uid INTEGER, gid INTEGER,
                PRIMARY KEY (ns, key));",
        )?;
        // Columns added after the first release: a cache dir of an older version gains them.
        for column in ["ctime INTEGER", "atime INTEGER"] {
            match conn.execute(&format!("ALTER TABLE attrs ADD COLUMN {column}"), []) {
                Ok(_) => {}
                Err(e) if e.to_string().contains("duplicate column") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(AttrStore {
            conn: Mutex::new(conn),
            seen: Mutex::default(),
            hasher: RandomState::new(),
        })
    }

    fn id(&self, ns: &str, key: &str) -> u64 {
        self.hasher.hash_one((ns, key))
    }

    /// The attributes of the value `bytes` of a key. `changed` says this mount just wrote it
    /// (so its mtime is now); otherwise a value matching the stored digest keeps its mtime.
    pub fn observe(&self, ns: &str, key: &str, bytes: &[u8], changed: bool) -> Entry {
        let value = (digest(bytes), bytes.len() as u64);
        self.observe_digest(ns, key, value, changed, &Changes::default())
    }

    /// [`observe`](Self::observe) of the values a bulk get brought, in one transaction: a
    /// walk's first sight of a hundred keys costs one commit, not a hundred.
    pub fn observe_all<'a>(&self, ns: &str, values: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
        let conn = self.conn.lock().unwrap();
        let tx = conn.unchecked_transaction();
        for (key, bytes) in values {
            let value = (digest(bytes), bytes.len() as u64);
            self.observe_in(&conn, ns, key, value, false, &Changes::default());
        }
        if let Err(e) = tx.and_then(|tx| tx.commit()) {
            warn!("attribute store: {e}");
        }
    }

    /// [`observe`](Self::observe) of a value known by its (digest, size), with attributes
    /// `given` to the file that wrote it (create mode, owner, fchmod, futimens): one write.
    pub fn observe_digest(
        &self,
        ns: &str,
        key: &str,
        value: (u64, u64),
        changed: bool,
        given: &Changes,
    ) -> Entry {
        let conn = self.conn.lock().unwrap();
        self.observe_in(&conn, ns, key, value, changed, given)
    }

    fn observe_in(
        &self,
        conn: &Connection,
        ns: &str,
        key: &str,
        (digest, size): (u64, u64),
        changed: bool,
        given: &Changes,
    ) -> Entry {
        let id = self.id(ns, key);
        let known = self.known(conn, id, ns, key);
        let now = SystemTime::now();
        let mut entry = match known {
            Some(e) if !changed && e.digest == digest && e.size == size && given.is_empty() => {
                self.seen.lock().unwrap().insert(id, &e);
                return e;
            }
            // Set before the value was first seen: the attributes are this value's.
            Some(e) if !changed && e.size == UNKNOWN => Entry { digest, size, ..e },
            // Mode and owner are the user's choice and survive a new value; the times do not.
            Some(e) => Entry {
                digest,
                size,
                mtime: now,
                ctime: now,
                ..e
            },
            None => Entry::new(digest, size, now),
        };
        entry.apply(given);
        self.keep(conn, id, ns, key, entry)
    }

    /// The attributes of the value last observed for this key in this run.
    pub fn current(&self, ns: &str, key: &str) -> Option<Entry> {
        let id = self.id(ns, key);
        self.seen.lock().unwrap().get(id).map(Entry::from)
    }

    /// Entries held in memory (for `kvfs status` and tests).
    pub fn seen_count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// chmod / chown / utimens / a recorded write: keeps `changes` for the key, with a new
    /// ctime. A key whose value was never seen gets an entry that its value adopts when seen.
    pub fn set(&self, ns: &str, key: &str, changes: &Changes) -> Entry {
        let conn = self.conn.lock().unwrap();
        let id = self.id(ns, key);
        let now = SystemTime::now();
        let known = self.known(&conn, id, ns, key);
        let mut e = known.unwrap_or(Entry::new(0, UNKNOWN, now));
        e.apply(changes);
        e.ctime = now;
        self.keep(&conn, id, ns, key, e)
    }

    pub fn rename(&self, ns: &str, src: &str, dst: &str) {
        let conn = self.conn.lock().unwrap();
        let from = self.id(ns, src);
        let seen = self.seen.lock().unwrap().remove(from);
        let entry = seen.map(Entry::from).or_else(|| Self::load(&conn, ns, src));
        Self::delete(&conn, ns, src);
        if let Some(e) = entry {
            self.keep(&conn, self.id(ns, dst), ns, dst, e);
        }
    }

    pub fn remove(&self, ns: &str, key: &str) {
        let conn = self.conn.lock().unwrap();
        self.seen.lock().unwrap().remove(self.id(ns, key));
        Self::delete(&conn, ns, key);
    }

    fn delete(conn: &Connection, ns: &str, key: &str) {
        if let Err(e) = conn
            .prepare_cached("DELETE FROM attrs WHERE ns = ?1 AND key = ?2")
            .and_then(|mut st| st.execute(params![ns, key]))
        {
            warn!("attribute store: {e}");
        }
    }

    /// Stores an entry and remembers it for this run.
    fn keep(&self, conn: &Connection, id: u64, ns: &str, key: &str, e: Entry) -> Entry {
        Self::store(conn, ns, key, &e);
        self.seen.lock().unwrap().insert(id, &e);
        e
    }

    /// The entry of a key: seen in this run, else from the database.
    fn known(&self, conn: &Connection, id: u64, ns: &str, key: &str) -> Option<Entry> {
        let seen = self.seen.lock().unwrap().get(id);
        seen.map(Entry::from).or_else(|| Self::load(conn, ns, key))
    }

    fn load(conn: &Connection, ns: &str, key: &str) -> Option<Entry> {
        conn.prepare_cached(
            "SELECT digest, size, mtime, mode, uid, gid, ctime, atime FROM attrs
             WHERE ns = ?1 AND key = ?2",
        )
        .and_then(|mut st| {
            st.query_row(params![ns, key], |r| {
                let mtime = from_nanos(r.get(2)?);
                Ok(Entry {
                    digest: r.get::<_, i64>(0)? as u64,
                    size: r.get::<_, i64>(1)? as u64,
                    mtime,
                    mode: r.get(3)?,
                    uid: r.get(4)?,
                    gid: r.get(5)?,
                    ctime: r.get::<_, Option<i64>>(6)?.map_or(mtime, from_nanos),
                    atime: r.get::<_, Option<i64>>(7)?.map(from_nanos),
                })
            })
            .optional()
        })
        .unwrap_or_else(|e| {
            warn!("attribute store: {e}");
            None
        })
    }

    fn store(conn: &Connection, ns: &str, key: &str, e: &Entry) {
        let r = conn.prepare_cached("INSERT OR REPLACE INTO attrs (ns, key, digest, size, mtime, mode, uid, gid, ctime, atime)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)").and_then(|mut st| st.execute(params![
                ns,
                key,
                e.digest as i64,
                e.size as i64,
                to_nanos(e.mtime),
                e.mode,
                e.uid,
                e.gid,
                to_nanos(e.ctime),
                e.atime.map(to_nanos)
            ]));
        if let Err(e) = r {
            warn!("attribute store: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_in_memory_come_back_as_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = AttrStore::open(&dir.path().join("attrs.sqlite3")).unwrap();
        // First seen: a plain entry (nothing set, ctime = mtime).
        let plain = store.observe("n", "p", b"v", false);
        assert_eq!(store.current("n", "p"), Some(plain.clone()));
        // Anything set makes it a full one; a time before the epoch survives too.
        let before_epoch = UNIX_EPOCH - Duration::from_secs(86_400);
        let full = store.set(
            "n",
            "p",
            &Changes {
                mode: Some(0o600),
                uid: Some(1000),
                atime: Some(before_epoch),
                ..Changes::default()
            },
        );
        assert_eq!(store.current("n", "p"), Some(full.clone()));
        assert_eq!(full.atime, Some(before_epoch));
        assert_eq!((full.digest, full.mtime), (plain.digest, plain.mtime));
        assert_eq!(store.seen_count(), 1);
        store.remove("n", "p");
        assert_eq!((store.current("n", "p"), store.seen_count()), (None, 0));
    }

    #[test]
    fn mtime_follows_the_value_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attrs.sqlite3");
        let store = AttrStore::open(&path).unwrap();
        let first = store.observe("n", "k", b"v1", false);
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        store.set(
            "n",
            "k",
            &Changes {
                mode: Some(0o600),
                mtime: Some(t),
                ..Changes::default()
            },
        );
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
        // Set on a key whose value was never seen: the value adopts them when it is seen.
        let t2 = UNIX_EPOCH + Duration::from_secs(2_000_000);
        store.set(
            "n",
            "fresh",
            &Changes {
                mode: Some(0o640),
                mtime: Some(t2),
                ..Changes::default()
            },
        );
        let seen = store.observe("n", "fresh", b"abc", false);
        assert_eq!((seen.mtime, seen.mode, seen.size), (t2, Some(0o640), 3));
        assert_eq!(store.observe("n", "fresh", b"abc", false).mtime, t2);
        store.rename("n", "k", "k2");
        assert!(store.current("n", "k").is_none());
        assert_eq!(store.current("n", "k2").unwrap().digest, digest(b"v2"));
    }
}
