//! OTLP protobuf written straight from a request's plain data: each span is encoded once, on
//! the request's thread, into one buffer already framed as a `ScopeSpans.spans` entry, and an
//! export is those buffers concatenated behind a fixed resource/scope prefix. No span objects
//! are built, converted, grouped or cloned on the way, which was most of what tracing cost per
//! request. The collector receives the `ExportTraceServiceRequest` the OpenTelemetry SDK would
//! send (the tests decode it with `opentelemetry-proto`).

use opentelemetry_sdk::Resource;

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// `SpanKind` values of the OTLP protocol.
pub const KIND_SERVER: u64 = 2;
pub const KIND_CLIENT: u64 = 3;
/// `Status.code`: unset (the default) and error.
pub const STATUS_UNSET: u64 = 0;
pub const STATUS_ERROR: u64 = 2;

/// The path of the gRPC method that takes an export.
pub const GRPC_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// An attribute value, borrowed from the request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attr<'a> {
    Str(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// A span event.
pub struct EventRecord<'a> {
    pub name: &'a str,
    pub at_unix_nanos: u64,
    pub attributes: &'a [(&'a str, Attr<'a>)],
}

/// Everything one span says.
pub struct SpanRecord<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub parent_is_remote: bool,
    /// The name, as parts joined with single spaces (`GET items`).
    pub name: &'a [&'a str],
    pub kind: u64,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: &'a [(&'a str, Attr<'a>)],
    pub events: &'a [EventRecord<'a>],
    pub status_code: u64,
    pub status_message: &'a str,
}

fn varint_len(value: u64) -> usize {
    (70 - (value | 1).leading_zeros() as usize) / 7
}

fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn key_len(field: u64) -> usize {
    varint_len(field << 3)
}

fn put_key(buf: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(buf, (field << 3) | wire);
}

/// Size of a length-delimited field whose content is `len` bytes.
fn framed_len(field: u64, len: usize) -> usize {
    key_len(field) + varint_len(len as u64) + len
}

fn put_frame(buf: &mut Vec<u8>, field: u64, len: usize) {
    put_key(buf, field, LEN);
    put_varint(buf, len as u64);
}

fn put_bytes(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_frame(buf, field, bytes.len());
    buf.extend_from_slice(bytes);
}

fn put_fixed64(buf: &mut Vec<u8>, field: u64, value: u64) {
    put_key(buf, field, FIXED64);
    buf.extend_from_slice(&value.to_le_bytes());
}

impl Attr<'_> {
    /// Size of the `AnyValue` message.
    fn any_value_len(&self) -> usize {
        match self {
            Attr::Str(s) => framed_len(1, s.len()),
            Attr::Bool(_) => key_len(2) + 1,
            Attr::Int(i) => key_len(3) + varint_len(*i as u64),
            Attr::Float(_) => key_len(4) + 8,
        }
    }

    fn put_any_value(&self, buf: &mut Vec<u8>) {
        match self {
            Attr::Str(s) => put_bytes(buf, 1, s.as_bytes()),
            Attr::Bool(b) => {
                put_key(buf, 2, VARINT);
                buf.push(u8::from(*b));
            }
            // int64 is encoded as its two's complement varint, as protobuf does.
            Attr::Int(i) => {
                put_key(buf, 3, VARINT);
                put_varint(buf, *i as u64);
            }
            Attr::Float(f) => put_fixed64(buf, 4, f.to_bits()),
        }
    }
}

/// Size of a `KeyValue` message.
fn key_value_len(key: &str, value: &Attr<'_>) -> usize {
    framed_len(1, key.len()) + framed_len(2, value.any_value_len())
}

fn attributes_len(field: u64, attributes: &[(&str, Attr<'_>)]) -> usize {
    attributes
        .iter()
        .map(|(k, v)| framed_len(field, key_value_len(k, v)))
        .sum()
}

fn put_attributes(buf: &mut Vec<u8>, field: u64, attributes: &[(&str, Attr<'_>)]) {
    for (key, value) in attributes {
        put_frame(buf, field, key_value_len(key, value));
        put_bytes(buf, 1, key.as_bytes());
        put_frame(buf, 2, value.any_value_len());
        value.put_any_value(buf);
    }
}

fn event_len(event: &EventRecord<'_>) -> usize {
    key_len(1) + 8 + framed_len(2, event.name.len()) + attributes_len(3, event.attributes)
}

fn status_len(code: u64, message: &str) -> usize {
    let message_len = if message.is_empty() {
        0
    } else {
        framed_len(2, message.len())
    };
    let code_len = if code == 0 {
        0
    } else {
        key_len(3) + varint_len(code)
    };
    message_len + code_len
}

impl SpanRecord<'_> {
    fn name_len(&self) -> usize {
        self.name.iter().map(|p| p.len()).sum::<usize>() + self.name.len().saturating_sub(1)
    }

    /// Size of the `Span` message.
    fn body_len(&self) -> usize {
        framed_len(1, 16)
            + framed_len(2, 8)
            + self.parent_span_id.map_or(0, |_| framed_len(4, 8))
            + framed_len(5, self.name_len())
            + key_len(6)
            + varint_len(self.kind)
            + 2 * (key_len(7) + 8)
            + attributes_len(9, self.attributes)
            + self
                .events
                .iter()
                .map(|e| framed_len(11, event_len(e)))
                .sum::<usize>()
            + framed_len(15, status_len(self.status_code, self.status_message))
            + key_len(16)
            + 4
    }

    /// W3C flags plus the OTLP bits saying whether the parent is remote.
    fn flags(&self) -> u32 {
        const SAMPLED: u32 = 0x01;
        const HAS_IS_REMOTE: u32 = 0x100;
        const IS_REMOTE: u32 = 0x200;
        SAMPLED | HAS_IS_REMOTE | if self.parent_is_remote { IS_REMOTE } else { 0 }
    }

    /// The span as a `ScopeSpans.spans` entry (field 2, framed), ready to be concatenated.
    pub fn encode(&self) -> Vec<u8> {
        let body = self.body_len();
        let size = framed_len(2, body);
        let mut buf = Vec::with_capacity(size);
        put_frame(&mut buf, 2, body);
        put_bytes(&mut buf, 1, &self.trace_id);
        put_bytes(&mut buf, 2, &self.span_id);
        if let Some(parent) = &self.parent_span_id {
            put_bytes(&mut buf, 4, parent);
        }
        put_frame(&mut buf, 5, self.name_len());
        for (i, part) in self.name.iter().enumerate() {
            if i > 0 {
                buf.push(b' ');
            }
            buf.extend_from_slice(part.as_bytes());
        }
        put_key(&mut buf, 6, VARINT);
        put_varint(&mut buf, self.kind);
        put_fixed64(&mut buf, 7, self.start_unix_nanos);
        put_fixed64(&mut buf, 8, self.end_unix_nanos);
        put_attributes(&mut buf, 9, self.attributes);
        for event in self.events {
            put_frame(&mut buf, 11, event_len(event));
            put_fixed64(&mut buf, 1, event.at_unix_nanos);
            put_bytes(&mut buf, 2, event.name.as_bytes());
            put_attributes(&mut buf, 3, event.attributes);
        }
        put_frame(
            &mut buf,
            15,
            status_len(self.status_code, self.status_message),
        );
        if !self.status_message.is_empty() {
            put_bytes(&mut buf, 2, self.status_message.as_bytes());
        }
        if self.status_code != 0 {
            put_key(&mut buf, 3, VARINT);
            put_varint(&mut buf, self.status_code);
        }
        put_key(&mut buf, 16, FIXED32);
        buf.extend_from_slice(&self.flags().to_le_bytes());
        debug_assert_eq!(buf.len(), size);
        buf
    }
}

/// The part of every export that does not change: the resource and the instrumentation scope,
/// each already framed for its parent message.
#[derive(Debug, Clone)]
pub struct ExportPrefix {
    /// `ResourceSpans.resource` (field 1), framed.
    resource: Vec<u8>,
    /// `ScopeSpans.scope` (field 1), framed.
    scope: Vec<u8>,
}

impl ExportPrefix {
    pub fn new(resource: &Resource, scope_name: &str, scope_version: &str) -> ExportPrefix {
        let values: Vec<(String, String, Option<Attr<'static>>)> = resource
            .iter()
            .map(|(key, value)| {
                let scalar = match value {
                    opentelemetry::Value::I64(i) => Some(Attr::Int(*i)),
                    opentelemetry::Value::F64(f) => Some(Attr::Float(*f)),
                    opentelemetry::Value::Bool(b) => Some(Attr::Bool(*b)),
                    _ => None,
                };
                (key.to_string(), value.as_str().into_owned(), scalar)
            })
            .collect();
        let attributes: Vec<(&str, Attr<'_>)> = values
            .iter()
            .map(|(k, text, scalar)| (k.as_str(), scalar.unwrap_or(Attr::Str(text))))
            .collect();
        let resource_len = attributes_len(1, &attributes);
        let mut resource = Vec::with_capacity(framed_len(1, resource_len));
        put_frame(&mut resource, 1, resource_len);
        put_attributes(&mut resource, 1, &attributes);
        let scope_len = framed_len(1, scope_name.len()) + framed_len(2, scope_version.len());
        let mut scope = Vec::with_capacity(framed_len(1, scope_len));
        put_frame(&mut scope, 1, scope_len);
        put_bytes(&mut scope, 1, scope_name.as_bytes());
        put_bytes(&mut scope, 2, scope_version.as_bytes());
        ExportPrefix { resource, scope }
    }

    /// An `ExportTraceServiceRequest` holding `spans` (each from [`SpanRecord::encode`]).
    pub fn request(&self, spans: &[Vec<u8>]) -> Vec<u8> {
        let spans_len: usize = spans.iter().map(Vec::len).sum();
        let scope_spans_len = self.scope.len() + spans_len;
        let resource_spans_len = self.resource.len() + framed_len(2, scope_spans_len);
        let mut out = Vec::with_capacity(framed_len(1, resource_spans_len));
        put_frame(&mut out, 1, resource_spans_len);
        out.extend_from_slice(&self.resource);
        put_frame(&mut out, 2, scope_spans_len);
        out.extend_from_slice(&self.scope);
        for span in spans {
            out.extend_from_slice(span);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths_match_the_encoding() {
        for value in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            assert_eq!(buf.len(), varint_len(value), "{value}");
        }
    }

    #[test]
    fn a_span_encodes_to_exactly_its_computed_size() {
        let attributes = [
            ("http.request.method", Attr::Str("GET")),
            ("http.response.status_code", Attr::Int(200)),
            ("negative", Attr::Int(-1)),
            ("ratio", Attr::Float(0.5)),
            ("flag", Attr::Bool(true)),
        ];
        let event_attributes = [("outrider.connection.reused", Attr::Bool(false))];
        let events = [EventRecord {
            name: "connected",
            at_unix_nanos: 1_700_000_000_000_000_000,
            attributes: &event_attributes,
        }];
        let span = SpanRecord {
            trace_id: [7; 16],
            span_id: [9; 8],
            parent_span_id: Some([1; 8]),
            parent_is_remote: true,
            name: &["GET", "items"],
            kind: KIND_SERVER,
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes: &attributes,
            events: &events,
            status_code: STATUS_ERROR,
            status_message: "status 502",
        };
        // `encode` checks its own size in debug builds; a collector must read it back.
        let resource = Resource::builder_empty()
            .with_attribute(opentelemetry::KeyValue::new("service.name", "svc"))
            .with_attribute(opentelemetry::KeyValue::new("replicas", 3))
            .build();
        let prefix = ExportPrefix::new(&resource, "outrider", "1.2.3");
        let body = prefix.request(&[span.encode(), span.encode()]);
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let decoded = <ExportTraceServiceRequest as prost::Message>::decode(&body[..]).unwrap();
        let resource_spans = &decoded.resource_spans[0];
        let resource = resource_spans.resource.as_ref().unwrap();
        assert_eq!(resource.attributes.len(), 2);
        let scope_spans = &resource_spans.scope_spans[0];
        let scope = scope_spans.scope.as_ref().unwrap();
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("outrider", "1.2.3")
        );
        assert_eq!(scope_spans.spans.len(), 2);
        let got = &scope_spans.spans[0];
        assert_eq!(got.trace_id, vec![7; 16]);
        assert_eq!(got.span_id, vec![9; 8]);
        assert_eq!(got.parent_span_id, vec![1; 8]);
        assert_eq!(got.name, "GET items");
        assert_eq!(got.kind, 2);
        assert_eq!((got.start_time_unix_nano, got.end_time_unix_nano), (1, 2));
        assert_eq!(got.flags, 0x301);
        let values: Vec<_> = got
            .attributes
            .iter()
            .map(|kv| {
                (
                    kv.key.as_str(),
                    kv.value.as_ref().unwrap().value.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            values[0],
            ("http.request.method", Value::StringValue("GET".into()))
        );
        assert_eq!(
            values[1],
            ("http.response.status_code", Value::IntValue(200))
        );
        assert_eq!(values[2], ("negative", Value::IntValue(-1)));
        assert_eq!(values[3], ("ratio", Value::DoubleValue(0.5)));
        assert_eq!(values[4], ("flag", Value::BoolValue(true)));
        assert_eq!(got.events[0].name, "connected");
        assert_eq!(got.events[0].time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(
            got.events[0].attributes[0].key,
            "outrider.connection.reused"
        );
        let status = got.status.as_ref().unwrap();
        assert_eq!((status.code, status.message.as_str()), (2, "status 502"));
    }
}
