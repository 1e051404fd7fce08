//! The admin HTTP service on its own listener: health, readiness, metrics, config, reload.
//! It never shares a port with traffic and binds to loopback unless told otherwise.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

pub mod cache;

use crate::config::{LiveConfig, ReloadOutcome};
use crate::proxy::Lifecycle;
use crate::telemetry::Metrics;

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
}

/// Serves admin requests until the listener fails; each connection in its own task.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
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
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Ok(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "admin request bodies are limited to 64 KiB",
            ))
        }
    };
    let resp = match (method.clone(), path.as_str()) {
        (Method::GET, "/health") => json_response(StatusCode::OK, &json!({ "status": "ok" })),
        (Method::GET, "/ready") => ready(&state),
        (Method::GET, "/metrics") => {
            for ext in &state.extensions {
                ext.before_metrics();
            }
            let mut resp = Response::new(Full::new(Bytes::from(state.metrics.render())));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (Method::GET, "/config") => config(&state),
        (Method::POST, "/reload") => reload(&state).await,
        (_, "/health" | "/ready" | "/metrics" | "/config" | "/reload") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{method} is not allowed on {path}"),
        ),
        _ => {
            let mut answered = None;
            for ext in &state.extensions {
                if let Some(fut) = ext.handle(&method, &path, &body) {
                    answered = Some(fut.await);
                    break;
                }
            }
            match answered {
                Some((status, body)) => json_response(status, &body),
                None => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no admin endpoint {path}"),
                ),
            }
        }
    };
    Ok(resp)
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

/// Hides credentials (URL passwords) anywhere in the config before it is shown.
pub fn redact(value: &mut Value) {
    match value {
        Value::String(s) => {
            if let Some(redacted) = redact_url(s) {
                *s = redacted;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::Object(map) => map.values_mut().for_each(redact),
        _ => {}
    }
}

fn redact_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let (userinfo, host) = rest.split_once('@')?;
    if host.contains('/') && userinfo.contains('/') {
        return None;
    }
    let user = userinfo.split(':').next().unwrap_or("");
    Some(format!("{scheme}://{user}:***@{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        let mut v = json!({ "redis": { "url": "redis://:s3cret@redis:6379/0" }, "n": 1 });
        redact(&mut v);
        assert_eq!(v["redis"]["url"], "redis://:***@redis:6379/0");
        let mut v = json!("rediss://user:pw@host");
        redact(&mut v);
        assert_eq!(v, "rediss://user:***@host");
        let mut v = json!("http://127.0.0.1:8000");
        redact(&mut v);
        assert_eq!(v, "http://127.0.0.1:8000");
    }
}
