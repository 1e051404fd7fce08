//! Span export off the request path: encoded spans go into a bounded buffer that one thread
//! drains in batches to the collector, over OTLP/HTTP (protobuf) or OTLP/gRPC. A full buffer
//! drops the span (counted), so a slow or absent collector never delays a request; the thread
//! runs the transport on its own small runtime.
//!
//! Queuing a span is a lock and a push: the export thread is woken only when a full batch is
//! waiting (or on flush), and otherwise wakes on its schedule. Waking it per span would cost a
//! futex wake and a context switch per request, which on a sidecar's one or two cores was
//! most of tracing's overhead.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use parking_lot::{Condvar, Mutex};
use prometheus::IntCounter;

use super::otlp::{ExportPrefix, GRPC_EXPORT_PATH};
use super::TraceError;
use crate::config::schema::OtlpProtocol;

/// Spans sent in one export call at most.
const MAX_BATCH: usize = 512;
/// `OTEL_BSP_SCHEDULE_DELAY=0` would have the export thread spin.
const MIN_SCHEDULE_DELAY: Duration = Duration::from_millis(5);

/// Where and how to export, resolved from YAML and the `OTEL_*` environment.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSettings {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub max_queue: usize,
    /// How often queued spans are exported when fewer than a full batch are waiting
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

/// What the request path and the export thread share.
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    max_queue: usize,
    /// Queued spans that wake the export thread before its schedule: a full batch, or half
    /// the queue when the queue is smaller than a batch (so a small queue does not fill up
    /// between ticks).
    wake_at: usize,
}

#[derive(Default)]
struct Pending {
    /// Encoded spans ([`super::otlp::SpanRecord::encode`]).
    spans: Vec<Vec<u8>>,
    /// Callers waiting for everything queued before them to be exported.
    flushes: Vec<mpsc::Sender<()>>,
    /// The queue handle is gone: export what is left and end.
    closed: bool,
}

/// The request path's handle on the export thread.
pub struct ExportQueue {
    shared: Arc<Shared>,
    counters: ExportCounters,
}

impl ExportQueue {
    /// Builds the exporter and starts its thread; fails when the endpoint cannot be used.
    pub fn start(
        settings: ExportSettings,
        prefix: ExportPrefix,
        counters: ExportCounters,
    ) -> Result<ExportQueue, TraceError> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            max_queue: settings.max_queue.max(1),
            wake_at: MAX_BATCH.min(settings.max_queue / 2).max(1),
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_counters = counters.clone();
        let thread_shared = shared.clone();
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
                let transport = runtime.block_on(async { Transport::new(&settings) });
                let mut transport = match transport {
                    Ok(transport) => transport,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                run(
                    &runtime,
                    &mut transport,
                    &prefix,
                    &thread_shared,
                    &settings,
                    &thread_counters,
                );
            })
            .map_err(|e| TraceError::Runtime(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(ExportQueue { shared, counters }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TraceError::Runtime("the export thread ended early".into())),
        }
    }

    /// Queues an encoded span; never blocks on the collector.
    pub fn send(&self, span: Vec<u8>) {
        let mut pending = self.shared.pending.lock();
        if pending.spans.len() >= self.shared.max_queue {
            drop(pending);
            self.counters.dropped_queue_full.inc();
            return;
        }
        pending.spans.push(span);
        let batch_ready = pending.spans.len() == self.shared.wake_at;
        drop(pending);
        if batch_ready {
            self.shared.wake.notify_one();
        }
    }

    /// Exports what is queued, waiting at most `timeout` (shutdown).
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done_tx, done_rx) = mpsc::channel();
        self.shared.pending.lock().flushes.push(done_tx);
        self.shared.wake.notify_one();
        done_rx.recv_timeout(timeout).is_ok()
    }
}

impl Drop for ExportQueue {
    fn drop(&mut self) {
        self.shared.pending.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

/// How an export reaches the collector.
enum Transport {
    Http {
        client: reqwest::Client,
        endpoint: String,
        headers: reqwest::header::HeaderMap,
    },
    Grpc {
        client: tonic::client::Grpc<tonic::transport::Channel>,
        metadata: tonic::metadata::MetadataMap,
    },
}

impl Transport {
    fn new(settings: &ExportSettings) -> Result<Transport, TraceError> {
        let mut headers = http::HeaderMap::new();
        for (name, value) in &settings.headers {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| TraceError::Header(name.clone()))?;
            let value = http::HeaderValue::from_str(value)
                .map_err(|_| TraceError::Header(name.to_string()))?;
            headers.insert(name, value);
        }
        match settings.protocol {
            OtlpProtocol::Http => {
                let client = reqwest::Client::builder()
                    .timeout(settings.timeout)
                    .build()
                    .map_err(|e| TraceError::Exporter(e.to_string()))?;
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-protobuf"),
                );
                Ok(Transport::Http {
                    client,
                    endpoint: settings.endpoint.clone(),
                    headers,
                })
            }
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
                    .map_err(|e| TraceError::Exporter(e.to_string()))?
                    .timeout(settings.timeout)
                    .connect_lazy();
                Ok(Transport::Grpc {
                    client: tonic::client::Grpc::new(channel),
                    metadata: tonic::metadata::MetadataMap::from_headers(headers),
                })
            }
        }
    }

    async fn export(&mut self, body: Vec<u8>) -> Result<(), String> {
        match self {
            Transport::Http {
                client,
                endpoint,
                headers,
            } => {
                let response = client
                    .post(endpoint.as_str())
                    .headers(headers.clone())
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                let status = response.status();
                // Read the (small) answer so the connection can carry the next export.
                let _ = response.bytes().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("collector answered {status}"))
                }
            }
            Transport::Grpc { client, metadata } => {
                client.ready().await.map_err(|e| e.to_string())?;
                let mut request = tonic::Request::new(Bytes::from(body));
                *request.metadata_mut() = metadata.clone();
                let path = http::uri::PathAndQuery::from_static(GRPC_EXPORT_PATH);
                client
                    .unary(request, path, RawCodec)
                    .await
                    .map(|_| ())
                    .map_err(|status| status.to_string())
            }
        }
    }
}

/// A gRPC codec for a message that is already encoded; the answer (a partial-success
/// report) is read and dropped.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// The export thread: every `schedule_delay`, or as soon as a full batch or a flush is
/// waiting, exports what is queued in batches of at most [`MAX_BATCH`], until the queue closes.
fn run(
    runtime: &tokio::runtime::Runtime,
    transport: &mut Transport,
    prefix: &ExportPrefix,
    shared: &Shared,
    settings: &ExportSettings,
    counters: &ExportCounters,
) {
    let mut spans: Vec<Vec<u8>> = Vec::new();
    loop {
        let (flushes, closed) = {
            let mut pending = shared.pending.lock();
            let due = Instant::now() + settings.schedule_delay.max(MIN_SCHEDULE_DELAY);
            while pending.spans.len() < shared.wake_at
                && pending.flushes.is_empty()
                && !pending.closed
            {
                if shared.wake.wait_until(&mut pending, due).timed_out() {
                    break;
                }
            }
            std::mem::swap(&mut spans, &mut pending.spans);
            (std::mem::take(&mut pending.flushes), pending.closed)
        };
        while !spans.is_empty() {
            let rest = spans.split_off(spans.len().min(MAX_BATCH));
            let batch = std::mem::replace(&mut spans, rest);
            export_batch(
                runtime,
                transport,
                prefix,
                &batch,
                settings.timeout,
                counters,
            );
        }
        for done in flushes {
            let _ = done.send(());
        }
        if closed {
            return;
        }
    }
}

fn export_batch(
    runtime: &tokio::runtime::Runtime,
    transport: &mut Transport,
    prefix: &ExportPrefix,
    batch: &[Vec<u8>],
    timeout: Duration,
    counters: &ExportCounters,
) {
    let count = batch.len() as u64;
    let body = prefix.request(batch);
    let outcome =
        runtime.block_on(async { tokio::time::timeout(timeout, transport.export(body)).await });
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
