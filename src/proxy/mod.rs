//! The Pingora `ProxyHttp` implementation: only phase wiring. It matches the route, runs the
//! route's stages in each phase, chooses the upstream, sets forwarding headers and maps failures
//! to JSON errors. It names no feature: capabilities are [`Stage`]s listed by the route.

pub mod body;
pub mod ctx;
pub mod forward;
pub mod respond;
pub mod subrequest;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tokio::sync::Semaphore;

use crate::config::schema::AccessLogFormat;
use crate::config::LiveConfig;
use crate::pipeline::SpanNotes;
use crate::pipeline::{Completion, RequestCx, ResponseVerdict, UpstreamFailure, Verdict, SHED};
use crate::store::InflightBudget;
use crate::telemetry::logging::ACCESS_TARGET;
use crate::telemetry::trace::{RequestFacts, Tracing};
use crate::telemetry::{request_id, Metrics};
use ctx::{Ctx, InFlight};
use respond::codes;
use subrequest::{BackgroundWork, Delegation, Intent};

/// Connection-pool group keys for retries, each retry's own (see `error_while_proxy`).
static RETRY_GROUPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Background requests (stage work such as cache refreshes) running at once, across all keys.
pub const MAX_BACKGROUND: usize = 64;

/// State shared by the proxy and the process: set once SIGTERM/SIGINT arrives.
#[derive(Default)]
pub struct Lifecycle {
    pub draining: AtomicBool,
}

pub struct Outrider {
    pub live: Arc<LiveConfig>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
    /// Permits for background requests; work beyond them is dropped, never queued.
    pub background: Arc<Semaphore>,
    pub tracing: Arc<Tracing>,
    /// Bytes of request bodies buffered for stages, across requests (`limits.max_buffered_bodies`).
    pub bodies: Arc<InflightBudget>,
}

impl Outrider {
    pub fn new(
        live: Arc<LiveConfig>,
        metrics: Arc<Metrics>,
        lifecycle: Arc<Lifecycle>,
        tracing: Arc<Tracing>,
    ) -> Self {
        let max_bodies = live.snapshot().config.limits.max_buffered_bodies.0;
        Outrider {
            bodies: InflightBudget::new(usize::try_from(max_bodies).unwrap_or(usize::MAX)),
            live,
            metrics,
            lifecycle,
            background: Arc::new(Semaphore::new(MAX_BACKGROUND)),
            tracing,
        }
    }

    /// While draining, every response tells the client to reconnect (elsewhere), including
    /// those of requests that started before the signal.
    fn close_if_draining(&self, session: &mut Session) {
        if self.lifecycle.draining.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        }
    }

    fn record_upstream_error(&self, ctx: &mut Ctx, kind: &'static str) {
        ctx.upstream_error = Some(kind);
        if let Some(trace) = ctx.trace.as_mut() {
            trace.upstream_failed(kind);
        }
        self.metrics
            .upstream_errors
            .with_label_values(&[ctx.route_name(), kind])
            .inc();
    }

    /// Runs the route's stages on a new request: the body first when one asks for it, then
    /// each `on_request` until one answers. `Ok(true)` when the request has been answered.
    async fn run_stages(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // The config snapshot is held apart from `ctx` so stages can be borrowed while the
        // request's slots are mutated (no per-request copy of the stage list).
        let (Some(config), Some(index)) = (ctx.config.clone(), ctx.route) else {
            return Ok(false);
        };
        let Some(route) = config.routes.get(index) else {
            return Ok(false);
        };
        let (stages, max_body) = (&route.stages, route.max_body);
        if stages.is_empty() {
            return Ok(false);
        }
        ctx.slots.resize_with(stages.len(), || None);
        let wants_body = stages.iter().any(|s| s.wants_body(session.req_header()));
        let body = if wants_body {
            match body::read_bounded(session, max_body, &self.bodies).await {
                Ok((body, reservation)) => {
                    ctx.body_reservation = Some(reservation);
                    Some(body)
                }
                Err(body::BodyError::OverBudget) => {
                    self.metrics.bodies_over_budget.inc();
                    // The body stays unread: the connection cannot be reused.
                    session.set_keepalive(None);
                    let message = body::BodyError::OverBudget.to_string();
                    respond::json_error(session, ctx, 503, codes::OVERLOADED, &message, None)
                        .await?;
                    return Ok(true);
                }
                Err(body::BodyError::TooLarge { limit }) => {
                    // The rest of the body stays unread: the connection cannot be reused.
                    session.set_keepalive(None);
                    let spoken = stages
                        .iter()
                        .find_map(|stage| stage.body_too_large(session.req_header(), limit));
                    if let Some(answer) = spoken {
                        respond::write_answer(session, ctx, answer).await?;
                        return Ok(true);
                    }
                    let message =
                        format!("request body larger than this route's max_body ({limit} bytes)");
                    respond::json_error(
                        session,
                        ctx,
                        413,
                        codes::PAYLOAD_TOO_LARGE,
                        &message,
                        None,
                    )
                    .await?;
                    return Ok(true);
                }
                Err(body::BodyError::Read(e)) => return Err(e),
            }
        } else {
            None
        };
        ctx.buffered_len = body.as_ref().map(Bytes::len);
        let timeout = route.upstream_timeout();
        let route_name: &str = &route.name;
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let arrived = ctx.started;
        for (index, stage) in stages.iter().enumerate() {
            let verdict = {
                let Ctx { slots, effects, .. } = &mut *ctx;
                let Some(slot) = slots.get_mut(index) else {
                    break;
                };
                let mut cx = RequestCx::new(
                    session.req_header(),
                    body.as_ref(),
                    route_name,
                    timeout,
                    slot,
                    index,
                    effects,
                );
                cx.client_ip = client_ip;
                cx.arrived = arrived;
                stage.on_request(&mut cx).await
            };
            match verdict {
                Ok(Verdict::Continue) => {}
                Ok(Verdict::Answer(answer)) => {
                    self.spawn_background_work(session, ctx);
                    self.close_if_draining(session);
                    respond::write_answer(session, ctx, answer).await?;
                    return Ok(true);
                }
                Ok(Verdict::Shed(answer)) => {
                    // An earlier stage may stand in for the upstream we are not calling.
                    let failure = UpstreamFailure { kind: SHED };
                    let (stages, slots) = ctx.stages_and_slots();
                    let stand_in = stages
                        .iter()
                        .zip(slots.iter_mut())
                        .take(index)
                        .find_map(|(stage, slot)| stage.on_upstream_failure(slot, &failure));
                    self.close_if_draining(session);
                    respond::write_answer(session, ctx, stand_in.unwrap_or(answer)).await?;
                    return Ok(true);
                }
                Err(refusal) => {
                    respond::json_error(
                        session,
                        ctx,
                        refusal.status,
                        refusal.code,
                        &refusal.message,
                        None,
                    )
                    .await?;
                    return Ok(true);
                }
            }
        }
        self.spawn_background_work(session, ctx);
        if let Some(body) = body {
            if session.as_ref().retry_buffer_truncated() {
                return self.delegate(session, ctx, body).await;
            }
        }
        Ok(false)
    }

    /// Starts the background work stages asked for, each as a request of its own.
    fn spawn_background_work(&self, session: &Session, ctx: &mut Ctx) {
        if ctx.effects.background.is_empty() {
            return;
        }
        let (Some(config), Some(route)) = (ctx.config.clone(), ctx.route) else {
            return;
        };
        let jobs = std::mem::take(&mut ctx.effects.background);
        for (stage, job) in jobs {
            let Ok(permit) = self.background.clone().try_acquire_owned() else {
                tracing::debug!(
                    route = ctx.route_name(),
                    "background work dropped: {MAX_BACKGROUND} already running"
                );
                continue;
            };
            let work = BackgroundWork {
                config: config.clone(),
                route,
                stage,
                job,
                request_id: ctx.request_id.clone(),
                upstream: ctx.effects.upstream.clone(),
                permit,
            };
            if !subrequest::spawn_background(session, work) {
                tracing::debug!("background work dropped: subrequests unavailable");
            }
        }
    }

    /// Hands a request whose buffered body is too large for Pingora's replay to a subrequest.
    async fn delegate(&self, session: &mut Session, ctx: &mut Ctx, body: Bytes) -> Result<bool> {
        let (Some(config), Some(route)) = (ctx.config.clone(), ctx.route) else {
            return Ok(false);
        };
        let delegation = Delegation {
            config,
            route,
            request_id: ctx.request_id.clone(),
            slots: std::mem::take(&mut ctx.slots),
            effects: std::mem::take(&mut ctx.effects),
            buffered_len: ctx.buffered_len,
            started: ctx.started,
            metrics: ctx.metrics.clone(),
            trace: ctx.trace.take(),
        };
        ctx.delegated = true;
        // The subrequest's answer is written on this session: the draining rule applies here.
        self.close_if_draining(session);
        if let Err(e) = subrequest::delegate(session, delegation, body).await {
            // Nothing reached the client: answer and count this request here after all.
            ctx.delegated = false;
            if ctx.trace.is_none() {
                ctx.trace = Some(self.tracing.begin(session.req_header(), None));
            }
            return Err(e);
        }
        Ok(true)
    }

    /// Adopts what the parent request passed to this subrequest.
    async fn adopt(&self, session: &mut Session, ctx: &mut Ctx, intent: Intent) -> Result<bool> {
        // A subrequest is built from the client's original request bytes: apply the same
        // target rule the parent did (the parent already refused what it refuses).
        if forward::to_origin_form(session.req_header_mut()).is_err() {
            return Ok(true);
        }
        match intent {
            Intent::Delegated(d) => {
                ctx.config = Some(d.config);
                ctx.route = Some(d.route);
                ctx.request_id = d.request_id;
                ctx.slots = d.slots;
                ctx.effects = d.effects;
                ctx.buffered_len = d.buffered_len;
                ctx.started = d.started;
                ctx.metrics = d.metrics;
                ctx.trace = d.trace;
                Ok(false)
            }
            Intent::Background(work) => {
                ctx.background = true;
                // Background work continues the trace of the request bytes it was built from.
                let ratio = work.config.config.telemetry.otlp.sample_ratio;
                ctx.trace = Some(self.tracing.begin(session.req_header(), ratio));
                ctx.request_id = work.request_id;
                ctx.effects.upstream = work.upstream;
                ctx.route = Some(work.route);
                let Some(route) = work.config.routes.get(work.route) else {
                    return Ok(false);
                };
                let stages = route.stages.clone();
                let timeout = route.upstream_timeout();
                let route_name = route.name.to_string();
                ctx.metrics = Some(self.metrics.route(&route_name));
                ctx.config = Some(work.config);
                ctx.slots.resize_with(stages.len(), || None);
                let Some(stage) = stages.get(work.stage) else {
                    return Ok(false);
                };
                let verdict = {
                    let Ctx { slots, effects, .. } = &mut *ctx;
                    let Some(slot) = slots.get_mut(work.stage) else {
                        return Ok(false);
                    };
                    let mut cx = RequestCx::new(
                        session.req_header(),
                        None,
                        &route_name,
                        timeout,
                        slot,
                        work.stage,
                        effects,
                    );
                    stage.on_background(&mut cx, work.job).await
                };
                // The permit is held until this request ends.
                ctx.background_permit = Some(work.permit);
                match verdict {
                    Ok(Verdict::Continue) => Ok(false),
                    Ok(Verdict::Answer(answer)) | Ok(Verdict::Shed(answer)) => {
                        respond::write_answer(session, ctx, answer).await?;
                        Ok(true)
                    }
                    Err(_) => Ok(true),
                }
            }
        }
    }
}

impl Outrider {
    /// Hands the request's spans to the exporter, with what its stages noted.
    fn finish_trace(&self, session: &Session, ctx: &mut Ctx, status: u16) {
        let Some(trace) = ctx.trace.take() else {
            return;
        };
        if !(trace.sampled && self.tracing.exporting()) {
            ctx.trace = Some(trace);
            return;
        }
        let mut notes = SpanNotes::default();
        {
            let (stages, slots) = ctx.stages_and_slots();
            for (stage, slot) in stages.iter().zip(slots.iter()) {
                stage.span_notes(slot, &mut notes);
            }
        }
        let req = session.req_header();
        let header =
            |name: http::header::HeaderName| req.headers.get(name).and_then(|v| v.to_str().ok());
        let host = req
            .uri
            .host()
            .or_else(|| header(http::header::HOST))
            .map(strip_port);
        let facts = RequestFacts {
            method: req.method.as_str(),
            path: req.uri.path(),
            route: ctx.route_name(),
            http_route: ctx.route().map(|r| &*r.http_route),
            status,
            server_address: host,
            client_address: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip().to_string()),
            user_agent: header(http::header::USER_AGENT),
            request_id: Some(ctx.request_id()),
        };
        self.tracing.finish(&trace, &facts, notes);
        ctx.trace = Some(trace);
    }
}

/// `host` of `host:port` (and `[v6]` of `[v6]:port`), as `server.address` wants it.
fn strip_port(authority: &str) -> &str {
    if let Some(end) = authority.find(']') {
        return &authority[..=end];
    }
    authority.split(':').next().unwrap_or(authority)
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

    fn allow_spawning_subrequest(&self, session: &Session, _ctx: &Ctx) -> bool {
        // Client requests may start subrequests; subrequests themselves may not.
        session.subrequest_ctx.is_none()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if let Some(intent) = subrequest::take_intent(session) {
            return self.adopt(session, ctx, intent).await;
        }
        let config = self.live.snapshot();
        ctx.trace = Some(self.tracing.begin(
            session.req_header(),
            config.config.telemetry.otlp.sample_ratio,
        ));
        ctx.request_id = match session.req_header().headers.get("x-request-id") {
            // Cloning the client's value shares its bytes.
            Some(id) if request_id::accept(id.as_bytes()).is_some() => id.clone(),
            _ => request_id::generate_header(),
        };
        if self.lifecycle.draining.load(Ordering::Relaxed) {
            // Tell keep-alive clients to reconnect elsewhere while we drain.
            session.set_keepalive(None);
        }
        let target = forward::check_host(session.req_header())
            .and_then(|()| forward::to_origin_form(session.req_header_mut()));
        if let Err(e) = target {
            ctx.config = Some(config);
            ctx.metrics = Some(self.metrics.route("none"));
            // The connection may hold a body we will not read.
            session.set_keepalive(None);
            respond::json_error(session, ctx, 400, codes::BAD_REQUEST, &e.to_string(), None)
                .await?;
            return Ok(true);
        }
        let req = session.req_header();
        ctx.route = config.match_route(req.method.as_str(), req.uri.path());
        let route_name = ctx
            .route
            .and_then(|i| config.routes.get(i))
            .map(|r| &*r.name)
            .unwrap_or("none");
        ctx.metrics = Some(self.metrics.route(route_name));
        ctx.config = Some(config);
        if ctx.route.is_none() {
            let message = format!(
                "no route matches {} {}",
                session.req_header().method,
                session.req_header().uri.path()
            );
            respond::json_error(session, ctx, 404, codes::NO_ROUTE, &message, None).await?;
            return Ok(true);
        }
        self.run_stages(session, ctx).await
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(replacement) = &ctx.effects.body {
            body::substitute(body, end_of_stream, replacement);
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let upstream = ctx.upstream();
        let Some(upstream) = upstream else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no upstream selected",
            ));
        };
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
        if ctx.upstream_retries > 0 {
            // The retry must not draw another pooled connection that may be as dead as the
            // first: a group key of its own gives it a fresh one (which does not linger in the
            // pool, where nothing else would pick it).
            peer.group_key = RETRY_GROUPS.fetch_add(1, Ordering::Relaxed);
            peer.options.idle_timeout = Some(std::time::Duration::from_secs(1));
        }
        // A stage's deadline cuts every upstream wait to the time the request has left.
        let left = match ctx.effects.deadline {
            Some(deadline) => {
                let left = deadline.saturating_sub(ctx.started.elapsed());
                if left.is_zero() {
                    return Err(Error::explain(
                        ErrorType::ConnectTimedout,
                        "request deadline passed before the upstream was contacted",
                    )
                    .into_up());
                }
                left
            }
            None => std::time::Duration::MAX,
        };
        peer.options.connection_timeout = Some(upstream.connect_timeout.min(left));
        peer.options.total_connection_timeout = Some((upstream.connect_timeout * 2).min(left));
        peer.options.read_timeout = Some(upstream.timeout.min(left));
        peer.options.write_timeout = Some(upstream.timeout.min(left));
        ctx.upstream_started = Some(Instant::now());
        if let Some(trace) = ctx.trace.as_mut() {
            trace.upstream_started(&upstream.name, &upstream.host, upstream.port);
        }
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let upstream = ctx.upstream();
        forward::apply_forwarding_headers(
            upstream_request,
            client_ip,
            upstream.as_deref(),
            &ctx.request_id,
        )?;
        // A body outrider holds in full goes upstream with its length: some app servers refuse
        // chunked requests, and the expectation was already answered here.
        // Judged on the client's header: Pingora strips framing headers from the upstream copy.
        let client = &session.req_header().headers;
        let had_body = client.contains_key(http::header::CONTENT_LENGTH)
            || client.contains_key(http::header::TRANSFER_ENCODING);
        let forwarded_len = ctx
            .effects
            .body
            .as_ref()
            .map(Bytes::len)
            .or(ctx.buffered_len.filter(|_| had_body));
        if let Some(len) = forwarded_len {
            upstream_request.remove_header(&http::header::TRANSFER_ENCODING);
            upstream_request.remove_header(&http::header::EXPECT);
            upstream_request.insert_header(http::header::CONTENT_LENGTH, len)?;
        }
        if let Some(trace) = &ctx.trace {
            trace.inject(upstream_request)?;
        }
        let (stages, slots) = ctx.stages_and_slots();
        for (stage, slot) in stages.iter().zip(slots.iter_mut()) {
            stage.on_upstream_request(slot, upstream_request);
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(trace) = ctx.trace.as_mut() {
            trace.upstream_event("connected", Some(reused));
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(started) = ctx.upstream_started {
            let elapsed = started.elapsed();
            ctx.upstream_elapsed = Some(elapsed);
            if let Some(metrics) = &ctx.metrics {
                metrics.upstream_duration.observe(elapsed.as_secs_f64());
            }
        }
        if let Some(trace) = ctx.trace.as_mut() {
            trace.upstream_event("response_header", None);
            trace.upstream_status(upstream_response.status.as_u16());
        }
        let (stages, slots) = ctx.stages_and_slots();
        let mut replacement = None;
        for (stage, slot) in stages.iter().zip(slots.iter_mut()) {
            if let ResponseVerdict::Replace(answer) =
                stage.on_upstream_response(slot, upstream_response)
            {
                replacement = Some(answer);
                break;
            }
        }
        if let Some(answer) = replacement {
            self.close_if_draining(session);
            // Answer now; the upstream response is still read to its end (so its connection
            // is reused) but nothing of it reaches the client, and the client's connection
            // stays open for its next request.
            respond::write_answer(session, ctx, answer).await?;
            ctx.answered = true;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.close_if_draining(session);
        if !ctx.answered {
            respond::finish_response_header(upstream_response, ctx);
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        if ctx.answered {
            // A stage already answered in place of this upstream response.
            *body = None;
            return Ok(None);
        }
        if end_of_stream {
            if let Some(trace) = ctx.trace.as_mut() {
                trace.upstream_done();
            }
        }
        let (stages, slots) = ctx.stages_and_slots();
        for (stage, slot) in stages.iter().zip(slots.iter_mut()) {
            stage.filter_body_chunk(slot, body, end_of_stream);
        }
        for (stage, slot) in stages.iter().zip(slots.iter_mut()) {
            stage.on_body_chunk(slot, body.as_ref(), end_of_stream);
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let (kind, _) = classify_upstream_error(&e);
        self.record_upstream_error(ctx, kind);
        // One attempt, as nginx and Varnish make with a single server: a refused or timed-out
        // connect tried again only doubles the client's wait.
        e.set_retry(false);
        e
    }

    /// An idempotent request that failed on a reused (pooled) connection before any of the
    /// response reached the client is tried once more, on a fresh connection: the origin
    /// likely closed the idle connection as it was picked. Only once: Pingora's default
    /// tries up to 16 times, one per pooled connection, which turned one client GET into 16
    /// origin requests against an origin that closes without answering.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // Pingora marks an error retryable-if-reused only when nothing of the response was
        // received; everything else comes here already decided against a retry.
        e.retry.decide_reuse(client_reused);
        let retry = e.retry()
            && ctx.upstream_retries == 0
            && session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        e.set_retry(retry);
        if retry {
            ctx.upstream_retries += 1;
            self.metrics
                .upstream_retries
                .with_label_values(&[ctx.route_name()])
                .inc();
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let upstream_side = matches!(e.esource(), ErrorSource::Upstream)
            || matches!(e.etype(), ErrorType::Custom("dns"));
        let past_deadline = ctx
            .effects
            .deadline
            .is_some_and(|deadline| ctx.started.elapsed() >= deadline);
        let (status, code, kind) = if upstream_side && past_deadline {
            if ctx.upstream_error.is_none() {
                self.record_upstream_error(ctx, "deadline");
            }
            (504, codes::DEADLINE_EXCEEDED, Some("deadline"))
        } else if upstream_side {
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
        if let Some(kind) = kind {
            let failure = UpstreamFailure { kind };
            let (stages, slots) = ctx.stages_and_slots();
            let answer = stages
                .iter()
                .zip(slots.iter_mut())
                .find_map(|(stage, slot)| stage.on_upstream_failure(slot, &failure));
            if let Some(answer) = answer {
                let status = answer.header.status.as_u16();
                // Pingora ends the client connection after a failed upstream attempt: say so,
                // so the client does not send its next request on a connection about to close.
                session.set_keepalive(None);
                match respond::write_answer(session, ctx, answer).await {
                    Ok(()) => {
                        return FailToProxy {
                            error_code: status,
                            can_reuse_downstream: false,
                        }
                    }
                    Err(write_error) => {
                        tracing::debug!(error = %write_error, "could not write the stage's answer");
                    }
                }
            }
        }
        let route = ctx.route_name().to_string();
        let message = match (code, kind) {
            (codes::DEADLINE_EXCEEDED, _) => {
                format!("route {route} could not answer within its deadline")
            }
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
        if ctx.delegated {
            // The subrequest that answered counts and logs this request.
            return;
        }
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.own_status)
            .unwrap_or(0);
        let elapsed = ctx.started.elapsed();
        let route = ctx.route_name().to_owned();
        let done = Completion {
            route: &route,
            status,
            duration: elapsed,
            background: ctx.background,
            upstream_failed: ctx.upstream_error.is_some(),
        };
        let (stages, slots) = ctx.stages_and_slots();
        for (stage, slot) in stages.iter().zip(slots.iter_mut()) {
            stage.on_complete(slot, &done);
        }
        let method = session.req_header().method.as_str();
        let metrics = match &ctx.metrics {
            Some(m) => m.clone(),
            None => self.metrics.route(&route),
        };
        metrics.count_request(method, status);
        let trace_id = ctx.trace.as_ref().map(|t| t.trace_id_hex());
        match (&ctx.trace, &trace_id) {
            // An exemplar must point at a trace that exists somewhere: only exported ones.
            (Some(trace), Some(id)) if trace.sampled && self.tracing.exporting() => {
                metrics.observe_duration_with_exemplar(elapsed.as_secs_f64(), id)
            }
            _ => metrics.duration.observe(elapsed.as_secs_f64()),
        }
        self.finish_trace(session, ctx, status);

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
            trace_id,
            background = ctx.background.then_some(true),
            client = session.client_addr().map(|a| a.to_string()),
            error = error.map(|e| e.to_string()),
            "request"
        );
    }
}
