//! W3C Trace Context (`traceparent`), parsed strictly: a header that is not exactly right
//! starts a new trace rather than continuing one we cannot vouch for.

/// A trace id: 16 bytes, never all zero.
pub type TraceId = [u8; 16];
/// A span id: 8 bytes, never all zero.
pub type SpanId = [u8; 8];

/// What a valid incoming `traceparent` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

/// Why a `traceparent` was refused (for debugging logs; the request goes on with a new trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParentError {
    #[error("traceparent has the wrong length")]
    Length,
    #[error("traceparent fields are not separated by '-'")]
    Separator,
    #[error("traceparent has a field that is not lowercase hex")]
    NotHex,
    #[error("traceparent version ff is forbidden")]
    Version,
    #[error("traceparent trace id is all zeros")]
    ZeroTraceId,
    #[error("traceparent parent id is all zeros")]
    ZeroSpanId,
    #[error("more than one traceparent header")]
    Repeated,
}

/// Parses one `traceparent` value (W3C Trace Context level 1, §3.2). Version `00` must be exactly
/// 55 characters; a later version may append fields after a `-`, which are ignored.
pub fn parse_traceparent(value: &[u8]) -> Result<Parent, ParentError> {
    if value.len() < 55 {
        return Err(ParentError::Length);
    }
    let version = hex_field::<1>(&value[0..2])?;
    match version[0] {
        0xff => return Err(ParentError::Version),
        0x00 if value.len() != 55 => return Err(ParentError::Length),
        _ if value.len() > 55 && value[55] != b'-' => return Err(ParentError::Separator),
        _ => {}
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return Err(ParentError::Separator);
    }
    let trace_id = hex_field::<16>(&value[3..35])?;
    let span_id = hex_field::<8>(&value[36..52])?;
    let flags = hex_field::<1>(&value[53..55])?;
    if trace_id == [0; 16] {
        return Err(ParentError::ZeroTraceId);
    }
    if span_id == [0; 8] {
        return Err(ParentError::ZeroSpanId);
    }
    Ok(Parent {
        trace_id,
        span_id,
        sampled: flags[0] & 1 == 1,
    })
}

/// The `traceparent` value outrider sends upstream (always version `00`).
pub fn format_traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> String {
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, trace_id);
    out.push('-');
    push_hex(&mut out, span_id);
    out.push_str(if sampled { "-01" } else { "-00" });
    out
}

/// Lowercase hex of an id, as logs and exemplars show it.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

/// `N` bytes from `2N` lowercase hex digits (uppercase is invalid in trace context).
fn hex_field<const N: usize>(text: &[u8]) -> Result<[u8; N], ParentError> {
    if text.len() != 2 * N {
        return Err(ParentError::Length);
    }
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Ok(out)
}

fn nibble(c: u8) -> Result<u8, ParentError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(ParentError::NotHex),
    }
}

/// A new random id that is not all zeros.
pub fn new_trace_id() -> TraceId {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

/// A new random span id that is not all zeros.
pub fn new_span_id() -> SpanId {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

/// The trace-id-ratio rule of the OpenTelemetry SDKs: the low 63 bits of the trace id against
/// the ratio, so every service with the same ratio makes the same choice for a trace.
pub fn ratio_samples(trace_id: &TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..16]);
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    (u64::from_be_bytes(low) >> 1) < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn valid_header_round_trips() {
        let parent = parse_traceparent(VALID.as_bytes()).unwrap();
        assert!(parent.sampled);
        assert_eq!(hex(&parent.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            format_traceparent(&parent.trace_id, &parent.span_id, true),
            VALID
        );
        let unsampled = parse_traceparent(
            &VALID.as_bytes()[..53]
                .iter()
                .chain(b"00")
                .copied()
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn invalid_headers_are_refused() {
        let cases: &[(&str, ParentError)] = &[
            ("", ParentError::Length),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
                ParentError::Length,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                ParentError::Length,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                ParentError::NotHex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                ParentError::NotHex,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ParentError::Version,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ParentError::ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                ParentError::ZeroSpanId,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ParentError::Separator,
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                ParentError::Separator,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_traceparent(text.as_bytes()), Err(*expected), "{text}");
        }
    }

    #[test]
    fn later_versions_may_add_fields() {
        let text = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        assert!(parse_traceparent(text.as_bytes()).is_ok());
    }

    #[test]
    fn ratio_bounds() {
        let id = new_trace_id();
        assert!(ratio_samples(&id, 1.0));
        assert!(!ratio_samples(&id, 0.0));
        let sampled = (0..10_000)
            .filter(|_| ratio_samples(&new_trace_id(), 0.25))
            .count();
        assert!((2000..3000).contains(&sampled), "{sampled}");
    }
}
