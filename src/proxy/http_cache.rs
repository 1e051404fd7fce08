//! Wiring of the response cache into the request's phases. The decisions (what may be stored,
//! for how long, what the headers say) are the cache module's pure functions; this file only
//! moves bytes between Pingora's session and the cache.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::cache::policy::{
    self, age_header_value, request_decision, response_storable, storable_headers, BypassReason,
    CacheStatus, RequestDecision, RoutePolicy,
};
use crate::cache::{
    Cache, CacheKey, Flight, Freshness, LeaderGuard, Outcome, StoredResponse, Tier,
};
use crate::config::Upstream;

use super::ctx::Ctx;
use super::respond::add_timing_headers;

/// The cache's part of a request's state.
pub struct HttpCacheCtx {
    key: Option<CacheKey>,
    policy: Arc<RoutePolicy>,
    pub status: CacheStatus,
    pub outcome: Outcome,
    pub tier: Tier,
    /// This request fetches for everyone waiting on the same key.
    leader: Option<LeaderGuard>,
    /// An entry past its freshness that may still answer if the upstream fails.
    stale: Option<Arc<StoredResponse>>,
    /// An old entry with validators: the upstream request is made conditional, and a 304
    /// answer renews and serves it (`REVALIDATED`).
    revalidating: Option<Arc<StoredResponse>>,
    /// Renewed by a 304, or stale standing in for a 5xx: written in place of the upstream
    /// response.
    answer: Option<Arc<StoredResponse>>,
    capture: Option<Capture>,
    /// HEAD responses have no body to store, and bypassed requests store nothing.
    may_store: bool,
}

struct Capture {
    status: u16,
    headers: Vec<(String, Bytes)>,
    ttl: Duration,
    body: BytesMut,
}

/// What to do with the upstream's response header.
pub enum UpstreamVerdict {
    Forward,
    /// Answer with a stored entry instead: the upstream confirmed it (304), or failed (5xx)
    /// while a stale copy may stand in.
    AnswerFromCache,
}

pub enum Step {
    /// The response was written from the cache.
    Answered,
    /// Go on to the upstream.
    Forward,
}

/// Freshness judged by the route's current rules, so a TTL edited in the YAML applies to
/// entries already stored (unless the origin's own max-age governs them).
fn freshness(entry: &StoredResponse, policy: &RoutePolicy, now: SystemTime) -> Freshness {
    let ttl = effective_ttl(entry, policy);
    let age = entry.age(now);
    if age < ttl {
        Freshness::Fresh
    } else if policy::forbids_stale(&entry.headers) {
        // The origin said never stale (must-revalidate & co): revalidate or refetch.
        Freshness::Expired
    } else if age < ttl + policy.stale_while_revalidate {
        Freshness::StaleWhileRevalidate
    } else if age < ttl + policy.stale_if_error.max(policy.stale_while_revalidate) {
        Freshness::StaleIfErrorOnly
    } else {
        Freshness::Expired
    }
}

fn effective_ttl(entry: &StoredResponse, policy: &RoutePolicy) -> Duration {
    if policy.respect_origin {
        entry.ttl
    } else {
        policy.ttl
    }
}

fn ttl_left(entry: &StoredResponse, policy: &RoutePolicy, now: SystemTime) -> i64 {
    effective_ttl(entry, policy).as_secs() as i64 - entry.age(now).as_secs() as i64
}

/// Looks the request up and answers it from the cache when it can.
pub async fn on_request(
    cache: &Arc<Cache>,
    session: &mut Session,
    ctx: &mut Ctx,
    policy: Arc<RoutePolicy>,
    route_name: &str,
    upstream: &Arc<Upstream>,
) -> Result<Step> {
    let req = session.req_header();
    let decision = request_decision(&req.method, &req.headers, &policy);
    let head = req.method == http::Method::HEAD;
    let mut state = HttpCacheCtx {
        key: None,
        policy: policy.clone(),
        status: CacheStatus::Bypass,
        outcome: Outcome::Bypass,
        tier: Tier::None,
        leader: None,
        stale: None,
        revalidating: None,
        answer: None,
        capture: None,
        may_store: false,
    };
    let has_body = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers.contains_key(http::header::TRANSFER_ENCODING);
    let decision = if has_body {
        // The body is not part of the key, so a GET carrying one must not share an entry.
        RequestDecision::Bypass(BypassReason::Method)
    } else {
        decision
    };
    let (credential, client_refresh) = match decision {
        RequestDecision::Bypass(reason) => {
            tracing::debug!(route = route_name, reason = reason.as_str(), "cache bypass");
            ctx.http_cache = Some(Box::new(state));
            return Ok(Step::Forward);
        }
        RequestDecision::Lookup { credential } => (credential, false),
        RequestDecision::Refresh { credential } => (credential, true),
    };
    // Everything the app sees that can change its answer is in the key: the client's Host
    // (kept for plain-HTTP upstreams) and the forwarded scheme/host a client may send.
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let forwarded: Vec<(&str, &str)> = ["x-forwarded-proto", "x-forwarded-host"]
        .into_iter()
        .filter_map(|name| {
            let value = req.headers.get(name)?.to_str().ok()?;
            Some((name, value))
        })
        .collect();
    let vary = policy::vary_values(&req.headers, &policy);
    let vary: Vec<(&str, &str)> = forwarded
        .into_iter()
        .chain(vary.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .collect();
    let query = if policy.key_query {
        req.uri.query()
    } else {
        None
    };
    // HEAD shares the GET entry.
    let key = CacheKey::http(
        route_name,
        "GET",
        host,
        req.uri.path(),
        query,
        &vary,
        credential.as_deref(),
    );
    state.may_store = !head;

    if client_refresh {
        state.status = CacheStatus::Refresh { stored: false };
        state.outcome = Outcome::Miss;
        state.key = Some(key);
        ctx.http_cache = Some(Box::new(state));
        return Ok(Step::Forward);
    }

    let lookup = cache.lookup(&key).await;
    let now = SystemTime::now();
    state.outcome = Outcome::Miss;
    state.status = CacheStatus::Miss { stored: false };
    // An entry that decodes but cannot be turned into a response (a foreign writer, a bad
    // header) is a miss, not an error; the next store overwrites it.
    let usable = lookup.entry.and_then(|entry| match stored_header(&entry) {
        Ok(header) => Some((entry, header)),
        Err(e) => {
            tracing::warn!(key = %key.hex(), error = %e, "stored entry cannot be served; treating it as a miss");
            None
        }
    });
    if let Some((entry, header)) = usable {
        match freshness(&entry, &policy, now) {
            Freshness::Fresh => {
                state.tier = lookup.tier;
                state.outcome = Outcome::Hit { tier: lookup.tier };
                state.status = CacheStatus::Hit {
                    ttl: ttl_left(&entry, &policy, now),
                };
                ctx.http_cache = Some(Box::new(state));
                write_entry(session, ctx, &entry, header).await?;
                return Ok(Step::Answered);
            }
            Freshness::StaleWhileRevalidate => {
                state.tier = lookup.tier;
                state.outcome = Outcome::Stale;
                state.status = CacheStatus::StaleWhileRevalidate {
                    ttl: ttl_left(&entry, &policy, now),
                };
                // One background refresh per key; everyone else keeps getting the stale copy.
                if let Some(guard) = cache.try_begin_revalidation(&key) {
                    let request = RefreshRequest::from_session(session, upstream, &entry);
                    let (cache, policy, key, stale) =
                        (cache.clone(), policy.clone(), key.clone(), entry.clone());
                    let route = route_name.to_string();
                    tokio::spawn(async move {
                        refresh(cache, key, policy, request, stale, &route).await;
                        drop(guard);
                    });
                }
                ctx.http_cache = Some(Box::new(state));
                write_entry(session, ctx, &entry, header).await?;
                return Ok(Step::Answered);
            }
            Freshness::StaleIfErrorOnly => {
                state.outcome = Outcome::Expired;
                state.status = CacheStatus::Expired { stored: false };
                state.revalidating = revalidation_candidate(&entry, &session.req_header().headers);
                state.stale = Some(entry);
            }
            Freshness::Expired => {
                state.outcome = Outcome::Expired;
                state.status = CacheStatus::Expired { stored: false };
                state.revalidating = revalidation_candidate(&entry, &session.req_header().headers);
            }
        }
    }

    if head {
        // A HEAD response cannot fill the entry; fetch without leading the flight.
        state.key = Some(key);
        ctx.http_cache = Some(Box::new(state));
        return Ok(Step::Forward);
    }
    if cache.recently_uncacheable(&key) {
        // Nobody could reuse a leader's answer: fetch directly (it is still stored if it has
        // become storable).
        state.key = Some(key);
        ctx.http_cache = Some(Box::new(state));
        return Ok(Step::Forward);
    }
    match cache.single_flight(&key) {
        Flight::Leader(guard) => {
            state.leader = Some(guard);
        }
        Flight::Follower(wait) => {
            if let Some(entry) = wait.wait(upstream.timeout).await {
                let now = SystemTime::now();
                state.tier = Tier::L1;
                state.outcome = Outcome::Hit { tier: Tier::L1 };
                state.status = CacheStatus::Hit {
                    ttl: ttl_left(&entry, &policy, now),
                };
                ctx.http_cache = Some(Box::new(state));
                serve_entry(session, ctx, &entry).await?;
                return Ok(Step::Answered);
            }
            // The leader's response was not storable or it failed: fetch for ourselves.
        }
    }
    state.key = Some(key);
    ctx.http_cache = Some(Box::new(state));
    Ok(Step::Forward)
}

/// Writes a stored response (status, headers, body) to the client.
pub async fn serve_entry(
    session: &mut Session,
    ctx: &mut Ctx,
    entry: &StoredResponse,
) -> Result<()> {
    let header = stored_header(entry)?;
    write_entry(session, ctx, entry, header).await
}

async fn write_entry(
    session: &mut Session,
    ctx: &mut Ctx,
    entry: &StoredResponse,
    mut resp: ResponseHeader,
) -> Result<()> {
    add_cache_headers(&mut resp, ctx);
    add_timing_headers(&mut resp, ctx);
    ctx.own_status = Some(entry.status);
    let head_only = session.req_header().method == http::Method::HEAD || !has_body(entry.status);
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(entry.body.clone()), true)
            .await?;
    }
    Ok(())
}

/// `x-cache-status` and `cache-status`; `server-timing` gets its `cache` entry with the timings.
pub fn add_cache_headers(resp: &mut ResponseHeader, ctx: &Ctx) {
    let Some(state) = ctx.http_cache.as_ref() else {
        return;
    };
    let _ = resp.insert_header("x-cache-status", state.status.x_cache_status());
    let _ = resp.insert_header("cache-status", state.status.header_value());
}

impl HttpCacheCtx {
    /// The `cache` entry of `server-timing`.
    pub fn server_timing_desc(&self) -> &'static str {
        match self.outcome {
            Outcome::Hit { .. } => "hit",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
            _ => "miss",
        }
    }
}

/// An entry worth revalidating: it has a validator, and the client did not send conditions of
/// its own (those are the client's business and pass through untouched).
fn revalidation_candidate(
    entry: &Arc<StoredResponse>,
    request: &http::HeaderMap,
) -> Option<Arc<StoredResponse>> {
    let client_conditional = request.contains_key(http::header::IF_NONE_MATCH)
        || request.contains_key(http::header::IF_MODIFIED_SINCE);
    let has_validator = conditions(entry).next().is_some();
    (has_validator && !client_conditional).then(|| entry.clone())
}

/// The conditional request headers a stored entry's validators allow: `ETag` gives
/// `If-None-Match`, `Last-Modified` gives `If-Modified-Since`.
fn conditions(
    entry: &StoredResponse,
) -> impl Iterator<Item = (http::HeaderName, http::HeaderValue)> + '_ {
    entry.headers.iter().filter_map(|(name, value)| {
        let condition = match name.as_str() {
            "etag" => http::header::IF_NONE_MATCH,
            "last-modified" => http::header::IF_MODIFIED_SINCE,
            _ => return None,
        };
        Some((condition, http::HeaderValue::from_bytes(value).ok()?))
    })
}

/// Makes the upstream request conditional when an old entry can be revalidated.
pub fn on_upstream_request(ctx: &Ctx, request: &mut pingora_http::RequestHeader) {
    let Some(entry) = ctx
        .http_cache
        .as_ref()
        .and_then(|c| c.revalidating.as_ref())
    else {
        return;
    };
    for (condition, value) in conditions(entry) {
        let _ = request.insert_header(condition, value);
    }
}

/// The upstream's response header arrived: decide whether to capture it for the cache, or to
/// replace it with a stored entry (stale on error, or renewed after a 304).
pub fn on_upstream_response(
    cache: &Cache,
    ctx: &mut Ctx,
    resp: &mut ResponseHeader,
    max_entry_size: usize,
) -> UpstreamVerdict {
    let Some(state) = ctx.http_cache.as_mut() else {
        return UpstreamVerdict::Forward;
    };
    // Informational (1xx) headers come before the real response; they decide nothing.
    if resp.status.is_informational() {
        return UpstreamVerdict::Forward;
    }
    let status = resp.status.as_u16();
    if let Some(old) = state.revalidating.take() {
        if status == 304 {
            let mut renewed = (*old).clone();
            renewed.stored_at = SystemTime::now();
            let renewed = match state.key.as_ref() {
                Some(key) => cache.store_now(key, renewed).unwrap_or(old),
                None => old,
            };
            state.status = CacheStatus::Revalidated { stored: true };
            state.outcome = Outcome::Revalidated;
            if let Some(leader) = state.leader.take() {
                leader.complete(Some(renewed.clone()));
            }
            // A 304 has no body to swap; the proxy abandons the upstream response and writes
            // the renewed entry itself.
            state.answer = Some(renewed);
            return UpstreamVerdict::AnswerFromCache;
        }
    }
    if status >= 500 {
        if let Some(stale) = state.stale.take() {
            let now = SystemTime::now();
            state.status = CacheStatus::StaleIfError {
                ttl: ttl_left(&stale, &state.policy, now),
                fwd_status: Some(status),
            };
            state.outcome = Outcome::Stale;
            state.leader.take();
            // Like a 304, the upstream's answer is abandoned and the entry written in its
            // place, so the length the client is told always matches the body it gets.
            state.answer = Some(stale);
            return UpstreamVerdict::AnswerFromCache;
        }
    }
    if !state.may_store || state.key.is_none() {
        state.leader.take();
        return UpstreamVerdict::Forward;
    }
    let content_length = resp
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_big = content_length.is_some_and(|len| max_entry_size > 0 && len > max_entry_size);
    match response_storable(status, &resp.headers, &state.policy) {
        Ok(ttl) if !too_big => {
            state.capture = Some(Capture {
                status,
                headers: storable_headers(&resp.headers),
                ttl,
                body: BytesMut::with_capacity(content_length.unwrap_or(0)),
            });
            set_stored(&mut state.status, true);
            // Pingora calls no body filter for a response that ends with its header.
            let bodiless = status == 204
                || resp
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .is_some_and(|v| v.as_bytes() == b"0");
            if bodiless {
                finish_capture(cache, state);
            }
        }
        Ok(_) => {
            tracing::debug!("response larger than cache.max_entry_size; not stored");
            state.leader.take();
            if let Some(key) = &state.key {
                cache.note_uncacheable(key);
            }
        }
        Err(reason) => {
            tracing::debug!(reason = reason.as_str(), "response not storable");
            state.leader.take();
            if let Some(key) = &state.key {
                cache.note_uncacheable(key);
            }
        }
    }
    UpstreamVerdict::Forward
}

fn set_stored(status: &mut CacheStatus, value: bool) {
    match status {
        CacheStatus::Miss { stored }
        | CacheStatus::Expired { stored }
        | CacheStatus::Refresh { stored }
        | CacheStatus::Revalidated { stored } => *stored = value,
        _ => {}
    }
}

/// 204 and 304 responses never carry a body or a length (RFC 9110 §8.6).
fn has_body(status: u16) -> bool {
    !matches!(status, 204 | 304)
}

/// The response header of a stored entry, with its length and age.
fn stored_header(entry: &StoredResponse) -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(entry.status, Some(entry.headers.len() + 8))?;
    for (name, value) in &entry.headers {
        if name == "content-length" {
            continue;
        }
        resp.append_header(name.clone(), value.as_ref())?;
    }
    if has_body(entry.status) {
        resp.insert_header("content-length", entry.body.len().to_string())?;
    }
    resp.insert_header("age", age_header_value(entry.age(SystemTime::now())))?;
    Ok(resp)
}

/// Each body chunk on its way to the client: copied for the cache, never held back.
pub fn on_body_chunk(cache: &Cache, ctx: &mut Ctx, body: &mut Option<Bytes>, end_of_stream: bool) {
    let Some(state) = ctx.http_cache.as_mut() else {
        return;
    };
    let Some(capture) = state.capture.as_mut() else {
        return;
    };
    if let Some(chunk) = body.as_ref() {
        let max = cache.settings().max_entry_size;
        if max > 0 && capture.body.len() + chunk.len() > max {
            tracing::debug!("response grew past cache.max_entry_size; not stored");
            state.capture = None;
            state.leader.take();
            set_stored(&mut state.status, false);
            return;
        }
        capture.body.extend_from_slice(chunk);
    }
    if end_of_stream {
        finish_capture(cache, state);
    }
}

/// The buffer's bytes without the slack a growing buffer keeps: L1 is bounded by body length,
/// so a body held in a much larger allocation would overrun the bound.
fn exact_bytes(body: BytesMut) -> Bytes {
    if body.capacity() > body.len() + body.len() / 8 + 4096 {
        Bytes::copy_from_slice(&body)
    } else {
        body.freeze()
    }
}

/// Stores the captured response and hands it to the requests waiting on this key.
fn finish_capture(cache: &Cache, state: &mut HttpCacheCtx) {
    let (Some(capture), Some(key)) = (state.capture.take(), state.key.as_ref()) else {
        return;
    };
    let entry = StoredResponse {
        status: capture.status,
        headers: capture.headers,
        body: exact_bytes(capture.body),
        stored_at: SystemTime::now(),
        ttl: capture.ttl,
        stale_while_revalidate: state.policy.stale_while_revalidate,
        stale_if_error: state.policy.stale_if_error,
        namespace: key.namespace.clone(),
        label: key.label.clone(),
    };
    let stored = cache.store_now(key, entry);
    if let Some(leader) = state.leader.take() {
        leader.complete(stored);
    }
}

/// The entry to write instead of the upstream's response (renewed by a 304, or stale for a 5xx).
pub fn take_cached_answer(ctx: &mut Ctx) -> Option<Arc<StoredResponse>> {
    ctx.http_cache.as_mut()?.answer.take()
}

/// The upstream could not be reached: answer with a stale entry if one is allowed.
pub fn stale_for_error(ctx: &mut Ctx) -> Option<Arc<StoredResponse>> {
    let state = ctx.http_cache.as_mut()?;
    let stale = state.stale.take()?;
    state.leader.take();
    state.status = CacheStatus::StaleIfError {
        ttl: ttl_left(&stale, &state.policy, SystemTime::now()),
        fwd_status: None,
    };
    state.outcome = Outcome::Stale;
    Some(stale)
}

/// Counts the request's cache outcome once, at the end.
pub fn record(cache: &Cache, ctx: &Ctx, route: &str) {
    if let Some(state) = ctx.http_cache.as_ref() {
        cache.record_at(route, state.tier, state.outcome);
    }
}

/// What a background revalidation needs from the request that triggered it.
pub struct RefreshRequest {
    url: String,
    headers: reqwest::header::HeaderMap,
    timeout: Duration,
}

impl RefreshRequest {
    fn from_session(session: &Session, upstream: &Upstream, entry: &StoredResponse) -> Self {
        let req = session.req_header();
        let scheme = if upstream.tls { "https" } else { "http" };
        let host = if upstream.host.contains(':') {
            format!("[{}]", upstream.host)
        } else {
            upstream.host.clone()
        };
        let path_and_query = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let url = format!("{scheme}://{host}:{}{path_and_query}", upstream.port);
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in req.headers.iter() {
            let skip = matches!(
                name.as_str(),
                "connection"
                    | "keep-alive"
                    | "te"
                    | "trailer"
                    | "transfer-encoding"
                    | "upgrade"
                    | "content-length"
                    | "if-none-match"
                    | "if-modified-since"
                    | "cache-control"
                    | "pragma"
            ) || (upstream.tls && name == http::header::HOST);
            if !skip {
                headers.append(name.clone(), value.clone());
            }
        }
        for (condition, value) in conditions(entry) {
            headers.insert(condition, value);
        }
        headers.insert(
            "x-outrider-revalidation",
            http::HeaderValue::from_static("1"),
        );
        RefreshRequest {
            url,
            headers,
            timeout: upstream.timeout,
        }
    }
}

fn refresh_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    })
}

/// Fetches a fresh copy of a stale entry (conditionally when it has validators) and stores it.
async fn refresh(
    cache: Arc<Cache>,
    key: CacheKey,
    policy: Arc<RoutePolicy>,
    request: RefreshRequest,
    stale: Arc<StoredResponse>,
    route: &str,
) {
    let response = refresh_client()
        .get(&request.url)
        .headers(request.headers)
        .timeout(request.timeout)
        .send()
        .await;
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(route, error = %e, "background revalidation failed; the stale entry stays");
            return;
        }
    };
    let status = response.status().as_u16();
    if status == 304 {
        let mut renewed = (*stale).clone();
        renewed.stored_at = SystemTime::now();
        cache.store_now(&key, renewed);
        cache.record_at(route, Tier::None, Outcome::Revalidated);
        return;
    }
    let headers = response.headers().clone();
    let Ok(ttl) = response_storable(status, &headers, &policy) else {
        return;
    };
    let max = cache.settings().max_entry_size;
    if response
        .content_length()
        .is_some_and(|l| max > 0 && l as usize > max)
    {
        return;
    }
    // Read at most max_entry_size: a chunked body may be any size.
    let mut body = BytesMut::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = futures::StreamExt::next(&mut chunks).await {
        let Ok(chunk) = chunk else {
            return;
        };
        if max > 0 && body.len() + chunk.len() > max {
            return;
        }
        body.extend_from_slice(&chunk);
    }
    let body = exact_bytes(body);
    let entry = StoredResponse {
        status,
        headers: storable_headers(&headers),
        body,
        stored_at: SystemTime::now(),
        ttl,
        stale_while_revalidate: policy.stale_while_revalidate,
        stale_if_error: policy.stale_if_error,
        namespace: key.namespace.clone(),
        label: key.label.clone(),
    };
    if cache.store_now(&key, entry).is_some() {
        cache.record_at(route, Tier::None, Outcome::Revalidated);
    }
}
