//! Modes, owners, times and link counts through the kernel: what tools set must stick, as on a
//! local filesystem, and the kernel must enforce the permission bits.

mod common;
mod mnt;

use common::ServerProc;
use mnt::{sh, sh_fails, Api, Mount};
use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::time::Duration;

fn setup(extra: &[&str]) -> (ServerProc, Api, Mount, String) {
    let server = ServerProc::start(&[]);
    let api = Api::new(&server);
    let ns = api.create_ns("attrs");
    let mount = Mount::start(&server, extra);
    (server, api, mount, ns)
}

fn mode(p: &std::path::Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Runs `script` in sh as the user `nobody` (uid 65534).
fn as_nobody(script: &str) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("setpriv (util-linux)")
}

#[test]
fn create_mode_follows_the_umask_and_mkdir_mode() {
    let (_server, _api, mount, _ns) = setup(&[]);
    let dir = mount.p("attrs");
    sh(&format!(
        "cd {} && umask 077 && echo s > secret && mkdir -m 700 private && mkdir open",
        dir.display()
    ));
    assert_eq!(mode(&dir.join("secret")), 0o600);
    assert_eq!(mode(&dir.join("private")), 0o700);
    assert_eq!(
        mode(&dir.join("open")),
        0o700,
        "umask 077 applies to mkdir too"
    );

    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(dir.join("shared"))
        .unwrap();
    drop(f);
    assert_eq!(mode(&dir.join("shared")), 0o640);
}

#[test]
fn new_files_belong_to_their_creator_and_permissions_are_enforced() {
    let (_server, _api, mount, _ns) = setup(&["--allow-other"]);
    let tmp = mount.p("attrs/tmp");
    fs::create_dir(&tmp).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).unwrap();

    let out = as_nobody(&format!(
        "cd {} && echo a > mine && echo b >> mine && cat mine",
        tmp.display()
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\n");
    let meta = fs::metadata(tmp.join("mine")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));

    // A 600 file of root's is not readable by another user (default_permissions).
    fs::write(tmp.join("root-only"), b"secret").unwrap();
    fs::set_permissions(tmp.join("root-only"), fs::Permissions::from_mode(0o600)).unwrap();
    let out = as_nobody(&format!("cat {}", tmp.join("root-only").display()));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cp_p_and_tar_keep_modes_and_mtimes_across_a_remount() {
    let (server, _api, mut mount, _ns) = setup(&["--write-delay", "100ms"]);
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("a.txt"), b"alpha").unwrap();
    fs::write(src.path().join("b.bin"), [0u8, 159, 146, 150]).unwrap();
    sh(&format!(
        "cd {} && chmod 640 a.txt && chmod 751 b.bin && touch -m -d '2001-02-03 04:05:06' a.txt b.bin \
         && tar cf ../src.tar a.txt b.bin",
        src.path().display()
    ));
    let tarball = src.path().parent().unwrap().join("src.tar");
    let dst = mount.p("attrs/cp");
    fs::create_dir(&dst).unwrap();
    // cp -p sets mode and times on the open file (fchmod, futimens) before close.
    sh(&format!(
        "cp -p {}/a.txt {}/b.bin {}/",
        src.path().display(),
        src.path().display(),
        dst.display()
    ));
    let untar = mount.p("attrs/tar");
    fs::create_dir(&untar).unwrap();
    sh(&format!(
        "tar xf {} -C {}",
        tarball.display(),
        untar.display()
    ));
    fs::remove_file(&tarball).unwrap();

    let check = |mount: &Mount| {
        for dir in ["attrs/cp", "attrs/tar"] {
            for (name, m) in [("a.txt", 0o640), ("b.bin", 0o751)] {
                let p = mount.p(&format!("{dir}/{name}"));
                let meta = fs::metadata(&p).unwrap();
                assert_eq!(meta.permissions().mode() & 0o7777, m, "{}", p.display());
                let src_mtime = fs::metadata(src.path().join(name)).unwrap().mtime();
                assert_eq!(meta.mtime(), src_mtime, "{}", p.display());
                assert!(src_mtime < 1_000_000_000, "the source is from 2001");
            }
        }
    };
    check(&mount);
    assert_eq!(mount.unmount().code(), Some(0), "{}", mount.log_text());
    let (dir, cache) = mount.into_dirs();
    let mount = Mount::start_at(&server, dir, cache, &[]);
    check(&mount);
    // No file differs, so rsync has nothing to send. (Directory times last for the mount's
    // life only: -O leaves them out.)
    let out = sh(&format!(
        "rsync -a -O --itemize-changes {}/ {}/",
        src.path().display(),
        mount.p("attrs/cp").display()
    ));
    assert_eq!(out.trim(), "", "rsync would rewrite: {out}");
}

#[test]
fn times_and_link_counts_move_as_on_a_local_filesystem() {
    let (_server, _api, mount, _ns) = setup(&[]);
    let f = mount.p("attrs/f");
    fs::write(&f, b"0123456789").unwrap();
    let before = fs::metadata(&f).unwrap();
    std::thread::sleep(Duration::from_millis(20));

    // ftruncate moves mtime and ctime.
    let file = fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(4).unwrap();
    let after = file.metadata().unwrap();
    drop(file);
    assert!(after.mtime_nsec() != before.mtime_nsec() || after.mtime() > before.mtime());
    assert_eq!(after.len(), 4);

    // chmod moves ctime, not mtime.
    std::thread::sleep(Duration::from_millis(20));
    let m0 = fs::metadata(&f).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o604)).unwrap();
    let m1 = fs::metadata(&f).unwrap();
    assert_eq!((m1.mtime(), m1.mtime_nsec()), (m0.mtime(), m0.mtime_nsec()));
    assert!((m1.ctime(), m1.ctime_nsec()) > (m0.ctime(), m0.ctime_nsec()));

    // atime can be set.
    sh(&format!(
        "touch -a -d '2010-01-01 00:00:00 UTC' {}",
        f.display()
    ));
    assert_eq!(fs::metadata(&f).unwrap().atime(), 1_262_304_000);

    // A directory's mtime moves when an entry is added; nlink is 2 + subdirectories.
    let d = mount.p("attrs/d");
    fs::create_dir(&d).unwrap();
    let d0 = fs::metadata(&d).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    fs::create_dir(d.join("s1")).unwrap();
    fs::create_dir(d.join("s2")).unwrap();
    fs::write(d.join("file"), b"x").unwrap();
    let d1 = fs::metadata(&d).unwrap();
    assert!((d1.mtime(), d1.mtime_nsec()) > (d0.mtime(), d0.mtime_nsec()));
    assert_eq!(d1.nlink(), 4);
    fs::remove_dir(d.join("s2")).unwrap();
    assert_eq!(fs::metadata(&d).unwrap().nlink(), 3);
}

#[test]
fn keys_with_nul_are_hidden_and_null_metadata_is_no_metadata() {
    let (_server, api, mount, ns) = setup(&[]);
    let items = vec![
        kvfs::api::BulkWriteItem {
            key: "dir/bad\0key".into(),
            value: "v".into(),
            base64: false,
            expiration: None,
            expiration_ttl: None,
            metadata: None,
        },
        kvfs::api::BulkWriteItem {
            key: "dir/good".into(),
            value: "v".into(),
            base64: false,
            expiration: None,
            expiration_ttl: None,
            metadata: None,
        },
    ];
    api.block(api.client.bulk_write(&ns, &items)).unwrap();
    let names: Vec<String> = fs::read_dir(mount.p("attrs/dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["good"]);
    let out = sh(&format!("ls -l {}", mount.p("attrs/dir").display()));
    assert!(!out.contains('?'), "{out}");

    let g = mount.p("attrs/dir/good");
    sh(&format!(
        "setfattr -n user.kv.metadata -v null {}",
        g.display()
    ));
    let err = sh_fails(&format!("getfattr -n user.kv.metadata {}", g.display()));
    assert!(err.contains("No such attribute"), "{err}");
}
