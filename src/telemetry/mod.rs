//! Metrics, logging, tracing and request identity: what outrider tells operators about traffic.

pub mod logging;
pub mod metrics;
pub mod openmetrics;
pub mod redact;
pub mod request_id;
pub mod trace;

pub use metrics::Metrics;
