//! Request counts of whole jobs, in-process: the filesystem core over a `MemBackend`, whose
//! counters and ordered log are exact, so the counts and the order of requests are asserted
//! exactly (tests/request_budget.rs measures the same jobs through a kernel mount and a server).

mod core;

use crate::core::{
    close, ls_lr, open_write, pwrite, read_fh, read_file, rename, unlink, write_file, Core, OWNER,
};
use kvfs::backend::mem::MemBackend;
use kvfs::backend::{op, ErrorKind, KvBackend};
use kvfs::fs::{Fs, Kind, ROOT_INO};
use std::sync::Arc;
use std::time::Duration;

const N: usize = 2000;
const DIRS: usize = 4;
const BINARY: usize = 5;
/// A listing as long as the mount keeps it: a whole job runs on one listing.
const TTL: Duration = Duration::from_secs(600);

/// The requests counted since the last reset, by operation (absent: none), then a reset.
fn counts(b: &MemBackend, job: &str) -> std::collections::BTreeMap<String, u64> {
    let c: std::collections::BTreeMap<String, u64> = b
        .request_counts()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    eprintln!("requests of {job}: {c:?}");
    b.reset_counts();
    c
}

fn map(pairs: &[(&str, u64)]) -> std::collections::BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// The path and content of file `i` of directory `d`: nested two deep, the first BINARY files
/// of d0/s0 not UTF-8 (bulk get cannot carry them).
fn file(d: usize, i: usize) -> (String, Vec<u8>) {
    let path = format!("d{d}/s{}/f{i:04}.txt", i % 5);
    let data = if d == 0 && i < BINARY * 5 && i % 5 == 0 {
        vec![0xff, 0xfe, i as u8, 0x80]
    } else {
        format!("value of {d}/{i} ").repeat(3).into_bytes()
    };
    (path, data)
}

/// The content `file` gives the file at `path` (d{d}/s{s}/f{i}.txt).
fn content(path: &str) -> Vec<u8> {
    let d = path[1..2].parse().unwrap();
    let i = path[path.len() - 8..path.len() - 4].parse().unwrap();
    let (p, data) = file(d, i);
    assert_eq!(p, path);
    data
}

/// `cp -r`: mkdir of every directory, then every file created, written and closed. Like the
/// kernel, by inode: a directory made is not looked up again for each file.
async fn copy_tree(fs: &Fs) {
    for d in 0..DIRS {
        let top = fs
            .mkdir(ROOT_INO, &format!("d{d}"), 0o755, OWNER)
            .await
            .unwrap();
        let mut subdirs = Vec::new();
        for s in 0..5 {
            let a = fs
                .mkdir(top.ino, &format!("s{s}"), 0o755, OWNER)
                .await
                .unwrap();
            subdirs.push(a.ino);
        }
        for i in 0..N / DIRS {
            let (path, data) = file(d, i);
            let (dir, name) = (subdirs[i % 5], &path[6..]);
            assert_eq!(
                fs.lookup(dir, name).await.unwrap_err().errno(),
                libc::ENOENT
            );
            let (_, fh) = fs.create(dir, name, 0o644, OWNER).await.unwrap();
            pwrite(fs, fh, 0, &data).unwrap();
            close(fs, fh).unwrap();
        }
    }
}

/// `rm -r` of `name` in directory `parent`: what is below first, then the directory.
async fn remove_tree(fs: &Fs, parent: u64, name: &str) {
    let dir = fs.lookup(parent, name).await.unwrap();
    for e in fs.readdir(dir.ino).await.unwrap() {
        if e.name == "." || e.name == ".." {
            continue;
        }
        let a = fs.lookup(dir.ino, &e.name).await.unwrap();
        if a.kind == Kind::Dir {
            Box::pin(remove_tree(fs, dir.ino, &e.name)).await;
        } else {
            fs.unlink(dir.ino, &e.name).await.unwrap();
        }
    }
    fs.rmdir(parent, name).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn whole_jobs_cost_the_fewest_requests() {
    let backend = Arc::new(MemBackend::new());
    let ns = backend.add_namespace("budget").unwrap();
    let b = &*backend;

    // cp -r of N files, then unmount: one listing (the empty namespace), one bulk write.
    let mut c = Core::on(backend.clone(), ns.clone(), TTL);
    copy_tree(c.fs()).await;
    assert!(c.fs().flush_all(3).await.is_empty());
    assert_eq!(
        counts(b, "cp -r then unmount"),
        map(&[(op::LIST_KEYS, 1), (op::BULK_WRITE, 1)])
    );
    assert_eq!(b.keys(&ns).len(), N);
    assert_eq!(
        b.peek(&ns, "d0/s0/f0005.txt").unwrap().value,
        [0xff, 0xfe, 5, 0x80][..]
    );
    let (path, data) = file(3, 499);
    assert_eq!(b.peek(&ns, &path).unwrap().value, data);
    c.reopen();
    assert_eq!(counts(b, "mount"), map(&[]));

    // ls -lR, cold: ⌈N/1000⌉ listing pages of the namespace (every directory is below its
    // prefix), ⌈N/100⌉ bulk gets (getattr needs the size; each fetches the next 100 values),
    // and one GET per value that is not UTF-8.
    let c = Core::on(backend.clone(), ns.clone(), TTL);
    let files = ls_lr(c.fs()).await;
    assert_eq!(files.len(), N);
    for (path, attr) in &files {
        assert_eq!(attr.size, content(path).len() as u64, "{path}");
    }
    assert_eq!(
        counts(b, "ls -lR cold"),
        map(&[
            (op::LIST_KEYS, N.div_ceil(1000) as u64),
            (op::BULK_GET, N.div_ceil(100) as u64),
            (op::GET_VALUE, BINARY as u64)
        ])
    );

    // cat of every file after that: nothing more to fetch.
    for (path, attr) in &files {
        let fh = c.fs().open(attr.ino, false, false).await.unwrap();
        assert_eq!(read_fh(c.fs(), fh).unwrap(), content(path), "{path}");
        close(c.fs(), fh).unwrap();
    }
    assert_eq!(counts(b, "cat all after ls"), map(&[]));
    drop(c);

    // rm -r of N keys, cold: lookups need no values; the deletes go in one bulk delete.
    let c = Core::on(backend.clone(), ns.clone(), TTL);
    for d in 0..DIRS {
        remove_tree(c.fs(), ROOT_INO, &format!("d{d}")).await;
    }
    assert!(c.fs().flush_all(3).await.is_empty());
    assert_eq!(
        counts(b, "rm -r then unmount"),
        map(&[
            (op::LIST_KEYS, N.div_ceil(1000) as u64),
            (op::BULK_DELETE, 1)
        ])
    );
    assert!(b.keys(&ns).is_empty());
    let root = c.fs().readdir(ROOT_INO).await.unwrap();
    assert_eq!(root.len(), 2, "only . and .. are left: {root:?}");
}

/// A namespace with `old` = "remote" on the server, and a core over it.
fn coalescing_setup() -> (Arc<MemBackend>, String, Core) {
    let backend = Arc::new(MemBackend::new());
    let ns = backend.add_namespace("co").unwrap();
    backend.poke(&ns, "old", "remote").unwrap();
    let c = Core::on(backend.clone(), ns.clone(), TTL);
    (backend, ns, c)
}

/// The operations of the log that changed something (bulk or plain writes and deletes).
fn writes(b: &MemBackend) -> Vec<(&'static str, Vec<String>, Option<ErrorKind>)> {
    b.log()
        .into_iter()
        .filter(|l| {
            [
                op::BULK_WRITE,
                op::BULK_DELETE,
                op::PUT_VALUE,
                op::DELETE_VALUE,
            ]
            .contains(&l.op)
        })
        .map(|l| (l.op, l.keys, l.error))
        .collect()
}

fn keys(k: &[&str]) -> Vec<String> {
    k.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(start_paused = true)]
async fn coalescing_and_renames_before_upload() {
    let (b, ns, c) = coalescing_setup();
    let fs = c.fs();
    // Written three times: one upload of the last content.
    for v in ["one", "two", "three"] {
        write_file(fs, "k", v.as_bytes()).await.unwrap();
    }
    // Created and deleted before upload: no request at all.
    write_file(fs, "tmp", b"scratch").await.unwrap();
    unlink(fs, "tmp").await.unwrap();
    // A pending file renamed before upload goes up once, under its final name.
    write_file(fs, ".part", b"final").await.unwrap();
    rename(fs, ".part", "done").await.unwrap();
    // A remote key renamed: the new key is written, then the old one deleted.
    rename(fs, "old", "new").await.unwrap();
    // Reads see the pending state.
    assert_eq!(read_file(fs, "k").await.unwrap(), b"three");
    assert_eq!(read_file(fs, "new").await.unwrap(), b"remote");
    for gone in ["old", "tmp", ".part"] {
        assert_eq!(read_file(fs, gone).await, Err(libc::ENOENT), "{gone}");
    }
    assert!(writes(&b).is_empty(), "nothing sent before the flush");
    b.clear_log();
    b.reset_counts();
    assert!(fs.flush_all(3).await.is_empty());
    // Puts first, then the deletes: the old key goes only once the new one is safe.
    assert_eq!(
        writes(&b),
        vec![
            (op::BULK_WRITE, keys(&["done", "k", "new"]), None),
            (op::BULK_DELETE, keys(&["old"]), None),
        ]
    );
    assert_eq!(
        counts(&b, "coalescing job"),
        map(&[(op::BULK_WRITE, 1), (op::BULK_DELETE, 1)])
    );
    assert_eq!(b.keys(&ns), keys(&["done", "k", "new"]));
    assert_eq!(b.peek(&ns, "k").unwrap().value, "three");
    assert_eq!(b.peek(&ns, "done").unwrap().value, "final");
    assert_eq!(b.peek(&ns, "new").unwrap().value, "remote");
}

#[tokio::test(start_paused = true)]
async fn deletes_wait_while_puts_of_their_namespace_fail() {
    let (b, ns, c) = coalescing_setup();
    let fs = c.fs();
    rename(fs, "old", "new").await.unwrap();
    b.clear_log();
    b.fail_next_of(op::BULK_WRITE, 1);
    // One fruitless round: the put failed, so the delete of the old key was not sent.
    let left = fs.flush_all(1).await;
    assert_eq!(left.len(), 2, "{left:?}");
    assert_eq!(
        writes(&b),
        vec![(op::BULK_WRITE, keys(&["new"]), Some(ErrorKind::Unavailable))]
    );
    assert_eq!(b.keys(&ns), keys(&["old"]));
    // The fault cleared: the put, then the delete.
    b.clear_log();
    assert!(fs.flush_all(3).await.is_empty());
    assert_eq!(
        writes(&b),
        vec![
            (op::BULK_WRITE, keys(&["new"]), None),
            (op::BULK_DELETE, keys(&["old"]), None),
        ]
    );
    assert_eq!(b.keys(&ns), keys(&["new"]));
    assert_eq!(b.peek(&ns, "new").unwrap().value, "remote");
}

#[tokio::test(start_paused = true)]
async fn a_refused_change_stays_in_the_journal_and_is_reported() {
    let (b, ns, c) = coalescing_setup();
    let fs = c.fs();
    b.refuse_key("bad", ErrorKind::Invalid);
    write_file(fs, "good", b"g").await.unwrap();
    write_file(fs, "bad", b"b").await.unwrap();
    // A rename onto the refused key: the old key must stay while its new name is refused.
    rename(fs, "old", "bad").await.unwrap();
    b.clear_log();
    let left = fs.flush_all(3).await;
    // The bulk write is refused whole; alone, "good" goes and "bad" is refused for good (not
    // retried); the delete of "old" is held back.
    assert_eq!(
        writes(&b),
        vec![
            (
                op::BULK_WRITE,
                keys(&["bad", "good"]),
                Some(ErrorKind::Invalid)
            ),
            (op::PUT_VALUE, keys(&["bad"]), Some(ErrorKind::Invalid)),
            (op::PUT_VALUE, keys(&["good"]), None),
        ]
    );
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().any(|l| l.contains("\"bad\"")), "{left:?}");
    let pending = &fs.status()["pending"];
    assert_eq!(pending["refused"], 1, "{pending}");
    assert_eq!(pending["writes"], 1, "{pending}");
    assert_eq!(pending["deletes"], 1, "{pending}");
    assert_eq!(b.keys(&ns), keys(&["good", "old"]));
    // It stays across a restart, still refused, and is not sent again.
    let mut c = c;
    c.reopen();
    b.clear_log();
    assert_eq!(c.fs().flush_all(3).await.len(), 2);
    assert!(writes(&b).is_empty(), "{:?}", writes(&b));
    assert_eq!(c.fs().status()["pending"]["refused"], 1);
}

#[tokio::test(start_paused = true)]
async fn close_journals_before_it_returns() {
    let (b, ns, mut c) = coalescing_setup();
    let fh = open_write(c.fs(), "kept", true, true).await.unwrap();
    pwrite(c.fs(), fh, 0, b"acknowledged").unwrap();
    // close(2) is flush; the release and any upload never happen: the daemon dies.
    c.fs().flush(fh).unwrap();
    c.reopen();
    assert!(writes(&b).is_empty());
    assert_eq!(read_file(c.fs(), "kept").await.unwrap(), b"acknowledged");
    assert!(c.fs().flush_all(3).await.is_empty());
    assert_eq!(b.peek(&ns, "kept").unwrap().value, "acknowledged");
    assert_eq!(counts(&b, "upload after restart")[op::BULK_WRITE], 1);
}

#[tokio::test(start_paused = true)]
async fn a_crash_after_a_record_while_open_keeps_size_and_bytes_together() {
    // A file recorded while still open: writes after the record go to a copy (the journal row
    // keeps what the close acknowledged). After a crash, exactly that is what stays.
    let (b, ns, mut c) = coalescing_setup();
    let fh = open_write(c.fs(), "f", true, false).await.unwrap();
    write_file(c.fs(), "f", b"one").await.unwrap();
    pwrite(c.fs(), fh, 3, b"+two").unwrap();
    c.reopen();
    let a = crate::core::resolve(c.fs(), "f").await.unwrap();
    let a = c.fs().getattr(a.ino).await.unwrap();
    let data = read_file(c.fs(), "f").await.unwrap();
    assert_eq!(a.size, data.len() as u64, "{data:?}");
    assert_eq!(
        data, b"one",
        "what close acknowledged, and only that, is kept"
    );
    assert!(c.fs().flush_all(3).await.is_empty());
    assert_eq!(b.peek(&ns, "f").unwrap().value, data);
}

#[tokio::test(start_paused = true)]
async fn fsync_uploads_at_once_and_large_values_go_alone() {
    let (b, ns, c) = coalescing_setup();
    let fs = c.fs();
    b.reset_counts();
    let fh = open_write(fs, "now", true, true).await.unwrap();
    pwrite(fs, fh, 0, b"durable").unwrap();
    fs.fsync(fh).await.unwrap();
    assert_eq!(b.peek(&ns, "now").unwrap().value, "durable");
    close(fs, fh).unwrap();
    assert_eq!(counts(&b, "fsync")[op::PUT_VALUE], 1);
    // A 2 MiB value goes up with a plain PUT; small ones share a bulk write.
    write_file(fs, "big", &vec![7u8; 2 << 20]).await.unwrap();
    write_file(fs, "a", b"a").await.unwrap();
    write_file(fs, "b", b"b").await.unwrap();
    b.reset_counts();
    assert!(fs.flush_all(3).await.is_empty());
    assert_eq!(
        counts(&b, "flush of one large and two small"),
        map(&[(op::PUT_VALUE, 1), (op::BULK_WRITE, 1)])
    );
    assert_eq!(b.peek(&ns, "big").unwrap().value.len(), 2 << 20);
    assert_eq!(b.peek(&ns, "b").unwrap().value, "b");
}

/// Large values cannot share a bulk write: each goes up with its own PUT soon after its close
/// (LARGE_SETTLE, 100 ms), long before the write-delay's quiet moment, while small values
/// still wait for it and share one bulk write. A large value renamed at once (rsync's
/// temporary file) goes up once, under its final name; a key written again waits for KV's
/// one-write-per-second limit.
#[tokio::test(start_paused = true)]
async fn large_values_go_up_at_once_and_alone() {
    let (b, ns, c) = coalescing_setup();
    let fs = c.fs();
    let uploader = fs.start_uploader();
    let big = |n: u8| vec![n; (1 << 20) + 1];
    b.reset_counts();
    write_file(fs, "a", b"a").await.unwrap();
    write_file(fs, "big1", &big(1)).await.unwrap();
    write_file(fs, ".big2.tmp", &big(2)).await.unwrap();
    rename(fs, ".big2.tmp", "big2").await.unwrap();
    // Before the settle time: nothing sent.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(b.peek(&ns, "big1").is_none());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.peek(&ns, "big1").unwrap().value, big(1));
    assert_eq!(b.peek(&ns, "big2").unwrap().value, big(2));
    assert!(
        b.peek(&ns, "a").is_none(),
        "small values wait for the quiet moment"
    );
    assert_eq!(
        counts(&b, "two large values, 150 ms after their close"),
        // The listing: the names were looked up before they were created.
        map(&[(op::LIST_KEYS, 1), (op::PUT_VALUE, 2)])
    );
    // Written again at once: the second PUT waits until a second has passed since the first.
    write_file(fs, "big1", &big(3)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(b.peek(&ns, "big1").unwrap().value, big(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.peek(&ns, "big1").unwrap().value, big(3));
    assert!(b.peek(&ns, "a").is_none());
    assert!(fs.flush_all(3).await.is_empty());
    assert_eq!(
        counts(&b, "a large value again, then the flush"),
        map(&[(op::PUT_VALUE, 1), (op::BULK_WRITE, 1)])
    );
    assert_eq!(b.peek(&ns, "a").unwrap().value, "a");
    assert!(b.peek(&ns, ".big2.tmp").is_none());
    uploader.abort();
}

/// fsync of a large value while the sender of large values runs: one PUT, sent by fsync; the
/// queued value retired with it, so the sender finds nothing to send after the settle time.
#[tokio::test(start_paused = true)]
async fn fsync_of_a_large_value_sends_it_once() {
    let (b, ns, c) = coalescing_setup();
    let fs = c.fs();
    let uploader = fs.start_uploader();
    let big = vec![9u8; (1 << 20) + 1];
    b.reset_counts();
    let fh = open_write(fs, "big", true, true).await.unwrap();
    pwrite(fs, fh, 0, &big).unwrap();
    fs.fsync(fh).await.unwrap();
    assert_eq!(b.peek(&ns, "big").unwrap().value, big);
    close(fs, fh).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(fs.flush_all(3).await.is_empty());
    assert_eq!(
        counts(&b, "fsync of a large value, then 2 s and a flush"),
        map(&[(op::LIST_KEYS, 1), (op::PUT_VALUE, 1)])
    );
    uploader.abort();
}

/// A directory of values too large to share a bulk get: the first bulk get is refused (over
/// 25 MB), then each value costs one GET. A reader going through it in order gets the next two
/// fetched in the background while it reads one, and still one GET per value.
#[tokio::test(start_paused = true)]
async fn large_values_read_in_order_are_fetched_ahead_one_get_each() {
    let backend = Arc::new(MemBackend::new());
    let ns = backend.add_namespace("big").unwrap();
    let value = |i: u8| vec![i; 10 << 20];
    for i in 0..5u8 {
        backend.poke(&ns, &format!("v{i}"), value(i)).unwrap();
    }
    let b = &*backend;
    let c = Core::on(backend.clone(), ns.clone(), TTL);
    let fs = c.fs();
    assert_eq!(read_file(fs, "v0").await.unwrap(), value(0));
    assert_eq!(
        counts(b, "the first value"),
        map(&[(op::LIST_KEYS, 1), (op::BULK_GET, 1), (op::GET_VALUE, 1)])
    );
    assert_eq!(read_file(fs, "v1").await.unwrap(), value(1));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        counts(b, "the second value, in order: the next two ahead"),
        map(&[(op::GET_VALUE, 3)])
    );
    for i in 2..5u8 {
        assert_eq!(read_file(fs, &format!("v{i}")).await.unwrap(), value(i));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    // v4, fetched ahead of the read of v2: five values, five GETs.
    assert_eq!(counts(b, "the rest"), map(&[(op::GET_VALUE, 1)]));
}

#[tokio::test(start_paused = true)]
async fn unsuccessful_keys_are_sent_again_and_deletes_wait_for_them() {
    let (b, ns, c) = coalescing_setup();
    let fs = c.fs();
    write_file(fs, "a", b"1").await.unwrap();
    rename(fs, "old", "new").await.unwrap();
    b.unsuccessful_in_next_bulk_write(&["new"]);
    b.clear_log();
    assert!(fs.flush_all(3).await.is_empty());
    // KV left "new" unwritten: it goes again, alone, and only then is "old" deleted.
    assert_eq!(
        writes(&b),
        vec![
            (op::BULK_WRITE, keys(&["a", "new"]), None),
            (op::BULK_WRITE, keys(&["new"]), None),
            (op::BULK_DELETE, keys(&["old"]), None),
        ]
    );
    assert_eq!(b.keys(&ns), keys(&["a", "new"]));
}

/// Files in the staging dir of a core's cache dir.
fn staging_files(c: &Core) -> usize {
    std::fs::read_dir(c.cfg.cache_dir.join("staging"))
        .unwrap()
        .count()
}

#[tokio::test(start_paused = true)]
async fn small_values_are_staged_in_memory_and_in_the_journal() {
    // A cp -r of small files touches no staging file: each value lives in memory and in its
    // journal row. A value past 1 MiB is staged in a file. A crash keeps both kinds.
    let (b, ns, mut c) = coalescing_setup();
    for i in 0..100 {
        write_file(c.fs(), &format!("s{i}"), format!("small {i}").as_bytes())
            .await
            .unwrap();
    }
    assert_eq!(staging_files(&c), 0);
    let big: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
    write_file(c.fs(), "big", &big).await.unwrap();
    assert_eq!(staging_files(&c), 1, "a large value is staged in a file");
    // Written past 1 MiB while open: it moves to a file, and a read sees all of it.
    let fh = open_write(c.fs(), "grown", true, true).await.unwrap();
    pwrite(c.fs(), fh, 0, b"head").unwrap();
    assert_eq!(staging_files(&c), 1);
    pwrite(c.fs(), fh, 2 << 20, b"tail").unwrap();
    assert_eq!(staging_files(&c), 2);
    let grown = read_fh(c.fs(), fh).unwrap();
    assert_eq!(grown.len(), (2 << 20) + 4);
    assert_eq!(
        (&grown[..4], &grown[2 << 20..]),
        (&b"head"[..], &b"tail"[..])
    );
    close(c.fs(), fh).unwrap();

    c.reopen();
    assert!(
        writes(&b).is_empty(),
        "nothing was uploaded before the crash"
    );
    assert_eq!(read_file(c.fs(), "s7").await.unwrap(), b"small 7");
    assert_eq!(read_file(c.fs(), "big").await.unwrap(), big);
    assert!(c.fs().flush_all(3).await.is_empty());
    assert_eq!(b.peek(&ns, "s99").unwrap().value, "small 99");
    assert_eq!(b.peek(&ns, "big").unwrap().value, big);
    assert_eq!(b.peek(&ns, "grown").unwrap().value, grown);
    assert_eq!(
        staging_files(&c),
        0,
        "uploaded content leaves no file behind"
    );
}
