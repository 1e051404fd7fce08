//! The response cache end to end: real sockets, the built binary, a real redis-server.

#![allow(clippy::disallowed_types)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{client, metric_eventually, metric_value, wait_for, Backend, Proxy, Redis};

fn config(app: &str, redis: &str, extra_route_cache: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}", timeout: 5s }}
cache:
  redis: {{ url: "{redis}", timeout: 50ms }}
  max_entry_size: 64KiB
routes:
  - name: items
    match: {{ path_prefix: /echo/items, methods: [GET, HEAD] }}
    upstream: app
    cache: {{ ttl: 5m{extra_route_cache} }}
  - name: headers
    match: {{ path_prefix: /headers }}
    upstream: app
    cache: {{ ttl: 5m, key: {{ query: true, headers: [accept-language] }} }}
  - name: private
    match: {{ path_prefix: /echo/private }}
    upstream: app
    cache: {{ ttl: 5m, shared: true }}
  - name: short
    match: {{ path_prefix: /echo/short }}
    upstream: app
    cache: {{ ttl: 1s, stale_while_revalidate: 1h, stale_if_error: 1h }}
  - name: slow
    match: {{ path_prefix: /slow }}
    upstream: app
    cache: {{ ttl: 5m }}
  - name: big
    match: {{ path_prefix: /big }}
    upstream: app
    cache: {{ ttl: 5m }}
  - name: refreshable
    match: {{ path_prefix: /echo/refreshable }}
    upstream: app
    cache: {{ ttl: 5m, client_no_cache: refresh }}
  - name: statuses
    match: {{ path_prefix: /status/ }}
    upstream: app
    cache: {{ ttl: 5m }}
  - name: rest
    match: {{ path_prefix: / }}
    upstream: app
"#
    )
}

struct Got {
    status: u16,
    cache: String,
    cache_status: String,
    age: Option<u64>,
    timing: String,
    body: String,
}

async fn get(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = client().get(proxy.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let h = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    Got {
        status: resp.status().as_u16(),
        cache: h("x-cache-status").unwrap_or_default(),
        cache_status: h("cache-status").unwrap_or_default(),
        age: h("age").and_then(|a| a.parse().ok()),
        timing: h("server-timing").unwrap_or_default(),
        body: resp.text().await.unwrap(),
    }
}

async fn redis_keys(redis: &Redis) -> Vec<String> {
    redis
        .cli(&["--scan", "--pattern", "outrider:*"])
        .lines()
        .map(str::to_string)
        .collect()
}

async fn wait_redis_key(redis: &Redis, needle: &str) -> String {
    wait_for("the entry in Redis", Duration::from_secs(10), || async {
        redis_keys(redis)
            .await
            .into_iter()
            .find(|k| k.contains(needle))
    })
    .await
}

#[tokio::test]
async fn miss_then_hit_with_headers_and_metrics() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), "", "")).await;
    let first = get(&proxy, "/echo/items/1?x=1", &[]).await;
    assert_eq!((first.status, first.cache.as_str()), (200, "MISS"));
    assert_eq!(first.cache_status, "outrider; fwd=miss; stored");
    assert!(first.timing.contains("cache;desc=miss"), "{}", first.timing);
    let second = get(&proxy, "/echo/items/1?x=1", &[]).await;
    assert_eq!(second.cache, "HIT");
    assert!(
        second.cache_status.starts_with("outrider; hit; ttl="),
        "{}",
        second.cache_status
    );
    assert!(second.timing.contains("cache;desc=hit") && second.timing.contains("total;dur="));
    assert_eq!(second.age, Some(0));
    assert_eq!(second.body, first.body, "the stored body is served");
    assert_eq!(app.hits("/echo/items/1"), 1);

    // The query is part of the key; HEAD is served from the GET entry.
    assert_eq!(get(&proxy, "/echo/items/1?x=2", &[]).await.cache, "MISS");
    let head = client()
        .head(proxy.url("/echo/items/1?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.headers()["x-cache-status"], "HIT");
    assert_eq!(
        head.headers()["content-length"],
        first.body.len().to_string().as_str()
    );
    assert_eq!(app.hits("/echo/items/1"), 2);

    // POST on a caching route passes through.
    let post = client()
        .post(proxy.url("/echo/private/1"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(post.headers()["x-cache-status"], "BYPASS");

    let m = support::metric_eventually(&proxy, "outrider_requests_total", &[], 5.0).await;
    assert_eq!(
        metric_value(
            &m,
            "outrider_cache_requests_total",
            &["route=\"items\"", "outcome=\"hit\"", "tier=\"l1\""]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "outrider_cache_requests_total",
            &["route=\"items\"", "outcome=\"miss\""]
        ),
        Some(2.0)
    );
    assert!(metric_value(&m, "outrider_cache_l1_entries", &[]).unwrap() >= 2.0);
    let stats: serde_json::Value = client()
        .get(proxy.admin("/cache/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(stats.to_string().contains("items"), "{stats}");
}

#[tokio::test]
async fn uncacheable_responses_and_private_requests() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), "", "")).await;
    for (path, why) in [
        ("/headers?cache-control=no-store&a=1", "no-store"),
        ("/headers?cache-control=private&a=2", "private"),
        ("/headers?set-cookie=s%3D1&a=3", "set-cookie"),
        ("/headers?vary=*&a=4", "vary *"),
    ] {
        let one = get(&proxy, path, &[]).await;
        let two = get(&proxy, path, &[]).await;
        assert_eq!(
            (one.cache.as_str(), two.cache.as_str()),
            ("MISS", "MISS"),
            "{why}"
        );
        assert_eq!(one.cache_status, "outrider; fwd=miss", "{why}: not stored");
    }
    assert_eq!(app.hits("/headers"), 8);

    // Requests with credentials are not shared unless the route says so...
    let auth = [("authorization", "Bearer alice")];
    assert_eq!(get(&proxy, "/echo/items/p", &auth).await.cache, "BYPASS");
    assert_eq!(get(&proxy, "/echo/items/p", &auth).await.cache, "BYPASS");
    assert_eq!(
        get(&proxy, "/echo/items/p", &[("cookie", "sid=1")])
            .await
            .cache,
        "BYPASS"
    );
    // ...and when it does, each credential has its own entry.
    assert_eq!(get(&proxy, "/echo/private/p", &auth).await.cache, "MISS");
    assert_eq!(get(&proxy, "/echo/private/p", &auth).await.cache, "HIT");
    assert_eq!(
        get(
            &proxy,
            "/echo/private/p",
            &[("authorization", "Bearer bob")]
        )
        .await
        .cache,
        "MISS"
    );
    assert_eq!(get(&proxy, "/echo/private/p", &[]).await.cache, "MISS");

    // Request no-store bypasses; no-cache is served from the cache by default (a client cannot
    // make a shared entry be refetched or overwritten), and refetches where the route says so.
    get(&proxy, "/echo/items/r", &[]).await;
    assert_eq!(
        get(&proxy, "/echo/items/r", &[("cache-control", "no-store")])
            .await
            .cache,
        "BYPASS"
    );
    let ignored = get(&proxy, "/echo/items/r", &[("cache-control", "no-cache")]).await;
    assert_eq!(ignored.cache, "HIT");
    assert_eq!(
        get(&proxy, "/echo/items/r", &[("pragma", "no-cache")])
            .await
            .cache,
        "HIT"
    );
    assert_eq!(
        app.hits("/echo/items/r"),
        2,
        "only the no-store request went upstream"
    );

    let first = get(&proxy, "/echo/refreshable/r", &[]).await;
    let refreshed = get(
        &proxy,
        "/echo/refreshable/r",
        &[("cache-control", "no-cache")],
    )
    .await;
    assert_eq!(refreshed.cache_status, "outrider; fwd=request; stored");
    assert_ne!(refreshed.body, first.body);
    let after = get(&proxy, "/echo/refreshable/r", &[]).await;
    assert_eq!(after.cache, "HIT");
    assert_eq!(
        after.body, refreshed.body,
        "the refetched response replaced the entry"
    );
    // A refetch whose response cannot be stored leaves the entry alone.
    let unstorable = get(
        &proxy,
        "/echo/refreshable/r",
        &[("cache-control", "no-cache"), ("x-test-set-cookie", "1")],
    )
    .await;
    assert_eq!(unstorable.status, 200);
    assert_eq!(
        get(&proxy, "/echo/refreshable/r", &[]).await.body,
        refreshed.body
    );

    // Too large for cache.max_entry_size (64KiB): streamed through, not stored.
    let big = get(&proxy, "/big/70000", &[]).await;
    assert_eq!(big.status, 200);
    assert_eq!(big.cache_status, "outrider; fwd=miss");
    assert_eq!(get(&proxy, "/big/70000", &[]).await.cache, "MISS");
    assert_eq!(get(&proxy, "/big/1000", &[]).await.cache, "MISS");
    assert_eq!(get(&proxy, "/big/1000", &[]).await.cache, "HIT");
}

#[tokio::test]
async fn vary_on_configured_headers() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), "", "")).await;
    let en = [("accept-language", "en")];
    let de = [("accept-language", "de")];
    let path = "/headers?vary=accept-language";
    assert_eq!(get(&proxy, path, &en).await.cache, "MISS");
    assert_eq!(get(&proxy, path, &de).await.cache, "MISS");
    assert_eq!(get(&proxy, path, &en).await.cache, "HIT");
    assert_eq!(get(&proxy, path, &de).await.cache, "HIT");
    // Vary on a header the route does not key on cannot be stored safely.
    assert_eq!(
        get(&proxy, "/headers?vary=user-agent", &[])
            .await
            .cache_status,
        "outrider; fwd=miss"
    );
}

#[tokio::test]
async fn single_flight_one_upstream_request_for_100_concurrent_misses() {
    let app = Backend::start("app").await;
    let proxy = Arc::new(Proxy::start(&config(&app.url(), "", "")).await);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move {
            get(&proxy, "/slow/300?seq", &[]).await
        }));
    }
    let mut bodies = std::collections::HashSet::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, 200);
        bodies.insert(got.body);
    }
    assert_eq!(
        app.hits("/slow/300"),
        1,
        "one upstream fetch for the cold key"
    );
    assert_eq!(bodies.len(), 1);
    let m = support::metric_eventually(&proxy, "outrider_requests_total", &[], 100.0).await;
    assert!(
        metric_value(
            &m,
            "outrider_cache_singleflight_waits_total",
            &["result=\"served\""]
        )
        .unwrap()
            >= 1.0
    );
}

#[tokio::test]
async fn stale_while_revalidate_and_stale_if_error() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), "", "")).await;
    let first = get(&proxy, "/echo/short/1", &[]).await;
    assert_eq!(first.cache, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the 1 s TTL
    let stale = get(&proxy, "/echo/short/1", &[]).await;
    assert_eq!(stale.cache, "STALE");
    assert_eq!(
        stale.body, first.body,
        "served at once from the stale entry"
    );
    // One background refresh replaces the entry.
    wait_for(
        "the background refresh",
        Duration::from_secs(10),
        || async { (app.hits("/echo/short/1") == 2).then_some(()) },
    )
    .await;
    let fresh = wait_for("the refreshed entry", Duration::from_secs(10), || async {
        let got = get(&proxy, "/echo/short/1", &[]).await;
        (got.cache == "HIT").then_some(got)
    })
    .await;
    assert_ne!(fresh.body, first.body);
    assert_eq!(app.hits("/echo/short/1"), 2);

    // Stale-if-error: the route's swr window is 1h, so make an entry beyond it impossible here;
    // use a client no-cache refetch against a failing upstream instead of waiting.
    app.set_failing(true);
    let failing = get(&proxy, "/echo/short/2", &[]).await;
    assert_eq!(
        failing.status, 503,
        "nothing cached yet: the error passes through"
    );
    app.set_failing(false);
    let ok = get(&proxy, "/echo/short/3", &[]).await;
    assert_eq!(ok.cache, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.set_failing(true);
    // STALE via swr serves without touching the failing upstream; the refresh fails quietly.
    let served = get(&proxy, "/echo/short/3", &[]).await;
    assert_eq!((served.status, served.cache.as_str()), (200, "STALE"));
    assert_eq!(served.body, ok.body);
}

#[tokio::test]
async fn stale_if_error_on_5xx_and_refused_upstream() {
    let app = Backend::start("app").await;
    let cfg = config(&app.url(), "", "").replace(
        "cache: { ttl: 1s, stale_while_revalidate: 1h, stale_if_error: 1h }",
        "cache: { ttl: 1s, stale_if_error: 1h }",
    );
    let proxy = Proxy::start(&cfg).await;
    let ok = get(&proxy, "/echo/short/e", &[]).await;
    assert_eq!(ok.cache, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.set_failing(true);
    let served = get(&proxy, "/echo/short/e", &[]).await;
    assert_eq!(
        (served.status, served.cache.as_str()),
        (200, "STALE"),
        "{} {}",
        served.cache_status,
        served.body
    );
    assert!(
        served.cache_status.contains("fwd=stale; fwd-status=503"),
        "{}",
        served.cache_status
    );
    assert_eq!(served.body, ok.body);

    // The upstream disappears entirely (connection refused): still served stale.
    drop(app);
    let served = get(&proxy, "/echo/short/e", &[]).await;
    assert_eq!((served.status, served.cache.as_str()), (200, "STALE"));
    assert_eq!(served.body, ok.body);
    // After a failed connect Pingora ends the client's connection: the answer says so.
    let resp = client()
        .get(proxy.url("/echo/short/e"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()
            .get("connection")
            .map(|v| v.as_bytes().to_vec()),
        Some(b"close".to_vec())
    );
    // Without a stale entry the refusal is a JSON 502.
    let none = get(&proxy, "/echo/short/other", &[]).await;
    assert_eq!(none.status, 502);
}

#[tokio::test]
async fn purge_by_route_prefix_and_key() {
    let app = Backend::start("app").await;
    let redis = Redis::start();
    let proxy = Proxy::start(&config(&app.url(), &redis.url(), "")).await;
    let c = client();
    for p in ["/echo/items/a", "/echo/items/b", "/headers?x=1"] {
        assert_eq!(get(&proxy, p, &[]).await.cache, "MISS");
        assert_eq!(get(&proxy, p, &[]).await.cache, "HIT");
    }
    wait_redis_key(&redis, ":headers:").await;
    wait_redis_key(&redis, "/echo/items/b").await;

    let purge = |body: serde_json::Value| c.post(proxy.admin("/cache/purge")).json(&body).send();
    let resp = purge(serde_json::json!({ "path_prefix": "/echo/items/a" }))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let report: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(report["purged"]["l1"], 1);
    assert_eq!(report["purged"]["l2"], 1);
    assert_eq!(get(&proxy, "/echo/items/a", &[]).await.cache, "MISS");
    assert_eq!(get(&proxy, "/echo/items/b", &[]).await.cache, "HIT");

    let resp = purge(serde_json::json!({ "route": "headers" }))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!redis_keys(&redis)
        .await
        .iter()
        .any(|k| k.contains(":headers:")));
    assert_eq!(get(&proxy, "/headers?x=1", &[]).await.cache, "MISS");

    let key = wait_redis_key(&redis, "/echo/items/b").await;
    let hex = key.rsplit(':').next().unwrap().to_string();
    let resp = purge(serde_json::json!({ "key": hex })).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(get(&proxy, "/echo/items/b", &[]).await.cache, "MISS");

    for bad in [
        serde_json::json!({}),
        serde_json::json!({ "key": "xyz" }),
        serde_json::json!({ "rout": "x" }),
    ] {
        let resp = purge(bad.clone()).await.unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
        assert_eq!(
            resp.json::<serde_json::Value>().await.unwrap()["error"],
            "invalid_purge"
        );
    }
}

/// The shared-L2 tests' config: a Redis timeout generous enough that a loaded CI machine cannot
/// turn an L2 hit into a miss (the timeout's own behaviour is tested elsewhere).
fn shared_config(app: &str, redis: &str) -> String {
    config(app, redis, "").replace("timeout: 50ms", "timeout: 2s")
}

#[tokio::test]
async fn second_replica_gets_the_first_ones_entry_from_redis() {
    let app = Backend::start("app").await;
    let redis = Redis::start();
    let one = Proxy::start(&shared_config(&app.url(), &redis.url())).await;
    let two = Proxy::start(&shared_config(&app.url(), &redis.url())).await;
    // Replicas behind one Service are reached under the same Host.
    let svc = [("host", "api.internal")];
    let first = get(&one, "/echo/items/shared", &svc).await;
    assert_eq!(first.cache, "MISS");
    let key = wait_redis_key(&redis, "/echo/items/shared").await;
    let pttl: i64 = redis.cli(&["PTTL", &key]).trim().parse().unwrap();
    assert!(pttl > 0, "Redis entries carry a TTL: {pttl}");

    let from_l2 = get(&two, "/echo/items/shared", &svc).await;
    assert_eq!(from_l2.cache, "HIT");
    assert_eq!(from_l2.body, first.body);
    let again = get(&two, "/echo/items/shared", &svc).await;
    assert_eq!(again.cache, "HIT");
    assert_eq!(app.hits("/echo/items/shared"), 1);
    let m = support::metric_eventually(&two, "outrider_requests_total", &[], 2.0).await;
    assert_eq!(
        metric_value(
            &m,
            "outrider_cache_requests_total",
            &["route=\"items\"", "tier=\"l2\"", "outcome=\"hit\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "outrider_cache_requests_total",
            &["route=\"items\"", "tier=\"l1\"", "outcome=\"hit\""]
        ),
        Some(1.0),
        "the L2 hit filled L1"
    );

    // A corrupt value is a miss, and the next store overwrites it.
    redis.cli(&["SET", &key, "garbage-not-an-entry"]);
    let three = Proxy::start(&shared_config(&app.url(), &redis.url())).await;
    assert_eq!(get(&three, "/echo/items/shared", &svc).await.cache, "MISS");
    wait_for(
        "the corrupt value to be overwritten",
        Duration::from_secs(10),
        || async { (redis.cli(&["GET", &key]).trim() != "garbage-not-an-entry").then_some(()) },
    )
    .await;
    let four = Proxy::start(&shared_config(&app.url(), &redis.url())).await;
    assert_eq!(get(&four, "/echo/items/shared", &svc).await.cache, "HIT");
}

#[tokio::test]
async fn redis_down_then_back_never_fails_a_request() {
    let app = Backend::start("app").await;
    let mut redis = Redis::start();
    let port = redis.port;
    let proxy = Proxy::start(&config(&app.url(), &redis.url(), "")).await;
    assert_eq!(get(&proxy, "/echo/items/1", &[]).await.cache, "MISS");
    wait_redis_key(&redis, "/echo/items/1").await;

    redis.stop();
    for i in 0..40 {
        let got = get(&proxy, &format!("/echo/items/down{}", i % 5), &[]).await;
        assert_eq!(got.status, 200, "request {i} while Redis is down");
    }
    assert_eq!(
        get(&proxy, "/echo/items/1", &[]).await.cache,
        "HIT",
        "L1 keeps serving"
    );
    let ready: serde_json::Value = client()
        .get(proxy.admin("/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["redis"]["status"], "degraded", "{ready}");
    let m = proxy.metrics().await;
    assert!(
        metric_value(&m, "outrider_cache_redis_errors_total", &[]).unwrap_or(0.0) >= 1.0,
        "{m}"
    );

    let redis = Redis::start_on(port);
    // Writes resume once the breaker lets a probe through and the connection comes back.
    wait_for(
        "Redis writes to resume",
        Duration::from_secs(60),
        || async {
            let _ = get(
                &proxy,
                &format!("/echo/items/back{}", fastrand::u32(..)),
                &[],
            )
            .await;
            redis_keys(&redis)
                .await
                .iter()
                .any(|k| k.contains("/echo/items/back"))
                .then_some(())
        },
    )
    .await;
    let ready: serde_json::Value = client()
        .get(proxy.admin("/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["redis"]["status"], "up", "{ready}");
}

#[tokio::test]
async fn black_hole_redis_does_not_stall_requests() {
    // Accepts connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hole.local_addr().unwrap().port();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for s in hole.incoming().flatten() {
            keep.lock().unwrap().push(s);
        }
    });
    let app = Backend::start("app").await;
    let proxy = Proxy::start_with_unusable_redis(&config(
        &app.url(),
        &format!("redis://127.0.0.1:{port}"),
        "",
    ))
    .await;
    let started = Instant::now();
    for i in 0..20 {
        let got = get(&proxy, &format!("/echo/items/h{i}"), &[]).await;
        assert_eq!(got.status, 200);
    }
    // 20 requests with a 50 ms Redis timeout and a breaker: far below 20 x 1 s (generous bound).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(get(&proxy, "/echo/items/h0", &[]).await.cache, "HIT");
}

#[tokio::test]
async fn ttl_change_by_reload_applies_to_the_next_request() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), "", "")).await;
    assert_eq!(get(&proxy, "/echo/items/t", &[]).await.cache, "MISS");
    assert_eq!(get(&proxy, "/echo/items/t", &[]).await.cache, "HIT");
    proxy.write_config(
        &config(&app.url(), "", "").replace("cache: { ttl: 5m }", "cache: { ttl: 1s }"),
    );
    let resp = client().post(proxy.admin("/reload")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let got = get(&proxy, "/echo/items/t", &[]).await;
    assert_eq!(
        got.cache, "EXPIRED",
        "the stored entry is judged by the new 1 s TTL"
    );
    assert_eq!(app.hits("/echo/items/t"), 2);
}

#[tokio::test]
async fn expired_entries_with_validators_are_revalidated_with_a_conditional_request() {
    let app = Backend::start("app").await;
    let cfg = config(&app.url(), "", "")
        .replace(
            "cache: { ttl: 1s, stale_while_revalidate: 1h, stale_if_error: 1h }",
            "cache: { ttl: 1s, stale_if_error: 1h }",
        )
        .replace("path_prefix: /echo/short", "path_prefix: /etag");
    let proxy = Proxy::start(&cfg).await;
    let first = get(&proxy, "/etag/v1", &[]).await;
    assert_eq!((first.status, first.cache.as_str()), (200, "MISS"));
    assert_eq!(first.body, "etag body 1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let revalidated = get(&proxy, "/etag/v1", &[]).await;
    assert_eq!(
        (revalidated.status, revalidated.cache.as_str()),
        (200, "REVALIDATED"),
        "{}",
        revalidated.cache_status
    );
    assert_eq!(
        revalidated.body, "etag body 1",
        "the stored body, renewed by the 304"
    );
    assert_eq!(app.hits("/etag/v1"), 2);
    let hit = get(&proxy, "/etag/v1", &[]).await;
    assert_eq!(hit.cache, "HIT", "the renewed entry is fresh again");
    assert_eq!(hit.age, Some(0));

    // A client's own conditional request is passed through untouched.
    let resp = client()
        .get(proxy.url("/etag/v2"))
        .header("if-none-match", "\"v2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 304);
}

#[tokio::test]
async fn what_the_app_sees_is_in_the_key() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), "", "")).await;
    let path = "/echo/items/k";
    assert_eq!(get(&proxy, path, &[("host", "a.test")]).await.cache, "MISS");
    assert_eq!(get(&proxy, path, &[("host", "a.test")]).await.cache, "HIT");
    // Another Host (the app may build absolute links from it) is another entry.
    let other = get(&proxy, path, &[("host", "evil.test")]).await;
    assert_eq!(other.cache, "MISS");
    assert!(other.body.contains("evil.test"));
    let proto = [("host", "a.test"), ("x-forwarded-proto", "http")];
    assert_eq!(get(&proxy, path, &proto).await.cache, "MISS");
    assert_eq!(get(&proxy, path, &proto).await.cache, "HIT");
    let a = get(&proxy, path, &[("host", "a.test")]).await;
    assert_eq!(a.cache, "HIT");
    assert!(
        !a.body.contains("evil.test"),
        "never served another Host's response"
    );

    // A GET with a body is not keyed by it, so it bypasses the cache.
    let resp = client()
        .get(proxy.url(path))
        .header("host", "a.test")
        .body("filter=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-cache-status"], "BYPASS");

    // Responses without a body (204, or content-length 0) are stored too.
    assert_eq!(get(&proxy, "/status/204", &[]).await.cache, "MISS");
    let hit = get(&proxy, "/status/204", &[]).await;
    assert_eq!((hit.status, hit.cache.as_str()), (204, "HIT"));
    assert_eq!(app.hits("/status/204"), 1);
}

#[tokio::test]
async fn uncacheable_keys_skip_single_flight() {
    // Once a key's response proved unstorable, a burst for it goes straight upstream instead
    // of queueing behind one request whose answer nobody can reuse ("hit-for-pass").
    let app = Backend::start("app").await;
    let proxy = Arc::new(Proxy::start(&config(&app.url(), "", "")).await);
    let path = "/slow/200?nostore";
    assert_eq!(
        get(&proxy, path, &[]).await.cache_status,
        "outrider; fwd=miss"
    );
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move { get(&proxy, path, &[]).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(app.hits("/slow/200"), 21);
    let m = support::metric_eventually(&proxy, "outrider_requests_total", &[], 21.0).await;
    assert_eq!(
        metric_value(&m, "outrider_cache_singleflight_waits_total", &[]).unwrap_or(0.0),
        0.0,
        "nobody waited on a leader"
    );
}

#[tokio::test]
async fn must_revalidate_responses_are_never_served_stale() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), "", "")).await;
    // The "short" route allows 1 h of stale-while-revalidate and stale-if-error.
    let path = "/echo/short/with-headers?cache-control=must-revalidate".to_string();
    assert_eq!(get(&proxy, &path, &[]).await.cache, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.set_failing(true);
    let after = get(&proxy, &path, &[]).await;
    assert_eq!(
        after.status, 503,
        "the origin forbade stale: the error is passed on"
    );
    assert_eq!(after.cache, "EXPIRED");
}

/// A first client that does not read its (large, cacheable) answer delays no one else: the fill
/// reads the upstream at the upstream's speed, those waiting on the key are answered from the
/// entry once it is complete, and the slow client still gets every byte at its own pace.
#[tokio::test]
async fn a_slow_reading_leader_delays_only_itself() {
    use std::io::{Read, Write};
    let app = Backend::start("app").await;
    let cfg = format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{}", timeout: 120s }}
cache:
  max_entry_size: 64MiB
  max_inflight_bytes: 256MiB
  lock_timeout: 120s
routes:
  - name: big
    match: {{ path_prefix: /big }}
    upstream: app
    cache: {{ ttl: 5m }}
"#,
        app.url()
    );
    let proxy = Proxy::start(&cfg).await;
    // Far more than the socket buffers between outrider and a client that does not read.
    let path = "/big/24000000";
    let port = proxy.port;
    let mut leader = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // The same Host as the followers' client sends: the same key.
        let get = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        s.write_all(get.as_bytes()).unwrap();
        let mut first = [0u8; 64];
        s.read_exact(&mut first).unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"));
        s
    })
    .await
    .unwrap();
    // The leader still reads nothing. With a lock timeout longer than these requests may take,
    // only the fill itself can answer them.
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let followers: Vec<_> = (0..3)
        .map(|_| {
            let (c, url) = (c.clone(), proxy.url(path));
            tokio::spawn(async move {
                let r = c.get(url).send().await.unwrap();
                let status = r.headers()["x-cache-status"].to_str().unwrap().to_string();
                (status, r.bytes().await.unwrap())
            })
        })
        .collect();
    let expected: Vec<u8> = (0..24_000_000usize).map(|i| (i % 251) as u8).collect();
    for f in followers {
        let (status, body) = f.await.unwrap();
        assert_eq!(status, "HIT");
        assert!(body == expected, "a follower got the whole body");
    }
    assert_eq!(app.hits(path), 1, "one upstream request for everyone");
    // The slow client gets every byte when it finally reads.
    let read = tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        while all.len() < 24_000_000 + 64 {
            match leader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
            if let Some(at) = all.windows(4).position(|w| w == b"\r\n\r\n") {
                if all.len() >= at + 4 + 24_000_000 - 64 {
                    break;
                }
            }
        }
        all
    })
    .await
    .unwrap();
    let head_end = read.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    // The first 64 bytes were read before: the rest of the head and the body follow.
    assert_eq!(read.len() + 64, head_end + 64 + 24_000_000);
    assert!(
        read[head_end..] == expected[..],
        "the slow client's body is intact"
    );
}

/// Requests waiting on a key whose fetch is slow (a slow upstream) give up after
/// `cache.lock_timeout` and fetch for themselves without storing, instead of waiting as long as
/// the upstream takes; later requests no longer queue behind that fetch.
#[tokio::test]
async fn followers_wait_for_a_slow_fetch_only_for_the_lock_timeout() {
    let app = Backend::start("app").await;
    let cfg = format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{}", timeout: 120s }}
cache:
  lock_timeout: 300ms
routes:
  - name: slow
    match: {{ path_prefix: /slow }}
    upstream: app
    cache: {{ ttl: 5m }}
"#,
        app.url()
    );
    let proxy = Proxy::start(&cfg).await;
    let path = "/slow/3000";
    let c = client();
    let leader = {
        let (c, url) = (c.clone(), proxy.url(path));
        tokio::spawn(async move {
            let r = c.get(url).send().await.unwrap();
            r.headers()["x-cache-status"].to_str().unwrap().to_string()
        })
    };
    wait_for(
        "the leader's upstream request",
        Duration::from_secs(10),
        || async { (app.hits(path) == 1).then_some(()) },
    )
    .await;
    let followers: Vec<_> = (0..3)
        .map(|_| {
            let (c, url) = (c.clone(), proxy.url(path));
            tokio::spawn(async move {
                let r = c.get(url).send().await.unwrap();
                r.headers()["x-cache-status"].to_str().unwrap().to_string()
            })
        })
        .collect();
    for f in followers {
        assert_eq!(f.await.unwrap(), "MISS", "fetched for itself");
    }
    let timeouts = |want: f64| {
        metric_eventually(
            &proxy,
            "outrider_cache_singleflight_waits_total",
            &["result=\"timeout\""],
            want,
        )
    };
    timeouts(3.0).await;
    assert_eq!(leader.await.unwrap(), "MISS");
    assert_eq!(
        app.hits(path),
        4,
        "the leader and three followers that gave up"
    );
    wait_for("the leader's entry", Duration::from_secs(20), || async {
        let r = client().get(proxy.url(path)).send().await.ok()?;
        (r.headers()["x-cache-status"] == "HIT").then_some(())
    })
    .await;
}
