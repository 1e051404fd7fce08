//! Cache metrics. The names and labels are a contract with dashboards and alerts; change them
//! only together with the operations docs.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use super::CacheError;

pub const REQUESTS_TOTAL: &str = "outrider_cache_requests_total";
pub const L1_BYTES: &str = "outrider_cache_l1_bytes";
pub const L1_ENTRIES: &str = "outrider_cache_l1_entries";
pub const REDIS_ERRORS_TOTAL: &str = "outrider_cache_redis_errors_total";
pub const REDIS_DURATION_SECONDS: &str = "outrider_cache_redis_duration_seconds";
pub const REDIS_BREAKER_STATE: &str = "outrider_cache_redis_breaker_state";
pub const SINGLEFLIGHT_WAITS_TOTAL: &str = "outrider_cache_singleflight_waits_total";
pub const INFLIGHT_BYTES: &str = "outrider_cache_inflight_bytes";
pub const INFLIGHT_FULL_TOTAL: &str = "outrider_cache_inflight_full_total";
pub const INVALIDATION_SUBSCRIBED: &str = "outrider_cache_invalidation_subscribed";
pub const INVALIDATIONS_TOTAL: &str = "outrider_cache_invalidations_total";
pub const INVALIDATION_LAG_SECONDS: &str = "outrider_cache_invalidation_lag_seconds";

/// Every metric this module registers, with its labels and meaning (for the operations page).
pub const METRICS: &[(&str, &str, &str)] = &[
    (
        REQUESTS_TOTAL,
        "route, tier (l1|l2|none), outcome (hit|miss|stale|bypass|expired|revalidated)",
        "Cache decisions per route; tier says which tier answered (none when nothing did).",
    ),
    (
        L1_BYTES,
        "",
        "Approximate bytes held by the in-process L1 cache.",
    ),
    (L1_ENTRIES, "", "Entries held by the in-process L1 cache."),
    (
        REDIS_ERRORS_TOTAL,
        "kind (timeout|connection|protocol|decode)",
        "Redis operations that failed; decode counts values in Redis this build cannot read.",
    ),
    (
        REDIS_DURATION_SECONDS,
        "op (get|set|purge)",
        "Latency of Redis operations that were attempted (including failures and timeouts).",
    ),
    (
        REDIS_BREAKER_STATE,
        "",
        "Redis circuit breaker: 0 closed, 1 half-open, 2 open (also while not yet connected).",
    ),
    (
        SINGLEFLIGHT_WAITS_TOTAL,
        "result (served|fallthrough|timeout)",
        "Requests that waited for another request's upstream fetch of the same key.",
    ),
    (
        INFLIGHT_BYTES,
        "",
        "Bytes held for responses being captured and values queued for Redis.",
    ),
    (
        INFLIGHT_FULL_TOTAL,
        "",
        "Captures or Redis writes skipped because cache.max_inflight_bytes was reached.",
    ),
    (
        INVALIDATION_SUBSCRIBED,
        "",
        "1 while this replica listens on the invalidation channel (other replicas' purges reach its L1), 0 otherwise.",
    ),
    (
        INVALIDATIONS_TOTAL,
        "result (published|publish_failed|applied|malformed)",
        "Purge broadcasts sent by this replica and received from others.",
    ),
    (
        INVALIDATION_LAG_SECONDS,
        "",
        "From another replica's publish to this replica applying it (sender clock to receiver clock).",
    ),
];

/// Counters of the purge broadcast, by result.
#[derive(Clone)]
pub(crate) struct InvalidationCounters {
    pub(crate) published: IntCounter,
    pub(crate) publish_failed: IntCounter,
    pub(crate) applied: IntCounter,
    pub(crate) malformed: IntCounter,
}

/// Registered handles. Shareable so a rebuilt `Cache` (new Redis URL) can reuse them instead
/// of failing to register the same names twice.
#[derive(Clone)]
pub struct CacheMetrics {
    pub(crate) requests: IntCounterVec,
    pub(crate) l1_bytes: IntGauge,
    pub(crate) l1_entries: IntGauge,
    pub(crate) redis_errors: IntCounterVec,
    pub(crate) breaker_state: IntGauge,
    pub(crate) sf_waits: super::flight::WaitCounters,
    pub(crate) get_duration: Histogram,
    pub(crate) set_duration: Histogram,
    pub(crate) purge_duration: Histogram,
    pub(crate) inflight_bytes: IntGauge,
    pub(crate) inflight_full: IntCounter,
    pub(crate) invalidation_subscribed: IntGauge,
    pub(crate) invalidations: InvalidationCounters,
    pub(crate) invalidation_lag: Histogram,
}

/// Redis error classes, as the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisErrorKind {
    Timeout,
    Connection,
    Protocol,
    Decode,
}

impl RedisErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisErrorKind::Timeout => "timeout",
            RedisErrorKind::Connection => "connection",
            RedisErrorKind::Protocol => "protocol",
            RedisErrorKind::Decode => "decode",
        }
    }
}

impl CacheMetrics {
    pub fn new(registry: &Registry) -> Result<Self, CacheError> {
        let requests = IntCounterVec::new(
            Opts::new(
                REQUESTS_TOTAL,
                "Cache decisions by route, tier and outcome.",
            ),
            &["route", "tier", "outcome"],
        )?;
        let l1_bytes = IntGauge::new(L1_BYTES, "Approximate bytes held by the L1 cache.")?;
        let l1_entries = IntGauge::new(L1_ENTRIES, "Entries held by the L1 cache.")?;
        let redis_errors = IntCounterVec::new(
            Opts::new(REDIS_ERRORS_TOTAL, "Failed Redis operations by kind."),
            &["kind"],
        )?;
        let redis_duration = HistogramVec::new(
            HistogramOpts::new(REDIS_DURATION_SECONDS, "Redis operation latency.").buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ]),
            &["op"],
        )?;
        let breaker_state = IntGauge::new(
            REDIS_BREAKER_STATE,
            "Redis circuit breaker state: 0 closed, 1 half-open, 2 open.",
        )?;
        let sf = IntCounterVec::new(
            Opts::new(
                SINGLEFLIGHT_WAITS_TOTAL,
                "Requests that waited on another request's fetch, by result.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(l1_bytes.clone()))?;
        registry.register(Box::new(l1_entries.clone()))?;
        registry.register(Box::new(redis_errors.clone()))?;
        registry.register(Box::new(redis_duration.clone()))?;
        registry.register(Box::new(breaker_state.clone()))?;
        registry.register(Box::new(sf.clone()))?;
        let inflight_bytes = IntGauge::new(
            INFLIGHT_BYTES,
            "Bytes held for captures and queued Redis writes.",
        )?;
        let inflight_full = IntCounter::new(
            INFLIGHT_FULL_TOTAL,
            "Captures or Redis writes skipped at cache.max_inflight_bytes.",
        )?;
        registry.register(Box::new(inflight_bytes.clone()))?;
        registry.register(Box::new(inflight_full.clone()))?;
        let invalidation_subscribed = IntGauge::new(
            INVALIDATION_SUBSCRIBED,
            "1 while subscribed to the cache invalidation channel.",
        )?;
        let invalidations = IntCounterVec::new(
            Opts::new(INVALIDATIONS_TOTAL, "Purge broadcasts by result."),
            &["result"],
        )?;
        let invalidation_lag = Histogram::with_opts(
            HistogramOpts::new(
                INVALIDATION_LAG_SECONDS,
                "Delay from another replica's purge broadcast to applying it here.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        registry.register(Box::new(invalidation_subscribed.clone()))?;
        registry.register(Box::new(invalidations.clone()))?;
        registry.register(Box::new(invalidation_lag.clone()))?;
        for kind in ["timeout", "connection", "protocol", "decode"] {
            redis_errors.with_label_values(&[kind]);
        }
        Ok(CacheMetrics {
            get_duration: redis_duration.with_label_values(&["get"]),
            set_duration: redis_duration.with_label_values(&["set"]),
            purge_duration: redis_duration.with_label_values(&["purge"]),
            inflight_bytes,
            inflight_full,
            invalidation_subscribed,
            invalidations: InvalidationCounters {
                published: invalidations.with_label_values(&["published"]),
                publish_failed: invalidations.with_label_values(&["publish_failed"]),
                applied: invalidations.with_label_values(&["applied"]),
                malformed: invalidations.with_label_values(&["malformed"]),
            },
            invalidation_lag,
            sf_waits: super::flight::WaitCounters {
                served: sf.with_label_values(&["served"]),
                fallthrough: sf.with_label_values(&["fallthrough"]),
                timeout: sf.with_label_values(&["timeout"]),
            },
            requests,
            l1_bytes,
            l1_entries,
            redis_errors,
            breaker_state,
        })
    }

    pub(crate) fn redis_error(&self, kind: RedisErrorKind) {
        self.redis_errors.with_label_values(&[kind.as_str()]).inc();
    }

    pub(crate) fn redis_error_count(&self) -> u64 {
        ["timeout", "connection", "protocol", "decode"]
            .iter()
            .map(|k| self.redis_errors.with_label_values(&[k]).get())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_every_documented_name_once() {
        let reg = Registry::new();
        let m = CacheMetrics::new(&reg).map_err(|e| e.to_string());
        assert!(m.is_ok());
        let names: Vec<String> = reg.gather().iter().map(|f| f.name().to_owned()).collect();
        for (name, _, _) in METRICS {
            // Counter vecs with no samples yet are not gathered; the rest must be.
            if *name != REQUESTS_TOTAL && *name != REDIS_DURATION_SECONDS {
                assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
            }
        }
        assert!(
            CacheMetrics::new(&reg).is_err(),
            "double registration must be reported"
        );
    }
}
