//! Purges that reach every replica: each instance subscribes to `{key_prefix}invalidate` and
//! drops the L1 entries a message names; a purge publishes its scope there.
//!
//! Redis and the local L1 are purged without it, so a dead channel costs only the other
//! replicas' L1 copies, and only until they resubscribe: a subscriber that lost its connection
//! clears its whole L1 when it is back (it cannot know what it missed; L1 refills from L2).
//! Classic pub/sub on a cluster is broadcast over the cluster bus, so a subscriber on any one
//! node hears every publish.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

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
/// to the next seed node when one fails.
pub(crate) async fn listen(
    clients: Vec<redis::Client>,
    channel: String,
    me: String,
    apply: Apply,
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
            apply(KeyFilter::All);
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

/// Queued second passes beyond this collapse into one pass over all of L1: a purge storm must
/// not grow memory without bound.
const MAX_REPASSES: usize = 1024;

/// Second passes over L1, each `delay` after its purge. A lookup whose Redis read started before
/// a purge reached Redis can put the old entry back in L1 after the first pass, but it has its
/// answer within the Redis timeout; a pass after that removes what it put back. One task at a
/// time drains the queue and ends when it is empty.
pub(crate) struct Repass {
    delay: Duration,
    rt: tokio::runtime::Handle,
    apply: Apply,
    state: Mutex<RepassState>,
}

#[derive(Default)]
struct RepassState {
    queue: VecDeque<(Instant, KeyFilter)>,
    running: bool,
}

impl Repass {
    pub(crate) fn new(delay: Duration, rt: tokio::runtime::Handle, apply: Apply) -> Arc<Self> {
        Arc::new(Repass {
            delay,
            rt,
            apply,
            state: Mutex::new(RepassState::default()),
        })
    }

    /// Applies `filter` once more after the delay.
    pub(crate) fn schedule(self: &Arc<Self>, filter: KeyFilter) {
        let mut state = self.state.lock();
        let filter = if state.queue.len() >= MAX_REPASSES {
            state.queue.clear();
            KeyFilter::All
        } else {
            filter
        };
        state.queue.push_back((Instant::now() + self.delay, filter));
        if !state.running {
            state.running = true;
            self.rt.spawn(Arc::clone(self).drain());
        }
    }

    async fn drain(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            let (due, next) = {
                let mut state = self.state.lock();
                let mut due = Vec::new();
                while state.queue.front().is_some_and(|(at, _)| *at <= now) {
                    if let Some((_, filter)) = state.queue.pop_front() {
                        due.push(filter);
                    }
                }
                let next = state.queue.front().map(|(at, _)| *at);
                if due.is_empty() && next.is_none() {
                    state.running = false;
                    return;
                }
                (due, next)
            };
            for filter in due {
                (self.apply)(filter);
            }
            if let Some(at) = next {
                tokio::time::sleep_until(at.into()).await;
            }
        }
    }

    #[cfg(test)]
    fn queued(&self) -> (Vec<KeyFilter>, bool) {
        let state = self.state.lock();
        let filters = state.queue.iter().map(|(_, f)| f.clone()).collect();
        (filters, state.running)
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

    #[tokio::test]
    async fn second_passes_wait_their_delay_are_bounded_and_end() {
        let ns = |n: &str| KeyFilter::Namespace {
            namespace: n.into(),
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let apply: Apply = Arc::new(move |f| record.lock().push(f));
        let rt = tokio::runtime::Handle::current();

        // Nothing runs before its delay; a storm collapses into one pass over everything.
        let slow = Repass::new(Duration::from_secs(3600), rt.clone(), Arc::clone(&apply));
        slow.schedule(ns("a"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(seen.lock().is_empty());
        assert_eq!(slow.queued(), (vec![ns("a")], true));
        for _ in 0..MAX_REPASSES {
            slow.schedule(ns("b"));
        }
        assert_eq!(slow.queued(), (vec![KeyFilter::All], true));

        // Due passes run in order, then the task ends.
        let fast = Repass::new(Duration::from_millis(10), rt, apply);
        fast.schedule(ns("c"));
        fast.schedule(ns("d"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while fast.queued() != (Vec::new(), false) {
            assert!(Instant::now() < deadline, "the queue never drained");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*seen.lock(), [ns("c"), ns("d")]);
    }
}
