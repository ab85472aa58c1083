//! The thin fuser adapter: each callback hands its work to the core and replies.
//! Callbacks that may need the network run as tokio tasks that own the reply; local reads and
//! writes of staged data are answered on the spot.

use crate::fs::error::Severity;
use crate::fs::{Attr, ColdEntry, DirEntry, Fs, FsError, FsResult, Kind, Owner, SetAttr};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};
use tracing::{debug, info, warn};

pub struct KvFuse {
    fs: Arc<Fs>,
    rt: tokio::runtime::Handle,
    ttl: Duration,
    /// Directory snapshots taken at opendir, so offsets stay valid while entries change.
    dirs: Arc<Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>>,
    next_dir: Mutex<u64>,
    /// Where kernel entries to let go are sent (see [`EntryDropper`]); None: kept.
    drop_tx: Option<mpsc::Sender<Vec<ColdEntry>>>,
}

/// Invalidates the kernel entries the core lets go (`Fs::entries_to_drop`), on a thread of
/// its own: the kernel takes the directory's lock to invalidate an entry, and holds it while
/// a lookup in that directory waits for its reply, so a FUSE thread must never send it.
pub struct EntryDropper(mpsc::Receiver<Vec<ColdEntry>>);

impl EntryDropper {
    /// Starts the thread; it ends when the adapter is dropped (the session ended).
    pub fn start(self, notifier: fuser::Notifier) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("kvfs-entries".into())
            .spawn(move || {
                for batch in self.0 {
                    for ColdEntry { parent, name, .. } in batch {
                        // Gone already (ENOENT) is ignored by fuser; anything else means the
                        // session is ending.
                        if let Err(e) = notifier.inval_entry(INodeNo(parent), OsStr::new(&name)) {
                            debug!("letting go of entry {name:?}: {e}");
                            return;
                        }
                    }
                }
            })
            .map(|_| ())
    }
}

/// Every reply type can carry an errno.
trait ReplyError: Send + 'static {
    fn fail(self, e: Errno);
}

macro_rules! reply_error {
    ($($t:ty),*) => {$(
        impl ReplyError for $t {
            fn fail(self, e: Errno) {
                self.error(e)
            }
        }
    )*};
}
reply_error!(
    ReplyAttr,
    ReplyEntry,
    ReplyEmpty,
    ReplyOpen,
    ReplyCreate,
    ReplyData,
    ReplyWrite,
    ReplyXattr,
    ReplyDirectory,
    ReplyDirectoryPlus
);

/// Bytes of one READDIRPLUS entry: the entry's attributes (128), the dirent header (24) and the
/// name, padded to 8.
fn direntplus_size(name: &str) -> usize {
    (152 + name.len()).next_multiple_of(8)
}

/// The kernel's READDIRPLUS buffer is never smaller than a page.
const DIRENTPLUS_BUDGET: usize = 4096;

fn errno(op: &str, what: &dyn std::fmt::Display, e: &FsError) -> Errno {
    match e.severity() {
        Severity::Trouble => warn!("{op} {what}: {e}"),
        Severity::Refused => info!("{op} {what}: refused: {e}"),
        Severity::Routine => debug!("{op} {what}: {e}"),
    }
    Errno::from_i32(e.errno())
}

fn to_file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The process making a file or directory owns it.
fn owner(req: &Request) -> Owner {
    Owner {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// Attributes sent with `.` and `..` in READDIRPLUS, which the kernel does not use.
fn dot_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl KvFuse {
    pub fn new(fs: Arc<Fs>, rt: tokio::runtime::Handle) -> KvFuse {
        let ttl = fs.config().metadata_ttl;
        KvFuse {
            fs,
            rt,
            ttl,
            dirs: Default::default(),
            next_dir: Mutex::new(1),
            drop_tx: None,
        }
    }

    /// Lets cold kernel entries go once the session runs (`EntryDropper::start`).
    pub fn entry_dropper(&mut self) -> EntryDropper {
        let (tx, rx) = mpsc::channel();
        self.drop_tx = Some(tx);
        EntryDropper(rx)
    }

    /// Hands the entries the core lets go now to the dropper's thread (after a call that
    /// gave the kernel entries: lookup, create, readdirplus).
    fn drop_cold_entries(&self) {
        if let Some(tx) = &self.drop_tx {
            let batch = self.fs.entries_to_drop();
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
        }
    }

    /// Runs `work`; replies with `ok` on success, or the errno (logged) on failure.
    ///
    /// Most calls are answered from memory (cached listings and values, a journal commit), so
    /// `work` is polled once here, on the FUSE thread: a call that completes is answered
    /// without waking a runtime worker (two context switches per call, most of a `cp -r`'s
    /// daemon time). One that has to wait (a request, a fetch another call is making) moves,
    /// as it is, to a runtime task, which polls it again with its own waker.
    fn run<T, R, F>(
        &self,
        op: &'static str,
        what: String,
        reply: R,
        work: F,
        ok: impl FnOnce(R, T) + Send + 'static,
    ) where
        T: Send + 'static,
        R: ReplyError,
        F: Future<Output = FsResult<T>> + Send + 'static,
    {
        let answer = move |reply: R, result: FsResult<T>| match result {
            Ok(v) => ok(reply, v),
            Err(e) => reply.fail(errno(op, &what, &e)),
        };
        // Timers and spawns inside `work` need the runtime's context.
        let _context = self.rt.enter();
        let mut work = Box::pin(work);
        let mut cx = Context::from_waker(Waker::noop());
        match work.as_mut().poll(&mut cx) {
            Poll::Ready(result) => answer(reply, result),
            Poll::Pending => {
                self.rt.spawn(async move { answer(reply, work.await) });
            }
        }
    }
}

/// A name from the kernel as UTF-8, or a reply with the errno given and a return.
macro_rules! utf8_or_reply {
    ($name:expr, $reply:expr, $e:pat => $errno:expr) => {
        match name_str($name) {
            Ok(n) => n,
            Err($e) => return $reply.error($errno),
        }
    };
}

/// A name from the kernel as UTF-8 (key names are UTF-8), or EINVAL.
fn name_str(name: &OsStr) -> Result<String, Errno> {
    name.to_str().map(str::to_string).ok_or(Errno::EINVAL)
}

impl Filesystem for KvFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // O_TRUNC arrives with open() instead of as a separate truncate that would upload.
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        // Entries with their attributes when the kernel sees a walk stat what it lists.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str().map(str::to_string) else {
            return reply.error(Errno::ENOENT);
        };
        let (fs, ttl) = (self.fs.clone(), self.ttl);
        self.run(
            "lookup",
            name.clone(),
            reply,
            async move { fs.lookup(parent.0, &name).await },
            move |r, a| {
                // Attributes without a known size must not be cached: stat then asks again.
                let attr_ttl = if a.provisional { Duration::ZERO } else { ttl };
                r.entry_with_ttls(&attr_ttl, &ttl, &to_file_attr(&a), Generation(0))
            },
        );
        self.drop_cold_entries();
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        // Plain bookkeeping under a std mutex: no hop to the runtime.
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (fs, ttl) = (self.fs.clone(), self.ttl);
        self.run(
            "getattr",
            format!("inode {}", ino.0),
            reply,
            async move { fs.getattr(ino.0).await },
            move |r, a| r.attr(&ttl, &to_file_attr(&a)),
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (fs, ttl) = (self.fs.clone(), self.ttl);
        let req = SetAttr {
            size,
            fh: fh.map(|f| f.0),
            mode,
            uid,
            gid,
            atime: atime.map(time),
            mtime: mtime.map(time),
        };
        self.run(
            "setattr",
            format!("inode {}", ino.0),
            reply,
            async move { fs.setattr(ino.0, req).await },
            move |r, a| r.attr(&ttl, &to_file_attr(&a)),
        );
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let name = utf8_or_reply!(name, reply, e => e);
        let (fs, ttl) = (self.fs.clone(), self.ttl);
        let (mode, owner) = (mode & !umask, owner(req));
        self.run(
            "mkdir",
            name.clone(),
            reply,
            async move { fs.mkdir(parent.0, &name, mode, owner).await },
            move |r, a| r.entry(&ttl, &to_file_attr(&a), Generation(0)),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = utf8_or_reply!(name, reply, e => e);
        let fs = self.fs.clone();
        self.run(
            "unlink",
            name.clone(),
            reply,
            async move { fs.unlink(parent.0, &name).await },
            |r, ()| r.ok(),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = utf8_or_reply!(name, reply, e => e);
        let fs = self.fs.clone();
        self.run(
            "rmdir",
            name.clone(),
            reply,
            async move { fs.rmdir(parent.0, &name).await },
            |r, ()| r.ok(),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let name = utf8_or_reply!(link_name, reply, e => e);
        // A target is a key's value: any bytes would do, but the tools show UTF-8.
        let target = utf8_or_reply!(target.as_os_str(), reply, e => e);
        let (fs, ttl, owner) = (self.fs.clone(), self.ttl, owner(req));
        self.run(
            "symlink",
            name.clone(),
            reply,
            async move { fs.symlink(parent.0, &name, &target, owner).await },
            move |r, a| r.entry(&ttl, &to_file_attr(&a), Generation(0)),
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = self.fs.clone();
        self.run(
            "readlink",
            format!("inode {}", ino.0),
            reply,
            async move { fs.readlink(ino.0).await },
            |r, target| r.data(&target),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = match (name_str(name), name_str(newname)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return reply.error(Errno::EINVAL),
        };
        let flags = flags.bits();
        if flags & libc::RENAME_EXCHANGE != 0 || flags & libc::RENAME_WHITEOUT != 0 {
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags & libc::RENAME_NOREPLACE != 0;
        let fs = self.fs.clone();
        let what = format!("{name} -> {newname}");
        self.run(
            "rename",
            what,
            reply,
            async move {
                fs.rename(parent.0, &name, newparent.0, &newname, no_replace)
                    .await
            },
            |r, ()| r.ok(),
        );
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let truncate = flags.0 & libc::O_TRUNC != 0;
        let fs = self.fs.clone();
        self.run(
            "open",
            format!("inode {}", ino.0),
            reply,
            async move {
                let fh = fs.open(ino.0, write, truncate).await?;
                Ok((fh, fs.size_corrected(ino.0)))
            },
            move |r, (fh, direct)| {
                // The kernel would stop reading at the size it was told before the value came.
                let mut flags = if direct {
                    FopenFlags::FOPEN_DIRECT_IO
                } else {
                    FopenFlags::empty()
                };
                // A read-only handle has nothing to commit at close (a writer's own close
                // commits its writes): the kernel skips the FLUSH, one round trip of five per
                // file that `cat` or rsync reads.
                if !write {
                    flags |= FopenFlags::FOPEN_NOFLUSH;
                }
                r.opened(FileHandle(fh), flags)
            },
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno("read", &format!("handle {}", fh.0), &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno("write", &format!("handle {}", fh.0), &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // A journal commit, no network: answered here, without a hop to the runtime.
        match self.fs.flush(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("close", &format!("handle {}", fh.0), &e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.release(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("release", &format!("handle {}", fh.0), &e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.run(
            "fsync",
            format!("handle {}", fh.0),
            reply,
            async move { fs.fsync(fh.0).await },
            |r, ()| r.ok(),
        );
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        let dirs = self.dirs.clone();
        let fh = {
            let mut n = self.next_dir.lock().unwrap();
            *n += 1;
            *n
        };
        self.run(
            "opendir",
            format!("inode {}", ino.0),
            reply,
            async move { fs.readdir(ino.0).await },
            move |r, entries| {
                dirs.lock().unwrap().insert(fh, Arc::new(entries));
                r.opened(FileHandle(fh), FopenFlags::empty())
            },
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dirs = self.dirs.lock().unwrap();
        let Some(entries) = dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), (i + 1) as u64, file_type(e.kind), &e.name) {
                break;
            }
        }
        reply.ok();
    }

    /// readdir with each entry's attributes, so that a walk that stats what it lists (rsync, or
    /// `ls -l` of a directory read before) needs no LOOKUP per entry. The kernel asks for it
    /// (READDIRPLUS_AUTO) for a directory's first chunk and after lookups in it. Each entry
    /// returned counts as a lookup, so only as many entries are looked up as surely fit.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = self.dirs.lock().unwrap().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let (fs, ttl) = (self.fs.clone(), self.ttl);
        self.run(
            "readdirplus",
            format!("inode {}", ino.0),
            reply,
            async move {
                let mut out = Vec::new();
                let mut used = 0;
                for (i, e) in entries.iter().enumerate().skip(offset as usize) {
                    used += direntplus_size(&e.name);
                    if used > DIRENTPLUS_BUDGET {
                        break;
                    }
                    let next = (i + 1) as u64;
                    if e.name == "." || e.name == ".." {
                        // The kernel takes no reference for these and ignores their attributes.
                        out.push((next, e.name.clone(), e.ino, None));
                        continue;
                    }
                    match fs.lookup(ino.0, &e.name).await {
                        Ok(a) => out.push((next, e.name.clone(), a.ino, Some(a))),
                        // Gone since the listing: left out, as a listing now would, and it
                        // takes no room (an empty reply would end the directory).
                        Err(FsError::NotFound) => used -= direntplus_size(&e.name),
                        // The kernel asks again from here.
                        Err(_) if !out.is_empty() => break,
                        Err(err) => return Err(err),
                    }
                }
                Ok(out)
            },
            move |mut r, out| {
                for (next, name, ino, attr) in out {
                    let (attr, ttl) = match attr {
                        // Without a known size the entry is not cached at all: a stat looks
                        // it up again (the kernel takes one TTL for entry and attributes).
                        Some(a) if a.provisional => (to_file_attr(&a), Duration::ZERO),
                        Some(a) => (to_file_attr(&a), ttl),
                        // `.` and `..`, with the inode numbers readdir gives them.
                        None => (dot_attr(ino), Duration::ZERO),
                    };
                    if r.add(INodeNo(ino), next, &name, &ttl, &attr, Generation(0)) {
                        // Cannot happen within the budget; an entry lost here would keep
                        // its lookup count (the inode lingers until unmount).
                        warn!("readdirplus: reply buffer full before the budget");
                        break;
                    }
                }
                r.ok()
            },
        );
        // Each entry returned is one the kernel now holds, as after a lookup.
        self.drop_cold_entries();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let name = utf8_or_reply!(name, reply, _ => Errno::ENOTSUP);
        let fs = self.fs.clone();
        let value = value.to_vec();
        let what = format!("{name} on inode {}", ino.0);
        self.run(
            "setxattr",
            what,
            reply,
            async move { fs.setxattr(ino.0, &name, &value).await },
            |r, ()| r.ok(),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = utf8_or_reply!(name, reply, _ => Errno::ENODATA);
        let fs = self.fs.clone();
        let what = format!("{name} on inode {}", ino.0);
        self.run(
            "getxattr",
            what,
            reply,
            async move { fs.getxattr(ino.0, &name).await },
            move |r, v| reply_xattr(r, size, &v),
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let fs = self.fs.clone();
        self.run(
            "listxattr",
            format!("inode {}", ino.0),
            reply,
            async move { fs.listxattr(ino.0).await },
            move |r, names| {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(n.as_bytes());
                    buf.push(0);
                }
                reply_xattr(r, size, &buf)
            },
        );
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = utf8_or_reply!(name, reply, _ => Errno::ENODATA);
        let fs = self.fs.clone();
        let what = format!("{name} on inode {}", ino.0);
        self.run(
            "removexattr",
            what,
            reply,
            async move { fs.removexattr(ino.0, &name).await },
            |r, ()| r.ok(),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let name = utf8_or_reply!(name, reply, e => e);
        let (fs, ttl) = (self.fs.clone(), self.ttl);
        let (mode, owner) = (mode & !umask, owner(req));
        self.run(
            "create",
            name.clone(),
            reply,
            async move { fs.create(parent.0, &name, mode, owner).await },
            move |r, (a, fh)| {
                r.created(
                    &ttl,
                    &to_file_attr(&a),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                )
            },
        );
        self.drop_cold_entries();
    }
}

/// getxattr/listxattr protocol: size 0 asks for the length; too small a buffer is ERANGE.
fn reply_xattr(r: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        r.size(data.len() as u32)
    } else if data.len() > size as usize {
        r.error(Errno::ERANGE)
    } else {
        r.data(data)
    }
}
