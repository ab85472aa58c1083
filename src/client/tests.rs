//! Unit tests of what needs no server: configuration, errors, bulk helpers.

use super::http::api_error;
use super::*;
use reqwest::StatusCode;
use serde_json::json;

fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        pairs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    }
}

#[test]
fn config_defaults() {
    let c = ClientConfig::new(
        "https://api.cloudflare.com/client/v4/",
        "acc",
        Auth::Token("t".into()),
    );
    assert_eq!(c.base_url, "https://api.cloudflare.com/client/v4");
    assert_eq!(c.rate_limit, Some((1200, Duration::from_secs(300))));
    assert_eq!(c.max_concurrent, 16);
    assert_eq!(c.max_retries, 8);
    assert_eq!(c.base_backoff, Duration::from_millis(100));
    let local = ClientConfig::new(
        "http://127.0.0.1:8787/client/v4",
        "acc",
        Auth::Token("t".into()),
    );
    assert_eq!(local.rate_limit, None);
    let lookalike = ClientConfig::new(
        "https://api.cloudflare.com.evil.test/client/v4",
        "a",
        Auth::Token("t".into()),
    );
    assert_eq!(lookalike.rate_limit, None);
}

#[test]
fn config_from_env() {
    assert!(ClientConfig::from_lookup(None, vars(&[])).is_none());
    assert!(ClientConfig::from_lookup(None, vars(&[("CLOUDFLARE_API_TOKEN", "t")])).is_none());
    assert!(ClientConfig::from_lookup(None, vars(&[("CLOUDFLARE_ACCOUNT_ID", "a")])).is_none());
    let key_only = [("CLOUDFLARE_ACCOUNT_ID", "a"), ("CLOUDFLARE_API_KEY", "k")];
    assert!(ClientConfig::from_lookup(None, vars(&key_only)).is_none());

    let c = ClientConfig::from_lookup(
        None,
        vars(&[
            ("CLOUDFLARE_ACCOUNT_ID", "a"),
            ("CLOUDFLARE_API_TOKEN", "secret-tok"),
        ]),
    )
    .unwrap();
    assert_eq!(c.base_url, CLOUDFLARE_API);
    assert_eq!(c.account_id, "a");
    assert!(matches!(&c.auth, Auth::Token(t) if t == "secret-tok"));
    assert!(!format!("{c:?}").contains("secret-tok"));

    let env = [
        ("CLOUDFLARE_ACCOUNT_ID", "a"),
        ("CLOUDFLARE_API_KEY", "secret-key"),
        ("CLOUDFLARE_EMAIL", "me@example.com"),
        ("CLOUDFLARE_API_BASE_URL", "http://127.0.0.1:1/client/v4"),
    ];
    let c = ClientConfig::from_lookup(None, vars(&env)).unwrap();
    assert_eq!(c.base_url, "http://127.0.0.1:1/client/v4");
    assert!(
        matches!(&c.auth, Auth::Key { email, key } if email == "me@example.com" && key == "secret-key")
    );
    assert!(!format!("{c:?}").contains("secret-key"));
    let c = ClientConfig::from_lookup(Some("http://x/client/v4".into()), vars(&env)).unwrap();
    assert_eq!(c.base_url, "http://x/client/v4");
}

#[test]
fn error_display() {
    let e = Error {
        op: "get_value",
        key: Some("a/b".into()),
        kind: ErrorKind::Api {
            status: 404,
            code: Some(10009),
            message: "get: 'key not found'".into(),
        },
    };
    assert_eq!(
        e.to_string(),
        r#"get_value "a/b": HTTP 404 (code 10009): get: 'key not found'"#
    );
    assert!(e.is_not_found());
    assert_eq!((e.status(), e.code()), (Some(404), Some(10009)));

    let e = Error {
        op: "list_namespaces",
        key: None,
        kind: ErrorKind::Api {
            status: 413,
            code: None,
            message: "Payload Too Large".into(),
        },
    };
    assert_eq!(
        e.to_string(),
        "list_namespaces: HTTP 413: Payload Too Large"
    );
    assert!(!e.is_not_found());

    let e = Error {
        op: "put_value",
        key: Some("x\ny".into()),
        kind: ErrorKind::Transport("connection refused".into()),
    };
    assert_eq!(e.to_string(), r#"put_value "x\ny": connection refused"#);
    assert_eq!((e.status(), e.code()), (None, None));

    let e = Error {
        op: "bulk_get",
        key: None,
        kind: ErrorKind::Decode("no `result`".into()),
    };
    assert_eq!(e.to_string(), "bulk_get: unexpected response: no `result`");
}

#[test]
fn error_from_response() {
    let body = br#"{"result":null,"errors":[{"code":10009,"message":"get: 'key not found'"}],"messages":[],"success":false}"#;
    match api_error(StatusCode::NOT_FOUND, body) {
        ErrorKind::Api {
            status,
            code,
            message,
        } => {
            assert_eq!(
                (status, code, message.as_str()),
                (404, Some(10009), "get: 'key not found'")
            )
        }
        other => panic!("{other:?}"),
    }
    let two = br#"{"success":false,"errors":[{"code":1,"message":"a"},{"code":2,"message":"b"}]}"#;
    assert!(
        matches!(api_error(StatusCode::BAD_REQUEST, two), ErrorKind::Api { code: Some(1), message, .. } if message == "a; b")
    );
    for (body, want) in [
        (&b""[..], "Payload Too Large"),
        (
            b"<html><body>413 Request Entity Too Large</body></html>",
            "Payload Too Large",
        ),
        (b"request body too large\n", "request body too large"),
        (b"{\"weird\": true}", "Payload Too Large"),
        (b"\xff\xfe", "\u{fffd}\u{fffd}"),
    ] {
        match api_error(StatusCode::PAYLOAD_TOO_LARGE, body) {
            ErrorKind::Api {
                status: 413,
                code: None,
                message,
            } => assert_eq!(message, want),
            other => panic!("{other:?}"),
        }
    }
    let long = "x".repeat(10_000);
    match api_error(StatusCode::BAD_GATEWAY, long.as_bytes()) {
        ErrorKind::Api { message, .. } => assert!(message.chars().count() <= 201),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unsafe_path_segments_refused() {
    for key in ["", ".", ".."] {
        let e = check_segment("delete_value", key).unwrap_err();
        assert_eq!(e.status(), Some(400));
        assert_eq!(e.key.as_deref(), Some(key));
    }
    for key in ["...", "a/..", "./a", "%2E%2E"] {
        assert!(check_segment("delete_value", key).is_ok());
    }
}

#[test]
fn bulk_values() {
    assert!(bulk_value(Json::Null).is_none());
    let v =
        bulk_value(json!({"value": "hi", "metadata": {"a": 1}, "expiration": 1900000000})).unwrap();
    assert_eq!(
        (v.value.as_str(), v.metadata, v.expiration),
        ("hi", Some(json!({"a": 1})), Some(1900000000))
    );
    let v = bulk_value(json!({"value": {"x": [1, 2]}, "metadata": null})).unwrap();
    assert_eq!(
        (v.value.as_str(), v.metadata, v.expiration),
        (r#"{"x":[1,2]}"#, None, None)
    );
    let v = bulk_value(json!("bare")).unwrap();
    assert_eq!(v.value, "bare");
    assert_eq!(bulk_value(json!(42)).unwrap().value, "42");
}

#[test]
fn bulk_chunking() {
    let none: [u8; 0] = [];
    assert!(bulk_chunks(&none, |_| 0).is_empty());
    let items = vec![0u8; 25_001];
    let lens: Vec<_> = bulk_chunks(&items, |_| 1).iter().map(|c| c.len()).collect();
    assert_eq!(lens, [10_000, 10_000, 5_001]);
    // Three 40 MB values cannot share a 100 MB body.
    let big = vec![40_000_000usize; 3];
    let lens: Vec<_> = bulk_chunks(&big, |s| *s).iter().map(|c| c.len()).collect();
    assert_eq!(lens, [2, 1]);
    // One item over the budget still goes (alone), for the server to judge.
    let huge = vec![200_000_000usize, 1];
    let lens: Vec<_> = bulk_chunks(&huge, |s| *s).iter().map(|c| c.len()).collect();
    assert_eq!(lens, [1, 1]);
}

#[test]
fn urls() {
    let c = Client::new(ClientConfig::new(
        "http://h/client/v4/",
        "acc",
        Auth::Token("t".into()),
    ))
    .unwrap();
    assert_eq!(c.base_url(), "http://h/client/v4");
    assert_eq!(c.account_id(), "acc");
    let url = c
        .inner
        .key_url_query(
            "put_value",
            "ns1",
            "/values/",
            "a/b c",
            &[("expiration_ttl", "60".into())],
        )
        .unwrap();
    assert_eq!(url, "http://h/client/v4/accounts/acc/storage/kv/namespaces/ns1/values/a%2Fb%20c?expiration_ttl=60");
    assert!(c.inner.key_url("get_value", "..", "/values/", "k").is_err());
    let shown = format!("{c:?}");
    assert!(
        shown.contains("http://h/client/v4") && !shown.contains("\"t\""),
        "{shown}"
    );
}

#[test]
fn bad_credentials_are_an_error_without_the_secret() {
    let Err(e) = Client::new(ClientConfig::new(
        "http://h",
        "a",
        Auth::Token("bad\nsecret".into()),
    )) else {
        panic!("accepted a token with a newline");
    };
    assert!(!e.to_string().contains("secret"));
    assert!(!format!("{e:?}").contains("secret"));
}
