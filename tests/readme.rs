//! The README's Quick start, run verbatim as a newcomer would after Install: `kvfs` on PATH, a
//! fresh home directory, no credentials, a scratch working directory.

mod common;
mod mnt;

use mnt::{is_mounted, DaemonGuard};
use std::path::Path;
use std::process::Command;

/// The first ```sh block after the heading `section`.
fn shell_block(readme: &str, section: &str) -> String {
    let at = readme
        .find(&format!("\n{section}\n"))
        .unwrap_or_else(|| panic!("no {section:?} in README.md"));
    let rest = &readme[at..];
    let start = rest.find("```sh\n").expect("no ```sh block") + "```sh\n".len();
    let len = rest[start..].find("```").expect("unterminated block");
    rest[start..start + len].to_string()
}

#[test]
fn quick_start_runs_verbatim() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let script = shell_block(&readme, "## Quick start");
    let tmp = tempfile::tempdir().unwrap();
    let (home, work) = (tmp.path().join("home"), tmp.path().join("work"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let mountpoint = home.join("kv");
    let _guard = DaemonGuard::new(&mountpoint, home.join(".cache/kvfs"));

    // `kvfs` on PATH, as Install leaves it.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_kvfs")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    // Every line must succeed, as it would for someone typing them one by one.
    cmd.args(["-euo", "pipefail", "-c", &script])
        .current_dir(&work)
        .env("HOME", &home)
        .env("PATH", path);
    for v in [
        "XDG_DATA_HOME",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "CLOUDFLARE_API_TOKEN",
        "CLOUDFLARE_API_KEY",
        "CLOUDFLARE_EMAIL",
        "CLOUDFLARE_ACCOUNT_ID",
        "CLOUDFLARE_API_BASE_URL",
        "KVFS_API_URL",
        "KVFS_TOKEN",
    ] {
        cmd.env_remove(v);
    }
    let out = common::output_within(&mut cmd, common::test_deadline());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the Quick start failed ({}):\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );

    // What the block promises.
    assert!(stderr.contains("local store"), "{stderr}");
    assert!(stdout.contains(r#"{"host": "db1"}"#), "{stdout}");
    assert!(
        stdout.contains(r#"user.kv.metadata="{\"owner\":\"ann\"}""#),
        "{stdout}"
    );
    assert!(stdout.contains("user.kv.expiration="), "{stdout}");
    assert_eq!(
        std::fs::read(work.join("backup/db/main.json")).unwrap(),
        std::fs::read(work.join("config/db/main.json")).unwrap()
    );
    assert!(!is_mounted(&mountpoint), "still mounted after the block");
    assert!(home.join(".local/share/kvfs").is_dir());
}
