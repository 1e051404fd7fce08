//! The YAML schema as typed structs. Every struct rejects unknown keys, so a typo is an error
//! instead of a silently ignored setting. Defaults live here, next to the field they belong to.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units::{ByteSize, HumanDuration};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Traffic listener. Changing it needs a restart.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Worker threads for the proxy (0 = one per CPU). Changing it needs a restart.
    #[serde(default)]
    pub threads: usize,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Connection limits on the traffic port (see `limits`).
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// ONNX models answered in-process by routes with `inference:` (name → model).
    #[serde(default)]
    pub models: BTreeMap<String, crate::inference::ModelConfig>,
}

fn default_listen() -> String {
    "0.0.0.0:8080".to_string()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin listener; loopback by default so it is never exposed by accident. Any other address
    /// needs `token` or `token_file`. Changing it needs a restart.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Bearer token that every admin request other than GET and HEAD (`POST /reload`,
    /// `POST /cache/purge`) must send as `Authorization: Bearer <token>`. Write it as
    /// `"${ENV_VAR}"`. Give this or `token_file`, not both.
    #[serde(default)]
    pub token: Option<super::secret::SecretString>,
    /// File holding the admin token (e.g. a mounted Kubernetes Secret), read at start and on every
    /// reload; trailing newlines are ignored.
    #[serde(default)]
    pub token_file: Option<String>,
    /// Host names (besides IP addresses and `localhost`) that admin requests may name in their
    /// `Host` header; any other name is refused, against DNS rebinding.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Longest time a client may take to send a request's header, and then its body; an idle
    /// keep-alive connection is closed after it too.
    #[serde(default = "default_admin_read_timeout")]
    pub read_timeout: HumanDuration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
            token_file: None,
            allowed_hosts: Vec::new(),
            read_timeout: default_admin_read_timeout(),
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9901".to_string()
}

fn default_admin_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://host:port` or `https://host[:port]`; a path is not allowed.
    pub url: String,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Longest wait for any read or write on the upstream connection.
    #[serde(default = "default_upstream_timeout")]
    pub timeout: HumanDuration,
}

fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

fn default_upstream_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default)]
    pub memory: MemoryCacheConfig,
    #[serde(default)]
    pub redis: RedisConfig,
    #[serde(default = "default_ttl")]
    pub default_ttl: HumanDuration,
    /// Responses larger than this stream through uncached.
    #[serde(default = "default_max_entry_size")]
    pub max_entry_size: ByteSize,
    /// Bytes held at once for responses being captured and values queued for Redis; past it,
    /// responses stream through uncached and writes are skipped. `0` means no bound.
    #[serde(default = "default_max_inflight_bytes")]
    pub max_inflight_bytes: ByteSize,
    /// Longest time a request waits for another request's fetch of the same key (like nginx's
    /// `proxy_cache_lock_timeout`); then it goes upstream itself and does not store the answer.
    #[serde(default = "default_lock_timeout")]
    pub lock_timeout: HumanDuration,
}

fn default_lock_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn default_max_inflight_bytes() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            memory: MemoryCacheConfig::default(),
            redis: RedisConfig::default(),
            default_ttl: default_ttl(),
            max_entry_size: default_max_entry_size(),
            max_inflight_bytes: default_max_inflight_bytes(),
            lock_timeout: default_lock_timeout(),
        }
    }
}

fn default_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

fn default_max_entry_size() -> ByteSize {
    ByteSize(8 * 1024 * 1024)
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryCacheConfig {
    /// Byte bound of the in-process L1; `0` disables L1.
    #[serde(default = "default_memory_max")]
    pub max_size: ByteSize,
}

impl Default for MemoryCacheConfig {
    fn default() -> Self {
        Self {
            max_size: default_memory_max(),
        }
    }
}

fn default_memory_max() -> ByteSize {
    ByteSize(256 * 1024 * 1024)
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// One Redis server, `redis://` or `rediss://` (TLS). Empty (and no `cluster_nodes`) means
    /// no L2: the cache is in-process only.
    #[serde(default)]
    pub url: String,
    /// Seed nodes of a Redis Cluster (`redis://host:port` or `rediss://…`, all alike); the rest
    /// of the cluster is discovered. Give this or `url`, not both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_nodes: Vec<String>,
    /// Certificates for `rediss://`: a private CA and, for mutual TLS, a client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RedisTlsConfig>,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Upper bound on what one Redis call may add to a request.
    #[serde(default = "default_redis_timeout")]
    pub timeout: HumanDuration,
}

/// PEM files for TLS to Redis, read at start.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisTlsConfig {
    /// CA certificate(s) that signed the Redis server's certificate; replaces the built-in web
    /// roots. Unset: the web roots (for managed Redis with a public certificate).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Client certificate chain for mutual TLS; needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<String>,
    /// Private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<String>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            cluster_nodes: Vec::new(),
            tls: None,
            key_prefix: default_key_prefix(),
            timeout: default_redis_timeout(),
        }
    }
}

fn default_key_prefix() -> String {
    "outrider:".to_string()
}

fn default_redis_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(50))
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Name of this service in logs and in exported traces (`service.name`). Unset: the
    /// `OTEL_SERVICE_NAME` environment variable, else `outrider`. Changing it needs a restart.
    #[serde(default)]
    pub service_name: Option<String>,
    #[serde(default)]
    pub access_log: AccessLogFormat,
    /// Trace propagation (always on) and span export over OTLP (when an endpoint is known).
    #[serde(default)]
    pub otlp: OtlpConfig,
}

impl TelemetryConfig {
    /// The service name in effect: YAML, then `OTEL_SERVICE_NAME`, then `outrider`.
    pub fn service_name(&self) -> String {
        self.service_name
            .clone()
            .filter(|name| !name.trim().is_empty())
            .or_else(|| {
                std::env::var("OTEL_SERVICE_NAME")
                    .ok()
                    .filter(|name| !name.trim().is_empty())
            })
            .unwrap_or_else(|| "outrider".to_string())
    }
}

/// OTLP span export. Every key falls back to the standard `OTEL_*` environment variable of the
/// OpenTelemetry specification when unset; an explicit YAML value wins.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// Collector endpoint, e.g. `http://otel-collector:4318` (HTTP) or `http://otel-collector:4317`
    /// (gRPC). Empty: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then `OTEL_EXPORTER_OTLP_ENDPOINT`;
    /// when none is set nothing is exported (propagation still works). For HTTP, `/v1/traces`
    /// is appended unless the URL already has a path. Changing it needs a restart.
    #[serde(default)]
    pub endpoint: String,
    /// `http` (HTTP/protobuf) or `grpc`. Unset: `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http`.
    /// Changing it needs a restart.
    #[serde(default)]
    pub protocol: Option<OtlpProtocol>,
    /// Share of new traces (no sampled parent) that are recorded, 0.0 to 1.0; a client's
    /// `traceparent` sampled flag is followed. Unset: `OTEL_TRACES_SAMPLER`/`_ARG`, else 1.0.
    /// Applies on reload.
    #[serde(default)]
    pub sample_ratio: Option<f64>,
    /// Headers sent with every export (e.g. an API key); added to `OTEL_EXPORTER_OTLP_HEADERS`.
    /// Shown as `***` by `GET /config`. Changing them needs a restart.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Longest time one export may take. Unset: `OTEL_EXPORTER_OTLP_TIMEOUT` (ms), else 10s.
    /// Changing it needs a restart.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Finished spans waiting for export; beyond it spans are dropped and counted, never
    /// waited for. Changing it needs a restart.
    #[serde(default = "default_otlp_max_queue")]
    pub max_queue: usize,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: String::new(),
            protocol: None,
            sample_ratio: None,
            headers: BTreeMap::new(),
            timeout: None,
            max_queue: default_otlp_max_queue(),
        }
    }
}

fn default_otlp_max_queue() -> usize {
    4096
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    Http,
    Grpc,
}

#[derive(
    Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Json,
    Text,
    Off,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Longest time in-flight requests get to finish after SIGTERM/SIGINT.
    #[serde(default = "default_grace")]
    pub grace_period: HumanDuration,
    /// After the signal, keep accepting and serving (every response with `Connection: close`)
    /// while `/ready` reports 503 for this long, so load balancers and Kubernetes endpoints stop
    /// sending here before the listener closes. Counts towards `grace_period`.
    #[serde(default)]
    pub ready_delay: HumanDuration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_period: default_grace(),
            ready_delay: HumanDuration::default(),
        }
    }
}

fn default_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(25))
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    /// The named upstream requests go to. Only a route whose stages answer every request
    /// themselves (e.g. `inference:` with `fallback: error`) may leave it out.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Largest request body a stage that reads bodies accepts; larger ones get 413.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// Read the whole request body before contacting the upstream (see `buffering`).
    #[serde(default)]
    pub buffer_request: Option<crate::buffering::BufferRequest>,
    /// Send requests with a listed header value to another upstream.
    #[serde(default)]
    pub upstream_by_header: Option<crate::upstream_by_header::UpstreamByHeader>,
    /// HTTP response caching for this route (see `cache`).
    #[serde(default)]
    pub cache: Option<crate::cache::RouteCacheConfig>,
    /// Service level objectives, tracked and optionally enforced (see `slo`).
    #[serde(default)]
    pub slo: Option<crate::slo::SloConfig>,
    /// GraphQL automatic persisted queries, response caching and safelist (see `graphql`).
    #[serde(default)]
    pub graphql: Option<crate::graphql::GraphqlConfig>,
    /// LLM gateway: prompt/completion cache with stream replay, model-tier routing, token and
    /// cost metrics (see `llm`).
    #[serde(default)]
    pub llm: Option<crate::llm::LlmConfig>,
    /// Answer in-process with an ONNX model of the `models:` section (see `inference`).
    #[serde(default)]
    pub inference: Option<crate::inference::InferenceConfig>,
}

fn default_max_body() -> ByteSize {
    ByteSize(4 * 1024 * 1024)
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Exact path (without the query string).
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Empty means any method.
    #[serde(default)]
    pub methods: Vec<String>,
}
