//! Proxy-level Prometheus metrics. Labels are bounded: route names come from the config and
//! methods outside the standard set collapse to `OTHER`, so a scanner cannot explode cardinality.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use super::openmetrics::Exemplar;
use parking_lot::{Mutex, RwLock};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Metric names, documented in docs/operations.md.
pub mod names {
    pub const REQUESTS: &str = "outrider_requests_total";
    pub const REQUEST_DURATION: &str = "outrider_request_duration_seconds";
    pub const UPSTREAM_DURATION: &str = "outrider_upstream_duration_seconds";
    pub const IN_FLIGHT: &str = "outrider_requests_in_flight";
    pub const UPSTREAM_ERRORS: &str = "outrider_upstream_errors_total";
    pub const UPSTREAM_RETRIES: &str = "outrider_upstream_retries_total";
    pub const CONFIG_RELOADS: &str = "outrider_config_reloads_total";
    pub const CONFIG_GENERATION: &str = "outrider_config_generation";
    pub const BUILD_INFO: &str = "outrider_build_info";
    pub const LOG_LINES_DROPPED: &str = "outrider_log_lines_dropped_total";
    pub const BODIES_OVER_BUDGET: &str = "outrider_request_bodies_over_budget_total";
}

/// Fine enough between 1 ms and 10 s to read p50/p95/p99 by interpolation.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0,
];

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub in_flight: IntGauge,
    pub upstream_errors: IntCounterVec,
    /// Requests sent upstream a second time after failing on a reused connection.
    pub upstream_retries: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    /// Log lines dropped because stdout could not keep up (the log queue is lossy by design).
    pub log_lines_dropped: IntCounter,
    /// Request bodies refused because `limits.max_buffered_bodies` were held already.
    pub bodies_over_budget: IntCounter,
    /// Per-route handles, so the request path does not hash label values on every request.
    routes: RwLock<HashMap<String, Arc<RouteMetrics>>>,
    duration_buckets: Arc<[f64]>,
}

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One route's metric children, resolved once. Request counters are created on first use so
/// that only label combinations that happened appear in `/metrics`.
pub struct RouteMetrics {
    route: String,
    requests_vec: IntCounterVec,
    requests: [[OnceLock<IntCounter>; 5]; 8],
    pub duration: Histogram,
    pub upstream_duration: Histogram,
    /// Upper bounds of `duration`'s buckets.
    buckets: Arc<[f64]>,
    /// The latest sampled request of each duration bucket (the last one is `+Inf`).
    exemplars: Mutex<Vec<Option<Exemplar>>>,
}

impl RouteMetrics {
    /// Observes a traced request's duration and keeps it as its bucket's exemplar.
    pub fn observe_duration_with_exemplar(&self, seconds: f64, trace_id: &str) {
        self.duration.observe(seconds);
        let bucket = self
            .buckets
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.buckets.len());
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        if let Some(slot) = self.exemplars.lock().get_mut(bucket) {
            *slot = Some(Exemplar {
                trace_id: trace_id.to_string(),
                value: seconds,
                timestamp,
            });
        }
    }

    pub fn count_request(&self, method: &str, status: u16) {
        let m = METHODS
            .iter()
            .position(|known| *known == method_label(method))
            .unwrap_or(METHODS.len() - 1);
        let class = CLASSES
            .iter()
            .position(|c| *c == status_class(status))
            .unwrap_or(CLASSES.len() - 1);
        self.requests[m][class]
            .get_or_init(|| {
                self.requests_vec.with_label_values(&[
                    self.route.as_str(),
                    METHODS[m],
                    CLASSES[class],
                ])
            })
            .inc();
    }
}

#[derive(Debug, thiserror::Error)]
#[error("metrics registration failed: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        Self::with_thresholds(&[])
    }

    /// Metrics whose request-duration buckets also hold `thresholds` (seconds), so that the
    /// latency SLOs' thresholds are bucket bounds Prometheus can compute SLIs from.
    pub fn with_thresholds(thresholds: &[f64]) -> Result<Self, MetricsError> {
        let mut buckets: Vec<f64> = LATENCY_BUCKETS
            .iter()
            .chain(thresholds.iter().filter(|t| t.is_finite() && **t > 0.0))
            .copied()
            .collect();
        buckets.sort_by(f64::total_cmp);
        buckets.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                names::REQUESTS,
                "Requests answered, by route, method and status class",
            ),
            &["route", "method", "status_class"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                names::REQUEST_DURATION,
                "Time from request arrival to the end of the response, by route",
            )
            .buckets(buckets.clone()),
            &["route"],
        )?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                names::UPSTREAM_DURATION,
                "Time from sending the request upstream to its response header, by route",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let in_flight = IntGauge::new(names::IN_FLIGHT, "Requests being processed now")?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                names::UPSTREAM_ERRORS,
                "Upstream failures by route and kind (connect_refused, connect_timeout, timeout, dns, closed, other)",
            ),
            &["route", "kind"],
        )?;
        let upstream_retries = IntCounterVec::new(
            Opts::new(
                names::UPSTREAM_RETRIES,
                "Idempotent requests tried once more on a fresh connection after a reused upstream connection failed before answering, by route",
            ),
            &["route"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                names::CONFIG_RELOADS,
                "Config reload attempts by outcome (applied, unchanged, rejected)",
            ),
            &["outcome"],
        )?;
        let config_generation = IntGauge::new(
            names::CONFIG_GENERATION,
            "Generation of the serving config (1 at start)",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                names::BUILD_INFO,
                "Build information; the value is always 1",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let log_lines_dropped = IntCounter::new(
            names::LOG_LINES_DROPPED,
            "Log lines dropped because stdout was not read fast enough (logging never blocks traffic)",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(upstream_retries.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(config_generation.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        let bodies_over_budget = IntCounter::new(
            names::BODIES_OVER_BUDGET,
            "Request bodies refused with 503 because limits.max_buffered_bodies were held already",
        )?;
        registry.register(Box::new(bodies_over_budget.clone()))?;
        Ok(Self {
            registry,
            requests,
            request_duration,
            upstream_duration,
            in_flight,
            upstream_errors,
            upstream_retries,
            config_reloads,
            config_generation,
            log_lines_dropped,
            bodies_over_budget,
            routes: RwLock::new(HashMap::new()),
            duration_buckets: buckets.into(),
        })
    }

    /// The metric handles of a route (or `none`), created on first use.
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        if let Some(handles) = self.routes.read().get(route) {
            return handles.clone();
        }
        let handles = Arc::new(RouteMetrics {
            route: route.to_string(),
            requests_vec: self.requests.clone(),
            requests: Default::default(),
            duration: self.request_duration.with_label_values(&[route]),
            upstream_duration: self.upstream_duration.with_label_values(&[route]),
            buckets: self.duration_buckets.clone(),
            exemplars: Mutex::new(vec![None; self.duration_buckets.len() + 1]),
        });
        self.routes
            .write()
            .entry(route.to_string())
            .or_insert(handles)
            .clone()
    }

    fn refresh_dropped_lines(&self) {
        let dropped = super::logging::dropped_lines() as u64;
        let counted = self.log_lines_dropped.get();
        if dropped > counted {
            self.log_lines_dropped.inc_by(dropped - counted);
        }
    }

    /// The OpenMetrics exposition, with trace exemplars on the request duration buckets.
    pub fn render_openmetrics(&self) -> String {
        self.refresh_dropped_lines();
        let routes = self.routes.read();
        super::openmetrics::encode(&self.registry.gather(), &|family, labels, bucket| {
            if family != names::REQUEST_DURATION {
                return None;
            }
            let route = labels.iter().find(|l| l.name() == "route")?.value();
            routes
                .get(route)?
                .exemplars
                .lock()
                .get(bucket)
                .cloned()
                .flatten()
        })
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        self.refresh_dropped_lines();
        let mut buf = Vec::with_capacity(16 * 1024);
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// A bounded method label.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}

pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Registers a collector and hands it back, so a feature's metrics struct is one expression.
pub fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> Result<C, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

/// Label values that come from traffic (model or operation names) kept to a bounded set: what the
/// config names, then the first `max` distinct values seen; the rest count as `other`, so a
/// client inventing names cannot explode the series.
#[derive(Debug)]
pub struct BoundedLabels {
    seen: RwLock<std::collections::HashSet<String>>,
    max: usize,
    max_len: usize,
}

impl BoundedLabels {
    pub fn new(max: usize, max_len: usize) -> BoundedLabels {
        BoundedLabels {
            seen: RwLock::new(std::collections::HashSet::new()),
            max,
            max_len,
        }
    }

    /// `value` itself when `known` (named by the config) or admitted, else `other`.
    pub fn label<'a>(&self, value: &'a str, known: bool) -> &'a str {
        if known || self.seen.read().contains(value) {
            return value;
        }
        if value.len() > self.max_len {
            return "other";
        }
        let mut seen = self.seen.write();
        if seen.len() < self.max {
            seen.insert(value.to_owned());
            return value;
        }
        "other"
    }
}

#[cfg(test)]
mod bounded_label_tests {
    use super::BoundedLabels;

    #[test]
    fn known_values_always_pass_and_the_rest_stop_at_the_bound() {
        let labels = BoundedLabels::new(2, 8);
        assert_eq!(labels.label("a", false), "a");
        assert_eq!(labels.label("b", false), "b");
        assert_eq!(labels.label("c", false), "other");
        assert_eq!(labels.label("a", false), "a", "admitted values stay");
        assert_eq!(labels.label("from-config", true), "from-config");
        assert_eq!(labels.label("much-too-long", false), "other");
    }
}
