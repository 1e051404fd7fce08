//! Hot paths of the cache core: key derivation, entry encode/decode, and the L1 hit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use outrider::store::{CacheKey, CacheSettings, Store, StoredResponse};

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
        retention: Duration::from_secs(660),
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
                black_box(&[("accept-language", "de-DE")]),
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

criterion_group!(benches, keys, codec, l1_hit);
criterion_main!(benches);
