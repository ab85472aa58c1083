//! In-process harness for the filesystem core: an `Fs` over a `MemBackend` (no kernel, no
//! server), and a small path-based driver that resolves a path by `lookup` from the root and
//! then calls the inode API as the kernel would. Errors are errno values, as a process sees them.

#![allow(dead_code)] // each test binary uses its own part of it

use kvfs::backend::mem::MemBackend;
use kvfs::backend::KvBackend;
use kvfs::fs::{xattr, Attr, ColdEntry, Fs, FsConfig, FsError, Kind, Owner, SetAttr, ROOT_INO};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// What a failed call returns to a process.
pub type Errno = i32;
pub type R<T> = Result<T, Errno>;

pub const OWNER: Owner = Owner { uid: 0, gid: 0 };

/// Fruitless upload rounds a flush that must succeed may take: more than the upload faults a
/// test queues (a round uses up at least one).
pub const FLUSH_ROUNDS: u32 = 200;

fn errno(e: FsError) -> Errno {
    e.errno()
}

thread_local! {
    /// The entries the kernel would hold, per inode: one per lookup, create and mkdir answered
    /// (a test thread drives one core at a time).
    static ENTRIES: RefCell<BTreeMap<u64, u64>> = RefCell::default();
}

fn entered(a: Attr) -> Attr {
    ENTRIES.with(|e| *e.borrow_mut().entry(a.ino).or_default() += 1);
    a
}

thread_local! {
    /// Whether `lookup` lets go of the entries the core gives out, as the adapter and the
    /// kernel do (set by [`Core::evicting`]), and those given out by the last lookup: the
    /// kernel forgets an inode only once the call that was using it is done, so they are
    /// dropped when the next lookup begins.
    static AUTO_DROP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static TO_DROP: RefCell<Vec<ColdEntry>> = const { RefCell::new(Vec::new()) };
}

/// lookup, counted as an entry the kernel holds.
pub async fn lookup(fs: &Fs, parent: u64, name: &str) -> Result<Attr, FsError> {
    if AUTO_DROP.get() {
        forget_entries(fs, &TO_DROP.take());
    }
    let a = fs.lookup(parent, name).await.map(entered);
    if AUTO_DROP.get() {
        TO_DROP.set(fs.entries_to_drop());
    }
    a
}

/// The kernel drops each entry and forgets its inode with every lookup it counted.
fn forget_entries(fs: &Fs, entries: &[ColdEntry]) {
    for e in entries {
        let held = ENTRIES.with(|m| m.borrow_mut().remove(&e.ino)).unwrap_or(0);
        assert!(held > 0, "{e:?}: the kernel holds no entry of it");
        fs.forget(e.ino, held);
    }
}

/// What the kernel does with the entries the core lets go now (`Fs::entries_to_drop`): drops
/// them and forgets their inodes. Returns them in the core's order.
pub fn drop_entries(fs: &Fs) -> Vec<ColdEntry> {
    let batch = fs.entries_to_drop();
    forget_entries(fs, &batch);
    batch
}

/// The kernel drops every entry it holds (as under memory pressure, or `drop_caches`): one
/// `forget` per inode with its count.
pub fn forget_all(fs: &Fs) {
    TO_DROP.take();
    for (ino, n) in ENTRIES.with(|e| std::mem::take(&mut *e.borrow_mut())) {
        fs.forget(ino, n);
    }
}

/// A mount's core over one namespace of a shared `MemBackend`, with its cache dir; `reopen`
/// makes a new core on the same cache dir and backend (a remount, or a restart after a crash).
pub struct Core {
    pub backend: Arc<MemBackend>,
    pub ns: String,
    pub cfg: FsConfig,
    fs: Option<Fs>,
    // Last: the cache dir outlives the core that uses it.
    _dir: tempfile::TempDir,
}

impl Core {
    /// A fresh backend with one namespace titled `title`, shown as the root; `metadata_ttl`
    /// zero, so out-of-band changes show at once.
    pub fn new(title: &str) -> Core {
        let backend = Arc::new(MemBackend::new());
        let ns = backend.add_namespace(title).unwrap();
        Core::on(backend, ns, Duration::ZERO)
    }

    /// A core over namespace `ns` of `backend`, with a new (cold) cache dir.
    pub fn on(backend: Arc<MemBackend>, ns: String, metadata_ttl: Duration) -> Core {
        // tmpfs when there is one: thousands of journals and attribute stores are made.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .unwrap();
        let cfg = FsConfig {
            root_namespace: Some(ns.clone()),
            read_only: false,
            cache_dir: dir.path().to_path_buf(),
            cache_size: 64 << 20,
            metadata_ttl,
            expiration_ttl: None,
            write_delay: Duration::from_secs(10),
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
            posix_metadata: false,
            max_requests: 16,
            max_entries: 0,
        };
        AUTO_DROP.set(false);
        let mut core = Core {
            backend,
            ns,
            cfg,
            fs: None,
            _dir: dir,
        };
        core.reopen();
        core
    }

    /// The same core, letting go of kernel entries past `limit` files at every lookup, as a
    /// mount does with `--max-entries` (the kernel forgets them at once).
    pub fn evicting(mut self, limit: usize) -> Core {
        self.cfg.max_entries = limit;
        AUTO_DROP.set(true);
        self.reopen();
        self
    }

    /// The same core, but showing the whole account (namespaces as directories) at the root.
    pub fn at_account_root(mut self) -> Core {
        self.cfg.root_namespace = None;
        self.reopen();
        self
    }

    pub fn fs(&self) -> &Fs {
        self.fs.as_ref().expect("a core is mounted")
    }

    /// Drops the core as it is (nothing flushed: a crash if nothing was), then starts a new
    /// one on the same cache dir and backend, which loads what the journal holds. The kernel's
    /// entries of the old one are gone with it (inode numbers start again).
    pub fn reopen(&mut self) {
        self.close();
        self.fs =
            Some(Fs::new(self.backend.clone() as Arc<dyn KvBackend>, self.cfg.clone()).unwrap());
    }

    /// Drops the core as it is (a crash), leaving its cache dir to be looked at: the journal
    /// and the attribute store are opened in exclusive mode while a core runs.
    pub fn close(&mut self) {
        drop(self.fs.take());
        ENTRIES.with(|e| e.borrow_mut().clear());
        TO_DROP.take();
    }

    /// Unmount and mount again: `flush_all` (which must leave nothing), then `reopen`.
    pub async fn remount(&mut self) {
        let left = self.fs().flush_all(FLUSH_ROUNDS).await;
        assert!(left.is_empty(), "unmount left {left:?}");
        self.reopen();
    }

    /// The live keys of the namespace with value and metadata, read directly (not counted).
    pub fn remote(&self) -> BTreeMap<String, (Vec<u8>, Option<serde_json::Value>)> {
        self.backend
            .keys(&self.ns)
            .into_iter()
            .map(|k| {
                let e = self.backend.peek(&self.ns, &k).unwrap();
                (k, (e.value.to_vec(), e.metadata))
            })
            .collect()
    }
}

/// The directory part of a path ("" for the root).
pub fn parent(p: &str) -> &str {
    p.rfind('/').map_or("", |i| &p[..i])
}

fn name(p: &str) -> &str {
    p.rfind('/').map_or(p, |i| &p[i + 1..])
}

/// Resolves `path` ("" is the root) by lookups from the root, as the kernel walks a path.
pub async fn resolve(fs: &Fs, path: &str) -> R<Attr> {
    let mut attr = fs.getattr(ROOT_INO).await.map_err(errno)?;
    if path.is_empty() {
        return Ok(attr);
    }
    for seg in path.split('/') {
        if attr.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        attr = lookup(fs, attr.ino, seg).await.map_err(errno)?;
    }
    Ok(attr)
}

/// The inode of the directory holding `path`, and the last name of `path`.
pub async fn dir_of<'p>(fs: &Fs, path: &'p str) -> R<(u64, &'p str)> {
    let dir = resolve(fs, parent(path)).await?;
    if dir.kind != Kind::Dir {
        return Err(libc::ENOTDIR);
    }
    Ok((dir.ino, name(path)))
}

/// open(2) of a file for writing (`O_WRONLY`, with `O_CREAT` when `create`), `O_TRUNC` when
/// `truncate`: a lookup, then `open`, or `create` when the name is missing.
pub async fn open_write(fs: &Fs, path: &str, create: bool, truncate: bool) -> R<u64> {
    let (dir, name) = dir_of(fs, path).await?;
    match lookup(fs, dir, name).await {
        Ok(a) if a.kind == Kind::Dir => Err(libc::EISDIR),
        Ok(a) => fs.open(a.ino, true, truncate).await.map_err(errno),
        Err(e) if e.errno() == libc::ENOENT && create => fs
            .create(dir, name, 0o644, OWNER)
            .await
            .map(|(a, fh)| {
                entered(a);
                fh
            })
            .map_err(errno),
        Err(e) => Err(e.errno()),
    }
}

/// open(2) of a file for reading.
pub async fn open_read(fs: &Fs, path: &str) -> R<u64> {
    let a = resolve(fs, path).await?;
    if a.kind == Kind::Dir {
        return Err(libc::EISDIR);
    }
    fs.open(a.ino, false, false).await.map_err(errno)
}

/// close(2): flush, then the release that follows the last close.
pub fn close(fs: &Fs, fh: u64) -> R<()> {
    let flushed = fs.flush(fh).map_err(errno);
    let released = fs.release(fh).map_err(errno);
    flushed.and(released)
}

/// pwrite(2); a write of nothing never reaches the filesystem.
pub fn pwrite(fs: &Fs, fh: u64, offset: u64, data: &[u8]) -> R<()> {
    if data.is_empty() {
        return Ok(());
    }
    let n = fs.write(fh, offset, data).map_err(errno)?;
    assert_eq!(n as usize, data.len(), "short write");
    Ok(())
}

/// Everything a handle reads, from offset 0 to the end.
pub fn read_fh(fs: &Fs, fh: u64) -> R<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let chunk = fs.read(fh, out.len() as u64, 4096).map_err(errno)?;
        if chunk.is_empty() {
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
    }
}

/// `fs::write`: open with O_CREAT|O_TRUNC, write, close.
pub async fn write_file(fs: &Fs, path: &str, data: &[u8]) -> R<()> {
    let fh = open_write(fs, path, true, true).await?;
    let written = pwrite(fs, fh, 0, data);
    close(fs, fh).and(written)
}

/// `fs::read`: open, read to the end, close.
pub async fn read_file(fs: &Fs, path: &str) -> R<Vec<u8>> {
    let fh = open_read(fs, path).await?;
    let data = read_fh(fs, fh);
    close(fs, fh).and(data)
}

pub async fn mkdir(fs: &Fs, path: &str) -> R<()> {
    let (dir, name) = dir_of(fs, path).await?;
    fs.mkdir(dir, name, 0o755, OWNER)
        .await
        .map(|a| {
            entered(a);
        })
        .map_err(errno)
}

pub async fn unlink(fs: &Fs, path: &str) -> R<()> {
    let (dir, name) = dir_of(fs, path).await?;
    fs.unlink(dir, name).await.map_err(errno)
}

pub async fn rmdir(fs: &Fs, path: &str) -> R<()> {
    let (dir, name) = dir_of(fs, path).await?;
    fs.rmdir(dir, name).await.map_err(errno)
}

/// rename(2), with the checks the kernel makes before it asks the filesystem: the source must
/// exist; a directory cannot move below itself (EINVAL) nor onto one of its ancestors
/// (ENOTEMPTY); a name renamed to itself is left alone.
pub async fn rename(fs: &Fs, from: &str, to: &str) -> R<()> {
    let (src_dir, src_name) = dir_of(fs, from).await?;
    lookup(fs, src_dir, src_name).await.map_err(errno)?;
    if to.starts_with(&format!("{from}/")) {
        return Err(libc::EINVAL);
    }
    let (dst_dir, dst_name) = dir_of(fs, to).await?;
    if from.starts_with(&format!("{to}/")) {
        return Err(libc::ENOTEMPTY);
    }
    if from == to {
        return Ok(());
    }
    fs.rename(src_dir, src_name, dst_dir, dst_name, false)
        .await
        .map_err(errno)
}

/// truncate(2): a setattr of the size without a handle.
pub async fn truncate(fs: &Fs, path: &str, len: u64) -> R<()> {
    let a = resolve(fs, path).await?;
    let req = SetAttr {
        size: Some(len),
        ..SetAttr::default()
    };
    fs.setattr(a.ino, req).await.map(drop).map_err(errno)
}

/// ftruncate(2) on an open handle.
pub async fn ftruncate(fs: &Fs, path: &str, fh: u64, len: u64) -> R<()> {
    let a = resolve(fs, path).await?;
    let req = SetAttr {
        size: Some(len),
        fh: Some(fh),
        ..SetAttr::default()
    };
    fs.setattr(a.ino, req).await.map(drop).map_err(errno)
}

pub async fn set_metadata(fs: &Fs, path: &str, json: &str) -> R<()> {
    let a = resolve(fs, path).await?;
    fs.setxattr(a.ino, xattr::METADATA, json.as_bytes())
        .await
        .map_err(errno)
}

/// `ls -lR`: readdir, then lookup and getattr of every entry, directories in order (each
/// listed, then its subdirectories). Returns every file's path and attributes.
pub async fn ls_lr(fs: &Fs) -> Vec<(String, Attr)> {
    let mut out = Vec::new();
    let mut todo = vec![(ROOT_INO, String::new())];
    while let Some((ino, rel)) = todo.pop() {
        let mut subdirs = Vec::new();
        for e in fs.readdir(ino).await.unwrap() {
            if e.name == "." || e.name == ".." {
                continue;
            }
            let path = if rel.is_empty() {
                e.name.clone()
            } else {
                format!("{rel}/{}", e.name)
            };
            let a = lookup(fs, ino, &e.name).await.unwrap();
            let a = fs.getattr(a.ino).await.unwrap();
            if a.kind == Kind::Dir {
                subdirs.push((a.ino, path));
            } else {
                out.push((path, a));
            }
        }
        todo.extend(subdirs.into_iter().rev());
    }
    out
}

/// A file as a walk finds it: its content and its `user.kv.metadata`, if any.
pub type Found = (Vec<u8>, Option<serde_json::Value>);

/// `ls -lR` then `cat` of every file: readdir, lookup and getattr of every entry, then every
/// file read. Checks that each entry's kind and size agree between readdir, lookup, getattr and
/// the bytes read. Returns the files and the directories below the root.
pub async fn walk(fs: &Fs) -> (BTreeMap<String, Found>, BTreeSet<String>) {
    let (mut files, mut dirs) = (BTreeMap::new(), BTreeSet::new());
    let mut todo = vec![(ROOT_INO, String::new())];
    while let Some((ino, rel)) = todo.pop() {
        let entries = fs
            .readdir(ino)
            .await
            .unwrap_or_else(|e| panic!("readdir {rel:?}: {e}"));
        for e in entries
            .into_iter()
            .filter(|e| e.name != "." && e.name != "..")
        {
            let path = if rel.is_empty() {
                e.name.clone()
            } else {
                format!("{rel}/{}", e.name)
            };
            let a = lookup(fs, ino, &e.name)
                .await
                .unwrap_or_else(|err| panic!("lookup of listed {path:?}: {err}"));
            assert_eq!(a.kind, e.kind, "{path}: kind in readdir and lookup");
            if a.kind == Kind::Dir {
                dirs.insert(path.clone());
                todo.push((a.ino, path));
                continue;
            }
            let attr = fs
                .getattr(a.ino)
                .await
                .unwrap_or_else(|err| panic!("stat {path:?}: {err}"));
            let fh = fs
                .open(a.ino, false, false)
                .await
                .unwrap_or_else(|err| panic!("open {path:?}: {err}"));
            let data = read_fh(fs, fh).unwrap_or_else(|err| panic!("read {path:?}: errno {err}"));
            close(fs, fh).unwrap();
            assert_eq!(
                attr.size,
                data.len() as u64,
                "{path}: size in stat and bytes read"
            );
            let meta = match fs.getxattr(a.ino, xattr::METADATA).await {
                Ok(v) => Some(serde_json::from_slice(&v).unwrap()),
                Err(e) if e.errno() == libc::ENODATA => None,
                Err(e) => panic!("getxattr {path:?}: {e}"),
            };
            files.insert(path, (data, meta));
        }
    }
    (files, dirs)
}
