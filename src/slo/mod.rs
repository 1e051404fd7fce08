//! Service level objectives per route: tracked live in time buckets (SLIs, error budgets,
//! burn rates, alert states), exported on `/slo` and `/metrics`, turned into Prometheus alert
//! rules by `outrider slo-rules`, and optionally enforced: deadlines, a fixed or adaptive
//! concurrency limit with a bounded queue, shedding, and rate limits.
//!
//! Counts live in the long-lived [`SloRegistry`] (one per process), keyed by route and
//! objective definition, so a reload keeps the counts of unchanged objectives, starts edited
//! or new ones empty, and drops removed ones once the old config is gone.

pub mod admin;
pub mod config;
pub mod limit;
pub mod rate;
pub mod rules;
pub mod stage;
pub mod window;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub use config::SloConfig;
use limit::{Limiter, LimiterSpec};
use window::{Clock, Series, SystemClock};

/// What an objective measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Good: answered within `threshold`.
    Latency { threshold: Duration },
    /// Good: not a 5xx.
    Availability,
}

/// One objective of one route, with its event history.
pub struct Objective {
    pub route: String,
    /// `latency_p95`, `availability`.
    pub id: String,
    pub kind: Kind,
    /// Required share of good events (0.95, 0.999).
    pub target: f64,
    pub window: Duration,
    pub series: Series,
}

impl std::fmt::Debug for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objective")
            .field("route", &self.route)
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("target", &self.target)
            .finish()
    }
}

impl Objective {
    fn same_definition(&self, kind: Kind, target: f64, window: Duration) -> bool {
        self.kind == kind && self.target == target && self.window == window
    }
}

/// Admission and rate-limit decisions, as metric labels.
pub mod decisions {
    pub const ADMITTED: &str = "admitted";
    pub const QUEUED: &str = "queued";
    pub const SHED: &str = "shed";
    pub const LIMITED: &str = "limited";
    pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
}

/// Metric names, documented in docs/operations.md.
pub mod names {
    pub const EVENTS: &str = "outrider_slo_events_total";
    pub const GOOD_EVENTS: &str = "outrider_slo_good_events_total";
    pub const BURN_RATE: &str = "outrider_slo_burn_rate";
    pub const BUDGET_REMAINING: &str = "outrider_slo_error_budget_remaining";
    pub const STATE: &str = "outrider_slo_alert_state";
    pub const DECISIONS: &str = "outrider_slo_decisions_total";
    pub const CONCURRENCY_LIMIT: &str = "outrider_slo_concurrency_limit";
    pub const QUEUED: &str = "outrider_slo_queued";
    pub const ADMISSION_WAIT: &str = "outrider_slo_admission_wait_seconds";
}

/// From a few microseconds (an answer on arrival) to the longest sensible queue wait.
const ADMISSION_WAIT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

pub(crate) struct SloMetrics {
    pub events: IntCounterVec,
    pub good: IntCounterVec,
    pub decisions: IntCounterVec,
    /// How long admission took, by outcome: a shed answer's latency is decided here.
    pub admission_wait: HistogramVec,
    pub gauges: admin::Gauges,
}

/// Objective definitions by (route, objective id); a changed definition is a new version.
type ObjectiveVersions = HashMap<(String, String), Vec<Weak<Objective>>>;

/// Every route's objectives and limiters, across config generations.
pub struct SloRegistry {
    pub clock: Arc<dyn Clock>,
    objectives: Mutex<ObjectiveVersions>,
    limiters: Mutex<HashMap<String, Weak<Limiter>>>,
    /// Per upstream, requests waiting for a slot at each priority (0–9).
    waiting: Mutex<HashMap<String, Arc<PriorityWaits>>>,
    pub(crate) metrics: SloMetrics,
}

/// Waiting requests per priority on one upstream: a lower-priority request does not queue
/// while a higher-priority one on the same upstream is waiting.
#[derive(Default)]
pub struct PriorityWaits([std::sync::atomic::AtomicU32; 10]);

impl PriorityWaits {
    /// Whether a request of a higher priority than `priority` is waiting.
    pub fn higher_waiting(&self, priority: u8) -> bool {
        self.0
            .iter()
            .skip(usize::from(priority) + 1)
            .any(|n| n.load(std::sync::atomic::Ordering::Relaxed) > 0)
    }

    /// Counts a waiting request until the guard drops.
    pub fn wait(self: &Arc<Self>, priority: u8) -> WaitGuard {
        let index = usize::from(priority.min(9));
        if let Some(n) = self.0.get(index) {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        WaitGuard {
            waits: self.clone(),
            index,
        }
    }
}

pub struct WaitGuard {
    waits: Arc<PriorityWaits>,
    index: usize,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if let Some(n) = self.waits.0.get(self.index) {
            n.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for SloRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SloRegistry")
    }
}

impl SloRegistry {
    pub fn new(registry: &Registry) -> Result<Arc<SloRegistry>, prometheus::Error> {
        Self::with_clock(registry, Arc::new(SystemClock))
    }

    pub fn with_clock(
        registry: &Registry,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<SloRegistry>, prometheus::Error> {
        let events = IntCounterVec::new(
            Opts::new(names::EVENTS, "Requests counted against an objective"),
            &["route", "objective"],
        )?;
        let good = IntCounterVec::new(
            Opts::new(
                names::GOOD_EVENTS,
                "Requests that met the objective (within the latency threshold, or not a 5xx)",
            ),
            &["route", "objective"],
        )?;
        let decisions = IntCounterVec::new(
            Opts::new(
                names::DECISIONS,
                "Admission decisions: admitted, queued, shed, limited (rate limit), deadline_exceeded",
            ),
            &["route", "decision"],
        )?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(good.clone()))?;
        let admission_wait = HistogramVec::new(
            HistogramOpts::new(
                names::ADMISSION_WAIT,
                "Time from a request reaching the concurrency limit to its admission decision, by outcome (admitted, shed, deadline_exceeded)",
            )
            .buckets(ADMISSION_WAIT_BUCKETS.to_vec()),
            &["route", "outcome"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(admission_wait.clone()))?;
        let gauges = admin::Gauges::new(registry)?;
        Ok(Arc::new(SloRegistry {
            clock,
            objectives: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            metrics: SloMetrics {
                events,
                good,
                decisions,
                admission_wait,
                gauges,
            },
        }))
    }

    /// The objective with this definition: the running one (and its counts) when unchanged,
    /// else a new, empty one.
    pub fn objective(
        &self,
        route: &str,
        id: &str,
        kind: Kind,
        target: f64,
        window: Duration,
    ) -> Arc<Objective> {
        let mut map = self.objectives.lock();
        let versions = map.entry((route.to_string(), id.to_string())).or_default();
        versions.retain(|w| w.strong_count() > 0);
        if let Some(existing) = versions
            .iter()
            .filter_map(Weak::upgrade)
            .find(|o| o.same_definition(kind, target, window))
        {
            return existing;
        }
        let objective = Arc::new(Objective {
            route: route.to_string(),
            id: id.to_string(),
            kind,
            target,
            window,
            series: Series::new(window),
        });
        versions.push(Arc::downgrade(&objective));
        // Both series exist from the start: with no good event yet (an outage since start),
        // the error ratio must read 1, not "no data", or the burn-rate alerts stay silent.
        let labels = [route, id];
        self.metrics.events.with_label_values(&labels);
        self.metrics.good.with_label_values(&labels);
        objective
    }

    /// Objectives some config generation still uses, newest definition last per key.
    pub fn live_objectives(&self) -> Vec<Arc<Objective>> {
        let mut map = self.objectives.lock();
        map.retain(|_, versions| {
            versions.retain(|w| w.strong_count() > 0);
            !versions.is_empty()
        });
        let mut out: Vec<Arc<Objective>> = map
            .values()
            .filter_map(|versions| versions.iter().rev().find_map(Weak::upgrade))
            .collect();
        out.sort_by(|a, b| (&a.route, &a.id).cmp(&(&b.route, &b.id)));
        out
    }

    /// The route's limiter for this spec, shared while the spec is unchanged.
    pub fn limiter(&self, route: &str, spec: LimiterSpec) -> Arc<Limiter> {
        let mut map = self.limiters.lock();
        if let Some(existing) = map.get(route).and_then(Weak::upgrade) {
            if existing.spec == spec {
                return existing;
            }
        }
        let limiter = Limiter::new(spec);
        map.insert(route.to_string(), Arc::downgrade(&limiter));
        limiter
    }

    /// The waiting counts of an upstream's prioritised routes.
    pub fn priority_waits(&self, upstream: &str) -> Arc<PriorityWaits> {
        self.waiting
            .lock()
            .entry(upstream.to_string())
            .or_default()
            .clone()
    }

    /// Limiters in use, by route.
    pub fn live_limiters(&self) -> Vec<(String, Arc<Limiter>)> {
        let mut map = self.limiters.lock();
        map.retain(|_, w| w.strong_count() > 0);
        let mut out: Vec<(String, Arc<Limiter>)> = map
            .iter()
            .filter_map(|(route, w)| Some((route.clone(), w.upgrade()?)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Counts one finished request against the objective.
    pub fn record(&self, objective: &Objective, good: bool) {
        objective.series.record(self.clock.now(), good);
        let labels = [objective.route.as_str(), objective.id.as_str()];
        self.metrics.events.with_label_values(&labels).inc();
        if good {
            self.metrics.good.with_label_values(&labels).inc();
        }
    }

    /// Records how long a request's admission took (`outcome` is one of [`decisions`]).
    pub fn admission_waited(&self, route: &str, outcome: &str, waited: Duration) {
        self.metrics
            .admission_wait
            .with_label_values(&[route, outcome])
            .observe(waited.as_secs_f64());
    }

    pub fn decision(&self, route: &str, decision: &str) {
        self.metrics
            .decisions
            .with_label_values(&[route, decision])
            .inc();
    }
}
