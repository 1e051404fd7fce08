//! An OpenAI chat completion sent to an Anthropic Messages upstream: the request in the
//! Messages shape, the answer (a JSON body, an error, or an event stream) back as the OpenAI
//! client library expects it.

use std::collections::HashMap;

use bytes::{BufMut, BytesMut};
use serde_json::{json, Map, Value};

use super::{refuse, write_event};
use crate::llm::error::LlmError;
use crate::llm::sse::Event;

/// The Messages API requires `max_tokens`; OpenAI clients often leave it out.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Request fields that carry over unchanged.
const SAME_NAME: &[&str] = &["model", "temperature", "top_p", "stream"];
/// Request fields that have no effect on an Anthropic answer and are left out.
const DROPPED: &[&str] = &[
    "stream_options",
    "store",
    "metadata",
    "seed",
    "service_tier",
];

/// An OpenAI chat-completions body in the Anthropic Messages shape.
pub fn request(body: &Map<String, Value>) -> Result<Value, LlmError> {
    let mut out = Map::new();
    let mut max_tokens = None;
    let mut parallel_tools = true;
    for (name, value) in body {
        // Several client libraries send unset parameters as explicit nulls.
        if value.is_null() {
            continue;
        }
        match name.as_str() {
            n if SAME_NAME.contains(&n) => {
                out.insert(name.clone(), value.clone());
            }
            n if DROPPED.contains(&n) => {}
            "messages" => {}
            "max_tokens" | "max_completion_tokens" => {
                if !value.is_null() {
                    max_tokens = Some(value.as_u64().ok_or_else(|| {
                        refuse(format!("{name} must be a positive integer"))
                    })?);
                }
            }
            "stop" => match value {
                Value::Null => {}
                Value::String(s) => {
                    out.insert("stop_sequences".into(), json!([s]));
                }
                Value::Array(items) if items.iter().all(Value::is_string) => {
                    out.insert("stop_sequences".into(), value.clone());
                }
                _ => return Err(refuse("stop must be a string or an array of strings")),
            },
            "user" => {
                if let Some(user) = value.as_str() {
                    out.insert("metadata".into(), json!({ "user_id": user }));
                }
            }
            "tools" => {
                out.insert("tools".into(), tools(value)?);
            }
            "tool_choice" => {
                out.insert("tool_choice".into(), tool_choice(value)?);
            }
            "parallel_tool_calls" => parallel_tools = value.as_bool() != Some(false),
            // Accepted when they ask for what Anthropic does anyway.
            "n" if value.as_u64() == Some(1) || value.is_null() => {}
            "logprobs" if value.as_bool() != Some(true) => {}
            "presence_penalty" | "frequency_penalty"
                if value.as_f64().is_none_or(|v| v == 0.0) => {}
            "response_format" if value.get("type").and_then(Value::as_str) == Some("text") => {}
            other => {
                return Err(refuse(format!(
                    "parameter {other} cannot be sent to the anthropic upstream this request is routed to"
                )))
            }
        }
    }
    let (system, messages) = messages(body.get("messages"))?;
    if let Some(system) = system {
        out.insert("system".into(), Value::String(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    out.insert(
        "max_tokens".into(),
        Value::from(max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    // Anthropic takes the flag on a tool choice, and only when there are tools to call.
    if !parallel_tools && out.contains_key("tools") {
        let choice = out
            .entry("tool_choice")
            .or_insert_with(|| json!({ "type": "auto" }));
        if let Value::Object(choice) = choice {
            if choice.get("type").and_then(Value::as_str) != Some("none") {
                choice.insert("disable_parallel_tool_use".into(), Value::Bool(true));
            }
        }
    }
    Ok(Value::Object(out))
}

fn tools(value: &Value) -> Result<Value, LlmError> {
    let Value::Array(items) = value else {
        return Err(refuse("tools must be an array"));
    };
    items
        .iter()
        .map(|tool| {
            let function = match tool.get("type").and_then(Value::as_str) {
                Some("function") => tool.get("function"),
                _ => None,
            }
            .ok_or_else(|| refuse("only tools of type function can be sent to anthropic"))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| refuse("a tool's function needs a name"))?;
            let mut out = json!({
                "name": name,
                "input_schema": function
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({ "type": "object", "properties": {} })),
            });
            if let Some(description) = function.get("description") {
                out["description"] = description.clone();
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn tool_choice(value: &Value) -> Result<Value, LlmError> {
    match value {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(json!({ "type": "auto" })),
            "none" => Ok(json!({ "type": "none" })),
            "required" => Ok(json!({ "type": "any" })),
            other => Err(refuse(format!("unknown tool_choice {other:?}"))),
        },
        Value::Object(choice) => choice
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|name| json!({ "type": "tool", "name": name }))
            .ok_or_else(|| refuse("tool_choice must name a function")),
        _ => Err(refuse("tool_choice must be a string or an object")),
    }
}

/// The system prompt (OpenAI `system`/`developer` messages, joined) and the turns; consecutive
/// turns of one role are merged, as the Messages API wants them alternating.
fn messages(value: Option<&Value>) -> Result<(Option<String>, Vec<Value>), LlmError> {
    let Some(Value::Array(items)) = value else {
        return Err(refuse("messages must be an array"));
    };
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<(String, Vec<Value>)> = Vec::new();
    for message in items {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| refuse("every message needs a role"))?;
        let content = message.get("content").unwrap_or(&Value::Null);
        let (role, blocks) = match role {
            "system" | "developer" => {
                system.push(plain_text(content)?);
                continue;
            }
            "user" => ("user", content_blocks(content)?),
            "assistant" => ("assistant", assistant_blocks(message, content)?),
            "tool" => {
                let id = message
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| refuse("a tool message needs tool_call_id"))?;
                let result = json!({
                    "type": "tool_result",
                    "tool_use_id": id,
                    "content": plain_text(content)?,
                });
                ("user", vec![result])
            }
            other => {
                return Err(refuse(format!(
                    "message role {other:?} cannot be sent to anthropic"
                )))
            }
        };
        match turns.last_mut() {
            Some((last, prior)) if last == role => prior.extend(blocks),
            _ => turns.push((role.to_owned(), blocks)),
        }
    }
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    let turns = turns
        .into_iter()
        .map(|(role, content)| json!({ "role": role, "content": content }))
        .collect();
    Ok((system, turns))
}

/// Text of a `content` that may only hold text (a string or text parts).
fn plain_text(content: &Value) -> Result<String, LlmError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => Ok(part.get("text").and_then(Value::as_str).unwrap_or("")),
                _ => Err(refuse("only text parts are allowed here")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        _ => Err(refuse("content must be a string or an array of parts")),
    }
}

fn content_blocks(content: &Value) -> Result<Vec<Value>, LlmError> {
    match content {
        Value::String(s) => Ok(vec![json!({ "type": "text", "text": s })]),
        Value::Array(parts) => parts.iter().map(part).collect(),
        _ => Err(refuse("content must be a string or an array of parts")),
    }
}

fn part(part: &Value) -> Result<Value, LlmError> {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => Ok(json!({
            "type": "text",
            "text": part.get("text").and_then(Value::as_str).unwrap_or(""),
        })),
        Some("image_url") => {
            let url = part
                .get("image_url")
                .and_then(|i| i.get("url"))
                .and_then(Value::as_str)
                .ok_or_else(|| refuse("image_url needs a url"))?;
            let source = match url
                .strip_prefix("data:")
                .and_then(|d| d.split_once(";base64,"))
            {
                Some((media_type, data)) => {
                    json!({ "type": "base64", "media_type": media_type, "data": data })
                }
                None => json!({ "type": "url", "url": url }),
            };
            Ok(json!({ "type": "image", "source": source }))
        }
        other => Err(refuse(format!(
            "content part type {} cannot be sent to anthropic",
            other.unwrap_or("(none)")
        ))),
    }
}

fn assistant_blocks(message: &Value, content: &Value) -> Result<Vec<Value>, LlmError> {
    let mut blocks = match content {
        Value::Null => Vec::new(),
        Value::String(s) if s.is_empty() => Vec::new(),
        other => content_blocks(other)?,
    };
    if let Some(Value::Array(calls)) = message.get("tool_calls") {
        for call in calls {
            let function = call.get("function").unwrap_or(&Value::Null);
            let arguments = function
                .get("arguments")
                .and_then(Value::as_str)
                .unwrap_or("{}");
            let input: Value = serde_json::from_str(arguments)
                .map_err(|_| refuse("a tool call's arguments are not valid JSON"))?;
            blocks.push(json!({
                "type": "tool_use",
                "id": call.get("id").cloned().unwrap_or(Value::Null),
                "name": function.get("name").cloned().unwrap_or(Value::Null),
                "input": input,
            }));
        }
    }
    Ok(blocks)
}

/// OpenAI's `finish_reason` for an Anthropic `stop_reason`.
fn finish_reason(stop_reason: Option<&str>) -> Value {
    match stop_reason {
        None => Value::Null,
        Some("max_tokens") => "length".into(),
        Some("tool_use") => "tool_calls".into(),
        Some("refusal") => "content_filter".into(),
        Some(_) => "stop".into(),
    }
}

/// Prompt tokens of an Anthropic `usage`: the uncached input plus what was read from or
/// written to its prompt cache (OpenAI counts them all as prompt tokens).
fn usage_json(usage: &Value) -> Value {
    let count = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
    let prompt = count("input_tokens")
        + count("cache_read_input_tokens")
        + count("cache_creation_input_tokens");
    let completion = count("output_tokens");
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// A complete Anthropic message as an OpenAI `chat.completion`; `None` if it is not one.
pub fn response(body: &[u8], created: u64) -> Option<Vec<u8>> {
    let message: Value = serde_json::from_slice(body).ok()?;
    let blocks = message.get("content")?.as_array()?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": block.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": block.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into()),
                },
            })),
            _ => {}
        }
    }
    let mut reply = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) },
        "refusal": null,
    });
    if !calls.is_empty() {
        reply["tool_calls"] = Value::Array(calls);
    }
    let out = json!({
        "id": message.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{
            "index": 0,
            "message": reply,
            "logprobs": null,
            "finish_reason": finish_reason(message.get("stop_reason").and_then(Value::as_str)),
        }],
        "usage": usage_json(message.get("usage").unwrap_or(&Value::Null)),
    });
    serde_json::to_vec(&out).ok()
}

/// An Anthropic error body (`{"type":"error","error":{"type","message"}}`, or anything else)
/// in OpenAI's error shape, so the client library raises its usual exception.
pub fn error(body: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let message = error
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let kind = error
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("api_error");
    json!({ "error": { "message": message, "type": kind, "param": null, "code": null } })
        .to_string()
        .into_bytes()
}

/// Turns an Anthropic event stream into OpenAI `chat.completion.chunk` events, event by event.
#[derive(Debug)]
pub struct StreamToOpenai {
    created: u64,
    /// The client asked for usage (`stream_options.include_usage`): every chunk carries
    /// `"usage": null` and a usage chunk precedes `[DONE]`, as OpenAI sends them.
    include_usage: bool,
    id: Value,
    model: Value,
    usage: Map<String, Value>,
    /// Anthropic content block index → OpenAI tool call index.
    tool_calls: HashMap<u64, u64>,
    /// `message_stop` went by, and no error before it.
    stopped: bool,
    failed: bool,
}

impl StreamToOpenai {
    pub fn new(created: u64, include_usage: bool) -> Self {
        StreamToOpenai {
            created,
            include_usage,
            id: Value::Null,
            model: Value::Null,
            usage: Map::new(),
            tool_calls: HashMap::new(),
            stopped: false,
            failed: false,
        }
    }

    /// The whole answer went by (worth storing).
    pub fn complete(&self) -> bool {
        self.stopped && !self.failed
    }

    fn chunk(&self, delta: Value, finish: Value, out: &mut BytesMut) {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        write_event(None, &chunk, out);
    }

    /// Appends what `event` becomes (possibly nothing) to `out`.
    pub fn event(&mut self, event: &Event, out: &mut BytesMut) {
        let Ok(payload) = serde_json::from_str::<Value>(&event.data) else {
            return;
        };
        let kind = event
            .event
            .as_deref()
            .or_else(|| payload.get("type").and_then(Value::as_str));
        let index = payload.get("index").and_then(Value::as_u64).unwrap_or(0);
        match kind {
            Some("message_start") => {
                let message = payload.get("message").unwrap_or(&Value::Null);
                self.id = message.get("id").cloned().unwrap_or(Value::Null);
                self.model = message.get("model").cloned().unwrap_or(Value::Null);
                self.merge_usage(message.get("usage"));
                self.chunk(
                    json!({ "role": "assistant", "content": "" }),
                    Value::Null,
                    out,
                );
            }
            Some("content_block_start") => {
                let block = payload.get("content_block").unwrap_or(&Value::Null);
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let call = self.tool_calls.len() as u64;
                        self.tool_calls.insert(index, call);
                        let delta = json!({ "tool_calls": [{
                            "index": call,
                            "id": block.get("id").cloned().unwrap_or(Value::Null),
                            "type": "function",
                            "function": { "name": block.get("name").cloned().unwrap_or(Value::Null), "arguments": "" },
                        }]});
                        self.chunk(delta, Value::Null, out);
                    }
                    Some("text") => {
                        if let Some(text) = block.get("text").and_then(Value::as_str) {
                            if !text.is_empty() {
                                self.chunk(json!({ "content": text }), Value::Null, out);
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some("content_block_delta") => {
                let delta = payload.get("delta").unwrap_or(&Value::Null);
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        let text = delta.get("text").cloned().unwrap_or(Value::Null);
                        self.chunk(json!({ "content": text }), Value::Null, out);
                    }
                    Some("input_json_delta") => {
                        let Some(call) = self.tool_calls.get(&index).copied() else {
                            return;
                        };
                        let partial = delta.get("partial_json").cloned().unwrap_or(Value::Null);
                        let delta = json!({ "tool_calls": [{
                            "index": call, "function": { "arguments": partial },
                        }]});
                        self.chunk(delta, Value::Null, out);
                    }
                    _ => {}
                }
            }
            Some("message_delta") => {
                self.merge_usage(payload.get("usage"));
                let stop = payload
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str);
                self.chunk(json!({}), finish_reason(stop), out);
            }
            Some("message_stop") => {
                self.stopped = true;
                if self.include_usage {
                    let usage = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage_json(&Value::Object(self.usage.clone())),
                    });
                    write_event(None, &usage, out);
                }
                out.put_slice(b"data: [DONE]\n\n");
            }
            Some("error") => {
                self.failed = true;
                let error = error(event.data.as_bytes());
                out.put_slice(b"data: ");
                out.put_slice(&error);
                out.put_slice(b"\n\n");
            }
            _ => {}
        }
    }

    /// Anthropic sends input tokens at the start and output tokens (cumulative) at the end.
    fn merge_usage(&mut self, usage: Option<&Value>) {
        if let Some(Value::Object(usage)) = usage {
            for (name, value) in usage {
                if !value.is_null() {
                    self.usage.insert(name.clone(), value.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::translate::{testing, Direction, StreamTranslator};

    fn translate(body: Value) -> Result<Value, LlmError> {
        testing::request(Direction::OpenaiToAnthropic, body)
    }

    #[test]
    fn a_chat_request_becomes_a_messages_request() {
        let out = translate(json!({
            "model": "claude-x", "temperature": 0, "stop": "END", "user": "u1", "stream": true,
            "stream_options": {"include_usage": true}, "max_completion_tokens": 50,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": [{"type": "text", "text": "no jokes"}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"q\":1}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
                {"role": "user", "content": "thanks"}],
            "tools": [{"type": "function", "function": {"name": "look", "description": "d", "parameters": {"type": "object"}}}],
            "tool_choice": "required", "parallel_tool_calls": false,
        }))
        .unwrap();
        assert_eq!(
            out,
            json!({
                "model": "claude-x", "temperature": 0, "stream": true, "max_tokens": 50,
                "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
                "system": "be brief\n\nno jokes",
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "call_1", "name": "look", "input": {"q": 1}}]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
                        {"type": "text", "text": "thanks"}]}],
                "tools": [{"name": "look", "description": "d", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            })
        );
        let plain =
            translate(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
                .unwrap();
        assert_eq!(
            plain["max_tokens"], DEFAULT_MAX_TOKENS,
            "required by the Messages API"
        );
    }

    #[test]
    fn nulls_are_absent_and_parallel_calls_need_tools() {
        let out = translate(json!({"model": "m", "temperature": null, "tools": null,
            "tool_choice": null, "response_format": null, "parallel_tool_calls": false,
            "messages": [{"role": "user", "content": "hi"}]}))
        .unwrap();
        assert_eq!(
            out,
            json!({"model": "m", "max_tokens": DEFAULT_MAX_TOKENS,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
        );
        let none = translate(json!({"model": "m", "messages": [], "tool_choice": "none",
            "parallel_tool_calls": false,
            "tools": [{"type": "function", "function": {"name": "f"}}]}))
        .unwrap();
        assert_eq!(none["tool_choice"], json!({"type": "none"}));
    }

    #[test]
    fn what_has_no_equivalent_is_refused_by_name() {
        for (body, says) in [
            (json!({"model": "m", "messages": [], "n": 2}), "parameter n"),
            (
                json!({"model": "m", "messages": [], "logprobs": true}),
                "parameter logprobs",
            ),
            (
                json!({"model": "m", "messages": [], "response_format": {"type": "json_object"}}),
                "parameter response_format",
            ),
            (
                json!({"model": "m", "messages": [], "frequency_penalty": 0.5}),
                "parameter frequency_penalty",
            ),
            (
                json!({"model": "m", "messages": [], "brand_new": 1}),
                "parameter brand_new",
            ),
            (
                json!({"model": "m", "messages": [{"role": "function", "content": "x"}]}),
                "role \"function\"",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                "input_audio",
            ),
            (
                json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]}),
                "not valid JSON",
            ),
            (
                json!({"model": "m", "messages": [], "tools": [{"type": "web_search"}]}),
                "only tools of type function",
            ),
        ] {
            let error = translate(body).unwrap_err().to_string();
            assert!(error.contains(says), "{error} should mention {says}");
        }
        // Values that ask for what Anthropic does anyway are accepted.
        assert!(translate(
            json!({"model": "m", "messages": [], "n": 1, "logprobs": false,
            "presence_penalty": 0, "response_format": {"type": "text"}, "seed": 7})
        )
        .is_ok());
    }

    #[test]
    fn a_message_becomes_a_chat_completion() {
        let body = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "a cat."},
                        {"type": "tool_use", "id": "tu_1", "name": "look", "input": {"q": 1}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 4},
        });
        let out: Value =
            serde_json::from_slice(&response(body.to_string().as_bytes(), 7).unwrap()).unwrap();
        assert_eq!(
            out,
            json!({
                "id": "msg_1", "object": "chat.completion", "created": 7, "model": "claude-x",
                "choices": [{"index": 0, "logprobs": null, "finish_reason": "tool_calls",
                    "message": {"role": "assistant", "content": "It is a cat.", "refusal": null,
                        "tool_calls": [{"id": "tu_1", "type": "function",
                            "function": {"name": "look", "arguments": "{\"q\":1}"}}]}}],
                "usage": {"prompt_tokens": 15, "completion_tokens": 4, "total_tokens": 19},
            })
        );
        assert!(response(b"not json", 7).is_none());
        let shaped: Value = serde_json::from_slice(&error(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#,
        ))
        .unwrap();
        assert_eq!(
            shaped,
            json!({"error": {"message": "busy", "type": "overloaded_error", "param": null, "code": null}})
        );
        let raw: Value = serde_json::from_slice(&error(b"bad gateway")).unwrap();
        assert_eq!(raw["error"]["message"], "bad gateway");
    }

    fn run_stream(events: &str, include_usage: bool) -> Vec<Value> {
        let translator = StreamTranslator::ToOpenai(StreamToOpenai::new(9, include_usage));
        testing::stream(translator, events.as_bytes())
            .iter()
            .map(|e| {
                assert_eq!(e.event, None, "OpenAI events are unnamed");
                serde_json::from_str(&e.data).unwrap_or(Value::String(e.data.clone()))
            })
            .collect()
    }

    const STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-x\",\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"tu_1\",\"name\":\"look\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"q\\\":\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":6}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    #[test]
    fn an_event_stream_becomes_chat_completion_chunks() {
        let chunks = run_stream(STREAM, true);
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c.get("choices")?.get(0)?.get("delta"))
            .collect();
        assert_eq!(
            deltas,
            [
                &json!({"role": "assistant", "content": ""}),
                &json!({"content": "Hi"}),
                &json!({"tool_calls": [{"index": 0, "id": "tu_1", "type": "function", "function": {"name": "look", "arguments": ""}}]}),
                &json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":"}}]}),
                &json!({}),
            ]
        );
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "tool_calls");
        assert!(chunks[..5].iter().all(|c| c["id"] == "msg_1"
            && c["model"] == "claude-x"
            && c["object"] == "chat.completion.chunk"
            && c["usage"].is_null()
            && c.get("usage").is_some()));
        assert_eq!(
            chunks[5]["usage"],
            json!({"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18})
        );
        assert_eq!(chunks[5]["choices"], json!([]));
        assert_eq!(chunks[6], Value::String("[DONE]".into()));

        let mut failed = StreamTranslator::ToOpenai(StreamToOpenai::new(9, false));
        let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"busy\"}}\n\n";
        testing::stream_with(&mut failed, [STREAM, error].concat().as_bytes());
        assert!(
            !failed.complete(),
            "an error anywhere: not an answer to keep"
        );
        let mut whole = StreamTranslator::ToOpenai(StreamToOpenai::new(9, false));
        testing::stream_with(&mut whole, STREAM.as_bytes());
        assert!(whole.complete());

        let plain = run_stream(STREAM, false);
        assert_eq!(plain.len(), 6, "no usage chunk when the client did not ask");
        assert!(plain[..5].iter().all(|c| c.get("usage").is_none()));
    }

    #[test]
    fn a_stream_error_keeps_its_message() {
        let chunks = run_stream(
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"busy\"}}\n\n",
            false,
        );
        assert_eq!(
            chunks,
            [
                json!({"error": {"message": "busy", "type": "overloaded_error", "param": null, "code": null}})
            ]
        );
    }
}
