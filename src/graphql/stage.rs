//! The GraphQL stage: parses the request, resolves APQ hashes through the registry in the
//! shared store, refuses what the protocol refuses, rewrites the request into a plain POST
//! for the upstream, and caches results of query operations.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_http::{RequestHeader, ResponseHeader};

use super::config::{GraphqlConfig, Scope};
use super::error::GraphqlError;
use super::manifest::Manifest;
use super::metrics::GraphqlMetrics;
use super::operation::{analyse, Operation, OperationKind};
use super::protocol::{parse_body, parse_query_string, sha256_hex, GraphqlRequest, Parsed};
use crate::cache_headers::{
    credential_bytes, directive_seconds, directives, has_directive, CacheStatus,
};
use crate::pipeline::{
    state_mut, state_ref, Answer, Completion, RequestCx, ResponseVerdict, Slot, Stage, StageError,
    Verdict,
};
use crate::store::{
    CacheKey, Flight, LeaderGuard, Outcome, Reservation, RevalidationGuard, Store, StoredResponse,
    Waited,
};

/// Namespace of APQ registrations in the store (shared by every route, like Apollo's).
const APQ_NAMESPACE: &str = "apq";
/// Domain tag of response-cache keys, so they never meet another derivation's.
const RESPONSE_DOMAIN: &[u8] = b"outrider.graphql.response.v1";

/// One route's GraphQL handling, built per config load.
#[derive(Debug)]
pub struct GraphqlStage {
    config: GraphqlConfig,
    store: Arc<Store>,
    metrics: Arc<GraphqlMetrics>,
    manifest: Option<Arc<Manifest>>,
    route: Arc<str>,
    /// Parsed operations by (query hash, operation name): a persisted query is parsed once,
    /// not on every request.
    operations: moka::sync::Cache<(String, Option<String>), Option<Operation>>,
    /// Whether a text query (by its SHA-256) is a manifest operation laid out differently: the
    /// safelist parses each distinct document once, not on every request.
    listed_documents: moka::sync::Cache<String, bool>,
    /// How long a response-cache miss waits for another request's fetch of the same key.
    lock_timeout: Duration,
}

/// Distinct (query, operation name) pairs whose analysis is kept.
const OPERATION_CACHE: u64 = 10_000;

/// The response cache's part of one request.
struct CacheCx {
    key: CacheKey,
    status: CacheStatus,
    leader: Option<LeaderGuard>,
    capture: Option<Capture>,
    /// The route's TTL; a smaller `max-age` from the app lowers it per response.
    ttl: Duration,
    /// A background refresh of a stale entry: held until it ends, so it is the only one.
    refresh: Option<RevalidationGuard>,
    /// Another request is filling this key and took longer than `cache.lock_timeout`: this one
    /// fetches for itself and leaves storing to the leader.
    no_store: bool,
}

struct Capture {
    ttl: Duration,
    content_type: Option<Bytes>,
    body: BytesMut,
    reservation: Reservation,
}

/// Keeps a response out of shared caches without loosening what the app said: `no-store` and
/// `private` stay as they are; otherwise `public` and `s-maxage` go and `private` is added.
fn make_private(resp: &mut ResponseHeader) {
    let current = resp
        .headers
        .get(http::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let directives: Vec<&str> = current
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let name = |d: &str| {
        d.split('=')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    };
    if directives
        .iter()
        .any(|d| matches!(name(d).as_str(), "no-store" | "private"))
    {
        return;
    }
    let mut kept: Vec<&str> = directives
        .into_iter()
        .filter(|d| !matches!(name(d).as_str(), "public" | "s-maxage"))
        .collect();
    kept.insert(0, "private");
    let _ = resp.insert_header("cache-control", kept.join(", "));
}

/// The stage's part of one request.
#[derive(Default)]
struct GraphqlState {
    /// The client sent GET: the upstream gets a POST.
    convert_get: bool,
    /// A GET carrying an APQ hash (the requests a CDN may cache).
    hashed_get: bool,
    /// The answer may belong to one credential (keyed per credential, or not cached by us and
    /// sent with credentials): never `public`.
    per_credential: bool,
    /// Served fresh from the response cache, whose freshness lifetime is this many seconds;
    /// `Age` goes with it, so a CDN keeps it for the lifetime less the age (RFC 9111 §4.2.3).
    served_lifetime: Option<u64>,
    /// The route caches results, but not of this operation (a mutation, a subscription).
    bypass: bool,
    /// The request was refused: no cache headers on the refusal.
    refused: bool,
    cache: Option<CacheCx>,
}

/// A stale result to refresh as background work.
struct RefreshJob {
    key: CacheKey,
    body: Bytes,
    ttl: Duration,
    guard: RevalidationGuard,
}

impl GraphqlStage {
    pub fn new(
        config: GraphqlConfig,
        store: Arc<Store>,
        metrics: Arc<GraphqlMetrics>,
        manifest: Option<Arc<Manifest>>,
        route: &str,
    ) -> Self {
        GraphqlStage {
            config,
            store,
            metrics,
            manifest,
            route: Arc::from(route),
            operations: moka::sync::Cache::new(OPERATION_CACHE),
            listed_documents: moka::sync::Cache::new(OPERATION_CACHE),
            lock_timeout: Duration::from_secs(5),
        }
    }

    /// Follows `cache.lock_timeout`.
    pub fn with_lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout;
        self
    }

    /// The operation a request runs (see [`analyse`]), from the cache when seen before.
    fn operation(&self, hash: &str, query: &str, name: Option<&str>) -> Option<Operation> {
        let key = (hash.to_owned(), name.map(str::to_owned));
        if let Some(known) = self.operations.get(&key) {
            return known;
        }
        let operation = analyse(query, name);
        self.operations.insert(key, operation.clone());
        operation
    }

    fn max_body(&self) -> usize {
        usize::try_from(self.config.max_body.0).unwrap_or(usize::MAX)
    }

    fn count_apq(&self, outcome: &str) {
        self.metrics
            .apq
            .with_label_values(&[&*self.route, outcome])
            .inc();
    }

    fn count_cache(&self, outcome: &str) {
        self.metrics
            .response_cache
            .with_label_values(&[&*self.route, outcome])
            .inc();
    }

    fn apq_key(hash: &str) -> CacheKey {
        CacheKey::from_parts(APQ_NAMESPACE, hash, &[hash.as_bytes()])
    }

    /// The registered query text of `hash`, its use refreshing the registration.
    async fn registered(&self, hash: &str) -> Option<String> {
        let key = Self::apq_key(hash);
        let entry = self.store.lookup(&key).await.entry?;
        let query = String::from_utf8(entry.body.to_vec()).ok()?;
        // Refreshed on use: rewritten (L1 and Redis) once half its lifetime has passed, so a
        // query in use never expires and one out of use does.
        let ttl = self.config.apq.ttl.get();
        if entry.age(SystemTime::now()) > ttl / 2 {
            self.register(hash, &query);
        }
        Some(query)
    }

    fn register(&self, hash: &str, query: &str) {
        let ttl = self.config.apq.ttl.get();
        let entry = StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: Bytes::copy_from_slice(query.as_bytes()),
            stored_at: SystemTime::now(),
            ttl,
            retention: ttl,
            namespace: APQ_NAMESPACE.to_owned(),
            label: hash.to_owned(),
        };
        self.store.store_now(&Self::apq_key(hash), entry);
    }

    /// Resolves the query text of a request: APQ lookup/registration, or the text as sent.
    async fn resolve(&self, request: &GraphqlRequest) -> Result<(String, String), GraphqlError> {
        match (&request.persisted, &request.query) {
            (Some(pq), Some(query)) => {
                if sha256_hex(query) != pq.hash {
                    self.count_apq("mismatch");
                    return Err(GraphqlError::HashMismatch);
                }
                // Registered (and counted) once the safelist and method checks let it through.
                Ok((query.clone(), pq.hash.clone()))
            }
            (Some(pq), None) => {
                let listed = self
                    .manifest
                    .as_ref()
                    .and_then(|m| m.get(&pq.hash))
                    .map(|op| op.body.clone());
                let found = match listed {
                    Some(body) => Some(body),
                    None => self.registered(&pq.hash).await,
                };
                match found {
                    Some(query) => {
                        self.count_apq("hit");
                        Ok((query, pq.hash.clone()))
                    }
                    None => {
                        self.count_apq("miss");
                        Err(GraphqlError::NotFound)
                    }
                }
            }
            (None, Some(query)) => Ok((query.clone(), sha256_hex(query))),
            (None, None) => Err(GraphqlError::InvalidRequest(
                "the request has neither a query nor a persisted query hash".into(),
            )),
        }
    }

    /// A request passed through without looking inside (a batch, a non-JSON body): only where
    /// no safelist is enforced, since its operations cannot be checked.
    /// Under `log_only` it goes through counted as `logged`, so a rollout sees what enforcing
    /// would refuse.
    fn unchecked(&self) -> Result<Option<Answer>, GraphqlError> {
        let Some(pq) = self
            .config
            .persisted_queries
            .as_ref()
            .filter(|pq| pq.safelist)
        else {
            return Ok(None);
        };
        let result = if pq.log_only { "logged" } else { "rejected" };
        self.metrics
            .safelist
            .with_label_values(&[&*self.route, result])
            .inc();
        if pq.log_only {
            tracing::info!(
                route = &*self.route,
                "batch or non-JSON request not checked against the safelist (log_only)"
            );
            return Ok(None);
        }
        Err(GraphqlError::Unverifiable)
    }

    /// Checks the operation against the manifest's safelist; `Ok` lets it through.
    fn safelist(&self, hash: &str, query: &str) -> Result<(), GraphqlError> {
        let (Some(manifest), Some(pq)) = (&self.manifest, &self.config.persisted_queries) else {
            return Ok(());
        };
        if !pq.safelist {
            return Ok(());
        }
        let listed = manifest.get(hash).is_some()
            || self
                .listed_documents
                .get_with_by_ref(hash, || manifest.lists_document(query));
        let result = if listed {
            "listed"
        } else if pq.log_only {
            tracing::info!(
                route = &*self.route,
                hash,
                "operation not in the safelist (log_only)"
            );
            "logged"
        } else {
            "rejected"
        };
        self.metrics
            .safelist
            .with_label_values(&[&*self.route, result])
            .inc();
        if result == "rejected" {
            return Err(GraphqlError::NotInSafelist);
        }
        Ok(())
    }

    fn response_key(
        &self,
        hash: &str,
        request: &GraphqlRequest,
        credential: Option<&[u8]>,
    ) -> CacheKey {
        let variables = request.canonical_variables();
        let name = request.operation_name.as_deref();
        let label = name.unwrap_or("anonymous");
        let (scope, credential): (&[u8], &[u8]) = match credential {
            Some(c) => (b"credential", c),
            None => (b"shared", b""),
        };
        CacheKey::from_parts(
            &self.route,
            label,
            &[
                RESPONSE_DOMAIN,
                hash.as_bytes(),
                variables.as_bytes(),
                name.map_or(&[0u8][..], str::as_bytes),
                scope,
                credential,
            ],
        )
    }

    /// A stored result as the answer to a request.
    fn answer_from(entry: &StoredResponse) -> Option<Answer> {
        Answer::from_stored(entry, &[])
    }

    /// Looks the result up; answers a fresh (or, within its window, stale) one.
    async fn lookup(
        &self,
        cx: &mut RequestCx<'_>,
        state: &mut GraphqlState,
        key: CacheKey,
        ttl: Duration,
        request: &GraphqlRequest,
        query: &str,
    ) -> Option<Answer> {
        let lookup = self.store.lookup(&key).await;
        let now = SystemTime::now();
        let swr = self
            .config
            .response_cache
            .as_ref()
            .map_or(Duration::ZERO, |rc| rc.stale_while_revalidate.get());
        let mut status = CacheStatus::Miss { stored: false };
        if let Some(entry) = &lookup.entry {
            let age = entry.age(now);
            // The entry's own lifetime already holds a smaller max-age; an edited route TTL
            // applies to entries stored before the edit.
            let fresh_for = entry.ttl.min(ttl);
            let left = fresh_for.as_secs() as i64 - age.as_secs() as i64;
            if age < fresh_for {
                if let Some(answer) = Self::answer_from(entry) {
                    self.store.record_at(
                        &self.route,
                        lookup.tier,
                        Outcome::Hit { tier: lookup.tier },
                    );
                    self.count_cache("hit");
                    state.served_lifetime = Some(fresh_for.as_secs());
                    state.cache = Some(CacheCx::new(key, CacheStatus::Hit { ttl: left }, ttl));
                    return Some(answer);
                }
            } else if age < fresh_for.saturating_add(swr) {
                if let Some(answer) = Self::answer_from(entry) {
                    if let Some(guard) = self.store.try_begin_revalidation(&key) {
                        cx.spawn_background(Box::new(RefreshJob {
                            key: key.clone(),
                            body: request.upstream_body(query),
                            ttl,
                            guard,
                        }));
                    }
                    self.store
                        .record_at(&self.route, lookup.tier, Outcome::Stale);
                    self.count_cache("stale");
                    state.cache = Some(CacheCx::new(
                        key,
                        CacheStatus::StaleWhileRevalidate { ttl: left },
                        ttl,
                    ));
                    return Some(answer);
                }
            } else {
                status = CacheStatus::Expired { stored: false };
            }
        }
        self.count_cache("miss");
        self.store
            .record_at(&self.route, lookup.tier, Outcome::Miss);
        let mut cache = CacheCx::new(key, status, ttl);
        if !self.store.recently_uncacheable(&cache.key) {
            match self.store.single_flight(&cache.key, lookup.entry.as_ref()) {
                Flight::Leader(guard) => cache.leader = Some(guard),
                Flight::Follower(wait) => {
                    // As the HTTP cache: wait at most `cache.lock_timeout` for the leader.
                    let patience = self.lock_timeout.min(cx.upstream_timeout);
                    match wait.wait(patience).await {
                        Waited::Served(entry) => {
                            if let Some(answer) = Self::answer_from(&entry) {
                                let fresh_for = entry.ttl.min(ttl).as_secs();
                                let left = fresh_for as i64 - entry.age(now).as_secs() as i64;
                                cache.status = CacheStatus::Hit { ttl: left };
                                if left > 0 {
                                    state.served_lifetime = Some(fresh_for);
                                }
                                state.cache = Some(cache);
                                return Some(answer);
                            }
                        }
                        Waited::Fallthrough => {}
                        Waited::TimedOut => cache.no_store = true,
                    }
                }
                Flight::Pass => cache.no_store = true,
            }
        }
        state.cache = Some(cache);
        None
    }

    /// Everything `on_request` decides, with refusals as errors.
    async fn decide(
        &self,
        cx: &mut RequestCx<'_>,
        state: &mut GraphqlState,
    ) -> Result<Option<Answer>, GraphqlError> {
        let req = cx.req;
        let request = if req.method == http::Method::GET {
            let Some(request) = parse_query_string(req.uri.query().unwrap_or(""))? else {
                return Ok(None);
            };
            state.convert_get = true;
            state.hashed_get = request.persisted.is_some();
            request
        } else if req.method == http::Method::POST {
            // Other encodings (multipart uploads, `application/graphql`) are the app's business.
            if !is_json(req) {
                return self.unchecked();
            }
            if declared_length(&req.headers).is_some_and(|len| len > self.max_body()) {
                return Err(GraphqlError::TooLarge {
                    limit: self.max_body(),
                });
            }
            let body = cx.body.map(Bytes::as_ref).unwrap_or_default();
            if body.len() > self.max_body() {
                return Err(GraphqlError::TooLarge {
                    limit: self.max_body(),
                });
            }
            match parse_body(body)? {
                Parsed::Batch => return self.unchecked(),
                Parsed::One(request) => *request,
            }
        } else {
            return Ok(None);
        };

        let (query, hash) = self.resolve(&request).await?;
        self.safelist(&hash, &query)?;
        let operation = self.operation(&hash, &query, request.operation_name.as_deref());
        let kind = operation.as_ref().map(|o| o.kind);
        if state.convert_get {
            match kind {
                Some(OperationKind::Query) => {}
                Some(OperationKind::Mutation) => return Err(GraphqlError::MutationOverGet),
                _ => {
                    return Err(GraphqlError::InvalidRequest(
                        "only one parseable query operation may be sent over GET".into(),
                    ))
                }
            }
        }
        if let (Some(pq), Some(query)) = (&request.persisted, &request.query) {
            self.register(&pq.hash, query);
            self.count_apq("registered");
        }
        let name = operation.as_ref().and_then(|o| o.name.as_deref());
        let listed = match (name, &self.manifest) {
            (Some(n), Some(m)) => m.has_name(n),
            _ => false,
        };
        self.metrics
            .operations
            .with_label_values(&[
                &*self.route,
                self.metrics.name_label(name, listed),
                kind.map_or("unknown", OperationKind::as_str),
            ])
            .inc();

        // The upstream gets a plain GraphQL POST whenever the client's request was anything
        // else (hash-only, hash plus query, or GET).
        // Built only when the request goes upstream: a cache hit never needs it.
        let rewrite = request.persisted.is_some() || state.convert_get;
        let forward = |cx: &mut RequestCx<'_>| {
            if rewrite {
                cx.replace_body(request.upstream_body(&query));
            }
        };

        let Some(rc) = &self.config.response_cache else {
            // Not cached here, so nothing says the app's answer is the same for everyone.
            state.per_credential = credential_bytes(&req.headers).is_some();
            forward(cx);
            return Ok(None);
        };
        if kind != Some(OperationKind::Query) {
            self.count_cache("bypass");
            state.bypass = true;
            forward(cx);
            return Ok(None);
        }
        let credential = match rc.scope {
            Scope::PerCredential => credential_bytes(&req.headers),
            Scope::Shared => None,
        };
        state.per_credential = credential.is_some();
        let key = self.response_key(&hash, &request, credential.as_deref());
        let answer = self
            .lookup(cx, state, key, rc.ttl.get(), &request, &query)
            .await;
        if answer.is_none() {
            forward(cx);
        }
        Ok(answer)
    }
}

impl CacheCx {
    fn new(key: CacheKey, status: CacheStatus, ttl: Duration) -> Self {
        CacheCx {
            key,
            status,
            leader: None,
            capture: None,
            ttl,
            refresh: None,
            no_store: false,
        }
    }
}

/// The `Content-Length` of a request or response header, when it has a valid one.
fn declared_length(headers: &http::HeaderMap) -> Option<usize> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The app's verdict on storing a response: its lifetime (capped by `ttl`), or `None`.
fn storable_for(resp: &ResponseHeader, ttl: Duration) -> Option<Duration> {
    if resp.status.as_u16() != 200
        || resp.headers.contains_key(http::header::SET_COOKIE)
        || resp.headers.contains_key(http::header::CONTENT_ENCODING)
    {
        return None;
    }
    let cc = directives(&resp.headers, http::header::CACHE_CONTROL);
    if ["no-store", "private", "no-cache"]
        .iter()
        .any(|d| has_directive(&cc, d))
    {
        return None;
    }
    let app = directive_seconds(&cc, "s-maxage").or_else(|| directive_seconds(&cc, "max-age"));
    let ttl = app.map_or(ttl, |s| ttl.min(Duration::from_secs(s)));
    (!ttl.is_zero()).then_some(ttl)
}

/// Whether a GraphQL response body reports errors (then it is not stored).
fn has_errors(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        errors: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        data: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Probe>(body) {
        Ok(p) => p.errors.is_some() || p.data.is_none(),
        Err(_) => true,
    }
}

/// A body GraphQL reads: JSON, or no `Content-Type` at all.
fn is_json(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .is_none_or(|ct| {
            ct.as_bytes()
                .windows(4)
                .any(|w| w.eq_ignore_ascii_case(b"json"))
        })
}

#[async_trait]
impl Stage for GraphqlStage {
    fn name(&self) -> &'static str {
        "graphql"
    }

    fn wants_body(&self, req: &RequestHeader) -> bool {
        // Read even a body declared over graphql.max_body (the route's max_body, which the
        // proxy enforces, bounds it): answering before the client has finished sending would
        // close the connection under it, and the client would see a broken pipe, not the error.
        req.method == http::Method::POST
    }

    fn body_too_large(&self, req: &RequestHeader, limit: usize) -> Option<Answer> {
        // Only what GraphQL would have read; an upload keeps the proxy's 413.
        is_json(req).then(|| GraphqlError::TooLarge { limit }.answer())?
    }

    async fn on_request(&self, cx: &mut RequestCx<'_>) -> Result<Verdict, StageError> {
        let mut state = GraphqlState::default();
        let decided = self.decide(cx, &mut state).await;
        let verdict = match decided {
            Ok(None) => Verdict::Continue,
            Ok(Some(answer)) => Verdict::Answer(answer),
            Err(error) => {
                state.refused = true;
                tracing::debug!(
                    route = cx.route,
                    code = error.code(),
                    "graphql request refused"
                );
                let status = error.status();
                let code = error.code();
                match error.answer() {
                    Some(answer) => Verdict::Answer(answer),
                    None => {
                        return Err(StageError {
                            status,
                            code,
                            message: error.to_string(),
                        })
                    }
                }
            }
        };
        *cx.slot = Some(Box::new(state));
        Ok(verdict)
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
            body,
            ttl,
            guard,
        } = *job;
        cx.replace_body(body);
        let mut cache = CacheCx::new(key, CacheStatus::Refresh { stored: false }, ttl);
        cache.refresh = Some(guard);
        let state = GraphqlState {
            convert_get: cx.req.method != http::Method::POST,
            cache: Some(cache),
            ..GraphqlState::default()
        };
        *cx.slot = Some(Box::new(state));
        Ok(Verdict::Continue)
    }

    fn on_upstream_request(&self, slot: &mut Slot, req: &mut RequestHeader) {
        let Some(state) = state_mut::<GraphqlState>(slot) else {
            return;
        };
        if state.convert_get {
            // The app gets a POST with the query in its JSON body, whatever the client sent.
            req.set_method(http::Method::POST);
            let path = req.uri.path().to_owned();
            if let Ok(uri) = path.parse::<http::Uri>() {
                req.set_uri(uri);
            }
            let _ = req.insert_header(http::header::CONTENT_TYPE, "application/json");
        }
        if state.cache.is_some() {
            // The stored body is checked for `errors`: ask for it uncompressed.
            req.remove_header(&http::header::ACCEPT_ENCODING);
        }
    }

    fn on_upstream_response(&self, slot: &mut Slot, resp: &ResponseHeader) -> ResponseVerdict {
        let Some(cache) = state_mut::<GraphqlState>(slot).and_then(|s| s.cache.as_mut()) else {
            return ResponseVerdict::Forward;
        };
        if resp.status.is_informational() {
            return ResponseVerdict::Forward;
        }
        let Some(ttl) = storable_for(resp, cache.ttl) else {
            cache.leader.take();
            if resp.status.as_u16() < 500 {
                self.store.note_uncacheable(&cache.key);
            }
            self.count_cache("not_stored");
            return ResponseVerdict::Forward;
        };
        let length = declared_length(&resp.headers);
        let max = self.store.settings().max_entry_size;
        let reservation = if length.is_some_and(|l| max > 0 && l > max) {
            None
        } else {
            self.store.reserve_inflight(length.unwrap_or(0))
        };
        let Some(reservation) = reservation.filter(|_| !cache.no_store) else {
            cache.leader.take();
            self.count_cache("not_stored");
            return ResponseVerdict::Forward;
        };
        cache.capture = Some(Capture {
            ttl,
            content_type: resp
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| Bytes::copy_from_slice(v.as_bytes())),
            body: BytesMut::with_capacity(length.unwrap_or(0)),
            reservation,
        });
        // The header leaves before the body: it says what is being stored.
        cache.status.set_stored(true);
        ResponseVerdict::Forward
    }

    fn on_response(&self, slot: &Slot, resp: &mut ResponseHeader) {
        let Some(state) = state_ref::<GraphqlState>(slot) else {
            return;
        };
        if state.refused {
            return;
        }
        let status = match &state.cache {
            Some(cache) => Some(cache.status),
            None => state.bypass.then_some(CacheStatus::Bypass),
        };
        if let Some(status) = status {
            let _ = resp.insert_header("x-cache-status", status.x_cache_status());
            let _ = resp.insert_header("cache-status", status.header_value());
        }
        if state.hashed_get {
            // What a CDN in front may do with it: results known to be error-free and shared
            // are public for their lifetime (the `Age` header says how much is used up);
            // per-credential ones never.
            if state.per_credential {
                make_private(resp);
            } else if let Some(lifetime) = state.served_lifetime {
                let _ = resp.insert_header("cache-control", format!("public, max-age={lifetime}"));
            } else if !resp.headers.contains_key(http::header::CACHE_CONTROL) {
                // Not yet known to be error-free: a CDN must not apply a default TTL to it.
                let _ = resp.insert_header("cache-control", "no-cache");
            }
        }
    }

    fn server_timing(&self, slot: &Slot, out: &mut String) {
        let Some(state) = state_ref::<GraphqlState>(slot) else {
            return;
        };
        let Some(cache) = &state.cache else {
            if state.bypass {
                out.push_str(", cache;desc=bypass");
            }
            return;
        };
        out.push_str(match cache.status {
            CacheStatus::Hit { .. } => ", cache;desc=hit",
            CacheStatus::StaleWhileRevalidate { .. } => ", cache;desc=stale",
            _ => ", cache;desc=miss",
        });
    }

    fn on_body_chunk(&self, slot: &mut Slot, chunk: Option<&Bytes>, end_of_stream: bool) {
        let Some(cache) = state_mut::<GraphqlState>(slot).and_then(|s| s.cache.as_mut()) else {
            return;
        };
        let Some(capture) = cache.capture.as_mut() else {
            return;
        };
        if let Some(chunk) = chunk {
            let max = self.store.settings().max_entry_size;
            let len = capture.body.len() + chunk.len();
            let beyond = len.saturating_sub(capture.reservation.bytes());
            if (max > 0 && len > max)
                || (beyond > 0 && !self.store.grow_inflight(&mut capture.reservation, beyond))
            {
                cache.capture = None;
                cache.leader.take();
                self.count_cache("not_stored");
                return;
            }
            capture.body.extend_from_slice(chunk);
        }
        if !end_of_stream {
            return;
        }
        let Some(capture) = cache.capture.take() else {
            return;
        };
        if has_errors(&capture.body) {
            cache.leader.take();
            self.count_cache("not_stored");
            return;
        }
        let swr = self
            .config
            .response_cache
            .as_ref()
            .map_or(Duration::ZERO, |rc| rc.stale_while_revalidate.get());
        let entry = StoredResponse {
            status: 200,
            headers: capture
                .content_type
                .map(|ct| vec![("content-type".to_owned(), ct)])
                .unwrap_or_default(),
            body: Bytes::copy_from_slice(&capture.body),
            stored_at: SystemTime::now(),
            ttl: capture.ttl,
            retention: capture.ttl.saturating_add(swr),
            namespace: self.route.to_string(),
            label: cache.key.label.clone(),
        };
        let stored = self.store.store_now(&cache.key, entry);
        self.count_cache(if stored.is_some() {
            "stored"
        } else {
            "not_stored"
        });
        cache.status.set_stored(stored.is_some());
        if let Some(leader) = cache.leader.take() {
            leader.complete(stored);
        }
    }

    fn on_complete(&self, slot: &mut Slot, _done: &Completion<'_>) {
        // A leader that got no storable answer lets its followers go to the upstream.
        if let Some(cache) = state_mut::<GraphqlState>(slot).and_then(|s| s.cache.as_mut()) {
            cache.leader.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            resp.append_header(k.to_string(), *v).unwrap();
        }
        resp
    }

    #[test]
    fn private_never_loosens_what_the_app_said() {
        let private = |cc: Option<&str>| {
            let headers: Vec<(&str, &str)> = cc.map(|v| ("cache-control", v)).into_iter().collect();
            let mut resp = response(200, &headers);
            make_private(&mut resp);
            resp.headers
                .get("cache-control")
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(private(None).as_deref(), Some("private"));
        assert_eq!(private(Some("no-store")).as_deref(), Some("no-store"));
        assert_eq!(
            private(Some("private, max-age=5")).as_deref(),
            Some("private, max-age=5")
        );
        assert_eq!(
            private(Some("public, max-age=60, s-maxage=600")).as_deref(),
            Some("private, max-age=60")
        );
        assert_eq!(
            private(Some("no-cache")).as_deref(),
            Some("private, no-cache")
        );
    }

    #[test]
    fn what_may_be_stored_and_for_how_long() {
        let ttl = Duration::from_secs(60);
        assert_eq!(storable_for(&response(200, &[]), ttl), Some(ttl));
        assert_eq!(
            storable_for(&response(200, &[("cache-control", "max-age=5")]), ttl),
            Some(Duration::from_secs(5)),
            "a smaller max-age wins"
        );
        assert_eq!(
            storable_for(&response(200, &[("cache-control", "max-age=600")]), ttl),
            Some(ttl)
        );
        for refused in [
            response(500, &[]),
            response(201, &[]),
            response(200, &[("cache-control", "no-store")]),
            response(200, &[("cache-control", "private, max-age=60")]),
            response(200, &[("cache-control", "max-age=0")]),
            response(200, &[("set-cookie", "a=b")]),
            response(200, &[("content-encoding", "gzip")]),
        ] {
            assert_eq!(storable_for(&refused, ttl), None, "{refused:?}");
        }
    }

    fn stage(ttl: Duration) -> GraphqlStage {
        let registry = prometheus::Registry::new();
        let store = Store::new(crate::store::CacheSettings::default(), &registry).unwrap();
        let metrics = Arc::new(GraphqlMetrics::new(&registry).unwrap());
        let mut config: GraphqlConfig = serde_json::from_str("{}").unwrap();
        config.apq.ttl = crate::config::units::HumanDuration(ttl);
        GraphqlStage::new(config, store, metrics, None, "g")
    }

    #[tokio::test]
    async fn a_registration_in_use_is_renewed() {
        // Its retention is the ttl: the store forgets one out of use (the store's own tests).
        let stage = stage(Duration::from_secs(100));
        let hash = sha256_hex("{ a }");
        stage.register(&hash, "{ a }");
        let stored_at = |stage: &GraphqlStage| {
            stage
                .store
                .lookup_l1(&GraphqlStage::apq_key(&hash))
                .map(|e| e.stored_at)
        };
        let first = stored_at(&stage).unwrap();
        // Used early in its life: left as it is (no write per use).
        assert_eq!(stage.registered(&hash).await.as_deref(), Some("{ a }"));
        assert_eq!(stored_at(&stage), Some(first));
        // Used past half its life: rewritten with a new lifetime.
        let mut old = (*stage
            .store
            .lookup_l1(&GraphqlStage::apq_key(&hash))
            .unwrap())
        .clone();
        old.stored_at = SystemTime::now() - Duration::from_secs(60);
        let aged = old.stored_at;
        stage.store.store_now(&GraphqlStage::apq_key(&hash), old);
        assert_eq!(stage.registered(&hash).await.as_deref(), Some("{ a }"));
        assert!(stored_at(&stage).unwrap() > aged, "renewed on use");
    }

    #[test]
    fn results_with_errors_are_not_stored() {
        assert!(!has_errors(br#"{"data":{"a":1}}"#));
        assert!(has_errors(
            br#"{"data":{"a":1},"errors":[{"message":"x"}]}"#
        ));
        assert!(has_errors(br#"{"errors":[]}"#), "no data");
        assert!(has_errors(b"not json"));
    }
}
