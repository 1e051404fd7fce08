//! Store tests against a real `redis-server` (spawned per test on a free port) and against a
//! black-hole TCP listener.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::testsupport::{free_port, RedisServer};
use super::*;

fn settings(url: Option<String>, l1_bytes: u64) -> CacheSettings {
    CacheSettings {
        memory_max_bytes: l1_bytes,
        redis: RedisEndpoint {
            url,
            ..RedisEndpoint::default()
        },
        redis_key_prefix: "test:".into(),
        redis_timeout: Duration::from_millis(50),
        max_entry_size: 1024 * 1024,
        max_inflight_bytes: 0,
    }
}

fn fast_breaker() -> CacheOptions {
    CacheOptions {
        breaker: BreakerSettings {
            failure_threshold: 3,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
        },
    }
}

fn cache(url: Option<String>, l1_bytes: u64) -> Arc<Store> {
    let reg = prometheus::Registry::new();
    let metrics = CacheMetrics::new(&reg).expect("metrics");
    Store::with_metrics(settings(url, l1_bytes), fast_breaker(), metrics).expect("cache")
}

fn entry(ns: &str, label: &str, body: &str) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![(
            "content-type".into(),
            bytes::Bytes::from_static(b"text/plain"),
        )],
        body: bytes::Bytes::from(body.to_owned()),
        stored_at: SystemTime::now(),
        ttl: Duration::from_secs(60),
        retention: Duration::from_secs(180),
        namespace: ns.into(),
        label: label.into(),
    }
}

fn key(ns: &str, path: &str) -> CacheKey {
    CacheKey::http(ns, "GET", "h", path, None, &[], None)
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_up(c: &Store) {
    wait_until("redis up", Duration::from_secs(10), || {
        c.redis_state() == RedisState::Up
    })
    .await;
}

fn rkey(k: &CacheKey) -> String {
    super::l2::redis_key("test:", &k.namespace, &k.label, &k.hex())
}

fn exists(r: &RedisServer, k: &CacheKey) -> bool {
    let mut c = r.conn();
    redis::cmd("EXISTS")
        .arg(rkey(k))
        .query::<i64>(&mut c)
        .map(|n| n == 1)
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_roundtrip_fills_l1_of_another_replica_and_sets_ttl() {
    let redis = RedisServer::start();
    let a = cache(Some(redis.url()), 1 << 20);
    let b = cache(Some(redis.url()), 1 << 20);
    wait_up(&a).await;
    wait_up(&b).await;
    let k = key("items", "/api/items/1");
    let stored = a.store(&k, entry("items", "/api/items/1", "hello")).await;
    assert!(stored.is_some());
    assert_eq!(a.lookup(&k).await.tier, Tier::L1);
    wait_until("write reaches redis", Duration::from_secs(5), || {
        exists(&redis, &k)
    })
    .await;

    let mut c = redis.conn();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(rkey(&k))
        .query(&mut c)
        .expect("pttl");
    assert!(pttl > 0 && pttl <= 180_000, "pttl {pttl}");

    let first = b.lookup(&k).await;
    assert_eq!(first.tier, Tier::L2);
    let got = first.entry.expect("l2 hit");
    assert_eq!(&got.body[..], b"hello");
    assert_eq!(got.namespace, "items");
    assert!(got.remaining_retention(SystemTime::now()) > Duration::ZERO);
    let second = b.lookup(&k).await;
    assert_eq!(second.tier, Tier::L1, "an L2 hit fills L1");

    assert!(b.lookup(&key("items", "/nope")).await.entry.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_only_when_l1_disabled() {
    let redis = RedisServer::start();
    let c = cache(Some(redis.url()), 0);
    wait_up(&c).await;
    let k = key("r", "/x");
    c.store(&k, entry("r", "/x", "body")).await;
    assert!(c.lookup_l1(&k).is_none());
    wait_until("write reaches redis", Duration::from_secs(5), || {
        exists(&redis, &k)
    })
    .await;
    for _ in 0..3 {
        let l = c.lookup(&k).await;
        assert_eq!(l.tier, Tier::L2);
    }
    assert_eq!(c.stats()["l1"]["enabled"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_namespace_prefix_and_key() {
    let redis = RedisServer::start();
    let c = cache(Some(redis.url()), 1 << 20);
    wait_up(&c).await;
    let keys = [
        key("items", "/api/items/1"),
        key("items", "/api/items/2"),
        key("items", "/api/other"),
        key("users", "/api/items/9"),
        key("users", "/u/*weird[glob]"),
        key("users", "/u/plain"),
    ];
    for k in &keys {
        c.store(k, entry(&k.namespace, &k.label, "x")).await;
    }
    for k in &keys {
        wait_until("write reaches redis", Duration::from_secs(5), || {
            exists(&redis, k)
        })
        .await;
    }

    let r = c
        .purge(PurgeTarget::PathPrefix {
            namespace: Some("items".into()),
            prefix: "/api/items".into(),
        })
        .await
        .expect("purge");
    assert_eq!((r.l1, r.l2), (2, Some(2)), "{r:?}");
    assert!(!exists(&redis, &keys[0]) && !exists(&redis, &keys[1]));
    assert!(exists(&redis, &keys[2]) && exists(&redis, &keys[3]));

    // Glob metacharacters in the prefix match literally.
    let r = c
        .purge(PurgeTarget::PathPrefix {
            namespace: None,
            prefix: "/u/*".into(),
        })
        .await
        .expect("purge");
    assert_eq!((r.l1, r.l2), (1, Some(1)), "{r:?}");
    assert!(exists(&redis, &keys[5]));

    let r = c
        .purge(PurgeTarget::Key(keys[5].hex().to_uppercase()))
        .await
        .expect("purge");
    assert_eq!((r.l1, r.l2), (1, Some(1)), "{r:?}");

    let r = c
        .purge(PurgeTarget::Namespace("users".into()))
        .await
        .expect("purge");
    assert_eq!((r.l1, r.l2), (1, Some(1)), "{r:?}");
    assert!(exists(&redis, &keys[2]));

    let r = c.purge(PurgeTarget::All).await.expect("purge");
    assert_eq!((r.l1, r.l2), (1, Some(1)), "{r:?}");
    for k in &keys {
        assert!(!exists(&redis, k));
        assert!(c.lookup(k).await.entry.is_none());
    }
    assert!(c.purge(PurgeTarget::Key("nothex".into())).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_value_in_redis_is_a_miss_and_is_overwritten() {
    let redis = RedisServer::start();
    let c = cache(Some(redis.url()), 0);
    wait_up(&c).await;
    let k = key("items", "/bad");
    let mut conn = redis.conn();
    for junk in [&b"not an entry"[..], b"ORC\0\x09rest", b""] {
        let _: () = redis::cmd("SET")
            .arg(rkey(&k))
            .arg(junk)
            .query(&mut conn)
            .expect("set");
        let l = c.lookup(&k).await;
        assert!(l.entry.is_none());
        assert_eq!(l.tier, Tier::None);
    }
    assert!(
        c.metrics()
            .redis_errors
            .with_label_values(&["decode"])
            .get()
            >= 2
    );
    // Decode failures are not Redis failures: the breaker stays closed.
    assert_eq!(c.redis_state(), RedisState::Up);
    c.store(&k, entry("items", "/bad", "good")).await;
    wait_until("overwrite", Duration::from_secs(5), || {
        let mut conn = redis.conn();
        redis::cmd("GET")
            .arg(rkey(&k))
            .query::<Vec<u8>>(&mut conn)
            .map(|v| StoredResponse::decode(&v).is_ok())
            .unwrap_or(false)
    })
    .await;
    assert_eq!(c.lookup(&k).await.tier, Tier::L2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_with_redis_down_does_not_block_or_fail() {
    let port = free_port();
    let started = Instant::now();
    let c = cache(Some(format!("redis://127.0.0.1:{port}")), 1 << 20);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(matches!(c.redis_state(), RedisState::Degraded { .. }));
    assert_eq!(c.stats()["redis"]["state"], "down");
    let k = key("a", "/");
    c.store(&k, entry("a", "/", "x")).await;
    assert_eq!(c.lookup(&k).await.tier, Tier::L1);
    let t = Instant::now();
    assert!(c.lookup(&key("a", "/other")).await.entry.is_none());
    assert!(t.elapsed() < Duration::from_millis(500));

    // Redis appears later: the background connector finds it.
    let _redis = RedisServer::start_on(port);
    wait_until("late connect", Duration::from_secs(15), || {
        c.redis_state() == RedisState::Up
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let c = cache(Some(redis.url()), 0);
    wait_up(&c).await;
    redis.stop();

    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let l = c.lookup(&key("k", &format!("/{i}"))).await;
        worst = worst.max(t.elapsed());
        assert!(l.entry.is_none());
    }
    assert!(worst < Duration::from_secs(2), "a lookup took {worst:?}");
    assert!(matches!(c.redis_state(), RedisState::Degraded { .. }));
    assert!(c.metrics().breaker_state.get() > 0);
    assert!(c.metrics().redis_error_count() > 0);

    let redis = RedisServer::start_on(port);
    let probe = key("k", "/probe");
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.redis_state() != RedisState::Up {
        assert!(
            Instant::now() < deadline,
            "did not recover: {:?}",
            c.redis_state()
        );
        let _ = c.lookup(&probe).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let k = key("k", "/after");
    c.store(&k, entry("k", "/after", "back")).await;
    wait_until("write after recovery", Duration::from_secs(5), || {
        exists(&redis, &k)
    })
    .await;
    assert_eq!(c.lookup(&k).await.tier, Tier::L2);
    assert_eq!(c.metrics().breaker_state.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_costs_at_most_the_timeout_then_opens_breaker() {
    let redis = RedisServer::start();
    let c = cache(Some(redis.url()), 0);
    wait_up(&c).await;
    // Freeze the server: it keeps the connection open but answers nothing.
    redis.signal("-STOP");
    let t = Instant::now();
    for i in 0..10 {
        let s = Instant::now();
        assert!(c.lookup(&key("h", &format!("/{i}"))).await.entry.is_none());
        assert!(
            s.elapsed() < Duration::from_secs(2),
            "lookup {i} took {:?}",
            s.elapsed()
        );
    }
    // 3 timeouts open the breaker; the other 7 skip Redis, so the total stays small.
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "total {:?}",
        t.elapsed()
    );
    assert!(matches!(c.redis_state(), RedisState::Degraded { .. }));
    assert!(
        c.metrics()
            .redis_errors
            .with_label_values(&["timeout"])
            .get()
            >= 3
    );
    redis.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.redis_state() != RedisState::Up {
        assert!(
            Instant::now() < deadline,
            "did not recover: {:?}",
            c.redis_state()
        );
        let _ = c.lookup(&key("h", "/probe")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_redis_never_delays_requests() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let c = cache(Some(format!("redis://127.0.0.1:{port}")), 1 << 20);
    let k = key("b", "/x");
    c.store(&k, entry("b", "/x", "l1 still works")).await;
    for i in 0..10 {
        let s = Instant::now();
        let l = c.lookup(&key("b", &format!("/miss{i}"))).await;
        assert!(l.entry.is_none());
        assert!(
            s.elapsed() < Duration::from_secs(2),
            "lookup took {:?}",
            s.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(c.lookup(&k).await.tier, Tier::L1);
    assert!(matches!(c.redis_state(), RedisState::Degraded { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_do_not_open_the_breaker() {
    // A full Redis (noeviction) refuses every SET with an OOM error reply, but still answers
    // GETs: the breaker must stay closed so reads keep working.
    let redis = RedisServer::start();
    let writer = cache(Some(redis.url()), 0);
    wait_up(&writer).await;
    let k = key("items", "/api/items/kept");
    writer
        .store(&k, entry("items", "/api/items/kept", "kept"))
        .await;
    wait_until("write reaches redis", Duration::from_secs(5), || {
        exists(&redis, &k)
    })
    .await;
    let mut c = redis.conn();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query(&mut c)
        .expect("config set");
    for i in 0..20 {
        let path = format!("/api/items/refused{i}");
        writer
            .store(&key("items", &path), entry("items", &path, "x"))
            .await;
    }
    wait_until("the refused writes", Duration::from_secs(10), || {
        writer.metrics().redis_error_count() >= 20
    })
    .await;
    assert!(!exists(&redis, &key("items", "/api/items/refused19")));
    assert!(
        matches!(writer.redis_state(), RedisState::Up),
        "error replies are not outages: {:?}",
        writer.redis_state()
    );
    let reader = cache(Some(redis.url()), 0);
    wait_up(&reader).await;
    let got = reader.lookup(&k).await;
    assert_eq!(got.tier, Tier::L2, "reads still served by Redis");
}

/// Feature namespaces (the APQ registry, LLM entries) ride the same broadcast as HTTP routes: a
/// purge by namespace or by key on one replica drops the other replica's L1 copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_namespaces_are_purged_on_other_replicas() {
    let redis = RedisServer::start();
    let a = cache(Some(redis.url()), 1 << 20);
    let b = cache(Some(redis.url()), 1 << 20);
    for c in [&a, &b] {
        wait_up(c).await;
        wait_until("subscribed", Duration::from_secs(10), || {
            c.invalidation_subscribed() == Some(true)
        })
        .await;
    }
    // As the GraphQL and LLM stages build them: namespace `apq` or the route's name, the label
    // is the query hash or the model, not a path.
    let apq = CacheKey::from_parts("apq", &"ab".repeat(32), &[b"query"]);
    let llm = CacheKey::from_parts("chat", "gpt-4o-mini", &[b"prompt"]);
    for k in [&apq, &llm] {
        a.store(k, entry(&k.namespace, &k.label, "x")).await;
        wait_until("write reaches redis", Duration::from_secs(5), || {
            exists(&redis, k)
        })
        .await;
        assert_eq!(b.lookup(k).await.tier, Tier::L2);
        assert!(b.lookup_l1(k).is_some(), "B holds its own copy");
    }
    let applied = |c: &Store| c.metrics().invalidations.applied.get();

    let r = a
        .purge(PurgeTarget::Namespace("apq".into()))
        .await
        .expect("purge");
    assert_eq!((r.l2, r.broadcast), (Some(1), Some(true)), "{r:?}");
    wait_until("B applies the purge", Duration::from_secs(10), || {
        applied(&b) >= 1
    })
    .await;
    wait_until("B drops its APQ copy", Duration::from_secs(10), || {
        b.lookup_l1(&apq).is_none()
    })
    .await;
    assert!(b.lookup_l1(&llm).is_some(), "another namespace stays");

    let r = a.purge(PurgeTarget::Key(llm.hex())).await.expect("purge");
    assert_eq!((r.l2, r.broadcast), (Some(1), Some(true)), "{r:?}");
    wait_until("B drops its LLM copy", Duration::from_secs(10), || {
        b.lookup_l1(&llm).is_none()
    })
    .await;
}
