//! A route's `graphql:` block: its YAML types and validation. Key names are the contract in
//! `docs/configuration.md`; every key has a default so `graphql: {}` turns APQ on alone.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::units::{ByteSize, HumanDuration};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphqlConfig {
    /// Automatic persisted queries: the hash → query registry in the shared store.
    #[serde(default)]
    pub apq: ApqConfig,
    /// Cache results of query operations (absent: no response caching).
    #[serde(default)]
    pub response_cache: Option<ResponseCacheConfig>,
    /// An Apollo persisted-query manifest: operations known in advance, optionally the only
    /// ones allowed.
    #[serde(default)]
    pub persisted_queries: Option<PersistedQueriesConfig>,
    /// Largest GraphQL request body; larger ones get a GraphQL error (400). At most the route's
    /// `max_body`.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApqConfig {
    /// How long a registered query is kept after its last use (refreshed on use).
    #[serde(default = "default_apq_ttl")]
    pub ttl: HumanDuration,
}

impl Default for ApqConfig {
    fn default() -> Self {
        ApqConfig {
            ttl: default_apq_ttl(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResponseCacheConfig {
    /// Freshness lifetime of a cached result; a smaller `max-age` from the app wins.
    #[serde(default = "default_response_ttl")]
    pub ttl: HumanDuration,
    /// After `ttl`, serve the stale result while one background request refreshes it.
    #[serde(default)]
    pub stale_while_revalidate: HumanDuration,
    /// `per_credential`: requests with `Authorization`/`Cookie` get entries of their own
    /// (credentials hashed into the key). `shared`: one entry for everyone.
    #[serde(default)]
    pub scope: Scope,
}

#[derive(
    Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Shared,
    #[default]
    PerCredential,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PersistedQueriesConfig {
    /// Path of an Apollo persisted-query manifest (JSON), relative to the working directory.
    /// Re-read whenever the config is reloaded.
    pub manifest: String,
    /// Accept only operations from the manifest; others get `QUERY_NOT_IN_SAFELIST` (403).
    #[serde(default)]
    pub safelist: bool,
    /// With `safelist`: let operations outside the manifest through, and count them.
    #[serde(default)]
    pub log_only: bool,
}

fn default_apq_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}

fn default_response_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

fn default_max_body() -> ByteSize {
    ByteSize(1024 * 1024)
}
