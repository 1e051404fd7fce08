//! `buffer_request: true`: read the whole request body (bounded by the route's `max_body`)
//! before anything is sent upstream, like nginx's `proxy_request_buffering`. A slow or stalled
//! upload then occupies outrider, not one of the app's few worker processes, and an oversized
//! body is refused with 413 before the app sees a byte.

use std::sync::Arc;

use pingora_http::RequestHeader;
use serde::{Deserialize, Serialize};

use crate::pipeline::registry::{BuildCx, FieldProblem, RouteFeature, ValidateCx};
use crate::pipeline::Stage;

/// The route key's value.
#[derive(
    Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(transparent)]
pub struct BufferRequest(pub bool);

impl BufferRequest {
    pub fn enabled(&self) -> bool {
        self.0
    }
}

impl RouteFeature for BufferRequest {
    fn validate(&self, _at: &str, _cx: &ValidateCx<'_>, _out: &mut Vec<FieldProblem>) {}

    fn build(&self, _cx: &BuildCx<'_>) -> Result<Arc<dyn Stage>, String> {
        Ok(Arc::new(BufferStage))
    }
}

/// Asks for the body; the proxy's bounded reader does the rest.
#[derive(Debug)]
pub struct BufferStage;

#[async_trait::async_trait]
impl Stage for BufferStage {
    fn name(&self) -> &'static str {
        "buffer_request"
    }

    fn wants_body(&self, _req: &RequestHeader) -> bool {
        true
    }
}
