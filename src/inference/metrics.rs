//! Inference metrics, per model (names come from the config, so labels are bounded) and, for
//! shadow comparisons, per route.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::telemetry::metrics::register as reg;

pub const REQUESTS_TOTAL: &str = "outrider_inference_requests_total";
pub const BATCH_SIZE: &str = "outrider_inference_batch_size";
pub const QUEUE_WAIT: &str = "outrider_inference_queue_wait_seconds";
pub const COMPUTE: &str = "outrider_inference_compute_seconds";
pub const QUEUE_DEPTH: &str = "outrider_inference_queue_depth";
pub const CACHE_TOTAL: &str = "outrider_inference_cache_total";
pub const SHADOW_TOTAL: &str = "outrider_inference_shadow_total";
pub const SHADOW_MISMATCH_RATIO: &str = "outrider_inference_shadow_mismatch_ratio";
pub const MODEL_LOADED: &str = "outrider_inference_model_loaded";
pub const MODEL_INFO: &str = "outrider_inference_model_info";
pub const MODEL_LOADS_TOTAL: &str = "outrider_inference_model_loads_total";

/// Every metric of this module, with its labels and meaning (for the operations page).
pub const METRICS: &[(&str, &str, &str)] = &[
    (
        REQUESTS_TOTAL,
        "model, outcome (ok|cache_hit|bad_input|overloaded|deadline|unavailable|error|fallback)",
        "Inference requests by how they ended.",
    ),
    (BATCH_SIZE, "model", "Rows per model run."),
    (
        QUEUE_WAIT,
        "model",
        "Time a request waited in the batching queue.",
    ),
    (COMPUTE, "model", "Time one model run (a batch) took."),
    (QUEUE_DEPTH, "model", "Requests waiting or running."),
    (
        CACHE_TOTAL,
        "model, outcome (hit|miss)",
        "Prediction cache lookups.",
    ),
    (
        SHADOW_TOTAL,
        "route, model, result (match|mismatch|error)",
        "Shadow comparisons of the model's outputs with the upstream's answer.",
    ),
    (
        SHADOW_MISMATCH_RATIO,
        "route, model",
        "Mismatches over comparisons since start (shadow mode).",
    ),
    (
        MODEL_LOADED,
        "model",
        "1 when a version of the model is serving.",
    ),
    (
        MODEL_INFO,
        "model, version",
        "1 for the version serving (version: BLAKE3 prefix of the file).",
    ),
    (
        MODEL_LOADS_TOTAL,
        "model, result (ok|failed)",
        "Model file loads at start, on reload and on file change.",
    ),
];

/// Registered once per process (they outlive config reloads).
pub struct InferenceMetrics {
    pub requests: IntCounterVec,
    pub batch_size: HistogramVec,
    pub queue_wait: HistogramVec,
    pub compute: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub cache: IntCounterVec,
    pub shadow: IntCounterVec,
    pub shadow_ratio: prometheus::GaugeVec,
    pub loaded: IntGaugeVec,
    pub info: IntGaugeVec,
    pub loads: IntCounterVec,
}

impl std::fmt::Debug for InferenceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InferenceMetrics")
    }
}

/// One model's batcher metrics, labels bound.
pub struct ModelMetrics {
    pub batch_size: Histogram,
    pub queue_wait: Histogram,
    pub compute: Histogram,
}

const TIME_BUCKETS: &[f64] = &[
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
];

impl InferenceMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let help = |name: &str| {
            METRICS
                .iter()
                .find(|m| m.0 == name)
                .map_or("", |m| m.2)
                .to_owned()
        };
        let counter = |name: &str, labels: &[&str]| {
            reg(
                registry,
                IntCounterVec::new(Opts::new(name, help(name)), labels)?,
            )
        };
        let gauge = |name: &str, labels: &[&str]| {
            reg(
                registry,
                IntGaugeVec::new(Opts::new(name, help(name)), labels)?,
            )
        };
        let histogram = |name: &str, buckets: Vec<f64>| {
            reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(name, help(name)).buckets(buckets),
                    &["model"],
                )?,
            )
        };
        Ok(InferenceMetrics {
            requests: counter(REQUESTS_TOTAL, &["model", "outcome"])?,
            batch_size: histogram(
                BATCH_SIZE,
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            )?,
            queue_wait: histogram(QUEUE_WAIT, TIME_BUCKETS.to_vec())?,
            compute: histogram(COMPUTE, TIME_BUCKETS.to_vec())?,
            queue_depth: gauge(QUEUE_DEPTH, &["model"])?,
            cache: counter(CACHE_TOTAL, &["model", "outcome"])?,
            shadow: counter(SHADOW_TOTAL, &["route", "model", "result"])?,
            shadow_ratio: reg(
                registry,
                prometheus::GaugeVec::new(
                    Opts::new(SHADOW_MISMATCH_RATIO, help(SHADOW_MISMATCH_RATIO)),
                    &["route", "model"],
                )?,
            )?,
            loaded: gauge(MODEL_LOADED, &["model"])?,
            info: gauge(MODEL_INFO, &["model", "version"])?,
            loads: counter(MODEL_LOADS_TOTAL, &["model", "result"])?,
        })
    }

    pub fn model(&self, name: &str) -> ModelMetrics {
        ModelMetrics {
            batch_size: self.batch_size.with_label_values(&[name]),
            queue_wait: self.queue_wait.with_label_values(&[name]),
            compute: self.compute.with_label_values(&[name]),
        }
    }
}
