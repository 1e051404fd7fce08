//! Redis L2: a shared tier that must never fail or noticeably delay a request.
//!
//! Every operation is bounded by `redis_timeout` and gated by a circuit breaker. The connection
//! is built in the background (startup never waits for Redis) on a small runtime owned by this
//! tier, so the connection's driver task outlives whichever runtime first touched the cache.
//!
//! The tier is one server (`url`) or a Redis Cluster (`cluster_nodes`), either over TLS
//! (`rediss://`, with a private CA and client certificate from [`RedisTls`]). Keys carry no hash
//! tags: every feature reads and writes one key per command, so keys spread over all slots.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use arc_swap::ArcSwapOption;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ClientTlsConfig, TlsCertificates};
use tokio::sync::oneshot;

use super::breaker::{Admission, BreakerSettings, BreakerState};
use super::budget::InflightBudget;
use super::metrics::{CacheMetrics, RedisErrorKind};
use super::nodes::{Breakers, SharedBreaker, SlotRange};
use super::{CacheError, StoredResponse};

/// Background writes beyond this are dropped: a slow Redis must not grow memory without bound.
const MAX_PENDING_WRITES: usize = 4096;
/// How often a cluster's slot map (for the per-node breakers) is read again.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(5);
/// SCAN batch hint and UNLINK batch size for purges.
const PURGE_BATCH: usize = 500;
/// Minimum spacing of repeated warnings (decode failures, connect failures).
const LOG_EVERY_SECS: u64 = 60;

/// The breaker's critical sections are a few field updates; parking_lot keeps them cheap and
/// cannot be poisoned.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

/// Result of an L2 read.
pub(crate) enum L2Get {
    Hit(StoredResponse),
    Miss,
    /// Not asked: not connected yet, or the breaker is open.
    Skipped,
    /// Asked and failed (already counted and fed to the breaker).
    Failed,
}

/// Redis state as `/ready` and `/cache/stats` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisState {
    /// No Redis configured: L1 only, by design.
    Disabled,
    Up,
    /// Configured but not usable right now; requests are served from L1 and upstream.
    Degraded {
        reason: String,
    },
}

/// Where the shared tier lives, as the config gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisEndpoint {
    /// One server, `redis://` or `rediss://`.
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster (the rest of the topology is discovered); used instead of
    /// `url` when not empty.
    pub cluster_nodes: Vec<String>,
    pub tls: Option<RedisTls>,
}

impl RedisEndpoint {
    /// Whether any Redis is configured at all.
    pub fn is_configured(&self) -> bool {
        !self.cluster_nodes.is_empty() || self.url.as_deref().is_some_and(|u| !u.trim().is_empty())
    }
}

/// PEM files for `rediss://`: a private CA replaces the built-in web roots; a client certificate
/// and key enable mutual TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl RedisTls {
    fn certificates(&self) -> Result<TlsCertificates, CacheError> {
        let read = |path: &PathBuf, key: &str| {
            std::fs::read(path).map_err(|e| {
                CacheError::Config(format!("cache.redis.tls.{key} {}: {e}", path.display()))
            })
        };
        let root_cert = self
            .ca_file
            .as_ref()
            .map(|p| read(p, "ca_file"))
            .transpose()?;
        let client_tls = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read(cert, "cert_file")?,
                client_key: read(key, "key_file")?,
            }),
            (None, None) => None,
            _ => {
                return Err(CacheError::Config(
                    "cache.redis.tls: cert_file and key_file go together".into(),
                ))
            }
        };
        Ok(TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// The configured client: it makes the command connection and the pub/sub connections.
enum Client {
    Single(redis::Client),
    Cluster {
        client: ClusterClient,
        /// One plain client per seed node: classic pub/sub is broadcast over the cluster bus,
        /// so any reachable node delivers every invalidation.
        seeds: Vec<redis::Client>,
    },
}

fn single_client(url: &str, certs: Option<&TlsCertificates>) -> Result<redis::Client, CacheError> {
    let res = match certs {
        Some(certs) => redis::Client::build_with_tls(url, certs.clone()),
        None => redis::Client::open(url),
    };
    res.map_err(|e| CacheError::Config(format!("redis url {}: {e}", redact(url))))
}

impl Client {
    fn new(
        endpoint: &RedisEndpoint,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, CacheError> {
        let certs = endpoint
            .tls
            .as_ref()
            .map(RedisTls::certificates)
            .transpose()?;
        if endpoint.cluster_nodes.is_empty() {
            let url = endpoint.url.as_deref().unwrap_or_default().trim();
            return single_client(url, certs.as_ref()).map(Client::Single);
        }
        let seeds = endpoint
            .cluster_nodes
            .iter()
            .map(|u| single_client(u.trim(), certs.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut builder =
            ClusterClientBuilder::new(endpoint.cluster_nodes.iter().map(|u| u.trim()))
                .connection_timeout(connect_timeout)
                .response_timeout(response_timeout)
                // A request waits at most `timeout` anyway; retries only help background writes.
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(200);
        if let Some(certs) = certs {
            builder = builder.certs(certs);
        }
        let client = builder
            .build()
            .map_err(|e| CacheError::Config(format!("cache.redis.cluster_nodes: {e}")))?;
        Ok(Client::Cluster { client, seeds })
    }

    /// Clients a pub/sub subscriber may use, in the order to try them.
    pub(crate) fn pubsub_clients(&self) -> Vec<redis::Client> {
        match self {
            Client::Single(c) => vec![c.clone()],
            Client::Cluster { seeds, .. } => seeds.clone(),
        }
    }

    /// Plain clients for single cluster nodes, with the seeds' scheme, TLS settings and
    /// password: `known` masters first (`last` at the end), then seeds not among them.
    fn node_clients(&self, known: &[String], last: Option<&str>) -> Vec<(String, redis::Client)> {
        let Client::Cluster { seeds, .. } = self else {
            return Vec::new();
        };
        let mut out: Vec<(String, redis::Client)> = Vec::new();
        let mut ordered: Vec<&String> = known.iter().filter(|a| Some(a.as_str()) != last).collect();
        ordered.extend(known.iter().filter(|a| Some(a.as_str()) == last));
        if let Some(template) = seeds.first() {
            for addr in ordered {
                if let Some(client) = client_at(template, addr) {
                    out.push((addr.clone(), client));
                }
            }
        }
        for seed in seeds {
            if let Some(addr) = node_addr(seed) {
                if !out.iter().any(|(a, _)| *a == addr) {
                    out.push((addr, seed.clone()));
                }
            }
        }
        out
    }

    fn describe(&self, url: &str) -> String {
        match self {
            Client::Single(_) => url.to_owned(),
            Client::Cluster { seeds, .. } => format!("cluster via {} seed node(s)", seeds.len()),
        }
    }
}

/// `host:port` of a plain client.
fn node_addr(client: &redis::Client) -> Option<String> {
    match &client.get_connection_info().addr {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => Some(format!("{host}:{port}")),
        redis::ConnectionAddr::Unix(_) => None,
    }
}

/// A client for the node at `addr` (`host:port`, as the cluster announces it) made from a seed's
/// settings, so it speaks the same scheme, TLS and credentials.
fn client_at(template: &redis::Client, addr: &str) -> Option<redis::Client> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let mut info = template.get_connection_info().clone();
    match &mut info.addr {
        redis::ConnectionAddr::Tcp(h, p) => {
            *h = host.to_owned();
            *p = port;
        }
        redis::ConnectionAddr::TcpTls {
            host: h, port: p, ..
        } => {
            *h = host.to_owned();
            *p = port;
        }
        redis::ConnectionAddr::Unix(_) => return None,
    }
    redis::Client::open(info).ok()
}

/// A command connection to either shape of deployment; both are cheap to clone and multiplex.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// What a purge did to Redis.
#[derive(Debug, Default)]
pub(crate) struct L2Purge {
    pub(crate) removed: u64,
    /// Servers scanned: 1, or the cluster's masters.
    pub(crate) nodes: usize,
    /// Masters that could not be purged (`host:port`, error): their keys stay until they expire.
    pub(crate) failed: Vec<(String, String)>,
}

pub(crate) struct L2 {
    inner: Arc<Inner>,
    rt: tokio::runtime::Handle,
    /// Dropping this ends the runtime thread and with it the connection and pending writes.
    _stop: oneshot::Sender<()>,
}

struct Inner {
    client: Client,
    prefix: String,
    timeout: Duration,
    /// Writes carry whole bodies (up to max_entry_size) and never hold up a request, so they
    /// get more time than lookups.
    write_timeout: Duration,
    /// Replaced when the breaker opens on timeouts: a silently dead TCP connection would
    /// otherwise never be noticed by the connection manager.
    conn: ArcSwapOption<Conn>,
    reconnecting: AtomicBool,
    url: String,
    rt: tokio::runtime::Handle,
    /// One breaker per cluster master (see `nodes`), or one for a single server.
    breakers: Breakers,
    metrics: CacheMetrics,
    pending_writes: AtomicUsize,
    /// Encoded values waiting for Redis count against the store's in-flight bound.
    inflight: Arc<InflightBudget>,
    last_decode_log: AtomicU64,
    last_connect_log: AtomicU64,
    /// Why the last connection attempt failed, for `/ready` while there is no connection.
    connect_failure: Mutex<Option<&'static str>>,
}

/// Percent-encodes the separator so a namespace can never swallow part of the label.
fn encode_namespace(ns: &str) -> std::borrow::Cow<'_, str> {
    if ns.contains([':', '%']) {
        ns.replace('%', "%25").replace(':', "%3A").into()
    } else {
        ns.into()
    }
}

/// Escapes Redis glob metacharacters so user input matches literally in SCAN MATCH.
pub(crate) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Builds `{prefix}v1:{namespace}:{label}:{hex}`.
pub(crate) fn redis_key(prefix: &str, namespace: &str, label: &str, hex: &str) -> String {
    let ns = encode_namespace(namespace);
    let mut k = String::with_capacity(prefix.len() + ns.len() + label.len() + hex.len() + 6);
    k.push_str(prefix);
    k.push_str("v1:");
    k.push_str(&ns);
    k.push(':');
    k.push_str(label);
    k.push(':');
    k.push_str(hex);
    k
}

/// Which stored keys a purge removes; checked on every key SCAN returns, because glob patterns
/// alone cannot express "label starts with" when the namespace is a wildcard.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "scope", rename_all = "snake_case")]
pub(crate) enum KeyFilter {
    All,
    Namespace {
        namespace: String,
    },
    PathPrefix {
        namespace: Option<String>,
        prefix: String,
    },
    Key {
        hex: String,
    },
}

impl KeyFilter {
    fn pattern(&self, key_prefix: &str) -> String {
        let base = format!("{}v1:", glob_escape(key_prefix));
        match self {
            KeyFilter::All => format!("{base}*"),
            KeyFilter::Namespace { namespace: ns } => {
                format!("{base}{}:*", glob_escape(&encode_namespace(ns)))
            }
            KeyFilter::PathPrefix {
                namespace: Some(ns),
                prefix,
            } => format!(
                "{base}{}:{}*",
                glob_escape(&encode_namespace(ns)),
                glob_escape(prefix)
            ),
            KeyFilter::PathPrefix {
                namespace: None,
                prefix,
            } => format!("{base}*:{}*", glob_escape(prefix)),
            KeyFilter::Key { hex } => format!("{base}*:{}", glob_escape(hex)),
        }
    }

    /// Parses `key` (without the prefix) and checks it exactly.
    fn matches(&self, key_prefix: &str, key: &[u8]) -> bool {
        let Some(rest) = key
            .strip_prefix(key_prefix.as_bytes())
            .and_then(|r| r.strip_prefix(b"v1:".as_slice()))
        else {
            return false;
        };
        let Some(colon) = rest.iter().position(|&b| b == b':') else {
            return false;
        };
        let (ns, rest) = (&rest[..colon], &rest[colon + 1..]);
        // The hex is always the last 64 bytes after a ':'.
        if rest.len() < 65 || rest[rest.len() - 65] != b':' {
            return false;
        }
        let (label, hex) = (&rest[..rest.len() - 65], &rest[rest.len() - 64..]);
        match self {
            KeyFilter::All => true,
            KeyFilter::Namespace { namespace: want } => ns == encode_namespace(want).as_bytes(),
            KeyFilter::PathPrefix { namespace, prefix } => {
                namespace
                    .as_deref()
                    .is_none_or(|want| ns == encode_namespace(want).as_bytes())
                    && label.starts_with(prefix.as_bytes())
            }
            KeyFilter::Key { hex: want } => hex == want.as_bytes(),
        }
    }
}

fn classify(e: &redis::RedisError) -> RedisErrorKind {
    if e.is_timeout() {
        RedisErrorKind::Timeout
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        // A cluster answering for a master it cannot reach: that node is down for its slots.
        // (The client follows redirects itself; one that reaches us could not be followed.)
        || matches!(
            e.kind(),
            redis::ErrorKind::ClusterConnectionNotFound
                | redis::ErrorKind::Moved
                | redis::ErrorKind::Ask
                | redis::ErrorKind::ClusterDown
                | redis::ErrorKind::MasterDown
                | redis::ErrorKind::TryAgain
        )
    {
        RedisErrorKind::Connection
    } else {
        RedisErrorKind::Protocol
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// True at most once per `LOG_EVERY_SECS` per slot: keeps a flood of identical failures from
/// flooding the log.
fn log_allowed(slot: &AtomicU64) -> bool {
    let now = now_secs();
    let last = slot.load(Ordering::Relaxed);
    (last == 0 || now.saturating_sub(last) >= LOG_EVERY_SECS)
        && slot
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// The Redis URL as logs and errors may show it.
fn redact(url: &str) -> String {
    crate::telemetry::redact::url(url).into_owned()
}

impl L2 {
    pub(crate) fn new(
        endpoint: &RedisEndpoint,
        prefix: String,
        timeout: Duration,
        breaker: BreakerSettings,
        metrics: CacheMetrics,
        inflight: Arc<InflightBudget>,
    ) -> Result<Self, CacheError> {
        let write_timeout = (timeout * 20).max(Duration::from_secs(1));
        let client = Client::new(endpoint, connect_timeout(timeout), write_timeout)?;
        let url = client.describe(&redact(endpoint.url.as_deref().unwrap_or_default()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("outrider-redis")
            .build()
            .map_err(|e| CacheError::Config(format!("cannot start redis runtime: {e}")))?;
        let handle = rt.handle().clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("outrider-redis".into())
            .spawn(move || {
                rt.block_on(async move {
                    let _ = stop_rx.await;
                });
            })
            .map_err(|e| CacheError::Config(format!("cannot start redis thread: {e}")))?;
        // Not connected yet counts as open: nothing waits on a connection that may never come.
        metrics.breaker_state.set(BreakerState::Open.gauge());
        let inner = Arc::new(Inner {
            client,
            prefix,
            timeout,
            write_timeout,
            conn: ArcSwapOption::empty(),
            reconnecting: AtomicBool::new(true),
            url: url.clone(),
            rt: handle.clone(),
            breakers: Breakers::new(breaker),
            metrics,
            pending_writes: AtomicUsize::new(0),
            inflight,
            last_decode_log: AtomicU64::new(0),
            last_connect_log: AtomicU64::new(0),
            connect_failure: Mutex::new(None),
        });
        handle.spawn(connect_loop(Arc::clone(&inner), url));
        Ok(L2 {
            inner,
            rt: handle,
            _stop: stop_tx,
        })
    }

    pub(crate) fn key(&self, namespace: &str, label: &str, hex: &str) -> String {
        redis_key(&self.inner.prefix, namespace, label, hex)
    }

    /// Writes queued or in progress; shutdown waits for them (bounded by the grace period).
    pub(crate) fn pending_writes(&self) -> usize {
        self.inner.pending_writes.load(Ordering::Relaxed)
    }

    pub(crate) fn state(&self) -> RedisState {
        if self.inner.conn.load().is_none() {
            // A TLS misconfiguration must be visible where operators look first.
            let reason = match *lock(&self.inner.connect_failure) {
                Some(hint) => format!("not connected: {hint}"),
                None => "connecting".into(),
            };
            return RedisState::Degraded { reason };
        }
        let state = self.inner.breakers.worst();
        let nodes = self.inner.breakers.troubled_nodes();
        // On a cluster, name the masters: the others are serving normally.
        let on = if nodes.is_empty() {
            String::new()
        } else {
            format!(" for node(s) {}", nodes.join(", "))
        };
        match state {
            BreakerState::Closed => RedisState::Up,
            BreakerState::HalfOpen => RedisState::Degraded {
                reason: format!("circuit half-open (probing){on}"),
            },
            BreakerState::Open => RedisState::Degraded {
                reason: format!("circuit open after repeated failures{on}"),
            },
        }
    }

    /// Whether a connection was ever made (until then the breaker counts as open).
    pub(crate) fn is_connected(&self) -> bool {
        self.inner.conn.load().is_some()
    }

    pub(crate) fn breaker_state(&self) -> BreakerState {
        if self.inner.conn.load().is_none() {
            BreakerState::Open
        } else {
            self.inner.breakers.worst()
        }
    }

    pub(crate) async fn get(&self, key: &str) -> L2Get {
        let inner = &self.inner;
        let Some((mut conn, breaker)) = inner.admit(key) else {
            return L2Get::Skipped;
        };
        let started = Instant::now();
        let res = tokio::time::timeout(
            inner.timeout,
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<Bytes>>(&mut conn),
        )
        .await;
        inner
            .metrics
            .get_duration
            .observe(started.elapsed().as_secs_f64());
        match inner.settle(&breaker, res) {
            Some(Some(bytes)) => match StoredResponse::decode_bytes(bytes) {
                Ok(entry) => L2Get::Hit(entry),
                Err(e) => {
                    inner.metrics.redis_error(RedisErrorKind::Decode);
                    if log_allowed(&inner.last_decode_log) {
                        tracing::warn!(
                            key,
                            error = %e,
                            "unreadable cache entry in redis; treated as a miss and overwritten on next store (further occurrences logged at most once a minute)"
                        );
                    }
                    L2Get::Miss
                }
            },
            Some(None) => L2Get::Miss,
            None => L2Get::Failed,
        }
    }

    /// Runs a Lua script on `key` (prefixed) within the request timeout and the breaker;
    /// `None` when Redis is skipped, slow or failing (the caller decides locally then).
    pub(crate) async fn script(
        &self,
        script: &redis::Script,
        key: &str,
        args: &[i64],
    ) -> Option<Vec<i64>> {
        let inner = &self.inner;
        let full_key = format!("{}{key}", inner.prefix);
        let (mut conn, breaker) = inner.admit(&full_key)?;
        let mut invocation = script.key(full_key);
        for arg in args {
            invocation.arg(*arg);
        }
        let res = tokio::time::timeout(
            inner.timeout,
            invocation.invoke_async::<Vec<i64>>(&mut conn),
        )
        .await;
        inner.settle(&breaker, res)
    }

    /// Queues a SET in the background; the caller never waits for Redis.
    pub(crate) fn set(&self, key: String, entry: Arc<StoredResponse>, ttl: Duration) {
        let inner = Arc::clone(&self.inner);
        // Redis rejects expiries near i64::MAX; no entry needs to live longer than ~35 years.
        let ms = u64::try_from(ttl.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, 1 << 40);
        // The encoded copy made for the write is what the queue adds to memory.
        let Some(reservation) = inner.inflight.reserve(entry.approx_size()) else {
            inner.metrics.inflight_full.inc();
            tracing::debug!("cache.max_inflight_bytes reached; dropping redis write");
            return;
        };
        if inner.pending_writes.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_WRITES {
            inner.pending_writes.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!("redis write queue full; dropping write");
            return;
        }
        self.rt.spawn(async move {
            if let Some((mut conn, breaker)) = inner.admit(&key) {
                // Encoding here keeps the copy of the body off the request's path.
                let value = entry.encode();
                drop(entry);
                let started = Instant::now();
                let res = tokio::time::timeout(
                    inner.write_timeout,
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(value)
                        .arg("PX")
                        .arg(ms)
                        .query_async::<()>(&mut conn),
                )
                .await;
                inner
                    .metrics
                    .set_duration
                    .observe(started.elapsed().as_secs_f64());
                inner.settle(&breaker, res);
            }
            drop(reservation);
            inner.pending_writes.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Invalidates one key in the background (the caller never waits for Redis): UNLINK, then
    /// PUBLISH `announce` (channel, message) so other replicas drop their L1 copy only once Redis
    /// no longer holds it, then `after(deleted, published)`. A delete that cannot be made (queue
    /// full, breaker open, error) is logged: the entry then lives in Redis until it expires.
    /// The publish is the routed attempt only: one per write, it must not open direct node
    /// connections while the channel's master is down (that fallback is for admin purges).
    pub(crate) fn delete_and_announce(
        &self,
        key: String,
        announce: Option<(String, String)>,
        after: impl FnOnce(bool, Option<bool>) + Send + 'static,
    ) {
        let inner = Arc::clone(&self.inner);
        let queued = inner.pending_writes.fetch_add(1, Ordering::Relaxed) < MAX_PENDING_WRITES;
        if !queued {
            inner.pending_writes.fetch_sub(1, Ordering::Relaxed);
        }
        self.rt.spawn(async move {
            let mut deleted = false;
            if queued {
                if let Some((mut conn, breaker)) = inner.admit(&key) {
                    let res = tokio::time::timeout(
                        inner.write_timeout,
                        redis::cmd("UNLINK").arg(&key).query_async::<()>(&mut conn),
                    )
                    .await;
                    deleted = inner.settle(&breaker, res).is_some();
                }
                inner.pending_writes.fetch_sub(1, Ordering::Relaxed);
            }
            if !deleted {
                tracing::warn!("an invalidated entry could not be deleted from redis; it is served from there until it expires");
            }
            let published = match announce {
                Some((channel, message)) => {
                    Some(
                        publish_on(&inner, &channel, &message, Fallback::No)
                            .await
                            .is_ok(),
                    )
                }
                None => None,
            };
            after(deleted, published);
        });
    }

    /// Deletes every key the filter selects, with SCAN (never KEYS) and UNLINK; on a cluster,
    /// SCAN runs on every master (each holds only its own slots), all of them even when some
    /// fail: what can be cleared is, and the answer names the masters that could not be.
    pub(crate) async fn purge(&self, filter: &KeyFilter) -> Result<L2Purge, CacheError> {
        let inner = &self.inner;
        let Some(conn) = inner.conn.load_full() else {
            return Err(CacheError::Redis("not connected".into()));
        };
        let conn = Conn::clone(&conn);
        // An admin purge is worth more patience than a request, but must still end.
        let op_timeout = inner.timeout.max(Duration::from_secs(5));
        let started = Instant::now();
        let result = async {
            let nodes: Vec<Option<(String, u16)>> = match &conn {
                Conn::Single(_) => vec![None],
                Conn::Cluster(c) => masters_anywhere(inner, &mut c.clone(), op_timeout)
                    .await?
                    .into_iter()
                    .map(Some)
                    .collect(),
            };
            let runs = nodes.iter().map(|node| {
                let mut conn = conn.clone();
                async move {
                    purge_node(&mut conn, node.clone(), filter, &inner.prefix, op_timeout).await
                }
            });
            let results = futures::future::join_all(runs).await;
            let mut out = L2Purge {
                nodes: nodes.len(),
                ..L2Purge::default()
            };
            for (node, res) in nodes.into_iter().zip(results) {
                match (res, node) {
                    (Ok(n), _) => out.removed += n,
                    (Err(e), None) => return Err(e),
                    (Err(e), Some((host, port))) => {
                        out.failed.push((format!("{host}:{port}"), e.to_string()));
                    }
                }
            }
            Ok(out)
        }
        .await;
        inner
            .metrics
            .purge_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Publishes `message` on `channel` within the admin timeout; pub/sub is not gated by the
    /// breaker (a purge is rare and its broadcast is worth a try on every node).
    pub(crate) async fn publish(&self, channel: &str, message: &str) -> Result<(), CacheError> {
        publish_on(&self.inner, channel, message, Fallback::OtherNodes).await
    }

    /// Clients for the invalidation subscriber and the runtime it must run on.
    pub(crate) fn pubsub(&self) -> (Vec<redis::Client>, tokio::runtime::Handle) {
        (self.inner.client.pubsub_clients(), self.rt.clone())
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.inner.prefix
    }
}

/// A connection attempt may take longer than a request may wait (TLS handshakes), but a
/// black-holed address must not stall the loop for long.
pub(crate) fn connect_timeout(timeout: Duration) -> Duration {
    (timeout * 4).max(Duration::from_secs(2))
}

/// `CLUSTER SLOTS` as (first slot, last slot, master `host:port`) ranges.
async fn slot_ranges(
    conn: &mut ClusterConnection,
    timeout: Duration,
) -> Result<Vec<SlotRange>, CacheError> {
    let reply = run(
        timeout,
        conn.route_command(
            redis::cmd("CLUSTER").arg("SLOTS"),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        ),
    )
    .await?;
    parse_slots(&reply)
}

fn parse_slots(reply: &redis::Value) -> Result<Vec<SlotRange>, CacheError> {
    let bad = |what: &str| CacheError::Redis(format!("unexpected CLUSTER SLOTS reply: {what}"));
    let ranges: Vec<Vec<redis::Value>> =
        redis::from_redis_value(reply).map_err(|e| bad(&e.to_string()))?;
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let [first, last, master, ..] = range.as_slice() else {
            return Err(bad("range without a master"));
        };
        let node: Vec<redis::Value> =
            redis::from_redis_value(master).map_err(|e| bad(&e.to_string()))?;
        let [host, port, ..] = node.as_slice() else {
            return Err(bad("master without host and port"));
        };
        let field = |v: &redis::Value| bad(&format!("{v:?}"));
        let first: u16 = redis::from_redis_value(first).map_err(|_| field(first))?;
        let last: u16 = redis::from_redis_value(last).map_err(|_| field(last))?;
        let host: String = redis::from_redis_value(host).map_err(|_| field(host))?;
        let port: u16 = redis::from_redis_value(port).map_err(|_| field(port))?;
        out.push((first, last, format!("{host}:{port}")));
    }
    Ok(out)
}

/// `host:port` addresses as (host, port), each once.
fn parse_nodes<'a>(addrs: impl IntoIterator<Item = &'a String>) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    for addr in addrs {
        let parsed = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)));
        if let Some(node) = parsed {
            if !out.contains(&node) {
                out.push(node);
            }
        }
    }
    out
}

/// A direct connection to one node, for the rare commands that must not depend on the cluster
/// connection's routing (a purge's slot map, a broadcast whose routed node is down).
async fn direct(
    inner: &Inner,
    client: &redis::Client,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(connect_timeout(inner.timeout))
        .set_response_timeout(inner.timeout.max(Duration::from_secs(1)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The masters of a cluster, each once: from the cluster connection, else from any node that
/// answers `CLUSTER SLOTS` directly (the node the connection asked may be the dead one), else
/// from the last slot map the breakers hold.
async fn masters_anywhere(
    inner: &Inner,
    conn: &mut ClusterConnection,
    timeout: Duration,
) -> Result<Vec<(String, u16)>, CacheError> {
    let first = match slot_ranges(conn, timeout).await {
        Ok(ranges) if !ranges.is_empty() => {
            return Ok(parse_nodes(ranges.iter().map(|(_, _, a)| a)))
        }
        Ok(_) => CacheError::Redis("CLUSTER SLOTS listed no master".into()),
        Err(e) => e,
    };
    let known = inner.breakers.known_nodes();
    for (addr, client) in inner.client.node_clients(&known, None) {
        let asked = run(timeout, async {
            let mut c = direct(inner, &client).await?;
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<redis::Value>(&mut c)
                .await
        })
        .await
        .and_then(|reply| parse_slots(&reply));
        match asked {
            Ok(ranges) if !ranges.is_empty() => {
                return Ok(parse_nodes(ranges.iter().map(|(_, _, a)| a)))
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(node = %addr, error = %e, "CLUSTER SLOTS failed"),
        }
    }
    if known.is_empty() {
        Err(first)
    } else {
        Ok(parse_nodes(&known))
    }
}

/// Where a publish goes when the routed attempt fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    /// Nowhere: per-write invalidations, too many to open direct connections for.
    No,
    /// Every other node in turn, each over a new direct connection (rare admin purges).
    OtherNodes,
}

/// PUBLISH on the shared connection, which routes it to the master of the channel's slot; if
/// that fails and `fallback` allows, on every other node in turn: a cluster forwards a PUBLISH
/// received on any node to the subscribers on all of them, so one dead master must not silence
/// purges.
async fn publish_on(
    inner: &Inner,
    channel: &str,
    message: &str,
    fallback: Fallback,
) -> Result<(), CacheError> {
    let timeout = inner.timeout.max(Duration::from_secs(1));
    let routed = match inner.conn.load_full() {
        Some(conn) => {
            let mut conn = Conn::clone(&conn);
            run(
                timeout,
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async::<i64>(&mut conn),
            )
            .await
            .map(drop)
        }
        None => Err(CacheError::Redis("not connected".into())),
    };
    let Err(first) = routed else {
        return Ok(());
    };
    if fallback == Fallback::No {
        return Err(first);
    }
    // The routed node is tried last: it has just failed.
    let known = inner.breakers.known_nodes();
    let owner = inner.breakers.node_of(channel);
    let others = inner.client.node_clients(&known, owner.as_deref());
    if others.is_empty() {
        return Err(first);
    }
    for (addr, client) in others {
        let sent = run(timeout, async {
            let mut c = direct(inner, &client).await?;
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(message)
                .query_async::<i64>(&mut c)
                .await
        })
        .await;
        match sent {
            Ok(_) => {
                tracing::info!(node = %addr, error = %first, "purge broadcast sent through another cluster node (the channel's master failed)");
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(node = %addr, error = %e, "purge broadcast failed on this node too")
            }
        }
    }
    Err(CacheError::Redis(format!(
        "{first} (and on every other cluster node)"
    )))
}

/// Keeps the per-node breakers' slot map current for as long as the tier lives.
async fn watch_topology(inner: Arc<Inner>) {
    let timeout = inner.timeout.max(Duration::from_secs(1));
    loop {
        if let Some(conn) = inner.conn.load_full() {
            if let Conn::Cluster(mut c) = Conn::clone(&conn) {
                match slot_ranges(&mut c, timeout).await {
                    Ok(ranges) => inner.breakers.set_topology(&ranges),
                    Err(e) => tracing::debug!(error = %e, "cluster slot map not refreshed"),
                }
            }
        }
        tokio::time::sleep(TOPOLOGY_EVERY).await;
    }
}

/// SCANs one server (`None`: the single server) and unlinks what the filter selects.
async fn purge_node(
    conn: &mut Conn,
    node: Option<(String, u16)>,
    filter: &KeyFilter,
    prefix: &str,
    timeout: Duration,
) -> Result<u64, CacheError> {
    let pattern = filter.pattern(prefix);
    let mut cursor: u64 = 0;
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut removed = 0u64;
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(PURGE_BATCH);
        let (next, keys): (u64, Vec<Vec<u8>>) = match (&mut *conn, &node) {
            (Conn::Cluster(c), Some((host, port))) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                let reply = run(timeout, c.route_command(&scan, route)).await?;
                redis::from_redis_value(&reply).map_err(|e| CacheError::Redis(e.to_string()))?
            }
            (conn, _) => run(timeout, scan.query_async(conn)).await?,
        };
        batch.extend(keys.into_iter().filter(|k| filter.matches(prefix, k)));
        if batch.len() >= PURGE_BATCH || (next == 0 && !batch.is_empty()) {
            removed += unlink(conn, timeout, &batch).await?;
            batch.clear();
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

async fn run<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, CacheError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CacheError::Redis(e.to_string())),
        Err(_) => Err(CacheError::Redis("timed out".into())),
    }
}

async fn unlink(conn: &mut Conn, timeout: Duration, keys: &[Vec<u8>]) -> Result<u64, CacheError> {
    if let Conn::Cluster(_) = conn {
        // Keys of one master still sit in different slots, and a multi-key command must stay
        // within one slot: one UNLINK per key, sent concurrently.
        let each = keys.iter().map(|k| {
            let mut c = conn.clone();
            async move { redis::cmd("UNLINK").arg(k).query_async::<u64>(&mut c).await }
        });
        let results = run(timeout, async {
            futures::future::join_all(each)
                .await
                .into_iter()
                .collect::<redis::RedisResult<Vec<u64>>>()
        })
        .await?;
        return Ok(results.into_iter().sum());
    }
    let res = run(timeout, redis::cmd("UNLINK").arg(keys).query_async(conn)).await;
    match res {
        // Redis older than 4.0 has no UNLINK.
        Err(CacheError::Redis(msg)) if msg.to_ascii_lowercase().contains("unknown command") => {
            run(timeout, redis::cmd("DEL").arg(keys).query_async(conn)).await
        }
        other => other,
    }
}

impl Inner {
    /// The connection if the breaker of `key`'s node lets this operation through, with that
    /// breaker for [`Inner::settle`].
    fn admit(&self, key: &str) -> Option<(Conn, SharedBreaker)> {
        let conn = Conn::clone(self.conn.load().as_ref()?);
        let breaker = self.breakers.for_key(key);
        let mut b = lock(&breaker);
        let before = b.state();
        let admission = b.admit(Instant::now());
        let changed = b.state() != before;
        drop(b);
        if changed {
            self.metrics
                .breaker_state
                .set(self.breakers.worst().gauge());
        }
        match admission {
            Admission::Allowed | Admission::Probe => Some((conn, breaker)),
            Admission::Rejected => None,
        }
    }

    /// Builds a fresh connection in the background; the old one serves probes meanwhile.
    fn reconnect(self: &Arc<Self>) {
        if !self.reconnecting.swap(true, Ordering::SeqCst) {
            self.rt
                .spawn(connect_loop(Arc::clone(self), self.url.clone()));
        }
    }

    /// Feeds the outcome to the breaker and metrics; `None` means the operation failed.
    fn settle<T>(
        self: &Arc<Self>,
        breaker: &SharedBreaker,
        res: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        let outcome = match res {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis operation failed");
                Err(classify(&e))
            }
            Err(_) => Err(RedisErrorKind::Timeout),
        };
        let mut b = lock(breaker);
        let before = b.state();
        let mut timed_out = false;
        let out = match outcome {
            Ok(v) => {
                // A late success of an operation admitted before the breaker opened says
                // nothing about now; only the half-open probe may close it.
                if before != BreakerState::Open {
                    b.on_success();
                }
                Some(v)
            }
            Err(kind) => {
                self.metrics.redis_error(kind);
                match kind {
                    // An error reply (OOM, WRONGTYPE, …) comes from a Redis that answers:
                    // it is not a reason to stop reading from it.
                    RedisErrorKind::Protocol | RedisErrorKind::Decode => {
                        if before != BreakerState::Open {
                            b.on_success();
                        }
                    }
                    RedisErrorKind::Timeout | RedisErrorKind::Connection => {
                        timed_out = kind == RedisErrorKind::Timeout;
                        b.on_failure(Instant::now());
                    }
                }
                None
            }
        };
        let after = b.state();
        drop(b);
        if before != after {
            self.metrics
                .breaker_state
                .set(self.breakers.worst().gauge());
            match after {
                BreakerState::Open => {
                    tracing::warn!(
                        nodes = ?self.breakers.troubled_nodes(),
                        "redis circuit opened; serving from L1 and upstream only (on a cluster: the keys of the nodes listed)"
                    );
                    // A cluster connection replaces broken node connections itself.
                    if timed_out && matches!(self.client, Client::Single(_)) {
                        self.reconnect();
                    }
                }
                BreakerState::Closed => tracing::info!("redis circuit closed; L2 back in use"),
                BreakerState::HalfOpen => {}
            }
        }
        out
    }
}

async fn connect(inner: &Inner, connect_timeout: Duration) -> redis::RedisResult<Conn> {
    match &inner.client {
        Client::Single(client) => {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(connect_timeout)
                .set_response_timeout(inner.write_timeout)
                .set_number_of_retries(1)
                .set_factor(2)
                .set_max_delay(500);
            ConnectionManager::new_with_config(client.clone(), config)
                .await
                .map(Conn::Single)
        }
        Client::Cluster { client, .. } => client.get_async_connection().await.map(Conn::Cluster),
    }
}

/// A TLS failure is a configuration problem, not an outage: say where to look.
fn connect_hint(e: &redis::RedisError) -> &'static str {
    let text = format!("{e:?}").to_ascii_lowercase();
    if text.contains("certificate") || text.contains("unknownissuer") || text.contains("tls") {
        "TLS handshake failed: check cache.redis.tls.ca_file (the CA that signed the server's certificate) and the host name in the URL; serving from L1 and upstream meanwhile"
    } else {
        "retrying in background; serving from L1 and upstream meanwhile"
    }
}

async fn connect_loop(inner: Arc<Inner>, url: String) {
    let connect_timeout = connect_timeout(inner.timeout);
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt =
            tokio::time::timeout(connect_timeout * 2, connect(&inner, connect_timeout)).await;
        match attempt {
            Ok(Ok(conn)) => {
                let first = inner.conn.swap(Some(Arc::new(conn))).is_none();
                inner.reconnecting.store(false, Ordering::SeqCst);
                if first {
                    lock(inner.breakers.whole()).on_success();
                    inner
                        .metrics
                        .breaker_state
                        .set(inner.breakers.worst().gauge());
                    if matches!(inner.client, Client::Cluster { .. }) {
                        inner.rt.spawn(watch_topology(Arc::clone(&inner)));
                    }
                }
                tracing::info!(redis = %url, "redis L2 connected");
                return;
            }
            Ok(Err(e)) => {
                inner.metrics.redis_error(classify(&e));
                let hint = connect_hint(&e);
                *lock(&inner.connect_failure) = Some(hint);
                if log_allowed(&inner.last_connect_log) {
                    tracing::warn!(redis = %url, error = %e, "redis L2 not reachable: {hint}");
                }
            }
            Err(_) => {
                *lock(&inner.connect_failure) = Some("connect timed out; retrying in background");
                inner.metrics.redis_error(RedisErrorKind::Timeout);
                if log_allowed(&inner.last_connect_log) {
                    tracing::warn!(redis = %url, "redis L2 connect timed out; retrying in background");
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout_and_namespace_escaping() {
        let hex = "a".repeat(64);
        assert_eq!(
            redis_key("outrider:", "items", "/api/items", &hex),
            format!("outrider:v1:items:/api/items:{hex}")
        );
        assert_eq!(
            redis_key("p:", "a:b%", "/x", &hex),
            format!("p:v1:a%3Ab%25:/x:{hex}")
        );
    }

    #[test]
    fn glob_escaping() {
        assert_eq!(glob_escape(r"/a*b?c[d]e\f"), r"/a\*b\?c\[d\]e\\f");
        let f = KeyFilter::PathPrefix {
            namespace: Some("n*".into()),
            prefix: "/x[".into(),
        };
        assert_eq!(f.pattern("p?"), r"p\?v1:n\*:/x\[*");
    }

    #[test]
    fn filters_check_exactly() {
        let hex = "b".repeat(64);
        let k = |ns: &str, label: &str| redis_key("p:", ns, label, &hex).into_bytes();
        let pp = |ns: Option<&str>, prefix: &str| KeyFilter::PathPrefix {
            namespace: ns.map(str::to_owned),
            prefix: prefix.into(),
        };
        assert!(KeyFilter::All.matches("p:", &k("a", "/x")));
        assert!(!KeyFilter::All.matches("q:", &k("a", "/x")));
        assert!(KeyFilter::Namespace {
            namespace: "a".into()
        }
        .matches("p:", &k("a", "/x")));
        assert!(!KeyFilter::Namespace {
            namespace: "a".into()
        }
        .matches("p:", &k("ab", "/x")));
        assert!(!KeyFilter::Namespace {
            namespace: "a".into()
        }
        .matches("p:", &k("a:b", "/x")));
        assert!(pp(None, "/x").matches("p:", &k("a", "/x/y")));
        assert!(!pp(None, "/x").matches("p:", &k("a", "/y/x")));
        // A label containing ':' must not confuse the namespace wildcard.
        assert!(!pp(None, "/b").matches("p:", &k("a", "/q:/b")));
        assert!(pp(Some("a"), "/q:").matches("p:", &k("a", "/q:/b")));
        assert!(!pp(Some("b"), "/x").matches("p:", &k("a", "/x")));
        assert!(KeyFilter::Key { hex: hex.clone() }.matches("p:", &k("a", "/x")));
        assert!(!KeyFilter::Key {
            hex: "c".repeat(64)
        }
        .matches("p:", &k("a", "/x")));
        assert!(!KeyFilter::All.matches("p:", b"p:v1:garbage"));
    }

    #[test]
    fn redacts_password() {
        assert_eq!(
            redact("redis://:secret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }
}
