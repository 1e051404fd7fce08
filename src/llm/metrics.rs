//! LLM gateway metrics. Labels are bounded: routes come from the config, outcomes and
//! directions are fixed sets, and models are those named in the route's routing and pricing
//! or the first [`MAX_MODELS`] seen, the rest `other`.

use prometheus::{CounterVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::telemetry::metrics::{register as reg, BoundedLabels};

pub const REQUESTS_TOTAL: &str = "outrider_llm_requests_total";
pub const TOKENS_TOTAL: &str = "outrider_llm_tokens_total";
pub const COST_TOTAL: &str = "outrider_llm_cost_usd_total";
pub const COST_SAVED_TOTAL: &str = "outrider_llm_cost_saved_usd_total";
pub const TTFT_SECONDS: &str = "outrider_llm_time_to_first_token_seconds";
pub const DURATION_SECONDS: &str = "outrider_llm_request_duration_seconds";
pub const ROUTING_TOTAL: &str = "outrider_llm_routing_total";

/// Every metric of this module, with its labels and meaning (for the operations page).
pub const METRICS: &[(&str, &str, &str)] = &[
    (
        REQUESTS_TOTAL,
        "route, model, cache (hit|miss|refresh|bypass|rejected), status (HTTP status class: 2xx|4xx|5xx)",
        "LLM requests by cache outcome.",
    ),
    (
        TOKENS_TOTAL,
        "route, model, direction (input|output), source (upstream|cache)",
        "Tokens from the provider's usage, paid for (upstream) or served from the cache.",
    ),
    (
        COST_TOTAL,
        "route, model",
        "Money spent at the provider, in US dollars (models with a price in llm.pricing).",
    ),
    (
        COST_SAVED_TOTAL,
        "route, model",
        "Money cache hits saved, in US dollars (models with a price in llm.pricing).",
    ),
    (
        TTFT_SECONDS,
        "route, model, source (upstream|cache)",
        "Time from the request's arrival to the first response body byte.",
    ),
    (
        DURATION_SECONDS,
        "route, model, source (upstream|cache)",
        "Time from the request's arrival to its last byte.",
    ),
    (
        ROUTING_TOTAL,
        "route, rule",
        "Requests whose model a routing rule chose.",
    ),
];

/// Distinct models counted by name before the rest become `other`.
pub const MAX_MODELS: usize = 50;

const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Registered once per process (they outlive config reloads).
pub struct LlmMetrics {
    pub requests: IntCounterVec,
    pub tokens: IntCounterVec,
    pub cost: CounterVec,
    pub cost_saved: CounterVec,
    pub ttft: HistogramVec,
    pub duration: HistogramVec,
    pub routing: IntCounterVec,
    models: BoundedLabels,
}

impl std::fmt::Debug for LlmMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LlmMetrics")
    }
}

impl LlmMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
                &["route", "model", "source"],
            )
        };
        Ok(LlmMetrics {
            requests: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(REQUESTS_TOTAL, METRICS[0].2),
                    &["route", "model", "cache", "status"],
                )?,
            )?,
            tokens: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(TOKENS_TOTAL, METRICS[1].2),
                    &["route", "model", "direction", "source"],
                )?,
            )?,
            cost: reg(
                registry,
                CounterVec::new(Opts::new(COST_TOTAL, METRICS[2].2), &["route", "model"])?,
            )?,
            cost_saved: reg(
                registry,
                CounterVec::new(
                    Opts::new(COST_SAVED_TOTAL, METRICS[3].2),
                    &["route", "model"],
                )?,
            )?,
            ttft: reg(registry, histogram(TTFT_SECONDS, METRICS[4].2)?)?,
            duration: reg(registry, histogram(DURATION_SECONDS, METRICS[5].2)?)?,
            routing: reg(
                registry,
                IntCounterVec::new(Opts::new(ROUTING_TOTAL, METRICS[6].2), &["route", "rule"])?,
            )?,
            models: BoundedLabels::new(MAX_MODELS, 100),
        })
    }

    /// The label for a model: itself when the config names it (`known`) or it is among the
    /// first [`MAX_MODELS`] seen, else `other`.
    pub fn model_label<'a>(&self, model: &'a str, known: bool) -> &'a str {
        self.models.label(model, known)
    }
}
