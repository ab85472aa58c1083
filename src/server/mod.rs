//! `kvfs serve`: the Workers KV REST API v4 on SQLite.
//!
//! CONTRACT (used by main.rs, the mount's embedded default, and tests; keep these):

mod admission;
mod body;
mod conn;
mod faults;
pub mod local;
mod ops;
mod routes;
mod stats;
mod store;

use crate::cli::{parse_duration, parse_size, ServeArgs};
use clap::{Args, Parser};
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

/// Test aids, timeouts and bounds of `kvfs serve` (flags; documented in docs/SERVER.md). The
/// defaults (`ServeOptions::default()`) are the flags' defaults: no test aids.
#[derive(Debug, Clone, Args)]
pub struct ServeOptions {
    /// Serve the test aids under /__kvfs/ (request counters, a settable clock), with the token.
    #[arg(long)]
    pub test_aids: bool,
    /// Time allowed for a request's head (request line and headers), from its first byte.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DUR")]
    pub header_timeout: Duration,
    /// Time a request body may go without a byte arriving.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DUR")]
    pub body_timeout: Duration,
    /// A connection with no request in progress and no byte received is closed after this.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DUR")]
    pub idle_timeout: Duration,
    /// On SIGINT/SIGTERM, time given to in-flight requests before connections are closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DUR")]
    pub shutdown_grace: Duration,
    /// API requests handled at once; more wait up to --queue-wait, then get 429.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_requests: usize,
    /// Memory for request bodies being handled, counted at twice their size (e.g. 512M).
    /// Bodies that do not fit wait up to --queue-wait, then get 429.
    #[arg(long, default_value = "512M", value_parser = parse_size, value_name = "SIZE")]
    pub max_body_memory: u64,
    /// How long a request waits for a slot or for body memory before a 429.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DUR")]
    pub queue_wait: Duration,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            options: ServeOptions,
        }
        Defaults::parse_from(["kvfs"]).options
    }
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
    /// Stops accepting, gives in-flight requests the grace period, closes the database.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        if let Err(e) = self.task.await {
            tracing::error!("server task failed: {e}");
        }
    }
}

/// Binds and starts serving in the background of the current runtime, with the default
/// options (no test aids), as the mount's embedded store does.
pub async fn start(config: ServerConfig) -> std::io::Result<RunningServer> {
    start_with(config, ServeOptions::default()).await
}

/// `start` with test aids, timeouts and bounds chosen.
pub async fn start_with(
    config: ServerConfig,
    options: ServeOptions,
) -> std::io::Result<RunningServer> {
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
        test_aids: options.test_aids,
        body_timeout: options.body_timeout,
        admission: admission::Admission::new(
            options.max_requests,
            options.max_body_memory,
            options.queue_wait,
        ),
    });
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let timeouts = conn::Timeouts {
        header: options.header_timeout,
        idle: options.idle_timeout,
        grace: options.shutdown_grace,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    // The task owns the state and so the store: when it ends, SQLite is closed.
    let task = tokio::spawn(conn::serve(listener, state, timeouts, stopped));
    Ok(RunningServer { addr, stop, task })
}

/// `kvfs serve`: blocking; prints `listening on http://ADDR/client/v4` on stdout once bound;
/// runs until SIGINT/SIGTERM; returns the exit code.
pub fn run(args: ServeArgs) -> i32 {
    crate::paths::init_logging(false, None);
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
    let data_dir = args.data.unwrap_or_else(default_data_dir);
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
        let server = match start_with(config.clone(), args.options).await {
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
fn default_data_dir() -> PathBuf {
    crate::paths::data_home().join("kvfs").join("serve")
}

/// `n` random bytes from the OS, as lowercase hex.
pub(crate) fn random_hex(n: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
