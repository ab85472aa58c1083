//! Command-line definitions. Resolution order for every setting: flag (or `-o name=value`, or
//! the --credentials file) > environment > default.

use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
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
Backend, first match wins (variables from --credentials FILE if given, else the environment):
  --api-url / KVFS_API_URL     that API; token from KVFS_TOKEN or CLOUDFLARE_API_TOKEN
  CLOUDFLARE_API_TOKEN (or CLOUDFLARE_API_KEY + CLOUDFLARE_EMAIL) and CLOUDFLARE_ACCOUNT_ID
                               Cloudflare; never pass a token on the command line
  otherwise                    the embedded local store (--local DIR)

Examples:
  kvfs mount /mnt/kv                      # all namespaces, one directory each
  kvfs mount --namespace myapp /mnt/app   # one namespace as the root
  rsync -a /mnt/kv/myapp/ backup/         # back it up
  kvfs unmount /mnt/kv                    # upload what is pending, then unmount
  kvfs mount --credentials /etc/kvfs/credentials /mnt/kv

In /etc/fstab (mount /mnt/kv runs `kvfs kvfs:myapp /mnt/kv -o ...`; see docs/SERVICE.md):
  kvfs:myapp  /mnt/kv  fuse.kvfs  credentials=/etc/kvfs/credentials,allow_other  0 0

Writes are uploaded in bulk about --write-delay after the last change; close() returns once
the change is safe in the journal on local disk, fsync once the server has it.")]
    Mount(MountArgs),
    /// Upload what is pending, then unmount. Exits non-zero if anything could not be uploaded.
    #[command(after_help = "\
Changes that cannot be uploaded (the API is unreachable, or refuses them) are not lost: they stay
in the journal in the cache dir, and the next mount of the same account with the same cache dir
uploads them before it serves anything. `kvfs status` lists them.

If the mount's daemon has died (\"Transport endpoint is not connected\"), `kvfs unmount` clears
the dead mount and exits 0; its journal waits for the next mount.")]
    Unmount(UnmountArgs),
    /// Show what a mount is doing: pending uploads, requests by operation, cache hits.
    Status(StatusArgs),
    /// Write the man page or shell completions (for packagers).
    #[command(hide = true)]
    Generate(GenerateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on. Port 0 picks a free port; the address is printed on stdout.
    #[arg(long, default_value = "127.0.0.1:8787", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Directory holding the SQLite database [default: $XDG_DATA_HOME/kvfs/serve]. This is
    /// not the embedded store that `kvfs mount` uses without credentials ($XDG_DATA_HOME/kvfs):
    /// the two hold separate data.
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
    #[command(flatten)]
    pub options: crate::server::ServeOptions,
}

#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    /// Where to mount (an existing, empty directory).
    pub mountpoint: PathBuf,
    /// Mount only this namespace (title or id) as the root.
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Read Cloudflare credentials from FILE instead of the environment: lines such as
    /// CLOUDFLARE_API_TOKEN=..., CLOUDFLARE_ACCOUNT_ID=... (or CLOUDFLARE_API_KEY and
    /// CLOUDFLARE_EMAIL), optionally KVFS_API_URL=... The file must not be readable by group or
    /// others (chmod 600).
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// Refuse every change with EROFS.
    #[arg(long)]
    pub read_only: bool,
    /// Stay in the foreground (logs go to stderr) instead of daemonizing.
    #[arg(short, long)]
    pub foreground: bool,
    /// Mount even if MOUNTPOINT is not empty (its files are hidden while mounted).
    #[arg(long)]
    pub allow_non_empty: bool,
    /// Directory for staged writes, the journal and large cached values; one mount at a time
    /// [default: $XDG_CACHE_HOME/kvfs/<backend>]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bytes of values to keep cached (memory and cache dir), e.g. 256M.
    #[arg(long, default_value = "256M", value_parser = parse_size, value_name = "BYTES")]
    pub cache_size: u64,
    /// How long listings and attributes are trusted before asking KV again (a walk such as
    /// `ls -lR` or rsync reads one listing through, up to 10 times this: docs/SEMANTICS.md).
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DUR")]
    pub metadata_ttl: Duration,
    /// How long to gather writes before uploading them in bulk.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DUR")]
    pub write_delay: Duration,
    /// Give keys written through the mount this TTL (seconds, at least 60), unless they
    /// have an expiration of their own.
    #[arg(long, value_name = "SECS")]
    pub expiration_ttl: Option<u64>,
    /// Owner shown for keys this mount did not make (what it makes belongs to its creator) [default: the mounting user]
    #[arg(long, value_name = "N")]
    pub uid: Option<u32>,
    /// Group shown for keys this mount did not make [default: the mounting user's group]
    #[arg(long, value_name = "N")]
    pub gid: Option<u32>,
    /// Permission bits of keys this mount did not make (new files take the mode and umask of their creator), octal.
    #[arg(long, default_value = "644", value_parser = parse_mode, value_name = "MODE")]
    pub file_mode: u32,
    /// Permission bits of directories this mount did not make, octal.
    #[arg(long, default_value = "755", value_parser = parse_mode, value_name = "MODE")]
    pub dir_mode: u32,
    /// Keep file type, mode, owner, mtime and size in each written key's KV metadata (member
    /// "kvfs"), with symlinks and empty directories as keys: backups restore anywhere.
    #[arg(long)]
    pub posix_metadata: bool,
    /// Let other users than the one mounting access the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// Workers KV API base URL, e.g. http://127.0.0.1:8787/client/v4 (a `kvfs serve`).
    /// Also read from KVFS_API_URL (or the credentials file). Its token is read from
    /// KVFS_TOKEN or CLOUDFLARE_API_TOKEN.
    // Not clap's `env`: a credentials file must be able to set it too, and clap would show
    // an unset variable as `[env: KVFS_API_URL=]`.
    #[arg(long, value_name = "URL")]
    pub api_url: Option<String>,
    /// Data directory of the embedded local store [default: $XDG_DATA_HOME/kvfs]; not the
    /// same data as `kvfs serve`'s default ($XDG_DATA_HOME/kvfs/serve).
    #[arg(long, value_name = "DIR")]
    pub local: Option<PathBuf>,
    /// Most API requests in flight at once.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_requests: usize,
    /// Files the kernel may hold entries of (looked up, not open) before the least recently
    /// used are let go, to bound the daemon's memory in walks of many keys (0: never).
    #[arg(long, default_value_t = 50_000, value_name = "N")]
    pub max_entries: usize,
    /// Client-side request budget, N requests per SECS seconds, e.g. 1200/300
    /// [default: 1200/300 against api.cloudflare.com, off otherwise]
    #[arg(long, value_name = "N/SECS")]
    pub rate_limit: Option<String>,
    /// Verbose logs (same as RUST_LOG=kvfs=debug).
    #[arg(long)]
    pub debug: bool,
    /// Mount options, comma-separated, as in fstab: any long option above as name=value or
    /// name (`-o cache_dir=/var/cache/kvfs,read_only`), and ro, rw, allow_other, exec, noexec,
    /// suid, nosuid, dev, nodev, atime, noatime, sync, async, dirsync. noauto, nofail, _netdev,
    /// user(s) and x-* are accepted and ignored (they are for mount(8) and systemd).
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
    /// Any path inside the mount [default: every kvfs mount]
    pub path: Option<PathBuf>,
    /// Print the report as JSON, for programs.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// What to write: `man` (kvfs.1 and one page per subcommand) or `completions` (bash, zsh,
    /// fish).
    #[arg(value_parser = ["man", "completions"])]
    pub what: String,
    /// Directory to write the files into (created if missing).
    pub dir: PathBuf,
}

/// Options the kernel (or FUSE) takes as they are; `kvfs mount` passes them on.
pub const KERNEL_OPTIONS: &[&str] = &[
    "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime", "sync", "async",
    "dirsync",
];

/// Options that mount(8), systemd or other tools put in fstab lines, meaningless to kvfs.
fn ignored_option(o: &str) -> bool {
    matches!(
        o,
        "noauto"
            | "auto"
            | "nofail"
            | "_netdev"
            | "user"
            | "nouser"
            | "users"
            | "owner"
            | "group"
            | "defaults"
            | "rw"
            | "default_permissions"
    ) || o.starts_with("x-")
        || o.starts_with("comment=")
}

/// Rewrites a command line so clap sees `kvfs mount ...` with long options:
/// - the form mount(8) uses through mount.fuse3 for type `fuse.kvfs`:
///   `kvfs SOURCE MOUNTPOINT -o OPTS`, SOURCE being `kvfs` or `kvfs:NAMESPACE`;
/// - every `-o name=value` / `-o name` of `kvfs mount` becomes `--name=value` / `--name`.
///
/// Options the kernel takes stay in `-o`; an unknown option is an error naming it.
pub fn expand_mount_args(argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Some(first) = argv.get(1).and_then(|a| a.to_str()) else {
        return Ok(argv);
    };
    let mut out: Vec<OsString> = vec![argv[0].clone(), "mount".into()];
    let rest: &[OsString] = if first == "kvfs" || first.starts_with("kvfs:") {
        if let Some(ns) = first.strip_prefix("kvfs:").filter(|ns| !ns.is_empty()) {
            out.push("--namespace".into());
            out.push(ns.into());
        }
        &argv[2..]
    } else if first == "mount" {
        &argv[2..]
    } else {
        return Ok(argv);
    };
    let longs = mount_long_options();
    let mut kernel = Vec::new();
    let mut iter = rest.iter();
    while let Some(arg) = iter.next() {
        let opts = match arg.to_str() {
            Some("--") => {
                out.push(arg.clone());
                out.extend(iter.by_ref().cloned());
                break;
            }
            Some("-o") => iter
                .next()
                .ok_or("-o needs a value, e.g. -o allow_other")?
                .to_str()
                .ok_or("-o: options must be UTF-8")?,
            Some(a) if a.starts_with("-o") => a[2..].trim_start_matches('='),
            _ => {
                out.push(arg.clone());
                continue;
            }
        };
        for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (opt, None),
            };
            if ignored_option(opt) {
                continue;
            }
            if KERNEL_OPTIONS.contains(&opt) {
                kernel.push(opt.to_string());
                continue;
            }
            let long = match name {
                "ro" => "read-only".to_string(),
                _ => name.replace('_', "-"),
            };
            match (longs.iter().find(|(l, _)| *l == long), value) {
                (Some((_, true)), None) => {
                    return Err(format!("-o {name} needs a value: -o {name}=..."))
                }
                (Some((_, true)), Some(v)) => out.push(format!("--{long}={v}").into()),
                (Some((_, false)), Some(_)) => return Err(format!("-o {name} takes no value")),
                (Some((_, false)), None) => out.push(format!("--{long}").into()),
                (None, _) => {
                    return Err(format!(
                        "unknown mount option {name:?} (see `kvfs mount --help`)"
                    ))
                }
            }
        }
    }
    if !kernel.is_empty() {
        out.push("-o".into());
        out.push(kernel.join(",").into());
    }
    Ok(out)
}

/// The long options of `kvfs mount`, with whether each takes a value.
fn mount_long_options() -> Vec<(String, bool)> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let mount = cmd.find_subcommand("mount").expect("mount subcommand");
    mount
        .get_arguments()
        .filter_map(|a| Some((a.get_long()?.to_string(), a.get_action().takes_values())))
        .filter(|(l, _)| l != "help")
        .collect()
}

/// `kvfs generate man|completions DIR`: man pages (kvfs.1, kvfs-mount.1, ...) or completion
/// scripts (kvfs.bash, _kvfs, kvfs.fish), from these same definitions. Returns the exit code.
pub fn generate(args: GenerateArgs) -> i32 {
    use clap::CommandFactory;
    let result = std::fs::create_dir_all(&args.dir).and_then(|()| {
        let mut cmd = Cli::command();
        if args.what == "man" {
            clap_mangen::generate_to(cmd, &args.dir)
        } else {
            use clap_complete::Shell;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut cmd, "kvfs", &args.dir)?;
            }
            Ok(())
        }
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kvfs generate: {}: {e}", args.dir.display());
            1
        }
    }
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

    fn expand(args: &[&str]) -> Result<Vec<String>, String> {
        let argv = std::iter::once("kvfs").chain(args.iter().copied());
        expand_mount_args(argv.map(OsString::from).collect())
            .map(|v| v.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn fstab_form_becomes_kvfs_mount() {
        assert_eq!(
            expand(&[
                "kvfs:my app",
                "/mnt/kv",
                "-o",
                "ro,noexec,nosuid,nodev,credentials=/etc/kvfs/c,cache-dir=/var/cache/kvfs,allow_other"
            ])
            .unwrap(),
            [
                "kvfs",
                "mount",
                "--namespace",
                "my app",
                "/mnt/kv",
                "--read-only",
                "--credentials=/etc/kvfs/c",
                "--cache-dir=/var/cache/kvfs",
                "--allow-other",
                "-o",
                "noexec,nosuid,nodev"
            ]
        );
        // The whole account; what mount(8) and systemd leave in is ignored.
        assert_eq!(
            expand(&[
                "kvfs",
                "/mnt/kv",
                "-o",
                "rw,noauto,nofail,_netdev,users,x-systemd.automount,default_permissions"
            ])
            .unwrap(),
            ["kvfs", "mount", "/mnt/kv"]
        );
        // Parses with clap, `_` and `-` alike, values included.
        let argv = expand(&[
            "mount",
            "/m",
            "-owrite_delay=5s,read_only",
            "-o",
            "metadata-ttl=1m,allow_non_empty,debug,posix-metadata",
        ])
        .unwrap();
        let Command::Mount(m) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not mount")
        };
        assert_eq!(m.write_delay, Duration::from_secs(5));
        assert_eq!(m.metadata_ttl, Duration::from_secs(60));
        assert!(m.read_only && m.allow_non_empty && m.debug && m.posix_metadata);
        assert!(m.options.is_empty());
    }

    #[test]
    fn bad_mount_options_are_named() {
        let e = expand(&["mount", "/m", "-o", "bogus"]).unwrap_err();
        assert!(e.contains("\"bogus\""), "{e}");
        let e = expand(&["mount", "/m", "-o", "cache_dir"]).unwrap_err();
        assert!(e.contains("needs a value"), "{e}");
        let e = expand(&["mount", "/m", "-o", "read_only=yes"]).unwrap_err();
        assert!(e.contains("takes no value"), "{e}");
        // Other subcommands are left alone.
        assert_eq!(expand(&["status", "-o"]).unwrap(), ["kvfs", "status", "-o"]);
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
