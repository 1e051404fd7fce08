//! Responses outrider writes itself, and the latency headers every response carries.

use std::time::Instant;

use bytes::Bytes;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::ctx::Ctx;

/// Stable error codes in JSON error bodies; clients and tests match on these.
pub mod codes {
    pub const NO_ROUTE: &str = "no_route";
    pub const UPSTREAM_UNAVAILABLE: &str = "upstream_unavailable";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const INTERNAL: &str = "internal_error";
}

/// Adds `x-request-id`, `x-response-time-ms` and `server-timing` to a response header.
pub fn add_timing_headers(resp: &mut ResponseHeader, ctx: &Ctx) {
    let total_ms = ctx.started.elapsed().as_secs_f64() * 1000.0;
    let mut timing = format!("total;dur={total_ms:.3}");
    if let Some(upstream) = ctx
        .upstream_elapsed
        .or_else(|| ctx.upstream_started.map(|s| s.elapsed()))
    {
        timing.push_str(&format!(
            ", upstream;dur={:.3}",
            upstream.as_secs_f64() * 1000.0
        ));
    }
    if let Some(cache) = ctx.http_cache.as_ref() {
        timing.push_str(", cache;desc=");
        timing.push_str(cache.server_timing_desc());
    }
    // Insertion only fails for invalid values, which these formats cannot produce.
    let _ = resp.insert_header("x-response-time-ms", format!("{total_ms:.3}"));
    let _ = resp.append_header("server-timing", timing);
    if !ctx.request_id.is_empty() {
        let _ = resp.insert_header("x-request-id", ctx.request_id.as_str());
    }
}

/// Writes a complete JSON error response: `{"error": code, "message": ..., "request_id": ...}`.
pub async fn json_error(
    session: &mut Session,
    ctx: &mut Ctx,
    status: u16,
    code: &str,
    message: &str,
    extra: Option<(&str, &str)>,
) -> pingora_error::Result<()> {
    let mut body = serde_json::json!({
        "error": code,
        "message": message,
        "request_id": ctx.request_id,
    });
    if let (Some((key, value)), Some(map)) = (extra, body.as_object_mut()) {
        map.insert(
            key.to_string(),
            serde_json::Value::String(value.to_string()),
        );
    }
    let body = Bytes::from(body.to_string());
    let mut resp = ResponseHeader::build(status, Some(5))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    ctx.own_status = Some(status);
    add_timing_headers(&mut resp, ctx);
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Milliseconds since `start`, for logs.
pub fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}
