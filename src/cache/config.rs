//! A route's `cache:` block: its YAML types, validation and compilation to a [`RoutePolicy`].

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::policy::{HeuristicPolicy, RoutePolicy, DEFAULT_STATUSES, NEGATIVE_STATUSES};
use super::stage::HttpCache;
use crate::config::units::HumanDuration;
use crate::pipeline::registry::{BuildCx, FieldProblem, RouteFeature, ValidateCx};
use crate::pipeline::Stage;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
    /// Freshness lifetime; defaults to `cache.default_ttl`.
    #[serde(default)]
    pub ttl: Option<HumanDuration>,
    /// After `ttl`, serve the stale entry while one background request refreshes it.
    #[serde(default)]
    pub stale_while_revalidate: HumanDuration,
    /// After `ttl`, serve the stale entry when the upstream fails (refused, timeout, 5xx).
    #[serde(default)]
    pub stale_if_error: HumanDuration,
    /// Entries with validators (`ETag`, `Last-Modified`) are kept this much longer than their
    /// stale windows so an expired entry is revalidated with a conditional request (304)
    /// instead of fetched in full.
    #[serde(default = "default_keep")]
    pub keep: HumanDuration,
    #[serde(default)]
    pub key: CacheKeyConfig,
    /// Share responses to requests carrying `Authorization`/`Cookie` (keyed by the credential).
    #[serde(default)]
    pub shared: bool,
    /// Use the freshness the upstream gives (`s-maxage`, `max-age`, `Expires`, less its `Age`)
    /// instead of `ttl` when present.
    #[serde(default)]
    pub respect_origin: bool,
    /// With `respect_origin`, the freshness of responses the upstream gave none: `ttl` (the
    /// route's `ttl`), `last_modified` (RFC 9111 §4.2.2: 10 % of the time since
    /// `Last-Modified`, at most `heuristic_max`; not stored without it) or `none` (not stored).
    /// With `last_modified`/`none`, explicit freshness also makes any final status storable
    /// unless `statuses` is set.
    #[serde(default)]
    pub heuristic: Heuristic,
    /// Honour `CDN-Cache-Control` (RFC 9213): when the upstream sends a valid one, it replaces
    /// `Cache-Control` and `Expires` for this cache (clients still get both).
    #[serde(default)]
    pub cdn_cache_control: bool,
    /// Honour the upstream's `stale-while-revalidate` / `stale-if-error` response directives
    /// (RFC 5861): where given, they replace the route's windows for that response.
    #[serde(default)]
    pub origin_stale: bool,
    /// What a response whose `Vary` names a header outside `key.headers` does: `keyed` (not
    /// stored) or `match` (stored with the request's values of those headers and served only to
    /// requests with the same values, up to `max_variants` variants per URL).
    #[serde(default)]
    pub vary: VaryMode,
    /// With `vary: match`, how many variants of one URL stay reachable (the newest).
    #[serde(default = "default_max_variants")]
    #[schemars(range(min = 1, max = 64))]
    pub max_variants: usize,
    /// Upper bound of `heuristic: last_modified` freshness.
    #[serde(default = "default_heuristic_max")]
    pub heuristic_max: HumanDuration,
    /// Statuses that may be stored; defaults to 200, 203, 204, 300, 301, 308, plus 404, 405,
    /// 410, 414, 501 when `negative_ttl` is set.
    #[serde(default)]
    pub statuses: Option<Vec<u16>>,
    /// Store negative answers (404, 405, 410, 414, 501) for at most this long. Absent: they are
    /// not stored (unless listed in `statuses`).
    #[serde(default)]
    pub negative_ttl: Option<HumanDuration>,
    /// What a client's `Cache-Control: no-cache` / `Pragma: no-cache` does: `ignore` (served
    /// from the cache, so no client can force refetches of a shared entry) or `refresh`
    /// (refetch; the entry is replaced only by a storable response).
    #[serde(default)]
    pub client_no_cache: ClientNoCache,
    /// What a request's `max-age`, `min-fresh` and `max-stale` do: `ignore` (as nginx and
    /// Varnish do, so no client can force refetches of a shared entry) or `honour` (RFC 9111
    /// §5.2.1: a stored response too old or too close to expiry for the request is refetched
    /// or revalidated; a stale one within `max-stale` answers it). `only-if-cached` is always
    /// honoured: nothing stored (or usable) gets 504 without asking the upstream.
    #[serde(default)]
    pub client_directives: ClientDirectives,
}

/// See `client_directives`.
#[derive(
    Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ClientDirectives {
    #[default]
    Ignore,
    Honour,
}

#[derive(
    Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ClientNoCache {
    #[default]
    Ignore,
    Refresh,
}

/// Where freshness comes from for responses without explicit freshness (see `heuristic`).
#[derive(
    Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Heuristic {
    #[default]
    Ttl,
    LastModified,
    None,
}

/// See `vary`.
#[derive(
    Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum VaryMode {
    #[default]
    Keyed,
    Match,
}

fn default_heuristic_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}

fn default_max_variants() -> usize {
    8
}

fn default_keep() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheKeyConfig {
    /// Include the query string in the key.
    #[serde(default = "default_true")]
    pub query: bool,
    /// Request headers whose values split the cache (like `Vary`).
    #[serde(default)]
    pub headers: Vec<String>,
    /// Request headers removed before forwarding, so the app cannot vary on what the key
    /// ignores (e.g. `forwarded`, `x-forwarded-prefix` from untrusted clients).
    #[serde(default)]
    pub strip: Vec<String>,
}

impl Default for CacheKeyConfig {
    fn default() -> Self {
        Self {
            query: true,
            headers: Vec::new(),
            strip: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

impl RouteCacheConfig {
    /// The freshness lifetime and both stale windows, with the global default applied.
    pub fn lifetime(&self, default_ttl: Duration) -> Duration {
        self.ttl.map_or(default_ttl, HumanDuration::get)
            + self
                .stale_while_revalidate
                .get()
                .max(self.stale_if_error.get())
    }

    fn policy(
        &self,
        default_ttl: Duration,
        retention_floor: Duration,
        lock_timeout: Duration,
    ) -> RoutePolicy {
        RoutePolicy {
            ttl: self.ttl.map_or(default_ttl, HumanDuration::get),
            stale_while_revalidate: self.stale_while_revalidate.get(),
            stale_if_error: self.stale_if_error.get(),
            keep: self.keep.get(),
            retention_floor,
            shared: self.shared,
            respect_origin: self.respect_origin,
            heuristic: match self.heuristic {
                Heuristic::Ttl => HeuristicPolicy::RouteTtl,
                Heuristic::LastModified => HeuristicPolicy::LastModified {
                    max: self.heuristic_max.get(),
                },
                Heuristic::None => HeuristicPolicy::Never,
            },
            explicit_any_status: self.heuristic != Heuristic::Ttl && self.statuses.is_none(),
            cdn_cache_control: self.cdn_cache_control,
            origin_stale: self.origin_stale,
            vary_match: self.vary == VaryMode::Match,
            max_variants: self.max_variants,
            statuses: self.statuses.clone().unwrap_or_else(|| {
                let mut statuses = DEFAULT_STATUSES.to_vec();
                if self.negative_ttl.is_some() {
                    statuses.extend_from_slice(NEGATIVE_STATUSES);
                }
                statuses
            }),
            key_query: self.key.query,
            key_headers: self
                .key
                .headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            client_refresh: self.client_no_cache == ClientNoCache::Refresh,
            client_directives: self.client_directives == ClientDirectives::Honour,
            strip_headers: self
                .key
                .strip
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            negative_ttl: self.negative_ttl.map(HumanDuration::get),
            lock_timeout,
        }
    }
}

impl RouteFeature for RouteCacheConfig {
    fn validate(&self, at: &str, _cx: &ValidateCx<'_>, out: &mut Vec<FieldProblem>) {
        if self.ttl.is_some_and(|t| t.get().is_zero()) {
            out.push(FieldProblem::new(
                format!("{at}.ttl"),
                "must be greater than zero (remove `cache` to disable caching)",
            ));
        }
        if self.heuristic != Heuristic::Ttl && !self.respect_origin {
            out.push(FieldProblem::new(
                format!("{at}.heuristic"),
                "applies only with `respect_origin: true` (otherwise `ttl` always applies)",
            ));
        }
        if self.heuristic_max.get().is_zero() {
            out.push(FieldProblem::new(
                format!("{at}.heuristic_max"),
                "must be greater than zero (use `heuristic: none` to store no heuristic freshness)",
            ));
        }
        if !(1..=64).contains(&self.max_variants) {
            out.push(FieldProblem::new(
                format!("{at}.max_variants"),
                "must be between 1 and 64",
            ));
        }
        if self.negative_ttl.is_some_and(|t| t.get().is_zero()) {
            out.push(FieldProblem::new(
                format!("{at}.negative_ttl"),
                "must be greater than zero (remove it to not store negative answers)",
            ));
        }
        if let Some(statuses) = &self.statuses {
            for (j, status) in statuses.iter().enumerate() {
                if !(100..=599).contains(status) {
                    out.push(FieldProblem::new(
                        format!("{at}.statuses[{j}]"),
                        format!("{status} is not an HTTP status"),
                    ));
                }
            }
        }
        for (list, names) in [("headers", &self.key.headers), ("strip", &self.key.strip)] {
            for (j, header) in names.iter().enumerate() {
                if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    out.push(FieldProblem::new(
                        format!("{at}.key.{list}[{j}]"),
                        format!("{header:?} is not a valid header name"),
                    ));
                }
            }
        }
        for (j, header) in self.key.strip.iter().enumerate() {
            if self
                .key
                .headers
                .iter()
                .any(|k| k.eq_ignore_ascii_case(header))
            {
                out.push(FieldProblem::new(
                    format!("{at}.key.strip[{j}]"),
                    format!("{header:?} is keyed: it cannot also be stripped"),
                ));
            }
        }
    }

    fn keyed_headers(&self) -> Option<Vec<String>> {
        Some(self.key.headers.clone())
    }

    fn build(&self, cx: &BuildCx<'_>) -> Result<Arc<dyn Stage>, String> {
        let default_ttl = cx.config.cache.default_ttl.get();
        // Entries are kept at least as long as the longest-lived route's, so raising a route's
        // TTL on reload applies to what is already stored.
        let floor = cx
            .config
            .routes
            .iter()
            .filter_map(|r| r.cache.as_ref())
            .map(|c| c.lifetime(default_ttl))
            .max()
            .unwrap_or_default();
        let lock_timeout = cx.config.cache.lock_timeout.get();
        Ok(Arc::new(HttpCache::new(
            cx.services.store.clone(),
            Arc::new(self.policy(default_ttl, floor, lock_timeout)),
            cx.route_name,
        )))
    }
}
