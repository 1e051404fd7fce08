//! End to end with the shipped example: the FastAPI backend (examples/fastapi-backend) run by
//! uvicorn, and the outrider binary in front of it on the docker-compose demo's config
//! (examples/docker-compose/outrider/outrider.yaml) with loopback ports and no Redis.
//! Everything is checked through outrider: latency headers, a cache hit on a repeated GET,
//! a POST that reaches the app every time, GraphQL, the OpenAI-compatible chat stand-in
//! (plain and SSE) and the ONNX risk model against the generator's own weights.
//!
//! A second test drives the GraphQL route with the real Apollo Client (tests/apollo, pinned by
//! its package-lock.json and installed with `npm ci` by the test).
//!
//! Needs the example's Python packages: run `scripts/install-python-deps.sh` first, and Node.js
//! 18+ with npm.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod support;
use support::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_outrider");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A child process killed (by its PID) and reaped when dropped. Its output goes to a log
/// file that is printed when something goes wrong.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { name, child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the process's output if it has already exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early ({status}); its output:\n{}",
                self.name,
                self.log()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} output ----\n{}", self.name, self.log());
        }
    }
}

/// Fails (does not skip) when the example's Python packages are missing.
fn require_python_deps() {
    let out = Command::new(python())
        .args([
            "-c",
            "import fastapi, uvicorn, strawberry, onnxruntime, numpy",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the FastAPI example's Python packages are not installed for `{}`:\n{}\n\
             run scripts/install-python-deps.sh (from the repository root) and try again",
            python(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "cannot run `{}` ({e}); install Python 3 and run scripts/install-python-deps.sh",
            python()
        ),
    }
}

/// The risk model's weights and bias, from the generator script that wrote risk.onnx.
fn model_weights() -> (Vec<f64>, f64) {
    let out = Command::new(python())
        .arg(root().join("examples/models/gen_risk_model.py"))
        .arg("--print-weights")
        .output()
        .expect("run gen_risk_model.py --print-weights");
    assert!(
        out.status.success(),
        "gen_risk_model.py --print-weights failed: {out:?}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("weights JSON");
    let w = v["weights"]
        .as_array()
        .expect("weights")
        .iter()
        .map(|x| x.as_f64().expect("weight"))
        .collect();
    (w, v["bias"].as_f64().expect("bias"))
}

/// Derives the test config from the docker-compose demo's config: same routes and cache
/// settings, loopback ports, the upstream pointed at the local uvicorn, no Redis.
fn write_config(dir: &Path, listen: u16, admin: u16, app: u16) -> PathBuf {
    let src = root().join("examples/docker-compose/outrider/outrider.yaml");
    let text = std::fs::read_to_string(&src).expect("read example config");
    let mut cfg: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).expect("parse example config");
    cfg["listen"] = format!("127.0.0.1:{listen}").into();
    cfg["admin"]["listen"] = format!("127.0.0.1:{admin}").into();
    cfg["upstreams"]["app"]["url"] = format!("http://127.0.0.1:{app}").into();
    cfg["shutdown"]["grace_period"] = "1s".into();
    // No Redis: L1 only. (Set explicitly: `${REDIS_URL:-}` is interpolated before parsing,
    // and re-serialising would drop the quotes that keep it an empty string.)
    cfg["cache"]["redis"]["url"] = "".into();
    // A directory of its own, like the compose bind mount: outrider watches the directory.
    let conf_dir = dir.join("config");
    std::fs::create_dir_all(&conf_dir).expect("config dir");
    let path = conf_dir.join("outrider.yaml");
    std::fs::write(&path, serde_yaml_ng::to_string(&cfg).expect("yaml")).expect("write config");
    path
}

async fn wait_until_ok(what: &str, url: &str, proc: &mut Proc, timeout: Duration) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        proc.assert_running();
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what} ({url}) not ready after {timeout:?}; output:\n{}",
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

struct Stack {
    base: String,
    admin: String,
    // Declared in drop order: outrider first, then the app.
    _outrider: Proc,
    _app: Proc,
    _dir: tempfile::TempDir,
}

async fn start_stack() -> Stack {
    require_python_deps();
    let dir = tempfile::tempdir().expect("tempdir");
    let (app_port, port, admin_port) = (free_port(), free_port(), free_port());

    let mut uvicorn = Command::new(python());
    uvicorn
        .current_dir(root().join("examples/fastapi-backend"))
        .args([
            "-m",
            "uvicorn",
            "app:app",
            "--host",
            "127.0.0.1",
            "--no-access-log",
        ])
        .args(["--port", &app_port.to_string()])
        .env("APP_DELAY_MS", "2")
        .env("CHAT_TOKEN_DELAY_MS", "0")
        .env("RISK_MODEL_PATH", root().join("examples/models/risk.onnx"));
    let mut app = Proc::spawn(
        "uvicorn (examples/fastapi-backend)",
        uvicorn,
        dir.path().join("app.log"),
    );
    let app_health = format!("http://127.0.0.1:{app_port}/healthz");
    wait_until_ok(
        "the FastAPI example",
        &app_health,
        &mut app,
        Duration::from_secs(60),
    )
    .await;

    let config = write_config(dir.path(), port, admin_port, app_port);
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env_remove("REDIS_URL")
        // The demo's admin.token, as docker-compose.yml passes it.
        .env("OUTRIDER_ADMIN_TOKEN", "deploy-e2e-admin-token");
    let mut outrider = Proc::spawn("outrider", cmd, dir.path().join("outrider.log"));
    let ready = format!("http://127.0.0.1:{admin_port}/ready");
    wait_until_ok("outrider", &ready, &mut outrider, Duration::from_secs(30)).await;

    Stack {
        base: format!("http://127.0.0.1:{port}"),
        admin: format!("http://127.0.0.1:{admin_port}"),
        _outrider: outrider,
        _app: app,
        _dir: dir,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastapi_example_through_outrider() {
    let stack = start_stack().await;
    let c = client();
    let base = &stack.base;

    // ---- latency headers, request id, and a cache MISS then HIT on the cached route
    let first = c
        .get(format!("{base}/api/items/3"))
        .header("x-request-id", "e2e-request-1")
        .send()
        .await
        .expect("GET /api/items/3");
    assert_eq!(first.status(), 200);
    let ms: f64 = header(&first, "x-response-time-ms")
        .expect("x-response-time-ms header")
        .parse()
        .expect("x-response-time-ms is a number");
    assert!(ms >= 0.0);
    let timing = header(&first, "server-timing").expect("server-timing header");
    assert!(
        timing.contains("total"),
        "server-timing without total: {timing}"
    );
    assert_eq!(
        header(&first, "x-request-id"),
        Some("e2e-request-1"),
        "an incoming x-request-id is kept"
    );
    assert_eq!(header(&first, "x-cache-status"), Some("MISS"));
    assert!(
        header(&first, "cache-status").is_some(),
        "cache-status header (RFC 9211)"
    );
    let first_count = header(&first, "x-app-request-count").map(str::to_owned);
    let first_body: Value = first.json().await.unwrap();
    assert_eq!(first_body["id"], 3);

    let second = c.get(format!("{base}/api/items/3")).send().await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(
        header(&second, "x-cache-status"),
        Some("HIT"),
        "repeated GET is a cache hit"
    );
    let generated = header(&second, "x-request-id").expect("x-request-id is generated");
    assert!(!generated.is_empty());
    assert!(
        header(&second, "age").is_some(),
        "a cache hit carries an age header"
    );
    assert_eq!(
        header(&second, "x-app-request-count").map(str::to_owned),
        first_count,
        "a hit replays the stored response"
    );
    let second_body: Value = second.json().await.unwrap();
    assert_eq!(second_body, first_body, "a hit returns the stored body");

    // accept-language is part of the items route's cache key, and so is the query.
    let de = c
        .get(format!("{base}/api/items/3"))
        .header("accept-language", "de")
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&de, "x-cache-status"),
        Some("MISS"),
        "accept-language varies the key"
    );
    let list1 = c
        .get(format!("{base}/api/items?limit=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&list1, "x-cache-status"), Some("MISS"));
    let list1: Value = list1.json().await.unwrap();
    assert_eq!(list1["items"].as_array().map(Vec::len), Some(2));
    let list2 = c
        .get(format!("{base}/api/items?limit=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&list2, "x-cache-status"), Some("HIT"));
    let list3 = c
        .get(format!("{base}/api/items?limit=3"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&list3, "x-cache-status"),
        Some("MISS"),
        "the query is part of the key"
    );

    // ---- the non-cacheable POST reaches the app every time
    let mut counters = Vec::new();
    for i in 0..3 {
        let r = c
            .post(format!("{base}/api/items"))
            .json(&json!({"name": "lamp", "price": 12.5}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "POST /api/items #{i}");
        assert_ne!(header(&r, "x-cache-status"), Some("HIT"));
        assert!(header(&r, "x-response-time-ms").is_some());
        let body: Value = r.json().await.unwrap();
        counters.push(body["counter"].as_i64().expect("counter"));
    }
    assert!(
        counters.windows(2).all(|w| w[1] == w[0] + 1),
        "every POST must reach the app: counters {counters:?}"
    );

    // ---- GraphQL query and mutation
    let q = c
        .post(format!("{base}/graphql"))
        .json(&json!({"query": "query Item($id: Int!) { item(id: $id) { id name price } items(limit: 2) { id } }",
                      "variables": {"id": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(q.status(), 200);
    let q: Value = q.json().await.unwrap();
    assert!(q.get("errors").is_none(), "GraphQL errors: {q}");
    assert_eq!(q["data"]["item"]["id"], 2);
    assert_eq!(q["data"]["item"]["name"], "Item 2");
    assert_eq!(q["data"]["items"].as_array().map(Vec::len), Some(2));
    let m: Value = c
        .post(format!("{base}/graphql"))
        .json(&json!({"query": "mutation { createItem(name: \"gql\", price: 1.5) { counter item { name } } }"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        m["data"]["createItem"]["counter"].as_i64(),
        Some(counters[2] + 1),
        "the mutation reached the app: {m}"
    );

    // ---- OpenAI-compatible chat stand-in, plain and streamed
    let chat_req = json!({"model": "gpt-4o-mini",
                          "messages": [{"role": "user", "content": "What does a sidecar proxy do?"}]});
    let chat = c
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat_req)
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    let chat: Value = chat.json().await.unwrap();
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert_eq!(chat["choices"][0]["finish_reason"], "stop");
    let content = chat["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    assert!(
        content.contains("What does a sidecar proxy do?"),
        "{content}"
    );
    assert!(chat["usage"]["total_tokens"].as_i64().unwrap_or(0) > 0);
    let again: Value = c
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat_req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        again["choices"][0]["message"]["content"],
        content.as_str(),
        "deterministic answer"
    );

    let mut stream_req = chat_req.clone();
    stream_req["stream"] = true.into();
    let sse = c
        .post(format!("{base}/v1/chat/completions"))
        .json(&stream_req)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    assert!(
        header(&sse, "content-type")
            .unwrap_or("")
            .starts_with("text/event-stream"),
        "SSE content type"
    );
    let text = sse.text().await.unwrap();
    let mut streamed = String::new();
    let mut done = false;
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad SSE chunk {line}: {e}"));
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(part) = chunk["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(part);
        }
    }
    assert!(done, "stream ends with data: [DONE]:\n{text}");
    assert_eq!(
        streamed, content,
        "streamed chunks add up to the plain answer"
    );

    // ---- the ONNX risk model (onnxruntime in the app) against the generator's weights
    let (w, b) = model_weights();
    let rows = [
        [0.2, 0.0, 0.3, 0.8],
        [0.5, 2.0, 0.9, 0.2],
        [0.9, 5.0, 1.0, 0.1],
        [0.0, 0.0, 0.0, 0.0],
    ];
    let expected: Vec<f64> = rows
        .iter()
        .map(|x| {
            let z: f64 = x.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + b;
            1.0 / (1.0 + (-z).exp())
        })
        .collect();
    let r = c
        .post(format!("{base}/api/predict/risk"))
        .json(&json!({"features": rows}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "x-response-time-ms").is_some());
    let r: Value = r.json().await.unwrap();
    let got: Vec<f64> = r["risk"]
        .as_array()
        .unwrap_or_else(|| panic!("no risk array: {r}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert!(
            (g - e).abs() < 1e-5,
            "risk {got:?} != sigmoid(X·W+b) {expected:?}"
        );
    }
    let single: Value = c
        .post(format!("{base}/api/predict/risk"))
        .json(&json!({"features": rows[1]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let one = single["risk"][0].as_f64().expect("single-row risk");
    assert!(
        (one - expected[1]).abs() < 1e-5,
        "single flat row: {single}"
    );
    let bad = c
        .post(format!("{base}/api/predict/risk"))
        .json(&json!({"features": [[1.0, 2.0, 3.0]]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400, "a wrong-sized row is a client error");
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["error"], "invalid_features");

    // ---- the default route and the admin side
    let health = c.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = c
        .get(format!("{}/metrics", stack.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "outrider_requests_total",
        "route=\"items\"",
        "route=\"items-write\"",
        "route=\"graphql\"",
        "route=\"chat\"",
        "route=\"risk\"",
        "outrider_cache_requests_total",
        "outcome=\"hit\"",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle}:\n{metrics}"
        );
    }
}

/// Installs the conformance script's pinned packages (from its lockfile) unless present.
fn npm_ci(dir: &Path) {
    if dir.join("node_modules/@apollo/client").exists() {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run npm ({e}); install Node.js 18+ and npm"));
    assert!(out.status.success(), "npm ci failed: {out:?}");
}

/// The real Apollo Client (with its persisted-queries link, from npm) against outrider in
/// front of the example's strawberry app: NOT_FOUND then registration, hash-only afterwards,
/// and `useGETForHashedQueries`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apollo_client_persisted_queries_through_outrider() {
    let dir = root().join("tests/apollo");
    npm_ci(&dir);
    let stack = start_stack().await;
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("apq.mjs")
            .arg(format!("{}/graphql", stack.base))
            .current_dir(&dir)
            .output()
            .map(|out| (out, stack))
    })
    .await
    .unwrap()
    .expect("run node");
    let (out, _stack) = out;
    assert!(out.status.success(), "apq.mjs failed: {out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("apq.mjs JSON");
    let runs = report["runs"].as_array().expect("runs");
    let run = |name: &str| -> &Value {
        runs.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no run {name}: {report}"))
    };
    // (method, sent the query text, error codes) of each HTTP request of a run.
    let requests = |name: &str| -> Vec<(String, bool, Vec<String>)> {
        let r = run(name);
        assert!(r["error"].is_null(), "{name}: {r}");
        r["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| {
                assert_eq!(
                    q["hasHash"], true,
                    "{name}: every request carries the hash: {q}"
                );
                let codes = q["codes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap_or("").to_string())
                    .collect();
                (
                    q["method"].as_str().unwrap().to_string(),
                    q["hasQuery"] == true,
                    codes,
                )
            })
            .collect()
    };
    let not_found = vec!["PERSISTED_QUERY_NOT_FOUND".to_string()];
    assert_eq!(
        requests("first"),
        vec![
            ("POST".into(), false, not_found.clone()),
            ("POST".into(), true, vec![])
        ],
        "NOT_FOUND, then registration"
    );
    assert_eq!(run("first")["data"]["item"]["name"], "Item 1");
    assert_eq!(
        requests("second"),
        vec![("POST".into(), false, vec![])],
        "hash only"
    );
    assert_eq!(run("second")["data"], run("first")["data"]);
    assert_eq!(requests("get-known"), vec![("GET".into(), false, vec![])]);
    assert_eq!(run("get-known")["data"]["item"]["id"], 2);
    assert_eq!(
        requests("get-new"),
        vec![
            ("GET".into(), false, not_found),
            ("POST".into(), true, vec![])
        ],
        "an unknown hash over GET is retried as a POST with the query"
    );
    assert_eq!(requests("get-again"), vec![("GET".into(), false, vec![])]);
    assert_eq!(
        run("get-again")["data"]["items"].as_array().map(Vec::len),
        Some(2)
    );
    let cached = &run("get-cached")["requests"][0];
    assert_eq!(cached["xCacheStatus"], "HIT", "{cached}");
    assert!(
        cached["cacheControl"]
            .as_str()
            .unwrap_or("")
            .starts_with("public, max-age="),
        "a CDN may keep it: {cached}"
    );
}
