//! `upstream_by_header`: send a request to another named upstream when a request header has a
//! listed value (canary and blue/green releases, a tenant's dedicated backend). The route's own
//! `upstream` serves every other request.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::pipeline::registry::{BuildCx, FieldProblem, RouteFeature, ValidateCx};
use crate::pipeline::{RequestCx, Stage, StageError, Verdict};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamByHeader {
    /// The request header to look at (case-insensitive name).
    pub header: String,
    /// Header value (compared exactly) → name of an entry in `upstreams`.
    pub upstreams: BTreeMap<String, String>,
}

impl RouteFeature for UpstreamByHeader {
    fn validate(&self, at: &str, cx: &ValidateCx<'_>, out: &mut Vec<FieldProblem>) {
        if http::HeaderName::from_bytes(self.header.as_bytes()).is_err() {
            out.push(FieldProblem::new(
                format!("{at}.header"),
                format!("{:?} is not a valid header name", self.header),
            ));
        }
        if self.upstreams.is_empty() {
            out.push(FieldProblem::new(
                format!("{at}.upstreams"),
                "list at least one header value and its upstream",
            ));
        }
        for (value, upstream) in &self.upstreams {
            if !cx.config.upstreams.contains_key(upstream) {
                out.push(FieldProblem::new(
                    format!("{at}.upstreams.{value}"),
                    format!("no upstream named {upstream:?}"),
                ));
            }
        }
    }

    fn routing_headers(&self) -> Vec<String> {
        vec![self.header.clone()]
    }

    fn build(&self, _cx: &BuildCx<'_>) -> Result<Arc<dyn Stage>, String> {
        let header = http::HeaderName::from_bytes(self.header.as_bytes())
            .map_err(|e| format!("header {:?}: {e}", self.header))?;
        Ok(Arc::new(HeaderRouter {
            header,
            upstreams: self
                .upstreams
                .iter()
                .map(|(v, u)| (v.as_bytes().to_vec(), u.clone()))
                .collect(),
        }))
    }
}

#[derive(Debug)]
pub struct HeaderRouter {
    header: http::HeaderName,
    upstreams: Vec<(Vec<u8>, String)>,
}

impl HeaderRouter {
    /// The upstream named for a header value, if any.
    pub fn choose(&self, value: &[u8]) -> Option<&str> {
        self.upstreams
            .iter()
            .find(|(v, _)| v.as_slice() == value)
            .map(|(_, u)| u.as_str())
    }
}

#[async_trait]
impl Stage for HeaderRouter {
    fn name(&self) -> &'static str {
        "upstream_by_header"
    }

    async fn on_request(&self, cx: &mut RequestCx<'_>) -> Result<Verdict, StageError> {
        // Only a single header line routes: several lines are ambiguous, and the cache keys
        // them differently from one line anyway.
        let mut values = cx.req.headers.get_all(&self.header).iter();
        let chosen = match (values.next(), values.next()) {
            (Some(value), None) => self.choose(value.as_bytes()),
            _ => None,
        };
        if let Some(upstream) = chosen {
            let upstream = upstream.to_owned();
            cx.set_upstream(upstream);
        }
        Ok(Verdict::Continue)
    }
}
