//! The core's in-memory state: inodes, cached listings, staged files, handles, local dirs.
//! Plain data behind the core's mutex; nothing here waits on the network.

use super::names::{child_of, representable};
use super::{Handle, Ino, KeyMeta, ROOT_INO};
use crate::api::{KeyInfo, Namespace};
use crate::writeback::journal::{Op, Row};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tracing::info;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// Attributes the adapter turns into a `stat`.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// Names that lead to it: 0 once unlinked or replaced (it lives on while open).
    pub nlink: u32,
    /// The size is not known yet (the value was not fetched): the kernel must ask again
    /// (getattr) before it trusts these attributes.
    pub provisional: bool,
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: Kind,
    pub name: String,
}

/// Where an inode lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Loc {
    /// The account: namespaces as directories.
    Root,
    /// A namespace's root directory, by id.
    Ns(String),
    /// A file or directory inside a namespace; `path` has no leading or trailing `/`.
    Key { ns: String, path: String },
}

impl Loc {
    pub fn ns(&self) -> Option<&str> {
        match self {
            Loc::Root => None,
            Loc::Ns(ns) | Loc::Key { ns, .. } => Some(ns),
        }
    }

    /// The path inside the namespace ("" for the namespace root and the account root).
    pub fn path(&self) -> &str {
        match self {
            Loc::Key { path, .. } => path,
            _ => "",
        }
    }
}

/// One inode: a file or directory, not a name. A rename moves it to a new `loc`; an unlink or
/// a rename over it detaches it (no name leads to it any more), and it lives on, with its
/// content and attributes, while handles are open on it.
#[derive(Debug)]
pub struct Node {
    /// Its name, or the last one it had when detached.
    pub loc: Loc,
    pub kind: Kind,
    pub born: SystemTime,
    /// Unlinked or replaced: reachable only through open handles; never uploaded again.
    pub detached: bool,
    /// Entries the kernel holds (lookup, create, mkdir replies less `forget`s).
    pub lookups: u64,
    // Set by chmod/chown/utimes; KV has nowhere to keep them.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
}

/// A file whose whole content is staged in the cache dir (named by id, never by key).
#[derive(Debug)]
pub struct Staged {
    pub file: Arc<File>,
    /// File name in the staging dir; a journal row may point at it too.
    pub blob: String,
    pub len: u64,
    /// Changed since the last successful upload.
    pub dirty: bool,
    /// Writable handles open on it.
    pub handles: u32,
    pub meta: KeyMeta,
    /// The key exists remotely (so a rename must delete the old key).
    pub remote_exists: bool,
    /// Unlinked while open: never uploaded.
    pub unlinked: bool,
}

struct Listing {
    prefix: String,
    keys: Arc<BTreeMap<String, KeyInfo>>,
    at: Instant,
}

pub struct State {
    next_ino: Ino,
    nodes: HashMap<Ino, Node>,
    by_loc: HashMap<Loc, Ino>,
    listings: HashMap<String, Vec<Listing>>,
    pub namespaces: Option<(Instant, Arc<BTreeMap<String, Namespace>>)>,
    pub staged: HashMap<Ino, Staged>,
    pub handles: HashMap<u64, Handle>,
    /// Directories made with mkdir that hold no key yet: (namespace, path).
    pub local_dirs: BTreeSet<(String, String)>,
    /// Keys left out of listings because they cannot be paths, logged once each.
    hidden: HashSet<(String, String)>,
    /// Mirror of the journal: the pending change of each (namespace, key).
    pub pending: BTreeMap<(String, String), Row>,
    /// Staging files that journal rows point at, with how many rows do.
    blobs: HashMap<String, usize>,
    pub next_seq: u64,
    /// Keys whose value is not UTF-8 (bulk get cannot carry them): always fetched with GET.
    pub binary: HashSet<(String, String)>,
    /// Directories (namespace, prefix) whose values are too large to share a bulk get.
    pub no_lookahead: HashSet<(String, String)>,
}

impl State {
    pub fn new(root: Loc) -> State {
        let mut st = State {
            next_ino: ROOT_INO,
            nodes: HashMap::new(),
            by_loc: HashMap::new(),
            listings: HashMap::new(),
            namespaces: None,
            staged: HashMap::new(),
            handles: HashMap::new(),
            local_dirs: BTreeSet::new(),
            hidden: HashSet::new(),
            pending: BTreeMap::new(),
            blobs: HashMap::new(),
            next_seq: 0,
            binary: HashSet::new(),
            no_lookahead: HashSet::new(),
        };
        st.ino_for(root, Kind::Dir);
        st
    }

    pub fn loc(&self, ino: Ino) -> Option<Loc> {
        self.nodes.get(&ino).map(|n| n.loc.clone())
    }

    pub fn node(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn node_mut(&mut self, ino: Ino) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    /// The inode of `loc`, made on first sight. Inode numbers stay stable for the mount's life.
    pub fn ino_for(&mut self, loc: Loc, kind: Kind) -> Ino {
        if let Some(&ino) = self.by_loc.get(&loc) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.kind = kind;
            }
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.by_loc.insert(loc.clone(), ino);
        self.nodes.insert(
            ino,
            Node {
                loc,
                kind,
                born: SystemTime::now(),
                detached: false,
                lookups: 0,
                mode: None,
                uid: None,
                gid: None,
                mtime: None,
            },
        );
        ino
    }

    pub fn parent_ino(&self, ino: Ino) -> Ino {
        let parent = match self.loc(ino) {
            Some(Loc::Key { ns, path }) => match path.rfind('/') {
                Some(i) => Loc::Key {
                    ns,
                    path: path[..i].to_string(),
                },
                None => Loc::Ns(ns),
            },
            _ => Loc::Root,
        };
        self.by_loc.get(&parent).copied().unwrap_or(ROOT_INO)
    }

    /// The inode of `loc`, counted as an entry the kernel now holds (until it forgets it).
    pub fn entry_for(&mut self, loc: Loc, kind: Kind) -> Ino {
        let ino = self.ino_for(loc, kind);
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.lookups += 1;
        }
        ino
    }

    /// Unlinks the inode at `loc`: no name leads to it any more. It lives on for handles
    /// still open, and a staged file of it is never recorded.
    pub fn detach(&mut self, loc: &Loc) {
        let Some(ino) = self.by_loc.remove(loc) else {
            return;
        };
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.detached = true;
        }
        if let Some(s) = self.staged.get_mut(&ino) {
            s.unlinked = true;
        }
        self.drop_if_unused(ino);
    }

    /// The kernel forgot `n` entries of `ino`.
    pub fn forget(&mut self, ino: Ino, n: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        self.drop_if_unused(ino);
    }

    /// Frees an inode nothing refers to: the kernel holds no entry of it, no handle is open on
    /// it, nothing is staged for it, and it holds no attribute set in this run (those would be
    /// lost; files keep theirs in the attribute store, so this is mostly directories).
    pub fn drop_if_unused(&mut self, ino: Ino) {
        if ino == ROOT_INO || self.staged.contains_key(&ino) {
            return;
        }
        let Some(n) = self.nodes.get(&ino) else {
            return;
        };
        let local_attrs =
            n.mode.is_some() || n.uid.is_some() || n.gid.is_some() || n.mtime.is_some();
        if n.lookups > 0
            || (local_attrs && !n.detached)
            || self.handles.values().any(|h| h.ino == ino)
        {
            return;
        }
        let n = self.nodes.remove(&ino).unwrap();
        if self.by_loc.get(&n.loc) == Some(&ino) {
            self.by_loc.remove(&n.loc);
        }
    }

    /// Inodes in the table (for `kvfs status` and tests of `forget`).
    pub fn inode_count(&self) -> usize {
        self.nodes.len()
    }

    /// The staged, not unlinked inode at (ns, path).
    pub fn staged_ino(&self, ns: &str, path: &str) -> Option<Ino> {
        let ino = *self.by_loc.get(&Loc::Key {
            ns: ns.to_string(),
            path: path.to_string(),
        })?;
        self.staged.get(&ino).filter(|s| !s.unlinked).map(|_| ino)
    }

    pub fn staged_len(&self, ns: &str, path: &str) -> Option<u64> {
        self.staged_ino(ns, path)
            .and_then(|i| self.staged.get(&i))
            .map(|s| s.len)
    }

    pub fn staged_under(&self, ns: &str, prefix: &str) -> Vec<Ino> {
        self.staged
            .iter()
            .filter(|(_, s)| !s.unlinked)
            .filter_map(|(ino, _)| match self.nodes.get(ino).map(|n| &n.loc) {
                Some(Loc::Key { ns: n, path }) if n == ns && path.starts_with(prefix) => Some(*ino),
                _ => None,
            })
            .collect()
    }

    /// Anything local (staged files, mkdir'd dirs) under `prefix` of `ns`.
    pub fn has_local_under(&self, ns: &str, prefix: &str) -> bool {
        !self.staged_under(ns, prefix).is_empty()
            || self
                .local_dirs
                .iter()
                .any(|(n, p)| n == ns && p.starts_with(prefix))
    }

    /// Whether this mount holds something below `path` that makes it a directory: a local
    /// directory (itself or below), a pending write, or a staged file.
    pub fn local_below(&self, ns: &str, path: &str) -> bool {
        let below = format!("{path}/");
        let key = (ns.to_string(), path.to_string());
        self.local_dirs.contains(&key)
            || self
                .local_dirs
                .range((ns.to_string(), below.clone())..)
                .next()
                .is_some_and(|(n, p)| n == ns && p.starts_with(&below))
            || self
                .pending_under(ns, &below)
                .any(|((_, k), r)| matches!(r.op, Op::Put { .. }) && representable(k))
            || !self.staged_under(ns, &below).is_empty()
    }

    /// Adds this mount's staged files and local directories to a directory's children.
    pub fn overlay_children(&self, ns: &str, prefix: &str, out: &mut BTreeMap<String, Kind>) {
        for ino in self.staged_under(ns, prefix) {
            if let Some(Loc::Key { path, .. }) = self.loc(ino) {
                if let Some((name, is_dir)) = child_of(prefix, &path) {
                    let kind = if is_dir { Kind::Dir } else { Kind::File };
                    let e = out.entry(name.to_string()).or_insert(kind);
                    if is_dir {
                        *e = Kind::Dir;
                    }
                }
            }
        }
        for (n, path) in self
            .local_dirs
            .range((ns.to_string(), prefix.to_string())..)
        {
            if n != ns || !path.starts_with(prefix) {
                break;
            }
            if let Some((name, _)) = child_of(prefix, path) {
                out.insert(name.to_string(), Kind::Dir);
            }
        }
        // Pending writes appear (pending deletes were left out of the listing by the caller).
        for ((_, key), row) in self.pending_under(ns, prefix) {
            let Some((name, is_dir)) = child_of(prefix, key) else {
                continue;
            };
            if !representable(key) || !matches!(row.op, Op::Put { .. }) {
                continue;
            }
            if is_dir {
                out.insert(name.to_string(), Kind::Dir);
            } else {
                out.entry(name.to_string()).or_insert(Kind::File);
            }
        }
    }

    // ---- pending changes (the journal's mirror) ----

    /// Sets the pending change of a key; returns the one it replaced.
    pub fn set_pending(&mut self, row: Row) -> Option<Row> {
        if let Op::Put { blob, .. } = &row.op {
            *self.blobs.entry(blob.clone()).or_default() += 1;
        }
        let old = self.pending.insert((row.ns.clone(), row.key.clone()), row);
        self.unref_blob(old.as_ref());
        old
    }

    pub fn remove_pending(&mut self, ns: &str, key: &str) -> Option<Row> {
        let old = self.pending.remove(&(ns.to_string(), key.to_string()));
        self.unref_blob(old.as_ref());
        old
    }

    fn unref_blob(&mut self, row: Option<&Row>) {
        if let Some(Row {
            op: Op::Put { blob, .. },
            ..
        }) = row
        {
            if let Some(n) = self.blobs.get_mut(blob) {
                *n -= 1;
                if *n == 0 {
                    self.blobs.remove(blob);
                }
            }
        }
    }

    pub fn blob_in_journal(&self, blob: &str) -> bool {
        self.blobs.contains_key(blob)
    }

    /// The pending value of a key: (staging file, length, metadata and expiration).
    pub fn pending_put(&self, ns: &str, key: &str) -> Option<(String, u64, KeyMeta)> {
        match &self.pending.get(&(ns.to_string(), key.to_string()))?.op {
            Op::Put {
                blob,
                len,
                metadata,
                expiration,
            } => Some((
                blob.clone(),
                *len,
                KeyMeta {
                    metadata: metadata.clone(),
                    expiration: *expiration,
                },
            )),
            Op::Delete => None,
        }
    }

    /// Pending changes of keys under `prefix` in `ns`, in key order.
    pub fn pending_under<'a>(
        &'a self,
        ns: &'a str,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a (String, String), &'a Row)> + 'a {
        self.pending
            .range((ns.to_string(), prefix.to_string())..)
            .take_while(move |((n, k), _)| n == ns && k.starts_with(prefix))
    }

    // ---- listings ----

    /// A fresh listing covering `prefix`: of `prefix` itself or of an ancestor prefix.
    pub fn find_listing(
        &self,
        ns: &str,
        prefix: &str,
        ttl: Duration,
    ) -> Option<Arc<BTreeMap<String, KeyInfo>>> {
        self.listings
            .get(ns)?
            .iter()
            .find(|l| prefix.starts_with(&l.prefix) && l.at.elapsed() < ttl)
            .map(|l| l.keys.clone())
    }

    pub fn put_listing(&mut self, ns: &str, prefix: &str, keys: Arc<BTreeMap<String, KeyInfo>>) {
        let v = self.listings.entry(ns.to_string()).or_default();
        // A listing of `prefix` supersedes listings of prefixes below it.
        v.retain(|l| !l.prefix.starts_with(prefix));
        v.push(Listing {
            prefix: prefix.to_string(),
            keys,
            at: Instant::now(),
        });
    }

    /// Logs, once per key, keys that cannot be shown as paths.
    pub fn note_hidden<'a>(&mut self, ns: &str, keys: impl Iterator<Item = &'a String>) {
        for k in keys {
            if !representable(k) && self.hidden.insert((ns.to_string(), k.clone())) {
                info!("namespace {ns}: key {k:?} cannot be shown as a path and is left out");
            }
        }
    }

    pub fn hidden_count(&self) -> usize {
        self.hidden.len()
    }

    /// Records a key this mount wrote, in every cached listing that covers it.
    pub fn record_put(&mut self, ns: &str, info: KeyInfo) {
        if let Some(v) = self.listings.get_mut(ns) {
            for l in v.iter_mut().filter(|l| info.name.starts_with(&l.prefix)) {
                Arc::make_mut(&mut l.keys).insert(info.name.clone(), info.clone());
            }
        }
    }

    /// Records a key this mount deleted (or found gone).
    pub fn record_delete(&mut self, ns: &str, key: &str) {
        if let Some(v) = self.listings.get_mut(ns) {
            for l in v.iter_mut().filter(|l| key.starts_with(&l.prefix)) {
                if l.keys.contains_key(key) {
                    Arc::make_mut(&mut l.keys).remove(key);
                }
            }
        }
    }

    /// Keeps the directory that held `key` visible after its last key went away, as object-store
    /// mounts do, so `rm -r` can still rmdir it.
    pub fn keep_parent_dir(&mut self, ns: &str, key: &str) {
        if let Some(i) = key.rfind('/') {
            self.local_dirs
                .insert((ns.to_string(), key[..i].to_string()));
        }
    }

    pub fn forget_key(&mut self, ns: &str, key: &str) {
        self.record_delete(ns, key);
    }

    pub fn forget_ns(&mut self, ns: &str) {
        self.listings.remove(ns);
        self.local_dirs.retain(|(n, _)| n != ns);
        self.by_loc.retain(|loc, _| loc.ns() != Some(ns));
    }

    /// After a rename: inodes, staged files and local dirs at or below `src` now live at `dst`.
    /// The inode that `dst` named before (`replaced`) loses its name.
    pub fn move_locs(&mut self, ns: &str, src: &str, dst: &str) {
        let dst_loc = Loc::Key {
            ns: ns.to_string(),
            path: dst.to_string(),
        };
        self.detach(&dst_loc);

        let sub = format!("{src}/");
        let moved: Vec<(Loc, Ino)> = self
            .by_loc
            .iter()
            .filter(|(loc, _)| match loc {
                Loc::Key { ns: n, path } => n == ns && (path == src || path.starts_with(&sub)),
                _ => false,
            })
            .map(|(l, i)| (l.clone(), *i))
            .collect();
        for (loc, ino) in moved {
            self.by_loc.remove(&loc);
            let new_path = format!("{dst}{}", &loc.path()[src.len()..]);
            let new_loc = Loc::Key {
                ns: ns.to_string(),
                path: new_path,
            };
            self.by_loc.insert(new_loc.clone(), ino);
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.loc = new_loc;
            }
        }
        let dirs: Vec<(String, String)> = self
            .local_dirs
            .iter()
            .filter(|(n, p)| n == ns && (p == src || p.starts_with(&sub)))
            .cloned()
            .collect();
        for (n, p) in dirs {
            self.local_dirs.remove(&(n.clone(), p.clone()));
            self.local_dirs
                .insert((n, format!("{dst}{}", &p[src.len()..])));
        }
    }
}
