//! Extended attributes: a key's metadata and expiration, a namespace's id, and the mount's
//! own controls on the root directory (`kvfs status` and `kvfs unmount` use these).

use super::inodes::Loc;
use super::writeback::journal::Op;
use super::{Fs, FsError, FsResult, Ino, KeyMeta};
use crate::api::limits::{self, now_secs};
use serde_json::Value as Json;

pub const METADATA: &str = "user.kv.metadata";
pub const EXPIRATION: &str = "user.kv.expiration";
pub const EXPIRATION_TTL: &str = "user.kv.expiration_ttl";
pub const NAMESPACE_ID: &str = "user.kv.namespace_id";
/// Root only, read: a JSON report of the mount (for `kvfs status`).
pub const STATUS: &str = "user.kvfs.status";
/// Root only, write: upload everything pending; fails with EIO if something could not be.
pub const FLUSH: &str = "user.kvfs.flush";

impl Fs {
    /// Metadata and expiration of a file: staged values win over the listing.
    pub(super) async fn file_meta(&self, ns: &str, key: &str) -> FsResult<KeyMeta> {
        let staged = {
            let st = self.inodes.lock().unwrap();
            st.staged_ino(ns, key)
                .and_then(|ino| st.staged(ino))
                .map(|s| s.meta.clone())
        };
        if let Some(meta) = staged {
            return Ok(meta);
        }
        let info = self.key_info(ns, key).await?.ok_or(FsError::NotFound)?;
        Ok(KeyMeta::from(&info))
    }

    pub async fn getxattr(&self, ino: Ino, name: &str) -> FsResult<Vec<u8>> {
        match (self.loc(ino)?, name) {
            (Loc::Ns(id), NAMESPACE_ID) => Ok(id.into_bytes()),
            (loc, STATUS) if ino == super::ROOT_INO && !matches!(loc, Loc::Key { .. }) => {
                Ok(self.status().to_string().into_bytes())
            }
            (Loc::Key { ns, path }, METADATA | EXPIRATION) if self.is_file(ino) => {
                let meta = self.file_meta(&ns, &path).await?;
                let v = if name == METADATA {
                    self.user_part(meta.metadata).map(|m| m.to_string())
                } else {
                    meta.expiration.map(|e| e.to_string())
                };
                v.map(String::into_bytes).ok_or(FsError::NoData)
            }
            // Only `user.` attributes exist here. Other namespaces (ACLs, security labels) are
            // not supported, which `ls -l` remembers per filesystem instead of asking for
            // two of them per file it lists; the kernel's security.capability check before a
            // write takes it as "none". No request either way.
            _ if !name.starts_with("user.") => Err(FsError::NoXattrs),
            _ => Err(FsError::NoData),
        }
    }

    pub async fn listxattr(&self, ino: Ino) -> FsResult<Vec<String>> {
        match self.loc(ino)? {
            // The namespace id is readable by name but not listed: `rsync -X` would otherwise copy
            // it to backups, and try to remove it from a namespace it restores into.
            Loc::Ns(_) => Ok(Vec::new()),
            Loc::Key { ns, path } if self.is_file(ino) => {
                let meta = self.file_meta(&ns, &path).await?;
                let mut out = Vec::new();
                if self.user_part(meta.metadata).is_some() {
                    out.push(METADATA.to_string());
                }
                if meta.expiration.is_some() {
                    out.push(EXPIRATION.to_string());
                }
                Ok(out)
            }
            _ => Ok(Vec::new()),
        }
    }

    pub async fn setxattr(&self, ino: Ino, name: &str, value: &[u8]) -> FsResult<()> {
        let loc = self.loc(ino)?;
        if name == FLUSH && ino == super::ROOT_INO {
            let failed = self.flush_all(3).await;
            if failed.is_empty() {
                return Ok(());
            }
            return Err(FsError::Io(format!(
                "{} files could not be uploaded",
                failed.len()
            )));
        }
        match (&loc, name) {
            (Loc::Ns(_), NAMESPACE_ID) => return Err(FsError::Perm),
            (Loc::Key { .. }, METADATA | EXPIRATION | EXPIRATION_TTL) if self.is_file(ino) => {}
            _ => return Err(FsError::NotSupported),
        }
        self.check_writable()?;
        let Loc::Key { ns, path } = loc else {
            unreachable!()
        };
        let text = std::str::from_utf8(value)
            .map_err(|_| FsError::Invalid(format!("{name}: value is not UTF-8")))?
            .trim_end_matches(['\0', '\n']);
        let mut meta = self.file_meta(&ns, &path).await?;
        match name {
            METADATA => {
                let json: Json = serde_json::from_str(text)
                    .map_err(|e| FsError::Invalid(format!("{name}: not JSON: {e}")))?;
                let compact = json.to_string();
                limits::check_metadata(&compact).map_err(FsError::TooBig)?;
                // JSON null is no metadata, as KV and every other reader show it.
                let user = Some(json).filter(|j| !j.is_null());
                meta.metadata = self.user_metadata(ino, &ns, &path, user).await?;
            }
            EXPIRATION => {
                let at: i64 = text
                    .trim()
                    .parse()
                    .map_err(|_| FsError::Invalid(format!("{name}: not a number of seconds")))?;
                limits::check_expiration(at, now_secs()).map_err(FsError::Invalid)?;
                meta.expiration = Some(at as u64);
            }
            _ => {
                let ttl: i64 = text
                    .trim()
                    .parse()
                    .map_err(|_| FsError::Invalid(format!("{name}: not a number of seconds")))?;
                limits::check_expiration_ttl(ttl).map_err(FsError::Invalid)?;
                meta.expiration = Some(now_secs() + ttl as u64);
            }
        }
        self.rewrite_meta(ino, &ns, &path, meta).await
    }

    pub async fn removexattr(&self, ino: Ino, name: &str) -> FsResult<()> {
        let loc = self.loc(ino)?;
        match (&loc, name) {
            (Loc::Ns(_), NAMESPACE_ID) => return Err(FsError::Perm),
            (Loc::Key { .. }, METADATA | EXPIRATION) if self.is_file(ino) => {}
            _ => return Err(FsError::NoData),
        }
        self.check_writable()?;
        let Loc::Key { ns, path } = loc else {
            unreachable!()
        };
        let mut meta = self.file_meta(&ns, &path).await?;
        let had = if name == METADATA {
            let user = self.user_part(meta.metadata.take());
            // With --posix-metadata the kvfs member stays.
            meta.metadata = self.user_metadata(ino, &ns, &path, None).await?;
            user
        } else {
            meta.expiration.take().map(Json::from)
        };
        if had.is_none() {
            return Err(FsError::NoData);
        }
        self.rewrite_meta(ino, &ns, &path, meta).await
    }

    fn is_file(&self, ino: Ino) -> bool {
        let st = self.inodes.lock().unwrap();
        st.node(ino).is_some_and(|n| n.kind == super::Kind::File)
    }

    /// Applies new metadata/expiration: an open file uploads it at close; otherwise the value
    /// is written again now with it (KV has no metadata-only update).
    pub(super) async fn rewrite_meta(
        &self,
        ino: Ino,
        ns: &str,
        key: &str,
        meta: KeyMeta,
    ) -> FsResult<()> {
        {
            let mut st = self.inodes.lock().unwrap();
            if let Some(s) = st.staged_mut(ino) {
                s.meta = meta.clone();
                s.dirty = true;
                if s.handles > 0 {
                    return Ok(());
                }
            }
        }
        if self.inodes.lock().unwrap().is_staged(ino) {
            return self.commit(ino);
        }
        // A pending value keeps its staged data; otherwise the current value is staged anew.
        let (blob, len, made) = match self.wb.pending_put(ns, key) {
            Some((blob, len, _)) => (blob, len, false),
            None => {
                let bytes = self.value(ns, key).await?.bytes()?;
                (
                    self.wb.blob_of(&bytes)?.name().to_string(),
                    bytes.len() as u64,
                    true,
                )
            }
        };
        let remote = self.remote_exists(ns, key).await;
        let op = Op::Put {
            blob: blob.clone(),
            len,
            metadata: meta.metadata,
            expiration: meta.expiration,
        };
        let recorded = remote.and_then(|remote| self.wb.record(ns, key, op, remote));
        if made {
            // The journal row holds it now (or, on failure, nobody does).
            self.wb.release_blob(&blob);
        }
        recorded
    }
}
