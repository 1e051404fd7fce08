//! Per-request state: one value created by `new_ctx`, dropped when the request ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntGauge;

use crate::config::ActiveConfig;

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
    /// Status of a response outrider wrote itself (errors, 404s).
    pub own_status: Option<u16>,
    /// Kind of upstream failure, for metrics and the access log.
    pub upstream_error: Option<&'static str>,
    /// Metric handles of the matched route (or `none`).
    pub metrics: Option<Arc<crate::telemetry::metrics::RouteMetrics>>,
    /// Present when the matched route caches.
    pub http_cache: Option<Box<super::http_cache::HttpCacheCtx>>,
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
            http_cache: None,
            metrics: None,
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
}
