//! The per-key baseline for `scripts/bench`: the benchmark's jobs done the naive way, one API
//! request per key, one request at a time, through kvfs's own client. This is what a mount
//! without batching or a `wrangler kv key put` shell loop costs.
//!
//! ```sh
//! KVFS_TOKEN=T cargo run --release --example baseline -- \
//!     --api-url http://127.0.0.1:8787/client/v4 --account A --namespace NSID put --src DIR
//! ```
//!
//! Jobs (one per run, so the caller can read the server's counters around each):
//! - `put --src DIR`: one PUT per file under DIR (key = path relative to DIR);
//! - `ls`: list all keys, then one GET per key (a naive `ls -l` needs the value for the size);
//! - `cat --src DIR`: one GET per file under DIR (names known, as `cat` is given them);
//! - `rsync --out DIR`: list all keys, GET each, write it under DIR;
//! - `rm`: list all keys, then one DELETE per key.
//!
//! Prints one JSON line: job, keys, bytes, requests by operation (client-side, retries
//! included), total requests and wall time in seconds.

use bytes::Bytes;
use clap::{Parser, Subcommand};
use kvfs::client::{Auth, Client, ClientConfig, PutOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// API base URL, e.g. http://127.0.0.1:8787/client/v4.
    #[arg(long)]
    api_url: String,
    /// Account id (any string against `kvfs serve`).
    #[arg(long, env = "CLOUDFLARE_ACCOUNT_ID")]
    account: String,
    /// Namespace id to work in.
    #[arg(long)]
    namespace: String,
    #[command(subcommand)]
    job: Job,
}

#[derive(Subcommand)]
enum Job {
    Put {
        #[arg(long)]
        src: PathBuf,
    },
    Ls,
    Cat {
        #[arg(long)]
        src: PathBuf,
    },
    Rsync {
        #[arg(long)]
        out: PathBuf,
    },
    Rm,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Files under `root` as (key, path), in sorted order so runs are repeatable.
fn walk(root: &Path) -> Res<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root)?;
                let key = rel
                    .to_str()
                    .ok_or("file name is not UTF-8")?
                    .replace(std::path::MAIN_SEPARATOR, "/");
                out.push((key, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[tokio::main]
async fn main() -> Res<()> {
    let args = Args::parse();
    let token = std::env::var("KVFS_TOKEN").map_err(|_| "set KVFS_TOKEN")?;
    let mut cfg = ClientConfig::new(args.api_url, args.account, Auth::Token(token));
    // Strictly one request at a time: the naive loop being measured.
    cfg.max_concurrent = 1;
    let client = Client::new(cfg)?;
    let ns = args.namespace.as_str();

    let start = Instant::now();
    let (name, keys, bytes) = match &args.job {
        Job::Put { src } => {
            let files = walk(src)?;
            let mut bytes = 0;
            for (key, path) in &files {
                let value = Bytes::from(std::fs::read(path)?);
                bytes += value.len() as u64;
                client
                    .put_value(ns, key, value, &PutOptions::default())
                    .await?;
            }
            ("put", files.len(), bytes)
        }
        Job::Ls => {
            let keys = client.list_all_keys(ns, None).await?;
            let mut bytes = 0;
            for k in &keys {
                bytes += client.get_value(ns, &k.name).await?.bytes.len() as u64;
            }
            ("ls", keys.len(), bytes)
        }
        Job::Cat { src } => {
            let files = walk(src)?;
            let mut bytes = 0;
            for (key, _) in &files {
                bytes += client.get_value(ns, key).await?.bytes.len() as u64;
            }
            ("cat", files.len(), bytes)
        }
        Job::Rsync { out } => {
            let keys = client.list_all_keys(ns, None).await?;
            let mut bytes = 0;
            for k in &keys {
                let value = client.get_value(ns, &k.name).await?.bytes;
                let path = out.join(&k.name);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&path, &value)?;
                bytes += value.len() as u64;
            }
            ("rsync", keys.len(), bytes)
        }
        Job::Rm => {
            let keys = client.list_all_keys(ns, None).await?;
            for k in &keys {
                client.delete_value(ns, &k.name).await?;
            }
            ("rm", keys.len(), 0)
        }
    };
    let wall = start.elapsed().as_secs_f64();

    let requests: BTreeMap<String, u64> = client
        .request_counts()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    let line = serde_json::json!({
        "job": name,
        "keys": keys,
        "bytes": bytes,
        "requests": requests,
        "total_requests": client.total_requests(),
        "retries": client.retry_count(),
        "wall_s": wall,
    });
    println!("{line}");
    Ok(())
}
