//! Property tests for every parser of untrusted input: whatever the bytes, an error or a value,
//! never a panic; and the invariants the cache's integrity rests on. The same properties run as
//! cargo-fuzz targets in `fuzz/` (nightly, by hand).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use outrider::cache::policy::{self, RoutePolicy};
use outrider::store::{CacheKey, StoredResponse};
use proptest::prelude::*;

fn header_map(name: &'static str, values: &[Vec<u8>]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for v in values {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            m.append(name, v);
        }
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Config loading: any text gives a config or positioned problems, never a panic.
    #[test]
    fn config_loading_never_panics(text in "\\PC{0,400}") {
        match outrider::config::parse_str(&text, "p.yaml") {
            Ok(_) => {}
            Err(e) => {
                for line in e.lines() {
                    prop_assert!(line.starts_with("p.yaml:"), "{}", line);
                }
            }
        }
    }

    /// YAML-shaped inputs reach deeper than random text.
    #[test]
    fn config_like_yaml_never_panics(
        key in prop::sample::select(vec!["listen", "routes", "upstreams", "cache", "admin", "threads", "telemetry", "shutdown"]),
        value in prop::sample::select(vec!["1", "-1", "[]", "{}", "null", "\"${X:-}\"", "[{name: a}]", "{a: {b: c}}", "1s", "99999999999999999999", "0.0.0.0:0"]),
    ) {
        let text = format!("upstreams:\n  app: {{ url: \"http://127.0.0.1:1\" }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, upstream: app }}\n{key}: {value}\n");
        let _ = outrider::config::parse_str(&text, "p.yaml");
    }

    /// Cache-Control / Vary / Age parsing over arbitrary header bytes.
    #[test]
    fn response_policy_never_panics(
        cc in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..60), 0..4),
        vary in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..30), 0..3),
        age in prop::collection::vec(any::<u8>(), 0..12),
        status in 100u16..600,
        respect_origin in any::<bool>(),
    ) {
        let mut resp = header_map("cache-control", &cc);
        for v in &vary {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                resp.append("vary", v);
            }
        }
        if let Ok(v) = HeaderValue::from_bytes(&age) {
            resp.insert("age", v);
        }
        let route = RoutePolicy { respect_origin, ..RoutePolicy::default() };
        if let Ok(ttl) = policy::response_storable(status, &resp, &route) {
            prop_assert!(!ttl.is_zero());
            prop_assert!(ttl <= Duration::from_secs(1 << 31).max(route.ttl));
        }
        let _ = policy::request_decision(&http::Method::GET, &resp, &route);
        let _ = policy::storable_headers(&resp);
    }

    /// Distinct keyed parts never share a key: paths, queries, hosts and header values, including
    /// several lines of one header against one line holding the same text.
    #[test]
    fn distinct_inputs_never_collide(
        a in (prop::collection::vec("[a-z, ]{0,4}", 0..3), "[a-z/]{0,8}", prop::option::of("[a-z=&]{0,6}"), "[a-z.]{0,6}"),
        b in (prop::collection::vec("[a-z, ]{0,4}", 0..3), "[a-z/]{0,8}", prop::option::of("[a-z=&]{0,6}"), "[a-z.]{0,6}"),
    ) {
        let route = RoutePolicy { key_headers: vec!["x-t".into()], ..RoutePolicy::default() };
        let key = |(values, path, query, host): &(Vec<String>, String, Option<String>, String)| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append("x-t", HeaderValue::from_str(v).unwrap());
            }
            let vary = policy::vary_values(&headers, &route);
            let vary: Vec<(&str, &[u8])> = vary.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
            CacheKey::http("r", "GET", host, path, query.as_deref(), &vary, None)
        };
        // Absent and empty-valued header lines are the same to an app; otherwise keys differ
        // exactly when the inputs do.
        let same_headers = |x: &Vec<String>, y: &Vec<String>| x == y || (x.iter().all(String::is_empty) && y.iter().all(String::is_empty) && x.len() <= 1 && y.len() <= 1);
        let same = same_headers(&a.0, &b.0) && a.1 == b.1 && a.2 == b.2 && a.3 == b.3;
        prop_assert_eq!(key(&a) == key(&b), same);
    }

    /// The stored-entry codec round-trips any entry and refuses any corruption of it.
    #[test]
    fn entry_codec_round_trips(
        status in 100u16..600,
        headers in prop::collection::vec(("[a-z-]{1,12}", prop::collection::vec(any::<u8>(), 0..40)), 0..6),
        body in prop::collection::vec(any::<u8>(), 0..2000),
        ttl in 0u64..1_000_000,
        flip in any::<prop::sample::Index>(),
    ) {
        let entry = StoredResponse {
            status,
            headers: headers.into_iter().map(|(n, v)| (n, Bytes::from(v))).collect(),
            body: Bytes::from(body),
            stored_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            ttl: Duration::from_secs(ttl),
            retention: Duration::from_secs(ttl * 2),
            namespace: "ns".into(),
            label: "/l".into(),
        };
        let encoded = entry.encode();
        prop_assert_eq!(StoredResponse::decode(&encoded).ok(), Some(entry.clone()));
        // Any truncation is an error, not a panic or a different entry.
        let cut = flip.index(encoded.len());
        prop_assert!(StoredResponse::decode(&encoded[..cut]).is_err());
    }

    /// Arbitrary bytes as a stored value (a foreign or corrupt Redis value): never a panic.
    #[test]
    fn entry_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = StoredResponse::decode(&bytes);
    }

    /// Request targets: absolute-form is rewritten byte-exact or refused, never normalised.
    #[test]
    fn request_targets_are_never_normalised(path in "/[a-zA-Z0-9%./?=&-]{0,40}") {
        let target = format!("http://shop{path}");
        let Ok(mut req) = pingora_http::RequestHeader::build("GET", target.as_bytes(), None) else {
            return Ok(());
        };
        req.insert_header("host", "shop").unwrap();
        if outrider::proxy::forward::to_origin_form(&mut req).is_ok() {
            prop_assert_eq!(req.raw_path(), path.as_bytes());
        }
    }
}
