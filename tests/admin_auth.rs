//! Who may use the admin port: the `Host` check against DNS rebinding, and JSON-only bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{client, Backend, Proxy};

fn config(app: &str, admin_extra: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}"{admin_extra} }}
upstreams:
  app: {{ url: "{app}" }}
routes:
  - name: items
    match: {{ path_prefix: / }}
    upstream: app
    cache: {{ ttl: 5m }}
"#
    )
}

/// Sends a request with the given `Host` to the admin port.
async fn get_with_host(proxy: &Proxy, path: &str, host: &str) -> reqwest::Response {
    client()
        .get(proxy.admin(path))
        .header("host", host)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn hosts_that_could_be_rebound_are_refused() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(
        &app.url(),
        r#", allowed_hosts: [outrider.internal]"#,
    ))
    .await;
    let port = proxy.admin_port;
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_string(),
        format!("[::1]:{port}"),
        format!("localhost:{port}"),
        format!("outrider.internal:{port}"),
        "10.0.0.7:9901".to_string(),
    ] {
        let resp = get_with_host(&proxy, "/health", &host).await;
        assert_eq!(resp.status(), StatusCode::OK, "{host}");
    }
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
    ] {
        for path in ["/health", "/metrics", "/config"] {
            let resp = get_with_host(&proxy, path, &host).await;
            assert_eq!(
                resp.status(),
                StatusCode::MISDIRECTED_REQUEST,
                "{host}{path}"
            );
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"], "host_not_allowed", "{body}");
        }
    }
    let resp = client()
        .post(proxy.admin("/reload"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
}

#[tokio::test]
async fn purge_bodies_must_be_json() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), "")).await;
    let purge = |content_type: Option<&'static str>, body: &'static str| {
        let mut req = client().post(proxy.admin("/cache/purge")).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req.send()
    };
    for (ct, body) in [
        (None, r#"{"all":true}"#),
        (Some("text/plain"), r#"{"all":true}"#),
        (Some("application/x-www-form-urlencoded"), "all=true"),
    ] {
        let resp = purge(ct, body).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"], "unsupported_media_type");
    }
    let resp = purge(Some("application/json"), "all=true").await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_json");
    let resp = purge(Some("application/json; charset=utf-8"), r#"{"all":true}"#)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["purged"]["l1"],
        json!(0)
    );
}
