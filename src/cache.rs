//! The byte-bounded value cache: small values in memory, large ones in files under the cache dir.
//!
//! Entries are `Arc`s, so a reader holding a value keeps it readable after eviction; a spilled
//! value's file is deleted when its last holder lets go.

use bytes::Bytes;
use lru::LruCache;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Values above this size live in a file instead of memory.
pub const SPILL_BYTES: usize = 1 << 20;

/// (namespace id, key)
pub type CacheKey = (String, String);

/// What an entry costs in memory besides its value's bytes and its key's: the `Value`, the
/// key's `String`s, the LRU's node and hash slot (about 250 bytes on x86-64). Charged against
/// the budget, so a million values of a dozen bytes do not hold twenty times `--cache-size`.
const ENTRY_BYTES: u64 = 256;

/// What `value` under `key` is charged against the budget.
fn charge(key: &CacheKey, value: &Value) -> u64 {
    value.len() + (key.0.len() + key.1.len()) as u64 + ENTRY_BYTES
}

/// A cached value: its bytes, expiration, and when it was fetched.
#[derive(Debug)]
pub struct Value {
    data: Data,
    pub expiration: Option<u64>,
    pub fetched: Instant,
}

#[derive(Debug)]
enum Data {
    Mem(Bytes),
    File { file: File, path: PathBuf, len: u64 },
}

impl Data {
    fn len(&self) -> u64 {
        match self {
            Data::Mem(b) => b.len() as u64,
            Data::File { len, .. } => *len,
        }
    }

    fn read_at(&self, offset: u64, size: usize) -> io::Result<Bytes> {
        let len = self.len();
        if offset >= len {
            return Ok(Bytes::new());
        }
        let n = size.min((len - offset) as usize);
        match self {
            Data::Mem(b) => Ok(b.slice(offset as usize..offset as usize + n)),
            Data::File { file, .. } => {
                let mut buf = vec![0; n];
                file.read_exact_at(&mut buf, offset)?;
                Ok(Bytes::from(buf))
            }
        }
    }
}

impl Drop for Data {
    fn drop(&mut self) {
        if let Data::File { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Value {
    /// A value that lives outside the cache (e.g. read from the journal's staged data).
    pub fn detached(bytes: Bytes) -> Value {
        Value {
            data: Data::Mem(bytes),
            expiration: None,
            fetched: Instant::now(),
        }
    }

    pub fn len(&self) -> u64 {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once the key's own expiration has passed: such a value is never served.
    pub fn is_expired(&self, now_secs: u64) -> bool {
        self.expiration.is_some_and(|e| e <= now_secs)
    }

    /// Up to `size` bytes from `offset`.
    pub fn read_at(&self, offset: u64, size: usize) -> io::Result<Bytes> {
        self.data.read_at(offset, size)
    }

    /// The whole value.
    pub fn bytes(&self) -> io::Result<Bytes> {
        self.read_at(0, self.len() as usize)
    }
}

/// A file in the cache dir being filled with a large value as it arrives; it enters the cache
/// with [`ValueCache::insert_spilled`], and is deleted if it never does.
#[derive(Debug)]
pub struct Spill(Data);

impl Spill {
    pub fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        if let Data::File { file, len, .. } = &mut self.0 {
            file.write_all(chunk)?;
            *len += chunk.len() as u64;
        }
        Ok(())
    }

    /// Appends the first `len` bytes of `src` (read from its current offset), copied by the
    /// kernel where it can.
    pub fn copy_from(&mut self, src: &File, len: u64) -> io::Result<()> {
        use std::io::Read;
        if let Data::File {
            file, len: have, ..
        } = &mut self.0
        {
            let copied = io::copy(&mut src.take(len), file)?;
            *have += copied;
            if copied < len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file is shorter than the value",
                ));
            }
        }
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// What was written so far, read back whole.
    pub fn bytes(&self) -> io::Result<Bytes> {
        self.0.read_at(0, self.len() as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters shown by `kvfs status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Charged against the budget: values, keys and each entry's own cost.
    pub bytes: u64,
    pub entries: u64,
}

pub struct ValueCache {
    inner: Mutex<Inner>,
    budget: u64,
    dir: PathBuf,
    next_file: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct Inner {
    lru: LruCache<CacheKey, Arc<Value>>,
    bytes: u64,
}

impl ValueCache {
    /// A cache of at most `budget` bytes; large values spill into `dir`, which is emptied first.
    pub fn new(budget: u64, dir: PathBuf) -> io::Result<Self> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(ValueCache {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            budget,
            dir,
            next_file: AtomicU64::new(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// Stores a value and returns it. Values larger than the whole budget are returned uncached.
    pub fn insert(
        &self,
        key: CacheKey,
        bytes: Bytes,
        expiration: Option<u64>,
    ) -> io::Result<Arc<Value>> {
        let data = if bytes.len() > SPILL_BYTES {
            let mut spill = self.spill()?;
            spill.write(&bytes)?;
            spill.0
        } else {
            Data::Mem(bytes)
        };
        Ok(self.adopt(key, data, expiration))
    }

    /// A new, empty file for a large value, to fill as it arrives.
    pub fn spill(&self) -> io::Result<Spill> {
        let id = self.next_file.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("v{id}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        Ok(Spill(Data::File { file, path, len: 0 }))
    }

    /// Stores a value written into a [`Spill`] and returns it, like [`insert`](Self::insert).
    pub fn insert_spilled(
        &self,
        key: CacheKey,
        spill: Spill,
        expiration: Option<u64>,
    ) -> Arc<Value> {
        self.adopt(key, spill.0, expiration)
    }

    fn adopt(&self, key: CacheKey, data: Data, expiration: Option<u64>) -> Arc<Value> {
        let value = Arc::new(Value {
            data,
            expiration,
            fetched: Instant::now(),
        });
        let size = charge(&key, &value);
        let mut inner = self.inner.lock().unwrap();
        if let Some(old) = inner.lru.pop(&key) {
            inner.bytes -= charge(&key, &old);
        }
        if size <= self.budget {
            inner.bytes += size;
            inner.lru.put(key, value.clone());
            while inner.bytes > self.budget {
                match inner.lru.pop_lru() {
                    Some((k, v)) => inner.bytes -= charge(&k, &v),
                    None => break,
                }
            }
        }
        value
    }

    /// A cached value that has not expired, counting a hit or a miss.
    pub fn get(&self, key: &CacheKey, now_secs: u64) -> Option<Arc<Value>> {
        let found = self.peek(key, now_secs);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Like `get`, without counting and without touching the LRU order.
    pub fn peek(&self, key: &CacheKey, now_secs: u64) -> Option<Arc<Value>> {
        let mut inner = self.inner.lock().unwrap();
        let v = inner.lru.peek(key)?.clone();
        if v.is_expired(now_secs) {
            inner.lru.pop(key);
            inner.bytes -= charge(key, &v);
            return None;
        }
        inner.lru.promote(key);
        Some(v)
    }

    pub fn remove(&self, key: &CacheKey) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(v) = inner.lru.pop(key) {
            inner.bytes -= charge(key, &v);
        }
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.inner.lock().unwrap();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: inner.bytes,
            entries: inner.lru.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> CacheKey {
        ("ns".into(), k.into())
    }

    #[test]
    fn evicts_by_bytes_and_spills_large_values() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ValueCache::new(3 << 20, dir.path().join("v")).unwrap();
        let big = Bytes::from(vec![7u8; (2 << 20) + 5]);
        let v = cache.insert(key("big"), big.clone(), None).unwrap();
        assert_eq!(v.read_at(5, 3).unwrap().as_ref(), &[7, 7, 7]);
        assert_eq!(std::fs::read_dir(dir.path().join("v")).unwrap().count(), 1);
        cache
            .insert(key("a"), Bytes::from(vec![1u8; 1 << 20]), None)
            .unwrap();
        cache
            .insert(key("b"), Bytes::from(vec![2u8; 1 << 20]), None)
            .unwrap();
        // "big" was least recently used and had to go; its file stays while `v` holds it.
        assert!(cache.get(&key("big"), 0).is_none());
        assert_eq!(v.bytes().unwrap(), big);
        drop(v);
        assert_eq!(std::fs::read_dir(dir.path().join("v")).unwrap().count(), 0);
        assert!(cache.stats().bytes <= 3 << 20);
    }

    #[test]
    fn expired_values_are_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ValueCache::new(1 << 20, dir.path().join("v")).unwrap();
        cache
            .insert(key("e"), Bytes::from_static(b"x"), Some(100))
            .unwrap();
        assert!(cache.get(&key("e"), 99).is_some());
        assert!(cache.get(&key("e"), 100).is_none());
        assert_eq!(cache.stats().entries, 0);
    }
}
