//! The LLM stage: checks and parses the request, applies the routing rules, asks OpenAI
//! streams for usage, answers from the cache (replaying a recorded stream byte for byte), and
//! records answers — a stream only once its terminal event has arrived with a 200.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_http::{RequestHeader, ResponseHeader};

use super::config::{CacheScope, LlmConfig, Provider};
use super::error::LlmError;
use super::metrics::LlmMetrics;
use super::protocol::{parse_request, read_event, usage_from_body, LlmRequest, Usage};
use super::sse::Splitter;
use super::translate::{self, Direction, StreamTranslator};
use crate::cache_headers::{directives, has_directive, CacheStatus};
use crate::pipeline::{
    state_mut, state_ref, Answer, Completion, RequestCx, ResponseVerdict, Slot, SpanNotes, Stage,
    StageError, Verdict,
};
use crate::store::{
    CacheKey, Flight, LeaderGuard, Outcome, Reservation, Store, StoredResponse, Waited,
};

/// Domain tag of LLM cache keys, so they never meet another derivation's.
const KEY_DOMAIN: &[u8] = b"outrider.llm.v1";
/// Stored entry header holding the answer's token counts (`input,output`); never sent.
const USAGE_HEADER: &str = "outrider-llm-usage";
/// Response header naming the routing rule that chose the model.
pub const RULE_HEADER: &str = "x-outrider-llm-rule";
/// Headers of the Anthropic API that change the answer's shape, so they are part of the key.
const KEYED_HEADERS: &[&str] = &["anthropic-version", "anthropic-beta", "openai-beta"];

/// A routing rule ready to evaluate.
#[derive(Debug)]
struct Rule {
    name: String,
    when_model: Option<String>,
    max_tokens: Option<u64>,
    min_tokens: Option<u64>,
    tools: Option<bool>,
    images: Option<bool>,
    headers: Vec<(http::HeaderName, String)>,
    model: String,
    upstream: Option<String>,
    /// The provider the upstream speaks, when it is not the route's (outrider translates).
    translate_to: Option<Provider>,
    /// Sent to the upstream in place of the caller's key.
    api_key: Option<http::HeaderValue>,
}

impl Rule {
    fn matches(&self, req: &LlmRequest, headers: &http::HeaderMap) -> bool {
        if self.when_model.as_ref().is_some_and(|m| *m != req.model) {
            return false;
        }
        if self.tools.is_some_and(|t| t != req.has_tools())
            || self.images.is_some_and(|i| i != req.has_images())
        {
            return false;
        }
        if self.max_tokens.is_some() || self.min_tokens.is_some() {
            let estimate = req.estimated_prompt_tokens();
            if self.max_tokens.is_some_and(|m| estimate > m)
                || self.min_tokens.is_some_and(|m| estimate < m)
            {
                return false;
            }
        }
        self.headers.iter().all(|(name, want)| {
            headers
                .get(name)
                .is_some_and(|v| v.as_bytes() == want.as_bytes())
        })
    }
}

/// One route's LLM handling, built per config load (so rule edits apply on reload).
#[derive(Debug)]
pub struct LlmStage {
    config: LlmConfig,
    store: Arc<Store>,
    metrics: Arc<LlmMetrics>,
    route: Arc<str>,
    rules: Vec<Rule>,
    /// Models the config names: always their own metric label.
    known_models: HashSet<String>,
    /// How long a miss waits for another request's fetch of the same answer.
    lock_timeout: Duration,
}

/// The cache's part of one request.
struct CacheCx {
    key: CacheKey,
    status: CacheStatus,
    /// `Cache-Control: no-store` from the client: answers are not stored.
    store: bool,
    /// This request fetches the answer others wait for (non-streamed misses only).
    leader: Option<LeaderGuard>,
}

/// The stage's part of one request.
struct LlmState {
    model: String,
    rule: Option<String>,
    arrived: Instant,
    /// `hit`, `miss`, `refresh`, `bypass` or `rejected` (the metrics label).
    outcome: &'static str,
    cache: Option<CacheCx>,
    /// The stage asked an OpenAI stream for usage: remove the extra event.
    strip_usage: bool,
    /// The upstream answered with an event stream.
    sse: bool,
    splitter: Splitter,
    /// The upstream's status.
    status: u16,
    /// The stream's terminal event went by.
    terminal: bool,
    /// The stream reported an error: never stored.
    failed: bool,
    usage: Option<Usage>,
    from_cache: bool,
    first_byte: Option<Duration>,
    /// What the client received, kept to store (or, for JSON, to read `usage` from), and its
    /// share of the store's in-flight byte budget.
    body: Option<(BytesMut, Reservation)>,
    content_type: Option<Bytes>,
    /// The API shape of the upstream this request goes to.
    upstream_provider: Provider,
    /// Sent to the upstream in place of the caller's key (a routing rule's `api_key`).
    api_key: Option<http::HeaderValue>,
    /// The request was translated for another provider: its answer is translated back.
    translation: Option<Box<Translation>>,
}

/// The answer's way back from another provider's upstream to the client.
struct Translation {
    direction: Direction,
    stream: StreamTranslator,
    /// A JSON answer (or an error) is translated whole, at its end.
    pending: BytesMut,
    /// The JSON answer outgrew [`MAX_TRANSLATED_BODY`].
    overflow: bool,
    created: u64,
}

/// Largest JSON answer held back to be translated.
const MAX_TRANSLATED_BODY: usize = 16 * 1024 * 1024;

impl LlmState {
    fn new(arrived: Instant) -> Self {
        LlmState {
            model: String::new(),
            rule: None,
            arrived,
            outcome: "bypass",
            cache: None,
            strip_usage: false,
            sse: false,
            splitter: Splitter::default(),
            status: 0,
            terminal: false,
            failed: false,
            usage: None,
            from_cache: false,
            first_byte: None,
            body: None,
            content_type: None,
            upstream_provider: Provider::Openai,
            api_key: None,
            translation: None,
        }
    }
}

impl LlmStage {
    pub fn new(
        config: LlmConfig,
        store: Arc<Store>,
        metrics: Arc<LlmMetrics>,
        route: &str,
    ) -> Self {
        let rules = config
            .routing
            .iter()
            .enumerate()
            .map(|(i, r)| Rule {
                name: r.name.clone().unwrap_or_else(|| format!("routing[{i}]")),
                when_model: r.when.model.clone(),
                max_tokens: r.when.max_prompt_tokens,
                min_tokens: r.when.min_prompt_tokens,
                tools: r.when.tools,
                images: r.when.images,
                headers: r
                    .when
                    .headers
                    .iter()
                    .filter_map(|(n, v)| {
                        Some((http::HeaderName::from_bytes(n.as_bytes()).ok()?, v.clone()))
                    })
                    .collect(),
                model: r.model.clone(),
                upstream: r.upstream.clone(),
                translate_to: r.provider.filter(|p| *p != config.provider),
                api_key: r
                    .api_key
                    .as_deref()
                    .and_then(|k| http::HeaderValue::from_str(k).ok())
                    .map(|mut k| {
                        k.set_sensitive(true);
                        k
                    }),
            })
            .collect();
        let known_models = config
            .pricing
            .keys()
            .cloned()
            .chain(config.routing.iter().map(|r| r.model.clone()))
            .collect();
        LlmStage {
            config,
            store,
            metrics,
            route: Arc::from(route),
            rules,
            known_models,
            lock_timeout: Duration::from_secs(5),
        }
    }

    /// Follows `cache.lock_timeout`.
    pub fn with_lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout;
        self
    }

    fn provider(&self) -> Provider {
        self.config.provider
    }

    fn max_body(&self) -> usize {
        usize::try_from(self.config.max_body.0).unwrap_or(usize::MAX)
    }

    /// What identifies who may share an entry, or `None` when the request cannot be scoped
    /// (no API key, no tenant header): it then bypasses the cache.
    fn scope(&self, headers: &http::HeaderMap) -> Option<Vec<u8>> {
        match &self.config.cache.scope {
            CacheScope::Shared => Some(b"shared".to_vec()),
            CacheScope::ApiKey => {
                let key = headers
                    .get(http::header::AUTHORIZATION)
                    .or_else(|| headers.get("x-api-key"))?;
                // Only a hash of the key enters the cache key, which is itself a hash.
                let mut scope = b"api_key:".to_vec();
                scope.extend_from_slice(blake3::hash(key.as_bytes()).as_bytes());
                Some(scope)
            }
            CacheScope::Header(name) => {
                let value = headers.get(name.as_str())?;
                let mut scope = b"header:".to_vec();
                scope.extend_from_slice(name.as_bytes());
                scope.push(0);
                scope.extend_from_slice(value.as_bytes());
                Some(scope)
            }
        }
    }

    fn key(
        &self,
        req: &LlmRequest,
        path: &str,
        headers: &http::HeaderMap,
        scope: &[u8],
        translated_for: Option<Provider>,
    ) -> CacheKey {
        let material = req.canonical_key_material();
        let mut header_bytes = Vec::new();
        for name in KEYED_HEADERS {
            if let Some(v) = headers.get(*name) {
                header_bytes.extend_from_slice(name.as_bytes());
                header_bytes.push(0);
                header_bytes.extend_from_slice(v.as_bytes());
                header_bytes.push(0);
            }
        }
        let stream: &[u8] = if req.stream { b"stream" } else { b"whole" };
        let parts = [
            KEY_DOMAIN,
            self.provider().as_str().as_bytes(),
            path.as_bytes(),
            &material,
            stream,
            &header_bytes,
            scope,
        ];
        match translated_for {
            // Only translated answers name the other provider: keys of everything else stay
            // as they were, so an upgrade keeps the entries already stored.
            Some(upstream) => {
                let mut translated = parts.to_vec();
                translated.push(b"translated-for");
                translated.push(upstream.as_str().as_bytes());
                CacheKey::from_parts(&self.route, &req.model, &translated)
            }
            None => CacheKey::from_parts(&self.route, &req.model, &parts),
        }
    }

    fn stored_usage(entry: &StoredResponse) -> Option<Usage> {
        let (_, value) = entry.headers.iter().find(|(n, _)| n == USAGE_HEADER)?;
        let text = std::str::from_utf8(value).ok()?;
        let (input, output) = text.split_once(',')?;
        Some(Usage {
            input: input.parse().ok()?,
            output: output.parse().ok()?,
        })
    }

    /// Decides on a parsed request: routing, usage, then the cache.
    async fn decide(
        &self,
        cx: &mut RequestCx<'_>,
        state: &mut LlmState,
        body: &Bytes,
    ) -> Result<Option<Answer>, LlmError> {
        if body.len() > self.max_body() {
            return Err(LlmError::TooLarge {
                limit: self.max_body(),
            });
        }
        let path = cx.req.uri.path();
        let mut req = parse_request(self.provider(), path, body)?;
        let mut changed = false;
        let mut translate_to = None;
        if let Some(rule) = self.rules.iter().find(|r| r.matches(&req, &cx.req.headers)) {
            if rule.model != req.model {
                req.set_model(&rule.model);
                changed = true;
            }
            if let Some(upstream) = &rule.upstream {
                cx.set_upstream(upstream.clone());
            }
            self.metrics
                .routing
                .with_label_values(&[&*self.route, &rule.name])
                .inc();
            state.rule = Some(rule.name.clone());
            state.api_key.clone_from(&rule.api_key);
            translate_to = rule.translate_to;
        }
        state.model = req.model.clone();
        state.upstream_provider = translate_to.unwrap_or(self.provider());
        let direction = translate_to.and_then(|to| Direction::between(self.provider(), to));
        let translated = match direction {
            Some(direction) => {
                if req.embeddings {
                    return Err(LlmError::InvalidRequest(format!(
                        "embeddings cannot be sent to the {} upstream this request is routed to",
                        state.upstream_provider.as_str()
                    )));
                }
                let body = direction.request(&req.body)?;
                let include_usage = req
                    .body
                    .get("stream_options")
                    .and_then(|o| o.get("include_usage"))
                    == Some(&serde_json::Value::Bool(true));
                let created = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                state.translation = Some(Box::new(Translation {
                    direction,
                    stream: direction.stream(created, include_usage),
                    pending: BytesMut::new(),
                    overflow: false,
                    created,
                }));
                Some(body)
            }
            None => None,
        };
        // The key is made before usage is asked for: the client sees the same either way.
        let scope = self.scope(&cx.req.headers);
        let key = scope.map(|s| {
            self.key(
                &req,
                path,
                &cx.req.headers,
                &s,
                direction.map(|_| state.upstream_provider),
            )
        });
        if translated.is_none() && self.provider() == Provider::Openai && req.request_usage() {
            state.strip_usage = true;
            changed = true;
        }
        let answer = self.consult_cache(cx, state, &req, key).await;
        if let Some(body) = translated.filter(|_| answer.is_none()) {
            let bytes =
                serde_json::to_vec(&body).map_err(|e| LlmError::InvalidRequest(e.to_string()))?;
            cx.replace_body(Bytes::from(bytes));
        } else if answer.is_none() && changed {
            // Serialized only when the request goes to the provider, not for hits.
            let bytes = serde_json::to_vec(&req.body)
                .map_err(|e| LlmError::InvalidRequest(e.to_string()))?;
            cx.replace_body(Bytes::from(bytes));
        }
        Ok(answer)
    }

    /// The cache's part: an answer from it, or `None` with what to do with the provider's.
    async fn consult_cache(
        &self,
        cx: &mut RequestCx<'_>,
        state: &mut LlmState,
        req: &LlmRequest,
        key: Option<CacheKey>,
    ) -> Option<Answer> {
        let cacheable = self.config.cache.enabled
            && (!self.config.cache.deterministic_only || req.deterministic());
        let Some(key) = key.filter(|_| cacheable) else {
            state.outcome = "bypass";
            state.cache = Some(CacheCx {
                key: CacheKey::from_parts(&self.route, "bypass", &[]),
                status: CacheStatus::Bypass,
                store: false,
                leader: None,
            });
            return None;
        };
        let cc = directives(&cx.req.headers, http::header::CACHE_CONTROL);
        let store = !has_directive(&cc, "no-store");
        if has_directive(&cc, "no-cache") {
            state.outcome = "refresh";
            state.cache = Some(CacheCx {
                key,
                status: CacheStatus::Refresh { stored: false },
                store,
                leader: None,
            });
            return None;
        }
        let lookup = self.store.lookup(&key).await;
        let ttl = self.config.cache.ttl.get();
        let mut status = CacheStatus::Miss { stored: false };
        if let Some(entry) = &lookup.entry {
            let age = entry.age(SystemTime::now());
            let fresh_for = entry.ttl.min(ttl);
            if age < fresh_for {
                if let Some(answer) = Answer::from_stored(entry, &[USAGE_HEADER]) {
                    self.store.record_at(
                        &self.route,
                        lookup.tier,
                        Outcome::Hit { tier: lookup.tier },
                    );
                    let left = fresh_for.as_secs() as i64 - age.as_secs() as i64;
                    state.outcome = "hit";
                    state.from_cache = true;
                    state.strip_usage = false;
                    state.usage = Self::stored_usage(entry);
                    state.cache = Some(CacheCx {
                        key,
                        status: CacheStatus::Hit { ttl: left },
                        store: false,
                        leader: None,
                    });
                    return Some(answer);
                }
            } else {
                status = CacheStatus::Expired { stored: false };
            }
        }
        self.store
            .record_at(&self.route, lookup.tier, Outcome::Miss);
        state.outcome = "miss";
        let mut cache = CacheCx {
            key,
            status,
            store,
            leader: None,
        };
        // Identical non-streamed questions at once: one goes to the provider, the others wait
        // for its answer. A stream does not wait: its first token would come only after the
        // other's last.
        if !req.stream && store && !self.store.recently_uncacheable(&cache.key) {
            match self.store.single_flight(&cache.key, lookup.entry.as_ref()) {
                Flight::Leader(guard) => cache.leader = Some(guard),
                Flight::Follower(wait) => {
                    match wait.wait(self.lock_timeout.min(cx.upstream_timeout)).await {
                        Waited::Served(entry) => {
                            if let Some(answer) = Answer::from_stored(&entry, &[USAGE_HEADER]) {
                                state.outcome = "hit";
                                state.from_cache = true;
                                state.strip_usage = false;
                                state.usage = Self::stored_usage(&entry);
                                cache.status = CacheStatus::Hit {
                                    ttl: ttl.saturating_sub(entry.age(SystemTime::now())).as_secs()
                                        as i64,
                                };
                                state.cache = Some(cache);
                                return Some(answer);
                            }
                        }
                        Waited::Fallthrough => {}
                        Waited::TimedOut => cache.store = false,
                    }
                }
                Flight::Pass => cache.store = false,
            }
        }
        state.cache = Some(cache);
        None
    }

    /// Stores the recorded answer: a 200 whose stream reached its terminal event.
    fn finish(&self, state: &mut LlmState) {
        let Some((body, _reservation)) = state.body.take() else {
            return;
        };
        if !state.sse {
            state.usage = usage_from_body(self.provider(), &body);
        }
        let Some(cache) = state.cache.as_mut() else {
            return;
        };
        if !cache.store || state.status != 200 || (state.sse && (!state.terminal || state.failed)) {
            return;
        }
        let ttl = self.config.cache.ttl.get();
        let mut headers = Vec::with_capacity(2);
        if let Some(ct) = state.content_type.clone() {
            headers.push(("content-type".to_owned(), ct));
        }
        if let Some(u) = state.usage {
            headers.push((
                USAGE_HEADER.to_owned(),
                Bytes::from(format!("{},{}", u.input, u.output)),
            ));
        }
        let entry = StoredResponse {
            status: 200,
            headers,
            body: body.freeze(),
            stored_at: SystemTime::now(),
            ttl,
            retention: ttl,
            namespace: self.route.to_string(),
            label: cache.key.label.clone(),
        };
        let stored = self.store.store_now(&cache.key, entry);
        cache.status.set_stored(stored.is_some());
        if let Some(leader) = cache.leader.take() {
            leader.complete(stored);
        }
    }

    fn price(&self, model: &str, usage: Usage) -> Option<f64> {
        let price = self.config.pricing.get(model)?;
        Some(
            (usage.input as f64 * price.input_per_mtok
                + usage.output as f64 * price.output_per_mtok)
                / 1_000_000.0,
        )
    }
}

/// With `include_usage`, OpenAI adds `"usage":null` as the last field of every chunk; a client
/// that did not ask for usage never saw it, so it is cut from where OpenAI writes it (the end
/// of the event's JSON). Other placements are left alone (the parsed chunk is the same).
fn without_null_usage(raw: &Bytes) -> Bytes {
    const FIELD: &[u8] = b",\"usage\":null}";
    let end = raw
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    match raw[..end].ends_with(FIELD) {
        true => {
            let cut = end - FIELD.len();
            let mut out = BytesMut::with_capacity(raw.len());
            out.extend_from_slice(&raw[..cut]);
            out.extend_from_slice(&raw[end - 1..]);
            out.freeze()
        }
        false => raw.clone(),
    }
}

#[async_trait]
impl Stage for LlmStage {
    fn name(&self) -> &'static str {
        "llm"
    }

    fn wants_body(&self, req: &RequestHeader) -> bool {
        req.method == http::Method::POST
    }

    fn body_too_large(&self, _req: &RequestHeader, limit: usize) -> Option<Answer> {
        LlmError::TooLarge { limit }.answer(self.provider())
    }

    async fn on_request(&self, cx: &mut RequestCx<'_>) -> Result<Verdict, StageError> {
        let Some(body) = cx.body.cloned() else {
            return Ok(Verdict::Continue);
        };
        let mut state = LlmState::new(cx.arrived);
        state.upstream_provider = self.provider();
        let verdict = match self.decide(cx, &mut state, &body).await {
            Ok(None) => Verdict::Continue,
            Ok(Some(answer)) => Verdict::Answer(answer),
            Err(error) => {
                tracing::debug!(route = cx.route, code = error.code(), "llm request refused");
                state.outcome = "rejected";
                state.cache = None;
                state.strip_usage = false;
                match error.answer(self.provider()) {
                    Some(answer) => Verdict::Answer(answer),
                    None => {
                        return Err(StageError {
                            status: error.status(),
                            code: error.code(),
                            message: error.to_string(),
                        })
                    }
                }
            }
        };
        *cx.slot = Some(Box::new(state));
        Ok(verdict)
    }

    fn on_upstream_request(&self, slot: &mut Slot, req: &mut RequestHeader) {
        let Some(state) = state_ref::<LlmState>(slot) else {
            return;
        };
        // Usage is read from the body and answers are stored as sent: ask for it plain.
        req.remove_header(&http::header::ACCEPT_ENCODING);
        if state.api_key.is_none() && state.translation.is_none() {
            return;
        }
        // Both headers go: the upstream gets exactly one key, in the header its API reads.
        let authorization = req.remove_header(&http::header::AUTHORIZATION);
        let x_api_key = req.remove_header("x-api-key");
        let key = match &state.api_key {
            Some(configured) => Some(configured.as_bytes().to_vec()),
            None => authorization
                .as_ref()
                .map(|v| {
                    let v = v.as_bytes();
                    match v.get(..7) {
                        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => v[7..].to_vec(),
                        _ => v.to_vec(),
                    }
                })
                .or_else(|| x_api_key.map(|v| v.as_bytes().to_vec())),
        };
        let header = key.map(|key| match state.upstream_provider {
            Provider::Anthropic => ("x-api-key", key),
            Provider::Openai => {
                let mut bearer = b"Bearer ".to_vec();
                bearer.extend_from_slice(&key);
                ("authorization", bearer)
            }
        });
        if let Some((name, value)) = header {
            if let Ok(mut value) = http::HeaderValue::from_bytes(&value) {
                value.set_sensitive(true);
                let _ = req.insert_header(name, value);
            }
        }
        match state.translation.as_ref().map(|t| t.direction) {
            Some(direction @ Direction::OpenaiToAnthropic) => {
                req.set_uri(http::Uri::from_static(direction.upstream_path()));
                if !req.headers.contains_key("anthropic-version") {
                    let _ = req.insert_header("anthropic-version", translate::ANTHROPIC_VERSION);
                }
                req.remove_header("openai-beta");
            }
            Some(direction @ Direction::AnthropicToOpenai) => {
                req.set_uri(http::Uri::from_static(direction.upstream_path()));
                req.remove_header("anthropic-version");
                req.remove_header("anthropic-beta");
            }
            None => {}
        }
    }

    fn on_upstream_response(&self, slot: &mut Slot, resp: &ResponseHeader) -> ResponseVerdict {
        let Some(state) = state_mut::<LlmState>(slot) else {
            return ResponseVerdict::Forward;
        };
        if resp.status.is_informational() {
            return ResponseVerdict::Forward;
        }
        state.status = resp.status.as_u16();
        let content_type = resp.headers.get(http::header::CONTENT_TYPE);
        state.sse = content_type.is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        state.content_type = content_type.map(|v| Bytes::copy_from_slice(v.as_bytes()));
        let encoded = resp.headers.contains_key(http::header::CONTENT_ENCODING);
        let storing = state.cache.as_ref().is_some_and(|c| c.store);
        // A JSON answer is read for its usage even when it is not stored.
        let reservation = (state.status == 200 && !encoded && (storing || !state.sse))
            .then(|| self.store.reserve_inflight(0))
            .flatten();
        if let Some(reservation) = reservation {
            state.body = Some((BytesMut::new(), reservation));
            if let Some(cache) = state.cache.as_mut().filter(|c| c.store) {
                // The header leaves before the body: it says what is being stored.
                cache.status.set_stored(true);
            }
        }
        if !state.sse {
            state.strip_usage = false;
        }
        if state.body.is_none() {
            // Nothing will be stored: waiting requests need not wait for the body.
            if let Some(cache) = state.cache.as_mut() {
                cache.leader.take();
            }
        }
        ResponseVerdict::Forward
    }

    fn on_response(&self, slot: &Slot, resp: &mut ResponseHeader) {
        let Some(state) = state_ref::<LlmState>(slot) else {
            return;
        };
        if let Some(cache) = &state.cache {
            let _ = resp.insert_header("x-cache-status", cache.status.x_cache_status());
            let _ = resp.insert_header("cache-status", cache.status.header_value());
        }
        if let Some(rule) = &state.rule {
            let _ = resp.insert_header(RULE_HEADER, rule.as_str());
        }
        if state.translation.is_some() && !state.from_cache {
            // What leaves is outrider's own plain rendering, whatever the upstream encoded.
            resp.remove_header(&http::header::CONTENT_ENCODING);
        }
        if (state.strip_usage || state.translation.is_some()) && !state.from_cache {
            // One event is removed from the stream, or the answer is translated: its length
            // is no longer the upstream's.
            resp.remove_header(&http::header::CONTENT_LENGTH);
            let _ = resp.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        }
    }

    fn server_timing(&self, slot: &Slot, out: &mut String) {
        let Some(cache) = state_ref::<LlmState>(slot).and_then(|s| s.cache.as_ref()) else {
            return;
        };
        out.push_str(match cache.status {
            CacheStatus::Hit { .. } => ", cache;desc=hit",
            CacheStatus::Bypass => ", cache;desc=bypass",
            _ => ", cache;desc=miss",
        });
    }

    fn filter_body_chunk(&self, slot: &mut Slot, chunk: &mut Option<Bytes>, end_of_stream: bool) {
        let Some(state) = state_mut::<LlmState>(slot) else {
            return;
        };
        if state.first_byte.is_none() && chunk.as_ref().is_some_and(|c| !c.is_empty()) {
            state.first_byte = Some(state.arrived.elapsed());
        }
        if let Some(translation) = state.translation.as_mut() {
            if state.sse && state.status == 200 {
                let mut events = Vec::new();
                if let Some(c) = chunk.as_ref() {
                    state.splitter.push(c, &mut events);
                }
                if end_of_stream {
                    // A partial last event is not an event: nothing to translate.
                    let _ = state.splitter.finish(&mut events);
                }
                let usage = state.usage.get_or_insert_with(Usage::default);
                let mut out = BytesMut::new();
                for event in &events {
                    let facts = read_event(state.upstream_provider, event, usage);
                    state.failed |= facts.error;
                    translation.stream.event(event, &mut out);
                }
                state.terminal = translation.stream.complete();
                *chunk = (!out.is_empty() || end_of_stream).then(|| out.freeze());
            } else {
                if let Some(c) = chunk.take() {
                    if translation.pending.len() + c.len() > MAX_TRANSLATED_BODY {
                        translation.overflow = true;
                    } else if !translation.overflow {
                        translation.pending.extend_from_slice(&c);
                    }
                }
                if end_of_stream {
                    let upstream = translation.pending.split().freeze();
                    let answer = (state.status == 200 && !translation.overflow)
                        .then(|| {
                            translation
                                .direction
                                .response(&upstream, translation.created)
                        })
                        .flatten();
                    let out = match answer {
                        Some(answer) => answer,
                        None => {
                            if state.status == 200 {
                                // Not a message after all: say so, and store nothing.
                                tracing::warn!(
                                    route = &*self.route,
                                    "the other provider's answer could not be translated"
                                );
                                state.body = None;
                                if let Some(cache) = state.cache.as_mut() {
                                    cache.store = false;
                                }
                            }
                            if translation.overflow {
                                translation.direction.error(
                                    500,
                                    br#"{"error":{"message":"the provider's answer was too large to translate"}}"#,
                                )
                            } else {
                                translation.direction.error(state.status, &upstream)
                            }
                        }
                    };
                    *chunk = Some(Bytes::from(out));
                }
            }
        } else if state.sse && state.status == 200 {
            let mut events = Vec::new();
            if let Some(c) = chunk.as_ref() {
                state.splitter.push(c, &mut events);
            }
            let rest = if end_of_stream {
                state.splitter.finish(&mut events)
            } else {
                Bytes::new()
            };
            let usage = state.usage.get_or_insert_with(Usage::default);
            let mut kept = state.strip_usage.then(BytesMut::new);
            for event in &events {
                let facts = read_event(self.provider(), event, usage);
                state.terminal |= facts.terminal;
                state.failed |= facts.error;
                if let Some(kept) = kept.as_mut() {
                    if !facts.usage_only {
                        kept.extend_from_slice(&without_null_usage(&event.raw));
                    }
                }
            }
            if let Some(mut kept) = kept {
                // Only whole events go out while one is being removed; a partial one waits
                // for its end (the client could not use half an event anyway).
                kept.extend_from_slice(&rest);
                *chunk = (!kept.is_empty() || end_of_stream).then(|| kept.freeze());
            }
        }
        if let (Some((body, reservation)), Some(c)) = (state.body.as_mut(), chunk.as_ref()) {
            let max = self.store.settings().max_entry_size;
            if (max > 0 && body.len() + c.len() > max)
                || !self.store.grow_inflight(reservation, c.len())
            {
                // Too large to store (and for JSON, to read usage from), or the store's
                // in-flight budget is spent: pass through.
                state.body = None;
                if let Some(cache) = state.cache.as_mut() {
                    cache.store = false;
                }
            } else {
                body.extend_from_slice(c);
            }
        }
        if end_of_stream {
            self.finish(state);
        }
    }

    fn on_complete(&self, slot: &mut Slot, done: &Completion<'_>) {
        let Some(state) = state_mut::<LlmState>(slot) else {
            return;
        };
        // A leader that stored nothing lets its followers go to the provider themselves.
        if let Some(cache) = state.cache.as_mut() {
            cache.leader.take();
        }
        if done.background {
            return;
        }
        let known = self.known_models.contains(&state.model);
        let model = if state.model.is_empty() {
            "unknown"
        } else {
            self.metrics.model_label(&state.model, known)
        };
        let route: &str = &self.route;
        let class = match done.status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        self.metrics
            .requests
            .with_label_values(&[route, model, state.outcome, class])
            .inc();
        if state.outcome == "rejected" {
            return;
        }
        let source = if state.from_cache {
            "cache"
        } else {
            "upstream"
        };
        if let Some(usage) = state.usage.filter(|_| (200..300).contains(&done.status)) {
            self.metrics
                .tokens
                .with_label_values(&[route, model, "input", source])
                .inc_by(usage.input);
            self.metrics
                .tokens
                .with_label_values(&[route, model, "output", source])
                .inc_by(usage.output);
            if let Some(cost) = self.price(&state.model, usage) {
                let counter = if state.from_cache {
                    &self.metrics.cost_saved
                } else {
                    &self.metrics.cost
                };
                counter.with_label_values(&[route, model]).inc_by(cost);
            }
        }
        let first = state.first_byte.unwrap_or(done.duration);
        self.metrics
            .ttft
            .with_label_values(&[route, model, source])
            .observe(first.as_secs_f64());
        self.metrics
            .duration
            .with_label_values(&[route, model, source])
            .observe(done.duration.as_secs_f64());
    }

    fn span_notes(&self, slot: &Slot, notes: &mut SpanNotes) {
        let Some(state) = state_ref::<LlmState>(slot) else {
            return;
        };
        notes.attribute("gen_ai.system", state.upstream_provider.as_str());
        if !state.model.is_empty() {
            notes.attribute("gen_ai.request.model", state.model.clone());
        }
        notes.attribute("outrider.llm.cache", state.outcome);
        if let Some(u) = state.usage {
            notes.attribute("gen_ai.usage.input_tokens", u.input as i64);
            notes.attribute("gen_ai.usage.output_tokens", u.output as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Effects;

    fn stage() -> LlmStage {
        let registry = prometheus::Registry::new();
        let store = Store::new(crate::store::CacheSettings::default(), &registry).unwrap();
        let metrics = Arc::new(LlmMetrics::new(&registry).unwrap());
        let config: LlmConfig = serde_json::from_str(r#"{"provider":"openai"}"#).unwrap();
        LlmStage::new(config, store, metrics, "chat")
    }

    fn request() -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        req.insert_header("authorization", "Bearer sk-unit")
            .unwrap();
        req
    }

    /// Runs `on_request`; returns the answer (a hit) or the body sent upstream.
    async fn ask(stage: &LlmStage, slot: &mut Slot, body: &str) -> (Option<Answer>, Option<Bytes>) {
        let req = request();
        let body = Bytes::from(body.to_owned());
        let mut effects = Effects::default();
        let verdict = {
            let mut cx = RequestCx::new(
                &req,
                Some(&body),
                "chat",
                Duration::from_secs(5),
                slot,
                0,
                &mut effects,
            );
            stage.on_request(&mut cx).await.unwrap()
        };
        match verdict {
            Verdict::Answer(a) => (Some(a), None),
            _ => (None, effects.body),
        }
    }

    const EVENTS: &[&str] = &[
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    ];

    /// Streams the provider's events through the stage, cut at `cuts`; returns what the client got.
    fn provider_stream(stage: &LlmStage, slot: &mut Slot, cuts: &[usize]) -> Vec<u8> {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("content-type", "text/event-stream")
            .unwrap();
        let _ = stage.on_upstream_response(slot, &resp);
        let all: Vec<u8> = EVENTS.concat().into_bytes();
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|c| *c < all.len()));
        bounds.push(all.len());
        let mut client = Vec::new();
        for pair in bounds.windows(2) {
            let mut chunk = Some(Bytes::copy_from_slice(&all[pair[0]..pair[1]]));
            stage.filter_body_chunk(slot, &mut chunk, false);
            client.extend_from_slice(chunk.as_deref().unwrap_or_default());
        }
        let mut end = None;
        stage.filter_body_chunk(slot, &mut end, true);
        client.extend_from_slice(end.as_deref().unwrap_or_default());
        client
    }

    #[tokio::test]
    async fn a_stream_is_recorded_without_what_outrider_added_and_replayed() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let want = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: [DONE]\n\n";
        let all_len = EVENTS.concat().len();
        // Whatever the chunking, the client sees the stream it asked for.
        for cut in (1..all_len).step_by(7) {
            let stage = stage();
            let mut slot = None;
            let (answer, upstream_body) = ask(&stage, &mut slot, body).await;
            assert!(answer.is_none());
            let sent: serde_json::Value = serde_json::from_slice(&upstream_body.unwrap()).unwrap();
            assert_eq!(sent["stream_options"]["include_usage"], true);
            let client = provider_stream(&stage, &mut slot, &[cut, cut + 3]);
            assert_eq!(String::from_utf8_lossy(&client), want, "cut at {cut}");
            let usage = state_ref::<LlmState>(&slot).and_then(|s| s.usage);
            assert_eq!(
                usage,
                Some(Usage {
                    input: 3,
                    output: 2
                })
            );
            // Recorded: the next identical request is a hit with the same bytes.
            let mut again = None;
            let (hit, _) = ask(&stage, &mut again, body).await;
            assert_eq!(&hit.expect("a hit").body[..], want.as_bytes());
        }
    }

    #[tokio::test]
    async fn a_stream_without_its_terminal_event_is_not_recorded() {
        let stage = stage();
        let body = r#"{"model":"m","messages":[],"stream":true}"#;
        let mut slot = None;
        ask(&stage, &mut slot, body).await;
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("content-type", "text/event-stream")
            .unwrap();
        let _ = stage.on_upstream_response(&mut slot, &resp);
        let mut chunk = Some(Bytes::from_static(EVENTS[0].as_bytes()));
        stage.filter_body_chunk(&mut slot, &mut chunk, true);
        let mut again = None;
        let (hit, _) = ask(&stage, &mut again, body).await;
        assert!(hit.is_none());
    }

    #[test]
    fn the_usage_field_outrider_caused_is_cut() {
        let raw = Bytes::from_static(b"data: {\"id\":\"x\",\"choices\":[],\"usage\":null}\n\n");
        assert_eq!(
            &without_null_usage(&raw)[..],
            b"data: {\"id\":\"x\",\"choices\":[]}\n\n"
        );
        let elsewhere = Bytes::from_static(b"data: {\"usage\":null,\"id\":\"x\"}\n\n");
        assert_eq!(without_null_usage(&elsewhere), elsewhere);
        let done = Bytes::from_static(b"data: [DONE]\n\n");
        assert_eq!(without_null_usage(&done), done);
    }
}
