//! The stage seam: every capability (HTTP cache, request buffering, and next APQ, LLM, SLOs,
//! tracing, inference) is a [`Stage`] with default no-op hooks over the request's life.
//!
//! A route's compiled config holds its ordered list of stages; `proxy/` calls the hooks of that
//! list in each Pingora phase and names no feature. A stage keeps its per-request state in its
//! own [`Slot`] (a type-erased box only it downcasts), so the proxy context never imports a
//! feature. Stages see headers (`pingora_http` header types) and bytes, never a Pingora
//! session, so they can be tested without one.
//!
//! Phase chart (which hook runs where) is in `docs/architecture.md`.

pub mod registry;

use std::any::Any;
use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_http::{RequestHeader, ResponseHeader};

/// One stage's per-request state; `None` until the stage puts something there.
pub type Slot = Option<Box<dyn Any + Send + Sync>>;

/// Borrows a stage's own state back out of its slot.
pub fn state_mut<T: Any>(slot: &mut Slot) -> Option<&mut T> {
    slot.as_mut()?.downcast_mut::<T>()
}

/// Shared view of a stage's own state.
pub fn state_ref<T: Any>(slot: &Slot) -> Option<&T> {
    slot.as_ref()?.downcast_ref::<T>()
}

/// A complete response a stage produced itself (a cache hit, an in-process answer).
pub struct Answer {
    pub header: Box<ResponseHeader>,
    /// Ignored for HEAD requests and bodiless statuses; `content-length` is the stage's to set.
    pub body: Bytes,
}

impl Answer {
    /// A JSON answer (an error in a protocol's own shape) with its length and `headers`.
    pub fn json(status: u16, body: Bytes, headers: &[(&'static str, &str)]) -> Option<Answer> {
        let mut header = ResponseHeader::build(status, Some(2 + headers.len())).ok()?;
        header
            .insert_header("content-type", "application/json")
            .ok()?;
        header
            .insert_header("content-length", body.len().to_string())
            .ok()?;
        for (name, value) in headers {
            header.insert_header(*name, *value).ok()?;
        }
        Some(Answer {
            header: Box::new(header),
            body,
        })
    }

    /// A stored entry as the answer: its status and headers (less the `hidden` ones the
    /// feature keeps for itself), its length and its `age`.
    pub fn from_stored(entry: &crate::store::StoredResponse, hidden: &[&str]) -> Option<Answer> {
        let mut header = ResponseHeader::build(entry.status, Some(entry.headers.len() + 2)).ok()?;
        for (name, value) in &entry.headers {
            if !hidden.contains(&name.as_str()) {
                header.append_header(name.clone(), value.as_ref()).ok()?;
            }
        }
        header
            .insert_header("content-length", entry.body.len().to_string())
            .ok()?;
        let age = entry.age(SystemTime::now());
        header
            .insert_header("age", crate::cache_headers::age_header_value(age))
            .ok()?;
        Some(Answer {
            header: Box::new(header),
            body: entry.body.clone(),
        })
    }

    /// A JSON value as the answer (an error, an in-process result), with `cache-control` and
    /// `headers`. `None` only for a header value that cannot be sent.
    pub fn json_value(
        status: u16,
        body: &serde_json::Value,
        cache_control: &str,
        headers: &[(&str, String)],
    ) -> Option<Answer> {
        let mut answer = Answer::json(
            status,
            Bytes::from(body.to_string()),
            &[("cache-control", cache_control)],
        )?;
        for (name, value) in headers {
            answer
                .header
                .insert_header(name.to_string(), value.as_str())
                .ok()?;
        }
        Some(answer)
    }
}

/// What `on_request` decided.
pub enum Verdict {
    /// Go on: the next stage, then the upstream.
    Continue,
    /// Answer with this response; later stages' `on_request` and the upstream are skipped.
    Answer(Answer),
    /// The request is shed (overload): earlier stages may stand in through
    /// [`Stage::on_upstream_failure`] with kind [`SHED`] (a stale cache entry), else this answer.
    Shed(Answer),
}

/// The [`UpstreamFailure::kind`] of a request a stage shed before it reached the upstream.
pub const SHED: &str = "shed";

/// What `on_upstream_response` decided.
pub enum ResponseVerdict {
    Forward,
    /// Abandon the upstream response and answer with this instead (a stored entry renewed by a
    /// 304, or a stale one standing in for a 5xx).
    Replace(Answer),
}

/// Why the upstream gave no response.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamFailure {
    /// Stable label (`connect_refused`, `timeout`, …) as used in metrics.
    pub kind: &'static str,
}

/// What a stage learns when the request is over.
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    pub route: &'a str,
    /// Status the client got (0 when none was written).
    pub status: u16,
    pub duration: Duration,
    /// Background work a stage asked for, not a client's request.
    pub background: bool,
    /// The upstream failed (possibly after the response header went out).
    pub upstream_failed: bool,
}

/// A value a stage reports for the request's trace span.
#[derive(Debug, Clone, PartialEq)]
pub enum NoteValue {
    Str(Cow<'static, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl From<&'static str> for NoteValue {
    fn from(value: &'static str) -> Self {
        NoteValue::Str(Cow::Borrowed(value))
    }
}

impl From<String> for NoteValue {
    fn from(value: String) -> Self {
        NoteValue::Str(Cow::Owned(value))
    }
}

impl From<i64> for NoteValue {
    fn from(value: i64) -> Self {
        NoteValue::Int(value)
    }
}

impl From<f64> for NoteValue {
    fn from(value: f64) -> Self {
        NoteValue::Float(value)
    }
}

impl From<bool> for NoteValue {
    fn from(value: bool) -> Self {
        NoteValue::Bool(value)
    }
}

/// Something that happened at one moment of the request (a cache lookup, a model call).
#[derive(Debug, Clone, PartialEq)]
pub struct NoteEvent {
    pub name: &'static str,
    pub at: SystemTime,
    pub attributes: Vec<(&'static str, NoteValue)>,
}

/// What stages tell the request's trace span: attributes named after the OpenTelemetry
/// conventions (`outrider.cache.status`, `gen_ai.request.model`, …) and events. Stages fill it
/// in [`Stage::span_notes`], which runs only for recorded traces, so unsampled requests pay
/// nothing; stages never see the tracing library.
#[derive(Debug, Default)]
pub struct SpanNotes {
    pub attributes: Vec<(&'static str, NoteValue)>,
    pub events: Vec<NoteEvent>,
}

impl SpanNotes {
    pub fn attribute(&mut self, key: &'static str, value: impl Into<NoteValue>) {
        self.attributes.push((key, value.into()));
    }

    pub fn event(
        &mut self,
        name: &'static str,
        at: SystemTime,
        attributes: Vec<(&'static str, NoteValue)>,
    ) {
        self.events.push(NoteEvent {
            name,
            at,
            attributes,
        });
    }
}

/// A stage's refusal of a request: answered with `status` and a JSON body carrying `code`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    pub status: u16,
    /// Stable error code for the JSON body.
    pub code: &'static str,
    pub message: String,
}

/// What a stage may ask of the proxy while deciding on a request.
#[derive(Default)]
pub struct Effects {
    /// Send the request to this named upstream instead of the route's.
    pub upstream: Option<String>,
    /// Forward this body instead of the client's (the length is rewritten to match).
    pub body: Option<Bytes>,
    /// Work to run as a background request through the same proxy path, by stage position.
    pub background: Vec<(usize, Box<dyn Any + Send + Sync>)>,
    /// The request must be answered within this time from its arrival (upstream timeouts are
    /// cut to what is left; past it the client gets 504 `deadline_exceeded`).
    pub deadline: Option<Duration>,
}

/// The request as a stage's `on_request` sees it.
pub struct RequestCx<'a> {
    pub req: &'a RequestHeader,
    /// The whole request body, present when some stage of the route asked for it.
    pub body: Option<&'a Bytes>,
    pub route: &'a str,
    /// The route upstream's per-operation timeout (e.g. for waiting on another request's fetch).
    pub upstream_timeout: Duration,
    /// This stage's per-request state.
    pub slot: &'a mut Slot,
    /// The client's address (the TCP peer), when known.
    pub client_ip: Option<std::net::IpAddr>,
    /// When the request arrived.
    pub arrived: std::time::Instant,
    pub(crate) index: usize,
    pub(crate) effects: &'a mut Effects,
}

impl<'a> RequestCx<'a> {
    /// For the proxy (and stage tests): a view of one request for the stage at `index`.
    pub fn new(
        req: &'a RequestHeader,
        body: Option<&'a Bytes>,
        route: &'a str,
        upstream_timeout: Duration,
        slot: &'a mut Slot,
        index: usize,
        effects: &'a mut Effects,
    ) -> Self {
        RequestCx {
            req,
            body,
            route,
            upstream_timeout,
            slot,
            client_ip: None,
            arrived: std::time::Instant::now(),
            index,
            effects,
        }
    }

    /// The deadline an earlier stage set (from the request's arrival), if any.
    pub fn deadline(&self) -> Option<Duration> {
        self.effects.deadline
    }

    /// Time since the request arrived.
    pub fn elapsed(&self) -> Duration {
        self.arrived.elapsed()
    }

    /// Bounds the whole request (queueing and upstream) to `deadline` from its arrival; the
    /// tightest of several stages' deadlines wins.
    pub fn set_deadline(&mut self, deadline: Duration) {
        let tightest = match self.effects.deadline {
            Some(existing) => existing.min(deadline),
            None => deadline,
        };
        self.effects.deadline = Some(tightest);
    }

    /// Sends this request to another named upstream (validated at config load by the stage).
    pub fn set_upstream(&mut self, name: impl Into<String>) {
        self.effects.upstream = Some(name.into());
    }

    /// Replaces the body the upstream receives.
    pub fn replace_body(&mut self, body: Bytes) {
        self.effects.body = Some(body);
    }

    /// Runs `job` later as a request of its own through the same proxy path (same target bytes,
    /// forwarding headers, request id, timeouts and metrics); the stage gets it back in
    /// [`Stage::on_background`]. Dropped without running when too many are already running.
    pub fn spawn_background(&mut self, job: Box<dyn Any + Send + Sync>) {
        self.effects.background.push((self.index, job));
    }
}

/// One capability's part in a request. Every hook has a no-op default; a stage overrides only
/// what it needs. Hooks other than `on_request` get only the stage's own slot.
#[async_trait]
pub trait Stage: Send + Sync + std::fmt::Debug {
    /// The capability's name (its YAML key).
    fn name(&self) -> &'static str;

    /// Whether `on_request` needs the whole request body first. Read once for all stages,
    /// bounded by the route's `max_body`.
    fn wants_body(&self, _req: &RequestHeader) -> bool {
        false
    }

    /// Before the upstream is chosen: may answer by itself.
    async fn on_request(&self, _cx: &mut RequestCx<'_>) -> Result<Verdict, StageError> {
        Ok(Verdict::Continue)
    }

    /// In place of `on_request` when this request is background work the stage asked for with
    /// [`RequestCx::spawn_background`]; other stages' `on_request` do not run for it.
    async fn on_background(
        &self,
        _cx: &mut RequestCx<'_>,
        _job: Box<dyn Any + Send + Sync>,
    ) -> Result<Verdict, StageError> {
        Ok(Verdict::Continue)
    }

    /// The request header about to go upstream (after outrider's forwarding headers).
    fn on_upstream_request(&self, _slot: &mut Slot, _req: &mut RequestHeader) {}

    /// The upstream's response header arrived.
    fn on_upstream_response(&self, _slot: &mut Slot, _resp: &ResponseHeader) -> ResponseVerdict {
        ResponseVerdict::Forward
    }

    /// The response header about to go to the client, from the upstream or from a stage.
    fn on_response(&self, _slot: &Slot, _resp: &mut ResponseHeader) {}

    /// `server-timing` entries of this stage (e.g. `, cache;desc=hit`).
    fn server_timing(&self, _slot: &Slot, _out: &mut String) {}

    /// Reshapes an upstream body chunk before the client (and `on_body_chunk`) sees it: a
    /// stage that added something to the upstream request removes what that added to the
    /// response (the LLM stage drops the usage event it asked for). A stage that changes the
    /// body's length must also drop `content-length` in `on_response`. Runs in stage order.
    fn filter_body_chunk(
        &self,
        _slot: &mut Slot,
        _chunk: &mut Option<Bytes>,
        _end_of_stream: bool,
    ) {
    }

    /// Each upstream body chunk on its way to the client (never held back).
    fn on_body_chunk(&self, _slot: &mut Slot, _chunk: Option<&Bytes>, _end_of_stream: bool) {}

    /// The upstream could not be reached or failed mid-way: may answer instead.
    fn on_upstream_failure(&self, _slot: &mut Slot, _failure: &UpstreamFailure) -> Option<Answer> {
        None
    }

    /// The proxy refuses a body over the route's `max_body` (before any `on_request`): a stage
    /// that speaks a protocol answers in that protocol's error shape, so clients parse it.
    fn body_too_large(&self, _req: &RequestHeader, _limit: usize) -> Option<Answer> {
        None
    }

    /// The request is over (metrics, logs).
    fn on_complete(&self, _slot: &mut Slot, _done: &Completion<'_>) {}

    /// Attributes and events for the request's trace span; called only when it is recorded.
    fn span_notes(&self, _slot: &Slot, _notes: &mut SpanNotes) {}
}
