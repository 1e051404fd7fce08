//! Cross-provider routing: a routing rule may send a request to an upstream that speaks the
//! other provider's API. The request is rewritten into that shape, and the answer (a JSON body,
//! an error, or an event stream) back into what the client's library expects, so the client
//! never learns which provider answered. What has no equivalent on the other side is refused
//! with a 400 naming the parameter, never dropped silently. Pure functions and stream state
//! machines, no I/O.

mod anthropic_upstream;
mod openai_upstream;

use std::fmt::Write as _;

use bytes::{BufMut, BytesMut};
use serde_json::{Map, Value};

use super::config::Provider;
use super::error::LlmError;
use super::sse::Event;

pub use anthropic_upstream::DEFAULT_MAX_TOKENS;

/// The Messages API version outrider sends when the client did not name one.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Which way a request is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// An OpenAI chat completion answered by an Anthropic Messages upstream.
    OpenaiToAnthropic,
    /// An Anthropic Messages request answered by an OpenAI-compatible upstream.
    AnthropicToOpenai,
}

impl Direction {
    /// The translation a `client`-shaped route needs for an `upstream`-shaped upstream.
    pub fn between(client: Provider, upstream: Provider) -> Option<Direction> {
        match (client, upstream) {
            (Provider::Openai, Provider::Anthropic) => Some(Direction::OpenaiToAnthropic),
            (Provider::Anthropic, Provider::Openai) => Some(Direction::AnthropicToOpenai),
            _ => None,
        }
    }

    /// The upstream's endpoint for the request.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Direction::OpenaiToAnthropic => "/v1/messages",
            Direction::AnthropicToOpenai => "/v1/chat/completions",
        }
    }

    /// The request body in the upstream's shape.
    pub fn request(self, body: &Map<String, Value>) -> Result<Value, LlmError> {
        match self {
            Direction::OpenaiToAnthropic => anthropic_upstream::request(body),
            Direction::AnthropicToOpenai => openai_upstream::request(body),
        }
    }

    /// A complete 200 answer in the client's shape; `None` when it is not an answer.
    pub fn response(self, body: &[u8], created: u64) -> Option<Vec<u8>> {
        match self {
            Direction::OpenaiToAnthropic => anthropic_upstream::response(body, created),
            Direction::AnthropicToOpenai => openai_upstream::response(body),
        }
    }

    /// An error answer's body in the client's error shape.
    pub fn error(self, status: u16, body: &[u8]) -> Vec<u8> {
        match self {
            Direction::OpenaiToAnthropic => anthropic_upstream::error(body),
            Direction::AnthropicToOpenai => openai_upstream::error(status, body),
        }
    }

    /// A translator for the answer's event stream. `include_usage`: the OpenAI client asked
    /// for the usage chunk.
    pub fn stream(self, created: u64, include_usage: bool) -> StreamTranslator {
        match self {
            Direction::OpenaiToAnthropic => StreamTranslator::ToOpenai(
                anthropic_upstream::StreamToOpenai::new(created, include_usage),
            ),
            Direction::AnthropicToOpenai => {
                StreamTranslator::ToAnthropic(openai_upstream::StreamToAnthropic::default())
            }
        }
    }
}

/// The answer stream's translator, event by event.
#[derive(Debug)]
pub enum StreamTranslator {
    ToOpenai(anthropic_upstream::StreamToOpenai),
    ToAnthropic(openai_upstream::StreamToAnthropic),
}

impl StreamTranslator {
    /// The provider's stream ended properly and without an error: the translation may be
    /// stored (a bare terminal event or an error followed by one is not an answer).
    pub fn complete(&self) -> bool {
        match self {
            StreamTranslator::ToOpenai(t) => t.complete(),
            StreamTranslator::ToAnthropic(t) => t.complete(),
        }
    }

    /// Appends what `event` becomes (possibly nothing) to `out`.
    pub fn event(&mut self, event: &Event, out: &mut BytesMut) {
        match self {
            StreamTranslator::ToOpenai(t) => t.event(event, out),
            StreamTranslator::ToAnthropic(t) => t.event(event, out),
        }
    }
}

fn refuse(message: impl Into<String>) -> LlmError {
    LlmError::InvalidRequest(message.into())
}

/// One server-sent event: `event: NAME` (when named) and `data: JSON`.
fn write_event(name: Option<&str>, data: &Value, out: &mut BytesMut) {
    let mut text = String::with_capacity(256);
    if let Some(name) = name {
        let _ = writeln!(text, "event: {name}");
    }
    let _ = write!(text, "data: {data}\n\n");
    out.put_slice(text.as_bytes());
}

/// What the two directions' tests share: parse a request body, run a stream through.
#[cfg(test)]
mod testing {
    use bytes::BytesMut;
    use serde_json::Value;

    use super::{Direction, StreamTranslator};
    use crate::llm::error::LlmError;
    use crate::llm::sse::{Event, Splitter};

    pub fn request(direction: Direction, body: Value) -> Result<Value, LlmError> {
        let Value::Object(map) = body else {
            panic!("a request body is an object")
        };
        direction.request(&map)
    }

    /// The translated events of `stream` (whole events, as the provider sent them).
    pub fn stream(mut translator: StreamTranslator, stream: &[u8]) -> Vec<Event> {
        stream_with(&mut translator, stream)
    }

    /// As [`stream`], keeping the translator to ask it afterwards.
    pub fn stream_with(translator: &mut StreamTranslator, stream: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        Splitter::default().push(stream, &mut events);
        let mut out = BytesMut::new();
        for event in &events {
            translator.event(event, &mut out);
        }
        let mut translated = Vec::new();
        Splitter::default().push(&out, &mut translated);
        translated
    }
}
