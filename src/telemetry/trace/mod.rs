//! Distributed tracing: W3C Trace Context in and out, one server span per request and one
//! client span for its upstream call, exported over OTLP.
//!
//! Per request, a [`RequestTrace`] holds plain ids and timestamps; the spans are built only when
//! the request is over and only when it is sampled, so an unsampled request costs an id and a
//! header. Export runs on its own thread behind a bounded queue ([`export`]).

pub mod context;
pub mod export;
pub mod otlp;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use pingora_http::RequestHeader;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::config::schema::{OtlpConfig, OtlpProtocol, TelemetryConfig};
use crate::pipeline::{NoteValue, SpanNotes};
use context::{Parent, SpanId, TraceId};
use export::{ExportCounters, ExportQueue, ExportSettings};
use otlp::{Attr, EventRecord, ExportPrefix, SpanRecord};

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("telemetry.otlp: cannot start the exporter: {0}")]
    Exporter(String),
    #[error("telemetry.otlp.headers: {0:?} is not a valid header")]
    Header(String),
    #[error("telemetry.otlp: {0}")]
    Runtime(String),
    #[error("trace metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Metric names, documented in docs/operations.md.
pub mod names {
    pub const SPANS_EXPORTED: &str = "outrider_trace_spans_exported_total";
    pub const SPANS_DROPPED: &str = "outrider_trace_spans_dropped_total";
}

/// How new traces are sampled when YAML says nothing (`OTEL_TRACES_SAMPLER`/`_ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerDefaults {
    /// A valid client `traceparent` decides (its sampled flag) instead of the ratio.
    pub parent_based: bool,
    pub ratio: f64,
}

impl SamplerDefaults {
    /// Reads the OpenTelemetry sampler variables; unknown values keep the spec default
    /// (`parentbased_always_on`).
    pub fn from_env(sampler: Option<&str>, arg: Option<&str>) -> SamplerDefaults {
        let arg = arg
            .and_then(|a| a.trim().parse::<f64>().ok())
            .filter(|r| (0.0..=1.0).contains(r))
            .unwrap_or(1.0);
        let (parent_based, ratio) = match sampler.map(str::trim) {
            Some("always_on") => (false, 1.0),
            Some("always_off") => (false, 0.0),
            Some("traceidratio") => (false, arg),
            Some("parentbased_always_off") => (true, 0.0),
            Some("parentbased_traceidratio") => (true, arg),
            _ => (true, 1.0),
        };
        SamplerDefaults {
            parent_based,
            ratio,
        }
    }
}

/// The process-wide tracing service: sampling rules and the export queue (when exporting).
pub struct Tracing {
    sampler: SamplerDefaults,
    export: Option<ExportQueue>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("sampler", &self.sampler)
            .field("exporting", &self.export.is_some())
            .finish()
    }
}

/// The endpoint in effect: YAML, then the trace-specific variable (used as is), then the
/// general one (`/v1/traces` appended for HTTP, as the OTLP exporter spec says).
pub fn resolve_endpoint(
    otlp: &OtlpConfig,
    protocol: OtlpProtocol,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    let with_path = |base: &str| match protocol {
        OtlpProtocol::Grpc => base.to_string(),
        OtlpProtocol::Http => format!("{}/v1/traces", base.trim_end_matches('/')),
    };
    let yaml = otlp.endpoint.trim();
    if !yaml.is_empty() {
        // A bare `http://host:4318` means the collector's standard path.
        let has_path = yaml
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/').contains('/'))
            .unwrap_or(false);
        return Some(if has_path {
            yaml.to_string()
        } else {
            with_path(yaml)
        });
    }
    let non_empty = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if let Some(endpoint) = non_empty("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Some(endpoint.trim().to_string());
    }
    non_empty("OTEL_EXPORTER_OTLP_ENDPOINT").map(|e| with_path(e.trim()))
}

/// The export settings in effect, or `None` when no endpoint is configured anywhere.
pub fn export_settings(
    otlp: &OtlpConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<ExportSettings> {
    let protocol = otlp.protocol.unwrap_or_else(|| {
        match env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
            .map(str::trim)
        {
            Some("grpc") => OtlpProtocol::Grpc,
            _ => OtlpProtocol::Http,
        }
    });
    let endpoint = resolve_endpoint(otlp, protocol, env)?;
    let timeout = otlp.timeout.map(|t| t.get()).unwrap_or_else(|| {
        env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(10))
    });
    Some(ExportSettings {
        endpoint,
        protocol,
        headers: export_headers(otlp, env),
        timeout,
        max_queue: otlp.max_queue,
        schedule_delay: env("OTEL_BSP_SCHEDULE_DELAY")
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(1)),
    })
}

/// The headers sent with every export: `OTEL_EXPORTER_OTLP_HEADERS`, then the trace-specific
/// `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, then YAML, each overriding a name set before it
/// (names compared case-insensitively). The variables hold `name=value` pairs separated by
/// commas, values percent-encoded, as the OTLP exporter spec says; a malformed pair is skipped.
fn export_headers(
    otlp: &OtlpConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut set = |name: &str, value: String| {
        let name = name.trim().to_ascii_lowercase();
        headers.retain(|(n, _)| *n != name);
        headers.push((name, value));
    };
    for variable in [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ] {
        for pair in env(variable).unwrap_or_default().split(',') {
            if let Some((name, value)) = pair.split_once('=') {
                if !name.trim().is_empty() {
                    set(name, percent_decode(value.trim()));
                }
            }
        }
    }
    for (name, value) in &otlp.headers {
        set(name, value.clone());
    }
    headers
}

/// `%XX` escapes decoded; anything else (a stray `%`) kept as it is.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Tracing {
    /// Propagation only: nothing is exported (tests, `check`).
    pub fn propagate_only() -> Tracing {
        Tracing {
            sampler: SamplerDefaults::from_env(None, None),
            export: None,
        }
    }

    /// Starts tracing for a process from its config and the `OTEL_*` environment.
    pub fn start(telemetry: &TelemetryConfig, registry: &Registry) -> Result<Tracing, TraceError> {
        let exported = IntCounter::new(names::SPANS_EXPORTED, "Spans the OTLP collector accepted")?;
        let dropped = IntCounterVec::new(
            Opts::new(
                names::SPANS_DROPPED,
                "Spans not exported, by reason (queue_full: the collector is slower than traffic; export_failed: it refused or did not answer)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(exported.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        let counters = ExportCounters {
            exported,
            dropped_queue_full: dropped.with_label_values(&["queue_full"]),
            dropped_export_failed: dropped.with_label_values(&["export_failed"]),
        };
        let sampler = SamplerDefaults::from_env(
            process_env("OTEL_TRACES_SAMPLER").as_deref(),
            process_env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        );
        let export = match export_settings(&telemetry.otlp, &process_env) {
            Some(settings) => {
                tracing::info!(endpoint = %crate::telemetry::redact::url(&settings.endpoint), protocol = ?settings.protocol, "exporting traces over OTLP");
                // Resource: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (read by the SDK's
                // detectors); YAML's name wins, and `outrider` stands in only when neither
                // variable names the service.
                let env_names_service = process_env("OTEL_SERVICE_NAME")
                    .is_some_and(|v| !v.trim().is_empty())
                    || process_env("OTEL_RESOURCE_ATTRIBUTES")
                        .is_some_and(|v| v.contains("service.name="));
                let mut resource = Resource::builder()
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
                if telemetry.service_name.is_some() || !env_names_service {
                    resource = resource.with_service_name(telemetry.service_name());
                }
                let prefix =
                    ExportPrefix::new(&resource.build(), "outrider", env!("CARGO_PKG_VERSION"));
                Some(ExportQueue::start(settings, prefix, counters)?)
            }
            None => None,
        };
        Ok(Tracing { sampler, export })
    }

    /// Starts a request's trace from its `traceparent`; `ratio` is the live YAML ratio.
    pub fn begin(&self, req: &RequestHeader, ratio: Option<f64>) -> RequestTrace {
        let mut values = req.headers.get_all("traceparent").iter();
        let parent = match (values.next(), values.next()) {
            (Some(value), None) => context::parse_traceparent(value.as_bytes()).ok(),
            _ => None,
        };
        let trace_id = parent
            .map(|p| p.trace_id)
            .unwrap_or_else(context::new_trace_id);
        let sampled = match parent {
            Some(parent) if self.sampler.parent_based => parent.sampled,
            _ => context::ratio_samples(&trace_id, ratio.unwrap_or(self.sampler.ratio)),
        };
        RequestTrace {
            trace_id,
            parent,
            server_span: context::new_span_id(),
            client_span: context::new_span_id(),
            sampled,
            start: SystemTime::now(),
            upstream: None,
        }
    }

    /// Whether spans of sampled requests go anywhere.
    pub fn exporting(&self) -> bool {
        self.export.is_some()
    }

    /// Encodes and queues the request's spans (when sampled and exporting).
    pub fn finish(&self, trace: &RequestTrace, facts: &RequestFacts<'_>, notes: SpanNotes) {
        let Some(export) = &self.export else {
            return;
        };
        if !trace.sampled {
            return;
        }
        let end = SystemTime::now();
        if let Some(upstream) = &trace.upstream {
            export.send(client_span(trace, upstream, facts, end));
        }
        let mut attributes: Vec<(&str, Attr<'_>)> = Vec::with_capacity(10 + notes.attributes.len());
        attributes.extend([
            ("http.request.method", Attr::Str(facts.method)),
            ("url.path", Attr::Str(facts.path)),
            ("outrider.route", Attr::Str(facts.route)),
        ]);
        if let Some(template) = facts.http_route {
            attributes.push(("http.route", Attr::Str(template)));
        }
        if facts.status != 0 {
            attributes.push((
                "http.response.status_code",
                Attr::Int(i64::from(facts.status)),
            ));
        }
        if let Some(host) = facts.server_address {
            attributes.push(("server.address", Attr::Str(host)));
        }
        if let Some(client) = &facts.client_address {
            attributes.push(("client.address", Attr::Str(client)));
        }
        if let Some(agent) = facts.user_agent {
            attributes.push(("user_agent.original", Attr::Str(agent)));
        }
        if let Some(id) = facts.request_id {
            attributes.push(("outrider.request_id", Attr::Str(id)));
        }
        attributes.extend(notes.attributes.iter().map(|(k, v)| (*k, attr(v))));
        let event_attributes: Vec<Vec<(&str, Attr<'_>)>> = notes
            .events
            .iter()
            .map(|e| e.attributes.iter().map(|(k, v)| (*k, attr(v))).collect())
            .collect();
        let events: Vec<EventRecord<'_>> = notes
            .events
            .iter()
            .zip(&event_attributes)
            .map(|(e, attributes)| EventRecord {
                name: e.name,
                at_unix_nanos: unix_nanos(e.at),
                attributes,
            })
            .collect();
        // Server spans are in error for 5xx only (OpenTelemetry HTTP conventions).
        let error =
            (facts.status >= 500 || facts.status == 0).then(|| format!("status {}", facts.status));
        let span = SpanRecord {
            trace_id: trace.trace_id,
            span_id: trace.server_span,
            parent_span_id: trace.parent.map(|p| p.span_id),
            parent_is_remote: trace.parent.is_some(),
            name: &[facts.method, facts.route],
            kind: otlp::KIND_SERVER,
            start_unix_nanos: unix_nanos(trace.start),
            end_unix_nanos: unix_nanos(end),
            attributes: &attributes,
            events: &events,
            status_code: if error.is_some() {
                otlp::STATUS_ERROR
            } else {
                otlp::STATUS_UNSET
            },
            status_message: error.as_deref().unwrap_or(""),
        };
        export.send(span.encode());
    }

    /// Exports what is queued, for at most `timeout` (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Some(export) = &self.export {
            if !export.flush(timeout) {
                tracing::warn!(timeout = ?timeout, "queued spans not flushed before the deadline");
            }
        }
    }
}

/// The upstream call's client span, a child of the server span.
fn client_span(
    trace: &RequestTrace,
    upstream: &UpstreamCall,
    facts: &RequestFacts<'_>,
    end: SystemTime,
) -> Vec<u8> {
    let mut attributes: Vec<(&str, Attr<'_>)> = vec![
        ("http.request.method", Attr::Str(facts.method)),
        ("server.address", Attr::Str(&upstream.host)),
        ("server.port", Attr::Int(i64::from(upstream.port))),
        ("outrider.upstream", Attr::Str(&upstream.name)),
    ];
    if let Some(status) = upstream.status {
        attributes.push(("http.response.status_code", Attr::Int(i64::from(status))));
    }
    let status_text;
    let status_message = match (upstream.error, upstream.status) {
        (Some(kind), _) => {
            attributes.push(("error.type", Attr::Str(kind)));
            kind
        }
        (None, Some(code)) if code >= 400 => {
            status_text = format!("status {code}");
            status_text.as_str()
        }
        _ => "",
    };
    let reused: Vec<[(&str, Attr<'_>); 1]> = upstream
        .events
        .iter()
        .map(|(_, _, reused)| {
            [(
                "outrider.connection.reused",
                Attr::Bool(reused.unwrap_or(false)),
            )]
        })
        .collect();
    let events: Vec<EventRecord<'_>> = upstream
        .events
        .iter()
        .zip(&reused)
        .map(|((name, at, was_reused), attribute)| EventRecord {
            name,
            at_unix_nanos: unix_nanos(*at),
            attributes: if was_reused.is_some() { attribute } else { &[] },
        })
        .collect();
    SpanRecord {
        trace_id: trace.trace_id,
        span_id: trace.client_span,
        parent_span_id: Some(trace.server_span),
        parent_is_remote: false,
        name: &[facts.method],
        kind: otlp::KIND_CLIENT,
        start_unix_nanos: unix_nanos(upstream.start),
        end_unix_nanos: unix_nanos(upstream.end.unwrap_or(end)),
        attributes: &attributes,
        events: &events,
        status_code: if status_message.is_empty() {
            otlp::STATUS_UNSET
        } else {
            otlp::STATUS_ERROR
        },
        status_message,
    }
    .encode()
}

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn attr(value: &NoteValue) -> Attr<'_> {
    match value {
        NoteValue::Str(s) => Attr::Str(s),
        NoteValue::Int(i) => Attr::Int(*i),
        NoteValue::Float(f) => Attr::Float(*f),
        NoteValue::Bool(b) => Attr::Bool(*b),
    }
}

/// What the proxy knows of a finished request, for its server span.
pub struct RequestFacts<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    /// The route's path template (`/api/items*`).
    pub http_route: Option<&'a str>,
    pub status: u16,
    pub server_address: Option<&'a str>,
    pub client_address: Option<String>,
    pub user_agent: Option<&'a str>,
    pub request_id: Option<&'a str>,
}

/// The upstream call of a request, as its client span records it.
#[derive(Debug, Clone)]
pub struct UpstreamCall {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub start: SystemTime,
    /// `(event, when, connection reused?)`: `connected`, `response_header`.
    pub events: Vec<(&'static str, SystemTime, Option<bool>)>,
    pub status: Option<u16>,
    pub error: Option<&'static str>,
    pub end: Option<SystemTime>,
}

/// One request's trace identity and timings; plain data until the request ends.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    pub trace_id: TraceId,
    /// The client's valid `traceparent`, if any.
    pub parent: Option<Parent>,
    pub server_span: SpanId,
    /// The id outrider's upstream call carries as its parent, whether or not it is recorded.
    pub client_span: SpanId,
    pub sampled: bool,
    pub start: SystemTime,
    pub upstream: Option<UpstreamCall>,
}

impl RequestTrace {
    /// Sets the upstream request's `traceparent` (outrider's client span as parent). The
    /// client's `tracestate` goes on unchanged with a trace it belongs to, and is dropped
    /// when outrider started a new trace.
    pub fn inject(&self, upstream_request: &mut RequestHeader) -> pingora_error::Result<()> {
        upstream_request.insert_header(
            "traceparent",
            context::format_traceparent(&self.trace_id, &self.client_span, self.sampled),
        )?;
        if self.parent.is_none() {
            upstream_request.remove_header("tracestate");
        }
        Ok(())
    }

    /// The trace id as logs and exemplars show it.
    pub fn trace_id_hex(&self) -> String {
        context::hex(&self.trace_id)
    }

    /// The upstream call begins (before connecting); a retry keeps the first start.
    pub fn upstream_started(&mut self, name: &str, host: &str, port: u16) {
        if self.upstream.is_none() {
            self.upstream = Some(UpstreamCall {
                name: name.to_string(),
                host: host.to_string(),
                port,
                start: SystemTime::now(),
                events: Vec::new(),
                status: None,
                error: None,
                end: None,
            });
        }
    }

    pub fn upstream_event(&mut self, name: &'static str, reused: Option<bool>) {
        if let Some(call) = self.upstream.as_mut() {
            call.events.push((name, SystemTime::now(), reused));
        }
    }

    pub fn upstream_status(&mut self, status: u16) {
        if let Some(call) = self.upstream.as_mut() {
            call.status = Some(status);
        }
    }

    pub fn upstream_failed(&mut self, kind: &'static str) {
        if let Some(call) = self.upstream.as_mut() {
            call.error = Some(kind);
            call.end.get_or_insert_with(SystemTime::now);
        }
    }

    /// The upstream response has been read to its end.
    pub fn upstream_done(&mut self) {
        if let Some(call) = self.upstream.as_mut() {
            call.end.get_or_insert_with(SystemTime::now);
        }
    }
}

/// Whether a request's trace should record spans at all (any sampled trace when exporting).
pub fn recording(tracing: &Tracing, trace: Option<&RequestTrace>) -> bool {
    tracing.exporting() && trace.is_some_and(|t| t.sampled)
}

/// Shared handle type the proxy and server hold.
pub type SharedTracing = Arc<Tracing>;

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn export_headers_merge_the_environment_and_yaml() {
        let mut otlp = OtlpConfig::default();
        let env = env_of(&[
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=general, X-Team = a%20b%2Cc ,broken, =nameless",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "API-KEY=traces"),
        ]);
        assert_eq!(
            export_headers(&otlp, &env),
            vec![
                ("x-team".to_string(), "a b,c".to_string()),
                ("api-key".to_string(), "traces".to_string()),
            ]
        );
        otlp.headers.insert("x-team".into(), "yaml".into());
        let headers = export_headers(&otlp, &env);
        assert!(headers.contains(&("x-team".to_string(), "yaml".to_string())));
        assert_eq!(headers.len(), 2);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn endpoint_resolution_follows_the_spec() {
        let mut otlp = OtlpConfig::default();
        let none = env_of(&[]);
        assert_eq!(export_settings(&otlp, &none), None);
        let general = env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]);
        assert_eq!(
            export_settings(&otlp, &general).unwrap().endpoint,
            "http://c:4318/v1/traces"
        );
        let specific = env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9999/custom"),
        ]);
        assert_eq!(
            export_settings(&otlp, &specific).unwrap().endpoint,
            "http://t:9999/custom"
        );
        let grpc = env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ]);
        let settings = export_settings(&otlp, &grpc).unwrap();
        assert_eq!(settings.endpoint, "http://c:4317");
        assert_eq!(settings.protocol, OtlpProtocol::Grpc);
        assert_eq!(settings.timeout, Duration::from_millis(2500));
        // Explicit YAML wins over the environment.
        otlp.endpoint = "http://yaml:4318".into();
        otlp.protocol = Some(OtlpProtocol::Http);
        let settings = export_settings(&otlp, &grpc).unwrap();
        assert_eq!(settings.endpoint, "http://yaml:4318/v1/traces");
        assert_eq!(settings.protocol, OtlpProtocol::Http);
        otlp.endpoint = "http://yaml:4318/otlp/v1/traces".into();
        assert_eq!(
            export_settings(&otlp, &none).unwrap().endpoint,
            "http://yaml:4318/otlp/v1/traces"
        );
    }

    #[test]
    fn sampler_variables() {
        let d = SamplerDefaults::from_env(None, None);
        assert_eq!((d.parent_based, d.ratio), (true, 1.0));
        let d = SamplerDefaults::from_env(Some("traceidratio"), Some("0.25"));
        assert_eq!((d.parent_based, d.ratio), (false, 0.25));
        let d = SamplerDefaults::from_env(Some("parentbased_traceidratio"), Some("7"));
        assert_eq!((d.parent_based, d.ratio), (true, 1.0));
        let d = SamplerDefaults::from_env(Some("always_off"), None);
        assert_eq!((d.parent_based, d.ratio), (false, 0.0));
    }

    fn request(traceparent: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        if let Some(tp) = traceparent {
            req.insert_header("traceparent", tp).unwrap();
        }
        req.insert_header("tracestate", "vendor=1").unwrap();
        req
    }

    #[test]
    fn parent_decides_sampling_and_trace_id() {
        let tracing = Tracing::propagate_only();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let trace = tracing.begin(&request(Some(tp)), Some(1.0));
        assert!(!trace.sampled, "an unsampled parent is followed");
        assert_eq!(trace.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut upstream = request(Some(tp));
        trace.inject(&mut upstream).unwrap();
        let sent = upstream
            .headers
            .get("traceparent")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(sent.ends_with("-00"));
        assert_ne!(
            &sent[36..52],
            "00f067aa0ba902b7",
            "outrider is the new parent"
        );
        assert_eq!(upstream.headers.get("tracestate").unwrap(), "vendor=1");

        let fresh = tracing.begin(&request(Some("garbage")), Some(0.0));
        assert!(!fresh.sampled);
        assert_ne!(fresh.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut upstream = request(None);
        fresh.inject(&mut upstream).unwrap();
        assert!(upstream.headers.get("tracestate").is_none());
    }
}
