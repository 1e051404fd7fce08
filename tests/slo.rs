//! SLOs end to end: exact SLI counts against a backend with known fast, slow and failing
//! answers, `/slo` and its metrics, reload semantics, the generated Prometheus rules under
//! `promtool`, and enforcement: limits, queueing, shedding, deadlines, stale-on-shed and rate
//! limits (local, through Redis, and with Redis down).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::{client, metric_value, wait_for, Backend, Proxy, Redis};

fn config(app: &str, slo: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}", timeout: 10s }}
routes:
  - name: items
    match: {{ path_prefix: / }}
    upstream: app
{slo}
"#
    )
}

async fn slo_report(proxy: &Proxy) -> Value {
    proxy.admin_json("/slo").await
}

fn objective<'a>(report: &'a Value, route: &str, id: &str) -> Option<&'a Value> {
    report["routes"]
        .as_array()?
        .iter()
        .find(|r| r["route"] == route)?["objectives"]
        .as_array()?
        .iter()
        .find(|o| o["objective"] == id)
}

/// Waits until `id` has counted `total` events (requests are counted after their response).
async fn counted(proxy: &Proxy, id: &str, total: u64) -> Value {
    wait_for(
        &format!("{total} events on {id}"),
        Duration::from_secs(10),
        || async move {
            let report = slo_report(proxy).await;
            let seen = objective(&report, "items", id)?["windows"]["5m"]["total"].as_u64()?;
            (seen == total).then_some(report)
        },
    )
    .await
}

async fn get_status(proxy: &Proxy, path: &str) -> u16 {
    client()
        .get(proxy.url(path))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// GETs `path` in the background; the handle yields the status.
fn spawn_get(proxy: &Proxy, path: &str) -> tokio::task::JoinHandle<u16> {
    let url = proxy.url(path);
    tokio::spawn(async move { client().get(url).send().await.unwrap().status().as_u16() })
}

/// Waits until the first route's admission `field` (`in_flight`, `queued`) reads `value`.
async fn wait_admission(proxy: &Proxy, field: &str, value: u64) {
    wait_for(
        &format!("admission {field} = {value}"),
        Duration::from_secs(10),
        || async {
            let report = proxy.admin_json("/slo").await;
            (report["routes"][0]["admission"][field] == value).then_some(())
        },
    )
    .await;
}

const OBJECTIVES: &str = "    slo:\n      latency: { p95: 1s }\n      availability: 99%\n";

#[tokio::test]
async fn slis_count_exactly_and_show_on_slo_and_metrics() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), OBJECTIVES)).await;
    // 6 fast successes, 2 slow successes (1.2 s > 1 s), 3 server errors, 2 client errors.
    for _ in 0..6 {
        assert_eq!(get_status(&proxy, "/echo/fast").await, 200);
    }
    for _ in 0..2 {
        assert_eq!(get_status(&proxy, "/slow/1200").await, 200);
    }
    for _ in 0..3 {
        assert_eq!(get_status(&proxy, "/status/500").await, 500);
    }
    for _ in 0..2 {
        assert_eq!(get_status(&proxy, "/status/404").await, 404);
    }
    let report = counted(&proxy, "availability", 13).await;
    let latency = objective(&report, "items", "latency_p95").unwrap();
    assert_eq!(latency["kind"], "latency");
    assert_eq!(latency["threshold_ms"], 1000.0);
    assert_eq!(latency["target"], 0.95);
    assert_eq!(latency["windows"]["5m"]["good"], 11);
    assert_eq!(latency["windows"]["5m"]["total"], 13);
    assert_eq!(latency["windows"]["slo_window"]["total"], 13);
    let availability = objective(&report, "items", "availability").unwrap();
    assert_eq!(availability["windows"]["1h"]["good"], 10);
    assert_eq!(availability["windows"]["1h"]["total"], 13);
    // 3/13 errors against a 1 % budget: burning ~23x in every window → page.
    let burn = availability["windows"]["5m"]["burn_rate"].as_f64().unwrap();
    assert!((burn - (3.0 / 13.0) / 0.01).abs() < 1e-9, "{burn}");
    assert_eq!(availability["state"], "page");
    let budget = availability["error_budget_remaining"].as_f64().unwrap();
    assert!((budget - (1.0 - burn)).abs() < 1e-9);
    assert_eq!(availability["window"], "30days");

    let text = proxy.admin_text("/metrics").await;
    let labels = ["route=\"items\"", "objective=\"availability\""];
    assert_eq!(
        metric_value(&text, "outrider_slo_events_total", &labels),
        Some(13.0)
    );
    assert_eq!(
        metric_value(&text, "outrider_slo_good_events_total", &labels),
        Some(10.0)
    );
    assert_eq!(
        metric_value(&text, "outrider_slo_alert_state", &labels),
        Some(2.0)
    );
    let five = [
        "route=\"items\"",
        "objective=\"availability\"",
        "window=\"5m\"",
    ];
    let exported = metric_value(&text, "outrider_slo_burn_rate", &five).unwrap();
    assert!((exported - burn).abs() < 1e-6);
    // The 1 s threshold is a bucket bound of the latency histogram.
    assert!(text.contains("outrider_request_duration_seconds_bucket{route=\"items\",le=\"1\"}"));
}

#[tokio::test]
async fn reload_keeps_unchanged_objectives_and_drops_removed_ones() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), OBJECTIVES)).await;
    for _ in 0..4 {
        get_status(&proxy, "/echo/a").await;
    }
    counted(&proxy, "availability", 4).await;
    // Availability unchanged, the latency objective edited (p95 → p99).
    let edited = "    slo:\n      latency: { p99: 2s }\n      availability: 99%\n";
    proxy.write_config(&config(&app.url(), edited));
    let report = wait_for("the edited objective", Duration::from_secs(20), || {
        let proxy = &proxy;
        async move {
            let report = slo_report(proxy).await;
            objective(&report, "items", "latency_p99")
                .is_some()
                .then_some(report)
        }
    })
    .await;
    assert_eq!(
        objective(&report, "items", "availability").unwrap()["windows"]["5m"]["total"],
        4,
        "unchanged objective keeps its counts"
    );
    assert_eq!(
        objective(&report, "items", "latency_p99").unwrap()["windows"]["5m"]["total"],
        0,
        "a new objective starts empty"
    );
    assert!(objective(&report, "items", "latency_p95").is_none());

    // Without an slo section the route's series go away.
    proxy.write_config(&config(&app.url(), ""));
    wait_for("the route's SLO to go", Duration::from_secs(20), || {
        let proxy = &proxy;
        async move {
            let report = slo_report(proxy).await;
            report["routes"].as_array()?.is_empty().then_some(())
        }
    })
    .await;
    let text = proxy.admin_text("/metrics").await;
    assert!(!text.contains("outrider_slo_events_total{"), "{text}");
}

fn promtool_available() {
    let ok = Command::new("promtool").arg("--version").output().is_ok();
    assert!(
        ok,
        "promtool is needed (scripts/setup-debian.sh installs Debian's prometheus)"
    );
}

#[test]
fn generated_rules_pass_promtool_and_alert_on_fast_burns_only() {
    promtool_available();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("outrider.yaml");
    let text = config("http://127.0.0.1:9", OBJECTIVES)
        .replace("availability: 99%", "availability: 99.9%");
    std::fs::write(&config_path, support::render(&text, 18080, 18090)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .args(["slo-rules", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = String::from_utf8(out.stdout).unwrap();
    std::fs::write(dir.path().join("rules.yaml"), &rules).unwrap();
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(dir.path().join("rules.yaml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // 15x the budget (1.5 % errors) pages; exactly on budget (0.1 %) stays quiet.
    let annotations = |route: &str| {
        format!(
            "exp_annotations:\n              summary: \"route {route}: availability is burning its error budget too fast\"\n              description: \"Target 0.999 over 30d; fires when the error ratio exceeds 14.4x over 1h and 5m, or 6x over 6h and 30m.\"\n"
        )
    };
    let tests = format!(
        r#"rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'outrider_slo_events_total{{route="items",objective="availability"}}'
        values: '0+1000x120'
      - series: 'outrider_slo_good_events_total{{route="items",objective="availability"}}'
        values: '0+985x120'
    alert_rule_test:
      - eval_time: 90m
        alertname: OutriderSLOBurnRatePage
        exp_alerts:
          - exp_labels: {{ severity: page, route: items, objective: availability }}
            {}
  - interval: 1m
    input_series:
      - series: 'outrider_slo_events_total{{route="items",objective="availability"}}'
        values: '0+1000x120'
      - series: 'outrider_slo_good_events_total{{route="items",objective="availability"}}'
        values: '0+999x120'
    alert_rule_test:
      - eval_time: 90m
        alertname: OutriderSLOBurnRatePage
        exp_alerts: []
"#,
        annotations("items").trim_end()
    );
    std::fs::write(dir.path().join("tests.yaml"), tests).unwrap();
    let test = Command::new("promtool")
        .args(["test", "rules", "tests.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
    // The Kubernetes form wraps the same groups in a PrometheusRule.
    let k8s = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .args(["slo-rules", "--format", "kubernetes", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let manifest: serde_yaml_ng::Value = serde_yaml_ng::from_slice(&k8s.stdout).unwrap();
    assert_eq!(manifest["kind"], "PrometheusRule");
    assert_eq!(manifest["spec"]["groups"].as_sequence().unwrap().len(), 2);
}

#[test]
fn shipped_prometheus_rules_match_the_shipped_configs() {
    for (config, rules, format) in [
        (
            "k8s/outrider.yaml",
            "k8s/prometheus-operator/prometheusrule.yaml",
            "kubernetes",
        ),
        (
            "examples/docker-compose/outrider/outrider.yaml",
            "examples/docker-compose/prometheus/slo-rules.yml",
            "prometheus",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_outrider"))
            .args(["slo-rules", "--format", format, "--config"])
            .arg(support::repo_path(config))
            .env("REDIS_URL", "")
            .env("OUTRIDER_ADMIN_TOKEN", "x".repeat(32))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shipped = std::fs::read_to_string(support::repo_path(rules)).unwrap();
        assert_eq!(
            shipped,
            String::from_utf8(out.stdout).unwrap(),
            "{rules} is stale: regenerate with `outrider slo-rules --format {format} --config {config} > {rules}`"
        );
    }
}

#[tokio::test]
async fn a_full_route_queues_then_sheds_with_retry_after() {
    let app = Backend::start("app").await;
    let slo = "    slo:\n      availability: 99%\n      enforce: { max_concurrency: 1, queue_size: 1, queue_timeout: 20s }\n";
    let proxy = Proxy::start(&config(&app.url(), slo)).await;
    // One slow request holds the only slot.
    let holder = spawn_get(&proxy, "/slow/3000");
    wait_admission(&proxy, "in_flight", 1).await;
    // The next waits in the queue (size 1) for as long as 20 s...
    let queued = spawn_get(&proxy, "/echo/queued");
    wait_admission(&proxy, "queued", 1).await;
    // ...so one more finds the queue full and is shed at once, while the holder still runs.
    let rejected = client().get(proxy.url("/echo/full")).send().await.unwrap();
    assert_eq!(rejected.status(), 503);
    assert_eq!(rejected.headers()["retry-after"], "1");
    let body: Value = rejected.json().await.unwrap();
    assert_eq!(body["error"], "overloaded");
    assert!(
        !holder.is_finished(),
        "the shed answer did not wait for a slot"
    );
    // The queued request gets the slot when the holder is done.
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(queued.await.unwrap(), 200);
    // The slot is given back once the answer is logged, just after the client has it.
    wait_admission(&proxy, "in_flight", 0).await;
    assert_eq!(get_status(&proxy, "/echo/after").await, 200);
    let text = proxy.admin_text("/metrics").await;
    let decision = |d: &str| {
        metric_value(
            &text,
            "outrider_slo_decisions_total",
            &[&format!("decision=\"{d}\"")],
        )
    };
    assert_eq!(decision("shed"), Some(1.0));
    assert_eq!(decision("queued"), Some(1.0));
    assert_eq!(decision("admitted"), Some(3.0));
    let waits = |outcome: &str| {
        metric_value(
            &text,
            "outrider_slo_admission_wait_seconds_count",
            &[&format!("outcome=\"{outcome}\"")],
        )
    };
    assert_eq!(waits("shed"), Some(1.0));
    assert_eq!(waits("admitted"), Some(3.0));
    assert_eq!(
        metric_value(
            &text,
            "outrider_slo_concurrency_limit",
            &["route=\"items\""]
        ),
        Some(1.0)
    );
    // The shed request counts against availability: 3 good answers of 4.
    let report = counted(&proxy, "availability", 4).await;
    assert_eq!(
        objective(&report, "items", "availability").unwrap()["windows"]["5m"]["good"],
        3
    );
}

#[tokio::test]
async fn a_queued_request_gets_the_slot_when_it_frees() {
    let app = Backend::start("app").await;
    let slo = "    slo:\n      enforce: { max_concurrency: 1, queue_timeout: 20s }\n";
    let proxy = Proxy::start(&config(&app.url(), slo)).await;
    let first = spawn_get(&proxy, "/slow/500");
    wait_admission(&proxy, "in_flight", 1).await;
    assert_eq!(get_status(&proxy, "/echo/second").await, 200);
    assert_eq!(first.await.unwrap(), 200);
    let text = proxy.admin_text("/metrics").await;
    assert_eq!(
        metric_value(
            &text,
            "outrider_slo_decisions_total",
            &["decision=\"queued\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_request_past_its_deadline_gets_504() {
    let app = Backend::start("app").await;
    let slo = "    slo:\n      enforce: { deadline: 300ms }\n";
    let proxy = Proxy::start(&config(&app.url(), slo)).await;
    let resp = client().get(proxy.url("/slow/3000")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "deadline_exceeded");
    assert_eq!(get_status(&proxy, "/echo/quick").await, 200);
    let text = proxy.admin_text("/metrics").await;
    assert_eq!(
        metric_value(
            &text,
            "outrider_slo_decisions_total",
            &["decision=\"deadline_exceeded\""]
        ),
        Some(1.0)
    );
}

#[test]
fn burn_rate_windows_follow_an_injected_clock() {
    use outrider::slo::window::ManualClock;
    use outrider::slo::{Kind, SloRegistry};
    use std::sync::Arc;
    let clock = Arc::new(ManualClock::new(1_800_000_000));
    let registry = SloRegistry::with_clock(&prometheus::Registry::new(), clock.clone()).unwrap();
    let objective = registry.objective(
        "items",
        "availability",
        Kind::Availability,
        0.999,
        Duration::from_secs(30 * 86_400),
    );
    // The next minute: 50 requests, one of them failed when `failing`.
    let minute = |failing: bool| {
        clock.advance(Duration::from_secs(60));
        for i in 0..50 {
            registry.record(&objective, !(failing && i == 0));
        }
    };
    // An hour at 2 % errors: 20x burn in the 1h and 5m windows → page.
    for _ in 0..60 {
        minute(true);
    }
    let report = outrider::slo::admin::report(&registry);
    let availability = &report["routes"][0]["objectives"][0];
    assert_eq!(availability["state"], "page");
    assert_eq!(availability["windows"]["1h"]["total"], 3000);
    assert_eq!(availability["windows"]["1h"]["good"], 2940);
    // Two clean hours: the short windows clear, the day still burns 6.7x → ticket.
    for _ in 0..120 {
        minute(false);
    }
    let report = outrider::slo::admin::report(&registry);
    let availability = &report["routes"][0]["objectives"][0];
    assert_eq!(availability["windows"]["2h"]["good"], 6000);
    assert_eq!(availability["windows"]["1d"]["total"], 9000);
    assert_eq!(availability["state"], "ticket");
    // Four days later nothing of it is in the burn-rate windows; the SLO window still has it.
    clock.advance(Duration::from_secs(4 * 86_400));
    let report = outrider::slo::admin::report(&registry);
    let availability = &report["routes"][0]["objectives"][0];
    assert_eq!(availability["windows"]["3d"]["total"], 0);
    assert_eq!(availability["windows"]["slo_window"]["total"], 9000);
    assert_eq!(availability["state"], "ok");
}

#[tokio::test]
async fn a_shed_request_is_answered_from_a_stale_entry() {
    let app = Backend::start("app").await;
    let route = "    cache: { ttl: 1s }\n    slo:\n      enforce: { max_concurrency: 1, queue_size: 4, queue_timeout: 100ms }\n";
    let proxy = Proxy::start(&config(&app.url(), route)).await;
    // A validator (ETag) makes the store keep the entry past its stale windows (`keep`).
    let first = client().get(proxy.url("/etag/v1")).send().await.unwrap();
    assert_eq!(first.headers()["x-cache-status"], "MISS");
    let stored = first.text().await.unwrap();
    // Let the entry expire, then fill the only slot.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let holder = spawn_get(&proxy, "/slow/3000");
    wait_admission(&proxy, "in_flight", 1).await;
    let resp = client().get(proxy.url("/etag/v1")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.headers());
    assert_eq!(resp.headers()["x-cache-status"], "STALE");
    assert_eq!(resp.text().await.unwrap(), stored);
    // Without a stored copy, the shed answer stands.
    let resp = client().get(proxy.url("/etag/v2")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(holder.await.unwrap(), 200);
}

fn rate_config(app: &str, redis: &str, shared: bool) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}" }}
cache:
  redis: {{ url: "{redis}", timeout: 200ms }}
routes:
  - name: items
    match: {{ path_prefix: / }}
    upstream: app
    slo:
      rate_limit: {{ rate: 1/m, burst: 2, by: "header:x-api-key", shared: {shared} }}
"#
    )
}

async fn keyed(proxy: &Proxy, key: &str) -> reqwest::Response {
    client()
        .get(proxy.url("/echo/limited"))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn rate_limits_per_key_answer_429_with_ratelimit_headers() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&rate_config(&app.url(), "", false)).await;
    let first = keyed(&proxy, "alpha").await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["ratelimit-policy"], "\"default\";q=2;w=120");
    assert_eq!(first.headers()["ratelimit"], "\"default\";r=1;t=60");
    assert_eq!(keyed(&proxy, "alpha").await.status(), 200);
    let limited = keyed(&proxy, "alpha").await;
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(
        limited.headers()["ratelimit-policy"],
        "\"default\";q=2;w=120"
    );
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    // Another key has its own budget.
    assert_eq!(keyed(&proxy, "beta").await.status(), 200);
}

#[tokio::test]
async fn shared_rate_limits_span_replicas_and_fall_back_to_local_without_redis() {
    let app = Backend::start("app").await;
    let mut redis = Redis::start();
    let config = rate_config(&app.url(), &redis.url(), true);
    let one = Proxy::start(&config).await;
    let two = Proxy::start(&config).await;
    // Both replicas must share the budget from the first request: wait for their connections.
    for proxy in [&one, &two] {
        wait_for("redis to be up", Duration::from_secs(20), || async move {
            let ready: Value = client()
                .get(proxy.admin("/ready"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (ready["checks"]["redis"]["status"] == "up").then_some(())
        })
        .await;
    }
    assert_eq!(keyed(&one, "shared-key").await.status(), 200);
    assert_eq!(keyed(&two, "shared-key").await.status(), 200);
    // The budget of 2 is spent across both replicas.
    assert_eq!(keyed(&one, "shared-key").await.status(), 429);
    assert_eq!(keyed(&two, "shared-key").await.status(), 429);
    // Redis gone: each replica counts locally; nothing fails for want of Redis.
    redis.stop();
    assert_eq!(keyed(&one, "fresh-key").await.status(), 200);
    assert_eq!(keyed(&one, "fresh-key").await.status(), 200);
    assert_eq!(keyed(&one, "fresh-key").await.status(), 429);
    assert_eq!(keyed(&two, "fresh-key").await.status(), 200);
}

#[tokio::test]
async fn lower_priorities_are_shed_first_on_a_shared_upstream() {
    let app = Backend::start("app").await;
    let text = format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{}", timeout: 10s }}
routes:
  - name: low
    match: {{ path_prefix: /slow/40 }}
    upstream: app
    slo: {{ enforce: {{ max_concurrency: 1, queue_timeout: 20s, priority: 0 }} }}
  - name: high
    match: {{ path_prefix: /slow/30 }}
    upstream: app
    slo: {{ enforce: {{ max_concurrency: 1, queue_timeout: 20s, priority: 9 }} }}
"#,
        app.url()
    );
    let proxy = Proxy::start(&text).await;
    let admission = |report: &Value, route: &str| -> Option<(u64, u64)> {
        let entry = report["routes"]
            .as_array()?
            .iter()
            .find(|r| r["route"] == route)?;
        Some((
            entry["admission"]["in_flight"].as_u64()?,
            entry["admission"]["queued"].as_u64()?,
        ))
    };
    // Both routes at their limit of 1.
    let holders: Vec<_> = ["/slow/4000", "/slow/3000"]
        .into_iter()
        .map(|path| {
            let url = proxy.url(path);
            tokio::spawn(async move { client().get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    wait_for("both slots taken", Duration::from_secs(10), || async {
        let report = proxy.admin_json("/slo").await;
        (admission(&report, "low")? == (1, 0) && admission(&report, "high")? == (1, 0))
            .then_some(())
    })
    .await;
    // A high-priority request waits for its slot...
    let high = spawn_get(&proxy, "/slow/300");
    wait_for(
        "the high-priority request to queue",
        Duration::from_secs(10),
        || async {
            let report = proxy.admin_json("/slo").await;
            (admission(&report, "high")?.1 == 1).then_some(())
        },
    )
    .await;
    // ...so a low-priority request over its limit is shed at once instead of waiting 20s.
    let low = client().get(proxy.url("/slow/400")).send().await.unwrap();
    assert_eq!(low.status(), 503);
    assert_eq!(high.await.unwrap(), 200);
    for holder in holders {
        assert_eq!(holder.await.unwrap(), 200);
    }
    // With nobody of higher priority waiting, the low route queues as usual.
    let first = spawn_get(&proxy, "/slow/400");
    wait_for(
        "the low slot to be taken",
        Duration::from_secs(10),
        || async {
            let report = proxy.admin_json("/slo").await;
            (admission(&report, "low")?.0 == 1).then_some(())
        },
    )
    .await;
    assert_eq!(get_status(&proxy, "/slow/401").await, 200);
    assert_eq!(first.await.unwrap(), 200);
}

#[tokio::test]
async fn a_shed_post_with_an_unread_body_closes_its_connection() {
    let app = Backend::start("app").await;
    let slo =
        "    slo:\n      enforce: { max_concurrency: 1, queue_size: 1, queue_timeout: 20s }\n";
    let proxy = Proxy::start(&config(&app.url(), slo)).await;
    let holder = spawn_get(&proxy, "/slow/2000");
    wait_admission(&proxy, "in_flight", 1).await;
    let queued = spawn_get(&proxy, "/echo/queued");
    wait_admission(&proxy, "queued", 1).await;
    // The queue is full: this POST is shed before its body is read, so its connection cannot
    // be reused (the unread body is still on it) and the answer says so.
    let shed = client()
        .post(proxy.url("/echo/upload"))
        .body(vec![b'x'; 10_000])
        .send()
        .await
        .unwrap();
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers()["connection"], "close");
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(queued.await.unwrap(), 200);
}
