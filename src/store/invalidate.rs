//! Purges that reach every replica: each instance subscribes to `{key_prefix}invalidate` and
//! drops the L1 entries a message names; a purge publishes its scope there.
//!
//! Redis and the local L1 are purged without it, so a dead channel costs only the other
//! replicas' L1 copies, and only until they resubscribe: a subscriber that lost its connection
//! clears its whole L1 when it is back (it cannot know what it missed; L1 refills from L2).
//! Classic pub/sub on a cluster is broadcast over the cluster bus, so a subscriber on any one
//! node hears every publish.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::key::parse_hex32;
use super::l2::KeyFilter;
use super::metrics::CacheMetrics;

/// Version of the message format; a receiver ignores versions it does not know.
const VERSION: u8 = 1;
/// How often a quiet subscription is checked with PING (a dead TCP peer says nothing).
const PING_EVERY: Duration = Duration::from_secs(5);

/// One invalidation on the channel: JSON, so other tools can publish and read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Message {
    pub(crate) v: u8,
    /// The sender's instance id: a replica skips its own messages (it purged already).
    pub(crate) from: String,
    /// Sender's wall clock in ms since the epoch, for the lag metric.
    pub(crate) sent_ms: u64,
    #[serde(flatten)]
    pub(crate) filter: KeyFilter,
}

impl Message {
    pub(crate) fn new(from: &str, filter: KeyFilter) -> Self {
        Message {
            v: VERSION,
            from: from.to_owned(),
            sent_ms: now_ms(),
            filter,
        }
    }

    pub(crate) fn encode(&self) -> String {
        // A derived Serialize of strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The channel every replica of one key prefix listens on.
pub(crate) fn channel(prefix: &str) -> String {
    format!("{prefix}invalidate")
}

/// A random id for this process's store, unique enough to tell replicas apart.
pub(crate) fn instance_id() -> String {
    format!("{:016x}{:08x}", fastrand::u64(..), std::process::id())
}

/// A subscriber's proof that its subscription works: Redis reports a refused SUBSCRIBE (an ACL
/// without the channel) only in-band, where the client does not surface it.
#[derive(Debug, Serialize, Deserialize)]
struct Probe {
    probe: String,
}

/// What the subscriber does with a message: drop the matching L1 entries.
pub(crate) type Apply = Arc<dyn Fn(KeyFilter) + Send + Sync>;

/// What a received payload means for this instance.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Received {
    Apply(KeyFilter, Duration),
    Own,
    /// Some subscriber's probe (this one's is told apart by its exact payload).
    Probe,
    Malformed,
}

pub(crate) fn classify(payload: &[u8], me: &str) -> Received {
    match serde_json::from_slice::<Message>(payload) {
        Ok(m) if m.v != VERSION => Received::Malformed,
        Ok(m) if m.from == me => Received::Own,
        Ok(m) => {
            let lag = Duration::from_millis(now_ms().saturating_sub(m.sent_ms));
            match &m.filter {
                KeyFilter::PathPrefix { prefix, .. } if prefix.is_empty() => Received::Malformed,
                _ => Received::Apply(m.filter, lag),
            }
        }
        Err(_) if serde_json::from_slice::<Probe>(payload).is_ok() => Received::Probe,
        Err(_) => Received::Malformed,
    }
}

/// Applies one received message.
fn handle(payload: &[u8], me: &str, apply: &Apply, metrics: &CacheMetrics) {
    match classify(payload, me) {
        Received::Apply(filter, lag) => {
            metrics.invalidation_lag.observe(lag.as_secs_f64());
            metrics.invalidations.applied.inc();
            apply(filter);
        }
        Received::Own | Received::Probe => {}
        Received::Malformed => {
            metrics.invalidations.malformed.inc();
            tracing::debug!("ignored a malformed invalidation message");
        }
    }
}

/// Publishes a probe through `client` and waits for it on `stream`, applying whatever else
/// arrives meanwhile; true once the probe came back.
async fn prove(
    client: &redis::Client,
    stream: &mut redis::aio::PubSubStream,
    channel: &str,
    me: &str,
    apply: &Apply,
    metrics: &CacheMetrics,
) -> redis::RedisResult<bool> {
    let probe = serde_json::to_string(&Probe {
        probe: format!("{me}-{:016x}", fastrand::u64(..)),
    })
    .unwrap_or_default();
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(&probe)
        .query_async::<i64>(&mut conn)
        .await?;
    while let Some(msg) = stream.next().await {
        if msg.get_payload_bytes() == probe.as_bytes() {
            return Ok(true);
        }
        handle(msg.get_payload_bytes(), me, apply, metrics);
    }
    Ok(false)
}

/// Subscribes for as long as the store lives (the task ends with the Redis runtime), moving
/// to the next seed node when one fails. `apply` handles other replicas' messages; `resync`
/// clears L1 after a lost subscription (once: L1 is refilling, a second wipe would only cost).
pub(crate) async fn listen(
    clients: Vec<redis::Client>,
    channel: String,
    me: String,
    apply: Apply,
    resync: Apply,
    metrics: CacheMetrics,
    connect_timeout: Duration,
) {
    let mut delay = Duration::from_millis(100);
    let mut lost = false;
    let mut logged = false;
    for client in clients.iter().cycle() {
        let subscribed = tokio::time::timeout(connect_timeout, async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            let (sink, mut stream) = ps.split();
            let proven = prove(client, &mut stream, &channel, &me, &apply, &metrics).await?;
            Ok::<_, redis::RedisError>(proven.then_some((sink, stream)))
        })
        .await;
        let (mut sink, mut stream) = match subscribed {
            Ok(Ok(Some(pair))) => pair,
            failed => {
                if !logged {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(_)) => "the subscription ended at once".into(),
                        Err(_) => "no answer (or the subscription was refused)".into(),
                    };
                    tracing::warn!(%channel, %error, "cannot subscribe to the invalidation channel; purges reach Redis and this replica only until it can (retrying)");
                    logged = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        logged = false;
        metrics.invalidation_subscribed.set(1);
        if lost {
            // Purges published while we were away were missed: start L1 over.
            tracing::info!(%channel, "invalidation channel back; clearing L1 in case purges were missed");
            resync(KeyFilter::All);
        } else {
            tracing::info!(%channel, "subscribed to the invalidation channel");
        }
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    handle(msg.get_payload_bytes(), &me, &apply, &metrics);
                }
                () = tokio::time::sleep(PING_EVERY) => {
                    let alive = tokio::time::timeout(connect_timeout, sink.ping::<redis::Value>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        metrics.invalidation_subscribed.set(0);
        lost = true;
        tracing::warn!(%channel, "lost the invalidation channel; other replicas' purges do not reach this L1 until it is back (retrying)");
    }
}

/// Queued scoped second passes (namespace, path prefix, all) beyond this collapse into coarser
/// ones: a storm of admin purges must not grow memory without bound.
const MAX_SCOPED_REPASSES: usize = 1024;
/// Queued second passes of single keys beyond this drop the oldest: a missed second pass only
/// reopens the narrow race it covers, whereas wiping L1 would cost every replica its hot set.
const MAX_KEY_REPASSES: usize = 32 * 1024;

/// One run of second passes: single keys (each an O(1) removal) and scoped filters (one walk
/// of L1 for all of them). Applied at once, on one blocking thread.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RepassBatch {
    pub(crate) keys: Vec<[u8; 32]>,
    pub(crate) filters: Vec<KeyFilter>,
}

impl RepassBatch {
    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.filters.is_empty()
    }
}

/// What the second pass does with a due batch.
pub(crate) type ApplyBatch = Arc<dyn Fn(RepassBatch) + Send + Sync>;

/// Second passes over L1, each `delay` after its purge. A lookup whose Redis read started before
/// a purge reached Redis can put the old entry back in L1 after the first pass, but it has its
/// answer within the Redis timeout; a pass after that removes what it put back. One task at a
/// time drains the queues and ends when they are empty.
pub(crate) struct Repass {
    delay: Duration,
    rt: tokio::runtime::Handle,
    apply: ApplyBatch,
    state: Mutex<RepassState>,
}

#[derive(Default)]
struct RepassState {
    /// Key passes in schedule order: (due, sequence, key).
    keys: VecDeque<(Instant, u64, [u8; 32])>,
    /// Each queued key's latest sequence: only that entry runs, earlier ones are duplicates.
    latest: HashMap<[u8; 32], u64>,
    next_seq: u64,
    /// Scoped passes in schedule order, each filter once (at its latest due time).
    scoped: VecDeque<(Instant, KeyFilter)>,
    running: bool,
}

/// A wider filter that selects everything `filter` does, for collapsing a full queue.
fn coarsen(filter: KeyFilter) -> KeyFilter {
    match filter {
        KeyFilter::PathPrefix {
            namespace: Some(namespace),
            ..
        } => KeyFilter::Namespace { namespace },
        KeyFilter::PathPrefix {
            namespace: None, ..
        } => KeyFilter::All,
        other => other,
    }
}

impl RepassState {
    fn push_key(&mut self, at: Instant, key: [u8; 32]) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.keys.push_back((at, seq, key));
        self.latest.insert(key, seq);
        while self.keys.len() > MAX_KEY_REPASSES {
            if let Some((_, seq, key)) = self.keys.pop_front() {
                if self.latest.get(&key) == Some(&seq) {
                    self.latest.remove(&key);
                }
            }
        }
    }

    fn push_scoped(&mut self, at: Instant, filter: KeyFilter) {
        // The later pass covers an earlier one of the same filter.
        self.scoped.retain(|(_, f)| *f != filter);
        self.scoped.push_back((at, filter));
        if self.scoped.len() <= MAX_SCOPED_REPASSES {
            return;
        }
        // Too many: widen each (a path prefix to its namespace, or to all without one) and run
        // them all at the latest due time, which is late enough for every one of them.
        let mut wider: Vec<KeyFilter> = Vec::new();
        for (_, f) in self.scoped.drain(..) {
            let f = coarsen(f);
            if !wider.contains(&f) {
                wider.push(f);
            }
        }
        if wider.len() > MAX_SCOPED_REPASSES || wider.contains(&KeyFilter::All) {
            wider = vec![KeyFilter::All];
        }
        self.scoped.extend(wider.into_iter().map(|f| (at, f)));
    }

    /// Takes what is due at `now`, and says when the next pass is due.
    fn take_due(&mut self, now: Instant) -> (RepassBatch, Option<Instant>) {
        let mut batch = RepassBatch::default();
        while self.keys.front().is_some_and(|(at, _, _)| *at <= now) {
            if let Some((_, seq, key)) = self.keys.pop_front() {
                if self.latest.get(&key) == Some(&seq) {
                    self.latest.remove(&key);
                    batch.keys.push(key);
                }
            }
        }
        while self.scoped.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, filter)) = self.scoped.pop_front() {
                batch.filters.push(filter);
            }
        }
        if batch.filters.contains(&KeyFilter::All) {
            batch.keys.clear();
            batch.filters = vec![KeyFilter::All];
        }
        let next = match (self.keys.front(), self.scoped.front()) {
            (Some((a, _, _)), Some((b, _))) => Some(*a.min(b)),
            (Some((a, _, _)), None) => Some(*a),
            (None, Some((b, _))) => Some(*b),
            (None, None) => None,
        };
        (batch, next)
    }
}

impl Repass {
    pub(crate) fn new(delay: Duration, rt: tokio::runtime::Handle, apply: ApplyBatch) -> Arc<Self> {
        Arc::new(Repass {
            delay,
            rt,
            apply,
            state: Mutex::new(RepassState::default()),
        })
    }

    /// Applies `filter` once more after the delay. A key that is not 64 hex digits selects
    /// nothing in L1 and is not queued.
    pub(crate) fn schedule(self: &Arc<Self>, filter: KeyFilter) {
        let key = match &filter {
            KeyFilter::Key { hex } => match parse_hex32(hex) {
                Some(key) => Some(key),
                None => return,
            },
            _ => None,
        };
        let mut state = self.state.lock();
        let at = Instant::now() + self.delay;
        match key {
            Some(key) => state.push_key(at, key),
            None => state.push_scoped(at, filter),
        }
        if !state.running {
            state.running = true;
            self.rt.spawn(Arc::clone(self).drain());
        }
    }

    async fn drain(self: Arc<Self>) {
        loop {
            let (batch, next) = {
                let mut state = self.state.lock();
                let (batch, next) = state.take_due(Instant::now());
                if batch.is_empty() && next.is_none() {
                    state.running = false;
                    return;
                }
                (batch, next)
            };
            if !batch.is_empty() {
                (self.apply)(batch);
            }
            if let Some(at) = next {
                tokio::time::sleep_until(at.into()).await;
            }
        }
    }

    /// Queued key passes (each once) and scoped passes, and whether the drain task runs.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> (Vec<[u8; 32]>, Vec<KeyFilter>, bool) {
        let state = self.state.lock();
        let keys = state
            .keys
            .iter()
            .filter(|(_, seq, key)| state.latest.get(key) == Some(seq))
            .map(|(_, _, key)| *key)
            .collect();
        let scoped = state.scoped.iter().map(|(_, f)| f.clone()).collect();
        (keys, scoped, state.running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip_and_own_messages() {
        let filter = KeyFilter::PathPrefix {
            namespace: Some("items".into()),
            prefix: "/api/items".into(),
        };
        let m = Message::new("a", filter.clone());
        let text = m.encode();
        assert!(text.contains(r#""scope":"path_prefix""#), "{text}");
        assert_eq!(classify(text.as_bytes(), "a"), Received::Own);
        match classify(text.as_bytes(), "b") {
            Received::Apply(f, _) => assert_eq!(f, filter),
            other => panic!("{other:?}"),
        }
        let key = Message::new(
            "a",
            KeyFilter::Key {
                hex: "ab".repeat(32),
            },
        )
        .encode();
        assert!(matches!(
            classify(key.as_bytes(), "b"),
            Received::Apply(KeyFilter::Key { .. }, _)
        ));
        let all = r#"{"v":1,"from":"x","sent_ms":0,"scope":"all"}"#;
        assert!(matches!(
            classify(all.as_bytes(), "b"),
            Received::Apply(KeyFilter::All, _)
        ));
    }

    #[test]
    fn rejects_what_it_cannot_trust() {
        assert_eq!(classify(br#"{"probe":"x-1"}"#, "b"), Received::Probe);
        for bad in [
            "not json",
            r#"{"v":2,"from":"x","sent_ms":0,"scope":"all"}"#,
            r#"{"v":1,"from":"x","sent_ms":0,"scope":"everything"}"#,
            r#"{"v":1,"from":"x","sent_ms":0,"scope":"path_prefix","prefix":""}"#,
        ] {
            assert_eq!(classify(bad.as_bytes(), "b"), Received::Malformed, "{bad}");
        }
    }

    fn ns(n: &str) -> KeyFilter {
        KeyFilter::Namespace {
            namespace: n.into(),
        }
    }

    fn key(i: u32) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        k
    }

    #[test]
    fn key_passes_run_once_at_their_latest_time_and_never_become_all() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut state = RepassState::default();
        state.push_key(t0, key(1));
        state.push_key(t1, key(1));
        state.push_key(t1, key(2));
        // The earlier pass of key 1 is covered by the later one.
        assert_eq!(state.take_due(t0), (RepassBatch::default(), Some(t1)));
        let (batch, next) = state.take_due(t1);
        assert_eq!(batch.keys, [key(1), key(2)]);
        assert!(batch.filters.is_empty() && next.is_none());

        // A storm of key passes keeps the newest ones and wipes nothing.
        let extra = 10;
        for i in 0..MAX_KEY_REPASSES as u32 + extra {
            state.push_key(t0, key(i));
        }
        assert_eq!(state.keys.len(), MAX_KEY_REPASSES);
        assert_eq!(state.latest.len(), MAX_KEY_REPASSES);
        assert!(state.scoped.is_empty());
        let (batch, _) = state.take_due(t1);
        assert_eq!(batch.keys.len(), MAX_KEY_REPASSES);
        assert_eq!(batch.keys.first(), Some(&key(extra)));
        assert!(batch.filters.is_empty());
        assert!(state.latest.is_empty());
    }

    #[test]
    fn scoped_passes_dedupe_and_collapse_to_their_union() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut state = RepassState::default();
        state.push_scoped(t0, ns("a"));
        state.push_scoped(t1, ns("a"));
        let queued: Vec<_> = state.scoped.iter().cloned().collect();
        assert_eq!(queued, [(t1, ns("a"))]);

        // Too many prefixes of one namespace become that namespace.
        let mut state = RepassState::default();
        state.push_scoped(t0, ns("b"));
        for i in 0..MAX_SCOPED_REPASSES {
            state.push_scoped(
                t0,
                KeyFilter::PathPrefix {
                    namespace: Some("a".into()),
                    prefix: format!("/p{i}"),
                },
            );
        }
        state.push_key(t0, key(7));
        let filters: Vec<_> = state.scoped.iter().map(|(_, f)| f.clone()).collect();
        assert_eq!(filters, [ns("b"), ns("a")]);
        let (batch, _) = state.take_due(t0);
        assert_eq!(batch.keys, [key(7)], "key passes are not collapsed");
        assert_eq!(batch.filters, [ns("b"), ns("a")]);

        // Prefixes of no namespace, or too many namespaces, become one pass over everything,
        // which then covers the due key passes too.
        for many in [
            (0..=MAX_SCOPED_REPASSES)
                .map(|i| KeyFilter::PathPrefix {
                    namespace: None,
                    prefix: format!("/p{i}"),
                })
                .collect::<Vec<_>>(),
            (0..=MAX_SCOPED_REPASSES)
                .map(|i| ns(&i.to_string()))
                .collect(),
        ] {
            let mut state = RepassState::default();
            state.push_key(t0, key(1));
            for f in many {
                state.push_scoped(t0, f);
            }
            let filters: Vec<_> = state.scoped.iter().map(|(_, f)| f.clone()).collect();
            assert_eq!(filters, [KeyFilter::All]);
            let (batch, next) = state.take_due(t0);
            assert_eq!(batch.filters, [KeyFilter::All]);
            assert!(batch.keys.is_empty() && next.is_none());
        }
    }

    #[tokio::test]
    async fn second_passes_wait_their_delay_run_in_batches_and_end() {
        let seen = Arc::new(Mutex::new(Vec::<RepassBatch>::new()));
        let record = Arc::clone(&seen);
        let apply: ApplyBatch = Arc::new(move |b| record.lock().push(b));
        let rt = tokio::runtime::Handle::current();
        let hex = |k: [u8; 32]| KeyFilter::Key {
            hex: k.iter().map(|b| format!("{b:02x}")).collect(),
        };

        // Nothing runs before its delay; a key that is not hex is not queued.
        let slow = Repass::new(Duration::from_secs(3600), rt.clone(), Arc::clone(&apply));
        slow.schedule(ns("a"));
        slow.schedule(KeyFilter::Key { hex: "zz".into() });
        slow.schedule(hex(key(3)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(seen.lock().is_empty());
        assert_eq!(slow.queued(), (vec![key(3)], vec![ns("a")], true));

        // Due passes run (each key and filter once, keys first), then the task ends.
        let fast = Repass::new(Duration::from_millis(10), rt, apply);
        fast.schedule(ns("c"));
        fast.schedule(hex(key(1)));
        fast.schedule(hex(key(1)));
        fast.schedule(ns("d"));
        fast.schedule(ns("c"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while fast.queued() != (Vec::new(), Vec::new(), false) {
            assert!(Instant::now() < deadline, "the queue never drained");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let seen = seen.lock();
        let keys: Vec<_> = seen.iter().flat_map(|b| b.keys.clone()).collect();
        let filters: Vec<_> = seen.iter().flat_map(|b| b.filters.clone()).collect();
        assert_eq!(keys, [key(1)]);
        assert_eq!(filters, [ns("d"), ns("c")]);
        assert!(seen.iter().all(|b| !b.is_empty()));
    }
}
