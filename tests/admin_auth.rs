//! Who may use the admin port: the token for mutations (inline from the environment, or from a
//! file re-read on reload), the `Host` check against DNS rebinding, and JSON-only bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{client, Backend, Proxy};

const TOKEN_ENV: &str = "OUTRIDER_TEST_ADMIN_TOKEN";

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

async fn post(proxy: &Proxy, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = client()
        .post(proxy.admin(path))
        .header("content-type", "application/json")
        .body(if path == "/cache/purge" {
            r#"{"all":true}"#
        } else {
            ""
        });
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req.send().await.unwrap()
}

async fn assert_unauthorized(resp: reqwest::Response) {
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized", "{body}");
}

#[tokio::test]
async fn mutations_need_the_token_reads_do_not() {
    let app = Backend::start("app").await;
    let secret = "env-t0ken-5ecret";
    let proxy = Proxy::start_with_env(
        &config(&app.url(), &format!(r#", token: "${{{TOKEN_ENV}}}""#)),
        &[(TOKEN_ENV, secret)],
    )
    .await;

    for path in ["/reload", "/cache/purge"] {
        assert_unauthorized(post(&proxy, path, None).await).await;
        assert_unauthorized(post(&proxy, path, Some("wrong")).await).await;
        assert_unauthorized(post(&proxy, path, Some(&format!("{secret}x"))).await).await;
        let ok = post(&proxy, path, Some(secret)).await;
        assert_eq!(ok.status(), StatusCode::OK, "{path}");
    }
    // Any other method that is not a read needs it too, even where it would be a 404/405.
    let delete = client()
        .delete(proxy.admin("/cache/purge"))
        .send()
        .await
        .unwrap();
    assert_unauthorized(delete).await;

    // Reads stay open (probes and Prometheus carry no token).
    for path in ["/health", "/ready", "/metrics", "/config", "/cache/stats"] {
        let resp = client().get(proxy.admin(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    let shown = client()
        .get(proxy.admin("/config"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!shown.contains(secret), "{shown}");
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["config"]["admin"]["token"], "***");
    assert!(!proxy.log().contains(secret));
}

#[tokio::test]
async fn the_token_file_is_read_at_start_and_on_reload() {
    let app = Backend::start("app").await;
    let secrets = tempfile::tempdir().unwrap();
    let token_path = secrets.path().join("admin-token");
    std::fs::write(&token_path, "first-t0ken\n").unwrap();
    let template = config(
        &app.url(),
        &format!(r#", token_file: "{}""#, token_path.display()),
    );
    let proxy = Proxy::start(&template).await;

    assert_unauthorized(post(&proxy, "/reload", None).await).await;
    // The file's trailing newline is not part of the token.
    let resp = post(&proxy, "/reload", Some("first-t0ken")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["outcome"], "unchanged");

    // The Secret is rotated: the next reload reads it, though the config file is unchanged.
    std::fs::write(&token_path, "second-t0ken\n").unwrap();
    assert_unauthorized(post(&proxy, "/cache/purge", Some("second-t0ken")).await).await;
    let resp = post(&proxy, "/reload", Some("first-t0ken")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["outcome"], "applied", "{body}");
    assert_unauthorized(post(&proxy, "/reload", Some("first-t0ken")).await).await;
    let resp = post(&proxy, "/cache/purge", Some("second-t0ken")).await;
    assert_eq!(resp.status(), StatusCode::OK);

    // A token file that cannot be read rejects the reload; the token in force stays.
    std::fs::remove_file(&token_path).unwrap();
    let resp = post(&proxy, "/reload", Some("second-t0ken")).await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = resp.json().await.unwrap();
    let problem = body["problems"][0].as_str().unwrap();
    assert!(
        problem.contains(":3:") && problem.contains("admin.token_file: cannot read"),
        "{problem}"
    );
    assert_eq!(
        post(&proxy, "/cache/purge", Some("second-t0ken"))
            .await
            .status(),
        StatusCode::OK
    );
    assert!(!proxy.log().contains("t0ken"), "{}", proxy.log());
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
