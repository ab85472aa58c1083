//! `kvfs serve` under hostile input, load and shutdown: guarded test aids, early rejections a
//! still-uploading client can read, the envelope on protocol errors, the header, body and idle
//! timeouts, the bounded graceful shutdown, and the concurrency and body-memory bounds. Raw TCP
//! throughout, so that nothing in a client library hides what the server does on the wire.

mod common;

use common::{ServerProc, TOKEN};
use kvfs::server::{start, ServerConfig};
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const NS_PATH: &str = "/client/v4/accounts/0123456789abcdef0123456789abcdef/storage/kv/namespaces";

/// An answer read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {self:?} {}", self.text()))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The one error code of an envelope (which must be one).
    fn code(&self) -> u64 {
        let v = self.json();
        assert_eq!(v["success"], json!(false), "{v}");
        v["errors"][0]["code"].as_u64().unwrap()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

fn connect(s: &ServerProc) -> TcpStream {
    let c = TcpStream::connect(s.origin.trim_start_matches("http://")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// Reads one answer (with a Content-Length body) from `c`.
fn read_answer(c: &mut TcpStream) -> Answer {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match c.read(&mut byte) {
            Ok(0) => panic!(
                "connection closed after {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(_) => buf.push(byte[0]),
            Err(e) => panic!(
                "read failed ({e}) after {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let head = String::from_utf8(buf).unwrap();
    let status = head[9..12].parse().unwrap();
    let mut a = Answer {
        status,
        head,
        body: Vec::new(),
    };
    let len: usize = a.header("content-length").unwrap().parse().unwrap();
    a.body = vec![0; len];
    c.read_exact(&mut a.body).unwrap();
    a
}

/// Sends a whole request (head and body) and reads the answer.
fn exchange(c: &mut TcpStream, head: &str, body: &[u8]) -> Answer {
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    read_answer(c)
}

fn request(method: &str, path: &str, token: &str, extra: &str, len: usize) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: kvfs\r\nAuthorization: Bearer {token}\r\n{extra}Content-Length: {len}\r\n\r\n"
    )
}

/// True once the server has closed `c` (EOF or reset) within `within`; bytes it sends before
/// (an HTTP/2 GOAWAY) are skipped.
fn closed_within(c: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut b = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        c.set_read_timeout(Some(left)).unwrap();
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn create_ns(s: &ServerProc, title: &str) -> String {
    let mut c = connect(s);
    let body = json!({ "title": title }).to_string();
    let a = exchange(
        &mut c,
        &request("POST", NS_PATH, TOKEN, "", body.len()),
        body.as_bytes(),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()["result"]["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn the_embedded_store_has_no_test_aids() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        token: TOKEN.into(),
        latency: None,
        fail_rate: 0.0,
        seed: 0,
    })
    .await
    .unwrap();
    let c = reqwest::Client::new();
    for (method, path) in [
        (reqwest::Method::GET, "stats"),
        (reqwest::Method::POST, "stats/reset"),
        (reqwest::Method::GET, "clock"),
        (reqwest::Method::POST, "clock"),
    ] {
        let r = c
            .request(method, format!("http://{}/__kvfs/{path}", server.addr))
            .bearer_auth(TOKEN)
            .json(&json!({"advance": 86400}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], json!(7003), "{path}: {v}");
    }
    server.shutdown().await;
}

#[test]
fn test_aids_need_the_token_and_keep_the_clock_sane() {
    let s = ServerProc::start(&[]);
    let mut c = connect(&s);
    // No token, a wrong one, and a page's simple (no preflight) text/plain POST: all refused,
    // and the clock did not move.
    for (method, path, token) in [
        ("GET", "/__kvfs/stats", ""),
        ("POST", "/__kvfs/stats/reset", "wrong"),
        ("DELETE", "/__kvfs/stats", ""),
        ("GET", "/__kvfs/clock", "wrong"),
    ] {
        let a = exchange(&mut c, &request(method, path, token, "", 0), b"");
        assert_eq!((a.status, a.code()), (403, 10000), "{method} {path}");
    }
    let advance = br#"{"advance": 86400}"#;
    let a = exchange(
        &mut c,
        &format!(
            "POST /__kvfs/clock HTTP/1.1\r\nHost: kvfs\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            advance.len()
        ),
        advance,
    );
    assert_eq!((a.status, a.code()), (403, 10000));
    let clock = |c: &mut TcpStream| {
        let a = exchange(c, &request("GET", "/__kvfs/clock", TOKEN, "", 0), b"");
        assert_eq!(a.status, 200);
        a.json()
    };
    assert_eq!(clock(&mut c)["offset"], json!(0));

    // Absurd offsets are refused and change nothing; `i64::MAX` no longer wraps the clock.
    for body in [
        json!({"advance": i64::MAX}),
        json!({"offset": i64::MIN}),
        json!({"offset": 10 * 366 * 86400 + 1}),
        json!({"advance": "soon"}),
    ] {
        let body = body.to_string();
        let a = exchange(
            &mut c,
            &request("POST", "/__kvfs/clock", TOKEN, "", body.len()),
            body.as_bytes(),
        );
        assert_eq!((a.status, a.code()), (400, 10012), "{body}: {}", a.text());
    }
    assert_eq!(clock(&mut c)["offset"], json!(0));
    let body = json!({"advance": 86400}).to_string();
    let a = exchange(
        &mut c,
        &request("POST", "/__kvfs/clock", TOKEN, "", body.len()),
        body.as_bytes(),
    );
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["offset"], json!(86400));
    // The body of a clock request is a few bytes: a large one is not read into memory.
    let big = vec![b' '; 100_000];
    let a = exchange(
        &mut c,
        &request("POST", "/__kvfs/clock", TOKEN, "", big.len()),
        &big,
    );
    assert_eq!(a.status, 413);
    assert_eq!(clock(&mut c)["offset"], json!(86400));
    let a = exchange(&mut c, &request("GET", "/__kvfs/stats", TOKEN, "", 0), b"");
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["total"], json!(0));
}

/// Each early rejection with an 8 MiB body the client sends in full before reading: it gets
/// the envelope, and the connection stays usable.
#[test]
fn early_rejections_reach_a_client_still_uploading() {
    let s = ServerProc::start(&[]);
    let ns = create_ns(&s, "early");
    let body = vec![b'v'; 8 << 20];
    let long_key = "k".repeat(513);
    let cases: Vec<(&str, String, &str, &str, u16, u64)> = vec![
        (
            "PUT",
            format!("{NS_PATH}/{ns}/values/k"),
            "wrong",
            "",
            403,
            10000,
        ),
        (
            "PUT",
            format!("{NS_PATH}/nothex/values/k"),
            TOKEN,
            "",
            400,
            10011,
        ),
        (
            "PUT",
            format!("{NS_PATH}/{ns}/values/{long_key}"),
            TOKEN,
            "",
            414,
            10021,
        ),
        (
            "PUT",
            format!("{NS_PATH}/{ns}/values/k?expiration_ttl=30"),
            TOKEN,
            "",
            400,
            10024,
        ),
        (
            "PUT",
            format!("{NS_PATH}/{ns}/nothing"),
            TOKEN,
            "",
            404,
            7003,
        ),
        (
            "POST",
            format!("{NS_PATH}/{ns}/values/k"),
            TOKEN,
            "",
            405,
            7001,
        ),
        (
            "PUT",
            format!("{NS_PATH}/{ns}/values/k"),
            TOKEN,
            "Content-Type: multipart/form-data; boundary=x\r\n",
            400,
            10012,
        ),
    ];
    for (method, path, token, extra, status, code) in cases {
        let mut c = connect(&s);
        let t = Instant::now();
        let a = exchange(
            &mut c,
            &request(method, &path, token, extra, body.len()),
            &body,
        );
        assert_eq!(
            (a.status, a.code()),
            (status, code),
            "{method} {path}: {}",
            a.text()
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        // Same connection, next request.
        let a = exchange(&mut c, &request("GET", NS_PATH, TOKEN, "", 0), b"");
        assert_eq!(
            a.status, 200,
            "{method} {path}: connection unusable afterwards"
        );
    }
    // Nothing was written by any of them.
    let mut c = connect(&s);
    let a = exchange(
        &mut c,
        &request("GET", &format!("{NS_PATH}/{ns}/keys"), TOKEN, "", 0),
        b"",
    );
    assert_eq!(a.json()["result"], json!([]));
}

/// A client that waits for `100 Continue` has sent no body: it is answered at once, without
/// a drain, and the connection is closed (the body it holds back is never read).
#[test]
fn early_rejection_of_a_client_expecting_100_continue() {
    let s = ServerProc::start(&[]);
    let mut c = connect(&s);
    let path = format!("{NS_PATH}/{}/values/k", "f".repeat(32));
    c.write_all(request("PUT", &path, "wrong", "Expect: 100-continue\r\n", 8 << 20).as_bytes())
        .unwrap();
    let a = read_answer(&mut c);
    assert_eq!((a.status, a.code()), (403, 10000), "{}", a.text());
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    assert!(closed_within(&mut c, Duration::from_secs(2)));
}

#[test]
fn protocol_errors_get_the_envelope() {
    let s = ServerProc::start(&[]);
    let huge_header = format!("X-Big: {}\r\n", "a".repeat(1 << 20));
    let long_uri = format!("{NS_PATH}/{}", "a".repeat(64 << 10));
    for (raw, status) in [
        (request("GET", NS_PATH, TOKEN, &huge_header, 0), 431),
        (request("GET", &long_uri, TOKEN, "", 0), 414),
        ("GARBAGE\r\n\r\n".to_string(), 400),
        (
            format!("GET {NS_PATH} HTTP/1.1\r\nHost: kvfs\r\nNo colon here\r\n\r\n"),
            400,
        ),
    ] {
        let mut c = connect(&s);
        // The server may stop reading before the whole head is in: a write error is fine,
        // the answer must still be readable.
        let _ = c.write_all(raw.as_bytes());
        let a = read_answer(&mut c);
        assert_eq!((a.status, a.code()), (status, 6003), "{}", a.text());
        assert_eq!(
            a.header("content-type").as_deref(),
            Some("application/json")
        );
    }
}

#[test]
fn a_slow_request_head_is_cut_off_by_the_header_timeout() {
    let s = ServerProc::start(&["--header-timeout", "400ms", "--idle-timeout", "30s"]);
    let mut c = connect(&s);
    c.set_nonblocking(false).unwrap();
    let t = Instant::now();
    // One byte every 100 ms, as a slow-loris client sends: the head never completes.
    let head = request("GET", NS_PATH, TOKEN, "", 0);
    let mut cut = None;
    for b in head.as_bytes() {
        if c.write_all(&[*b]).is_err() {
            cut = Some(t.elapsed());
            break;
        }
        if closed_within(&mut c, Duration::from_millis(100)) {
            cut = Some(t.elapsed());
            break;
        }
    }
    let cut = cut.expect("the whole head went through: no header timeout");
    assert!(
        cut >= Duration::from_millis(400) && cut < Duration::from_millis(1500),
        "{cut:?}"
    );
    // A head sent in time is served, on a connection that was idle for longer than the
    // header timeout (the idle timeout applies while no byte has arrived).
    let mut c = connect(&s);
    std::thread::sleep(Duration::from_millis(700));
    let a = exchange(&mut c, &request("GET", NS_PATH, TOKEN, "", 0), b"");
    assert_eq!(a.status, 200);
}

#[test]
fn idle_connections_are_closed_by_the_idle_timeout() {
    let s = ServerProc::start(&["--idle-timeout", "500ms"]);
    // Never used.
    let mut fresh = connect(&s);
    // HTTP/2 (prior knowledge): the preface and an empty SETTINGS frame, then nothing.
    let mut h2 = connect(&s);
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    // Used once, then kept alive.
    let mut used = connect(&s);
    let a = exchange(&mut used, &request("GET", NS_PATH, TOKEN, "", 0), b"");
    assert_eq!(a.status, 200);
    let t = Instant::now();
    assert!(!closed_within(&mut used, Duration::from_millis(300)));
    assert!(closed_within(&mut used, Duration::from_secs(2)));
    assert!(closed_within(&mut fresh, Duration::from_secs(1)));
    assert!(closed_within(&mut h2, Duration::from_secs(1)));
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(450) && e < Duration::from_secs(2),
        "{e:?}"
    );
    // A request slower than the idle timeout is not cut: busy connections are not idle.
    let s = ServerProc::start(&["--idle-timeout", "300ms", "--latency", "800ms"]);
    let mut c = connect(&s);
    let a = exchange(&mut c, &request("GET", NS_PATH, TOKEN, "", 0), b"");
    assert_eq!(a.status, 200);
}

#[test]
fn a_stalled_body_gets_408_after_the_body_timeout() {
    let s = ServerProc::start(&["--body-timeout", "400ms"]);
    let ns = create_ns(&s, "stall");
    let mut c = connect(&s);
    let path = format!("{NS_PATH}/{ns}/values/k");
    c.write_all(request("PUT", &path, TOKEN, "", 100).as_bytes())
        .unwrap();
    let t = Instant::now();
    // Bytes keep the body alive as long as each arrives in time.
    for _ in 0..6 {
        c.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let a = read_answer(&mut c);
    let e = t.elapsed();
    assert_eq!((a.status, a.code()), (408, 6004), "{}", a.text());
    assert!(
        e >= Duration::from_millis(1000) && e < Duration::from_secs(3),
        "{e:?}"
    );
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    // Nothing was written.
    let mut c = connect(&s);
    let a = exchange(&mut c, &request("GET", &path, TOKEN, "", 0), b"");
    assert_eq!(a.status, 404);
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_within_the_grace_period() {
    let mut s = ServerProc::start(&["--shutdown-grace", "800ms", "--latency", "300ms"]);
    let ns = create_ns(&s, "bye");
    // Held open in every state that used to keep the server alive.
    let mut partial_line = connect(&s);
    partial_line.write_all(b"GET /client/v4/acc").unwrap();
    let mut partial_head = connect(&s);
    partial_head
        .write_all(format!("GET {NS_PATH} HTTP/1.1\r\nHost: kv").as_bytes())
        .unwrap();
    let mut partial_body = connect(&s);
    partial_body
        .write_all(request("PUT", &format!("{NS_PATH}/{ns}/values/k"), TOKEN, "", 10).as_bytes())
        .unwrap();
    partial_body.write_all(b"abc").unwrap();
    let mut idle_h1 = connect(&s);
    let a = exchange(&mut idle_h1, &request("GET", NS_PATH, TOKEN, "", 0), b"");
    assert_eq!(a.status, 200);
    let mut idle_h2 = connect(&s);
    // The HTTP/2 preface and an empty SETTINGS frame: an idle HTTP/2 connection.
    idle_h2
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    // An in-flight request that finishes within the grace period gets its answer.
    let mut in_flight = connect(&s);
    in_flight
        .write_all(request("GET", NS_PATH, TOKEN, "", 0).as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let a = read_answer(&mut in_flight);
    assert_eq!(a.status, 200);
    // Connections with no request on its way are closed at once.
    assert!(closed_within(&mut idle_h1, Duration::from_millis(300)));
    assert!(closed_within(&mut idle_h2, Duration::from_millis(300)));
    assert!(closed_within(&mut in_flight, Duration::from_millis(300)));
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let e = t.elapsed();
    assert!(status.success(), "{status}");
    // It waited for the partial body (a request in flight) until the grace period ran out.
    assert!(e >= Duration::from_millis(700), "{e:?}");
    for c in [&mut partial_line, &mut partial_head, &mut partial_body] {
        assert!(closed_within(c, Duration::from_millis(500)));
    }
}

#[test]
fn requests_beyond_the_concurrency_bound_wait_then_get_429() {
    let s = ServerProc::start(&["--max-requests", "1", "--queue-wait", "300ms"]);
    let ns = create_ns(&s, "busy");
    let path = format!("{NS_PATH}/{ns}/values/k");
    // Holds the only slot: its body is still on its way.
    let mut holder = connect(&s);
    holder
        .write_all(request("PUT", &path, TOKEN, "", 10).as_bytes())
        .unwrap();
    holder.write_all(b"01234").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut other = connect(&s);
    let t = Instant::now();
    let a = exchange(&mut other, &request("GET", NS_PATH, TOKEN, "", 0), b"");
    let e = t.elapsed();
    assert_eq!((a.status, a.code()), (429, 971), "{}", a.text());
    assert_eq!(a.header("retry-after").as_deref(), Some("1"));
    assert!(e >= Duration::from_millis(250), "did not wait: {e:?}");
    // A request that finds the slot free within the wait is served.
    let waiter = std::thread::spawn({
        let mut c = connect(&s);
        move || exchange(&mut c, &request("GET", NS_PATH, TOKEN, "", 0), b"").status
    });
    std::thread::sleep(Duration::from_millis(100));
    holder.write_all(b"56789").unwrap();
    assert_eq!(read_answer(&mut holder).status, 200);
    assert_eq!(waiter.join().unwrap(), 200);
}

#[test]
fn bodies_beyond_the_memory_bound_wait_then_get_429() {
    let s = ServerProc::start(&["--max-body-memory", "64K", "--queue-wait", "300ms"]);
    let ns = create_ns(&s, "memory");
    let path = |k: &str| format!("{NS_PATH}/{ns}/values/{k}");
    // 40,000 bytes count as 80,000: the whole 64 KiB budget (a body larger than the budget
    // still runs, alone).
    let mut big = connect(&s);
    big.write_all(request("PUT", &path("big"), TOKEN, "", 40_000).as_bytes())
        .unwrap();
    big.write_all(&[b'b'; 20_000]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // A small declared body waits for memory, then gets 429.
    let mut small = connect(&s);
    let a = exchange(
        &mut small,
        &request("PUT", &path("small"), TOKEN, "", 100),
        &[b's'; 100],
    );
    assert_eq!((a.status, a.code()), (429, 971), "{}", a.text());
    assert_eq!(a.header("retry-after").as_deref(), Some("1"));
    // A chunked body (size unknown) grows its share as it arrives: none is left.
    let mut chunked = connect(&s);
    chunked
        .write_all(
            format!(
                "PUT {} HTTP/1.1\r\nHost: kvfs\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n",
                path("chunked")
            )
            .as_bytes(),
        )
        .unwrap();
    let a = read_answer(&mut chunked);
    assert_eq!((a.status, a.code()), (429, 971), "{}", a.text());
    // Requests without a body are not held back by the memory bound.
    let a = exchange(&mut small, &request("GET", NS_PATH, TOKEN, "", 0), b"");
    assert_eq!(a.status, 200);
    big.write_all(&[b'b'; 20_000]).unwrap();
    assert_eq!(read_answer(&mut big).status, 200);
    // The memory is released with the request.
    let a = exchange(
        &mut small,
        &request("PUT", &path("small"), TOKEN, "", 100),
        &[b's'; 100],
    );
    assert_eq!(a.status, 200, "{}", a.text());
}

#[test]
fn expiration_bounds_are_the_same_for_single_and_bulk_writes() {
    let s = ServerProc::start(&[]);
    let ns = create_ns(&s, "exp");
    let mut c = connect(&s);
    let max = 9_000_000_000_000_000i64;
    let clock = exchange(&mut c, &request("GET", "/__kvfs/clock", TOKEN, "", 0), b"");
    let now = clock.json()["now"].as_i64().unwrap();
    // (field, value, accepted?, code when refused)
    let cases = [
        ("expiration_ttl", json!(i64::MAX), false, 10024),
        ("expiration_ttl", json!(max + 1), false, 10024),
        ("expiration_ttl", json!(1e300), false, 10024),
        ("expiration", json!(-1e300), false, 10025),
        ("expiration_ttl", json!(max), true, 0),
        ("expiration", json!(i64::MAX), false, 10025),
        ("expiration", json!(max + 1), false, 10025),
        ("expiration", json!(max), true, 0),
        ("expiration", json!(now + 3600), true, 0),
    ];
    for (field, value, accepted, code) in cases {
        let single = exchange(
            &mut c,
            &request(
                "PUT",
                // `1e+300`: a `+` in a query is a space.
                &format!(
                    "{NS_PATH}/{ns}/values/k?{field}={}",
                    value.to_string().replace('+', "%2B")
                ),
                TOKEN,
                "",
                1,
            ),
            b"v",
        );
        let pairs = json!([{ "key": "k", "value": "v", field: value }]).to_string();
        let bulk = exchange(
            &mut c,
            &request(
                "PUT",
                &format!("{NS_PATH}/{ns}/bulk"),
                TOKEN,
                "",
                pairs.len(),
            ),
            pairs.as_bytes(),
        );
        for (route, a) in [("single", &single), ("bulk", &bulk)] {
            if accepted {
                assert_eq!(a.status, 200, "{route} {field}={value}: {}", a.text());
            } else {
                assert_eq!(
                    (a.status, a.code()),
                    (400, code),
                    "{route} {field}={value}: {}",
                    a.text()
                );
            }
        }
    }
    // What is echoed back is exact for JavaScript (below 2^53).
    let keys = exchange(
        &mut c,
        &request("GET", &format!("{NS_PATH}/{ns}/keys"), TOKEN, "", 0),
        b"",
    );
    let exp = keys.json()["result"][0]["expiration"].as_i64().unwrap();
    assert_eq!(exp, now + 3600);
}
