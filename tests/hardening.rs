//! Attacks on cache-key integrity, reproduced over raw sockets so the exact request bytes are
//! under the test's control (HTTP client libraries normalise targets).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::{wait_for, Backend, Proxy};

fn config(app: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}", timeout: 5s }}
routes:
  - name: items
    match: {{ path_prefix: /api/items, methods: [GET] }}
    upstream: app
    cache: {{ ttl: 5m }}
  - name: fa
    match: {{ path_prefix: /api/fa }}
    upstream: app
    cache: {{ ttl: 1s, stale_while_revalidate: 1h }}
"#
    )
}

/// Sends `raw` on a new connection and returns the whole answer (the request says close).
async fn raw(port: u16, request: String) -> String {
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("write");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
    .await
    .expect("join")
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn body(answer: &str) -> serde_json::Value {
    let text = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
}

#[tokio::test]
async fn absolute_form_targets_are_forwarded_in_origin_form() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let get = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let answer = raw(proxy.port, get("http://shop/api/items/1?q=1", "shop")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        body(&answer)["uri"],
        "/api/items/1?q=1",
        "the app sees origin-form"
    );
    assert_eq!(header(&answer, "x-cache-status"), Some("MISS"));
    // The same resource in origin-form is the entry the absolute form stored.
    let answer = raw(proxy.port, get("/api/items/1?q=1", "shop")).await;
    assert_eq!(header(&answer, "x-cache-status"), Some("HIT"), "{answer}");

    // An authority that is not the Host is refused before routing, keying or forwarding
    // (Pingora's own request validation answers it, like other malformed requests).
    let answer = raw(proxy.port, get("http://evil/api/items/2", "shop")).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(app.hits("/api/items/2"), 0);
    assert_eq!(app.hits("/api/items/1"), 1);
}

#[tokio::test]
async fn background_revalidation_sends_the_exact_target_bytes() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let target = "/api/fa/../../internal/secret";
    let get = format!("GET {target} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n");
    let first = raw(proxy.port, get.clone()).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(body(&first)["uri"], target);
    // Once the entry is stale, a request is answered from it and a refresh runs behind it.
    wait_for("a stale answer", Duration::from_secs(15), || {
        let get = get.clone();
        let port = proxy.port;
        async move {
            let answer = raw(port, get).await;
            (header(&answer, "x-cache-status") == Some("STALE")).then_some(())
        }
    })
    .await;
    wait_for("the refresh", Duration::from_secs(10), || async {
        (app.hits(target) >= 2).then_some(())
    })
    .await;
    assert_eq!(
        app.hits("/internal/secret"),
        0,
        "the refresh must not normalise the path"
    );

    // A stale entry first filled by an absolute-form request is refreshed in origin-form too
    // (the refresh is rebuilt from the client's original request bytes).
    let abs = "GET http://shop/api/fa/abs HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n";
    assert!(raw(proxy.port, abs.to_string())
        .await
        .starts_with("HTTP/1.1 200"));
    wait_for("a stale answer", Duration::from_secs(15), || {
        let port = proxy.port;
        async move {
            let answer = raw(port, abs.to_string()).await;
            (header(&answer, "x-cache-status") == Some("STALE")).then_some(())
        }
    })
    .await;
    wait_for("the refresh", Duration::from_secs(10), || async {
        (app.hits("/api/fa/abs") >= 2).then_some(())
    })
    .await;
    assert_eq!(
        app.hits("uri:http://shop/api/fa/abs"),
        0,
        "never absolute-form upstream"
    );
}

/// With stdout not being read at all, traffic keeps flowing: log lines are dropped once the
/// bounded queue is full, and counted.
#[tokio::test]
async fn a_blocked_stdout_costs_log_lines_not_requests() {
    use std::process::{Command, Stdio};
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (support::free_port(), support::free_port());
    let config_path = dir.path().join("outrider.yaml");
    std::fs::write(
        &config_path,
        support::render(&config(&app.url()), port, admin_port),
    )
    .unwrap();
    let log_path = dir.path().join("unused.log");
    // stdout is a pipe nobody reads: it fills after a few hundred lines.
    let child = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .args(["run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proxy = Proxy::from_parts(child, port, admin_port, dir, config_path, log_path);
    proxy.wait_until_ready().await;
    let c = support::client();
    let url = proxy.url("/api/items/log");
    let total = 20_000usize;
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in (w..total).step_by(32) {
                    if let Ok(r) = c.get(&url).send().await {
                        if r.status() == 200 && r.bytes().await.is_ok() {
                            ok += 1;
                        }
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for w in workers {
        ok += w.await.unwrap();
    }
    assert_eq!(ok, total, "every request answered while stdout is blocked");
    let metrics = proxy.metrics().await;
    let dropped =
        support::metric_value(&metrics, "outrider_log_lines_dropped_total", &[]).unwrap_or(0.0);
    assert!(dropped > 0.0, "dropped lines are counted:\n{metrics}");
}

#[tokio::test]
async fn negative_answers_and_explicit_zero_lifetimes_are_not_stored_by_default() {
    let app = Backend::start("app").await;
    let cfg = format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{}", timeout: 5s }}
routes:
  - name: negative
    match: {{ path_prefix: /status/410 }}
    upstream: app
    cache: {{ ttl: 5m, negative_ttl: 30s }}
  - name: plain
    match: {{ path_prefix: / }}
    upstream: app
    cache: {{ ttl: 5m }}
"#,
        app.url()
    );
    let proxy = Proxy::start(&cfg).await;
    let c = support::client();
    let status_of = |path: &'static str| {
        let (c, url) = (c.clone(), proxy.url(path));
        async move {
            let r = c.get(url).send().await.unwrap();
            let cache = r.headers()["x-cache-status"].to_str().unwrap().to_string();
            let cc = r
                .headers()
                .get("cache-status")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), cache, cc)
        }
    };
    // A passing 404 is not served to everyone for the route's 5 minutes.
    assert_eq!(status_of("/status/404").await.1, "MISS");
    assert_eq!(status_of("/status/404").await.1, "MISS");
    assert_eq!(app.hits("/status/404"), 2);
    // Opted in: stored, with the shorter negative lifetime.
    assert_eq!(status_of("/status/410").await.1, "MISS");
    let (status, cache, cc) = status_of("/status/410").await;
    assert_eq!((status, cache.as_str()), (410, "HIT"));
    let ttl: i64 = cc
        .as_deref()
        .and_then(|v| v.rsplit("ttl=").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    assert!((0..=30).contains(&ttl), "{cc:?}");
    // The origin's explicit max-age=0 is honoured although the route sets its own TTL.
    assert_eq!(
        status_of("/headers?cache-control=max-age=0").await.1,
        "MISS"
    );
    assert_eq!(
        status_of("/headers?cache-control=max-age=0").await.1,
        "MISS"
    );
    assert_eq!(
        status_of("/headers?cache-control=max-age=60").await.1,
        "MISS"
    );
    assert_eq!(
        status_of("/headers?cache-control=max-age=60").await.1,
        "HIT"
    );
}

#[tokio::test]
async fn the_key_covers_every_forwarded_value_in_bytes_and_host_must_be_sane() {
    let app = Backend::start("app").await;
    let cfg = format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{}", timeout: 5s }}
routes:
  - name: items
    match: {{ path_prefix: / }}
    upstream: app
    cache: {{ ttl: 5m, key: {{ strip: [x-forwarded-prefix] }} }}
"#,
        app.url()
    );
    let proxy = Proxy::start(&cfg).await;
    let send = |target: &str, headers: &[&[u8]]| {
        let mut req = format!("GET {target} HTTP/1.1\r\n").into_bytes();
        for h in headers {
            req.extend_from_slice(h);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"Connection: close\r\n\r\n");
        let port = proxy.port;
        async move {
            tokio::task::spawn_blocking(move || {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(&req).unwrap();
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
            .await
            .unwrap()
        }
    };
    // Only the first X-Forwarded-Host value used to be keyed: a second one (which an app may
    // read) could poison the entry everyone else gets.
    let both = send(
        "/p",
        &[
            b"Host: shop",
            b"X-Forwarded-Host: a",
            b"X-Forwarded-Host: evil",
        ],
    )
    .await;
    assert_eq!(header(&both, "x-cache-status"), Some("MISS"));
    let one = send("/p", &[b"Host: shop", b"X-Forwarded-Host: a"]).await;
    assert_eq!(header(&one, "x-cache-status"), Some("MISS"), "{one}");
    // Non-ASCII values used to be left out of the key entirely.
    let odd = send("/q", &[b"Host: shop", b"X-Forwarded-Host: sh\xc3\xb6p"]).await;
    assert_eq!(header(&odd, "x-cache-status"), Some("MISS"));
    let none = send("/q", &[b"Host: shop"]).await;
    assert_eq!(header(&none, "x-cache-status"), Some("MISS"), "{none}");
    assert_eq!(app.hits("/p"), 2);
    assert_eq!(app.hits("/q"), 2);
    // Unkeyed headers the route strips never reach the app.
    let stripped = send("/r", &[b"Host: shop", b"X-Forwarded-Prefix: /evil"]).await;
    assert!(
        body(&stripped)["headers"]
            .get("x-forwarded-prefix")
            .is_none(),
        "{stripped}"
    );
    // HTTP/1.1 without Host, with two, or with a non-ASCII one: 400, nothing keyed or forwarded.
    for headers in [
        &[][..],
        &[b"Host: a".as_slice(), b"Host: b"][..],
        &[b"Host: sh\xc3\xb6p".as_slice()][..],
    ] {
        let answer = send("/s", headers).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    assert_eq!(app.hits("/s"), 0);
}

/// A one-request-per-connection upstream that answers with the exact bytes it received, so a
/// test sees the framing headers outrider forwarded (an HTTP library would merge them).
async fn raw_echo_upstream() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&chunk[..n]);
                    if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while got.len() < head_end + len {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    }
                }
                let mut answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    got.len()
                )
                .into_bytes();
                answer.extend_from_slice(&got);
                let _ = s.write_all(&answer).await;
            });
        }
    });
    format!("http://{addr}")
}

/// RFC 9110 §8.6: identical `Content-Length` values (repeated lines or a list) are one length;
/// differing ones make the framing ambiguous and are refused before anything is forwarded.
#[tokio::test]
async fn duplicate_identical_content_lengths_collapse_and_differing_ones_are_refused() {
    let upstream = raw_echo_upstream().await;
    let proxy = Proxy::start(&config(&upstream)).await;
    let post = |lengths: &[&str]| {
        let mut req =
            String::from("POST /api/fa/post HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n");
        for l in lengths {
            req.push_str(&format!("Content-Length: {l}\r\n"));
        }
        req.push_str("\r\nhello");
        raw(proxy.port, req)
    };
    for lengths in [&["5", "5"][..], &["5, 5"][..]] {
        let answer = post(lengths).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{lengths:?}: {answer}");
        let forwarded = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let framing: Vec<&str> = forwarded
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
            .collect();
        assert_eq!(framing.len(), 1, "one length upstream: {forwarded}");
        assert!(
            framing[0].ends_with(" 5") || framing[0].ends_with(":5"),
            "{framing:?}"
        );
        assert!(forwarded.ends_with("\r\n\r\nhello"), "{forwarded}");
    }
    for lengths in [&["5", "6"][..], &["5, 6"][..], &["5", "5", "4"][..]] {
        let answer = post(lengths).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{lengths:?}: {answer}");
    }
}
