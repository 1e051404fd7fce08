//! The admin HTTP service on its own listener: health, readiness, metrics, config, reload.
//! It never shares a port with traffic and binds to loopback unless told otherwise; every
//! request passes [`guard`] (Host, token for mutations, JSON bodies) before an endpoint sees it,
//! and slow clients are bounded by `admin.read_timeout`.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

pub mod cache;
pub mod guard;

use crate::config::{LiveConfig, ReloadOutcome};
use crate::proxy::Lifecycle;
use crate::telemetry::{openmetrics, redact, Metrics};

/// Largest admin request body accepted (purge requests are tiny).
const MAX_BODY: usize = 64 * 1024;

/// Something the admin service reports on or acts through, kept abstract so the admin module
/// does not depend on how features are built.
pub trait AdminExtension: Send + Sync {
    /// Extra readiness checks: (name, status text, blocks readiness).
    fn readiness(&self) -> Vec<(String, Value, bool)> {
        Vec::new()
    }
    /// Called before `/metrics` renders, to refresh gauges.
    fn before_metrics(&self) {}
    /// Answers a path this extension owns, or `None` to fall through.
    fn handle(
        &self,
        _method: &Method,
        _path: &str,
        _body: &[u8],
    ) -> Option<futures::future::BoxFuture<'static, (StatusCode, Value)>> {
        None
    }
}

pub struct AdminState {
    pub live: Arc<LiveConfig>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
    pub extensions: Vec<Arc<dyn AdminExtension>>,
    /// The traffic listener's address, probed until it accepts connections.
    traffic: SocketAddr,
    /// Set once the traffic listener has accepted a connection; never cleared.
    accepting: AtomicBool,
}

impl AdminState {
    pub fn new(
        live: Arc<LiveConfig>,
        metrics: Arc<Metrics>,
        lifecycle: Arc<Lifecycle>,
        extensions: Vec<Arc<dyn AdminExtension>>,
        traffic: SocketAddr,
    ) -> Self {
        Self {
            live,
            metrics,
            lifecycle,
            extensions,
            traffic,
            accepting: AtomicBool::new(false),
        }
    }

    fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }
}

/// How often the traffic listener is probed while outrider starts.
const LISTENER_PROBE_EVERY: Duration = Duration::from_millis(5);

/// Pingora binds the traffic listener inside `server.run()`, after the admin service is already
/// answering; until a TCP connect to it succeeds, `/health` and `/ready` answer 503 `starting`
/// so no probe sends traffic to a port that refuses it. Runs until the first success.
pub async fn watch_traffic_listener(state: Arc<AdminState>) {
    let target = probe_address(state.traffic);
    loop {
        if tokio::net::TcpStream::connect(target).await.is_ok() {
            state.accepting.store(true, Ordering::Release);
            tracing::info!(listen = %state.traffic, "traffic listener accepts connections");
            return;
        }
        tokio::time::sleep(LISTENER_PROBE_EVERY).await;
    }
}

/// Where to connect to reach a listener: a wildcard address is reached through loopback.
fn probe_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Serves admin requests until the listener fails; each connection in its own task.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        // Read per connection, so a reload changes it for the next connections.
        let read_timeout = state.live.snapshot().config.admin.read_timeout.get();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            // The header timeout also runs while a keep-alive connection waits for its next
            // request: a client that connects and sends nothing (or drips bytes) is dropped.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": code, "message": message }))
}

async fn handle(
    state: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // One snapshot for the whole request: the checks and the endpoint see the same config.
    let active = state.live.snapshot();
    let admin = &active.config.admin;
    let (parts, body) = req.into_parts();
    if let Err(refusal) = guard::check_host(&parts.headers, &admin.allowed_hosts) {
        return Ok(refused(refusal));
    }
    // HEAD is GET without the body (RFC 9110 §9.3.2): same status and headers.
    let head = parts.method == Method::HEAD;
    let method = if head {
        Method::GET
    } else {
        parts.method.clone()
    };
    // Anything but a read changes something; the token is checked before the body is read.
    if method != Method::GET {
        if let Err(refusal) = guard::check_token(&parts.headers, admin, active.admin_token.as_ref())
        {
            return Ok(refused(refusal));
        }
    }
    let body = match read_body(body, admin.read_timeout.get()).await {
        Ok(body) => body,
        Err(resp) => return Ok(resp),
    };
    if let Err(refusal) = guard::check_json_body(&parts.headers, &body) {
        return Ok(refused(refusal));
    }
    let accept = parts
        .headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let resp = endpoint(
        &state,
        &method,
        &parts.method,
        parts.uri.path(),
        accept,
        &body,
    )
    .await;
    Ok(if head { without_body(resp) } else { resp })
}

/// The whole body, bounded in size and in time (a client dripping it byte by byte does not hold
/// the connection past `admin.read_timeout`).
async fn read_body(body: Incoming, timeout: Duration) -> Result<Bytes, Response<Full<Bytes>>> {
    match tokio::time::timeout(timeout, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(_)) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "admin request bodies are limited to 64 KiB",
        )),
        Err(_) => {
            let mut resp = error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive within admin.read_timeout",
            );
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            Err(resp)
        }
    }
}

fn refused(refusal: guard::Refusal) -> Response<Full<Bytes>> {
    let mut resp = error(refusal.status, refusal.code, &refusal.message);
    if let Some((name, value)) = refusal.header() {
        resp.headers_mut().insert(name, value);
    }
    resp
}

/// The same response with an empty body and the `Content-Length` the body had.
fn without_body(resp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let (mut parts, body) = resp.into_parts();
    let len = body.size_hint().exact().unwrap_or(0);
    parts
        .headers
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    Response::from_parts(parts, Full::new(Bytes::new()))
}

/// Dispatches a request that passed the checks; `method` is GET for a HEAD request, `sent` is
/// the method as sent (for messages).
async fn endpoint(
    state: &AdminState,
    method: &Method,
    sent: &Method,
    path: &str,
    accept: Option<&str>,
    body: &[u8],
) -> Response<Full<Bytes>> {
    match (method.clone(), path) {
        (Method::GET, "/health" | "/ready") if !state.accepting() => starting(),
        (Method::GET, "/health") => json_response(StatusCode::OK, &json!({ "status": "ok" })),
        (Method::GET, "/ready") => ready(state),
        (Method::GET, "/metrics") => {
            for ext in &state.extensions {
                ext.before_metrics();
            }
            // Prometheus asks for OpenMetrics when it wants exemplars (trace ids on buckets).
            let (text, content_type) = if openmetrics::wanted(accept) {
                (
                    state.metrics.render_openmetrics(),
                    openmetrics::CONTENT_TYPE,
                )
            } else {
                (
                    state.metrics.render(),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            };
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            resp
        }
        (Method::GET, "/config") => config(state),
        (Method::POST, "/reload") => reload(state).await,
        (_, "/health" | "/ready" | "/metrics" | "/config" | "/reload") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{sent} is not allowed on {path}"),
        ),
        _ => {
            for ext in &state.extensions {
                if let Some(fut) = ext.handle(method, path, body) {
                    let (status, body) = fut.await;
                    return json_response(status, &body);
                }
            }
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no admin endpoint {path}"),
            )
        }
    }
}

fn starting() -> Response<Full<Bytes>> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({ "status": "starting", "message": "the traffic listener does not accept connections yet" }),
    )
}

fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    let active = state.live.snapshot();
    let draining = state.lifecycle.draining.load(Ordering::Relaxed);
    let mut checks = serde_json::Map::new();
    checks.insert(
        "config".into(),
        json!({ "status": "ok", "generation": active.generation }),
    );
    let mut ready = !draining;
    for ext in &state.extensions {
        for (name, status, blocking) in ext.readiness() {
            if blocking {
                ready = false;
            }
            checks.insert(name, status);
        }
    }
    let body = json!({
        "status": if draining { "draining" } else if ready { "ready" } else { "not_ready" },
        "checks": checks,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &body)
}

fn config(state: &AdminState) -> Response<Full<Bytes>> {
    let active = state.live.snapshot();
    let mut value = serde_json::to_value(&*active.config).unwrap_or(Value::Null);
    redact(&mut value);
    json_response(
        StatusCode::OK,
        &json!({
            "generation": active.generation,
            "source": state.live.path().map(|p| p.display().to_string()).unwrap_or_else(|| "embedded default".into()),
            "config": value,
        }),
    )
}

async fn reload(state: &AdminState) -> Response<Full<Bytes>> {
    let live = state.live.clone();
    let outcome = match tokio::task::spawn_blocking(move || live.reload("admin")).await {
        Ok(outcome) => outcome,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                &e.to_string(),
            )
        }
    };
    match outcome {
        ReloadOutcome::Applied {
            generation,
            restart_needed,
        } => json_response(
            StatusCode::OK,
            &json!({ "outcome": "applied", "generation": generation, "restart_needed": restart_needed }),
        ),
        ReloadOutcome::Unchanged { generation } => {
            let message = if state.live.path().is_none() {
                "running on the embedded default config: there is no file to reload"
            } else {
                "the file is unchanged"
            };
            json_response(
                StatusCode::OK,
                &json!({ "outcome": "unchanged", "generation": generation, "message": message }),
            )
        }
        ReloadOutcome::Rejected(e) => json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({
                "error": "config_invalid",
                "message": "the new config was rejected; the previous config keeps serving",
                "problems": e.lines(),
            }),
        ),
    }
}

/// Hides credentials anywhere in the config before it is shown: URL userinfo and credential
/// query parameters in every string ([`redact::url`]), the values of keys named like a
/// credential (`*token*`, `*password*`, `*secret*`, `*api_key*`; not `*_file`, which names where a
/// secret is read from), and the values of `*headers*` under an `otlp` section (exporter headers
/// carry API keys).
pub fn redact(value: &mut Value) {
    redact_in(value, false);
}

fn redact_in(value: &mut Value, in_otlp: bool) {
    match value {
        Value::String(s) => {
            if let Cow::Owned(redacted) = redact::url(s) {
                *s = redacted;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact_in(v, in_otlp)),
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let lower = key.to_ascii_lowercase();
                let names_a_secret = redact::is_secret_name(&lower) && !lower.ends_with("_file");
                if names_a_secret || (in_otlp && lower.contains("headers")) {
                    hide(v);
                } else {
                    redact_in(v, in_otlp || lower.contains("otlp"));
                }
            }
        }
        _ => {}
    }
}

/// Replaces every value under a secret key with `***`, keeping map keys (header names) and
/// leaving unset values (`null`, `""`) as they are, so an operator still sees what is unset.
fn hide(value: &mut Value) {
    match value {
        Value::Null => {}
        Value::String(s) if s.is_empty() => {}
        Value::Array(items) => items.iter_mut().for_each(hide),
        Value::Object(map) => map.values_mut().for_each(hide),
        _ => *value = Value::String(redact::HIDDEN.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listeners_are_probed_on_loopback() {
        let probe = |s: &str| probe_address(s.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(probe("[::]:8080"), "[::1]:8080");
        assert_eq!(probe("10.1.2.3:8080"), "10.1.2.3:8080");
    }

    fn redacted(mut v: Value) -> Value {
        redact(&mut v);
        v
    }

    #[test]
    fn url_credentials_are_redacted_in_every_string() {
        let v = redacted(json!({ "redis": { "url": "redis://:s3cret@redis:6379/0" }, "n": 1 }));
        assert_eq!(v["redis"]["url"], "redis://:***@redis:6379/0");
        assert_eq!(v["n"], 1);
        assert_eq!(
            redacted(json!("rediss://user:pw@host")),
            "rediss://user:***@host"
        );
        assert_eq!(
            redacted(json!(["redis://user:p@ss@host:6379"])),
            json!(["redis://user:***@host:6379"])
        );
        assert_eq!(
            redacted(json!({ "any": "unix:///run/redis.sock?pass=s3cret" })),
            json!({ "any": "unix:///run/redis.sock?pass=***" })
        );
        assert_eq!(
            redacted(json!("redis://h:6379/0?password=s3cret")),
            "redis://h:6379/0?password=***"
        );
        assert_eq!(
            redacted(json!("http://127.0.0.1:8000")),
            "http://127.0.0.1:8000"
        );
    }

    #[test]
    fn keys_named_like_credentials_are_hidden() {
        let v = redacted(json!({
            "admin": { "token": "hunter2", "token_file": "/run/secrets/admin-token", "listen": "0.0.0.0:9901" },
            "db": { "Password": "pw", "client_secret": "cs", "api_key": 12345, "auth_token": null },
            "llm": { "openai_api_key": "sk-1", "empty_token": "" },
            "nested": { "secrets": { "a": "x", "b": ["y", 2] } },
        }));
        assert_eq!(v["admin"]["token"], "***");
        assert_eq!(
            v["admin"]["token_file"], "/run/secrets/admin-token",
            "a path to a secret is not the secret"
        );
        assert_eq!(v["admin"]["listen"], "0.0.0.0:9901");
        assert_eq!(v["db"]["Password"], "***");
        assert_eq!(v["db"]["client_secret"], "***");
        assert_eq!(v["db"]["api_key"], "***");
        assert_eq!(v["db"]["auth_token"], Value::Null, "unset stays visible");
        assert_eq!(v["llm"]["openai_api_key"], "***");
        assert_eq!(v["llm"]["empty_token"], "");
        assert_eq!(
            v["nested"]["secrets"],
            json!({ "a": "***", "b": ["***", "***"] })
        );
    }

    #[test]
    fn otlp_headers_are_hidden_but_other_headers_are_not() {
        let v = redacted(json!({
            "telemetry": { "otlp": {
                "endpoint": "https://otel.example:4318",
                "headers": { "authorization": "Bearer abc", "x-honeycomb-team": "k" },
                "traces": { "extra_headers": ["dd-api-key=k"] },
            } },
            "routes": [ { "cache": { "key": { "headers": ["accept-language"] } } } ],
        }));
        let otlp = &v["telemetry"]["otlp"];
        assert_eq!(otlp["endpoint"], "https://otel.example:4318");
        assert_eq!(
            otlp["headers"],
            json!({ "authorization": "***", "x-honeycomb-team": "***" })
        );
        assert_eq!(otlp["traces"]["extra_headers"], json!(["***"]));
        assert_eq!(
            v["routes"][0]["cache"]["key"]["headers"],
            json!(["accept-language"]),
            "cache key header names are configuration, not credentials"
        );
    }
}
