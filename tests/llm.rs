//! The LLM gateway end to end: the built binary, a real redis-server and a fake provider
//! speaking the OpenAI and Anthropic shapes over real sockets (tests/support/fake_llm.rs).

#![allow(clippy::disallowed_types)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/fake_llm.rs"]
mod fake_llm;
mod support;

use std::time::Duration;

use fake_llm::FakeProvider;
use serde_json::{json, Value};
use support::{client, metric_eventually, metric_value, wait_for, Proxy, Redis};

const KEY_A: &str = "sk-test-AAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const AUTH_A: &str = "Bearer sk-test-AAAAAAAAAAAAAAAAAAAAAAAAAAAA";
/// Requests with key A.
const H: [(&str, &str); 1] = [("authorization", AUTH_A)];
const KEY_B: &str = "sk-test-BBBBBBBBBBBBBBBBBBBBBBBBBBBB";

fn config(fake: &str, local: &str, redis: &str, small_model: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  openai: {{ url: "{fake}", timeout: 10s }}
  anthropic: {{ url: "{fake}", timeout: 10s }}
  local: {{ url: "{local}", timeout: 10s }}
cache:
  # Generous: on a loaded machine neither a slow Redis answer nor a waiter giving up on a gated
  # first call may change what the tests count.
  redis: {{ url: "{redis}", timeout: 2s }}
  lock_timeout: 30s
routes:
  - name: chat
    match: {{ path: /v1/chat/completions, methods: [POST] }}
    upstream: openai
    llm:
      provider: openai
      cache: {{ ttl: 6h, scope: api_key }}
      routing:
        - name: small
          when: {{ model: auto, max_prompt_tokens: 20 }}
          model: {small_model}
        - name: tier-header
          when: {{ headers: {{ x-model-tier: local }} }}
          model: llama-3
          upstream: local
        - when: {{ model: auto }}
          model: gpt-4o
        - name: to-claude
          when: {{ model: claude-auto }}
          model: claude-x
          upstream: anthropic
          provider: anthropic
        - name: to-claude-keyed
          when: {{ model: claude-keyed }}
          model: claude-x
          upstream: anthropic
          provider: anthropic
          api_key: sk-ant-outriders-own
      pricing:
        gpt-4o-mini: {{ input_per_mtok: 0.15, output_per_mtok: 0.60 }}
        gpt-4o: {{ input_per_mtok: 2.5, output_per_mtok: 10 }}
        claude-x: {{ input_per_mtok: 3, output_per_mtok: 15 }}
      max_body: 256KiB
  - name: embeddings
    match: {{ path: /v1/embeddings, methods: [POST] }}
    upstream: openai
    llm: {{ provider: openai }}
  - name: messages
    match: {{ path: /v1/messages, methods: [POST] }}
    upstream: anthropic
    llm:
      provider: anthropic
      routing:
        - name: to-llama
          when: {{ model: claude-local }}
          model: llama-3
          upstream: local
          provider: openai
      pricing:
        claude-x: {{ input_per_mtok: 3, output_per_mtok: 15 }}
      max_body: 64KiB
  - name: shared
    match: {{ path: /shared/v1/chat/completions, methods: [POST] }}
    upstream: openai
    llm: {{ provider: openai, cache: {{ scope: shared }} }}
  - name: tenant
    match: {{ path: /tenant/v1/chat/completions, methods: [POST] }}
    upstream: openai
    llm: {{ provider: openai, cache: {{ scope: "header:x-tenant" }} }}
  - name: deterministic
    match: {{ path: /det/v1/chat/completions, methods: [POST] }}
    upstream: openai
    llm: {{ provider: openai, cache: {{ deterministic_only: true }} }}
  - name: off
    match: {{ path: /off/v1/chat/completions, methods: [POST] }}
    upstream: openai
    llm: {{ provider: openai, cache: {{ enabled: false }} }}
"#
    )
}

struct Setup {
    fake: FakeProvider,
    local: FakeProvider,
    redis: Redis,
    proxy: Proxy,
}

async fn setup() -> Setup {
    let fake = FakeProvider::start().await;
    let local = FakeProvider::start().await;
    let redis = Redis::start();
    let proxy = Proxy::start(&config(
        &fake.url(),
        &local.url(),
        &redis.url(),
        "gpt-4o-mini",
    ))
    .await;
    Setup {
        fake,
        local,
        redis,
        proxy,
    }
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn cache(&self) -> &str {
        self.header("x-cache-status")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(proxy: &Proxy, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let (resp, _) = stream(proxy, path, headers, body).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.expect("body").to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

fn chat(content: &str, extra: Value) -> String {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    body.to_string()
}

#[tokio::test]
async fn a_repeated_prompt_is_answered_from_the_cache() {
    let s = setup().await;
    let h = H;
    let body = chat("hello", json!({}));
    let miss = send(&s.proxy, "/v1/chat/completions", &h, &body).await;
    assert_eq!(miss.status, 200, "{}", miss.text());
    assert_eq!(miss.cache(), "MISS");
    assert_eq!(miss.header("cache-status"), "outrider; fwd=miss; stored");
    assert_eq!(
        miss.json()["choices"][0]["message"]["content"],
        "echo hello #1"
    );
    assert_eq!(s.fake.calls(), 1);
    // The provider got the caller's key.
    assert_eq!(s.fake.last().header("authorization"), Some(AUTH_A));

    let hit = send(&s.proxy, "/v1/chat/completions", &h, &body).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.cache(), "HIT");
    assert!(hit
        .header("cache-status")
        .starts_with("outrider; hit; ttl="));
    assert!(hit.header("age").parse::<u64>().is_ok(), "age header");
    assert_eq!(hit.body, miss.body, "the stored answer, byte for byte");
    assert_eq!(hit.header("content-type"), "application/json");
    assert_eq!(s.fake.calls(), 1, "nothing forwarded for a hit");

    // The entry reached Redis, under a key that names the route and model, not the API key.
    let keys = wait_for("the entry in redis", Duration::from_secs(10), || async {
        let keys = s.redis.cli(&["--scan", "--pattern", "*chat*"]);
        (!keys.trim().is_empty()).then_some(keys)
    })
    .await;
    assert!(keys.contains("chat:gpt-4o-mini:"), "{keys}");
    assert!(!keys.contains("sk-test"), "{keys}");

    // The route's entries purge like any route's.
    let purged = client()
        .post(s.proxy.admin("/cache/purge"))
        .json(&json!({"route": "chat"}))
        .send()
        .await
        .unwrap();
    assert_eq!(purged.status(), 200);
    let after = send(&s.proxy, "/v1/chat/completions", &h, &body).await;
    assert_eq!(after.cache(), "MISS");
    assert_eq!(s.fake.calls(), 2);
}

#[tokio::test]
async fn the_key_is_canonical_json_of_what_changes_the_answer() {
    let s = setup().await;
    let h = H;
    let first = send(
        &s.proxy,
        "/v1/chat/completions",
        &h,
        &chat("order", json!({"user": "u1", "max_tokens": 10})),
    )
    .await;
    assert_eq!(first.cache(), "MISS");
    // Reordered fields, whitespace, 0.0 for 0, another `user` and `metadata`: the same answer.
    let reordered = r#"{ "max_tokens" : 10, "temperature": 0.0, "user": "u2", "metadata": {"a": 1},
        "messages": [ { "content": "order", "role": "user" } ], "model": "gpt-4o-mini" }"#;
    let hit = send(&s.proxy, "/v1/chat/completions", &h, reordered).await;
    assert_eq!(hit.cache(), "HIT", "{}", hit.text());
    assert_eq!(hit.body, first.body);
    // A changed temperature, max_tokens or stream flag is another question.
    for changed in [
        chat(
            "order",
            json!({"user": "u1", "max_tokens": 10, "temperature": 0.7}),
        ),
        chat("order", json!({"max_tokens": 11})),
        chat("order", json!({"max_tokens": 10, "stream": true})),
    ] {
        let r = send(&s.proxy, "/v1/chat/completions", &h, &changed).await;
        assert_eq!(r.cache(), "MISS", "{changed}");
    }
    assert_eq!(s.fake.calls(), 4);
}

#[tokio::test]
async fn tenants_never_share_unless_the_route_says_so() {
    let s = setup().await;
    let (a, b) = (bearer(KEY_A), bearer(KEY_B));
    let body = chat("secret plans", json!({}));
    let path = "/v1/chat/completions";
    assert_eq!(
        send(&s.proxy, path, &[("authorization", a.as_str())], &body)
            .await
            .cache(),
        "MISS"
    );
    let other = send(&s.proxy, path, &[("authorization", b.as_str())], &body).await;
    assert_eq!(
        other.cache(),
        "MISS",
        "another API key never gets A's answer"
    );
    assert_eq!(
        other.json()["choices"][0]["message"]["content"],
        "echo secret plans #2"
    );
    assert_eq!(
        send(&s.proxy, path, &[("authorization", a.as_str())], &body)
            .await
            .cache(),
        "HIT"
    );
    // Anthropic-style x-api-key is a key of its own too.
    assert_eq!(
        send(&s.proxy, path, &[("x-api-key", KEY_A)], &body)
            .await
            .cache(),
        "MISS"
    );
    assert_eq!(
        send(&s.proxy, path, &[("x-api-key", KEY_A)], &body)
            .await
            .cache(),
        "HIT"
    );
    // No key: nothing to scope by, so no caching at all.
    assert_eq!(send(&s.proxy, path, &[], &body).await.cache(), "BYPASS");

    // scope: shared
    let shared = "/shared/v1/chat/completions";
    assert_eq!(
        send(&s.proxy, shared, &[("authorization", a.as_str())], &body)
            .await
            .cache(),
        "MISS"
    );
    assert_eq!(
        send(&s.proxy, shared, &[("authorization", b.as_str())], &body)
            .await
            .cache(),
        "HIT"
    );

    // scope: header:x-tenant
    let tenant = "/tenant/v1/chat/completions";
    let t1 = [("authorization", a.as_str()), ("x-tenant", "t1")];
    let t2 = [("authorization", a.as_str()), ("x-tenant", "t2")];
    let t1_other_key = [("authorization", b.as_str()), ("x-tenant", "t1")];
    assert_eq!(send(&s.proxy, tenant, &t1, &body).await.cache(), "MISS");
    assert_eq!(send(&s.proxy, tenant, &t2, &body).await.cache(), "MISS");
    assert_eq!(
        send(&s.proxy, tenant, &t1_other_key, &body).await.cache(),
        "HIT"
    );
    assert_eq!(
        send(&s.proxy, tenant, &[("authorization", a.as_str())], &body)
            .await
            .cache(),
        "BYPASS"
    );
}

/// Sends a request; the response body is left to read (chunk by chunk for streams).
async fn stream(
    proxy: &Proxy,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (reqwest::Response, String) {
    let mut req = client()
        .post(proxy.url(path))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    let cache = resp
        .headers()
        .get("x-cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (resp, cache)
}

async fn read_all(mut resp: reqwest::Response) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        out.extend_from_slice(&chunk);
        chunks += 1;
    }
    (out, chunks)
}

#[tokio::test]
async fn an_openai_stream_is_recorded_and_replayed_byte_for_byte() {
    let s = setup().await;
    let h = H;
    let body = chat("stream me please", json!({"stream": true}));
    let (resp, cache) = stream(&s.proxy, "/v1/chat/completions", &h, &body).await;
    assert_eq!(cache, "MISS");
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let (missed, _) = read_all(resp).await;
    let text = String::from_utf8(missed.clone()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains("\"content\":\"please \""), "{text}");
    // outrider asked for usage; the extra chunk is not what the client asked for.
    assert_eq!(
        s.fake.last().body["stream_options"]["include_usage"],
        json!(true)
    );
    assert!(
        !text.contains("\"choices\":[]"),
        "usage chunk removed: {text}"
    );
    assert!(!text.contains("prompt_tokens"), "{text}");
    assert!(
        !text.contains("\"usage\":null"),
        "as without include_usage: {text}"
    );

    let (resp, cache) = stream(&s.proxy, "/v1/chat/completions", &h, &body).await;
    assert_eq!(cache, "HIT");
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let (replayed, _) = read_all(resp).await;
    assert_eq!(
        replayed, missed,
        "replay is byte-identical to the recorded events"
    );
    assert_eq!(s.fake.calls(), 1);

    // A client that asked for usage itself sees the usage chunk (and has an entry of its own).
    let with_usage = chat(
        "stream me please",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (resp, cache) = stream(&s.proxy, "/v1/chat/completions", &h, &with_usage).await;
    assert_eq!(cache, "MISS");
    let (own, _) = read_all(resp).await;
    let own = String::from_utf8(own).unwrap();
    assert!(
        own.contains("\"choices\":[]") && own.contains("\"prompt_tokens\":11"),
        "{own}"
    );
    assert!(
        own.contains("\"usage\":null"),
        "what the provider sent: {own}"
    );
    let (resp, cache) = stream(&s.proxy, "/v1/chat/completions", &h, &with_usage).await;
    assert_eq!(cache, "HIT");
    assert_eq!(String::from_utf8(read_all(resp).await.0).unwrap(), own);

    // Usage of the stream was counted though the client never saw it.
    metric_eventually(
        &s.proxy,
        "outrider_llm_tokens_total",
        &[
            "route=\"chat\"",
            "direction=\"input\"",
            "source=\"upstream\"",
        ],
        22.0,
    )
    .await;
}

#[tokio::test]
async fn a_miss_streams_through_before_the_provider_has_finished() {
    let s = setup().await;
    let auth = AUTH_A.to_owned();
    let h = [("authorization", auth.as_str()), ("x-fake", "slow")];
    let body = chat("slowly", json!({"stream": true}));
    let (mut resp, cache) = stream(&s.proxy, "/v1/chat/completions", &h, &body).await;
    assert_eq!(cache, "MISS");
    // The provider holds the rest of its stream until the gate opens: the first events can
    // only reach us if nothing buffers them.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("\"role\":\"assistant\"") {
        let chunk = resp
            .chunk()
            .await
            .expect("chunk")
            .expect("more before the end");
        seen.extend_from_slice(&chunk);
    }
    assert_eq!(s.fake.completed(), 0);
    // Meanwhile the same question is not answered from a half-recorded stream.
    let other = send(
        &s.proxy,
        "/v1/chat/completions",
        &[("authorization", auth.as_str())],
        &body,
    )
    .await;
    assert_eq!(other.cache(), "MISS");
    s.fake.open_gate();
    let (rest, _) = read_all(resp).await;
    seen.extend_from_slice(&rest);
    assert!(String::from_utf8_lossy(&seen).ends_with("data: [DONE]\n\n"));
    assert_eq!(s.fake.completed(), 1);
}

#[tokio::test]
async fn a_stream_without_its_terminal_event_or_its_client_is_not_stored() {
    let s = setup().await;
    let auth = AUTH_A.to_owned();
    let path = "/v1/chat/completions";
    let body = chat("cut short", json!({"stream": true}));

    // The provider ends the stream early: passed on as it is, not stored.
    let early = [("authorization", auth.as_str()), ("x-fake", "early-close")];
    let (resp, cache) = stream(&s.proxy, path, &early, &body).await;
    assert_eq!(cache, "MISS");
    let (partial, _) = read_all(resp).await;
    assert!(!String::from_utf8_lossy(&partial).contains("[DONE]"));
    let h = [("authorization", auth.as_str())];
    let (resp, cache) = stream(&s.proxy, path, &h, &body).await;
    assert_eq!(cache, "MISS", "an unfinished stream was not stored");
    read_all(resp).await;
    let (resp, cache) = stream(&s.proxy, path, &h, &body).await;
    assert_eq!(cache, "HIT", "the complete one was");
    read_all(resp).await;

    // The client goes away mid-stream: nothing is stored.
    let gone = chat("gone", json!({"stream": true}));
    let slow = [("authorization", auth.as_str()), ("x-fake", "slow")];
    let (mut resp, _) = stream(&s.proxy, path, &slow, &gone).await;
    let first = resp.chunk().await.expect("chunk");
    assert!(first.is_some());
    drop(resp);
    s.fake.open_gate();
    wait_for(
        "the provider's stream to end",
        Duration::from_secs(20),
        || async { (s.fake.abandoned() + s.fake.completed() > 0).then_some(()) },
    )
    .await;
    let (resp, cache) = stream(&s.proxy, path, &h, &gone).await;
    assert_eq!(cache, "MISS", "nothing stored for a client that left");
    read_all(resp).await;
}

#[tokio::test]
async fn anthropic_messages_streamed_and_not() {
    let s = setup().await;
    let h = [("x-api-key", KEY_A), ("anthropic-version", "2023-06-01")];
    let body = json!({
        "model": "claude-x", "max_tokens": 64,
        "system": "be brief",
        "messages": [{"role": "user", "content": "hi claude"}],
    });
    let miss = send(&s.proxy, "/v1/messages", &h, &body.to_string()).await;
    assert_eq!(miss.cache(), "MISS");
    assert_eq!(miss.json()["content"][0]["text"], "echo hi claude #1");
    let hit = send(&s.proxy, "/v1/messages", &h, &body.to_string()).await;
    assert_eq!(hit.cache(), "HIT");
    assert_eq!(hit.body, miss.body);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (resp, cache) = stream(&s.proxy, "/v1/messages", &h, &streamed.to_string()).await;
    assert_eq!(cache, "MISS");
    let (recorded, _) = read_all(resp).await;
    let text = String::from_utf8(recorded.clone()).unwrap();
    assert!(
        text.contains("event: message_start")
            && text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
        "{text}"
    );
    let (resp, cache) = stream(&s.proxy, "/v1/messages", &h, &streamed.to_string()).await;
    assert_eq!(cache, "HIT");
    assert_eq!(read_all(resp).await.0, recorded);
    assert_eq!(s.fake.calls(), 2);
    // Another anthropic-version may answer in another shape: another entry.
    let h2 = [("x-api-key", KEY_A), ("anthropic-version", "2099-01-01")];
    assert_eq!(
        send(&s.proxy, "/v1/messages", &h2, &body.to_string())
            .await
            .cache(),
        "MISS"
    );

    // input 12 + output 6 per answer at $3/$15 per million: 0.000126 spent, the same saved.
    metric_eventually(
        &s.proxy,
        "outrider_llm_tokens_total",
        &[
            "route=\"messages\"",
            "direction=\"output\"",
            "source=\"cache\"",
        ],
        12.0,
    )
    .await;
    // Each answer's cost is counted as its request completes, just after the client has it.
    wait_for(
        "3 answers' cost spent, 2 saved",
        Duration::from_secs(10),
        || async {
            let text = s.proxy.admin_text("/metrics").await;
            let spent = metric_value(
                &text,
                "outrider_llm_cost_usd_total",
                &["route=\"messages\""],
            )?;
            let saved = metric_value(
                &text,
                "outrider_llm_cost_saved_usd_total",
                &["route=\"messages\""],
            )?;
            let settled =
                (spent - 3.0 * 0.000126).abs() < 1e-9 && (saved - 2.0 * 0.000126).abs() < 1e-9;
            settled.then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn opt_outs_refresh_skip_storing_or_bypass() {
    let s = setup().await;
    let auth = AUTH_A.to_owned();
    let path = "/v1/chat/completions";
    let h = [("authorization", auth.as_str())];
    let body = chat("opt out", json!({}));
    assert_eq!(send(&s.proxy, path, &h, &body).await.cache(), "MISS");
    // no-cache: asks the provider again and stores the new answer.
    let refresh = [
        ("authorization", auth.as_str()),
        ("cache-control", "no-cache"),
    ];
    let fresh = send(&s.proxy, path, &refresh, &body).await;
    assert_eq!(fresh.cache(), "BYPASS");
    assert_eq!(
        fresh.header("cache-status"),
        "outrider; fwd=request; stored"
    );
    assert_eq!(
        fresh.json()["choices"][0]["message"]["content"],
        "echo opt out #2"
    );
    let hit = send(&s.proxy, path, &h, &body).await;
    assert_eq!(hit.cache(), "HIT");
    assert_eq!(hit.body, fresh.body);
    // no-store: answered, not kept.
    let other = chat("do not keep", json!({}));
    let no_store = [
        ("authorization", auth.as_str()),
        ("cache-control", "no-store"),
    ];
    assert_eq!(
        send(&s.proxy, path, &no_store, &other)
            .await
            .header("cache-status"),
        "outrider; fwd=miss"
    );
    assert_eq!(send(&s.proxy, path, &h, &other).await.cache(), "MISS");
    // cache.enabled: false
    for _ in 0..2 {
        let r = send(&s.proxy, "/off/v1/chat/completions", &h, &body).await;
        assert_eq!((r.status, r.cache()), (200, "BYPASS"));
    }
    // deterministic_only: only temperature 0 is cached.
    let warm = chat("creative", json!({"temperature": 0.9}));
    for _ in 0..2 {
        assert_eq!(
            send(&s.proxy, "/det/v1/chat/completions", &h, &warm)
                .await
                .cache(),
            "BYPASS"
        );
    }
    let cold = chat("creative", json!({}));
    assert_eq!(
        send(&s.proxy, "/det/v1/chat/completions", &h, &cold)
            .await
            .cache(),
        "MISS"
    );
    assert_eq!(
        send(&s.proxy, "/det/v1/chat/completions", &h, &cold)
            .await
            .cache(),
        "HIT"
    );
    assert_eq!(s.fake.calls(), 2 + 2 + 2 + 2 + 1);
}

#[tokio::test]
async fn provider_errors_pass_through_and_are_never_cached() {
    let s = setup().await;
    let auth = AUTH_A.to_owned();
    let path = "/v1/chat/completions";
    let body = chat("too many", json!({}));
    for (fake, status) in [("429", 429), ("500", 500)] {
        let h = [("authorization", auth.as_str()), ("x-fake", fake)];
        for _ in 0..2 {
            let r = send(&s.proxy, path, &h, &body).await;
            assert_eq!(r.status, status);
            if status == 429 {
                assert_eq!(r.header("retry-after"), "7");
                assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
            }
            assert_eq!(r.header("cache-status"), "outrider; fwd=miss");
        }
    }
    assert_eq!(s.fake.calls(), 4, "every error went to the provider");
    let h = [("authorization", auth.as_str())];
    assert_eq!(
        send(&s.proxy, path, &h, &body).await.cache(),
        "MISS",
        "no error was stored"
    );
    // The same for a stream that fails.
    let streamed = chat("too many", json!({"stream": true}));
    let h429 = [("authorization", auth.as_str()), ("x-fake", "429")];
    assert_eq!(send(&s.proxy, path, &h429, &streamed).await.status, 429);
    assert_eq!(send(&s.proxy, path, &h, &streamed).await.cache(), "MISS");
    let text = metric_eventually(
        &s.proxy,
        "outrider_llm_requests_total",
        &["route=\"chat\"", "status=\"4xx\""],
        3.0,
    )
    .await;
    assert_eq!(
        metric_value(
            &text,
            "outrider_llm_requests_total",
            &["route=\"chat\"", "status=\"5xx\""]
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn bad_input_gets_the_providers_error_shape_and_goes_nowhere() {
    let s = setup().await;
    let h = H;
    let openai = "/v1/chat/completions";
    for (body, needle) in [
        ("{not json", "not valid JSON"),
        (r#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
        (r#"{"model":"gpt-4o"}"#, "messages"),
        (r#"["model"]"#, "JSON object"),
    ] {
        let r = send(&s.proxy, openai, &h, body).await;
        assert_eq!(r.status, 400, "{body}");
        let e = r.json();
        assert!(
            e["error"]["message"].as_str().unwrap().contains(needle),
            "{e}"
        );
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert!(e["error"]["code"].is_string());
        assert_eq!(
            r.header("x-cache-status"),
            "",
            "no cache headers on a refusal"
        );
    }
    let big = chat(&"x".repeat(300 * 1024), json!({}));
    let r = send(&s.proxy, openai, &h, &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");

    let anthropic = [("x-api-key", KEY_A)];
    let r = send(
        &s.proxy,
        "/v1/messages",
        &anthropic,
        r#"{"model":"claude-x"}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    let e = r.json();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let r = send(&s.proxy, "/v1/messages", &anthropic, "{").await;
    assert_eq!((r.status, r.json()["type"].clone()), (400, json!("error")));
    // Over the route's max_body (4 MiB by default) the proxy refuses before reading, and still
    // in the provider's shape.
    let r = send(&s.proxy, "/v1/messages", &anthropic, &"x".repeat(5 << 20)).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "request_too_large");
    let r = send(&s.proxy, openai, &h, &"x".repeat(5 << 20)).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    assert_eq!(s.fake.calls(), 0, "nothing was forwarded");
    assert_eq!(s.redis.cli(&["dbsize"]).trim(), "0", "nothing was stored");
}

#[tokio::test]
async fn routing_rules_pick_the_model_and_follow_live_edits() {
    let s = setup().await;
    let h = H;
    let path = "/v1/chat/completions";
    let small =
        json!({"model": "auto", "messages": [{"role": "user", "content": "short"}]}).to_string();
    let r = send(&s.proxy, path, &h, &small).await;
    assert_eq!(r.header("x-outrider-llm-rule"), "small");
    assert_eq!(r.json()["model"], "gpt-4o-mini", "the model actually used");
    assert_eq!(s.fake.last().body["model"], "gpt-4o-mini");

    let long =
        json!({"model": "auto", "messages": [{"role": "user", "content": "long ".repeat(40)}]})
            .to_string();
    let r = send(&s.proxy, path, &h, &long).await;
    assert_eq!(r.header("x-outrider-llm-rule"), "routing[2]");
    assert_eq!(r.json()["model"], "gpt-4o");

    // A header condition with another upstream.
    let tier = [("authorization", AUTH_A), ("x-model-tier", "local")];
    let r = send(&s.proxy, path, &tier, &chat("anything", json!({}))).await;
    assert_eq!(r.header("x-outrider-llm-rule"), "tier-header");
    assert_eq!(r.json()["model"], "llama-3");
    assert_eq!(s.local.calls(), 1);
    assert_eq!(s.local.last().body["model"], "llama-3");

    // A named model matching no rule goes as asked, without the header.
    let r = send(&s.proxy, path, &h, &chat("as asked", json!({}))).await;
    assert_eq!(r.header("x-outrider-llm-rule"), "");
    assert_eq!(r.json()["model"], "gpt-4o-mini");

    // Live edit: the small tier is now another model; no restart.
    s.proxy.write_config(&config(
        &s.fake.url(),
        &s.local.url(),
        &s.redis.url(),
        "gpt-4.1-nano",
    ));
    wait_for("the edited rule", Duration::from_secs(20), || async {
        let r = send(&s.proxy, path, &h, &small).await;
        (r.json()["model"] == "gpt-4.1-nano").then_some(())
    })
    .await;
    let text = metric_eventually(
        &s.proxy,
        "outrider_llm_routing_total",
        &["rule=\"tier-header\""],
        1.0,
    )
    .await;
    assert!(metric_value(&text, "outrider_llm_routing_total", &["rule=\"small\""]).unwrap() >= 2.0);
}

#[tokio::test]
async fn tokens_cost_and_latency_metrics_per_route_and_model() {
    let s = setup().await;
    let h = H;
    let body = chat("count me", json!({}));
    send(&s.proxy, "/v1/chat/completions", &h, &body).await;
    send(&s.proxy, "/v1/chat/completions", &h, &body).await;
    let m = ["route=\"chat\"", "model=\"gpt-4o-mini\""];
    let text = metric_eventually(
        &s.proxy,
        "outrider_llm_requests_total",
        &[m[0], m[1], "cache=\"hit\""],
        1.0,
    )
    .await;
    let v = |name: &str, extra: &[&str]| {
        let labels: Vec<&str> = m.iter().chain(extra).copied().collect();
        metric_value(&text, name, &labels)
    };
    assert_eq!(
        v("outrider_llm_requests_total", &["cache=\"miss\""]),
        Some(1.0)
    );
    assert_eq!(
        v(
            "outrider_llm_tokens_total",
            &["direction=\"input\"", "source=\"upstream\""]
        ),
        Some(11.0)
    );
    assert_eq!(
        v(
            "outrider_llm_tokens_total",
            &["direction=\"output\"", "source=\"upstream\""]
        ),
        Some(7.0)
    );
    assert_eq!(
        v(
            "outrider_llm_tokens_total",
            &["direction=\"input\"", "source=\"cache\""]
        ),
        Some(11.0)
    );
    // 11 × $0.15 + 7 × $0.60 per million tokens.
    let price = (11.0 * 0.15 + 7.0 * 0.60) / 1e6;
    assert!((v("outrider_llm_cost_usd_total", &[]).unwrap() - price).abs() < 1e-12);
    assert!((v("outrider_llm_cost_saved_usd_total", &[]).unwrap() - price).abs() < 1e-12);
    assert_eq!(
        v(
            "outrider_llm_time_to_first_token_seconds_count",
            &["source=\"upstream\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "outrider_llm_request_duration_seconds_count",
            &["source=\"cache\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn embeddings_are_cached_too() {
    let s = setup().await;
    let h = H;
    let body = json!({"model": "text-embedding-3-small", "input": "embed me"}).to_string();
    let miss = send(&s.proxy, "/v1/embeddings", &h, &body).await;
    assert_eq!((miss.status, miss.cache()), (200, "MISS"));
    let hit = send(&s.proxy, "/v1/embeddings", &h, &body).await;
    assert_eq!(hit.cache(), "HIT");
    assert_eq!(hit.body, miss.body);
    let r = send(
        &s.proxy,
        "/v1/embeddings",
        &h,
        r#"{"model":"text-embedding-3-small"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "input is required");
}

#[tokio::test]
async fn the_api_key_is_never_logged_shown_or_stored() {
    let s = setup().await;
    let secret = "sk-live-DO-NOT-LEAK-0123456789";
    let auth = bearer(secret);
    for body in [
        chat("leak?", json!({})),
        chat("leak?", json!({"stream": true})),
    ] {
        for _ in 0..2 {
            let r = send(
                &s.proxy,
                "/v1/chat/completions",
                &[("authorization", auth.as_str())],
                &body,
            )
            .await;
            assert_eq!(r.status, 200);
        }
    }
    send(
        &s.proxy,
        "/v1/messages",
        &[("x-api-key", secret)],
        r#"{"model":"claude-x","messages":[]}"#,
    )
    .await;
    send(
        &s.proxy,
        "/v1/chat/completions",
        &[("authorization", auth.as_str())],
        "{bad",
    )
    .await;
    assert_eq!(
        s.fake.last().header("x-api-key"),
        Some(secret),
        "forwarded to the provider"
    );
    let config = s.proxy.admin_text("/config").await;
    assert!(!config.contains(secret));
    let keys = wait_for("entries in redis", Duration::from_secs(10), || async {
        let keys = s.redis.cli(&["--scan"]);
        (keys.lines().count() >= 2).then_some(keys)
    })
    .await;
    assert!(!keys.contains(secret));
    for key in keys.lines() {
        let value = s.redis.cli(&["get", key]);
        assert!(
            !value.contains(secret) && !value.contains("DO-NOT-LEAK"),
            "{key}"
        );
    }
    let log = s.proxy.log();
    assert!(!log.contains("DO-NOT-LEAK"), "{log}");
}

/// An OpenAI client routed to an Anthropic upstream: the request leaves in the Messages shape
/// with the key where Anthropic reads it, and every answer (JSON, stream, error) comes back in
/// the OpenAI shape, cached and replayed like any other.
#[tokio::test]
async fn openai_requests_routed_to_anthropic_are_translated_both_ways() {
    let s = setup().await;
    let body = chat(
        "to claude",
        json!({"model": "claude-auto", "max_tokens": 20}),
    );
    let miss = send(&s.proxy, "/v1/chat/completions", &H, &body).await;
    assert_eq!(miss.status, 200, "{}", miss.text());
    assert_eq!(miss.cache(), "MISS");
    assert_eq!(miss.header("x-outrider-llm-rule"), "to-claude");
    let answer = miss.json();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "claude-x", "the model actually used");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "echo to claude #1"
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18})
    );
    let sent = s.fake.last();
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(
        sent.header("x-api-key"),
        Some(KEY_A),
        "the caller's key, unwrapped"
    );
    assert_eq!(sent.header("authorization"), None);
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        sent.body,
        json!({"model": "claude-x", "max_tokens": 20, "temperature": 0,
               "messages": [{"role": "user", "content": [{"type": "text", "text": "to claude"}]}]})
    );
    let hit = send(&s.proxy, "/v1/chat/completions", &H, &body).await;
    assert_eq!(hit.cache(), "HIT");
    assert_eq!(hit.body, miss.body);

    // A stream: OpenAI chunks and `[DONE]` go out, recorded and replayed byte for byte.
    let streamed = chat(
        "to claude",
        json!({"model": "claude-auto", "stream": true, "stream_options": {"include_usage": true}}),
    );
    let (resp, cache) = stream(&s.proxy, "/v1/chat/completions", &H, &streamed).await;
    assert_eq!(cache, "MISS");
    let (first, _) = read_all(resp).await;
    let text = String::from_utf8(first.clone()).unwrap();
    assert!(!text.contains("event:"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| serde_json::from_str(e.strip_prefix("data: ")?).ok())
        .collect();
    let said: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(said, "echo to claude #2");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(chunks[chunks.len() - 1]["usage"]["completion_tokens"], 6);
    let (resp, cache) = stream(&s.proxy, "/v1/chat/completions", &H, &streamed).await;
    assert_eq!(cache, "HIT");
    assert_eq!(read_all(resp).await.0, first);
    // Asked the same way, the OpenAI route's own model is another entry (another provider).
    let own = chat("to claude", json!({"model": "gpt-4o", "max_tokens": 20}));
    assert_eq!(
        send(&s.proxy, "/v1/chat/completions", &H, &own)
            .await
            .cache(),
        "MISS"
    );
    assert_eq!(s.fake.last().path, "/v1/chat/completions");

    // A rule's own key replaces the caller's.
    let keyed = chat("keyed", json!({"model": "claude-keyed"}));
    assert_eq!(
        send(&s.proxy, "/v1/chat/completions", &H, &keyed)
            .await
            .status,
        200
    );
    let sent = s.fake.last();
    assert_eq!(sent.header("x-api-key"), Some("sk-ant-outriders-own"));
    assert_eq!(sent.body["max_tokens"], 4096, "the Messages API needs one");
    assert!(!s.proxy.log().contains("sk-ant-outriders-own"));
    let shown = s.proxy.admin_text("/config").await;
    assert!(!shown.contains("sk-ant-outriders-own"), "{shown}");

    // The provider's error comes back in OpenAI's shape with its status and Retry-After.
    let calls = s.fake.calls();
    let limited = send(
        &s.proxy,
        "/v1/chat/completions",
        &[("authorization", AUTH_A), ("x-fake", "429")],
        &chat("limited", json!({"model": "claude-auto"})),
    )
    .await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), "7");
    assert_eq!(
        limited.json(),
        json!({"error": {"message": "slow down", "type": "rate_limit_error", "param": null, "code": null}})
    );
    // What Anthropic has no equivalent for is refused here, by name; nothing is sent.
    let refused = send(
        &s.proxy,
        "/v1/chat/completions",
        &H,
        &chat("two", json!({"model": "claude-auto", "n": 2})),
    )
    .await;
    assert_eq!(refused.status, 400);
    assert!(refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("parameter n"));
    assert_eq!(s.fake.calls(), calls + 1);
}

/// And the other way: an Anthropic client routed to an OpenAI-compatible server (a local
/// model) gets Anthropic messages and events.
#[tokio::test]
async fn anthropic_requests_routed_to_an_openai_server_are_translated_both_ways() {
    let s = setup().await;
    let h = [("x-api-key", KEY_A), ("anthropic-version", "2023-06-01")];
    let body = json!({"model": "claude-local", "max_tokens": 64, "system": "be brief",
        "messages": [{"role": "user", "content": "to llama"}]});
    let miss = send(&s.proxy, "/v1/messages", &h, &body.to_string()).await;
    assert_eq!(miss.status, 200, "{}", miss.text());
    assert_eq!(miss.cache(), "MISS");
    assert_eq!(miss.header("x-outrider-llm-rule"), "to-llama");
    assert_eq!(
        miss.json(),
        json!({"id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "llama-3",
            "content": [{"type": "text", "text": "echo to llama #1"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 11, "output_tokens": 7}})
    );
    let sent = s.local.last();
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.header("authorization"), Some(AUTH_A));
    assert_eq!(sent.header("x-api-key"), None);
    assert_eq!(sent.header("anthropic-version"), None);
    assert_eq!(
        sent.body,
        json!({"model": "llama-3", "max_tokens": 64, "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "to llama"}]})
    );
    let hit = send(&s.proxy, "/v1/messages", &h, &body.to_string()).await;
    assert_eq!((hit.cache(), &hit.body), ("HIT", &miss.body));

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (resp, cache) = stream(&s.proxy, "/v1/messages", &h, &streamed.to_string()).await;
    assert_eq!(cache, "MISS");
    let (first, _) = read_all(resp).await;
    let text = String::from_utf8(first.clone()).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        names.first().zip(names.last()),
        Some((&"message_start", &"message_stop")),
        "{text}"
    );
    assert!(
        !text.contains("[DONE]") && !text.contains("chat.completion"),
        "{text}"
    );
    assert!(
        text.contains(r#""usage":{"input_tokens":11,"output_tokens":7}"#),
        "{text}"
    );
    let (resp, cache) = stream(&s.proxy, "/v1/messages", &h, &streamed.to_string()).await;
    assert_eq!(cache, "HIT");
    assert_eq!(read_all(resp).await.0, first);

    // Errors in Anthropic's shape, status and Retry-After kept.
    let limited = send(
        &s.proxy,
        "/v1/messages",
        &[("x-api-key", KEY_A), ("x-fake", "429")],
        &body.to_string(),
    )
    .await;
    assert_eq!((limited.status, limited.header("retry-after")), (429, "7"));
    assert_eq!(
        limited.json(),
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}})
    );
    assert_eq!(s.local.calls(), 3);
    assert_eq!(
        s.fake.calls(),
        0,
        "the route's own upstream was never asked"
    );

    // A stream that fails mid-way (an error chunk, then `[DONE]`) ends at Anthropic's error
    // event and is never stored, translated or not.
    let failing = [
        ("x-api-key", KEY_A),
        ("anthropic-version", "2023-06-01"),
        ("x-fake", "stream-error"),
    ];
    let mut broken = streamed.clone();
    broken["messages"][0]["content"] = json!("this one fails");
    for _ in 0..2 {
        let (resp, cache) = stream(&s.proxy, "/v1/messages", &failing, &broken.to_string()).await;
        assert_eq!(cache, "MISS");
        let text = String::from_utf8(read_all(resp).await.0).unwrap();
        assert!(
            text.contains("event: error") && text.contains("generation failed"),
            "{text}"
        );
        assert!(!text.contains("message_stop"), "{text}");
    }
    let plain = chat("this one fails", json!({"stream": true}));
    let failing = [("authorization", AUTH_A), ("x-fake", "stream-error")];
    for _ in 0..2 {
        let (resp, cache) = stream(&s.proxy, "/v1/chat/completions", &failing, &plain).await;
        assert_eq!(
            cache, "MISS",
            "an OpenAI stream with an error chunk is not stored either"
        );
        read_all(resp).await;
    }
    assert_eq!((s.local.calls(), s.fake.calls()), (5, 2));
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The real `openai` and `anthropic` SDKs (pinned in scripts/install-python-deps.sh) parse a
/// miss and its hit into the same objects, streamed and not. Fails (does not skip) without them.
#[tokio::test]
async fn the_official_python_sdks_see_the_same_objects_on_miss_and_hit() {
    let check = std::process::Command::new(python())
        .args(["-c", "import openai, anthropic"])
        .output();
    match check {
        Ok(o) if o.status.success() => {}
        other => panic!(
            "the openai and anthropic Python SDKs are not installed for `{}` ({other:?}); \
             run scripts/install-python-deps.sh (from the repository root) and try again",
            python()
        ),
    }
    let s = setup().await;
    let script = support::repo_path("tests/llm_sdk_conformance.py");
    let base = s.proxy.url("");
    // Off the test's runtime thread: the fake provider answers on it meanwhile.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .arg(script)
            .arg(base.trim_end_matches('/'))
            .output()
    })
    .await
    .expect("join")
    .expect("run the conformance script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "conformance failed:\n{stdout}\n{stderr}\nproxy log:\n{}",
        s.proxy.log()
    );
    assert!(stdout.contains("{\"ok\": 11}"), "{stdout}");
    // Nine pairs of calls, each a miss then a hit (the helper's stream hits the raw stream's
    // entry), and the two rate-limited calls; the bad requests never left outrider.
    assert_eq!(s.fake.calls(), 9 + 2, "{stdout}");
    // Two more pairs went to the local OpenAI-compatible server, translated from Anthropic's
    // shape (the stream helper hits the raw stream's entry).
    assert_eq!(s.local.calls(), 2, "{stdout}");
}

/// Pingora replays at most 64 KiB of a body read before the upstream is chosen; a larger prompt
/// goes by a subrequest, still routed, rewritten and cached.
#[tokio::test]
async fn a_prompt_over_64k_is_routed_rewritten_and_cached() {
    let s = setup().await;
    let prompt = "y".repeat(100 * 1024);
    let body =
        json!({"model": "auto", "messages": [{"role": "user", "content": prompt}], "stream": true})
            .to_string();
    let (resp, cache) = stream(&s.proxy, "/v1/chat/completions", &H, &body).await;
    assert_eq!(cache, "MISS");
    assert_eq!(resp.headers()["x-outrider-llm-rule"], "routing[2]");
    let (missed, _) = read_all(resp).await;
    let seen = s.fake.last();
    assert_eq!(seen.body["model"], "gpt-4o");
    assert_eq!(seen.body["stream_options"]["include_usage"], json!(true));
    assert_eq!(
        seen.body["messages"][0]["content"].as_str().map(str::len),
        Some(100 * 1024)
    );
    let (resp, cache) = stream(&s.proxy, "/v1/chat/completions", &H, &body).await;
    assert_eq!(cache, "HIT");
    assert_eq!(read_all(resp).await.0, missed);
}

/// Identical non-streamed questions at once: one goes to the provider, the others get its answer.
#[tokio::test]
async fn identical_questions_at_once_cost_one_call() {
    let s = setup().await;
    let body = chat("at once", json!({}));
    let slow = [("authorization", AUTH_A), ("x-fake", "slow")];
    let proxy = &s.proxy;
    let first = send(proxy, "/v1/chat/completions", &slow, &body);
    let others = async {
        // The first is at the provider (and so the one others wait for) before they are sent.
        wait_for("the first call", Duration::from_secs(10), || async {
            (s.fake.calls() == 1).then_some(())
        })
        .await;
        let waiting = futures::future::join_all(
            (0..3).map(|_| send(proxy, "/v1/chat/completions", &H, &body)),
        );
        let gate = async {
            // All four are inside outrider (the three waiting on the first) before it answers.
            metric_eventually(proxy, "outrider_requests_in_flight", &[], 4.0).await;
            s.fake.open_gate();
        };
        futures::join!(waiting, gate).0
    };
    let (first, others) = futures::join!(first, others);
    assert_eq!(first.cache(), "MISS");
    for other in &others {
        assert_eq!(other.status, 200);
        assert_eq!(other.body, first.body, "the first call's answer");
        assert_eq!(other.cache(), "HIT");
    }
    assert_eq!(s.fake.calls(), 1);
    let text = s.proxy.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "outrider_cache_singleflight_waits_total",
            &["result=\"served\""]
        ),
        Some(3.0)
    );
}
