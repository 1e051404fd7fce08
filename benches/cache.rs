//! Hot paths of the cache: key derivation, entry encode/decode, the L1 hit, the single-flight
//! locks every cacheable miss takes, and the HTTP cache and LLM stages answering a hit end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;

use outrider::cache::policy::RoutePolicy;
use outrider::cache::HttpCache;
use outrider::pipeline::{Effects, RequestCx, Slot, Stage, Verdict};
use outrider::store::{CacheKey, CacheSettings, Flight, Store, StoredResponse};

fn entry(body: usize) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![
            (
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            ),
            ("etag".into(), Bytes::from_static(b"\"abc123\"")),
            (
                "date".into(),
                Bytes::from_static(b"Mon, 01 Jan 2024 00:00:00 GMT"),
            ),
        ],
        body: Bytes::from(vec![b'x'; body]),
        stored_at: SystemTime::now(),
        ttl: Duration::from_secs(3600),
        retention: Duration::from_secs(7200),
        namespace: "items".into(),
        label: "/api/items/42".into(),
    }
}

fn keys(c: &mut Criterion) {
    c.bench_function("key/http", |b| {
        b.iter(|| {
            CacheKey::http(
                black_box("items"),
                black_box("GET"),
                black_box("api.example.com"),
                black_box("/api/items/42"),
                black_box(Some("page=2&sort=asc")),
                black_box(&[("accept-language", b"de-DE".as_slice())]),
                black_box(None),
            )
        })
    });
}

fn codec(c: &mut Criterion) {
    let e = entry(1024);
    let enc = e.encode();
    let enc_bytes = Bytes::from(enc.clone());
    let mut g = c.benchmark_group("entry_1KiB");
    g.throughput(Throughput::Bytes(enc.len() as u64));
    g.bench_function("encode", |b| b.iter(|| black_box(&e).encode()));
    g.bench_function("decode", |b| {
        b.iter(|| StoredResponse::decode(black_box(&enc)))
    });
    g.bench_function("decode_bytes", |b| {
        b.iter(|| StoredResponse::decode_bytes(black_box(enc_bytes.clone())))
    });
    g.finish();
}

fn l1_hit(c: &mut Criterion) {
    let registry = prometheus::Registry::new();
    let settings = CacheSettings {
        memory_max_bytes: 64 * 1024 * 1024,
        ..CacheSettings::default()
    };
    let Ok(cache) = Store::new(settings, &registry) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let Ok(rt) = rt else {
        return;
    };
    let key = CacheKey::http("items", "GET", "h", "/api/items/42", None, &[], None);
    // Some neighbours so the lookup is not in a one-entry map.
    for i in 0..10_000 {
        let k = CacheKey::http(
            "items",
            "GET",
            "h",
            &format!("/api/items/{i}"),
            None,
            &[],
            None,
        );
        cache.store_now(&k, entry(1024));
    }
    cache.store_now(&key, entry(1024));
    c.bench_function("l1_hit/lookup_l1", |b| {
        b.iter(|| cache.lookup_l1(black_box(&key)))
    });
    c.bench_function("l1_hit/lookup_async", |b| {
        b.iter(|| rt.block_on(cache.lookup(black_box(&key))))
    });
    c.bench_function("l1_hit/key_and_lookup", |b| {
        b.iter(|| {
            let k = CacheKey::http(
                "items",
                "GET",
                "h",
                black_box("/api/items/42"),
                None,
                &[],
                None,
            );
            cache.lookup_l1(&k)
        })
    });
}

/// The per-key locks of a miss: join or lead the flight, then release it. Sharded
/// parking_lot maps: no lock is shared by unrelated keys.
fn flights(c: &mut Criterion) {
    let Ok(store) = Store::new(CacheSettings::default(), &prometheus::Registry::new()) else {
        return;
    };
    let mut n = 0u64;
    c.bench_function("flight/lead_and_complete", |b| {
        b.iter(|| {
            n += 1;
            let key = CacheKey::from_parts("bench", "", &[&n.to_le_bytes()]);
            if let Flight::Leader(guard) = store.single_flight(black_box(&key), None) {
                guard.complete(None);
            }
        })
    });
    // Two threads hammering different keys at once: contention on the flight map.
    c.bench_function("flight/lead_and_complete_2_threads", |b| {
        b.iter_custom(|iters| {
            let started = std::time::Instant::now();
            std::thread::scope(|s| {
                for t in 0..2u64 {
                    let store = &store;
                    s.spawn(move || {
                        for i in 0..iters {
                            let key = CacheKey::from_parts(
                                "bench",
                                "",
                                &[&t.to_le_bytes(), &i.to_le_bytes()],
                            );
                            if let Flight::Leader(guard) = store.single_flight(&key, None) {
                                guard.complete(None);
                            }
                        }
                    });
                }
            });
            started.elapsed()
        })
    });
}

/// What a cached GET costs in the cache stage: decision, key, L1 lookup, freshness, answer.
fn stage_hit(c: &mut Criterion) {
    let Ok(store) = Store::new(CacheSettings::default(), &prometheus::Registry::new()) else {
        return;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    let stage = HttpCache::new(store.clone(), Arc::new(RoutePolicy::default()), "items");
    let key = CacheKey::http("items", "GET", "h", "/api/items/42", None, &[], None);
    store.store_now(&key, entry(1024));
    let Ok(mut req) = pingora_http::RequestHeader::build("GET", b"/api/items/42", None) else {
        return;
    };
    let _ = req.insert_header("host", "h");
    c.bench_function("stage/cache_hit", |b| {
        b.iter(|| {
            let mut slot: Slot = None;
            let mut effects = Effects::default();
            let mut cx = RequestCx::new(
                &req,
                None,
                "items",
                Duration::from_secs(1),
                &mut slot,
                0,
                &mut effects,
            );
            let verdict = rt.block_on(stage.on_request(&mut cx));
            assert!(matches!(verdict, Ok(Verdict::Answer(_))));
        })
    });
}

/// What a cached chat completion costs in the LLM stage: parse the JSON body, canonical key
/// (sorted JSON, BLAKE3, API key hash), L1 lookup, answer.
fn llm_hit(c: &mut Criterion) {
    let registry = prometheus::Registry::new();
    let Ok(store) = Store::new(CacheSettings::default(), &registry) else {
        return;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    let metrics = Arc::new(outrider::llm::metrics::LlmMetrics::new(&registry).unwrap());
    let config: outrider::llm::LlmConfig =
        serde_json::from_str(r#"{"provider":"openai"}"#).unwrap();
    let stage = outrider::llm::LlmStage::new(config, store.clone(), metrics, "chat");
    let mut req =
        pingora_http::RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
    req.insert_header("authorization", "Bearer sk-bench-0123456789")
        .unwrap();
    let body = Bytes::from_static(
        br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"What does a sidecar cache do?"}],"temperature":0}"#,
    );
    let ask = || {
        let mut slot: Slot = None;
        let mut effects = Effects::default();
        let mut cx = RequestCx::new(
            &req,
            Some(&body),
            "chat",
            Duration::from_secs(1),
            &mut slot,
            0,
            &mut effects,
        );
        let verdict = rt.block_on(stage.on_request(&mut cx));
        let answered = matches!(verdict, Ok(Verdict::Answer(_)));
        (answered, slot)
    };
    // Fill the entry as a provider's answer passing through would.
    let (answered, mut slot) = ask();
    assert!(!answered);
    let mut resp = pingora_http::ResponseHeader::build(200, None).unwrap();
    resp.insert_header("content-type", "application/json")
        .unwrap();
    let _ = stage.on_upstream_response(&mut slot, &resp);
    let mut chunk = Some(Bytes::from_static(
        br#"{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":24,"completion_tokens":16}}"#,
    ));
    stage.filter_body_chunk(&mut slot, &mut chunk, true);
    c.bench_function("stage/llm_hit", |b| {
        b.iter(|| {
            let (answered, _) = ask();
            assert!(answered);
        })
    });
}

criterion_group!(benches, keys, codec, l1_hit, flights, stage_hit, llm_hit);
criterion_main!(benches);
