//! Tracing end to end: W3C trace context in and out, spans exported over OTLP (HTTP/protobuf
//! and gRPC) to receivers that decode the real protobuf messages, sampling, a collector that is
//! down or black-holed, shutdown flushing, trace ids in logs and exemplars in OpenMetrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use support::{client, metric_value, wait_for, Backend, Proxy};

/// One received span, ids as lowercase hex.
#[derive(Debug, Clone)]
struct SpanRec {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    /// 2 = server, 3 = client (OTLP `SpanKind`).
    kind: i32,
    attributes: HashMap<String, String>,
    events: Vec<(String, HashMap<String, String>)>,
    service_name: String,
    resource: HashMap<String, String>,
}

type Spans = Arc<Mutex<Vec<SpanRec>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value_text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(list: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), value_text(&kv.value)))
        .collect()
}

fn record(spans: &Spans, request: ExportTraceServiceRequest) {
    let mut out = spans.lock().unwrap();
    for resource in request.resource_spans {
        let resource_attrs = resource
            .resource
            .as_ref()
            .map(|r| attrs(&r.attributes))
            .unwrap_or_default();
        let service_name = resource_attrs
            .get("service.name")
            .cloned()
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                out.push(SpanRec {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name.clone(),
                    kind: span.kind,
                    attributes: attrs(&span.attributes),
                    events: span
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), attrs(&e.attributes)))
                        .collect(),
                    service_name: service_name.clone(),
                    resource: resource_attrs.clone(),
                });
            }
        }
    }
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body.
struct HttpCollector {
    port: u16,
    spans: Spans,
    /// `x-api-key` values the exports carried.
    api_keys: Arc<Mutex<Vec<String>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl HttpCollector {
    async fn start() -> HttpCollector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans: Spans = Arc::default();
        let api_keys: Arc<Mutex<Vec<String>>> = Arc::default();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = spans.clone();
        let keys = api_keys.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                    _ = &mut stopped => break,
                };
                let spans = shared.clone();
                let keys = keys.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let spans = spans.clone();
                            let keys = keys.clone();
                            async move {
                                let path = req.uri().path().to_string();
                                if let Some(key) = req.headers().get("x-api-key") {
                                    keys.lock().unwrap().push(key.to_str().unwrap().to_string());
                                }
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let status = if path == "/v1/traces" {
                                    match ExportTraceServiceRequest::decode(body) {
                                        Ok(request) => {
                                            record(&spans, request);
                                            200
                                        }
                                        Err(_) => 400,
                                    }
                                } else {
                                    404
                                };
                                let reply = ExportTraceServiceResponse::default().encode_to_vec();
                                let mut resp = hyper::Response::new(Full::new(Bytes::from(reply)));
                                *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                                resp.headers_mut().insert(
                                    "content-type",
                                    "application/x-protobuf".parse().unwrap(),
                                );
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        HttpCollector {
            port,
            spans,
            api_keys,
            _stop: stop,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// An OTLP/gRPC receiver (tonic, the collector's own service definition).
struct GrpcCollector {
    port: u16,
    spans: Spans,
}

struct GrpcService(Spans);

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        record(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl GrpcCollector {
    async fn start() -> GrpcCollector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans: Spans = Arc::default();
        let service = TraceServiceServer::new(GrpcService(spans.clone()));
        tokio::spawn(async move {
            let incoming = tokio_stream_from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        GrpcCollector { port, spans }
    }
}

/// The accepted connections of `listener` as the stream tonic serves.
fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

fn spans_of(spans: &Spans, trace_id: &str) -> Vec<SpanRec> {
    spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect()
}

async fn wait_spans(spans: &Spans, trace_id: &str, count: usize) -> Vec<SpanRec> {
    wait_for(
        &format!("{count} spans of trace {trace_id}"),
        Duration::from_secs(20),
        || {
            let found = spans_of(spans, trace_id);
            async move { (found.len() >= count).then_some(found) }
        },
    )
    .await
}

fn config(app: &str, otlp: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}", timeout: 5s }}
telemetry:
  service_name: traced-api
  otlp: {otlp}
routes:
  - name: items
    match: {{ path_prefix: /echo/items, methods: [GET] }}
    upstream: app
    cache: {{ ttl: 1m }}
  - name: rest
    match: {{ path_prefix: / }}
    upstream: app
"#
    )
}

/// A backend, an HTTP collector, and outrider exporting to it with fast batches.
async fn exporting_proxy() -> (Backend, HttpCollector, Proxy) {
    let app = Backend::start("app").await;
    let collector = HttpCollector::start().await;
    let otlp = format!("{{ endpoint: \"{}\" }}", collector.endpoint());
    let proxy = Proxy::start_with_env(&config(&app.url(), &otlp), FAST).await;
    (app, collector, proxy)
}

/// GET `path` as part of `trace` (sampled, with [`CLIENT_PARENT`] as the caller's span).
async fn get_in_trace(proxy: &Proxy, path: &str, trace: &str) -> reqwest::Response {
    client()
        .get(proxy.url(path))
        .header("traceparent", format!("00-{trace}-{CLIENT_PARENT}-01"))
        .send()
        .await
        .unwrap()
}

/// Fast batches, so tests do not wait for the default schedule.
const FAST: &[(&str, &str)] = &[("OTEL_BSP_SCHEDULE_DELAY", "20")];

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_PARENT: &str = "00f067aa0ba902b7";

/// The `traceparent` the upstream received, from the echo backend's JSON.
fn upstream_traceparent(echo: &serde_json::Value) -> String {
    echo["headers"]["traceparent"]
        .as_str()
        .expect("upstream got a traceparent")
        .to_string()
}

#[tokio::test]
async fn client_trace_continues_through_outrider_to_the_upstream_and_the_collector() {
    let (_app, collector, proxy) = exporting_proxy().await;
    let c = client();
    let traceparent = format!("00-{TRACE}-{CLIENT_PARENT}-01");
    let resp = c
        .get(proxy.url("/echo/other?x=1"))
        .header("traceparent", &traceparent)
        .header("tracestate", "vendor=opaque,other=2")
        .header("user-agent", "trace-test/1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.unwrap();
    let sent = upstream_traceparent(&echo);
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], TRACE, "the client's trace id goes on");
    assert_ne!(parts[2], CLIENT_PARENT, "outrider's own span is the parent");
    assert_eq!(parts[3], "01");
    assert_eq!(echo["headers"]["tracestate"], "vendor=opaque,other=2");

    let spans = wait_spans(&collector.spans, TRACE, 2).await;
    let server = spans.iter().find(|s| s.kind == 2).expect("server span");
    let upstream = spans.iter().find(|s| s.kind == 3).expect("client span");
    assert_eq!(server.parent_span_id, CLIENT_PARENT);
    assert_eq!(server.name, "GET rest");
    assert_eq!(upstream.parent_span_id, server.span_id);
    assert_eq!(
        upstream.span_id, parts[2],
        "the upstream's parent is the client span"
    );
    assert_eq!(server.service_name, "traced-api");
    let a = &server.attributes;
    assert_eq!(a["http.request.method"], "GET");
    assert_eq!(a["url.path"], "/echo/other");
    assert_eq!(a["http.route"], "/*");
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(a["server.address"], "127.0.0.1");
    assert_eq!(a["client.address"], "127.0.0.1");
    assert_eq!(a["user_agent.original"], "trace-test/1");
    assert_eq!(a["outrider.route"], "rest");
    assert_eq!(upstream.attributes["http.response.status_code"], "200");
    assert_eq!(upstream.attributes["outrider.upstream"], "app");
    let events: Vec<&str> = upstream.events.iter().map(|(n, _)| n.as_str()).collect();
    assert!(events.contains(&"connected"), "{events:?}");
    assert!(events.contains(&"response_header"), "{events:?}");

    // The access log line names the trace.
    let log = wait_for("access log line", Duration::from_secs(10), || {
        let log = proxy.log();
        async move { log.contains(TRACE).then_some(log) }
    })
    .await;
    assert!(log.contains(&format!("\"trace_id\":\"{TRACE}\"")), "{log}");
}

#[tokio::test]
async fn cache_stage_notes_its_status_and_lookup_on_the_span() {
    let (_app, collector, proxy) = exporting_proxy().await;
    let traces = [
        "11111111111111111111111111111111",
        "22222222222222222222222222222222",
    ];
    for trace in traces {
        let resp = get_in_trace(&proxy, "/echo/items/1", trace).await;
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let miss = wait_spans(&collector.spans, traces[0], 2).await;
    let server = miss.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(server.attributes["outrider.cache.status"], "MISS");
    assert_eq!(server.attributes["http.route"], "/echo/items*");
    let hit = wait_spans(&collector.spans, traces[1], 1).await;
    assert_eq!(hit.len(), 1, "a hit makes no upstream call: {hit:?}");
    let server = &hit[0];
    assert_eq!(server.attributes["outrider.cache.status"], "HIT");
    let (name, lookup) = server.events.first().expect("lookup event");
    assert_eq!(name, "cache.lookup");
    assert_eq!(lookup["outrider.cache.tier"], "l1");
    assert_eq!(lookup["outrider.cache.found"], "true");
}

#[tokio::test]
async fn invalid_traceparent_starts_a_new_trace_without_the_old_tracestate() {
    let (_app, collector, proxy) = exporting_proxy().await;
    let c = client();
    let bad = [
        format!("00-{}-{CLIENT_PARENT}-01", TRACE.to_uppercase()),
        format!("00-{}-{CLIENT_PARENT}-01", "0".repeat(32)),
        format!("00-{TRACE}-{}-01", "0".repeat(16)),
        format!("ff-{TRACE}-{CLIENT_PARENT}-01"),
        format!("00-{TRACE}-{CLIENT_PARENT}-1"),
    ];
    for value in bad {
        let echo: serde_json::Value = c
            .get(proxy.url("/echo/new"))
            .header("traceparent", &value)
            .header("tracestate", "vendor=stale")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let sent = upstream_traceparent(&echo);
        let trace = sent.split('-').nth(1).unwrap().to_string();
        assert_ne!(trace, TRACE.to_lowercase(), "{value} must not be continued");
        assert_ne!(trace, "0".repeat(32));
        assert!(echo["headers"].get("tracestate").is_none(), "{echo}");
        // The new trace is recorded with no parent.
        let spans = wait_spans(&collector.spans, &trace, 2).await;
        let server = spans.iter().find(|s| s.kind == 2).unwrap();
        assert_eq!(server.parent_span_id, "", "{value}");
    }
    // Two traceparent headers are as good as none.
    let resp = c
        .get(proxy.url("/echo/twice"))
        .header("traceparent", format!("00-{TRACE}-{CLIENT_PARENT}-01"))
        .header("traceparent", format!("00-{TRACE}-{CLIENT_PARENT}-01"))
        .send()
        .await
        .unwrap();
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert!(!upstream_traceparent(&echo).contains(TRACE));
}

#[tokio::test]
async fn sampling_ratio_zero_and_one_and_live_reload() {
    let app = Backend::start("app").await;
    let collector = HttpCollector::start().await;
    let zero = format!(
        "{{ endpoint: \"{}\", sample_ratio: 0.0 }}",
        collector.endpoint()
    );
    let mut proxy = Proxy::start_with_env(&config(&app.url(), &zero), FAST).await;
    let c = client();
    let mut unsampled = Vec::new();
    for _ in 0..20 {
        let echo: serde_json::Value = c
            .get(proxy.url("/echo/zero"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let sent = upstream_traceparent(&echo);
        assert!(
            sent.ends_with("-00"),
            "ratio 0 marks new traces unsampled: {sent}"
        );
        unsampled.push(sent.split('-').nth(1).unwrap().to_string());
    }
    // A sampled parent is followed whatever the ratio (parent-based sampling).
    let marker = "33333333333333333333333333333333";
    let echo: serde_json::Value = c
        .get(proxy.url("/echo/parent"))
        .header("traceparent", format!("00-{marker}-{CLIENT_PARENT}-01"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(upstream_traceparent(&echo).ends_with("-01"));
    wait_spans(&collector.spans, marker, 2).await;
    // Spans leave in order: the marker arrived, so none of the unsampled ones ever will.
    for trace in &unsampled {
        assert!(
            spans_of(&collector.spans, trace).is_empty(),
            "{trace} was exported"
        );
    }

    // Ratio 1 applies on reload, without a restart.
    let one = format!(
        "{{ endpoint: \"{}\", sample_ratio: 1.0 }}",
        collector.endpoint()
    );
    proxy.write_config(&config(&app.url(), &one));
    let trace = wait_for("ratio 1 after reload", Duration::from_secs(20), || {
        let c = c.clone();
        let url = proxy.url("/echo/one");
        async move {
            let echo: serde_json::Value = c.get(url).send().await.ok()?.json().await.ok()?;
            let sent = upstream_traceparent(&echo);
            sent.ends_with("-01")
                .then(|| sent.split('-').nth(1).unwrap().to_string())
        }
    })
    .await;
    wait_spans(&collector.spans, &trace, 2).await;
    let _ = &mut proxy;
}

#[tokio::test]
async fn grpc_export_reaches_a_grpc_collector() {
    let app = Backend::start("app").await;
    let collector = GrpcCollector::start().await;
    let otlp = format!(
        "{{ endpoint: \"http://127.0.0.1:{}\", protocol: grpc }}",
        collector.port
    );
    let proxy = Proxy::start_with_env(&config(&app.url(), &otlp), FAST).await;
    let trace = "44444444444444444444444444444444";
    let resp = get_in_trace(&proxy, "/echo/grpc", trace).await;
    assert_eq!(resp.status(), 200);
    let spans = wait_spans(&collector.spans, trace, 2).await;
    assert!(spans.iter().any(|s| s.kind == 2 && s.name == "GET rest"));
}

#[tokio::test]
async fn environment_configures_export_when_yaml_is_silent() {
    let app = Backend::start("app").await;
    let collector = HttpCollector::start().await;
    let mut env = FAST.to_vec();
    let endpoint = collector.endpoint();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint));
    env.push(("OTEL_SERVICE_NAME", "from-env"));
    env.push(("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"));
    let yaml = config(&app.url(), "{}").replace("  service_name: traced-api\n", "");
    let proxy = Proxy::start_with_env(&yaml, &env).await;
    let trace = "55555555555555555555555555555555";
    get_in_trace(&proxy, "/echo/env", trace).await;
    let spans = wait_spans(&collector.spans, trace, 2).await;
    assert_eq!(spans[0].service_name, "from-env");
    assert_eq!(spans[0].resource["deployment.environment"], "test");
}

#[tokio::test]
async fn export_headers_reach_the_collector_and_never_show_in_config_or_logs() {
    let app = Backend::start("app").await;
    let collector = HttpCollector::start().await;
    let otlp = format!(
        "{{ endpoint: \"{}\", headers: {{ x-api-key: \"otlp-sekret-123\" }} }}",
        collector.endpoint()
    );
    let proxy = Proxy::start_with_env(&config(&app.url(), &otlp), FAST).await;
    let trace = "88888888888888888888888888888888";
    get_in_trace(&proxy, "/echo/keyed", trace).await;
    wait_spans(&collector.spans, trace, 2).await;
    let keys = collector.api_keys.lock().unwrap().clone();
    assert!(!keys.is_empty());
    assert!(keys.iter().all(|k| k == "otlp-sekret-123"), "{keys:?}");
    let shown = proxy.admin_text("/config").await;
    assert!(!shown.contains("otlp-sekret-123"), "{shown}");
    assert!(shown.contains("\"x-api-key\":\"***\""), "{shown}");
    assert!(!proxy.log().contains("otlp-sekret-123"));
}

async fn dropped(proxy: &Proxy, reason: &str) -> f64 {
    let text = proxy.admin_text("/metrics").await;
    metric_value(&text, "outrider_trace_spans_dropped_total", &[reason]).unwrap_or(0.0)
}

#[tokio::test]
async fn a_down_or_black_holed_collector_never_fails_a_request() {
    let app = Backend::start("app").await;
    // Down: nothing listens on the port.
    let down = format!(
        "{{ endpoint: \"http://127.0.0.1:{}\", timeout: 300ms }}",
        support::free_port()
    );
    let proxy = Proxy::start_with_env(&config(&app.url(), &down), FAST).await;
    let c = client();
    for _ in 0..50 {
        let resp = c.get(proxy.url("/echo/down")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    wait_for("export failures counted", Duration::from_secs(20), || {
        let proxy = &proxy;
        async move { (dropped(proxy, "export_failed").await > 0.0).then_some(()) }
    })
    .await;
    drop(proxy);

    // Black-holed: connections are accepted and never answered; the queue is tiny.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_port = hole.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in hole.incoming().take(64).flatten() {
            keep.lock().unwrap().push(stream);
        }
    });
    let otlp =
        format!("{{ endpoint: \"http://127.0.0.1:{hole_port}\", timeout: 2s, max_queue: 4 }}");
    let proxy = Proxy::start_with_env(&config(&app.url(), &otlp), FAST).await;
    // 200 requests, 10 at a time (the test backend shares this test's single thread).
    for wave in 0..20 {
        let answered = futures::future::join_all((0..10).map(|i| {
            let c = c.clone();
            let url = proxy.url(&format!("/echo/hole/{wave}/{i}"));
            async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
        }))
        .await;
        assert!(
            answered.iter().all(|r| matches!(r, Ok(200))),
            "{answered:?}"
        );
    }
    wait_for("queue-full drops counted", Duration::from_secs(20), || {
        let proxy = &proxy;
        async move { (dropped(proxy, "queue_full").await > 0.0).then_some(()) }
    })
    .await;
}

// Multi-threaded: the collector must keep answering while this test blocks on the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_queued_spans() {
    let app = Backend::start("app").await;
    let collector = HttpCollector::start().await;
    let otlp = format!("{{ endpoint: \"{}\" }}", collector.endpoint());
    // Batches would wait a minute: only the shutdown flush can send this span in time.
    let mut proxy = Proxy::start_with_env(
        &config(&app.url(), &otlp),
        &[("OTEL_BSP_SCHEDULE_DELAY", "60000")],
    )
    .await;
    let trace = "66666666666666666666666666666666";
    let resp = get_in_trace(&proxy, "/echo/flush", trace).await;
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(30)).expect("exited");
    assert!(status.success(), "{status:?}");
    let spans = spans_of(&collector.spans, trace);
    assert_eq!(spans.len(), 2, "{spans:?}\n{}", proxy.log());
}

#[tokio::test]
async fn openmetrics_scrape_carries_trace_exemplars() {
    // Exemplars name exported traces only.
    let (_app, _collector, proxy) = exporting_proxy().await;
    let trace = "77777777777777777777777777777777";
    get_in_trace(&proxy, "/echo/exemplar", trace).await;
    // The request is counted when its response has gone out: poll the scrape until it is.
    let url = proxy.admin("/metrics");
    let (content_type, text) = wait_for("the exemplar", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let resp = client()
                .get(url)
                .header("accept", "application/openmetrics-text; version=1.0.0")
                .send()
                .await
                .ok()?;
            let content_type = resp
                .headers()
                .get("content-type")?
                .to_str()
                .ok()?
                .to_string();
            let text = resp.text().await.ok()?;
            text.contains(trace).then_some((content_type, text))
        }
    })
    .await;
    assert!(content_type.starts_with("application/openmetrics-text"));
    // The reference parser (prometheus_client's OpenMetrics parser) must accept the whole
    // exposition and find the exemplar on the request duration histogram.
    let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        if s.exemplar and s.name == "outrider_request_duration_seconds_bucket":
            print(s.labels["route"], s.exemplar.labels["trace_id"])
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("rest {trace}")),
        "{stdout}\n{text}"
    );
    // The classic format stays the default.
    let classic = proxy.admin_text("/metrics").await;
    assert!(!classic.contains("# EOF"));
    assert!(!classic.contains(trace));
}
