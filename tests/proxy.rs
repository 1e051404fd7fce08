//! Forwarding, routing, latency headers and upstream failures, over real loopback sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{client, free_port, metric_value, Backend, Proxy};

fn config(app: &str, other: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
threads: 2
upstreams:
  app: {{ url: "{app}", connect_timeout: 1s, timeout: 2s }}
  other: {{ url: "{other}", timeout: 2s }}
  dead: {{ url: "http://127.0.0.1:{dead}", connect_timeout: 500ms }}
routes:
  - name: exact
    match: {{ path: /api/special }}
    upstream: other
  - name: posts-to-other
    match: {{ path_prefix: /api, methods: [POST] }}
    upstream: other
  - name: api
    match: {{ path_prefix: /api }}
    upstream: app
  - name: down
    match: {{ path_prefix: /down }}
    upstream: dead
  - name: app-root
    match: {{ path_prefix: /a }}
    upstream: app
  - name: slowpoke
    match: {{ path_prefix: /slow }}
    upstream: app
  - name: misc
    match: {{ path_prefix: /status }}
    upstream: app
  - name: bulk
    match: {{ path_prefix: /big }}
    upstream: app
  - name: stream
    match: {{ path_prefix: /chunked }}
    upstream: app
  - name: echo
    match: {{ path_prefix: /echo }}
    upstream: app
"#,
        dead = free_port()
    )
}

async fn setup() -> (Backend, Backend, Proxy) {
    let app = Backend::start("app").await;
    let other = Backend::start("other").await;
    let proxy = Proxy::start(&config(&app.url(), &other.url())).await;
    (app, other, proxy)
}

#[tokio::test]
async fn forwards_method_path_query_headers_and_body() {
    let (_app, _other, proxy) = setup().await;
    let c = client();
    let body = vec![7u8; 200_000];
    let resp = c
        .put(proxy.url("/echo/x?y=1&z=%20"))
        .header("x-custom", "abc")
        .header("host", "example.test")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/echo/x");
    assert_eq!(echo["query"], "y=1&z=%20");
    assert_eq!(echo["headers"]["x-custom"], "abc");
    assert_eq!(
        echo["headers"]["host"], "example.test",
        "client Host is preserved for a plain-HTTP app"
    );
    assert!(
        echo["headers"].get("x-forwarded-host").is_none(),
        "Host is kept, so X-Forwarded-Host would be redundant"
    );
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(echo["body_len"], 200_000);
    assert_eq!(
        echo["body_blake3"],
        blake3::hash(&body).to_hex().to_string()
    );

    // An existing X-Forwarded-For chain is extended, and a client's proto is kept.
    let echo: serde_json::Value = c
        .get(proxy.url("/echo"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn streams_large_and_chunked_bodies_both_ways() {
    let (_app, _other, proxy) = setup().await;
    let c = client();
    let big = c.get(proxy.url("/big/5000000")).send().await.unwrap();
    assert_eq!(big.status(), 200);
    let bytes = big.bytes().await.unwrap();
    assert_eq!(bytes.len(), 5_000_000);
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));

    let chunked = c.get(proxy.url("/chunked/50")).send().await.unwrap();
    assert_eq!(chunked.status(), 200);
    let text = chunked.text().await.unwrap();
    assert_eq!(
        text,
        (0..50).map(|i| format!("chunk{i};")).collect::<String>()
    );

    // A chunked request body (no content-length) arrives intact.
    let parts: Vec<Result<bytes::Bytes, std::io::Error>> = (0..100)
        .map(|i| Ok(bytes::Bytes::from(format!("part{i:03}"))))
        .collect();
    let expected: String = (0..100).map(|i| format!("part{i:03}")).collect();
    let resp = c
        .post(proxy.url("/echo/chunked"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(parts)))
        .send()
        .await
        .unwrap();
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["body_len"], expected.len());
    assert_eq!(
        echo["body_blake3"],
        blake3::hash(expected.as_bytes()).to_hex().to_string()
    );
}

#[tokio::test]
async fn latency_headers_and_request_id() {
    let (_app, _other, proxy) = setup().await;
    let c = client();
    let resp = c.get(proxy.url("/echo")).send().await.unwrap();
    let rt = resp.headers()["x-response-time-ms"]
        .to_str()
        .unwrap()
        .to_string();
    let (whole, frac) = rt.split_once('.').expect("decimal point");
    assert!(
        whole.parse::<u64>().is_ok() && frac.len() == 3,
        "3 decimals: {rt}"
    );
    let timing = resp.headers()["server-timing"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        timing.starts_with("total;dur=") && timing.contains(", upstream;dur="),
        "{timing}"
    );
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 32);
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        echo["headers"]["x-request-id"],
        generated.as_str(),
        "generated id is forwarded"
    );

    let resp = c
        .get(proxy.url("/echo"))
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "req-42");
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["headers"]["x-request-id"], "req-42");

    // An unsafe id is replaced rather than passed on.
    let resp = c
        .get(proxy.url("/echo"))
        .header("x-request-id", "a b<c>")
        .send()
        .await
        .unwrap();
    assert_ne!(resp.headers()["x-request-id"], "a b<c>");

    // Responses outrider writes itself carry the same headers.
    let resp = c.get(proxy.url("/nowhere")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().contains_key("x-response-time-ms"));
    assert!(resp.headers().contains_key("server-timing"));
    assert!(resp.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn first_matching_route_wins() {
    let (app, other, proxy) = setup().await;
    let c = client();
    let who = |r: serde_json::Value| r["backend"].as_str().unwrap().to_string();
    let get = |p: &str| c.get(proxy.url(p)).send();
    assert_eq!(
        who(get("/api/special").await.unwrap().json().await.unwrap()),
        "other"
    );
    assert_eq!(
        who(get("/api/items").await.unwrap().json().await.unwrap()),
        "app"
    );
    let posted = c
        .post(proxy.url("/api/items"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        who(posted.json().await.unwrap()),
        "other",
        "method-restricted route before the catch-all"
    );
    assert_eq!(app.hits("/api/items"), 1);
    assert_eq!(other.hits("/api/items"), 1);

    let resp = get("/zzz").await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "no_route");
    assert!(body["message"].as_str().unwrap().contains("/zzz"));
}

#[tokio::test]
async fn upstream_failures_are_json_errors() {
    let (_app, _other, proxy) = setup().await;
    let c = client();

    let refused = c.get(proxy.url("/down/x")).send().await.unwrap();
    assert_eq!(refused.status(), 502);
    assert_eq!(refused.headers()["content-type"], "application/json");
    assert!(refused.headers().contains_key("x-request-id"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
    assert_eq!(body["kind"], "connect_refused");

    // The upstream timeout is 2s; the backend sleeps 5s.
    let slow = c.get(proxy.url("/slow/5000")).send().await.unwrap();
    assert_eq!(slow.status(), 504);
    let body: serde_json::Value = slow.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
    assert_eq!(body["kind"], "timeout");

    // An upstream 5xx is the app's answer and passes through untouched.
    let five = c.get(proxy.url("/status/503")).send().await.unwrap();
    assert_eq!(five.status(), 503);
    assert_eq!(five.text().await.unwrap(), "status 503");

    let m = support::metric_eventually(&proxy, "outrider_requests_total", &[], 3.0).await;
    assert_eq!(
        metric_value(
            &m,
            "outrider_upstream_errors_total",
            &["route=\"down\"", "kind=\"connect_refused\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "outrider_upstream_errors_total",
            &["route=\"slowpoke\"", "kind=\"timeout\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "outrider_requests_total",
            &["route=\"misc\"", "status_class=\"5xx\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "outrider_requests_total",
            &["route=\"down\"", "status_class=\"5xx\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn keepalive_connections_are_reused_upstream() {
    let (app, _other, proxy) = setup().await;
    let c = client();
    for _ in 0..20 {
        let r = c.get(proxy.url("/echo/k")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(app.hits("/echo/k"), 20);
    let _ = Duration::from_secs(0);
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    use std::io::{Read, Write};
    let (app, _other, proxy) = setup().await;
    let port = proxy.port;
    let answers = tokio::task::spawn_blocking(move || {
        let send = |raw: &[u8]| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(raw).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).to_string()
        };
        let long_path = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
        vec![
            send(b"GARBAGE\r\n\r\n"),
            send(b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
            send(long_path.as_bytes()),
        ]
    })
    .await
    .unwrap();
    for answer in &answers[..2] {
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    // A head over `limits.max_header_size` (64 KiB by default) is refused before parsing.
    assert!(answers[2].starts_with("HTTP/1.1 431"), "{}", answers[2]);
    assert_eq!(app.total_hits(), 0, "nothing malformed reached the app");
    let ok = client().get(proxy.url("/echo")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

/// An origin on raw sockets: answers `200 ok` (after `delay`) with keep-alive until told to
/// hang up, then reads each request and closes without answering. Counts requests it read.
struct HangingUp {
    port: u16,
    hang_up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HangingUp {
    async fn start(delay: Duration) -> HangingUp {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hang_up = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (hang_up.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (flag, count) = (flag.clone(), count.clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        // One request head (these requests have no body).
                        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                        }
                        let end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        seen.drain(..end);
                        count.fetch_add(1, Ordering::SeqCst);
                        if flag.load(Ordering::SeqCst) {
                            return; // closes without a byte of answer
                        }
                        tokio::time::sleep(delay).await;
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        HangingUp {
            port,
            hang_up,
            requests,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn an_origin_that_hangs_up_gets_one_retry_at_most_and_never_for_post() {
    let origin = HangingUp::start(Duration::from_millis(200)).await;
    let app = format!("http://127.0.0.1:{}", origin.port);
    let proxy = Proxy::start(&config(&app, &app)).await;
    // Eight overlapping requests leave eight idle connections in outrider's upstream pool.
    let warm: Vec<_> = (0..8)
        .map(|i| {
            let url = proxy.url(&format!("/api/warm/{i}"));
            tokio::spawn(async move { client().get(url).send().await.unwrap().status() })
        })
        .collect();
    for request in warm {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert_eq!(origin.requests(), 8);
    origin
        .hang_up
        .store(true, std::sync::atomic::Ordering::SeqCst);

    // The GET fails on a pooled connection and is tried once more on a fresh one: 2 origin
    // requests, not one per pooled connection.
    let resp = client()
        .get(proxy.url("/api/items/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(origin.requests(), 8 + 2);
    let text = proxy.admin_text("/metrics").await;
    assert_eq!(
        metric_value(&text, "outrider_upstream_retries_total", &["route=\"api\""]),
        Some(1.0)
    );

    // A POST is never sent twice.
    let resp = client()
        .post(proxy.url("/api/items"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(origin.requests(), 8 + 2 + 1);
}
