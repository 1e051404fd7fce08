//! The LLM stage's refusals, answered in the provider's own error shape so the client library
//! raises its usual exception: OpenAI `{"error":{"message","type","param","code"}}`, Anthropic
//! `{"type":"error","error":{"type","message"}}`. Nothing is forwarded or stored for them.

use bytes::Bytes;
use serde_json::json;

use super::config::Provider;
use crate::pipeline::Answer;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LlmError {
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("request body larger than max_body ({limit} bytes)")]
    TooLarge { limit: usize },
}

impl LlmError {
    pub fn status(&self) -> u16 {
        match self {
            LlmError::TooLarge { .. } => 413,
            _ => 400,
        }
    }

    /// The stable code (OpenAI's `error.code`; Anthropic has only a type).
    pub fn code(&self) -> &'static str {
        match self {
            LlmError::InvalidJson(_) => "invalid_json",
            LlmError::InvalidRequest(_) => "invalid_request",
            LlmError::TooLarge { .. } => "request_too_large",
        }
    }

    fn body(&self, provider: Provider) -> serde_json::Value {
        match provider {
            Provider::Openai => json!({
                "error": {
                    "message": self.to_string(),
                    "type": "invalid_request_error",
                    "param": null,
                    "code": self.code(),
                }
            }),
            Provider::Anthropic => json!({
                "type": "error",
                "error": {
                    "type": match self {
                        LlmError::TooLarge { .. } => "request_too_large",
                        _ => "invalid_request_error",
                    },
                    "message": self.to_string(),
                }
            }),
        }
    }

    /// The complete response for this error in `provider`'s shape.
    pub fn answer(&self, provider: Provider) -> Option<Answer> {
        let body = Bytes::from(self.body(provider).to_string());
        Answer::json(self.status(), body, &[("cache-control", "no-store")])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_the_providers_shapes() {
        let e = LlmError::InvalidRequest("missing model".into());
        let openai = e.body(Provider::Openai);
        assert_eq!(openai["error"]["message"], "missing model");
        assert_eq!(openai["error"]["type"], "invalid_request_error");
        assert_eq!(openai["error"]["code"], "invalid_request");
        let anthropic = e.body(Provider::Anthropic);
        assert_eq!(anthropic["type"], "error");
        assert_eq!(anthropic["error"]["type"], "invalid_request_error");
        assert_eq!(LlmError::TooLarge { limit: 1 }.status(), 413);
    }
}
