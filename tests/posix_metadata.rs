//! `kvfs mount --posix-metadata`: backups that restore anywhere. A tree goes in with
//! `rsync -aH`; mounts on fresh cache dirs (other machines) see the same modes, owners, mtimes,
//! symlinks and empty directories, list it without reading values, and find nothing to do on a
//! second rsync.

mod common;
mod mnt;

use common::{ServerProc, ACCOUNT, TOKEN};
use mnt::{getxattr, setxattr, sh, transferred, Api, Mount};
use std::collections::BTreeMap;
use std::fs::{self, FileTimes};
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

const FLAG: &[&str] = &["--posix-metadata"];
/// Files in `many/`: more than two listing pages.
const MANY: usize = 2100;

/// An mtime with nanoseconds, long ago.
fn old_time(i: u64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::new(1_000_000_000 + i * 3600, 123_456_789 + i as u32)
}

fn set_mtime(p: &Path, i: u64) {
    let t = old_time(i);
    let f = fs::File::options().write(true).open(p).unwrap();
    f.set_times(FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// lutimes of a symlink (std has no call for it).
fn set_link_mtime(p: &Path, i: u64) {
    let d = old_time(i).duration_since(UNIX_EPOCH).unwrap();
    sh(&format!(
        "touch -h -d @{}.{:09} '{}'",
        d.as_secs(),
        d.subsec_nanos(),
        p.display()
    ));
}

/// Modes, owners, old mtimes, relative and dangling symlinks, empty directories, and MANY files.
fn make_tree(root: &Path) {
    for d in ["sub/inner", "empty", "nested/empty2", "deep/x/y", "many"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let files: &[(&str, &[u8], u32, u32)] = &[
        ("top.txt", b"top level", 0o600, 1234),
        ("run.sh", b"#!/bin/sh\necho hi\n", 0o755, 0),
        ("sub/file.txt", b"in sub", 0o640, 4321),
        ("sub/inner/setuid", b"suid", 0o4750, 0),
        ("sub/empty-file", b"", 0o444, 77),
    ];
    for (i, (name, content, mode, owner)) in files.iter().enumerate() {
        let p = root.join(name);
        fs::write(&p, content).unwrap();
        lchown(&p, Some(*owner), Some(owner + 1)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
        set_mtime(&p, i as u64);
    }
    for i in 0..MANY {
        let p = root.join(format!("many/f{i:04}"));
        fs::write(&p, format!("value {i}")).unwrap();
        set_mtime(&p, 100 + i as u64);
    }
    let links = [
        ("link", "sub/file.txt"),
        ("sub/up", "../top.txt"),
        ("dangling", "nowhere/missing"),
        ("sub/inner/abs", "/etc/hostname"),
    ];
    for (i, (name, target)) in links.iter().enumerate() {
        let p = root.join(name);
        std::os::unix::fs::symlink(target, &p).unwrap();
        lchown(&p, Some(500 + i as u32), Some(600)).unwrap();
        set_link_mtime(&p, 50 + i as u64);
    }
    for (i, (d, mode)) in [
        ("empty", 0o700),
        ("nested/empty2", 0o750),
        ("deep/x/y", 0o711),
    ]
    .iter()
    .enumerate()
    {
        let p = root.join(d);
        lchown(&p, Some(42), Some(43)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
        set_mtime_dir(&p, 70 + i as u64);
    }
}

fn set_mtime_dir(p: &Path, i: u64) {
    let t = old_time(i);
    fs::File::open(p)
        .unwrap()
        .set_times(FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// What a restore must reproduce of each entry: type, permission bits, owner, size, content or
/// target, and the mtime (ns) of files, symlinks and empty directories. Non-empty directories
/// have no key of their own, so only their existence is compared.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let walk = sh(&format!("cd '{}' && find . -mindepth 1", root.display()));
    for rel in walk.lines() {
        let p = root.join(rel);
        let m = fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let desc = if ft.is_symlink() {
            format!(
                "link {:o} {}:{} {}.{} -> {}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec(),
                fs::read_link(&p).unwrap().display()
            )
        } else if ft.is_dir() {
            if fs::read_dir(&p).unwrap().next().is_some() {
                "dir".to_string()
            } else {
                format!(
                    "empty dir {:o} {}:{} {}.{}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    m.mtime(),
                    m.mtime_nsec()
                )
            }
        } else {
            format!(
                "file {:o} {}:{} {}.{} {} {:x}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec(),
                m.len(),
                kvfs::fs::attrs::digest(&fs::read(&p).unwrap())
            )
        };
        out.insert(rel.to_string(), desc);
    }
    out
}

fn n(s: &serde_json::Value, op: &str) -> u64 {
    s[op].as_u64().unwrap_or(0)
}

fn writes(s: &serde_json::Value) -> u64 {
    ["bulk_write", "put_value", "bulk_delete", "delete_value"]
        .iter()
        .map(|op| n(s, op))
        .sum()
}

/// The counts since the last reset (printed, for the record), then a reset.
fn counts(api: &Api, job: &str) -> serde_json::Value {
    let s = api.stats();
    eprintln!("requests of {job}: {s}");
    api.reset_stats();
    s
}

#[test]
fn rsync_backup_restores_anywhere() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("bk");
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let s = src.path().display().to_string();

    let mut m = Mount::start(&server, FLAG);
    sh(&format!("rsync -aH {s}/ {}/", m.p("bk").display()));
    assert!(m.unmount().success());

    // What KV holds: file bytes as values, the attributes in the "kvfs" member.
    let info = api.key_info(&ns, "top.txt").unwrap();
    let member = &info.metadata.as_ref().unwrap()["kvfs"];
    let d = old_time(0).duration_since(UNIX_EPOCH).unwrap();
    assert_eq!(
        *member,
        serde_json::json!({"t": "f", "m": 0o600, "u": 1234, "g": 1235,
            "n": d.as_nanos() as u64, "s": 9}),
        "{info:?}"
    );
    assert!(member.to_string().len() + r#"{"kvfs":}"#.len() <= 100);
    assert_eq!(api.get(&ns, "top.txt").unwrap(), b"top level");
    assert_eq!(api.get(&ns, "dangling").unwrap(), b"nowhere/missing");
    let link = api.key_info(&ns, "dangling").unwrap().metadata.unwrap();
    assert_eq!(link["kvfs"]["t"], "l", "{link}");
    // Empty directories are marker keys; directories with keys have none.
    let keys = api.keys(&ns);
    for marker in ["empty/", "nested/empty2/", "deep/x/y/"] {
        assert_eq!(api.get(&ns, marker).unwrap(), b"", "{marker}");
        let meta = api.key_info(&ns, marker).unwrap().metadata.unwrap();
        assert_eq!(meta["kvfs"]["t"], "d", "{meta}");
    }
    for not in ["nested/", "deep/", "deep/x/", "sub/", "many/"] {
        assert!(!keys.contains(&not.to_string()), "{not} in {keys:?}");
    }
    let temp: Vec<_> = keys
        .iter()
        .filter(|k| k.contains("/.") || k.starts_with('.'))
        .collect();
    assert!(temp.is_empty(), "{temp:?}");
    let total = keys.len();
    let pages = |n: usize| n.div_ceil(1000) as u64;

    // Another machine (a fresh cache dir): a cold `ls -lR` of MANY keys lists them in
    // ⌈MANY/1000⌉ pages and reads no value: sizes come from the listing.
    let m = Mount::start(&server, FLAG);
    api.reset_stats();
    let ls = sh(&format!(
        "ls -lR --time-style=+%s {}",
        m.p("bk/many").display()
    ));
    let c = counts(&api, "cold ls -lR of many/");
    // Looking `many` up lists its parent, the whole namespace: the same number of pages here.
    assert_eq!(pages(MANY), pages(total));
    assert_eq!(n(&c, "list_keys"), pages(MANY), "{c}");
    assert_eq!(n(&c, "get_value") + n(&c, "bulk_get"), 0, "{c}");
    assert!(ls.contains(" 9 1000720000 f0100\n"), "{}", &ls[..300]);
    // The whole tree: its symlinks' targets are values, read ahead together in one bulk get.
    let ls = sh(&format!("ls -lR {}", m.p("bk").display()));
    let c = counts(&api, "cold ls -lR of the tree");
    assert!(ls.contains("dangling -> nowhere/missing"), "{ls}");
    assert_eq!(n(&c, "list_keys"), 0, "{c}");
    assert_eq!((n(&c, "get_value"), n(&c, "bulk_get")), (0, 1), "{c}");
    drop(m);

    // A second rsync from yet another machine: listings (and the symlinks' targets) only,
    // no file transferred, nothing written.
    let mut m = Mount::start(&server, FLAG);
    api.reset_stats();
    let stats = sh(&format!("rsync -aH --stats {s}/ {}/", m.p("bk").display()));
    assert!(m.unmount().success());
    let c = counts(&api, "second rsync -aH from a fresh machine");
    assert_eq!(transferred(&stats), 0, "{stats}");
    assert_eq!(writes(&c), 0, "{c}");
    assert_eq!(n(&c, "list_keys"), pages(total), "{c}");
    assert_eq!((n(&c, "get_value"), n(&c, "bulk_get")), (0, 1), "{c}");

    // Restore through a fresh cache dir: the identical tree.
    let m = Mount::start(&server, FLAG);
    let restore = tempfile::tempdir().unwrap();
    sh(&format!(
        "rsync -aH {}/ {}/",
        m.p("bk").display(),
        restore.path().display()
    ));
    let (want, got) = (snapshot(src.path()), snapshot(restore.path()));
    assert_eq!(want.len(), got.len());
    for (k, v) in &want {
        assert_eq!(Some(v), got.get(k), "{k}");
    }
    // The mount shows the same, without a restore in between.
    let seen = snapshot(&m.p("bk"));
    for (k, v) in &want {
        assert_eq!(Some(v), seen.get(k), "{k} through the mount");
    }
    // And empty directories survive an unmount of the mount that made them.
    assert!(fs::read_dir(m.p("bk/deep/x/y")).unwrap().next().is_none());
    // Markers are shown, so not counted as keys that cannot be paths.
    let status = sh(&format!(
        "{} status --json {}",
        mnt::KVFS,
        m.path().display()
    ));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["hidden_keys"], 0, "{status}");
    assert!(!m.log_text().contains("cannot be shown as a path"));
}

#[test]
fn the_users_metadata_stays_the_users() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("meta");
    let mut m = Mount::start(&server, FLAG);
    let f = m.p("meta/doc.txt");
    fs::write(&f, b"hello").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(getxattr(&f, "user.kv.metadata"), Err(libc::ENODATA));
    let listed = sh(&format!("getfattr -d -m - '{}'", f.display()));
    assert!(!listed.contains("user.kv.metadata"), "{listed}");

    setxattr(&f, "user.kv.metadata", br#"{"owner":"me","tags":[1,2]}"#).unwrap();
    assert_eq!(
        getxattr(&f, "user.kv.metadata").unwrap(),
        br#"{"owner":"me","tags":[1,2]}"#
    );
    // The member is kvfs's: not settable by the user.
    assert_eq!(
        setxattr(&f, "user.kv.metadata", br#"{"kvfs":1}"#),
        Err(libc::EINVAL)
    );
    // The user's part plus the member over 1024 bytes: E2BIG, and nothing changed. (960
    // bytes alone would fit KV's limit.)
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(950));
    assert!(big.len() < 1024);
    assert_eq!(
        setxattr(&f, "user.kv.metadata", big.as_bytes()),
        Err(libc::E2BIG)
    );
    assert_eq!(
        getxattr(&f, "user.kv.metadata").unwrap(),
        br#"{"owner":"me","tags":[1,2]}"#
    );
    // Metadata that is not an object stays as the user set it; that key has no member.
    let g = m.p("meta/text-meta");
    fs::write(&g, b"v").unwrap();
    setxattr(&g, "user.kv.metadata", br#""just text""#).unwrap();
    fs::set_permissions(&g, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(getxattr(&g, "user.kv.metadata").unwrap(), br#""just text""#);
    m.flush();
    // A change the member does not hold (the atime) writes nothing.
    api.reset_stats();
    sh(&format!("touch -a -d @1000000000 '{}'", f.display()));
    m.flush();
    assert_eq!(writes(&api.stats()), 0, "{}", api.stats());
    assert!(m.unmount().success());

    // The Python SDK reads the user's members next to the member, and the string as it was.
    let probe = Command::new("python3")
        .args(["-c", "import cloudflare"])
        .output()
        .expect("python3 is required (scripts/setup)");
    assert!(
        probe.status.success(),
        "the `cloudflare` Python module is missing: run scripts/setup"
    );
    let script = r#"
import json, os, sys
from cloudflare import Cloudflare
c = Cloudflare(api_token=os.environ["KVFS_TOKEN"], base_url=os.environ["KVFS_BASE_URL"], max_retries=0)
get = lambda k: c.kv.namespaces.metadata.get(k, account_id=os.environ["KVFS_ACCOUNT"], namespace_id=sys.argv[1])
print(json.dumps([get("doc.txt"), get("text-meta")]))
"#;
    let out = Command::new("python3")
        .args(["-c", script, &ns])
        .env("KVFS_BASE_URL", server.base_url())
        .env("KVFS_TOKEN", TOKEN)
        .env("KVFS_ACCOUNT", ACCOUNT)
        .env_remove("CLOUDFLARE_BASE_URL")
        .env_remove("CLOUDFLARE_API_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let doc = &got[0];
    assert_eq!(doc["owner"], "me", "{got}");
    assert_eq!(doc["tags"], serde_json::json!([1, 2]), "{got}");
    assert_eq!(doc["kvfs"]["m"], 0o640, "{got}");
    assert_eq!(doc["kvfs"]["s"], 5, "{got}");
    assert_eq!(doc.as_object().unwrap().len(), 3, "{got}");
    assert_eq!(got[1], "just text", "{got}");

    // removexattr takes the user's part away; the member stays.
    let m = Mount::start(&server, FLAG);
    let f = m.p("meta/doc.txt");
    sh(&format!("setfattr -x user.kv.metadata '{}'", f.display()));
    assert_eq!(getxattr(&f, "user.kv.metadata"), Err(libc::ENODATA));
    m.flush();
    let meta = api.key_info(&ns, "doc.txt").unwrap().metadata.unwrap();
    assert_eq!(meta.as_object().unwrap().len(), 1, "{meta}");
    assert_eq!(meta["kvfs"]["m"], 0o640, "{meta}");
}

#[test]
fn sizes_changed_elsewhere_are_corrected_at_first_read() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("other");
    // Another client rewrote the value but kept the old metadata (recording 3 bytes).
    let meta = serde_json::json!({"kvfs": {"t":"f","m":420,"u":0,"g":0,"n":1_000_000_000_000_000_000u64,"s":3}});
    api.put_with(
        &ns,
        "changed",
        b"now much longer",
        kvfs::client::PutOptions {
            metadata: Some(meta),
            ..Default::default()
        },
    );
    // A key without the member (written by another client) behaves as without the flag.
    api.put(&ns, "plain", b"hello");
    // The fstab form of the flag.
    let m = Mount::start(&server, &["-o", "posix-metadata", "--metadata-ttl", "1s"]);
    api.reset_stats();
    assert_eq!(fs::metadata(m.p("other/changed")).unwrap().len(), 3);
    let c = counts(&api, "stat of a key with a member");
    assert_eq!(n(&c, "get_value") + n(&c, "bulk_get"), 0, "{c}");
    let plain = fs::metadata(m.p("other/plain")).unwrap();
    assert_eq!((plain.len(), plain.mode() & 0o777), (5, 0o644));
    // First read: the whole value, the size corrected, and a line in the log.
    assert_eq!(fs::read(m.p("other/changed")).unwrap(), b"now much longer");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fs::metadata(m.p("other/changed")).unwrap().len(), 15);
    assert!(
        m.log_text()
            .contains("records size 3 in its metadata but its value has 15"),
        "{}",
        m.log_text()
    );
}

#[test]
fn symlinks_and_empty_dirs_with_the_flag_only() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("links");
    // Without the flag nothing changes: symlinks are refused, a marker key is not shown.
    api.put(&ns, "marker/", b"");
    let m = Mount::start(&server, &[]);
    let e = std::os::unix::fs::symlink("t", m.p("links/l")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    assert!(fs::read_dir(m.p("links")).unwrap().next().is_none());
    drop(m);

    let mut m = Mount::start(&server, FLAG);
    assert!(m.p("links/marker").is_dir());
    std::os::unix::fs::symlink("target/file", m.p("links/l")).unwrap();
    assert_eq!(
        fs::read_link(m.p("links/l")).unwrap(),
        Path::new("target/file")
    );
    let lm = fs::symlink_metadata(m.p("links/l")).unwrap();
    assert!(lm.file_type().is_symlink());
    assert_eq!(lm.len(), 11);
    // cp -a copies a symlink as a symlink; mv renames it.
    sh(&format!(
        "cp -a {} {}",
        m.p("links/l").display(),
        m.p("links/l2").display()
    ));
    sh(&format!(
        "mv {} {}",
        m.p("links/l2").display(),
        m.p("links/marker/l3").display()
    ));
    assert_eq!(
        fs::read_link(m.p("links/marker/l3")).unwrap(),
        Path::new("target/file")
    );
    // A hard link stays refused.
    fs::write(m.p("links/f"), b"x").unwrap();
    let e = fs::hard_link(m.p("links/f"), m.p("links/h")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    // mkdir makes a marker; rmdir removes it; a key below removes it too.
    fs::create_dir(m.p("links/new")).unwrap();
    fs::create_dir(m.p("links/gone")).unwrap();
    m.flush();
    assert!(api.get(&ns, "new/").is_some());
    assert!(api.get(&ns, "gone/").is_some());
    assert!(api.get(&ns, "marker/").is_none(), "{:?}", api.keys(&ns));
    fs::remove_dir(m.p("links/gone")).unwrap();
    fs::write(m.p("links/new/x"), b"x").unwrap();
    // An empty directory moves with its marker, mode included.
    fs::create_dir(m.p("links/moving")).unwrap();
    fs::set_permissions(m.p("links/moving"), fs::Permissions::from_mode(0o701)).unwrap();
    m.flush();
    fs::rename(m.p("links/moving"), m.p("links/new/moved")).unwrap();
    assert!(m.unmount().success());
    let keys = api.keys(&ns);
    assert_eq!(
        keys,
        ["f", "l", "marker/l3", "new/moved/", "new/x"]
            .map(String::from)
            .to_vec()
    );
    let m = Mount::start(&server, FLAG);
    let moved = fs::metadata(m.p("links/new/moved")).unwrap();
    assert!(moved.is_dir());
    assert_eq!(moved.mode() & 0o7777, 0o701);
    assert!(m.p("links/new/x").is_file());
}
