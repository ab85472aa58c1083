//! Staged content: the bytes of a file open for writing, or of a pending put.
//!
//! Small content lives in memory and is journaled inline (in the journal's row), so a `cp -r`
//! of small files creates no file on the local disk per key: creating, writing, reading back
//! and deleting one staging file per key was most of the copy's time (ext4 inode churn).
//! Content past [`SPILL_BYTES`], or past the mount's memory budget for staged content, moves to
//! a staging file named by the blob's id (never by key) and is journaled by that name.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Content above this size is staged in a file.
pub const SPILL_BYTES: u64 = 1 << 20;
/// At most this much staged content is held in memory at once, across all blobs; past it new
/// content goes to files.
pub const MEMORY_BUDGET: u64 = 64 << 20;

/// Bytes of staged content held in memory, shared by the blobs of one write-back.
#[derive(Debug, Default)]
pub struct Budget(AtomicU64);

impl Budget {
    /// Takes `n` bytes of the budget if they fit.
    fn take(&self, n: u64) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|t| *t <= MEMORY_BUDGET)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn used(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

enum Body {
    /// In memory; the budget holds `bytes.len()` for it.
    Mem(Vec<u8>),
    /// In the staging file `path`; `len` is the content's length.
    File { file: File, len: u64 },
}

/// Staged content, in memory or in a staging file. Once its last holder let go (`discard`),
/// the file is deleted with the blob; a blob dropped without that (the mount ends with changes
/// still pending) leaves its file for the journal of the next mount.
pub struct Blob {
    name: String,
    path: PathBuf,
    budget: Arc<Budget>,
    body: RwLock<Body>,
    discarded: AtomicBool,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("name", &self.name)
            .field("len", &self.len())
            .field("in_memory", &self.in_memory())
            .finish()
    }
}

impl Blob {
    /// A new, empty blob in memory; `path` is where it goes if it spills.
    pub(crate) fn new(name: String, path: PathBuf, budget: Arc<Budget>) -> Blob {
        Blob {
            name,
            path,
            budget,
            body: RwLock::new(Body::Mem(Vec::new())),
            discarded: AtomicBool::new(false),
        }
    }

    /// A blob over an existing staging file (the journal of an earlier run named it).
    pub(super) fn open_file(name: String, path: PathBuf, budget: Arc<Budget>) -> io::Result<Blob> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let len = file.metadata()?.len();
        Ok(Blob {
            name,
            path,
            budget,
            body: RwLock::new(Body::File { file, len }),
            discarded: AtomicBool::new(false),
        })
    }

    /// No holder needs it any more: its staging file goes when the last reader drops it.
    pub fn discard(&self) {
        self.discarded.store(true, Ordering::Release);
    }

    /// The id the journal and the open files refer to it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> u64 {
        match &*self.body.read().unwrap() {
            Body::Mem(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn in_memory(&self) -> bool {
        matches!(&*self.body.read().unwrap(), Body::Mem(_))
    }

    /// The content, if it is held in memory (what the journal stores inline).
    pub fn inline(&self) -> Option<Vec<u8>> {
        match &*self.body.read().unwrap() {
            Body::Mem(b) => Some(b.clone()),
            Body::File { .. } => None,
        }
    }

    /// The staging file opened again, to be read from the start; None while in memory. The
    /// content it shows does not change while a journal row holds the blob (writers copy it
    /// first), and stays readable after the blob is discarded.
    pub fn reopen(&self) -> Option<io::Result<File>> {
        match &*self.body.read().unwrap() {
            Body::File { .. } => Some(File::open(&self.path)),
            Body::Mem(_) => None,
        }
    }

    /// The whole content.
    pub fn bytes(&self) -> io::Result<Vec<u8>> {
        match &*self.body.read().unwrap() {
            Body::Mem(b) => Ok(b.clone()),
            Body::File { file, len } => {
                let mut buf = vec![0; *len as usize];
                file.read_exact_at(&mut buf, 0)?;
                Ok(buf)
            }
        }
    }

    /// Up to `size` bytes from `offset` (fewer at the end).
    pub fn read_at(&self, offset: u64, size: usize) -> io::Result<Vec<u8>> {
        let body = self.body.read().unwrap();
        let len = match &*body {
            Body::Mem(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        };
        if offset >= len {
            return Ok(Vec::new());
        }
        let n = (size as u64).min(len - offset) as usize;
        match &*body {
            Body::Mem(b) => Ok(b[offset as usize..offset as usize + n].to_vec()),
            Body::File { file, .. } => {
                let mut buf = vec![0; n];
                file.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            }
        }
    }

    /// Writes `data` at `offset`, growing the content (with zeros in any gap).
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + data.len() as u64;
        let mut body = self.body.write().unwrap();
        self.make_room(&mut body, end)?;
        match &mut *body {
            Body::Mem(b) => {
                if (b.len() as u64) < end {
                    b.resize(end as usize, 0);
                }
                b[offset as usize..end as usize].copy_from_slice(data);
            }
            Body::File { file, len } => {
                file.write_all_at(data, offset)?;
                *len = (*len).max(end);
            }
        }
        Ok(())
    }

    /// Truncates or extends (with zeros) the content to `new_len`.
    pub fn set_len(&self, new_len: u64) -> io::Result<()> {
        let mut body = self.body.write().unwrap();
        self.make_room(&mut body, new_len)?;
        match &mut *body {
            Body::Mem(b) => {
                let old = b.len() as u64;
                b.resize(new_len as usize, 0);
                if new_len < old {
                    b.shrink_to(new_len as usize);
                    self.budget.give(old - new_len);
                }
            }
            Body::File { file, len } => {
                file.set_len(new_len)?;
                *len = new_len;
            }
        }
        Ok(())
    }

    /// Before the content grows to `end`: takes the budget for it in memory, or moves it to the
    /// staging file when it would pass the spill size or the budget.
    fn make_room(&self, body: &mut Body, end: u64) -> io::Result<()> {
        let Body::Mem(b) = body else { return Ok(()) };
        let old = b.len() as u64;
        if end <= old || (end <= SPILL_BYTES && self.budget.take(end - old)) {
            return Ok(());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&self.path)?;
        file.write_all_at(b, 0)?;
        self.budget.give(old);
        *body = Body::File { file, len: old };
        Ok(())
    }
}

impl Drop for Blob {
    fn drop(&mut self) {
        match &*self.body.read().unwrap() {
            Body::Mem(b) => self.budget.give(b.len() as u64),
            Body::File { .. } if self.discarded.load(Ordering::Acquire) => {
                let _ = std::fs::remove_file(&self.path);
            }
            Body::File { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(dir: &std::path::Path, name: &str, budget: &Arc<Budget>) -> Blob {
        Blob::new(name.into(), dir.join(name), budget.clone())
    }

    #[test]
    fn small_content_stays_in_memory_and_large_spills_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let budget = Arc::new(Budget::default());
        let b = blob(dir.path(), "a", &budget);
        b.write_at(b"hello", 0).unwrap();
        b.write_at(b"!", 7).unwrap();
        assert_eq!(b.bytes().unwrap(), b"hello\0\0!");
        assert!(b.in_memory() && !dir.path().join("a").exists());
        assert_eq!(budget.used(), 8);
        assert_eq!(b.read_at(6, 100).unwrap(), b"\0!");
        assert!(b.read_at(8, 1).unwrap().is_empty());

        b.write_at(&vec![7; SPILL_BYTES as usize], 4).unwrap();
        assert!(!b.in_memory() && dir.path().join("a").exists());
        assert_eq!(budget.used(), 0, "spilled content gives its budget back");
        assert_eq!(b.len(), SPILL_BYTES + 4);
        assert_eq!(b.read_at(0, 6).unwrap(), b"hell\x07\x07");
        b.set_len(2).unwrap();
        assert_eq!(b.bytes().unwrap(), b"he");
        assert_eq!(b.inline(), None);
        drop(b);
        assert!(
            dir.path().join("a").exists(),
            "still held when dropped: the journal of the next mount needs it"
        );
        let b = Blob::open_file("a".into(), dir.path().join("a"), budget.clone()).unwrap();
        assert_eq!(b.bytes().unwrap(), b"he");
        b.discard();
        drop(b);
        assert!(
            !dir.path().join("a").exists(),
            "let go: the file goes with it"
        );
    }

    #[test]
    fn the_memory_budget_is_shared_and_returned() {
        let dir = tempfile::tempdir().unwrap();
        let budget = Arc::new(Budget::default());
        let chunk = vec![1; SPILL_BYTES as usize];
        let blobs: Vec<Blob> = (0..MEMORY_BUDGET / SPILL_BYTES)
            .map(|i| {
                let b = blob(dir.path(), &format!("m{i}"), &budget);
                b.write_at(&chunk, 0).unwrap();
                assert!(b.in_memory());
                b
            })
            .collect();
        assert_eq!(budget.used(), MEMORY_BUDGET);
        let over = blob(dir.path(), "over", &budget);
        over.write_at(b"x", 0).unwrap();
        assert!(!over.in_memory(), "past the budget content goes to a file");
        blobs[0].set_len(10).unwrap();
        assert_eq!(budget.used(), MEMORY_BUDGET - SPILL_BYTES + 10);
        drop(blobs);
        assert_eq!(budget.used(), 0);
    }
}
