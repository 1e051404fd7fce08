//! Per-request state: one value created by `new_ctx`, dropped when the request ends. Feature
//! state lives in the stages' slots, so nothing here names a feature.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntGauge;

use crate::config::ActiveConfig;
use crate::pipeline::{Effects, Slot, Stage};
use crate::telemetry::trace::RequestTrace;

/// Counts a request as in flight from creation until drop, whatever path the request takes.
pub struct InFlight(IntGauge);

impl InFlight {
    pub fn enter(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct Ctx {
    pub started: Instant,
    pub _in_flight: InFlight,
    /// Config snapshot taken when the request arrived: the request finishes on it.
    pub config: Option<Arc<ActiveConfig>>,
    /// Index into `config.routes` of the matched route.
    pub route: Option<usize>,
    /// The client's id when acceptable, else a generated one; sent upstream and back.
    pub request_id: http::HeaderValue,
    pub upstream_started: Option<Instant>,
    pub upstream_elapsed: Option<Duration>,
    /// Status of a response outrider wrote itself (errors, 404s, stage answers).
    pub own_status: Option<u16>,
    /// Kind of upstream failure, for metrics and the access log.
    pub upstream_error: Option<&'static str>,
    /// Metric handles of the matched route (or `none`).
    pub metrics: Option<Arc<crate::telemetry::metrics::RouteMetrics>>,
    /// One slot per stage of the matched route, in the route's stage order.
    pub slots: Vec<Slot>,
    /// What the stages asked of the proxy (another upstream, a replacement body).
    pub effects: Effects,
    /// Length of the request body read in full for the stages; it is forwarded with this
    /// `Content-Length` (not chunked, and without `Expect`).
    pub buffered_len: Option<usize>,
    /// The buffered body's bytes in `limits.max_buffered_bodies`, held until the request ends.
    pub body_reservation: Option<crate::store::Reservation>,
    /// A stage answered in place of the upstream's response; the rest of it is discarded.
    pub answered: bool,
    /// The request was handed, body and state, to a subrequest that answers and logs it.
    pub delegated: bool,
    /// This request is background work a stage asked for (not a client's).
    pub background: bool,
    /// Held while background work runs, bounding how many run at once.
    pub background_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Trace identity and timings (set when the request is read).
    pub trace: Option<RequestTrace>,
    /// Upstream attempts made again after a failure on a reused connection (at most one).
    pub upstream_retries: u8,
}

impl Ctx {
    pub fn new(in_flight: InFlight) -> Self {
        Self {
            started: Instant::now(),
            _in_flight: in_flight,
            config: None,
            route: None,
            request_id: http::HeaderValue::from_static(""),
            upstream_started: None,
            upstream_elapsed: None,
            own_status: None,
            upstream_error: None,
            metrics: None,
            slots: Vec::new(),
            effects: Effects::default(),
            buffered_len: None,
            body_reservation: None,
            answered: false,
            delegated: false,
            background: false,
            background_permit: None,
            trace: None,
            upstream_retries: 0,
        }
    }

    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }

    pub fn route_name(&self) -> &str {
        match (&self.config, self.route) {
            (Some(config), Some(i)) => config.routes.get(i).map(|r| &*r.name).unwrap_or("none"),
            _ => "none",
        }
    }

    pub fn route(&self) -> Option<&crate::config::Route> {
        let config = self.config.as_ref()?;
        config.routes.get(self.route?)
    }

    /// The upstream this request goes to: the one a stage chose, else the route's.
    pub fn upstream(&self) -> Option<Arc<crate::config::Upstream>> {
        match (&self.effects.upstream, &self.config) {
            (Some(name), Some(config)) => config.upstreams.get(name).cloned(),
            (None, _) => self.route().and_then(|r| r.upstream.clone()),
            _ => None,
        }
    }

    /// The matched route's stages and their slots, borrowed apart so hooks can take both.
    pub fn stages_and_slots(&mut self) -> (&[Arc<dyn Stage>], &mut [Slot]) {
        let stages = match (&self.config, self.route) {
            (Some(config), Some(i)) => config.routes.get(i).map(|r| r.stages.as_slice()),
            _ => None,
        };
        (stages.unwrap_or(&[]), &mut self.slots)
    }
}
