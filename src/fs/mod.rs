//! The filesystem core: namespaces as directories, keys as files. No fuser types here; the
//! adapter in `fuse.rs` turns these calls and results into kernel replies.
//!
//! # Parts
//! - [`inodes::InodeTable`]: inodes (files, not names), the names that lead to them, open
//!   handles, files staged for writing, directories made with mkdir. Private fields; the core
//!   changes it through named methods.
//! - [`remote::Remote`]: the read path. Listings, the value cache, the bulk-get lookahead and
//!   in-flight sharing, over the [`KvBackend`]. Knows nothing of pending changes.
//! - [`writeback::WriteBack`]: the journal of changes not yet confirmed, the staged content
//!   their values live in (in memory and in the journal while small, else a staging file), and
//!   the uploader task. Reflects confirmed uploads into `Remote`.
//! - [`attrs::AttrStore`]: mode, owner and mtime per key, across runs (SQLite).
//! - [`posix`]: with `--posix-metadata`, type, mode, owner, mtime and size in each key's KV
//!   metadata (member `"kvfs"`), symlinks as keys, empty directories as marker keys `dir/`.
//! - `Fs` (this file, `files.rs`, `xattr.rs`) lays this mount's pending changes over the remote
//!   state (read-your-writes) and turns file operations into records of the write-back.
//!
//! # Locks
//! Every lock is a `std::sync::Mutex` held for a few map operations and never across an
//! `.await` (mini-redis's argument: short critical sections, no async lock needed). Each guards
//! one component's state:
//! 1. `Fs::inodes` — the inode table;
//! 2. `WriteBack::state` — the journal's mirror, staging references, per-key send times;
//! 3. `Remote::state` — listings, namespaces, hidden/binary key sets;
//! 4. leaves: the value cache, the attribute store, the journal's SQLite connection.
//!
//! A lock may be taken while holding only locks of a lower number. The async locks (one upload
//! round at a time; one fetch per listing or value) are taken holding no std lock.
//!
//! # Invariants
//! - A change is in the journal (committed to SQLite) before it is in `WriteBack`'s mirror, and
//!   both before `close()` returns: a crash loses nothing a close acknowledged.
//! - A pending change of a key overrides what `Remote` says of it (read-your-writes); a row
//!   leaves the journal only when the server confirmed that version (`seq`) of it.
//! - Staged content exists while a journal row or a staged inode holds it (or a read handle
//!   still reads it), and not longer.
//! - A detached inode (unlinked, replaced) is never recorded again; it lives while open.

pub mod attrs;
pub mod error;
mod files;
mod inodes;
mod keymap;
pub mod names;
pub mod posix;
mod remote;
pub mod writeback;
pub mod xattr;

pub use error::{FsError, FsResult};
pub use inodes::{Attr, ColdEntry, DirEntry, Kind};

use crate::api::limits::MAX_KEY_BYTES;
use crate::api::KeyInfo;
use crate::backend::KvBackend;
use crate::cache::{Value, ValueCache};
use inodes::{InodeTable, Loc};
use names::{child_of, dir_prefix, join, representable, valid_segment};
use remote::{keys_from, parent_prefix, KeyMap, Listed, Remote};
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use writeback::blob::Blob;
use writeback::journal::Op;
use writeback::{WriteBack, WriteBackConfig};

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

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
    /// `--posix-metadata`: type, mode, owner, mtime and size in each key's metadata.
    pub posix_metadata: bool,
    /// `--max-requests`: how many bulk gets a reader walking a listing may have fetching.
    pub max_requests: usize,
    /// `--max-entries`: kernel entries of files kept before the least recently looked up are
    /// let go (0: never; see [`Fs::entries_to_drop`]).
    pub max_entries: usize,
}

/// What an open file handle refers to.
#[derive(Debug)]
pub struct Handle {
    ino: Ino,
    writable: bool,
    /// The value read at open, for read-only handles of files without staged changes.
    value: Option<Arc<Value>>,
    /// The staged content at open: still readable after an upload retires it.
    staged_file: Option<Arc<Blob>>,
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

/// What a setattr changes; None leaves it as it is.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub size: Option<u64>,
    /// The handle it came through (ftruncate, fchmod, futimens), if any.
    pub fh: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// Who makes a file or directory: the requesting process's user and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The attributes a new inode starts with: `mode` (umask applied) and this owner.
    fn changes(self, mode: u32) -> attrs::Changes {
        attrs::Changes {
            mode: Some(mode & 0o7777),
            uid: Some(self.uid),
            gid: Some(self.gid),
            ..attrs::Changes::default()
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
    cfg: FsConfig,
    /// Lock 1 (see the module docs).
    inodes: Mutex<InodeTable>,
    remote: Arc<Remote>,
    wb: Arc<WriteBack>,
    attrs: Arc<attrs::AttrStore>,
    next_fh: AtomicU64,
    started: SystemTime,
    posix_state: posix::PosixState,
}

impl Fs {
    /// A core over `backend`, with its journal, caches and attribute store in the cache dir.
    /// Changes a crashed run left in the journal are loaded (the uploader sends them).
    pub fn new(backend: Arc<dyn KvBackend>, cfg: FsConfig) -> std::io::Result<Fs> {
        let cache = ValueCache::new(cfg.cache_size, cfg.cache_dir.join("values"))?;
        let attrs = Arc::new(
            attrs::AttrStore::open(&cfg.cache_dir.join("attrs.sqlite3"))
                .map_err(std::io::Error::other)?,
        );
        let remote = Arc::new(
            Remote::new(backend.clone(), cache, attrs.clone(), cfg.metadata_ttl)
                .showing_markers(cfg.posix_metadata)
                .fetching_ahead(cfg.max_requests),
        );
        let wb = WriteBack::open(
            &cfg.cache_dir,
            backend,
            remote.clone(),
            WriteBackConfig {
                write_delay: cfg.write_delay,
                expiration_ttl: cfg.expiration_ttl,
            },
        )?;
        let root = match &cfg.root_namespace {
            Some(ns) => Loc::Ns(ns.clone()),
            None => Loc::Root,
        };
        Ok(Fs {
            inodes: Mutex::new(InodeTable::new(root)),
            remote,
            wb: Arc::new(wb),
            attrs,
            next_fh: AtomicU64::new(1),
            started: SystemTime::now(),
            posix_state: Default::default(),
            cfg,
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    pub fn backend(&self) -> &dyn KvBackend {
        self.remote.backend()
    }

    /// Changes the uploader may still send.
    pub fn pending_uploadable(&self) -> usize {
        self.wb.uploadable()
    }

    /// The background uploader (runs until the runtime stops).
    pub async fn run_uploader(self: Arc<Self>) {
        self.wb.clone().run_uploader().await
    }

    /// Starts the uploader as a task of the current runtime (for a core that is not an `Arc`,
    /// as in tests).
    pub fn start_uploader(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.wb.clone().run_uploader())
    }

    /// Records what open files hold now, then uploads everything pending, retrying for a
    /// while. Returns what could not be uploaded. `max_fruitless`: rounds in a row without
    /// progress before giving up.
    pub async fn flush_all(&self, max_fruitless: u32) -> Vec<String> {
        let inos = self.inodes.lock().unwrap().staged_inos();
        for ino in inos {
            if let Err(e) = self.commit(ino) {
                tracing::warn!("recording inode {ino}: {e}");
            }
        }
        self.wb.flush(max_fruitless).await
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn is_detached(&self, ino: Ino) -> bool {
        let st = self.inodes.lock().unwrap();
        st.node(ino).is_some_and(|n| n.detached)
    }

    fn loc(&self, ino: Ino) -> FsResult<Loc> {
        self.inodes
            .lock()
            .unwrap()
            .loc(ino)
            .ok_or(FsError::NotFound)
    }

    // ---- attributes -------------------------------------------------------------------------

    /// A directory's attributes: what was set on it in this run, else the defaults.
    /// `nlink` is 2 + its subdirectories, or 1 when they are not known without a request (the
    /// convention of filesystems that do not count them; `find` then does not rely on it).
    fn dir_attr(&self, st: &InodeTable, ino: Ino, subdirs: Option<usize>) -> Attr {
        let node = st.node(ino);
        let set = node.map(|n| n.set());
        // With --posix-metadata, an empty directory's marker holds what was set on it.
        let marker = node.and_then(|n| self.marker_posix(&n.loc));
        let mtime = set
            .and_then(|s| s.mtime)
            .or(marker.map(|m| m.mtime()))
            .unwrap_or(self.started);
        Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            mtime,
            atime: set.and_then(|s| s.atime).unwrap_or(mtime),
            ctime: node.and_then(|n| n.ctime()).unwrap_or(mtime),
            perm: set
                .and_then(|s| s.mode)
                .or(marker.map(|m| m.mode))
                .unwrap_or(self.cfg.dir_mode) as u16,
            uid: set
                .and_then(|s| s.uid)
                .or(marker.map(|m| m.uid))
                .unwrap_or(self.cfg.uid),
            gid: set
                .and_then(|s| s.gid)
                .or(marker.map(|m| m.gid))
                .unwrap_or(self.cfg.gid),
            nlink: subdirs.map_or(1, |n| 2 + n as u32),
            provisional: false,
        }
    }

    /// A file's attributes. While it is staged (or detached) what was set on the inode comes
    /// first; otherwise the attribute store's, which last across mounts; then the defaults.
    fn file_attr(&self, st: &InodeTable, ino: Ino, size: u64) -> Attr {
        let node = st.node(ino);
        let detached = node.is_some_and(|n| n.detached);
        // A detached inode's last name may belong to another file now.
        let stored = match node.map(|n| &n.loc) {
            Some(Loc::Key { ns, path }) if !detached => self.stored_attrs(ns, path),
            _ => None,
        };
        let local_first = detached || st.is_staged(ino);
        let set = node.map(|n| n.set());
        let s = stored.as_ref();
        macro_rules! pick {
            ($local:expr, $stored:expr) => {
                if local_first {
                    $local.or($stored)
                } else {
                    $stored.or($local)
                }
            };
        }
        let mtime = pick!(set.and_then(|n| n.mtime), s.map(|e| e.mtime))
            .or(node.map(|n| n.born))
            .unwrap_or(self.started);
        Attr {
            ino,
            kind: node.map_or(Kind::File, |n| n.kind),
            size,
            mtime,
            atime: pick!(set.and_then(|n| n.atime), s.and_then(|e| e.atime)).unwrap_or(mtime),
            ctime: pick!(node.and_then(|n| n.ctime()), s.map(|e| e.ctime))
                .unwrap_or(mtime)
                .max(mtime),
            perm: pick!(set.and_then(|n| n.mode), s.and_then(|e| e.mode))
                .unwrap_or(self.cfg.file_mode) as u16,
            uid: pick!(set.and_then(|n| n.uid), s.and_then(|e| e.uid)).unwrap_or(self.cfg.uid),
            gid: pick!(set.and_then(|n| n.gid), s.and_then(|e| e.gid)).unwrap_or(self.cfg.gid),
            nlink: if detached { 0 } else { 1 },
            provisional: false,
        }
    }

    /// Subdirectories of a directory, when known without a request: the namespaces at the
    /// root, else from a fresh cached listing with this mount's changes laid over.
    fn known_subdirs(&self, ino: Ino, loc: &Loc) -> Option<usize> {
        let (ns, prefix) = match loc {
            Loc::Root => return self.remote.cached_namespaces().map(|n| n.len()),
            Loc::Ns(ns) | Loc::Key { ns, .. } => (ns, dir_prefix(loc.path())),
        };
        let ttl = self.cfg.metadata_ttl;
        let counted = self
            .inodes
            .lock()
            .unwrap()
            .node(ino)
            .and_then(|n| n.subdirs());
        if let Some((_, n)) = counted.filter(|(at, _)| at.elapsed() < ttl) {
            return Some(n);
        }
        let listing = self.remote.cached_listing(ns, &prefix)?;
        let children = self.merge_children(ns, &prefix, &listing);
        let n = children.values().filter(|k| **k == Kind::Dir).count();
        if let Some(node) = self.inodes.lock().unwrap().node_mut(ino) {
            node.set_subdirs(Some((std::time::Instant::now(), n)));
        }
        Some(n)
    }

    /// A directory's attributes, with its link count.
    fn dir_attr_of(&self, ino: Ino, loc: &Loc) -> Attr {
        let subdirs = self.known_subdirs(ino, loc);
        self.dir_attr(&self.inodes.lock().unwrap(), ino, subdirs)
    }

    pub async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        if let Some(attr) = self.detached_attr(ino) {
            return attr;
        }
        match self.loc(ino)? {
            loc @ (Loc::Root | Loc::Ns(_)) => Ok(self.dir_attr_of(ino, &loc)),
            Loc::Key { ns, path } => {
                let kind = self.inodes.lock().unwrap().node(ino).map(|n| n.kind);
                if kind == Some(Kind::Dir) {
                    return Ok(self.dir_attr_of(ino, &Loc::Key { ns, path }));
                }
                let size = self.file_size(&ns, &path).await?;
                Ok(self.file_attr(&self.inodes.lock().unwrap(), ino, size))
            }
        }
    }

    /// Attributes of an unlinked or replaced inode, from what its open handles hold; None for
    /// an inode that still has a name.
    fn detached_attr(&self, ino: Ino) -> Option<FsResult<Attr>> {
        let st = self.inodes.lock().unwrap();
        let node = st.node(ino)?;
        if !node.detached {
            return None;
        }
        if node.kind == Kind::Dir {
            let mut attr = self.dir_attr(&st, ino, None);
            attr.nlink = 0;
            return Some(Ok(attr));
        }
        let size = match st.staged(ino) {
            Some(s) => Some(s.len),
            None => st.handles_of(ino).find_map(|h| {
                h.value
                    .as_ref()
                    .map(|v| v.len())
                    .or_else(|| h.staged_file.as_ref().map(|b| b.len()))
            }),
        };
        Some(
            size.map(|size| self.file_attr(&st, ino, size))
                .ok_or(FsError::NotFound),
        )
    }

    /// The kernel dropped `n` references to `ino`: an inode nothing refers to is freed.
    pub fn forget(&self, ino: Ino, n: u64) {
        self.inodes.lock().unwrap().forget(ino, n);
    }

    /// Kernel entries to let go now, once more than `max_entries`
    /// files hold one: the kernel keeps every entry it was given until memory runs short,
    /// and the table a node for each, so a walk of a million keys would hold a million nodes.
    /// The adapter invalidates them (from a thread of its own: the kernel holds a directory's
    /// lock while it looks a name up in it); the kernel then forgets them. Nothing a user sees
    /// changes: a name looked up again gets the same inode number and attributes. Never an
    /// entry of an open, staged or pending file (`InodeTable::cold_entries`).
    pub fn entries_to_drop(&self) -> Vec<ColdEntry> {
        let limit = self.cfg.max_entries;
        if limit == 0 {
            return Vec::new();
        }
        self.inodes
            .lock()
            .unwrap()
            .cold_entries(limit, |loc| match loc {
                Loc::Key { ns, path } => self.wb.is_pending(ns, path),
                _ => true,
            })
    }

    /// Size of a file: staged length, else the pending value's, else the value's (fetched with
    /// lookahead when not cached).
    async fn file_size(&self, ns: &str, key: &str) -> FsResult<u64> {
        if let Some(len) = self.inodes.lock().unwrap().staged_len(ns, key) {
            return Ok(len);
        }
        match self.wb.pending(ns, key).map(|r| r.op) {
            Some(Op::Put { len, .. }) => return Ok(len),
            Some(Op::Delete) => return Err(FsError::NotFound),
            None => {}
        }
        if let Some(size) = self.posix_size(ns, key).await? {
            return Ok(size);
        }
        Ok(self.value(ns, key).await?.len())
    }

    // ---- the namespace as this mount sees it: remote state with local changes laid over ----

    /// The key's listing entry if it exists (and has not expired), pending changes included.
    async fn key_info(&self, ns: &str, key: &str) -> FsResult<Option<KeyInfo>> {
        if let Some(row) = self.wb.pending(ns, key) {
            return Ok(match row.op {
                Op::Put {
                    metadata,
                    expiration,
                    ..
                } => Some(KeyInfo {
                    name: key.to_string(),
                    expiration,
                    metadata,
                }),
                Op::Delete => None,
            });
        }
        self.remote.key_info(ns, key).await
    }

    /// Children of a directory inside a namespace: remote keys, plus local changes.
    async fn children(&self, ns: &str, dir: &str) -> FsResult<BTreeMap<String, Kind>> {
        let prefix = dir_prefix(dir);
        let listing = self.remote.listing(ns, &prefix).await?;
        Ok(self.merge_children(ns, &prefix, &listing))
    }

    /// The children under `prefix`: the listing's keys, less pending deletes, plus pending
    /// writes, staged files and local directories. A directory hides a file of the same name.
    fn merge_children(&self, ns: &str, prefix: &str, listing: &KeyMap) -> BTreeMap<String, Kind> {
        let pending = self.wb.pending_under(ns, prefix);
        // Keys this mount deleted but has not uploaded the delete of yet.
        let deleted: HashSet<&str> = pending
            .iter()
            .filter(|(_, put)| !put)
            .map(|(k, _)| k.as_str())
            .collect();
        let mut out = BTreeMap::new();
        let add = |out: &mut BTreeMap<String, Kind>, key: &str, info: Option<&Listed>| {
            // A marker of the directory itself (`prefix`) is no child.
            if let Some((name, is_dir)) = child_of(prefix, key).filter(|(n, _)| !n.is_empty()) {
                let kind = if is_dir {
                    Kind::Dir
                } else {
                    self.key_kind(ns, key, info)
                };
                let e = out.entry(name.to_string()).or_insert(kind);
                if is_dir {
                    *e = Kind::Dir;
                }
            }
        };
        for (key, info) in keys_from(listing, prefix) {
            if !key.starts_with(prefix) {
                break;
            }
            if info.expired() || !self.visible(key) || deleted.contains(key) {
                continue;
            }
            add(&mut out, key, Some(info));
        }
        for (key, _) in pending.iter().filter(|(k, put)| *put && self.visible(k)) {
            add(&mut out, key, None);
        }
        self.inodes
            .lock()
            .unwrap()
            .overlay_children(ns, prefix, &mut out);
        out
    }

    /// The kind of one entry of a directory, without building the whole directory (which would
    /// make every lookup in a large directory cost as much as listing it).
    async fn entry_kind(&self, ns: &str, dir: &str, name: &str) -> FsResult<Option<Kind>> {
        let path = join(dir, name);
        let below = dir_prefix(&path);
        // Read as the part `below` of the listing: a walk steps from name to name.
        let listing = self
            .remote
            .listing_for(ns, &dir_prefix(dir), &below)
            .await?;
        let deleted = |k: &str| matches!(self.wb.pending(ns, k).map(|r| r.op), Some(Op::Delete));
        let remote_below = keys_from(&listing, &below)
            .take_while(|(k, _)| k.starts_with(&below))
            .any(|(k, i)| !i.expired() && self.visible(k) && !deleted(k));
        if remote_below
            || self.inodes.lock().unwrap().local_below(ns, &path)
            || self.wb.any_under(ns, &below, true)
        {
            return Ok(Some(Kind::Dir));
        }
        let remote_file = listing
            .get(path.as_str())
            .is_some_and(|i| !i.expired() && representable(&path) && !deleted(&path));
        let pending_file = self.wb.pending_put(ns, &path).is_some();
        let staged = self.inodes.lock().unwrap().staged_ino(ns, &path).is_some();
        let kind = self.key_kind(ns, &path, listing.get(path.as_str()));
        Ok((remote_file || pending_file || staged).then_some(kind))
    }

    /// Whether the server may hold `key` (as far as this mount knows).
    async fn remote_exists(&self, ns: &str, key: &str) -> FsResult<bool> {
        if let Some(r) = self.wb.pending(ns, key) {
            return Ok(r.remote);
        }
        let listing = self.remote.listing(ns, &parent_prefix(key)).await?;
        Ok(listing.contains_key(key))
    }

    /// Every key under `prefix`, remote and pending, in order.
    async fn keys_under(&self, ns: &str, prefix: &str) -> FsResult<Vec<String>> {
        let listing = self.remote.listing(ns, prefix).await?;
        let mut keys: std::collections::BTreeSet<String> = keys_from(&listing, prefix)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, i)| !i.expired())
            .map(|(k, _)| k.to_string())
            .collect();
        for (k, put) in self.wb.pending_under(ns, prefix) {
            if put {
                keys.insert(k);
            } else {
                keys.remove(&k);
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// The value of `key` as this mount sees it: a pending change wins (read-your-writes), else
    /// the remote value.
    async fn value(&self, ns: &str, key: &str) -> FsResult<Arc<Value>> {
        match self.wb.pending(ns, key).map(|r| r.op) {
            Some(Op::Put { blob, .. }) => {
                let bytes = self.wb.blob_bytes(&blob)?;
                if self.attrs.current(ns, key).is_none() {
                    self.attrs.observe(ns, key, &bytes, false);
                }
                return Ok(Arc::new(Value::detached(bytes)));
            }
            Some(Op::Delete) => return Err(FsError::NotFound),
            None => {}
        }
        let v = self
            .remote
            .value(ns, key, &self.fetch_apart(ns, key))
            .await?;
        self.check_size(ns, key, v.len());
        Ok(v)
    }

    /// Keys not to fetch together with `key`: those with changes pending here (their pending
    /// value wins), and with --posix-metadata those of another kind (a symlink's target is
    /// read ahead with other symlinks only, as readlink needs no file's content).
    fn fetch_apart<'a>(&'a self, ns: &'a str, key: &str) -> impl Fn(&str) -> bool + Sync + 'a {
        let kind = self.key_kind(ns, key, None);
        move |k| self.wb.is_pending(ns, k) || (self.posix() && self.key_kind(ns, k, None) != kind)
    }

    // ---- lookup and directories ------------------------------------------------------------

    pub async fn lookup(&self, parent: Ino, name: &str) -> FsResult<Attr> {
        match self.loc(parent)? {
            Loc::Root => {
                let mut nss = self.remote.namespaces().await?;
                if !nss.contains_key(name) && self.remote.namespaces_age() > Duration::from_secs(1)
                {
                    // Namespaces are few and often made elsewhere (wrangler, the dashboard):
                    // a miss at the root looks again, at most once a second.
                    self.remote.forget_namespaces();
                    nss = self.remote.namespaces().await?;
                }
                let loc = Loc::Ns(nss.get(name).ok_or(FsError::NotFound)?.id.clone());
                let ino = self
                    .inodes
                    .lock()
                    .unwrap()
                    .entry_for(loc.clone(), Kind::Dir);
                Ok(self.dir_attr_of(ino, &loc))
            }
            Loc::Ns(ns) => self.lookup_in(&ns, "", name).await,
            Loc::Key { ns, path } => self.lookup_in(&ns, &path, name).await,
        }
    }

    async fn lookup_in(&self, ns: &str, dir: &str, name: &str) -> FsResult<Attr> {
        check_name(dir, name)?;
        let path = join(dir, name);
        let staged = self.inodes.lock().unwrap().staged_ino(ns, &path);
        if let Some(ino) = staged {
            let mut st = self.inodes.lock().unwrap();
            if let Some(n) = st.node_mut(ino) {
                n.lookups += 1;
            }
            let len = st.staged(ino).map(|s| s.len).unwrap_or(0);
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
            let ino = self
                .inodes
                .lock()
                .unwrap()
                .entry_for(loc.clone(), Kind::Dir);
            return Ok(self.dir_attr_of(ino, &loc));
        }
        // The size needs the value. Without it at hand, answer without fetching: `rm -r` and
        // `mv` only need to know the entry exists, and a stat asks again (getattr fetches).
        let known = match self.wb.pending_put(ns, &path) {
            Some((_, len, _)) => Some(len),
            None => match self
                .remote
                .value_at_hand(ns, &path, &self.fetch_apart(ns, &path))
                .await
            {
                Some(v) => Some(v.len()),
                None => self.posix_size(ns, &path).await?,
            },
        };
        let mut st = self.inodes.lock().unwrap();
        let ino = st.entry_for(loc, kind);
        let mut attr = self.file_attr(&st, ino, known.unwrap_or(0));
        attr.provisional = known.is_none();
        Ok(attr)
    }

    /// The entries of a directory, `.` and `..` first, with inode numbers assigned.
    pub async fn readdir(&self, ino: Ino) -> FsResult<Vec<DirEntry>> {
        let loc = self.loc(ino)?;
        let children: Vec<(String, Kind, Loc)> = match &loc {
            Loc::Root => self
                .remote
                .namespaces()
                .await?
                .iter()
                .map(|(name, ns)| (name.clone(), Kind::Dir, Loc::Ns(ns.id.clone())))
                .collect(),
            Loc::Ns(ns) | Loc::Key { ns, .. } => {
                let dir = loc.path();
                // Reading a directory whole is how a walk moves on through a listing.
                let prefix = dir_prefix(dir);
                let listing = self.remote.listing_step(ns, &prefix).await?;
                self.merge_children(ns, &prefix, &listing)
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
        let st = self.inodes.lock().unwrap();
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
            let ino = st.peek_ino(&loc);
            out.push(DirEntry { ino, kind, name });
        }
        Ok(out)
    }

    /// mkdir with `mode` (the caller's umask applied), owned by `owner`.
    pub async fn mkdir(&self, parent: Ino, name: &str, mode: u32, owner: Owner) -> FsResult<Attr> {
        self.check_writable()?;
        let given = owner.changes(mode);
        match self.loc(parent)? {
            Loc::Root => {
                if self.remote.namespaces().await?.contains_key(name) {
                    return Err(FsError::Exists);
                }
                if !valid_segment(name) {
                    return Err(FsError::Invalid(format!(
                        "invalid namespace title {name:?}"
                    )));
                }
                let ns = self.remote.backend().create_namespace(name).await?;
                self.remote.forget_namespaces();
                let mut st = self.inodes.lock().unwrap();
                let loc = Loc::Ns(ns.id);
                let ino = st.entry_for(loc.clone(), Kind::Dir);
                if let Some(n) = st.node_mut(ino) {
                    n.change(&given);
                }
                st.touch_parent(&loc, true);
                Ok(self.dir_attr(&st, ino, Some(0)))
            }
            loc => {
                let ns = loc.ns().unwrap().to_string();
                let dir = loc.path().to_string();
                check_name(&dir, name)?;
                if self.entry_kind(&ns, &dir, name).await?.is_some() {
                    return Err(FsError::Exists);
                }
                let path = join(&dir, name);
                let mut st = self.inodes.lock().unwrap();
                st.add_local_dir(&ns, &path);
                let loc = Loc::Key {
                    ns: ns.clone(),
                    path: path.clone(),
                };
                let ino = st.entry_for(loc.clone(), Kind::Dir);
                if let Some(n) = st.node_mut(ino) {
                    n.change(&given);
                    n.touch();
                }
                st.touch_parent(&loc, true);
                if self.posix() {
                    self.record_marker(&st, ino, &ns, &path)?;
                }
                Ok(self.dir_attr(&st, ino, Some(0)))
            }
        }
    }

    pub async fn rmdir(&self, parent: Ino, name: &str) -> FsResult<()> {
        self.check_writable()?;
        match self.loc(parent)? {
            Loc::Root => {
                let nss = self.remote.namespaces().await?;
                let ns = nss.get(name).ok_or(FsError::NotFound)?;
                // Pending deletes may be what empties it: send them first.
                if self.wb.any_under(&ns.id, "", false) {
                    self.flush_all(1).await;
                }
                let page = self
                    .remote
                    .backend()
                    .list_keys(&ns.id, "", None, Some(10))
                    .await?;
                let pending = self.inodes.lock().unwrap().has_local_under(&ns.id, "")
                    || self.wb.any_under(&ns.id, "", false);
                if !page.keys.is_empty() || pending {
                    return Err(FsError::NotEmpty);
                }
                self.remote.backend().delete_namespace(&ns.id).await?;
                self.remote.forget_namespaces();
                {
                    let mut st = self.inodes.lock().unwrap();
                    st.forget_ns(&ns.id);
                    st.touch_parent(&Loc::Ns(ns.id.clone()), true);
                }
                self.remote.forget_ns(&ns.id);
                Ok(())
            }
            loc => {
                let ns = loc.ns().unwrap().to_string();
                let path = join(loc.path(), name);
                match self.entry_kind(&ns, loc.path(), name).await? {
                    None => return Err(FsError::NotFound),
                    Some(Kind::File | Kind::Symlink) => return Err(FsError::NotDir),
                    Some(Kind::Dir) => {}
                }
                if !self.children(&ns, &path).await?.is_empty() {
                    return Err(FsError::NotEmpty);
                }
                self.drop_marker(&ns, &path).await?;
                let mut st = self.inodes.lock().unwrap();
                st.remove_local_dir(&ns, &path);
                // As with unlink: the parent stays, so `rm -r` of nested directories works.
                st.keep_parent_dir(&ns, &path);
                let loc = Loc::Key { ns, path };
                st.touch_parent(&loc, true);
                st.detach(&loc);
                Ok(())
            }
        }
    }

    // ---- status and shutdown ----------------------------------------------------------------

    /// A JSON report for `kvfs status`.
    pub fn status(&self) -> Json {
        let (handles, inodes, let_go) = {
            let st = self.inodes.lock().unwrap();
            (st.handle_count(), st.inode_count(), st.let_go_count())
        };
        let cache = self.remote.cache_stats();
        serde_json::json!({
            "pid": std::process::id(),
            "pending": self.wb.report(),
            "requests": self.remote.backend().request_counts(),
            "cache": {"hits": cache.hits, "misses": cache.misses, "bytes": cache.bytes, "entries": cache.entries},
            "hidden_keys": self.remote.hidden_count(),
            "open_handles": handles,
            "inodes": inodes,
            // Kernel entries let go to bound the table (`--max-entries`).
            "entries_let_go": let_go,
            // What the daemon holds per key: keys in cached listings, attribute entries.
            "listed_keys": self.remote.listed_count(),
            "attrs_seen": self.attrs.seen_count(),
        })
    }

    /// Workers KV has no capacity or free space to report, and counting keys would list every
    /// namespace: sizes and file counts are zero, as sshfs-like network filesystems without a
    /// quota report (df shows 0, never an invented "2.0T used"). Writes do not depend on it.
    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: 0,
            bfree: 0,
            files: 0,
            ffree: 0,
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
