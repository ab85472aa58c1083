//! `kvfs serve` lifecycle: embedded in an existing tokio runtime (as the mount does), and
//! graceful shutdown finishing in-flight requests.

mod common;

use common::{ServerProc, TOKEN};
use kvfs::server::{start, ServerConfig};
use std::time::{Duration, Instant};

fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        token: "inproc".into(),
        latency: None,
        fail_rate: 0.0,
        seed: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_start_and_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(config(tmp.path())).await.unwrap();
    let base = server.base_url();
    assert_eq!(base, format!("http://{}/client/v4", server.addr));
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("{base}/accounts/acc/storage/kv/namespaces");
    let r = c
        .post(&url)
        .bearer_auth("inproc")
        .json(&serde_json::json!({"title": "embedded"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let addr = server.addr;
    server.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );

    // Same directory, new server: the namespace is there.
    let server = start(config(tmp.path())).await.unwrap();
    let url = format!("{}/accounts/acc/storage/kv/namespaces", server.base_url());
    let v: serde_json::Value = c
        .get(&url)
        .bearer_auth("inproc")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["result"][0]["title"], "embedded");
    server.shutdown().await;
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let mut s = ServerProc::start(&["--latency", "2s"]);
    let url = s.ns_url();
    let pending = std::thread::spawn(move || {
        let c = reqwest::blocking::Client::builder()
            .no_proxy()
            .build()
            .unwrap();
        let r = c.get(url).bearer_auth(TOKEN).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    });
    // Stop once the request is in flight (counted, then held by the latency).
    let stats = format!("{}/__kvfs/stats", s.origin);
    common::wait_until("the request in flight", Duration::from_secs(30), || {
        let v: serde_json::Value = reqwest::blocking::Client::new()
            .get(&stats)
            .bearer_auth(TOKEN)
            .send()
            .unwrap()
            .json()
            .unwrap();
        v["list_namespaces"] == 1
    });
    assert!(!pending.is_finished());
    let t = Instant::now();
    s.stop();
    let (status, body) = pending.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(s.child.try_wait().unwrap().unwrap().success());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t.elapsed()
    );
}
