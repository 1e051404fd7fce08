//! Why an inference request was not answered with a prediction. Each has a stable code and an
//! HTTP status, and is rendered in the route's protocol: OIP's `{"error": "<message>"}` (with
//! our `code` beside it), or the app's `{"error": "<code>", "message": "..."}`.

use serde_json::json;

use super::config::Protocol;
use crate::pipeline::Answer;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum InferenceError {
    /// The request does not fit the model (shape, type, missing input, non-finite value, JSON).
    #[error("{0}")]
    BadInput(String),
    #[error("no model named {0:?}")]
    UnknownModel(String),
    #[error("model {0:?} is not loaded")]
    Unavailable(String),
    #[error("the inference queue of model {0:?} is full")]
    Overloaded(String),
    #[error("the request's deadline passed before the model answered")]
    Deadline,
    #[error("the model failed: {0}")]
    Compute(String),
    #[error("no such endpoint: {0}")]
    NoEndpoint(String),
    #[error("{0} is not allowed here")]
    Method(String),
}

impl InferenceError {
    pub fn code(&self) -> &'static str {
        match self {
            InferenceError::BadInput(_) => "invalid_input",
            InferenceError::UnknownModel(_) => "model_not_found",
            InferenceError::Unavailable(_) => "model_unavailable",
            InferenceError::Overloaded(_) => "overloaded",
            InferenceError::Deadline => "deadline_exceeded",
            InferenceError::Compute(_) => "inference_failed",
            InferenceError::NoEndpoint(_) => "not_found",
            InferenceError::Method(_) => "method_not_allowed",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            InferenceError::BadInput(_) => 400,
            InferenceError::UnknownModel(_) | InferenceError::NoEndpoint(_) => 404,
            InferenceError::Method(_) => 405,
            InferenceError::Unavailable(_) | InferenceError::Overloaded(_) => 503,
            InferenceError::Deadline => 504,
            InferenceError::Compute(_) => 500,
        }
    }

    /// The metric outcome of a request that ended with this error.
    pub fn outcome(&self) -> &'static str {
        match self {
            InferenceError::BadInput(_)
            | InferenceError::NoEndpoint(_)
            | InferenceError::Method(_) => "bad_input",
            InferenceError::UnknownModel(_) | InferenceError::Unavailable(_) => "unavailable",
            InferenceError::Overloaded(_) => "overloaded",
            InferenceError::Deadline => "deadline",
            InferenceError::Compute(_) => "error",
        }
    }

    /// Whether `fallback: upstream` may stand in: the model is missing or failed, not the input.
    pub fn falls_back(&self) -> bool {
        matches!(
            self,
            InferenceError::Unavailable(_) | InferenceError::Compute(_)
        )
    }

    /// The response in the route's protocol; `json_code` is the mapping's `error_code` for 400s.
    pub fn answer(&self, protocol: Protocol, json_code: &str) -> Option<Answer> {
        let body = match protocol {
            Protocol::Oip => json!({ "error": self.to_string(), "code": self.code() }),
            Protocol::Json => {
                let code = match self {
                    InferenceError::BadInput(_) => json_code,
                    _ => self.code(),
                };
                json!({ "error": code, "message": self.to_string() })
            }
        };
        Answer::json_value(self.status(), &body, "no-store", &[])
    }
}
