//! Where capabilities meet the config: each route section a capability owns implements
//! [`RouteFeature`] (validate, then build a [`Stage`]), and [`route_features`] lists them in
//! stage order. Adding a capability adds its field to `RouteConfig` and one line here.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use super::Stage;
use crate::config::schema::{Config, RouteConfig};
use crate::store::Store;

/// Long-lived services stages are built with; the same for every config generation.
pub struct Services {
    pub store: Arc<Store>,
    /// SLO counts and limiters, kept across config generations.
    pub slo: Arc<crate::slo::SloRegistry>,
    /// Where capabilities register their metrics (once per process, see [`Services::shared`]).
    pub metrics: prometheus::Registry,
    /// Per-capability state that outlives config generations, one value per type.
    shared: parking_lot::Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl Services {
    pub fn new(
        store: Arc<Store>,
        metrics: prometheus::Registry,
        slo: Arc<crate::slo::SloRegistry>,
    ) -> Services {
        Services {
            store,
            slo,
            metrics,
            shared: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// An in-memory store and nothing else: for config checks and tests.
    pub fn in_memory() -> Result<Arc<Services>, ServicesError> {
        let metrics = prometheus::Registry::new();
        let store = Store::new(crate::store::CacheSettings::default(), &metrics)?;
        let slo = crate::slo::SloRegistry::new(&metrics)?;
        Ok(Arc::new(Services::new(store, metrics, slo)))
    }

    /// The process-wide `T` of a capability (e.g. its registered metrics), made on first use:
    /// a stage rebuilt by a config reload gets the same value instead of registering twice.
    pub fn shared<T: Any + Send + Sync>(
        &self,
        make: impl FnOnce(&prometheus::Registry) -> Result<T, String>,
    ) -> Result<Arc<T>, String> {
        let mut shared = self.shared.lock();
        if let Some(value) = shared.get(&TypeId::of::<T>()) {
            if let Ok(value) = Arc::clone(value).downcast::<T>() {
                return Ok(value);
            }
        }
        let value = Arc::new(make(&self.metrics)?);
        shared.insert(TypeId::of::<T>(), value.clone());
        Ok(value)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("{0}")]
    Cache(#[from] crate::store::CacheError),
    #[error("metrics registration failed: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A problem in one capability's section; the loader adds the file position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// Key path, e.g. `routes[2].cache.ttl`.
    pub path: String,
    pub message: String,
}

impl FieldProblem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldProblem {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// What validation may look at besides the section itself.
pub struct ValidateCx<'a> {
    pub config: &'a Config,
    /// The route the section belongs to (its other sections included).
    pub route: &'a RouteConfig,
}

impl ValidateCx<'_> {
    /// A stage's own body limit: greater than zero and at most the route's `max_body`, which
    /// bounds every body read (past it the proxy answers 413).
    pub fn check_max_body(
        &self,
        path: &str,
        limit: crate::config::units::ByteSize,
        out: &mut Vec<FieldProblem>,
    ) {
        if limit.0 == 0 {
            out.push(FieldProblem::new(path, "must be greater than zero"));
        } else if limit.0 > self.route.max_body.0 {
            out.push(FieldProblem::new(
                path,
                format!(
                    "larger than the route's max_body ({} bytes), which bounds every body read",
                    self.route.max_body.0
                ),
            ));
        }
    }
}

/// What building a stage may use.
pub struct BuildCx<'a> {
    pub config: &'a Config,
    pub services: &'a Services,
    pub route_name: &'a str,
}

/// A capability's per-route config section.
pub trait RouteFeature {
    /// Semantic checks serde cannot do; `at` is the section's key path.
    fn validate(&self, at: &str, cx: &ValidateCx<'_>, out: &mut Vec<FieldProblem>);
    /// Request headers whose values change where (or how) this stage sends a request; a cache
    /// on the same route must key on them.
    fn routing_headers(&self) -> Vec<String> {
        Vec::new()
    }
    /// Request headers the route's stored responses are keyed on (a caching capability).
    fn keyed_headers(&self) -> Option<Vec<String>> {
        None
    }
    /// Files besides the config that this section reads when it is built (e.g. a manifest):
    /// an edit to one reloads the config like an edit to the config file does.
    fn watched_files(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether the stage answers every request itself, so the route needs no upstream.
    fn answers_without_upstream(&self) -> bool {
        false
    }
    /// The stage this section compiles to (once per config load).
    fn build(&self, cx: &BuildCx<'_>) -> Result<Arc<dyn Stage>, String>;
}

/// The capability sections a route enables, in stage order, with their YAML keys.
pub fn route_features(route: &RouteConfig) -> Vec<(&'static str, &dyn RouteFeature)> {
    let mut features: Vec<(&'static str, &dyn RouteFeature)> = Vec::new();
    if let Some(buffer) = route.buffer_request.as_ref().filter(|b| b.enabled()) {
        features.push(("buffer_request", buffer));
    }
    if let Some(router) = &route.upstream_by_header {
        features.push(("upstream_by_header", router));
    }
    if let Some(graphql) = &route.graphql {
        features.push(("graphql", graphql));
    }
    if let Some(llm) = &route.llm {
        features.push(("llm", llm));
    }
    if let Some(cache) = &route.cache {
        features.push(("cache", cache));
    }
    // After the cache: hits are never queued, limited or shed, and a shed request can still
    // be answered from a stale entry.
    if let Some(slo) = &route.slo {
        features.push(("slo", slo));
    }
    // Last: an in-process answer is still limited and shed by the SLO stage, and takes its
    // deadline.
    if let Some(inference) = &route.inference {
        features.push(("inference", inference));
    }
    features
}

/// Whether some stage of the route answers every request (so it may have no upstream).
pub fn answers_without_upstream(route: &RouteConfig) -> bool {
    route_features(route)
        .iter()
        .any(|(_, feature)| feature.answers_without_upstream())
}

/// Brings config-wide capability state in line with a config before its routes are built
/// (the model registry loads the `models:` section). Runs once per (re)load.
pub fn prepare(config: &Config, services: &Services) -> Result<(), String> {
    crate::inference::prepare(config, services)
}

/// Every file the config's capability sections read (see [`RouteFeature::watched_files`]).
pub fn watched_files(config: &Config) -> Vec<String> {
    config
        .routes
        .iter()
        .flat_map(|route| {
            route_features(route)
                .into_iter()
                .flat_map(|(_, feature)| feature.watched_files())
        })
        .collect()
}

/// Validates every capability section of every route.
pub fn validate(config: &Config, route_paths: &[String], out: &mut Vec<FieldProblem>) {
    for (route, base) in config.routes.iter().zip(route_paths) {
        let cx = ValidateCx { config, route };
        let features = route_features(route);
        for (key, feature) in &features {
            feature.validate(&format!("{base}.{key}"), &cx, out);
        }
        // Responses that depend on a routing header must not share entries across its values.
        let keyed: Vec<String> = features
            .iter()
            .filter_map(|(_, f)| f.keyed_headers())
            .flatten()
            .collect();
        let caches = features.iter().any(|(_, f)| f.keyed_headers().is_some());
        for (key, feature) in &features {
            for header in feature.routing_headers() {
                if caches && !keyed.iter().any(|k| k.eq_ignore_ascii_case(&header)) {
                    out.push(FieldProblem::new(
                        format!("{base}.{key}"),
                        format!(
                            "this route caches: add {header:?} to cache.key.headers so responses chosen by it are cached apart"
                        ),
                    ));
                }
            }
        }
    }
}

/// Builds a route's stages.
pub fn build_stages(
    config: &Config,
    route: &RouteConfig,
    services: &Services,
) -> Result<Vec<Arc<dyn Stage>>, String> {
    let cx = BuildCx {
        config,
        services,
        route_name: &route.name,
    };
    route_features(route)
        .into_iter()
        .map(|(key, feature)| {
            feature
                .build(&cx)
                .map_err(|e| format!("routes.{}.{key}: {e}", route.name))
        })
        .collect()
}
