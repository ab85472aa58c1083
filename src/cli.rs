//! Command-line definitions. Resolution order for every setting: flag > environment > default.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "kvfs",
    version,
    about = "Mount Cloudflare Workers KV as a filesystem, or serve the Workers KV API locally",
    long_about = "kvfs mounts a Cloudflare Workers KV account as a filesystem: one directory per \
namespace, one file per key. `ls`, `cat`, `cp`, `mv`, `rm`, `rsync` and `getfattr`/`setfattr` work \
on keys and their metadata.\n\nWith no Cloudflare credentials in the environment, `kvfs mount` uses an \
embedded local store, so you can try it at once. `kvfs serve` runs that same local implementation of \
the Workers KV REST API as a server, for tests and for tools such as wrangler and the Cloudflare SDKs."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the Workers KV REST API v4 locally, stored in SQLite.
    Serve(ServeArgs),
    /// Mount a Workers KV account (or one namespace) at MOUNTPOINT.
    #[command(after_help = "\
Backend, first match wins:
  --api-url / KVFS_API_URL     that API; token from KVFS_TOKEN or CLOUDFLARE_API_TOKEN
  CLOUDFLARE_API_TOKEN (or CLOUDFLARE_API_KEY + CLOUDFLARE_EMAIL) and CLOUDFLARE_ACCOUNT_ID
                               Cloudflare; never pass a token on the command line
  otherwise                    the embedded local store (--local DIR)

Examples:
  kvfs mount /mnt/kv                      # all namespaces, one directory each
  kvfs mount --namespace myapp /mnt/app   # one namespace as the root
  rsync -a /mnt/kv/myapp/ backup/         # back it up
  kvfs unmount /mnt/kv                    # upload what is pending, then unmount

Writes are uploaded in bulk about --write-delay after the last change; close() returns once
the change is safe in the journal on local disk, fsync once the server has it.")]
    Mount(MountArgs),
    /// Upload what is pending, then unmount. Exits non-zero if anything could not be uploaded.
    Unmount(UnmountArgs),
    /// Show what a mount is doing: pending uploads, requests by operation, cache hits.
    Status(StatusArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on. Port 0 picks a free port; the address is printed on stdout.
    #[arg(long, default_value = "127.0.0.1:8787", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Directory holding the SQLite database [default: $XDG_DATA_HOME/kvfs/serve]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// API token clients must send as `Authorization: Bearer <token>` (or as X-Auth-Key).
    /// Prefer the KVFS_TOKEN variable: command lines are visible to other users.
    /// With neither, a random token is generated and printed once.
    #[arg(long, env = "KVFS_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Test aid: delay added to every API request, e.g. 20ms.
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    pub latency: Option<Duration>,
    /// Test aid: share (0.0–1.0) of API requests answered with 500, 503, 429 or a dropped connection.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub fail_rate: f64,
    /// Seed for --fail-rate, so a run can be repeated exactly.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub seed: u64,
}

#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    /// Where to mount (an existing, empty directory).
    pub mountpoint: PathBuf,
    /// Mount only this namespace (title or id) as the root.
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Refuse every change with EROFS.
    #[arg(long)]
    pub read_only: bool,
    /// Stay in the foreground (logs go to stderr) instead of daemonizing.
    #[arg(short, long)]
    pub foreground: bool,
    /// Directory for staged writes, the journal and large cached values
    /// [default: $XDG_CACHE_HOME/kvfs/<backend>]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bytes of values to keep cached (memory and cache dir), e.g. 256M.
    #[arg(long, default_value = "256M", value_parser = parse_size, value_name = "BYTES")]
    pub cache_size: u64,
    /// How long listings and attributes are trusted before asking KV again.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DUR")]
    pub metadata_ttl: Duration,
    /// How long to gather writes before uploading them in bulk.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DUR")]
    pub write_delay: Duration,
    /// Give keys written through the mount this TTL (seconds, at least 60), unless they
    /// have an expiration of their own.
    #[arg(long, value_name = "SECS")]
    pub expiration_ttl: Option<u64>,
    /// Owner reported for files and directories [default: the mounting user]
    #[arg(long, value_name = "N")]
    pub uid: Option<u32>,
    /// Group reported for files and directories [default: the mounting user's group]
    #[arg(long, value_name = "N")]
    pub gid: Option<u32>,
    /// Permission bits of files, octal.
    #[arg(long, default_value = "644", value_parser = parse_mode, value_name = "MODE")]
    pub file_mode: u32,
    /// Permission bits of directories, octal.
    #[arg(long, default_value = "755", value_parser = parse_mode, value_name = "MODE")]
    pub dir_mode: u32,
    /// Let other users than the one mounting access the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// Workers KV API base URL, e.g. http://127.0.0.1:8787/client/v4 (a `kvfs serve`).
    /// Its token is read from KVFS_TOKEN or CLOUDFLARE_API_TOKEN.
    #[arg(long, env = "KVFS_API_URL", value_name = "URL")]
    pub api_url: Option<String>,
    /// Data directory of the embedded local store [default: $XDG_DATA_HOME/kvfs]
    #[arg(long, value_name = "DIR")]
    pub local: Option<PathBuf>,
    /// Most API requests in flight at once.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_requests: usize,
    /// Client-side request budget, N requests per SECS seconds, e.g. 1200/300
    /// [default: 1200/300 against api.cloudflare.com, off otherwise]
    #[arg(long, value_name = "N/SECS")]
    pub rate_limit: Option<String>,
    /// Verbose logs (same as RUST_LOG=kvfs=debug).
    #[arg(long)]
    pub debug: bool,
    /// Extra mount options, comma-separated (ro, allow_other, default_permissions, ...).
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct UnmountArgs {
    /// The mount to flush and unmount.
    pub mountpoint: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The mount to report on.
    pub mountpoint: PathBuf,
}

/// Parses `20ms`, `1s`, `1.5s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 1s, 2m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "us" => n / 1_000_000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `1048576`, `512K`, `256M`, `2G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}: expected e.g. 256M"))
}

/// Parses an octal permission mode such as `644` or `0755`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("invalid mode {s:?}: expected octal such as 644"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20ms").unwrap(), Duration::from_millis(20));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn sizes_and_modes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("10").unwrap(), 10);
        assert!(parse_size("M").is_err());
        assert_eq!(parse_mode("644").unwrap(), 0o644);
        assert_eq!(parse_mode("0755").unwrap(), 0o755);
        assert!(parse_mode("9").is_err());
    }
}
