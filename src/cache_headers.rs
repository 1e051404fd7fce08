//! The vocabulary every caching capability shares: `Cache-Control` directive parsing, the
//! request's credential bytes, and the `cache-status` (RFC 9211), `x-cache-status` and `age`
//! header values. Caches (the HTTP cache, GraphQL response caching) use these so their headers
//! mean the same thing; the rules of *what* to store stay with each capability.

use std::time::Duration;

use http::{header, HeaderMap};

/// One `Cache-Control` directive: lowercase name and optional (unquoted) value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    pub name: String,
    pub value: Option<String>,
}

/// Splits a comma list while respecting quoted strings (`private="a, b"` is one directive).
fn split_list(v: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, &b) in v.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == b',' && !quoted {
            out.push(&v[start..i]);
            start = i + 1;
        }
    }
    out.push(&v[start..]);
    out
}

fn trim(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// All directives of every `name` header (usually `cache-control`), in order.
pub fn directives(headers: &HeaderMap, name: header::HeaderName) -> Vec<Directive> {
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        for item in split_list(value.as_bytes()) {
            let item = trim(item);
            if item.is_empty() {
                continue;
            }
            let (n, v) = match item.iter().position(|&b| b == b'=') {
                Some(eq) => (trim(&item[..eq]), Some(trim(&item[eq + 1..]))),
                None => (item, None),
            };
            let value = v.map(|v| {
                let v = v
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v);
                String::from_utf8_lossy(v).into_owned()
            });
            out.push(Directive {
                name: String::from_utf8_lossy(n).to_ascii_lowercase(),
                value,
            });
        }
    }
    out
}

/// Whether a directive of this name is present.
pub fn has_directive(d: &[Directive], name: &str) -> bool {
    d.iter().any(|d| d.name == name)
}

/// Largest delta-seconds a cache must handle; larger values mean "this much" (RFC 9111 §1.2.2).
const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// Delta-seconds of the first `name` directive. A malformed value (`-1`, `1.5`, `abc`, no value)
/// gives 0: RFC 9111 §4.2.1 treats invalid freshness information as stale.
pub fn directive_seconds(d: &[Directive], name: &str) -> Option<u64> {
    let directive = d.iter().find(|d| d.name == name)?;
    let v = directive.value.as_deref().unwrap_or("");
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(0);
    }
    Some(
        v.parse::<u64>()
            .unwrap_or(MAX_DELTA_SECONDS)
            .min(MAX_DELTA_SECONDS),
    )
}

/// Bytes that identify the caller's credentials (length-prefixed so header boundaries cannot
/// be shifted to collide), or `None` when the request carries none.
pub fn credential_bytes(req: &HeaderMap) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for name in [header::AUTHORIZATION, header::COOKIE] {
        for v in req.get_all(&name) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.push(0);
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        }
    }
    (!out.is_empty()).then_some(out)
}

/// What happened to a request, for the `cache-status` and `x-cache-status` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Fresh hit; `ttl` = seconds of freshness left.
    Hit {
        ttl: i64,
    },
    /// Stale entry served while a background refresh runs; `ttl` is negative.
    StaleWhileRevalidate {
        ttl: i64,
    },
    /// The upstream failed and a stale entry was served instead.
    StaleIfError {
        ttl: i64,
        fwd_status: Option<u16>,
    },
    Miss {
        stored: bool,
    },
    /// An entry existed but was too old to use; fetched anew.
    Expired {
        stored: bool,
    },
    /// The client asked for a refresh (`no-cache`).
    Refresh {
        stored: bool,
    },
    /// A stale entry was refreshed from upstream and the new response served.
    Revalidated {
        stored: bool,
    },
    Bypass,
}

/// Name of this cache in `cache-status`.
pub const CACHE_NAME: &str = "outrider";

impl CacheStatus {
    /// The RFC 9211 `cache-status` value.
    pub fn header_value(&self) -> String {
        let stored = |s: bool| if s { "; stored" } else { "" };
        match *self {
            CacheStatus::Hit { ttl } | CacheStatus::StaleWhileRevalidate { ttl } => {
                format!("{CACHE_NAME}; hit; ttl={ttl}")
            }
            CacheStatus::StaleIfError { ttl, fwd_status } => match fwd_status {
                Some(s) => format!("{CACHE_NAME}; fwd=stale; fwd-status={s}; ttl={ttl}"),
                None => format!("{CACHE_NAME}; fwd=stale; ttl={ttl}"),
            },
            CacheStatus::Miss { stored: s } => format!("{CACHE_NAME}; fwd=miss{}", stored(s)),
            CacheStatus::Expired { stored: s } | CacheStatus::Revalidated { stored: s } => {
                format!("{CACHE_NAME}; fwd=stale{}", stored(s))
            }
            CacheStatus::Refresh { stored: s } => {
                format!("{CACHE_NAME}; fwd=request{}", stored(s))
            }
            CacheStatus::Bypass => format!("{CACHE_NAME}; fwd=bypass"),
        }
    }

    /// Records whether the response this status describes is (being) stored.
    pub fn set_stored(&mut self, value: bool) {
        match self {
            CacheStatus::Miss { stored }
            | CacheStatus::Expired { stored }
            | CacheStatus::Refresh { stored }
            | CacheStatus::Revalidated { stored } => *stored = value,
            _ => {}
        }
    }

    /// The `x-cache-status` value.
    pub fn x_cache_status(&self) -> &'static str {
        match self {
            CacheStatus::Hit { .. } => "HIT",
            CacheStatus::StaleWhileRevalidate { .. } | CacheStatus::StaleIfError { .. } => "STALE",
            CacheStatus::Miss { .. } => "MISS",
            CacheStatus::Expired { .. } => "EXPIRED",
            CacheStatus::Revalidated { .. } => "REVALIDATED",
            CacheStatus::Refresh { .. } | CacheStatus::Bypass => "BYPASS",
        }
    }
}

/// The `age` header value: whole seconds, rounded down (RFC 9111 §5.1).
pub fn age_header_value(age: Duration) -> String {
    age.as_secs().to_string()
}
