//! Graceful shutdown: SIGTERM/SIGINT stop new connections, let in-flight requests finish and
//! exit 0 as soon as nothing is in flight, well before the grace period.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::{client, Backend, Proxy};

fn config(app: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}", timeout: 10s }}
shutdown:
  grace_period: 20s
routes:
  - name: all
    match: {{ path_prefix: / }}
    upstream: app
"#
    )
}

async fn drains_on(signal: i32) {
    let app = Backend::start("app").await;
    let mut proxy = Proxy::start(&config(&app.url())).await;
    let url = proxy.url("/slow/1500");
    let in_flight = tokio::spawn(async move {
        let resp = client().get(url).send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    });
    // Signal only once the slow request has reached the backend.
    support::wait_for(
        "the slow request upstream",
        Duration::from_secs(10),
        || async { (app.hits("/slow/1500") == 1).then_some(()) },
    )
    .await;
    let signalled = Instant::now();
    proxy.signal(signal);

    // Readiness flips to draining so an orchestrator stops routing here.
    // The slow request is still in flight (1.5 s), so the admin port is still up meanwhile.
    let admin = proxy.admin("/ready");
    support::wait_for(
        "/ready to report draining",
        Duration::from_secs(5),
        || async {
            let ready = client().get(&admin).send().await.ok()?;
            (ready.status() == 503).then_some(())
        },
    )
    .await;

    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "the in-flight request completes");
    assert_eq!(body, "slept 1500");
    let exit = tokio::task::spawn_blocking(move || {
        let status = proxy.wait_exit(Duration::from_secs(15));
        (status, proxy.log())
    })
    .await
    .unwrap();
    let (status, log) = exit;
    let status = status.unwrap_or_else(|| panic!("outrider did not exit; log:\n{log}"));
    assert!(status.success(), "exit 0, got {status}; log:\n{log}");
    // Exits once drained rather than sleeping the whole 20 s grace period (generous bound).
    assert!(
        signalled.elapsed() < Duration::from_secs(12),
        "{:?}",
        signalled.elapsed()
    );
    assert!(log.contains("drained; exiting"), "{log}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    drains_on(libc::SIGTERM).await;
}

#[tokio::test]
async fn sigint_drains_too() {
    drains_on(libc::SIGINT).await;
}

#[tokio::test]
async fn idle_proxy_exits_promptly_and_stops_accepting() {
    let app = Backend::start("app").await;
    let mut proxy = Proxy::start(&config(&app.url())).await;
    let port = proxy.port;
    proxy.signal(libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || {
        let s = proxy.wait_exit(Duration::from_secs(10));
        (s, proxy)
    })
    .await
    .unwrap();
    assert!(status.0.expect("exited").success());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "listener closed"
    );
}

/// A response stored just before SIGTERM still reaches Redis: the drain waits for queued
/// writes (here held up by a paused Redis) instead of exiting as soon as no request is left.
#[tokio::test]
async fn queued_redis_writes_are_finished_before_exit() {
    let app = Backend::start("app").await;
    let redis = support::Redis::start();
    let cfg = format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{}", timeout: 10s }}
cache:
  redis: {{ url: "{}", timeout: 200ms }}
  max_entry_size: 32MiB
shutdown:
  grace_period: 20s
routes:
  - name: items
    match: {{ path_prefix: / }}
    upstream: app
    cache: {{ ttl: 5m }}
"#,
        app.url(),
        redis.url()
    );
    let mut proxy = Proxy::start(&cfg).await;
    let ready = proxy.admin("/ready");
    support::wait_for("redis up", Duration::from_secs(10), || async {
        let body = client().get(&ready).send().await.ok()?.text().await.ok()?;
        body.contains("\"up\"").then_some(())
    })
    .await;
    let pause = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &redis.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    pause("-STOP");
    // Larger than loopback socket buffers: the SET cannot be handed to the kernel while Redis
    // is paused, so it is still queued in outrider when the signal arrives.
    let resp = client()
        .get(proxy.url("/big/25165824"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache-status"], "MISS");
    assert_eq!(resp.bytes().await.unwrap().len(), 25_165_824);
    proxy.signal(libc::SIGTERM);
    // Long enough for the old behaviour (exit ~0.1 s after the last request) to lose the write.
    tokio::time::sleep(Duration::from_millis(600)).await;
    pause("-CONT");
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = proxy.wait_exit(Duration::from_secs(15));
        (status, proxy.log())
    })
    .await
    .unwrap();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    let keys = redis.cli(&["--scan", "--pattern", "*/big/*"]);
    assert!(keys.contains("/big/25165824"), "keys: {keys:?}\n{log}");
}

/// A rollout loses no request of a client that honours `Connection: close`: after the signal
/// the proxy keeps serving for `ready_delay` while `/ready` says 503, and every response —
/// including one already in flight at the signal — tells the client to reconnect.
#[tokio::test]
async fn during_the_ready_delay_every_response_says_connection_close() {
    let app = Backend::start("app").await;
    let cfg =
        config(&app.url()).replace("grace_period: 20s", "grace_period: 20s\n  ready_delay: 2s");
    let mut proxy = Proxy::start(&cfg).await;
    let port = proxy.port;
    // One connection with a request in flight across the signal, one idle keep-alive one.
    let in_flight = tokio::task::spawn_blocking(move || {
        let mut conn = support::Conn::open(port);
        conn.get("/slow/1000")
    });
    let idle = tokio::task::spawn_blocking(move || {
        let mut conn = support::Conn::open(port);
        let first = conn.get("/echo/first");
        (conn, first)
    })
    .await
    .unwrap();
    let (mut idle_conn, first) = idle;
    assert_eq!(first.status, 200);
    assert_ne!(first.header("connection"), Some("close"));
    support::wait_for(
        "the slow request upstream",
        Duration::from_secs(10),
        || async { (app.hits("/slow/1000") == 1).then_some(()) },
    )
    .await;
    proxy.signal(libc::SIGTERM);
    let admin = proxy.admin("/ready");
    support::wait_for("/ready 503", Duration::from_secs(5), || async {
        let ready = client().get(&admin).send().await.ok()?;
        (ready.status() == 503).then_some(())
    })
    .await;
    let (reused, fresh) = tokio::task::spawn_blocking(move || {
        let reused = idle_conn.get("/echo/after-signal");
        let fresh = support::Conn::open(port).get("/echo/new-connection");
        (reused, fresh)
    })
    .await
    .unwrap();
    for reply in [&reused, &fresh] {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("connection"), Some("close"));
    }
    let slow = in_flight.await.unwrap();
    assert_eq!(slow.status, 200);
    assert_eq!(
        slow.header("connection"),
        Some("close"),
        "in flight at the signal"
    );
    let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(status.is_some_and(|s| s.success()));
}
