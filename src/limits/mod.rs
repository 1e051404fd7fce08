//! `limits:` connection limits on the traffic port, like nginx's `client_header_timeout`,
//! `keepalive_timeout` and `large_client_header_buffers` plus a connection cap.
//!
//! Pingora 0.9 has no knob for these: its header read timeout is per read (a client dripping one
//! byte a minute is never cut), it keeps idle HTTP/1.1 connections forever and it buffers heads
//! up to 1 MiB. So outrider wraps the accepted stream ([`stream::GuardedStream`]) and the
//! Pingora app ([`app::ConnectionLimits`], [`app::RequestBoundary`]); the proxy itself is
//! untouched. The limits are read from the live config when a connection is accepted, so a
//! reload applies to new connections. `max_buffered_bodies` is the exception: a process-wide
//! budget built at start, which the proxy's body reader draws on (`proxy::body`).

pub mod app;
pub mod stream;

use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde::{Deserialize, Serialize};

use crate::config::units::{ByteSize, HumanDuration};

pub use app::{ConnectionLimits, RequestBoundary};

/// Pingora refuses request heads above this size on its own; a larger cap could never apply.
pub const PINGORA_MAX_HEADER_SIZE: u64 = 1_048_575;

/// The smallest head cap accepted: below it ordinary browsers' requests would be refused.
pub const MIN_HEADER_SIZE: u64 = 1024;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest time a client may take to send a whole request head: from the accept for the
    /// first request, from its first byte for later ones on a keep-alive connection. Past it the
    /// client gets `408` (if it sent anything) and the connection is closed.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: HumanDuration,
    /// Longest time a keep-alive connection may stay idle between requests before it is closed.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout: HumanDuration,
    /// Largest request head (request line and all header lines). A larger one is answered
    /// `431` and the connection is closed. At most 1 MiB (Pingora's own limit).
    #[serde(default = "default_max_header_size")]
    pub max_header_size: ByteSize,
    /// Open client connections at most; a connection beyond it is answered `503` and closed at
    /// once. `0` means no limit.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Request bytes held at once, across all requests, for stages that read whole bodies
    /// (`buffer_request`, body-keyed caches). A body that would go over it is refused with
    /// `503`. `0` means no bound. Changing it needs a restart.
    #[serde(default = "default_max_buffered_bodies")]
    pub max_buffered_bodies: ByteSize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            header_timeout: default_header_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
            max_header_size: default_max_header_size(),
            max_connections: default_max_connections(),
            max_buffered_bodies: default_max_buffered_bodies(),
        }
    }
}

fn default_header_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

fn default_keepalive_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

fn default_max_header_size() -> ByteSize {
    ByteSize(64 * 1024)
}

fn default_max_connections() -> usize {
    10_000
}

fn default_max_buffered_bodies() -> ByteSize {
    ByteSize(256 * 1024 * 1024)
}

impl LimitsConfig {
    /// Semantic problems as (key path, message), for the loader to position.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.header_timeout.get().is_zero() {
            out.push((
                "limits.header_timeout",
                "limits.header_timeout: must be greater than zero".to_string(),
            ));
        }
        if self.keepalive_timeout.get().is_zero() {
            out.push((
                "limits.keepalive_timeout",
                "limits.keepalive_timeout: must be greater than zero".to_string(),
            ));
        }
        let size = self.max_header_size.0;
        if !(MIN_HEADER_SIZE..=PINGORA_MAX_HEADER_SIZE).contains(&size) {
            out.push((
                "limits.max_header_size",
                format!(
                    "limits.max_header_size: must be between 1KiB and 1MiB (got {})",
                    self.max_header_size
                ),
            ));
        }
        out
    }

    /// The per-connection part, copied once per accepted connection.
    pub fn per_connection(&self) -> ConnLimits {
        ConnLimits {
            header_timeout: self.header_timeout.get(),
            keepalive_timeout: self.keepalive_timeout.get(),
            // Validated to fit; `usize` is at least 32 bits on every supported target.
            max_header_size: usize::try_from(self.max_header_size.0).unwrap_or(usize::MAX),
        }
    }
}

/// What one connection enforces.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_header_size: usize,
}

/// Metric names, documented in docs/operations.md.
pub mod names {
    pub const CONNECTIONS_OPEN: &str = "outrider_connections_open";
    pub const CONNECTIONS_REFUSED: &str = "outrider_connections_refused_total";
    pub const CONNECTIONS_CLOSED: &str = "outrider_connections_closed_by_limit_total";
}

/// Why a connection was closed by a limit (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    HeaderTimeout,
    IdleTimeout,
    HeaderTooLarge,
}

impl CloseReason {
    fn label(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HeaderTooLarge => "header_too_large",
        }
    }
}

pub struct LimitMetrics {
    pub open: IntGauge,
    pub refused: IntCounter,
    closed: IntCounterVec,
}

impl LimitMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let open = IntGauge::new(
            names::CONNECTIONS_OPEN,
            "Client connections open on the traffic port",
        )?;
        let refused = IntCounter::new(
            names::CONNECTIONS_REFUSED,
            "Client connections refused because limits.max_connections were open",
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                names::CONNECTIONS_CLOSED,
                "Client connections closed by a limit, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        for reason in [
            CloseReason::HeaderTimeout,
            CloseReason::IdleTimeout,
            CloseReason::HeaderTooLarge,
        ] {
            closed.with_label_values(&[reason.label()]);
        }
        Ok(Self {
            open,
            refused,
            closed,
        })
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed.with_label_values(&[reason.label()]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_nginx_like_values() {
        let limits = LimitsConfig::default();
        assert_eq!(limits.header_timeout.get(), Duration::from_secs(10));
        assert_eq!(limits.keepalive_timeout.get(), Duration::from_secs(60));
        assert_eq!(limits.max_header_size.0, 65536);
        assert_eq!(limits.max_connections, 10_000);
        assert!(limits.problems().is_empty());
    }

    #[test]
    fn bad_values_are_problems() {
        let limits = LimitsConfig {
            header_timeout: HumanDuration(Duration::ZERO),
            keepalive_timeout: HumanDuration(Duration::ZERO),
            max_header_size: ByteSize(2 << 20),
            max_connections: 0,
            max_buffered_bodies: ByteSize(0),
        };
        let paths: Vec<_> = limits.problems().into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            paths,
            [
                "limits.header_timeout",
                "limits.keepalive_timeout",
                "limits.max_header_size"
            ]
        );
        let small = LimitsConfig {
            max_header_size: ByteSize(100),
            ..LimitsConfig::default()
        };
        assert_eq!(small.problems().len(), 1);
    }
}
