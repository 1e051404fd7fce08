//! GraphQL metrics. Labels are bounded: routes come from the config, outcomes are fixed sets,
//! and operation names are those of the manifest or the first [`MAX_NAMES`] seen, the rest
//! `other`.

use prometheus::{IntCounterVec, Opts, Registry};

use crate::telemetry::metrics::{register, BoundedLabels};

pub const APQ_TOTAL: &str = "outrider_graphql_apq_total";
pub const RESPONSE_CACHE_TOTAL: &str = "outrider_graphql_response_cache_total";
pub const OPERATIONS_TOTAL: &str = "outrider_graphql_operations_total";
pub const SAFELIST_TOTAL: &str = "outrider_graphql_safelist_total";

/// Every metric of this module, with its labels and meaning (for the operations page).
pub const METRICS: &[(&str, &str, &str)] = &[
    (
        APQ_TOTAL,
        "route, outcome (hit|miss|registered|mismatch)",
        "Automatic persisted query lookups and registrations.",
    ),
    (
        RESPONSE_CACHE_TOTAL,
        "route, outcome (hit|stale|miss|stored|not_stored|bypass)",
        "GraphQL response cache decisions (queries only).",
    ),
    (
        OPERATIONS_TOTAL,
        "route, operation (manifest names or the first 100 seen, else other), type (query|mutation|subscription|unknown)",
        "GraphQL operations by name and type.",
    ),
    (
        SAFELIST_TOTAL,
        "route, result (listed|rejected|logged)",
        "Operations checked against the persisted-query manifest.",
    ),
];

/// Distinct operation names counted by name before the rest become `other`.
pub const MAX_NAMES: usize = 100;

/// Registered once per process (they outlive config reloads).
pub struct GraphqlMetrics {
    pub apq: IntCounterVec,
    pub response_cache: IntCounterVec,
    pub operations: IntCounterVec,
    pub safelist: IntCounterVec,
    names: BoundedLabels,
}

impl std::fmt::Debug for GraphqlMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GraphqlMetrics")
    }
}

impl GraphqlMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        Ok(GraphqlMetrics {
            apq: counter(APQ_TOTAL, METRICS[0].2, &["route", "outcome"])?,
            response_cache: counter(RESPONSE_CACHE_TOTAL, METRICS[1].2, &["route", "outcome"])?,
            operations: counter(
                OPERATIONS_TOTAL,
                METRICS[2].2,
                &["route", "operation", "type"],
            )?,
            safelist: counter(SAFELIST_TOTAL, METRICS[3].2, &["route", "result"])?,
            // Names are GraphQL names (`[_A-Za-z][_0-9A-Za-z]*`); a longer one is not worth a series.
            names: BoundedLabels::new(MAX_NAMES, 64),
        })
    }

    /// The label for an operation name: itself when known (`listed`, e.g. from the manifest)
    /// or among the first [`MAX_NAMES`] seen, else `other`.
    pub fn name_label<'a>(&self, name: Option<&'a str>, listed: bool) -> &'a str {
        match name {
            Some(name) => self.names.label(name, listed),
            None => "anonymous",
        }
    }
}
