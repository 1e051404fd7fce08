//! A fake LLM provider over real sockets, speaking the OpenAI (`/v1/chat/completions`,
//! `/v1/embeddings`) and Anthropic (`/v1/messages`) shapes, streamed and not, with `usage`.
//! Streams are written as the providers write them: one event per write, some events split
//! across two writes, CRLF-free `\n\n` framing. The answer echoes the last user message and the
//! provider's call number, so a test can tell a replay from a new call.
//!
//! Behaviour by the `x-fake` request header: `429` (rate limited, `Retry-After: 7`), `500`,
//! `slow` (a stream that sends three events, waits for [`FakeProvider::open_gate`], then sends
//! 40 more 20 ms apart, noting whether its reader went away; a whole answer that waits for the
//! gate), `early-close` (a stream that ends before its terminal event).
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use serde_json::{json, Value};

use crate::support::BoxBody;

/// One request the provider received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Shared {
    seen: Mutex<Vec<Seen>>,
    calls: AtomicUsize,
    /// Slow streams whose reader went away before the end.
    abandoned: AtomicUsize,
    /// Slow streams written to the end.
    completed: AtomicUsize,
    /// Slow streams wait here after their first events.
    gate: tokio::sync::Semaphore,
}

pub struct FakeProvider {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl FakeProvider {
    pub async fn start() -> FakeProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            seen: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        crate::support::serve(listener, shared.clone(), rx, handle);
        FakeProvider {
            addr,
            shared,
            _shutdown: tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests answered so far.
    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen()
            .last()
            .cloned()
            .expect("a request reached the provider")
    }

    pub fn abandoned(&self) -> usize {
        self.shared.abandoned.load(Ordering::SeqCst)
    }

    /// Lets one waiting slow stream go on.
    pub fn open_gate(&self) {
        self.shared.gate.add_permits(1);
    }

    pub fn completed(&self) -> usize {
        self.shared.completed.load(Ordering::SeqCst)
    }
}

fn full(status: u16, headers: &[(&str, &str)], body: String) -> Response<BoxBody> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body)).boxed()).unwrap()
}

fn last_user_text(body: &Value) -> String {
    let Some(messages) = body["messages"].as_array() else {
        return String::new();
    };
    let Some(last) = messages.last() else {
        return String::new();
    };
    match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

async fn handle(state: Arc<Shared>, req: Request<Incoming>) -> Response<BoxBody> {
    let path = req.uri().path().to_owned();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let fake = req
        .headers()
        .get("x-fake")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let n = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
    state.seen.lock().unwrap().push(Seen {
        path: path.clone(),
        headers,
        body: body.clone(),
    });
    let anthropic = path.ends_with("/messages");
    match fake.as_str() {
        "429" => {
            let body = if anthropic {
                json!({"type":"error","error":{"type":"rate_limit_error","message":"slow down"}})
            } else {
                json!({"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}})
            };
            return full(
                429,
                &[("content-type", "application/json"), ("retry-after", "7")],
                body.to_string(),
            );
        }
        "500" => {
            return full(
                500,
                &[("content-type", "application/json")],
                json!({"error":{"message":"boom","type":"server_error","param":null,"code":null}})
                    .to_string(),
            )
        }
        _ => {}
    }
    let model = body["model"].as_str().unwrap_or("none").to_owned();
    if path.ends_with("/embeddings") {
        let out = json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, n as f64]}],
            "model": model,
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        });
        return full(
            200,
            &[("content-type", "application/json")],
            out.to_string(),
        );
    }
    let text = format!("echo {} #{n}", last_user_text(&body));
    let stream = body["stream"].as_bool().unwrap_or(false);
    if !stream && fake == "slow" {
        // A slow answer: held until the test opens the gate.
        if let Ok(permit) = state.gate.acquire().await {
            permit.forget();
        }
    }
    if !stream {
        let out = if anthropic {
            json!({
                "id": format!("msg_{n}"), "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 12, "output_tokens": 6},
            })
        } else {
            json!({
                "id": format!("chatcmpl-{n}"), "object": "chat.completion", "created": 1_700_000_000,
                "model": model, "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null},
                             "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
            })
        };
        return full(
            200,
            &[("content-type", "application/json")],
            out.to_string(),
        );
    }
    let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
    let mut events = if anthropic {
        anthropic_events(n, &model, &text)
    } else {
        openai_events(n, &model, &text, include_usage)
    };
    let slow = fake == "slow";
    if slow {
        // Many more content events, so the stream outlives a client that goes away.
        let filler: Vec<String> = (0..40)
            .map(|i| {
                openai_chunk(
                    n,
                    &model,
                    json!({"content": format!(" {i}")}),
                    None,
                    include_usage,
                )
            })
            .collect();
        events.splice(3..3, filler);
    }
    if fake == "early-close" {
        events.truncate(events.len() / 2);
    }
    if fake == "stream-error" && !anthropic {
        // What vLLM sends when generation fails mid-way: an error chunk, then `[DONE]`.
        events.truncate(2);
        events.push(format!(
            "data: {}\n\n",
            json!({"error": {"message": "generation failed", "type": "server_error", "code": 500}})
        ));
        events.push("data: [DONE]\n\n".to_owned());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        for (i, event) in events.into_iter().enumerate() {
            let bytes = event.into_bytes();
            // Every third event arrives in two writes, split mid-line.
            let parts: Vec<Bytes> = if i % 3 == 2 && bytes.len() > 8 {
                let mid = bytes.len() / 2;
                vec![
                    Bytes::copy_from_slice(&bytes[..mid]),
                    Bytes::copy_from_slice(&bytes[mid..]),
                ]
            } else {
                vec![Bytes::from(bytes)]
            };
            for part in parts {
                if tx.send(Ok(Frame::data(part))).await.is_err() {
                    if slow {
                        state.abandoned.fetch_add(1, Ordering::SeqCst);
                    }
                    return;
                }
            }
            if slow && i == 2 {
                if let Ok(permit) = state.gate.acquire().await {
                    permit.forget();
                }
            } else if slow && i > 2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        if slow {
            state.completed.fetch_add(1, Ordering::SeqCst);
        }
    });
    let frames =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let body = StreamBody::new(frames);
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(body))
        .unwrap()
}

fn openai_chunk(
    n: usize,
    model: &str,
    delta: Value,
    finish: Option<&str>,
    include_usage: bool,
) -> String {
    let mut chunk = json!({
        "id": format!("chatcmpl-{n}"), "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": model, "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    });
    if include_usage {
        chunk["usage"] = Value::Null;
    }
    format!("data: {chunk}\n\n")
}

fn openai_events(n: usize, model: &str, text: &str, include_usage: bool) -> Vec<String> {
    let mut events = vec![openai_chunk(
        n,
        model,
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
        include_usage,
    )];
    for word in text.split_inclusive(' ') {
        events.push(openai_chunk(
            n,
            model,
            json!({"content": word}),
            None,
            include_usage,
        ));
    }
    events.push(openai_chunk(
        n,
        model,
        json!({}),
        Some("stop"),
        include_usage,
    ));
    if include_usage {
        let usage = json!({
            "id": format!("chatcmpl-{n}"), "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": model, "system_fingerprint": "fp_fake", "choices": [],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        });
        events.push(format!("data: {usage}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_owned());
    events
}

fn anthropic_events(n: usize, model: &str, text: &str) -> Vec<String> {
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {
            "id": format!("msg_{n}"), "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 1}}}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
        ev("ping", json!({"type": "ping"})),
    ];
    for word in text.split_inclusive(' ') {
        events.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": word}}),
        ));
    }
    events.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(ev("message_delta", json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 6}})));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    events
}
