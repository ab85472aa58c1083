//! `kvfs` as a system service: the fstab form through mount(8), the credentials file, the
//! mount guards, crash recovery, `kvfs status` and `kvfs unmount`. Every test mounts for real
//! (daemonized, as a user or mount(8) would), has a deadline on every process it runs, and
//! cleans up its mounts and daemons in Drop, even when an assertion fails.

mod common;
mod mnt;

use common::{ServerProc, ACCOUNT, TOKEN};
use mnt::{is_mounted, process_alive, Api, KVFS};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` with a deadline; panics (after killing it) when it takes longer.
fn run_with_deadline(cmd: &mut Command, secs: u64) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} still running after {secs} s");
        }
    }
}

/// `kvfs ARGS` with no credentials in the environment (they come from a file).
fn kvfs<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(args: I) -> Output {
    let mut cmd = Command::new(KVFS);
    cmd.args(args);
    for v in [
        "CLOUDFLARE_API_TOKEN",
        "CLOUDFLARE_API_KEY",
        "CLOUDFLARE_EMAIL",
        "CLOUDFLARE_ACCOUNT_ID",
        "KVFS_API_URL",
        "KVFS_TOKEN",
    ] {
        cmd.env_remove(v);
    }
    run_with_deadline(&mut cmd, 60)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A credentials file (mode 600) pointing at `server`.
fn credentials(dir: &Path, server: &ServerProc, token: &str) -> PathBuf {
    let path = dir.join("credentials");
    fs::write(
        &path,
        format!(
            "# kvfs test\nKVFS_API_URL={}\nKVFS_TOKEN=\"{token}\"\nexport CLOUDFLARE_ACCOUNT_ID={ACCOUNT}\n",
            server.base_url()
        ),
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A test's directories: mountpoints and cache dirs under one temp dir. Drop unmounts
/// whatever is still mounted there and kills the daemons that used its cache dirs.
struct Place {
    tmp: tempfile::TempDir,
    server: ServerProc,
    creds: PathBuf,
}

impl Place {
    fn new() -> Place {
        let tmp = tempfile::tempdir().unwrap();
        let server = ServerProc::start(&[]);
        let creds = credentials(tmp.path(), &server, TOKEN);
        for d in ["mnt", "mnt2", "cache", "cache2"] {
            fs::create_dir(tmp.path().join(d)).unwrap();
        }
        Place { tmp, server, creds }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// `kvfs mount MNT --credentials ... --cache-dir CACHE EXTRA`, daemonized.
    fn mount(&self, mnt: &str, cache: &str, extra: &[&str]) -> Output {
        let mut args: Vec<PathBuf> = vec!["mount".into(), self.p(mnt), "--credentials".into()];
        args.push(self.creds.clone());
        args.push("--cache-dir".into());
        args.push(self.p(cache));
        args.extend(extra.iter().map(PathBuf::from));
        kvfs(args)
    }

    fn mount_ok(&self, mnt: &str, cache: &str, extra: &[&str]) {
        let out = self.mount(mnt, cache, extra);
        assert!(out.status.success(), "mount failed: {}", stderr(&out));
        assert!(is_mounted(&self.p(mnt)), "mount returned before mounting");
    }

    /// The pid of the daemon holding `cache`'s lock.
    fn daemon_pid(&self, cache: &str) -> i32 {
        fs::read_to_string(self.p(cache).join("kvfs.lock"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn unmount(&self, mnt: &str) -> Output {
        kvfs([OsStr::new("unmount"), self.p(mnt).as_os_str()])
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        for cache in ["cache", "cache2"] {
            if let Some(pid) = fs::read_to_string(self.p(cache).join("kvfs.lock"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                if process_alive(pid) {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for mnt in ["mnt", "mnt2"] {
            let path = self.p(mnt);
            while is_mounted(&path) {
                let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                    break;
                }
            }
        }
    }
}

fn findmnt(path: &Path) -> String {
    let out = run_with_deadline(
        Command::new("findmnt")
            .args(["-n", "-o", "SOURCE,FSTYPE"])
            .arg(path),
        10,
    );
    stdout(&out).trim().to_string()
}

#[test]
fn mount_is_named_fuse_kvfs_and_a_mounted_mountpoint_is_refused() {
    let place = Place::new();
    place.mount_ok("mnt", "cache", &[]);
    let fields: Vec<String> = findmnt(&place.p("mnt"))
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(fields, ["kvfs", "fuse.kvfs"]);

    let out = place.mount("mnt", "cache2", &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already mounted"), "{}", stderr(&out));
    // Exactly one mount there, and the first still works.
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let target = format!(" {} ", place.p("mnt").display());
    assert_eq!(info.lines().filter(|l| l.contains(&target)).count(), 1);
    fs::create_dir(place.p("mnt/ns")).unwrap();
    fs::write(place.p("mnt/ns/key"), b"one").unwrap();
    assert!(place.unmount("mnt").status.success());
    let api = Api::new(&place.server);
    let ns = api.block(api.client.list_namespaces()).unwrap()[0]
        .id
        .clone();
    assert_eq!(api.get(&ns, "key").unwrap(), b"one");
}

#[test]
fn a_cache_dir_in_use_is_refused_with_its_pid() {
    let place = Place::new();
    place.mount_ok("mnt", "cache", &[]);
    let pid = place.daemon_pid("cache");
    assert!(process_alive(pid));
    let out = place.mount("mnt2", "cache", &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("in use by pid {pid}")),
        "{}",
        stderr(&out)
    );
    assert!(!is_mounted(&place.p("mnt2")));
    // A crash releases the lock: the cache dir can be used again.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) {
        assert!(Instant::now() < deadline, "daemon survived SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
    place.mount_ok("mnt2", "cache", &[]);
    assert!(place.unmount("mnt2").status.success());
    assert!(
        place.unmount("mnt").status.success(),
        "dead mount not cleared"
    );
}

#[test]
fn a_non_empty_mountpoint_is_refused_unless_allowed() {
    let place = Place::new();
    fs::write(place.p("mnt/precious"), b"mine").unwrap();
    let out = place.mount("mnt", "cache", &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert!(!is_mounted(&place.p("mnt")));

    place.mount_ok("mnt", "cache", &["-o", "allow_non_empty"]);
    assert!(!place.p("mnt/precious").exists(), "hidden while mounted");
    assert!(place.unmount("mnt").status.success());
    assert_eq!(fs::read(place.p("mnt/precious")).unwrap(), b"mine");
}

/// SIGKILL of the daemon, so nothing is flushed and the kernel mount stays, dead.
fn crash(place: &Place, cache: &str) {
    let pid = place.daemon_pid(cache);
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) {
        assert!(Instant::now() < deadline, "daemon survived SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unmount_of_a_dead_mount_clears_it() {
    let place = Place::new();
    place.mount_ok("mnt", "cache", &[]);
    crash(&place, "cache");
    let err = fs::read_dir(place.p("mnt")).unwrap_err();
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED)
        ),
        "{err}"
    );

    let out = kvfs([OsStr::new("status"), place.p("mnt").as_os_str()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("daemon has stopped"),
        "{}",
        stderr(&out)
    );

    let out = place.unmount("mnt");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("cleared"), "{}", stderr(&out));
    assert!(!is_mounted(&place.p("mnt")));
    assert!(fs::read_dir(place.p("mnt")).is_ok());
}

#[test]
fn mount_over_a_dead_mount_clears_it_and_resumes_the_journal() {
    let place = Place::new();
    let api = Api::new(&place.server);
    let ns = api.create_ns("app");
    // A long write delay: the write is only in the journal when the daemon dies.
    place.mount_ok("mnt", "cache", &["--write-delay", "1h"]);
    fs::write(place.p("mnt/app/report.txt"), b"journaled").unwrap();
    crash(&place, "cache");
    assert_eq!(api.get(&ns, "report.txt"), None);

    let out = place.mount("mnt", "cache", &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let cleared: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("dead kvfs mount"))
        .collect();
    assert_eq!(cleared.len(), 1, "{err}");
    // The journal is uploaded before the mount is served.
    assert_eq!(api.get(&ns, "report.txt").unwrap(), b"journaled");
    assert_eq!(
        fs::read(place.p("mnt/app/report.txt")).unwrap(),
        b"journaled"
    );
    assert!(place.unmount("mnt").status.success());
}

/// /usr/local/bin/kvfs → the binary under test, for mount.fuse3's fixed PATH; removed on drop.
struct InstalledLink(PathBuf);

impl InstalledLink {
    fn new() -> InstalledLink {
        let link = PathBuf::from("/usr/local/bin/kvfs");
        if link.symlink_metadata().is_ok() {
            assert_eq!(
                fs::read_link(&link).ok().as_deref(),
                Some(Path::new(KVFS)),
                "{} exists and is not this build's binary; the fstab test will not replace it",
                link.display()
            );
        } else {
            std::os::unix::fs::symlink(KVFS, &link).unwrap();
        }
        InstalledLink(link)
    }
}

impl Drop for InstalledLink {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn fstab_line_mounts_through_mount_fuse3() {
    assert!(
        ["/sbin/mount.fuse3", "/usr/sbin/mount.fuse3"]
            .iter()
            .any(|p| Path::new(p).exists()),
        "mount.fuse3 is missing: install fuse3 (scripts/setup does)"
    );
    let place = Place::new();
    let api = Api::new(&place.server);
    let ns = api.create_ns("myapp");
    let _link = InstalledLink::new();
    // What mount(8) and systemd add is ignored; `-` and `_` spellings both work.
    let fstab = place.p("fstab");
    fs::write(
        &fstab,
        format!(
            "kvfs:myapp {} fuse.kvfs credentials={},cache-dir={},allow_other,write_delay=50ms,noexec,nofail,_netdev,x-systemd.automount 0 0\n",
            place.p("mnt").display(),
            place.creds.display(),
            place.p("cache").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("mount");
    cmd.arg("-T").arg(&fstab).arg(place.p("mnt"));
    // mount.fuse3 runs kvfs with its own PATH; credentials come only from the file.
    cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    let out = run_with_deadline(&mut cmd, 60);
    assert!(out.status.success(), "mount -T failed: {}", stderr(&out));
    assert_eq!(findmnt(&place.p("mnt")), "kvfs:myapp fuse.kvfs");
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(&format!(" {} ", place.p("mnt").display())))
        .unwrap();
    assert!(
        line.contains("noexec") && line.contains("allow_other"),
        "{line}"
    );

    // The namespace is the root.
    fs::write(place.p("mnt/from-fstab"), b"hello").unwrap();
    let out = place.unmount("mnt");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(api.get(&ns, "from-fstab").unwrap(), b"hello");
    assert!(!is_mounted(&place.p("mnt")));
}

#[test]
fn a_credentials_file_others_can_read_is_refused() {
    let place = Place::new();
    fs::set_permissions(&place.creds, fs::Permissions::from_mode(0o644)).unwrap();
    let out = place.mount("mnt", "cache", &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&place.creds.display().to_string()) && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(TOKEN), "secret in a message: {err}");
    assert!(!is_mounted(&place.p("mnt")));
}

#[test]
fn refused_credentials_are_not_an_unreachable_api() {
    let place = Place::new();
    let bad = place.p("bad");
    fs::create_dir(&bad).unwrap();
    let creds = credentials(&bad, &place.server, "wrong-token");
    let out = kvfs([
        OsStr::new("mount"),
        place.p("mnt").as_os_str(),
        OsStr::new("--credentials"),
        creds.as_os_str(),
        OsStr::new("--cache-dir"),
        place.p("cache").as_os_str(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("refused the credentials"), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");
    assert!(!err.contains("wrong-token"), "secret in a message: {err}");
    assert!(!is_mounted(&place.p("mnt")));
}

#[test]
fn status_speaks_to_people_from_any_path_and_json_to_programs() {
    let place = Place::new();
    let api = Api::new(&place.server);
    api.create_ns("app");
    place.mount_ok("mnt", "cache", &["--write-delay", "1h"]);
    fs::create_dir_all(place.p("mnt/app/sub/dir")).unwrap();
    fs::write(place.p("mnt/app/sub/dir/a"), b"12345").unwrap();
    fs::write(place.p("mnt/app/b"), b"67").unwrap();

    let out = kvfs([OsStr::new("status"), place.p("mnt/app/sub/dir").as_os_str()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    let cache = place.p("cache");
    for want in [
        format!("kvfs at {}", place.p("mnt").display()),
        "pending:    2 writes (7 bytes), 0 deletes".to_string(),
        "requests:".to_string(),
        "list_namespaces".to_string(),
        "cache:".to_string(),
        "hidden:".to_string(),
        format!("cache dir:  {}", cache.display()),
        format!("log:        {}", cache.join("kvfs.log").display()),
    ] {
        assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    }
    assert!(text.contains(", up "), "{text}");

    let out = kvfs([
        OsStr::new("status"),
        OsStr::new("--json"),
        place.p("mnt/app/b").as_os_str(),
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["pending"]["writes"], 2, "{json}");
    assert_eq!(json["pid"], place.daemon_pid("cache"), "{json}");
    assert_eq!(json["cache_dir"], cache.to_str().unwrap(), "{json}");

    // Without PATH: every kvfs mount (other mounts on this machine may be listed too).
    let out = kvfs([OsStr::new("status"), OsStr::new("--json")]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mine = place.p("mnt").display().to_string();
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountpoint"] == mine.as_str()),
        "{all}"
    );

    // Outside any mount: a sentence, not an errno.
    let out = kvfs([OsStr::new("status"), place.p("cache").as_os_str()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not inside a kvfs mount"),
        "{}",
        stderr(&out)
    );
    assert!(place.unmount("mnt").status.success());
}

#[test]
fn unmount_of_a_read_only_mount_exits_0() {
    let place = Place::new();
    let api = Api::new(&place.server);
    let ns = api.create_ns("app");
    api.put(&ns, "k", b"v");
    place.mount_ok("mnt", "cache", &["-o", "ro"]);
    assert_eq!(fs::read(place.p("mnt/app/k")).unwrap(), b"v");
    let err = fs::write(place.p("mnt/app/new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let out = place.unmount("mnt");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert!(!is_mounted(&place.p("mnt")));
}

#[test]
fn unmount_shows_progress_on_a_terminal_only() {
    let place = Place::new();
    let api = Api::new(&place.server);
    let ns = api.create_ns("app");
    place.mount_ok("mnt", "cache", &["--write-delay", "1h"]);
    for i in 0..20 {
        fs::write(place.p(&format!("mnt/app/f{i}")), b"data").unwrap();
    }
    // script(1) gives `kvfs unmount` a terminal.
    let cmd = format!("{KVFS} unmount {}", place.p("mnt").display());
    let out = run_with_deadline(
        Command::new("script")
            .args(["-q", "-e", "-c", &cmd, "/dev/null"])
            .env("TERM", "dumb"),
        60,
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains("uploading: 20 changes (80 bytes) left"),
        "{text:?}"
    );
    assert_eq!(api.keys(&ns).len(), 20);

    // Not a terminal: quiet.
    place.mount_ok("mnt", "cache", &["--write-delay", "1h"]);
    for i in 0..20 {
        fs::write(place.p(&format!("mnt/app/g{i}")), b"data").unwrap();
    }
    let out = place.unmount("mnt");
    assert!(out.status.success());
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert_eq!(api.keys(&ns).len(), 40);
}

#[test]
fn man_pages_and_completions_generate() {
    let dir = tempfile::tempdir().unwrap();
    let out = kvfs([
        OsStr::new("generate"),
        OsStr::new("man"),
        dir.path().as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "kvfs.1",
        "kvfs-mount.1",
        "kvfs-unmount.1",
        "kvfs-status.1",
        "kvfs-serve.1",
    ] {
        let text = fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}: {text}");
    }
    let mount_page = fs::read_to_string(dir.path().join("kvfs-mount.1")).unwrap();
    assert!(mount_page.contains("credentials"), "{mount_page}");
    let out = kvfs([
        OsStr::new("generate"),
        OsStr::new("completions"),
        dir.path().as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bash = fs::read_to_string(dir.path().join("kvfs.bash")).unwrap();
    assert!(bash.contains("--cache-dir"), "{bash}");
    assert!(dir.path().join("_kvfs").is_file());
    assert!(dir.path().join("kvfs.fish").is_file());
}

#[test]
fn help_texts() {
    let mount = stdout(&kvfs(["mount", "--help"]));
    assert!(
        !mount.contains("=]"),
        "an unset variable shown as empty:\n{mount}"
    );
    assert!(mount.contains("KVFS_API_URL"), "{mount}");
    assert!(!mount.contains("default_permissions"), "{mount}");
    assert!(mount.contains("--credentials"), "{mount}");
    let unmount = stdout(&kvfs(["unmount", "--help"]));
    assert!(unmount.contains("journal"), "{unmount}");
    let serve = stdout(&kvfs(["serve", "--help"]));
    assert!(serve.contains("not the embedded store"), "{serve}");
}
