//! Process logging through `tracing`: JSON or text lines on stdout, `RUST_LOG` respected. Lines
//! are written by a background thread so a slow stdout consumer does not stall request threads.

use parking_lot::Mutex;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::schema::AccessLogFormat;

/// Log target of access log lines, so `RUST_LOG=access=off` also silences them.
pub const ACCESS_TARGET: &str = "access";

static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Installs the global subscriber. The format (JSON or text) is fixed for the process; `off`
/// only silences access lines, which the proxy checks per request so it can change live.
pub fn init(format: AccessLogFormat) {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stdout());
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
