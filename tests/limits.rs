//! Connection limits on the traffic port (`limits:`), over raw sockets: a head that drips in is
//! cut, an idle keep-alive connection is closed, an oversized head is refused with 431, and
//! connections over the cap are refused while those within it keep working. Timeouts are short
//! in these configs; assertions wait with generous deadlines and never on a tight clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{metric_eventually, metric_value, wait_for, Backend, Conn, Proxy};

fn config(app: &str, limits: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}", timeout: 5s }}
limits: {limits}
routes:
  - name: all
    match: {{ path_prefix: / }}
    upstream: app
"#
    )
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads until the server closes (or resets) the connection; what arrived before that.
fn read_until_closed(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Whether the server has closed `s` (EOF or reset) — waiting at most `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut chunk = [0u8; 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test]
async fn a_dripping_head_is_cut_after_the_header_timeout() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(
        &app.url(),
        "{ header_timeout: 500ms, keepalive_timeout: 60s }",
    ))
    .await;
    let port = proxy.port;
    let (answer, elapsed) = blocking(move || {
        let mut s = connect(port);
        let started = Instant::now();
        s.write_all(b"GET /drip HTTP/1.1\r\nHost: t\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        // One header line every 100 ms would never end; stop once the server answers or closes.
        for i in 0..300 {
            if s.write_all(format!("X-Drip-{i}: 1\r\n").as_bytes())
                .is_err()
            {
                break;
            }
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    got.extend_from_slice(&chunk[..n]);
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    got.extend_from_slice(read_until_closed(&mut s).as_bytes());
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        (
            String::from_utf8_lossy(&got).into_owned(),
            started.elapsed(),
        )
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("\"error\":\"request_timeout\""), "{answer}");
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(20), "cut, not left open");
    assert_eq!(app.hits("/drip"), 0);

    // A connection that sends nothing at all is closed silently after the same time.
    let silent = blocking(move || closed_within(&mut connect(port), Duration::from_secs(10))).await;
    assert!(silent, "a silent connection is closed");
    metric_eventually(
        &proxy,
        "outrider_connections_closed_by_limit_total",
        &["reason=\"header_timeout\""],
        2.0,
    )
    .await;
}

#[tokio::test]
async fn an_idle_keepalive_connection_is_closed_but_a_later_head_gets_its_own_clock() {
    let app = Backend::start("app").await;
    // Idle: 300 ms. Head: 300 ms, counted from a head's first byte, not from the last answer.
    let proxy = Proxy::start(&config(
        &app.url(),
        "{ header_timeout: 300ms, keepalive_timeout: 300ms }",
    ))
    .await;
    let port = proxy.port;
    let closed = blocking(move || {
        let mut c = Conn::open(port);
        assert_eq!(c.get("/one").status, 200);
        let mut s = c.into_stream();
        closed_within(&mut s, Duration::from_secs(10))
    })
    .await;
    assert!(closed, "the idle connection is closed");
    metric_eventually(
        &proxy,
        "outrider_connections_closed_by_limit_total",
        &["reason=\"idle_timeout\""],
        1.0,
    )
    .await;

    // With a long idle timeout, a request sent well after the head timeout has passed since
    // the previous answer is served on the same connection.
    let proxy = Proxy::start(&config(
        &app.url(),
        "{ header_timeout: 300ms, keepalive_timeout: 60s }",
    ))
    .await;
    let port = proxy.port;
    blocking(move || {
        let mut c = Conn::open(port);
        assert_eq!(c.get("/first").status, 200);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(c.get("/second").status, 200);
    })
    .await;
}

#[tokio::test]
async fn an_oversized_head_gets_431_and_the_connection_closes() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), "{ max_header_size: 4KiB }")).await;
    let port = proxy.port;
    let send = |filler: usize| {
        blocking(move || {
            let mut s = connect(port);
            let req = format!(
                "GET /big HTTP/1.1\r\nHost: t\r\nX-Filler: {}\r\n\r\n",
                "a".repeat(filler)
            );
            // The server stops reading a head over the cap: a very large one may not fit.
            let _ = s.write_all(req.as_bytes());
            read_until_closed(&mut s)
        })
    };
    // Within the cap: served as usual.
    let small = blocking(move || {
        let mut s = connect(port);
        let req = format!(
            "GET /small HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Filler: {}\r\n\r\n",
            "a".repeat(3000)
        );
        s.write_all(req.as_bytes()).unwrap();
        read_until_closed(&mut s)
    })
    .await;
    assert!(small.starts_with("HTTP/1.1 200"), "{small}");
    let big = send(8 * 1024).await;
    assert!(
        big.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
        "{big}"
    );
    assert!(big.contains("\"error\":\"header_too_large\""), "{big}");
    assert!(big.to_ascii_lowercase().contains("connection: close"));
    // Far over it (and over Pingora's own 1 MiB): refused, never buffered whole.
    let huge = send(3 << 20).await;
    assert!(
        huge.is_empty() || huge.starts_with("HTTP/1.1 431"),
        "{huge:.200}"
    );
    assert_eq!(app.hits("/big"), 0);
    metric_eventually(
        &proxy,
        "outrider_connections_closed_by_limit_total",
        &["reason=\"header_too_large\""],
        2.0,
    )
    .await;
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_and_those_within_keep_working() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(&app.url(), "{ max_connections: 4 }")).await;
    let port = proxy.port;
    let mut held = blocking(move || {
        (0..4)
            .map(|_| {
                let mut c = Conn::open(port);
                assert_eq!(c.get("/held").status, 200);
                c
            })
            .collect::<Vec<_>>()
    })
    .await;
    metric_eventually(&proxy, "outrider_connections_open", &[], 4.0).await;

    let refused = blocking(move || {
        let mut s = connect(port);
        let _ = s.write_all(b"GET /over HTTP/1.1\r\nHost: t\r\n\r\n");
        read_until_closed(&mut s)
    })
    .await;
    assert!(
        refused.is_empty() || refused.starts_with("HTTP/1.1 503"),
        "{refused}"
    );
    if !refused.is_empty() {
        assert!(refused.contains("too_many_connections"), "{refused}");
    }
    assert_eq!(app.hits("/over"), 0);
    let metrics = proxy.metrics().await;
    assert!(
        metric_value(&metrics, "outrider_connections_refused_total", &[]).unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );

    // The admitted connections are unaffected.
    held = blocking(move || {
        for c in held.iter_mut() {
            assert_eq!(c.get("/again").status, 200);
        }
        held
    })
    .await;
    // A freed slot admits a new connection.
    drop(held.pop());
    metric_eventually(&proxy, "outrider_connections_open", &[], 3.0).await;
    let status = blocking(move || Conn::open(port).get("/fresh").status).await;
    assert_eq!(status, 200);
    drop(held);
    wait_for(
        "all connections closed",
        Duration::from_secs(10),
        || async {
            let m = proxy.metrics().await;
            (metric_value(&m, "outrider_connections_open", &[]) == Some(0.0)).then_some(())
        },
    )
    .await;
}

/// Bodies buffered for stages count against one process-wide bound: a body that would go over
/// it is refused with a JSON 503 at once, and the bytes come back when a request ends.
#[tokio::test]
async fn buffered_bodies_beyond_the_global_bound_get_503() {
    let app = Backend::start("app").await;
    let cfg = format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{}", timeout: 5s }}
limits: {{ max_buffered_bodies: 100KiB }}
routes:
  - name: upload
    match: {{ path_prefix: / }}
    upstream: app
    max_body: 1MiB
    buffer_request: true
"#,
        app.url()
    );
    let proxy = Proxy::start(&cfg).await;
    let port = proxy.port;
    let post = |len: usize| {
        format!(
            "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
    };
    // The first upload declares 80 KiB and sends all but 1 KiB of it: those bytes are held.
    let mut first = connect(port);
    first.write_all(post(80 * 1024).as_bytes()).unwrap();
    first.write_all(&[b'a'; 79 * 1024]).unwrap();
    // A 40 KiB body no longer fits: refused before it is read, so the test sends only the head
    // (an unread body would make the close a reset that can swallow the answer). Until the
    // first body's bytes have been read, the second just waits for its body; try again.
    let second = wait_for(
        "the bound to be reached",
        Duration::from_secs(20),
        || async move {
            let answer = blocking(move || {
                let mut s = connect(port);
                s.write_all(post(40 * 1024).as_bytes()).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                read_until_closed(&mut s)
            })
            .await;
            (!answer.is_empty()).then_some(answer)
        },
    )
    .await;
    assert!(second.starts_with("HTTP/1.1 503"), "{second}");
    assert!(second.contains("\"error\":\"overloaded\""), "{second}");
    let metrics = proxy.metrics().await;
    assert!(
        metric_value(&metrics, "outrider_request_bodies_over_budget_total", &[]).unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
    // The first upload completes normally, and its bytes are given back.
    let first_answer = blocking(move || {
        first.write_all(&[b'a'; 1024]).unwrap();
        read_until_closed(&mut first)
    })
    .await;
    assert!(first_answer.starts_with("HTTP/1.1 200"), "{first_answer}");
    assert!(
        first_answer.contains("\"body_len\":81920"),
        "{first_answer}"
    );
    // The first request's bytes are given back when it ends (just after its answer is sent).
    let third = wait_for(
        "the budget to be free",
        Duration::from_secs(20),
        || async move {
            blocking(move || {
                let mut s = connect(port);
                s.write_all(post(90 * 1024).as_bytes()).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let mut early = [0u8; 64];
                if matches!(s.read(&mut early), Ok(n) if n > 0) {
                    return None; // refused before its body: not yet
                }
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(&[b'c'; 90 * 1024]).unwrap();
                Some(read_until_closed(&mut s))
            })
            .await
        },
    )
    .await;
    assert!(third.starts_with("HTTP/1.1 200"), "{third}");
}

/// Only heads count against the head limits: bodies larger than `max_header_size`, sent on a
/// keep-alive connection between heads, pass, and every next head is judged on its own.
#[tokio::test]
async fn bodies_between_heads_on_a_keepalive_connection_are_not_heads() {
    let app = Backend::start("app").await;
    let proxy = Proxy::start(&config(
        &app.url(),
        "{ max_header_size: 1KiB, header_timeout: 5s, keepalive_timeout: 60s }",
    ))
    .await;
    let port = proxy.port;
    blocking(move || {
        let mut c = Conn::open(port);
        // Bodies that end in a blank line, to tempt a head scanner.
        let body = [&[b'x'; 4096][..], b"\r\n\r\n"].concat();
        for i in 0..20 {
            let reply = c.post(&format!("/post/{i}"), &body);
            assert_eq!(
                reply.status,
                200,
                "{}",
                String::from_utf8_lossy(&reply.body)
            );
            let echo: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(echo["body_len"], 4100);
            assert_eq!(c.get(&format!("/get/{i}")).status, 200);
        }
    })
    .await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "outrider_connections_closed_by_limit_total", &[]),
        Some(0.0),
        "{m}"
    );
}

#[tokio::test]
async fn an_upload_refused_mid_flight_still_reads_its_413() {
    let app = Backend::start("app").await;
    let config = format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{}", timeout: 5s }}
routes:
  - name: uploads
    match: {{ path_prefix: / }}
    upstream: app
    buffer_request: true
    max_body: 1KiB
"#,
        app.url()
    );
    let proxy = Proxy::start(&config).await;
    let port = proxy.port;
    let (sent, answer) = blocking(move || {
        let mut s = connect(port);
        // Refused from its Content-Length while the client is still sending: outrider keeps
        // reading (and discarding) until the client is done, so its answer is not reset away.
        let size = 12 * 1024 * 1024;
        s.write_all(
            format!("POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let chunk = vec![b'x'; 16 * 1024];
        let mut sent = 0;
        while sent < size && s.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        (sent, read_until_closed(&mut s))
    })
    .await;
    // A client that stops at a failed write never reads the answer (hyper reports the broken
    // pipe): every byte must have been accepted.
    assert_eq!(sent, 12 * 1024 * 1024, "{answer:?}");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    assert_eq!(app.total_hits(), 0);
}
