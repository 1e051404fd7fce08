//! A route's `llm:` block: its YAML types. Key names are the contract in
//! `docs/configuration.md`; only `provider` is required.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::units::{ByteSize, HumanDuration};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// The API shape the route speaks: `openai` (`/v1/chat/completions`, `/v1/embeddings`, and
    /// OpenAI-compatible servers such as vLLM) or `anthropic` (`/v1/messages`).
    pub provider: Provider,
    /// The prompt/completion cache (on by default).
    #[serde(default)]
    pub cache: LlmCacheConfig,
    /// Model-tier routing rules, first match wins; none: the requested model is used.
    #[serde(default)]
    pub routing: Vec<RoutingRule>,
    /// Price per model (the model actually used), for the cost metrics.
    #[serde(default)]
    pub pricing: BTreeMap<String, Price>,
    /// Largest request body; larger ones get the provider's error shape with 413. At most the
    /// route's `max_body`.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Openai,
    Anthropic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmCacheConfig {
    /// `false`: every request goes to the provider (routing and metrics still apply).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long an answer is served from the cache.
    #[serde(default = "default_ttl")]
    pub ttl: HumanDuration,
    /// Who shares entries: `api_key` (default: a hash of the caller's API key is part of the
    /// key, so two keys never share), `shared` (everyone), or `header:<name>` (a tenant header).
    #[serde(default)]
    pub scope: CacheScope,
    /// Cache only requests with `temperature: 0` (others bypass the cache).
    #[serde(default)]
    pub deterministic_only: bool,
}

impl Default for LlmCacheConfig {
    fn default() -> Self {
        LlmCacheConfig {
            enabled: true,
            ttl: default_ttl(),
            scope: CacheScope::default(),
            deterministic_only: false,
        }
    }
}

/// Who may share a cache entry; written `api_key`, `shared` or `header:<name>`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub enum CacheScope {
    #[default]
    ApiKey,
    Shared,
    /// The value of this request header (lowercase name).
    Header(String),
}

impl TryFrom<String> for CacheScope {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match text.as_str() {
            "api_key" => Ok(CacheScope::ApiKey),
            "shared" => Ok(CacheScope::Shared),
            other => match other.strip_prefix("header:") {
                Some(name) if http::HeaderName::from_bytes(name.trim().as_bytes()).is_ok() => {
                    Ok(CacheScope::Header(name.trim().to_ascii_lowercase()))
                }
                Some(name) => Err(format!("{name:?} is not a valid header name")),
                None => Err(format!(
                    "unknown scope {other:?}: expected api_key, shared or header:<name>"
                )),
            },
        }
    }
}

impl From<CacheScope> for String {
    fn from(scope: CacheScope) -> String {
        match scope {
            CacheScope::ApiKey => "api_key".into(),
            CacheScope::Shared => "shared".into(),
            CacheScope::Header(name) => format!("header:{name}"),
        }
    }
}

impl schemars::JsonSchema for CacheScope {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "LlmCacheScope".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^(api_key|shared|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+)$",
            "description": "api_key, shared or header:<name>"
        })
    }
}

/// One routing rule: when every condition in `when` holds, use `model` (and `upstream`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutingRule {
    /// Shown in the `x-outrider-llm-rule` response header and metrics (default `routing[i]`).
    #[serde(default)]
    pub name: Option<String>,
    /// Conditions, all of which must hold; empty: always.
    #[serde(default)]
    pub when: RuleWhen,
    /// The model the provider gets.
    pub model: String,
    /// Another named upstream: one speaking the route's API shape (an OpenAI-compatible
    /// server), or, with `provider`, another provider's.
    #[serde(default)]
    pub upstream: Option<String>,
    /// The API shape `upstream` speaks when it is not the route's: `anthropic` on an `openai`
    /// route, and outrider translates the request and the answer (stream included).
    #[serde(default)]
    pub provider: Option<Provider>,
    /// The API key sent to this rule's upstream in place of the caller's (write it as
    /// `"${ENV_VAR}"`); unset: the caller's key is forwarded. Shown as `***` by `/config`.
    #[serde(default)]
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleWhen {
    /// The model the client asked for (e.g. an alias such as `auto`).
    #[serde(default)]
    pub model: Option<String>,
    /// Estimated prompt tokens (about 4 characters a token) at most this.
    #[serde(default)]
    pub max_prompt_tokens: Option<u64>,
    /// Estimated prompt tokens at least this.
    #[serde(default)]
    pub min_prompt_tokens: Option<u64>,
    /// The request offers tools (`true`) or none (`false`).
    #[serde(default)]
    pub tools: Option<bool>,
    /// The messages carry images (`true`) or none (`false`).
    #[serde(default)]
    pub images: Option<bool>,
    /// Request headers with these exact values (names case-insensitive).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// US dollars per million tokens.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

fn yes() -> bool {
    true
}

fn default_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

fn default_max_body() -> ByteSize {
    ByteSize(4 * 1024 * 1024)
}
