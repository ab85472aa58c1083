//! The filesystem core: namespaces as directories, keys as files. No fuser types here; the
//! adapter in `fuse.rs` turns these calls and results into kernel replies.
//!
//! State lives behind one `std::sync::Mutex` that is never held across an `.await`; network
//! work happens in async methods that lock, copy what they need, unlock, then call the API.

pub mod attrs;
pub mod error;
mod files;
pub mod names;
mod state;
mod upload;
pub mod xattr;

pub use error::{FsError, FsResult};
pub use state::{Attr, DirEntry, Kind};

use crate::api::limits::{self, now_secs, MAX_KEY_BYTES};
use crate::api::{KeyInfo, Namespace};
use crate::backend::{ErrorKind, Fetched, KeyLister, KvBackend, PutOptions};
use crate::cache::{CacheKey, Value, ValueCache};
use bytes::Bytes;
use names::{child_of, dir_prefix, join, representable, valid_segment};
use serde_json::Value as Json;
use state::{Loc, State};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;

use crate::writeback::journal::{Journal, Op};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, info};

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

/// Most keys asked for in one bulk get (the API's limit).
const LOOKAHEAD: usize = crate::api::limits::MAX_BULK_GET_KEYS;

/// Settings of a mount that the core needs.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Namespace id shown as the root, or None for the whole account.
    pub root_namespace: Option<String>,
    pub read_only: bool,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub metadata_ttl: Duration,
    pub expiration_ttl: Option<u64>,
    /// How long the uploader gathers changes before sending them.
    pub write_delay: Duration,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u32,
    pub dir_mode: u32,
}

/// What an open file handle refers to.
#[derive(Debug)]
pub struct Handle {
    ino: Ino,
    writable: bool,
    /// The value read at open, for read-only handles of files without staged changes.
    value: Option<Arc<Value>>,
    /// The staging file at open: still readable after an upload retires it.
    staged_file: Option<Arc<File>>,
}

impl Handle {
    fn writer(ino: Ino) -> Handle {
        Handle {
            ino,
            writable: true,
            value: None,
            staged_file: None,
        }
    }
}

/// The key's metadata and expiration, carried along when its value is rewritten.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyMeta {
    pub metadata: Option<Json>,
    pub expiration: Option<u64>,
}

impl From<&KeyInfo> for KeyMeta {
    fn from(k: &KeyInfo) -> Self {
        KeyMeta {
            metadata: k.metadata.clone(),
            expiration: k.expiration,
        }
    }
}

pub struct Fs {
    backend: Arc<dyn KvBackend>,
    cfg: FsConfig,
    cache: ValueCache,
    state: Mutex<State>,
    /// Serializes fetches of the same listing or value, so concurrent lookups share one request.
    flights: Flights,
    next_fh: AtomicU64,
    staging_dir: PathBuf,
    started: SystemTime,
    journal: Journal,
    attrs: attrs::AttrStore,
    /// Wakes the uploader when a change is recorded.
    wake: tokio::sync::Notify,
    last_change: Mutex<Instant>,
    /// When each key was last written, for KV's one-write-per-second-per-key limit.
    sent: Mutex<HashMap<CacheKey, Instant>>,
    /// One upload round at a time (the uploader, unmount and fsync may all ask).
    round_lock: tokio::sync::Mutex<()>,
}

impl Fs {
    pub fn new(backend: Arc<dyn KvBackend>, cfg: FsConfig) -> std::io::Result<Fs> {
        let staging_dir = cfg.cache_dir.join("staging");
        std::fs::create_dir_all(&staging_dir)?;
        let cache = ValueCache::new(cfg.cache_size, cfg.cache_dir.join("values"))?;
        let root = match &cfg.root_namespace {
            Some(ns) => Loc::Ns(ns.clone()),
            None => Loc::Root,
        };
        let journal =
            Journal::open(&cfg.cache_dir.join("journal.sqlite3")).map_err(std::io::Error::other)?;
        let attrs = attrs::AttrStore::open(&cfg.cache_dir.join("attrs.sqlite3"))
            .map_err(std::io::Error::other)?;
        let mut state = State::new(root);
        state.next_seq = journal.max_seq().map_err(std::io::Error::other)?;
        for row in journal.load().map_err(std::io::Error::other)? {
            state.set_pending(row);
        }
        // Staging files nobody needs any more (from a crash) go; journaled ones stay.
        for entry in std::fs::read_dir(&staging_dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !state.blob_in_journal(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        if !state.pending.is_empty() {
            info!(
                "journal holds {} changes from an earlier run",
                state.pending.len()
            );
        }
        Ok(Fs {
            backend,
            cache,
            state: Mutex::new(state),
            journal,
            attrs,
            wake: tokio::sync::Notify::new(),
            last_change: Mutex::new(Instant::now()),
            sent: Mutex::new(HashMap::new()),
            round_lock: tokio::sync::Mutex::new(()),
            flights: Flights::default(),
            next_fh: AtomicU64::new(1),
            staging_dir,
            started: SystemTime::now(),
            cfg,
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    pub fn backend(&self) -> &dyn KvBackend {
        &*self.backend
    }

    fn now_fresh(&self, at: Instant) -> bool {
        at.elapsed() < self.cfg.metadata_ttl
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn is_detached(&self, ino: Ino) -> bool {
        let st = self.state.lock().unwrap();
        st.node(ino).is_some_and(|n| n.detached)
    }

    fn loc(&self, ino: Ino) -> FsResult<Loc> {
        self.state.lock().unwrap().loc(ino).ok_or(FsError::NotFound)
    }

    // ---- attributes -------------------------------------------------------------------------

    fn dir_attr(&self, st: &State, ino: Ino) -> Attr {
        let node = st.node(ino);
        Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            mtime: node.and_then(|n| n.mtime).unwrap_or(self.started),
            perm: node.and_then(|n| n.mode).unwrap_or(self.cfg.dir_mode) as u16,
            uid: node.and_then(|n| n.uid).unwrap_or(self.cfg.uid),
            gid: node.and_then(|n| n.gid).unwrap_or(self.cfg.gid),
            nlink: 2,
            provisional: false,
        }
    }

    /// A file's attributes: from the attribute store when its value is known (so they last
    /// across mounts), else what was set on the inode in this run, else the defaults.
    fn file_attr(&self, st: &State, ino: Ino, size: u64) -> Attr {
        let node = st.node(ino);
        let detached = node.is_some_and(|n| n.detached);
        // A detached inode's last name may belong to another file now.
        let stored = match node.map(|n| &n.loc) {
            Some(Loc::Key { ns, path }) if !detached => self.attrs.current(ns, path),
            _ => None,
        };
        let s = stored.as_ref();
        Attr {
            ino,
            kind: Kind::File,
            size,
            mtime: s
                .map(|e| e.mtime)
                .or(node.and_then(|n| n.mtime))
                .or(node.map(|n| n.born))
                .unwrap_or(self.started),
            perm: s
                .and_then(|e| e.mode)
                .or(node.and_then(|n| n.mode))
                .unwrap_or(self.cfg.file_mode) as u16,
            uid: s
                .and_then(|e| e.uid)
                .or(node.and_then(|n| n.uid))
                .unwrap_or(self.cfg.uid),
            gid: s
                .and_then(|e| e.gid)
                .or(node.and_then(|n| n.gid))
                .unwrap_or(self.cfg.gid),
            nlink: if detached { 0 } else { 1 },
            provisional: false,
        }
    }

    pub async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        if let Some(attr) = self.detached_attr(ino) {
            return attr;
        }
        match self.loc(ino)? {
            Loc::Root | Loc::Ns(_) => Ok(self.dir_attr(&self.state.lock().unwrap(), ino)),
            Loc::Key { ns, path } => {
                let kind = self.state.lock().unwrap().node(ino).map(|n| n.kind);
                if kind == Some(Kind::Dir) {
                    return Ok(self.dir_attr(&self.state.lock().unwrap(), ino));
                }
                let size = self.file_size(&ns, &path).await?;
                Ok(self.file_attr(&self.state.lock().unwrap(), ino, size))
            }
        }
    }

    /// Attributes of an unlinked or replaced inode, from what its open handles hold; None for
    /// an inode that still has a name.
    fn detached_attr(&self, ino: Ino) -> Option<FsResult<Attr>> {
        let st = self.state.lock().unwrap();
        let node = st.node(ino)?;
        if !node.detached {
            return None;
        }
        if node.kind == Kind::Dir {
            let mut attr = self.dir_attr(&st, ino);
            attr.nlink = 0;
            return Some(Ok(attr));
        }
        let size = match st.staged.get(&ino) {
            Some(s) => Some(s.len),
            None => st.handles.values().filter(|h| h.ino == ino).find_map(|h| {
                h.value.as_ref().map(|v| v.len()).or_else(|| {
                    h.staged_file
                        .as_ref()
                        .and_then(|f| f.metadata().ok())
                        .map(|m| m.len())
                })
            }),
        };
        Some(
            size.map(|size| self.file_attr(&st, ino, size))
                .ok_or(FsError::NotFound),
        )
    }

    /// The kernel dropped `n` references to `ino`: an inode nothing refers to is freed.
    pub fn forget(&self, ino: Ino, n: u64) {
        self.state.lock().unwrap().forget(ino, n);
    }

    /// Size of a file: staged length, else the cached value, else fetched (with lookahead).
    async fn file_size(&self, ns: &str, key: &str) -> FsResult<u64> {
        {
            let st = self.state.lock().unwrap();
            if let Some(len) = st.staged_len(ns, key) {
                return Ok(len);
            }
            match st
                .pending
                .get(&(ns.to_string(), key.to_string()))
                .map(|r| &r.op)
            {
                Some(Op::Put { len, .. }) => return Ok(*len),
                Some(Op::Delete) => return Err(FsError::NotFound),
                None => {}
            }
        }
        Ok(self.value(ns, key).await?.len())
    }

    // ---- namespaces -------------------------------------------------------------------------

    /// The namespaces shown at the root, by directory name.
    async fn namespaces(&self) -> FsResult<Arc<BTreeMap<String, Namespace>>> {
        let _flight = self.flights.enter(("".into(), "\0namespaces".into())).await;
        {
            let st = self.state.lock().unwrap();
            if let Some((at, map)) = &st.namespaces {
                if self.now_fresh(*at) {
                    return Ok(map.clone());
                }
            }
        }
        let list = self.backend.list_namespaces().await?;
        Ok(self.cache_namespaces(list))
    }

    /// Caches a namespace listing, by directory name.
    fn cache_namespaces(&self, list: Vec<Namespace>) -> Arc<BTreeMap<String, Namespace>> {
        let mut map = BTreeMap::new();
        for ns in list {
            let name = names::title_as_name(&ns.title)
                .unwrap_or(&ns.id)
                .to_string();
            map.insert(name, ns);
        }
        let map = Arc::new(map);
        self.state.lock().unwrap().namespaces = Some((Instant::now(), map.clone()));
        map
    }

    fn namespaces_age(&self) -> Duration {
        let st = self.state.lock().unwrap();
        st.namespaces
            .as_ref()
            .map_or(Duration::MAX, |(at, _)| at.elapsed())
    }

    fn forget_namespaces(&self) {
        self.state.lock().unwrap().namespaces = None;
    }

    // ---- listings ---------------------------------------------------------------------------

    /// Keys under `prefix`, from a fresh cached listing of it or of an ancestor, else fetched.
    async fn listing(&self, ns: &str, prefix: &str) -> FsResult<Arc<BTreeMap<String, KeyInfo>>> {
        if let Some(l) = self.cached_listing(ns, prefix) {
            return Ok(l);
        }
        let _flight = self
            .flights
            .enter((ns.into(), format!("\0list:{prefix}")))
            .await;
        if let Some(l) = self.cached_listing(ns, prefix) {
            return Ok(l);
        }
        let mut lister = KeyLister::new(&*self.backend, ns, prefix);
        let mut keys = BTreeMap::new();
        while let Some(page) = lister.next_page().await? {
            for k in page {
                keys.insert(k.name.clone(), k);
            }
        }
        let keys = Arc::new(keys);
        let mut st = self.state.lock().unwrap();
        st.note_hidden(ns, keys.keys());
        st.put_listing(ns, prefix, keys.clone());
        Ok(keys)
    }

    fn cached_listing(&self, ns: &str, prefix: &str) -> Option<Arc<BTreeMap<String, KeyInfo>>> {
        let st = self.state.lock().unwrap();
        st.find_listing(ns, prefix, self.cfg.metadata_ttl)
    }

    /// The key's listing entry if it exists (and has not expired).
    async fn key_info(&self, ns: &str, key: &str) -> FsResult<Option<KeyInfo>> {
        if let Some(p) = self
            .state
            .lock()
            .unwrap()
            .pending
            .get(&(ns.to_string(), key.to_string()))
        {
            return Ok(match &p.op {
                Op::Put {
                    metadata,
                    expiration,
                    ..
                } => Some(KeyInfo {
                    name: key.to_string(),
                    expiration: *expiration,
                    metadata: metadata.clone(),
                }),
                Op::Delete => None,
            });
        }
        let listing = self.listing(ns, &parent_prefix(key)).await?;
        Ok(listing.get(key).filter(|k| !expired(k)).cloned())
    }

    /// Children of a directory inside a namespace: remote keys, plus local changes.
    async fn children(&self, ns: &str, dir: &str) -> FsResult<BTreeMap<String, Kind>> {
        let prefix = dir_prefix(dir);
        let listing = self.listing(ns, &prefix).await?;
        // Keys this mount deleted but has not uploaded the delete of yet.
        let deleted: std::collections::HashSet<String> = {
            let st = self.state.lock().unwrap();
            st.pending_under(ns, &prefix)
                .filter(|(_, r)| matches!(r.op, Op::Delete))
                .map(|((_, k), _)| k.clone())
                .collect()
        };
        let mut out = BTreeMap::new();
        for (key, info) in listing.range(prefix.clone()..) {
            if !key.starts_with(&prefix) {
                break;
            }
            if expired(info) || !representable(key) || deleted.contains(key) {
                continue;
            }
            if let Some((name, is_dir)) = child_of(&prefix, key) {
                let kind = if is_dir { Kind::Dir } else { Kind::File };
                // A directory hides a file of the same name.
                let e = out.entry(name.to_string()).or_insert(kind);
                if is_dir {
                    *e = Kind::Dir;
                }
            }
        }
        self.state
            .lock()
            .unwrap()
            .overlay_children(ns, &prefix, &mut out);
        Ok(out)
    }

    /// The kind of one entry of a directory, without building the whole directory (which would
    /// make every lookup in a large directory cost as much as listing it).
    async fn entry_kind(&self, ns: &str, dir: &str, name: &str) -> FsResult<Option<Kind>> {
        let path = join(dir, name);
        let below = dir_prefix(&path);
        let listing = self.listing(ns, &dir_prefix(dir)).await?;
        let st = self.state.lock().unwrap();
        let deleted = |k: &str| {
            let row = st.pending.get(&(ns.to_string(), k.to_string()));
            matches!(row.map(|r| &r.op), Some(Op::Delete))
        };
        let remote_below = listing
            .range(below.clone()..)
            .take_while(|(k, _)| k.starts_with(&below))
            .any(|(k, i)| !expired(i) && representable(k) && !deleted(k));
        if remote_below || st.local_below(ns, &path) {
            return Ok(Some(Kind::Dir));
        }
        let remote_file = listing
            .get(&path)
            .is_some_and(|i| !expired(i) && representable(&path) && !deleted(&path));
        let pending_file = st.pending_put(ns, &path).is_some();
        let staged = st.staged_ino(ns, &path).is_some();
        Ok((remote_file || pending_file || staged).then_some(Kind::File))
    }

    // ---- values -----------------------------------------------------------------------------

    /// The value of `key`, from the cache while fresh, else fetched together with the next
    /// uncached keys of its directory (one bulk get, in the order `ls -l` and rsync visit them).
    async fn value(&self, ns: &str, key: &str) -> FsResult<Arc<Value>> {
        let ck: CacheKey = (ns.to_string(), key.to_string());
        // A pending change is what this mount reads (read-your-writes).
        let pending = self
            .state
            .lock()
            .unwrap()
            .pending
            .get(&ck)
            .map(|r| r.op.clone());
        match pending {
            Some(Op::Put { blob, .. }) => {
                let bytes = std::fs::read(self.staging_path(&blob))?;
                if self.attrs.current(ns, key).is_none() {
                    self.attrs.observe(ns, key, &bytes, false);
                }
                return Ok(Arc::new(Value::detached(Bytes::from(bytes))));
            }
            Some(Op::Delete) => return Err(FsError::NotFound),
            None => {}
        }
        if let Some(v) = self.fresh_value(&ck, true) {
            return Ok(v);
        }
        let _flight = self.flights.enter(ck.clone()).await;
        if let Some(v) = self.fresh_value(&ck, false) {
            return Ok(v);
        }
        let binary = self.state.lock().unwrap().binary.contains(&ck);
        let batch = if binary {
            vec![key.to_string()]
        } else {
            self.lookahead_batch(ns, key).await?
        };
        if batch.len() > 1 {
            match self.backend.bulk_get(ns, &batch).await {
                Ok(values) => {
                    let mut gone = false;
                    for (k, v) in values {
                        match v {
                            Fetched::Missing => gone |= k == key,
                            // Read alone, with GET, when it is read.
                            Fetched::FetchAlone => {
                                self.state
                                    .lock()
                                    .unwrap()
                                    .binary
                                    .insert((ns.to_string(), k));
                            }
                            Fetched::Value {
                                bytes, expiration, ..
                            } => {
                                self.attrs.observe(ns, &k, &bytes, false);
                                self.cache
                                    .insert((ns.to_string(), k), bytes, expiration)
                                    .map_err(FsError::from)?;
                            }
                        }
                    }
                    if gone {
                        self.state.lock().unwrap().forget_key(ns, key);
                        return Err(FsError::NotFound);
                    }
                    if let Some(v) = self.fresh_value(&ck, false) {
                        return Ok(v);
                    }
                }
                // Over 25 MB in one answer, or any other trouble: fall back to a plain GET.
                Err(e) => {
                    debug!("bulk get of {} keys failed, using GET: {e}", batch.len());
                    if e.kind == ErrorKind::TooLarge {
                        // Values here are large: one GET each costs less than a refused bulk get.
                        let dir = (ns.to_string(), parent_prefix(key));
                        self.state.lock().unwrap().no_lookahead.insert(dir);
                    }
                }
            }
        }
        match self.backend.get_value(ns, key).await {
            Ok(v) => {
                self.attrs.observe(ns, key, &v.bytes, false);
                Ok(self.cache.insert(ck, v.bytes, v.expiration)?)
            }
            Err(e) if e.kind == ErrorKind::NotFound => {
                self.state.lock().unwrap().forget_key(ns, key);
                Err(FsError::NotFound)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn fresh_value(&self, ck: &CacheKey, count: bool) -> Option<Arc<Value>> {
        let now = now_secs();
        let v = if count {
            self.cache.get(ck, now)
        } else {
            self.cache.peek(ck, now)
        }?;
        self.now_fresh(v.fetched).then_some(v)
    }

    /// `key` and the uncached keys that follow it in listing order, at most one bulk get's worth.
    async fn lookahead_batch(&self, ns: &str, key: &str) -> FsResult<Vec<String>> {
        let prefix = parent_prefix(key);
        let mut batch = vec![key.to_string()];
        if self
            .state
            .lock()
            .unwrap()
            .no_lookahead
            .contains(&(ns.to_string(), prefix.clone()))
        {
            return Ok(batch);
        }
        let listing = self.listing(ns, &prefix).await?;
        let now = now_secs();
        for (k, info) in
            listing.range::<str, _>((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
        {
            // Listing order crosses into the next directories, as `ls -lR` and rsync go on.
            if batch.len() >= LOOKAHEAD {
                break;
            }
            if expired(info) || !representable(k) {
                continue;
            }
            let ck = (ns.to_string(), k.clone());
            if self
                .cache
                .peek(&ck, now)
                .is_some_and(|v| self.now_fresh(v.fetched))
            {
                continue;
            }
            {
                let st = self.state.lock().unwrap();
                let large = st
                    .no_lookahead
                    .contains(&(ns.to_string(), parent_prefix(k)));
                if st.pending.contains_key(&ck) || st.binary.contains(&ck) || large {
                    continue;
                }
            }
            batch.push(k.clone());
        }
        Ok(batch)
    }

    // ---- lookup and directories ------------------------------------------------------------

    pub async fn lookup(&self, parent: Ino, name: &str) -> FsResult<Attr> {
        match self.loc(parent)? {
            Loc::Root => {
                let mut nss = self.namespaces().await?;
                if !nss.contains_key(name) && self.namespaces_age() > Duration::from_secs(1) {
                    // Namespaces are few and often made elsewhere (wrangler, the dashboard):
                    // a miss at the root looks again, at most once a second.
                    self.forget_namespaces();
                    nss = self.namespaces().await?;
                }
                let ns = nss.get(name).ok_or(FsError::NotFound)?;
                let mut st = self.state.lock().unwrap();
                let ino = st.entry_for(Loc::Ns(ns.id.clone()), Kind::Dir);
                Ok(self.dir_attr(&st, ino))
            }
            Loc::Ns(ns) => self.lookup_in(&ns, "", name).await,
            Loc::Key { ns, path } => self.lookup_in(&ns, &path, name).await,
        }
    }

    async fn lookup_in(&self, ns: &str, dir: &str, name: &str) -> FsResult<Attr> {
        check_name(dir, name)?;
        let path = join(dir, name);
        let staged = self.state.lock().unwrap().staged_ino(ns, &path);
        if let Some(ino) = staged {
            let mut st = self.state.lock().unwrap();
            if let Some(n) = st.node_mut(ino) {
                n.lookups += 1;
            }
            let len = st.staged.get(&ino).map(|s| s.len).unwrap_or(0);
            return Ok(self.file_attr(&st, ino, len));
        }
        let kind = self
            .entry_kind(ns, dir, name)
            .await?
            .ok_or(FsError::NotFound)?;
        let loc = Loc::Key {
            ns: ns.to_string(),
            path: path.clone(),
        };
        if kind == Kind::Dir {
            let mut st = self.state.lock().unwrap();
            let ino = st.entry_for(loc, Kind::Dir);
            return Ok(self.dir_attr(&st, ino));
        }
        // The size needs the value. Without it at hand, answer without fetching: `rm -r` and
        // `mv` only need to know the entry exists, and a stat asks again (getattr fetches).
        let known = match self.state.lock().unwrap().pending_put(ns, &path) {
            Some((_, len, _)) => Some(len),
            None => self
                .fresh_value(&(ns.to_string(), path.clone()), false)
                .map(|v| v.len()),
        };
        let mut st = self.state.lock().unwrap();
        let ino = st.entry_for(loc, Kind::File);
        let mut attr = self.file_attr(&st, ino, known.unwrap_or(0));
        attr.provisional = known.is_none();
        Ok(attr)
    }

    /// The entries of a directory, `.` and `..` first, with inode numbers assigned.
    pub async fn readdir(&self, ino: Ino) -> FsResult<Vec<DirEntry>> {
        let loc = self.loc(ino)?;
        let children: Vec<(String, Kind, Loc)> = match &loc {
            Loc::Root => self
                .namespaces()
                .await?
                .iter()
                .map(|(name, ns)| (name.clone(), Kind::Dir, Loc::Ns(ns.id.clone())))
                .collect(),
            Loc::Ns(ns) | Loc::Key { ns, .. } => {
                let dir = loc.path();
                self.children(ns, dir)
                    .await?
                    .into_iter()
                    .map(|(name, kind)| {
                        let path = join(dir, &name);
                        (
                            name,
                            kind,
                            Loc::Key {
                                ns: ns.clone(),
                                path,
                            },
                        )
                    })
                    .collect()
            }
        };
        let mut st = self.state.lock().unwrap();
        let parent = st.parent_ino(ino);
        let mut out = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: parent,
                kind: Kind::Dir,
                name: "..".into(),
            },
        ];
        for (name, kind, loc) in children {
            let ino = st.ino_for(loc, kind);
            out.push(DirEntry { ino, kind, name });
        }
        Ok(out)
    }

    pub async fn mkdir(&self, parent: Ino, name: &str) -> FsResult<Attr> {
        self.check_writable()?;
        match self.loc(parent)? {
            Loc::Root => {
                if self.namespaces().await?.contains_key(name) {
                    return Err(FsError::Exists);
                }
                if !valid_segment(name) {
                    return Err(FsError::Invalid(format!(
                        "invalid namespace title {name:?}"
                    )));
                }
                let ns = self.backend.create_namespace(name).await?;
                self.forget_namespaces();
                let mut st = self.state.lock().unwrap();
                let ino = st.entry_for(Loc::Ns(ns.id), Kind::Dir);
                Ok(self.dir_attr(&st, ino))
            }
            loc => {
                let ns = loc.ns().unwrap().to_string();
                let dir = loc.path().to_string();
                check_name(&dir, name)?;
                if self.entry_kind(&ns, &dir, name).await?.is_some() {
                    return Err(FsError::Exists);
                }
                let path = join(&dir, name);
                let mut st = self.state.lock().unwrap();
                st.local_dirs.insert((ns.clone(), path.clone()));
                let ino = st.entry_for(Loc::Key { ns, path }, Kind::Dir);
                Ok(self.dir_attr(&st, ino))
            }
        }
    }

    pub async fn rmdir(&self, parent: Ino, name: &str) -> FsResult<()> {
        self.check_writable()?;
        match self.loc(parent)? {
            Loc::Root => {
                let nss = self.namespaces().await?;
                let ns = nss.get(name).ok_or(FsError::NotFound)?;
                // Pending deletes may be what empties it: send them first.
                if self
                    .state
                    .lock()
                    .unwrap()
                    .pending_under(&ns.id, "")
                    .next()
                    .is_some()
                {
                    self.flush_all(1).await;
                }
                let page = self.backend.list_keys(&ns.id, "", None, Some(10)).await?;
                let pending = {
                    let st = self.state.lock().unwrap();
                    st.has_local_under(&ns.id, "") || st.pending_under(&ns.id, "").next().is_some()
                };
                if !page.keys.is_empty() || pending {
                    return Err(FsError::NotEmpty);
                }
                self.backend.delete_namespace(&ns.id).await?;
                self.forget_namespaces();
                self.state.lock().unwrap().forget_ns(&ns.id);
                Ok(())
            }
            loc => {
                let ns = loc.ns().unwrap().to_string();
                let path = join(loc.path(), name);
                match self.entry_kind(&ns, loc.path(), name).await? {
                    None => return Err(FsError::NotFound),
                    Some(Kind::File) => return Err(FsError::NotDir),
                    Some(Kind::Dir) => {}
                }
                if !self.children(&ns, &path).await?.is_empty() {
                    return Err(FsError::NotEmpty);
                }
                let mut st = self.state.lock().unwrap();
                st.local_dirs.remove(&(ns.clone(), path.clone()));
                // As with unlink: the parent stays, so `rm -r` of nested directories works.
                st.keep_parent_dir(&ns, &path);
                st.detach(&Loc::Key { ns, path });
                Ok(())
            }
        }
    }

    // ---- status and shutdown ----------------------------------------------------------------

    /// A JSON report for `kvfs status`.
    pub fn status(&self) -> Json {
        let st = self.state.lock().unwrap();
        let pending = self.pending_report(&st);
        let cache = self.cache.stats();
        serde_json::json!({
            "pid": std::process::id(),
            "pending": pending,
            "requests": self.backend.request_counts(),
            "cache": {"hits": cache.hits, "misses": cache.misses, "bytes": cache.bytes, "entries": cache.entries},
            "hidden_keys": st.hidden_count(),
            "open_handles": st.handles.len(),
            "inodes": st.inode_count(),
        })
    }

    fn put_options(&self, meta: &KeyMeta) -> PutOptions {
        let min_exp = now_secs() + limits::MIN_EXPIRATION_TTL;
        // The key's own expiration wins; --expiration-ttl applies to keys without one. A key
        // about to expire keeps the soonest expiration KV accepts.
        PutOptions {
            expiration: meta.expiration.map(|e| e.max(min_exp)),
            expiration_ttl: self
                .cfg
                .expiration_ttl
                .filter(|_| meta.expiration.is_none()),
            metadata: meta.metadata.clone(),
        }
    }

    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: 1 << 30,
            bfree: 1 << 29,
            files: 1 << 20,
            ffree: 1 << 19,
            bsize: 4096,
            namelen: 255,
        }
    }
}

/// Numbers for statfs: plausible, so `df` and `cp` work.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

fn expired(k: &KeyInfo) -> bool {
    k.expiration.is_some_and(|e| e <= now_secs())
}

/// The listing prefix of the directory holding `key`.
fn parent_prefix(key: &str) -> String {
    match key.rfind('/') {
        Some(i) => key[..=i].to_string(),
        None => String::new(),
    }
}

/// A name that can be created in `dir`: one segment, and the whole key within KV's limit.
fn check_name(dir: &str, name: &str) -> FsResult<()> {
    if name.len() > names::MAX_SEGMENT_BYTES {
        return Err(FsError::NameTooLong);
    }
    if !valid_segment(name) || name.contains('/') {
        return Err(FsError::Invalid(format!("invalid name {name:?}")));
    }
    check_key_len(&join(dir, name))
}

fn check_key_len(key: &str) -> FsResult<()> {
    if key.len() > MAX_KEY_BYTES {
        Err(FsError::NameTooLong)
    } else {
        Ok(())
    }
}

/// Per-key async locks, so concurrent requests for the same thing wait for one fetch.
#[derive(Default)]
struct Flights {
    map: Mutex<HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>>,
}

struct Flight<'a> {
    flights: &'a Flights,
    key: CacheKey,
    lock: Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Flights {
    async fn enter(&self, key: CacheKey) -> Flight<'_> {
        let lock = self
            .map
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        Flight {
            flights: self,
            key,
            lock,
            _guard: guard,
        }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut map = self.flights.map.lock().unwrap();
        // Only the map and this flight hold it: nobody waits, so the entry can go.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}
