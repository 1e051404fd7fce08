//! GraphQL automatic persisted queries, GET for hashed queries, response caching and the
//! safelist, end to end: the built binary, a real redis-server and a GraphQL test backend.

#![allow(clippy::disallowed_types)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::{client, metric_eventually, wait_for, Backend, Proxy, Redis};

const QUERY: &str = "query Items($first: Int) { items(first: $first) { id } }";

fn sha(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn config(app: &str, redis: &str, manifest: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}", timeout: 5s }}
cache:
  redis: {{ url: "{redis}", timeout: 200ms }}
routes:
  - name: graphql
    match: {{ path: /graphql, methods: [GET, POST] }}
    upstream: app
    max_body: 4MiB
    graphql: {{ apq: {{ ttl: 24h }}, max_body: 1MiB }}
  - name: cached
    match: {{ path: /cached/graphql, methods: [GET, POST] }}
    upstream: app
    graphql:
      response_cache: {{ ttl: 60s, scope: per_credential }}
  - name: shared
    match: {{ path: /shared/graphql, methods: [GET, POST] }}
    upstream: app
    graphql:
      response_cache: {{ ttl: 60s, scope: shared }}
  - name: swr
    match: {{ path: /swr/graphql, methods: [GET, POST] }}
    upstream: app
    graphql:
      response_cache: {{ ttl: 1s, stale_while_revalidate: 1h, scope: shared }}
  - name: safe
    match: {{ path: /safe/graphql, methods: [GET, POST] }}
    upstream: app
    graphql:
      persisted_queries: {{ manifest: "{manifest}", safelist: true }}
  - name: logonly
    match: {{ path: /logonly/graphql, methods: [GET, POST] }}
    upstream: app
    graphql:
      persisted_queries: {{ manifest: "{manifest}", safelist: true, log_only: true }}
  - name: listed
    match: {{ path: /listed/graphql, methods: [GET, POST] }}
    upstream: app
    graphql:
      persisted_queries: {{ manifest: "{manifest}" }}
"#
    )
}

const LISTED: &str = "query Listed { listed }";

fn write_manifest(dir: &std::path::Path) -> String {
    let path = dir.join("manifest.json");
    let manifest = json!({
        "format": "apollo-persisted-query-manifest",
        "version": 1,
        "operations": [{"id": sha(LISTED), "name": "Listed", "type": "query", "body": LISTED}],
    });
    std::fs::write(&path, manifest.to_string()).unwrap();
    path.to_string_lossy().into_owned()
}

struct Env {
    app: Backend,
    redis: Redis,
    proxy: Proxy,
    _manifest_dir: tempfile::TempDir,
    manifest: String,
}

async fn env() -> Env {
    let app = Backend::start("app").await;
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path());
    let proxy = Proxy::start(&config(&app.url(), &redis.url(), &manifest)).await;
    Env {
        app,
        redis,
        proxy,
        _manifest_dir: dir,
        manifest,
    }
}

struct Got {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn code(&self) -> Option<&str> {
        self.body["errors"][0]["extensions"]["code"].as_str()
    }

    /// What the backend received, as it echoed it.
    fn received(&self) -> &Value {
        &self.body["data"]["received"]
    }
}

async fn got(resp: reqwest::Response) -> Got {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Got {
        status,
        headers,
        body,
    }
}

async fn post(proxy: &Proxy, path: &str, body: &Value, headers: &[(&str, &str)]) -> Got {
    post_raw(proxy, path, body.to_string(), headers).await
}

async fn post_raw(proxy: &Proxy, path: &str, body: String, headers: &[(&str, &str)]) -> Got {
    let mut req = client()
        .post(proxy.url(path))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    got(req.send().await.unwrap()).await
}

async fn get(
    proxy: &Proxy,
    path: &str,
    params: &[(&str, String)],
    headers: &[(&str, &str)],
) -> Got {
    let mut req = client().get(proxy.url(path)).query(params);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    got(req.send().await.unwrap()).await
}

/// Status of a (tiny) multipart upload: a POST whose body is not JSON.
async fn upload(proxy: &Proxy, path: &str) -> u16 {
    let resp = client()
        .post(proxy.url(path))
        .header("content-type", "multipart/form-data; boundary=x")
        .body("--x--")
        .send()
        .await
        .unwrap();
    resp.status().as_u16()
}

fn ext(hash: &str) -> Value {
    json!({"persistedQuery": {"version": 1, "sha256Hash": hash}})
}

fn hash_only(query: &str, variables: Value) -> Value {
    json!({"variables": variables, "extensions": ext(&sha(query))})
}

fn hash_and_query(query: &str, variables: Value) -> Value {
    json!({"query": query, "variables": variables, "extensions": ext(&sha(query))})
}

fn get_params(query: &str, variables: &Value) -> Vec<(&'static str, String)> {
    vec![
        ("variables", variables.to_string()),
        ("extensions", ext(&sha(query)).to_string()),
    ]
}

#[tokio::test]
async fn apq_round_trip_not_found_then_register_then_hash_only() {
    let env = env().await;
    let p = &env.proxy;
    let vars = json!({"first": 2});

    let miss = post(p, "/graphql", &hash_only(QUERY, vars.clone()), &[]).await;
    assert_eq!(miss.status, 200, "Apollo answers NOT_FOUND with 200");
    assert_eq!(miss.code(), Some("PERSISTED_QUERY_NOT_FOUND"));
    assert_eq!(miss.body["errors"][0]["message"], "PersistedQueryNotFound");
    assert_eq!(
        miss.header("cache-control"),
        Some("private, no-cache, must-revalidate")
    );
    assert_eq!(env.app.hits("/graphql"), 0, "the app never saw it");

    let registered = post(p, "/graphql", &hash_and_query(QUERY, vars.clone()), &[]).await;
    assert_eq!(registered.status, 200);
    let sent = registered.received();
    assert_eq!(sent["query"], QUERY);
    assert_eq!(sent["variables"], vars);
    assert!(
        sent.get("extensions").is_none(),
        "upstream never sees APQ: {sent}"
    );

    let hit = post(p, "/graphql", &hash_only(QUERY, vars.clone()), &[]).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.received()["query"], QUERY);
    assert_eq!(hit.received()["variables"], vars);
    assert_eq!(hit.body["data"]["method"], "POST");
    // The rewritten body (the query put back) goes as one compact JSON document with its own
    // length: not the client's (a shorter one would cut it and `received` would be null).
    let upstream_length = hit.body["data"]["body_length"].as_u64().unwrap() as usize;
    assert_eq!(
        upstream_length,
        serde_json::to_vec(hit.received()).unwrap().len()
    );
    assert_ne!(
        upstream_length,
        serde_json::to_vec(&hash_only(QUERY, vars.clone()))
            .unwrap()
            .len()
    );
    assert_eq!(
        hit.body["data"]["headers"]["content-length"],
        upstream_length.to_string()
    );
    assert_eq!(env.app.hits("/graphql"), 2);

    let text = metric_eventually(
        p,
        "outrider_graphql_apq_total",
        &["route=\"graphql\"", "outcome=\"hit\""],
        1.0,
    )
    .await;
    for outcome in ["miss", "registered"] {
        assert_eq!(
            support::metric_value(
                &text,
                "outrider_graphql_apq_total",
                &["route=\"graphql\"", &format!("outcome=\"{outcome}\"")]
            ),
            Some(1.0),
            "{outcome}"
        );
    }
}

#[tokio::test]
async fn hash_mismatch_is_refused_and_nothing_registered() {
    let env = env().await;
    let p = &env.proxy;
    let body = json!({"query": QUERY, "extensions": ext(&sha("{ other }"))});
    let refused = post(p, "/graphql", &body, &[]).await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.code(), Some("PERSISTED_QUERY_HASH_MISMATCH"));
    assert_eq!(
        refused.body["errors"][0]["message"],
        "provided sha does not match query"
    );
    // Neither hash got the text.
    for hash in [sha("{ other }"), sha(QUERY)] {
        let body = json!({"extensions": ext(&hash)});
        let after = post(p, "/graphql", &body, &[]).await;
        assert_eq!(after.code(), Some("PERSISTED_QUERY_NOT_FOUND"));
    }
    assert_eq!(env.app.total_hits(), 0);
}

#[tokio::test]
async fn registrations_are_shared_by_replicas_and_survive_a_restart() {
    let app = Backend::start("app").await;
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path());
    let cfg = config(&app.url(), &redis.url(), &manifest);
    let one = Proxy::start(&cfg).await;
    let two = Proxy::start(&cfg).await;

    let registered = post(&one, "/graphql", &hash_and_query(QUERY, json!({})), &[]).await;
    assert_eq!(registered.status, 200);
    // The Redis write happens just after the answer.
    let hash = sha(QUERY);
    wait_for(
        "the registration in Redis",
        Duration::from_secs(10),
        || async {
            redis
                .cli(&["--scan", "--pattern", "outrider:*"])
                .lines()
                .any(|k| k.contains(&hash))
                .then_some(())
        },
    )
    .await;

    let on_two = post(&two, "/graphql", &hash_only(QUERY, json!({})), &[]).await;
    assert_eq!(on_two.received()["query"], QUERY, "{:?}", on_two.body);

    // A restarted outrider (empty L1) finds it in Redis too.
    drop(one);
    drop(two);
    let three = Proxy::start(&cfg).await;
    let after_restart = post(&three, "/graphql", &hash_only(QUERY, json!({})), &[]).await;
    assert_eq!(after_restart.received()["query"], QUERY);
    assert_eq!(app.hits("/graphql"), 3);
}

#[tokio::test]
async fn hashed_get_goes_upstream_as_a_post() {
    let env = env().await;
    let p = &env.proxy;
    let vars = json!({"first": 5});
    let before = get(p, "/graphql", &get_params(QUERY, &vars), &[]).await;
    assert_eq!(before.code(), Some("PERSISTED_QUERY_NOT_FOUND"));
    post(p, "/graphql", &hash_and_query(QUERY, vars.clone()), &[]).await;

    let mut params = get_params(QUERY, &vars);
    params.push(("operationName", "Items".into()));
    let hit = get(p, "/graphql", &params, &[]).await;
    assert_eq!(hit.status, 200);
    let data = &hit.body["data"];
    assert_eq!(data["method"], "POST");
    assert_eq!(data["uri"], "/graphql", "the query string is not forwarded");
    assert_eq!(data["headers"]["content-type"], "application/json");
    assert_eq!(hit.received()["query"], QUERY);
    assert_eq!(hit.received()["variables"], vars);
    assert_eq!(hit.received()["operationName"], "Items");

    // A plain query over GET works the same way.
    let plain = get(p, "/graphql", &[("query", "{ a }".to_string())], &[]).await;
    assert_eq!(plain.body["data"]["method"], "POST");
    assert_eq!(plain.received()["query"], "{ a }");
    // A GET without GraphQL parameters (an IDE page) passes through as it is.
    let page = client().get(p.url("/graphql")).send().await.unwrap();
    let page: Value = page.json().await.unwrap();
    assert_eq!(page["data"]["method"], "GET");
}

#[tokio::test]
async fn mutations_over_get_are_refused() {
    let env = env().await;
    let p = &env.proxy;
    let mutation = "mutation Add { add(x: 1) }";
    let plain = get(p, "/graphql", &[("query", mutation.to_string())], &[]).await;
    assert_eq!(plain.status, 405);
    assert_eq!(plain.code(), Some("MUTATION_FORBIDDEN"));
    assert_eq!(plain.header("allow"), Some("POST"));

    // Registered over POST (where mutations belong), then tried by hash over GET.
    let posted = post(p, "/graphql", &hash_and_query(mutation, json!({})), &[]).await;
    assert_eq!(posted.status, 200);
    let hashed = get(p, "/graphql", &get_params(mutation, &json!({})), &[]).await;
    assert_eq!(hashed.status, 405);
    assert_eq!(env.app.hits("/graphql"), 1, "only the POST reached the app");
}

#[tokio::test]
async fn bad_input_gets_graphql_errors_with_stable_codes() {
    let env = env().await;
    let p = &env.proxy;
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "INVALID_GRAPHQL_REQUEST"),
        ("42".into(), "INVALID_GRAPHQL_REQUEST"),
        (r#"{"query": 7}"#.into(), "INVALID_GRAPHQL_REQUEST"),
        (
            r#"{"query": "{a}", "variables": [1]}"#.into(),
            "INVALID_GRAPHQL_REQUEST",
        ),
        (r#"{"variables": {}}"#.into(), "INVALID_GRAPHQL_REQUEST"),
        (
            json!({"extensions": {"persistedQuery": {"version": 2, "sha256Hash": sha(QUERY)}}})
                .to_string(),
            "PERSISTED_QUERY_VERSION_NOT_SUPPORTED",
        ),
        (
            json!({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "zz"}}})
                .to_string(),
            "INVALID_PERSISTED_QUERY",
        ),
        (
            json!({"extensions": {"persistedQuery": "v1"}}).to_string(),
            "INVALID_PERSISTED_QUERY",
        ),
        (
            json!({"extensions": "x", "query": "{a}"}).to_string(),
            "INVALID_GRAPHQL_REQUEST",
        ),
    ];
    for (body, code) in cases {
        let refused = post_raw(p, "/graphql", body.clone(), &[]).await;
        assert_eq!(refused.status, 400, "{body}");
        assert_eq!(refused.code(), Some(code), "{body}: {:?}", refused.body);
        assert_eq!(
            refused.header("content-type"),
            Some("application/json"),
            "{body}"
        );
    }
    // Over graphql.max_body (1 MiB) but within the route's: a GraphQL error, not a 413.
    let huge = json!({"query": format!("{{ a }} #{}", "x".repeat(1_100_000))}).to_string();
    let too_big = post_raw(p, "/graphql", huge, &[]).await;
    assert_eq!(too_big.status, 400);
    assert_eq!(too_big.code(), Some("GRAPHQL_REQUEST_TOO_LARGE"));
    // Over the route's max_body (4 MiB) the proxy refuses before reading, in GraphQL's shape.
    let huger = json!({"query": format!("{{ a }} #{}", "x".repeat(5 << 20))}).to_string();
    let too_big = post_raw(p, "/graphql", huger, &[]).await;
    assert_eq!(too_big.status, 400);
    assert_eq!(too_big.code(), Some("GRAPHQL_REQUEST_TOO_LARGE"));
    // An upload GraphQL would not have read keeps the proxy's own 413.
    let upload = client()
        .post(p.url("/graphql"))
        .header("content-type", "multipart/form-data; boundary=x")
        .body(vec![b'x'; 5 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 413);
    // Malformed GET parameters.
    let bad_get = get(
        p,
        "/graphql",
        &[("query", "{a}".into()), ("variables", "{nope".into())],
        &[],
    )
    .await;
    assert_eq!(bad_get.status, 400);
    assert_eq!(bad_get.code(), Some("INVALID_GRAPHQL_REQUEST"));
    assert_eq!(
        env.app.total_hits(),
        0,
        "nothing half-understood went upstream"
    );
}

#[tokio::test]
async fn a_registered_query_larger_than_the_replay_buffer_is_forwarded_whole() {
    let env = env().await;
    let p = &env.proxy;
    // Just over Pingora's 64 KiB retry buffer, as a client body and as the rebuilt one.
    let query = format!("{{ a }} #{}", "y".repeat(70 * 1024));
    let registered = post(p, "/graphql", &hash_and_query(&query, json!({})), &[]).await;
    assert_eq!(registered.received()["query"], query.as_str());
    let hit = post(p, "/graphql", &hash_only(&query, json!({})), &[]).await;
    assert_eq!(hit.received()["query"], query.as_str());
    assert_eq!(env.app.hits("/graphql"), 2);
}

#[tokio::test]
async fn batches_and_other_encodings_pass_through_untouched() {
    let env = env().await;
    let batch = json!([{"query": "{ a }"}, {"extensions": ext(&sha(QUERY))}]);
    let answer = post(&env.proxy, "/graphql", &batch, &[]).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.received(), &batch, "the app got the array as sent");
    // A multipart upload is not JSON: not refused, not rewritten.
    assert_eq!(upload(&env.proxy, "/graphql").await, 200);
    assert_eq!(env.app.hits("/graphql"), 2);
}

#[tokio::test]
async fn query_results_are_cached_and_errors_are_not() {
    let env = env().await;
    let p = &env.proxy;
    let body = hash_and_query(QUERY, json!({"first": 1}));
    let first = post(p, "/cached/graphql", &body, &[]).await;
    assert_eq!(first.header("x-cache-status"), Some("MISS"));
    assert_eq!(
        first.header("cache-status"),
        Some("outrider; fwd=miss; stored")
    );
    let second = post(
        p,
        "/cached/graphql",
        &hash_only(QUERY, json!({"first": 1})),
        &[],
    )
    .await;
    assert_eq!(second.header("x-cache-status"), Some("HIT"));
    assert!(second
        .header("cache-status")
        .unwrap()
        .starts_with("outrider; hit; ttl="));
    assert!(second.header("age").is_some());
    assert!(second
        .header("server-timing")
        .unwrap()
        .contains("cache;desc=hit"));
    assert_eq!(second.body, first.body, "the stored result");
    assert_eq!(env.app.hits("/cached/graphql"), 1);
    // Other variables, other entry (keys are canonical: key order does not matter).
    let other = post(
        p,
        "/cached/graphql",
        &hash_only(QUERY, json!({"first": 2})),
        &[],
    )
    .await;
    assert_eq!(other.header("x-cache-status"), Some("MISS"));

    // Errors, no-store and mutations are never stored.
    for _ in 0..2 {
        let boom = post(p, "/cached/graphql", &json!({"query": "{ boom }"}), &[]).await;
        assert_eq!(boom.header("x-cache-status"), Some("MISS"));
        let no_store = post(
            p,
            "/cached/graphql",
            &json!({"query": "{ nostore }"}),
            &[("x-test-cache-control", "no-store")],
        )
        .await;
        assert_eq!(no_store.header("x-cache-status"), Some("MISS"));
        let mutation = post(
            p,
            "/cached/graphql",
            &json!({"query": "mutation { m }"}),
            &[],
        )
        .await;
        assert_eq!(mutation.header("x-cache-status"), Some("BYPASS"));
        assert_eq!(
            mutation.header("cache-status"),
            Some("outrider; fwd=bypass")
        );
    }
    assert_eq!(env.app.hits("/cached/graphql"), 2 + 6);

    // The app's smaller max-age wins over the route's 60s.
    let short = json!({"query": "{ short }"});
    post(
        p,
        "/cached/graphql",
        &short,
        &[("x-test-cache-control", "max-age=20")],
    )
    .await;
    let hit = post(p, "/cached/graphql", &short, &[]).await;
    assert_eq!(hit.header("x-cache-status"), Some("HIT"));
    metric_eventually(
        p,
        "outrider_graphql_response_cache_total",
        &["route=\"cached\"", "outcome=\"hit\""],
        2.0,
    )
    .await;
    let ttl: i64 = hit
        .header("cache-status")
        .unwrap()
        .rsplit('=')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ttl <= 20, "ttl {ttl}");
}

#[tokio::test]
async fn per_credential_results_stay_with_their_credential() {
    let env = env().await;
    let p = &env.proxy;
    let body = json!({"query": "{ me }"});
    let alice = [("authorization", "Bearer alice")];
    let bob = [("authorization", "Bearer bob")];
    assert_eq!(
        post(p, "/cached/graphql", &body, &alice)
            .await
            .header("x-cache-status"),
        Some("MISS")
    );
    let again = post(p, "/cached/graphql", &body, &alice).await;
    assert_eq!(again.header("x-cache-status"), Some("HIT"));
    let other = post(p, "/cached/graphql", &body, &bob).await;
    assert_eq!(other.header("x-cache-status"), Some("MISS"));
    assert_eq!(other.body["data"]["headers"]["authorization"], "Bearer bob");
    let anonymous = post(p, "/cached/graphql", &body, &[]).await;
    assert_eq!(anonymous.header("x-cache-status"), Some("MISS"));

    // With `scope: shared` everyone shares one entry.
    post(p, "/shared/graphql", &body, &alice).await;
    let shared = post(p, "/shared/graphql", &body, &bob).await;
    assert_eq!(shared.header("x-cache-status"), Some("HIT"));
}

#[tokio::test]
async fn hashed_gets_tell_a_cdn_what_it_may_keep() {
    let env = env().await;
    let p = &env.proxy;
    let vars = json!({"first": 3});
    post(p, "/graphql", &hash_and_query(QUERY, vars.clone()), &[]).await;
    // The first GET is a miss: not yet known to be error-free, so no CDN may keep it.
    let miss = get(p, "/shared/graphql", &get_params(QUERY, &vars), &[]).await;
    assert_eq!(miss.header("x-cache-status"), Some("MISS"));
    assert_eq!(miss.header("cache-control"), Some("no-cache"));
    // Once the entry has aged, the hit still says its whole lifetime: `Age` goes with it, so a
    // CDN keeps it for what is left (counting the age once, not twice).
    let aged = async {
        loop {
            let hit = get(p, "/shared/graphql", &get_params(QUERY, &vars), &[]).await;
            assert_eq!(hit.header("x-cache-status"), Some("HIT"));
            let age: u64 = hit.header("age").unwrap().parse().unwrap();
            if age >= 1 {
                return hit;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let hit = tokio::time::timeout(Duration::from_secs(30), aged)
        .await
        .expect("the entry ages");
    assert_eq!(hit.header("cache-control"), Some("public, max-age=60"));

    // Sent with credentials to a route that does not cache results: nothing says the answer
    // is the same for everyone.
    let me = [("authorization", "Bearer alice")];
    let uncached = get(p, "/graphql", &get_params(QUERY, &vars), &me).await;
    assert_eq!(uncached.status, 200);
    assert_eq!(uncached.header("cache-control"), Some("private"));

    // Per-credential results are private, hit or miss.
    for _ in 0..2 {
        let private = get(p, "/cached/graphql", &get_params(QUERY, &vars), &me).await;
        assert_eq!(private.header("cache-control"), Some("private"));
    }
}

#[tokio::test]
async fn the_safelist_admits_manifest_operations_only() {
    let env = env().await;
    let p = &env.proxy;
    let listed = json!({"query": LISTED});
    let unlisted = json!({"query": "query Other { other }"});
    assert_eq!(post(p, "/safe/graphql", &listed, &[]).await.status, 200);
    let refused = post(p, "/safe/graphql", &unlisted, &[]).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.code(), Some("QUERY_NOT_IN_SAFELIST"));
    // As in Apollo Router, layout, comments and commas do not matter; the operation does.
    let reformatted = json!({"query": "# from the client\nquery Listed {\n  listed,\n}"});
    assert_eq!(
        post(p, "/safe/graphql", &reformatted, &[]).await.status,
        200
    );
    let changed = json!({"query": "query Listed { listed other }"});
    assert_eq!(post(p, "/safe/graphql", &changed, &[]).await.status, 403);
    // Manifest operations work by hash without a registration.
    let by_hash = post(p, "/safe/graphql", &hash_only(LISTED, json!({})), &[]).await;
    assert_eq!(by_hash.received()["query"], LISTED);
    // An unlisted operation cannot be registered either.
    let register = post(
        p,
        "/safe/graphql",
        &hash_and_query("query Other { other }", json!({})),
        &[],
    )
    .await;
    assert_eq!(register.status, 403);
    let later = post(
        p,
        "/graphql",
        &hash_only("query Other { other }", json!({})),
        &[],
    )
    .await;
    assert_eq!(later.code(), Some("PERSISTED_QUERY_NOT_FOUND"));

    // What cannot be checked is refused where the safelist is enforced.
    let batch = post(p, "/safe/graphql", &json!([listed]), &[]).await;
    assert_eq!(batch.status, 403);
    assert_eq!(batch.code(), Some("QUERY_NOT_IN_SAFELIST"));
    assert_eq!(upload(p, "/safe/graphql").await, 403);

    // log_only lets it through and counts it; without safelist nothing is checked.
    assert_eq!(
        post(p, "/logonly/graphql", &unlisted, &[]).await.status,
        200
    );
    // A batch cannot be checked: under log_only it goes through, counted.
    assert_eq!(
        post(p, "/logonly/graphql", &json!([unlisted]), &[])
            .await
            .status,
        200
    );
    assert_eq!(post(p, "/listed/graphql", &unlisted, &[]).await.status, 200);
    metric_eventually(
        p,
        "outrider_graphql_safelist_total",
        &["route=\"logonly\"", "result=\"logged\""],
        2.0,
    )
    .await;
    let text = metric_eventually(
        p,
        "outrider_graphql_safelist_total",
        &["route=\"safe\"", "result=\"rejected\""],
        5.0,
    )
    .await;
    assert!(support::metric_value(
        &text,
        "outrider_graphql_operations_total",
        &["route=\"safe\"", "operation=\"Listed\"", "type=\"query\""]
    )
    .is_some());
    let _ = (&env.redis, &env.manifest);
}

#[tokio::test]
async fn concurrent_misses_share_one_upstream_request() {
    let env = env().await;
    let p = &env.proxy;
    let body = json!({"query": "{ slow }"});
    let answers =
        futures::future::join_all((0..5).map(|_| post(p, "/shared/graphql", &body, &[]))).await;
    assert_eq!(env.app.hits("/shared/graphql"), 1, "one fetch for all five");
    for a in &answers {
        assert_eq!(a.status, 200);
        assert_eq!(a.body, answers[0].body);
    }
}

#[tokio::test]
async fn a_stale_hashed_get_is_served_while_a_background_post_refreshes_it() {
    let env = env().await;
    let p = &env.proxy;
    let query = "query Swr { swr }";
    post(p, "/graphql", &hash_and_query(query, json!({})), &[]).await;
    let params = get_params(query, &json!({}));
    let first = get(p, "/swr/graphql", &params, &[]).await;
    assert_eq!(first.header("x-cache-status"), Some("MISS"));
    let first_seq = first.body["data"]["seq"].as_u64().unwrap();

    // Past its 1s TTL the entry is served stale, and one background request refreshes it.
    let stale = wait_for("a stale answer", Duration::from_secs(10), || async {
        let got = get(p, "/swr/graphql", &params, &[]).await;
        (got.header("x-cache-status") == Some("STALE")).then_some(got)
    })
    .await;
    assert_eq!(stale.body["data"]["seq"].as_u64(), Some(first_seq));
    let refreshed = wait_for("the refreshed entry", Duration::from_secs(10), || async {
        let got = get(p, "/swr/graphql", &params, &[]).await;
        (got.body["data"]["seq"].as_u64() != Some(first_seq)).then_some(got)
    })
    .await;
    assert_ne!(refreshed.header("x-cache-status"), Some("MISS"));
    // The refresh was a plain POST with the query text, like the foreground request.
    let data = &refreshed.body["data"];
    assert_eq!(data["method"], "POST");
    assert_eq!(data["uri"], "/swr/graphql");
    assert_eq!(refreshed.received()["query"], query);
}

#[tokio::test]
async fn a_manifest_edit_reloads_like_the_config() {
    let env = env().await;
    let p = &env.proxy;
    let other = "query Other { other }";
    let unlisted = json!({"query": other});
    assert_eq!(post(p, "/safe/graphql", &unlisted, &[]).await.status, 403);

    // The manifest gains the operation; nothing else changes.
    let manifest = json!({
        "format": "apollo-persisted-query-manifest",
        "version": 1,
        "operations": [
            {"id": sha(LISTED), "name": "Listed", "type": "query", "body": LISTED},
            {"id": sha(other), "name": "Other", "type": "query", "body": other},
        ],
    });
    let tmp = format!("{}.tmp", env.manifest);
    std::fs::write(&tmp, manifest.to_string()).unwrap();
    std::fs::rename(&tmp, &env.manifest).unwrap();
    wait_for(
        "the new manifest to serve",
        Duration::from_secs(20),
        || async { (post(p, "/safe/graphql", &unlisted, &[]).await.status == 200).then_some(()) },
    )
    .await;
    metric_eventually(
        p,
        "outrider_config_reloads_total",
        &["outcome=\"applied\""],
        1.0,
    )
    .await;

    // A broken manifest is rejected and the last good one keeps serving.
    std::fs::write(&tmp, "{ not a manifest").unwrap();
    std::fs::rename(&tmp, &env.manifest).unwrap();
    metric_eventually(
        p,
        "outrider_config_reloads_total",
        &["outcome=\"rejected\""],
        1.0,
    )
    .await;
    assert_eq!(post(p, "/safe/graphql", &unlisted, &[]).await.status, 200);
}

#[tokio::test]
async fn without_redis_registration_still_works_in_memory() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path());
    // Nothing listens there: every Redis call fails fast behind the breaker.
    let dead = format!("redis://127.0.0.1:{}", support::free_port());
    let proxy = Proxy::start(&config(&app.url(), &dead, &manifest)).await;
    let registered = post(&proxy, "/graphql", &hash_and_query(QUERY, json!({})), &[]).await;
    assert_eq!(registered.status, 200);
    let hit = post(&proxy, "/graphql", &hash_only(QUERY, json!({})), &[]).await;
    assert_eq!(hit.received()["query"], QUERY);
    let cached = json!({"query": "{ cachedWithoutRedis }"});
    post(&proxy, "/shared/graphql", &cached, &[]).await;
    let again = post(&proxy, "/shared/graphql", &cached, &[]).await;
    assert_eq!(again.header("x-cache-status"), Some("HIT"));
}
