//! The official clients, unchanged, against `kvfs serve`: the Cloudflare Python SDK, the
//! Cloudflare TypeScript SDK and wrangler. All are installed by scripts/setup; a missing client
//! fails the test rather than skipping it.

mod common;

use common::{output_within, test_deadline, ServerProc, ACCOUNT, TOKEN};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn stats(s: &ServerProc) -> Value {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/__kvfs/stats", s.origin))
        .bearer_auth(TOKEN)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn check(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn python_sdk() {
    let probe = output_within(
        Command::new("python3").args(["-c", "import cloudflare"]),
        test_deadline(),
    );
    assert!(
        probe.status.success(),
        "the `cloudflare` Python module is missing: run scripts/setup\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let s = ServerProc::start(&[]);
    let out = output_within(
        Command::new("python3")
            .arg(clients_dir().join("python_sdk.py"))
            .env("KVFS_BASE_URL", s.base_url())
            .env("KVFS_TOKEN", TOKEN)
            .env("KVFS_ACCOUNT", ACCOUNT)
            // The script's checks must run even where asserts would be stripped.
            .env("PYTHONOPTIMIZE", "2")
            .env_remove("CLOUDFLARE_BASE_URL")
            .env_remove("CLOUDFLARE_API_TOKEN"),
        test_deadline(),
    );
    let stdout = check("python_sdk.py", &out);
    assert!(stdout.contains("python sdk: all checks passed"), "{stdout}");
    // The SDK went through every operation but the deprecated bulk delete route.
    let st = stats(&s);
    for op in EVERY_OP {
        assert!(st[op].as_u64().unwrap() > 0, "{op} never called: {st}");
    }
}

const EVERY_OP: [&str; 13] = [
    "list_namespaces",
    "create_namespace",
    "get_namespace",
    "rename_namespace",
    "delete_namespace",
    "list_keys",
    "get_value",
    "put_value",
    "delete_value",
    "get_metadata",
    "bulk_write",
    "bulk_delete",
    "bulk_get",
];

#[test]
fn typescript_sdk() {
    let script = clients_dir().join("ts_sdk.mjs");
    let sdk = clients_dir().join("node_modules/cloudflare/package.json");
    assert!(
        sdk.exists(),
        "the `cloudflare` npm package is missing at {}: run scripts/setup",
        sdk.display()
    );
    let pinned: Value =
        serde_json::from_str(&std::fs::read_to_string(clients_dir().join("package.json")).unwrap())
            .unwrap();
    let installed: Value = serde_json::from_str(&std::fs::read_to_string(&sdk).unwrap()).unwrap();
    assert_eq!(
        installed["version"], pinned["dependencies"]["cloudflare"],
        "installed SDK differs from the pinned one: run scripts/setup"
    );
    let s = ServerProc::start(&[]);
    let out = output_within(
        Command::new("node")
            .arg(&script)
            .env("KVFS_BASE_URL", s.base_url())
            .env("KVFS_TOKEN", TOKEN)
            .env("KVFS_ACCOUNT", ACCOUNT)
            .env_remove("CLOUDFLARE_BASE_URL")
            .env_remove("CLOUDFLARE_API_TOKEN")
            .env_remove("CLOUDFLARE_API_KEY")
            .env_remove("CLOUDFLARE_EMAIL"),
        test_deadline(),
    );
    let stdout = check("ts_sdk.mjs", &out);
    assert!(stdout.contains("typescript sdk: all"), "{stdout}");
    let st = stats(&s);
    for op in EVERY_OP {
        assert!(st[op].as_u64().unwrap() > 0, "{op} never called: {st}");
    }
}

struct Wrangler {
    bin: PathBuf,
    home: tempfile::TempDir,
    base_url: String,
}

impl Wrangler {
    fn new(s: &ServerProc) -> Wrangler {
        let bin = clients_dir().join("node_modules/.bin/wrangler");
        assert!(
            bin.exists(),
            "wrangler is missing at {}: run scripts/setup",
            bin.display()
        );
        Wrangler {
            bin,
            home: tempfile::tempdir().unwrap(),
            base_url: s.base_url(),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .current_dir(self.home.path())
            // A clean HOME: no login state, no config, no cache from elsewhere.
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join(".config"))
            .env("CLOUDFLARE_API_BASE_URL", &self.base_url)
            .env("CLOUDFLARE_API_TOKEN", TOKEN)
            .env("CLOUDFLARE_ACCOUNT_ID", ACCOUNT)
            // No telemetry, no prompts, no update check: nothing leaves the machine.
            .env("WRANGLER_SEND_METRICS", "false")
            .env("CI", "true")
            .env("NO_COLOR", "1")
            .env_remove("CLOUDFLARE_API_KEY")
            .env_remove("CLOUDFLARE_EMAIL");
        let out = output_within(&mut cmd, test_deadline());
        check(&format!("wrangler {}", args.join(" ")), &out)
    }

    /// Runs independent commands at once (each one is a Node cold start of about 2 s).
    fn run_all(&self, commands: &[Vec<String>]) -> Vec<String> {
        std::thread::scope(|s| {
            let running: Vec<_> = commands
                .iter()
                .map(|c| s.spawn(|| self.run(&c.iter().map(String::as_str).collect::<Vec<_>>())))
                .collect();
            running.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn file(&self, name: &str, content: &str) -> String {
        let p = self.home.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().into_owned()
    }
}

#[test]
fn wrangler() {
    let s = ServerProc::start(&[]);
    let w = Wrangler::new(&s);
    let out = w.run(&["kv", "namespace", "create", "wrangler-ns"]);
    let id = out
        .split('"')
        .find(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no namespace id in:\n{out}"))
        .to_string();

    let listed: Value = serde_json::from_str(&w.run(&["kv", "namespace", "list"])).unwrap();
    assert_eq!(
        listed,
        json!([{"id": id, "title": "wrangler-ns", "supports_url_encoding": true}])
    );

    let ns = ["--remote", "--namespace-id", id.as_str()];
    let with = |args: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(ns.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: Vec<String>| w.run(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // Writes of distinct keys, at once: a raw put with a key that needs encoding; a multipart
    // put (metadata) with a TTL; a bulk put of 1,501 pairs (two batches), one in base64.
    let bulk: Vec<Value> = (0..1500)
        .map(|i| json!({"key": format!("bulk/{i:04}"), "value": format!("v{i}")}))
        .chain([json!({"key": "bin", "value": "AAH/", "base64": true})])
        .collect();
    let bulk_file = w.file("bulk.json", &serde_json::to_string(&bulk).unwrap());
    w.run_all(&[
        with(&["kv", "key", "put", "dir/a b?", "hello wrangler"]),
        with(&[
            "kv",
            "key",
            "put",
            "meta",
            "m-value",
            "--metadata",
            r#"{"by":"wrangler"}"#,
            "--ttl",
            "3600",
        ]),
        with(&["kv", "bulk", "put"])
            .into_iter()
            .chain([bulk_file])
            .collect(),
    ]);
    // The base64 pair was decoded: the value is those three bytes.
    let bin = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/{id}/values/bin", s.ns_url()))
        .bearer_auth(TOKEN)
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(&bin[..], [0x00, 0x01, 0xff]);

    // Reads, at once. `key list` pages through the cursor on its own: 1,503 keys > one page
    // of 1,000.
    let got = w.run_all(&[
        with(&["kv", "key", "get", "dir/a b?"]),
        with(&["kv", "key", "get", "meta"]),
        with(&["kv", "key", "get", "bulk/1499"]),
        with(&["kv", "key", "list"]),
        with(&["kv", "key", "list", "--prefix", "dir/"]),
    ]);
    assert_eq!(got[..3], ["hello wrangler", "m-value", "v1499"]);
    let keys: Value = serde_json::from_str(&got[3]).unwrap();
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 1503);
    let meta = keys.iter().find(|k| k["name"] == "meta").unwrap();
    assert_eq!(meta["metadata"], json!({"by": "wrangler"}));
    assert!(meta["expiration"].as_u64().is_some());
    let prefixed: Value = serde_json::from_str(&got[4]).unwrap();
    assert_eq!(prefixed, json!([{"name": "dir/a b?"}]));

    let del: Vec<String> = (0..1500).map(|i| format!("bulk/{i:04}")).collect();
    let del_file = w.file("delete.json", &serde_json::to_string(&del).unwrap());
    w.run_all(&[
        with(&["kv", "key", "delete", "dir/a b?"]),
        with(&["kv", "bulk", "delete", "--force"])
            .into_iter()
            .chain([del_file])
            .collect(),
    ]);
    let keys: Value = serde_json::from_str(&run(with(&["kv", "key", "list"]))).unwrap();
    assert_eq!(
        keys,
        json!([{"name": "bin"}, {"name": "meta", "metadata": {"by": "wrangler"}, "expiration": meta["expiration"]}])
    );

    // What wrangler sent, by route: bulk put in batches of 1,000, bulk delete via DELETE .../bulk.
    let st = stats(&s);
    assert_eq!(st["bulk_write"], json!(2), "{st}");
    assert_eq!(st["bulk_delete"], json!(2), "{st}");
    assert_eq!(st["put_value"], json!(2), "{st}");
    assert_eq!(st["delete_value"], json!(1), "{st}");

    w.run(&[
        "kv",
        "namespace",
        "delete",
        "--namespace-id",
        &id,
        "--skip-confirmation",
    ]);
    let listed: Value = serde_json::from_str(&w.run(&["kv", "namespace", "list"])).unwrap();
    assert_eq!(listed, json!([]));
}
