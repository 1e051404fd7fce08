//! `llm:` on a route: an LLM gateway in front of the OpenAI or Anthropic API (or an
//! OpenAI-compatible server). It caches prompts' answers in the shared
//! [`Store`](crate::store::Store) — streams recorded event by event and replayed byte for byte —
//! scoped per API key by default, routes requests to a model tier by rules (translating to the
//! other provider's API when a rule sends them there), and turns the
//! provider's `usage` into token and cost metrics. The API key passes through to the provider
//! and is never logged or stored (only a hash of it enters the cache key). The stage knows no
//! other capability; the cache vocabulary comes from [`crate::cache_headers`].

pub mod config;
pub mod error;
pub mod metrics;
pub mod protocol;
pub mod sse;
mod stage;
pub mod translate;

pub use config::LlmConfig;
pub use error::LlmError;
pub use stage::{LlmStage, RULE_HEADER};

use std::sync::Arc;

use crate::pipeline::registry::{BuildCx, FieldProblem, RouteFeature, ValidateCx};
use crate::pipeline::Stage;

impl RouteFeature for LlmConfig {
    fn validate(&self, at: &str, cx: &ValidateCx<'_>, out: &mut Vec<FieldProblem>) {
        cx.check_max_body(&format!("{at}.max_body"), self.max_body, out);
        if cx.route.cache.is_some() {
            // The HTTP cache keys by URL: every prompt to one endpoint would share an entry.
            out.push(FieldProblem::new(
                at.to_owned(),
                "a route with llm: cannot also have cache: (use llm.cache)",
            ));
        }
        if cx.route.graphql.is_some() {
            out.push(FieldProblem::new(
                at.to_owned(),
                "a route with llm: cannot also have graphql:",
            ));
        }
        if self.cache.enabled && self.cache.ttl.get().is_zero() {
            out.push(FieldProblem::new(
                format!("{at}.cache.ttl"),
                "must be greater than zero (or set cache.enabled: false)",
            ));
        }
        for (i, rule) in self.routing.iter().enumerate() {
            let base = format!("{at}.routing[{i}]");
            if rule.model.trim().is_empty() {
                out.push(FieldProblem::new(
                    format!("{base}.model"),
                    "must name a model",
                ));
            }
            if rule.provider.is_some_and(|p| p != self.provider) && rule.upstream.is_none() {
                out.push(FieldProblem::new(
                    format!("{base}.provider"),
                    "another provider needs its own upstream (set upstream)",
                ));
            }
            if let Some(key) = &rule.api_key {
                if key.is_empty() || http::HeaderValue::from_str(key).is_err() {
                    out.push(FieldProblem::new(
                        format!("{base}.api_key"),
                        "must be a non-empty header value (visible ASCII)",
                    ));
                }
            }
            if let Some(upstream) = &rule.upstream {
                if !cx.config.upstreams.contains_key(upstream) {
                    out.push(FieldProblem::new(
                        format!("{base}.upstream"),
                        format!("no upstream named {upstream:?}"),
                    ));
                }
            }
            if let (Some(min), Some(max)) =
                (rule.when.min_prompt_tokens, rule.when.max_prompt_tokens)
            {
                if min > max {
                    out.push(FieldProblem::new(
                        format!("{base}.when"),
                        "min_prompt_tokens is larger than max_prompt_tokens: the rule never matches",
                    ));
                }
            }
            for name in rule.when.headers.keys() {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    out.push(FieldProblem::new(
                        format!("{base}.when.headers"),
                        format!("{name:?} is not a valid header name"),
                    ));
                }
            }
        }
        for (model, price) in &self.pricing {
            for (key, value) in [
                ("input_per_mtok", price.input_per_mtok),
                ("output_per_mtok", price.output_per_mtok),
            ] {
                if !value.is_finite() || value < 0.0 {
                    out.push(FieldProblem::new(
                        format!("{at}.pricing.{model}.{key}"),
                        "must be a number of dollars, zero or more",
                    ));
                }
            }
        }
    }

    fn build(&self, cx: &BuildCx<'_>) -> Result<Arc<dyn Stage>, String> {
        let metrics = cx
            .services
            .shared(|registry| metrics::LlmMetrics::new(registry).map_err(|e| e.to_string()))?;
        Ok(Arc::new(
            LlmStage::new(
                self.clone(),
                cx.services.store.clone(),
                metrics,
                cx.route_name,
            )
            .with_lock_timeout(cx.config.cache.lock_timeout.get()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::load::parse_str;

    fn problems(llm: &str, extra: &str) -> String {
        let text = format!(
            "upstreams: {{ openai: {{ url: \"http://127.0.0.1:1\" }} }}\nroutes:\n  - name: chat\n    match: {{ path: /v1/chat/completions }}\n    upstream: openai\n{extra}    llm: {llm}\n"
        );
        match parse_str(&text, "t.yaml") {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn sections_are_validated_with_positions() {
        assert_eq!(problems("{ provider: openai }", ""), "");
        let full = "{ provider: anthropic, cache: { ttl: 6h, scope: \"header:x-tenant\", deterministic_only: true }, routing: [ { when: { model: auto, max_prompt_tokens: 1000, headers: { x-model-tier: cheap } }, model: m, upstream: openai } ], pricing: { m: { input_per_mtok: 0.15, output_per_mtok: 0.6 } }, max_body: 1MiB }";
        assert_eq!(problems(full, ""), "");
        assert!(problems("{}", "").contains("missing field `provider`"));
        assert!(problems("{ provider: gemini }", "").contains("unknown variant"));
        assert!(problems("{ provider: openai, bogus: 1 }", "").contains("unknown field `bogus`"));
        let scope = problems("{ provider: openai, cache: { scope: everyone } }", "");
        assert!(
            scope.contains("expected api_key, shared or header:<name>"),
            "{scope}"
        );
        assert!(problems("{ provider: openai, cache: { ttl: 0s } }", "")
            .contains("routes[0].llm.cache.ttl"));
        assert!(problems("{ provider: openai, max_body: 8MiB }", "")
            .contains("larger than the route's max_body"));
        assert!(problems("{ provider: openai }", "    cache: { ttl: 1m }\n")
            .contains("cannot also have cache:"));
        let upstream = problems(
            "{ provider: openai, routing: [ { model: m, upstream: nope } ] }",
            "",
        );
        assert!(
            upstream.contains("routes[0].llm.routing[0].upstream: no upstream named \"nope\""),
            "{upstream}"
        );
        assert!(problems(
            "{ provider: openai, routing: [ { when: { modle: x }, model: m } ] }",
            ""
        )
        .contains("unknown field `modle`"));
        assert!(problems(
            "{ provider: openai, pricing: { m: { input_per_mtok: -1, output_per_mtok: 1 } } }",
            ""
        )
        .contains("routes[0].llm.pricing.m.input_per_mtok"));
    }

    #[test]
    fn another_providers_rule_needs_its_own_upstream() {
        assert_eq!(
            problems(
                "{ provider: openai, routing: [ { model: m, upstream: openai, provider: anthropic, api_key: k } ] }",
                ""
            ),
            ""
        );
        let no_upstream = problems(
            "{ provider: openai, routing: [ { model: m, provider: anthropic } ] }",
            "",
        );
        assert!(
            no_upstream.contains(
                "routes[0].llm.routing[0].provider: another provider needs its own upstream"
            ),
            "{no_upstream}"
        );
        let reverse = problems(
            "{ provider: anthropic, routing: [ { model: m, upstream: openai, provider: openai } ] }",
            "",
        );
        assert_eq!(reverse, "", "both directions are translated");
        let key = problems(
            "{ provider: openai, routing: [ { model: m, api_key: \"\" } ] }",
            "",
        );
        assert!(
            key.contains("routes[0].llm.routing[0].api_key: must be a non-empty header value"),
            "{key}"
        );
    }
}
