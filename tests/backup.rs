//! Backup and restore with rsync and cp, and the faults they must survive: a killed daemon, a
//! restarted or unreachable server, a server that fails a share of requests.

mod common;
mod mnt;

use common::{wait_until, ServerProc, TOKEN};
use mnt::{await_enoent, sh, transferred, Api, Mount, Proxy};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// How long a test waits for a condition that should hold within about a second.
const SOON: Duration = Duration::from_secs(20);

/// A tree with nested directories, binary and empty values, a 25 MiB value (when `big`),
/// and names with spaces, `%` and unicode.
fn make_tree(root: &Path, big: bool) {
    for dir in ["a/b/c", "with space", "ünï/cødé", "100%"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::write(root.join("top.txt"), b"top level").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("a/b/c/deep.txt"), b"deep").unwrap();
    fs::write(root.join("a/binary.bin"), (0..=255u8).collect::<Vec<_>>()).unwrap();
    fs::write(root.join("with space/a file.txt"), b"spaces").unwrap();
    fs::write(root.join("ünï/cødé/✓.txt"), "unicode ✓".as_bytes()).unwrap();
    fs::write(root.join("100%/50% off?.txt"), b"percent").unwrap();
    for i in 0..50 {
        fs::write(root.join(format!("a/b/n{i:02}")), format!("value {i}")).unwrap();
    }
    if big {
        let v: Vec<u8> = (0..25 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
        fs::write(root.join("a/big.bin"), v).unwrap();
    }
    fs::set_permissions(root.join("top.txt"), fs::Permissions::from_mode(0o600)).unwrap();
}

fn writes(api: &Api) -> u64 {
    let s = api.stats();
    ["bulk_write", "put_value", "bulk_delete", "delete_value"]
        .iter()
        .map(|op| s[*op].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn rsync_both_ways_round_trips_and_repeats_as_no_ops() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    api.create_ns("restore");
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), true);
    let (s, target) = (src.path().display(), "restore");

    // Restore into a namespace, then a second identical run: nothing transferred or written.
    let mut m = Mount::start(&server, &[]);
    sh(&format!("rsync -a {s}/ {}/", m.p(target).display()));
    assert!(m.unmount().success());
    let (dir, cache) = m.into_dirs();
    let mut m = Mount::start_at(&server, dir, cache, &[]);
    api.reset_stats();
    let stats = sh(&format!("rsync -a --stats {s}/ {}/", m.p(target).display()));
    assert_eq!(transferred(&stats), 0, "{stats}");
    assert_eq!(writes(&api), 0, "{}", api.stats());

    // Back up out of the mount: identical content, mode and mtime; again a no-op the second time.
    let backup = tempfile::tempdir().unwrap();
    let b = backup.path().display();
    sh(&format!("rsync -a {}/ {b}/", m.p(target).display()));
    sh(&format!("diff -r {s} {b}"));
    let mode = fs::metadata(backup.path().join("top.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (a, z) = (
        fs::metadata(src.path().join("a/binary.bin")).unwrap(),
        fs::metadata(backup.path().join("a/binary.bin")).unwrap(),
    );
    assert_eq!(a.modified().unwrap(), z.modified().unwrap());
    let stats = sh(&format!("rsync -a --stats {}/ {b}/", m.p(target).display()));
    assert_eq!(transferred(&stats), 0, "{stats}");
    assert!(m.unmount().success());
    assert_eq!(writes(&api), 0, "{}", api.stats());
}

#[test]
fn rsync_x_carries_kv_xattrs_and_cp_a_keeps_attributes() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("x");
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("doc"), b"with metadata").unwrap();
    let doc = src.path().join("doc");
    sh(&format!(
        "setfattr -n user.kv.metadata -v '{{\"tag\":\"a\"}}' '{}'",
        doc.display()
    ));
    let m = Mount::start(&server, &[]);
    sh(&format!(
        "rsync -aX {}/ {}/",
        src.path().display(),
        m.p("x").display()
    ));
    m.flush();
    assert_eq!(
        api.key_info(&ns, "doc").unwrap().metadata.unwrap()["tag"],
        "a"
    );
    let out = tempfile::tempdir().unwrap();
    sh(&format!(
        "rsync -aX {}/ {}/",
        m.p("x").display(),
        out.path().display()
    ));
    let got = sh(&format!(
        "getfattr --only-values -n user.kv.metadata '{}'",
        out.path().join("doc").display()
    ));
    assert_eq!(got, r#"{"tag":"a"}"#);

    // cp -a in and out keeps content, mode and mtime.
    fs::set_permissions(&doc, fs::Permissions::from_mode(0o640)).unwrap();
    sh(&format!(
        "touch -d '2001-02-03 04:05:06' '{}'",
        doc.display()
    ));
    sh(&format!(
        "cp -a '{}' '{}'",
        doc.display(),
        m.p("x/copied").display()
    ));
    let back = out.path().join("copied-back");
    sh(&format!(
        "cp -a '{}' '{}'",
        m.p("x/copied").display(),
        back.display()
    ));
    let (a, b) = (fs::metadata(&doc).unwrap(), fs::metadata(&back).unwrap());
    assert_eq!(fs::read(&back).unwrap(), b"with metadata");
    assert_eq!(a.modified().unwrap(), b.modified().unwrap());
    assert_eq!(b.permissions().mode() & 0o777, 0o640);
}

#[test]
fn sigkill_after_cp_loses_nothing() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("crash");
    let src = tempfile::tempdir().unwrap();
    for d in 0..4 {
        fs::create_dir_all(src.path().join(format!("d{d}"))).unwrap();
        for i in 0..500 {
            fs::write(src.path().join(format!("d{d}/f{i}")), format!("{d}-{i}")).unwrap();
        }
    }
    // A long write delay: when cp returns, everything is in the journal and nothing uploaded.
    let mut m = Mount::start(&server, &["--write-delay", "60s"]);
    sh(&format!(
        "cp -r {}/. {}/",
        src.path().display(),
        m.p("crash").display()
    ));
    assert!(api.keys(&ns).is_empty());
    m.kill();
    let (dir, cache) = m.into_dirs();
    // The next mount of the same account uploads the journal before serving.
    let m = Mount::start_at(&server, dir, cache, &[]);
    assert_eq!(api.keys(&ns).len(), 2000);
    assert_eq!(api.get(&ns, "d3/f499").unwrap(), b"3-499");
    assert_eq!(fs::read(m.p("crash/d2/f7")).unwrap(), b"2-7");
}

#[test]
fn server_restart_mid_upload_and_unreachable_at_unmount() {
    let mut server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("outage");
    // Short client backoff: the unmount below retries against a stopped server.
    let (dir, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = ["--write-delay", "60s"];
    let mut m = Mount::start_env(
        &server,
        dir,
        cache,
        &extra,
        &[("KVFS_TEST_BACKOFF_MS", "10")],
    );
    for i in 0..200 {
        fs::write(m.p(&format!("outage/k{i}")), format!("v{i}")).unwrap();
    }
    // The server goes away; unmount cannot upload, says so, and exits non-zero.
    server.stop();
    let out = m.unmount_output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("200 writes") && err.contains("next mount"),
        "{err}"
    );
    assert!(!mnt::is_mounted(m.path()));
    let (dir, cache) = m.into_dirs();

    // Back up: the next mount uploads what the journal kept.
    server.restart(&[]);
    let m = Mount::start_at(&server, dir, cache, &["--write-delay", "60s"]);
    assert_eq!(api.keys(&ns).len(), 200);

    // Killed in the middle of an upload and started again: the uploader retries until done.
    for i in 0..200 {
        fs::write(m.p(&format!("outage/j{i}")), format!("w{i}")).unwrap();
    }
    server.stop();
    let failures = m.log_text().matches("will retry").count();
    let flusher = {
        let path = m.path().to_path_buf();
        std::thread::spawn(move || {
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
            let name = std::ffi::CString::new("user.kvfs.flush").unwrap();
            unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) }
        })
    };
    // Back once the upload has failed at least once.
    wait_until("a failed upload", SOON, || {
        m.log_text().matches("will retry").count() > failures
    });
    server.restart(&[]);
    assert_eq!(flusher.join().unwrap(), 0, "flush after the restart failed");
    assert_eq!(api.keys(&ns).len(), 400);
    assert_eq!(api.get(&ns, "j199").unwrap(), b"w199");
}

#[test]
fn a_failing_server_loses_nothing() {
    let server = ServerProc::start(&["--fail-rate", "0.1", "--seed", "42"]);
    let api = Api::new(&server);
    let ns = api.create_ns("flaky");
    let src = tempfile::tempdir().unwrap();
    for d in 0..4 {
        fs::create_dir_all(src.path().join(format!("d{d}"))).unwrap();
        for i in 0..500 {
            fs::write(src.path().join(format!("d{d}/f{i}")), format!("{d}:{i}")).unwrap();
        }
    }
    let mut m = Mount::start(&server, &[]);
    sh(&format!(
        "cp -r {}/. {}/",
        src.path().display(),
        m.p("flaky").display()
    ));
    assert!(m.unmount().success(), "{}", m.log_text());
    assert_eq!(api.keys(&ns).len(), 2000);
    let m = Mount::start(&server, &[]);
    let out = tempfile::tempdir().unwrap();
    sh(&format!(
        "rsync -a {}/ {}/",
        m.p("flaky").display(),
        out.path().display()
    ));
    sh(&format!(
        "diff -r {} {}",
        src.path().display(),
        out.path().display()
    ));
}

#[test]
fn bad_input_is_refused_and_the_mount_keeps_serving() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("bad");
    api.put(&ns, "keep", b"intact");
    api.put(&ns, "vanishing", b"still readable");
    let m = Mount::start(&server, &["--metadata-ttl", "1s"]);
    // A key deleted through the API while open for reading: the open file reads to the end.
    let mut f = fs::File::open(m.p("bad/vanishing")).unwrap();
    api.delete(&ns, "vanishing");
    let mut s = String::new();
    std::io::Read::read_to_string(&mut f, &mut s).unwrap();
    assert_eq!(s, "still readable");
    await_enoent(&m.p("bad/vanishing"), SOON);
    // mkdir of a namespace title that exists.
    assert_eq!(
        mnt::errno(fs::create_dir(m.p("bad")).unwrap_err()),
        libc::EEXIST
    );
    // A namespace deleted through the API while mounted disappears after the TTL.
    let gone = api.create_ns("gone");
    api.put(&gone, "k", b"v");
    wait_until("the new namespace", SOON, || {
        fs::read(m.p("gone/k")).is_ok_and(|v| v == b"v")
    });
    api.block(api.client.delete_namespace(&gone)).unwrap();
    await_enoent(&m.p("gone"), SOON);
    // Other data is intact.
    assert_eq!(fs::read(m.p("bad/keep")).unwrap(), b"intact");
    assert_eq!(api.get(&ns, "keep").unwrap(), b"intact");
}

#[test]
fn secrets_stay_out_of_logs_and_the_cache_is_private() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("sec");
    let mut m = Mount::start(&server, &["--write-delay", "60s", "--debug"]);
    // Staged files are named by id, so no key name can reach outside the cache dir. (Small
    // values are staged in memory and in the journal; 2 MiB goes to a staging file.)
    api.put(&ns, "x/y", b"v");
    fs::write(m.p("sec/x/z.txt"), vec![b'p'; 2 << 20]).unwrap();
    fs::write(m.p("sec/x/small.txt"), b"pending").unwrap();
    let cache = m.cache.path().join("c");
    assert_eq!(
        fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let staged: Vec<String> = fs::read_dir(cache.join("staging"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    assert!(
        staged[0].starts_with('s') && !staged[0].contains("z.txt"),
        "{staged:?}"
    );

    // The daemon's command line never holds it (it came in KVFS_TOKEN).
    let pid = m.pid().unwrap();
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(cmdline.contains("mount"), "not the daemon's: {cmdline}");
    assert!(!cmdline.contains(TOKEN), "token in argv: {cmdline}");

    assert!(m.unmount().success());
    let log = m.log_text();
    assert!(log.contains("bulk_write"), "debug log expected");
    assert!(!log.contains(TOKEN), "token in the mount's log");
}

#[test]
fn sigterm_uploads_then_unmounts() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("term");
    let mut m = Mount::start(&server, &["--write-delay", "60s"]);
    fs::write(m.p("term/k"), b"before the signal").unwrap();
    assert_eq!(api.get(&ns, "k"), None);
    let status = m.terminate();
    assert!(status.success(), "{}", m.log_text());
    assert!(!mnt::is_mounted(m.path()));
    assert_eq!(api.get(&ns, "k").unwrap(), b"before the signal");
}

#[test]
fn a_change_refused_for_good_is_kept_and_reported() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let gone = api.create_ns("doomed");
    let keep = api.create_ns("kept");
    let mut m = Mount::start(&server, &["--write-delay", "60s"]);
    fs::write(m.p("doomed/a"), b"nowhere to go").unwrap();
    fs::write(m.p("kept/b"), b"fine").unwrap();
    // The namespace goes away before the upload: KV answers 404, which no retry can fix.
    api.block(api.client.delete_namespace(&gone)).unwrap();
    let out = m.unmount_output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("1 refused") && err.contains("\"a\""), "{err}");
    // Everything else went up.
    assert_eq!(api.get(&keep, "b").unwrap(), b"fine");
    // The refused change stays in the journal on disk: the next mount on the same cache dir
    // reports it, with the reason, and does not send it again.
    let (dir, cache) = m.into_dirs();
    api.reset_stats();
    let m = Mount::start_at(&server, dir, cache, &["--write-delay", "60s"]);
    let status = m.status();
    let sent = api.stat("bulk_write") + api.stat("put_value");
    assert_eq!(sent, 0, "a refused change was sent again: {}", api.stats());
    let pending = &status["pending"];
    assert_eq!(pending["refused"], 1, "{status}");
    assert_eq!(pending["writes"], 1, "{status}");
    assert_eq!(pending["first"][0]["key"], "a", "{status}");
    assert_eq!(pending["first"][0]["namespace"], gone.as_str(), "{status}");
    // The server's own words, not a bare errno.
    let why = pending["first"][0]["error"].as_str().unwrap_or_default();
    assert!(why.contains("namespace not found"), "reason: {why:?}");
}

#[test]
fn close_records_the_change_before_the_last_release() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("closed");
    let mut m = Mount::start(&server, &["--write-delay", "60s"]);
    // Two descriptors of one open file: closing one is close() (FUSE flush) without the
    // release that only the last close brings.
    let mut f = fs::File::create(m.p("closed/k")).unwrap();
    let still_open = f.try_clone().unwrap();
    f.write_all(b"recorded at close").unwrap();
    drop(f);
    let status = m.status();
    assert_eq!(status["pending"]["writes"], 1, "{status}");
    // A crash now loses nothing: the next mount uploads what close() journaled.
    m.kill();
    drop(still_open);
    let (dir, cache) = m.into_dirs();
    let _m = Mount::start_at(&server, dir, cache, &[]);
    assert_eq!(api.get(&ns, "k").unwrap(), b"recorded at close");
}

#[test]
fn deletes_wait_while_the_namespace_has_a_refused_put() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("held");
    api.put(&ns, "old", b"the only copy");
    let mut m = Mount::start(&server, &["--write-delay", "60s"]);
    // A rename is a put of the new key and a delete of the old one. The put carries an
    // expiration that is valid now; a server clock an hour ahead refuses it for good (400).
    fs::rename(m.p("held/old"), m.p("held/new")).unwrap();
    let at = kvfs::api::limits::now_secs() + 600;
    sh(&format!(
        "setfattr -n user.kv.expiration -v {at} '{}'",
        m.p("held/new").display()
    ));
    api.set_clock_offset(3600);
    let out = m.unmount_output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("1 refused"), "{err}");
    api.set_clock_offset(0);
    // The delete was held back: the old key, the only copy of the value, is still there.
    assert_eq!(api.get(&ns, "old").unwrap(), b"the only copy");
    assert_eq!(api.get(&ns, "new"), None);
}

#[test]
fn deletes_wait_while_the_namespace_puts_fail() {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("retry");
    api.put(&ns, "old", b"the only copy");
    // Writes fail (connection dropped) while every other request passes.
    let proxy = Proxy::start(&server);
    let (dir, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = ["--write-delay", "60s"];
    let fast = [("KVFS_TEST_BACKOFF_MS", "10")];
    let mut m = Mount::start_url(&proxy.base_url, dir, cache, &extra, &fast);
    fs::rename(m.p("retry/old"), m.p("retry/new")).unwrap();
    proxy
        .block_puts
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let out = m.unmount_output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // Retried, not refused: both changes stay for the next mount.
    assert!(
        err.contains("write \"new\"") && err.contains("delete \"old\""),
        "{err}"
    );
    // The rename's delete waited for its put: the old key is still there.
    assert_eq!(api.get(&ns, "old").unwrap(), b"the only copy");
    assert_eq!(api.get(&ns, "new"), None);
    // Writes pass again: the next mount uploads both, the put first.
    proxy
        .block_puts
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (dir, cache) = m.into_dirs();
    let _m = Mount::start_url(&proxy.base_url, dir, cache, &[], &[]);
    assert_eq!(api.get(&ns, "new").unwrap(), b"the only copy");
    assert_eq!(api.get(&ns, "old"), None);
}
