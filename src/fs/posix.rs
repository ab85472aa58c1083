//! `--posix-metadata`: file type, mode, owner, mtime and size kept in each key's KV metadata,
//! so a backup restores with them anywhere (another machine, a fresh cache dir), symlinks and
//! empty directories included.
//!
//! The metadata object of a key gets one reserved member, [`MEMBER`], holding a compact object
//! (at most 94 bytes with its name):
//! `"kvfs":{"t":"f","m":420,"u":0,"g":0,"n":1700000000123456789,"s":12}` — type (`f` file,
//! `l` symlink, `d` directory marker), permission bits, uid, gid, mtime in nanoseconds since the
//! epoch, and the value's size. The value stays the file's bytes (a symlink's: its target).
//!
//! The user's part of the metadata is everything else: `user.kv.metadata` shows and sets only
//! that. Metadata that is not a JSON object (a string, a number, an array) is the user's as it
//! is: kvfs never wraps or rewrites it, so other KV clients keep reading exactly what was set;
//! such a key simply carries no member and behaves as without the flag. The same goes for
//! an object whose `kvfs` member kvfs cannot read, and for a user's part so large that the
//! member would push the whole past KV's 1024 bytes (`setxattr` refuses that with E2BIG).
//!
//! An empty directory is a marker key `dir/` (empty value, type `d`); it is never shown as a
//! file and goes away when a key is written below it or the directory is removed.

use super::attrs::{Changes, Entry};
use super::inodes::{InodeTable, Loc};
use super::names::representable;
use super::remote::{parent_prefix, Listed};
use super::writeback::journal::Op;
use super::{Attr, Fs, FsError, FsResult, Ino, KeyMeta, Kind, Owner};
use crate::api::limits::MAX_METADATA_BYTES;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::warn;

/// The reserved member of a key's metadata object.
pub const MEMBER: &str = "kvfs";

/// What the reserved member records of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posix {
    pub kind: Kind,
    /// Permission bits (`0o7777`), without the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Nanoseconds since the epoch (negative before it).
    pub mtime_ns: i64,
    pub size: u64,
}

impl Posix {
    pub fn to_json(&self) -> Json {
        let t = match self.kind {
            Kind::File => "f",
            Kind::Symlink => "l",
            Kind::Dir => "d",
        };
        json!({"t": t, "m": self.mode, "u": self.uid, "g": self.gid, "n": self.mtime_ns, "s": self.size})
    }

    /// The member's value, or None when it is not one kvfs wrote.
    pub fn from_json(v: &Json) -> Option<Posix> {
        let o = v.as_object()?;
        let num = |k: &str| o.get(k).and_then(Json::as_u64);
        let kind = match o.get("t")?.as_str()? {
            "f" => Kind::File,
            "l" => Kind::Symlink,
            "d" => Kind::Dir,
            _ => return None,
        };
        Some(Posix {
            kind,
            mode: u32::try_from(num("m")?).ok()? & 0o7777,
            uid: u32::try_from(num("u")?).ok()?,
            gid: u32::try_from(num("g")?).ok()?,
            mtime_ns: o.get("n")?.as_i64()?,
            size: num("s")?,
        })
    }

    pub fn mtime(&self) -> SystemTime {
        let d = Duration::from_nanos(self.mtime_ns.unsigned_abs());
        if self.mtime_ns >= 0 {
            UNIX_EPOCH + d
        } else {
            UNIX_EPOCH - d
        }
    }

    /// What a file or symlink shows (`attr.kind`, permission bits, owner, mtime, size).
    fn of(attr: &Attr) -> Posix {
        Posix {
            kind: attr.kind,
            mode: attr.perm as u32 & 0o7777,
            uid: attr.uid,
            gid: attr.gid,
            mtime_ns: nanos(attr.mtime),
            size: attr.size,
        }
    }

    /// `changes` (chmod, chown, utimens) applied.
    fn changed(mut self, c: &Changes) -> Posix {
        self.mode = c.mode.map_or(self.mode, |m| m & 0o7777);
        self.uid = c.uid.unwrap_or(self.uid);
        self.gid = c.gid.unwrap_or(self.gid);
        self.mtime_ns = c.mtime.map_or(self.mtime_ns, nanos);
        self
    }
}

/// Nanoseconds since the epoch, negative before it.
fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

/// Splits a key's metadata into the user's part and kvfs's member. An object left empty by
/// taking the member out is no metadata of the user's.
pub fn split(metadata: Option<&Json>) -> (Option<Json>, Option<Posix>) {
    let Some(m) = metadata else {
        return (None, None);
    };
    let Some(posix) = m
        .as_object()
        .and_then(|o| o.get(MEMBER))
        .and_then(Posix::from_json)
    else {
        return (Some(m.clone()), None);
    };
    let mut user = m.as_object().cloned().unwrap_or_default();
    user.remove(MEMBER);
    (
        (!user.is_empty()).then_some(Json::Object(user)),
        Some(posix),
    )
}

/// The user's part with kvfs's member added. A user's part that is not an object, or holds a
/// `kvfs` member of its own, stays as it is (without the member).
pub fn join(user: Option<&Json>, posix: Option<&Posix>) -> Option<Json> {
    let Some(p) = posix else {
        return user.cloned();
    };
    match user {
        None => Some(Json::Object(Map::from_iter([(MEMBER.into(), p.to_json())]))),
        Some(Json::Object(o)) if !o.contains_key(MEMBER) => {
            let mut o = o.clone();
            o.insert(MEMBER.into(), p.to_json());
            Some(Json::Object(o))
        }
        Some(other) => Some(other.clone()),
    }
}

/// The directory an empty-directory marker key stands for (`a/b/` → `a/b`).
pub fn marker_dir(key: &str) -> Option<&str> {
    key.strip_suffix('/').filter(|d| representable(d))
}

fn fits(metadata: &Option<Json>) -> bool {
    metadata
        .as_ref()
        .is_none_or(|m| m.to_string().len() <= MAX_METADATA_BYTES)
}

/// State of the mode kept by the core.
#[derive(Default)]
pub struct PosixState {
    /// Keys whose value's size differs from the size recorded in their member (another client
    /// changed the value): (recorded, actual), by (namespace, key). Logged once each.
    corrected: Mutex<HashMap<(String, String), (u64, u64)>>,
}

impl Fs {
    pub(super) fn posix(&self) -> bool {
        self.cfg.posix_metadata
    }

    /// Keys shown in directories: those that can be paths, and with the flag the markers of
    /// empty directories (as directories).
    pub(super) fn visible(&self, key: &str) -> bool {
        representable(key) || (self.posix() && marker_dir(key).is_some())
    }

    /// The member of a key as this mount knows it without a request: its pending value's,
    /// else a fresh cached listing's.
    fn posix_known(&self, ns: &str, key: &str) -> Option<Posix> {
        if !self.posix() {
            return None;
        }
        if let Some(row) = self.wb.pending(ns, key) {
            return match row.op {
                Op::Put { metadata, .. } => split(metadata.as_ref()).1,
                Op::Delete => None,
            };
        }
        let listing = self.remote.cached_listing(ns, &parent_prefix(key))?;
        split(listing.get(key)?.metadata()).1
    }

    /// The kind of a key that is not a directory: a symlink when its member says so.
    pub(super) fn key_kind(&self, ns: &str, key: &str, info: Option<&Listed>) -> Kind {
        if !self.posix() {
            return Kind::File;
        }
        let posix = match (self.wb.is_pending(ns, key), info) {
            (false, Some(i)) => split(i.metadata()).1,
            _ => self.posix_known(ns, key),
        };
        match posix.map(|p| p.kind) {
            Some(Kind::Symlink) => Kind::Symlink,
            _ => Kind::File,
        }
    }

    /// What kvfs keeps of a key's attributes: with the flag its member (the atime and ctime
    /// set in this cache dir added), else the attribute store's entry.
    pub(super) fn stored_attrs(&self, ns: &str, key: &str) -> Option<Entry> {
        let local = self.attrs.current(ns, key);
        let Some(p) = self.posix_known(ns, key) else {
            return local;
        };
        let mtime = p.mtime();
        Some(Entry {
            digest: 0,
            digest_kind: Default::default(),
            size: p.size,
            mtime,
            ctime: local.as_ref().map_or(mtime, |e| e.ctime),
            atime: local.and_then(|e| e.atime),
            mode: Some(p.mode),
            uid: Some(p.uid),
            gid: Some(p.gid),
        })
    }

    /// The member of a directory's marker, for its attributes.
    pub(super) fn marker_posix(&self, loc: &Loc) -> Option<Posix> {
        match loc {
            Loc::Key { ns, path } => self
                .posix_known(ns, &format!("{path}/"))
                .filter(|p| p.kind == Kind::Dir),
            _ => None,
        }
    }

    /// The size of a key from its member (or the corrected size), when the flag is on.
    pub(super) async fn posix_size(&self, ns: &str, key: &str) -> FsResult<Option<u64>> {
        if !self.posix() {
            return Ok(None);
        }
        if let Some(v) = self.remote.fresh_value(ns, key, false) {
            return Ok(Some(v.len()));
        }
        let info = self.key_info(ns, key).await?;
        let Some(p) = info.and_then(|i| split(i.metadata.as_ref()).1) else {
            return Ok(None);
        };
        let corrected = self.posix_state.corrected.lock().unwrap();
        Ok(Some(
            match corrected.get(&(ns.to_string(), key.to_string())) {
                Some(&(recorded, actual)) if recorded == p.size => actual,
                _ => p.size,
            },
        ))
    }

    /// A value was read: if its size is not the one its member records, the real size is
    /// shown from now on, and that is logged (once).
    pub(super) fn check_size(&self, ns: &str, key: &str, actual: u64) {
        let Some(p) = self.posix_known(ns, key) else {
            return;
        };
        if p.size == actual || self.wb.is_pending(ns, key) {
            return;
        }
        let k = (ns.to_string(), key.to_string());
        let mut corrected = self.posix_state.corrected.lock().unwrap();
        if corrected.insert(k, (p.size, actual)) != Some((p.size, actual)) {
            warn!(
                "namespace {ns}: key {key:?} records size {} in its metadata but its value has \
                 {actual} bytes (changed by another client); showing {actual}",
                p.size
            );
        }
    }

    /// Whether the size the kernel was given for `ino` may be wrong (its value's size is not
    /// the recorded one): reads then bypass the kernel's cache, which stops at that size.
    pub fn size_corrected(&self, ino: Ino) -> bool {
        if !self.posix() {
            return false;
        }
        let Some(Loc::Key { ns, path }) = self.inodes.lock().unwrap().loc(ino) else {
            return false;
        };
        self.posix_state
            .corrected
            .lock()
            .unwrap()
            .contains_key(&(ns, path))
    }

    /// The metadata to write for inode `ino` (a file or symlink of `len` bytes): `metadata`
    /// with the member set to what the inode shows now. Without room for it (the user's part
    /// is too large), the user's metadata goes alone, and that is logged.
    pub(super) fn with_posix(
        &self,
        st: &InodeTable,
        ino: Ino,
        len: u64,
        metadata: Option<Json>,
    ) -> Option<Json> {
        if !self.posix() {
            return metadata;
        }
        let posix = Posix::of(&self.file_attr(st, ino, len));
        let user = split(metadata.as_ref()).0;
        let full = join(user.as_ref(), Some(&posix));
        if fits(&full) {
            full
        } else {
            warn!("inode {ino}: no room for the kvfs metadata member next to the user's metadata");
            user
        }
    }

    /// New user metadata for a file: with the flag, the member (as the file shows now) is kept
    /// next to it; a `kvfs` member of the user's own is refused, and so is a whole over 1024
    /// bytes (E2BIG).
    pub(super) async fn user_metadata(
        &self,
        ino: Ino,
        ns: &str,
        key: &str,
        user: Option<Json>,
    ) -> FsResult<Option<Json>> {
        if !self.posix() {
            return Ok(user);
        }
        if let Some(Json::Object(o)) = &user {
            if o.contains_key(MEMBER) {
                return Err(FsError::Invalid(format!(
                    "metadata member {MEMBER:?} is reserved by --posix-metadata"
                )));
            }
        }
        let len = self.file_size(ns, key).await?;
        let posix = Posix::of(&self.file_attr(&self.inodes.lock().unwrap(), ino, len));
        let full = join(user.as_ref(), Some(&posix));
        if !fits(&full) {
            let n = full.map_or(0, |m| m.to_string().len());
            return Err(FsError::TooBig(format!(
                "metadata with the kvfs member would be {n} bytes, over {MAX_METADATA_BYTES}"
            )));
        }
        Ok(full)
    }

    /// The user's part of a key's metadata (all of it without the flag).
    pub(super) fn user_part(&self, metadata: Option<Json>) -> Option<Json> {
        if self.posix() {
            split(metadata.as_ref()).0
        } else {
            metadata
        }
    }

    /// chmod, chown or utimens of a file or symlink that has a name: its member changes, so
    /// the key is written again (KV has no metadata-only update). A file open for writing
    /// takes them along at close.
    pub(super) async fn posix_setattr(
        &self,
        ino: Ino,
        ns: &str,
        key: &str,
        changes: &Changes,
    ) -> FsResult<()> {
        let meta = self.file_meta(ns, key).await?;
        let len = self.file_size(ns, key).await?;
        let posix = {
            let st = self.inodes.lock().unwrap();
            Posix::of(&self.file_attr(&st, ino, len)).changed(changes)
        };
        let (user, recorded) = split(meta.metadata.as_ref());
        if recorded == Some(posix) {
            // Nothing the member holds changed (e.g. only the atime): no write.
            return Ok(());
        }
        let full = join(user.as_ref(), Some(&posix));
        let metadata = if fits(&full) { full } else { user };
        self.rewrite_meta(
            ino,
            ns,
            key,
            KeyMeta {
                metadata,
                expiration: meta.expiration,
            },
        )
        .await
    }

    // ---- symlinks ---------------------------------------------------------------------------

    /// A symlink: a key whose value is `target`, with type `l` in its member.
    pub async fn symlink(
        &self,
        parent: Ino,
        name: &str,
        target: &str,
        owner: Owner,
    ) -> FsResult<Attr> {
        if !self.posix() {
            return Err(FsError::Perm);
        }
        self.check_writable()?;
        let dir = self.loc(parent)?;
        if let Some(ns) = dir.ns() {
            if self.entry_kind(ns, dir.path(), name).await?.is_some() {
                return Err(FsError::Exists);
            }
        }
        let (attr, fh) = self.create(parent, name, 0o777, owner).await?;
        if let Some(n) = self.inodes.lock().unwrap().node_mut(attr.ino) {
            n.kind = Kind::Symlink;
        }
        let written = self.write(fh, 0, target.as_bytes());
        let released = self.release(fh);
        written?;
        released?;
        self.getattr(attr.ino).await
    }

    pub async fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let kind = self.inodes.lock().unwrap().node(ino).map(|n| n.kind);
        if kind != Some(Kind::Symlink) {
            return Err(FsError::Invalid("not a symlink".into()));
        }
        let (ns, key) = self.file_loc(ino)?;
        Ok(self.value(&ns, &key).await?.bytes()?.to_vec())
    }

    // ---- empty-directory markers ------------------------------------------------------------

    /// Records the marker of directory `ino` (at `path`) with its attributes now.
    pub(super) fn record_marker(
        &self,
        st: &InodeTable,
        ino: Ino,
        ns: &str,
        path: &str,
    ) -> FsResult<()> {
        let attr = self.dir_attr(st, ino, Some(0));
        let posix = Posix {
            kind: Kind::Dir,
            size: 0,
            ..Posix::of(&attr)
        };
        let key = format!("{path}/");
        let remote = self
            .remote
            .cached_listing(ns, &key)
            .is_some_and(|l| l.contains_key(key.as_str()))
            || self.wb.pending(ns, &key).is_some_and(|r| r.remote);
        let blob = self.wb.new_blob().name().to_string();
        let op = Op::Put {
            blob: blob.clone(),
            len: 0,
            metadata: join(None, Some(&posix)),
            expiration: None,
        };
        let recorded = self.wb.record(ns, &key, op, remote);
        self.wb.release_blob(&blob);
        recorded?;
        self.drop_markers_above(ns, &key)
    }

    /// Whether directory `path` has a marker (remote or pending).
    fn has_marker(&self, ns: &str, path: &str) -> bool {
        let key = format!("{path}/");
        match self.wb.pending(ns, &key).map(|r| r.op) {
            Some(Op::Put { .. }) => true,
            Some(Op::Delete) => false,
            None => self
                .remote
                .cached_listing(ns, &key)
                .is_some_and(|l| l.contains_key(key.as_str())),
        }
    }

    /// A directory's attributes changed: its marker, if it has one, records them.
    pub(super) fn marker_setattr(&self, ino: Ino) -> FsResult<()> {
        if !self.posix() {
            return Ok(());
        }
        let st = self.inodes.lock().unwrap();
        match st.loc(ino) {
            Some(Loc::Key { ns, path }) if self.has_marker(&ns, &path) => {
                self.record_marker(&st, ino, &ns, &path)
            }
            _ => Ok(()),
        }
    }

    /// rmdir: the directory's marker goes.
    pub(super) async fn drop_marker(&self, ns: &str, path: &str) -> FsResult<()> {
        if !self.posix() {
            return Ok(());
        }
        let key = format!("{path}/");
        if self.key_info(ns, &key).await?.is_some() {
            let remote = self.remote_exists(ns, &key).await?;
            self.wb.record_delete(ns, &key, remote)?;
        }
        Ok(())
    }

    /// A key was recorded: the markers of the directories above it go (they are not empty).
    /// Markers this mount cannot see without a request stay; a marker in a directory with
    /// keys is invisible and harmless.
    pub(super) fn drop_markers_above(&self, ns: &str, key: &str) -> FsResult<()> {
        if !self.posix() {
            return Ok(());
        }
        let base = key.strip_suffix('/').unwrap_or(key);
        for (i, _) in base.match_indices('/') {
            let marker = &base[..=i];
            if self.has_marker(ns, &base[..i]) {
                let remote = self.wb.pending(ns, marker).is_none_or(|r| r.remote);
                self.wb.record_delete(ns, marker, remote)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_is_compact_and_round_trips() {
        let p = Posix {
            kind: Kind::File,
            mode: 0o7777,
            uid: u32::MAX,
            gid: u32::MAX,
            mtime_ns: i64::MAX,
            size: 25 * 1024 * 1024,
        };
        let full = join(None, Some(&p)).unwrap();
        // The worst case, member name included: well under the 100 bytes aimed for.
        let text = full.to_string();
        assert!(text.len() <= 100, "{} bytes: {text}", text.len());
        assert_eq!(split(Some(&full)), (None, Some(p)));
        let old = Posix {
            mtime_ns: -1_500_000_000,
            ..p
        };
        assert_eq!(old.mtime(), UNIX_EPOCH - Duration::from_millis(1500));
        assert_eq!(Posix::from_json(&old.to_json()), Some(old));
    }

    #[test]
    fn the_users_part_stays_the_users() {
        let p = Posix {
            kind: Kind::Symlink,
            mode: 0o777,
            uid: 1,
            gid: 2,
            mtime_ns: 3,
            size: 4,
        };
        let user = json!({"a": 1, "b": [1, 2]});
        let full = join(Some(&user), Some(&p)).unwrap();
        assert_eq!(full["a"], 1);
        assert_eq!(split(Some(&full)), (Some(user), Some(p)));
        // Not an object, or a `kvfs` member kvfs did not write: the user's, as it is.
        for other in [json!("text"), json!([1]), json!(7), json!({"kvfs": "mine"})] {
            assert_eq!(join(Some(&other), Some(&p)), Some(other.clone()));
            assert_eq!(split(Some(&other)), (Some(other.clone()), None));
        }
        assert_eq!(split(None), (None, None));
    }

    #[test]
    fn markers() {
        assert_eq!(marker_dir("a/b/"), Some("a/b"));
        assert_eq!(marker_dir("a/b"), None);
        assert_eq!(marker_dir("a//"), None);
        assert_eq!(marker_dir("/"), None);
    }
}
