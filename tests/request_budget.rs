//! Request counts of whole jobs, read from the server's /__kvfs/stats. These are exact and
//! deterministic, so they are asserted; wall times are measured by scripts/bench instead.

mod common;
mod mnt;

use common::ServerProc;
use mnt::{assert_enoent, sh, Api, Mount};
use std::fs;
use std::path::Path;

const N: usize = 2000;
const DIRS: usize = 4;
const BINARY: usize = 5;
/// The counts hold while nothing the mount cached expires: a phase under load can take longer
/// than the default 30 s, so every mount here trusts its cache for an hour.
const TTL: [&str; 2] = ["--metadata-ttl", "1h"];

/// A mount with the pinned TTL and `extra` flags.
fn mount(server: &ServerProc, extra: &[&str]) -> Mount {
    Mount::start(server, &[&TTL[..], extra].concat())
}

/// N files in DIRS directories of 5 subdirectories each (nested, as `rm -r` must handle);
/// the first BINARY files of the first are not UTF-8.
fn make_tree(root: &Path) {
    for d in 0..DIRS {
        for s in 0..5 {
            fs::create_dir_all(root.join(format!("d{d}/s{s}"))).unwrap();
        }
        for i in 0..N / DIRS {
            let p = root.join(format!("d{d}/s{}/f{i:04}.txt", i % 5));
            if d == 0 && i < BINARY * 5 && i % 5 == 0 {
                fs::write(p, [0xff, 0xfe, i as u8, 0x80]).unwrap();
            } else {
                fs::write(p, format!("value of {d}/{i} ").repeat(3)).unwrap();
            }
        }
    }
}

/// The counts since the last reset (printed, for the record), then a reset.
fn counts(api: &Api, job: &str) -> serde_json::Value {
    let s = api.stats();
    eprintln!("requests of {job}: {s}");
    api.reset_stats();
    s
}

fn n(s: &serde_json::Value, op: &str) -> u64 {
    s[op].as_u64().unwrap_or(0)
}

#[test]
fn whole_jobs_cost_the_fewest_requests() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("budget");
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());

    // cp -r of N files, then unmount: one bulk write, no per-key PUT.
    let mut m = mount(&server, &["--write-delay", "10s"]);
    api.reset_stats();
    sh(&format!(
        "cp -r {}/. {}/",
        src.path().display(),
        m.p("budget").display()
    ));
    assert!(m.unmount().success());
    let s = counts(&api, "cp -r then unmount");
    assert_eq!(n(&s, "bulk_write"), 1, "{s}");
    assert_eq!(n(&s, "put_value"), 0, "{s}");
    assert!(n(&s, "list_keys") <= 1, "{s}");
    assert!(n(&s, "total") <= 3, "{s}");
    assert_eq!(api.keys(&ns).len(), N);
    assert_eq!(
        api.get(&ns, "d0/s0/f0005.txt").unwrap(),
        [0xff, 0xfe, 5, 0x80]
    );
    assert_eq!(
        api.get(&ns, "d3/s4/f0499.txt").unwrap(),
        "value of 3/499 ".repeat(3).as_bytes()
    );

    // ls -l, cold: ⌈N/1000⌉ lists and ⌈N/100⌉ bulk gets, plus one GET per binary value.
    let m = mount(&server, &[]);
    api.reset_stats();
    let out = sh(&format!("LC_ALL=C ls -lR {}", m.p("budget").display()));
    assert_eq!(out.lines().filter(|l| l.starts_with('-')).count(), N);
    let s = counts(&api, "ls -lR cold");
    assert!(n(&s, "list_keys") <= 2, "{s}");
    assert!(n(&s, "bulk_get") <= 20, "{s}");
    assert_eq!(n(&s, "get_value"), BINARY as u64, "{s}");

    // cat of every file after that: nothing more to fetch.
    sh(&format!(
        "find {} -type f -exec cat {{}} + > /dev/null",
        m.p("budget").display()
    ));
    let s = counts(&api, "cat all after ls");
    assert_eq!(n(&s, "total"), 0, "{s}");
    drop(m);

    // rsync -a out, cold: the same as ls -l; the copy is identical.
    let m = mount(&server, &[]);
    let out = tempfile::tempdir().unwrap();
    api.reset_stats();
    sh(&format!(
        "rsync -a {}/ {}/",
        m.p("budget").display(),
        out.path().display()
    ));
    let s = counts(&api, "rsync -a cold");
    assert!(n(&s, "list_keys") <= 2, "{s}");
    assert!(n(&s, "bulk_get") <= 20, "{s}");
    assert_eq!(n(&s, "get_value"), BINARY as u64, "{s}");
    sh(&format!(
        "diff -r {} {}",
        src.path().display(),
        out.path().display()
    ));

    // rm -r of N keys, cold: lookups need no values, the deletes go in one bulk delete.
    drop(m);
    let mut m = mount(&server, &[]);
    api.reset_stats();
    sh(&format!(
        "rm -r {}/d0 {}/d1 {}/d2 {}/d3",
        m.p("budget").display(),
        m.p("budget").display(),
        m.p("budget").display(),
        m.p("budget").display()
    ));
    assert!(m.unmount().success());
    let s = counts(&api, "rm -r then unmount");
    assert!(n(&s, "list_keys") <= 2, "{s}");
    assert_eq!(n(&s, "bulk_delete"), 1, "{s}");
    assert_eq!(n(&s, "delete_value"), 0, "{s}");
    assert_eq!(n(&s, "bulk_get") + n(&s, "get_value"), 0, "{s}");
    assert!(api.keys(&ns).is_empty());
}

#[test]
fn coalescing_and_renames_before_upload() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("co");
    api.put(&ns, "old", b"remote");
    let mut m = mount(&server, &["--write-delay", "10s"]);
    api.reset_stats();
    // Written three times: one upload of the last content.
    for v in ["one", "two", "three"] {
        fs::write(m.p("co/k"), v).unwrap();
    }
    // Created and deleted before upload: no request at all.
    fs::write(m.p("co/tmp"), b"scratch").unwrap();
    fs::remove_file(m.p("co/tmp")).unwrap();
    // A pending file renamed before upload goes up once, under its final name.
    fs::write(m.p("co/.part"), b"final").unwrap();
    fs::rename(m.p("co/.part"), m.p("co/done")).unwrap();
    // A remote key renamed: the new key is written, then the old one deleted.
    fs::rename(m.p("co/old"), m.p("co/new")).unwrap();
    // Reads see the pending state.
    assert_eq!(fs::read(m.p("co/k")).unwrap(), b"three");
    assert_eq!(fs::read(m.p("co/new")).unwrap(), b"remote");
    for gone in ["co/old", "co/tmp", "co/.part"] {
        assert_enoent(&m.p(gone));
    }
    let s = api.stats();
    assert_eq!(
        n(&s, "bulk_write") + n(&s, "put_value") + n(&s, "bulk_delete"),
        0,
        "{s}"
    );
    assert!(m.unmount().success());
    // The rename's new key is written before its old key is deleted.
    let writes: Vec<String> = api
        .log()
        .into_iter()
        .filter(|op| {
            ["bulk_write", "bulk_delete", "put_value", "delete_value"].contains(&op.as_str())
        })
        .collect();
    assert_eq!(writes, ["bulk_write", "bulk_delete"]);
    let s = counts(&api, "coalescing job");
    assert_eq!(n(&s, "bulk_write"), 1, "{s}");
    assert_eq!(n(&s, "bulk_delete"), 1, "{s}");
    assert_eq!(n(&s, "put_value") + n(&s, "delete_value"), 0, "{s}");
    let mut keys = api.keys(&ns);
    keys.sort();
    assert_eq!(keys, ["done", "k", "new"]);
    assert_eq!(api.get(&ns, "k").unwrap(), b"three");
    assert_eq!(api.get(&ns, "done").unwrap(), b"final");
    assert_eq!(api.get(&ns, "new").unwrap(), b"remote");
}

#[test]
fn fsync_uploads_at_once_and_large_values_go_alone() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("sync");
    let m = mount(&server, &["--write-delay", "60s"]);
    api.reset_stats();
    let f = fs::File::create(m.p("sync/now")).unwrap();
    use std::io::Write;
    (&f).write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    assert_eq!(api.get(&ns, "now").unwrap(), b"durable");
    drop(f);
    // A 2 MiB value goes up with a plain PUT; small ones share a bulk write.
    fs::write(m.p("sync/big"), vec![7u8; 2 << 20]).unwrap();
    fs::write(m.p("sync/a"), b"a").unwrap();
    fs::write(m.p("sync/b"), b"b").unwrap();
    api.reset_stats();
    m.flush();
    let s = counts(&api, "fsync job");
    assert_eq!(n(&s, "put_value"), 1, "{s}");
    assert_eq!(n(&s, "bulk_write"), 1, "{s}");
    assert_eq!(api.get(&ns, "big").unwrap().len(), 2 << 20);
    assert_eq!(api.get(&ns, "b").unwrap(), b"b");
}
