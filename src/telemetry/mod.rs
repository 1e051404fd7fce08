//! Metrics, logging and request identity: what outrider tells operators about traffic.

pub mod logging;
pub mod metrics;
pub mod redact;
pub mod request_id;

pub use metrics::Metrics;
