//! The inode table: inodes (files and directories, not names), the names that lead to them,
//! open handles, files staged for writing, and directories made with mkdir that hold no key
//! yet. Plain data behind the core's `inodes` lock; nothing here waits on the network.

use super::attrs::{Changes, ValueHasher};
use super::names::child_of;
use super::writeback::blob::Blob;
use super::{Handle, Ino, KeyMeta, ROOT_INO};
use hashbrown::HashTable;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    /// A key whose value is the link's target (`--posix-metadata` only).
    Symlink,
}

/// Attributes the adapter turns into a `stat`.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub atime: SystemTime,
    pub ctime: SystemTime,
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

    /// The directory holding this one (the account root holds itself).
    pub fn parent(&self) -> Loc {
        match self {
            Loc::Key { ns, path } => match path.rfind('/') {
                Some(i) => Loc::Key {
                    ns: ns.clone(),
                    path: path[..i].to_string(),
                },
                None => Loc::Ns(ns.clone()),
            },
            _ => Loc::Root,
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
    /// Unlinked or replaced: reachable only through open handles; never uploaded again.
    pub detached: bool,
    /// Entries the kernel holds (lookup, create, mkdir replies less `forget`s).
    pub lookups: u64,
    /// The tick of its entry in `InodeTable::recent` (0: not in it).
    queued: u64,
    pub born: SystemTime,
    /// What this run gave the inode, boxed: most inodes (a walk's) have none, and the table
    /// holds one node per entry the kernel holds.
    local: Option<Box<Local>>,
}

#[derive(Debug, Default)]
struct Local {
    /// Attributes given to this inode in this run (create, chmod, chown, utimens, writes).
    /// A directory keeps them for the mount's life; a file carries them until its content is
    /// recorded, then the attribute store holds them.
    set: Changes,
    /// Last status change of what `set` holds.
    ctime: Option<SystemTime>,
    /// A directory's subdirectory count, and when it was counted: counting walks its listing,
    /// and the kernel asks for a directory's attributes after every entry made in it.
    subdirs: Option<(std::time::Instant, usize)>,
}

const NOTHING_SET: Changes = Changes {
    mode: None,
    uid: None,
    gid: None,
    atime: None,
    mtime: None,
};

impl Node {
    fn new(loc: Loc, kind: Kind) -> Node {
        Node {
            loc,
            kind,
            detached: false,
            lookups: 0,
            queued: 0,
            born: SystemTime::now(),
            local: None,
        }
    }

    fn local(&mut self) -> &mut Local {
        self.local.get_or_insert_with(Box::default)
    }

    /// Attributes given to this inode in this run (see `Local::set`).
    pub fn set(&self) -> &Changes {
        self.local.as_ref().map_or(&NOTHING_SET, |l| &l.set)
    }

    /// Last status change of what [`set`](Self::set) holds.
    pub fn ctime(&self) -> Option<SystemTime> {
        self.local.as_ref().and_then(|l| l.ctime)
    }

    pub fn set_ctime(&mut self, t: SystemTime) {
        self.local().ctime = Some(t);
    }

    /// Takes what was set, leaving nothing (the attribute store holds it from now on).
    pub fn take_set(&mut self) -> Changes {
        let set = self.local.as_mut().map(|l| std::mem::take(&mut l.set));
        set.unwrap_or_default()
    }

    /// Forgets what was set and when.
    pub fn clear_set(&mut self) {
        if let Some(l) = &mut self.local {
            l.set = Changes::default();
            l.ctime = None;
            if l.subdirs.is_none() {
                self.local = None;
            }
        }
    }

    /// A directory's subdirectory count and when it was counted (see `Local::subdirs`).
    pub fn subdirs(&self) -> Option<(std::time::Instant, usize)> {
        self.local.as_ref().and_then(|l| l.subdirs)
    }

    pub fn set_subdirs(&mut self, counted: Option<(std::time::Instant, usize)>) {
        if counted.is_some() || self.local.is_some() {
            self.local().subdirs = counted;
        }
    }

    /// Records attribute changes made now.
    pub fn change(&mut self, c: &Changes) {
        let l = self.local();
        l.set.merge(c);
        l.ctime = Some(SystemTime::now());
    }

    /// A content change (write, truncate, an entry added or removed): new mtime and ctime.
    pub fn touch(&mut self) {
        let now = SystemTime::now();
        let l = self.local();
        l.set.mtime = Some(now);
        l.ctime = Some(now);
    }
}

/// A kernel entry to let go: `name` in directory `parent`, leading to `ino`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColdEntry {
    pub parent: Ino,
    pub name: String,
    pub ino: Ino,
}

/// A file whose whole content is staged locally (in memory, or in the cache dir under an id).
#[derive(Debug)]
pub struct Staged {
    /// The content; a journal row may hold it too (by its name).
    pub blob: Arc<Blob>,
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
    /// The content's value digest so far (up to the offset it reaches), while the file has
    /// been written front to back (as `cp` writes): its close then needs no read-back. None
    /// otherwise.
    pub digest: Option<Box<ValueHasher>>,
}

impl Staged {
    /// Keeps the running digest across a write of `data` at `offset`.
    pub fn wrote(&mut self, offset: u64, data: &[u8]) {
        match &mut self.digest {
            Some(h) if h.len() == offset => h.update(data),
            _ => self.digest = None,
        }
    }

    /// The content's (digest, size), if the running digest covers all of it.
    pub fn known_digest(&self) -> Option<(u64, u64)> {
        self.digest
            .as_ref()
            .filter(|h| h.len() == self.len)
            .map(|h| h.finish())
    }
}

/// Nodes by inode number, boxed: a table slot is 16 bytes however large a node is, and a
/// table of a million slots is half empty after it grows.
type Nodes = HashMap<Ino, Box<Node>>;

/// Inode numbers by the name (`Loc`) their node holds: a hash table of numbers whose
/// entries are compared through the nodes, so no name is stored twice.
#[derive(Default)]
pub struct NameIndex {
    table: HashTable<Ino>,
    hasher: RandomState,
}

impl NameIndex {
    fn hash(&self, loc: &Loc) -> u64 {
        self.hasher.hash_one(loc)
    }

    fn get(&self, nodes: &Nodes, loc: &Loc) -> Option<Ino> {
        let same = |i: &Ino| nodes.get(i).is_some_and(|n| n.loc == *loc);
        self.table.find(self.hash(loc), same).copied()
    }

    /// Indexes `ino` by its node's name, replacing the inode that name led to.
    fn insert(&mut self, nodes: &Nodes, ino: Ino) {
        let loc = &nodes[&ino].loc;
        let hasher = &self.hasher;
        let same = |i: &Ino| nodes.get(i).is_some_and(|n| n.loc == *loc);
        let rehash = |i: &Ino| hasher.hash_one(&nodes[i].loc);
        match self.table.entry(hasher.hash_one(loc), same, rehash) {
            hashbrown::hash_table::Entry::Occupied(mut o) => *o.get_mut() = ino,
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(ino);
            }
        }
    }

    fn remove(&mut self, nodes: &Nodes, loc: &Loc) -> Option<Ino> {
        let same = |i: &Ino| nodes.get(i).is_some_and(|n| n.loc == *loc);
        let found = self.table.find_entry(self.hash(loc), same).ok()?;
        Some(found.remove().0)
    }

    fn shrink(&mut self, nodes: &Nodes) {
        let hasher = &self.hasher;
        let len = self.table.len();
        self.table
            .shrink_to(len * 2, |i: &Ino| hasher.hash_one(&nodes[i].loc));
    }

    fn retain(&mut self, keep: impl FnMut(Ino) -> bool) {
        let mut keep = keep;
        self.table.retain(|i| keep(*i));
    }

    fn inos(&self) -> impl Iterator<Item = Ino> + '_ {
        self.table.iter().copied()
    }
}

pub struct InodeTable {
    nodes: Nodes,
    /// The inode each name leads to, found by the name its node holds (a name is kept once,
    /// in its node: a walk that looks up a million keys holds a million names, not two).
    /// Holds `ino` only while `nodes[ino].loc` is the name it is found by.
    by_loc: NameIndex,
    /// Files open for writing (or truncated), by inode: their whole content, staged locally.
    staged: HashMap<Ino, Staged>,
    /// Open file handles.
    handles: HashMap<u64, Handle>,
    /// Directories made with mkdir that hold no key yet: (namespace, path).
    local_dirs: BTreeSet<(String, String)>,
    /// Files and symlinks the kernel was given entries of, least recently first, as (inode,
    /// tick): the kernel keeps every entry until memory pressure, so the table would hold a
    /// node per key a walk looked up; `cold_entries` picks the oldest to let go. An entry whose
    /// node was looked up again since (its `queued` is a later tick) or freed is stale.
    recent: VecDeque<(Ino, u64)>,
    tick: u64,
    /// Nodes with a live entry in `recent`.
    queued: usize,
    /// Entries `cold_entries` gave out to be let go (for `kvfs status`).
    let_go: u64,
    /// `queued` above which `cold_entries` looks again after a pass that busy entries kept above
    /// its target (0: at its limit).
    recheck: usize,
}

impl InodeTable {
    pub fn new(root: Loc) -> InodeTable {
        let mut st = InodeTable {
            nodes: HashMap::new(),
            by_loc: NameIndex::default(),
            staged: HashMap::new(),
            handles: HashMap::new(),
            local_dirs: BTreeSet::new(),
            recent: VecDeque::new(),
            tick: 0,
            queued: 0,
            let_go: 0,
            recheck: 0,
        };
        st.insert_node(ROOT_INO, root, Kind::Dir);
        st
    }

    pub fn loc(&self, ino: Ino) -> Option<Loc> {
        self.nodes.get(&ino).map(|n| n.loc.clone())
    }

    pub fn node(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(&ino).map(|n| &**n)
    }

    pub fn node_mut(&mut self, ino: Ino) -> Option<&mut Node> {
        self.nodes.get_mut(&ino).map(|n| &mut **n)
    }

    /// The inode of `loc`, made on first sight. Inode numbers stay stable for the mount's life.
    pub fn ino_for(&mut self, loc: Loc, kind: Kind) -> Ino {
        if let Some(ino) = self.by_loc.get(&self.nodes, &loc) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.kind = kind;
            }
            return ino;
        }
        let ino = self.free_ino(&loc);
        self.insert_node(ino, loc, kind);
        ino
    }

    /// The number from the name, or, when another live inode has it (a collision, or the file
    /// that had this name was renamed and kept its number), the next free one.
    fn free_ino(&self, loc: &Loc) -> Ino {
        let mut ino = Self::hashed(loc);
        while ino <= ROOT_INO || self.nodes.contains_key(&ino) {
            ino = ino.wrapping_add(1);
        }
        ino
    }

    /// The inode number `loc` has, or would get: readdir shows it without making an inode, so
    /// a walk that only lists (`ls -f`, `find`) holds no memory per key.
    pub fn peek_ino(&self, loc: &Loc) -> Ino {
        self.by_loc
            .get(&self.nodes, loc)
            .unwrap_or_else(|| self.free_ino(loc))
    }

    /// Inode numbers come from the name (stable across mounts), not from a counter.
    fn hashed(loc: &Loc) -> Ino {
        let (ns, path) = (loc.ns().unwrap_or(""), loc.path());
        super::attrs::digest_extend(super::attrs::digest(ns.as_bytes()) ^ 0xff, path.as_bytes())
    }

    fn insert_node(&mut self, ino: Ino, loc: Loc, kind: Kind) {
        self.nodes.insert(ino, Box::new(Node::new(loc, kind)));
        self.by_loc.insert(&self.nodes, ino);
    }

    pub fn parent_ino(&self, ino: Ino) -> Ino {
        let parent = self.loc(ino).map_or(Loc::Root, |l| l.parent());
        self.by_loc.get(&self.nodes, &parent).unwrap_or(ROOT_INO)
    }

    /// The inode `loc` leads to, if the table holds one.
    pub fn ino_of(&self, loc: &Loc) -> Option<Ino> {
        self.by_loc.get(&self.nodes, loc)
    }

    /// An entry was added to, removed from or renamed in the directory holding `loc`;
    /// `dir` says it may have been a directory (so the subdirectory count is stale).
    pub fn touch_parent(&mut self, loc: &Loc, dir: bool) {
        let parent = self.by_loc.get(&self.nodes, &loc.parent());
        if let Some(n) = parent.and_then(|i| self.nodes.get_mut(&i)) {
            n.touch();
            if dir {
                n.set_subdirs(None);
            }
        }
    }

    /// The inode of `loc`, counted as an entry the kernel now holds (until it forgets it).
    pub fn entry_for(&mut self, loc: Loc, kind: Kind) -> Ino {
        let ino = self.ino_for(loc, kind);
        let file = self.nodes.get_mut(&ino).is_some_and(|n| {
            n.lookups += 1;
            n.kind != Kind::Dir
        });
        // Directories are few (and letting one go would drop every entry below it).
        if file {
            self.enqueue(ino);
        }
        // Entries looked up again leave stale ones behind: sweep them when they outnumber
        // the live ones.
        if self.recent.len() > 2 * self.queued + 4096 {
            let nodes = &self.nodes;
            self.recent
                .retain(|(i, t)| nodes.get(i).is_some_and(|n| n.queued == *t));
        }
        ino
    }

    /// Puts `ino` at the back of `recent` (most recently used).
    fn enqueue(&mut self, ino: Ino) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            if n.queued == 0 {
                self.queued += 1;
            }
            self.tick += 1;
            n.queued = self.tick;
            self.recent.push_back((ino, self.tick));
        }
    }

    /// Kernel entries to let go, least recently looked up first, when more than `limit` files
    /// hold one (down to three quarters of it, so that they go in batches): (parent inode,
    /// name) pairs for the adapter to invalidate. The kernel then forgets them and `forget`
    /// frees their nodes; a name looked up again gets the same inode number from its name.
    /// Never one that anything else refers to — an open handle, staged content, attributes
    /// set in this run, or what `busy` says is pending (the journal's rows): those go to the
    /// back of the queue, and when they keep the count above the target the next pass waits
    /// until a quarter of `limit` more entries were given, so passes stay rare.
    pub fn cold_entries(&mut self, limit: usize, busy: impl Fn(&Loc) -> bool) -> Vec<ColdEntry> {
        if limit == 0 || self.queued <= limit.max(self.recheck) {
            return Vec::new();
        }
        let open: HashSet<Ino> = self.handles.values().map(|h| h.ino).collect();
        let target = limit - limit / 4;
        // One turn of the queue at most.
        let mut turn = self.queued;
        let mut out = Vec::new();
        while self.queued > target && turn > 0 {
            let Some((ino, tick)) = self.recent.pop_front() else {
                break;
            };
            let Some(n) = self.nodes.get_mut(&ino) else {
                continue;
            };
            if n.queued != tick {
                continue;
            }
            turn -= 1;
            n.queued = 0;
            self.queued -= 1;
            let n = &self.nodes[&ino];
            if n.kind == Kind::Dir || n.detached || n.lookups == 0 {
                // No entry to let go (or one that takes a subtree with it).
                continue;
            }
            if !n.set().is_empty()
                || open.contains(&ino)
                || self.staged.contains_key(&ino)
                || busy(&n.loc)
            {
                self.enqueue(ino);
                continue;
            }
            let Some(parent) = self.by_loc.get(&self.nodes, &n.loc.parent()) else {
                continue;
            };
            let path = n.loc.path();
            let name = path.rsplit('/').next().unwrap_or(path);
            out.push(ColdEntry {
                parent,
                name: name.to_string(),
                ino,
            });
        }
        self.recheck = if self.queued > target {
            self.queued + limit / 4
        } else {
            0
        };
        self.let_go += out.len() as u64;
        out
    }

    /// Kernel entries given out to be let go so far.
    pub fn let_go_count(&self) -> u64 {
        self.let_go
    }

    /// Unlinks the inode at `loc`: no name leads to it any more. It lives on for handles
    /// still open, and a staged file of it is never recorded.
    pub fn detach(&mut self, loc: &Loc) {
        let Some(ino) = self.by_loc.remove(&self.nodes, loc) else {
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
        let local_attrs = !n.set().is_empty();
        if n.lookups > 0
            || (local_attrs && !n.detached)
            || self.handles.values().any(|h| h.ino == ino)
        {
            return;
        }
        let loc = &self.nodes[&ino].loc;
        if self.by_loc.get(&self.nodes, loc) == Some(ino) {
            self.by_loc.remove(&self.nodes, loc);
        }
        if self.nodes.remove(&ino).is_some_and(|n| n.queued != 0) {
            self.queued -= 1;
        }
        // A table does not shrink by itself: after the kernel forgot a walk's entries, give
        // back what a quarter of it does not use.
        if self.nodes.capacity() > 4096 && self.nodes.len() < self.nodes.capacity() / 4 {
            self.nodes.shrink_to(self.nodes.len() * 2);
            self.by_loc.shrink(&self.nodes);
            let nodes = &self.nodes;
            self.recent
                .retain(|(i, t)| nodes.get(i).is_some_and(|n| n.queued == *t));
            self.recent.shrink_to(self.recent.len() * 2);
        }
    }

    /// Inodes in the table (for `kvfs status` and tests of `forget`).
    pub fn inode_count(&self) -> usize {
        self.nodes.len()
    }

    /// The staged, not unlinked inode at (ns, path).
    pub fn staged_ino(&self, ns: &str, path: &str) -> Option<Ino> {
        let loc = Loc::Key {
            ns: ns.to_string(),
            path: path.to_string(),
        };
        let ino = self.by_loc.get(&self.nodes, &loc)?;
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

    /// Staged files or mkdir'd directories under `prefix` of `ns`.
    pub fn has_local_under(&self, ns: &str, prefix: &str) -> bool {
        !self.staged_under(ns, prefix).is_empty()
            || self
                .local_dirs
                .iter()
                .any(|(n, p)| n == ns && p.starts_with(prefix))
    }

    /// Whether a local directory or a staged file below `path` makes it a directory.
    pub fn local_below(&self, ns: &str, path: &str) -> bool {
        let below = format!("{path}/");
        let key = (ns.to_string(), path.to_string());
        self.local_dirs.contains(&key)
            || self
                .local_dirs
                .range((ns.to_string(), below.clone())..)
                .next()
                .is_some_and(|(n, p)| n == ns && p.starts_with(&below))
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
    }

    // ---- handles, staged files, local directories ----

    pub fn handle(&self, fh: u64) -> Option<&Handle> {
        self.handles.get(&fh)
    }

    pub fn add_handle(&mut self, fh: u64, h: Handle) {
        self.handles.insert(fh, h);
    }

    pub fn remove_handle(&mut self, fh: u64) -> Option<Handle> {
        self.handles.remove(&fh)
    }

    pub fn handle_count(&self) -> usize {
        self.handles.len()
    }

    /// Handles open on `ino`.
    pub fn handles_of(&self, ino: Ino) -> impl Iterator<Item = &Handle> + '_ {
        self.handles.values().filter(move |h| h.ino == ino)
    }

    pub fn staged(&self, ino: Ino) -> Option<&Staged> {
        self.staged.get(&ino)
    }

    pub fn staged_mut(&mut self, ino: Ino) -> Option<&mut Staged> {
        self.staged.get_mut(&ino)
    }

    pub fn is_staged(&self, ino: Ino) -> bool {
        self.staged.contains_key(&ino)
    }

    pub fn insert_staged(&mut self, ino: Ino, s: Staged) {
        self.staged.insert(ino, s);
    }

    pub fn remove_staged(&mut self, ino: Ino) -> Option<Staged> {
        self.staged.remove(&ino)
    }

    /// Inodes with staged content.
    pub fn staged_inos(&self) -> Vec<Ino> {
        self.staged.keys().copied().collect()
    }

    pub fn add_local_dir(&mut self, ns: &str, path: &str) {
        self.local_dirs.insert((ns.to_string(), path.to_string()));
    }

    pub fn remove_local_dir(&mut self, ns: &str, path: &str) {
        self.local_dirs.remove(&(ns.to_string(), path.to_string()));
    }

    /// Keeps the directory that held `key` visible after its last key went away, as object-store
    /// mounts do, so `rm -r` can still rmdir it.
    pub fn keep_parent_dir(&mut self, ns: &str, key: &str) {
        if let Some(i) = key.rfind('/') {
            self.local_dirs
                .insert((ns.to_string(), key[..i].to_string()));
        }
    }

    pub fn forget_ns(&mut self, ns: &str) {
        self.local_dirs.retain(|(n, _)| n != ns);
        let nodes = &self.nodes;
        self.by_loc
            .retain(|ino| nodes.get(&ino).is_some_and(|n| n.loc.ns() != Some(ns)));
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
        let moved: Vec<Ino> = self
            .by_loc
            .inos()
            .filter(|ino| match self.nodes.get(ino).map(|n| &n.loc) {
                Some(Loc::Key { ns: n, path }) => {
                    n == ns && (path == src || path.starts_with(&sub))
                }
                _ => false,
            })
            .collect();
        // Out of the index under the old names first: it finds entries by their node's name.
        for &ino in &moved {
            let loc = self.nodes[&ino].loc.clone();
            self.by_loc.remove(&self.nodes, &loc);
        }
        for ino in moved {
            let node = self.nodes.get_mut(&ino).unwrap();
            let new_path = format!("{dst}{}", &node.loc.path()[src.len()..]);
            node.loc = Loc::Key {
                ns: ns.to_string(),
                path: new_path,
            };
            // A name that led elsewhere (below a replaced directory) leads here now.
            self.by_loc.insert(&self.nodes, ino);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::attrs::value_digest;

    fn staged() -> Staged {
        Staged {
            blob: Arc::new(Blob::new(
                "b".into(),
                "/nonexistent/b".into(),
                Default::default(),
            )),
            len: 0,
            dirty: true,
            handles: 1,
            meta: KeyMeta::default(),
            remote_exists: false,
            unlinked: false,
            digest: Some(Box::default()),
        }
    }

    fn key(path: &str) -> Loc {
        Loc::Key {
            ns: "n".into(),
            path: path.into(),
        }
    }

    #[test]
    fn names_find_their_inodes_through_renames_and_forgotten_ones_are_freed() {
        let mut t = InodeTable::new(Loc::Root);
        let n = 10_000;
        let inos: Vec<Ino> = (0..n)
            .map(|i| t.entry_for(key(&format!("d/f{i}")), Kind::File))
            .collect();
        let dir = t.entry_for(key("d"), Kind::Dir);
        // The directory moves with everything below it; each name finds the same inode.
        t.move_locs("n", "d", "e");
        for (i, ino) in inos.iter().enumerate() {
            assert_eq!(t.ino_of(&key(&format!("e/f{i}"))), Some(*ino));
            assert_eq!(t.ino_of(&key(&format!("d/f{i}"))), None);
        }
        assert_eq!(t.ino_of(&key("e")), Some(dir));
        // The kernel forgets them: nodes and index entries go, and the tables shrink.
        let before = t.nodes.capacity();
        for ino in inos.iter().chain([&dir]) {
            t.forget(*ino, 1);
        }
        assert_eq!(t.inode_count(), 1);
        assert_eq!(t.by_loc.table.len(), 1, "only the root is indexed");
        assert!(
            t.nodes.capacity() <= before / 4,
            "{} of {before}",
            t.nodes.capacity()
        );
        assert_eq!(t.ino_of(&key("e/f7")), None);
        // A forgotten name gets its number again from the name.
        assert_eq!(
            t.entry_for(key("e/f7"), Kind::File),
            t.peek_ino(&key("e/f7"))
        );
    }

    #[test]
    fn numbers_come_from_names_and_listing_makes_no_inode() {
        let mut t = InodeTable::new(Loc::Root);
        let shown = t.peek_ino(&key("a"));
        assert_eq!(t.inode_count(), 1, "readdir's number needs no inode");
        let a = t.entry_for(key("a"), Kind::File);
        assert_eq!(a, shown);
        // The same name gets the same number in another table (another mount).
        assert_eq!(InodeTable::new(Loc::Root).peek_ino(&key("a")), a);
        // "a" renamed to "b" keeps its number; a new "a" gets another one, and readdir shows
        // that one too.
        t.move_locs("n", "a", "b");
        assert_eq!(t.ino_of(&key("b")), Some(a));
        let shown = t.peek_ino(&key("a"));
        assert_ne!(shown, a);
        assert_eq!(t.entry_for(key("a"), Kind::File), shown);
    }

    #[test]
    fn busy_entries_stay_and_passes_over_them_stay_rare() {
        let mut t = InodeTable::new(Loc::Root);
        let dir = t.entry_for(key("d"), Kind::Dir);
        let inos: Vec<Ino> = (0..12)
            .map(|i| t.entry_for(key(&format!("d/f{i}")), Kind::File))
            .collect();
        // Looked up again: the most recent now.
        t.entry_for(key("d/f0"), Kind::File);
        assert!(
            t.cold_entries(12, |_| false).is_empty(),
            "not above the limit"
        );
        // Above a limit of 8: down to 6, the least recent first, never a busy one.
        let busy = |l: &Loc| l.path() == "d/f1";
        let out = t.cold_entries(8, busy);
        let names: Vec<&str> = out.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["f2", "f3", "f4", "f5", "f6", "f7"]);
        assert!(out.iter().all(|e| e.parent == dir));
        assert_eq!(out[0].ino, inos[2]);
        // Until the kernel forgets them, they are not given out twice.
        assert!(t.cold_entries(8, busy).is_empty());
        for &ino in &inos[2..8] {
            t.forget(ino, 1);
        }
        assert_eq!(t.inode_count(), 2 + 6);
        // Everything busy: one pass finds nothing, and the next waits for a quarter of the
        // limit more entries.
        for i in 20..24 {
            t.entry_for(key(&format!("d/f{i}")), Kind::File);
        }
        assert!(t.cold_entries(8, |_| true).is_empty());
        assert_eq!(t.recheck, 10 + 2);
        t.entry_for(key("d/f30"), Kind::File);
        assert!(
            t.cold_entries(8, |_| false).is_empty(),
            "waits for the recheck"
        );
        t.entry_for(key("d/f31"), Kind::File);
        t.entry_for(key("d/f32"), Kind::File);
        assert_eq!(t.cold_entries(8, |_| false).len(), 13 - 6);
        assert_eq!(t.recheck, 0);
    }

    #[test]
    fn the_running_digest_is_the_content_digest_only_for_front_to_back_writes() {
        let mut s = staged();
        for (off, data) in [(0u64, &b"hello "[..]), (6, b"world")] {
            s.wrote(off, data);
            s.len = s.len.max(off + data.len() as u64);
        }
        assert_eq!(s.known_digest(), Some((value_digest(b"hello world"), 11)));
        // A write elsewhere (an overwrite, a hole) gives up: the close reads the content back.
        s.wrote(0, b"J");
        assert_eq!(s.known_digest(), None);
        let mut s = staged();
        s.wrote(4, b"x");
        s.len = 5;
        assert_eq!(s.known_digest(), None);
    }
}
