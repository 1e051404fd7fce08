//! Span export off the request path: finished spans go into a bounded queue that one thread
//! drains in batches to the OTLP exporter. A full queue drops the span (counted), so a slow or
//! absent collector never delays a request; the thread runs the exporter on its own small
//! runtime, so gRPC and HTTP exporters work the same way.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;

use super::TraceError;
use crate::config::schema::OtlpProtocol;

/// Spans sent in one export call at most.
const MAX_BATCH: usize = 512;

/// Where and how to export, resolved from YAML and the `OTEL_*` environment.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSettings {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub max_queue: usize,
    /// How long a batch waits for more spans once its first span arrived
    /// (`OTEL_BSP_SCHEDULE_DELAY`, default 1s).
    pub schedule_delay: Duration,
}

/// Counters the exporter keeps (registered by the caller).
#[derive(Clone)]
pub struct ExportCounters {
    pub exported: IntCounter,
    pub dropped_queue_full: IntCounter,
    pub dropped_export_failed: IntCounter,
}

enum Message {
    Span(Box<SpanData>),
    /// Export everything queued before this, then answer.
    Flush(mpsc::Sender<()>),
}

/// The request path's handle on the export thread.
pub struct ExportQueue {
    tx: SyncSender<Message>,
    counters: ExportCounters,
}

impl ExportQueue {
    /// Builds the exporter and starts its thread; fails when the endpoint cannot be used.
    pub fn start(
        settings: ExportSettings,
        resource: Resource,
        counters: ExportCounters,
    ) -> Result<ExportQueue, TraceError> {
        let (tx, rx) = mpsc::sync_channel(settings.max_queue.max(1));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_counters = counters.clone();
        std::thread::Builder::new()
            .name("outrider-otlp".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(TraceError::Runtime(e.to_string())));
                        return;
                    }
                };
                // The gRPC channel is created inside the runtime it will run on.
                let exporter = runtime.block_on(async { build_exporter(&settings) });
                let mut exporter = match exporter {
                    Ok(exporter) => exporter,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                exporter.set_resource(&resource);
                let _ = ready_tx.send(Ok(()));
                run(&runtime, &mut exporter, &rx, &settings, &thread_counters);
                let _ = exporter.shutdown();
            })
            .map_err(|e| TraceError::Runtime(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(ExportQueue { tx, counters }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TraceError::Runtime("the export thread ended early".into())),
        }
    }

    /// Queues a finished span; never blocks.
    pub fn send(&self, span: SpanData) {
        match self.tx.try_send(Message::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped_queue_full.inc();
            }
        }
    }

    /// Exports what is queued, waiting at most `timeout` (shutdown).
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (done_tx, done_rx) = mpsc::channel();
        let mut message = Message::Flush(done_tx);
        loop {
            match self.tx.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

fn build_exporter(
    settings: &ExportSettings,
) -> Result<opentelemetry_otlp::SpanExporter, TraceError> {
    let built = match settings.protocol {
        OtlpProtocol::Http => {
            let client = reqwest::Client::builder()
                .timeout(settings.timeout)
                .build()
                .map_err(|e| TraceError::Exporter(e.to_string()))?;
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_http_client(client)
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_headers(settings.headers.iter().cloned().collect())
                .build()
        }
        OtlpProtocol::Grpc => {
            let mut headers = http::HeaderMap::new();
            for (name, value) in &settings.headers {
                let name = http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| TraceError::Header(name.clone()))?;
                let value = http::HeaderValue::from_str(value)
                    .map_err(|_| TraceError::Header(name.to_string()))?;
                headers.insert(name, value);
            }
            let metadata =
                opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers);
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_metadata(metadata)
                .build()
        }
    };
    built.map_err(|e| TraceError::Exporter(e.to_string()))
}

/// The export thread: batches what arrives and exports it, until every sender is gone.
fn run(
    runtime: &tokio::runtime::Runtime,
    exporter: &mut opentelemetry_otlp::SpanExporter,
    rx: &Receiver<Message>,
    settings: &ExportSettings,
    counters: &ExportCounters,
) {
    let timeout = settings.timeout;
    let mut batch: Vec<SpanData> = Vec::with_capacity(MAX_BATCH);
    let mut flushes: Vec<mpsc::Sender<()>> = Vec::new();
    loop {
        let Ok(first) = rx.recv() else {
            return;
        };
        let linger_until = Instant::now() + settings.schedule_delay;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Span(span) => batch.push(*span),
                Message::Flush(done) => {
                    flushes.push(done);
                    break;
                }
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            next = match rx.recv_timeout(linger_until.saturating_duration_since(Instant::now())) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => None,
            };
        }
        if !batch.is_empty() {
            let spans = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
            let count = spans.len() as u64;
            let outcome = runtime
                .block_on(async { tokio::time::timeout(timeout, exporter.export(spans)).await });
            match outcome {
                Ok(Ok(())) => counters.exported.inc_by(count),
                Ok(Err(e)) => {
                    counters.dropped_export_failed.inc_by(count);
                    tracing::debug!(error = %e, spans = count, "span export failed");
                }
                Err(_) => {
                    counters.dropped_export_failed.inc_by(count);
                    tracing::debug!(spans = count, "span export timed out");
                }
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}
