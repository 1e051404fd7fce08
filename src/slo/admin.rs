//! `GET /slo` and the SLO gauges of `/metrics` (computed when scraped, not per request).

use std::collections::HashSet;
use std::sync::Arc;

use futures::future::BoxFuture;
use http::{Method, StatusCode};
use parking_lot::Mutex;
use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};
use serde_json::{json, Value};

use super::window::WINDOWS;
use super::{names, Kind, SloRegistry};
use crate::admin::AdminExtension;

/// Gauges refreshed at scrape time.
pub struct Gauges {
    burn_rate: GaugeVec,
    budget: GaugeVec,
    state: IntGaugeVec,
    limit: IntGaugeVec,
    queued: IntGaugeVec,
    /// `(route, objective)` pairs exported at the last scrape, to drop removed ones.
    exported: Mutex<HashSet<(String, String)>>,
    exported_limits: Mutex<HashSet<String>>,
}

impl Gauges {
    pub fn new(registry: &Registry) -> Result<Gauges, prometheus::Error> {
        let burn_rate = GaugeVec::new(
            Opts::new(
                names::BURN_RATE,
                "Error budget burn rate over a window (1 = on budget over the SLO window)",
            ),
            &["route", "objective", "window"],
        )?;
        let budget = GaugeVec::new(
            Opts::new(
                names::BUDGET_REMAINING,
                "Share of the error budget left over the SLO window (negative when overspent)",
            ),
            &["route", "objective"],
        )?;
        let state = IntGaugeVec::new(
            Opts::new(
                names::STATE,
                "Multi-window burn-rate state: 0 ok, 1 ticket, 2 page",
            ),
            &["route", "objective"],
        )?;
        let limit = IntGaugeVec::new(
            Opts::new(
                names::CONCURRENCY_LIMIT,
                "Current concurrency limit of a route (adaptive or fixed)",
            ),
            &["route"],
        )?;
        let queued = IntGaugeVec::new(
            Opts::new(names::QUEUED, "Requests waiting for a slot now"),
            &["route"],
        )?;
        registry.register(Box::new(burn_rate.clone()))?;
        registry.register(Box::new(budget.clone()))?;
        registry.register(Box::new(state.clone()))?;
        registry.register(Box::new(limit.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        Ok(Gauges {
            burn_rate,
            budget,
            state,
            limit,
            queued,
            exported: Mutex::new(HashSet::new()),
            exported_limits: Mutex::new(HashSet::new()),
        })
    }
}

pub struct SloAdmin {
    registry: Arc<SloRegistry>,
}

impl SloAdmin {
    pub fn new(registry: Arc<SloRegistry>) -> Self {
        SloAdmin { registry }
    }
}

/// The `/slo` document: per route, each objective's target, SLI and counts per window, budget
/// left, burn rates and state, and the route's admission state.
pub fn report(registry: &SloRegistry) -> Value {
    let now = registry.clock.now();
    let mut routes: Vec<(String, Vec<Value>)> = Vec::new();
    for objective in registry.live_objectives() {
        let target = objective.target;
        let mut windows = serde_json::Map::new();
        for (name, secs) in WINDOWS {
            let counts = objective.series.counts(now, secs);
            windows.insert(
                name.to_string(),
                json!({
                    "good": counts.good,
                    "total": counts.total,
                    "sli": counts.sli(),
                    "burn_rate": finite(counts.burn_rate(target)),
                }),
            );
        }
        let whole = objective.series.window_counts(now);
        windows.insert(
            "slo_window".to_string(),
            json!({ "good": whole.good, "total": whole.total, "sli": whole.sli() }),
        );
        let (kind, threshold_ms) = match objective.kind {
            Kind::Latency { threshold } => ("latency", Some(threshold.as_secs_f64() * 1000.0)),
            Kind::Availability => ("availability", None),
        };
        let entry = json!({
            "objective": objective.id,
            "kind": kind,
            "threshold_ms": threshold_ms,
            "target": target,
            "window": humantime::format_duration(objective.window).to_string(),
            "windows": windows,
            "error_budget_remaining": finite(objective.series.budget_remaining(now, target)),
            "state": objective.series.state(now, target).as_str(),
        });
        match routes.iter_mut().find(|(r, _)| *r == objective.route) {
            Some((_, list)) => list.push(entry),
            None => routes.push((objective.route.clone(), vec![entry])),
        }
    }
    let limiters = registry.live_limiters();
    let mut out: Vec<Value> = routes
        .into_iter()
        .map(|(route, objectives)| {
            let admission = limiters.iter().find(|(r, _)| *r == route).map(|(_, l)| {
                let (limit, in_flight, queued) = l.snapshot();
                json!({ "limit": limit, "in_flight": in_flight, "queued": queued, "adaptive": l.spec.adaptive })
            });
            json!({ "route": route, "objectives": objectives, "admission": admission })
        })
        .collect();
    // Routes that enforce limits without objectives.
    for (route, limiter) in &limiters {
        if !out.iter().any(|r| r["route"] == json!(route)) {
            let (limit, in_flight, queued) = limiter.snapshot();
            out.push(json!({
                "route": route,
                "objectives": [],
                "admission": { "limit": limit, "in_flight": in_flight, "queued": queued, "adaptive": limiter.spec.adaptive },
            }));
        }
    }
    json!({ "routes": out })
}

/// JSON has no infinity: a burn rate with a 100 % target is reported as `null`.
fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

impl AdminExtension for SloAdmin {
    fn before_metrics(&self) {
        let registry = &self.registry;
        let gauges = &registry.metrics.gauges;
        let now = registry.clock.now();
        let mut live = HashSet::new();
        for objective in registry.live_objectives() {
            let (route, id) = (objective.route.as_str(), objective.id.as_str());
            let target = objective.target;
            for (window, rate) in objective.series.burn_rates(now, target) {
                gauges
                    .burn_rate
                    .with_label_values(&[route, id, window])
                    .set(finite(rate).unwrap_or(f64::MAX));
            }
            gauges
                .budget
                .with_label_values(&[route, id])
                .set(objective.series.budget_remaining(now, target));
            gauges
                .state
                .with_label_values(&[route, id])
                .set(objective.series.state(now, target) as i64);
            live.insert((route.to_string(), id.to_string()));
        }
        let mut exported = gauges.exported.lock();
        for (route, id) in exported.difference(&live) {
            for (window, _) in WINDOWS {
                let _ = gauges.burn_rate.remove_label_values(&[route, id, window]);
            }
            let _ = gauges.budget.remove_label_values(&[route, id]);
            let _ = gauges.state.remove_label_values(&[route, id]);
        }
        // Event counters exist from the first request on, scraped or not.
        for counter in [&registry.metrics.events, &registry.metrics.good] {
            for family in prometheus::core::Collector::collect(counter) {
                for metric in family.get_metric() {
                    let label = |name: &str| {
                        metric
                            .get_label()
                            .iter()
                            .find(|l| l.name() == name)
                            .map(|l| l.value().to_string())
                            .unwrap_or_default()
                    };
                    let key = (label("route"), label("objective"));
                    if !live.contains(&key) {
                        let _ = counter.remove_label_values(&[&key.0, &key.1]);
                    }
                }
            }
        }
        *exported = live;
        let mut live_limits = HashSet::new();
        for (route, limiter) in registry.live_limiters() {
            let (limit, _, queued) = limiter.snapshot();
            gauges
                .limit
                .with_label_values(&[&route])
                .set(i64::from(limit));
            gauges
                .queued
                .with_label_values(&[&route])
                .set(i64::from(queued));
            live_limits.insert(route);
        }
        let mut exported_limits = gauges.exported_limits.lock();
        for route in exported_limits.difference(&live_limits) {
            let _ = gauges.limit.remove_label_values(&[route]);
            let _ = gauges.queued.remove_label_values(&[route]);
        }
        *exported_limits = live_limits;
    }

    fn handle(
        &self,
        method: &Method,
        path: &str,
        _body: &[u8],
    ) -> Option<BoxFuture<'static, (StatusCode, Value)>> {
        if path != "/slo" {
            return None;
        }
        if method != Method::GET {
            return Some(Box::pin(async {
                (
                    StatusCode::METHOD_NOT_ALLOWED,
                    json!({ "error": "method_not_allowed", "message": "/slo answers GET" }),
                )
            }));
        }
        let body = report(&self.registry);
        Some(Box::pin(async move { (StatusCode::OK, body) }))
    }
}
