//! What the stage reads from provider requests and responses: the request's model, stream flag
//! and routing features, the canonical form its cache key is made of, `usage` from bodies and
//! stream events, and each provider's terminal event. Pure functions, no I/O.

use serde_json::{Map, Value};

use super::config::Provider;
use super::error::LlmError;
use super::sse::Event;

/// Request fields that do not change the answer, left out of the cache key.
const NOT_IN_KEY: &[&str] = &["user", "metadata", "store", "stream"];

/// A parsed request body.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    pub embeddings: bool,
}

/// Parses and checks a request body as the provider would (the fields it needs are present).
pub fn parse_request(provider: Provider, path: &str, body: &[u8]) -> Result<LlmRequest, LlmError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| LlmError::InvalidJson(e.to_string()))?;
    let Value::Object(body) = value else {
        return Err(LlmError::InvalidRequest(
            "the request body must be a JSON object".into(),
        ));
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(LlmError::InvalidRequest("model must be a string".into())),
        None => {
            return Err(LlmError::InvalidRequest(
                "you must provide a model parameter".into(),
            ))
        }
    };
    let embeddings = provider == Provider::Openai && path.ends_with("/embeddings");
    let needed = if embeddings { "input" } else { "messages" };
    match body.get(needed) {
        Some(Value::Array(_)) => {}
        Some(Value::String(_)) if embeddings => {}
        Some(_) => {
            return Err(LlmError::InvalidRequest(format!(
                "{needed} has the wrong type"
            )))
        }
        None => {
            return Err(LlmError::InvalidRequest(format!(
                "missing required parameter: {needed}"
            )))
        }
    }
    let stream = matches!(body.get("stream"), Some(Value::Bool(true)));
    Ok(LlmRequest {
        body,
        model,
        stream,
        embeddings,
    })
}

impl LlmRequest {
    /// Prompt tokens estimated at four characters a token (routing needs an order of
    /// magnitude, not the provider's tokenizer).
    pub fn estimated_prompt_tokens(&self) -> u64 {
        fn chars(v: &Value) -> usize {
            match v {
                Value::String(s) => s.len(),
                Value::Array(items) => items.iter().map(chars).sum(),
                Value::Object(map) => map
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "image_url" | "source"))
                    .map(|(_, v)| chars(v))
                    .sum(),
                _ => 0,
            }
        }
        let total: usize = ["messages", "system", "input", "prompt"]
            .iter()
            .filter_map(|k| self.body.get(*k))
            .map(chars)
            .sum();
        (total as u64).div_ceil(4)
    }

    pub fn has_tools(&self) -> bool {
        ["tools", "functions"]
            .iter()
            .any(|k| matches!(self.body.get(*k), Some(Value::Array(a)) if !a.is_empty()))
    }

    /// Any content part that is an image (OpenAI `image_url`/`input_image`, Anthropic `image`).
    pub fn has_images(&self) -> bool {
        let Some(Value::Array(messages)) = self.body.get("messages") else {
            return false;
        };
        messages
            .iter()
            .filter_map(|m| m.get("content")?.as_array())
            .flatten()
            .any(|part| {
                matches!(
                    part.get("type").and_then(Value::as_str),
                    Some("image_url" | "image" | "input_image")
                )
            })
    }

    /// `temperature: 0` (explicitly).
    pub fn deterministic(&self) -> bool {
        self.body
            .get("temperature")
            .and_then(Value::as_f64)
            .is_some_and(|t| t == 0.0)
    }

    /// Sets the model the provider gets.
    pub fn set_model(&mut self, model: &str) {
        self.model = model.to_owned();
        self.body
            .insert("model".into(), Value::String(model.to_owned()));
    }

    /// An OpenAI stream that did not ask for usage: ask for it (`stream_options.include_usage`).
    /// Returns whether the request was changed (then the extra event must be removed).
    pub fn request_usage(&mut self) -> bool {
        if !self.stream || self.embeddings {
            return false;
        }
        let options = self
            .body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(options) = options else {
            return false;
        };
        if matches!(options.get("include_usage"), Some(Value::Bool(true))) {
            return false;
        }
        options.insert("include_usage".into(), Value::Bool(true));
        true
    }

    /// The canonical bytes of everything that changes the answer: sorted keys, no whitespace,
    /// integral numbers written as integers; `NOT_IN_KEY` fields left out.
    pub fn canonical_key_material(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(b'{');
        let mut keys: Vec<&String> = self
            .body
            .keys()
            .filter(|k| !NOT_IN_KEY.contains(&k.as_str()))
            .collect();
        keys.sort();
        for (i, k) in keys.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_string(k, &mut out);
            out.push(b':');
            if let Some(v) = self.body.get(k) {
                canonical(v, &mut out);
            }
        }
        out.push(b'}');
        out
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    // Serializing a string to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Writes `v` as JSON with object keys sorted, whatever map type serde_json was built with.
pub fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(v, out);
            }
            out.push(b']');
        }
        Value::Number(n) => match n.as_f64() {
            // 0, 0.0 and 0e0 are the same temperature.
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => {
                out.extend_from_slice((f as i64).to_string().as_bytes());
            }
            _ => out.extend_from_slice(n.to_string().as_bytes()),
        },
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

/// Tokens of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
}

fn field(v: &Value, name: &str) -> Option<u64> {
    v.get(name).and_then(Value::as_u64)
}

/// `usage` of a complete (non-streamed) response body.
pub fn usage_from_body(provider: Provider, body: &[u8]) -> Option<Usage> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let usage = value.get("usage")?;
    Some(match provider {
        Provider::Openai => Usage {
            input: field(usage, "prompt_tokens")?,
            output: field(usage, "completion_tokens").unwrap_or(0),
        },
        Provider::Anthropic => Usage {
            input: field(usage, "input_tokens")?,
            output: field(usage, "output_tokens").unwrap_or(0),
        },
    })
}

/// What one stream event says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EventFacts {
    /// The provider's last event (`data: [DONE]`, `message_stop`).
    pub terminal: bool,
    /// An OpenAI usage-only chunk (`choices: []` with `usage`).
    pub usage_only: bool,
    /// The provider reported a failure inside the stream (OpenAI-compatible servers send
    /// `data: {"error": …}` and may still end with `[DONE]`; Anthropic sends `event: error`):
    /// the recording must not be stored, whatever ends the stream.
    pub error: bool,
}

/// Reads one stream event, updating `usage` from it.
pub fn read_event(provider: Provider, event: &Event, usage: &mut Usage) -> EventFacts {
    let mut facts = EventFacts::default();
    match provider {
        Provider::Openai => {
            if event.data.trim() == "[DONE]" {
                facts.terminal = true;
                return facts;
            }
            // Only chunks that mention usage or an error are parsed.
            let has_error = event.data.contains("\"error\"");
            if !has_error && !event.data.contains("\"usage\"") {
                return facts;
            }
            let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
                return facts;
            };
            facts.error = has_error && chunk.get("error").is_some_and(|e| !e.is_null());
            if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
                usage.input = field(u, "prompt_tokens").unwrap_or(usage.input);
                usage.output = field(u, "completion_tokens").unwrap_or(usage.output);
                facts.usage_only =
                    matches!(chunk.get("choices"), Some(Value::Array(c)) if c.is_empty());
            }
        }
        Provider::Anthropic => {
            let kind = event.event.as_deref();
            if kind == Some("message_stop") {
                facts.terminal = true;
                return facts;
            }
            if kind == Some("error") {
                facts.error = true;
                return facts;
            }
            if !matches!(kind, Some("message_start" | "message_delta")) {
                return facts;
            }
            let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
                return facts;
            };
            let u = data
                .get("usage")
                .or_else(|| data.get("message").and_then(|m| m.get("usage")));
            if let Some(u) = u {
                usage.input = field(u, "input_tokens").map_or(usage.input, |t| t.max(usage.input));
                usage.output = field(u, "output_tokens").unwrap_or(usage.output);
            }
        }
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> LlmRequest {
        parse_request(Provider::Openai, "/v1/chat/completions", body.as_bytes()).unwrap()
    }

    #[test]
    fn bad_requests_are_refused() {
        let p = |b: &str| parse_request(Provider::Openai, "/v1/chat/completions", b.as_bytes());
        assert!(matches!(p("{"), Err(LlmError::InvalidJson(_))));
        assert!(matches!(p("[]"), Err(LlmError::InvalidRequest(_))));
        assert!(matches!(
            p(r#"{"messages":[]}"#),
            Err(LlmError::InvalidRequest(m)) if m.contains("model")
        ));
        assert!(matches!(
            p(r#"{"model":"m"}"#),
            Err(LlmError::InvalidRequest(m)) if m.contains("messages")
        ));
        let emb = parse_request(
            Provider::Openai,
            "/v1/embeddings",
            br#"{"model":"e","input":"hi"}"#,
        );
        assert!(emb.is_ok_and(|r| r.embeddings));
    }

    #[test]
    fn the_key_ignores_order_whitespace_and_non_answer_fields() {
        let a = req(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"user":"u1"}"#,
        );
        let b = req(r#"{ "temperature" : 0.0, "user":"u2", "metadata":{"x":1},
                        "messages":[{"content":"hi","role":"user"}], "model":"m" }"#);
        assert_eq!(a.canonical_key_material(), b.canonical_key_material());
        let c =
            req(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#);
        assert_ne!(a.canonical_key_material(), c.canonical_key_material());
    }

    #[test]
    fn routing_features() {
        let r = req(
            r#"{"model":"auto","messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"},{"type":"image_url","image_url":{"url":"data:xxxxxxxxxxxxxxxxxxxx"}}]}],"tools":[{"type":"function"}]}"#,
        );
        assert!(r.has_images());
        assert!(r.has_tools());
        assert!(r.estimated_prompt_tokens() < 10, "image data is not text");
        let plain =
            req(r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"tools":[]}"#);
        assert!(!plain.has_images() && !plain.has_tools());
    }

    #[test]
    fn usage_is_asked_for_once() {
        let mut r = req(r#"{"model":"m","messages":[],"stream":true}"#);
        assert!(r.request_usage());
        assert!(!r.request_usage(), "already asked");
        let mut r = req(r#"{"model":"m","messages":[]}"#);
        assert!(!r.request_usage(), "not a stream");
    }

    #[test]
    fn usage_from_events() {
        let ev = |event: Option<&str>, data: &str| Event {
            raw: bytes::Bytes::new(),
            event: event.map(str::to_owned),
            data: data.to_owned(),
        };
        let mut u = Usage::default();
        let f = read_event(
            Provider::Openai,
            &ev(
                None,
                r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#,
            ),
            &mut u,
        );
        assert!(f.usage_only && !f.terminal);
        assert_eq!(
            u,
            Usage {
                input: 3,
                output: 5
            }
        );
        assert!(read_event(Provider::Openai, &ev(None, "[DONE]"), &mut u).terminal);
        let mut u = Usage::default();
        read_event(
            Provider::Anthropic,
            &ev(
                Some("message_start"),
                r#"{"message":{"usage":{"input_tokens":7,"output_tokens":1}}}"#,
            ),
            &mut u,
        );
        read_event(
            Provider::Anthropic,
            &ev(Some("message_delta"), r#"{"usage":{"output_tokens":9}}"#),
            &mut u,
        );
        assert_eq!(
            u,
            Usage {
                input: 7,
                output: 9
            }
        );
        assert!(read_event(Provider::Anthropic, &ev(Some("message_stop"), "{}"), &mut u).terminal);
        // Failures inside a stream, in each provider's form.
        let anthropic_error = ev(Some("error"), r#"{"type":"error","error":{"type":"x"}}"#);
        assert!(read_event(Provider::Anthropic, &anthropic_error, &mut u).error);
        let openai_error = ev(None, r#"{"error":{"message":"generation failed"}}"#);
        assert!(read_event(Provider::Openai, &openai_error, &mut u).error);
        let null_error = ev(None, r#"{"choices":[],"usage":null,"error":null}"#);
        assert!(!read_event(Provider::Openai, &null_error, &mut u).error);
    }
}
