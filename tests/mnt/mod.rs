//! FUSE test harness: a real `kvfs mount` of a real `kvfs serve`, plus an API client to check
//! what KV holds. Tests fail (never skip) when the mount cannot be made.
#![allow(dead_code)]

use crate::common::{output_within, test_deadline, ServerProc, ACCOUNT, TOKEN};
use kvfs::client::{Auth, Client, ClientConfig, PutOptions};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const KVFS: &str = env!("CARGO_BIN_EXE_kvfs");

/// Blocking access to the API, to check the mount's effects and to make changes behind its back.
pub struct Api {
    rt: tokio::runtime::Runtime,
    pub client: Client,
    origin: String,
}

impl Api {
    pub fn new(server: &ServerProc) -> Api {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cfg = ClientConfig::new(server.base_url(), ACCOUNT, Auth::Token(TOKEN.into()));
        let client = Client::new(cfg).unwrap();
        Api {
            rt,
            client,
            origin: server.origin.clone(),
        }
    }

    pub fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn create_ns(&self, title: &str) -> String {
        self.block(self.client.create_namespace(title)).unwrap().id
    }

    pub fn ns_titles(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .block(self.client.list_namespaces())
            .unwrap()
            .into_iter()
            .map(|n| n.title)
            .collect();
        v.sort();
        v
    }

    pub fn put(&self, ns: &str, key: &str, value: &[u8]) {
        self.put_with(ns, key, value, PutOptions::default())
    }

    pub fn put_with(&self, ns: &str, key: &str, value: &[u8], opts: PutOptions) {
        self.block(
            self.client
                .put_value(ns, key, bytes::Bytes::copy_from_slice(value), &opts),
        )
        .unwrap()
    }

    pub fn get(&self, ns: &str, key: &str) -> Option<Vec<u8>> {
        match self.block(self.client.get_value(ns, key)) {
            Ok(v) => Some(v.bytes.to_vec()),
            Err(e) if e.is_not_found() => None,
            Err(e) => panic!("get {key}: {e}"),
        }
    }

    pub fn delete(&self, ns: &str, key: &str) {
        self.block(self.client.delete_value(ns, key)).unwrap()
    }

    pub fn keys(&self, ns: &str) -> Vec<String> {
        self.block(self.client.list_all_keys(ns, None))
            .unwrap()
            .into_iter()
            .map(|k| k.name)
            .collect()
    }

    pub fn key_info(&self, ns: &str, key: &str) -> Option<kvfs::api::KeyInfo> {
        self.block(self.client.list_all_keys(ns, Some(key)))
            .unwrap()
            .into_iter()
            .find(|k| k.name == key)
    }

    /// The server's per-operation request counts.
    pub fn stats(&self) -> serde_json::Value {
        reqwest::blocking::Client::new()
            .get(format!("{}/__kvfs/stats", self.origin))
            .bearer_auth(TOKEN)
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    pub fn stat(&self, op: &str) -> u64 {
        self.stats()[op].as_u64().unwrap_or(0)
    }

    /// The server's operation log since the last reset: operation names, oldest first.
    pub fn log(&self) -> Vec<String> {
        let v: serde_json::Value = reqwest::blocking::Client::new()
            .get(format!("{}/__kvfs/log", self.origin))
            .bearer_auth(TOKEN)
            .send()
            .unwrap()
            .json()
            .unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["op"].as_str().unwrap().to_string())
            .collect()
    }

    /// Shifts the server's clock by `secs` (for expiration checks).
    pub fn set_clock_offset(&self, secs: i64) {
        let r = reqwest::blocking::Client::new()
            .post(format!("{}/__kvfs/clock", self.origin))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({ "offset": secs }))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
    }

    pub fn reset_stats(&self) {
        reqwest::blocking::Client::new()
            .post(format!("{}/__kvfs/stats/reset", self.origin))
            .bearer_auth(TOKEN)
            .send()
            .unwrap();
    }
}

#[allow(unused_imports)]
pub use kvfs::mount::process_alive;

/// A loopback HTTP proxy in front of a server, to fail one kind of request: while
/// `block_puts` is set, a PUT (a write or bulk write) is dropped unanswered, which the mount
/// sees as a connection error and retries; everything else passes. Each connection carries one
/// request (the proxy asks the server to close it), so the choice is made per request.
pub struct Proxy {
    pub base_url: String,
    pub block_puts: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(server: &ServerProc) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = server.origin.trim_start_matches("http://").to_string();
        let block_puts = Arc::new(AtomicBool::new(false));
        let block = block_puts.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (block, upstream) = (block.clone(), upstream.clone());
                std::thread::spawn(move || relay(conn, &upstream, &block));
            }
        });
        Proxy {
            base_url: format!("http://{addr}/client/v4"),
            block_puts,
        }
    }
}

fn relay(mut client: TcpStream, upstream: &str, block: &AtomicBool) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    if head.starts_with(b"PUT ") && block.load(Ordering::SeqCst) {
        return client.shutdown(Shutdown::Both);
    }
    let mut server = TcpStream::connect(upstream)?;
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut out = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    server.write_all(out.as_bytes())?;
    // The body goes up while the answer comes back; the server closes after answering.
    let (mut from_client, mut to_server) = (client.try_clone()?, server.try_clone()?);
    std::thread::spawn(move || std::io::copy(&mut from_client, &mut to_server));
    std::io::copy(&mut server, &mut client)?;
    client.shutdown(Shutdown::Both)
}

/// Is `path` a mount point right now?
pub fn is_mounted(path: &Path) -> bool {
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(|p| unescape(p) == want.to_string_lossy())
            .unwrap_or(false)
    })
}

fn unescape(p: &str) -> String {
    p.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Fails a hung test: once the test deadline passes, prints the daemon's log, then kills the
/// daemon and detaches its mount, so every blocked file system call returns (ENOTCONN) and the
/// test fails instead of hanging. Disarmed on drop.
pub struct Watchdog {
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl Watchdog {
    pub fn start(dir: &Path, log: &Path) -> Watchdog {
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let (flag, dir, log) = (done.clone(), dir.to_path_buf(), log.to_path_buf());
        let limit = test_deadline();
        std::thread::spawn(move || {
            let (lock, cv) = &*flag;
            let guard = lock.lock().unwrap();
            let (finished, _) = cv.wait_timeout_while(guard, limit, |f| !*f).unwrap();
            if *finished {
                return;
            }
            eprintln!(
                "--- test deadline of {limit:?} passed: killing the daemon of {}; its log ---\n{}",
                dir.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            abort_mount(&dir);
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *self.done.0.lock().unwrap() = true;
        self.done.1.notify_all();
    }
}

/// Pids of the `kvfs mount` processes serving `dir` (found by their command line, so a
/// daemon that forked is found too).
pub fn daemon_pids(dir: &Path) -> Vec<i32> {
    let want = dir.as_os_str().as_encoded_bytes();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.get(1) == Some(&&b"mount"[..]) && args.contains(&want)
        })
        .collect()
}

/// Kills the daemons of `dir` and detaches the mount: nothing is left behind, whatever state
/// the test is in. Never panics (it runs during unwinding).
pub fn abort_mount(dir: &Path) {
    for pid in daemon_pids(dir) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if is_mounted(dir) {
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Prints the last lines of a log, for a failing test. `log` may also be a directory holding
/// cache dirs (`$XDG_CACHE_HOME/kvfs`): then each one's `kvfs.log` is printed.
fn print_tail(what: &str, log: &Path) {
    if log.is_dir() {
        for e in std::fs::read_dir(log).into_iter().flatten().flatten() {
            print_tail(what, &e.path().join("kvfs.log"));
        }
        return;
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    eprintln!("--- last lines of {what} ({}) ---", log.display());
    for l in tail.iter().rev() {
        eprintln!("{l}");
    }
}

/// A daemon-mode mount (`kvfs mount` without `-f`) made by a test, e.g. through `sh`: on drop
/// (a failed assertion included) its daemon is killed and the mount detached, and a failing
/// test prints the daemon's log. A watchdog fails the test if it hangs.
pub struct DaemonGuard {
    dir: PathBuf,
    log: PathBuf,
    _watchdog: Watchdog,
}

impl DaemonGuard {
    /// `log` is the daemon's `kvfs.log` (in its cache dir).
    pub fn new(dir: &Path, log: PathBuf) -> DaemonGuard {
        DaemonGuard {
            dir: dir.to_path_buf(),
            _watchdog: Watchdog::start(dir, &log),
            log,
        }
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_tail("the daemon's log", &self.log);
        }
        abort_mount(&self.dir);
    }
}

/// A `kvfs mount -f` child process on a temp dir. Unmounted and killed on drop; a watchdog
/// fails the test, with the daemon's log, if it hangs.
pub struct Mount {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub cache: tempfile::TempDir,
    pub log: PathBuf,
    _watchdog: Watchdog,
}

impl Mount {
    /// Mounts the whole account of `server`, with `extra` flags.
    pub fn start(server: &ServerProc, extra: &[&str]) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        Self::start_at(server, dir, cache, extra)
    }

    pub fn start_at(
        server: &ServerProc,
        dir: tempfile::TempDir,
        cache: tempfile::TempDir,
        extra: &[&str],
    ) -> Mount {
        Self::start_env(server, dir, cache, extra, &[])
    }

    /// `start_at` with extra environment variables for the daemon.
    pub fn start_env(
        server: &ServerProc,
        dir: tempfile::TempDir,
        cache: tempfile::TempDir,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Mount {
        Self::start_url(&server.base_url(), dir, cache, extra, env)
    }

    /// A mount of the API at `base_url` (e.g. a [`Proxy`]'s).
    pub fn start_url(
        base_url: &str,
        dir: tempfile::TempDir,
        cache: tempfile::TempDir,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Mount {
        let log = cache.path().join("test-mount.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(KVFS)
            .arg("mount")
            .arg(dir.path())
            .args(["-f", "--api-url", base_url, "--cache-dir"])
            .arg(cache.path().join("c"))
            .args(extra)
            .env("KVFS_TOKEN", TOKEN)
            .env("CLOUDFLARE_ACCOUNT_ID", ACCOUNT)
            .env_remove("CLOUDFLARE_API_TOKEN")
            .env("RUST_LOG", "kvfs=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("spawn kvfs mount");
        let mut m = Mount {
            child: Some(child),
            _watchdog: Watchdog::start(dir.path(), &log),
            dir,
            cache,
            log,
        };
        m.wait_mounted();
        m
    }

    fn wait_mounted(&mut self) {
        let start = Instant::now();
        while !is_mounted(self.dir.path()) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "kvfs mount exited with {status} before mounting:\n{}",
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "mount not ready after 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's pid (None once it was unmounted, terminated or killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kvfs status` of this mount, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = sh(&format!("{KVFS} status --json '{}'", self.path().display()));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status: {e}: {out}"))
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Uploads everything pending now (what `kvfs unmount` does first), so the API shows it.
    pub fn flush(&self) {
        let c = std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes()).unwrap();
        let name = std::ffi::CString::new("user.kvfs.flush").unwrap();
        let rc = unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
        assert_eq!(rc, 0, "flush failed: {}", std::io::Error::last_os_error());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kvfs unmount`; returns its exit status after the daemon is gone.
    pub fn unmount(&mut self) -> ExitStatus {
        self.unmount_output().status
    }

    /// `kvfs unmount`, with its output; waits for the daemon to exit when it succeeded.
    pub fn unmount_output(&mut self) -> Output {
        let out = output_within(
            Command::new(KVFS).arg("unmount").arg(self.dir.path()),
            test_deadline(),
        );
        if out.status.success() {
            if let Some(mut c) = self.child.take() {
                let deadline = Instant::now() + Duration::from_secs(20);
                while c.try_wait().unwrap().is_none() {
                    assert!(
                        Instant::now() < deadline,
                        "daemon still running after unmount"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        } else {
            eprintln!(
                "kvfs unmount failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    /// SIGTERM to the daemon: it uploads, unmounts and exits; returns its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL of the daemon: no flush, no unmount (the kernel mount is then cleaned up).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.teardown();
    }

    /// Hands the mount directory and cache over (e.g. to remount on the same cache).
    pub fn into_dirs(mut self) -> (tempfile::TempDir, tempfile::TempDir) {
        self.teardown();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let cache = std::mem::replace(&mut self.cache, tempfile::tempdir().unwrap());
        (dir, cache)
    }

    fn teardown(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        abort_mount(self.dir.path());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_tail("the mount's log", &self.log);
        }
        self.teardown();
    }
}

/// Runs a command (within the test deadline); panics with its output unless it succeeds.
/// Returns stdout.
pub fn sh(cmd: &str) -> String {
    let out = output_within(Command::new("sh").arg("-c").arg(cmd), test_deadline());
    assert!(
        out.status.success(),
        "`{cmd}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command expected to fail; returns its stderr.
pub fn sh_fails(cmd: &str) -> String {
    let out = output_within(Command::new("sh").arg("-c").arg(cmd), test_deadline());
    assert!(!out.status.success(), "`{cmd}` should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The errno of an io::Error.
pub fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// `path` does not exist: ENOENT exactly (a dead daemon's ENOTCONN, or EIO, fails).
#[track_caller]
pub fn assert_enoent(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(_) => panic!("{} exists", path.display()),
        Err(e) => assert_eq!(errno(e), libc::ENOENT, "{}", path.display()),
    }
}

/// Waits (within `limit`) until `path` gives ENOENT; any other error fails at once.
#[track_caller]
pub fn await_enoent(path: &Path, limit: Duration) {
    let start = Instant::now();
    loop {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return,
            Err(e) => panic!("{}: {e}", path.display()),
            Ok(_) => assert!(
                start.elapsed() < limit,
                "{} still there after {limit:?}",
                path.display()
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// getxattr(2): the value, or the errno.
pub fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// setxattr(2), or the errno.
pub fn setxattr(path: &Path, name: &str, value: &[u8]) -> Result<(), i32> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    Ok(())
}

/// The "Number of regular files transferred" of `rsync --stats` output.
pub fn transferred(stats: &str) -> u64 {
    let line = stats
        .lines()
        .find(|l| l.starts_with("Number of regular files transferred"))
        .unwrap_or_else(|| panic!("no transfer count in:\n{stats}"));
    line.rsplit(':')
        .next()
        .unwrap()
        .trim()
        .replace(',', "")
        .parse()
        .unwrap()
}
