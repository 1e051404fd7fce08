//! In-process ONNX inference end to end: the built binary on the example's risk.onnx (and model
//! files made from it in the test), real sockets, a real redis-server, and a small app standing
//! in for the FastAPI endpoint. Expected numbers are onnxruntime's, checked in by
//! `examples/models/gen_risk_model.py --fixtures`.

#![allow(clippy::disallowed_types)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::{client, metric_eventually, metric_value, repo_path, wait_for, Proxy, Redis};

const WEIGHTS: [f64; 4] = [2.5, 0.8, 1.5, -0.6];
const BIAS: f64 = -3.0;

fn fixtures() -> (Vec<Vec<f64>>, Vec<f64>) {
    let text =
        std::fs::read_to_string(repo_path("tests/fixtures/inference/risk_expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let rows = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    let expected = v["onnxruntime"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (rows, expected)
}

fn close(got: &Value, want: f64) -> bool {
    got.as_f64().is_some_and(|g| (g - want).abs() <= 1e-5)
}

/// The model as the FastAPI app computes it (in f64), plus `offset`.
fn reference(row: &[f64], bias: f64, offset: f64) -> f64 {
    let z: f64 = row.iter().zip(WEIGHTS).map(|(x, w)| x * w).sum::<f64>() + bias;
    1.0 / (1.0 + (-z).exp()) + offset
}

/// A stand-in for the FastAPI app's `/api/predict/risk` (same JSON contract); `offset` is added
/// to every answer so a shadow comparison can be made to disagree. Counts its requests.
struct RiskApp {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl RiskApp {
    async fn start(offset: f64) -> RiskApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let counter = counter.clone();
                            async move {
                                counter.fetch_add(1, Ordering::SeqCst);
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                                let features =
                                    v["features"].as_array().cloned().unwrap_or_default();
                                let rows: Vec<Vec<f64>> =
                                    if features.first().is_some_and(Value::is_array) {
                                        features
                                            .iter()
                                            .map(|r| {
                                                r.as_array()
                                                    .unwrap()
                                                    .iter()
                                                    .map(|x| x.as_f64().unwrap())
                                                    .collect()
                                            })
                                            .collect()
                                    } else {
                                        vec![features.iter().map(|x| x.as_f64().unwrap()).collect()]
                                    };
                                let risk: Vec<f64> =
                                    rows.iter().map(|r| reference(r, BIAS, offset)).collect();
                                let answer = json!({"risk": risk, "model": "risk", "model_version": 1, "source": "app"});
                                let mut resp = hyper::Response::new(Full::new(Bytes::from(
                                    answer.to_string(),
                                )));
                                resp.headers_mut()
                                    .insert("content-type", "application/json".parse().unwrap());
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        RiskApp { addr, hits }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A config with the `risk` model at `model` (with `model_extra` keys) and `routes` after the
/// app upstream.
fn config(app: &str, model: &str, model_extra: &str, routes: &str) -> String {
    format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  app: {{ url: "{app}", timeout: 10s }}
models:
  risk:
    path: "{model}"
{model_extra}
routes:
{routes}
"#
    )
}

const RISK_ROUTE: &str = r#"  - name: risk
    match: { path: /api/predict/risk, methods: [POST] }
    upstream: app
    inference:
      model: risk
      protocol: json
      fallback: error
      json: { extra: { model: risk, model_version: 1 }, error_code: invalid_features, max_rows: 16 }
  - name: oip
    match: { path_prefix: /v2/ }
    inference: { protocol: oip }
"#;

fn risk_model() -> String {
    repo_path("examples/models/risk.onnx").display().to_string()
}

/// A copy of risk.onnx in `dir` (so the test may replace or break it).
fn model_copy(dir: &std::path::Path) -> String {
    let path = dir.join("risk.onnx");
    std::fs::copy(repo_path("examples/models/risk.onnx"), &path).unwrap();
    path.display().to_string()
}

/// Replaces a file the way a deploy does: write aside, then rename over it.
fn replace_file(path: &str, bytes: &[u8]) {
    let aside = format!("{path}.new");
    std::fs::write(&aside, bytes).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

async fn post(proxy: &Proxy, path: &str, body: &Value) -> (u16, Value) {
    let resp = client()
        .post(proxy.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })),
    )
}

/// Posts one row (or rows) in the app's JSON shape.
async fn predict(proxy: &Proxy, path: &str, features: Value) -> (u16, Value) {
    post(proxy, path, &json!({ "features": features })).await
}

async fn post_raw(proxy: &Proxy, path: &str, body: &'static str) -> (u16, Value) {
    let resp = client()
        .post(proxy.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn model_version(proxy: &Proxy) -> Option<String> {
    proxy.admin_json("/models").await["models"]["risk"]["version"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test]
async fn the_json_mapping_gives_onnxruntimes_answers() {
    let app = RiskApp::start(0.0).await;
    let proxy = Proxy::start(&config(&app.url(), &risk_model(), "", RISK_ROUTE)).await;
    let (rows, expected) = fixtures();
    // All rows in one request, as a batch.
    let (status, body) = predict(&proxy, "/api/predict/risk", json!(rows)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "risk");
    assert_eq!(body["model_version"], 1);
    let risk = body["risk"].as_array().unwrap();
    assert_eq!(risk.len(), expected.len());
    for (got, want) in risk.iter().zip(&expected) {
        assert!(close(got, *want), "{got} vs {want}");
    }
    // Each row alone, as the app's flat single-row form.
    for (row, want) in rows.iter().zip(&expected) {
        let (status, body) = predict(&proxy, "/api/predict/risk", json!(row)).await;
        assert_eq!(status, 200);
        assert_eq!(body["risk"].as_array().unwrap().len(), 1);
        assert!(close(&body["risk"][0], *want), "{body} vs {want}");
    }
    assert_eq!(app.hits(), 0, "the app is not on the path");
    metric_eventually(
        &proxy,
        "outrider_inference_requests_total",
        &["model=\"risk\"", "outcome=\"ok\""],
        (rows.len() + 1) as f64,
    )
    .await;
    let text = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "outrider_inference_model_loaded",
            &["model=\"risk\""]
        ),
        Some(1.0)
    );
    let version = model_version(&proxy).await.unwrap();
    assert_eq!(
        metric_value(
            &text,
            "outrider_inference_model_info",
            &[&format!("version=\"{version}\"")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn bad_input_gets_400_in_the_protocols_error_format() {
    let app = RiskApp::start(0.0).await;
    let routes = RISK_ROUTE
        .replace("max_rows: 16 }", "max_rows: 16 }\n      max_body: 700B")
        .replace(
            "inference: { protocol: oip }",
            "max_body: 1KiB\n    inference: { protocol: oip, max_body: 700B }",
        );
    let proxy = Proxy::start(&config(&app.url(), &risk_model(), "", &routes)).await;
    let cases: &[(&str, &str)] = &[
        (r#"{"rows": [[1,2,3,4]]}"#, "features: field required"),
        (r#"{"features": [1,2,3]}"#, "row 0 has 3 values, expected 4"),
        (
            r#"{"features": [[1,2,3,4],[1,2]]}"#,
            "row 1 has 2 values, expected 4",
        ),
        (
            r#"{"features": [1,2,"x",4]}"#,
            "row 0 must hold only numbers",
        ),
        (
            r#"{"features": []}"#,
            "features must contain at least one row",
        ),
        (
            r#"{"features": [1,2,1e39,4]}"#,
            "row 0 contains a non-finite value",
        ),
        (r#"{"features": [1,2,NaN,4]}"#, "the body is not valid JSON"),
        (r#"{"features": "#, "the body is not valid JSON"),
        (r#"[1,2,3,4]"#, "the body must be a JSON object"),
    ];
    for (body, message) in cases {
        let (status, answer) = post_raw(&proxy, "/api/predict/risk", body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"], "invalid_features", "{body}");
        assert!(
            answer["message"].as_str().unwrap().contains(message),
            "{body}: {answer}"
        );
    }
    let many: Vec<[f64; 4]> = vec![[0.1, 0.0, 0.2, 0.3]; 17];
    let (status, answer) = predict(&proxy, "/api/predict/risk", json!(many)).await;
    assert_eq!(status, 400);
    assert_eq!(answer["message"], "at most 16 rows per request");

    // OIP errors are `{"error": "<message>"}` (with a stable code beside it).
    let infer = "/v2/models/risk/infer";
    let oip_cases: &[(Value, u16, &str)] = &[
        (
            json!({"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}),
            400,
            "has shape [1, 3], the model wants [-1, 4]",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}),
            400,
            "needs 4 values, got 3",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}),
            400,
            "has datatype INT64, the model wants FP32",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "BYTES", "data": ["a"]}]}),
            400,
            "is not served",
        ),
        (json!({"inputs": []}), 400, "missing input \"features\""),
        (
            json!({"inputs": [{"name": "other", "shape": [1], "datatype": "FP32", "data": [1]}]}),
            400,
            "unknown input \"other\"",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 1e39]}]}),
            400,
            "non-finite",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}], "outputs": [{"name": "nope"}]}),
            400,
            "unknown output \"nope\"",
        ),
        (json!({"no_inputs": true}), 400, "\"inputs\" must be a list"),
    ];
    for (body, status, message) in oip_cases {
        let (got, answer) = post(&proxy, infer, body).await;
        assert_eq!(got, *status, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(message),
            "{body}: {answer}"
        );
    }
    let (status, answer) = post(&proxy, "/v2/models/nope/infer", &json!({"inputs": []})).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let resp = client().get(proxy.url(infer)).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    let resp = client()
        .get(proxy.url("/v2/nothing/here"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // A body over inference.max_body is bad input in the protocol's format; so is one over the
    // route's max_body, which the proxy refuses before reading it.
    let body = |n: usize| format!("{{\"features\": [{}]}}", vec!["0.5"; n].join(","));
    for path in ["/api/predict/risk", "/v2/models/risk/infer"] {
        let resp = client()
            .post(proxy.url(path))
            .body(body(200))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let answer: Value = resp.json().await.unwrap();
        let text = answer.to_string();
        assert!(
            text.contains("larger than inference.max_body (700 bytes)"),
            "{text}"
        );
    }
    let (_, answer) = predict(&proxy, "/api/predict/risk", json!(vec![0.5; 200])).await;
    assert_eq!(answer["error"], "invalid_features");
    let resp = client()
        .post(proxy.url("/v2/models/risk/infer"))
        .body(body(600))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await.unwrap();
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("larger than max_body (1024 bytes)")),
        "{answer}"
    );
    assert_eq!(app.hits(), 0);
    // Still serving after all of that.
    let (status, _) = predict(&proxy, "/api/predict/risk", json!([0.1, 0.2, 0.3, 0.4])).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_open_inference_protocol_endpoints_answer() {
    let app = RiskApp::start(0.0).await;
    let proxy = Proxy::start(&config(&app.url(), &risk_model(), "", RISK_ROUTE)).await;
    let get = |path: &'static str| {
        let url = proxy.url(path);
        async move {
            let resp = client().get(url).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(get("/v2/health/live").await, (200, json!({"live": true})));
    assert_eq!(get("/v2/health/ready").await, (200, json!({"ready": true})));
    let (status, meta) = get("/v2/models/risk").await;
    assert_eq!(status, 200);
    let version = model_version(&proxy).await.unwrap();
    assert_eq!(
        meta,
        json!({
            "name": "risk",
            "versions": [version],
            "platform": "onnx",
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "risk", "datatype": "FP32", "shape": [-1, 1]}],
        })
    );
    assert_eq!(
        get("/v2/models/risk/ready").await,
        (200, json!({"name": "risk", "ready": true}))
    );
    assert_eq!(get("/v2/models/nope").await.0, 404);

    let (rows, expected) = fixtures();
    let flat: Vec<f64> = rows[..3].iter().flatten().copied().collect();
    let request = json!({
        "id": "req-7",
        "inputs": [{"name": "features", "shape": [3, 4], "datatype": "FP32", "data": flat}],
        "outputs": [{"name": "risk"}],
    });
    let (status, answer) = post(&proxy, "/v2/models/risk/infer", &request).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model_name"], "risk");
    assert_eq!(answer["model_version"], version.as_str());
    assert_eq!(answer["id"], "req-7");
    let out = &answer["outputs"][0];
    assert_eq!(
        (out["name"].as_str(), out["datatype"].as_str()),
        (Some("risk"), Some("FP32"))
    );
    assert_eq!(out["shape"], json!([3, 1]));
    for (got, want) in out["data"].as_array().unwrap().iter().zip(&expected[..3]) {
        assert!(close(got, *want));
    }
    // Nested data is accepted too, and a version in the path must be the serving one.
    let nested = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [rows[0].clone()]}]});
    let path = format!("/v2/models/risk/versions/{version}/infer");
    let resp = client()
        .post(proxy.url(&path))
        .json(&nested)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert!(close(&answer["outputs"][0]["data"][0], expected[0]));
    let (status, _) = post(&proxy, "/v2/models/risk/versions/0000/infer", &nested).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn concurrent_requests_run_as_one_batch_and_each_caller_gets_its_rows() {
    let app = RiskApp::start(0.0).await;
    // The batch runs when 8 rows wait; the long max_wait makes that the only trigger.
    let extra = "    batch: { max_size: 8, max_wait: 30s }\n    threads: 2\n";
    let proxy = Proxy::start(&config(&app.url(), &risk_model(), extra, RISK_ROUTE)).await;
    let (rows, expected) = fixtures();
    let calls = rows.iter().map(|row| {
        let url = proxy.url("/api/predict/risk");
        let body = json!({ "features": row });
        async move {
            let resp = client().post(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    });
    let answers = futures::future::join_all(calls).await;
    for (answer, want) in answers.iter().zip(&expected) {
        assert!(close(&answer["risk"][0], *want), "{answer} vs {want}");
    }
    let text = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "outrider_inference_batch_size_count",
            &["model=\"risk\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "outrider_inference_batch_size_sum",
            &["model=\"risk\""]
        ),
        Some(8.0)
    );
}

#[tokio::test]
async fn a_full_queue_answers_503_overloaded_and_a_deadline_504() {
    let app = RiskApp::start(0.0).await;
    // Two requests fill the queue while the batch waits for more rows.
    let extra = "    batch: { max_size: 64, max_wait: 3s }\n    max_queue: 2\n";
    let mut routes = RISK_ROUTE.to_owned();
    routes.push_str(
        r#"  - name: hurried
    match: { path: /hurried/risk, methods: [POST] }
    upstream: app
    slo:
      enforce: { deadline: 300ms }
    inference: { model: risk, fallback: error }
"#,
    );
    let proxy = Proxy::start(&config(&app.url(), &risk_model(), extra, &routes)).await;
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let url = proxy.url("/api/predict/risk");
            tokio::spawn(async move {
                let body = json!({ "features": [0.1 * f64::from(i), 0.0, 0.2, 0.3] });
                client()
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    wait_for("two queued requests", Duration::from_secs(10), || async {
        let text = proxy.metrics().await;
        (metric_value(&text, "outrider_inference_queue_depth", &["model=\"risk\""]) == Some(2.0))
            .then_some(())
    })
    .await;
    let (status, answer) = predict(&proxy, "/api/predict/risk", json!([0.5, 0.5, 0.5, 0.5])).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"], "overloaded");
    for task in waiting {
        assert_eq!(task.await.unwrap(), 200);
    }
    // A request whose deadline passes while its batch waits is answered 504, not left hanging.
    let (status, answer) = predict(&proxy, "/hurried/risk", json!([0.5, 0.5, 0.5, 0.5])).await;
    assert_eq!(status, 504, "{answer}");
    assert_eq!(answer["error"], "deadline_exceeded");
    let text = metric_eventually(
        &proxy,
        "outrider_inference_requests_total",
        &["outcome=\"overloaded\""],
        1.0,
    )
    .await;
    assert_eq!(
        metric_value(
            &text,
            "outrider_inference_requests_total",
            &["outcome=\"deadline\""]
        ),
        Some(1.0)
    );
    assert_eq!(app.hits(), 0);
}

#[tokio::test]
async fn a_replaced_model_file_is_swapped_in_without_a_failed_request() {
    let app = RiskApp::start(0.0).await;
    let dir = tempfile::tempdir().unwrap();
    let path = model_copy(dir.path());
    let proxy = Proxy::start(&config(&app.url(), &path, "", RISK_ROUTE)).await;
    let old = model_version(&proxy).await.unwrap();
    let row = [0.35, 2.0, 0.6, 0.4];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = proxy.url("/api/predict/risk");
    let flag = stop.clone();
    let traffic = tokio::spawn(async move {
        let mut answers = Vec::new();
        while !flag.load(Ordering::SeqCst) {
            let resp = client()
                .post(&url)
                .json(&json!({ "features": row }))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap();
            answers.push((status, body["risk"][0].as_f64()));
        }
        answers
    });
    let bias0 = std::fs::read(repo_path("tests/fixtures/inference/risk_bias0.onnx")).unwrap();
    replace_file(&path, &bias0);
    let new = wait_for("the new version", Duration::from_secs(20), || async {
        model_version(&proxy).await.filter(|v| *v != old)
    })
    .await;
    // The new version answers (bias 0 instead of -3).
    let want = reference(&row, 0.0, 0.0);
    wait_for(
        "an answer of the new model",
        Duration::from_secs(10),
        || async {
            let (_, body) = predict(&proxy, "/api/predict/risk", json!(row)).await;
            close(&body["risk"][0], want).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let answers = traffic.await.unwrap();
    assert!(!answers.is_empty());
    let old_value = reference(&row, BIAS, 0.0);
    for (status, value) in &answers {
        assert_eq!(*status, 200);
        let v = value.unwrap();
        assert!(
            (v - old_value).abs() < 1e-5 || (v - want).abs() < 1e-5,
            "{v}"
        );
    }
    let resp = client()
        .get(proxy.url("/v2/models/risk"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap()["versions"],
        json!([new])
    );
    assert!(proxy.log().contains("model loaded"));
}

#[tokio::test]
async fn a_broken_model_file_keeps_the_old_version_serving() {
    let app = RiskApp::start(0.0).await;
    let dir = tempfile::tempdir().unwrap();
    let path = model_copy(dir.path());
    let proxy = Proxy::start(&config(&app.url(), &path, "", RISK_ROUTE)).await;
    let old = model_version(&proxy).await.unwrap();
    replace_file(&path, b"this is not an onnx model");
    let status = wait_for("the load problem", Duration::from_secs(20), || async {
        let models = proxy.admin_json("/models").await;
        models["models"]["risk"]["error"]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    assert!(
        status.starts_with(&format!("{path}: not a loadable ONNX model")),
        "{status}"
    );
    assert_eq!(model_version(&proxy).await, Some(old.clone()));
    let (code, body) = predict(&proxy, "/api/predict/risk", json!([0.35, 2.0, 0.6, 0.4])).await;
    assert_eq!(code, 200);
    assert!(close(
        &body["risk"][0],
        reference(&[0.35, 2.0, 0.6, 0.4], BIAS, 0.0)
    ));
    // /ready stays 200 (a version serves) and names the problem.
    let resp = client().get(proxy.admin("/ready")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ready: Value = resp.json().await.unwrap();
    let check = ready["checks"]["model:risk"].as_str().unwrap();
    assert!(
        check.contains(&format!("{path}: not a loadable ONNX model")),
        "{check}"
    );
    assert!(check.contains(&old), "{check}");
    assert!(proxy
        .log()
        .contains(&format!("{path}: not a loadable ONNX model")));
    let text = proxy.metrics().await;
    assert!(
        metric_value(
            &text,
            "outrider_inference_model_loads_total",
            &["result=\"failed\""]
        ) >= Some(1.0)
    );
}

#[tokio::test]
async fn without_a_model_fallback_forwards_or_answers_503() {
    let app = RiskApp::start(0.0).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.onnx");
    std::fs::write(&path, b"garbage").unwrap();
    let routes = r#"  - name: forward
    match: { path: /api/predict/risk, methods: [POST] }
    upstream: app
    inference: { model: risk, fallback: upstream }
  - name: refuse
    match: { path: /strict/risk, methods: [POST] }
    upstream: app
    inference: { model: risk, fallback: error }
"#;
    let path = path.display().to_string();
    let proxy = Proxy::spawn(&config(&app.url(), &path, "", routes));
    // Not ready: no version of the model serves; the reason names the file.
    let ready = wait_for("a not-ready answer", Duration::from_secs(20), || async {
        let resp = client().get(proxy.admin("/ready")).send().await.ok()?;
        let body: Value = resp.json().await.ok()?;
        body["checks"]["model:risk"].as_str().map(str::to_owned)
    })
    .await;
    assert!(
        ready.starts_with(&format!("{path}: not a loadable ONNX model")),
        "{ready}"
    );
    let resp = client().get(proxy.admin("/ready")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let (status, body) = predict(&proxy, "/api/predict/risk", json!([0.1, 0.2, 0.3, 0.4])).await;
    assert_eq!(status, 200);
    assert_eq!(body["source"], "app");
    assert_eq!(app.hits(), 1);
    let (status, body) = predict(&proxy, "/strict/risk", json!([0.1, 0.2, 0.3, 0.4])).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "model_unavailable");
    assert_eq!(app.hits(), 1);
    // Fixing the file brings the model in, and the route answers in-process.
    replace_file(&path, &std::fs::read(risk_model()).unwrap());
    wait_for("the model", Duration::from_secs(20), || async {
        model_version(&proxy).await
    })
    .await;
    let (status, body) = predict(&proxy, "/strict/risk", json!([0.1, 0.2, 0.3, 0.4])).await;
    assert_eq!(status, 200);
    assert!(body.get("source").is_none());
    metric_eventually(
        &proxy,
        "outrider_inference_requests_total",
        &["outcome=\"fallback\""],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_model_must_fit_what_the_config_declares() {
    let app = RiskApp::start(0.0).await;
    let static_model = repo_path("tests/fixtures/inference/risk_static.onnx")
        .display()
        .to_string();
    let routes =
        "  - name: oip\n    match: { path_prefix: /v2/ }\n    inference: { protocol: oip }\n";
    let cases = [
        (
            static_model.as_str(),
            "    batch: { max_size: 32 }\n",
            "no dynamic batch (first) dimension",
        ),
        (
            risk_model().leak() as &str,
            "    inputs: { features: { type: float32, shape: [-1, 5] } }\n",
            "input \"features\" has shape [-1, 4] in the model, declared [-1, 5]",
        ),
        (
            risk_model().leak() as &str,
            "    outputs: { score: { type: float32 } }\n",
            "declared output \"score\" is not in the model",
        ),
        (
            risk_model().leak() as &str,
            "    inputs: { features: { type: int64 } }\n",
            "input \"features\" is float32 in the model, declared int64",
        ),
    ];
    for (model, extra, reason) in cases {
        let proxy = Proxy::spawn(&config(&app.url(), model, extra, routes));
        let error = wait_for("the load problem", Duration::from_secs(20), || async {
            let resp = client().get(proxy.admin("/models")).send().await.ok()?;
            let body: Value = resp.json().await.ok()?;
            body["models"]["risk"]["error"].as_str().map(str::to_owned)
        })
        .await;
        assert!(error.contains(reason), "{error}");
        assert!(error.starts_with(model), "{error}");
    }
    // Without batching the static model serves, through OIP, a batch of exactly one row.
    let proxy = Proxy::start(&config(
        &app.url(),
        &static_model,
        "    batch: { max_size: 1 }\n",
        routes,
    ))
    .await;
    let request = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [0.0, 0.0, 0.0, 0.0]}]});
    let (status, answer) = post(&proxy, "/v2/models/risk/infer", &request).await;
    assert_eq!(status, 200, "{answer}");
    assert!(close(
        &answer["outputs"][0]["data"][0],
        reference(&[0.0; 4], BIAS, 0.0)
    ));
    let two = json!({"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": vec![0.0; 8]}]});
    assert_eq!(post(&proxy, "/v2/models/risk/infer", &two).await.0, 400);
}

#[tokio::test]
async fn predictions_are_cached_in_the_shared_store_by_model_version() {
    let redis = Redis::start();
    let app = RiskApp::start(0.0).await;
    let dir = tempfile::tempdir().unwrap();
    let path = model_copy(dir.path());
    let text = config(&app.url(), &path, "    cache: { ttl: 10m }\n", RISK_ROUTE).replace(
        "models:",
        &format!(
            "cache:\n  redis: {{ url: \"{}\", timeout: 500ms }}\nmodels:",
            redis.url()
        ),
    );
    let proxy = Proxy::start(&text).await;
    let body = json!({"features": [0.35, 2.0, 0.6, 0.4]});
    let (_, first) = post(&proxy, "/api/predict/risk", &body).await;
    let (_, second) = post(&proxy, "/api/predict/risk", &body).await;
    assert_eq!(first, second);
    let text = metric_eventually(
        &proxy,
        "outrider_inference_cache_total",
        &["outcome=\"hit\""],
        1.0,
    )
    .await;
    assert_eq!(
        metric_value(
            &text,
            "outrider_inference_requests_total",
            &["outcome=\"cache_hit\""]
        ),
        Some(1.0)
    );
    let keys = wait_for(
        "the prediction in redis",
        Duration::from_secs(10),
        || async {
            let keys = redis.cli(&["--scan", "--pattern", "outrider:v1:inference:risk:*"]);
            (!keys.trim().is_empty()).then_some(keys)
        },
    )
    .await;
    assert_eq!(keys.trim().lines().count(), 1, "{keys}");
    // A new model version never answers from the old version's entries.
    let old = model_version(&proxy).await.unwrap();
    replace_file(
        &path,
        &std::fs::read(repo_path("tests/fixtures/inference/risk_bias0.onnx")).unwrap(),
    );
    wait_for("the new version", Duration::from_secs(20), || async {
        model_version(&proxy).await.filter(|v| *v != old)
    })
    .await;
    let (_, third) = post(&proxy, "/api/predict/risk", &body).await;
    assert!(
        close(
            &third["risk"][0],
            reference(&[0.35, 2.0, 0.6, 0.4], 0.0, 0.0)
        ),
        "{third}"
    );
    metric_eventually(
        &proxy,
        "outrider_inference_cache_total",
        &["outcome=\"miss\""],
        2.0,
    )
    .await;
}

#[tokio::test]
async fn shadow_mode_compares_with_the_app_and_counts_mismatches() {
    let agreeing = RiskApp::start(0.0).await;
    let disagreeing = RiskApp::start(0.1).await;
    let text = format!(
        r#"
listen: "{{listen}}"
admin: {{ listen: "{{admin}}" }}
upstreams:
  agreeing: {{ url: "{}" }}
  disagreeing: {{ url: "{}" }}
models:
  risk: {{ path: "{}" }}
routes:
  - name: same
    match: {{ path: /same/risk, methods: [POST] }}
    upstream: agreeing
    inference: {{ model: risk, shadow: true, tolerance: 0.00001 }}
  - name: different
    match: {{ path: /different/risk, methods: [POST] }}
    upstream: disagreeing
    inference: {{ model: risk, shadow: true }}
"#,
        agreeing.url(),
        disagreeing.url(),
        risk_model()
    );
    let proxy = Proxy::start(&text).await;
    let (rows, _) = fixtures();
    for row in &rows[..4] {
        for path in ["/same/risk", "/different/risk"] {
            let (status, body) = post(&proxy, path, &json!({ "features": row })).await;
            assert_eq!(status, 200);
            assert_eq!(body["source"], "app", "the app answers the client");
        }
    }
    // A request the model refuses is the app's to answer, and is not compared.
    let (status, _) = predict(&proxy, "/same/risk", json!([1, 2])).await;
    assert_eq!(status, 200);
    // Past the route's max_body the proxy refuses in its own shape: in shadow mode the app's
    // contract, not the model's, is what clients know.
    let big = client()
        .post(proxy.url("/same/risk"))
        .header("content-type", "application/json")
        .body(vec![b' '; 5 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    assert_eq!((agreeing.hits(), disagreeing.hits()), (5, 4));
    let text = metric_eventually(
        &proxy,
        "outrider_inference_shadow_total",
        &["route=\"different\"", "result=\"mismatch\""],
        4.0,
    )
    .await;
    let text = if metric_value(
        &text,
        "outrider_inference_shadow_total",
        &["route=\"same\"", "result=\"match\""],
    ) == Some(4.0)
    {
        text
    } else {
        metric_eventually(
            &proxy,
            "outrider_inference_shadow_total",
            &["route=\"same\"", "result=\"match\""],
            4.0,
        )
        .await
    };
    assert_eq!(
        metric_value(
            &text,
            "outrider_inference_shadow_total",
            &["route=\"same\"", "result=\"mismatch\""]
        )
        .unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        metric_value(
            &text,
            "outrider_inference_shadow_mismatch_ratio",
            &["route=\"different\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "outrider_inference_shadow_mismatch_ratio",
            &["route=\"same\""]
        ),
        Some(0.0)
    );
    let log = wait_for("mismatches in the log", Duration::from_secs(10), || async {
        let log = proxy.log();
        log.contains("shadow mismatch").then_some(log)
    })
    .await;
    assert!(
        log.contains("risk[0]: model"),
        "the sample says what differs"
    );
}

#[tokio::test]
async fn a_config_reload_loads_a_model_from_its_new_path_or_keeps_the_old_one() {
    let app = RiskApp::start(0.0).await;
    let proxy = Proxy::start(&config(&app.url(), &risk_model(), "", RISK_ROUTE)).await;
    let old = model_version(&proxy).await.unwrap();
    let bias0 = repo_path("tests/fixtures/inference/risk_bias0.onnx")
        .display()
        .to_string();
    proxy.write_config(&config(&app.url(), &bias0, "", RISK_ROUTE));
    let new = wait_for(
        "the model of the new path",
        Duration::from_secs(20),
        || async { model_version(&proxy).await.filter(|v| *v != old) },
    )
    .await;
    let row = [0.35, 2.0, 0.6, 0.4];
    let (_, body) = predict(&proxy, "/api/predict/risk", json!(row)).await;
    assert!(close(&body["risk"][0], reference(&row, 0.0, 0.0)), "{body}");
    // A path that does not exist: the reload applies, the model keeps its version.
    let missing = "/nonexistent/risk.onnx";
    proxy.write_config(&config(&app.url(), missing, "", RISK_ROUTE));
    let error = wait_for("the load problem", Duration::from_secs(20), || async {
        let models = proxy.admin_json("/models").await;
        models["models"]["risk"]["error"]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    assert!(error.starts_with("/nonexistent/risk.onnx: "), "{error}");
    assert_eq!(model_version(&proxy).await, Some(new));
    let (status, body) = predict(&proxy, "/api/predict/risk", json!(row)).await;
    assert_eq!(status, 200);
    assert!(close(&body["risk"][0], reference(&row, 0.0, 0.0)), "{body}");
}
