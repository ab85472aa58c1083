//! Shared test harness: a real `kvfs serve` process on an ephemeral port.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-7f3a9c";
pub const ACCOUNT: &str = "0123456789abcdef0123456789abcdef";

/// A `kvfs serve` child process; killed on drop.
pub struct ServerProc {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub origin: String,
    pub data: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl ServerProc {
    /// Starts on a fresh temp data dir.
    pub fn start(extra: &[&str]) -> ServerProc {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().to_path_buf();
        let mut s = Self::start_on(&data, extra);
        s._tmp = Some(tmp);
        s
    }

    /// Starts on `data` (which outlives the process), e.g. to test a restart.
    pub fn start_on(data: &Path, extra: &[&str]) -> ServerProc {
        Self::spawn(data, "127.0.0.1:0", extra)
    }

    /// Stops the server and starts it again on the same address and data (and `extra` flags).
    pub fn restart(&mut self, extra: &[&str]) {
        self.stop();
        let listen = self.origin.trim_start_matches("http://").to_string();
        let tmp = self._tmp.take();
        let mut fresh = Self::spawn(&self.data, &listen, extra);
        fresh._tmp = tmp;
        // The old child is already reaped; swapping keeps Drop killing the new one.
        std::mem::swap(self, &mut fresh);
    }

    fn spawn(data: &Path, listen: &str, extra: &[&str]) -> ServerProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvfs"))
            .args(["serve", "--listen", listen, "--test-aids", "--data"])
            .arg(data)
            .args(extra)
            .env("KVFS_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kvfs serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let origin = loop {
            let line = lines
                .next()
                .expect("kvfs serve exited before listening")
                .unwrap();
            if let Some(i) = line.find("http://") {
                let url = line[i..].split_whitespace().next().unwrap();
                break url.trim_end_matches("/client/v4").to_string();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ServerProc {
            child,
            origin,
            data: data.to_path_buf(),
            _tmp: None,
        }
    }

    /// `http://127.0.0.1:PORT/client/v4`
    pub fn base_url(&self) -> String {
        format!("{}/client/v4", self.origin)
    }

    /// `http://127.0.0.1:PORT/client/v4/accounts/ACCOUNT/storage/kv/namespaces`
    pub fn ns_url(&self) -> String {
        format!(
            "{}/accounts/{ACCOUNT}/storage/kv/namespaces",
            self.base_url()
        )
    }

    /// Stops the server (SIGTERM, then waits).
    pub fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        // Up to 30 s: a loaded machine (a parallel build) has made a clean exit take over 5.
        for _ in 0..600 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long one test may take before its watchdog fails it (`KVFS_TEST_DEADLINE` seconds,
/// default 300): a hang must fail with the daemon's log, not stall CI.
pub fn test_deadline() -> Duration {
    let secs = std::env::var("KVFS_TEST_DEADLINE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// Runs `cmd` to completion, or panics once `limit` has passed (after killing its process
/// group). stdin is closed; stdout and stderr are captured.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout also reaches what a shell started.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            panic!("{what} still running after {limit:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process that is killed and reaped on drop (a failed assertion included).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
