//! `kvfs mount`, `kvfs unmount`, `kvfs status`: backend choice, daemonizing with a readiness
//! pipe, the FUSE session, and a clean shutdown on unmount, SIGTERM and SIGINT.

use crate::api::Namespace;
use crate::backend::KvBackend;
use crate::cli::{MountArgs, StatusArgs, UnmountArgs};
use crate::client::{Auth, Client, ClientConfig};
use crate::fs::{xattr, Fs, FsConfig};
use crate::fuse::KvFuse;
use crate::server::local::LocalStore;
use crate::text::count;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// Where the mount's data comes from.
enum Backend {
    /// The embedded local store (kvfs serve's SQLite store, called in-process), data here.
    Local(PathBuf),
    /// A remote API (Cloudflare, or a `kvfs serve` given by --api-url).
    Remote(ClientConfig),
}

impl Backend {
    /// First match wins: --api-url / KVFS_API_URL; Cloudflare credentials; the local store.
    /// Variables come from `vars`: the --credentials file, or else the environment.
    fn resolve(args: &MountArgs, vars: &Vars) -> Result<Backend, String> {
        if let Some(url) = args.api_url.clone().or_else(|| vars.get("KVFS_API_URL")) {
            let auth = match (vars.get("KVFS_TOKEN"), vars.get("CLOUDFLARE_API_TOKEN")) {
                (Some(t), _) | (None, Some(t)) => Auth::Token(t),
                _ => match (vars.get("CLOUDFLARE_API_KEY"), vars.get("CLOUDFLARE_EMAIL")) {
                    (Some(key), Some(email)) => Auth::Key { email, key },
                    _ => {
                        return Err(format!(
                            "API {url} needs credentials: set KVFS_TOKEN or CLOUDFLARE_API_TOKEN (or CLOUDFLARE_API_KEY and CLOUDFLARE_EMAIL){}",
                            vars.origin()
                        ))
                    }
                },
            };
            let account = vars
                .get("CLOUDFLARE_ACCOUNT_ID")
                .unwrap_or_else(|| "local".into());
            return Ok(Backend::Remote(ClientConfig::new(url, account, auth)));
        }
        if let Some(cfg) = ClientConfig::from_lookup(None, |name| vars.get(name)) {
            return Ok(Backend::Remote(cfg));
        }
        if let Vars::File(path, _) = vars {
            return Err(format!(
                "credentials file {}: it needs CLOUDFLARE_ACCOUNT_ID and CLOUDFLARE_API_TOKEN (or CLOUDFLARE_API_KEY and CLOUDFLARE_EMAIL)",
                path.display()
            ));
        }
        let dir = args
            .local
            .clone()
            .unwrap_or_else(|| crate::paths::data_home().join("kvfs"));
        Ok(Backend::Local(dir))
    }

    /// What the log says is mounted.
    fn describe(&self) -> String {
        match self {
            Backend::Local(dir) => format!("the local store in {}", dir.display()),
            Backend::Remote(c) => format!("account {} at {}", c.account_id, c.base_url),
        }
    }

    fn default_cache_dir(&self) -> PathBuf {
        // Keyed by API and account, so the next mount of the same account finds its state.
        let key = match self {
            Backend::Local(dir) => format!("local:{}", dir.display()),
            Backend::Remote(c) => format!("{}|{}", c.base_url, c.account_id),
        };
        crate::paths::cache_home()
            .join("kvfs")
            .join(format!("{:016x}", crate::fs::attrs::digest(key.as_bytes())))
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Variables a credentials file may set.
const CREDENTIAL_VARS: &[&str] = &[
    "CLOUDFLARE_API_TOKEN",
    "CLOUDFLARE_ACCOUNT_ID",
    "CLOUDFLARE_API_KEY",
    "CLOUDFLARE_EMAIL",
    "CLOUDFLARE_API_BASE_URL",
    "KVFS_API_URL",
    "KVFS_TOKEN",
];

/// Where credentials and the API URL are read from. A credentials file replaces the
/// environment entirely, so a token and an account id never come from two places.
enum Vars {
    Env,
    File(PathBuf, std::collections::HashMap<String, String>),
}

impl Vars {
    fn load(path: Option<&Path>) -> Result<Vars, String> {
        let Some(path) = path else {
            return Ok(Vars::Env);
        };
        Ok(Vars::File(path.to_path_buf(), read_credentials(path)?))
    }

    fn get(&self, name: &str) -> Option<String> {
        match self {
            Vars::Env => env(name),
            Vars::File(_, map) => map.get(name).filter(|v| !v.is_empty()).cloned(),
        }
    }

    /// Where to look, for error messages.
    fn origin(&self) -> String {
        match self {
            Vars::Env => String::new(),
            Vars::File(path, _) => format!(" in the credentials file {}", path.display()),
        }
    }
}

/// Reads `NAME=VALUE` lines (blank lines, `#` comments, `export ` and quotes allowed). Refuses
/// a file that group or others may access, as ssh does with private keys. Errors name the
/// file, the line and the variable, never a value.
fn read_credentials(path: &Path) -> Result<std::collections::HashMap<String, String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("credentials file {shown}: {e}"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "credentials file {shown} is accessible by group or others (mode {mode:03o}); \
             it holds secrets: run `chmod 600 {shown}`"
        ));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("credentials file {shown}: {e}"))?;
    let mut vars = std::collections::HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            return Err(format!(
                "credentials file {shown}, line {}: expected NAME=VALUE",
                n + 1
            ));
        };
        let name = name.trim();
        if !CREDENTIAL_VARS.contains(&name) {
            return Err(format!(
                "credentials file {shown}, line {}: unknown variable {name:?} (expected one of {})",
                n + 1,
                CREDENTIAL_VARS.join(", ")
            ));
        }
        let value = value.trim();
        let value = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(a, b)| value.strip_prefix(*a)?.strip_suffix(*b))
            .unwrap_or(value);
        vars.insert(name.to_string(), value.to_string());
    }
    Ok(vars)
}

/// Creates `dir` (and parents) readable by the owner only: it holds staged user data.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// `kvfs mount`. Returns the exit code.
pub fn mount(mut args: MountArgs) -> i32 {
    // Everything that can fail without the network is checked before forking, so the
    // user sees the message directly.
    match prepare_mountpoint(&args.mountpoint, args.allow_non_empty) {
        Ok(mp) => args.mountpoint = mp,
        Err(e) => return fail(&e),
    }
    if let Some(ttl) = args.expiration_ttl {
        if ttl < crate::api::limits::MIN_EXPIRATION_TTL {
            return fail("--expiration-ttl must be at least 60 seconds");
        }
    }
    let backend = match Vars::load(args.credentials.as_deref())
        .and_then(|vars| Backend::resolve(&args, &vars))
    {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| backend.default_cache_dir());
    if let Err(e) = private_dir(&cache_dir) {
        return fail(&format!("cache dir {}: {e}", cache_dir.display()));
    }
    // Held (through fork) for the daemon's whole life; the kernel drops it if the daemon dies.
    let lock = match lock_cache_dir(&cache_dir) {
        Ok(f) => f,
        Err(e) => return fail(&e),
    };
    if let Backend::Local(dir) = &backend {
        eprintln!(
            "kvfs: no Cloudflare credentials set; using the local store in {}",
            dir.display()
        );
    }

    // Fork before any thread or runtime exists; the parent waits for the child's word.
    let daemon = !args.foreground;
    if daemon {
        match daemonize(&cache_dir) {
            Ok(Some(code)) => return code,
            Ok(None) => write_pid(&lock),
            Err(e) => return fail(&format!("could not start the daemon: {e}")),
        }
    }
    crate::paths::init_logging(
        args.debug,
        (!args.foreground).then(|| cache_dir.join(LOG_FILE)),
    );
    let result = run_mount(&args, backend, cache_dir, daemon);
    drop(lock);
    match result {
        Ok(code) => code,
        Err(e) => {
            error!("{e}");
            report_ready(Err(&e));
            if args.foreground {
                eprintln!("kvfs: {e}");
            }
            1
        }
    }
}

/// The daemon's log, in the cache dir.
const LOG_FILE: &str = "kvfs.log";
/// The cache dir's lock: flock'ed by the mount using it, and holding its pid.
const LOCK_FILE: &str = "kvfs.lock";

/// Takes the cache dir for this mount. Two mounts on one cache dir would upload and delete
/// each other's journal and staged files.
fn lock_cache_dir(dir: &Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cache dir lock {}: {e}", path.display()))?;
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(format!("cache dir lock {}: {e}", path.display()));
        }
        let pid = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(format!(
            "cache dir {} is in use by pid {} (another kvfs mount); give this mount its own --cache-dir",
            dir.display(),
            pid.trim()
        ));
    }
    write_pid(&file);
    Ok(file)
}

fn write_pid(lock: &std::fs::File) {
    use std::os::unix::fs::FileExt;
    let pid = std::process::id().to_string();
    let _ = lock.set_len(0);
    let _ = lock.write_all_at(pid.as_bytes(), 0);
}

/// Absolute, with symlinks resolved even when the path is a dead FUSE mount (which fails
/// every stat with ENOTCONN).
fn resolve_path(p: &Path) -> Result<PathBuf, String> {
    match std::fs::canonicalize(p) {
        Ok(p) => Ok(p),
        Err(e) if daemon_gone(&e) => {
            let abs = std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))?;
            match (abs.parent(), abs.file_name()) {
                (Some(dir), Some(name)) => Ok(std::fs::canonicalize(dir)
                    .map(|d| d.join(name))
                    .unwrap_or(abs.clone())),
                _ => Ok(abs),
            }
        }
        Err(e) => Err(format!("{}: {}", p.display(), describe_io(&e))),
    }
}

/// Checks the mountpoint: a directory, not mounted (a dead kvfs mount is cleared), and empty
/// unless `allow_non_empty`. Returns its resolved path.
fn prepare_mountpoint(mp: &Path, allow_non_empty: bool) -> Result<PathBuf, String> {
    let path = resolve_path(mp)?;
    let shown = path.display();
    if let Some(m) = mount_at(&path) {
        match (is_dead(&path), m.is_kvfs()) {
            (true, true) => {
                clear_dead_mount(&path)?;
                eprintln!(
                    "kvfs: {shown} was a dead kvfs mount (its daemon had stopped); cleared it"
                );
            }
            (true, false) => {
                return Err(format!(
                    "{shown} is a dead {} mount of {}; unmount it first (umount -l {shown})",
                    m.fstype, m.source
                ))
            }
            (false, true) => {
                return Err(format!(
                    "{shown} is already mounted ({}); `kvfs unmount {shown}` first",
                    m.source
                ))
            }
            (false, false) => {
                return Err(format!(
                    "{shown} is already mounted ({}, type {})",
                    m.source, m.fstype
                ))
            }
        }
    }
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("{shown} is not a directory")),
        Err(e) => return Err(format!("{shown}: {}", describe_io(&e))),
    }
    let non_empty = std::fs::read_dir(&path)
        .map_err(|e| format!("{shown}: {}", describe_io(&e)))?
        .next()
        .is_some();
    if non_empty && !allow_non_empty {
        return Err(format!(
            "{shown} is not empty; mount on an empty directory, or pass --allow-non-empty \
             (-o allow_non_empty) to hide its files while mounted"
        ));
    }
    Ok(path)
}

/// What a FUSE mount answers once its daemon is gone: ENOTCONN, or ECONNABORTED for a
/// request the dying connection aborted.
fn daemon_gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED))
}

/// A stat of a dead mount's root may still be served from the kernel's attribute cache;
/// opening the directory never is.
fn is_dead(path: &Path) -> bool {
    std::fs::read_dir(path)
        .err()
        .is_some_and(|e| daemon_gone(&e))
        || std::fs::metadata(path)
            .err()
            .is_some_and(|e| daemon_gone(&e))
}

/// An io::Error in words, with a hint for the errors FUSE users meet.
fn describe_io(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        _ if daemon_gone(e) => {
            "a dead FUSE mount (its daemon has stopped; `kvfs unmount` clears it)".into()
        }
        Some(libc::ENOENT) => "no such file or directory".into(),
        Some(libc::EACCES) | Some(libc::EPERM) => "permission denied".into(),
        Some(libc::EBUSY) => "busy: a process has a file or its working directory there \
            (`fuser -vm PATH` shows which)"
            .into(),
        _ => e.to_string(),
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
struct MountEntry {
    target: PathBuf,
    source: String,
    fstype: String,
}

impl MountEntry {
    /// Ours: type fuse.kvfs, or (mounted by an older kvfs) plain fuse with a kvfs source.
    fn is_kvfs(&self) -> bool {
        self.fstype == "fuse.kvfs" || (self.fstype == "fuse" && self.source.starts_with("kvfs"))
    }
}

fn mounts() -> Vec<MountEntry> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            Some(MountEntry {
                target: PathBuf::from(unescape_mountinfo(left.get(4)?)),
                fstype: right.next()?.to_string(),
                source: unescape_mountinfo(right.next()?),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The topmost mount at exactly `path`.
fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.target == path)
}

/// The kvfs mount holding `path` (the mount root or anything inside it).
fn kvfs_mount_of(path: &Path) -> Result<MountEntry, String> {
    let path = resolve_path(path)?;
    // max_by_key keeps the last of equals: the topmost of mounts stacked on one path.
    mounts()
        .into_iter()
        .filter(|m| path.starts_with(&m.target))
        .max_by_key(|m| m.target.as_os_str().len())
        .filter(MountEntry::is_kvfs)
        .ok_or_else(|| format!("{} is not inside a kvfs mount", path.display()))
}

/// Unmounts a mount whose daemon is gone. Nothing can be flushed: the journal in its cache
/// dir keeps what was pending.
fn clear_dead_mount(path: &Path) -> Result<(), String> {
    let c = cpath(path)?;
    if unsafe { libc::geteuid() } == 0 {
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0
            || unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0
        {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "cannot clear the dead mount {}: {e}",
            path.display()
        ));
    }
    match std::process::Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(path)
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => Err(format!(
            "cannot clear the dead mount {}: fusermount3 -u -z failed",
            path.display()
        )),
        Err(e) => Err(format!(
            "cannot clear the dead mount {}: fusermount3: {e}",
            path.display()
        )),
    }
}

fn fail(msg: &str) -> i32 {
    eprintln!("kvfs: {msg}");
    1
}

/// The write end of the readiness pipe, in the daemon.
static READY_FD: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);

/// Tells the waiting parent that the mount works (or why not). Only the first call counts.
fn report_ready(result: Result<(), &str>) {
    if let Some(fd) = READY_FD.lock().unwrap().take() {
        let mut f = std::fs::File::from(fd);
        let msg = match result {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        let _ = f.write_all(msg.as_bytes());
    }
}

/// Forks. In the parent: waits for the child's readiness word and returns the exit code.
/// In the child: detaches (new session, stdio to /dev/null) and returns None.
fn daemonize(cache_dir: &Path) -> std::io::Result<Option<i32>> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(rd);
            unsafe { libc::setsid() };
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            use std::os::fd::AsRawFd;
            for target in 0..3 {
                unsafe { libc::dup2(null.as_raw_fd(), target) };
            }
            *READY_FD.lock().unwrap() = Some(wr);
            Ok(None)
        }
        _child => {
            drop(wr);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            if msg == "ok" {
                Ok(Some(0))
            } else if msg.is_empty() {
                eprintln!(
                    "kvfs: the daemon exited before the mount was ready; see {}",
                    cache_dir.join(LOG_FILE).display()
                );
                Ok(Some(1))
            } else {
                eprintln!("kvfs: {msg}");
                Ok(Some(1))
            }
        }
    }
}

fn run_mount(
    args: &MountArgs,
    backend: Backend,
    cache_dir: PathBuf,
    daemon: bool,
) -> Result<i32, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let source = mount_source(args);
    let what = backend.describe();
    let (backend, namespaces) = rt.block_on(connect(backend, args))?;
    let root_namespace = match &args.namespace {
        Some(ns) => Some(resolve_namespace(&namespaces, ns)?),
        None => None,
    };
    let uid = args.uid.unwrap_or_else(|| unsafe { libc::getuid() });
    let gid = args.gid.unwrap_or_else(|| unsafe { libc::getgid() });
    let cfg = FsConfig {
        root_namespace,
        read_only: args.read_only,
        cache_dir: cache_dir.clone(),
        cache_size: args.cache_size,
        metadata_ttl: args.metadata_ttl,
        expiration_ttl: args.expiration_ttl,
        write_delay: args.write_delay,
        uid,
        gid,
        file_mode: args.file_mode,
        dir_mode: args.dir_mode,
        posix_metadata: args.posix_metadata,
        max_requests: args.max_requests.max(1),
        max_entries: args.max_entries,
    };
    let fs = Arc::new(
        Fs::new(backend, cfg).map_err(|e| format!("cache dir {}: {e}", cache_dir.display()))?,
    );
    // Changes a crashed run left in the journal go up before anything is served.
    let resumed = fs.pending_uploadable();
    if resumed > 0 {
        info!(
            "resuming {} from the journal",
            count(resumed as u64, "pending change")
        );
        let left = rt.block_on(fs.flush_all(3));
        if !left.is_empty() {
            warn!(
                "{} not uploaded yet; they stay pending (and visible)",
                count(left.len() as u64, "change")
            );
        }
    }
    rt.spawn(fs.clone().run_uploader());

    let mut config = fuser::Config::default();
    // One thread reads the kernel's requests. No callback waits on the network (one that has
    // to wait moves to a runtime task), so more readers add no parallelism worth having; they
    // cost a wake-up of a sleeping reader per request (the kernel wakes the longest-idle one),
    // measured at up to twice the daemon CPU of a `cp -r` (docs/PERFORMANCE.md).
    config.n_threads = Some(1);
    config.mount_options = mount_options(args, &source)?;
    if args.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    let mut adapter = KvFuse::new(fs.clone(), rt.handle().clone());
    let dropper = adapter.entry_dropper();
    let (session, mut unmounter) = open_session(adapter, &args.mountpoint, &source, &config)
        .map_err(|e| format!("mount at {} failed: {e}", args.mountpoint.display()))?;
    dropper
        .start(session.notifier())
        .map_err(|e| e.to_string())?;
    let session_thread = std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || session.run())
        .map_err(|e| e.to_string())?;
    info!(
        "mounted {what} as {source} at {}",
        args.mountpoint.display()
    );
    if daemon {
        report_ready(Ok(()));
    } else {
        eprintln!(
            "kvfs: mounted {what} at {} (Ctrl-C to unmount)",
            args.mountpoint.display()
        );
    }

    // Wait for an external unmount (the session ends) or a signal (we unmount).
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = std::thread::spawn(move || {
        let r = session_thread.join();
        let _ = done_tx.send(());
        r
    });
    let signalled = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        Ok::<bool, String>(tokio::select! {
            _ = term.recv() => true,
            _ = int.recv() => true,
            _ = done_rx => false,
        })
    })?;
    let failed = rt.block_on(fs.flush_all(1));
    for what in &failed {
        error!("stays in the journal: {what}");
    }
    if signalled {
        info!("signal received: unmounting {}", args.mountpoint.display());
        if let Err(e) = unmounter.unmount() {
            warn!("unmount: {e}");
        }
    }
    let _ = watcher.join();
    info!("unmounted {}", args.mountpoint.display());
    Ok(if failed.is_empty() { 0 } else { 1 })
}

/// The mount's source as findmnt and df show it: what an fstab line names, `kvfs` for the
/// whole account and `kvfs:NAMESPACE` for one namespace (so `mount -a` sees it is mounted).
fn mount_source(args: &MountArgs) -> String {
    match &args.namespace {
        Some(ns) => format!("kvfs:{ns}"),
        None => "kvfs".into(),
    }
}

/// Unmounts from inside the daemon (on SIGTERM/SIGINT).
enum Unmounter {
    /// fuser mounted it (through fusermount3, as a user).
    Fuser(fuser::SessionUnmounter),
    /// We mounted it with mount(2), as root.
    Kernel(PathBuf),
}

impl Unmounter {
    fn unmount(&mut self) -> Result<(), String> {
        match self {
            Unmounter::Fuser(u) => u.unmount().map_err(|e| e.to_string()),
            Unmounter::Kernel(path) => {
                let c = cpath(path)?;
                if unsafe { libc::umount2(c.as_ptr(), 0) } == 0
                    || unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0
                {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error().to_string())
                }
            }
        }
    }
}

/// Mounts and starts the FUSE session. As root, kvfs calls mount(2) itself with type
/// `fuse.kvfs` (fuser would say plain `fuse`); otherwise fuser goes through fusermount3, which
/// builds the same type from the subtype option.
fn open_session(
    adapter: KvFuse,
    mountpoint: &Path,
    source: &str,
    config: &fuser::Config,
) -> Result<(fuser::Session<KvFuse>, Unmounter), String> {
    match kernel_mount(mountpoint, source, config)? {
        Some(fd) => {
            let session = fuser::Session::from_fd(adapter, fd, config.acl, config.clone())
                .map_err(|e| {
                    let _ = Unmounter::Kernel(mountpoint.to_path_buf()).unmount();
                    e.to_string()
                })?;
            Ok((session, Unmounter::Kernel(mountpoint.to_path_buf())))
        }
        None => {
            let mut session =
                fuser::Session::new(adapter, mountpoint, config).map_err(|e| e.to_string())?;
            let unmounter = Unmounter::Fuser(session.unmount_callable());
            Ok((session, unmounter))
        }
    }
}

/// mount(2) of /dev/fuse at `mountpoint` as `fuse.kvfs`. None when not permitted (not root):
/// the caller falls back to fusermount3.
fn kernel_mount(
    mountpoint: &Path,
    source: &str,
    config: &fuser::Config,
) -> Result<Option<OwnedFd>, String> {
    use fuser::MountOption as O;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let root_mode = std::fs::metadata(mountpoint)
        .map_err(|e| e.to_string())?
        .mode()
        & libc::S_IFMT;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("/dev/fuse: {e} (is the fuse module loaded?)"))?;
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={},group_id={}",
        dev.as_raw_fd(),
        unsafe { libc::getuid() },
        unsafe { libc::getgid() }
    );
    // Like fusermount3: nosuid and nodev unless asked for.
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    for opt in &config.mount_options {
        match opt {
            O::DefaultPermissions => data.push_str(",default_permissions"),
            O::RO => flags |= libc::MS_RDONLY,
            O::NoExec => flags |= libc::MS_NOEXEC,
            O::NoAtime => flags |= libc::MS_NOATIME,
            O::Sync => flags |= libc::MS_SYNCHRONOUS,
            O::DirSync => flags |= libc::MS_DIRSYNC,
            O::Suid => flags &= !libc::MS_NOSUID,
            O::Dev => flags &= !libc::MS_NODEV,
            O::NoSuid => flags |= libc::MS_NOSUID,
            O::NoDev => flags |= libc::MS_NODEV,
            O::RW | O::Exec | O::Atime | O::Async | O::FSName(_) | O::Subtype(_) => {}
            other => return Err(format!("unsupported mount option {other:?}")),
        }
    }
    if config.acl != fuser::SessionACL::Owner {
        data.push_str(",allow_other");
    }
    let (src, target, data) = (
        CString::new(source).map_err(|_| "source contains a NUL byte")?,
        cpath(mountpoint)?,
        CString::new(data).unwrap(),
    );
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            c"fuse.kvfs".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EPERM) => Ok(None),
            _ => Err(e.to_string()),
        };
    }
    Ok(Some(dev.into()))
}

fn mount_options(args: &MountArgs, source: &str) -> Result<Vec<fuser::MountOption>, String> {
    use fuser::MountOption as O;
    let mut opts = vec![
        O::FSName(source.to_string()),
        O::Subtype("kvfs".into()),
        O::DefaultPermissions,
    ];
    if args.read_only {
        opts.push(O::RO);
    }
    for opt in args
        .options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        match opt {
            "atime" => opts.push(O::Atime),
            "noatime" => opts.push(O::NoAtime),
            "dev" => opts.push(O::Dev),
            "nodev" => opts.push(O::NoDev),
            "suid" => opts.push(O::Suid),
            "nosuid" => opts.push(O::NoSuid),
            "exec" => opts.push(O::Exec),
            "noexec" => opts.push(O::NoExec),
            "sync" => opts.push(O::Sync),
            "async" => opts.push(O::Async),
            "dirsync" => opts.push(O::DirSync),
            // `kvfs mount` turned everything else into long options; see cli::expand_mount_args.
            other => return Err(format!("unknown mount option {other:?}")),
        }
    }
    Ok(opts)
}

/// Opens the backend: the HTTP client, or the embedded local store called in-process (no
/// listener, no token). One request up front lists the namespaces, so bad credentials fail the
/// mount instead of every later call.
async fn connect(
    backend: Backend,
    args: &MountArgs,
) -> Result<(Arc<dyn KvBackend>, Vec<Namespace>), String> {
    let mut cfg = match backend {
        Backend::Remote(cfg) => cfg,
        Backend::Local(dir) => {
            private_dir(&dir).map_err(|e| format!("local store {}: {e}", dir.display()))?;
            let store = tokio::task::spawn_blocking(move || LocalStore::open(&dir, "local"))
                .await
                .map_err(|e| format!("local store: {e}"))?
                .map_err(|e| format!("local store: {e}"))?;
            let namespaces = store
                .list_namespaces()
                .await
                .map_err(|e| format!("local store: {e}"))?;
            return Ok((Arc::new(store), namespaces));
        }
    };
    cfg.max_concurrent = args.max_requests.max(1);
    if let Some(spec) = &args.rate_limit {
        cfg.rate_limit = Some(parse_rate(spec)?);
    }
    // Fewer retries than the client's default: the uploader retries on its own, and an
    // unreachable server should not stall unmount for long.
    cfg.max_retries = 5;
    // Test hook (undocumented): a shorter first backoff step, so tests against a stopped
    // server do not sit through the full retry schedule.
    if let Some(ms) = env("KVFS_TEST_BACKOFF_MS").and_then(|v| v.parse().ok()) {
        cfg.base_backoff = Duration::from_millis(ms);
    }
    let client = Client::new(cfg).map_err(|e| e.to_string())?;
    let namespaces = client
        .list_namespaces()
        .await
        .map_err(|e| first_request_error(&e))?;
    Ok((Arc::new(client), namespaces))
}

/// Why the first request failed, in words: refused credentials are not an unreachable API.
fn first_request_error(e: &crate::client::Error) -> String {
    match e.status() {
        Some(401 | 403) => format!(
            "the Workers KV API refused the credentials ({e}); check the API token (it needs \
             the Workers KV Storage permission) and the account id"
        ),
        Some(_) => format!("the Workers KV API answered with an error: {e}"),
        None => format!("cannot reach the Workers KV API: {e}"),
    }
}

fn parse_rate(spec: &str) -> Result<(u32, Duration), String> {
    let (n, secs) = spec
        .split_once('/')
        .ok_or("--rate-limit: expected N/SECS, e.g. 1200/300")?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| "--rate-limit: N must be a number")?;
    let secs: u64 = secs
        .trim()
        .parse()
        .map_err(|_| "--rate-limit: SECS must be a number")?;
    if n == 0 || secs == 0 {
        return Err("--rate-limit: N and SECS must be positive".into());
    }
    Ok((n, Duration::from_secs(secs)))
}

fn resolve_namespace(all: &[Namespace], want: &str) -> Result<String, String> {
    all.iter()
        .find(|n| n.id == want)
        .or_else(|| all.iter().find(|n| n.title == want))
        .map(|n| n.id.clone())
        .ok_or_else(|| format!("no namespace with title or id {want:?}"))
}

// ---- unmount and status: talk to the daemon through xattrs on the mount's root ----------------

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| "path contains a NUL byte".to_string())
}

/// The daemon's JSON report, read from the mount root.
fn get_status(root: &Path) -> std::io::Result<serde_json::Value> {
    let path = cpath(root).map_err(std::io::Error::other)?;
    let name = CString::new(xattr::STATUS).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    serde_json::from_slice(&buf[..n as usize])
        .map_err(|e| std::io::Error::other(format!("bad status from the mount: {e}")))
}

/// What `kvfs status` adds to the daemon's report, from /proc: the daemon holds its cache
/// dir's lock file and (when daemonized) its log file open.
fn daemon_details(pid: i64) -> serde_json::Value {
    let (mut cache_dir, mut log) = (None, None);
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for link in fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        {
            match link.file_name().and_then(|n| n.to_str()) {
                Some(LOCK_FILE) => cache_dir = link.parent().map(Path::to_path_buf),
                Some(LOG_FILE) => log = Some(link),
                _ => {}
            }
        }
    }
    serde_json::json!({
        "cache_dir": cache_dir,
        "log": log,
        "uptime_secs": process_uptime(pid),
    })
}

/// Seconds since `pid` started (field 22 of /proc/PID/stat, in clock ticks since boot).
fn process_uptime(pid: i64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let start: f64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let boot: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((boot - start / ticks).max(0.0) as u64)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {:02}h", secs / 86400, secs % 86400 / 3600),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The report for people.
fn print_status(m: &MountEntry, s: &serde_json::Value) {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let p = &s["pending"];
    let uptime = s["uptime_secs"].as_u64().map(human_duration);
    println!(
        "{} at {} (pid {}{})",
        m.source,
        m.target.display(),
        s["pid"],
        uptime.map(|u| format!(", up {u}")).unwrap_or_default()
    );
    let (writes, deletes, refused) = (n(&p["writes"]), n(&p["deletes"]), n(&p["refused"]));
    if writes + deletes == 0 {
        println!("  pending:    nothing; everything is uploaded");
    } else {
        println!(
            "  pending:    {} ({}), {}",
            plural(writes, "write", "writes"),
            human_bytes(n(&p["bytes"])),
            plural(deletes, "delete", "deletes")
        );
    }
    if refused > 0 {
        println!(
            "  refused:    {refused} changes the server will not take (they stay in the journal):"
        );
        for r in p["first"].as_array().into_iter().flatten() {
            if let Some(why) = r["error"].as_str() {
                println!(
                    "              {} {:?} in namespace {}: {why}",
                    r["op"].as_str().unwrap_or("?"),
                    r["key"].as_str().unwrap_or("?"),
                    r["namespace"].as_str().unwrap_or("?")
                );
            }
        }
    }
    let mut ops: Vec<(String, u64)> = s["requests"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(op, c)| (op.clone(), n(c)))
        .filter(|(_, c)| *c > 0)
        .collect();
    ops.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: u64 = ops.iter().map(|(_, c)| c).sum();
    let list: Vec<String> = ops.iter().map(|(op, c)| format!("{op} {c}")).collect();
    if list.is_empty() {
        println!("  requests:   none yet");
    } else {
        println!("  requests:   {total} ({})", list.join(", "));
    }
    let c = &s["cache"];
    let (hits, misses) = (n(&c["hits"]), n(&c["misses"]));
    let rate = if hits + misses == 0 {
        "no reads yet".to_string()
    } else {
        format!(
            "{:.0}% hits ({hits} of {})",
            100.0 * hits as f64 / (hits + misses) as f64,
            hits + misses
        )
    };
    println!(
        "  cache:      {rate}; {} in {}",
        human_bytes(n(&c["bytes"])),
        plural(n(&c["entries"]), "value", "values")
    );
    let hidden = n(&s["hidden_keys"]);
    if hidden > 0 {
        println!(
            "  hidden:     {} whose names cannot be file names (see docs/SEMANTICS.md)",
            plural(hidden, "key", "keys")
        );
    } else {
        println!("  hidden:     no keys");
    }
    let path_or = |v: &serde_json::Value, none: &str| v.as_str().unwrap_or(none).to_string();
    println!("  cache dir:  {}", path_or(&s["cache_dir"], "unknown"));
    println!(
        "  log:        {}",
        path_or(&s["log"], "stderr of the foreground `kvfs mount`")
    );
}

/// `kvfs status [PATH]`: the mount holding PATH, or every kvfs mount.
pub fn status(args: StatusArgs) -> i32 {
    let targets: Vec<MountEntry> = match &args.path {
        Some(p) => match kvfs_mount_of(p) {
            Ok(m) => vec![m],
            Err(e) => return fail(&e),
        },
        None => mounts().into_iter().filter(MountEntry::is_kvfs).collect(),
    };
    if targets.is_empty() && !args.json {
        println!("no kvfs mounts");
        return 0;
    }
    let mut code = 0;
    let mut reports = Vec::new();
    for (i, m) in targets.iter().enumerate() {
        let mut s = match get_status(&m.target) {
            Ok(s) => s,
            Err(e) => {
                code = 1;
                eprintln!("kvfs: {}: {}", m.target.display(), status_error(&e));
                continue;
            }
        };
        let details = daemon_details(s["pid"].as_i64().unwrap_or(0));
        if let (Some(obj), Some(extra)) = (s.as_object_mut(), details.as_object()) {
            obj.insert("mountpoint".into(), m.target.to_string_lossy().into());
            obj.insert("source".into(), m.source.clone().into());
            obj.extend(extra.clone());
        }
        if args.json {
            reports.push(s);
        } else {
            if i > 0 {
                println!();
            }
            print_status(m, &s);
        }
    }
    if args.json {
        // One object for one mount (as before); an array when listing every mount.
        let out = match (&args.path, reports.len()) {
            (Some(_), 1) => reports.pop().unwrap(),
            _ => serde_json::Value::Array(reports),
        };
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
    code
}

fn status_error(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        _ if daemon_gone(e) => "its daemon has stopped (a dead mount); `kvfs unmount` clears \
             it, and the next mount uploads what its journal holds"
            .into(),
        Some(libc::ENODATA) | Some(libc::ENOTSUP) => {
            "the mount does not answer kvfs status requests (an older kvfs?)".into()
        }
        _ => describe_io(e),
    }
}

/// Running, and not a zombie waiting for its parent (as a foreground mount's may be).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// More pending changes than this, on a terminal: `kvfs unmount` shows its progress.
const PROGRESS_ABOVE: u64 = 5;

/// Asks the daemon to upload everything pending (the FLUSH xattr); on a terminal, with many
/// changes pending, shows what is left while it works.
fn flush(root: &Path, status: &serde_json::Value) -> std::io::Result<()> {
    let set = |root: &Path| -> std::io::Result<()> {
        let path = cpath(root).map_err(std::io::Error::other)?;
        let name = CString::new(xattr::FLUSH).unwrap();
        let rc =
            unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let left = |s: &serde_json::Value| {
        let p = &s["pending"];
        (
            p["writes"].as_u64().unwrap_or(0) + p["deletes"].as_u64().unwrap_or(0),
            p["bytes"].as_u64().unwrap_or(0),
        )
    };
    let tty = unsafe { libc::isatty(2) } == 1;
    if !tty || left(status).0 <= PROGRESS_ABOVE {
        return set(root);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = root.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(set(&owned));
    });
    let mut err = std::io::stderr();
    let mut current = Some(status.clone());
    loop {
        if let Some(s) = current.take() {
            let (changes, bytes) = left(&s);
            let _ = write!(
                err,
                "\r\x1b[Kkvfs: uploading: {changes} changes ({}) left",
                human_bytes(bytes)
            );
        }
        match rx.recv_timeout(Duration::from_millis(300)) {
            Ok(result) => {
                let _ = write!(err, "\r\x1b[K");
                return result;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => current = get_status(root).ok(),
            Err(_) => return Err(std::io::Error::other("flush thread died")),
        }
    }
}

pub fn unmount(args: UnmountArgs) -> i32 {
    let mp = match resolve_path(&args.mountpoint) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let shown = mp.display();
    match mount_at(&mp) {
        None => return fail(&format!("{shown} is not mounted")),
        Some(m) if !m.is_kvfs() => {
            return fail(&format!(
                "{shown} is not a kvfs mount (it is {} from {})",
                m.fstype, m.source
            ))
        }
        Some(_) => {}
    }
    let status = match get_status(&mp) {
        Ok(s) => s,
        Err(e) if daemon_gone(&e) => {
            return match clear_dead_mount(&mp) {
                Ok(()) => {
                    eprintln!(
                        "kvfs: the daemon of {shown} had stopped; cleared the dead mount. What it \
                         had not uploaded stays in its journal: the next mount with the same cache \
                         dir uploads it"
                    );
                    0
                }
                Err(e) => fail(&e),
            };
        }
        Err(e) => return fail(&format!("{shown}: {}", status_error(&e))),
    };
    let pid = status["pid"].as_i64().unwrap_or(0) as i32;
    let mut code = 0;
    match flush(&mp, &status) {
        Ok(()) => {}
        // A read-only mount has nothing to upload.
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        Err(e) => {
            // Whatever could not be uploaded is safe in the journal; the next mount resumes it.
            eprintln!("kvfs: not everything could be uploaded ({e}); it stays in the journal and the next mount of this account uploads it:");
            if let Ok(s) = get_status(&mp) {
                let p = &s["pending"];
                let n = |f: &str| p[f].as_u64().unwrap_or(0);
                eprintln!(
                    "kvfs: {} ({}) and {} pending, {} refused by the server",
                    count(n("writes"), "write"),
                    count(n("bytes"), "byte"),
                    count(n("deletes"), "delete"),
                    n("refused")
                );
                for p in p["first"].as_array().into_iter().flatten() {
                    let why = p["error"].as_str().unwrap_or("server not reachable");
                    eprintln!(
                        "kvfs:   {} {:?} in namespace {} ({why})",
                        p["op"].as_str().unwrap_or("?"),
                        p["key"].as_str().unwrap_or("?"),
                        p["namespace"].as_str().unwrap_or("?")
                    );
                }
            }
            code = 1;
        }
    }
    let path = match cpath(&mp) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let rc = if unsafe { libc::geteuid() } == 0 {
        unsafe { libc::umount2(path.as_ptr(), 0) }
    } else {
        match std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(&mp)
            .status()
        {
            Ok(s) if s.success() => 0,
            _ => -1,
        }
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return fail(&format!("unmount {shown}: {}", describe_io(&e)));
    }
    // The daemon finishes after the kernel lets go; wait so no process is left behind.
    if pid <= 0 || wait_exit(pid, Duration::from_secs(120)) {
        return code;
    }
    fail(&format!(
        "unmounted, but the daemon (pid {pid}) is still running"
    ))
}

/// Waits up to `timeout` for process `pid` (not a child) to end. A pidfd becomes readable the
/// moment it does, so `kvfs unmount` returns then, not at the next tick of a polling loop.
fn wait_exit(pid: i32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return true;
        }
        // No pidfds (a kernel before 5.3): look every 50 ms.
        let deadline = std::time::Instant::now() + timeout;
        while process_alive(pid) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        return true;
    }
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = std::time::Instant::now() + timeout;
    let ready = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd that lives across the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        let interrupted =
            r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR);
        if !interrupted {
            break r > 0;
        }
    };
    // SAFETY: fd is ours, closed once.
    unsafe { libc::close(fd) };
    ready || !process_alive(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("credentials");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn credentials_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "# comment\n\nexport CLOUDFLARE_API_TOKEN=\"s3cret\"\nCLOUDFLARE_ACCOUNT_ID = 'acc'\n",
            0o600,
        );
        let vars = read_credentials(&path).unwrap();
        assert_eq!(vars["CLOUDFLARE_API_TOKEN"], "s3cret");
        assert_eq!(vars["CLOUDFLARE_ACCOUNT_ID"], "acc");

        // Readable by others: refused, naming the file.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_credentials(&path).unwrap_err();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("640"),
            "{e}"
        );

        // An unknown name or a line without `=`: the line is named, the value never.
        let path = write(dir.path(), "CLOUDFLARE_TOKEN=s3cret\n", 0o600);
        let e = read_credentials(&path).unwrap_err();
        assert!(
            e.contains("line 1") && e.contains("CLOUDFLARE_TOKEN"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        let path = write(dir.path(), "CLOUDFLARE_API_TOKEN s3cret\n", 0o600);
        let e = read_credentials(&path).unwrap_err();
        assert!(
            e.contains("expected NAME=VALUE") && !e.contains("s3cret"),
            "{e}"
        );
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b\\134c"), "/mnt/a b\\c");
    }
}
