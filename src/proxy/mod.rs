//! The Pingora `ProxyHttp` implementation: only phase wiring. It matches the route, chooses the
//! upstream, sets forwarding headers and maps failures to JSON errors; features live elsewhere.

pub mod ctx;
pub mod http_cache;
pub mod respond;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::cache::Cache;
use crate::config::schema::AccessLogFormat;
use crate::config::LiveConfig;
use crate::telemetry::logging::ACCESS_TARGET;
use crate::telemetry::{request_id, Metrics};
use ctx::{Ctx, InFlight};
use respond::codes;

const FROM_CACHE_NAME: &str = "answered_from_cache";
/// Marks the deliberate abandonment of an upstream response (a 304 that renewed the stored
/// entry, or a 5xx a stale entry stands in for) in favour of the cached entry.
const FROM_CACHE: ErrorType = ErrorType::Custom(FROM_CACHE_NAME);

/// State shared by the proxy and the process: set once SIGTERM/SIGINT arrives.
#[derive(Default)]
pub struct Lifecycle {
    pub draining: AtomicBool,
}

pub struct Outrider {
    pub live: Arc<LiveConfig>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
    pub cache: Arc<Cache>,
}

impl Outrider {
    fn record_upstream_error(&self, ctx: &mut Ctx, kind: &'static str) {
        ctx.upstream_error = Some(kind);
        self.metrics
            .upstream_errors
            .with_label_values(&[ctx.route_name(), kind])
            .inc();
    }
}

/// Classifies an upstream failure for metrics and picks the status the client sees.
fn classify_upstream_error(e: &Error) -> (&'static str, u16) {
    match e.etype() {
        ErrorType::ConnectRefused => ("connect_refused", 502),
        ErrorType::ConnectTimedout => ("connect_timeout", 504),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => ("timeout", 504),
        ErrorType::ConnectNoRoute | ErrorType::BindError => ("connect_error", 502),
        ErrorType::ConnectError | ErrorType::SocketError => ("connect_error", 502),
        ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::InvalidCert
        | ErrorType::HandshakeError => ("tls", 502),
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
            ("closed", 502)
        }
        ErrorType::InvalidHTTPHeader | ErrorType::H1Error | ErrorType::H2Error => ("protocol", 502),
        ErrorType::Custom("dns") => ("dns", 502),
        _ => ("other", 502),
    }
}

#[async_trait]
impl ProxyHttp for Outrider {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new(InFlight::enter(&self.metrics.in_flight))
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let config = self.live.snapshot();
        ctx.request_id = match session.req_header().headers.get("x-request-id") {
            // Cloning the client's value shares its bytes.
            Some(id) if request_id::accept(id.as_bytes()).is_some() => id.clone(),
            _ => request_id::generate_header(),
        };
        if self.lifecycle.draining.load(Ordering::Relaxed) {
            // Tell keep-alive clients to reconnect elsewhere while we drain.
            session.set_keepalive(None);
        }
        let req = session.req_header();
        ctx.route = config.match_route(req.method.as_str(), req.uri.path());
        let route_name = ctx
            .route
            .and_then(|i| config.routes.get(i))
            .map(|r| &*r.name)
            .unwrap_or("none");
        ctx.metrics = Some(self.metrics.route(route_name));
        let Some(index) = ctx.route else {
            ctx.config = Some(config);
            let message = format!(
                "no route matches {} {}",
                session.req_header().method,
                session.req_header().uri.path()
            );
            respond::json_error(session, ctx, 404, codes::NO_ROUTE, &message, None).await?;
            return Ok(true);
        };
        let cache_stage = config.routes.get(index).and_then(|route| {
            route
                .cache_policy
                .clone()
                .map(|policy| (policy, route.name.clone(), route.upstream.clone()))
        });
        ctx.config = Some(config);
        if let Some((policy, name, upstream)) = cache_stage {
            let step =
                http_cache::on_request(&self.cache, session, ctx, policy, &name, &upstream).await?;
            if matches!(step, http_cache::Step::Answered) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(route) = ctx.route() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no route selected",
            ));
        };
        let upstream = route.upstream.clone();
        let addr = match upstream.address().await {
            Ok(addr) => addr,
            Err(e) => {
                return Err(Error::explain(
                    ErrorType::Custom("dns"),
                    format!("cannot resolve upstream {}: {e}", upstream.host),
                )
                .into_up())
            }
        };
        let sni = if upstream.tls {
            upstream.host.clone()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(addr, upstream.tls, sni);
        peer.options.connection_timeout = Some(upstream.connect_timeout);
        peer.options.total_connection_timeout = Some(upstream.connect_timeout * 2);
        peer.options.read_timeout = Some(upstream.timeout);
        peer.options.write_timeout = Some(upstream.timeout);
        ctx.upstream_started = Some(Instant::now());
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        upstream_request.insert_header("x-request-id", ctx.request_id.clone())?;
        http_cache::on_upstream_request(ctx, upstream_request);
        if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
            use std::fmt::Write;
            let mut forwarded = String::with_capacity(48);
            if let Some(prior) = upstream_request
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                forwarded.push_str(prior);
                forwarded.push_str(", ");
            }
            let _ = write!(forwarded, "{}", addr.ip());
            upstream_request.insert_header("x-forwarded-for", forwarded)?;
        }
        // Behind an ingress that terminated TLS the client's scheme is already recorded; keep it.
        if !upstream_request.headers.contains_key("x-forwarded-proto") {
            upstream_request
                .insert_header("x-forwarded-proto", http::HeaderValue::from_static("http"))?;
        }
        if let Some(route) = ctx.route() {
            // A TLS upstream (a provider API) routes by Host; a local app sees the client's Host,
            // so only the rewritten case needs X-Forwarded-Host to keep the original.
            if route.upstream.tls {
                if let Some(host) = upstream_request.headers.get(http::header::HOST).cloned() {
                    if !upstream_request.headers.contains_key("x-forwarded-host") {
                        upstream_request.insert_header("x-forwarded-host", host)?;
                    }
                }
                let host = if route.upstream.port == 443 {
                    route.upstream.host.clone()
                } else {
                    format!("{}:{}", route.upstream.host, route.upstream.port)
                };
                upstream_request.insert_header(http::header::HOST, host)?;
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let verdict = http_cache::on_upstream_response(
            &self.cache,
            ctx,
            upstream_response,
            self.cache.settings().max_entry_size,
        );
        if let Some(started) = ctx.upstream_started {
            let elapsed = started.elapsed();
            ctx.upstream_elapsed = Some(elapsed);
            if let Some(metrics) = &ctx.metrics {
                metrics.upstream_duration.observe(elapsed.as_secs_f64());
            }
        }
        if matches!(verdict, http_cache::UpstreamVerdict::AnswerFromCache) {
            // Abandon the upstream response; `fail_to_proxy` writes the stored entry.
            return Err(Error::explain(
                FROM_CACHE,
                "answering from the cache instead of the upstream response",
            ));
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        http_cache::add_cache_headers(upstream_response, ctx);
        respond::add_timing_headers(upstream_response, ctx);
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        http_cache::on_body_chunk(&self.cache, ctx, body, end_of_stream);
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        e: Box<Error>,
    ) -> Box<Error> {
        let (kind, _) = classify_upstream_error(&e);
        self.record_upstream_error(ctx, kind);
        e
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, error: &Error) -> bool {
        // Not an error: the cached entry was confirmed and is being served.
        matches!(error.etype(), ErrorType::Custom(name) if *name == FROM_CACHE_NAME)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if let Some(cached) = http_cache::take_cached_answer(ctx) {
            if session.response_written().is_none() {
                if let Err(write_error) = http_cache::serve_entry(session, ctx, &cached).await {
                    tracing::debug!(error = %write_error, "could not write the cached response");
                }
                return FailToProxy {
                    error_code: cached.status,
                    can_reuse_downstream: false,
                };
            }
        }
        let upstream_side = matches!(e.esource(), ErrorSource::Upstream)
            || matches!(e.etype(), ErrorType::Custom("dns"));
        let (status, code, kind) = if upstream_side {
            let (kind, status) = classify_upstream_error(e);
            if ctx.upstream_error.is_none() {
                self.record_upstream_error(ctx, kind);
            }
            (status, codes::UPSTREAM_UNAVAILABLE, Some(kind))
        } else {
            match e.esource() {
                ErrorSource::Downstream => match e.etype() {
                    // The client is gone; there is nobody to answer.
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        ctx.own_status = Some(499);
                        return FailToProxy {
                            error_code: 0,
                            can_reuse_downstream: false,
                        };
                    }
                    _ => (400, codes::BAD_REQUEST, None),
                },
                _ => (500, codes::INTERNAL, None),
            }
        };
        if session.response_written().is_some() {
            // Headers already went out: the only honest signal left is closing the connection.
            ctx.own_status = Some(status);
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: false,
            };
        }
        if upstream_side {
            if let Some(stale) = http_cache::stale_for_error(ctx) {
                match http_cache::serve_entry(session, ctx, &stale).await {
                    Ok(()) => {
                        return FailToProxy {
                            error_code: stale.status,
                            can_reuse_downstream: false,
                        }
                    }
                    Err(write_error) => {
                        tracing::debug!(error = %write_error, "could not write stale response");
                    }
                }
            }
        }
        let route = ctx.route_name().to_string();
        let message = match (code, kind) {
            (codes::UPSTREAM_UNAVAILABLE, Some(kind)) => {
                format!("upstream for route {route} failed: {kind}")
            }
            _ => e.to_string(),
        };
        let extra = kind.map(|k| ("kind", k));
        // The connection may hold unread request bytes; say `Connection: close` so the client
        // does not reuse it and race our close.
        session.set_keepalive(None);
        if let Err(write_error) =
            respond::json_error(session, ctx, status, code, &message, extra).await
        {
            tracing::debug!(error = %write_error, "could not write error response");
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Ctx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.own_status)
            .unwrap_or(0);
        let elapsed = ctx.started.elapsed();
        let route = ctx.route_name();
        http_cache::record(&self.cache, ctx, route);
        let method = session.req_header().method.as_str();
        let metrics = match &ctx.metrics {
            Some(m) => m.clone(),
            None => self.metrics.route(route),
        };
        metrics.count_request(method, status);
        metrics.duration.observe(elapsed.as_secs_f64());

        let log_format = ctx
            .config
            .as_ref()
            .map(|c| c.config.telemetry.access_log)
            .unwrap_or_default();
        if log_format == AccessLogFormat::Off {
            return;
        }
        let req = session.req_header();
        tracing::info!(
            target: ACCESS_TARGET,
            route,
            method,
            path = req.uri.path(),
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            upstream_ms = ctx.upstream_elapsed.map(|d| d.as_secs_f64() * 1000.0),
            upstream_error = ctx.upstream_error,
            request_id = ctx.request_id(),
            client = session.client_addr().map(|a| a.to_string()),
            error = error.map(|e| e.to_string()),
            "request"
        );
    }
}
