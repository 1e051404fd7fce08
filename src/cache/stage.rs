//! The HTTP cache stage: looks requests up, answers hits, captures storable responses as they
//! stream to the client, revalidates with conditional requests, and stands stale entries in
//! for failed upstreams. Decisions are the pure functions of [`super::policy`].

use std::any::Any;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_http::{RequestHeader, ResponseHeader};

use super::policy::{
    self, age_header_value, freshness, request_decision, response_storable, storable_headers,
    ttl_left, BypassReason, CacheStatus, ClientLimits, Freshness, NotStorable, RequestDecision,
    RoutePolicy,
};
use crate::pipeline::{
    state_mut, state_ref, Answer, Completion, RequestCx, ResponseVerdict, Slot, SpanNotes, Stage,
    StageError, UpstreamFailure, Verdict, SHED,
};
use crate::store::{
    CacheKey, Flight, LeaderGuard, Outcome, Reservation, RevalidationGuard, Store, StoredResponse,
    Tier, Waited,
};

/// One route's cache: its compiled policy over the shared store.
#[derive(Debug)]
pub struct HttpCache {
    store: Arc<Store>,
    policy: Arc<RoutePolicy>,
    route: Arc<str>,
}

impl HttpCache {
    pub fn new(store: Arc<Store>, policy: Arc<RoutePolicy>, route: &str) -> Self {
        HttpCache {
            store,
            policy,
            route: Arc::from(route),
        }
    }

    pub fn policy(&self) -> &RoutePolicy {
        &self.policy
    }
}

/// The cache's part of one request.
struct CacheState {
    key: Option<CacheKey>,
    status: CacheStatus,
    outcome: Outcome,
    tier: Tier,
    /// This request fetches for everyone waiting on the same key.
    leader: Option<LeaderGuard>,
    /// An entry past its freshness that may still answer if the upstream fails.
    stale: Option<Arc<StoredResponse>>,
    /// An old entry with validators: the upstream request is made conditional, and a 304
    /// renews and serves it (`REVALIDATED`).
    revalidating: Option<Arc<StoredResponse>>,
    capture: Option<Capture>,
    /// HEAD responses have no body to store, and bypassed requests store nothing.
    may_store: bool,
    /// A background refresh: client conditionals are dropped, and only a store is counted.
    background: Option<RevalidationGuard>,
    /// An expired entry, kept to stand in if a later stage sheds the request (overload).
    expired: Option<Arc<StoredResponse>>,
    /// When the store lookup ran and how long it took (for the trace span).
    lookup: Option<LookupNote>,
    /// An unsafe request: on success its URL's entries are evicted (RFC 9111 §4.4).
    invalidate: Option<Box<RequestHeader>>,
    /// The request's headers, for recording what a stored response varies on (`vary: match`).
    request_headers: Option<Box<http::HeaderMap>>,
    /// The URL's primary entry as the lookup found it (`vary: match`): its variant list carries
    /// over when this response is stored.
    primary: Option<Arc<StoredResponse>>,
}

impl CacheState {
    fn new() -> Self {
        CacheState {
            key: None,
            status: CacheStatus::Bypass,
            outcome: Outcome::Bypass,
            tier: Tier::None,
            leader: None,
            stale: None,
            revalidating: None,
            capture: None,
            may_store: false,
            background: None,
            expired: None,
            lookup: None,
            invalidate: None,
            request_headers: None,
            primary: None,
        }
    }
}

/// One store lookup, as the trace span shows it.
#[derive(Clone, Copy)]
struct LookupNote {
    at: SystemTime,
    took: std::time::Duration,
    /// Where an entry (fresh or not) was found.
    tier: Tier,
}

struct Capture {
    status: u16,
    headers: Vec<(String, Bytes)>,
    ttl: std::time::Duration,
    /// The age the response arrived with (origin-given freshness only), carried into the entry.
    age: std::time::Duration,
    body: BytesMut,
    /// The body's bytes against `cache.max_inflight_bytes`; given back when the capture ends.
    reservation: Reservation,
    /// Others may wait on this fill: the body goes to this client only once it is complete,
    /// so the upstream is read at its own speed, not at this client's (nginx's
    /// `proxy_buffering`), and a slow first client delays no one but itself.
    hold: bool,
}

/// A stale entry to refresh as background work (see [`RequestCx::spawn_background`]).
struct RefreshJob {
    key: CacheKey,
    entry: Arc<StoredResponse>,
    guard: RevalidationGuard,
    /// The URL's primary entry (`vary: match`), whose variant list the refresh keeps.
    primary: Option<Arc<StoredResponse>>,
}

/// 204 and 304 responses never carry a body or a length (RFC 9110 §8.6).
fn has_body(status: u16) -> bool {
    !matches!(status, 204 | 304)
}

/// The response header of a stored entry, with its length and age.
fn stored_header(entry: &StoredResponse) -> pingora_error::Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(entry.status, Some(entry.headers.len() + 8))?;
    for (name, value) in &entry.headers {
        // `@…` names are the cache's own records, never valid header names.
        if name == "content-length" || name.starts_with('@') {
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

/// A stored entry as an answer; `None` when its headers cannot form a response (a foreign
/// writer, a bad header), which callers treat as a miss.
fn answer_from(entry: &StoredResponse) -> Option<Answer> {
    match stored_header(entry) {
        Ok(header) => Some(Answer {
            header: Box::new(header),
            body: entry.body.clone(),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "stored entry cannot be served; treating it as a miss");
            None
        }
    }
}

/// RFC 9110 §13.1.1/§13.1.3 against a stored entry: whether the client's `If-None-Match`
/// (weak comparison) or, without one, `If-Modified-Since` says it already has this entry.
fn not_modified(entry: &StoredResponse, request: &http::HeaderMap) -> bool {
    let stored = |name: &str| {
        entry
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if request.contains_key(http::header::IF_NONE_MATCH) {
        let Some(etag) = stored("etag") else {
            return false;
        };
        let weak = |t: &[u8]| -> Vec<u8> { t.strip_prefix(b"W/").unwrap_or(t).to_vec() };
        let etag = weak(etag.trim_ascii());
        return request
            .get_all(http::header::IF_NONE_MATCH)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .any(|t| t == b"*" || weak(t) == etag);
    }
    let Some(since) = request
        .get(http::header::IF_MODIFIED_SINCE)
        .and_then(policy::http_date)
    else {
        return false;
    };
    // §13.1.3: compared with Last-Modified, or the Date the entry was sent with.
    let modified = stored("last-modified")
        .or_else(|| stored("date"))
        .and_then(|v| http::HeaderValue::from_bytes(&v).ok())
        .and_then(|v| policy::http_date(&v));
    modified.is_some_and(|m| m <= since)
}

/// RFC 9111 §5.2.1.7: `only-if-cached` with no stored response that may answer.
fn not_cached() -> StageError {
    StageError {
        status: 504,
        code: "not_cached",
        message: "only-if-cached: no stored response can answer this request".into(),
    }
}

/// The answer for a client that already has `entry`: its headers as a 304 without a body.
fn not_modified_answer(mut answer: Answer) -> Answer {
    let _ = answer.header.set_status(304);
    answer.header.remove_header(&http::header::CONTENT_LENGTH);
    answer.body = Bytes::new();
    answer
}

/// RFC 9110 §14: a single `bytes` range of a complete stored 200 answered as 206 (or 416 when
/// unsatisfiable). Several ranges, other units, `If-Range` or a malformed header get the whole
/// response, which the RFC allows.
fn range_answer(mut answer: Answer, status: u16, request: &http::HeaderMap) -> Answer {
    let Some(spec) = request
        .get(http::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return answer;
    };
    if status != 200 || spec.contains(',') || request.contains_key(http::header::IF_RANGE) {
        return answer;
    }
    let len = answer.body.len() as u64;
    let Some((first, last)) = spec.trim().split_once('-') else {
        return answer;
    };
    let parse = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let range = match (parse(first), parse(last)) {
        (Some(a), Some(b)) if a <= b => Some((a, b.min(len.saturating_sub(1)))),
        (Some(a), None) if last.trim().is_empty() => Some((a, len.saturating_sub(1))),
        (None, Some(n)) if first.trim().is_empty() && n > 0 => {
            Some((len.saturating_sub(n), len.saturating_sub(1)))
        }
        _ => return answer,
    };
    let header = &mut answer.header;
    match range {
        Some((a, b)) if a < len => {
            let _ = header.set_status(206);
            let _ = header.insert_header("content-range", format!("bytes {a}-{b}/{len}"));
            let _ = header.insert_header("content-length", (b - a + 1).to_string());
            answer.body = answer.body.slice(a as usize..=b as usize);
        }
        _ => {
            let _ = header.set_status(416);
            let _ = header.insert_header("content-range", format!("bytes */{len}"));
            let _ = header.insert_header("content-length", "0");
            answer.body = Bytes::new();
        }
    }
    answer
}

/// The request's `Location`/`Content-Location` targets on the same origin, as paths.
fn same_origin_targets<'a>(
    resp: &'a ResponseHeader,
    host: &'a str,
) -> impl Iterator<Item = http::Uri> + 'a {
    [http::header::LOCATION, http::header::CONTENT_LOCATION]
        .into_iter()
        .filter_map(move |name| {
            let uri: http::Uri = resp.headers.get(&name)?.to_str().ok()?.parse().ok()?;
            match uri.authority() {
                Some(a) if !a.as_str().eq_ignore_ascii_case(host) => None,
                _ if uri.path().starts_with('/') => Some(uri),
                _ => None,
            }
        })
}

/// RFC 9110 §9.2.1: methods other than these are unsafe (unknown ones included).
fn is_safe(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE
    )
}

/// An entry worth revalidating: it has a validator, and the client did not send conditions of
/// its own (those are the client's business and pass through untouched).
fn revalidation_candidate(
    entry: &Arc<StoredResponse>,
    request: &http::HeaderMap,
) -> Option<Arc<StoredResponse>> {
    let client_conditional = request.contains_key(http::header::IF_NONE_MATCH)
        || request.contains_key(http::header::IF_MODIFIED_SINCE);
    (policy::has_validator(&entry.headers) && !client_conditional).then(|| entry.clone())
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

/// The buffer's bytes without the slack a growing buffer keeps: L1 is bounded by body length,
/// so a body held in a much larger allocation would overrun the bound.
fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

fn exact_bytes(body: BytesMut) -> Bytes {
    if body.capacity() > body.len() + body.len() / 8 + 4096 {
        Bytes::copy_from_slice(&body)
    } else {
        body.freeze()
    }
}

impl HttpCache {
    /// The key of a request that may use the cache.
    fn key(&self, req: &RequestHeader, credential: Option<&[u8]>) -> CacheKey {
        // Everything the app sees that can change its answer is in the key: the client's Host
        // (kept for plain-HTTP upstreams; the proxy refuses a non-ASCII one) and every value of
        // the forwarded scheme/host a client may send, as bytes.
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let forwarded = [
            (
                "x-forwarded-proto",
                policy::all_values(&req.headers, "x-forwarded-proto"),
            ),
            (
                "x-forwarded-host",
                policy::all_values(&req.headers, "x-forwarded-host"),
            ),
        ];
        let vary = policy::vary_values(&req.headers, &self.policy);
        let vary: Vec<(&str, &[u8])> = forwarded
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (*k, v.as_slice()))
            .chain(vary.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .collect();
        let query = if self.policy.key_query {
            req.uri.query()
        } else {
            None
        };
        // HEAD shares the GET entry.
        CacheKey::http(
            &self.route,
            "GET",
            host,
            req.uri.path(),
            query,
            &vary,
            credential,
        )
    }

    fn hit(&self, state: &mut CacheState, entry: &StoredResponse, tier: Tier) {
        state.tier = tier;
        state.outcome = Outcome::Hit { tier };
        state.status = CacheStatus::Hit {
            ttl: ttl_left(entry, &self.policy, SystemTime::now()),
        };
    }

    /// Stores the captured response and releases those waiting on it; returns its body.
    fn finish_capture(&self, state: &mut CacheState) -> Option<Bytes> {
        let (Some(capture), Some(key)) = (state.capture.take(), state.key.as_ref()) else {
            return None;
        };
        let now = SystemTime::now();
        // An entry that arrived aged is stored as if received `age` ago (RFC 9111 §4.2.3), so
        // its `Age` and freshness continue from the upstream's.
        let (stored_at, ttl) = match now.checked_sub(capture.age) {
            Some(at) => (at, capture.ttl.saturating_add(capture.age)),
            None => (now, capture.ttl),
        };
        let retention = policy::retention(ttl, &capture.headers, &self.policy);
        let body = exact_bytes(capture.body);
        let entry = StoredResponse {
            status: capture.status,
            headers: capture.headers,
            body: body.clone(),
            stored_at,
            ttl,
            retention,
            namespace: key.namespace.clone(),
            label: key.label.clone(),
        };
        let stored = self.store_entry(key, entry, state.primary.as_ref());
        if let Some(leader) = state.leader.take() {
            leader.complete(stored);
        }
        Some(body)
    }

    /// Adds a chunk to the capture, or gives the capture up (`false`) when it would pass
    /// `cache.max_entry_size` or `cache.max_inflight_bytes`.
    fn grow_capture(&self, capture: &mut Capture, chunk: &Bytes) -> bool {
        let max = self.store.settings().max_entry_size;
        if max > 0 && capture.body.len() + chunk.len() > max {
            tracing::debug!("response grew past cache.max_entry_size; not stored");
            return false;
        }
        // A body of unknown length reserves as it grows.
        let beyond = (capture.body.len() + chunk.len()).saturating_sub(capture.reservation.bytes());
        if beyond > 0 && !self.store.grow_inflight(&mut capture.reservation, beyond) {
            tracing::debug!("cache.max_inflight_bytes reached; not stored");
            return false;
        }
        capture.body.extend_from_slice(chunk);
        true
    }

    fn abandon_capture(state: &mut CacheState) {
        state.capture = None;
        state.leader.take();
        state.status.set_stored(false);
    }

    /// RFC 9111 §4.3.4: a 304's headers replace the stored ones of the same name (a new
    /// `ETag`, `Cache-Control`, `Date`…), and with `respect_origin` its lifetime is taken anew.
    fn update_from_304(&self, entry: &mut StoredResponse, resp: &ResponseHeader) {
        for (name, value) in storable_headers(&resp.headers) {
            if name == "content-length" {
                continue;
            }
            entry.headers.retain(|(n, _)| *n != name);
            entry.headers.push((name, value));
        }
        if self.policy.respect_origin {
            let mut merged = http::HeaderMap::new();
            for (name, value) in &entry.headers {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    http::HeaderValue::from_bytes(value),
                ) {
                    merged.append(n, v);
                }
            }
            if let Ok(ttl) = response_storable(entry.status, &merged, &self.policy) {
                entry.ttl = ttl;
            }
        }
    }

    /// RFC 9111 §4.4: a successful unsafe request evicts what is stored for its URL and for
    /// same-origin `Location`/`Content-Location` (the entries a GET with the same request
    /// headers would use).
    fn invalidate(&self, req: &RequestHeader, resp: &ResponseHeader) {
        let credential = if self.policy.shared {
            policy::credential_bytes(&req.headers)
        } else {
            None
        };
        let key = self.key(req, credential.as_deref());
        // Every variant of the URL goes with it (those this replica knows of; elsewhere they
        // can no longer be reached once the primary is gone).
        if let Some(primary) = self.store.lookup_l1(&key) {
            for id in policy::listed_variants(&primary.headers) {
                self.store.invalidate(&key.variant(&id));
            }
        }
        self.store.invalidate(&key);
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        for uri in same_origin_targets(resp, host) {
            let mut target = req.clone();
            if let Some(path) = uri.path_and_query() {
                if let Ok(path) = http::Uri::try_from(path.as_str()) {
                    target.set_uri(path);
                    self.store
                        .invalidate(&self.key(&target, credential.as_deref()));
                }
            }
        }
    }

    /// Another variant of the URL (`vary: match`) that `primary` lists, when it is the one
    /// this request selects.
    async fn lookup_variant(
        &self,
        key: &CacheKey,
        primary: &StoredResponse,
        request: &http::HeaderMap,
    ) -> Option<(Arc<StoredResponse>, Tier)> {
        let id = policy::requested_variant_id(&primary.headers, request)?;
        if !policy::listed_variants(&primary.headers).contains(&id) {
            return None;
        }
        let found = self.store.lookup(&key.variant(&id)).await;
        let entry = found
            .entry
            .filter(|e| policy::variant_matches(e, request))?;
        Some((entry, found.tier))
    }

    /// Stores `entry` as `key`'s primary entry. With `vary: match`, a primary holding another
    /// variant of the URL moves to that variant's own key first, and the new primary lists the
    /// URL's variants (newest first, at most `max_variants`; older ones are deleted). `seen` is
    /// the primary the request's lookup found, used only when L1 is off.
    fn store_entry(
        &self,
        key: &CacheKey,
        mut entry: StoredResponse,
        seen: Option<&Arc<StoredResponse>>,
    ) -> Option<Arc<StoredResponse>> {
        entry.headers.retain(|(n, _)| n != policy::VARIANTS_HEADER);
        let id = if self.policy.vary_match {
            policy::variant_id(&entry.headers)
        } else {
            None
        };
        if let Some(id) = id {
            // With L1, the primary it holds now is the truth: after an invalidation there is
            // none, and what this request saw before it must not bring the variants back.
            let current = self.store.lookup_l1(key);
            let primary = if self.store.has_l1() {
                current.as_ref()
            } else {
                seen
            };
            let mut ids = vec![id];
            let mut moving = None;
            if let Some(primary) = primary {
                if policy::same_vary_names(&primary.headers, &entry.headers) {
                    if let Some(old) = policy::variant_id(&primary.headers) {
                        if !ids.contains(&old) {
                            ids.push(old.clone());
                            moving = Some((old, primary));
                        }
                    }
                    for listed in policy::listed_variants(&primary.headers) {
                        if !ids.contains(&listed) {
                            ids.push(listed);
                        }
                    }
                }
            }
            // Variants pushed out of the list are deleted, so a URL never holds more than
            // `max_variants` entries however many header values clients send.
            for dropped in ids.drain(self.policy.max_variants.min(ids.len())..) {
                self.store.discard(&key.variant(&dropped));
            }
            if let Some((old, primary)) = moving {
                if ids.contains(&old) {
                    let mut moved = (**primary).clone();
                    moved.headers.retain(|(n, _)| n != policy::VARIANTS_HEADER);
                    if self.store.store_now(&key.variant(&old), moved).is_none() {
                        ids.retain(|i| *i != old);
                    }
                }
            }
            if ids.len() > 1 {
                entry.headers.push((
                    policy::VARIANTS_HEADER.to_string(),
                    Bytes::from(ids.join(",")),
                ));
            }
        }
        self.store.store_now(key, entry)
    }

    /// Whether `entry` may answer this request as a fresh hit now.
    fn usable_now(&self, entry: &StoredResponse, limits: &ClientLimits) -> bool {
        let now = SystemTime::now();
        limits.apply(
            freshness(entry, &self.policy, now),
            entry,
            &self.policy,
            now,
        ) == Freshness::Fresh
    }

    /// An expired entry answers nothing, but can still be revalidated or, within its windows,
    /// stand in for a failure.
    fn note_expired(
        &self,
        state: &mut CacheState,
        req: &RequestHeader,
        entry: Arc<StoredResponse>,
    ) {
        state.outcome = Outcome::Expired;
        state.status = CacheStatus::Expired { stored: false };
        state.revalidating = revalidation_candidate(&entry, &req.headers);
        if freshness(&entry, &self.policy, SystemTime::now()) == Freshness::StaleIfErrorOnly {
            state.stale = Some(entry.clone());
        }
        state.expired = Some(entry);
    }
}

#[async_trait]
impl Stage for HttpCache {
    fn name(&self) -> &'static str {
        "cache"
    }

    async fn on_request(&self, cx: &mut RequestCx<'_>) -> Result<Verdict, StageError> {
        let req = cx.req;
        let mut state = CacheState::new();
        let has_body = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
            || req.headers.contains_key(http::header::TRANSFER_ENCODING);
        let decision = if has_body {
            // The body is not part of the key, so a GET carrying one must not share an entry.
            RequestDecision::Bypass(BypassReason::Method)
        } else {
            request_decision(&req.method, &req.headers, &self.policy)
        };
        let limits = ClientLimits::of(&req.headers, &self.policy);
        let reads = matches!(req.method, http::Method::GET | http::Method::HEAD);
        if limits.only_if_cached && reads && !matches!(decision, RequestDecision::Lookup { .. }) {
            // Bypassed or refreshed, it could only be answered by the upstream.
            *cx.slot = Some(Box::new(state));
            return Err(not_cached());
        }
        let (credential, client_refresh) = match decision {
            RequestDecision::Bypass(reason) => {
                tracing::debug!(route = cx.route, reason = reason.as_str(), "cache bypass");
                if !is_safe(&req.method) {
                    state.invalidate = Some(Box::new(req.clone()));
                }
                *cx.slot = Some(Box::new(state));
                return Ok(Verdict::Continue);
            }
            RequestDecision::Lookup { credential } => (credential, false),
            RequestDecision::Refresh { credential } => (credential, true),
        };
        let key = self.key(req, credential.as_deref());
        let head = req.method == http::Method::HEAD;
        state.may_store = !head;
        state.outcome = Outcome::Miss;
        state.status = CacheStatus::Miss { stored: false };
        if client_refresh {
            state.status = CacheStatus::Refresh { stored: false };
            state.key = Some(key);
            *cx.slot = Some(Box::new(state));
            return Ok(Verdict::Continue);
        }

        let lookup_started = (SystemTime::now(), std::time::Instant::now());
        let lookup = self.store.lookup(&key).await;
        state.lookup = Some(LookupNote {
            at: lookup_started.0,
            took: lookup_started.1.elapsed(),
            tier: if lookup.entry.is_some() {
                lookup.tier
            } else {
                Tier::None
            },
        });
        // What a fetch finishing from here on would replace (see `Store::single_flight`).
        let seen = lookup.entry.clone();
        let mut entry = lookup.entry;
        let mut tier = lookup.tier;
        if self.policy.vary_match {
            state.request_headers = Some(Box::new(req.headers.clone()));
            if let Some(primary) = entry.take() {
                if policy::variant_matches(&primary, &req.headers) {
                    entry = Some(primary.clone());
                } else if let Some((variant, found_in)) =
                    self.lookup_variant(&key, &primary, &req.headers).await
                {
                    (entry, tier) = (Some(variant), found_in);
                }
                state.primary = Some(primary);
            }
        }
        if let Some(entry) = entry {
            let now = SystemTime::now();
            match limits.apply(
                freshness(&entry, &self.policy, now),
                &entry,
                &self.policy,
                now,
            ) {
                Freshness::Fresh => {
                    if let Some(answer) = answer_from(&entry) {
                        self.hit(&mut state, &entry, tier);
                        let answer = if not_modified(&entry, &req.headers) {
                            not_modified_answer(answer)
                        } else {
                            range_answer(answer, entry.status, &req.headers)
                        };
                        *cx.slot = Some(Box::new(state));
                        return Ok(Verdict::Answer(answer));
                    }
                }
                Freshness::StaleWhileRevalidate => {
                    if let Some(answer) = answer_from(&entry) {
                        state.tier = tier;
                        state.outcome = Outcome::Stale;
                        state.status = CacheStatus::StaleWhileRevalidate {
                            ttl: ttl_left(&entry, &self.policy, SystemTime::now()),
                        };
                        // One background refresh per key; everyone else keeps the stale copy.
                        // A HEAD cannot refresh: its answer has no body to store.
                        let guard = if head {
                            None
                        } else {
                            self.store.try_begin_revalidation(&key)
                        };
                        if let Some(guard) = guard {
                            cx.spawn_background(Box::new(RefreshJob {
                                key: key.clone(),
                                entry: entry.clone(),
                                guard,
                                primary: state.primary.clone(),
                            }));
                        }
                        *cx.slot = Some(Box::new(state));
                        return Ok(Verdict::Answer(answer));
                    }
                }
                Freshness::StaleIfErrorOnly | Freshness::Expired => {
                    self.note_expired(&mut state, req, entry);
                }
            }
        }

        if limits.only_if_cached {
            // RFC 9111 §5.2.1.7: nothing usable is stored, and the upstream is not asked.
            state.may_store = false;
            *cx.slot = Some(Box::new(state));
            return Err(not_cached());
        }

        // A conditional or range request's answer (304, 206) cannot fill the entry either.
        let partial = [
            http::header::IF_NONE_MATCH,
            http::header::IF_MODIFIED_SINCE,
            http::header::RANGE,
        ]
        .iter()
        .any(|h| req.headers.contains_key(h));
        if head || partial || self.store.recently_uncacheable(&key) {
            // A HEAD response cannot fill the entry, and nobody could reuse a leader's answer
            // for a key that was recently uncacheable: fetch without leading the flight.
            state.key = Some(key);
            *cx.slot = Some(Box::new(state));
            return Ok(Verdict::Continue);
        }
        match self.store.single_flight(&key, seen.as_ref()) {
            Flight::Leader(guard) => state.leader = Some(guard),
            Flight::Follower(wait) => {
                // Waiting past the upstream timeout would only add to the leader's failure.
                let patience = self.policy.lock_timeout.min(cx.upstream_timeout);
                match wait.wait(patience).await {
                    // A leader's entry that is already stale (`no-cache`: stored only to be
                    // revalidated) or another variant does not serve its followers.
                    Waited::Served(entry)
                        if (!self.policy.vary_match
                            || policy::variant_matches(&entry, &req.headers))
                            // The leader's response came after this request arrived: it is
                            // as fresh as the client can ask (a reload's `max-age=0` too).
                            && self.usable_now(
                                &entry,
                                &ClientLimits {
                                    max_age: None,
                                    ..limits
                                },
                            ) =>
                    {
                        if let Some(answer) = answer_from(&entry) {
                            // Served by another request's fetch, not found in a tier.
                            self.hit(&mut state, &entry, Tier::None);
                            *cx.slot = Some(Box::new(state));
                            return Ok(Verdict::Answer(answer));
                        }
                    }
                    // The leader's response was not storable, it failed, or it is another
                    // variant: fetch for ourselves.
                    Waited::Served(_) | Waited::Fallthrough => {}
                    // The leader is slow (a slow upstream, or a client reading its answer
                    // slowly): fetch for ourselves, and leave storing to the leader, as nginx
                    // does after `proxy_cache_lock_timeout`.
                    Waited::TimedOut => state.may_store = false,
                }
            }
            // The fetch in progress already kept a follower waiting past the lock timeout.
            Flight::Pass => state.may_store = false,
        }
        state.key = Some(key);
        *cx.slot = Some(Box::new(state));
        Ok(Verdict::Continue)
    }

    async fn on_background(
        &self,
        cx: &mut RequestCx<'_>,
        job: Box<dyn Any + Send + Sync>,
    ) -> Result<Verdict, StageError> {
        let Ok(job) = job.downcast::<RefreshJob>() else {
            return Ok(Verdict::Continue);
        };
        let RefreshJob {
            key,
            entry,
            guard,
            primary,
        } = *job;
        let mut state = CacheState::new();
        if self.policy.vary_match {
            // The refresh repeats the request that found the entry stale: what it fetches is
            // that request's variant, recorded as such.
            state.request_headers = Some(Box::new(cx.req.headers.clone()));
            state.primary = primary;
        }
        state.revalidating = policy::has_validator(&entry.headers).then_some(entry);
        state.key = Some(key);
        state.may_store = true;
        state.status = CacheStatus::Refresh { stored: false };
        state.outcome = Outcome::Revalidated;
        state.background = Some(guard);
        *cx.slot = Some(Box::new(state));
        Ok(Verdict::Continue)
    }

    fn on_upstream_request(&self, slot: &mut Slot, req: &mut RequestHeader) {
        for name in &self.policy.strip_headers {
            req.remove_header(name.as_str());
        }
        let Some(state) = state_mut::<CacheState>(slot) else {
            return;
        };
        if state.background.is_some() {
            // A refresh asks for the current representation whatever the triggering client
            // asked; its conditions, if any, are the entry's own.
            for name in [
                http::header::IF_NONE_MATCH,
                http::header::IF_MODIFIED_SINCE,
                http::header::CACHE_CONTROL,
                http::header::PRAGMA,
            ] {
                req.remove_header(&name);
            }
        }
        if let Some(entry) = &state.revalidating {
            for (condition, value) in conditions(entry) {
                let _ = req.insert_header(condition, value);
            }
        }
    }

    fn on_upstream_response(&self, slot: &mut Slot, resp: &ResponseHeader) -> ResponseVerdict {
        let Some(state) = state_mut::<CacheState>(slot) else {
            return ResponseVerdict::Forward;
        };
        // Informational (1xx) headers come before the real response; they decide nothing.
        if resp.status.is_informational() {
            return ResponseVerdict::Forward;
        }
        let status = resp.status.as_u16();
        if let Some(req) = state.invalidate.take() {
            if (200..400).contains(&status) {
                self.invalidate(&req, resp);
            }
            return ResponseVerdict::Forward;
        }
        if let Some(old) = state.revalidating.take() {
            if status == 304 {
                let mut renewed = (*old).clone();
                renewed.stored_at = SystemTime::now();
                self.update_from_304(&mut renewed, resp);
                let renewed = match state.key.as_ref() {
                    Some(key) => self
                        .store_entry(key, renewed, state.primary.as_ref())
                        .unwrap_or(old),
                    None => old,
                };
                state.status = CacheStatus::Revalidated { stored: true };
                state.outcome = Outcome::Revalidated;
                if let Some(leader) = state.leader.take() {
                    leader.complete(Some(renewed.clone()));
                }
                // A 304 has no body to swap: the stored entry is written in its place.
                if let Some(answer) = answer_from(&renewed) {
                    return ResponseVerdict::Replace(answer);
                }
                return ResponseVerdict::Forward;
            }
        }
        if status >= 500 {
            if let Some(stale) = state.stale.take() {
                if let Some(answer) = answer_from(&stale) {
                    state.status = CacheStatus::StaleIfError {
                        ttl: ttl_left(&stale, &self.policy, SystemTime::now()),
                        fwd_status: Some(status),
                    };
                    state.outcome = Outcome::Stale;
                    state.leader.take();
                    // The upstream's answer is abandoned and the entry written in its place,
                    // so the length the client is told always matches the body it gets.
                    return ResponseVerdict::Replace(answer);
                }
            }
        }
        if !state.may_store || state.key.is_none() {
            state.leader.take();
            return ResponseVerdict::Forward;
        }
        let content_length = resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let max_entry_size = self.store.settings().max_entry_size;
        let too_big = content_length.is_some_and(|len| max_entry_size > 0 && len > max_entry_size);
        match response_storable(status, &resp.headers, &self.policy) {
            Ok(ttl) if !too_big => {
                let Some(reservation) = self.store.reserve_inflight(content_length.unwrap_or(0))
                else {
                    tracing::debug!("cache.max_inflight_bytes reached; streaming through uncached");
                    state.leader.take();
                    return ResponseVerdict::Forward;
                };
                let age = if self.policy.respect_origin {
                    policy::initial_age(&resp.headers, SystemTime::now())
                } else {
                    std::time::Duration::ZERO
                };
                let mut headers = storable_headers(&resp.headers);
                if let Some(req) = &state.request_headers {
                    headers.extend(policy::vary_record(&resp.headers, req, &self.policy));
                }
                state.capture = Some(Capture {
                    status,
                    headers,
                    ttl,
                    age,
                    body: BytesMut::with_capacity(content_length.unwrap_or(0)),
                    reservation,
                    // An event stream is read as it comes; holding it would break it.
                    hold: state.leader.is_some() && !is_event_stream(&resp.headers),
                });
                state.status.set_stored(true);
                // Pingora calls no body filter for a response that ends with its header.
                if status == 204 || content_length == Some(0) {
                    let _ = self.finish_capture(state);
                }
            }
            Ok(_) => {
                tracing::debug!("response larger than cache.max_entry_size; not stored");
                state.leader.take();
                if let Some(key) = &state.key {
                    self.store.note_uncacheable(key);
                }
            }
            Err(reason) => {
                tracing::debug!(reason = reason.as_str(), "response not storable");
                state.leader.take();
                // Only what the origin says about the resource marks it hit-for-pass: not a
                // client's 304/206 or a passing failure.
                let transient =
                    matches!(reason, NotStorable::Status(s) if s == 304 || s == 206 || s >= 500);
                if let (Some(key), false) = (&state.key, transient) {
                    self.store.note_uncacheable(key);
                }
            }
        }
        ResponseVerdict::Forward
    }

    fn on_response(&self, slot: &Slot, resp: &mut ResponseHeader) {
        if let Some(state) = state_ref::<CacheState>(slot) {
            let _ = resp.insert_header("x-cache-status", state.status.x_cache_status());
            let _ = resp.insert_header("cache-status", state.status.header_value());
        }
    }

    fn server_timing(&self, slot: &Slot, out: &mut String) {
        if let Some(state) = state_ref::<CacheState>(slot) {
            out.push_str(match state.outcome {
                Outcome::Hit { .. } => ", cache;desc=hit",
                Outcome::Stale => ", cache;desc=stale",
                Outcome::Bypass => ", cache;desc=bypass",
                _ => ", cache;desc=miss",
            });
        }
    }

    fn span_notes(&self, slot: &Slot, notes: &mut SpanNotes) {
        let Some(state) = state_ref::<CacheState>(slot) else {
            return;
        };
        notes.attribute("outrider.cache.status", state.status.x_cache_status());
        if let Some(lookup) = state.lookup {
            notes.event(
                "cache.lookup",
                lookup.at,
                vec![
                    ("outrider.cache.tier", lookup.tier.as_str().into()),
                    ("outrider.cache.found", (lookup.tier != Tier::None).into()),
                    (
                        "outrider.cache.lookup_ms",
                        (lookup.took.as_secs_f64() * 1000.0).into(),
                    ),
                ],
            );
        }
    }

    fn filter_body_chunk(&self, slot: &mut Slot, chunk: &mut Option<Bytes>, end_of_stream: bool) {
        let Some(state) = state_mut::<CacheState>(slot) else {
            return;
        };
        let Some(capture) = state.capture.as_mut().filter(|c| c.hold) else {
            return;
        };
        if let Some(data) = chunk.take() {
            if !self.grow_capture(capture, &data) {
                // Given up: the client gets what was held and streams from here on.
                let mut held = std::mem::take(&mut capture.body);
                held.extend_from_slice(&data);
                *chunk = Some(held.freeze());
                Self::abandon_capture(state);
                return;
            }
        }
        if end_of_stream {
            *chunk = self.finish_capture(state);
        }
    }

    fn on_body_chunk(&self, slot: &mut Slot, chunk: Option<&Bytes>, end_of_stream: bool) {
        let Some(state) = state_mut::<CacheState>(slot) else {
            return;
        };
        // A held capture is filled by `filter_body_chunk`.
        let Some(capture) = state.capture.as_mut().filter(|c| !c.hold) else {
            return;
        };
        if let Some(chunk) = chunk {
            if !self.grow_capture(capture, chunk) {
                Self::abandon_capture(state);
                return;
            }
        }
        if end_of_stream {
            let _ = self.finish_capture(state);
        }
    }

    fn on_upstream_failure(&self, slot: &mut Slot, failure: &UpstreamFailure) -> Option<Answer> {
        let state = state_mut::<CacheState>(slot)?;
        state.leader.take();
        // A shed request may have any stale copy still retained: old data beats no data when
        // the app is overloaded. A failed upstream gets one only within stale_if_error.
        let shed_fallback = if failure.kind == SHED {
            state.expired.take()
        } else {
            None
        };
        let stale = state.stale.take().or(shed_fallback)?;
        let answer = answer_from(&stale)?;
        state.status = CacheStatus::StaleIfError {
            ttl: ttl_left(&stale, &self.policy, SystemTime::now()),
            fwd_status: None,
        };
        state.outcome = Outcome::Stale;
        Some(answer)
    }

    fn on_complete(&self, slot: &mut Slot, done: &Completion<'_>) {
        let Some(state) = state_mut::<CacheState>(slot) else {
            return;
        };
        if state.background.is_some() {
            // Only a refresh that renewed or replaced the entry is worth counting.
            let stored = matches!(
                state.status,
                CacheStatus::Refresh { stored: true } | CacheStatus::Revalidated { stored: true }
            );
            if stored {
                self.store
                    .record_at(done.route, Tier::None, Outcome::Revalidated);
            }
            return;
        }
        self.store.record_at(done.route, state.tier, state.outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Effects;
    use crate::store::CacheSettings;

    fn store(max_inflight: usize) -> Arc<Store> {
        let settings = CacheSettings {
            max_inflight_bytes: max_inflight,
            ..CacheSettings::default()
        };
        Store::new(settings, &prometheus::Registry::new()).unwrap()
    }

    /// Runs `on_request` for `req` (expected to go upstream) and returns the stage's slot.
    async fn miss(stage: &HttpCache, req: RequestHeader) -> Slot {
        let mut slot: Slot = None;
        let mut effects = Effects::default();
        let mut cx = RequestCx::new(
            &req,
            None,
            "items",
            std::time::Duration::from_secs(1),
            &mut slot,
            0,
            &mut effects,
        );
        assert!(matches!(
            stage.on_request(&mut cx).await,
            Ok(Verdict::Continue)
        ));
        slot
    }

    fn ok_with_length(len: Option<usize>) -> ResponseHeader {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        if let Some(len) = len {
            resp.insert_header("content-length", len.to_string())
                .unwrap();
        }
        resp
    }

    /// One upstream chunk through the stage as the proxy runs it; what the client is sent.
    fn body_chunk(stage: &HttpCache, slot: &mut Slot, data: Vec<u8>, eos: bool) -> Option<Bytes> {
        let mut chunk = Some(Bytes::from(data));
        stage.filter_body_chunk(slot, &mut chunk, eos);
        stage.on_body_chunk(slot, chunk.as_ref(), eos);
        chunk
    }

    fn status(stage: &HttpCache, slot: &Slot) -> String {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        stage.on_response(slot, &mut resp);
        resp.headers["cache-status"].to_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn captures_beyond_the_inflight_bound_stream_through_uncached() {
        let store = store(1000);
        let stage = HttpCache::new(store.clone(), Arc::new(RoutePolicy::default()), "items");
        let (mut a, mut b) = (miss(&stage, get("/a")).await, miss(&stage, get("/b")).await);
        // Two 600-byte responses at once: the second does not fit next to the first.
        assert!(matches!(
            stage.on_upstream_response(&mut a, &ok_with_length(Some(600))),
            ResponseVerdict::Forward
        ));
        stage.on_upstream_response(&mut b, &ok_with_length(Some(600)));
        assert_eq!(status(&stage, &a), "outrider; fwd=miss; stored");
        assert_eq!(status(&stage, &b), "outrider; fwd=miss");
        let sent = body_chunk(&stage, &mut a, vec![b'a'; 300], false);
        assert_eq!(sent, None, "a leader's body is held until it is complete");
        let sent = body_chunk(&stage, &mut a, vec![b'a'; 300], true);
        assert_eq!(sent.map(|b| b.len()), Some(600), "then sent whole");
        assert!(store.lookup_l1(&stage.key(&get("/a"), None)).is_some());
        // The finished capture gave its bytes back.
        let mut c = miss(&stage, get("/c")).await;
        stage.on_upstream_response(&mut c, &ok_with_length(None));
        // A body of unknown length reserves as it grows, and stops being captured at the bound.
        assert_eq!(body_chunk(&stage, &mut c, vec![b'c'; 900], false), None);
        let sent = body_chunk(&stage, &mut c, vec![b'c'; 200], false);
        assert_eq!(
            sent.map(|b| b.len()),
            Some(1100),
            "a capture given up releases what it held"
        );
        let sent = body_chunk(&stage, &mut c, vec![b'c'; 50], true);
        assert_eq!(sent.map(|b| b.len()), Some(50), "and streams from then on");
        assert_eq!(status(&stage, &c), "outrider; fwd=miss");
        assert!(store.lookup_l1(&stage.key(&get("/c"), None)).is_none());
        assert_eq!(store.stats()["single_flight"]["in_flight"], 0);
    }

    fn get(path: &str) -> RequestHeader {
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        req.insert_header("host", "h").unwrap();
        req
    }

    #[tokio::test]
    async fn client_conditionals_neither_lead_nor_mark_the_key() {
        let store = store(0);
        let stage = HttpCache::new(store.clone(), Arc::new(RoutePolicy::default()), "items");
        let mut req = get("/cond");
        req.insert_header("if-none-match", "\"v1\"").unwrap();
        let mut slot = miss(&stage, req).await;
        assert_eq!(
            store.stats()["single_flight"]["in_flight"],
            0,
            "did not lead"
        );
        let not_modified = ResponseHeader::build(304, None).unwrap();
        stage.on_upstream_response(&mut slot, &not_modified);
        let key = stage.key(&get("/cond"), None);
        assert!(
            !store.recently_uncacheable(&key),
            "a client's 304 says nothing of the key"
        );
    }

    #[test]
    fn a_304_updates_the_stored_headers() {
        let policy = RoutePolicy {
            respect_origin: true,
            ..RoutePolicy::default()
        };
        let stage = HttpCache::new(store(0), Arc::new(policy), "items");
        let mut entry = crate::store::entry_for_tests(3);
        entry.headers = vec![
            ("etag".into(), Bytes::from_static(b"\"v1\"")),
            ("cache-control".into(), Bytes::from_static(b"max-age=10")),
        ];
        let mut resp = ResponseHeader::build(304, None).unwrap();
        resp.insert_header("etag", "\"v2\"").unwrap();
        resp.insert_header("cache-control", "max-age=600").unwrap();
        stage.update_from_304(&mut entry, &resp);
        let etag: Vec<_> = entry.headers.iter().filter(|(n, _)| n == "etag").collect();
        assert_eq!(etag.len(), 1);
        assert_eq!(&etag[0].1[..], b"\"v2\"");
        assert_eq!(entry.ttl, std::time::Duration::from_secs(600));
    }
}
