//! `kvfs serve` against the Workers KV REST API as Cloudflare answers it: statuses, literal JSON
//! envelopes, error codes and messages, limits, pagination, expiration, durability.

mod common;

use common::{ServerProc, ACCOUNT, TOKEN};
use reqwest::blocking::{multipart, Client, RequestBuilder, Response};
use reqwest::Method;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Api {
    s: ServerProc,
    c: Client,
}

impl Api {
    fn start(extra: &[&str]) -> Api {
        Api::on(ServerProc::start(extra))
    }

    fn on(s: ServerProc) -> Api {
        let c = Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Api { s, c }
    }

    /// An authenticated request; `path` is relative to `.../namespaces`.
    fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.c
            .request(method, format!("{}{path}", self.s.ns_url()))
            .bearer_auth(TOKEN)
    }

    fn create_ns(&self, title: &str) -> String {
        let (status, body) = send(self.req(Method::POST, "").json(&json!({ "title": title })));
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["result"]["id"].as_str().unwrap().to_string()
    }

    fn put(&self, ns: &str, key: &str, value: &str) {
        let (status, body) = send(
            self.req(Method::PUT, &format!("/{ns}/values/{key}"))
                .body(value.to_string()),
        );
        assert_eq!((status, body.as_str()), (200, OK_NULL));
    }

    fn stats(&self) -> Value {
        let r = self
            .c
            .get(format!("{}/__kvfs/stats", self.s.origin))
            .bearer_auth(TOKEN)
            .send()
            .unwrap();
        r.json().unwrap()
    }

    fn clock_advance(&self, secs: i64) {
        let r = self
            .c
            .post(format!("{}/__kvfs/clock", self.s.origin))
            .bearer_auth(TOKEN)
            .json(&json!({ "advance": secs }))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    fn list_keys(&self, ns: &str, query: &str) -> Value {
        let (status, body) = send(self.req(Method::GET, &format!("/{ns}/keys{query}")));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

const OK_NULL: &str = r#"{"result":null,"success":true,"errors":[],"messages":[]}"#;

fn send(rb: RequestBuilder) -> (u16, String) {
    let r = rb.send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

fn err(code: u32, message: &str) -> String {
    format!(
        r#"{{"result":null,"success":false,"errors":[{{"code":{code},"message":{}}}],"messages":[]}}"#,
        json!(message)
    )
}

fn ns_json(id: &str, title: &str) -> String {
    format!(r#"{{"id":"{id}","title":"{title}","supports_url_encoding":true}}"#)
}

fn ok_result(result: &str) -> String {
    format!(r#"{{"result":{result},"success":true,"errors":[],"messages":[]}}"#)
}

/// Sends bytes as they are (reqwest would normalize `.` segments) and returns status and body.
fn raw(origin: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(origin.trim_start_matches("http://")).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn raw_get(api: &Api, path: &str) -> (u16, String) {
    raw(
        &api.s.origin,
        &format!(
            "GET /client/v4/accounts/{ACCOUNT}/storage/kv/namespaces{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        ),
    )
}

#[test]
fn envelope_helper_matches_cloudflare_order() {
    assert_eq!(
        err(10009, "get: 'key not found'"),
        r#"{"result":null,"success":false,"errors":[{"code":10009,"message":"get: 'key not found'"}],"messages":[]}"#
    );
}

#[test]
fn namespaces_create_get_rename_delete() {
    let api = Api::start(&[]);
    let (status, body) = send(api.req(Method::POST, "").json(&json!({"title": "alpha"})));
    assert_eq!(status, 200);
    let id = serde_json::from_str::<Value>(&body).unwrap()["result"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 32);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(body, ok_result(&ns_json(&id, "alpha")));

    assert_eq!(
        send(api.req(Method::GET, &format!("/{id}"))),
        (200, ok_result(&ns_json(&id, "alpha")))
    );
    assert_eq!(
        send(api.req(Method::GET, "")),
        (
            200,
            format!(
                r#"{{"result":[{}],"success":true,"errors":[],"messages":[],"result_info":{{"count":1,"page":1,"per_page":20,"total_count":1,"total_pages":1}}}}"#,
                ns_json(&id, "alpha")
            )
        )
    );

    // Duplicate titles, on create and on rename.
    let dup = (
        400,
        err(
            10014,
            "a namespace with this account ID and title already exists",
        ),
    );
    assert_eq!(
        send(api.req(Method::POST, "").json(&json!({"title": "alpha"}))),
        dup
    );
    let other = api.create_ns("beta");
    assert_eq!(
        send(
            api.req(Method::PUT, &format!("/{other}"))
                .json(&json!({"title": "alpha"}))
        ),
        dup
    );

    // Missing or bad titles.
    let missing = (400, err(10019, "a namespace title is required"));
    assert_eq!(send(api.req(Method::POST, "").json(&json!({}))), missing);
    assert_eq!(
        send(api.req(Method::POST, "").json(&json!({"title": ""}))),
        missing
    );
    assert_eq!(
        send(api.req(Method::POST, "").json(&json!({"title": 5}))),
        missing
    );
    assert_eq!(
        send(
            api.req(Method::POST, "")
                .json(&json!({"title": "x".repeat(513)}))
        ),
        (
            400,
            err(10019, "namespace title must be at most 512 characters")
        )
    );
    let (status, body) = send(api.req(Method::POST, "").body("{not json"));
    assert_eq!(status, 400);
    assert!(body.starts_with(r#"{"result":null,"success":false,"errors":[{"code":10012,"message":"Could not parse request body: "#), "{body}");

    // Rename, also to its own title.
    assert_eq!(
        send(
            api.req(Method::PUT, &format!("/{id}"))
                .json(&json!({"title": "gamma"}))
        ),
        (200, ok_result(&ns_json(&id, "gamma")))
    );
    assert_eq!(
        send(
            api.req(Method::PUT, &format!("/{id}"))
                .json(&json!({"title": "gamma"}))
        ),
        (200, ok_result(&ns_json(&id, "gamma")))
    );

    // Delete takes the keys along.
    api.put(&id, "k", "v");
    assert_eq!(
        send(api.req(Method::DELETE, &format!("/{id}"))),
        (200, OK_NULL.to_string())
    );
    for (m, path, verb) in [
        (Method::GET, format!("/{id}"), "get namespace"),
        (Method::PUT, format!("/{id}"), "rename namespace"),
        (Method::DELETE, format!("/{id}"), "delete namespace"),
        (Method::GET, format!("/{id}/keys"), "list keys"),
        (Method::GET, format!("/{id}/values/k"), "get"),
        (Method::PUT, format!("/{id}/values/k"), "put"),
        (Method::DELETE, format!("/{id}/values/k"), "delete"),
        (Method::GET, format!("/{id}/metadata/k"), "metadata"),
        (Method::PUT, format!("/{id}/bulk"), "bulk put"),
        (Method::DELETE, format!("/{id}/bulk"), "bulk delete"),
        (Method::POST, format!("/{id}/bulk/delete"), "bulk delete"),
        (Method::POST, format!("/{id}/bulk/get"), "bulk get"),
    ] {
        let body = match path.as_str() {
            p if p.ends_with("/bulk") && m == Method::PUT => r#"[{"key":"a","value":"b"}]"#,
            p if p.ends_with("/bulk/get") => r#"{"keys":["a"]}"#,
            p if p.contains("bulk") => r#"["a"]"#,
            _ if m == Method::PUT && path.ends_with(&format!("/{id}")) => r#"{"title":"z"}"#,
            _ => "v",
        };
        assert_eq!(
            send(api.req(m.clone(), &path).body(body)),
            (404, err(10013, &format!("{verb}: 'namespace not found'"))),
            "{m} {path}"
        );
    }

    // Malformed namespace ids.
    for bad in [
        "xyz",
        "0123456789ABCDEF0123456789ABCDEF",
        "0123456789abcdef0123456789abcdef0",
    ] {
        assert_eq!(
            send(api.req(Method::GET, &format!("/{bad}/keys"))),
            (
                400,
                err(10011, &format!("could not parse UUID from request's namespace_id: 'invalid namespace format: {bad}'"))
            )
        );
    }

    // Namespaces belong to an account.
    let foreign = api
        .c
        .get(format!(
            "{}/accounts/someone-else/storage/kv/namespaces/{other}",
            api.s.base_url()
        ))
        .bearer_auth(TOKEN);
    assert_eq!(
        send(foreign),
        (404, err(10013, "get namespace: 'namespace not found'"))
    );
}

#[test]
fn namespace_paging_and_ordering() {
    let api = Api::start(&[]);
    let mut made: Vec<(String, String)> = (0..25)
        .map(|i| {
            let title = format!("ns-{:02}", (i * 7) % 25);
            (api.create_ns(&title), title)
        })
        .collect();
    let page = |q: &str| -> Value {
        let (status, body) = send(api.req(Method::GET, q));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let ids = |v: &Value| -> Vec<String> {
        v["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap().to_string())
            .collect()
    };
    let titles = |v: &Value| -> Vec<String> {
        v["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["title"].as_str().unwrap().to_string())
            .collect()
    };

    // Default: 20 per page, ordered by id.
    made.sort();
    let p1 = page("");
    assert_eq!(
        p1["result_info"],
        json!({"page": 1, "per_page": 20, "count": 20, "total_count": 25, "total_pages": 2})
    );
    let p2 = page("?page=2");
    assert_eq!(
        p2["result_info"],
        json!({"page": 2, "per_page": 20, "count": 5, "total_count": 25, "total_pages": 2})
    );
    let all: Vec<String> = ids(&p1).into_iter().chain(ids(&p2)).collect();
    assert_eq!(
        all,
        made.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>()
    );
    // Past the end: an empty page (the Python SDK stops on it).
    assert_eq!(page("?page=3")["result"], json!([]));

    // Wrangler's query.
    let w = page("?per_page=1000&order=title&direction=asc");
    let mut sorted: Vec<String> = made.iter().map(|(_, t)| t.clone()).collect();
    sorted.sort();
    assert_eq!(titles(&w), sorted);
    let d = page("?per_page=10&order=title&direction=desc&page=1");
    sorted.reverse();
    assert_eq!(titles(&d), sorted[..10].to_vec());
    let by_id_desc = page("?per_page=3&order=id&direction=desc");
    let mut rev: Vec<String> = made.iter().map(|(id, _)| id.clone()).collect();
    rev.reverse();
    assert_eq!(ids(&by_id_desc), rev[..3].to_vec());

    for (q, msg) in [
        (
            "?per_page=0",
            "Invalid query parameter: per_page must be between 1 and 1000",
        ),
        (
            "?per_page=1001",
            "Invalid query parameter: per_page must be between 1 and 1000",
        ),
        (
            "?page=0",
            "Invalid query parameter: page must be at least 1",
        ),
        (
            "?page=x",
            "Invalid query parameter: page must be a number, got \"x\"",
        ),
        (
            "?order=size",
            "Invalid query parameter: order must be id or title, got \"size\"",
        ),
        (
            "?direction=up",
            "Invalid query parameter: direction must be asc or desc, got \"up\"",
        ),
    ] {
        assert_eq!(send(api.req(Method::GET, q)), (400, err(10027, msg)), "{q}");
    }
}

#[test]
fn values_raw_and_multipart() {
    let api = Api::start(&[]);
    let ns = api.create_ns("values");

    // Raw body, binary, with %2F in the key.
    let bytes: Vec<u8> = (0..=255u8).collect();
    let (status, body) = send(
        api.req(Method::PUT, &format!("/{ns}/values/dir%2Ffile.bin"))
            .body(bytes.clone()),
    );
    assert_eq!((status, body.as_str()), (200, OK_NULL));
    let r = api
        .req(Method::GET, &format!("/{ns}/values/dir%2Ffile.bin"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert!(r.headers().get("expiration").is_none());
    assert_eq!(r.bytes().unwrap().to_vec(), bytes);
    assert_eq!(
        api.list_keys(&ns, "")["result"],
        json!([{"name": "dir/file.bin"}])
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/metadata/dir%2Ffile.bin"))),
        (200, ok_result("null"))
    );

    // Percent-encoded unicode and reserved characters.
    api.put(&ns, "%E2%9C%93%20a%3Fb%23c%25", "check");
    assert_eq!(
        send(api.req(
            Method::GET,
            &format!("/{ns}/values/%E2%9C%93%20a%3Fb%23c%25")
        )),
        (200, "check".to_string())
    );
    assert_eq!(
        api.list_keys(&ns, "?prefix=%E2%9C%93")["result"],
        json!([{"name": "✓ a?b#c%"}])
    );

    // Multipart with part content types (the Python SDK).
    let form = multipart::Form::new()
        .part(
            "value",
            multipart::Part::bytes(b"sdk-value".to_vec())
                .file_name("upload")
                .mime_str("application/octet-stream")
                .unwrap(),
        )
        .part(
            "metadata",
            multipart::Part::text(r#"{"owner":"sdk","n":1}"#)
                .mime_str("application/json")
                .unwrap(),
        );
    assert_eq!(
        send(
            api.req(Method::PUT, &format!("/{ns}/values/sdk"))
                .multipart(form)
        ),
        (200, OK_NULL.to_string())
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/values/sdk"))),
        (200, "sdk-value".to_string())
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/metadata/sdk"))),
        (200, ok_result(r#"{"n":1,"owner":"sdk"}"#))
    );

    // A large value as multipart, as the SDKs always send it: within KV's 25 MiB, not axum's 2 MB.
    let big: Vec<u8> = (0..24u32 << 20).map(|i| (i % 251) as u8).collect();
    let form = multipart::Form::new().part(
        "value",
        multipart::Part::bytes(big.clone())
            .file_name("upload")
            .mime_str("application/octet-stream")
            .unwrap(),
    );
    assert_eq!(
        send(
            api.req(Method::PUT, &format!("/{ns}/values/big"))
                .multipart(form)
        ),
        (200, OK_NULL.to_string())
    );
    let got = api
        .req(Method::GET, &format!("/{ns}/values/big"))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(got.as_ref() == big.as_slice(), "{} bytes back", got.len());

    // Multipart without part content types (wrangler), written out by hand.
    let body = "--XyZ\r\nContent-Disposition: form-data; name=\"value\"\r\n\r\nwrangler-value\r\n--XyZ\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n{\"via\":\"wrangler\"}\r\n--XyZ--\r\n";
    let (status, text) = send(
        api.req(Method::PUT, &format!("/{ns}/values/wr"))
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(body),
    );
    assert_eq!((status, text.as_str()), (200, OK_NULL));
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/values/wr"))),
        (200, "wrangler-value".to_string())
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/metadata/wr"))),
        (200, ok_result(r#"{"via":"wrangler"}"#))
    );

    // A raw PUT replaces value and metadata.
    let (status, _) = send(
        api.req(Method::PUT, &format!("/{ns}/values/wr"))
            .header("content-type", "text/plain;charset=UTF-8")
            .body("plain"),
    );
    assert_eq!(status, 200);
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/metadata/wr"))),
        (200, ok_result("null"))
    );

    // Multipart errors.
    let form = multipart::Form::new().text("metadata", "{}");
    assert_eq!(
        send(
            api.req(Method::PUT, &format!("/{ns}/values/m"))
                .multipart(form)
        ),
        (
            400,
            err(
                10012,
                "Could not parse request body: multipart form has no \"value\" part"
            )
        )
    );
    let form = multipart::Form::new()
        .text("value", "v")
        .text("metadata", "{oops");
    let (status, text) = send(
        api.req(Method::PUT, &format!("/{ns}/values/m"))
            .multipart(form),
    );
    assert_eq!(status, 400);
    assert!(
        text.contains(r#""code":10012,"message":"metadata must be valid JSON: "#),
        "{text}"
    );

    // Missing keys.
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/values/nope"))),
        (404, err(10009, "get: 'key not found'"))
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/metadata/nope"))),
        (404, err(10009, "metadata: 'key not found'"))
    );

    // Delete, and delete of a missing key.
    assert_eq!(
        send(api.req(Method::DELETE, &format!("/{ns}/values/sdk"))),
        (200, OK_NULL.to_string())
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/values/sdk"))).0,
        404
    );
    assert_eq!(
        send(api.req(Method::DELETE, &format!("/{ns}/values/sdk"))),
        (200, OK_NULL.to_string())
    );
}

#[test]
fn key_and_value_limits() {
    let api = Api::start(&[]);
    let ns = api.create_ns("limits");
    let put = |key: &str, body: Vec<u8>| {
        send(
            api.req(Method::PUT, &format!("/{ns}/values/{key}"))
                .body(body),
        )
    };

    assert_eq!(
        put("", b"v".to_vec()),
        (400, err(10020, "Key names must not be empty"))
    );
    for dots in [".", ".."] {
        let (status, body) = raw(
            &api.s.origin,
            &format!("PUT /client/v4/accounts/{ACCOUNT}/storage/kv/namespaces/{ns}/values/{dots} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1\r\nConnection: close\r\n\r\nv"),
        );
        assert_eq!(
            (status, body),
            (
                400,
                err(
                    10020,
                    &format!("Illegal key name \"{dots}\". Please use a different name.")
                )
            )
        );
        assert_eq!(raw_get(&api, &format!("/{ns}/values/{dots}")).0, 400);
    }
    assert_eq!(put(&"k".repeat(512), b"v".to_vec()).0, 200);
    assert_eq!(
        put(&"k".repeat(513), b"v".to_vec()),
        (
            414,
            err(
                10021,
                "UTF-8 encoded length of 513 exceeds key length limit of 512."
            )
        )
    );
    // Multi-byte: 171 x 3 bytes = 513.
    assert_eq!(
        send(api.req(
            Method::GET,
            &format!("/{ns}/values/{}", "%E2%9C%93".repeat(171))
        )),
        (
            414,
            err(
                10021,
                "UTF-8 encoded length of 513 exceeds key length limit of 512."
            )
        )
    );
    assert_eq!(
        put("bad%FF", b"v".to_vec()),
        (400, err(10020, "Key names must be valid UTF-8"))
    );

    // Values: 25 MiB is fine, one byte more is not.
    let max = 25 * 1024 * 1024;
    assert_eq!(put("big", vec![b'x'; max]).0, 200);
    assert_eq!(
        put("big2", vec![b'x'; max + 1]),
        (
            413,
            err(10022, "Value length of 26214401 exceeds limit of 26214400.")
        )
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/values/big2"))).0,
        404
    );

    // Metadata: 1024 bytes serialized.
    let meta = |n: usize| format!(r#"{{"m":"{}"}}"#, "x".repeat(n - 8));
    let form = |m: String| {
        multipart::Form::new()
            .text("value", "v")
            .text("metadata", m)
    };
    assert_eq!(
        send(
            api.req(Method::PUT, &format!("/{ns}/values/m"))
                .multipart(form(meta(1024)))
        )
        .0,
        200
    );
    assert_eq!(
        send(
            api.req(Method::PUT, &format!("/{ns}/values/m"))
                .multipart(form(meta(1025)))
        ),
        (
            413,
            err(10023, "Metadata length of 1025 exceeds limit of 1024.")
        )
    );

    // Expiration.
    assert_eq!(
        put("e?expiration_ttl=59", b"v".to_vec()),
        (
            400,
            err(
                10024,
                "Invalid expiration_ttl of 59. Expiration TTL must be at least 60."
            )
        )
    );
    let now = common_now();
    let soon = now + 30;
    assert_eq!(
        put(&format!("e?expiration={soon}"), b"v".to_vec()),
        (400, err(10025, &format!("Invalid expiration of {soon}. Expiration times must be at least 60 seconds in the future.")))
    );
    // The TTL wins over an absolute expiration, even an invalid one.
    assert_eq!(
        put(
            &format!("e?expiration={soon}&expiration_ttl=120"),
            b"v".to_vec()
        )
        .0,
        200
    );
    assert_eq!(
        put("e?expiration_ttl=soon", b"v".to_vec()),
        (
            400,
            err(
                10027,
                "Invalid query parameter: expiration_ttl must be a number, got \"soon\""
            )
        )
    );

    // A body over 100 MB never reaches the API: the gateway's plain 413.
    let (status, body) = raw(
        &api.s.origin,
        &format!("PUT /client/v4/accounts/{ACCOUNT}/storage/kv/namespaces/{ns}/bulk HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100000001\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 413);
    assert!(body.contains("413 Request Entity Too Large"), "{body}");
}

fn common_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn expiration_and_clock() {
    let api = Api::start(&[]);
    let ns = api.create_ns("ttl");
    let before = common_now();
    let (status, _) = send(
        api.req(
            Method::PUT,
            &format!("/{ns}/values/short?expiration_ttl=60"),
        )
        .body("s"),
    );
    assert_eq!(status, 200);
    let abs = before + 3600;
    let (status, _) = send(
        api.req(Method::PUT, &format!("/{ns}/values/long?expiration={abs}"))
            .body("l"),
    );
    assert_eq!(status, 200);
    api.put(&ns, "forever", "f");

    let r = api
        .req(Method::GET, &format!("/{ns}/values/short"))
        .send()
        .unwrap();
    let exp: i64 = r.headers()["expiration"].to_str().unwrap().parse().unwrap();
    assert!((before + 60..=common_now() + 60).contains(&exp), "{exp}");
    let r = api
        .req(Method::GET, &format!("/{ns}/values/long"))
        .send()
        .unwrap();
    assert_eq!(r.headers()["expiration"].to_str().unwrap(), abs.to_string());
    assert_eq!(
        api.list_keys(&ns, "")["result"],
        json!([{"name": "forever"}, {"name": "long", "expiration": abs}, {"name": "short", "expiration": exp}])
    );

    // 61 s later `short` is gone everywhere.
    api.clock_advance(61);
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/values/short"))),
        (404, err(10009, "get: 'key not found'"))
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/metadata/short"))),
        (404, err(10009, "metadata: 'key not found'"))
    );
    assert_eq!(
        api.list_keys(&ns, "")["result"],
        json!([{"name": "forever"}, {"name": "long", "expiration": abs}])
    );
    let (status, body) = send(
        api.req(Method::POST, &format!("/{ns}/bulk/get"))
            .json(&json!({"keys": ["short", "forever"]})),
    );
    assert_eq!(
        (status, body),
        (200, ok_result(r#"{"values":{"forever":"f","short":null}}"#))
    );

    // Validation follows the server clock too.
    let (status, _) = send(
        api.req(
            Method::PUT,
            &format!("/{ns}/values/x?expiration={}", before + 100),
        )
        .body("x"),
    );
    assert_eq!(status, 400);

    api.clock_advance(3600);
    assert_eq!(
        api.list_keys(&ns, "")["result"],
        json!([{"name": "forever"}])
    );

    // Numbers may be floats (the Python SDK sends time.time() + N): truncated to seconds.
    let at = common_now() + 3600 + 7200;
    let (status, _) = send(
        api.req(Method::PUT, &format!("/{ns}/values/f?expiration={at}.75"))
            .body("f"),
    );
    assert_eq!(status, 200);
    let body = json!([{"key": "g", "value": "g", "expiration": at as f64 + 0.5}, {"key": "h", "value": "h", "expiration_ttl": 120.0}]);
    assert_eq!(
        send(api.req(Method::PUT, &format!("/{ns}/bulk")).json(&body)).0,
        200
    );
    let listed = api.list_keys(&ns, "")["result"].clone();
    assert_eq!(listed[0], json!({"name": "f", "expiration": at}));
    assert_eq!(listed[1], json!({"name": "forever"}));
    assert_eq!(listed[2], json!({"name": "g", "expiration": at}));
    let (status, text) = send(
        api.req(Method::PUT, &format!("/{ns}/bulk"))
            .json(&json!([{"key": "i", "value": "i", "expiration_ttl": "soon"}])),
    );
    assert_eq!(
        (status, text),
        (
            400,
            err(
                10012,
                "Could not parse request body: expiration_ttl must be a number, got \"soon\""
            )
        )
    );
}

#[test]
fn key_listing_pages_prefix_and_byte_order() {
    let api = Api::start(&[]);
    let ns = api.create_ns("listing");
    let items: Vec<Value> = (0..2500)
        .map(|i| json!({"key": format!("k{i:05}"), "value": "v"}))
        .collect();
    let (status, body) = send(api.req(Method::PUT, &format!("/{ns}/bulk")).json(&items));
    assert_eq!(
        (status, body),
        (
            200,
            ok_result(r#"{"successful_key_count":2500,"unsuccessful_keys":[]}"#)
        )
    );
    api.put(&ns, "other", "o");

    let mut names = Vec::new();
    let mut cursor = String::new();
    let mut counts = Vec::new();
    loop {
        let q = if cursor.is_empty() {
            "?prefix=k&limit=1000".to_string()
        } else {
            format!("?prefix=k&limit=1000&cursor={cursor}")
        };
        let v = api.list_keys(&ns, &q);
        let page: Vec<String> = v["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(v["result_info"]["count"], json!(page.len()));
        counts.push(page.len());
        names.extend(page);
        cursor = v["result_info"]["cursor"].as_str().unwrap().to_string();
        if cursor.is_empty() {
            break;
        }
    }
    assert_eq!(counts, vec![1000, 1000, 500]);
    assert_eq!(
        names,
        (0..2500).map(|i| format!("k{i:05}")).collect::<Vec<_>>()
    );

    // Default limit is 1000; no prefix lists everything.
    let v = api.list_keys(&ns, "");
    assert_eq!(v["result_info"]["count"], json!(1000));
    assert_ne!(v["result_info"]["cursor"], json!(""));

    // Prefix includes the exact match and is case-sensitive.
    let v = api.list_keys(&ns, "?prefix=k0249");
    assert_eq!(
        v.to_string(),
        json!({"result": (2490..2500).map(|i| json!({"name": format!("k{i:05}")})).collect::<Vec<_>>(), "success": true, "errors": [], "messages": [], "result_info": {"count": 10, "cursor": ""}}).to_string()
    );
    assert_eq!(api.list_keys(&ns, "?prefix=K")["result"], json!([]));
    assert_eq!(
        api.list_keys(&ns, "?prefix=other")["result"],
        json!([{"name": "other"}])
    );

    // Literal text of a small page.
    let ns2 = api.create_ns("order");
    for k in [
        "z",
        "~",
        "%C3%A9",
        "%E4%B8%AD",
        "%EF%BD%A1",
        "%F0%9F%98%80",
        "A",
        "a",
    ] {
        api.put(&ns2, k, "v");
    }
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns2}/keys?limit=10"))),
        (
            200,
            r#"{"result":[{"name":"A"},{"name":"a"},{"name":"z"},{"name":"~"},{"name":"é"},{"name":"中"},{"name":"｡"},{"name":"😀"}],"success":true,"errors":[],"messages":[],"result_info":{"count":8,"cursor":""}}"#.to_string()
        )
    );

    // Limit bounds.
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/keys?limit=9"))),
        (400, err(10028, "limit argument must be at least 10"))
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/keys?limit=1001"))),
        (400, err(10028, "limit argument must be at most 1000"))
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/keys?cursor=!!!"))),
        (
            400,
            err(10027, "Invalid query parameter: invalid cursor \"!!!\"")
        )
    );
}

#[test]
fn bulk_write_get_delete() {
    let api = Api::start(&[]);
    let ns = api.create_ns("bulk");
    let body = json!([
        {"key": "text", "value": "hello"},
        {"key": "bin", "value": "AAH/", "base64": true},
        {"key": "json", "value": "{\"a\":[1,2]}", "metadata": {"m": true}},
        {"key": "ttl", "value": "t", "expiration_ttl": 300},
    ]);
    let (status, text) = send(api.req(Method::PUT, &format!("/{ns}/bulk")).json(&body));
    assert_eq!(
        (status, text),
        (
            200,
            ok_result(r#"{"successful_key_count":4,"unsuccessful_keys":[]}"#)
        )
    );
    let r = api
        .req(Method::GET, &format!("/{ns}/values/bin"))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().to_vec(), vec![0u8, 1, 255]);
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/metadata/json"))),
        (200, ok_result(r#"{"m":true}"#))
    );

    let get = |b: Value| send(api.req(Method::POST, &format!("/{ns}/bulk/get")).json(&b));
    assert_eq!(
        get(json!({"keys": ["text", "json", "missing"]})),
        (
            200,
            ok_result(r#"{"values":{"json":"{\"a\":[1,2]}","missing":null,"text":"hello"}}"#)
        )
    );
    assert_eq!(
        get(json!({"keys": ["json", "missing"], "type": "json"})),
        (
            200,
            ok_result(r#"{"values":{"json":{"a":[1,2]},"missing":null}}"#)
        )
    );
    let (status, text) = get(json!({"keys": ["json", "text", "ttl"], "withMetadata": true}));
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["result"]["values"]["json"],
        json!({"value": "{\"a\":[1,2]}", "metadata": {"m": true}})
    );
    assert_eq!(
        v["result"]["values"]["text"],
        json!({"value": "hello", "metadata": null})
    );
    assert!(v["result"]["values"]["ttl"]["expiration"].as_i64().unwrap() > common_now());
    // Non-UTF-8 comes back lossily.
    assert_eq!(
        get(json!({"keys": ["bin"]})),
        (200, ok_result(r#"{"values":{"bin":"\u0000\u0001�"}}"#))
    );
    assert_eq!(
        get(json!({"keys": ["text"], "type": "json"})),
        (
            400,
            err(
                10030,
                "At least one of the requested keys corresponds to a non-JSON value"
            )
        )
    );
    let too_many: Vec<String> = (0..101).map(|i| format!("k{i}")).collect();
    let count_msg = "You can request a minimum of 1 and a maximum of 100 keys";
    assert_eq!(
        get(json!({ "keys": too_many })),
        (400, err(10026, count_msg))
    );
    assert_eq!(get(json!({ "keys": [] })), (400, err(10026, count_msg)));
    assert_eq!(
        get(json!({"keys": ["a"], "type": "xml"})),
        (
            400,
            err(
                10012,
                "Could not parse request body: type must be \"text\" or \"json\", got \"xml\""
            )
        )
    );

    // Invalid pairs fail the whole request and write nothing.
    let (status, text) = send(api.req(Method::PUT, &format!("/{ns}/bulk")).json(&json!([
        {"key": "fine", "value": "x"},
        {"key": "short", "value": "x", "expiration_ttl": 10},
    ])));
    assert_eq!(
        (status, text),
        (
            400,
            err(
                10024,
                "Invalid expiration_ttl of 10. Expiration TTL must be at least 60."
            )
        )
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/values/fine"))).0,
        404
    );
    let (status, text) = send(
        api.req(Method::PUT, &format!("/{ns}/bulk"))
            .json(&json!([{"key": "..", "value": "x"}])),
    );
    assert_eq!(
        (status, text),
        (
            400,
            err(
                10020,
                "Illegal key name \"..\". Please use a different name."
            )
        )
    );
    let (status, text) = send(
        api.req(Method::PUT, &format!("/{ns}/bulk"))
            .json(&json!([{"key": "m", "value": "x", "metadata": {"x": "y".repeat(2000)}}])),
    );
    assert_eq!(
        (status, text),
        (
            413,
            err(10023, "Metadata length of 2008 exceeds limit of 1024.")
        )
    );
    let too_many: Vec<Value> = (0..10_001)
        .map(|i| json!({"key": format!("k{i}"), "value": ""}))
        .collect();
    assert_eq!(
        send(api.req(Method::PUT, &format!("/{ns}/bulk")).json(&too_many)),
        (
            400,
            err(
                10026,
                "You can write a maximum of 10000 key-value pairs at once"
            )
        )
    );
    let (status, text) = send(
        api.req(Method::PUT, &format!("/{ns}/bulk"))
            .json(&json!({"key": "x"})),
    );
    assert_eq!(status, 400);
    assert!(text.contains(r#""code":10012"#), "{text}");

    // Both delete routes.
    let (status, text) = send(
        api.req(Method::POST, &format!("/{ns}/bulk/delete"))
            .json(&json!(["text", "missing"])),
    );
    assert_eq!(
        (status, text),
        (
            200,
            ok_result(r#"{"successful_key_count":2,"unsuccessful_keys":[]}"#)
        )
    );
    let (status, text) = send(
        api.req(Method::DELETE, &format!("/{ns}/bulk"))
            .json(&json!(["bin", "json"])),
    );
    assert_eq!(
        (status, text),
        (
            200,
            ok_result(r#"{"successful_key_count":2,"unsuccessful_keys":[]}"#)
        )
    );
    assert_eq!(
        api.list_keys(&ns, "")["result"].as_array().unwrap().len(),
        1
    );
    let too_many: Vec<String> = (0..10_001).map(|i| format!("k{i}")).collect();
    assert_eq!(
        send(
            api.req(Method::POST, &format!("/{ns}/bulk/delete"))
                .json(&too_many)
        ),
        (
            400,
            err(10026, "You can delete a maximum of 10000 keys at once")
        )
    );
}

/// Every operation, as (method, path relative to `.../namespaces`, body).
fn every_route(ns: &str) -> Vec<(Method, String, &'static str)> {
    vec![
        (Method::GET, String::new(), ""),
        (Method::POST, String::new(), r#"{"title":"auth-made"}"#),
        (Method::GET, format!("/{ns}"), ""),
        (Method::PUT, format!("/{ns}"), r#"{"title":"auth-renamed"}"#),
        (Method::GET, format!("/{ns}/keys"), ""),
        (Method::GET, format!("/{ns}/values/k"), ""),
        (Method::PUT, format!("/{ns}/values/k"), "v"),
        (Method::DELETE, format!("/{ns}/values/k"), ""),
        (Method::GET, format!("/{ns}/metadata/k"), ""),
        (
            Method::PUT,
            format!("/{ns}/bulk"),
            r#"[{"key":"k","value":"v"}]"#,
        ),
        (Method::DELETE, format!("/{ns}/bulk"), r#"["k"]"#),
        (Method::POST, format!("/{ns}/bulk/delete"), r#"["k"]"#),
        (Method::POST, format!("/{ns}/bulk/get"), r#"{"keys":["k"]}"#),
        (Method::DELETE, format!("/{ns}"), ""),
    ]
}

#[test]
fn auth_on_every_route() {
    let api = Api::start(&[]);
    let ns = api.create_ns("auth");
    api.put(&ns, "k", "v");
    let denied = (403, err(10000, "Authentication error"));
    for (m, path, body) in every_route(&ns) {
        let url = format!("{}{path}", api.s.ns_url());
        assert_eq!(
            send(api.c.request(m.clone(), &url).body(body)),
            denied,
            "no auth: {m} {path}"
        );
        assert_eq!(
            send(
                api.c
                    .request(m.clone(), &url)
                    .bearer_auth("wrong")
                    .body(body)
            ),
            denied,
            "{m} {path}"
        );
        assert_eq!(
            send(
                api.c
                    .request(m.clone(), &url)
                    .header("authorization", TOKEN)
                    .body(body)
            ),
            denied
        );
        assert_eq!(
            send(
                api.c
                    .request(m.clone(), &url)
                    .header("x-auth-key", TOKEN)
                    .body(body)
            ),
            denied,
            "key without email: {m} {path}"
        );
        assert_eq!(
            send(
                api.c
                    .request(m.clone(), &url)
                    .header("x-auth-email", "a@b.c")
                    .header("x-auth-key", "nope")
                    .body(body)
            ),
            denied
        );
    }
    // Nothing changed.
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/values/k"))),
        (200, "v".to_string())
    );
    // Email + key works on every route.
    for (m, path, body) in every_route(&ns) {
        let url = format!("{}{path}", api.s.ns_url());
        let (status, text) = send(
            api.c
                .request(m.clone(), &url)
                .header("x-auth-email", "a@b.c")
                .header("x-auth-key", TOKEN)
                .body(body),
        );
        assert!(
            status == 200 || status == 404,
            "{m} {path}: {status} {text}"
        );
    }
}

#[test]
fn unknown_routes_and_methods() {
    let api = Api::start(&[]);
    let no_route = (404, err(7003, "No route for the URI"));
    let not_allowed = (405, err(7001, "Method not allowed"));
    let ns = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        send(
            api.c
                .get(format!("{}/zones", api.s.base_url()))
                .bearer_auth(TOKEN)
        ),
        no_route
    );
    assert_eq!(
        send(api.c.get(format!("{}/elsewhere", api.s.origin))),
        no_route
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/nothing"))),
        no_route
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/bulk/nothing"))),
        no_route
    );
    assert_eq!(send(api.req(Method::PATCH, "")), not_allowed);
    let r = api
        .req(Method::PATCH, &format!("/{ns}/values/k"))
        .send()
        .unwrap();
    assert_eq!(r.headers()["allow"], "GET, PUT, DELETE");
    assert_eq!(send(api.req(Method::POST, &format!("/{ns}"))), not_allowed);
    assert_eq!(
        send(api.req(Method::POST, &format!("/{ns}/keys"))),
        not_allowed
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/bulk"))),
        not_allowed
    );
    assert_eq!(
        send(api.req(Method::PUT, &format!("/{ns}/metadata/k"))),
        not_allowed
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/bulk/delete"))),
        not_allowed
    );
}

#[test]
fn data_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let api = Api::on(ServerProc::start_on(tmp.path(), &[]));
    let ns = api.create_ns("durable");
    let form = multipart::Form::new()
        .text("value", "kept")
        .text("metadata", r#"{"a":1}"#);
    assert_eq!(
        send(
            api.req(
                Method::PUT,
                &format!("/{ns}/values/a%2Fb?expiration_ttl=3600")
            )
            .multipart(form)
        )
        .0,
        200
    );
    let (status, _) = send(
        api.req(Method::PUT, &format!("/{ns}/bulk"))
            .json(&json!([{"key": "b", "value": "bulk"}])),
    );
    assert_eq!(status, 200);
    let before = api.list_keys(&ns, "");
    let mut s = api.s;
    s.stop();
    assert!(
        s.child.try_wait().unwrap().unwrap().success(),
        "SIGTERM must exit 0"
    );

    let api = Api::on(ServerProc::start_on(tmp.path(), &[]));
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}"))),
        (200, ok_result(&ns_json(&ns, "durable")))
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/values/a%2Fb"))),
        (200, "kept".to_string())
    );
    assert_eq!(
        send(api.req(Method::GET, &format!("/{ns}/metadata/a%2Fb"))),
        (200, ok_result(r#"{"a":1}"#))
    );
    assert_eq!(api.list_keys(&ns, ""), before);
}

#[test]
fn stats_count_every_request_exactly() {
    let api = Api::start(&[]);
    let zero = r#"{"bulk_delete":0,"bulk_get":0,"bulk_write":0,"create_namespace":0,"delete_namespace":0,"delete_value":0,"get_metadata":0,"get_namespace":0,"get_value":0,"list_keys":0,"list_namespaces":0,"put_value":0,"rename_namespace":0,"total":0}"#;
    assert_eq!(
        send(
            api.c
                .get(format!("{}/__kvfs/stats", api.s.origin))
                .bearer_auth(TOKEN)
        ),
        (200, zero.to_string())
    );
    let ns = api.create_ns("stats");
    for (m, path, body) in every_route(&ns) {
        send(api.req(m, &path).body(body));
    }
    // Failed ones count too: unauthenticated, bad namespace id, missing key.
    send(api.c.get(format!("{}/{ns}/values/k", api.s.ns_url())));
    send(api.req(Method::GET, "/nothex/keys"));
    send(api.req(Method::GET, &format!("/{ns}/values/missing")));
    // A route with no operation counts only in the total.
    send(api.req(Method::PATCH, ""));
    // Test aids are not API requests.
    api.stats();
    assert_eq!(
        api.stats(),
        json!({"bulk_delete": 2, "bulk_get": 1, "bulk_write": 1, "create_namespace": 2, "delete_namespace": 1,
               "delete_value": 1, "get_metadata": 1, "get_namespace": 1, "get_value": 3, "list_keys": 2,
               "list_namespaces": 1, "put_value": 1, "rename_namespace": 1, "total": 19})
    );
    assert_eq!(
        send(
            api.c
                .post(format!("{}/__kvfs/stats/reset", api.s.origin))
                .bearer_auth(TOKEN)
        ),
        (200, zero.to_string())
    );
    send(api.req(Method::GET, ""));
    assert_eq!(api.stats()["total"], json!(1));
    assert_eq!(
        send(
            api.c
                .delete(format!("{}/__kvfs/stats", api.s.origin))
                .bearer_auth(TOKEN)
        ),
        (200, zero.to_string())
    );
}

#[test]
fn injected_faults_of_every_kind() {
    let api = Api::start(&["--fail-rate", "1.0", "--seed", "7"]);
    let (mut internal, mut unavailable, mut limited, mut dropped) = (0, 0, 0, 0);
    for _ in 0..40 {
        // A fresh connection each time, so a dropped one does not poison the pool.
        let c = Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        match c.get(api.s.ns_url()).bearer_auth(TOKEN).send() {
            Ok(r) => {
                let status = r.status().as_u16();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                let body = r.text().unwrap();
                match status {
                    500 => {
                        assert_eq!(body, err(10001, "Internal server error"));
                        internal += 1;
                    }
                    503 => {
                        assert_eq!(body, err(10002, "Service temporarily unavailable"));
                        unavailable += 1;
                    }
                    429 => {
                        assert_eq!(
                            body,
                            err(
                                971,
                                "Please wait and consider throttling your request speed"
                            )
                        );
                        assert_eq!(retry.as_deref(), Some("1"));
                        limited += 1;
                    }
                    s => panic!("unexpected status {s}: {body}"),
                }
            }
            Err(_) => dropped += 1,
        }
    }
    assert!(
        internal > 0 && unavailable > 0 && limited > 0 && dropped > 0,
        "{internal} {unavailable} {limited} {dropped}"
    );
    assert_eq!(api.stats()["list_namespaces"], json!(40));
    assert_eq!(api.stats()["total"], json!(40));
}

#[test]
fn faulted_writes_change_nothing_and_seeds_repeat() {
    // Creates 30 namespaces at a 50 % fault rate; true where the create was answered 200.
    let run = |dir: &std::path::Path| -> Vec<bool> {
        let api = Api::on(ServerProc::start_on(
            dir,
            &["--fail-rate", "0.5", "--seed", "42"],
        ));
        (0..30)
            .map(|i| {
                let c = Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap();
                c.post(api.s.ns_url())
                    .bearer_auth(TOKEN)
                    .json(&json!({ "title": format!("t{i:02}") }))
                    .send()
                    .map(|r| r.status() == 200)
                    .unwrap_or(false)
            })
            .collect()
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = run(a.path());
    assert!(first.iter().any(|ok| *ok) && first.iter().any(|ok| !*ok));
    // The same seed gives the same faults.
    assert_eq!(run(b.path()), first);

    // Only the answered creates happened.
    let api = Api::on(ServerProc::start_on(a.path(), &[]));
    let (_, body) = send(api.req(Method::GET, "?per_page=1000&order=title"));
    let v: Value = serde_json::from_str(&body).unwrap();
    let titles: Vec<String> = v["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["title"].as_str().unwrap().to_string())
        .collect();
    let expect: Vec<String> = first
        .iter()
        .enumerate()
        .filter(|(_, ok)| **ok)
        .map(|(i, _)| format!("t{i:02}"))
        .collect();
    assert_eq!(titles, expect);
}

#[test]
fn latency_is_added_to_api_requests() {
    let latency = Duration::from_secs(2);
    let api = std::sync::Arc::new(Api::start(&["--latency", "2s"]));
    let in_flight = {
        let api = api.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            assert_eq!(send(api.req(Method::GET, "")).0, 200);
            t.elapsed()
        })
    };
    // Test aids are not delayed: while the API request sleeps (it is counted first), the
    // stats answer, and the API request is still waiting.
    let start = Instant::now();
    while api.stats()["list_namespaces"] != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "request never counted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!in_flight.is_finished(), "the API request was not delayed");
    assert!(in_flight.join().unwrap() >= latency);
}

#[test]
fn the_operation_log_keeps_arrival_order() {
    let api = Api::start(&[]);
    let ns = api.create_ns("log");
    api.put(&ns, "a", "1");
    assert_eq!(
        send(api.req(Method::DELETE, &format!("/{ns}/values/a"))).0,
        200
    );
    let log: Value = api
        .c
        .get(format!("{}/__kvfs/log", api.s.origin))
        .bearer_auth(TOKEN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        log,
        json!([
            {"op": "create_namespace", "namespace": ""},
            {"op": "put_value", "namespace": ns},
            {"op": "delete_value", "namespace": ns},
        ])
    );
    // Reset with the counters.
    api.c
        .post(format!("{}/__kvfs/stats/reset", api.s.origin))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    let log: Value = api
        .c
        .get(format!("{}/__kvfs/log", api.s.origin))
        .bearer_auth(TOKEN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(log, json!([]));
}

#[test]
fn generated_token_is_printed_once_and_required() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let mut child = common::ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_kvfs"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(tmp.path())
            .env_remove("KVFS_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut err_lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut before = Vec::new();
    let token = loop {
        let line = err_lines.next().unwrap().unwrap();
        if let Some(t) = line.split("API token for this run: ").nth(1) {
            break t.trim().to_string();
        }
        before.push(line);
    };
    let mut out = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let line = out.next().unwrap().unwrap();
    let base = line.trim_start_matches("listening on ").to_string();
    assert!(
        base.starts_with("http://127.0.0.1:") && base.ends_with("/client/v4"),
        "{line}"
    );
    let url = format!("{base}/accounts/{ACCOUNT}/storage/kv/namespaces");
    let c = Client::builder().no_proxy().build().unwrap();
    assert_eq!(
        c.get(&url).bearer_auth(&token).send().unwrap().status(),
        200
    );
    assert_eq!(c.get(&url).bearer_auth(TOKEN).send().unwrap().status(), 403);
    // Printed once: after a stop, no other line of stdout or stderr holds it.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let mut others: Vec<String> = err_lines.chain(out).map(Result::unwrap).collect();
    others.extend(before);
    others.push(line);
    let _ = child.0.wait();
    assert!(
        !others.iter().any(|l| l.contains(&token)),
        "token printed again: {others:?}"
    );
}

#[test]
fn garbage_never_panics_the_server() {
    let api = Api::start(&[]);
    let ns = api.create_ns("garbage");
    for (m, path, body) in every_route(&ns) {
        for junk in [
            "",
            "null",
            "[]",
            "{}",
            "[1,2]",
            "{\"keys\":5}",
            "\u{0}\u{ff}",
            "[{\"key\":1}]",
        ] {
            let r = api
                .req(m.clone(), &path)
                .header("content-type", "multipart/form-data; boundary=zz")
                .body(junk)
                .send()
                .unwrap();
            assert!(r.status().as_u16() < 500, "{m} {path} {junk:?} {body}");
            let r = api.req(m.clone(), &path).body(junk).send().unwrap();
            assert!(r.status().as_u16() < 500, "{m} {path} {junk:?}");
        }
    }
    // Still alive and answering.
    assert_eq!(send(api.req(Method::GET, "")).0, 200);
}

#[test]
fn api_response_can_be_read_with_the_shared_types() {
    // The client decodes with src/api types; make sure the server's JSON fits them.
    let api = Api::start(&[]);
    let ns = api.create_ns("types");
    api.put(&ns, "k", "v");
    let r: Response = api.req(Method::GET, &format!("/{ns}/keys")).send().unwrap();
    let env: kvfs::api::Envelope<Vec<kvfs::api::KeyInfo>> = r.json().unwrap();
    assert!(env.success);
    assert_eq!(env.result.unwrap()[0].name, "k");
    let info: kvfs::api::CursorInfo = serde_json::from_value(env.result_info.unwrap()).unwrap();
    assert_eq!(info.cursor, "");
}

#[test]
fn account_namespace_and_bulk_get_size_limits() {
    let api = Api::start(&[]);
    for i in 0..1000 {
        let (status, body) = send(
            api.req(Method::POST, "")
                .json(&json!({ "title": format!("n{i}") })),
        );
        assert_eq!(status, 200, "{i}: {body}");
    }
    assert_eq!(
        send(
            api.req(Method::POST, "")
                .json(&json!({"title": "one too many"}))
        ),
        (
            400,
            err(
                10029,
                "this account already has the maximum of 1000 namespaces"
            )
        )
    );
    // The limit is per account.
    let other = api
        .c
        .post(format!(
            "{}/accounts/other/storage/kv/namespaces",
            api.s.base_url()
        ))
        .bearer_auth(TOKEN)
        .json(&json!({"title": "n0"}));
    assert_eq!(send(other).0, 200);

    let (_, body) = send(api.req(Method::GET, "?per_page=1"));
    let ns = serde_json::from_str::<Value>(&body).unwrap()["result"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let half = vec![b'x'; 13 * 1024 * 1024];
    for k in ["a", "b"] {
        assert_eq!(
            send(
                api.req(Method::PUT, &format!("/{ns}/values/{k}"))
                    .body(half.clone())
            )
            .0,
            200
        );
    }
    assert_eq!(
        send(
            api.req(Method::POST, &format!("/{ns}/bulk/get"))
                .json(&json!({"keys": ["a"]}))
        )
        .0,
        200
    );
    assert_eq!(
        send(
            api.req(Method::POST, &format!("/{ns}/bulk/get"))
                .json(&json!({"keys": ["a", "b"]}))
        ),
        (
            413,
            err(
                10031,
                "Total value length of 27262976 exceeds limit of 26214400."
            )
        )
    );
}

#[test]
fn concurrent_clients_see_their_writes() {
    let api = std::sync::Arc::new(Api::start(&[]));
    let ns = api.create_ns("concurrent");
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (api, ns) = (api.clone(), ns.clone());
            std::thread::spawn(move || {
                for i in 0..50 {
                    let key = format!("t{t}/k{i}");
                    let value = format!("{t}-{i}");
                    api.put(&ns, &key.replace('/', "%2F"), &value);
                    let got = send(api.req(
                        Method::GET,
                        &format!("/{ns}/values/{}", key.replace('/', "%2F")),
                    ));
                    assert_eq!(got, (200, value));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let listed = api.list_keys(&ns, "");
    assert_eq!(listed["result_info"]["count"], json!(400));
    assert_eq!(api.stats()["put_value"], json!(400));
    assert_eq!(api.stats()["get_value"], json!(400));
}
