//! Cache-Control, Vary, Age, Pragma and credentials parsing over arbitrary header bytes.
#![no_main]

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use outrider::cache::policy::{self, RoutePolicy};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == b'\n');
    let mut headers = HeaderMap::new();
    for name in ["cache-control", "vary", "age", "pragma", "authorization", "cookie"] {
        if let Some(v) = parts.next().and_then(|p| HeaderValue::from_bytes(p).ok()) {
            headers.append(name, v);
        }
    }
    let status = 100 + (data.len() % 500) as u16;
    for respect_origin in [false, true] {
        let route = RoutePolicy {
            respect_origin,
            shared: true,
            key_headers: vec!["accept".into()],
            ..RoutePolicy::default()
        };
        if let Ok(ttl) = policy::response_storable(status, &headers, &route) {
            assert!(!ttl.is_zero());
            assert!(ttl <= Duration::from_secs(1 << 31).max(route.ttl));
        }
        let _ = policy::request_decision(&Method::GET, &headers, &route);
        let _ = policy::storable_headers(&headers);
        let _ = policy::vary_values(&headers, &route);
    }
});
