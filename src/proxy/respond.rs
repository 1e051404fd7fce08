//! Responses outrider writes itself, and the latency headers every response carries.

use bytes::Bytes;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::ctx::Ctx;
use crate::pipeline::Answer;

/// Stable error codes in JSON error bodies; clients and tests match on these.
pub mod codes {
    pub const NO_ROUTE: &str = "no_route";
    pub const UPSTREAM_UNAVAILABLE: &str = "upstream_unavailable";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const INTERNAL: &str = "internal_error";
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
    pub const OVERLOADED: &str = "overloaded";
}

/// Every stage's say on a response header going to the client, then the latency headers.
pub fn finish_response_header(resp: &mut ResponseHeader, ctx: &mut Ctx) {
    let (stages, slots) = ctx.stages_and_slots();
    for (stage, slot) in stages.iter().zip(slots.iter()) {
        stage.on_response(slot, resp);
    }
    add_timing_headers(resp, ctx);
}

/// Writes a stage's answer (a stored entry, an in-process result) as the complete response.
pub async fn write_answer(
    session: &mut Session,
    ctx: &mut Ctx,
    answer: Answer,
) -> pingora_error::Result<()> {
    let Answer { mut header, body } = answer;
    finish_response_header(&mut header, ctx);
    let status = header.status.as_u16();
    ctx.own_status = Some(status);
    // 204 and 304 never carry a body (RFC 9110 §8.6); HEAD gets the GET answer's header only.
    let head_only =
        session.req_header().method == http::Method::HEAD || matches!(status, 204 | 304);
    session.write_response_header(header, head_only).await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Adds `x-request-id`, `x-response-time-ms` and `server-timing` to a response header.
pub fn add_timing_headers(resp: &mut ResponseHeader, ctx: &Ctx) {
    let total = ctx.started.elapsed();
    let mut total_ms = String::with_capacity(16);
    write_ms(&mut total_ms, total);
    let mut timing = String::with_capacity(80);
    timing.push_str("total;dur=");
    timing.push_str(&total_ms);
    if let Some(upstream) = ctx
        .upstream_elapsed
        .or_else(|| ctx.upstream_started.map(|s| s.elapsed()))
    {
        timing.push_str(", upstream;dur=");
        write_ms(&mut timing, upstream);
    }
    if let (Some(config), Some(route)) = (&ctx.config, ctx.route) {
        if let Some(route) = config.routes.get(route) {
            for (stage, slot) in route.stages.iter().zip(&ctx.slots) {
                stage.server_timing(slot, &mut timing);
            }
        }
    }
    // Insertion only fails for invalid values, which these formats cannot produce.
    let _ = resp.insert_header("x-response-time-ms", total_ms);
    let _ = resp.append_header("server-timing", timing);
    if !ctx.request_id.is_empty() {
        let _ = resp.insert_header("x-request-id", ctx.request_id.clone());
    }
}

/// Milliseconds with exactly three decimals, by integer arithmetic: float formatting with a
/// precision takes a slow path that showed up in profiles.
pub fn write_ms(out: &mut String, elapsed: std::time::Duration) {
    use std::fmt::Write;
    let micros = elapsed.as_micros();
    let _ = write!(out, "{}.{:03}", micros / 1000, micros % 1000);
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
        "request_id": ctx.request_id(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn milliseconds_have_three_decimals() {
        let mut s = String::new();
        write_ms(&mut s, Duration::from_micros(1_234_567));
        assert_eq!(s, "1234.567");
        s.clear();
        write_ms(&mut s, Duration::from_nanos(5_900));
        assert_eq!(s, "0.005");
        s.clear();
        write_ms(&mut s, Duration::ZERO);
        assert_eq!(s, "0.000");
    }
}
