//! `models:` and a route's `inference:`: ONNX models loaded in-process with tract (pure Rust)
//! and answered by the sidecar, so the Python app leaves the hot path.
//!
//! The [`registry`] loads the models of the config (at start, on reload, and when a model file
//! changes), checks them against what the config declares and swaps versions atomically; a
//! failed load keeps the serving version. The [`stage`] answers the Open Inference Protocol v2
//! or an app's own JSON shape through the prediction cache (the shared store) and the model's
//! [`batcher`] (micro-batching on a bounded pool of compute threads). The module knows nothing
//! of Pingora; `docs/inference.md` is its user guide.

pub mod batcher;
pub mod config;
pub mod error;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod registry;
mod stage;
pub mod tensor;

pub use config::{InferenceConfig, ModelConfig};
pub use error::InferenceError;
pub use registry::ModelRegistry;
pub use stage::InferenceStage;

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Method, StatusCode};
use serde_json::Value;

use crate::admin::AdminExtension;
use crate::config::schema::Config;
use crate::pipeline::registry::{BuildCx, FieldProblem, RouteFeature, Services, ValidateCx};
use crate::pipeline::Stage;
use config::{Fallback, Protocol};

/// The process-wide registry (kept across reloads).
pub fn registry(services: &Services) -> Result<Arc<ModelRegistry>, String> {
    services
        .shared(ModelRegistry::new)
        .map(|handle: Arc<Arc<ModelRegistry>>| (*handle).clone())
}

/// Applies the `models:` section before the routes are built (see
/// [`crate::pipeline::registry::prepare`]).
pub fn prepare(config: &Config, services: &Services) -> Result<(), String> {
    if config.models.is_empty() && !config.routes.iter().any(|r| r.inference.is_some()) {
        return Ok(());
    }
    registry(services)?.apply(&config.models)
}

/// Checks of the `models:` section serde cannot do.
pub fn validate_models(models: &BTreeMap<String, ModelConfig>) -> Vec<FieldProblem> {
    let mut out = Vec::new();
    for (name, m) in models {
        let at = format!("models.{name}");
        if m.path.trim().is_empty() {
            out.push(FieldProblem::new(format!("{at}.path"), "must not be empty"));
        }
        if m.batch.max_size == 0 {
            out.push(FieldProblem::new(
                format!("{at}.batch.max_size"),
                "must be at least 1 (1 turns batching off)",
            ));
        }
        if m.threads == 0 || m.threads > 64 {
            out.push(FieldProblem::new(
                format!("{at}.threads"),
                "must be 1 to 64",
            ));
        }
        if m.max_queue == 0 {
            out.push(FieldProblem::new(
                format!("{at}.max_queue"),
                "must be at least 1",
            ));
        }
        if m.cache.as_ref().is_some_and(|c| c.ttl.get().is_zero()) {
            out.push(FieldProblem::new(
                format!("{at}.cache.ttl"),
                "must be greater than zero (leave cache out to turn it off)",
            ));
        }
        for (kind, list) in [("inputs", &m.inputs), ("outputs", &m.outputs)] {
            for (tensor, spec) in list {
                if spec
                    .shape
                    .as_ref()
                    .is_some_and(|s| s.iter().any(|d| *d < -1 || *d == 0))
                {
                    out.push(FieldProblem::new(
                        format!("{at}.{kind}.{tensor}.shape"),
                        "dimensions are positive, or -1 for a dynamic one",
                    ));
                }
            }
        }
    }
    out
}

impl RouteFeature for InferenceConfig {
    fn validate(&self, at: &str, cx: &ValidateCx<'_>, out: &mut Vec<FieldProblem>) {
        let has_upstream = cx.route.upstream.is_some();
        match &self.model {
            Some(model) if !cx.config.models.contains_key(model) => {
                let known: Vec<&str> = cx.config.models.keys().map(String::as_str).collect();
                out.push(FieldProblem::new(
                    format!("{at}.model"),
                    format!(
                        "no model named {model:?} in models: (defined: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
            None if self.protocol == Protocol::Json => out.push(FieldProblem::new(
                format!("{at}.model"),
                "protocol: json needs a model",
            )),
            _ => {}
        }
        if self.protocol == Protocol::Oip && self.json != config::JsonMapping::default() {
            out.push(FieldProblem::new(
                format!("{at}.json"),
                "only means something with protocol: json",
            ));
        }
        if self.shadow {
            if self.protocol != Protocol::Json {
                out.push(FieldProblem::new(
                    format!("{at}.shadow"),
                    "shadow mode compares with an app endpoint: it needs protocol: json",
                ));
            }
            if !has_upstream {
                out.push(FieldProblem::new(
                    format!("{at}.shadow"),
                    "shadow mode needs the route's upstream to answer",
                ));
            }
        }
        if self.fallback == Some(Fallback::Upstream) && !has_upstream {
            out.push(FieldProblem::new(
                format!("{at}.fallback"),
                "fallback: upstream needs the route to have an upstream",
            ));
        }
        if !self.tolerance.is_finite() || self.tolerance < 0.0 {
            out.push(FieldProblem::new(
                format!("{at}.tolerance"),
                "must be a non-negative number",
            ));
        }
        cx.check_max_body(&format!("{at}.max_body"), self.max_body, out);
        if self.json.max_rows == 0 {
            out.push(FieldProblem::new(
                format!("{at}.json.max_rows"),
                "must be at least 1",
            ));
        }
    }

    fn answers_without_upstream(&self) -> bool {
        !self.shadow && self.fallback != Some(Fallback::Upstream)
    }

    fn build(&self, cx: &BuildCx<'_>) -> Result<Arc<dyn Stage>, String> {
        let has_upstream = cx
            .config
            .routes
            .iter()
            .find(|r| r.name == cx.route_name)
            .is_some_and(|r| r.upstream.is_some());
        Ok(Arc::new(InferenceStage::new(
            cx.route_name,
            self.clone(),
            has_upstream,
            registry(cx.services)?,
            cx.services.store.clone(),
        )))
    }
}

/// `GET /models` on the admin port, and one readiness check per model.
pub struct ModelsAdmin {
    registry: Arc<ModelRegistry>,
}

impl ModelsAdmin {
    pub fn new(registry: Arc<ModelRegistry>) -> Self {
        ModelsAdmin { registry }
    }
}

impl AdminExtension for ModelsAdmin {
    fn readiness(&self) -> Vec<(String, Value, bool)> {
        self.registry.readiness()
    }

    fn before_metrics(&self) {
        self.registry.refresh_gauges();
    }

    fn handle(
        &self,
        method: &Method,
        path: &str,
        _body: &[u8],
    ) -> Option<futures::future::BoxFuture<'static, (StatusCode, Value)>> {
        if path != "/models" || method != Method::GET {
            return None;
        }
        let status = self.registry.status();
        Some(Box::pin(async move { (StatusCode::OK, status) }))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::load::parse_str;

    fn problems(models: &str, route: &str) -> String {
        let text = format!(
            "upstreams: {{ app: {{ url: \"http://127.0.0.1:1\" }} }}\nmodels: {models}\nroutes:\n  - name: r\n    match: {{ path: /p }}\n{route}"
        );
        match parse_str(&text, "t.yaml") {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn sections_are_validated_with_positions() {
        let risk = "{ risk: { path: examples/models/risk.onnx } }";
        let ok = "    upstream: app\n    inference: { model: risk }\n";
        assert_eq!(problems(risk, ok), "");
        assert_eq!(
            problems(risk, "    inference: { protocol: oip }\n"),
            "",
            "an OIP route needs no upstream"
        );
        let p = problems(risk, "    inference: { model: nope }\n    upstream: app\n");
        assert!(
            p.contains("routes[0].inference.model: no model named \"nope\""),
            "{p}"
        );
        let p = problems(risk, "    inference: { model: risk, shadow: true }\n");
        assert!(p.contains("shadow mode needs the route's upstream"), "{p}");
        assert!(p.contains("routes[0].upstream: required"), "{p}");
        let p = problems(risk, "    match: {}\n");
        assert!(
            p.contains("upstream: required") || p.contains("duplicate"),
            "{p}"
        );
        let p = problems(
            risk,
            "    upstream: app\n    inference: { protocol: oip, json: { max_rows: 3 } }\n",
        );
        assert!(
            p.contains("only means something with protocol: json"),
            "{p}"
        );
        let p = problems(
            "{ risk: { path: x.onnx, batch: { max_size: 0 }, threads: 0, bogus: 1 } }",
            ok,
        );
        assert!(p.contains("unknown field `bogus`"), "{p}");
        let p = problems(
            "{ risk: { path: x.onnx, batch: { max_size: 0 }, threads: 0 } }",
            ok,
        );
        assert!(
            p.contains("models.risk.batch.max_size: must be at least 1"),
            "{p}"
        );
        assert!(p.contains("models.risk.threads: must be 1 to 64"), "{p}");
        let p = problems(
            risk,
            "    upstream: app\n    max_body: 1KiB\n    inference: { model: risk, max_body: 2KiB }\n",
        );
        assert!(
            p.contains("routes[0].inference.max_body: larger than the route's max_body"),
            "{p}"
        );
        let p = problems(
            risk,
            "    upstream: app\n    inference: { model: risk, protocol: grpc }\n",
        );
        assert!(p.contains("unknown variant `grpc`"), "{p}");
    }
}
