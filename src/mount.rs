//! `kvfs mount`, `kvfs unmount`, `kvfs status`: backend choice, daemonizing with a readiness
//! pipe, the FUSE session, and a clean shutdown on unmount, SIGTERM and SIGINT.

use crate::api::Namespace;
use crate::cli::{MountArgs, StatusArgs, UnmountArgs};
use crate::client::{Auth, Client, ClientConfig};
use crate::fs::{xattr, Fs, FsConfig};
use crate::fuse::KvFuse;
use crate::server::{self, RunningServer, ServerConfig};
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
    /// An in-process `kvfs serve` on loopback, data in this directory.
    Local(PathBuf),
    /// A remote API (Cloudflare, or a `kvfs serve` given by --api-url).
    Remote(ClientConfig),
}

impl Backend {
    /// First match wins: --api-url / KVFS_API_URL; Cloudflare credentials; the local store.
    fn resolve(args: &MountArgs) -> Result<Backend, String> {
        if let Some(url) = &args.api_url {
            let auth = match (env("KVFS_TOKEN"), env("CLOUDFLARE_API_TOKEN")) {
                (Some(t), _) | (None, Some(t)) => Auth::Token(t),
                _ => match (env("CLOUDFLARE_API_KEY"), env("CLOUDFLARE_EMAIL")) {
                    (Some(key), Some(email)) => Auth::Key { email, key },
                    _ => {
                        return Err(format!(
                            "--api-url {url} needs credentials: set KVFS_TOKEN or CLOUDFLARE_API_TOKEN (or CLOUDFLARE_API_KEY and CLOUDFLARE_EMAIL)"
                        ))
                    }
                },
            };
            let account = env("CLOUDFLARE_ACCOUNT_ID").unwrap_or_else(|| "local".into());
            return Ok(Backend::Remote(ClientConfig::new(
                url.clone(),
                account,
                auth,
            )));
        }
        if let Some(cfg) = ClientConfig::from_env(None) {
            return Ok(Backend::Remote(cfg));
        }
        let dir = args
            .local
            .clone()
            .unwrap_or_else(|| data_home().join("kvfs"));
        Ok(Backend::Local(dir))
    }

    /// A name for the mount table and the default cache dir.
    fn source(&self) -> String {
        match self {
            Backend::Local(_) => "kvfs:local".into(),
            Backend::Remote(c) => format!("kvfs:{}", c.account_id),
        }
    }

    fn default_cache_dir(&self) -> PathBuf {
        // Keyed by API and account, so the next mount of the same account finds its state.
        let key = match self {
            Backend::Local(dir) => format!("local:{}", dir.display()),
            Backend::Remote(c) => format!("{}|{}", c.base_url, c.account_id),
        };
        cache_home()
            .join("kvfs")
            .join(format!("{:016x}", fnv1a(key.as_bytes())))
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn home() -> PathBuf {
    env("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn data_home() -> PathBuf {
    env("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".local/share"))
}

fn cache_home() -> PathBuf {
    env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache"))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
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
pub fn mount(args: MountArgs) -> i32 {
    // Everything that can fail without the network is checked before forking, so the
    // user sees the message directly.
    match std::fs::metadata(&args.mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return fail(&format!("{} is not a directory", args.mountpoint.display())),
        Err(e) => return fail(&format!("{}: {e}", args.mountpoint.display())),
    }
    if let Some(ttl) = args.expiration_ttl {
        if ttl < crate::api::limits::MIN_EXPIRATION_TTL {
            return fail("--expiration-ttl must be at least 60 seconds");
        }
    }
    let backend = match Backend::resolve(&args) {
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
            Ok(None) => {}
            Err(e) => return fail(&format!("could not start the daemon: {e}")),
        }
    }
    init_logging(
        args.debug,
        (!args.foreground).then(|| cache_dir.join("kvfs.log")),
    );
    let result = run_mount(&args, backend, cache_dir, daemon);
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
                    cache_dir.join("kvfs.log").display()
                );
                Ok(Some(1))
            } else {
                eprintln!("kvfs: {msg}");
                Ok(Some(1))
            }
        }
    }
}

fn init_logging(debug: bool, file: Option<PathBuf>) {
    use tracing_subscriber::EnvFilter;
    let filter = if debug {
        EnvFilter::new("kvfs=debug")
    } else {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("kvfs=info"))
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match file.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    }) {
        Some(f) => builder.with_ansi(false).with_writer(Mutex::new(f)).init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}

use std::sync::Mutex;

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
    let source = backend.source();
    let (client, server, namespaces) = rt.block_on(connect(backend, args))?;
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
    };
    let fs = Arc::new(
        Fs::new(Arc::new(client), cfg)
            .map_err(|e| format!("cache dir {}: {e}", cache_dir.display()))?,
    );
    // Changes a crashed run left in the journal go up before anything is served.
    let resumed = fs.pending_uploadable();
    if resumed > 0 {
        info!("resuming {resumed} pending changes from the journal");
        let left = rt.block_on(fs.flush_all(3));
        if !left.is_empty() {
            warn!(
                "{} changes could not be uploaded yet; they stay pending (and visible)",
                left.len()
            );
        }
    }
    rt.spawn(fs.clone().run_uploader());

    let mut config = fuser::Config::default();
    config.n_threads = Some(4);
    config.mount_options = mount_options(args, &source)?;
    if args.allow_other
        || args
            .options
            .iter()
            .any(|o| o.split(',').any(|o| o == "allow_other"))
    {
        config.acl = fuser::SessionACL::All;
    }
    let adapter = KvFuse::new(fs.clone(), rt.handle().clone());
    let mut session = fuser::Session::new(adapter, &args.mountpoint, &config)
        .map_err(|e| format!("mount at {} failed: {e}", args.mountpoint.display()))?;
    let mut unmounter = session.unmount_callable();
    let session_thread = std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || session.run())
        .map_err(|e| e.to_string())?;
    info!("mounted {source} at {}", args.mountpoint.display());
    if daemon {
        report_ready(Ok(()));
    } else {
        eprintln!(
            "kvfs: mounted {source} at {} (Ctrl-C to unmount)",
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
    if let Some(server) = server {
        rt.block_on(server.shutdown());
    }
    info!("unmounted {}", args.mountpoint.display());
    Ok(if failed.is_empty() { 0 } else { 1 })
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
            "ro" => opts.push(O::RO),
            "rw" => opts.push(O::RW),
            "allow_other" | "default_permissions" => {}
            "noatime" => opts.push(O::NoAtime),
            "nodev" => opts.push(O::NoDev),
            "nosuid" => opts.push(O::NoSuid),
            "noexec" => opts.push(O::NoExec),
            "exec" => opts.push(O::Exec),
            other => opts.push(O::CUSTOM(other.to_string())),
        }
    }
    Ok(opts)
}

/// Builds the API client, starting the embedded server first when the backend is local.
async fn connect(
    backend: Backend,
    args: &MountArgs,
) -> Result<(Client, Option<RunningServer>, Vec<Namespace>), String> {
    let (mut cfg, server) = match backend {
        Backend::Remote(cfg) => (cfg, None),
        Backend::Local(dir) => {
            private_dir(&dir).map_err(|e| format!("local store {}: {e}", dir.display()))?;
            let token = random_hex(24);
            let server = server::start(ServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                data_dir: dir.clone(),
                token: token.clone(),
                latency: None,
                fail_rate: 0.0,
                seed: 0,
            })
            .await
            .map_err(|e| format!("local store {}: {e}", dir.display()))?;
            let cfg = ClientConfig::new(server.base_url(), "local", Auth::Token(token));
            (cfg, Some(server))
        }
    };
    cfg.max_concurrent = args.max_requests.max(1);
    if let Some(spec) = &args.rate_limit {
        cfg.rate_limit = Some(parse_rate(spec)?);
    }
    // Fewer retries than the client's default: the uploader retries on its own, and an
    // unreachable server should not stall unmount for long.
    cfg.max_retries = 5;
    let client = Client::new(cfg).map_err(|e| e.to_string())?;
    // One request up front, so bad credentials fail the mount instead of every later call.
    let namespaces = client
        .list_namespaces()
        .await
        .map_err(|e| format!("cannot reach the Workers KV API: {e}"))?;
    Ok((client, server, namespaces))
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

fn get_status(mountpoint: &Path) -> Result<serde_json::Value, String> {
    let path = cpath(mountpoint)?;
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
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "{} is not a kvfs mount ({e})",
            mountpoint.display()
        ));
    }
    serde_json::from_slice(&buf[..n as usize])
        .map_err(|e| format!("bad status from the mount: {e}"))
}

pub fn status(args: StatusArgs) -> i32 {
    match get_status(&args.mountpoint) {
        Ok(s) => {
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            0
        }
        Err(e) => fail(&e),
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

pub fn unmount(args: UnmountArgs) -> i32 {
    let mp = &args.mountpoint;
    let status = match get_status(mp) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let pid = status["pid"].as_i64().unwrap_or(0) as i32;
    let path = match cpath(mp) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let name = CString::new(xattr::FLUSH).unwrap();
    let rc = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    // Whatever could not be uploaded is safe in the journal; the next mount resumes it.
    let mut code = 0;
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!("kvfs: not everything could be uploaded ({e}); it stays in the journal and the next mount of this account uploads it:");
        if let Ok(s) = get_status(mp) {
            let p = &s["pending"];
            eprintln!(
                "kvfs: {} writes ({} bytes) and {} deletes pending, {} refused by the server",
                p["writes"], p["bytes"], p["deletes"], p["refused"]
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
    let rc = if unsafe { libc::geteuid() } == 0 {
        unsafe { libc::umount2(path.as_ptr(), 0) }
    } else {
        match std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(mp)
            .status()
        {
            Ok(s) if s.success() => 0,
            _ => -1,
        }
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return fail(&format!("unmount {}: {e}", mp.display()));
    }
    // The daemon finishes after the kernel lets go; wait so no process is left behind.
    for _ in 0..2400 {
        if pid <= 0 || !process_alive(pid) {
            return code;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fail(&format!(
        "unmounted, but the daemon (pid {pid}) is still running"
    ))
}
