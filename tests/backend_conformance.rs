//! One suite, three backends: every case runs against `MemBackend`, `LocalStore` (SQLite in
//! a temp dir, in-process) and the HTTP `Client` talking to a real `kvfs serve` process, so
//! the in-process stores cannot drift from what the API does over the wire.
//!
//! Expiration is tested on all three: the in-process backends move their own clocks, and the
//! server's is moved with its `/__kvfs/clock` test aid.

mod common;

use bytes::Bytes;
use common::{ServerProc, ACCOUNT, TOKEN};
use kvfs::api::limits::{MAX_BULK_ITEMS, MAX_METADATA_BYTES, MAX_VALUE_BYTES};
use kvfs::api::{BulkResult, KeyInfo};
use kvfs::backend::mem::MemBackend;
use kvfs::backend::{
    list_all, op, ErrorKind, Fetched, KeyLister, KvBackend, PutOptions, WriteItem,
};
use kvfs::client::{Auth, Client, ClientConfig};
use kvfs::server::local::LocalStore;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------------
// The three backends

enum Clock {
    Mem(Arc<MemBackend>),
    Local(Arc<LocalStore>),
    /// The server's origin, `http://127.0.0.1:PORT`.
    Http(String),
}

/// A backend under test, with what keeps it alive and a way to move its clock.
struct Target {
    kv: Arc<dyn KvBackend>,
    clock: Clock,
    _server: Option<ServerProc>,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    fn mem() -> Target {
        let m = Arc::new(MemBackend::new());
        Target {
            kv: m.clone(),
            clock: Clock::Mem(m),
            _server: None,
            _dir: None,
        }
    }

    fn local() -> Target {
        let dir = tempfile::tempdir().unwrap();
        let l = Arc::new(LocalStore::open(dir.path(), ACCOUNT).unwrap());
        Target {
            kv: l.clone(),
            clock: Clock::Local(l),
            _server: None,
            _dir: Some(dir),
        }
    }

    fn http() -> Target {
        let server = ServerProc::start(&[]);
        let mut config = ClientConfig::new(server.base_url(), ACCOUNT, Auth::Token(TOKEN.into()));
        // Nothing here should be retried: a retry would hide a wrong status.
        config.max_retries = 0;
        let client = Client::new(config).unwrap();
        Target {
            kv: Arc::new(client),
            clock: Clock::Http(server.origin.clone()),
            _server: Some(server),
            _dir: None,
        }
    }

    /// Moves the backend's clock forward.
    async fn advance(&self, secs: u64) {
        match &self.clock {
            Clock::Mem(m) => m.advance(Duration::from_secs(secs)),
            Clock::Local(l) => l.advance(Duration::from_secs(secs)),
            Clock::Http(origin) => {
                let resp = reqwest::Client::new()
                    .post(format!("{origin}/__kvfs/clock"))
                    .bearer_auth(TOKEN)
                    .json(&json!({ "advance": secs }))
                    .send()
                    .await
                    .unwrap();
                assert!(resp.status().is_success(), "clock aid: {}", resp.status());
            }
        }
    }

    fn count(&self, op: &str) -> u64 {
        self.kv.request_counts().get(op).copied().unwrap_or(0)
    }
}

/// Generates `mem::CASE`, `local::CASE` and `http::CASE` for every case.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod mem {
            $(#[tokio::test] async fn $case() { super::$case(&super::Target::mem()).await })*
        }
        mod local {
            $(#[tokio::test] async fn $case() { super::$case(&super::Target::local()).await })*
        }
        mod http {
            $(#[tokio::test] async fn $case() { super::$case(&super::Target::http()).await })*
        }
    };
}

conformance!(
    namespaces_create_list_rename_delete,
    namespace_count_limit,
    values_round_trip,
    metadata_and_expiration_round_trip,
    listing_is_in_byte_order_with_prefixes,
    listing_pages_follow_the_cursor,
    bulk_write_and_bulk_get,
    bulk_requests_are_split_at_the_api_limits,
    bulk_delete,
    key_name_limits,
    value_size_limits,
    metadata_size_limits,
    expiration_limits,
    bulk_get_answer_size_limit,
    missing_namespace_and_missing_key,
    expired_keys_disappear,
);

// ---------------------------------------------------------------------------------------------
// Helpers

const ABSENT_NS: &str = "0000000000000000000000000000abcd";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn keys(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn item(key: &str, value: impl Into<Bytes>) -> WriteItem {
    WriteItem {
        key: key.to_string(),
        value: value.into(),
        opts: PutOptions::default(),
    }
}

fn names(listed: &[KeyInfo]) -> Vec<String> {
    listed.iter().map(|k| k.name.clone()).collect()
}

async fn namespace(t: &Target, title: &str) -> String {
    t.kv.create_namespace(title).await.unwrap().id
}

async fn put(t: &Target, ns: &str, key: &str, value: impl Into<Bytes>) {
    t.kv.put_value(ns, key, value.into(), &PutOptions::default())
        .await
        .unwrap_or_else(|e| panic!("put {key:?}: {e}"));
}

async fn put_err(
    t: &Target,
    ns: &str,
    key: &str,
    value: impl Into<Bytes>,
    opts: &PutOptions,
) -> ErrorKind {
    match t.kv.put_value(ns, key, value.into(), opts).await {
        Ok(()) => panic!("put {key:?} should have failed"),
        Err(e) => e.kind,
    }
}

async fn bulk_err(t: &Target, ns: &str, items: &[WriteItem]) -> ErrorKind {
    match t.kv.bulk_write(ns, items).await {
        Ok(r) => panic!("bulk write should have failed: {r:?}"),
        Err(e) => e.kind,
    }
}

async fn get(t: &Target, ns: &str, key: &str) -> Bytes {
    t.kv.get_value(ns, key)
        .await
        .unwrap_or_else(|e| panic!("get {key:?}: {e}"))
        .bytes
}

async fn get_kind(t: &Target, ns: &str, key: &str) -> ErrorKind {
    match t.kv.get_value(ns, key).await {
        Ok(v) => panic!(
            "get {key:?} should have failed, got {} bytes",
            v.bytes.len()
        ),
        Err(e) => e.kind,
    }
}

async fn all_keys(t: &Target, ns: &str) -> Vec<String> {
    names(&list_all(t.kv.as_ref(), ns, "").await.unwrap())
}

// ---------------------------------------------------------------------------------------------
// Cases

async fn namespaces_create_list_rename_delete(t: &Target) {
    let kv = t.kv.as_ref();
    assert!(kv.list_namespaces().await.unwrap().is_empty());
    let beta = kv.create_namespace("beta").await.unwrap();
    let alpha = kv.create_namespace("alpha").await.unwrap();
    for ns in [&alpha, &beta] {
        assert_eq!(ns.id.len(), 32, "{ns:?}");
        assert!(ns
            .id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
    assert_ne!(alpha.id, beta.id);
    let listed = kv.list_namespaces().await.unwrap();
    let titles: Vec<&str> = listed.iter().map(|n| n.title.as_str()).collect();
    assert_eq!(titles, ["alpha", "beta"]);
    assert_eq!(listed[0].id, alpha.id);

    assert_eq!(
        kv.create_namespace("beta").await.unwrap_err().kind,
        ErrorKind::Exists
    );
    assert_eq!(
        kv.create_namespace("").await.unwrap_err().kind,
        ErrorKind::Invalid
    );
    let long = "é".repeat(513);
    assert_eq!(
        kv.create_namespace(&long).await.unwrap_err().kind,
        ErrorKind::Invalid
    );
    assert!(kv.create_namespace(&"é".repeat(512)).await.is_ok());

    kv.rename_namespace(&beta.id, "gamma").await.unwrap();
    // Renaming to its own title is no conflict; to another's is.
    kv.rename_namespace(&beta.id, "gamma").await.unwrap();
    let e = kv.rename_namespace(&alpha.id, "gamma").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Exists);
    let e = kv.rename_namespace(&alpha.id, "").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);

    put(t, &alpha.id, "k", "v").await;
    kv.delete_namespace(&alpha.id).await.unwrap();
    let titles: Vec<String> = kv
        .list_namespaces()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.title)
        .collect();
    assert_eq!(titles, vec!["gamma".to_string(), "é".repeat(512)]);
    assert_eq!(
        kv.delete_namespace(&alpha.id).await.unwrap_err().kind,
        ErrorKind::NotFound
    );
    let e = kv.rename_namespace(&alpha.id, "delta").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    // The title is free again, and the new namespace is empty.
    let again = kv.create_namespace("alpha").await.unwrap();
    assert_ne!(again.id, alpha.id);
    assert!(all_keys(t, &again.id).await.is_empty());
    // Ids that cannot be namespace ids are refused as such.
    for bad in ["xyz", "0123456789ABCDEF0123456789ABCDEF"] {
        assert_eq!(
            kv.delete_namespace(bad).await.unwrap_err().kind,
            ErrorKind::Invalid
        );
        let e = kv.list_keys(bad, "", None, None).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
    }
}

async fn namespace_count_limit(t: &Target) {
    let kv = t.kv.as_ref();
    let mut last = String::new();
    for i in 0..1000 {
        last = namespace(t, &format!("ns{i:04}")).await;
    }
    assert_eq!(kv.list_namespaces().await.unwrap().len(), 1000);
    let e = kv.create_namespace("one too many").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);
    kv.delete_namespace(&last).await.unwrap();
    namespace(t, "one too many").await;
}

async fn values_round_trip(t: &Target) {
    let ns = namespace(t, "values").await;
    let binary: Vec<u8> = (0..=255u8).rev().collect();
    put(t, &ns, "text", "héllo wörld").await;
    put(t, &ns, "binary", binary.clone()).await;
    put(t, &ns, "empty", Bytes::new()).await;
    put(t, &ns, "dir/with spaces/%2F?#", "odd name").await;
    assert_eq!(get(t, &ns, "text").await, "héllo wörld");
    assert_eq!(get(t, &ns, "binary").await, binary);
    assert_eq!(get(t, &ns, "empty").await, "");
    assert_eq!(get(t, &ns, "dir/with spaces/%2F?#").await, "odd name");
    let v = t.kv.get_value(&ns, "text").await.unwrap();
    assert_eq!(v.expiration, None);

    put(t, &ns, "text", "replaced").await;
    assert_eq!(get(t, &ns, "text").await, "replaced");
    t.kv.delete_value(&ns, "text").await.unwrap();
    assert_eq!(get_kind(t, &ns, "text").await, ErrorKind::NotFound);
    // Deleting a key that is not there succeeds.
    t.kv.delete_value(&ns, "text").await.unwrap();
    assert_eq!(
        all_keys(t, &ns).await,
        keys(&["binary", "dir/with spaces/%2F?#", "empty"])
    );
}

async fn metadata_and_expiration_round_trip(t: &Target) {
    let ns = namespace(t, "meta").await;
    let at = now() + 3600;
    let meta = json!({"mode": 420, "tags": ["a", "é"], "nested": {"x": null}});
    let opts = PutOptions {
        expiration: Some(at),
        expiration_ttl: None,
        metadata: Some(meta.clone()),
    };
    t.kv.put_value(&ns, "both", Bytes::from("v"), &opts)
        .await
        .unwrap();
    let ttl = PutOptions {
        expiration_ttl: Some(600),
        ..PutOptions::default()
    };
    let before = now();
    t.kv.put_value(&ns, "ttl", Bytes::from("v"), &ttl)
        .await
        .unwrap();
    // The TTL wins over an absolute expiration, even one in the past.
    let ttl_wins = PutOptions {
        expiration: Some(1),
        expiration_ttl: Some(120),
        metadata: None,
    };
    t.kv.put_value(&ns, "ttl_wins", Bytes::from("v"), &ttl_wins)
        .await
        .unwrap();
    put(t, &ns, "plain", "v").await;
    let after = now();

    let listed = list_all(t.kv.as_ref(), &ns, "").await.unwrap();
    assert_eq!(names(&listed), keys(&["both", "plain", "ttl", "ttl_wins"]));
    assert_eq!(listed[0].expiration, Some(at));
    assert_eq!(listed[0].metadata, Some(meta.clone()));
    assert_eq!((listed[1].expiration, &listed[1].metadata), (None, &None));
    let exp = listed[2].expiration.unwrap();
    assert!((before + 600..=after + 600).contains(&exp), "{exp}");
    let exp = listed[3].expiration.unwrap();
    assert!((before + 120..=after + 120).contains(&exp), "{exp}");

    assert_eq!(
        t.kv.get_value(&ns, "both").await.unwrap().expiration,
        Some(at)
    );
    let got = t.kv.bulk_get(&ns, &keys(&["both", "plain"])).await.unwrap();
    assert_eq!(
        got["both"],
        Fetched::Value {
            bytes: Bytes::from("v"),
            metadata: Some(meta),
            expiration: Some(at)
        }
    );
    assert_eq!(
        got["plain"],
        Fetched::Value {
            bytes: Bytes::from("v"),
            metadata: None,
            expiration: None
        }
    );
}

async fn listing_is_in_byte_order_with_prefixes(t: &Target) {
    let ns = namespace(t, "order").await;
    let mut all = keys(&[
        "b", "a", "A", "é", "e", "z", "日本", "😀", "a/b", "a/c", "ab", "a b", "~", "Z", "0",
    ]);
    let items: Vec<WriteItem> = all.iter().map(|k| item(k, k.clone())).collect();
    t.kv.bulk_write(&ns, &items).await.unwrap();
    // Rust orders strings by their UTF-8 bytes, as KV lists keys.
    all.sort();
    assert_eq!(all_keys(t, &ns).await, all);
    for (prefix, want) in [
        ("a", keys(&["a", "a b", "a/b", "a/c", "ab"])),
        ("a/", keys(&["a/b", "a/c"])),
        ("日", keys(&["日本"])),
        ("nothing", vec![]),
    ] {
        let got = list_all(t.kv.as_ref(), &ns, prefix).await.unwrap();
        assert_eq!(names(&got), want, "prefix {prefix:?}");
    }
    let page = t.kv.list_keys(&ns, "a/", None, Some(10)).await.unwrap();
    assert_eq!(names(&page.keys), keys(&["a/b", "a/c"]));
    assert_eq!(page.cursor, "");
}

async fn listing_pages_follow_the_cursor(t: &Target) {
    let ns = namespace(t, "pages").await;
    let all: Vec<String> = (0..2500).map(|i| format!("key{i:05}")).collect();
    let items: Vec<WriteItem> = all.iter().map(|k| item(k, "x")).collect();
    t.kv.bulk_write(&ns, &items).await.unwrap();
    put(t, &ns, "other", "x").await;

    // Default pages of 1000, followed to the end.
    let mut lister = KeyLister::new(t.kv.as_ref(), &ns, "key");
    let mut sizes = Vec::new();
    let mut seen = Vec::new();
    while let Some(page) = lister.next_page().await.unwrap() {
        sizes.push(page.len());
        seen.extend(names(&page));
    }
    assert_eq!(seen, all);
    assert_eq!(sizes.iter().sum::<usize>(), 2500);
    assert!(sizes.iter().all(|&n| n <= 1000));
    let first = t.kv.list_keys(&ns, "", None, None).await.unwrap();
    assert_eq!(first.keys.len(), 1000);
    assert!(!first.cursor.is_empty());

    // Small pages with a prefix: the cursor does not remember it, so it is sent again.
    let mut cursor: Option<String> = None;
    let mut got = Vec::new();
    loop {
        let page =
            t.kv.list_keys(&ns, "key001", cursor.as_deref(), Some(10))
                .await
                .unwrap();
        assert!(page.keys.len() <= 10);
        got.extend(names(&page.keys));
        if page.cursor.is_empty() {
            break;
        }
        cursor = Some(page.cursor);
    }
    let want: Vec<String> = (100..200).map(|i| format!("key{i:05}")).collect();
    assert_eq!(got, want);

    for bad in [9, 1001] {
        let e = t.kv.list_keys(&ns, "", None, Some(bad)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "limit {bad}");
    }
    let page = t.kv.list_keys(&ns, "", None, Some(1000)).await.unwrap();
    assert_eq!(page.keys.len(), 1000);
    let e =
        t.kv.list_keys(&ns, "", Some("!not a cursor!"), None)
            .await
            .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);
}

async fn bulk_write_and_bulk_get(t: &Target) {
    let ns = namespace(t, "bulk").await;
    let binary = Bytes::from_static(&[0xff, 0xfe, 0x00, 0x80, b'a']);
    let mut with_meta = item("meta", "{\"json\": true}");
    with_meta.opts.metadata = Some(json!({"m": 1}));
    with_meta.opts.expiration_ttl = Some(3600);
    let items = vec![
        item("text", "plain text ✓"),
        item("binary", binary.clone()),
        item("empty", Bytes::new()),
        with_meta,
    ];
    let r = t.kv.bulk_write(&ns, &items).await.unwrap();
    assert_eq!(
        r,
        BulkResult {
            successful_key_count: 4,
            unsuccessful_keys: vec![]
        }
    );
    assert_eq!(get(t, &ns, "binary").await, binary);
    assert_eq!(get(t, &ns, "text").await, "plain text ✓");
    assert_eq!(get(t, &ns, "empty").await, "");

    let got =
        t.kv.bulk_get(&ns, &keys(&["text", "binary", "empty", "meta", "absent"]))
            .await
            .unwrap();
    assert_eq!(got.len(), 5);
    assert!(matches!(&got["text"], Fetched::Value { bytes, .. } if bytes == "plain text ✓"));
    // Bulk get answers text: a value that is not UTF-8 must be read alone.
    assert_eq!(got["binary"], Fetched::FetchAlone);
    assert!(matches!(&got["empty"], Fetched::Value { bytes, .. } if bytes.is_empty()));
    match &got["meta"] {
        Fetched::Value {
            bytes,
            metadata,
            expiration,
        } => {
            assert_eq!(bytes, "{\"json\": true}");
            assert_eq!(metadata, &Some(json!({"m": 1})));
            assert!(expiration.is_some_and(|e| e >= now() + 3590));
        }
        other => panic!("meta: {other:?}"),
    }
    assert_eq!(got["absent"], Fetched::Missing);
    // Nothing to ask, nothing asked.
    let before = t.count(op::BULK_GET);
    assert!(t.kv.bulk_get(&ns, &[]).await.unwrap().is_empty());
    assert_eq!(t.count(op::BULK_GET), before);
}

async fn bulk_requests_are_split_at_the_api_limits(t: &Target) {
    let ns = namespace(t, "split").await;
    let all: Vec<String> = (0..MAX_BULK_ITEMS + 1)
        .map(|i| format!("k{i:05}"))
        .collect();
    let items: Vec<WriteItem> = all.iter().map(|k| item(k, k.clone())).collect();
    let before = t.count(op::BULK_WRITE);
    let r = t.kv.bulk_write(&ns, &items).await.unwrap();
    assert_eq!(r.successful_key_count, all.len() as u64);
    assert!(r.unsuccessful_keys.is_empty());
    assert_eq!(t.count(op::BULK_WRITE) - before, 2);
    assert_eq!(all_keys(t, &ns).await, all);

    // 150 keys, 10 of them absent: two requests (100 + 60).
    let mut asked: Vec<String> = all[..150].to_vec();
    asked.extend((0..10).map(|i| format!("absent{i}")));
    let before = t.count(op::BULK_GET);
    let got = t.kv.bulk_get(&ns, &asked).await.unwrap();
    assert_eq!(t.count(op::BULK_GET) - before, 2);
    assert_eq!(got.len(), 160);
    for k in &all[..150] {
        assert_eq!(
            got[k],
            Fetched::Value {
                bytes: Bytes::from(k.clone()),
                metadata: None,
                expiration: None
            }
        );
    }
    assert!((0..10).all(|i| got[&format!("absent{i}")] == Fetched::Missing));

    let before = t.count(op::BULK_DELETE);
    let r = t.kv.bulk_delete(&ns, &all).await.unwrap();
    assert_eq!(r.successful_key_count, all.len() as u64);
    assert_eq!(t.count(op::BULK_DELETE) - before, 2);
    assert!(all_keys(t, &ns).await.is_empty());
}

async fn bulk_delete(t: &Target) {
    let ns = namespace(t, "delete").await;
    let items: Vec<WriteItem> = ["a", "b", "c", "d"].iter().map(|k| item(k, "x")).collect();
    t.kv.bulk_write(&ns, &items).await.unwrap();
    // Keys that are not there are deleted already.
    let r =
        t.kv.bulk_delete(&ns, &keys(&["a", "c", "nope"]))
            .await
            .unwrap();
    assert_eq!(r.successful_key_count, 3);
    assert!(r.unsuccessful_keys.is_empty());
    assert_eq!(all_keys(t, &ns).await, keys(&["b", "d"]));
    // One bad key fails the request whole.
    let e =
        t.kv.bulk_delete(&ns, &keys(&["b", ".."]))
            .await
            .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);
    let e =
        t.kv.bulk_delete(&ns, &["d".to_string(), "x".repeat(513)])
            .await
            .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NameTooLong);
    assert_eq!(all_keys(t, &ns).await, keys(&["b", "d"]));
}

async fn key_name_limits(t: &Target) {
    let ns = namespace(t, "keys").await;
    let none = PutOptions::default();
    let longest = "k".repeat(512);
    put(t, &ns, &longest, "v").await;
    assert_eq!(get(t, &ns, &longest).await, "v");
    // 257 two-byte characters: 514 bytes.
    for long in ["k".repeat(513), "é".repeat(257)] {
        assert_eq!(
            put_err(t, &ns, &long, "v", &none).await,
            ErrorKind::NameTooLong
        );
        assert_eq!(get_kind(t, &ns, &long).await, ErrorKind::NameTooLong);
        let e = t.kv.delete_value(&ns, &long).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NameTooLong);
        let e =
            t.kv.bulk_get(&ns, std::slice::from_ref(&long))
                .await
                .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NameTooLong);
        let kind = bulk_err(t, &ns, &[item("fine", "v"), item(&long, "v")]).await;
        assert_eq!(kind, ErrorKind::NameTooLong);
    }
    for bad in ["", ".", ".."] {
        assert_eq!(
            put_err(t, &ns, bad, "v", &none).await,
            ErrorKind::Invalid,
            "{bad:?}"
        );
        assert_eq!(get_kind(t, &ns, bad).await, ErrorKind::Invalid, "{bad:?}");
        let kind = bulk_err(t, &ns, &[item("fine", "v"), item(bad, "v")]).await;
        assert_eq!(kind, ErrorKind::Invalid, "{bad:?}");
    }
    // Dots inside a name are fine.
    put(t, &ns, "a/./b/../c", "v").await;
    assert_eq!(get(t, &ns, "a/./b/../c").await, "v");
    // The refused bulk writes wrote nothing.
    assert_eq!(all_keys(t, &ns).await, keys(&["a/./b/../c", &longest]));
}

async fn value_size_limits(t: &Target) {
    let ns = namespace(t, "sizes").await;
    let none = PutOptions::default();
    let max = Bytes::from(vec![b'v'; MAX_VALUE_BYTES]);
    put(t, &ns, "max", max.clone()).await;
    assert_eq!(get(t, &ns, "max").await.len(), MAX_VALUE_BYTES);
    let over = Bytes::from(vec![b'v'; MAX_VALUE_BYTES + 1]);
    assert_eq!(
        put_err(t, &ns, "over", over.clone(), &none).await,
        ErrorKind::TooLarge
    );
    let kind = bulk_err(t, &ns, &[item("small", "v"), item("over", over)]).await;
    assert_eq!(kind, ErrorKind::TooLarge);
    assert_eq!(all_keys(t, &ns).await, keys(&["max"]));
}

async fn metadata_size_limits(t: &Target) {
    let ns = namespace(t, "metadata").await;
    // A JSON string of n characters serializes to n + 2 bytes.
    let fits = json!("m".repeat(MAX_METADATA_BYTES - 2));
    let over = json!("m".repeat(MAX_METADATA_BYTES - 1));
    let with = |m: &serde_json::Value| PutOptions {
        metadata: Some(m.clone()),
        ..PutOptions::default()
    };
    t.kv.put_value(&ns, "fits", Bytes::from("v"), &with(&fits))
        .await
        .unwrap();
    let listed = list_all(t.kv.as_ref(), &ns, "").await.unwrap();
    assert_eq!(listed[0].metadata, Some(fits));
    assert_eq!(
        put_err(t, &ns, "over", "v", &with(&over)).await,
        ErrorKind::TooLarge
    );
    let mut bad = item("over", "v");
    bad.opts = with(&over);
    assert_eq!(
        bulk_err(t, &ns, &[item("x", "v"), bad]).await,
        ErrorKind::TooLarge
    );
    assert_eq!(all_keys(t, &ns).await, keys(&["fits"]));
}

async fn expiration_limits(t: &Target) {
    let ns = namespace(t, "expiry").await;
    let ttl = |s: u64| PutOptions {
        expiration_ttl: Some(s),
        ..PutOptions::default()
    };
    let at = |s: u64| PutOptions {
        expiration: Some(s),
        ..PutOptions::default()
    };
    assert_eq!(
        put_err(t, &ns, "k", "v", &ttl(59)).await,
        ErrorKind::Invalid
    );
    assert_eq!(put_err(t, &ns, "k", "v", &ttl(0)).await, ErrorKind::Invalid);
    assert_eq!(
        put_err(t, &ns, "k", "v", &at(now() + 30)).await,
        ErrorKind::Invalid
    );
    assert_eq!(put_err(t, &ns, "k", "v", &at(1)).await, ErrorKind::Invalid);
    t.kv.put_value(&ns, "ttl60", Bytes::from("v"), &ttl(60))
        .await
        .unwrap();
    t.kv.put_value(&ns, "at", Bytes::from("v"), &at(now() + 120))
        .await
        .unwrap();
    let mut bad = item("bad", "v");
    bad.opts = ttl(59);
    assert_eq!(
        bulk_err(t, &ns, &[item("x", "v"), bad]).await,
        ErrorKind::Invalid
    );
    let mut bad = item("bad", "v");
    bad.opts = at(now());
    assert_eq!(
        bulk_err(t, &ns, &[item("x", "v"), bad]).await,
        ErrorKind::Invalid
    );
    assert_eq!(all_keys(t, &ns).await, keys(&["at", "ttl60"]));
}

async fn bulk_get_answer_size_limit(t: &Target) {
    let ns = namespace(t, "answer").await;
    // Two values within the value limit whose sum is over the 25 MB answer limit.
    let half = Bytes::from(vec![b'h'; MAX_VALUE_BYTES / 2 + 1]);
    put(t, &ns, "one", half.clone()).await;
    put(t, &ns, "two", half.clone()).await;
    let e =
        t.kv.bulk_get(&ns, &keys(&["one", "two"]))
            .await
            .unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge);
    let got = t.kv.bulk_get(&ns, &keys(&["one", "absent"])).await.unwrap();
    assert!(matches!(&got["one"], Fetched::Value { bytes, .. } if *bytes == half));
}

async fn missing_namespace_and_missing_key(t: &Target) {
    let kv = t.kv.as_ref();
    let none = PutOptions::default();
    let nf = ErrorKind::NotFound;
    assert_eq!(
        kv.list_keys(ABSENT_NS, "", None, None)
            .await
            .unwrap_err()
            .kind,
        nf
    );
    assert_eq!(get_kind(t, ABSENT_NS, "k").await, nf);
    assert_eq!(put_err(t, ABSENT_NS, "k", "v", &none).await, nf);
    // Unlike a missing key, a missing namespace cannot be deleted from.
    assert_eq!(kv.delete_value(ABSENT_NS, "k").await.unwrap_err().kind, nf);
    assert_eq!(bulk_err(t, ABSENT_NS, &[item("k", "v")]).await, nf);
    assert_eq!(
        kv.bulk_get(ABSENT_NS, &keys(&["k"]))
            .await
            .unwrap_err()
            .kind,
        nf
    );
    assert_eq!(
        kv.bulk_delete(ABSENT_NS, &keys(&["k"]))
            .await
            .unwrap_err()
            .kind,
        nf
    );
    assert_eq!(
        kv.rename_namespace(ABSENT_NS, "t").await.unwrap_err().kind,
        nf
    );
    assert_eq!(kv.delete_namespace(ABSENT_NS).await.unwrap_err().kind, nf);

    let ns = namespace(t, "present").await;
    assert_eq!(get_kind(t, &ns, "absent").await, nf);
    kv.delete_value(&ns, "absent").await.unwrap();
    let got = kv.bulk_get(&ns, &keys(&["absent"])).await.unwrap();
    assert_eq!(got["absent"], Fetched::Missing);
    let page = kv.list_keys(&ns, "", None, None).await.unwrap();
    assert!(page.keys.is_empty() && page.cursor.is_empty());
}

async fn expired_keys_disappear(t: &Target) {
    let ns = namespace(t, "expire").await;
    let ttl = |s: u64| PutOptions {
        expiration_ttl: Some(s),
        ..PutOptions::default()
    };
    t.kv.put_value(&ns, "soon", Bytes::from("v"), &ttl(60))
        .await
        .unwrap();
    t.kv.put_value(&ns, "later", Bytes::from("v"), &ttl(3600))
        .await
        .unwrap();
    let mut at = item("at", "v");
    at.opts.expiration = Some(now() + 90);
    t.kv.bulk_write(&ns, &[at]).await.unwrap();
    put(t, &ns, "never", "v").await;
    assert_eq!(
        all_keys(t, &ns).await,
        keys(&["at", "later", "never", "soon"])
    );

    t.advance(95).await;
    assert_eq!(get_kind(t, &ns, "soon").await, ErrorKind::NotFound);
    assert_eq!(get_kind(t, &ns, "at").await, ErrorKind::NotFound);
    assert_eq!(all_keys(t, &ns).await, keys(&["later", "never"]));
    let got =
        t.kv.bulk_get(&ns, &keys(&["soon", "at", "later"]))
            .await
            .unwrap();
    assert_eq!(got["soon"], Fetched::Missing);
    assert_eq!(got["at"], Fetched::Missing);
    assert!(matches!(got["later"], Fetched::Value { .. }));
    // An expired key can be written again.
    put(t, &ns, "soon", "again").await;
    assert_eq!(get(t, &ns, "soon").await, "again");

    t.advance(3600).await;
    assert_eq!(all_keys(t, &ns).await, keys(&["never", "soon"]));
}
