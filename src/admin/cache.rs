//! `/cache/stats` and `/cache/purge`, and the cache's entry in `/ready`.

use std::sync::Arc;

use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::AdminExtension;
use crate::store::{CacheError, PurgeTarget, RedisState, Store};

pub struct CacheAdmin {
    cache: Arc<Store>,
}

impl CacheAdmin {
    pub fn new(cache: Arc<Store>) -> Self {
        Self { cache }
    }
}

/// A purge request: exactly one of `route`, `path_prefix` (optionally with `route`), `key`, `all`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    all: bool,
}

fn purge_target(body: &[u8]) -> Result<PurgeTarget, String> {
    let req: PurgeRequest = serde_json::from_slice(body).map_err(|e| {
        format!("expected JSON like {{\"route\":\"items\"}}, {{\"path_prefix\":\"/api/items\"}}, {{\"key\":\"<64 hex>\"}} or {{\"all\":true}}: {e}")
    })?;
    match (req.route, req.path_prefix, req.key, req.all) {
        (Some(route), None, None, false) => Ok(PurgeTarget::Namespace(route)),
        (route, Some(prefix), None, false) => {
            if !prefix.starts_with('/') {
                return Err("path_prefix must start with '/'".into());
            }
            Ok(PurgeTarget::PathPrefix {
                namespace: route,
                prefix,
            })
        }
        (None, None, Some(key), false) => Ok(PurgeTarget::Key(key)),
        (None, None, None, true) => Ok(PurgeTarget::All),
        _ => Err(
            "give exactly one of route, path_prefix (with an optional route), key or all".into(),
        ),
    }
}

impl AdminExtension for CacheAdmin {
    fn readiness(&self) -> Vec<(String, Value, bool)> {
        // Redis is an optimisation: its state is reported but never blocks readiness.
        let mut redis = match self.cache.redis_state() {
            RedisState::Disabled => json!({ "status": "disabled" }),
            RedisState::Up => json!({ "status": "up" }),
            RedisState::Degraded { reason } => json!({ "status": "degraded", "reason": reason }),
        };
        // Whether other replicas' purges reach this L1 (see docs/scale-out.md).
        if let (Some(subscribed), Some(obj)) =
            (self.cache.invalidation_subscribed(), redis.as_object_mut())
        {
            obj.insert(
                "invalidation".into(),
                json!(if subscribed { "subscribed" } else { "down" }),
            );
        }
        vec![("redis".to_string(), redis, false)]
    }

    fn before_metrics(&self) {
        // Pending L1 bookkeeping is applied first so the gauges match what a lookup would see.
        self.cache.sync_l1();
        self.cache.refresh_gauges();
    }

    fn handle(
        &self,
        method: &Method,
        path: &str,
        body: &[u8],
    ) -> Option<futures::future::BoxFuture<'static, (StatusCode, Value)>> {
        match (method, path) {
            (&Method::GET, "/cache/stats") => {
                let cache = self.cache.clone();
                // Settling and walking the counters is blocking work: keep it off the runtime
                // that answers /health and /ready.
                Some(Box::pin(async move {
                    match tokio::task::spawn_blocking(move || cache.stats()).await {
                        Ok(stats) => (StatusCode::OK, stats),
                        Err(e) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            json!({ "error": "internal_error", "message": e.to_string() }),
                        ),
                    }
                }))
            }
            (&Method::POST, "/cache/purge") => {
                let target = purge_target(body);
                let cache = self.cache.clone();
                Some(Box::pin(async move {
                    let target = match target {
                        Ok(t) => t,
                        Err(message) => {
                            return (
                                StatusCode::BAD_REQUEST,
                                json!({ "error": "invalid_purge", "message": message }),
                            )
                        }
                    };
                    match cache.purge(target).await {
                        Ok(report) => (StatusCode::OK, json!({ "purged": report })),
                        Err(CacheError::InvalidTarget(message)) => (
                            StatusCode::BAD_REQUEST,
                            json!({ "error": "invalid_purge", "message": message }),
                        ),
                        Err(e) => (
                            StatusCode::BAD_GATEWAY,
                            json!({ "error": "purge_failed", "message": e.to_string() }),
                        ),
                    }
                }))
            }
            (_, "/cache/stats" | "/cache/purge") => Some(Box::pin(async move {
                (
                    StatusCode::METHOD_NOT_ALLOWED,
                    json!({ "error": "method_not_allowed", "message": "use GET /cache/stats or POST /cache/purge" }),
                )
            })),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_requests_parse_strictly() {
        assert_eq!(
            purge_target(br#"{"route":"items"}"#),
            Ok(PurgeTarget::Namespace("items".into()))
        );
        assert_eq!(
            purge_target(br#"{"path_prefix":"/api"}"#),
            Ok(PurgeTarget::PathPrefix {
                namespace: None,
                prefix: "/api".into()
            })
        );
        assert_eq!(purge_target(br#"{"all":true}"#), Ok(PurgeTarget::All));
        assert!(purge_target(br#"{"route":"a","key":"b"}"#).is_err());
        assert!(purge_target(br#"{"routes":"a"}"#).is_err());
        assert!(purge_target(b"not json").is_err());
        assert!(purge_target(br#"{"path_prefix":"api"}"#).is_err());
        assert!(purge_target(b"{}").is_err());
    }
}
