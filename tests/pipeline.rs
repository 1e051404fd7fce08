//! The request pipeline end to end: bounded request bodies forwarded byte-exact, connections
//! kept after answers a stage substitutes, and cache rules judged by the live config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{client, Backend, Conn, Proxy};

fn config(app: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}", timeout: 5s }}
routes:
  - name: upload
    match: {{ path_prefix: /echo/upload }}
    upstream: app
    buffer_request: true
    max_body: 2MiB
  - name: etag
    match: {{ path_prefix: /etag }}
    upstream: app
    cache: {{ ttl: 1s }}
  - name: flaky
    match: {{ path_prefix: /status }}
    upstream: app
    cache: {{ ttl: 1s, stale_if_error: 1h }}
  - name: items
    match: {{ path_prefix: /echo/items }}
    upstream: app
    cache: {{ ttl: 1s }}
  - name: rest
    match: {{ path_prefix: / }}
    upstream: app
"#
    )
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test]
async fn buffered_bodies_reach_the_upstream_byte_exact_up_to_max_body() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let c = client();
    // Around Pingora's 64 KiB replay buffer, and well past it.
    for n in [0, 65_535, 65_537, 1 << 20] {
        let body = pattern(n);
        let resp = c
            .post(proxy.url("/echo/upload"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{n} bytes");
        let echo: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(echo["body_len"], n, "{n} bytes");
        assert_eq!(
            echo["body_blake3"],
            blake3::hash(&body).to_hex().to_string(),
            "{n} bytes"
        );
    }
    // A chunked body of 1 MiB in uneven pieces.
    let body = pattern(1 << 20);
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(10_007).map(|c| Ok(c.to_vec())).collect();
    let resp = c
        .post(proxy.url("/echo/upload"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["body_len"], 1 << 20);
    assert_eq!(
        echo["body_blake3"],
        blake3::hash(&body).to_hex().to_string()
    );
    // Held in full, it goes upstream with its length, not chunked.
    assert_eq!(
        echo["headers"]["content-length"],
        (1 << 20).to_string(),
        "{echo}"
    );
    assert!(echo["headers"].get("transfer-encoding").is_none(), "{echo}");
    let forwarded = app.hits("/echo/upload");
    assert_eq!(forwarded, 5);

    // Over max_body: 413 with a JSON error, declared length or chunked, and the app sees nothing.
    // A declared length over the limit is refused before any of the body is read (sent raw: a
    // client library still writing its body may see the close first).
    let port = proxy.port;
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"POST /echo/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 3145728\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"error\":\"payload_too_large\""),
        "{answer}"
    );
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = pattern(3 << 20)
        .chunks(65_536)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let chunked = c
        .post(proxy.url("/echo/upload"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await;
    // The proxy answers as soon as the limit is passed; the client may still be sending.
    if let Ok(resp) = chunked {
        assert_eq!(resp.status(), 413);
    }
    assert_eq!(app.hits("/echo/upload"), forwarded);
    // The proxy keeps serving.
    let ok = c.get(proxy.url("/echo/after")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn substituted_answers_keep_the_connection_and_entries_outlive_their_ttl_for_304s() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let port = proxy.port;
    let replies = tokio::task::spawn_blocking(move || {
        let mut conn = Conn::open(port);
        let first = conn.get("/etag/k");
        // The route has no stale window: the entry is expired, but kept (`keep`) so it can be
        // revalidated with a conditional request instead of fetched in full.
        std::thread::sleep(Duration::from_millis(1100));
        let revalidated = conn.get("/etag/k");
        let after = conn.get("/etag/k");
        let stored = conn.get("/status/200");
        assert_eq!(
            stored.status, 200,
            "a fourth request on the same connection"
        );
        (first, revalidated, after, stored)
    })
    .await
    .unwrap();
    let (first, revalidated, after, _) = replies;
    assert_eq!(first.header("x-cache-status"), Some("MISS"));
    assert_eq!(
        (revalidated.status, revalidated.header("x-cache-status")),
        (200, Some("REVALIDATED"))
    );
    assert_eq!(
        revalidated.body, first.body,
        "the stored body, renewed by a 304"
    );
    assert_ne!(revalidated.header("connection"), Some("close"));
    assert_eq!(
        after.header("x-cache-status"),
        Some("HIT"),
        "same connection"
    );
    assert_eq!(app.hits("/etag/k"), 2);

    // A stale entry standing in for a 5xx keeps the connection too.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.set_failing(true);
    let replies = tokio::task::spawn_blocking(move || {
        let mut conn = Conn::open(port);
        (conn.get("/status/200"), conn.get("/echo/other"))
    })
    .await
    .unwrap();
    assert_eq!(
        (replies.0.status, replies.0.header("x-cache-status")),
        (200, Some("STALE"))
    );
    assert_eq!(replies.1.status, 503, "answered on the same connection");
}

#[tokio::test]
async fn raising_a_ttl_by_reload_applies_to_stored_entries() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let get = |path: &'static str| {
        let c = client();
        let url = proxy.url(path);
        async move {
            let r = c.get(url).send().await.unwrap();
            r.headers()
                .get("x-cache-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        }
    };
    assert_eq!(get("/echo/items/t").await, "MISS");
    proxy.write_config(&config(&app.url()).replace(
        "path_prefix: /echo/items }\n    upstream: app\n    cache: { ttl: 1s }",
        "path_prefix: /echo/items }\n    upstream: app\n    cache: { ttl: 5m }",
    ));
    let resp = client().post(proxy.admin("/reload")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get("/echo/items/t").await,
        "HIT",
        "the entry stored under a 1 s TTL is fresh under the new 5 m one"
    );
    assert_eq!(app.hits("/echo/items/t"), 1);
}

#[tokio::test]
async fn a_stage_can_send_a_request_to_another_upstream() {
    let stable = Backend::start("stable").await;
    let canary = Backend::start("canary").await;
    let cfg = format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  stable: {{ url: "{}" }}
  canary: {{ url: "{}" }}
routes:
  - name: api
    match: {{ path_prefix: / }}
    upstream: stable
    upstream_by_header: {{ header: x-canary, upstreams: {{ "1": canary }} }}
    cache: {{ ttl: 5m, key: {{ headers: [x-canary] }} }}
"#,
        stable.url(),
        canary.url()
    );
    let proxy = Proxy::start(&cfg).await;
    let c = client();
    let backend_of = |resp: serde_json::Value| resp["backend"].as_str().unwrap_or("").to_string();
    let plain: serde_json::Value = c
        .get(proxy.url("/echo/a"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(backend_of(plain), "stable");
    let routed: serde_json::Value = c
        .get(proxy.url("/echo/a"))
        .header("x-canary", "1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(backend_of(routed), "canary", "not the stable entry");
    let other: serde_json::Value = c
        .get(proxy.url("/echo/a"))
        .header("x-canary", "0")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(backend_of(other), "stable");
    assert_eq!(canary.hits("/echo/a"), 1);
}

/// A client that sends `Expect: 100-continue` is told to go on (Pingora does not do it by
/// itself) and its body reaches the upstream without the expectation.
#[tokio::test]
async fn expect_continue_uploads_are_not_stalled() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let port = proxy.port;
    let (interim, reply) = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, BufReader, Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"POST /echo/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut interim = String::new();
        reader.read_line(&mut interim).unwrap();
        let mut blank = String::new();
        reader.read_line(&mut blank).unwrap();
        s.write_all(b"hello").unwrap();
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        (interim, rest)
    })
    .await
    .unwrap();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(echo["body_len"], 5);
    assert!(echo["headers"].get("expect").is_none(), "{echo}");
}

/// Stale-while-revalidate refreshes go where the foreground request went (here: the upstream
/// a header chose), and never through HEAD.
#[tokio::test]
async fn background_refreshes_follow_the_foreground_request() {
    let stable = Backend::start("stable").await;
    let canary = Backend::start("canary").await;
    let cfg = format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  stable: {{ url: "{}" }}
  canary: {{ url: "{}" }}
routes:
  - name: api
    match: {{ path_prefix: / }}
    upstream: stable
    upstream_by_header: {{ header: x-canary, upstreams: {{ "1": canary }} }}
    cache: {{ ttl: 1s, stale_while_revalidate: 1h, key: {{ headers: [x-canary] }} }}
"#,
        stable.url(),
        canary.url()
    );
    let proxy = Proxy::start(&cfg).await;
    let c = client();
    let get = |method: reqwest::Method| {
        c.request(method, proxy.url("/echo/r"))
            .header("x-canary", "1")
    };
    assert_eq!(
        get(reqwest::Method::GET).send().await.unwrap().status(),
        200
    );
    assert_eq!(canary.hits("/echo/r"), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A HEAD on the stale entry is answered from it but starts no refresh.
    let head = get(reqwest::Method::HEAD).send().await.unwrap();
    assert_eq!(head.headers()["x-cache-status"], "STALE");
    let stale = get(reqwest::Method::GET).send().await.unwrap();
    assert_eq!(stale.headers()["x-cache-status"], "STALE");
    support::wait_for("the refresh", Duration::from_secs(10), || async {
        (canary.hits("/echo/r") == 2).then_some(())
    })
    .await;
    assert_eq!(
        stable.hits("/echo/r"),
        0,
        "the refresh went to the chosen upstream"
    );
    let echo: serde_json::Value = get(reqwest::Method::GET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["backend"], "canary");
    assert_eq!(canary.hits("/echo/r"), 2, "exactly one refresh");
}
