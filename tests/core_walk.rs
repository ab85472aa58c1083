//! A reader walking a namespace (`ls -lR`, rsync, `ls -l` of one directory, `find`) against a
//! store 20 ms away, in-process: the core over a `MemBackend` behind a delay on the paused tokio
//! clock, so the requests, what runs at once and the time a walk takes are exact. What is
//! checked: the requests stay the fewest the API allows, no more than `--max-requests` are in
//! flight, and once the reader has shown it walks in order, every bulk get starts before the
//! reader asks for its first key.

mod core;

use crate::core::{close, read_fh, Core};
use async_trait::async_trait;
use bytes::Bytes;
use kvfs::api::BulkResult;
use kvfs::api::Namespace;
use kvfs::backend::mem::MemBackend;
use kvfs::backend::{
    op, Fetched, KeyPage, KvBackend, PutOptions, RequestCounts, Result, ValueResponse, WriteItem,
};
use kvfs::fs::{Fs, Kind, ROOT_INO};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const LATENCY: Duration = Duration::from_millis(20);
/// What the reader (the kernel and the tool) spends on each entry it stats: a walk of 100
/// files takes half a request's latency, so fetching ahead can keep up with it only in
/// parallel.
const PER_ENTRY: Duration = Duration::from_micros(100);
/// Listings kept for the whole walk.
const TTL: Duration = Duration::from_secs(600);

/// One request as the store saw it.
#[derive(Debug, Clone)]
struct Sent {
    op: &'static str,
    keys: Vec<String>,
    start: Instant,
}

/// A `MemBackend` whose every request takes `LATENCY`, counting how many run at once.
struct Slow {
    mem: Arc<MemBackend>,
    running: AtomicUsize,
    most_running: AtomicUsize,
    sent: Mutex<Vec<Sent>>,
}

impl Slow {
    async fn call<T>(&self, op: &'static str, keys: &[String], f: impl Future<Output = T>) -> T {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(now, Ordering::SeqCst);
        self.sent.lock().unwrap().push(Sent {
            op,
            keys: keys.to_vec(),
            start: Instant::now(),
        });
        tokio::time::sleep(LATENCY).await;
        let out = f.await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        out
    }

    fn bulk_gets(&self) -> Vec<Sent> {
        let sent = self.sent.lock().unwrap();
        sent.iter()
            .filter(|s| s.op == op::BULK_GET)
            .cloned()
            .collect()
    }

    /// Requests by operation since the last call (from the store's own counters).
    fn counts(&self) -> BTreeMap<String, u64> {
        let c = self.mem.request_counts();
        self.mem.reset_counts();
        self.sent.lock().unwrap().clear();
        self.most_running.store(0, Ordering::SeqCst);
        c.into_iter().collect()
    }
}

#[async_trait]
impl KvBackend for Slow {
    fn describe(&self) -> String {
        "memory, 20 ms away".into()
    }
    fn request_counts(&self) -> RequestCounts {
        self.mem.request_counts()
    }
    async fn list_namespaces(&self) -> Result<Vec<Namespace>> {
        self.call(op::LIST_NAMESPACES, &[], self.mem.list_namespaces())
            .await
    }
    async fn create_namespace(&self, title: &str) -> Result<Namespace> {
        self.call("create_namespace", &[], self.mem.create_namespace(title))
            .await
    }
    async fn rename_namespace(&self, id: &str, title: &str) -> Result<()> {
        self.call(
            "rename_namespace",
            &[],
            self.mem.rename_namespace(id, title),
        )
        .await
    }
    async fn delete_namespace(&self, id: &str) -> Result<()> {
        self.call("delete_namespace", &[], self.mem.delete_namespace(id))
            .await
    }
    async fn list_keys(
        &self,
        ns: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<KeyPage> {
        let f = self.mem.list_keys(ns, prefix, cursor, limit);
        self.call(op::LIST_KEYS, &[], f).await
    }
    async fn get_value(&self, ns: &str, key: &str) -> Result<ValueResponse> {
        let keys = [key.to_string()];
        self.call(op::GET_VALUE, &keys, self.mem.get_value(ns, key))
            .await
    }
    async fn bulk_get(&self, ns: &str, keys: &[String]) -> Result<HashMap<String, Fetched>> {
        self.call(op::BULK_GET, keys, self.mem.bulk_get(ns, keys))
            .await
    }
    async fn put_value(&self, ns: &str, key: &str, value: Bytes, opts: &PutOptions) -> Result<()> {
        let f = self.mem.put_value(ns, key, value, opts);
        self.call(op::PUT_VALUE, &[], f).await
    }
    async fn bulk_write(&self, ns: &str, items: &[WriteItem]) -> Result<BulkResult> {
        self.call(op::BULK_WRITE, &[], self.mem.bulk_write(ns, items))
            .await
    }
    async fn delete_value(&self, ns: &str, key: &str) -> Result<()> {
        self.call(op::DELETE_VALUE, &[], self.mem.delete_value(ns, key))
            .await
    }
    async fn bulk_delete(&self, ns: &str, keys: &[String]) -> Result<BulkResult> {
        self.call(op::BULK_DELETE, &[], self.mem.bulk_delete(ns, keys))
            .await
    }
}

/// The key of file `i` of `n`, laid out as the bench lays out its tree: 4 × 3 directories,
/// files spread over them round the clock.
fn key(i: usize) -> String {
    format!("dir{}/sub{}/file{i:06}.txt", i % 4, (i / 4) % 3)
}

fn value(i: usize) -> Vec<u8> {
    format!("value {i} ").repeat(10).into_bytes()
}

/// A cold core with at most `max_requests` in flight over `n` files 20 ms away. The `Core`
/// returned only lends its configuration and must outlive the `Fs`.
fn setup(n: usize, max_requests: usize) -> (Arc<Slow>, Fs, Core, tempfile::TempDir) {
    let mem = Arc::new(MemBackend::new());
    let ns = mem.add_namespace("walk").unwrap();
    for i in 0..n {
        mem.poke(&ns, &key(i), value(i)).unwrap();
    }
    let core = Core::on(mem.clone(), ns, TTL);
    let slow = Arc::new(Slow {
        mem,
        running: AtomicUsize::new(0),
        most_running: AtomicUsize::new(0),
        sent: Mutex::new(Vec::new()),
    });
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let mut cfg = core.cfg.clone();
    cfg.cache_dir = dir.path().to_path_buf();
    cfg.max_requests = max_requests;
    let fs = Fs::new(slow.clone() as Arc<dyn KvBackend>, cfg).unwrap();
    (slow, fs, core, dir)
}

/// The kernel's stat of an entry: lookup, then getattr when the lookup's attributes could not
/// be cached (no size yet).
async fn stat(fs: &Fs, dir: u64, name: &str) -> kvfs::fs::Attr {
    let a = fs.lookup(dir, name).await.unwrap();
    if a.provisional {
        fs.getattr(a.ino).await.unwrap()
    } else {
        a
    }
}

/// What a walk did: when it first asked for each key, and the bytes it read.
#[derive(Default)]
struct Walked {
    asked: HashMap<String, Instant>,
    read: BTreeMap<String, Vec<u8>>,
}

/// `ls -lR` (`read` false) or `rsync -a` out (`read` true) of the directory `dir` (`path`
/// its keys' prefix): per directory, readdir and a stat of each entry, then (rsync) each file
/// opened and read, then the subdirectories in order.
async fn walk(fs: &Fs, dir: u64, path: &str, read: bool, out: &mut Walked) {
    let mut subdirs = Vec::new();
    let mut files = Vec::new();
    for e in fs.readdir(dir).await.unwrap() {
        if e.name == "." || e.name == ".." {
            continue;
        }
        let key = format!("{path}{}", e.name);
        out.asked.entry(key.clone()).or_insert_with(Instant::now);
        let a = stat(fs, dir, &e.name).await;
        tokio::time::advance(PER_ENTRY).await;
        if a.kind == Kind::Dir {
            subdirs.push((a.ino, format!("{key}/")));
        } else {
            files.push((a.ino, key));
        }
    }
    for (ino, key) in files.into_iter().filter(|_| read) {
        let fh = fs.open(ino, false, false).await.unwrap();
        out.read.insert(key, read_fh(fs, fh).unwrap());
        close(fs, fh).unwrap();
    }
    for (ino, path) in subdirs {
        Box::pin(walk(fs, ino, &path, read, out)).await;
    }
}

/// The checks of a cold `ls -lR` or rsync of `n` files with `max_requests`.
async fn cold_walk(n: usize, max_requests: usize, read: bool) {
    let (slow, fs, _core, _dir) = setup(n, max_requests);
    let started = Instant::now();
    let mut w = Walked::default();
    walk(&fs, ROOT_INO, "", read, &mut w).await;
    let took = started.elapsed();
    if read {
        assert_eq!(w.read.len(), n);
        for (k, v) in &w.read {
            let i: usize = k[k.len() - 10..k.len() - 4].parse().unwrap();
            assert_eq!(v, &value(i), "{k}");
        }
    }

    // The fewest requests: ⌈N/1000⌉ listing pages, ⌈N/100⌉ bulk gets.
    let gets = slow.bulk_gets();
    let most = slow.most_running.load(Ordering::SeqCst);
    let counts = slow.counts();
    let lists = n.div_ceil(1000) as u64;
    let batches = n.div_ceil(100);
    assert_eq!(
        counts,
        BTreeMap::from([
            (op::LIST_KEYS.to_string(), lists),
            (op::BULK_GET.to_string(), batches as u64)
        ])
    );
    // Up to --max-requests at once, never more.
    assert!(
        (3..=max_requests).contains(&most),
        "{most} requests at once"
    );

    // Once the walk is known to go in order (after its first batches and its first step into
    // the next directory), every bulk get starts before the reader asks for its first key.
    let late: Vec<_> = gets
        .iter()
        .skip(6)
        .filter(|g| g.start >= w.asked[&g.keys[0]])
        .map(|g| &g.keys[0])
        .collect();
    assert!(late.is_empty(), "fetched when asked: {late:?}");

    // So the walk takes the listing pages one after another, then the reader's own time, plus
    // the few requests it waits for until the walk is known to go in order.
    let floor = LATENCY * lists as u32 + PER_ENTRY * (n + 16) as u32;
    assert!(
        took <= floor + LATENCY * 6,
        "took {took:?}, the floor is {floor:?}"
    );
    eprintln!("{n} files, max {max_requests}: {took:?}, {most} at once");
}

#[tokio::test(start_paused = true)]
async fn ls_lr_keeps_bulk_gets_ahead_of_the_reader() {
    cold_walk(3000, 4, false).await;
}

#[tokio::test(start_paused = true)]
async fn rsync_keeps_bulk_gets_ahead_of_the_reader() {
    cold_walk(3000, 4, true).await;
}

#[tokio::test(start_paused = true)]
async fn a_walk_of_ten_thousand_uses_the_default_sixteen_requests() {
    cold_walk(10_000, 16, true).await;
}

/// `ls -l` of one directory after its parent was listed (the listing covers every directory):
/// only that directory's values are fetched, in as many bulk gets as it needs, although the
/// listing goes on into the next directories.
#[tokio::test(start_paused = true)]
async fn ls_of_one_directory_fetches_no_other_directory() {
    let n = 3000;
    let (slow, fs, _core, _dir) = setup(n, 16);
    let dir0 = stat(&fs, ROOT_INO, "dir0").await;
    let sub1 = stat(&fs, dir0.ino, "sub1").await;
    let mut sizes = 0;
    for e in fs.readdir(sub1.ino).await.unwrap() {
        if e.name != "." && e.name != ".." {
            sizes += stat(&fs, sub1.ino, &e.name).await.size;
        }
    }
    assert!(sizes > 0);
    let in_dir = (0..n).filter(|i| key(*i).starts_with("dir0/sub1/")).count();
    let gets = slow.bulk_gets();
    assert_eq!(
        slow.counts(),
        BTreeMap::from([
            (op::LIST_KEYS.to_string(), n.div_ceil(1000) as u64),
            (op::BULK_GET.to_string(), in_dir.div_ceil(100) as u64)
        ])
    );
    // Only the last batch reaches past the directory, to fill itself up.
    let outside: usize = gets
        .iter()
        .map(|g| {
            g.keys
                .iter()
                .filter(|k| !k.starts_with("dir0/sub1/"))
                .count()
        })
        .sum();
    assert!(outside < 100, "{outside} values of other directories");
}

/// `find`: readdir and lookup of everything, no values: listings only, and no fetch ahead.
#[tokio::test(start_paused = true)]
async fn find_costs_listings_only() {
    let n = 3000;
    let (slow, fs, _core, _dir) = setup(n, 16);
    let mut todo = vec![ROOT_INO];
    let mut found = 0;
    while let Some(dir) = todo.pop() {
        for e in fs.readdir(dir).await.unwrap() {
            if e.name == "." || e.name == ".." {
                continue;
            }
            let a = fs.lookup(dir, &e.name).await.unwrap();
            if a.kind == Kind::Dir {
                todo.push(a.ino);
            } else {
                found += 1;
            }
        }
    }
    assert_eq!(found, n);
    tokio::time::sleep(LATENCY * 10).await;
    assert_eq!(
        slow.counts(),
        BTreeMap::from([(op::LIST_KEYS.to_string(), n.div_ceil(1000) as u64)])
    );
}
