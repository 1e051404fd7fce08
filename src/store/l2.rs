//! Redis L2: a shared tier that must never fail or noticeably delay a request.
//!
//! Every operation is bounded by `redis_timeout` and gated by a circuit breaker. The connection
//! is built in the background (startup never waits for Redis) on a small runtime owned by this
//! tier, so the connection's driver task outlives whichever runtime first touched the cache.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use arc_swap::ArcSwapOption;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::oneshot;

use super::breaker::{Admission, Breaker, BreakerSettings, BreakerState};
use super::budget::InflightBudget;
use super::metrics::{CacheMetrics, RedisErrorKind};
use super::{CacheError, StoredResponse};

/// Background writes beyond this are dropped: a slow Redis must not grow memory without bound.
const MAX_PENDING_WRITES: usize = 4096;
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

pub(crate) struct L2 {
    inner: Arc<Inner>,
    rt: tokio::runtime::Handle,
    /// Dropping this ends the runtime thread and with it the connection and pending writes.
    _stop: oneshot::Sender<()>,
}

struct Inner {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    /// Writes carry whole bodies (up to max_entry_size) and never hold up a request, so they
    /// get more time than lookups.
    write_timeout: Duration,
    /// Replaced when the breaker opens on timeouts: a silently dead TCP connection would
    /// otherwise never be noticed by the connection manager.
    conn: ArcSwapOption<ConnectionManager>,
    reconnecting: AtomicBool,
    url: String,
    rt: tokio::runtime::Handle,
    breaker: Mutex<Breaker>,
    metrics: CacheMetrics,
    pending_writes: AtomicUsize,
    /// Encoded values waiting for Redis count against the store's in-flight bound.
    inflight: Arc<InflightBudget>,
    last_decode_log: AtomicU64,
    last_connect_log: AtomicU64,
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
#[derive(Debug, Clone)]
pub(crate) enum KeyFilter {
    All,
    Namespace(String),
    PathPrefix {
        namespace: Option<String>,
        prefix: String,
    },
    Hex(String),
}

impl KeyFilter {
    fn pattern(&self, key_prefix: &str) -> String {
        let base = format!("{}v1:", glob_escape(key_prefix));
        match self {
            KeyFilter::All => format!("{base}*"),
            KeyFilter::Namespace(ns) => format!("{base}{}:*", glob_escape(&encode_namespace(ns))),
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
            KeyFilter::Hex(hex) => format!("{base}*:{hex}"),
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
            KeyFilter::Namespace(want) => ns == encode_namespace(want).as_bytes(),
            KeyFilter::PathPrefix { namespace, prefix } => {
                namespace
                    .as_deref()
                    .is_none_or(|want| ns == encode_namespace(want).as_bytes())
                    && label.starts_with(prefix.as_bytes())
            }
            KeyFilter::Hex(want) => hex == want.as_bytes(),
        }
    }
}

fn classify(e: &redis::RedisError) -> RedisErrorKind {
    if e.is_timeout() {
        RedisErrorKind::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
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
        url: &str,
        prefix: String,
        timeout: Duration,
        breaker: BreakerSettings,
        metrics: CacheMetrics,
        inflight: Arc<InflightBudget>,
    ) -> Result<Self, CacheError> {
        let client = redis::Client::open(url)
            .map_err(|e| CacheError::Config(format!("redis url {}: {e}", redact(url))))?;
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
            write_timeout: (timeout * 20).max(Duration::from_secs(1)),
            conn: ArcSwapOption::empty(),
            reconnecting: AtomicBool::new(true),
            url: redact(url),
            rt: handle.clone(),
            breaker: Mutex::new(Breaker::new(breaker)),
            metrics,
            pending_writes: AtomicUsize::new(0),
            inflight,
            last_decode_log: AtomicU64::new(0),
            last_connect_log: AtomicU64::new(0),
        });
        handle.spawn(connect_loop(Arc::clone(&inner), redact(url)));
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
            return RedisState::Degraded {
                reason: "connecting".into(),
            };
        }
        match lock(&self.inner.breaker).state() {
            BreakerState::Closed => RedisState::Up,
            BreakerState::HalfOpen => RedisState::Degraded {
                reason: "circuit half-open (probing)".into(),
            },
            BreakerState::Open => RedisState::Degraded {
                reason: "circuit open after repeated failures".into(),
            },
        }
    }

    pub(crate) fn breaker_state(&self) -> BreakerState {
        if self.inner.conn.load().is_none() {
            BreakerState::Open
        } else {
            lock(&self.inner.breaker).state()
        }
    }

    pub(crate) async fn get(&self, key: &str) -> L2Get {
        let inner = &self.inner;
        let Some(conn) = inner.admit() else {
            return L2Get::Skipped;
        };
        let mut conn = conn.clone();
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
        match inner.settle(res) {
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
        let mut conn = inner.admit()?;
        let mut invocation = script.key(format!("{}{key}", inner.prefix));
        for arg in args {
            invocation.arg(*arg);
        }
        let res = tokio::time::timeout(
            inner.timeout,
            invocation.invoke_async::<Vec<i64>>(&mut conn),
        )
        .await;
        inner.settle(res)
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
            if let Some(conn) = inner.admit() {
                let mut conn = conn.clone();
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
                inner.settle(res);
            }
            drop(reservation);
            inner.pending_writes.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Queues an UNLINK of one key in the background; the caller never waits for Redis.
    pub(crate) fn delete(&self, key: String) {
        let inner = Arc::clone(&self.inner);
        if inner.pending_writes.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_WRITES {
            inner.pending_writes.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!("redis write queue full; dropping delete");
            return;
        }
        self.rt.spawn(async move {
            if let Some(mut conn) = inner.admit() {
                let res = tokio::time::timeout(
                    inner.write_timeout,
                    redis::cmd("UNLINK").arg(&key).query_async::<()>(&mut conn),
                )
                .await;
                inner.settle(res);
            }
            inner.pending_writes.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Deletes every key the filter selects, with SCAN (never KEYS) and UNLINK.
    pub(crate) async fn purge(&self, filter: &KeyFilter) -> Result<u64, CacheError> {
        let inner = &self.inner;
        let Some(conn) = inner.conn.load_full() else {
            return Err(CacheError::Redis("not connected".into()));
        };
        let mut conn = ConnectionManager::clone(&conn);
        // An admin purge is worth more patience than a request, but must still end.
        let op_timeout = inner.timeout.max(Duration::from_secs(5));
        let pattern = filter.pattern(&inner.prefix);
        let started = Instant::now();
        let mut cursor: u64 = 0;
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut removed = 0u64;
        let result: Result<(), CacheError> = async {
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = run(
                    op_timeout,
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(PURGE_BATCH)
                        .query_async(&mut conn),
                )
                .await?;
                batch.extend(
                    keys.into_iter()
                        .filter(|k| filter.matches(&inner.prefix, k)),
                );
                if batch.len() >= PURGE_BATCH || (next == 0 && !batch.is_empty()) {
                    removed += unlink(&mut conn, op_timeout, &batch).await?;
                    batch.clear();
                }
                if next == 0 {
                    return Ok(());
                }
                cursor = next;
            }
        }
        .await;
        inner
            .metrics
            .purge_duration
            .observe(started.elapsed().as_secs_f64());
        result.map(|()| removed)
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

async fn unlink(
    conn: &mut ConnectionManager,
    timeout: Duration,
    keys: &[Vec<u8>],
) -> Result<u64, CacheError> {
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
    /// The connection if the breaker lets this operation through.
    fn admit(&self) -> Option<ConnectionManager> {
        let conn = ConnectionManager::clone(self.conn.load().as_ref()?);
        let mut b = lock(&self.breaker);
        let admission = b.admit(Instant::now());
        self.metrics.breaker_state.set(b.state().gauge());
        match admission {
            Admission::Allowed | Admission::Probe => Some(conn),
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
        let mut b = lock(&self.breaker);
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
        self.metrics.breaker_state.set(after.gauge());
        drop(b);
        if before != after {
            match after {
                BreakerState::Open => {
                    tracing::warn!("redis circuit opened; serving from L1 and upstream only");
                    if timed_out {
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

async fn connect_loop(inner: Arc<Inner>, url: String) {
    // A connection attempt may take longer than a request may wait (TLS handshakes), but a
    // black-holed address must not stall the loop for long.
    let connect_timeout = (inner.timeout * 4).max(Duration::from_secs(2));
    let mut delay = Duration::from_millis(100);
    loop {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(connect_timeout)
            .set_response_timeout(inner.write_timeout)
            .set_number_of_retries(1)
            .set_factor(2)
            .set_max_delay(500);
        let attempt = tokio::time::timeout(
            connect_timeout * 2,
            ConnectionManager::new_with_config(inner.client.clone(), config),
        )
        .await;
        match attempt {
            Ok(Ok(conn)) => {
                let first = inner.conn.swap(Some(Arc::new(conn))).is_none();
                inner.reconnecting.store(false, Ordering::SeqCst);
                if first {
                    let mut b = lock(&inner.breaker);
                    b.on_success();
                    inner.metrics.breaker_state.set(b.state().gauge());
                }
                tracing::info!(redis = %url, "redis L2 connected");
                return;
            }
            Ok(Err(e)) => {
                inner.metrics.redis_error(classify(&e));
                if log_allowed(&inner.last_connect_log) {
                    tracing::warn!(redis = %url, error = %e, "redis L2 not reachable; retrying in background");
                }
            }
            Err(_) => {
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
        assert!(KeyFilter::Namespace("a".into()).matches("p:", &k("a", "/x")));
        assert!(!KeyFilter::Namespace("a".into()).matches("p:", &k("ab", "/x")));
        assert!(!KeyFilter::Namespace("a".into()).matches("p:", &k("a:b", "/x")));
        assert!(pp(None, "/x").matches("p:", &k("a", "/x/y")));
        assert!(!pp(None, "/x").matches("p:", &k("a", "/y/x")));
        // A label containing ':' must not confuse the namespace wildcard.
        assert!(!pp(None, "/b").matches("p:", &k("a", "/q:/b")));
        assert!(pp(Some("a"), "/q:").matches("p:", &k("a", "/q:/b")));
        assert!(!pp(Some("b"), "/x").matches("p:", &k("a", "/x")));
        assert!(KeyFilter::Hex(hex.clone()).matches("p:", &k("a", "/x")));
        assert!(!KeyFilter::Hex("c".repeat(64)).matches("p:", &k("a", "/x")));
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
