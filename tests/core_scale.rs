//! Listings that last through a walk, and memory per key, in-process: the core over a
//! `MemBackend` with the tokio clock paused, so a walk can take minutes of `--metadata-ttl`
//! without waiting, and request counts are exact.

mod core;

use crate::core::{
    close, drop_entries, forget_all, lookup, open_read, parent, read_fh, read_file, resolve,
    write_file, Core,
};
use kvfs::backend::mem::MemBackend;
use kvfs::backend::{op, KvBackend};
use kvfs::fs::{Fs, Kind};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::advance;

const TTL: Duration = Duration::from_secs(30);
/// Top directories, subdirectories in each, files in each subdirectory.
const DIRS: usize = 4;
const SUBS: usize = 3;
const FILES: usize = 5;
const N: usize = DIRS * SUBS * FILES;

fn path(d: usize, s: usize, f: usize) -> String {
    format!("d{d}/s{s}/f{f}")
}

/// A namespace holding the tree, written out of band (not counted).
async fn tree() -> (Arc<MemBackend>, String) {
    let backend = Arc::new(MemBackend::new());
    let ns = backend.add_namespace("scale").unwrap();
    for d in 0..DIRS {
        for s in 0..SUBS {
            for f in 0..FILES {
                let p = path(d, s, f);
                backend.poke(&ns, &p, p.clone().into_bytes()).unwrap();
            }
        }
    }
    backend.reset_counts();
    (backend, ns)
}

fn counts(b: &MemBackend) -> BTreeMap<String, u64> {
    let c = b
        .request_counts()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    b.reset_counts();
    c
}

fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// The names in directory `dir` (by path, resolved from the root as the kernel does once its
/// entries expired), with `stat` of each.
async fn ls_l(fs: &Fs, dir: &str) -> Vec<String> {
    let ino = if dir.is_empty() {
        kvfs::fs::ROOT_INO
    } else {
        resolve(fs, dir).await.unwrap().ino
    };
    let mut names = Vec::new();
    for e in fs.readdir(ino).await.unwrap() {
        if e.name == "." || e.name == ".." {
            continue;
        }
        let a = lookup(fs, ino, &e.name).await.unwrap();
        let a = fs.getattr(a.ino).await.unwrap();
        assert_eq!(a.kind, e.kind);
        names.push(e.name);
    }
    names
}

/// `ls -lR` whose every directory comes `step` after the one before: each is found again from
/// the root (the kernel's entries expired), listed, and each entry stat'ed. Returns the files.
async fn slow_ls_lr(fs: &Fs, step: Duration) -> usize {
    let mut files = 0;
    for d in ls_l(fs, "").await {
        advance(step).await;
        for s in ls_l(fs, &d).await {
            advance(step).await;
            files += ls_l(fs, &format!("{d}/{s}")).await.len();
        }
    }
    files
}

fn status(fs: &Fs, what: &str) -> u64 {
    fs.status()[what].as_u64().unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_walk_lists_once_however_long_it_takes() {
    let (backend, ns) = tree().await;
    let c = Core::on(backend.clone(), ns.clone(), TTL);
    // 16 directories 12 s apart: the walk takes 192 s, six and a half `--metadata-ttl`s.
    let files = slow_ls_lr(c.fs(), Duration::from_secs(12)).await;
    assert_eq!(files, N);
    assert_eq!(
        counts(&backend),
        map(&[(op::LIST_KEYS, 1), (op::BULK_GET, 1)]),
        "one listing for the whole walk"
    );
    // Out of band, in a directory the walk has passed: a key appears.
    backend.poke(&ns, "d0/s0/new", &b"x"[..]).unwrap();
    backend.reset_counts();
    // Read again, after `--metadata-ttl`: that is no step forward, so it is listed again and
    // the change shows.
    let names = ls_l(c.fs(), "d0/s0").await;
    assert!(names.contains(&"new".to_string()), "{names:?}");
    assert_eq!(counts(&backend)[op::LIST_KEYS], 1);
}

#[tokio::test(start_paused = true)]
async fn a_directory_read_again_after_the_ttl_is_listed_again() {
    let (backend, ns) = tree().await;
    let c = Core::on(backend.clone(), ns.clone(), TTL);
    assert_eq!(ls_l(c.fs(), "d1/s1").await.len(), FILES);
    // Read again and again within the TTL: no request.
    for _ in 0..5 {
        advance(Duration::from_secs(5)).await;
        assert_eq!(ls_l(c.fs(), "d1/s1").await.len(), FILES);
    }
    assert_eq!(counts(&backend)[op::LIST_KEYS], 1);
    backend.poke(&ns, "d1/s1/late", &b"x"[..]).unwrap();
    backend.reset_counts();
    // 30 s after the listing: reading the same directory again (a poller, `watch ls`) is not
    // a walk going forward, so it lists again and sees the new key.
    advance(Duration::from_secs(5)).await;
    assert_eq!(ls_l(c.fs(), "d1/s1").await.len(), FILES + 1);
    assert_eq!(counts(&backend)[op::LIST_KEYS], 1);
    // A directory before the one last read, after the TTL: listed again too.
    advance(TTL).await;
    assert_eq!(ls_l(c.fs(), "d1/s2").await.len(), FILES);
    advance(TTL).await;
    assert_eq!(ls_l(c.fs(), "d1/s0").await.len(), FILES);
    assert_eq!(counts(&backend)[op::LIST_KEYS], 2);
}

#[tokio::test(start_paused = true)]
async fn a_walk_that_stalls_or_runs_past_the_cap_lists_again() {
    let (backend, ns) = tree().await;
    // Stalls: a step more than the TTL after the one before lists again.
    let c = Core::on(backend.clone(), ns.clone(), TTL);
    assert_eq!(slow_ls_lr(c.fs(), TTL + Duration::from_secs(1)).await, N);
    let lists = counts(&backend)[op::LIST_KEYS];
    // Each directory is a step past the TTL: the root, then each of the 4 + 12 directories
    // lists again (a subdirectory's listing is of its own prefix, one page).
    assert_eq!(lists, 1 + (DIRS + DIRS * SUBS) as u64);
    drop(c);

    // Steps of 25 s: in time, but the listing is used for at most ten TTLs (300 s). The walk
    // takes 16 × 25 = 400 s: the listing is fetched again once, after 300 s.
    let c = Core::on(backend.clone(), ns.clone(), TTL);
    assert_eq!(slow_ls_lr(c.fs(), Duration::from_secs(25)).await, N);
    assert_eq!(counts(&backend)[op::LIST_KEYS], 2);
}

#[tokio::test(start_paused = true)]
async fn what_a_walk_holds_is_freed_when_the_kernel_forgets_it() {
    let (backend, ns) = tree().await;
    let c = Core::on(backend.clone(), ns.clone(), TTL);
    let fs = c.fs();
    assert_eq!(slow_ls_lr(fs, Duration::from_secs(1)).await, N);
    // One listing of the namespace; one attribute entry per value fetched; an inode per entry
    // the kernel holds.
    assert_eq!(status(fs, "listed_keys"), N as u64);
    assert_eq!(status(fs, "attrs_seen"), N as u64);
    let held = status(fs, "inodes");
    assert_eq!(held, 1 + (DIRS + DIRS * SUBS + N) as u64);
    forget_all(fs);
    assert_eq!(status(fs, "inodes"), 1, "only the root is left");
    // The names lead to the same numbers again (from the names), and a forgotten name is
    // found again by lookup.
    let a = resolve(fs, &path(2, 1, 3)).await.unwrap();
    assert_eq!(a.kind, Kind::File);
    forget_all(fs);
    // Past the longest a walk may use it, a listing is dropped when its namespace is read
    // again: the new one replaces it rather than adding to it.
    advance(TTL * 11).await;
    assert_eq!(ls_l(fs, "").await.len(), DIRS);
    assert_eq!(status(fs, "listed_keys"), N as u64);
    assert_eq!(counts(&backend)[op::LIST_KEYS], 2);
}

#[tokio::test(start_paused = true)]
async fn a_walk_begun_while_the_listing_is_fresh_goes_on_with_it() {
    let (backend, ns) = tree().await;
    let c = Core::on(backend.clone(), ns.clone(), TTL);
    // `ls -fR` then `rsync -a`: the first walk ends at the last directory; the second begins
    // at the top again while the listing is fresh, and goes on with it for 192 s.
    assert_eq!(slow_ls_lr(c.fs(), Duration::from_secs(1)).await, N);
    assert_eq!(slow_ls_lr(c.fs(), Duration::from_secs(12)).await, N);
    assert_eq!(counts(&backend)[op::LIST_KEYS], 1);
    // A third begins after the TTL: the top is read again, so it is listed again.
    assert_eq!(slow_ls_lr(c.fs(), Duration::from_secs(1)).await, N);
    assert_eq!(counts(&backend)[op::LIST_KEYS], 1);
}

/// Every file of the tree, in listing order (the order a walk looks them up).
fn all_paths() -> Vec<String> {
    let mut paths = Vec::new();
    for d in 0..DIRS {
        for s in 0..SUBS {
            for f in 0..FILES {
                paths.push(path(d, s, f));
            }
        }
    }
    paths
}

#[tokio::test(start_paused = true)]
async fn cold_entries_are_let_go_and_found_again_unchanged() {
    let (backend, ns) = tree().await;
    let mut c = Core::on(backend.clone(), ns.clone(), TTL);
    c.cfg.max_entries = 20;
    c.reopen();
    let fs = c.fs();
    // Two that must stay however cold: a file open for reading, and one written whose upload
    // is pending (no uploader runs here).
    let open = open_read(fs, &path(0, 0, 0)).await.unwrap();
    write_file(fs, &path(0, 0, 2), b"changed").await.unwrap();
    let mut seen = BTreeMap::new();
    for p in all_paths() {
        let a = resolve(fs, &p).await.unwrap();
        seen.insert(p, fs.getattr(a.ino).await.unwrap());
    }
    counts(&backend);
    let dirs = (DIRS + DIRS * SUBS) as u64;
    assert_eq!(status(fs, "inodes"), 1 + dirs + N as u64);

    // 60 files hold entries, the limit is 20: the oldest go until 15 are left, passing over
    // the open and the pending one.
    let dropped = drop_entries(fs);
    let mut expected = Vec::new();
    for p in all_paths().into_iter().take(N - 15 + 2) {
        if p != path(0, 0, 0) && p != path(0, 0, 2) {
            let dir = resolve(fs, parent(&p)).await.unwrap().ino;
            let name = p.rsplit('/').next().unwrap().to_string();
            expected.push((dir, name, seen[&p].ino));
        }
    }
    let dropped: Vec<(u64, String, u64)> = dropped
        .into_iter()
        .map(|e| (e.parent, e.name, e.ino))
        .collect();
    assert_eq!(dropped, expected);
    assert_eq!(status(fs, "inodes"), 1 + dirs + 15);
    assert_eq!(status(fs, "entries_let_go"), (N - 15) as u64);
    assert!(drop_entries(fs).is_empty(), "at the limit's three quarters");

    // What was let go is found again as it was: same inode numbers and attributes, no
    // request; the open handle and the pending write are untouched.
    for (p, before) in &seen {
        let a = resolve(fs, p).await.unwrap();
        let a = fs.getattr(a.ino).await.unwrap();
        assert_eq!(
            (a.ino, a.size, a.mtime, a.perm, a.kind),
            (
                before.ino,
                before.size,
                before.mtime,
                before.perm,
                before.kind
            ),
            "{p}"
        );
    }
    assert_eq!(read_fh(fs, open).unwrap(), path(0, 0, 0).into_bytes());
    close(fs, open).unwrap();
    assert_eq!(read_file(fs, &path(0, 0, 2)).await.unwrap(), b"changed");
    assert_eq!(counts(&backend), BTreeMap::new());
}
