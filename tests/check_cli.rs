//! `outrider check`: every kind of mistake is reported as FILE:LINE:COL with a non-zero exit,
//! and valid files pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("OUTRIDER_TEST_UNSET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        stderr,
    )
}

const BASE: &str = "upstreams:\n  app: { url: \"http://127.0.0.1:8000\" }\nroutes:\n  - name: all\n    match: { path_prefix: / }\n    upstream: app\n";

fn assert_fails(text: &str, expected: &[&str]) {
    let (ok, _, stderr) = check(text);
    assert!(!ok, "should fail:\n{text}");
    for e in expected {
        assert!(stderr.contains(e), "expected {e:?} in:\n{stderr}");
    }
    for line in stderr.lines() {
        assert!(
            line.starts_with("FILE:"),
            "every line is FILE:LINE:COL: {line}"
        );
    }
}

#[test]
fn valid_files_pass() {
    let (ok, stdout, stderr) = check(BASE);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok (1 routes, 1 upstreams)"));
    let version = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .arg("version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("outrider "));
}

#[test]
fn unknown_keys() {
    assert_fails(
        &format!("{BASE}listn: 1\n"),
        &["FILE:7:1: unknown field `listn`"],
    );
    assert_fails(
        &BASE.replace("upstream: app", "upstream: app\n    cache: { tll: 5m }"),
        &["FILE:7:14: routes[0].cache: unknown field `tll`"],
    );
}

#[test]
fn wrong_types_and_bad_units() {
    assert_fails(
        &format!("{BASE}threads: many\n"),
        &["FILE:7:10: threads: invalid type"],
    );
    assert_fails(
        &BASE.replace("8000\" }", "8000\", timeout: 3 parsecs }"),
        &[
            "FILE:2:",
            "upstreams.app.timeout: invalid duration \"3 parsecs\"",
        ],
    );
    assert_fails(
        &format!("{BASE}cache: {{ memory: {{ max_size: 12 furlongs }} }}\n"),
        &["cache.memory.max_size: invalid size unit"],
    );
    assert_fails(
        &format!("{BASE}telemetry: {{ access_log: xml }}\n"),
        &["telemetry.access_log: unknown variant `xml`"],
    );
}

#[test]
fn references_and_duplicates() {
    assert_fails(
        &BASE.replace("upstream: app", "upstream: ap"),
        &["FILE:6:15: routes[0].upstream: no upstream named \"ap\" (defined: app)"],
    );
    let dup = format!("{BASE}  - name: all\n    match: {{ path: /x }}\n    upstream: app\n");
    assert_fails(
        &dup,
        &["FILE:7:11: routes[1].name: duplicate route name \"all\""],
    );
}

#[test]
fn several_problems_are_all_listed() {
    let text = "listen: nowhere\nupstreams:\n  app: { url: \"ftp://x\" }\nroutes:\n  - name: a\n    match: { path: nope, methods: [FETCH] }\n    upstream: zzz\n  - name: b\n    match: {}\n    upstream: app\n    bogus: 1\n";
    let (ok, _, stderr) = check(text);
    assert!(!ok);
    for e in [
        "FILE:1:9: listen: \"nowhere\" is not an IP:port",
        "FILE:11:5: routes[1]: unknown field `bogus`",
    ] {
        assert!(stderr.contains(e), "expected {e:?} in:\n{stderr}");
    }
    // Semantic checks run once the structure is valid; fix the unknown key and see them all.
    let (_, _, stderr) = check(&text.replace("    bogus: 1\n", ""));
    for e in [
        "FILE:1:9: listen:",
        "FILE:3:",
        "must start with http:// or https://",
        "FILE:6:",
        "routes[0].match.path: must start with '/'",
        "routes[0].match.methods[0]: unknown HTTP method \"FETCH\"",
        "FILE:7:15: routes[0].upstream: no upstream named \"zzz\"",
        "FILE:9:12: routes[1].match: needs `path` or `path_prefix`",
    ] {
        assert!(stderr.contains(e), "expected {e:?} in:\n{stderr}");
    }
}

#[test]
fn syntax_and_env_errors() {
    assert_fails("routes: [\n  - name: x\n", &["FILE:", "invalid YAML"]);
    assert_fails(
        &format!("{BASE}cache: {{ redis: {{ url: \"${{OUTRIDER_TEST_UNSET}}\" }} }}\n"),
        &[
            "FILE:7:",
            "environment variable OUTRIDER_TEST_UNSET is not set",
        ],
    );
    assert_fails(
        &format!("{BASE}cache: {{ redis: {{ url: \"http://nope\" }} }}\n"),
        &["cache.redis.url: not a valid Redis URL"],
    );
    assert_fails(
        "admin: { listen: 0.0.0.0:8080 }\nupstreams: {}\nroutes: []\n",
        &["admin.listen must differ from listen", "at least one route"],
    );
}

#[test]
fn an_exposed_admin_port_needs_a_token() {
    for listen in ["0.0.0.0:9901", "[::]:9901", "10.0.0.5:9901"] {
        assert_fails(
            &format!("{BASE}admin: {{ listen: \"{listen}\" }}\n"),
            &[&format!(
                "FILE:7:18: admin.listen {listen} is not a loopback address: set admin.token or admin.token_file"
            )],
        );
    }
    let (ok, _, stderr) = check(&format!(
        "{BASE}admin:\n  listen: 0.0.0.0:9901\n  token_file: /run/secrets/outrider/admin-token\n"
    ));
    assert!(
        ok,
        "a token file that does not exist here is read by `run`, not `check`: {stderr}"
    );
    assert_fails(
        &format!(
            "{BASE}admin: {{ listen: 0.0.0.0:9901, token: \"${{OUTRIDER_TEST_UNSET:-}}\" }}\n"
        ),
        &["FILE:7:", "admin.token is empty"],
    );
}

#[test]
fn messages_never_echo_credentials() {
    for (url, secret) in [
        ("http://user:up-s3cret@app:8000", "up-s3cret"),
        ("ftp://user:ftp-s3cret@app", "ftp-s3cret"),
        ("http://app:8000/path?token=tok-s3cret", "tok-s3cret"),
    ] {
        let (ok, _, stderr) = check(&BASE.replace("http://127.0.0.1:8000", url));
        assert!(!ok, "{url} should fail");
        assert!(stderr.contains("***"), "{stderr}");
        assert!(!stderr.contains(secret), "{url}: {stderr}");
    }
    let (ok, _, stderr) = check(&format!(
        "{BASE}cache: {{ redis: {{ url: \"http://:redis-s3cret@nope\" }} }}\n"
    ));
    assert!(!ok);
    assert!(
        stderr.contains("cache.redis.url: not a valid Redis URL"),
        "{stderr}"
    );
    assert!(!stderr.contains("redis-s3cret"), "{stderr}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .args(["check", "--config", "/nonexistent/outrider.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("/nonexistent/outrider.yaml: cannot read config"));
}

/// The exact text users read for each kind of mistake, pinned so a change to it is reviewed
/// (`tests/snapshots/`; update with INSTA_UPDATE=always after checking the diff).
#[test]
fn check_messages_are_stable() {
    let cases: Vec<(&str, String)> = vec![
        ("unknown top-level key", format!("{BASE}listn: 1\n")),
        (
            "unknown key in a capability section",
            BASE.replace("upstream: app", "upstream: app\n    cache: { tll: 5m }"),
        ),
        ("wrong type", format!("{BASE}threads: many\n")),
        (
            "bad duration",
            BASE.replace("8000\" }", "8000\", timeout: 3 parsecs }"),
        ),
        (
            "bad size",
            format!("{BASE}cache: {{ memory: {{ max_size: 12 furlongs }} }}\n"),
        ),
        (
            "unknown upstream and duplicate route",
            format!(
                "{}  - name: all\n    match: {{ path: /x }}\n    upstream: app\n",
                BASE.replace("upstream: app", "upstream: ap")
            ),
        ),
        (
            "capability semantics",
            BASE.replace(
                "upstream: app",
                "upstream: app\n    cache: { ttl: 0s, statuses: [700], key: { headers: [\"bad header\"] } }",
            ),
        ),
        ("zero max_body", BASE.replace("upstream: app", "upstream: app\n    max_body: 0")),
        (
            "models and inference routes",
            format!(
                "{}  - name: infer\n    match: {{ path: /i }}\n    inference: {{ model: nope, shadow: true, fallback: upstream }}\n  - name: noup\n    match: {{ path: /n }}\nmodels:\n  risk: {{ path: \"\", threads: 0, batch: {{ max_size: 0 }}, cache: {{ ttl: 0s }}, inputs: {{ x: {{ type: float32, shape: [0] }} }} }}\n",
                BASE
            ),
        ),
        (
            "upstream_by_header: unknown upstream, cache not keyed on the header",
            BASE.replace(
                "upstream: app",
                "upstream: app\n    upstream_by_header: { header: x-canary, upstreams: { \"1\": canary } }\n    cache: { ttl: 5m }",
            ),
        ),
        ("syntax and semantics together", "listen: nowhere\nupstreams:\n  app: { url: \"ftp://x\" }\nroutes:\n  - name: a\n    match: { path: nope, methods: [FETCH] }\n    upstream: zzz\n  - name: b\n    match: {}\n    upstream: app\n    bogus: 1\n".to_string()),
        ("invalid YAML", "routes: [\n  - name: x\n".to_string()),
        (
            "admin port exposed without a token",
            format!("{BASE}admin: {{ listen: \"0.0.0.0:9901\" }}\n"),
        ),
        (
            "admin settings mistakes",
            format!(
                "{BASE}admin:\n  token: \"two words\"\n  token_file: /run/token\n  allowed_hosts: [\"https://outrider.internal:9901\"]\n  read_timeout: 0s\n"
            ),
        ),
        (
            "connection limits mistakes",
            format!(
                "{BASE}limits:\n  header_timeout: 0s\n  keepalive_timeout: 0s\n  max_header_size: 2MiB\n  max_connections: -1\n"
            ),
        ),
        (
            "connection limits out of range",
            format!("{BASE}limits: {{ header_timeout: 0s, max_header_size: 100 }}\n"),
        ),
    ];
    let mut report = String::new();
    for (name, text) in cases {
        let (ok, _, stderr) = check(&text);
        assert!(!ok, "{name} should fail");
        report.push_str(&format!("## {name}\n{stderr}\n"));
    }
    insta::assert_snapshot!(report);
}

/// A config path that is not a regular file (a FIFO nobody writes, an endless device) is
/// refused at once instead of hanging the check or a reload, or reading without bound.
#[test]
fn special_files_are_refused_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.yaml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for path in [fifo.as_path(), std::path::Path::new("/dev/zero")] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_outrider"))
            .args(["check", "--config"])
            .arg(path)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("outrider check hung on {}", path.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(!status.success());
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(stderr.contains("not a regular file"), "{stderr}");
    }
}

#[test]
fn bad_trace_export_settings() {
    let text = format!(
        "{BASE}telemetry:\n  otlp:\n    endpoint: \"collector:4318\"\n    sample_ratio: 1.5\n    max_queue: 0\n    timeout: 0s\n    headers: {{ \"bad header\": x }}\n    protocl: grpc\n"
    );
    assert_fails(&text, &["unknown field `protocl`"]);
    let text = text.replace("    protocl: grpc\n", "");
    assert_fails(
        &text,
        &[
            "FILE:9:15: telemetry.otlp.endpoint: \"collector:4318\" is not an http:// or https:// URL",
            "FILE:10:19: telemetry.otlp.sample_ratio: 1.5 is not between 0.0 and 1.0",
            "FILE:11:16: telemetry.otlp.max_queue: must be at least 1",
            "FILE:12:14: telemetry.otlp.timeout: must be greater than zero",
            "telemetry.otlp.headers: \"bad header\" is not a valid header name",
        ],
    );
    let (ok, _, stderr) = check(&format!(
        "{BASE}telemetry:\n  otlp: {{ endpoint: \"http://c:4317\", protocol: grpc, sample_ratio: 0.25 }}\n"
    ));
    assert!(ok, "{stderr}");
}

#[test]
fn bad_slo_sections() {
    let route =
        |slo: &str| BASE.replace("upstream: app", &format!("upstream: app\n    slo:\n{slo}"));
    assert_fails(
        &route("      latency: { q95: 80ms, p100: 1s, p50: 0s }\n      window: 10m\n      enforce: {}\n"),
        &[
            "routes[0].slo.latency.q95",
            "latency objectives are named p50, p95, p99, p99.9",
            "the percentile must be between 0 and 100",
            "a latency threshold must be greater than zero",
            "the SLO window must be between 1h and 90d",
            "enforce needs at least one of deadline, max_concurrency or adaptive: true",
        ],
    );
    assert_fails(
        &route("      availability: 100%\n"),
        &["must be above 0% and below 100% (100% leaves no error budget)"],
    );
    assert_fails(
        &route("      rate_limit: { rate: 10/fortnight }\n"),
        &["invalid rate unit \"fortnight\" (s, m or h)"],
    );
    assert_fails(
        &route("      rate_limit: { rate: 10/s, by: cookie, burst: 0 }\n      enforce: { adaptive: true, priority: 12 }\n"),
        &[
            "write client_ip, route or header:<name>",
            "routes[0].slo.rate_limit.burst",
            "an adaptive limit needs a latency objective to aim for (slo.latency)",
            "priority goes from 0 (shed first) to 9 (shed last)",
        ],
    );
    let (ok, _, stderr) = check(&route(
        "      latency: { p95: 80ms, p99.9: 1s }\n      availability: 99.9%\n      enforce: { deadline: 2s, adaptive: true, queue_timeout: 50ms, priority: 5 }\n      rate_limit: { rate: 100/s, burst: 200, by: \"header:x-api-key\", shared: false }\n",
    ));
    assert!(ok, "{stderr}");
}

/// `check` loads every model file as `run` would: a missing file, a file that is not ONNX, or a
/// model whose tensors differ from what the config declares fails the check instead of leaving
/// the started proxy unready.
#[test]
fn model_files_are_loaded_by_check() {
    let model = |path: &str, features: &str| {
        format!(
            "{BASE}models:\n  risk:\n    path: {path}\n    inputs: {{ features: {{ type: float32, shape: {features} }} }}\n"
        )
    };
    let real = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/models/risk.onnx");
    let (ok, _, stderr) = check(&model(real, "[-1, 4]"));
    assert!(ok, "{stderr}");
    assert_fails(
        &model("/nonexistent/risk.onnx", "[-1, 4]"),
        &["models.risk: /nonexistent/risk.onnx: "],
    );
    let not_onnx = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    assert_fails(
        &model(not_onnx, "[-1, 4]"),
        &["models.risk: ", "not a loadable ONNX model"],
    );
    assert_fails(&model(real, "[-1, 5]"), &["models.risk: ", "features"]);
}
