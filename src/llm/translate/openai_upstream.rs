//! An Anthropic Messages request sent to an OpenAI-compatible upstream (OpenAI itself, vLLM,
//! …): the request in the chat-completions shape, the answer back as the Anthropic SDK expects
//! it — a `message`, an event stream with `message_start` … `message_stop`, or an error.

use serde_json::{json, Map, Value};

use bytes::BytesMut;

use super::{refuse, write_event};
use crate::llm::error::LlmError;
use crate::llm::sse::Event;

/// Request fields that carry over unchanged.
const SAME_NAME: &[&str] = &["model", "temperature", "top_p", "stream", "max_tokens"];

/// An Anthropic Messages body in the OpenAI chat-completions shape.
pub fn request(body: &Map<String, Value>) -> Result<Value, LlmError> {
    let mut out = Map::new();
    let mut messages = Vec::new();
    for (name, value) in body {
        // Several client libraries send unset parameters as explicit nulls.
        if value.is_null() {
            continue;
        }
        match name.as_str() {
            n if SAME_NAME.contains(&n) => {
                out.insert(name.clone(), value.clone());
            }
            "messages" => {}
            "system" => messages.push(json!({ "role": "system", "content": text_of(value)? })),
            "stop_sequences" => {
                out.insert("stop".into(), value.clone());
            }
            "metadata" => {
                if let Some(user) = value.get("user_id").and_then(Value::as_str) {
                    out.insert("user".into(), Value::String(user.to_owned()));
                }
            }
            "tools" => {
                out.insert("tools".into(), tools(value)?);
            }
            "tool_choice" => {
                let (choice, parallel) = tool_choice(value)?;
                if let Some(choice) = choice {
                    out.insert("tool_choice".into(), choice);
                }
                if !parallel {
                    out.insert("parallel_tool_calls".into(), Value::Bool(false));
                }
            }
            other => {
                return Err(refuse(format!(
                "parameter {other} cannot be sent to the openai upstream this request is routed to"
            )))
            }
        }
    }
    let Some(Value::Array(turns)) = body.get("messages") else {
        return Err(refuse("messages must be an array"));
    };
    for turn in turns {
        match turn.get("role").and_then(Value::as_str) {
            Some("user") => user_turn(turn.get("content"), &mut messages)?,
            Some("assistant") => messages.push(assistant_turn(turn.get("content"))?),
            _ => return Err(refuse("every message's role must be user or assistant")),
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    if out.get("stream") == Some(&Value::Bool(true)) {
        // Usage arrives only when asked for; the Anthropic client gets it in `message_delta`.
        out.insert("stream_options".into(), json!({ "include_usage": true }));
    }
    Ok(Value::Object(out))
}

/// A `system` or tool result: a string or text blocks.
fn text_of(value: &Value) -> Result<String, LlmError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => Ok(b.get("text").and_then(Value::as_str).unwrap_or("")),
                _ => Err(refuse("only text blocks are allowed here")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|t| t.concat()),
        _ => Err(refuse("content must be a string or an array of blocks")),
    }
}

fn tools(value: &Value) -> Result<Value, LlmError> {
    let Value::Array(items) = value else {
        return Err(refuse("tools must be an array"));
    };
    items
        .iter()
        .map(|tool| {
            // Server tools (web search, …) have a `type` and no schema: nothing to call.
            let (Some(name), Some(schema)) = (
                tool.get("name").and_then(Value::as_str),
                tool.get("input_schema"),
            ) else {
                return Err(refuse(
                    "only custom tools (name and input_schema) can be sent to openai",
                ));
            };
            let mut function = json!({ "name": name, "parameters": schema });
            if let Some(description) = tool.get("description") {
                function["description"] = description.clone();
            }
            Ok(json!({ "type": "function", "function": function }))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// OpenAI's `tool_choice` (none for `auto`, its default) and whether parallel calls are allowed.
fn tool_choice(value: &Value) -> Result<(Option<Value>, bool), LlmError> {
    let parallel = value
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        != Some(true);
    let choice = match value.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = value
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| refuse("tool_choice of type tool needs a name"))?;
            json!({ "type": "function", "function": { "name": name } })
        }
        _ => return Err(refuse("tool_choice.type must be auto, any, none or tool")),
    };
    Ok((Some(choice), parallel))
}

/// A user turn: its tool results become `tool` messages (first, as OpenAI wants them right
/// after the assistant's calls), the rest one user message.
fn user_turn(content: Option<&Value>, messages: &mut Vec<Value>) -> Result<(), LlmError> {
    let blocks = match content {
        Some(Value::String(s)) => {
            messages.push(json!({ "role": "user", "content": s }));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => return Err(refuse("content must be a string or an array of blocks")),
    };
    let mut parts = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("tool_result") => {
                let id = block
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| refuse("a tool_result needs tool_use_id"))?;
                let content = block.get("content").map(text_of).transpose()?;
                messages.push(json!({
                    "role": "tool", "tool_call_id": id, "content": content.unwrap_or_default(),
                }));
            }
            Some("text") => parts.push(json!({
                "type": "text",
                "text": block.get("text").and_then(Value::as_str).unwrap_or(""),
            })),
            Some("image") => {
                let source = block.get("source").unwrap_or(&Value::Null);
                let url = match source.get("type").and_then(Value::as_str) {
                    Some("base64") => format!(
                        "data:{};base64,{}",
                        source
                            .get("media_type")
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                        source.get("data").and_then(Value::as_str).unwrap_or("")
                    ),
                    Some("url") => source
                        .get("url")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    _ => return Err(refuse("an image's source must be base64 or url")),
                };
                parts.push(json!({ "type": "image_url", "image_url": { "url": url } }));
            }
            other => {
                return Err(refuse(format!(
                    "content block type {} cannot be sent to openai",
                    other.unwrap_or("(none)")
                )))
            }
        }
    }
    if !parts.is_empty() {
        messages.push(json!({ "role": "user", "content": parts }));
    }
    Ok(())
}

fn assistant_turn(content: Option<&Value>) -> Result<Value, LlmError> {
    let blocks = match content {
        Some(Value::String(s)) => return Ok(json!({ "role": "assistant", "content": s })),
        Some(Value::Array(blocks)) => blocks,
        _ => return Err(refuse("content must be a string or an array of blocks")),
    };
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
                    "arguments": block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            })),
            other => {
                return Err(refuse(format!(
                    "content block type {} cannot be sent to openai",
                    other.unwrap_or("(none)")
                )))
            }
        }
    }
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) },
    });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    Ok(message)
}

/// Anthropic's `stop_reason` for an OpenAI `finish_reason`.
fn stop_reason(finish: Option<&str>) -> Value {
    match finish {
        None => Value::Null,
        Some("length") => "max_tokens".into(),
        Some("tool_calls" | "function_call") => "tool_use".into(),
        Some("content_filter") => "refusal".into(),
        Some(_) => "end_turn".into(),
    }
}

fn usage_of(usage: Option<&Value>) -> Value {
    let count = |name: &str| {
        usage
            .and_then(|u| u.get(name))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    json!({ "input_tokens": count("prompt_tokens"), "output_tokens": count("completion_tokens") })
}

/// A complete `chat.completion` as an Anthropic `message`; `None` if it is not one.
pub fn response(body: &[u8]) -> Option<Vec<u8>> {
    let completion: Value = serde_json::from_slice(body).ok()?;
    let choice = completion.get("choices")?.get(0)?;
    let message = choice.get("message")?;
    let mut content = Vec::new();
    if let Some(text) = message.get("content").and_then(Value::as_str) {
        if !text.is_empty() {
            content.push(json!({ "type": "text", "text": text }));
        }
    }
    // A refusal is said in text, as Anthropic's own refusals are.
    let refusal = message
        .get("refusal")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty());
    if let Some(refusal) = refusal.filter(|_| content.is_empty()) {
        content.push(json!({ "type": "text", "text": refusal }));
    }
    if let Some(Value::Array(calls)) = message.get("tool_calls") {
        for call in calls {
            let function = call.get("function").unwrap_or(&Value::Null);
            let arguments = function
                .get("arguments")
                .and_then(Value::as_str)
                .unwrap_or("{}");
            content.push(json!({
                "type": "tool_use",
                "id": call.get("id").cloned().unwrap_or(Value::Null),
                "name": function.get("name").cloned().unwrap_or(Value::Null),
                "input": serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!({})),
            }));
        }
    }
    let out = json!({
        "id": completion.get("id").cloned().unwrap_or(Value::Null),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model").cloned().unwrap_or(Value::Null),
        "content": content,
        "stop_reason": if refusal.is_some() {
            Value::from("refusal")
        } else {
            stop_reason(choice.get("finish_reason").and_then(Value::as_str))
        },
        "stop_sequence": null,
        "usage": usage_of(completion.get("usage")),
    });
    serde_json::to_vec(&out).ok()
}

/// An OpenAI error body in Anthropic's shape; the type follows the status as Anthropic's do.
pub fn error(status: u16, body: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let kind = match status {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    };
    json!({ "type": "error", "error": { "type": kind, "message": message } })
        .to_string()
        .into_bytes()
}

/// The content block being streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    /// The OpenAI tool call index it streams.
    Tool(u64),
}

/// Turns OpenAI `chat.completion.chunk` events into an Anthropic event stream.
#[derive(Debug, Default)]
pub struct StreamToAnthropic {
    started: bool,
    /// Index of the next content block, and the one open now.
    blocks: u64,
    open: Option<Open>,
    stop_reason: Option<String>,
    usage: Option<Value>,
    done: bool,
    failed: bool,
}

impl StreamToAnthropic {
    fn close_block(&mut self, out: &mut BytesMut) {
        if self.open.take().is_some() {
            let index = self.blocks - 1;
            write_event(
                Some("content_block_stop"),
                &json!({ "type": "content_block_stop", "index": index }),
                out,
            );
        }
    }

    fn open_block(&mut self, open: Open, block: Value, out: &mut BytesMut) {
        self.close_block(out);
        let index = self.blocks;
        self.blocks += 1;
        self.open = Some(open);
        write_event(
            Some("content_block_start"),
            &json!({ "type": "content_block_start", "index": index, "content_block": block }),
            out,
        );
    }

    fn delta(&self, delta: Value, out: &mut BytesMut) {
        write_event(
            Some("content_block_delta"),
            &json!({ "type": "content_block_delta", "index": self.blocks - 1, "delta": delta }),
            out,
        );
    }

    /// Appends what `event` becomes (possibly nothing) to `out`.
    pub fn event(&mut self, event: &Event, out: &mut BytesMut) {
        if event.data.trim() == "[DONE]" {
            self.finish(out);
            return;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
            return;
        };
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            // An Anthropic stream ends at its error: whatever follows (`[DONE]`) is not sent.
            self.failed = true;
            let message = error.get("message").and_then(Value::as_str).unwrap_or("");
            write_event(
                Some("error"),
                &json!({ "type": "error", "error": { "type": "api_error", "message": message } }),
                out,
            );
            return;
        }
        if !self.started {
            self.started = true;
            write_event(
                Some("message_start"),
                &json!({ "type": "message_start", "message": {
                    "id": chunk.get("id").cloned().unwrap_or(Value::Null),
                    "type": "message", "role": "assistant",
                    "model": chunk.get("model").cloned().unwrap_or(Value::Null),
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": { "input_tokens": 0, "output_tokens": 0 },
                }}),
                out,
            );
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage.clone());
        }
        let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
            return;
        };
        let delta = choice.get("delta").unwrap_or(&Value::Null);
        let text = delta
            .get("content")
            .and_then(Value::as_str)
            .or_else(|| delta.get("refusal").and_then(Value::as_str));
        if let Some(text) = text {
            if !text.is_empty() {
                if self.open != Some(Open::Text) {
                    self.open_block(Open::Text, json!({ "type": "text", "text": "" }), out);
                }
                self.delta(json!({ "type": "text_delta", "text": text }), out);
            }
        }
        if let Some(Value::Array(calls)) = delta.get("tool_calls") {
            for call in calls {
                let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                let function = call.get("function").unwrap_or(&Value::Null);
                if self.open != Some(Open::Tool(index)) {
                    let block = json!({
                        "type": "tool_use",
                        "id": call.get("id").cloned().unwrap_or(Value::Null),
                        "name": function.get("name").cloned().unwrap_or(Value::Null),
                        "input": {},
                    });
                    self.open_block(Open::Tool(index), block, out);
                }
                if let Some(arguments) = function.get("arguments").and_then(Value::as_str) {
                    if !arguments.is_empty() {
                        self.delta(
                            json!({ "type": "input_json_delta", "partial_json": arguments }),
                            out,
                        );
                    }
                }
            }
        }
        if let Some(finish) = choice.get("finish_reason").and_then(Value::as_str) {
            self.stop_reason = Some(finish.to_owned());
        }
    }

    /// The whole answer went by (worth storing).
    pub fn complete(&self) -> bool {
        self.started && self.done && !self.failed
    }

    /// `[DONE]`: the open block ends, then the message, with its stop reason and usage.
    fn finish(&mut self, out: &mut BytesMut) {
        if self.done || !self.started || self.failed {
            return;
        }
        self.done = true;
        self.close_block(out);
        let usage = usage_of(self.usage.as_ref());
        write_event(
            Some("message_delta"),
            &json!({ "type": "message_delta",
                "delta": { "stop_reason": stop_reason(self.stop_reason.as_deref()), "stop_sequence": null },
                "usage": usage }),
            out,
        );
        write_event(
            Some("message_stop"),
            &json!({ "type": "message_stop" }),
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::translate::{testing, Direction, StreamTranslator};

    fn translate(body: Value) -> Result<Value, LlmError> {
        testing::request(Direction::AnthropicToOpenai, body)
    }

    #[test]
    fn a_messages_request_becomes_a_chat_request() {
        let out = translate(json!({
            "model": "llama", "max_tokens": 30, "temperature": 0.2, "stream": true,
            "system": [{"type": "text", "text": "be brief"}],
            "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "calling"},
                    {"type": "tool_use", "id": "tu_1", "name": "look", "input": {"q": 1}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "tu_1", "content": "a cat"},
                    {"type": "text", "text": "thanks"}]}],
            "tools": [{"name": "look", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        }))
        .unwrap();
        assert_eq!(
            out,
            json!({
                "model": "llama", "max_tokens": 30, "temperature": 0.2, "stream": true,
                "stream_options": {"include_usage": true},
                "stop": ["END"], "user": "u1",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                    {"role": "assistant", "content": "calling", "tool_calls": [
                        {"id": "tu_1", "type": "function", "function": {"name": "look", "arguments": "{\"q\":1}"}}]},
                    {"role": "tool", "tool_call_id": "tu_1", "content": "a cat"},
                    {"role": "user", "content": [{"type": "text", "text": "thanks"}]}],
                "tools": [{"type": "function", "function": {"name": "look", "description": "d", "parameters": {"type": "object"}}}],
                "tool_choice": "required", "parallel_tool_calls": false,
            })
        );
    }

    #[test]
    fn what_has_no_equivalent_is_refused_by_name() {
        for (body, says) in [
            (
                json!({"model": "m", "messages": [], "top_k": 5}),
                "parameter top_k",
            ),
            (
                json!({"model": "m", "messages": [], "thinking": {"type": "enabled"}}),
                "parameter thinking",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "document"}]}]}),
                "block type document",
            ),
            (
                json!({"model": "m", "messages": [{"role": "system", "content": "x"}]}),
                "user or assistant",
            ),
            (
                json!({"model": "m", "messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
                "only custom tools",
            ),
        ] {
            let error = translate(body).unwrap_err().to_string();
            assert!(error.contains(says), "{error} should mention {says}");
        }
    }

    #[test]
    fn nulls_are_absent_and_refusals_are_said() {
        let out = translate(
            json!({"model": "m", "max_tokens": 5, "top_k": null, "system": null,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        );
        let refused = json!({"id": "c", "model": "m", "choices": [{"finish_reason": "stop",
            "message": {"role": "assistant", "content": null, "refusal": "I can't help with that."}}]});
        let out: Value =
            serde_json::from_slice(&response(refused.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(
            out["content"],
            json!([{"type": "text", "text": "I can't help with that."}])
        );
        assert_eq!(out["stop_reason"], "refusal");
    }

    #[test]
    fn a_failed_or_empty_stream_is_not_complete() {
        let failed = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"error\":{\"message\":\"generation failed\"}}\n\n",
            "data: [DONE]\n\n",
        );
        let mut translator = StreamTranslator::ToAnthropic(StreamToAnthropic::default());
        let events = testing::stream_with(&mut translator, failed.as_bytes());
        let kinds: Vec<&str> = events.iter().filter_map(|e| e.event.as_deref()).collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "error"
            ],
            "the stream ends at the error"
        );
        assert!(!translator.complete());
        let mut bare = StreamTranslator::ToAnthropic(StreamToAnthropic::default());
        assert!(testing::stream_with(&mut bare, b"data: [DONE]\n\n").is_empty());
        assert!(!bare.complete(), "nothing came: nothing to store");
    }

    #[test]
    fn a_chat_completion_becomes_a_message() {
        let body = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "llama",
            "choices": [{"index": 0, "finish_reason": "length",
                "message": {"role": "assistant", "content": "It is a cat.",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{\"q\":1}"}}]}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        });
        let out: Value =
            serde_json::from_slice(&response(body.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(
            out,
            json!({
                "id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "llama",
                "content": [{"type": "text", "text": "It is a cat."},
                            {"type": "tool_use", "id": "c1", "name": "look", "input": {"q": 1}}],
                "stop_reason": "max_tokens", "stop_sequence": null,
                "usage": {"input_tokens": 11, "output_tokens": 7},
            })
        );
        assert!(response(b"[]").is_none());
        let e: Value = serde_json::from_slice(&error(
            429,
            br#"{"error":{"message":"slow","type":"requests"}}"#,
        ))
        .unwrap();
        assert_eq!(
            e,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}})
        );
    }

    #[test]
    fn chunks_become_an_anthropic_event_stream() {
        let chunk = |delta: Value, finish: Value| {
            format!(
                "data: {}\n\n",
                json!({"id": "c1", "object": "chat.completion.chunk", "model": "llama",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            )
        };
        let stream = [
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            chunk(json!({"content": "Hi"}), Value::Null),
            chunk(json!({"content": " there"}), Value::Null),
            chunk(json!({"tool_calls": [{"index": 0, "id": "t1", "function": {"name": "look", "arguments": ""}}]}), Value::Null),
            chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":1}"}}]}), Value::Null),
            chunk(json!({}), json!("tool_calls")),
            format!("data: {}\n\n", json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat();
        let translator = StreamTranslator::ToAnthropic(StreamToAnthropic::default());
        let translated = testing::stream(translator, stream.as_bytes());
        let kinds: Vec<&str> = translated
            .iter()
            .filter_map(|e| e.event.as_deref())
            .collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let data: Vec<Value> = translated
            .iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect();
        assert_eq!(data[0]["message"]["model"], "llama");
        assert_eq!(
            data[3]["delta"],
            json!({"type": "text_delta", "text": " there"})
        );
        assert_eq!(
            data[5]["content_block"],
            json!({"type": "tool_use", "id": "t1", "name": "look", "input": {}})
        );
        assert_eq!(
            data[6],
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"q\":1}"}})
        );
        assert_eq!(data[8]["delta"]["stop_reason"], "tool_use");
        assert_eq!(
            data[8]["usage"],
            json!({"input_tokens": 5, "output_tokens": 3})
        );
    }
}
