//! `kvfs serve`: the Workers KV REST API v4 on SQLite.
//!
//! CONTRACT (used by main.rs, the mount's embedded default, and tests; keep these):

mod faults;
pub mod local;
mod routes;
mod stats;
mod store;

use crate::cli::ServeArgs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub token: String,
    pub latency: Option<Duration>,
    pub fail_rate: f64,
    pub seed: u64,
}

/// A server running on the current tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// `http://ADDR/client/v4`
    pub fn base_url(&self) -> String {
        format!("http://{}/client/v4", self.addr)
    }
    /// Stops accepting, finishes in-flight requests, closes the database.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        // The task owns the router and so the store: when it ends, SQLite is closed.
        if let Err(e) = self.task.await {
            tracing::error!("server task failed: {e}");
        }
    }
}

/// Binds and starts serving in the background of the current runtime.
pub async fn start(config: ServerConfig) -> std::io::Result<RunningServer> {
    let dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&dir))
        .await
        .map_err(std::io::Error::other)??;
    let state = Arc::new(routes::AppState {
        store: Arc::new(store),
        token: config.token,
        latency: config.latency,
        faults: faults::Faults::new(config.fail_rate, config.seed),
        stats: stats::Stats::default(),
        clock_offset: AtomicI64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let app = routes::router(state);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        if let Err(e) = serve.await {
            tracing::error!("server stopped: {e}");
        }
    });
    Ok(RunningServer { addr, stop, task })
}

/// `kvfs serve`: blocking; prints `listening on http://ADDR/client/v4` on stdout once bound;
/// runs until SIGINT/SIGTERM; returns the exit code.
pub fn run(args: ServeArgs) -> i32 {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("kvfs=info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let token = match args.token.filter(|t| !t.is_empty()) {
        Some(t) => t,
        None => match random_hex(16) {
            Ok(t) => {
                // Shown once so the user can configure a client; never logged afterwards.
                eprintln!(
                    "kvfs serve: no --token or KVFS_TOKEN given; API token for this run: {t}"
                );
                t
            }
            Err(e) => {
                eprintln!("kvfs serve: cannot generate a token: {e}");
                return 1;
            }
        },
    };
    let Some(data_dir) = args.data.or_else(default_data_dir) else {
        eprintln!("kvfs serve: no --data given and neither XDG_DATA_HOME nor HOME is set");
        return 2;
    };
    if !(0.0..=1.0).contains(&args.fail_rate) {
        eprintln!("kvfs serve: --fail-rate must be between 0.0 and 1.0");
        return 2;
    }
    let config = ServerConfig {
        listen: args.listen,
        data_dir,
        token,
        latency: args.latency,
        fail_rate: args.fail_rate,
        seed: args.seed,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvfs serve: cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async move {
        let server = match start(config.clone()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "kvfs serve: cannot serve on {} with data in {}: {e}",
                    config.listen,
                    config.data_dir.display()
                );
                return 1;
            }
        };
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on {}", server.base_url());
        let _ = out.flush();
        tracing::info!("data in {}", config.data_dir.display());
        wait_for_signal().await;
        server.shutdown().await;
        0
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `$XDG_DATA_HOME/kvfs/serve`, else `~/.local/share/kvfs/serve`.
fn default_data_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/share"))
        })?;
    Some(base.join("kvfs").join("serve"))
}

/// `n` random bytes from the OS, as lowercase hex.
pub(crate) fn random_hex(n: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
