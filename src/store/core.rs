//! The `Store` facade: L1 then L2 lookups, stores, single-flight, purge and stats.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::core::Collector;
use serde_json::{json, Value};

use super::breaker::{BreakerSettings, BreakerState};
use super::budget::{InflightBudget, Reservation};
use super::flight::{Flight, Flights, FollowerWait, RevalidationGuard, Revalidations};
use super::invalidate::{self, Message, Repass, RepassBatch};
use super::key::parse_hex32;
use super::l1::L1;
use super::l2::{KeyFilter, L2Get, RedisEndpoint, RedisState, L2};
use super::metrics::CacheMetrics;
use super::{CacheError, CacheKey, StoredResponse};

/// Global cache settings (the `cache:` section of the config, already parsed).
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// L1 budget in bytes; 0 disables L1 (Redis-only, e.g. to measure L2).
    pub memory_max_bytes: u64,
    /// `redis://` or `rediss://` (password in the URL works), or cluster seed nodes, with TLS
    /// files; nothing configured means L1 only.
    pub redis: RedisEndpoint,
    pub redis_key_prefix: String,
    /// The most any request waits on Redis.
    pub redis_timeout: Duration,
    /// Larger bodies are not stored (0 means no limit).
    pub max_entry_size: usize,
    /// Bytes held at once for captures and queued Redis writes (0 means no limit).
    pub max_inflight_bytes: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            memory_max_bytes: 256 * 1024 * 1024,
            redis: RedisEndpoint::default(),
            redis_key_prefix: "outrider:".into(),
            redis_timeout: Duration::from_millis(50),
            max_entry_size: 8 * 1024 * 1024,
            max_inflight_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Rarely-changed tuning that is not part of the user config.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheOptions {
    pub breaker: BreakerSettings,
}

/// Which tier answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    L1,
    L2,
    None,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::L1 => "l1",
            Tier::L2 => "l2",
            Tier::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Lookup {
    /// Within its retention; whether it is fresh is the caller's judgement.
    pub entry: Option<Arc<StoredResponse>>,
    pub tier: Tier,
}

/// A cache decision, as the proxy reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit { tier: Tier },
    Miss,
    Stale,
    Bypass,
    Expired,
    Revalidated,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit { .. } => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
            Outcome::Expired => "expired",
            Outcome::Revalidated => "revalidated",
        }
    }
}

/// What an admin purge removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeTarget {
    /// Every entry of a route (or feature namespace such as `apq`).
    Namespace(String),
    /// Entries whose URL path starts with `prefix`, in one namespace or all.
    PathPrefix {
        namespace: Option<String>,
        prefix: String,
    },
    /// One entry by its 64-digit hex key.
    Key(String),
    All,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PurgeReport {
    pub l1: u64,
    /// `None` when Redis is disabled or could not be purged (see `l2_error`).
    pub l2: Option<u64>,
    pub l2_error: Option<String>,
    /// Cluster masters the purge could not clear (`host:port`); `l2` counts the others.
    pub l2_failed_nodes: Vec<String>,
    /// Whether the purge was published to the other replicas (`None` without Redis).
    pub broadcast: Option<bool>,
}

/// The two-tier cache. Share it as `Arc<Store>`; every method takes `&self`.
pub struct Store {
    settings: CacheSettings,
    l1: Option<L1>,
    l2: Option<L2>,
    flights: Arc<Flights>,
    revalidations: Arc<Revalidations>,
    /// Keys whose last response could not be stored ("hit-for-pass"): requests for them go
    /// straight upstream instead of queueing behind one leader whose answer nobody can reuse.
    uncacheable: moka::sync::Cache<[u8; 32], ()>,
    metrics: CacheMetrics,
    inflight: Arc<InflightBudget>,
    /// Tells this replica's purge broadcasts from other replicas'.
    instance: String,
    /// Second L1 passes of purges, sent and received (with Redis and L1 only: without Redis
    /// nothing can race a purge back into L1, without L1 there is nothing to pass over).
    repass: Option<Arc<Repass>>,
}

/// How long a key stays marked uncacheable after a response that could not be stored.
const UNCACHEABLE_MEMORY: Duration = Duration::from_secs(30);

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("l1", &self.l1.is_some())
            .field("l2", &self.l2.is_some())
            .finish()
    }
}

impl Store {
    /// Registers the metrics and starts connecting to Redis in the background. Fails only for
    /// settings that can never work or a metrics conflict, never because Redis is down.
    pub fn new(
        settings: CacheSettings,
        metrics: &prometheus::Registry,
    ) -> Result<Arc<Self>, CacheError> {
        Self::with_metrics(
            settings,
            CacheOptions::default(),
            CacheMetrics::new(metrics)?,
        )
    }

    /// Like [`Store::new`] with explicit tuning and already registered metrics (a rebuilt cache
    /// after a Redis URL change reuses the old one's metrics).
    pub fn with_metrics(
        settings: CacheSettings,
        options: CacheOptions,
        metrics: CacheMetrics,
    ) -> Result<Arc<Self>, CacheError> {
        let l1 = (settings.memory_max_bytes > 0).then(|| L1::new(settings.memory_max_bytes));
        let inflight = InflightBudget::new(settings.max_inflight_bytes);
        let l2 = match settings.redis.is_configured() {
            false => {
                metrics.breaker_state.set(0);
                None
            }
            true => Some(L2::new(
                &settings.redis,
                settings.redis_key_prefix.clone(),
                settings.redis_timeout,
                options.breaker,
                metrics.clone(),
                Arc::clone(&inflight),
            )?),
        };
        // The longest a racing Redis read can take, plus the moment its L1 insert needs.
        let repass_after = settings.redis_timeout + Duration::from_millis(100);
        let store = Arc::new_cyclic(|weak: &std::sync::Weak<Store>| {
            let repass = l2
                .as_ref()
                .filter(|_| l1.is_some())
                .map(|l2| Repass::new(repass_after, l2.pubsub().1, l1_batch_purger(weak.clone())));
            Store {
                settings,
                repass,
                l1,
                l2,
                flights: Arc::default(),
                revalidations: Arc::default(),
                uncacheable: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(UNCACHEABLE_MEMORY)
                    .build(),
                metrics,
                inflight,
                instance: invalidate::instance_id(),
            }
        });
        store.subscribe_invalidations();
        Ok(store)
    }

    /// Starts applying other replicas' purges to this L1. The task holds the store weakly: it
    /// ends with the store's Redis runtime and never keeps the store alive.
    fn subscribe_invalidations(self: &Arc<Self>) {
        let Some(l2) = &self.l2 else {
            return;
        };
        let (apply, resync) = self.invalidation_receivers();
        let (clients, rt) = l2.pubsub();
        rt.spawn(invalidate::listen(
            clients,
            invalidate::channel(l2.prefix()),
            self.instance.clone(),
            apply,
            resync,
            self.metrics.clone(),
            super::l2::connect_timeout(self.settings.redis_timeout),
        ));
    }

    /// What the subscriber does with another replica's message (purge L1 now, and again once
    /// a read that raced the purge is over, like the sender) and after a lost subscription
    /// (clear L1 once, without a second pass: L1 is refilling from L2 by then).
    fn invalidation_receivers(self: &Arc<Self>) -> (invalidate::Apply, invalidate::Apply) {
        let purge = l1_purger(Arc::downgrade(self));
        let repass = self.repass.clone();
        let first = Arc::clone(&purge);
        let apply: invalidate::Apply = Arc::new(move |filter: KeyFilter| {
            if let Some(repass) = &repass {
                repass.schedule(filter.clone());
            }
            first(filter);
        });
        (apply, purge)
    }

    /// Schedules the second pass of a purge over L1.
    fn repass(&self, filter: KeyFilter) {
        if let Some(repass) = &self.repass {
            repass.schedule(filter);
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// Reserves bytes for a response being captured; `None` when the in-flight bound is
    /// reached (the response then streams through uncached).
    pub fn reserve_inflight(&self, bytes: usize) -> Option<Reservation> {
        let reserved = self.inflight.reserve(bytes);
        if reserved.is_none() {
            self.metrics.inflight_full.inc();
        }
        reserved
    }

    /// Grows a capture's reservation, counting a refusal.
    pub fn grow_inflight(&self, reservation: &mut Reservation, more: usize) -> bool {
        let grown = reservation.grow(more);
        if !grown {
            self.metrics.inflight_full.inc();
        }
        grown
    }

    pub fn metrics(&self) -> &CacheMetrics {
        &self.metrics
    }

    /// The synchronous L1 probe that [`Store::lookup`] tries first; the proxy can call it to
    /// answer hits without an await point.
    #[inline]
    pub fn lookup_l1(&self, key: &CacheKey) -> Option<Arc<StoredResponse>> {
        self.l1.as_ref()?.get(&key.hash)
    }

    pub async fn lookup(&self, key: &CacheKey) -> Lookup {
        if let Some(entry) = self.lookup_l1(key) {
            return Lookup {
                entry: Some(entry),
                tier: Tier::L1,
            };
        }
        if let Some(l2) = &self.l2 {
            let rkey = l2.key(&key.namespace, &key.label, &key.hex());
            if let L2Get::Hit(entry) = l2.get(&rkey).await {
                if !entry.remaining_retention(SystemTime::now()).is_zero() {
                    let entry = Arc::new(entry);
                    if let Some(l1) = &self.l1 {
                        l1.insert(key.hash, Arc::clone(&entry));
                    }
                    return Lookup {
                        entry: Some(entry),
                        tier: Tier::L2,
                    };
                }
            }
        }
        Lookup {
            entry: None,
            tier: Tier::None,
        }
    }

    /// Stores in L1 now and in Redis in the background. Returns the shared entry (hand it to
    /// [`LeaderGuard::complete`](super::LeaderGuard::complete)) or `None` when it was not
    /// stored (too large, or already past its retention).
    pub async fn store(
        &self,
        key: &CacheKey,
        entry: StoredResponse,
    ) -> Option<Arc<StoredResponse>> {
        self.store_now(key, entry)
    }

    /// The synchronous body of [`Store::store`].
    pub fn store_now(
        &self,
        key: &CacheKey,
        mut entry: StoredResponse,
    ) -> Option<Arc<StoredResponse>> {
        let max = self.settings.max_entry_size;
        if max > 0 && entry.body.len() > max {
            return None;
        }
        let remaining = entry.remaining_retention(SystemTime::now());
        if remaining.is_zero() {
            return None;
        }
        // The key is the authority on where an entry lives; purge matches on these fields.
        if entry.namespace != key.namespace {
            entry.namespace.clone_from(&key.namespace);
        }
        if entry.label != key.label {
            entry.label.clone_from(&key.label);
        }
        let entry = Arc::new(entry);
        if let Some(l1) = &self.l1 {
            l1.insert(key.hash, Arc::clone(&entry));
            self.refresh_gauges();
        }
        if let Some(l2) = &self.l2 {
            let rkey = l2.key(&key.namespace, &key.label, &key.hex());
            l2.set(rkey, Arc::clone(&entry), remaining);
        }
        Some(entry)
    }

    /// Whether entries are kept in memory (L1) at all.
    pub fn has_l1(&self) -> bool {
        self.l1.is_some()
    }

    /// Drops one entry from L1 and Redis without telling other replicas: for entries nothing
    /// can reach any more (a URL's variant pushed out of its list), so no copy of it is served.
    pub fn discard(&self, key: &CacheKey) {
        if let Some(l1) = &self.l1 {
            l1.remove(&key.hash);
        }
        if let Some(l2) = &self.l2 {
            l2.delete_and_announce(
                l2.key(&key.namespace, &key.label, &key.hex()),
                None,
                |_, _| {},
            );
        }
    }

    /// Evicts one entry from L1 now and from Redis in the background (RFC 9111 §4.4
    /// invalidation after an unsafe request).
    pub fn invalidate(&self, key: &CacheKey) {
        if let Some(l1) = &self.l1 {
            l1.remove(&key.hash);
        }
        if let Some(l2) = &self.l2 {
            // Other replicas drop their L1 copy too (the broadcast a purge by key makes), once
            // Redis no longer has the entry to give them back.
            let message = Message::new(&self.instance, KeyFilter::Key { hex: key.hex() }).encode();
            let counters = self.metrics.invalidations.clone();
            let (l1, hash) = (self.l1.clone(), key.hash);
            let repass = self.repass.clone();
            let hex = key.hex();
            l2.delete_and_announce(
                l2.key(&key.namespace, &key.label, &key.hex()),
                Some((invalidate::channel(l2.prefix()), message)),
                move |_, published| {
                    // A lookup already waiting on Redis may have put the old entry back here.
                    if let Some(l1) = l1 {
                        l1.remove(&hash);
                    }
                    if let Some(repass) = repass {
                        repass.schedule(KeyFilter::Key { hex });
                    }
                    match published {
                        Some(true) => counters.published.inc(),
                        Some(false) => counters.publish_failed.inc(),
                        None => {}
                    }
                },
            );
        }
        self.uncacheable.invalidate(&key.hash);
    }

    /// Remembers that `key`'s response could not be stored, for a short while.
    pub fn note_uncacheable(&self, key: &CacheKey) {
        self.uncacheable.insert(key.hash, ());
    }

    /// Whether `key`'s last response could not be stored (so waiting on a leader is pointless).
    pub fn recently_uncacheable(&self, key: &CacheKey) -> bool {
        self.uncacheable.contains_key(&key.hash)
    }

    /// Joins or starts the single upstream fetch for `key`. `seen` is what this request's
    /// lookup found (an expired entry, or nothing): a fetch that finished between that lookup
    /// and now has left a different entry in L1, and the request is then handed that entry as
    /// the fetch's follower would have been, instead of leading a second upstream call.
    pub fn single_flight(&self, key: &CacheKey, seen: Option<&Arc<StoredResponse>>) -> Flight {
        let flight = self.flights.begin(key.hash, &self.metrics.sf_waits);
        let Flight::Leader(guard) = flight else {
            return flight;
        };
        match self.lookup_l1(key) {
            Some(entry) if seen.is_none_or(|seen| !Arc::ptr_eq(seen, &entry)) => {
                // Anyone who joined this flight meanwhile is served the same entry.
                guard.complete(Some(Arc::clone(&entry)));
                Flight::Follower(FollowerWait::ready(entry, &self.metrics.sf_waits))
            }
            _ => Flight::Leader(guard),
        }
    }

    /// `Some` for the one caller that should refresh a stale entry in the background.
    pub fn try_begin_revalidation(&self, key: &CacheKey) -> Option<RevalidationGuard> {
        self.revalidations.try_begin(key.hash)
    }

    /// Removes what `target` selects from Redis and L1. The L1 walk runs on a blocking thread
    /// so a large purge never stalls the runtime that answers `/health` and `/ready`.
    pub async fn purge(self: &Arc<Self>, target: PurgeTarget) -> Result<PurgeReport, CacheError> {
        let filter = target_filter(target)?;
        let mut report = PurgeReport::default();
        // Redis first, then L1, then L1 again: a lookup racing the purge can refill L1 from an
        // L2 key that was not deleted yet; the second pass removes what it put back.
        if let Some(l2) = &self.l2 {
            match l2.purge(&filter).await {
                Ok(done) if done.failed.is_empty() => report.l2 = Some(done.removed),
                Ok(done) => {
                    let nodes: Vec<String> = done.failed.iter().map(|(n, _)| n.clone()).collect();
                    let errors: Vec<String> = done
                        .failed
                        .iter()
                        .map(|(n, e)| format!("{n}: {e}"))
                        .collect();
                    tracing::warn!(failed = ?errors, purged = done.removed, "purge could not reach every redis master; their matching keys stay until they expire or the purge is repeated");
                    // Partial: what the reachable masters removed, and who did not answer.
                    report.l2 = (done.failed.len() < done.nodes).then_some(done.removed);
                    report.l2_error = Some(format!(
                        "purge failed on {} of {} masters ({}); the others are purged",
                        done.failed.len(),
                        done.nodes,
                        errors.join("; ")
                    ));
                    report.l2_failed_nodes = nodes;
                }
                Err(e) => report.l2_error = Some(e.to_string()),
            }
            report.broadcast = Some(self.publish_filter(&filter).await.is_ok());
        }
        if self.l1.is_some() {
            self.repass(filter.clone());
            let this = Arc::clone(self);
            let walk = move || {
                let removed = this.purge_l1(&filter);
                if this.l2.is_some() {
                    this.purge_l1(&filter);
                }
                this.refresh_gauges();
                removed
            };
            report.l1 = match tokio::runtime::Handle::try_current() {
                Ok(_) => tokio::task::spawn_blocking(walk).await.unwrap_or(0),
                Err(_) => walk(),
            };
        }
        Ok(report)
    }

    fn purge_l1(&self, filter: &KeyFilter) -> u64 {
        let Some(l1) = &self.l1 else {
            return 0;
        };
        let removed = match filter {
            // One entry: removed by its key, never by walking L1 (every unsafe request
            // invalidates one).
            KeyFilter::Key { hex } => {
                return parse_hex32(hex).map_or(0, |k| u64::from(l1.take(&k)));
            }
            scoped => l1.purge(|k, e| l1_matches(scoped, k, e)),
        };
        l1.sync();
        removed
    }

    /// A due batch of second passes: each key removed by itself, the scoped filters in one walk.
    fn purge_l1_batch(&self, batch: &RepassBatch) {
        let Some(l1) = &self.l1 else {
            return;
        };
        for key in &batch.keys {
            l1.remove(key);
        }
        match batch.filters.as_slice() {
            [] => {}
            [one] => {
                self.purge_l1(one);
            }
            many => {
                l1.purge(|k, e| many.iter().any(|f| l1_matches(f, k, e)));
                l1.sync();
            }
        }
    }

    /// Tells the other replicas to drop what `target` selects from their L1 (this replica's L1
    /// and Redis are not touched). [`Store::purge`] calls it; a feature that invalidates on its
    /// own (e.g. after an unsafe method, RFC 9111 section 4.4) calls it after removing its entry
    /// locally. Errors when there is no Redis or the publish failed; the purge itself stands.
    pub async fn publish_invalidation(&self, target: PurgeTarget) -> Result<(), CacheError> {
        self.publish_filter(&target_filter(target)?).await
    }

    async fn publish_filter(&self, filter: &KeyFilter) -> Result<(), CacheError> {
        let Some(l2) = &self.l2 else {
            return Err(CacheError::Redis("no redis configured".into()));
        };
        let message = Message::new(&self.instance, filter.clone()).encode();
        let res = l2
            .publish(&invalidate::channel(l2.prefix()), &message)
            .await;
        match &res {
            Ok(()) => self.metrics.invalidations.published.inc(),
            Err(e) => {
                self.metrics.invalidations.publish_failed.inc();
                tracing::warn!(error = %e, "purge not broadcast to other replicas; their L1 copies live until they expire or the channel reconnects");
            }
        }
        res
    }

    /// Whether other replicas' purges currently reach this L1 (`None` without Redis).
    pub fn invalidation_subscribed(&self) -> Option<bool> {
        self.l2
            .as_ref()
            .map(|_| self.metrics.invalidation_subscribed.get() == 1)
    }

    /// Runs a Lua script on one key of the shared tier (e.g. a rate limit shared by replicas);
    /// `None` when there is no Redis or it did not answer in time.
    pub async fn shared_script(
        &self,
        script: &redis::Script,
        key: &str,
        args: &[i64],
    ) -> Option<Vec<i64>> {
        self.l2.as_ref()?.script(script, key, args).await
    }

    /// Redis writes not yet finished: a draining process waits for them instead of losing them.
    pub fn pending_writes(&self) -> usize {
        self.l2.as_ref().map_or(0, L2::pending_writes)
    }

    pub fn redis_state(&self) -> RedisState {
        self.l2.as_ref().map_or(RedisState::Disabled, L2::state)
    }

    /// Counts a cache decision for `namespace`; hits are attributed to their tier.
    pub fn record(&self, namespace: &str, outcome: Outcome) {
        let tier = match outcome {
            Outcome::Hit { tier } => tier,
            _ => Tier::None,
        };
        self.record_at(namespace, tier, outcome);
    }

    /// Like [`Store::record`] with an explicit tier (e.g. a stale entry served from L2).
    pub fn record_at(&self, namespace: &str, tier: Tier, outcome: Outcome) {
        self.metrics
            .requests
            .with_label_values(&[namespace, tier.as_str(), outcome.as_str()])
            .inc();
    }

    /// Brings the L1 and in-flight gauges up to date; cheap, call it from the metrics scrape.
    pub fn refresh_gauges(&self) {
        self.metrics
            .inflight_bytes
            .set(i64::try_from(self.inflight.used()).unwrap_or(i64::MAX));
        if let Some(l1) = &self.l1 {
            self.metrics
                .l1_bytes
                .set(i64::try_from(l1.weighted_size()).unwrap_or(i64::MAX));
            self.metrics
                .l1_entries
                .set(i64::try_from(l1.entry_count()).unwrap_or(i64::MAX));
        }
    }

    /// Applies moka's deferred bookkeeping so sizes and evictions are exact (tests, stats).
    pub fn sync_l1(&self) {
        if let Some(l1) = &self.l1 {
            l1.sync();
        }
    }

    /// JSON for `GET /cache/stats`. Hit ratio = (hit + stale) / (hit + stale + miss + expired
    /// + revalidated); bypasses are not cache lookups and are left out.
    pub fn stats(&self) -> Value {
        // moka counts lazily; settle it so the numbers an operator reads are current.
        self.sync_l1();
        self.refresh_gauges();
        // namespace -> tier -> outcome -> count
        let mut by_ns: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>> = BTreeMap::new();
        for mf in self.metrics.requests.collect() {
            for m in mf.get_metric() {
                let (mut route, mut tier, mut outcome) = ("", "", "");
                for lp in m.get_label() {
                    match lp.name() {
                        "route" => route = lp.value(),
                        "tier" => tier = lp.value(),
                        "outcome" => outcome = lp.value(),
                        _ => {}
                    }
                }
                let v = m.get_counter().get_value() as u64;
                *by_ns
                    .entry(route.to_owned())
                    .or_default()
                    .entry(tier.to_owned())
                    .or_default()
                    .entry(outcome.to_owned())
                    .or_default() += v;
            }
        }
        let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
        let mut namespaces = serde_json::Map::new();
        for (ns, tiers) in &by_ns {
            let mut ns_totals: BTreeMap<&str, u64> = BTreeMap::new();
            for outcomes in tiers.values() {
                for (o, v) in outcomes {
                    let o = match o.as_str() {
                        "hit" => "hit",
                        "miss" => "miss",
                        "stale" => "stale",
                        "bypass" => "bypass",
                        "expired" => "expired",
                        "revalidated" => "revalidated",
                        _ => "other",
                    };
                    *ns_totals.entry(o).or_default() += v;
                    *totals.entry(o).or_default() += v;
                }
            }
            namespaces.insert(
                ns.clone(),
                json!({
                    "tiers": tiers,
                    "totals": ns_totals,
                    "hit_ratio": hit_ratio(&ns_totals),
                }),
            );
        }
        let l1 = match &self.l1 {
            Some(l1) => json!({
                "enabled": true,
                "bytes": l1.weighted_size(),
                "entries": l1.entry_count(),
                "max_bytes": self.settings.memory_max_bytes,
            }),
            None => json!({ "enabled": false }),
        };
        let (state, reason) = match (&self.l2, self.redis_state()) {
            (None, _) => ("disabled", None),
            (Some(_), RedisState::Up) => ("up", None),
            (Some(l2), RedisState::Degraded { reason }) => (
                match l2.breaker_state() {
                    BreakerState::HalfOpen => "half_open",
                    BreakerState::Open if !l2.is_connected() => "down",
                    _ => "open",
                },
                Some(reason),
            ),
            (Some(_), RedisState::Disabled) => ("disabled", None),
        };
        json!({
            "namespaces": namespaces,
            "totals": totals,
            "hit_ratio": hit_ratio(&totals),
            "l1": l1,
            "redis": {
                "state": state,
                "reason": reason,
                "breaker": self.metrics.breaker_state.get(),
                "errors": self.metrics.redis_error_count(),
                "invalidation_subscribed": self.invalidation_subscribed(),
            },
            "single_flight": {
                "in_flight": self.flights.len(),
                "revalidating": self.revalidations.len(),
            },
        })
    }
}

/// Whether a scoped filter selects the L1 entry `e` stored under `k`.
fn l1_matches(filter: &KeyFilter, k: &[u8; 32], e: &StoredResponse) -> bool {
    match filter {
        KeyFilter::All => true,
        KeyFilter::Namespace { namespace } => e.namespace == *namespace,
        KeyFilter::PathPrefix { namespace, prefix } => {
            namespace.as_deref().is_none_or(|ns| e.namespace == ns)
                && e.label.starts_with(prefix.as_str())
        }
        KeyFilter::Key { hex } => parse_hex32(hex).is_some_and(|want| want == *k),
    }
}

/// Drops what a filter selects from the store's L1: one key at once (an O(1) removal), a scope
/// on a blocking thread (the L1 walk must stay off the Redis runtime's only thread). Holds the
/// store weakly: never keeps it alive.
fn l1_purger(store: std::sync::Weak<Store>) -> invalidate::Apply {
    Arc::new(move |filter| {
        let Some(store) = store.upgrade() else {
            return;
        };
        if matches!(filter, KeyFilter::Key { .. }) {
            store.purge_l1(&filter);
            return;
        }
        tokio::task::spawn_blocking(move || {
            store.purge_l1(&filter);
            store.refresh_gauges();
        });
    })
}

/// Applies a due batch of second passes to the store's L1 on one blocking thread.
fn l1_batch_purger(store: std::sync::Weak<Store>) -> invalidate::ApplyBatch {
    Arc::new(move |batch| {
        if let Some(store) = store.upgrade() {
            tokio::task::spawn_blocking(move || {
                store.purge_l1_batch(&batch);
                store.refresh_gauges();
            });
        }
    })
}

/// Checks a purge target and turns it into the filter Redis, L1 and the broadcast share.
fn target_filter(target: PurgeTarget) -> Result<KeyFilter, CacheError> {
    Ok(match target {
        PurgeTarget::All => KeyFilter::All,
        PurgeTarget::Namespace(namespace) => KeyFilter::Namespace { namespace },
        PurgeTarget::PathPrefix { namespace, prefix } => {
            if prefix.is_empty() {
                return Err(CacheError::InvalidTarget("empty path prefix".into()));
            }
            KeyFilter::PathPrefix { namespace, prefix }
        }
        PurgeTarget::Key(hex) => {
            let hex = hex.trim().to_ascii_lowercase();
            if parse_hex32(&hex).is_none() {
                return Err(CacheError::InvalidTarget(
                    "key must be 64 hexadecimal digits".into(),
                ));
            }
            KeyFilter::Key { hex }
        }
    })
}

fn hit_ratio(t: &BTreeMap<&str, u64>) -> Option<f64> {
    let get = |k: &str| t.get(k).copied().unwrap_or(0);
    let served = get("hit") + get("stale");
    let looked = served + get("miss") + get("expired") + get("revalidated");
    (looked > 0).then(|| served as f64 / looked as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::entry::sample_entry;

    fn l1_only(max_entry: usize) -> Arc<Store> {
        let settings = CacheSettings {
            max_entry_size: max_entry,
            ..CacheSettings::default()
        };
        match Store::new(settings, &prometheus::Registry::new()) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn fresh(body: usize) -> StoredResponse {
        let mut e = sample_entry(body);
        e.stored_at = SystemTime::now();
        e
    }

    #[tokio::test]
    async fn store_limits_and_key_authority() {
        let c = l1_only(1000);
        let k = CacheKey::http("route-a", "GET", "h", "/p", None, &[], None);
        assert!(c.store(&k, fresh(1001)).await.is_none(), "too large");
        let mut old = fresh(10);
        old.stored_at = SystemTime::now() - Duration::from_secs(3600);
        assert!(c.store(&k, old).await.is_none(), "past retention");
        let stored = c.store(&k, fresh(1000)).await;
        assert_eq!(
            stored.as_ref().map(|e| e.namespace.as_str()),
            Some("route-a")
        );
        assert_eq!(stored.as_ref().map(|e| e.label.as_str()), Some("/p"));
        let l = c.lookup(&k).await;
        assert_eq!(l.tier, Tier::L1);
        assert_eq!(c.redis_state(), RedisState::Disabled);
    }

    #[tokio::test]
    async fn stats_and_record() {
        let c = l1_only(0);
        let k = CacheKey::http("items", "GET", "h", "/p", None, &[], None);
        c.store(&k, fresh(10)).await;
        c.record("items", Outcome::Hit { tier: Tier::L1 });
        c.record("items", Outcome::Hit { tier: Tier::L1 });
        c.record("items", Outcome::Hit { tier: Tier::L2 });
        c.record("items", Outcome::Miss);
        c.record("items", Outcome::Bypass);
        c.record_at("other", Tier::L2, Outcome::Stale);
        let s = c.stats();
        assert_eq!(s["namespaces"]["items"]["tiers"]["l1"]["hit"], 2);
        assert_eq!(s["namespaces"]["items"]["tiers"]["l2"]["hit"], 1);
        assert_eq!(s["namespaces"]["items"]["totals"]["miss"], 1);
        assert_eq!(s["namespaces"]["items"]["hit_ratio"], 0.75);
        assert_eq!(s["namespaces"]["other"]["tiers"]["l2"]["stale"], 1);
        assert_eq!(s["hit_ratio"], 0.8);
        assert_eq!(s["redis"]["state"], "disabled");
        assert_eq!(s["l1"]["enabled"], true);
        assert_eq!(s["l1"]["entries"], 1);
        assert_eq!(c.metrics().l1_entries.get(), 1);
        assert!(c.metrics().l1_bytes.get() > 0);
    }

    #[tokio::test]
    async fn l1_purge_without_redis() {
        let c = l1_only(0);
        for p in ["/a/1", "/a/2", "/b"] {
            let k = CacheKey::http("r", "GET", "h", p, None, &[], None);
            c.store(&k, fresh(1)).await;
        }
        let r = c
            .purge(PurgeTarget::PathPrefix {
                namespace: None,
                prefix: "/a/".into(),
            })
            .await
            .map_err(|e| e.to_string());
        assert_eq!(
            r,
            Ok(PurgeReport {
                l1: 2,
                l2: None,
                l2_error: None,
                l2_failed_nodes: Vec::new(),
                broadcast: None
            })
        );
        assert!(c
            .purge(PurgeTarget::PathPrefix {
                namespace: None,
                prefix: String::new()
            })
            .await
            .is_err());
    }

    #[tokio::test]
    async fn key_passes_remove_only_their_key_and_batches_apply_together() {
        let c = l1_only(0);
        let keys: Vec<CacheKey> = ["/a/1", "/a/2", "/b", "/c"]
            .iter()
            .map(|p| CacheKey::http("r", "GET", "h", p, None, &[], None))
            .collect();
        for k in &keys {
            c.store(k, fresh(1)).await;
        }
        let key = |k: &CacheKey| KeyFilter::Key { hex: k.hex() };
        assert_eq!(c.purge_l1(&key(&keys[0])), 1);
        assert_eq!(c.purge_l1(&key(&keys[0])), 0, "already gone");
        assert_eq!(c.purge_l1(&KeyFilter::Key { hex: "zz".into() }), 0);
        assert!(keys[1..].iter().all(|k| c.lookup_l1(k).is_some()));

        c.purge_l1_batch(&RepassBatch {
            keys: vec![keys[1].hash],
            filters: vec![KeyFilter::PathPrefix {
                namespace: None,
                prefix: "/c".into(),
            }],
        });
        assert!(c.lookup_l1(&keys[1]).is_none());
        assert!(c.lookup_l1(&keys[3]).is_none());
        assert!(c.lookup_l1(&keys[2]).is_some(), "selected by nothing");
        c.purge_l1_batch(&RepassBatch {
            keys: Vec::new(),
            filters: vec![
                KeyFilter::Namespace {
                    namespace: "other".into(),
                },
                KeyFilter::PathPrefix {
                    namespace: Some("r".into()),
                    prefix: "/b".into(),
                },
            ],
        });
        assert!(c.lookup_l1(&keys[2]).is_none());
    }

    /// Redis configured at a closed port: the store runs its subscriber machinery without a
    /// server (nothing here needs one).
    fn with_unreachable_redis(memory_max_bytes: u64) -> Arc<Store> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let settings = CacheSettings {
            memory_max_bytes,
            redis: RedisEndpoint {
                url: Some(format!("redis://127.0.0.1:{port}")),
                ..RedisEndpoint::default()
            },
            ..CacheSettings::default()
        };
        match Store::new(settings, &prometheus::Registry::new()) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn a_resubscribe_clears_l1_once_and_second_passes_need_l1() {
        let c = with_unreachable_redis(1 << 20);
        let Some(repass) = c.repass.clone() else {
            panic!("redis and L1: second passes");
        };
        let (apply, resync) = c.invalidation_receivers();
        resync(KeyFilter::All);
        assert_eq!(repass.queued(), (Vec::new(), Vec::new(), false));
        let ns = KeyFilter::Namespace {
            namespace: "a".into(),
        };
        apply(ns.clone());
        assert_eq!(repass.queued(), (Vec::new(), vec![ns], true));

        let redis_only = with_unreachable_redis(0);
        assert!(redis_only.repass.is_none());
    }

    #[tokio::test]
    async fn flights_through_the_cache_do_not_leak() {
        let c = l1_only(0);
        let k = CacheKey::from_parts("apq", "q", &[b"x"]);
        let Flight::Leader(g) = c.single_flight(&k, None) else {
            panic!("first caller leads");
        };
        let Flight::Follower(w) = c.single_flight(&k, None) else {
            panic!("second caller follows");
        };
        let stored = c.store(&k, fresh(5)).await;
        g.complete(stored);
        assert!(w.wait(Duration::from_secs(1)).await.entry().is_some());
        assert_eq!(c.stats()["single_flight"]["in_flight"], 0);
        let r = c.try_begin_revalidation(&k);
        assert!(r.is_some() && c.try_begin_revalidation(&k).is_none());
        drop(r);
        assert!(c.try_begin_revalidation(&k).is_some());
    }

    #[tokio::test]
    async fn a_fetch_finished_since_the_lookup_serves_instead_of_leading_again() {
        let c = l1_only(0);
        let k = CacheKey::from_parts("llm", "r", &[b"q"]);
        // Looked up and missed; the fetch that was in flight then completes...
        let missed = c.lookup(&k).await.entry;
        let Flight::Leader(g) = c.single_flight(&k, None) else {
            panic!("first caller leads");
        };
        let stored = c.store(&k, fresh(5)).await;
        g.complete(stored.clone());
        // ...before this request asks to lead: it is served that fetch's entry.
        let Flight::Follower(w) = c.single_flight(&k, missed.as_ref()) else {
            panic!("served, not a second fetch");
        };
        let served = w.wait(Duration::from_secs(1)).await.entry();
        assert!(served.is_some_and(|e| stored.is_some_and(|s| Arc::ptr_eq(&e, &s))));
        assert_eq!(c.stats()["single_flight"]["in_flight"], 0);
        assert_eq!(c.metrics().sf_waits.served.get(), 1);

        // The entry this request's own lookup found (expired, say) is no reason to wait.
        let seen = c.lookup(&k).await.entry;
        let Flight::Leader(g) = c.single_flight(&k, seen.as_ref()) else {
            panic!("the entry it already saw: it leads a refetch");
        };
        drop(g);
        assert_eq!(c.stats()["single_flight"]["in_flight"], 0);
    }
}
