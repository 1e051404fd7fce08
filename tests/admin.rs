//! The admin service: every endpoint, its errors, and the metrics it exposes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{client, metric_value, Backend, Proxy};

fn config(app: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}" }}
cache:
  redis: {{ url: "redis://:hunter2@127.0.0.1:1/0" }}
routes:
  - name: items
    match: {{ path_prefix: /api/items }}
    upstream: app
  - name: default
    match: {{ path_prefix: / }}
    upstream: app
"#
    )
}

#[tokio::test]
async fn health_ready_config_and_errors() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let c = client();

    let health = c.get(proxy.admin("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<serde_json::Value>().await.unwrap()["status"],
        "ok"
    );

    let ready = c.get(proxy.admin("/ready")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        200,
        "an unreachable Redis must not fail readiness"
    );
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["config"]["generation"], 1);

    let cfg: serde_json::Value = c
        .get(proxy.admin("/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cfg["generation"], 1);
    assert_eq!(cfg["config"]["routes"][0]["name"], "items");
    assert_eq!(
        cfg["config"]["upstreams"]["app"]["timeout"], "30s",
        "defaults are shown"
    );
    let url = cfg["config"]["cache"]["redis"]["url"].as_str().unwrap();
    assert!(!url.contains("hunter2"), "password redacted: {url}");
    assert!(url.contains("***"));

    let missing = c.get(proxy.admin("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<serde_json::Value>().await.unwrap()["error"],
        "not_found"
    );
    let wrong = c.post(proxy.admin("/health")).send().await.unwrap();
    assert_eq!(wrong.status(), 405);
    let wrong = c.get(proxy.admin("/reload")).send().await.unwrap();
    assert_eq!(wrong.status(), 405);

    // The admin port is not the traffic port: admin paths on the traffic port are proxied.
    let proxied = c.get(proxy.url("/health")).send().await.unwrap();
    assert_eq!(
        proxied.json::<serde_json::Value>().await.unwrap()["backend"],
        "app"
    );
}

#[tokio::test]
async fn metrics_cover_requests_latency_and_build() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let c = client();
    for _ in 0..3 {
        c.get(proxy.url("/api/items/1"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    c.post(proxy.url("/other"))
        .body("x")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    c.request(
        reqwest::Method::from_bytes(b"BREW").unwrap(),
        proxy.url("/x"),
    )
    .send()
    .await
    .unwrap();

    // Requests are counted when they finish, just after the client has its response.
    support::wait_for(
        "all five requests counted",
        std::time::Duration::from_secs(10),
        || async {
            let m = proxy.metrics().await;
            (metric_value(&m, "outrider_requests_total", &[]) == Some(5.0)).then_some(())
        },
    )
    .await;
    let resp = c.get(proxy.admin("/metrics")).send().await.unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let m = resp.text().await.unwrap();
    assert_eq!(
        metric_value(
            &m,
            "outrider_requests_total",
            &["route=\"items\"", "method=\"GET\"", "status_class=\"2xx\""]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "outrider_requests_total",
            &["route=\"default\"", "method=\"POST\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&m, "outrider_requests_total", &["method=\"OTHER\""]),
        Some(1.0),
        "unknown methods collapse"
    );
    assert_eq!(
        metric_value(
            &m,
            "outrider_request_duration_seconds_count",
            &["route=\"items\""]
        ),
        Some(3.0)
    );
    assert!(m.contains("outrider_request_duration_seconds_bucket{route=\"items\",le=\"0.001\"}"));
    assert!(m.contains("le=\"10\""));
    assert_eq!(
        metric_value(
            &m,
            "outrider_upstream_duration_seconds_count",
            &["route=\"items\""]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_value(&m, "outrider_requests_in_flight", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&m, "outrider_build_info", &["version=\""]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&m, "outrider_config_generation", &[]),
        Some(1.0)
    );
    assert!(!m.contains("/api/items/1"), "raw paths never become labels");
}

/// Every credential form outrider accepts in a URL stays out of `GET /config` and the log
/// (the Redis connect failures are logged with the URL).
#[tokio::test]
async fn config_and_logs_never_show_credentials() {
    let app = Backend::start("app").await;
    let cases = [
        (
            "password with @",
            "redis://app:p@ss-w0rd@127.0.0.1:1/0",
            "p@ss-w0rd",
        ),
        ("TLS", "rediss://:tls-s3cret@127.0.0.1:1", "tls-s3cret"),
        (
            "unix ?pass=",
            "unix:///nonexistent/redis.sock?db=0&pass=unix-s3cret",
            "unix-s3cret",
        ),
        (
            "?password=",
            "redis://127.0.0.1:1/0?password=query-s3cret",
            "query-s3cret",
        ),
    ];
    for (form, redis_url, secret) in cases {
        let text = config(&app.url()).replace("redis://:hunter2@127.0.0.1:1/0", redis_url)
            // Any URL-valued string, not only the known URL keys.
            + "telemetry: { service_name: \"https://svc:name-s3cret@example.com\" }\n";
        let proxy = Proxy::start(&text).await;
        let shown = client()
            .get(proxy.admin("/config"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !shown.contains(secret),
            "{form}: /config shows {secret}: {shown}"
        );
        assert!(!shown.contains("name-s3cret"), "{form}: {shown}");
        assert!(shown.contains("***"), "{form}: {shown}");
        // The connect loop logs the URL once it has failed.
        support::wait_for(
            "the redis connect failure in the log",
            std::time::Duration::from_secs(10),
            || async { proxy.log().contains("redis L2").then_some(()) },
        )
        .await;
        let log = proxy.log();
        assert!(
            !log.contains(secret),
            "{form}: the log shows {secret}:\n{log}"
        );
    }
}

/// `/ready` (and `/health`) must not say yes before the traffic port takes connections: Pingora
/// binds it inside `server.run()`, after the admin service is already answering.
#[tokio::test]
async fn ready_is_never_answered_before_the_traffic_port_listens() {
    let app = Backend::start("app").await;
    let c = client();
    for _ in 0..5 {
        let proxy = Proxy::spawn(&config(&app.url()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        // As fast as possible: the window between the two listeners is short.
        let mut starting_seen = false;
        loop {
            if let Ok(resp) = c.get(proxy.admin("/ready")).send().await {
                if resp.status() == 200 {
                    break;
                }
                let body: serde_json::Value = resp.json().await.unwrap();
                assert_eq!(body["status"], "starting", "{body}");
                starting_seen = true;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never ready; log:\n{}",
                proxy.log()
            );
            tokio::task::yield_now().await;
        }
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", proxy.port)).is_ok(),
            "/ready said 200 but the traffic port refuses connections (saw starting: {starting_seen})"
        );
        let health = c.get(proxy.admin("/health")).send().await.unwrap();
        assert_eq!(health.status(), 200);
    }
}

/// Sends raw bytes to a port and returns everything the server sends until it closes the
/// connection, or `None` if it is still open after 30 s.
async fn raw_exchange(port: u16, request: &'static [u8]) -> Option<String> {
    use std::io::{Read, Write};
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        s.write_all(request).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Some(String::from_utf8_lossy(&out).into_owned()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Some(String::from_utf8_lossy(&out).into_owned())
                }
                Err(_) => return None,
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn head_answers_like_get_without_a_body() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url())).await;
    let c = client();
    for path in ["/health", "/ready", "/metrics", "/config"] {
        let get = c.get(proxy.admin(path)).send().await.unwrap();
        let head = c.head(proxy.admin(path)).send().await.unwrap();
        assert_eq!(head.status(), get.status(), "{path}");
        assert_eq!(
            head.headers()["content-type"],
            get.headers()["content-type"],
            "{path}"
        );
        let get_len = get.bytes().await.unwrap().len();
        // /metrics changes between two scrapes; the others are stable.
        if path != "/metrics" {
            assert_eq!(
                head.headers()["content-length"],
                get_len.to_string().as_str(),
                "{path}"
            );
        }
        assert!(head.bytes().await.unwrap().is_empty());
    }
    // On the wire: a HEAD answer ends after its header.
    let port = proxy.admin_port;
    let answer = raw_exchange(
        port,
        b"HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("closed after the answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("content-length: 15"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "no body expected: {answer:?}");
    // HEAD is a read: not allowed where GET is not.
    let head = c.head(proxy.admin("/reload")).send().await.unwrap();
    assert_eq!(head.status(), 405);
}

#[tokio::test]
async fn slow_clients_do_not_hold_admin_connections() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url()).replace(
        r#"admin: { listen: "{admin}" }"#,
        r#"admin: { listen: "{admin}", read_timeout: 300ms }"#,
    ))
    .await;
    let port = proxy.admin_port;
    // A header that never ends: the connection is closed, with or without a 408.
    let answer = raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .expect("a never-ending header must not keep the connection open");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    // A connection that never sends anything.
    let answer = raw_exchange(port, b"").await;
    assert!(answer.is_some(), "an idle connection must be closed");
    // A body that never completes: 408 JSON, then the connection closes.
    let answer = raw_exchange(
        port,
        b"POST /cache/purge HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"all\"",
    )
    .await
    .expect("a never-ending body must not keep the connection open");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // Normal requests still work.
    let ok = client().get(proxy.admin("/health")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}
