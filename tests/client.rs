//! The API client against a real `kvfs serve`, and (for what a healthy server never does:
//! 429s, drops, empty pages with a cursor, gateway errors) against a scripted responder.

mod common;

use base64::Engine as _;
use bytes::Bytes;
use common::{ServerProc, ACCOUNT, TOKEN};
use kvfs::api::BulkWriteItem;
use kvfs::client::{Auth, Client, ClientConfig, ErrorKind, PutOptions};
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------------
// Helpers

fn config(base: &str) -> ClientConfig {
    let mut c = ClientConfig::new(base, ACCOUNT, Auth::Token(TOKEN.into()));
    // Quick retries keep fault tests short; the logic is the same.
    c.base_backoff = Duration::from_millis(5);
    c
}

fn client(base: &str) -> Client {
    Client::new(config(base)).unwrap()
}

fn count(c: &Client, op: &str) -> u64 {
    c.request_counts().get(op).copied().unwrap_or(0)
}

fn item(key: &str, value: &str) -> BulkWriteItem {
    BulkWriteItem {
        key: key.into(),
        value: value.into(),
        base64: false,
        expiration: None,
        expiration_ttl: None,
        metadata: None,
    }
}

async fn new_ns(c: &Client, title: &str) -> String {
    c.create_namespace(title).await.unwrap().id
}

// ---------------------------------------------------------------------------------------------
// A scripted HTTP/1.1 responder: answers each connection with the next reply, then closes it.

enum Reply {
    Http {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Close the connection without answering.
    Drop,
}

fn reply(status: u16, body: Json) -> Reply {
    Reply::Http {
        status,
        headers: vec![("content-type", "application/json".into())],
        body: body.to_string(),
    }
}

fn ok(result: Json) -> Reply {
    reply(
        200,
        json!({"success": true, "errors": [], "messages": [], "result": result}),
    )
}

fn fail(status: u16, code: u32, message: &str) -> Reply {
    reply(
        status,
        json!({"success": false, "errors": [{"code": code, "message": message}], "messages": [], "result": null}),
    )
}

#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
    /// When the request's head had arrived.
    at: Instant,
}

impl Seen {
    fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

struct Mock {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Mock {
    async fn start(replies: Vec<Reply>) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/client/v4", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(replies)));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (seen, script) = (seen2.clone(), script.clone());
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
                    seen.lock().unwrap().push(req);
                    let next = script.lock().unwrap().pop_front();
                    match next.unwrap_or_else(|| fail(500, 1, "script exhausted")) {
                        Reply::Drop => drop(sock),
                        Reply::Http {
                            status,
                            headers,
                            body,
                        } => {
                            let mut out = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n", body.len());
                            for (n, v) in headers {
                                out.push_str(&format!("{n}: {v}\r\n"));
                            }
                            out.push_str("\r\n");
                            out.push_str(&body);
                            let _ = sock.write_all(out.as_bytes()).await;
                            let _ = sock.shutdown().await;
                        }
                    }
                });
            }
        });
        Mock { base, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let seen = Seen {
        head,
        body: Vec::new(),
        at: Instant::now(),
    };
    let len: usize = seen
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Seen {
        body: buf[head_end..head_end + len].to_vec(),
        ..seen
    })
}

fn key_list(names: &[&str], cursor: &str) -> Reply {
    let keys: Vec<Json> = names.iter().map(|n| json!({"name": n})).collect();
    reply(
        200,
        json!({"success": true, "errors": [], "messages": [], "result": keys,
               "result_info": {"count": names.len(), "cursor": cursor}}),
    )
}

// ---------------------------------------------------------------------------------------------
// Scripted responder tests

#[tokio::test]
async fn lister_walks_past_empty_pages_with_a_cursor() {
    let mock = Mock::start(vec![
        key_list(&["a", "b"], "c1"),
        key_list(&[], "c2"),
        key_list(&[], "c3"),
        key_list(&["z"], ""),
    ])
    .await;
    let c = client(&mock.base);
    let mut lister = kvfs::backend::KeyLister::new(&c, "ns", "p/q");
    let first: Vec<_> = lister
        .next_page()
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(first, ["a", "b"]);
    // The two empty pages are skipped, not taken for the end.
    let second: Vec<_> = lister
        .next_page()
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(second, ["z"]);
    assert!(lister.next_page().await.unwrap().is_none());
    assert!(lister.next_page().await.unwrap().is_none());
    assert_eq!(count(&c, "list_keys"), 4);
    let lines: Vec<String> = mock
        .seen()
        .iter()
        .map(|s| s.request_line().to_string())
        .collect();
    let base =
        format!("GET /client/v4/accounts/{ACCOUNT}/storage/kv/namespaces/ns/keys?prefix=p%2Fq");
    assert_eq!(
        lines,
        [
            format!("{base} HTTP/1.1"),
            format!("{base}&cursor=c1 HTTP/1.1"),
            format!("{base}&cursor=c2 HTTP/1.1"),
            format!("{base}&cursor=c3 HTTP/1.1"),
        ]
    );
}

#[tokio::test]
async fn lister_stops_on_a_cursor_that_does_not_advance() {
    let mock = Mock::start(vec![key_list(&["a"], "same"), key_list(&["a"], "same")]).await;
    let c = client(&mock.base);
    let e = c.list_all_keys("ns", None).await.unwrap_err();
    assert_eq!(e.kind, kvfs::backend::ErrorKind::Unavailable, "{e}");
    assert!(e.message.contains("did not advance"), "{e}");
    assert_eq!(count(&c, "list_keys"), 2);
}

#[tokio::test]
async fn rate_limited_request_waits_out_retry_after() {
    let mut limited = fail(
        429,
        971,
        "Please wait and consider throttling your request speed",
    );
    if let Reply::Http { headers, .. } = &mut limited {
        headers.push(("retry-after", "2".into()));
    }
    let value = Reply::Http {
        status: 200,
        headers: vec![("expiration", "1900000000".into())],
        body: "hello".into(),
    };
    let mock = Mock::start(vec![limited, value]).await;
    let c = client(&mock.base);
    let t0 = Instant::now();
    let v = c.get_value("ns", "k").await.unwrap();
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "retried after {:?}",
        t0.elapsed()
    );
    assert_eq!(&v.bytes[..], b"hello");
    assert_eq!(v.expiration, Some(1_900_000_000));
    assert_eq!(count(&c, "get_value"), 2);
    assert_eq!(c.retry_count(), 1);
}

/// A value read as a stream: a failed status is retried as for any request, before the body;
/// the body then arrives in pieces that join to the value, its length and expiration known
/// first. One request per attempt, counted as `get_value`.
#[tokio::test]
async fn a_value_stream_is_retried_before_its_body_and_comes_in_pieces() {
    let value = "0123456789".repeat(100_000);
    let body = Reply::Http {
        status: 200,
        headers: vec![("expiration", "1900000000".into())],
        body: value.clone(),
    };
    let mock = Mock::start(vec![fail(503, 10000, "busy"), body]).await;
    let c = client(&mock.base);
    let mut stream = c.get_value_stream("ns", "k").await.unwrap();
    assert_eq!(stream.len, Some(value.len() as u64));
    assert_eq!(stream.expiration, Some(1_900_000_000));
    let mut got = Vec::new();
    while let Some(piece) = stream.next_chunk().await.unwrap() {
        got.extend_from_slice(&piece);
    }
    assert_eq!(got, value.as_bytes());
    assert_eq!(count(&c, "get_value"), 2);
    assert_eq!(c.retry_count(), 1);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let mock = Mock::start(vec![
        fail(400, 10028, "limit argument must be at least 10"),
        ok(json!([])),
    ])
    .await;
    let c = client(&mock.base);
    let e = c
        .list_keys_page("ns", None, None, Some(5))
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some(10028)));
    assert_eq!(
        e.to_string(),
        "list_keys: HTTP 400 (code 10028): limit argument must be at least 10"
    );
    assert_eq!(
        c.request_counts(),
        BTreeMap::from([("list_keys".to_string(), 1)])
    );
    assert_eq!(c.retry_count(), 0);
}

#[tokio::test]
async fn server_errors_and_dropped_connections_are_retried() {
    let mock = Mock::start(vec![
        fail(500, 10001, "internal"),
        Reply::Drop,
        reply(503, json!("unavailable")),
        Reply::Http {
            status: 502,
            headers: vec![],
            body: "<html>bad gateway</html>".into(),
        },
        ok(Json::Null),
    ])
    .await;
    let c = client(&mock.base);
    c.put_value("ns", "k", Bytes::from_static(b"v"), &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(count(&c, "put_value"), 5);
    assert_eq!(c.retry_count(), 4);
    // Every attempt carried the whole body again.
    assert!(mock.seen().iter().all(|s| s.body == b"v"));
}

#[tokio::test]
async fn retries_are_bounded() {
    let mock = Mock::start((0..10).map(|_| fail(503, 10001, "down")).collect()).await;
    let mut cfg = config(&mock.base);
    cfg.max_retries = 2;
    let c = Client::new(cfg).unwrap();
    let e = c.delete_value("ns", "a/b").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"delete_value "a/b": HTTP 503 (code 10001): down"#
    );
    assert_eq!(count(&c, "delete_value"), 3);
}

#[tokio::test]
async fn connection_refused_is_a_transport_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = config(&format!("http://127.0.0.1:{port}/client/v4"));
    cfg.max_retries = 2;
    let c = Client::new(cfg).unwrap();
    let e = c.get_value("ns", "k").await.unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Transport(_)), "{e:?}");
    assert!(e.to_string().starts_with(r#"get_value "k": "#), "{e}");
    assert!(e.to_string().contains("after 3 attempts"), "{e}");
    assert!(!e.to_string().contains(TOKEN) && !format!("{e:?}").contains(TOKEN));
    assert_eq!(count(&c, "get_value"), 3);
}

#[tokio::test]
async fn plain_gateway_error_is_clean() {
    let mock = Mock::start(vec![Reply::Http {
        status: 413,
        headers: vec![],
        body: String::new(),
    }])
    .await;
    let c = client(&mock.base);
    let e = c
        .put_value(
            "ns",
            "big",
            Bytes::from(vec![7u8; 1000]),
            &PutOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"put_value "big": HTTP 413: Payload Too Large"#
    );
    assert_eq!(count(&c, "put_value"), 1);
}

#[tokio::test]
async fn requests_carry_credentials_and_user_agent() {
    let mock = Mock::start(vec![
        ok(Json::Null),
        ok(Json::Null),
        fail(403, 10000, "Authentication error"),
    ])
    .await;
    let c = client(&mock.base);
    c.delete_value("ns", "k").await.unwrap();
    let key = Client::new(ClientConfig::new(
        mock.base.clone(),
        ACCOUNT,
        Auth::Key {
            email: "me@example.com".into(),
            key: "sekrit-key".into(),
        },
    ))
    .unwrap();
    key.delete_value("ns", "k").await.unwrap();
    let e = key.delete_value("ns", "k").await.unwrap_err();
    assert_eq!(e.status(), Some(403));
    assert!(!format!("{e} {e:?}").contains("sekrit"));
    let seen = mock.seen();
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {TOKEN}"))
    );
    assert_eq!(
        seen[0].header("user-agent"),
        Some(format!("kvfs/{}", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(seen[1].header("authorization"), None);
    assert_eq!(
        seen[1].header("x-auth-email").as_deref(),
        Some("me@example.com")
    );
    assert_eq!(seen[1].header("x-auth-key").as_deref(), Some("sekrit-key"));
}

#[tokio::test]
async fn put_sends_raw_or_multipart() {
    let mock = Mock::start(vec![ok(Json::Null), ok(json!({}))]).await;
    let c = client(&mock.base);
    let value = Bytes::from_static(b"\x00\xffbin");
    let plain = PutOptions {
        expiration_ttl: Some(120),
        ..Default::default()
    };
    c.put_value("ns", "a b/c", value.clone(), &plain)
        .await
        .unwrap();
    let with_meta = PutOptions {
        expiration: Some(1_900_000_000),
        metadata: Some(json!({"m": 1})),
        ..Default::default()
    };
    c.put_value("ns", "k", value.clone(), &with_meta)
        .await
        .unwrap();
    let seen = mock.seen();
    let path = format!("/client/v4/accounts/{ACCOUNT}/storage/kv/namespaces/ns/values");
    assert_eq!(
        seen[0].request_line(),
        format!("PUT {path}/a%20b%2Fc?expiration_ttl=120 HTTP/1.1")
    );
    assert_eq!(
        seen[0].header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(seen[0].body, value);
    assert_eq!(
        seen[1].request_line(),
        format!("PUT {path}/k?expiration=1900000000 HTTP/1.1")
    );
    let ct = seen[1].header("content-type").unwrap();
    assert!(ct.starts_with("multipart/form-data; boundary="), "{ct}");
    let body = &seen[1].body;
    let find = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    assert!(find(b"name=\"value\""));
    assert!(find(b"name=\"metadata\""));
    assert!(find(b"\x00\xffbin"));
    assert!(find(br#"{"m":1}"#));
}

#[tokio::test]
async fn namespace_listing_pages_until_a_short_page() {
    let page = |n: usize, from: usize| -> Reply {
        let items: Vec<Json> = (from..from + n)
            .map(|i| json!({"id": format!("{i:032x}"), "title": format!("t{i:05}")}))
            .collect();
        reply(
            200,
            json!({"success": true, "errors": [], "messages": [], "result": items,
                   "result_info": {"page": 1, "per_page": 1000, "count": n, "total_count": 2345}}),
        )
    };
    let mock = Mock::start(vec![page(1000, 0), page(1000, 1000), page(345, 2000)]).await;
    let c = client(&mock.base);
    let all = c.list_namespaces().await.unwrap();
    assert_eq!(all.len(), 2345);
    assert_eq!(all[2344].title, "t02344");
    assert_eq!(count(&c, "list_namespaces"), 3);
    let lines: Vec<String> = mock
        .seen()
        .iter()
        .map(|s| s.request_line().to_string())
        .collect();
    assert!(lines[1].contains("page=2&per_page=1000"), "{lines:?}");

    // A full last page ends the listing through total_count, without an extra request.
    let mock = Mock::start(vec![reply(
        200,
        json!({"success": true, "errors": [], "messages": [],
               "result": (0..1000).map(|i| json!({"id": format!("{i:032x}"), "title": i.to_string()})).collect::<Vec<_>>(),
               "result_info": {"page": 1, "per_page": 1000, "count": 1000, "total_count": 1000}}),
    )])
    .await;
    let c = client(&mock.base);
    assert_eq!(c.list_namespaces().await.unwrap().len(), 1000);
    assert_eq!(count(&c, "list_namespaces"), 1);

    // A server that ignores `page` (and gives no total) is caught on the second page.
    let same = || {
        let items: Vec<Json> = (0..1000)
            .map(|i| json!({"id": format!("{i:032x}"), "title": i.to_string()}))
            .collect();
        reply(
            200,
            json!({"success": true, "errors": [], "messages": [], "result": items}),
        )
    };
    let mock = Mock::start(vec![same(), same()]).await;
    let c = client(&mock.base);
    assert!(matches!(
        c.list_namespaces().await.unwrap_err().kind,
        ErrorKind::Decode(_)
    ));
    assert_eq!(count(&c, "list_namespaces"), 2);
}

#[tokio::test]
async fn bulk_results_surface_unsuccessful_keys() {
    let mock = Mock::start(vec![
        ok(json!({"successful_key_count": 9_999, "unsuccessful_keys": ["k3"]})),
        ok(json!({"successful_key_count": 4, "unsuccessful_keys": ["k10003"]})),
        ok(json!({"successful_key_count": 1, "unsuccessful_keys": ["gone"]})),
    ])
    .await;
    let c = client(&mock.base);
    let items: Vec<_> = (0..10_005).map(|i| item(&format!("k{i}"), "v")).collect();
    let r = c.bulk_write("ns", &items).await.unwrap();
    assert_eq!(r.successful_key_count, 10_003);
    assert_eq!(r.unsuccessful_keys, ["k3", "k10003"]);
    assert_eq!(count(&c, "bulk_write"), 2);
    let r = c
        .bulk_delete("ns", &["a".into(), "gone".into()])
        .await
        .unwrap();
    assert_eq!(r.unsuccessful_keys, ["gone"]);
    let seen = mock.seen();
    assert!(seen[2].request_line().starts_with(&format!(
        "POST /client/v4/accounts/{ACCOUNT}/storage/kv/namespaces/ns/bulk/delete "
    )));
    assert_eq!(
        serde_json::from_slice::<Json>(&seen[2].body).unwrap(),
        json!(["a", "gone"])
    );
}

#[tokio::test]
async fn concurrency_is_bounded() {
    // A responder that holds every request 100 ms and records the most seen at once.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/client/v4", listener.local_addr().unwrap());
    let now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (now2, most2) = (now.clone(), most.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (now, most) = (now2.clone(), most2.clone());
            tokio::spawn(async move {
                if read_request(&mut sock).await.is_none() {
                    return;
                }
                let n = now.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                most.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\nx",
                    )
                    .await;
            });
        }
    });
    let mut cfg = config(&base);
    cfg.max_concurrent = 3;
    let c = Client::new(cfg).unwrap();
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.get_value("ns", &format!("k{i}")).await.map(|v| v.bytes) })
        })
        .collect();
    for t in tasks {
        assert_eq!(&t.await.unwrap().unwrap()[..], b"x");
    }
    assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(count(&c, "get_value"), 12);
}

#[tokio::test]
async fn rate_limit_spaces_requests() {
    let mock = Mock::start((0..6).map(|_| ok(Json::Null)).collect()).await;
    let mut cfg = config(&mock.base);
    let window = Duration::from_secs(2);
    cfg.rate_limit = Some((3, window));
    let c = Client::new(cfg).unwrap();
    for i in 0..6 {
        c.delete_value("ns", &format!("k{i}")).await.unwrap();
    }
    // At most 3 in any window: every 4 consecutive arrivals span the window (less a margin
    // for loopback latency). A limiter that let one extra request through would send 4 at once.
    let at: Vec<Instant> = mock.seen().iter().map(|s| s.at).collect();
    assert_eq!(at.len(), 6);
    for i in 0..3 {
        let span = at[i + 3] - at[i];
        assert!(
            span >= window - Duration::from_millis(500),
            "requests {i}..{}: {span:?}",
            i + 3
        );
    }
}

#[tokio::test]
async fn bulk_get_parses_every_shape() {
    let mock = Mock::start(vec![ok(json!({"values": {
        "text": {"value": "hi", "metadata": {"a": 1}, "expiration": 1900000000},
        "json": {"value": {"x": 1}, "metadata": null},
        "missing": null
    }}))])
    .await;
    let c = client(&mock.base);
    let keys: Vec<String> = ["text", "json", "missing", "unanswered"]
        .map(String::from)
        .into();
    let got = c.bulk_get("ns", &keys).await.unwrap();
    assert_eq!(got.len(), 4);
    let text = got["text"].as_ref().unwrap();
    assert_eq!(
        (text.value.as_str(), text.metadata.clone(), text.expiration),
        ("hi", Some(json!({"a": 1})), Some(1_900_000_000))
    );
    assert_eq!(got["json"].as_ref().unwrap().value, r#"{"x":1}"#);
    assert!(got["missing"].is_none() && got["unanswered"].is_none());
    let body: Json = serde_json::from_slice(&mock.seen()[0].body).unwrap();
    assert_eq!(
        body,
        json!({"keys": keys, "type": "text", "withMetadata": true})
    );
}

// ---------------------------------------------------------------------------------------------
// Against a real `kvfs serve`

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_crud() {
    let server = ServerProc::start(&[]);
    let c = client(&server.base_url());
    let ns = c.create_namespace("first").await.unwrap();
    assert_eq!(ns.id.len(), 32);
    assert_eq!(ns.title, "first");
    let other = new_ns(&c, "second").await;
    let e = c.create_namespace("first").await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some(10014)));
    assert_eq!(c.get_namespace(&ns.id).await.unwrap(), ns);
    c.rename_namespace(&ns.id, "renamed").await.unwrap();
    assert_eq!(c.get_namespace(&ns.id).await.unwrap().title, "renamed");
    let titles: Vec<String> = c
        .list_namespaces()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.title)
        .collect();
    assert_eq!(titles, ["renamed", "second"]);
    c.delete_namespace(&other).await.unwrap();
    let e = c.get_namespace(&other).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(e.code(), Some(10013));
    assert!(
        e.to_string().starts_with(&format!(
            "get_namespace \"{other}\": HTTP 404 (code 10013): "
        )),
        "{e}"
    );
    let e = c.get_namespace("not-a-uuid").await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some(10011)));
    let want = [
        ("create_namespace", 3),
        ("delete_namespace", 1),
        ("get_namespace", 4),
        ("list_namespaces", 1),
        ("rename_namespace", 1),
    ];
    assert_eq!(
        c.request_counts(),
        want.map(|(k, v)| (k.to_string(), v)).into_iter().collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_metadata_and_odd_keys() {
    let server = ServerProc::start(&[]);
    let c = client(&server.base_url());
    let ns = new_ns(&c, "values").await;
    let keys = [
        "plain",
        "a/b/c",
        "sp ace",
        "per%cent",
        "plus+and&amp=?#",
        "ünï😀",
        "'()*!~",
        "...",
        "a/../b",
        "/lead",
    ];
    for (i, key) in keys.iter().enumerate() {
        let value = Bytes::from(format!("value {i} of {key}").into_bytes());
        c.put_value(&ns, key, value.clone(), &PutOptions::default())
            .await
            .unwrap();
        let got = c.get_value(&ns, key).await.unwrap();
        assert_eq!(got.bytes, value, "{key}");
        assert_eq!(got.expiration, None);
        assert_eq!(c.get_metadata(&ns, key).await.unwrap(), None, "{key}");
    }
    let mut listed: Vec<String> = c
        .list_all_keys(&ns, None)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    want.sort();
    listed.sort();
    assert_eq!(listed, want);

    // Binary value with metadata goes multipart; both come back intact.
    let binary = Bytes::from((0..=255u8).rev().collect::<Vec<u8>>());
    let meta = json!({"mode": 420, "tags": ["x", "ü"], "nested": {"n": null}});
    let opts = PutOptions {
        metadata: Some(meta.clone()),
        ..Default::default()
    };
    c.put_value(&ns, "a/b/c", binary.clone(), &opts)
        .await
        .unwrap();
    assert_eq!(c.get_value(&ns, "a/b/c").await.unwrap().bytes, binary);
    assert_eq!(
        c.get_metadata(&ns, "a/b/c").await.unwrap(),
        Some(meta.clone())
    );
    let under: Vec<_> = c.list_all_keys(&ns, Some("a/")).await.unwrap();
    assert_eq!(under.len(), 2);
    let abc = under.iter().find(|k| k.name == "a/b/c").unwrap();
    assert_eq!(abc.metadata, Some(meta));
    // Empty value.
    c.put_value(&ns, "empty", Bytes::new(), &PutOptions::default())
        .await
        .unwrap();
    assert!(c.get_value(&ns, "empty").await.unwrap().bytes.is_empty());

    c.delete_value(&ns, "a/b/c").await.unwrap();
    let e = c.get_value(&ns, "a/b/c").await.unwrap_err();
    assert!(e.is_not_found());
    assert_eq!(
        e.to_string(),
        r#"get_value "a/b/c": HTTP 404 (code 10009): get: 'key not found'"#
    );
    let e = c.get_metadata(&ns, "a/b/c").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(e.code(), Some(10009));

    // Refused locally: these would address another route.
    let before = c.request_counts();
    for bad in ["", ".", ".."] {
        assert_eq!(
            c.delete_value(&ns, bad).await.unwrap_err().status(),
            Some(400)
        );
    }
    assert_eq!(c.request_counts(), before);
    assert_eq!(c.get_namespace(&ns).await.unwrap().title, "values");

    // Refused by the server, and not retried.
    let e = c
        .put_value(
            &ns,
            &"k".repeat(513),
            Bytes::from_static(b"v"),
            &PutOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(414), "{e}");
    let before = count(&c, "list_keys");
    let e = c
        .list_keys_page(&ns, None, None, Some(5))
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some(10028)));
    assert_eq!(count(&c, "list_keys"), before + 1);

    // Wrong token: 403, once.
    let mut bad = config(&server.base_url());
    bad.auth = Auth::Token("wrong-token".into());
    let bad = Client::new(bad).unwrap();
    let e = bad.get_value(&ns, "plain").await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(403), Some(10000)));
    assert!(!format!("{e} {e:?}").contains("wrong-token"));
    assert_eq!(bad.total_requests(), 1);
}

/// The server's request counters, without the zeros and the total.
async fn server_counts(server: &ServerProc) -> BTreeMap<String, u64> {
    let stats: BTreeMap<String, u64> = reqwest::Client::new()
        .get(format!("{}/__kvfs/stats", server.origin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    stats
        .into_iter()
        .filter(|(k, v)| *v > 0 && k != "total")
        .collect()
}

async fn advance_clock(server: &ServerProc, secs: i64) {
    let r = reqwest::Client::new()
        .post(format!("{}/__kvfs/clock", server.origin))
        .bearer_auth(TOKEN)
        .json(&json!({"advance": secs}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiration_round_trip() {
    let server = ServerProc::start(&[]);
    let c = client(&server.base_url());
    let ns = new_ns(&c, "exp").await;
    let now = kvfs::api::limits::now_secs();
    let ttl = PutOptions {
        expiration_ttl: Some(600),
        ..Default::default()
    };
    c.put_value(&ns, "ttl", Bytes::from_static(b"t"), &ttl)
        .await
        .unwrap();
    let at = PutOptions {
        expiration: Some(now + 3600),
        metadata: Some(json!({"m": true})),
        ..Default::default()
    };
    c.put_value(&ns, "at", Bytes::from_static(b"a"), &at)
        .await
        .unwrap();
    c.put_value(
        &ns,
        "never",
        Bytes::from_static(b"n"),
        &PutOptions::default(),
    )
    .await
    .unwrap();

    let e = c.get_value(&ns, "ttl").await.unwrap().expiration.unwrap();
    assert!((now + 600..=now + 605).contains(&e), "{e} vs {now}");
    assert_eq!(
        c.get_value(&ns, "at").await.unwrap().expiration,
        Some(now + 3600)
    );
    let listed: BTreeMap<String, Option<u64>> = c
        .list_all_keys(&ns, None)
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.name, k.expiration))
        .collect();
    assert_eq!(listed["at"], Some(now + 3600));
    assert_eq!(listed["ttl"], Some(e));
    assert_eq!(listed["never"], None);

    let e = c
        .put_value(
            &ns,
            "short",
            Bytes::from_static(b"s"),
            &PutOptions {
                expiration_ttl: Some(10),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));

    advance_clock(&server, 1000).await;
    assert!(c.get_value(&ns, "ttl").await.unwrap_err().is_not_found());
    assert_eq!(c.get_value(&ns, "at").await.unwrap().bytes, "a");
    advance_clock(&server, 3000).await;
    let names: Vec<String> = c
        .list_all_keys(&ns, None)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, ["never"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_across_pages() {
    let server = ServerProc::start(&[]);
    let c = client(&server.base_url());
    let ns = new_ns(&c, "pages").await;
    let names: Vec<String> = (0..2500).map(|i| format!("k/{i:05}")).collect();
    let items: Vec<_> = names.iter().map(|n| item(n, "v")).collect();
    let r = c.bulk_write(&ns, &items).await.unwrap();
    assert_eq!(
        (r.successful_key_count, r.unsuccessful_keys.len()),
        (2500, 0)
    );

    let mut cursor = None;
    let mut sizes = Vec::new();
    let mut seen = Vec::new();
    loop {
        let page = c
            .list_keys_page(&ns, Some("k/"), cursor.as_deref(), Some(1000))
            .await
            .unwrap();
        sizes.push(page.keys.len());
        seen.extend(page.keys.into_iter().map(|k| k.name));
        if page.cursor.is_empty() {
            break;
        }
        cursor = Some(page.cursor);
    }
    assert_eq!(sizes, [1000, 1000, 500]);
    assert_eq!(seen, names);

    let before = count(&c, "list_keys");
    let all: Vec<String> = c
        .list_all_keys(&ns, None)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(all, names);
    assert_eq!(count(&c, "list_keys") - before, 3);
    assert_eq!(
        c.list_all_keys(&ns, Some("k/012")).await.unwrap().len(),
        100
    );
    assert!(c
        .list_all_keys(&ns, Some("nothing"))
        .await
        .unwrap()
        .is_empty());

    // Expire a block in the middle: whether the server answers with empty pages or skips them,
    // the lister returns exactly the live keys.
    let now = kvfs::api::limits::now_secs();
    let expiring: Vec<_> = names[1000..2000]
        .iter()
        .map(|n| BulkWriteItem {
            expiration: Some(now + 120),
            ..item(n, "x")
        })
        .collect();
    c.bulk_write(&ns, &expiring).await.unwrap();
    c.bulk_delete(&ns, &names[2000..2400]).await.unwrap();
    advance_clock(&server, 500).await;
    let all: Vec<String> = c
        .list_all_keys(&ns, None)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    let want: Vec<String> = names[..1000]
        .iter()
        .chain(&names[2400..])
        .cloned()
        .collect();
    assert_eq!(all, want);
    assert_eq!(c.request_counts(), server_counts(&server).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_operations() {
    let server = ServerProc::start(&[]);
    let c = client(&server.base_url());
    let ns = new_ns(&c, "bulk").await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let mut items: Vec<BulkWriteItem> = (0..=255u8)
        .map(|b| BulkWriteItem {
            base64: true,
            ..item(&format!("byte/{b:03}"), &b64.encode([b, b, 0xff - b]))
        })
        .collect();
    items.push(BulkWriteItem {
        base64: true,
        ..item("all", &b64.encode(&all_bytes))
    });
    items.push(BulkWriteItem {
        metadata: Some(json!({"kind": "text"})),
        ..item("text", "héllo")
    });
    let now = kvfs::api::limits::now_secs();
    items.push(BulkWriteItem {
        expiration: Some(now + 900),
        ..item("exp", "e")
    });
    let r = c.bulk_write(&ns, &items).await.unwrap();
    assert_eq!((r.successful_key_count, r.unsuccessful_keys), (259, vec![]));
    assert_eq!(count(&c, "bulk_write"), 1);

    assert_eq!(c.get_value(&ns, "all").await.unwrap().bytes, all_bytes);
    for b in 0..=255u8 {
        assert_eq!(
            c.get_value(&ns, &format!("byte/{b:03}"))
                .await
                .unwrap()
                .bytes,
            vec![b, b, 0xff - b]
        );
    }
    assert_eq!(
        c.get_metadata(&ns, "text").await.unwrap(),
        Some(json!({"kind": "text"}))
    );

    let keys: Vec<String> = ["text", "exp", "missing", "byte/065"]
        .map(String::from)
        .into();
    let got = c.bulk_get(&ns, &keys).await.unwrap();
    assert_eq!(got.len(), 4);
    let text = got["text"].as_ref().unwrap();
    assert_eq!(
        (text.value.as_str(), text.metadata.clone()),
        ("héllo", Some(json!({"kind": "text"})))
    );
    let exp = got["exp"].as_ref().unwrap();
    assert_eq!(
        (exp.value.as_str(), exp.metadata.clone(), exp.expiration),
        ("e", None, Some(now + 900))
    );
    assert!(got["missing"].is_none());
    assert_eq!(
        got["byte/065"].as_ref().unwrap().value,
        "AA\u{be}".replace('\u{be}', "\u{fffd}")
    );
    assert_eq!(count(&c, "bulk_get"), 1);

    // 250 keys: three bulk gets of at most 100.
    let many: Vec<String> = (0..250u32).map(|b| format!("byte/{b:03}")).collect();
    let got = c.bulk_get(&ns, &many).await.unwrap();
    assert_eq!(got.values().filter(|v| v.is_some()).count(), 250);
    assert_eq!(count(&c, "bulk_get"), 4);

    let doomed: Vec<String> = (0..=255u8)
        .map(|b| format!("byte/{b:03}"))
        .chain(["nope".to_string()])
        .collect();
    let r = c.bulk_delete(&ns, &doomed).await.unwrap();
    assert!(r.unsuccessful_keys.is_empty());
    let left: Vec<String> = c
        .list_all_keys(&ns, None)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(left, ["all", "exp", "text"]);
    assert_eq!(count(&c, "bulk_delete"), 1);
    // Client and server agree on every request.
    assert_eq!(c.request_counts(), server_counts(&server).await);
}

/// A job of about 300 mixed operations against a server failing 30 % of requests (5xx, 429,
/// dropped connections) completes, and the data is all there once the faults are off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_lose_nothing() {
    let mut server = ServerProc::start(&["--fail-rate", "0.3", "--seed", "42"]);
    let mut cfg = config(&server.base_url());
    cfg.max_retries = 12;
    let c = Client::new(cfg).unwrap();
    let ns = {
        // Creation is not idempotent: a lost answer to a successful create makes the retry a
        // duplicate title; look the namespace up then.
        match c.create_namespace("faulty").await {
            Ok(ns) => ns.id,
            Err(e) if e.code() == Some(10014) => {
                c.list_namespaces()
                    .await
                    .unwrap()
                    .into_iter()
                    .find(|n| n.title == "faulty")
                    .unwrap()
                    .id
            }
            Err(e) => panic!("{e}"),
        }
    };
    // 20 workers on disjoint keys, 15 operations each; each worker knows its final state.
    let workers: Vec<_> = (0..20)
        .map(|w| {
            let (c, ns) = (c.clone(), ns.clone());
            tokio::spawn(async move {
                let mut want: BTreeMap<String, (Vec<u8>, Option<Json>)> = BTreeMap::new();
                for step in 0..15 {
                    let key = format!("w{w:02}/k{}", step % 5);
                    let value = format!("{w}-{step}").into_bytes();
                    match step % 5 {
                        0 | 1 => {
                            c.put_value(
                                &ns,
                                &key,
                                Bytes::from(value.clone()),
                                &PutOptions::default(),
                            )
                            .await
                            .unwrap();
                            want.insert(key, (value, None));
                        }
                        2 => {
                            let meta = json!({"step": step});
                            let opts = PutOptions {
                                metadata: Some(meta.clone()),
                                ..Default::default()
                            };
                            c.put_value(&ns, &key, Bytes::from(value.clone()), &opts)
                                .await
                                .unwrap();
                            want.insert(key, (value, Some(meta)));
                        }
                        3 => {
                            let items: Vec<_> = (0..4)
                                .map(|j| {
                                    item(&format!("w{w:02}/bulk{j}"), &format!("{w}-{step}-{j}"))
                                })
                                .collect();
                            let r = c.bulk_write(&ns, &items).await.unwrap();
                            assert!(r.unsuccessful_keys.is_empty());
                            for it in items {
                                want.insert(it.key, (it.value.into_bytes(), None));
                            }
                            let victim = format!("w{w:02}/k{}", (step + 2) % 5);
                            c.delete_value(&ns, &victim).await.unwrap();
                            want.remove(&victim);
                        }
                        _ => {
                            if let Some((k, (v, _))) = want.iter().next() {
                                assert_eq!(&c.get_value(&ns, k).await.unwrap().bytes[..], &v[..]);
                            }
                            let listed = c
                                .list_all_keys(&ns, Some(&format!("w{w:02}/")))
                                .await
                                .unwrap();
                            assert_eq!(listed.len(), want.len());
                        }
                    }
                }
                want
            })
        })
        .collect();
    let mut want = BTreeMap::new();
    for w in workers {
        want.extend(w.await.unwrap());
    }
    assert!(c.retry_count() > 0, "no faults were injected");
    let ops: u64 = c.total_requests() - c.retry_count();
    assert!(ops >= 300, "only {ops} operations");

    // Verify with the faults off: the same data, a server without --fail-rate.
    server.stop();
    let server = ServerProc::start_on(&server.data, &[]);
    let c = client(&server.base_url());
    let listed = c.list_all_keys(&ns, None).await.unwrap();
    assert_eq!(
        listed.iter().map(|k| k.name.clone()).collect::<Vec<_>>(),
        want.keys().cloned().collect::<Vec<_>>()
    );
    for k in &listed {
        let (value, meta) = &want[&k.name];
        assert_eq!(&k.metadata, meta, "{}", k.name);
        assert_eq!(
            &c.get_value(&ns, &k.name).await.unwrap().bytes[..],
            &value[..],
            "{}",
            k.name
        );
    }
    assert_eq!(c.retry_count(), 0);
    assert_eq!(c.request_counts(), server_counts(&server).await);
}

/// The debug log has one line per request with the operation, key and status, and never the
/// credentials, whatever the outcome.
#[tokio::test(flavor = "current_thread")]
async fn log_lines_without_credentials() {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // A current-thread runtime: every task of the client logs through this thread's default.
    let _guard = tracing::subscriber::set_default(subscriber);

    let mock = Mock::start(vec![
        fail(503, 1, "down"),
        ok(Json::Null),
        Reply::Drop,
        fail(403, 10000, "Authentication error"),
    ])
    .await;
    let c = client(&mock.base);
    c.put_value(
        "ns",
        "log/key",
        Bytes::from_static(b"v"),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    let mut cfg = config(&mock.base);
    cfg.auth = Auth::Key {
        email: "me@example.com".into(),
        key: "sekrit-key".into(),
    };
    let k = Client::new(cfg).unwrap();
    k.get_metadata("ns", "other").await.unwrap_err();

    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(!log.contains(TOKEN) && !log.contains("sekrit"), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("kv request")).collect();
    assert_eq!(lines.len(), 4, "{log}");
    assert!(
        lines[0].contains("op=\"put_value\"")
            && lines[0].contains("log/key")
            && lines[0].contains("status=503"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("status=200") && lines[1].contains("elapsed_ms="),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("op=\"get_metadata\"") && lines[2].contains("failed"),
        "{}",
        lines[2]
    );
    assert!(lines[3].contains("status=403"), "{}", lines[3]);
}
