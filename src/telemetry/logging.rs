//! Process logging through `tracing`: JSON or text lines on stdout, `RUST_LOG` respected. Lines
//! are written by a background thread through a bounded, lossy queue: a slow or blocked stdout
//! consumer costs log lines (counted in `outrider_log_lines_dropped_total`), never traffic.

use std::sync::OnceLock;

use parking_lot::Mutex;
use tracing_appender::non_blocking::{ErrorCounter, WorkerGuard};
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::schema::AccessLogFormat;

/// Log target of access log lines, so `RUST_LOG=access=off` also silences them.
pub const ACCESS_TARGET: &str = "access";

static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Lines queued for stdout at most; past that, new lines are dropped (and counted) rather than
/// blocking the thread that logs, which may be serving traffic.
const QUEUE_LINES: usize = 16_384;

/// Log lines dropped so far because stdout could not keep up.
pub fn dropped_lines() -> usize {
    DROPPED.get().map_or(0, ErrorCounter::dropped_lines)
}

/// Installs the global subscriber. The format (JSON or text) is fixed for the process; `off`
/// only silences access lines, which the proxy checks per request so it can change live.
pub fn init(format: AccessLogFormat) {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .finish(std::io::stdout());
    let _ = DROPPED.set(writer.error_counter());
    // A stage answering in place of an upstream response (a 304 renewal, stale for a 5xx) makes
    // Pingora's H1 writer note that the upstream's header was not sent; that is by design here.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,pingora_core::protocols::http::v1::server=error"));
    let result = match format {
        AccessLogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(fmt::layer().with_writer(writer).with_target(true))
            .try_init(),
        AccessLogFormat::Json | AccessLogFormat::Off => tracing_subscriber::registry()
            .with(filter)
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .try_init(),
    };
    if result.is_ok() {
        *GUARD.lock() = Some(guard);
    }
}

/// Writes out buffered lines; call before the process exits.
pub fn flush() {
    GUARD.lock().take();
}
