//! Shared helpers for integration tests: a Rust test backend over real sockets, the outrider
//! binary as a child process, a real redis-server, free ports and deadline polling.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test helpers are not the request path; std locks are fine here.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;
type HitCounts = Arc<Mutex<HashMap<String, usize>>>;
type BackendState = (String, HitCounts, Arc<AtomicUsize>, Arc<AtomicBool>);

/// A port nobody listens on right now, never handed out twice by this process.
///
/// Picked below the kernel's ephemeral range (32768+): a port from `bind(0)` can come back from
/// the very next `bind(0)` once released, or be taken as the local end of some outgoing
/// connection before the child process binds it. A random start spreads the test processes that
/// nextest runs side by side over the range.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    const FIRST: u16 = 15_000;
    const SPAN: u16 = 17_000;
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let mut given = GIVEN
        .get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        .unwrap();
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let start = (hasher.finish() % u64::from(SPAN)) as u16;
    for i in 0..SPAN {
        let port = FIRST + (start + i) % SPAN;
        if given.contains(&port) {
            continue;
        }
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

/// Polls `f` until it returns Some or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Serves HTTP/1.1 on `listener`, each request answered by `handle(state, request)`, until
/// `shutdown` fires. Connections live in a set so that stopping the server also cuts them.
pub fn serve<S, F, Fut>(
    listener: tokio::net::TcpListener,
    state: S,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
    handle: F,
) where
    S: Clone + Send + Sync + 'static,
    F: Fn(S, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<BoxBody>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                _ = &mut shutdown => break,
            };
            // Fakes write a response in several writes: no Nagle delay between them.
            let _ = stream.set_nodelay(true);
            while connections.try_join_next().is_some() {}
            let state = state.clone();
            connections.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// A backend that echoes requests as JSON and offers a few behaviours by path:
/// `/slow/{ms}`, `/status/{code}`, `/big/{bytes}`, `/chunked/{n}`, `/headers?name=value` (sets
/// response headers from the query, `status=NNN` the status), `/etag/{tag}` (304 for a matching
/// `If-None-Match`; `?no-cache` adds `Cache-Control: no-cache`); everything else echoes. It counts hits per path.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    hits: HitCounts,
    total: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits: HitCounts = Arc::default();
        let total = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let failing = Arc::new(AtomicBool::new(false));
        let state = (
            name.to_string(),
            hits.clone(),
            total.clone(),
            failing.clone(),
        );
        serve(listener, state, rx, backend_handle);
        Backend {
            addr,
            name: name.to_string(),
            hits,
            total,
            failing,
            _shutdown: tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// While set, every request gets a 503.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    pub fn total_hits(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }
}

fn full(body: impl Into<Bytes>) -> BoxBody {
    Full::new(body.into()).boxed()
}

async fn backend_handle(
    (name, hits, total, failing): BackendState,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let path = req.uri().path().to_string();
    let uri = req.uri().to_string();
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    if uri != path {
        // Targets that are more than a path (absolute-form, queries) are counted as sent too.
        *hits
            .lock()
            .unwrap()
            .entry(format!("uri:{uri}"))
            .or_default() += 1;
    }
    let seq = total.fetch_add(1, Ordering::SeqCst) + 1;
    if failing.load(Ordering::SeqCst) {
        let mut resp = Response::new(full("backend failing"));
        *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
        return resp;
    }
    let query = req.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["slow", ms, ..] => {
            let ms: u64 = ms.parse().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let mut resp = if query.contains("seq") {
                Response::new(full(format!("slept {ms} seq {seq}")))
            } else {
                Response::new(full(format!("slept {ms}")))
            };
            if query.contains("nostore") {
                resp.headers_mut()
                    .insert("cache-control", "no-store".parse().unwrap());
            }
            resp
        }
        ["etag", tag, ..] => {
            // A validator-aware resource: 304 when the client (or outrider) already has it.
            let etag = format!("\"{tag}\"");
            let matches = req
                .headers()
                .get("if-none-match")
                .is_some_and(|v| v.as_bytes() == etag.as_bytes());
            let mut resp = if matches {
                let mut r = Response::new(full(Bytes::new()));
                *r.status_mut() = hyper::StatusCode::NOT_MODIFIED;
                r
            } else {
                Response::new(full(format!("etag body {seq}")))
            };
            resp.headers_mut().insert("etag", etag.parse().unwrap());
            if query.contains("no-cache") {
                resp.headers_mut()
                    .insert("cache-control", "no-cache".parse().unwrap());
            }
            resp
        }
        ["status", code, ..] => {
            let code: u16 = code.parse().unwrap_or(500);
            let mut resp = Response::new(full(format!("status {code}")));
            *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
            resp
        }
        ["big", n, ..] => {
            let n: usize = n.parse().unwrap_or(1 << 20);
            let body: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            Response::new(full(body))
        }
        [.., "graphql"] => graphql_handle(seq, req).await,
        ["chunked", n, ..] => {
            let n: usize = n.parse().unwrap_or(5);
            let stream = futures::stream::iter(
                (0..n).map(|i| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk{i};"))))),
            );
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        _ => {
            let method = req.method().to_string();
            let headers = headers_json(req.headers());
            let mut set_headers = Vec::new();
            if path == "/headers" || path.ends_with("/with-headers") {
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    if let Some((k, v)) = pair.split_once('=') {
                        set_headers
                            .push((k.to_string(), v.replace("%20", " ").replace("%22", "\"")));
                    }
                }
            }
            // A request may ask for an unstorable answer.
            if req.headers().contains_key("x-test-set-cookie") {
                set_headers.push(("set-cookie".to_string(), "sid=1".to_string()));
            }
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let echo = serde_json::json!({
                "backend": name,
                "seq": seq,
                "method": method,
                "path": path,
                "uri": uri,
                "query": query,
                "headers": headers,
                "body_len": body.len(),
                "body_blake3": blake3::hash(&body).to_hex().to_string(),
            });
            let mut resp = Response::new(full(echo.to_string()));
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            for (k, v) in set_headers {
                // `status=NNN` in a with-headers query sets the status instead.
                if k == "status" {
                    if let Ok(code) = v.parse::<u16>() {
                        *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                    }
                    continue;
                }
                resp.headers_mut().append(
                    hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            resp
        }
    }
}

/// Request headers as a JSON object (the last value of a repeated header wins).
fn headers_json(headers: &hyper::HeaderMap) -> serde_json::Map<String, serde_json::Value> {
    headers
        .iter()
        .map(|(k, v)| {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            (k.as_str().to_string(), serde_json::Value::String(v))
        })
        .collect()
}

/// A GraphQL stand-in at `/graphql`: answers `{"data": {"seq", "method", "uri", "received",
/// "headers", "body_length"}}` with the request it got; a query containing `boom` gets an `errors` answer, one
/// containing `slow` is answered after 300 ms, and
/// an `x-test-cache-control` request header becomes the response's `Cache-Control`.
async fn graphql_handle(seq: usize, req: Request<Incoming>) -> Response<BoxBody> {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let cache_control = req.headers().get("x-test-cache-control").cloned();
    let headers = headers_json(req.headers());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let received: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let query = received["query"].as_str().unwrap_or("");
    if query.contains("slow") {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let answer = if query.contains("boom") {
        serde_json::json!({"data": null, "errors": [{"message": "boom"}]})
    } else {
        serde_json::json!({"data": {
            "seq": seq, "method": method, "uri": uri, "received": received, "headers": headers,
            "body_length": body.len(),
        }})
    };
    let mut resp = Response::new(full(answer.to_string()));
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if let Some(cc) = cache_control {
        resp.headers_mut().insert("cache-control", cc);
    }
    resp
}

/// The outrider binary running on a config file in a temp dir; killed on drop.
pub struct Proxy {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    log_path: PathBuf,
}

/// Config text with `{listen}` and `{admin}` placeholders filled in.
pub fn render(template: &str, port: u16, admin_port: u16) -> String {
    template
        .replace("{listen}", &format!("127.0.0.1:{port}"))
        .replace("{admin}", &format!("127.0.0.1:{admin_port}"))
}

impl Proxy {
    /// Starts outrider on `config` (a template with `{listen}`/`{admin}` placeholders).
    pub async fn start(config: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("outrider.yaml");
        Self::start_at(dir, config_path, config, &[]).await
    }

    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("outrider.yaml");
        Self::start_at(dir, config_path, config, env).await
    }

    /// Starts with the config file at `config_path` (which may be a symlink the test sets up).
    pub async fn start_at(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        config: &str,
        env: &[(&str, &str)],
    ) -> Proxy {
        let mut proxy = Self::spawn_at(dir, config_path, config, env);
        proxy.wait_ready().await;
        proxy.wait_for_reachable_redis().await;
        proxy
    }

    /// Starts outrider on `config` whose Redis listens but will never be usable (a black hole,
    /// a certificate it refuses): ready without waiting for Redis to come up.
    pub async fn start_with_unusable_redis(config: &str) -> Proxy {
        let mut proxy = Self::spawn(config);
        proxy.wait_ready().await;
        proxy
    }

    /// Starts outrider on `config` without waiting for anything (for tests of start-up itself).
    pub fn spawn(config: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("outrider.yaml");
        Self::spawn_at(dir, config_path, config, &[])
    }

    fn spawn_at(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        config: &str,
        env: &[(&str, &str)],
    ) -> Proxy {
        let port = free_port();
        let admin_port = free_port();
        let text = render(config, port, admin_port);
        if !config_path.exists() {
            std::fs::write(&config_path, text).expect("write config");
        }
        let log_path = dir.path().join("outrider.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outrider"));
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn outrider");
        Proxy {
            child,
            port,
            admin_port,
            dir,
            config_path,
            log_path,
        }
    }

    pub fn from_parts(
        child: Child,
        port: u16,
        admin_port: u16,
        dir: tempfile::TempDir,
        config_path: PathBuf,
        log_path: PathBuf,
    ) -> Proxy {
        Proxy {
            child,
            port,
            admin_port,
            dir,
            config_path,
            log_path,
        }
    }

    pub async fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.is_ready().await {
            if Instant::now() > deadline {
                panic!("outrider did not become ready; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.is_ready().await {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("outrider exited early ({status}); log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                panic!("outrider did not become ready; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A replica serves before its Redis connection is made, and drops cache writes until then
    /// (by design: Redis never delays a request). Tests that read what a fresh replica wrote
    /// would race that connection, so start-up also waits, boundedly, for `/ready` to report
    /// Redis up when the configured Redis is listening; a Redis that is down or refuses the
    /// handshake on purpose only costs the bound.
    async fn wait_for_reachable_redis(&self) {
        let text = std::fs::read_to_string(&self.config_path).unwrap_or_default();
        let Some(port) = ["redis://127.0.0.1:", "rediss://127.0.0.1:"]
            .iter()
            .find_map(|prefix| {
                let rest = &text[text.find(prefix)? + prefix.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u16>().ok()
            })
        else {
            return;
        };
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let ready = client()
                .get(self.admin("/ready"))
                .send()
                .await
                .ok()
                .map(|r| r.json::<serde_json::Value>());
            if let Some(body) = ready {
                if body
                    .await
                    .ok()
                    .and_then(|b| b["checks"]["redis"]["status"].as_str().map(str::to_owned))
                    .as_deref()
                    == Some("up")
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn is_ready(&self) -> bool {
        let admin_up = client()
            .get(self.admin("/health"))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        admin_up && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// The body of an admin GET (e.g. `/metrics`).
    pub async fn admin_text(&self, path: &str) -> String {
        client()
            .get(self.admin(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The JSON body of an admin GET (e.g. `/slo`).
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.admin_text(path).await).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` to our own child process (through kill(1): the crate forbids unsafe code).
    pub fn signal(&self, sig: i32) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Rewrites the config file in place (placeholders filled with this proxy's ports).
    pub fn write_config(&self, template: &str) {
        let text = render(template, self.port, self.admin_port);
        let tmp = self.config_path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).expect("tmp");
        f.write_all(text.as_bytes()).expect("write");
        f.sync_all().ok();
        std::fs::rename(&tmp, &self.config_path).expect("rename");
    }

    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Waits for the child to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until a metric reaches `want` (requests are counted just after their response is
/// sent, so a scrape right after a response can race the count), then returns the text.
pub async fn metric_eventually(proxy: &Proxy, name: &str, labels: &[&str], want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = proxy.metrics().await;
        let got = metric_value(&text, name, labels);
        if got == Some(want) {
            return text;
        }
        if Instant::now() > deadline {
            panic!("{name}{labels:?} is {got:?}, expected {want}; metrics:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Value of a counter/gauge line in Prometheus text, matched by name and label substrings.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|needle| l.contains(needle)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// A real redis-server on a free loopback port, without persistence; killed on drop.
pub struct Redis {
    pub child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        wait_redis_port(port);
        Redis {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs a redis-cli command against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }
}

/// Waits until a just started redis-server accepts connections on `port`.
pub fn wait_redis_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server did not start on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a redis-cli command against the server on `port`; its stdout.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).to_string()
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// One keep-alive connection speaking HTTP/1.1 with Content-Length bodies.
pub struct Conn {
    reader: std::io::BufReader<std::net::TcpStream>,
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Conn {
    pub fn open(port: u16) -> Conn {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn {
            reader: std::io::BufReader::new(s),
        }
    }

    /// The socket, for tests that watch what the server does with the connection next.
    pub fn into_stream(self) -> std::net::TcpStream {
        self.reader.into_inner()
    }

    pub fn get(&mut self, path: &str) -> Reply {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        self.reader.get_mut().write_all(req.as_bytes()).unwrap();
        self.read_reply()
    }

    pub fn post(&mut self, path: &str, body: &[u8]) -> Reply {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.reader.get_mut().write_all(req.as_bytes()).unwrap();
        self.reader.get_mut().write_all(body).unwrap();
        self.read_reply()
    }

    fn read_reply(&mut self) -> Reply {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line, got {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                headers.push((n.trim().to_string(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).unwrap();
        Reply {
            status,
            headers,
            body,
        }
    }
}
