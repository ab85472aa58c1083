//! End-to-end tests of `kvfs mount`: a real FUSE mount of a real `kvfs serve`, driven with
//! std::fs and the usual tools, checked through the API.

mod common;
mod mnt;

use common::ServerProc;
use kvfs::client::PutOptions;
use mnt::{
    assert_enoent, await_enoent, errno, getxattr, setxattr, sh, sh_fails, Api, DaemonGuard, Mount,
};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::time::Duration;

fn setup(extra: &[&str]) -> (ServerProc, Api, Mount) {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let mount = Mount::start(&server, extra);
    (server, api, mount)
}

#[test]
fn namespaces_are_directories() {
    let (_s, api, m) = setup(&["--metadata-ttl", "1s"]);
    let alpha = api.create_ns("alpha");
    api.create_ns("bad/title");
    let names: Vec<String> = fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.contains(&"alpha".to_string()), "{names:?}");
    // A title that cannot be a file name is shown by its id.
    assert!(!names.iter().any(|n| n.contains("bad")));
    assert_eq!(names.len(), 2);
    assert_eq!(
        getxattr(&m.p("alpha"), "user.kv.namespace_id").unwrap(),
        alpha.as_bytes()
    );

    fs::create_dir(m.p("beta")).unwrap();
    assert!(api.ns_titles().contains(&"beta".to_string()));
    assert_eq!(
        errno(fs::create_dir(m.p("beta")).unwrap_err()),
        libc::EEXIST
    );
    fs::rename(m.p("beta"), m.p("gamma")).unwrap();
    let titles = api.ns_titles();
    assert!(titles.contains(&"gamma".to_string()) && !titles.contains(&"beta".to_string()));

    fs::write(m.p("gamma/k"), b"v").unwrap();
    assert_eq!(
        errno(fs::remove_dir(m.p("gamma")).unwrap_err()),
        libc::ENOTEMPTY
    );
    fs::remove_file(m.p("gamma/k")).unwrap();
    fs::remove_dir(m.p("gamma")).unwrap();
    assert!(!api.ns_titles().contains(&"gamma".to_string()));
    // Files cannot live at the account root.
    assert_eq!(
        errno(fs::write(m.p("file-at-root"), b"x").unwrap_err()),
        libc::EPERM
    );
}

#[test]
fn values_round_trip_both_ways() {
    let (_s, api, m) = setup(&[]);
    let ns = api.create_ns("data");
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("binary", all_bytes.clone()),
        ("empty", vec![]),
        ("with space.txt", b"spaces".to_vec()),
        ("100%?.txt", b"percent and question".to_vec()),
        ("ünïcødé ✓", "unicode ✓".as_bytes().to_vec()),
        ("dir/sub/deep.txt", b"nested".to_vec()),
    ];
    for (name, value) in &cases {
        let p = m.p(&format!("data/{name}"));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, value).unwrap();
    }
    m.flush();
    for (name, value) in &cases {
        assert_eq!(api.get(&ns, name).as_ref(), Some(value), "key {name}");
        assert_eq!(&fs::read(m.p(&format!("data/{name}"))).unwrap(), value);
    }
    // And the other way: written through the API, read through the mount.
    api.put(&ns, "from-api/all-bytes", &all_bytes);
    api.put(&ns, "from-api/empty", b"");
    let m2 = Mount::start(&_s, &[]);
    assert_eq!(
        fs::read(m2.p("data/from-api/all-bytes")).unwrap(),
        all_bytes
    );
    assert_eq!(fs::read(m2.p("data/from-api/empty")).unwrap(), b"");
    assert_eq!(
        fs::metadata(m2.p("data/from-api/all-bytes")).unwrap().len(),
        256
    );
}

#[test]
fn a_25_mib_value_and_limits() {
    let (_s, api, m) = setup(&[]);
    let ns = api.create_ns("big");
    let max: Vec<u8> = (0..25 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    fs::write(m.p("big/max"), &max).unwrap();
    m.flush();
    assert_eq!(api.get(&ns, "max").unwrap(), max);
    assert_eq!(fs::read(m.p("big/max")).unwrap(), max);

    // One byte more: EFBIG at the write that crosses the limit. The file's new content is
    // dropped: close() records nothing, and the key keeps its old value (or stays absent).
    fs::write(m.p("big/over"), b"old value").unwrap();
    m.flush();
    let mut f = fs::File::create(m.p("big/over")).unwrap();
    f.write_all(&max).unwrap();
    assert_eq!(errno(f.write_all(b"x").unwrap_err()), libc::EFBIG);
    drop(f);
    let src = tempfile::tempdir().unwrap();
    let mut too_big = max.clone();
    too_big.push(b'x');
    fs::write(src.path().join("too-big"), &too_big).unwrap();
    let err = sh_fails(&format!(
        "cp '{}' '{}'",
        src.path().join("too-big").display(),
        m.p("big/new-too-big").display()
    ));
    assert!(err.contains("File too large"), "{err}");
    m.flush();
    // (Compared by hand: a failure must not print 25 MiB.)
    let kept = api.get(&ns, "over").unwrap();
    assert!(kept == b"old value", "KV holds {} bytes", kept.len());
    let shown = fs::read(m.p("big/over")).unwrap();
    assert!(
        shown == b"old value",
        "the mount shows {} bytes",
        shown.len()
    );
    assert_eq!(api.get(&ns, "new-too-big"), None);
    assert_enoent(&m.p("big/new-too-big"));
    let status = m.status();
    assert_eq!(status["pending"]["writes"], 0, "{status}");

    // A key over 512 bytes, a name segment over 255 bytes.
    let long_dir = format!("big/{}/{}", "a".repeat(255), "b".repeat(255));
    fs::create_dir_all(m.p(&long_dir)).unwrap();
    let long_key = format!("{long_dir}/cc");
    assert_eq!(
        errno(fs::write(m.p(&long_key), b"x").unwrap_err()),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno(fs::write(m.p(&format!("big/{}", "c".repeat(256))), b"x").unwrap_err()),
        libc::ENAMETOOLONG
    );
    // Links and special files are not keys.
    assert_eq!(
        errno(std::os::unix::fs::symlink("max", m.p("big/link")).unwrap_err()),
        libc::EPERM
    );
    assert_eq!(
        errno(fs::hard_link(m.p("big/max"), m.p("big/hard")).unwrap_err()),
        libc::EPERM
    );
    let fifo =
        std::ffi::CString::new(m.p("big/fifo").into_os_string().into_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, -1);
    assert_eq!(errno(std::io::Error::last_os_error()), libc::EPERM);
    // Still serving, other data intact.
    m.flush();
    assert_eq!(api.get(&ns, "max").unwrap().len(), max.len());
    fs::write(m.p("big/after"), b"ok").unwrap();
    m.flush();
    assert_eq!(api.get(&ns, "after").unwrap(), b"ok");
}

#[test]
fn shell_tools_work_on_keys() {
    let (_s, api, m) = setup(&[]);
    let ns = api.create_ns("tools");
    let src = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("tree/a/b")).unwrap();
    fs::write(src.path().join("tree/top.txt"), b"top").unwrap();
    fs::write(src.path().join("tree/a/one.txt"), b"one").unwrap();
    fs::write(src.path().join("tree/a/b/two.bin"), [0u8, 255, 1, 254]).unwrap();
    let root = m.p("tools");
    let (srcp, rootp) = (src.path().display(), root.display());
    sh(&format!("cp -r {srcp}/tree {rootp}/"));
    sh(&format!("diff -r {srcp}/tree {rootp}/tree"));
    m.flush();
    let mut keys = api.keys(&ns);
    keys.sort();
    assert_eq!(keys, ["tree/a/b/two.bin", "tree/a/one.txt", "tree/top.txt"]);

    let ls = sh(&format!("ls -l {rootp}/tree/a"));
    assert!(ls.contains("one.txt") && ls.contains(" 3 "), "{ls}");
    assert_eq!(sh(&format!("cat {rootp}/tree/a/one.txt")), "one");

    // Append, truncate, random writes.
    sh(&format!("printf ' more' >> {rootp}/tree/a/one.txt"));
    m.flush();
    assert_eq!(api.get(&ns, "tree/a/one.txt").unwrap(), b"one more");
    sh(&format!("truncate -s 2 {rootp}/tree/a/one.txt"));
    m.flush();
    assert_eq!(api.get(&ns, "tree/a/one.txt").unwrap(), b"on");
    sh(&format!(
        "printf 'XY' | dd of={rootp}/tree/top.txt bs=1 seek=1 conv=notrunc status=none"
    ));
    m.flush();
    assert_eq!(api.get(&ns, "tree/top.txt").unwrap(), b"tXY");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("tools/tree/top.txt"))
        .unwrap();
    f.write_all_at(b"__", 5).unwrap();
    drop(f);
    m.flush();
    assert_eq!(api.get(&ns, "tree/top.txt").unwrap(), b"tXY\0\0__");

    // mv of a file and of a whole directory; new keys written, old ones gone.
    sh(&format!("mv {rootp}/tree/top.txt {rootp}/tree/moved.txt"));
    m.flush();
    assert_eq!(api.get(&ns, "tree/moved.txt").unwrap(), b"tXY\0\0__");
    assert_eq!(api.get(&ns, "tree/top.txt"), None);
    sh(&format!("mv {rootp}/tree/a {rootp}/tree/z"));
    m.flush();
    let mut keys = api.keys(&ns);
    keys.sort();
    assert_eq!(
        keys,
        ["tree/moved.txt", "tree/z/b/two.bin", "tree/z/one.txt"]
    );
    assert_eq!(
        fs::read(m.p("tools/tree/z/b/two.bin")).unwrap(),
        [0u8, 255, 1, 254]
    );

    // mkdir lives in memory until a file is written below it; rmdir of an empty one.
    fs::create_dir(m.p("tools/empty")).unwrap();
    assert!(m.p("tools/empty").is_dir());
    fs::remove_dir(m.p("tools/empty")).unwrap();
    assert_enoent(&m.p("tools/empty"));
    assert_eq!(
        errno(fs::remove_dir(m.p("tools/tree")).unwrap_err()),
        libc::ENOTEMPTY
    );

    sh(&format!("rm -r {rootp}/tree"));
    m.flush();
    assert!(api.keys(&ns).is_empty());
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
}

#[test]
fn odd_keys_are_hidden_and_directories_win() {
    let (_s, api, m) = setup(&[]);
    let ns = api.create_ns("odd");
    for k in ["a//b", "/lead", "trail/", "x/./y", "x/../y", "ok"] {
        api.put(&ns, k, b"v");
    }
    api.put(&ns, "both", b"file");
    api.put(&ns, "both/inner", b"inside");
    let mut names: Vec<String> = fs::read_dir(m.p("odd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["both", "ok"]);
    assert!(m.p("odd/both").is_dir());
    assert_eq!(fs::read(m.p("odd/both/inner")).unwrap(), b"inside");
    let status = sh(&format!(
        "{} status --json {}",
        mnt::KVFS,
        m.path().display()
    ));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["hidden_keys"], 5, "{status}");
}

#[test]
fn xattrs_are_metadata_and_expiration() {
    let (_s, api, m) = setup(&[]);
    let ns = api.create_ns("x");
    let f = m.p("x/doc");
    fs::write(&f, b"content").unwrap();
    assert_eq!(getxattr(&f, "user.kv.metadata"), Err(libc::ENODATA));
    setxattr(&f, "user.kv.metadata", br#"{"owner": "ann", "n": 1}"#).unwrap();
    assert_eq!(
        getxattr(&f, "user.kv.metadata").unwrap(),
        br#"{"n":1,"owner":"ann"}"#
    );
    m.flush();
    let info = api.key_info(&ns, "doc").unwrap();
    assert_eq!(info.metadata.unwrap()["owner"], "ann");
    assert_eq!(api.get(&ns, "doc").unwrap(), b"content");

    assert_eq!(
        setxattr(&f, "user.kv.metadata", b"{not json"),
        Err(libc::EINVAL)
    );
    let big = format!("{{\"k\":\"{}\"}}", "x".repeat(1100));
    assert_eq!(
        setxattr(&f, "user.kv.metadata", big.as_bytes()),
        Err(libc::E2BIG)
    );
    assert_eq!(setxattr(&f, "user.other", b"1"), Err(libc::ENOTSUP));
    assert_eq!(getxattr(&f, "user.other"), Err(libc::ENODATA));
    // Outside `user.` nothing is supported: ENOTSUP, which `ls -l` remembers per filesystem
    // instead of asking two of these for every file it lists.
    assert_eq!(getxattr(&f, "security.selinux"), Err(libc::ENOTSUP));
    assert_eq!(getxattr(&f, "system.posix_acl_access"), Err(libc::ENOTSUP));
    // Routine answers, logged at debug level only (the kernel asks before every write).
    let log = m.log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("security.") && !l.contains("DEBUG")),
        "{log}"
    );

    let now = kvfs::api::limits::now_secs();
    assert_eq!(
        setxattr(&f, "user.kv.expiration", (now - 10).to_string().as_bytes()),
        Err(libc::EINVAL)
    );
    assert_eq!(
        setxattr(&f, "user.kv.expiration", (now + 30).to_string().as_bytes()),
        Err(libc::EINVAL)
    );
    let at = now + 3600;
    setxattr(&f, "user.kv.expiration", at.to_string().as_bytes()).unwrap();
    assert_eq!(
        getxattr(&f, "user.kv.expiration").unwrap(),
        at.to_string().as_bytes()
    );
    m.flush();
    assert_eq!(api.key_info(&ns, "doc").unwrap().expiration, Some(at));
    assert_eq!(
        setxattr(&f, "user.kv.expiration_ttl", b"10"),
        Err(libc::EINVAL)
    );
    setxattr(&f, "user.kv.expiration_ttl", b"7200").unwrap();
    m.flush();
    let exp = api.key_info(&ns, "doc").unwrap().expiration.unwrap();
    assert!(exp >= now + 7200 && exp < now + 7300, "{exp}");

    // Rewriting the content keeps metadata and expiration.
    fs::write(&f, b"new content").unwrap();
    m.flush();
    let info = api.key_info(&ns, "doc").unwrap();
    assert_eq!(info.metadata.unwrap()["owner"], "ann");
    assert_eq!(info.expiration, Some(exp));
    assert_eq!(api.get(&ns, "doc").unwrap(), b"new content");

    let list = sh(&format!("getfattr -d -m - '{}'", f.display()));
    assert!(
        list.contains("user.kv.metadata") && list.contains("user.kv.expiration"),
        "{list}"
    );
    sh(&format!("setfattr -x user.kv.metadata '{}'", f.display()));
    sh(&format!("setfattr -x user.kv.expiration '{}'", f.display()));
    m.flush();
    let info = api.key_info(&ns, "doc").unwrap();
    assert_eq!((info.metadata, info.expiration), (None, None));

    // Metadata written through the API shows up in the mount.
    let opts = PutOptions {
        metadata: Some(serde_json::json!({"from": "api"})),
        ..Default::default()
    };
    api.put_with(&ns, "api-key", b"v", opts);
    let m2 = Mount::start(&_s, &[]);
    let got = sh(&format!(
        "getfattr --only-values -n user.kv.metadata '{}'",
        m2.p("x/api-key").display()
    ));
    assert_eq!(got, r#"{"from":"api"}"#);
}

#[test]
fn read_only_mount_refuses_changes() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("ro");
    api.put(&ns, "k", b"v");
    let m = Mount::start(&server, &["--read-only"]);
    assert_eq!(fs::read(m.p("ro/k")).unwrap(), b"v");
    assert_eq!(
        errno(fs::write(m.p("ro/k"), b"x").unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(fs::write(m.p("ro/new"), b"x").unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(fs::remove_file(m.p("ro/k")).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(errno(fs::create_dir(m.p("ro2")).unwrap_err()), libc::EROFS);
    assert_eq!(api.get(&ns, "k").unwrap(), b"v");
}

#[test]
fn namespace_as_root_and_exdev() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let one = api.create_ns("one");
    api.create_ns("two");
    api.put(&one, "a/b", b"x");
    let m = Mount::start(&server, &["--namespace", "one"]);
    assert_eq!(fs::read(m.p("a/b")).unwrap(), b"x");
    let m2 = Mount::start(&server, &["--namespace", &one]);
    assert_eq!(fs::read(m2.p("a/b")).unwrap(), b"x");
    drop((m, m2));
    let m = Mount::start(&server, &[]);
    assert_eq!(
        errno(fs::rename(m.p("one/a/b"), m.p("two/b")).unwrap_err()),
        libc::EXDEV
    );
    assert_eq!(api.get(&one, "a/b").unwrap(), b"x");
}

#[test]
fn external_changes_show_after_the_ttl() {
    // A TTL far longer than the few milliseconds between a change and the read that must not
    // see it yet, and short enough to wait for.
    let (_s, api, m) = setup(&["--metadata-ttl", "3s"]);
    let ns = api.create_ns("ext");
    api.put(&ns, "k", b"first");
    assert_eq!(fs::read(m.p("ext/k")).unwrap(), b"first");
    // Within the TTL: the cache answers, without a request, with the old value and listing.
    api.put(&ns, "k", b"second!");
    api.put(&ns, "new", b"n");
    api.reset_stats();
    assert_eq!(fs::read(m.p("ext/k")).unwrap(), b"first");
    assert_enoent(&m.p("ext/new"));
    let s = api.stats();
    assert_eq!(s["total"], 0, "{s}");
    // After it: the changes show.
    let limit = Duration::from_secs(20);
    common::wait_until("the new value", limit, || {
        fs::read(m.p("ext/k")).unwrap() == b"second!"
    });
    assert_eq!(fs::read(m.p("ext/new")).unwrap(), b"n");
    api.delete(&ns, "new");
    await_enoent(&m.p("ext/new"), limit);
}

#[test]
fn concurrent_writers_make_progress() {
    let (_s, api, m) = setup(&[]);
    let ns = api.create_ns("conc");
    let root = m.p("conc");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let root = root.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let p = root.join(format!("t{t}-{i}"));
                    fs::write(&p, format!("{t}:{i}")).unwrap();
                    assert_eq!(fs::read_to_string(&p).unwrap(), format!("{t}:{i}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    m.flush();
    assert_eq!(api.keys(&ns).len(), 100);
    assert_eq!(api.get(&ns, "t3-24").unwrap(), b"3:24");
}

#[test]
fn open_file_sees_its_own_writes_and_seeks() {
    let (_s, api, m) = setup(&[]);
    let ns = api.create_ns("rw");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(m.p("rw/f"))
        .unwrap();
    f.write_all(b"hello world").unwrap();
    f.seek(SeekFrom::Start(6)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "world");
    f.sync_all().unwrap();
    assert_eq!(api.get(&ns, "f").unwrap(), b"hello world");
    drop(f);
}

#[test]
fn daemon_mode_mounts_and_unmounts_cleanly() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("d");
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let _guard = DaemonGuard::new(dir.path(), cache.path().join("kvfs.log"));
    let out = common::output_within(
        std::process::Command::new(mnt::KVFS)
            .arg("mount")
            .arg(dir.path())
            .args([
                "--write-delay",
                "60s",
                "--api-url",
                &server.base_url(),
                "--cache-dir",
            ])
            .arg(cache.path())
            .env("KVFS_TOKEN", common::TOKEN)
            .env("CLOUDFLARE_ACCOUNT_ID", common::ACCOUNT),
        common::test_deadline(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        mnt::is_mounted(dir.path()),
        "mount returned before it was ready"
    );
    // A long write delay: the write waits in the journal until unmount uploads it.
    fs::write(dir.path().join("d/key"), b"daemon").unwrap();
    let status: serde_json::Value = serde_json::from_str(&sh(&format!(
        "{} status --json {}",
        mnt::KVFS,
        dir.path().display()
    )))
    .unwrap();
    let pid = status["pid"].as_i64().unwrap() as i32;
    assert_eq!(status["pending"]["first"][0]["key"], "key", "{status}");
    assert_eq!(status["pending"]["writes"], 1, "{status}");
    assert!(
        status["requests"]["list_namespaces"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert_eq!(api.get(&ns, "key"), None);
    sh(&format!("{} unmount {}", mnt::KVFS, dir.path().display()));
    assert!(!mnt::is_mounted(dir.path()));
    assert!(!mnt::process_alive(pid), "daemon still running");
    assert_eq!(api.get(&ns, "key").unwrap(), b"daemon");

    // A mount that cannot work fails with a message and a non-zero exit.
    let out = common::output_within(
        std::process::Command::new(mnt::KVFS)
            .arg("mount")
            .arg(dir.path())
            .args(["--api-url", "http://127.0.0.1:9/client/v4", "--cache-dir"])
            .arg(cache.path())
            .env("KVFS_TOKEN", "x")
            .env("KVFS_TEST_BACKOFF_MS", "10"),
        common::test_deadline(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach"), "{err}");
    assert!(!mnt::is_mounted(dir.path()));
}

#[test]
fn embedded_local_store_is_the_default() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The cache dir is named by a hash under $XDG_CACHE_HOME/kvfs: the guard looks inside.
    let _guard = DaemonGuard::new(dir.path(), home.path().join("cache/kvfs"));
    let kvfs = |args: &[&str]| {
        let mut c = std::process::Command::new(mnt::KVFS);
        c.args(args).arg(dir.path()).env("HOME", home.path());
        c.env("XDG_DATA_HOME", home.path().join("data"))
            .env("XDG_CACHE_HOME", home.path().join("cache"));
        for v in [
            "CLOUDFLARE_API_TOKEN",
            "CLOUDFLARE_API_KEY",
            "CLOUDFLARE_ACCOUNT_ID",
            "KVFS_API_URL",
            "KVFS_TOKEN",
        ] {
            c.env_remove(v);
        }
        common::output_within(&mut c, common::test_deadline())
    };
    let out = kvfs(&["mount"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("local store"), "{err}");
    fs::create_dir(dir.path().join("notes")).unwrap();
    fs::write(dir.path().join("notes/todo.txt"), b"try kvfs").unwrap();
    assert!(kvfs(&["unmount"]).status.success());
    assert!(home.path().join("data/kvfs").is_dir());
    // The data lives on: mount again, same content.
    assert!(kvfs(&["mount"]).status.success());
    assert_eq!(
        fs::read(dir.path().join("notes/todo.txt")).unwrap(),
        b"try kvfs"
    );
    assert!(kvfs(&["unmount"]).status.success());
}

/// A listing's entries carry their attributes (READDIRPLUS): what `ls -ai` and a later stat
/// show agree with the keys, values not fetched yet included, `..` being the parent.
#[test]
fn listed_entries_agree_with_stat() {
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let (_s, api, m) = setup(&[]);
    let ns = api.create_ns("l");
    for i in 0..60 {
        api.put(&ns, &format!("d/k{i:02}"), &vec![b'x'; i]);
    }
    let dir = m.p("l/d");
    // rsync's pattern: stat each entry as the listing goes (the kernel then asks for
    // READDIRPLUS past the first page).
    let mut seen = 0;
    for e in fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        let meta = fs::symlink_metadata(e.path()).unwrap();
        let i: usize = e.file_name().to_str().unwrap()[1..].parse().unwrap();
        assert_eq!(meta.len(), i as u64, "{:?}", e.file_name());
        assert_eq!(e.ino(), meta.ino(), "{:?}", e.file_name());
        seen += 1;
    }
    assert_eq!(seen, 60);
    // Again, now answered from the attributes the listing brought.
    for i in 0..60 {
        assert_eq!(
            fs::metadata(dir.join(format!("k{i:02}"))).unwrap().len(),
            i as u64
        );
    }
    let ls = sh(&format!("ls -ai {}", dir.display()));
    let ino_of = |name: &str| -> u64 {
        ls.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w[1] == name)
            .unwrap_or_else(|| panic!("{name} not in {ls}"))[0]
            .parse()
            .unwrap()
    };
    assert_eq!(ino_of("."), fs::metadata(&dir).unwrap().ino());
    assert_eq!(ino_of(".."), fs::metadata(m.p("l")).unwrap().ino());
    assert_eq!(ino_of("k07"), fs::metadata(dir.join("k07")).unwrap().ino());
}

/// Waits (up to 10 s: the kernel forgets what was invalidated as it gets to it) until the
/// daemon's table holds at most `n` inodes; returns its status.
fn inodes_fall_to(m: &Mount, n: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = m.status();
        let held = s["inodes"].as_u64().unwrap();
        if held <= n {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "{held} inodes: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cold_kernel_entries_are_let_go_and_files_keep_their_inodes() {
    use std::os::unix::fs::MetadataExt;
    let (_s, api, m) = setup(&["--max-entries", "100"]);
    let ns = api.create_ns("many");
    let names: Vec<String> = (0..1000).map(|i| format!("d{}/f{i:04}", i / 250)).collect();
    let items: Vec<kvfs::api::BulkWriteItem> = names
        .iter()
        .map(|k| kvfs::api::BulkWriteItem {
            key: k.clone(),
            value: k.clone(),
            base64: false,
            expiration: None,
            expiration_ttl: None,
            metadata: None,
        })
        .collect();
    api.block(api.client.bulk_write(&ns, &items)).unwrap();
    // One file stays open throughout: its entry is never let go.
    let mut open = fs::File::open(m.p(&format!("many/{}", names[0]))).unwrap();
    let inos: Vec<u64> = names
        .iter()
        .map(|k| fs::metadata(m.p(&format!("many/{k}"))).unwrap().ino())
        .collect();
    // The kernel forgets what the daemon invalidated: its table falls back under the limit
    // (the root, the namespace, 4 directories and at most 100 files), where it would hold
    // every file the kernel was given an entry of.
    let status = inodes_fall_to(&m, 106);
    assert!(
        status["entries_let_go"].as_u64().unwrap() >= 900,
        "{status}"
    );
    // Nothing a user sees changed: the same inode numbers and content, the open file too.
    for (k, ino) in names.iter().zip(&inos) {
        let p = m.p(&format!("many/{k}"));
        assert_eq!(fs::metadata(&p).unwrap().ino(), *ino, "{k}");
    }
    assert_eq!(fs::read(m.p("many/d3/f0999")).unwrap(), b"d3/f0999");
    // A walk that lists and stats (READDIRPLUS gives the kernel its entries, not lookups)
    // is bounded the same way.
    let listed = sh(&format!("ls -lR '{}'", m.p("many").display()));
    assert_eq!(listed.lines().filter(|l| l.starts_with('-')).count(), 1000);
    inodes_fall_to(&m, 106);
    let mut got = String::new();
    open.read_to_string(&mut got).unwrap();
    assert_eq!(got, names[0]);
    assert_eq!(open.metadata().unwrap().ino(), inos[0]);
}
