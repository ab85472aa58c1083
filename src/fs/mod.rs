//! The filesystem core: namespaces as directories, keys as files. No fuser types here; the
//! adapter in `fuse.rs` turns these calls and results into kernel replies.
//!
//! State lives behind one `std::sync::Mutex` that is never held across an `.await`; network
//! work happens in async methods that lock, copy what they need, unlock, then call the API.

pub mod error;
pub mod names;
mod state;
pub mod xattr;

pub use error::{FsError, FsResult};
pub use state::{Attr, DirEntry, Kind};

use crate::api::limits::{self, now_secs, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use crate::api::{BulkWriteItem, KeyInfo, Namespace};
use crate::cache::{CacheKey, Value, ValueCache};
use crate::client::{Client, PutOptions};
use bytes::Bytes;
use names::{child_of, dir_prefix, join, representable, valid_segment};
use serde_json::Value as Json;
use state::{Loc, Staged, State};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, warn};

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
    client: Client,
    cfg: FsConfig,
    cache: ValueCache,
    state: Mutex<State>,
    /// Serializes fetches of the same listing or value, so concurrent lookups share one request.
    flights: Flights,
    next_fh: AtomicU64,
    staging_dir: PathBuf,
    started: SystemTime,
}

impl Fs {
    pub fn new(client: Client, cfg: FsConfig) -> std::io::Result<Fs> {
        let staging_dir = cfg.cache_dir.join("staging");
        std::fs::create_dir_all(&staging_dir)?;
        let cache = ValueCache::new(cfg.cache_size, cfg.cache_dir.join("values"))?;
        let root = match &cfg.root_namespace {
            Some(ns) => Loc::Ns(ns.clone()),
            None => Loc::Root,
        };
        Ok(Fs {
            client,
            cache,
            state: Mutex::new(State::new(root)),
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

    pub fn client(&self) -> &Client {
        &self.client
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
        }
    }

    fn file_attr(&self, st: &State, ino: Ino, size: u64) -> Attr {
        let node = st.node(ino);
        Attr {
            ino,
            kind: Kind::File,
            size,
            mtime: node
                .and_then(|n| n.mtime)
                .or(node.map(|n| n.born))
                .unwrap_or(self.started),
            perm: node.and_then(|n| n.mode).unwrap_or(self.cfg.file_mode) as u16,
            uid: node.and_then(|n| n.uid).unwrap_or(self.cfg.uid),
            gid: node.and_then(|n| n.gid).unwrap_or(self.cfg.gid),
        }
    }

    pub async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
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

    /// Size of a file: staged length, else the cached value, else fetched (with lookahead).
    async fn file_size(&self, ns: &str, key: &str) -> FsResult<u64> {
        if let Some(len) = self.state.lock().unwrap().staged_len(ns, key) {
            return Ok(len);
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
        let list = self.client.list_namespaces().await?;
        let mut map = BTreeMap::new();
        for ns in list {
            let name = names::title_as_name(&ns.title)
                .unwrap_or(&ns.id)
                .to_string();
            map.insert(name, ns);
        }
        let map = Arc::new(map);
        self.state.lock().unwrap().namespaces = Some((Instant::now(), map.clone()));
        Ok(map)
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
        let mut lister = self
            .client
            .list_keys(ns, (!prefix.is_empty()).then_some(prefix));
        let mut keys = BTreeMap::new();
        while let Some(page) = lister.next_page().await.map_err(FsError::from)? {
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
        let listing = self.listing(ns, &parent_prefix(key)).await?;
        Ok(listing.get(key).filter(|k| !expired(k)).cloned())
    }

    /// Children of a directory inside a namespace: remote keys, plus local changes.
    async fn children(&self, ns: &str, dir: &str) -> FsResult<BTreeMap<String, Kind>> {
        let prefix = dir_prefix(dir);
        let listing = self.listing(ns, &prefix).await?;
        let mut out = BTreeMap::new();
        for (key, info) in listing.range(prefix.clone()..) {
            if !key.starts_with(&prefix) {
                break;
            }
            if expired(info) || !representable(key) {
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

    // ---- values -----------------------------------------------------------------------------

    /// The value of `key`, from the cache while fresh, else fetched together with the next
    /// uncached keys of its directory (one bulk get, in the order `ls -l` and rsync visit them).
    async fn value(&self, ns: &str, key: &str) -> FsResult<Arc<Value>> {
        let ck: CacheKey = (ns.to_string(), key.to_string());
        if let Some(v) = self.fresh_value(&ck, true) {
            return Ok(v);
        }
        let _flight = self.flights.enter(ck.clone()).await;
        if let Some(v) = self.fresh_value(&ck, false) {
            return Ok(v);
        }
        let batch = self.lookahead_batch(ns, key).await?;
        if batch.len() > 1 {
            match self.client.bulk_get(ns, &batch).await {
                Ok(values) => {
                    for (k, v) in values {
                        let Some(v) = v else { continue };
                        // Bulk get returns text: U+FFFD may stand for bytes that were not UTF-8.
                        if v.value.contains('\u{FFFD}') {
                            continue;
                        }
                        self.cache
                            .insert((ns.to_string(), k), Bytes::from(v.value), v.expiration)
                            .map_err(FsError::from)?;
                    }
                    if let Some(v) = self.fresh_value(&ck, false) {
                        return Ok(v);
                    }
                }
                // Over 25 MB in one answer, or any other trouble: fall back to a plain GET.
                Err(e) => debug!("bulk get of {} keys failed, using GET: {e}", batch.len()),
            }
        }
        match self.client.get_value(ns, key).await {
            Ok(v) => Ok(self.cache.insert(ck, v.bytes, v.expiration)?),
            Err(e) if e.is_not_found() => {
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

    /// `key` and the uncached files that follow it in its directory, at most one bulk get's worth.
    async fn lookahead_batch(&self, ns: &str, key: &str) -> FsResult<Vec<String>> {
        let prefix = parent_prefix(key);
        let listing = self.listing(ns, &prefix).await?;
        let mut batch = vec![key.to_string()];
        let now = now_secs();
        for (k, info) in
            listing.range::<str, _>((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
        {
            if batch.len() >= LOOKAHEAD || !k.starts_with(&prefix) {
                break;
            }
            let is_file = !k[prefix.len()..].contains('/');
            if !is_file || expired(info) || !representable(k) {
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
            batch.push(k.clone());
        }
        Ok(batch)
    }

    // ---- lookup and directories ------------------------------------------------------------

    pub async fn lookup(&self, parent: Ino, name: &str) -> FsResult<Attr> {
        match self.loc(parent)? {
            Loc::Root => {
                let nss = self.namespaces().await?;
                let ns = nss.get(name).ok_or(FsError::NotFound)?;
                let mut st = self.state.lock().unwrap();
                let ino = st.ino_for(Loc::Ns(ns.id.clone()), Kind::Dir);
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
            let st = self.state.lock().unwrap();
            let len = st.staged.get(&ino).map(|s| s.len).unwrap_or(0);
            return Ok(self.file_attr(&st, ino, len));
        }
        let kind = *self
            .children(ns, dir)
            .await?
            .get(name)
            .ok_or(FsError::NotFound)?;
        let loc = Loc::Key {
            ns: ns.to_string(),
            path: path.clone(),
        };
        if kind == Kind::Dir {
            let mut st = self.state.lock().unwrap();
            let ino = st.ino_for(loc, Kind::Dir);
            return Ok(self.dir_attr(&st, ino));
        }
        let size = self.value(ns, &path).await?.len();
        let mut st = self.state.lock().unwrap();
        let ino = st.ino_for(loc, Kind::File);
        Ok(self.file_attr(&st, ino, size))
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
                let ns = self.client.create_namespace(name).await.map_err(|e| {
                    if e.code() == Some(10014) {
                        FsError::Exists
                    } else {
                        FsError::from(e)
                    }
                })?;
                self.forget_namespaces();
                let mut st = self.state.lock().unwrap();
                let ino = st.ino_for(Loc::Ns(ns.id), Kind::Dir);
                Ok(self.dir_attr(&st, ino))
            }
            loc => {
                let ns = loc.ns().unwrap().to_string();
                let dir = loc.path().to_string();
                check_name(&dir, name)?;
                if self.children(&ns, &dir).await?.contains_key(name) {
                    return Err(FsError::Exists);
                }
                let path = join(&dir, name);
                let mut st = self.state.lock().unwrap();
                st.local_dirs.insert((ns.clone(), path.clone()));
                let ino = st.ino_for(Loc::Key { ns, path }, Kind::Dir);
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
                let page = self
                    .client
                    .list_keys_page(&ns.id, None, None, Some(10))
                    .await?;
                let pending = self.state.lock().unwrap().has_local_under(&ns.id, "");
                if !page.keys.is_empty() || pending {
                    return Err(FsError::NotEmpty);
                }
                self.client.delete_namespace(&ns.id).await?;
                self.forget_namespaces();
                self.state.lock().unwrap().forget_ns(&ns.id);
                Ok(())
            }
            loc => {
                let ns = loc.ns().unwrap().to_string();
                let path = join(loc.path(), name);
                match self.children(&ns, loc.path()).await?.get(name) {
                    None => return Err(FsError::NotFound),
                    Some(Kind::File) => return Err(FsError::NotDir),
                    Some(Kind::Dir) => {}
                }
                if !self.children(&ns, &path).await?.is_empty() {
                    return Err(FsError::NotEmpty);
                }
                let mut st = self.state.lock().unwrap();
                st.local_dirs.remove(&(ns.clone(), path.clone()));
                st.drop_loc(&Loc::Key { ns, path });
                Ok(())
            }
        }
    }

    // ---- files: create, open, read, write, close ------------------------------------------

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    fn new_staging_file(&self) -> FsResult<(File, PathBuf)> {
        let id = format!("s{}-{}", std::process::id(), self.new_fh());
        let path = self.staging_dir.join(id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((file, path))
    }

    /// Creates a new, empty file (uploaded on close) and opens it for writing.
    pub async fn create(&self, parent: Ino, name: &str) -> FsResult<(Attr, u64)> {
        self.check_writable()?;
        let loc = self.loc(parent)?;
        let Some(ns) = loc.ns().map(str::to_string) else {
            // The account root holds namespaces only.
            return Err(FsError::Perm);
        };
        let dir = loc.path().to_string();
        check_name(&dir, name)?;
        let path = join(&dir, name);
        let meta = self.key_info(&ns, &path).await?.map(|k| KeyMeta::from(&k));
        let remote_exists = meta.is_some();
        let (file, spath) = self.new_staging_file()?;
        let mut st = self.state.lock().unwrap();
        let ino = st.ino_for(Loc::Key { ns, path }, Kind::File);
        st.staged.insert(
            ino,
            Staged {
                file: Arc::new(file),
                path: spath,
                len: 0,
                dirty: true,
                handles: 1,
                meta: meta.unwrap_or_default(),
                remote_exists,
                unlinked: false,
            },
        );
        let fh = self.new_fh();
        st.handles.insert(
            fh,
            Handle {
                ino,
                writable: true,
                value: None,
                staged_file: None,
            },
        );
        Ok((self.file_attr(&st, ino, 0), fh))
    }

    /// Opens a file. Writable opens stage the whole value locally (unless truncating).
    pub async fn open(&self, ino: Ino, write: bool, truncate: bool) -> FsResult<u64> {
        let (ns, key) = self.file_loc(ino)?;
        let fh = self.new_fh();
        if !write {
            let staged_file = self
                .state
                .lock()
                .unwrap()
                .staged
                .get(&ino)
                .map(|s| s.file.clone());
            let value = match staged_file {
                Some(_) => None,
                None => Some(self.value(&ns, &key).await?),
            };
            let handle = Handle {
                ino,
                writable: false,
                value,
                staged_file,
            };
            self.state.lock().unwrap().handles.insert(fh, handle);
            return Ok(fh);
        }
        self.check_writable()?;
        self.stage(ino, &ns, &key, truncate.then_some(0)).await?;
        let mut st = self.state.lock().unwrap();
        if let Some(s) = st.staged.get_mut(&ino) {
            s.handles += 1;
        }
        st.handles.insert(
            fh,
            Handle {
                ino,
                writable: true,
                value: None,
                staged_file: None,
            },
        );
        Ok(fh)
    }

    /// Makes sure `ino` has a staging file holding its content, truncated to `truncate`.
    async fn stage(&self, ino: Ino, ns: &str, key: &str, truncate: Option<u64>) -> FsResult<()> {
        let existing = self
            .state
            .lock()
            .unwrap()
            .staged
            .get(&ino)
            .map(|s| s.file.clone());
        if let Some(file) = existing {
            if let Some(len) = truncate {
                file.set_len(len)?;
                let mut st = self.state.lock().unwrap();
                if let Some(s) = st.staged.get_mut(&ino) {
                    s.len = len;
                    s.dirty = true;
                }
            }
            return Ok(());
        }
        let info = self.key_info(ns, key).await?;
        let (file, spath) = self.new_staging_file()?;
        let mut len = 0;
        if truncate != Some(0) {
            let value = self.value(ns, key).await?;
            let bytes = value.bytes()?;
            file.write_all_at(&bytes, 0)?;
            len = bytes.len() as u64;
            if let Some(t) = truncate {
                file.set_len(t)?;
                len = t;
            }
        }
        let raced = {
            let mut st = self.state.lock().unwrap();
            let raced = st.staged.contains_key(&ino);
            if !raced {
                st.staged.insert(
                    ino,
                    Staged {
                        file: Arc::new(file),
                        path: spath.clone(),
                        len,
                        dirty: truncate.is_some(),
                        handles: 0,
                        meta: info.as_ref().map(KeyMeta::from).unwrap_or_default(),
                        remote_exists: info.is_some(),
                        unlinked: false,
                    },
                );
            }
            raced
        };
        if raced {
            // Another open staged it meanwhile; keep theirs.
            let _ = std::fs::remove_file(&spath);
            return Box::pin(self.stage(ino, ns, key, truncate)).await;
        }
        Ok(())
    }

    fn file_loc(&self, ino: Ino) -> FsResult<(String, String)> {
        match self.loc(ino)? {
            Loc::Key { ns, path } => Ok((ns, path)),
            _ => Err(FsError::IsDir),
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let (value, staged) = {
            let st = self.state.lock().unwrap();
            let h = st
                .handles
                .get(&fh)
                .ok_or(FsError::Invalid("bad file handle".into()))?;
            let staged = st.staged.get(&h.ino).map(|s| (s.file.clone(), s.len));
            (
                h.value.clone(),
                staged.or_else(|| h.staged_file.clone().map(|f| (f, u64::MAX))),
            )
        };
        // Staged content wins: reads see this mount's writes.
        if let Some((file, len)) = staged {
            // A retired staging file is complete: its own length is the value's.
            let len = if len == u64::MAX {
                file.metadata()?.len()
            } else {
                len
            };
            if offset >= len {
                return Ok(Bytes::new());
            }
            let n = (size as u64).min(len - offset) as usize;
            let mut buf = vec![0; n];
            file.read_exact_at(&mut buf, offset)?;
            return Ok(Bytes::from(buf));
        }
        match value {
            Some(v) => Ok(v.read_at(offset, size as usize)?),
            None => Err(FsError::Io("file handle has no content".into())),
        }
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(FsError::FileTooBig)?;
        if end > MAX_VALUE_BYTES as u64 {
            return Err(FsError::FileTooBig);
        }
        let file = {
            let st = self.state.lock().unwrap();
            let h = st
                .handles
                .get(&fh)
                .ok_or(FsError::Invalid("bad file handle".into()))?;
            if !h.writable {
                return Err(FsError::Invalid("file not open for writing".into()));
            }
            st.staged
                .get(&h.ino)
                .map(|s| s.file.clone())
                .ok_or(FsError::Io("not staged".into()))?
        };
        file.write_all_at(data, offset)?;
        let mut st = self.state.lock().unwrap();
        let ino = st.handles.get(&fh).map(|h| h.ino);
        if let Some(s) = ino.and_then(|i| st.staged.get_mut(&i)) {
            s.len = s.len.max(end);
            s.dirty = true;
        }
        Ok(data.len() as u32)
    }

    /// close() of one descriptor: uploads the file if it changed.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let ino = self.state.lock().unwrap().handles.get(&fh).map(|h| h.ino);
        match ino {
            Some(ino) => self.upload(ino).await,
            None => Ok(()),
        }
    }

    /// The last close of a handle: drops it, and the staging file once nobody needs it.
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let handle = self.state.lock().unwrap().handles.remove(&fh);
        let Some(handle) = handle else { return Ok(()) };
        if !handle.writable {
            return Ok(());
        }
        let result = self.upload(handle.ino).await;
        let mut st = self.state.lock().unwrap();
        if let Some(s) = st.staged.get_mut(&handle.ino) {
            s.handles = s.handles.saturating_sub(1);
            // Changes that failed to upload stay staged, so a later fsync or unmount retries.
            if s.handles == 0 && (!s.dirty || s.unlinked) {
                let s = st.staged.remove(&handle.ino).unwrap();
                let _ = std::fs::remove_file(&s.path);
            }
        }
        result
    }

    /// Uploads a staged, changed file under its current name, keeping metadata and expiration.
    async fn upload(&self, ino: Ino) -> FsResult<()> {
        let (file, len, meta, loc) = {
            let st = self.state.lock().unwrap();
            let Some(s) = st.staged.get(&ino) else {
                return Ok(());
            };
            if !s.dirty || s.unlinked {
                return Ok(());
            }
            (s.file.clone(), s.len, s.meta.clone(), st.loc(ino))
        };
        let Some(Loc::Key { ns, path: key }) = loc else {
            return Ok(());
        };
        let mut buf = vec![0; len as usize];
        file.read_exact_at(&mut buf, 0)?;
        let bytes = Bytes::from(buf);
        self.put(&ns, &key, bytes.clone(), &meta)
            .await
            .inspect_err(|e| {
                warn!("upload of key {key:?} in namespace {ns} failed: {e}");
            })?;
        let mut st = self.state.lock().unwrap();
        if let Some(s) = st.staged.get_mut(&ino) {
            // Unchanged since we read it: clean. Otherwise a later close uploads again.
            if s.len == len {
                s.dirty = false;
            }
            s.remote_exists = true;
        }
        Ok(())
    }

    /// PUT one value and record it in the caches.
    async fn put(&self, ns: &str, key: &str, bytes: Bytes, meta: &KeyMeta) -> FsResult<()> {
        let opts = self.put_options(meta);
        self.client.put_value(ns, key, bytes.clone(), &opts).await?;
        let expiration = opts
            .expiration
            .or(opts.expiration_ttl.map(|t| now_secs() + t));
        self.cache
            .insert((ns.to_string(), key.to_string()), bytes, expiration)?;
        let info = KeyInfo {
            name: key.to_string(),
            expiration,
            metadata: meta.metadata.clone(),
        };
        self.state.lock().unwrap().record_put(ns, info);
        Ok(())
    }

    fn put_options(&self, meta: &KeyMeta) -> PutOptions {
        let min_exp = now_secs() + limits::MIN_EXPIRATION_TTL;
        PutOptions {
            // A key about to expire keeps the soonest expiration KV accepts.
            expiration: if self.cfg.expiration_ttl.is_some() {
                None
            } else {
                meta.expiration.map(|e| e.max(min_exp))
            },
            expiration_ttl: self.cfg.expiration_ttl,
            metadata: meta.metadata.clone(),
        }
    }

    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        self.flush(fh).await
    }

    // ---- truncate, attributes ---------------------------------------------------------------

    /// setattr: size changes truncate (staged, uploaded on close; or at once without a handle);
    /// mode, owner and times are remembered locally.
    #[allow(clippy::too_many_arguments)]
    pub async fn setattr(
        &self,
        ino: Ino,
        size: Option<u64>,
        fh: Option<u64>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        mtime: Option<SystemTime>,
    ) -> FsResult<Attr> {
        if size.is_some() || mode.is_some() || uid.is_some() || gid.is_some() || mtime.is_some() {
            self.check_writable()?;
        }
        if let Some(size) = size {
            if size > MAX_VALUE_BYTES as u64 {
                return Err(FsError::FileTooBig);
            }
            let (ns, key) = self.file_loc(ino)?;
            self.stage(ino, &ns, &key, Some(size)).await?;
            let open = fh.is_some()
                || self
                    .state
                    .lock()
                    .unwrap()
                    .staged
                    .get(&ino)
                    .is_some_and(|s| s.handles > 0);
            if !open {
                // truncate(2) on a closed file: nothing else will upload it.
                let r = self.upload(ino).await;
                let mut st = self.state.lock().unwrap();
                if r.is_ok() {
                    if let Some(s) = st.staged.remove(&ino) {
                        let _ = std::fs::remove_file(&s.path);
                    }
                }
                r?;
            }
        }
        {
            let mut st = self.state.lock().unwrap();
            if let Some(n) = st.node_mut(ino) {
                n.mode = mode.map(|m| m & 0o7777).or(n.mode);
                n.uid = uid.or(n.uid);
                n.gid = gid.or(n.gid);
                n.mtime = mtime.or(n.mtime);
            }
        }
        self.getattr(ino).await
    }

    // ---- unlink and rename ------------------------------------------------------------------

    pub async fn unlink(&self, parent: Ino, name: &str) -> FsResult<()> {
        self.check_writable()?;
        let loc = self.loc(parent)?;
        let ns = loc.ns().ok_or(FsError::Perm)?.to_string();
        let path = join(loc.path(), name);
        let staged_ino = self.state.lock().unwrap().staged_ino(&ns, &path);
        let remote = match self.children(&ns, loc.path()).await?.get(name) {
            Some(Kind::Dir) if staged_ino.is_none() => return Err(FsError::IsDir),
            Some(_) => self.key_info(&ns, &path).await?.is_some(),
            None if staged_ino.is_some() => false,
            None => return Err(FsError::NotFound),
        };
        if remote {
            self.client
                .delete_value(&ns, &path)
                .await
                .or_else(ignore_not_found)?;
        }
        self.cache.remove(&(ns.clone(), path.clone()));
        let mut st = self.state.lock().unwrap();
        st.record_delete(&ns, &path);
        st.keep_parent_dir(&ns, &path);
        if let Some(ino) = staged_ino {
            if let Some(s) = st.staged.get_mut(&ino) {
                s.unlinked = true;
            }
        }
        st.drop_loc(&Loc::Key { ns, path });
        Ok(())
    }

    pub async fn rename(
        &self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        no_replace: bool,
    ) -> FsResult<()> {
        self.check_writable()?;
        let from = self.loc(parent)?;
        let to = self.loc(new_parent)?;
        if let (Loc::Root, Loc::Root) = (&from, &to) {
            return self.rename_namespace(name, new_name).await;
        }
        let (Some(ns), Some(new_ns)) = (from.ns(), to.ns()) else {
            return Err(FsError::CrossDevice);
        };
        if ns != new_ns {
            return Err(FsError::CrossDevice);
        }
        let ns = ns.to_string();
        check_name(to.path(), new_name)?;
        let src = join(from.path(), name);
        let dst = join(to.path(), new_name);
        if src == dst {
            return Ok(());
        }
        let src_staged = self.state.lock().unwrap().staged_ino(&ns, &src);
        let src_kind = match self.children(&ns, from.path()).await?.get(name) {
            Some(k) => *k,
            None if src_staged.is_some() => Kind::File,
            None => return Err(FsError::NotFound),
        };
        let dst_kind = self.children(&ns, to.path()).await?.get(new_name).copied();
        match (src_kind, dst_kind) {
            (_, Some(_)) if no_replace => return Err(FsError::Exists),
            (Kind::File, Some(Kind::Dir)) => return Err(FsError::IsDir),
            (Kind::Dir, Some(Kind::File)) => return Err(FsError::NotDir),
            (Kind::Dir, Some(Kind::Dir)) if !self.children(&ns, &dst).await?.is_empty() => {
                return Err(FsError::NotEmpty)
            }
            (Kind::Dir, _) if dst.starts_with(&dir_prefix(&src)) => {
                return Err(FsError::Invalid(
                    "cannot move a directory into itself".into(),
                ))
            }
            _ => {}
        }
        match src_kind {
            Kind::File => self.rename_file(&ns, &src, &dst, src_staged).await,
            Kind::Dir => self.rename_dir(&ns, &src, &dst).await,
        }
    }

    async fn rename_namespace(&self, name: &str, new_name: &str) -> FsResult<()> {
        let nss = self.namespaces().await?;
        let ns = nss.get(name).ok_or(FsError::NotFound)?;
        if nss.contains_key(new_name) {
            return Err(FsError::Exists);
        }
        self.client.rename_namespace(&ns.id, new_name).await?;
        self.forget_namespaces();
        Ok(())
    }

    /// Writes the new key before deleting the old one, so a failure never loses the value.
    async fn rename_file(
        &self,
        ns: &str,
        src: &str,
        dst: &str,
        staged: Option<Ino>,
    ) -> FsResult<()> {
        check_key_len(dst)?;
        let remote_src = self.key_info(ns, src).await?;
        let dst_ino = self.state.lock().unwrap().staged_ino(ns, dst);
        if let Some(ino) = staged {
            let (dirty, remote_exists) = {
                let st = self.state.lock().unwrap();
                let s = st.staged.get(&ino).unwrap();
                (s.dirty, s.remote_exists)
            };
            self.state.lock().unwrap().move_locs(ns, src, dst, dst_ino);
            if remote_exists {
                // The old key exists remotely: put the new one now, then remove the old.
                if let Some(s) = self.state.lock().unwrap().staged.get_mut(&ino) {
                    s.dirty = true;
                }
                self.upload(ino).await?;
                let _ = dirty;
                self.delete_key(ns, src).await?;
            }
            return Ok(());
        }
        let info = remote_src.ok_or(FsError::NotFound)?;
        let value = self.value(ns, src).await?.bytes()?;
        self.put(ns, dst, value, &KeyMeta::from(&info)).await?;
        self.delete_key(ns, src).await?;
        self.state.lock().unwrap().move_locs(ns, src, dst, dst_ino);
        Ok(())
    }

    async fn delete_key(&self, ns: &str, key: &str) -> FsResult<()> {
        self.client
            .delete_value(ns, key)
            .await
            .or_else(ignore_not_found)?;
        self.cache.remove(&(ns.to_string(), key.to_string()));
        let mut st = self.state.lock().unwrap();
        st.record_delete(ns, key);
        st.keep_parent_dir(ns, key);
        Ok(())
    }

    /// Renames every key under a prefix: bulk write all new keys, then bulk delete the old ones.
    async fn rename_dir(&self, ns: &str, src: &str, dst: &str) -> FsResult<()> {
        let src_prefix = dir_prefix(src);
        let listing = self.listing(ns, &src_prefix).await?;
        let keys: Vec<KeyInfo> = listing
            .range(src_prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&src_prefix))
            .filter(|(_, i)| !expired(i))
            .map(|(_, i)| i.clone())
            .collect();
        for k in &keys {
            check_key_len(&format!("{dst}/{}", &k.name[src_prefix.len()..]))?;
        }
        // Staged files under the directory first go up under their old names, so the bulk
        // copy below carries their latest content.
        let staged: Vec<Ino> = self.state.lock().unwrap().staged_under(ns, &src_prefix);
        for ino in staged {
            self.upload(ino).await?;
        }
        let names: Vec<String> = keys.iter().map(|k| k.name.clone()).collect();
        let mut items = Vec::with_capacity(keys.len());
        for info in &keys {
            let bytes = self.value(ns, &info.name).await?.bytes()?;
            let new_key = format!("{dst}/{}", &info.name[src_prefix.len()..]);
            let opts = self.put_options(&KeyMeta::from(info));
            items.push(bulk_item(new_key, &bytes, &opts));
        }
        self.bulk_write_all(ns, &items).await?;
        for chunk in names.chunks(limits::MAX_BULK_ITEMS) {
            let r = self.client.bulk_delete(ns, chunk).await?;
            if !r.unsuccessful_keys.is_empty() {
                let r2 = self.client.bulk_delete(ns, &r.unsuccessful_keys).await?;
                if !r2.unsuccessful_keys.is_empty() {
                    return Err(FsError::Io(format!(
                        "could not delete {} old keys after the copy",
                        r2.unsuccessful_keys.len()
                    )));
                }
            }
        }
        let mut st = self.state.lock().unwrap();
        for info in &keys {
            let new_key = format!("{dst}/{}", &info.name[src_prefix.len()..]);
            st.record_delete(ns, &info.name);
            st.record_put(
                ns,
                KeyInfo {
                    name: new_key,
                    ..info.clone()
                },
            );
            self.cache.remove(&(ns.to_string(), info.name.clone()));
        }
        st.move_locs(ns, src, dst, None);
        st.keep_parent_dir(ns, src);
        Ok(())
    }

    /// Bulk writes in batches within the API's limits, retrying `unsuccessful_keys` once.
    async fn bulk_write_all(&self, ns: &str, items: &[BulkWriteItem]) -> FsResult<()> {
        let mut batch: Vec<BulkWriteItem> = Vec::new();
        let mut bytes = 0;
        for item in items {
            let size = item.value.len() + item.key.len() + 64;
            if !batch.is_empty()
                && (batch.len() >= limits::MAX_BULK_ITEMS
                    || bytes + size > limits::MAX_BULK_BODY_BYTES / 2)
            {
                self.bulk_write_batch(ns, &batch).await?;
                batch.clear();
                bytes = 0;
            }
            bytes += size;
            batch.push(item.clone());
        }
        if !batch.is_empty() {
            self.bulk_write_batch(ns, &batch).await?;
        }
        Ok(())
    }

    async fn bulk_write_batch(&self, ns: &str, batch: &[BulkWriteItem]) -> FsResult<()> {
        let r = self.client.bulk_write(ns, batch).await?;
        if r.unsuccessful_keys.is_empty() {
            return Ok(());
        }
        let retry: Vec<BulkWriteItem> = batch
            .iter()
            .filter(|i| r.unsuccessful_keys.contains(&i.key))
            .cloned()
            .collect();
        let r2 = self.client.bulk_write(ns, &retry).await?;
        if r2.unsuccessful_keys.is_empty() {
            Ok(())
        } else {
            Err(FsError::Io(format!(
                "{} keys could not be written",
                r2.unsuccessful_keys.len()
            )))
        }
    }

    // ---- status and shutdown ----------------------------------------------------------------

    /// Uploads every staged change. Returns the keys that could not be uploaded.
    pub async fn flush_all(&self) -> Vec<(String, String)> {
        let inos: Vec<Ino> = self.state.lock().unwrap().staged.keys().copied().collect();
        let mut failed = Vec::new();
        for ino in inos {
            if let Err(e) = self.upload(ino).await {
                if let Ok((ns, key)) = self.file_loc(ino) {
                    failed.push((ns, format!("{key}: {e}")));
                }
            }
        }
        failed
    }

    /// A JSON report for `kvfs status`.
    pub fn status(&self) -> Json {
        let st = self.state.lock().unwrap();
        let pending: Vec<Json> = st
            .staged
            .iter()
            .filter(|(_, s)| s.dirty && !s.unlinked)
            .filter_map(|(ino, s)| match st.loc(*ino) {
                Some(Loc::Key { ns, path }) => {
                    Some(serde_json::json!({"namespace": ns, "key": path, "bytes": s.len}))
                }
                _ => None,
            })
            .collect();
        let cache = self.cache.stats();
        serde_json::json!({
            "pid": std::process::id(),
            "pending_uploads": pending,
            "requests": self.client.request_counts(),
            "cache": {"hits": cache.hits, "misses": cache.misses, "bytes": cache.bytes, "entries": cache.entries},
            "hidden_keys": st.hidden_count(),
            "open_handles": st.handles.len(),
        })
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

/// One bulk-write pair: text when the value is UTF-8, base64 otherwise.
pub fn bulk_item(key: String, bytes: &[u8], opts: &PutOptions) -> BulkWriteItem {
    use base64::Engine;
    let (value, base64) = match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), false),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            true,
        ),
    };
    BulkWriteItem {
        key,
        value,
        base64,
        expiration: opts.expiration,
        expiration_ttl: opts.expiration_ttl,
        metadata: opts.metadata.clone(),
    }
}

fn ignore_not_found(e: crate::client::Error) -> Result<(), crate::client::Error> {
    if e.is_not_found() {
        Ok(())
    } else {
        Err(e)
    }
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
