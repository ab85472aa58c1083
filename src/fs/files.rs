//! Files: create, open, read, write, close, truncate, unlink, rename.
//!
//! Writes are staged whole (in memory while small, else in a file under the cache dir named by
//! id, never by key: `writeback::blob`). close() records the change in the journal and returns;
//! the uploader sends it later in bulk. Nothing here waits on an upload except fsync.

use super::attrs::{self, Changes, ValueHasher};
use super::inodes::{InodeTable, Loc, Staged};
use super::names::{dir_prefix, join};
use super::writeback::blob::Blob;
use super::writeback::journal::Op;
use super::{
    check_key_len, check_name, Fs, FsError, FsResult, Handle, Ino, KeyMeta, Kind, Owner, SetAttr,
};
use crate::api::limits::MAX_VALUE_BYTES;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Fs {
    pub(super) fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Creates a new, empty file (recorded at close) and opens it for writing.
    /// Creates a new, empty file with `mode` (umask applied) owned by `owner`, and opens it
    /// for writing. It is recorded at close.
    pub async fn create(
        &self,
        parent: Ino,
        name: &str,
        mode: u32,
        owner: Owner,
    ) -> FsResult<(super::Attr, u64)> {
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
        let remote_exists = self.remote_exists(&ns, &path).await?;
        let blob = self.wb.new_blob();
        let mut st = self.inodes.lock().unwrap();
        let loc = Loc::Key { ns, path };
        let ino = st.entry_for(loc.clone(), Kind::File);
        st.touch_parent(&loc, false);
        if let Some(n) = st.node_mut(ino) {
            n.change(&owner.changes(mode));
            n.touch();
        }
        st.insert_staged(
            ino,
            Staged {
                blob,
                len: 0,
                dirty: true,
                handles: 1,
                meta: meta.unwrap_or_default(),
                remote_exists,
                unlinked: false,
                digest: Some(Box::default()),
            },
        );
        let fh = self.new_fh();
        st.add_handle(fh, Handle::writer(ino));
        Ok((self.file_attr(&st, ino, 0), fh))
    }

    /// Opens a file. Writable opens stage the whole value locally (unless truncating).
    pub async fn open(&self, ino: Ino, write: bool, truncate: bool) -> FsResult<u64> {
        let (ns, key) = self.file_loc(ino)?;
        let fh = self.new_fh();
        if !write {
            let staged_file = self.staged_file(ino);
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
            self.inodes.lock().unwrap().add_handle(fh, handle);
            return Ok(fh);
        }
        self.check_writable()?;
        self.stage(ino, &ns, &key, truncate.then_some(0)).await?;
        let mut st = self.inodes.lock().unwrap();
        if let Some(s) = st.staged_mut(ino) {
            s.handles += 1;
        }
        st.add_handle(fh, Handle::writer(ino));
        Ok(fh)
    }

    /// Makes sure `ino` has a staging file holding its content, truncated to `truncate`.
    async fn stage(&self, ino: Ino, ns: &str, key: &str, truncate: Option<u64>) -> FsResult<()> {
        let existing = self.staged_file(ino);
        if existing.is_some() {
            if let Some(len) = truncate {
                let mut st = self.inodes.lock().unwrap();
                self.unshare(&mut st, ino)?;
                if let Some(s) = st.staged(ino) {
                    s.blob.set_len(len)?;
                }
                if let Some(s) = st.staged_mut(ino) {
                    s.len = len;
                    s.dirty = true;
                    s.digest = (len == 0).then(Box::default);
                }
                if let Some(n) = st.node_mut(ino) {
                    n.touch();
                }
            }
            return Ok(());
        }
        let info = self.key_info(ns, key).await?;
        // A pending put may be uploaded while the file stays open: then the server holds it.
        let remote_exists =
            self.remote_exists(ns, key).await? || self.wb.pending_put(ns, key).is_some();
        let mut len = 0;
        let mut digest = Some(Box::default());
        let blob = self.wb.new_blob();
        if truncate != Some(0) {
            let filled = async {
                let bytes = self.value(ns, key).await?.bytes()?;
                blob.write_at(&bytes, 0)?;
                len = bytes.len() as u64;
                digest = Some(Box::new(ValueHasher::of(&bytes)));
                if let Some(t) = truncate.filter(|t| *t != len) {
                    blob.set_len(t)?;
                    len = t;
                    digest = None;
                }
                Ok::<_, FsError>(())
            };
            if let Err(e) = filled.await {
                self.wb.release_blob(blob.name());
                return Err(e);
            }
        }
        let raced = {
            let mut st = self.inodes.lock().unwrap();
            let raced = st.is_staged(ino);
            if !raced {
                if truncate.is_some() {
                    if let Some(n) = st.node_mut(ino) {
                        n.touch();
                    }
                }
                let staged = Staged {
                    blob: blob.clone(),
                    len,
                    dirty: truncate.is_some(),
                    handles: 0,
                    meta: info.as_ref().map(KeyMeta::from).unwrap_or_default(),
                    remote_exists,
                    unlinked: false,
                    digest,
                };
                st.insert_staged(ino, staged);
            }
            raced
        };
        if raced {
            // Another open staged it meanwhile; keep theirs.
            self.wb.release_blob(blob.name());
            return Box::pin(self.stage(ino, ns, key, truncate)).await;
        }
        Ok(())
    }

    fn staged_file(&self, ino: Ino) -> Option<Arc<Blob>> {
        self.inodes
            .lock()
            .unwrap()
            .staged(ino)
            .map(|s| s.blob.clone())
    }

    /// The key of a file that still has a name.
    pub(super) fn file_loc(&self, ino: Ino) -> FsResult<(String, String)> {
        if self.is_detached(ino) {
            return Err(FsError::NotFound);
        }
        match self.loc(ino)? {
            Loc::Key { ns, path } => Ok((ns, path)),
            _ => Err(FsError::IsDir),
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let (value, staged) = {
            let st = self.inodes.lock().unwrap();
            let h = st
                .handle(fh)
                .ok_or(FsError::Invalid("bad file handle".into()))?;
            let staged = st.staged(h.ino).map(|s| s.blob.clone());
            (h.value.clone(), staged.or_else(|| h.staged_file.clone()))
        };
        // Staged content wins: reads see this mount's writes.
        if let Some(blob) = staged {
            return Ok(Bytes::from(blob.read_at(offset, size as usize)?));
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
            // KV cannot hold this value: the file's new content is dropped as if unlinked, so
            // close() records nothing and the key keeps its old value (docs/SEMANTICS.md).
            let mut st = self.inodes.lock().unwrap();
            let ino = st.handle(fh).filter(|h| h.writable).map(|h| h.ino);
            if let Some(s) = ino.and_then(|i| st.staged_mut(i)) {
                s.unlinked = true;
            }
            return Err(FsError::FileTooBig);
        }
        let blob = {
            let mut st = self.inodes.lock().unwrap();
            let h = st
                .handle(fh)
                .ok_or(FsError::Invalid("bad file handle".into()))?;
            if !h.writable {
                return Err(FsError::Invalid("file not open for writing".into()));
            }
            let ino = h.ino;
            self.unshare(&mut st, ino)?;
            let s = st
                .staged(ino)
                .ok_or(FsError::Io("file is not staged".into()))?;
            s.blob.clone()
        };
        blob.write_at(data, offset)?;
        let mut st = self.inodes.lock().unwrap();
        let Some(ino) = st.handle(fh).map(|h| h.ino) else {
            return Ok(data.len() as u32);
        };
        if let Some(s) = st.staged_mut(ino) {
            s.len = s.len.max(end);
            s.dirty = true;
            s.wrote(offset, data);
        }
        if let Some(n) = st.node_mut(ino) {
            n.touch();
        }
        Ok(data.len() as u32)
    }

    /// Gives a staged file content of its own before it changes, when a journal row holds the
    /// current one (a close recorded it while the file stayed open): what a close acknowledged
    /// must not change under the uploader, or after a crash.
    fn unshare(&self, st: &mut InodeTable, ino: Ino) -> FsResult<()> {
        let Some(s) = st.staged_mut(ino) else {
            return Ok(());
        };
        if !self.wb.is_shared(s.blob.name()) {
            return Ok(());
        }
        let copy = self.wb.blob_of(&s.blob.bytes()?)?;
        let old = std::mem::replace(&mut s.blob, copy);
        self.wb.release_blob(old.name());
        Ok(())
    }

    /// close() of one descriptor: records a changed file in the journal. No upload waits here.
    /// Sync: a journal commit, no network, so the adapter answers it on its own thread.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let ino = self.inodes.lock().unwrap().handle(fh).map(|h| h.ino);
        match ino {
            Some(ino) => self.commit(ino),
            None => Ok(()),
        }
    }

    /// fsync(): records the file, then uploads that key and waits for the server's answer.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let ino = self.inodes.lock().unwrap().handle(fh).map(|h| h.ino);
        let Some(ino) = ino else { return Ok(()) };
        if self.is_detached(ino) {
            // Unlinked: nothing of it is ever uploaded, so there is nothing to wait for.
            return Ok(());
        }
        self.commit(ino)?;
        let (ns, key) = self.file_loc(ino)?;
        self.wb.sync_key(&ns, &key).await
    }

    /// The last close of a handle: drops it, and the staging file unless the journal needs it.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let handle = self.inodes.lock().unwrap().remove_handle(fh);
        let Some(handle) = handle else { return Ok(()) };
        if !handle.writable {
            self.inodes.lock().unwrap().drop_if_unused(handle.ino);
            return Ok(());
        }
        let result = self.commit(handle.ino);
        let mut st = self.inodes.lock().unwrap();
        if let Some(s) = st.staged_mut(handle.ino) {
            s.handles = s.handles.saturating_sub(1);
            if s.handles == 0 && (!s.dirty || s.unlinked) {
                self.retire_staged(&mut st, handle.ino);
            }
        }
        st.drop_if_unused(handle.ino);
        result
    }

    /// Records the staged content of `ino` as the pending value of its current key.
    pub(super) fn commit(&self, ino: Ino) -> FsResult<()> {
        let mut st = self.inodes.lock().unwrap();
        let Some(Loc::Key { ns, path }) = st.loc(ino) else {
            return Ok(());
        };
        let Some(s) = st.staged(ino) else {
            return Ok(());
        };
        if !s.dirty || s.unlinked {
            return Ok(());
        }
        let op = Op::Put {
            blob: s.blob.name().to_string(),
            len: s.len,
            metadata: self.with_posix(&st, ino, s.len, s.meta.metadata.clone()),
            expiration: s.meta.expiration,
        };
        let remote = s.remote_exists;
        let blob = s.blob.clone();
        let known = s.known_digest();
        let given = st.node(ino).map(|n| n.set().clone()).unwrap_or_default();
        self.wb.record(&ns, &path, op, remote)?;
        if let Some(s) = st.staged_mut(ino) {
            s.dirty = false;
            // The row may be uploaded any time now: a later commit of this still-open file
            // must not claim the server lacks the key, or its unlink would leave it there.
            s.remote_exists = true;
        }
        drop(st);
        self.drop_markers_above(&ns, &path)?;
        // This mount changed the value: a new mtime, kept while the value stays the same;
        // what was given to the open file (create mode, owner, fchmod, futimens) goes with it.
        // Written front to back, the digest is known already; otherwise read the content back.
        let value = match known {
            Some(v) => v,
            None => {
                let bytes = blob.bytes()?;
                (attrs::value_digest(&bytes), bytes.len() as u64)
            }
        };
        self.attrs.observe_written(&ns, &path, value, &given);
        Ok(())
    }

    /// Forgets the staging of `ino`; its file goes unless a journal row still holds it.
    fn retire_staged(&self, st: &mut InodeTable, ino: Ino) {
        if let Some(s) = st.remove_staged(ino) {
            self.wb.release_blob(s.blob.name());
            // A recorded file's attributes live in the attribute store from now on.
            if !s.dirty && !s.unlinked {
                if let Some(n) = st.node_mut(ino) {
                    n.clear_set();
                }
            }
        }
    }

    // ---- truncate, attributes ---------------------------------------------------------------

    /// setattr: size changes truncate (staged; recorded at close, or at once without a
    /// handle); mode, owner and times are kept — on the inode while it is staged (and carried
    /// into the attribute store when it is recorded), in the attribute store otherwise.
    pub async fn setattr(&self, ino: Ino, req: SetAttr) -> FsResult<super::Attr> {
        let changes = Changes {
            mode: req.mode.map(|m| m & 0o7777),
            uid: req.uid,
            gid: req.gid,
            atime: req.atime,
            mtime: req.mtime,
        };
        if req.size.is_some() || !changes.is_empty() {
            self.check_writable()?;
        }
        let detached = self.is_detached(ino);
        if let Some(size) = req.size {
            if size > MAX_VALUE_BYTES as u64 {
                return Err(FsError::FileTooBig);
            }
            if detached {
                // An unlinked file open for writing: only its staged content changes.
                let file = self.staged_file(ino).ok_or(FsError::NotFound)?;
                file.set_len(size)?;
                let mut st = self.inodes.lock().unwrap();
                if let Some(s) = st.staged_mut(ino) {
                    s.len = size;
                }
                if let Some(n) = st.node_mut(ino) {
                    n.touch();
                }
            } else {
                let (ns, key) = self.file_loc(ino)?;
                self.stage(ino, &ns, &key, Some(size)).await?;
                let open = req.fh.is_some()
                    || self
                        .inodes
                        .lock()
                        .unwrap()
                        .staged(ino)
                        .is_some_and(|s| s.handles > 0);
                if !open {
                    // truncate(2) of a closed file: record it now, as a close would.
                    self.commit(ino)?;
                    let mut st = self.inodes.lock().unwrap();
                    self.retire_staged(&mut st, ino);
                }
            }
        }
        if !changes.is_empty() {
            let file_key = {
                let mut st = self.inodes.lock().unwrap();
                let staged = st.is_staged(ino);
                let node = st.node_mut(ino).ok_or(FsError::NotFound)?;
                // While staged (or detached) the inode's own attributes are what it shows.
                if staged || detached || node.kind == Kind::Dir {
                    node.change(&changes);
                }
                match &node.loc {
                    // A file with a name keeps them in the store, across mounts.
                    Loc::Key { ns, path } if node.kind != Kind::Dir && !detached => {
                        Some((ns.clone(), path.clone()))
                    }
                    _ => None,
                }
            };
            if let Some((ns, key)) = file_key {
                self.attrs.set(&ns, &key, &changes);
                if self.posix() {
                    self.posix_setattr(ino, &ns, &key, &changes).await?;
                }
            } else if !detached {
                self.marker_setattr(ino)?;
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
        let staged_ino = self.inodes.lock().unwrap().staged_ino(&ns, &path);
        match self.entry_kind(&ns, loc.path(), name).await? {
            Some(Kind::Dir) if staged_ino.is_none() => return Err(FsError::IsDir),
            Some(_) => {}
            None if staged_ino.is_some() => {}
            None => return Err(FsError::NotFound),
        }
        let remote = self.remote_exists(&ns, &path).await?;
        self.remote.uncache_value(&ns, &path);
        let mut st = self.inodes.lock().unwrap();
        self.wb.record_delete(&ns, &path, remote)?;
        st.keep_parent_dir(&ns, &path);
        let loc = Loc::Key { ns, path };
        st.touch_parent(&loc, false);
        self.detach(&mut st, &loc);
        if let Loc::Key { ns, path } = &loc {
            self.attrs.remove(ns, path);
        }
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
        let src_staged = self.inodes.lock().unwrap().staged_ino(&ns, &src);
        let src_kind = match self.entry_kind(&ns, from.path(), name).await? {
            Some(k) => k,
            None if src_staged.is_some() => Kind::File,
            None => return Err(FsError::NotFound),
        };
        let dst_kind = self.entry_kind(&ns, to.path(), new_name).await?;
        match (src_kind, dst_kind) {
            (_, Some(_)) if no_replace => return Err(FsError::Exists),
            (Kind::File | Kind::Symlink, Some(Kind::Dir)) => return Err(FsError::IsDir),
            (Kind::Dir, Some(Kind::File | Kind::Symlink)) => return Err(FsError::NotDir),
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
            Kind::File | Kind::Symlink => {
                if let Some(ino) = src_staged {
                    // Open for writing: what it holds now is what moves.
                    self.commit(ino)?;
                }
                self.move_key(&ns, &src, &dst).await?;
            }
            Kind::Dir => {
                let prefix = dir_prefix(&src);
                let staged = self.inodes.lock().unwrap().staged_under(&ns, &prefix);
                for ino in staged {
                    self.commit(ino)?;
                }
                for key in self.keys_under(&ns, &prefix).await? {
                    let new_key = format!("{dst}/{}", &key[prefix.len()..]);
                    check_key_len(&new_key)?;
                    self.move_key(&ns, &key, &new_key).await?;
                }
            }
        }
        let mut st = self.inodes.lock().unwrap();
        let (src_loc, dst_loc) = (
            Loc::Key {
                ns: ns.clone(),
                path: src.clone(),
            },
            Loc::Key {
                ns: ns.clone(),
                path: dst.clone(),
            },
        );
        st.touch_parent(&src_loc, true);
        st.touch_parent(&dst_loc, true);
        // The inode `dst` named keeps what the store said of it (its key's entry now
        // describes the moved file).
        if let Some(old) = st.ino_of(&dst_loc) {
            if st.ino_of(&src_loc) != Some(old) {
                self.keep_attrs(&mut st, old, &ns, &dst);
            }
        }
        st.move_locs(&ns, &src, &dst);
        st.keep_parent_dir(&ns, &src);
        Ok(())
    }

    /// Unlinks the inode at `loc`, keeping the attributes the store held for it.
    fn detach(&self, st: &mut InodeTable, loc: &Loc) {
        if let (Some(ino), Loc::Key { ns, path }) = (st.ino_of(loc), loc) {
            self.keep_attrs(st, ino, ns, path);
        }
        st.detach(loc);
    }

    /// Copies the store's attributes of (ns, key) onto inode `ino`, which is losing that name:
    /// it shows them while it stays open. Its link count changes, so does its ctime.
    fn keep_attrs(&self, st: &mut InodeTable, ino: Ino, ns: &str, key: &str) {
        let stored = self.attrs.current(ns, key);
        if let Some(n) = st.node_mut(ino) {
            if let Some(e) = stored {
                let kept = Changes {
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                    atime: e.atime,
                    mtime: Some(e.mtime),
                };
                // What the inode was given itself (if staged) wins over the store's.
                let own = n.take_set();
                n.change(&kept);
                n.change(&own);
            } else {
                n.set_ctime(std::time::SystemTime::now());
            }
        }
    }

    async fn rename_namespace(&self, name: &str, new_name: &str) -> FsResult<()> {
        let nss = self.remote.namespaces().await?;
        let ns = nss.get(name).ok_or(FsError::NotFound)?;
        if nss.contains_key(new_name) {
            return Err(FsError::Exists);
        }
        self.backend().rename_namespace(&ns.id, new_name).await?;
        self.remote.forget_namespaces();
        Ok(())
    }

    /// Moves one key: the new key is recorded as a put, the old one as a delete. The uploader
    /// sends puts before deletes and holds a namespace's deletes back while any put of it
    /// fails, so the old key never goes before the new one is safe.
    async fn move_key(&self, ns: &str, src: &str, dst: &str) -> FsResult<()> {
        check_key_len(dst)?;
        let dst_remote = self.remote_exists(ns, dst).await?;
        let src_remote = self.remote_exists(ns, src).await?;
        let pending = self.wb.pending_put(ns, src);
        // The staging file the new key's row holds, and whether this call made it.
        let (blob, len, meta, made) = match pending {
            // A pending value moves without a request and without a copy: both rows share it.
            Some((blob, len, meta)) => (blob, len, meta, false),
            None => {
                let info = self.key_info(ns, src).await?.ok_or(FsError::NotFound)?;
                let bytes = self.value(ns, src).await?.bytes()?;
                let blob = self.wb.blob_of(&bytes)?.name().to_string();
                (blob, bytes.len() as u64, KeyMeta::from(&info), true)
            }
        };
        let op = Op::Put {
            blob: blob.clone(),
            len,
            metadata: meta.metadata,
            expiration: meta.expiration,
        };
        let value = self.remote.cached_value(ns, src);
        let recorded = self.wb.record(ns, dst, op, dst_remote);
        if made {
            // The row holds it now (or, if recording failed, nobody does).
            self.wb.release_blob(&blob);
        }
        recorded?;
        self.wb.record_delete(ns, src, src_remote)?;
        if let Some(v) = value {
            if let Ok(b) = v.bytes() {
                self.remote.cache_value(ns, dst, b, v.expiration);
            }
        }
        self.remote.uncache_value(ns, src);
        self.attrs.rename(ns, src, dst);
        self.drop_markers_above(ns, dst)
    }
}
