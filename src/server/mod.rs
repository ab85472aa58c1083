//! `kvfs serve`: the Workers KV REST API v4 on SQLite.
//!
//! CONTRACT (used by main.rs, the mount's embedded default, and tests; keep these):

use crate::cli::ServeArgs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
}

impl RunningServer {
    /// `http://ADDR/client/v4`
    pub fn base_url(&self) -> String {
        format!("http://{}/client/v4", self.addr)
    }
    /// Stops accepting, finishes in-flight requests, closes the database.
    pub async fn shutdown(self) {
        todo!()
    }
}

/// Binds and starts serving in the background of the current runtime.
pub async fn start(config: ServerConfig) -> std::io::Result<RunningServer> {
    todo!()
}

/// `kvfs serve`: blocking; prints `listening on http://ADDR/client/v4` on stdout once bound;
/// runs until SIGINT/SIGTERM; returns the exit code.
pub fn run(args: ServeArgs) -> i32 {
    todo!()
}
