//! Where kvfs keeps things by default (the XDG base directories), and its logging set-up:
//! shared by `kvfs mount` and `kvfs serve`.

use std::path::PathBuf;
use std::sync::Mutex;

fn var(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn home() -> PathBuf {
    var("HOME").unwrap_or_else(|| PathBuf::from("/root"))
}

/// `$XDG_DATA_HOME`, else `~/.local/share`.
pub fn data_home() -> PathBuf {
    var("XDG_DATA_HOME").unwrap_or_else(|| home().join(".local/share"))
}

/// `$XDG_CACHE_HOME`, else `~/.cache`.
pub fn cache_home() -> PathBuf {
    var("XDG_CACHE_HOME").unwrap_or_else(|| home().join(".cache"))
}

/// Logs to stderr, or appended to `file` (a daemon's log) when given. `debug` overrides
/// `RUST_LOG`; the default level is info.
pub fn init_logging(debug: bool, file: Option<PathBuf>) {
    use tracing_subscriber::EnvFilter;
    let filter = if debug {
        EnvFilter::new("kvfs=debug")
    } else {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("kvfs=info"))
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let file = file.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let _ = match file {
        Some(f) => builder
            .with_ansi(false)
            .with_writer(Mutex::new(f))
            .try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}
