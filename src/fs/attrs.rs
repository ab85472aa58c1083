//! The local attribute store. KV has no mtime, mode or owner; kvfs keeps them per
//! key in SQLite in the cache dir, next to a digest of the value they belong to. While the
//! value's digest matches, the stored mtime is reported; a value changed elsewhere gets the
//! time kvfs first saw it. So a second `rsync -a` in either direction finds nothing to do.
//!
//! Values are digested with XXH3-64 ([`value_digest`], [`ValueHasher`]). Rows written before
//! it carry an FNV-1a digest (their `digest_kind` is NULL): a value seen against such a row is
//! compared by its FNV-1a digest, computed once, and the row is rewritten with its XXH3 digest,
//! so the upgrade changes no mtime. FNV-1a ([`digest`]) still names things (inode numbers,
//! cache dirs), which must not change either.

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::io;
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
    /// What made `digest`.
    pub digest_kind: DigestKind,
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

/// The function that made an entry's digest, stored per row (`digest_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DigestKind {
    /// XXH3-64, [`value_digest`]: every row written since it replaced FNV-1a (kind 1).
    #[default]
    Xxh3,
    /// FNV-1a, [`digest`]: a row written before (kind NULL). Rewritten when its value is seen.
    Fnv,
}

impl DigestKind {
    fn to_sql(self) -> Option<i64> {
        match self {
            DigestKind::Xxh3 => Some(1),
            DigestKind::Fnv => None,
        }
    }

    fn from_sql(kind: Option<i64>) -> DigestKind {
        match kind {
            Some(1) => DigestKind::Xxh3,
            _ => DigestKind::Fnv,
        }
    }
}

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
            digest_kind: DigestKind::Xxh3,
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
    /// An FNV-1a digest (`DigestKind::Fnv`); in the struct's padding.
    fnv: bool,
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

// The digest kind fits in the padding: a full entry stays 56 bytes (docs/PERFORMANCE.md).
const _: () = assert!(std::mem::size_of::<Compact>() == 56);

const NONE_TIME: i64 = i64::MIN;
const NONE_ID: u32 = u32::MAX;

impl From<&Entry> for Compact {
    fn from(e: &Entry) -> Compact {
        Compact {
            digest: e.digest,
            fnv: e.digest_kind == DigestKind::Fnv,
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
            digest_kind: match c.fnv {
                true => DigestKind::Fnv,
                false => DigestKind::Xxh3,
            },
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
/// mtime): those keep only digest (XXH3), size and mtime, half of a full entry.
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
                fnv: false,
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
        let plain = !c.fnv
            && c.ctime == c.mtime
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

/// FNV-1a, 64 bits: names inodes and cache dirs, so it must never change; not a value digest
/// (that is [`value_digest`]) except to compare with rows written before XXH3.
pub fn digest(bytes: &[u8]) -> u64 {
    digest_extend(DIGEST_START, bytes)
}

/// The FNV-1a digest of nothing; [`digest_extend`] continues one with more bytes.
pub const DIGEST_START: u64 = 0xcbf2_9ce4_8422_2325;

pub fn digest_extend(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The digest of a value that the attribute store keeps: XXH3-64 (seed 0), a specified
/// algorithm whose output is fixed across versions (it is stored), at memory speed. It tells
/// a key's value from its own earlier value; not a defence against collisions made on purpose.
pub fn value_digest(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// [`value_digest`] of bytes that come in pieces (a body as it arrives, a file written front
/// to back), and how many came: any split gives the digest of the whole. About 400 bytes: box
/// it where one is kept per open file.
#[derive(Clone, Default)]
pub struct ValueHasher {
    state: xxhash_rust::xxh3::Xxh3Default,
    len: u64,
}

impl ValueHasher {
    /// A hasher that has digested `bytes`, to go on with more.
    pub fn of(bytes: &[u8]) -> ValueHasher {
        let mut h = ValueHasher::default();
        h.update(bytes);
        h
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.state.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes digested so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// (digest, size) of what was digested, as [`AttrStore::observe_digest`] takes it.
    pub fn finish(&self) -> (u64, u64) {
        (self.state.digest(), self.len)
    }
}

impl fmt::Debug for ValueHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValueHasher")
            .field("len", &self.len)
            .finish()
    }
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
        for column in ["ctime INTEGER", "atime INTEGER", "digest_kind INTEGER"] {
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
        let value = (value_digest(bytes), bytes.len() as u64);
        let conn = self.conn.lock().unwrap();
        let fnv = || Ok(digest(bytes));
        self.observe_in(&conn, ns, key, value, fnv, changed, &Changes::default())
    }

    /// [`observe`](Self::observe) of the values a bulk get brought, in one transaction: a
    /// walk's first sight of a hundred keys costs one commit, not a hundred.
    pub fn observe_all<'a>(&self, ns: &str, values: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
        let conn = self.conn.lock().unwrap();
        let tx = conn.unchecked_transaction();
        for (key, bytes) in values {
            let value = (value_digest(bytes), bytes.len() as u64);
            let fnv = || Ok(digest(bytes));
            self.observe_in(&conn, ns, key, value, fnv, false, &Changes::default());
        }
        if let Err(e) = tx.and_then(|tx| tx.commit()) {
            warn!("attribute store: {e}");
        }
    }

    /// [`observe`](Self::observe) of a value known by its (digest, size) ([`ValueHasher`]);
    /// `content` reads it, only to compare it with a row of an older version.
    pub fn observe_digest(
        &self,
        ns: &str,
        key: &str,
        value: (u64, u64),
        content: impl FnOnce() -> io::Result<Bytes>,
    ) -> Entry {
        let conn = self.conn.lock().unwrap();
        let fnv = || content().map(|b| digest(&b));
        self.observe_in(&conn, ns, key, value, fnv, false, &Changes::default())
    }

    /// A value (digest, size) this mount just wrote, with attributes `given` to the file that
    /// wrote it (create mode, owner, fchmod, futimens): a new mtime, in one write.
    pub fn observe_written(
        &self,
        ns: &str,
        key: &str,
        value: (u64, u64),
        given: &Changes,
    ) -> Entry {
        let conn = self.conn.lock().unwrap();
        let unread = || Err(io::Error::other("a changed value is never compared"));
        self.observe_in(&conn, ns, key, value, unread, true, given)
    }

    /// `fnv` gives the value's FNV-1a digest, asked for only against a row that holds one.
    #[allow(clippy::too_many_arguments)]
    fn observe_in(
        &self,
        conn: &Connection,
        ns: &str,
        key: &str,
        (digest, size): (u64, u64),
        fnv: impl FnOnce() -> io::Result<u64>,
        changed: bool,
        given: &Changes,
    ) -> Entry {
        let id = self.id(ns, key);
        let known = self.known(conn, id, ns, key);
        let now = SystemTime::now();
        let same = !changed
            && given.is_empty()
            && known.as_ref().is_some_and(|e| {
                e.size == size
                    && match e.digest_kind {
                        DigestKind::Xxh3 => e.digest == digest,
                        DigestKind::Fnv => fnv().map_or_else(
                            |err| {
                                warn!("attribute store: reading {key} to compare: {err}");
                                false
                            },
                            |old| old == e.digest,
                        ),
                    }
            });
        let mut entry = match known {
            Some(e) if same && e.digest_kind == DigestKind::Xxh3 => {
                self.seen.lock().unwrap().insert(id, &e);
                return e;
            }
            // The same value under an FNV-1a digest: the row takes its XXH3 digest.
            Some(e) if same => Entry {
                digest,
                digest_kind: DigestKind::Xxh3,
                ..e
            },
            // Set before the value was first seen: the attributes are this value's.
            Some(e) if !changed && e.size == UNKNOWN => Entry {
                digest,
                digest_kind: DigestKind::Xxh3,
                size,
                ..e
            },
            // Mode and owner are the user's choice and survive a new value; the times do not.
            Some(e) => Entry {
                digest,
                digest_kind: DigestKind::Xxh3,
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
            "SELECT digest, size, mtime, mode, uid, gid, ctime, atime, digest_kind FROM attrs
             WHERE ns = ?1 AND key = ?2",
        )
        .and_then(|mut st| {
            st.query_row(params![ns, key], |r| {
                let mtime = from_nanos(r.get(2)?);
                Ok(Entry {
                    digest: r.get::<_, i64>(0)? as u64,
                    digest_kind: DigestKind::from_sql(r.get(8)?),
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
        let r = conn.prepare_cached("INSERT OR REPLACE INTO attrs (ns, key, digest, size, mtime, mode, uid, gid, ctime, atime, digest_kind)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)").and_then(|mut st| st.execute(params![
                ns,
                key,
                e.digest as i64,
                e.size as i64,
                to_nanos(e.mtime),
                e.mode,
                e.uid,
                e.gid,
                to_nanos(e.ctime),
                e.atime.map(to_nanos),
                e.digest_kind.to_sql()
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
        assert_eq!(
            store.current("n", "k2").unwrap().digest,
            value_digest(b"v2")
        );
    }

    #[test]
    fn the_value_digest_is_xxh3_whatever_the_pieces() {
        // Stored on disk: pinned to the specified algorithm (XXH3-64, seed 0).
        assert_eq!(value_digest(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(ValueHasher::default().finish(), (value_digest(b""), 0));
        // Lengths across XXH3's internal sizes (16, 128, 240 bytes, 64-byte stripes, 1 KiB
        // blocks, its 256-byte buffer), split at every kind of boundary.
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for len in [
            0, 1, 15, 16, 17, 128, 129, 240, 241, 255, 256, 257, 1024, 1025, 4099, 300_000,
        ] {
            let whole = &data[..len];
            let expected = (value_digest(whole), len as u64);
            for max_piece in [1, 3, 64, 255, 256, 1000, 70_000] {
                let mut h = ValueHasher::default();
                let mut at = 0;
                while at < len {
                    let n = (1 + next(max_piece)).min(len - at);
                    h.update(&whole[at..at + n]);
                    h.update(&[]);
                    at += n;
                }
                assert_eq!(h.finish(), expected, "len {len}, pieces up to {max_piece}");
            }
            let (front, back) = whole.split_at(len / 3);
            let mut h = ValueHasher::of(front);
            h.update(back);
            assert_eq!(h.finish(), expected);
            assert_eq!(h.len(), len as u64);
        }
        assert_ne!(value_digest(b"v1"), value_digest(b"v2"));
    }

    #[test]
    fn names_keep_their_fnv_digest() {
        // Inode numbers and cache-dir names come from it: it must never change.
        assert_eq!(digest(b""), DIGEST_START);
        assert_eq!(digest(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(digest_extend(digest(b"fo"), b"obar"), digest(b"foobar"));
    }

    /// A cache dir as kvfs left it before XXH3: FNV-1a digests, no `digest_kind` column.
    fn old_store(path: &Path, rows: &[(&str, &[u8], i64, Option<u32>)]) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(
            "CREATE TABLE attrs (
                ns TEXT NOT NULL, key TEXT NOT NULL, digest INTEGER NOT NULL, size INTEGER NOT NULL,
                mtime INTEGER NOT NULL, mode INTEGER, uid INTEGER, gid INTEGER,
                PRIMARY KEY (ns, key));
             ALTER TABLE attrs ADD COLUMN ctime INTEGER;
             ALTER TABLE attrs ADD COLUMN atime INTEGER;",
        )
        .unwrap();
        for (key, value, mtime, mode) in rows {
            conn.execute(
                "INSERT INTO attrs (ns, key, digest, size, mtime, mode, ctime)
                 VALUES ('n', ?1, ?2, ?3, ?4, ?5, ?4)",
                params![key, digest(value) as i64, value.len() as i64, mtime, mode],
            )
            .unwrap();
        }
    }

    /// (digest, digest_kind, mtime) of a row as stored (through the store's own connection:
    /// it holds the database in exclusive mode).
    fn row(store: &AttrStore, key: &str) -> (u64, Option<i64>, i64) {
        let conn = store.conn.lock().unwrap();
        conn.query_row(
            "SELECT digest, digest_kind, mtime FROM attrs WHERE ns = 'n' AND key = ?1",
            [key],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    }

    #[test]
    fn rows_of_the_fnv_digest_keep_their_mtimes_and_take_the_new_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attrs.sqlite3");
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let t = |s: i64| s * 1_000_000_000;
        old_store(
            &path,
            &[
                ("one", b"v1", t(1_000), Some(0o600)),
                ("bulk-a", b"a", t(2_000), None),
                ("bulk-b", b"b", t(3_000), None),
                ("streamed", &big, t(4_000), None),
                ("changed", b"old", t(5_000), Some(0o640)),
                ("grown", b"abc", t(6_000), None),
                ("chmod", b"c", t(7_000), None),
            ],
        );
        let nanos = |e: &Entry| to_nanos(e.mtime);
        let store = AttrStore::open(&path).unwrap();
        // The same values, through each way a value is observed: every mtime stays.
        let one = store.observe("n", "one", b"v1", false);
        assert_eq!((nanos(&one), one.mode), (t(1_000), Some(0o600)));
        assert_eq!(
            (one.digest, one.digest_kind),
            (value_digest(b"v1"), DigestKind::Xxh3)
        );
        store.observe_all("n", [("bulk-a", &b"a"[..]), ("bulk-b", &b"b"[..])]);
        assert_eq!(nanos(&store.current("n", "bulk-a").unwrap()), t(2_000));
        assert_eq!(nanos(&store.current("n", "bulk-b").unwrap()), t(3_000));
        let mut reads = 0;
        let streamed =
            store.observe_digest("n", "streamed", ValueHasher::of(&big).finish(), || {
                reads += 1;
                Ok(Bytes::from(big.clone()))
            });
        assert_eq!((nanos(&streamed), reads), (t(4_000), 1));
        // A value that changed (in content or size) gets a new mtime; its mode stays.
        let changed = store.observe("n", "changed", b"new", false);
        assert!(nanos(&changed) > t(5_000));
        assert_eq!(changed.mode, Some(0o640));
        let grown = store.observe_digest("n", "grown", (value_digest(b"abcd"), 4), || {
            panic!("a size that differs needs no read")
        });
        assert!(nanos(&grown) > t(6_000));
        // Attributes set before the value is seen keep the old digest, and compare by it later.
        store.set(
            "n",
            "chmod",
            &Changes {
                mode: Some(0o700),
                ..Changes::default()
            },
        );
        assert_eq!(row(&store, "chmod"), (digest(b"c"), None, t(7_000)));
        let chmod = store.observe("n", "chmod", b"c", false);
        assert_eq!((nanos(&chmod), chmod.mode), (t(7_000), Some(0o700)));
        // Every row now holds the value's XXH3 digest, marked as such.
        for (key, value) in [
            ("one", &b"v1"[..]),
            ("bulk-a", b"a"),
            ("streamed", &big),
            ("changed", b"new"),
            ("chmod", b"c"),
        ] {
            let (d, kind, _) = row(&store, key);
            assert_eq!((d, kind), (value_digest(value), Some(1)), "{key}");
        }
        drop(store);
        // Next run: compared by XXH3 alone, the value is not read again.
        let store = AttrStore::open(&path).unwrap();
        let again = store.observe_digest("n", "streamed", ValueHasher::of(&big).finish(), || {
            panic!("a migrated row needs no read")
        });
        assert_eq!(nanos(&again), t(4_000));
        assert_eq!(nanos(&store.observe("n", "one", b"v1", false)), t(1_000));
    }
}
