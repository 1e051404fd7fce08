//! `graphql:` on a route: Apollo-compatible automatic persisted queries (APQ) in front of a
//! GraphQL app that knows nothing of them, GET for hashed queries (so a CDN can cache them),
//! response caching of query operations, and a safelist from a persisted-query manifest.
//!
//! The APQ registry and cached results live in the shared [`Store`](crate::store::Store)
//! (L1 + Redis), so a registration is seen by every replica and survives a restart. The
//! upstream only ever receives plain GraphQL requests (POST JSON). The stage knows no other
//! capability; headers shared with the HTTP cache come from [`crate::cache_headers`].

pub mod config;
pub mod error;
pub mod manifest;
pub mod metrics;
pub mod operation;
pub mod protocol;
mod stage;

pub use config::GraphqlConfig;
pub use error::GraphqlError;
pub use stage::GraphqlStage;

use std::sync::Arc;

use crate::pipeline::registry::{BuildCx, FieldProblem, RouteFeature, ValidateCx};
use crate::pipeline::Stage;

impl RouteFeature for GraphqlConfig {
    fn validate(&self, at: &str, cx: &ValidateCx<'_>, out: &mut Vec<FieldProblem>) {
        cx.check_max_body(&format!("{at}.max_body"), self.max_body, out);
        if cx.route.cache.is_some() {
            // The HTTP cache would key hashed GETs by URL and store GraphQL errors with them.
            out.push(FieldProblem::new(
                at.to_owned(),
                "a route with graphql: cannot also have cache: (use graphql.response_cache)",
            ));
        }
        if self.apq.ttl.get().is_zero() {
            out.push(FieldProblem::new(
                format!("{at}.apq.ttl"),
                "must be greater than zero",
            ));
        }
        if let Some(rc) = &self.response_cache {
            if rc.ttl.get().is_zero() {
                out.push(FieldProblem::new(
                    format!("{at}.response_cache.ttl"),
                    "must be greater than zero",
                ));
            }
        }
        if let Some(pq) = &self.persisted_queries {
            if pq.log_only && !pq.safelist {
                out.push(FieldProblem::new(
                    format!("{at}.persisted_queries.log_only"),
                    "only means something with safelist: true",
                ));
            }
            if let Err(e) = manifest::Manifest::load(&pq.manifest) {
                out.push(FieldProblem::new(
                    format!("{at}.persisted_queries.manifest"),
                    e.to_string(),
                ));
            }
        }
    }

    fn watched_files(&self) -> Vec<String> {
        self.persisted_queries
            .iter()
            .map(|pq| pq.manifest.clone())
            .collect()
    }

    fn build(&self, cx: &BuildCx<'_>) -> Result<Arc<dyn Stage>, String> {
        let metrics = cx
            .services
            .shared(|registry| metrics::GraphqlMetrics::new(registry).map_err(|e| e.to_string()))?;
        let manifest = match &self.persisted_queries {
            Some(pq) => Some(Arc::new(
                manifest::Manifest::load(&pq.manifest).map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        Ok(Arc::new(
            GraphqlStage::new(
                self.clone(),
                cx.services.store.clone(),
                metrics,
                manifest,
                cx.route_name,
            )
            .with_lock_timeout(cx.config.cache.lock_timeout.get()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::load::parse_str;

    fn problems(graphql: &str, extra: &str) -> String {
        let text = format!(
            "upstreams: {{ app: {{ url: \"http://127.0.0.1:1\" }} }}\nroutes:\n  - name: g\n    match: {{ path: /graphql }}\n    upstream: app\n{extra}    graphql: {graphql}\n"
        );
        match parse_str(&text, "t.yaml") {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn sections_are_validated_with_positions() {
        assert_eq!(problems("{}", ""), "");
        assert!(problems("{ apq: { ttl: 0s } }", "").contains("routes[0].graphql.apq.ttl"));
        assert!(problems("{ max_body: 8MiB }", "").contains("larger than the route's max_body"));
        assert!(problems("{ bogus: 1 }", "").contains("unknown field `bogus`"));
        assert!(problems("{ response_cache: { scope: everyone } }", "").contains("unknown variant"));
        assert!(problems("{}", "    cache: { ttl: 1m }\n").contains("cannot also have cache:"));
        let missing = problems("{ persisted_queries: { manifest: /nonexistent.json } }", "");
        assert!(
            missing.contains("graphql.persisted_queries.manifest: cannot read"),
            "{missing}"
        );
        let lonely = "{ persisted_queries: { manifest: /nonexistent.json, log_only: true } }";
        assert!(problems(lonely, "").contains("only means something with safelist: true"));
    }
}
