//! Single-flight (one upstream fetch per key at a time) and the per-key revalidation latch for
//! stale-while-revalidate.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use prometheus::IntCounter;
use tokio::sync::watch;

use super::StoredResponse;

/// `None` while the leader works; `Some(result)` once it finished.
type Slot = Option<Option<Arc<StoredResponse>>>;

/// Independent locks, chosen by the key's first byte: concurrent misses on different keys do
/// not queue on one lock, and each critical section is a single map operation.
const SHARDS: usize = 16;

pub(crate) struct Sharded<T> {
    shards: [Mutex<T>; SHARDS],
}

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Sharded {
            shards: std::array::from_fn(|_| Mutex::new(T::default())),
        }
    }
}

impl<T> Sharded<T> {
    #[inline]
    fn shard(&self, hash: &[u8; 32]) -> &Mutex<T> {
        &self.shards[hash[0] as usize % SHARDS]
    }

    fn sum(&self, f: impl Fn(&T) -> usize) -> usize {
        self.shards.iter().map(|m| f(&m.lock())).sum()
    }
}

#[derive(Default)]
pub(crate) struct Flights {
    inflight: Sharded<HashMap<[u8; 32], InFlight>>,
}

/// One key's fetch in progress, as newcomers find it.
struct InFlight {
    rx: watch::Receiver<Slot>,
    /// A follower waited `cache.lock_timeout` for it in vain: newcomers do not wait at all.
    slow: Arc<AtomicBool>,
}

/// What a request that missed should do.
pub enum Flight {
    /// Fetch from upstream, store, then `complete` (or drop to release the followers).
    Leader(LeaderGuard),
    /// Another request is fetching this key: wait for it.
    Follower(FollowerWait),
    /// Another request is fetching this key and has already kept a follower waiting past the
    /// lock timeout: go upstream at once, without storing.
    Pass,
}

pub struct LeaderGuard {
    flights: Arc<Flights>,
    hash: [u8; 32],
    tx: Option<watch::Sender<Slot>>,
}

pub struct FollowerWait {
    rx: watch::Receiver<Slot>,
    slow: Arc<AtomicBool>,
    counters: WaitCounters,
}

/// `outrider_cache_singleflight_waits_total`, by result.
#[derive(Clone)]
pub(crate) struct WaitCounters {
    pub served: IntCounter,
    pub fallthrough: IntCounter,
    pub timeout: IntCounter,
}

/// How a follower's wait ended.
#[derive(Debug)]
pub enum Waited {
    /// The leader stored a response: serve it.
    Served(Arc<StoredResponse>),
    /// The leader failed, gave up or got something unstorable: fetch (and maybe store) yourself.
    Fallthrough,
    /// The leader took longer than the lock timeout: fetch yourself, but leave the entry to it.
    TimedOut,
}

impl Waited {
    pub fn entry(self) -> Option<Arc<StoredResponse>> {
        match self {
            Waited::Served(entry) => Some(entry),
            Waited::Fallthrough | Waited::TimedOut => None,
        }
    }
}

impl Flights {
    pub(crate) fn begin(self: &Arc<Self>, hash: [u8; 32], counters: &WaitCounters) -> Flight {
        let mut map = self.inflight.shard(&hash).lock();
        if let Some(flight) = map.get(&hash) {
            if flight.slow.load(Ordering::Relaxed) {
                counters.timeout.inc();
                return Flight::Pass;
            }
            return Flight::Follower(FollowerWait {
                rx: flight.rx.clone(),
                slow: flight.slow.clone(),
                counters: counters.clone(),
            });
        }
        let (tx, rx) = watch::channel(None);
        let slow = Arc::new(AtomicBool::new(false));
        map.insert(hash, InFlight { rx, slow });
        Flight::Leader(LeaderGuard {
            flights: Arc::clone(self),
            hash,
            tx: Some(tx),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.inflight.sum(HashMap::len)
    }
}

impl LeaderGuard {
    /// Hands the result to every follower. `None` (uncacheable or failed) sends them upstream.
    pub fn complete(mut self, result: Option<Arc<StoredResponse>>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Option<Arc<StoredResponse>>) {
        if let Some(tx) = self.tx.take() {
            // Remove first: a request arriving after this point must not join a finished
            // flight; it finds the stored entry or leads a new fetch.
            self.flights
                .inflight
                .shard(&self.hash)
                .lock()
                .remove(&self.hash);
            tx.send_replace(Some(result));
        }
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.finish(None);
    }
}

impl FollowerWait {
    /// A wait that ends at once with `entry`: the fetch it would have waited for is done.
    pub(crate) fn ready(entry: Arc<StoredResponse>, counters: &WaitCounters) -> FollowerWait {
        let (_, rx) = watch::channel(Some(Some(entry)));
        FollowerWait {
            rx,
            slow: Arc::new(AtomicBool::new(false)),
            counters: counters.clone(),
        }
    }

    /// Waits for the leader's result, at most `timeout` (`cache.lock_timeout`, like nginx's
    /// `proxy_cache_lock_timeout`).
    pub async fn wait(mut self, timeout: Duration) -> Waited {
        let waited = match tokio::time::timeout(timeout, self.rx.wait_for(Option::is_some)).await {
            Ok(Ok(slot)) => match slot.clone().flatten() {
                Some(entry) => Waited::Served(entry),
                None => Waited::Fallthrough,
            },
            // Sender gone without a value cannot happen (Drop sends), but treat it as failure.
            Ok(Err(_)) => Waited::Fallthrough,
            Err(_) => Waited::TimedOut,
        };
        match waited {
            Waited::Served(_) => self.counters.served.inc(),
            Waited::Fallthrough => self.counters.fallthrough.inc(),
            Waited::TimedOut => {
                self.slow.store(true, Ordering::Relaxed);
                self.counters.timeout.inc();
            }
        }
        waited
    }
}

#[derive(Default)]
pub(crate) struct Revalidations {
    active: Sharded<HashSet<[u8; 32]>>,
}

/// Held by the one background refresh of a key; dropping it allows the next one.
pub struct RevalidationGuard {
    owner: Arc<Revalidations>,
    hash: [u8; 32],
}

impl Revalidations {
    pub(crate) fn try_begin(self: &Arc<Self>, hash: [u8; 32]) -> Option<RevalidationGuard> {
        if self.active.shard(&hash).lock().insert(hash) {
            Some(RevalidationGuard {
                owner: Arc::clone(self),
                hash,
            })
        } else {
            None
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.active.sum(HashSet::len)
    }
}

impl Drop for RevalidationGuard {
    fn drop(&mut self) {
        self.owner
            .active
            .shard(&self.hash)
            .lock()
            .remove(&self.hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::entry::sample_entry;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counters() -> WaitCounters {
        WaitCounters {
            served: IntCounter::new("s", "s").unwrap(),
            fallthrough: IntCounter::new("f", "f").unwrap(),
            timeout: IntCounter::new("t", "t").unwrap(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hundred_concurrent_one_leader_all_served() {
        let flights = Arc::new(Flights::default());
        let c = counters();
        let leaders = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(100));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (flights, leaders, barrier) = (flights.clone(), leaders.clone(), barrier.clone());
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let flight = flights.begin([7; 32], &c);
                barrier.wait().await;
                match flight {
                    Flight::Leader(g) => {
                        leaders.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        g.complete(Some(Arc::new(sample_entry(3))));
                        true
                    }
                    Flight::Follower(w) => w.wait(Duration::from_secs(10)).await.entry().is_some(),
                    Flight::Pass => false,
                }
            }));
        }
        for t in tasks {
            assert!(matches!(t.await, Ok(true)));
        }
        assert_eq!(leaders.load(Ordering::SeqCst), 1);
        assert_eq!(c.served.get(), 99);
        assert_eq!(c.fallthrough.get(), 0);
        assert_eq!(flights.len(), 0, "in-flight map must not leak");
    }

    #[tokio::test]
    async fn leader_drop_wakes_followers_with_none() {
        let flights = Arc::new(Flights::default());
        let c = counters();
        let leader = flights.begin([1; 32], &c);
        let followers: Vec<_> = (0..5)
            .map(|_| match flights.begin([1; 32], &c) {
                Flight::Follower(w) => {
                    tokio::spawn(async { w.wait(Duration::from_secs(10)).await.entry() })
                }
                Flight::Leader(_) | Flight::Pass => panic!("expected a follower"),
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(leader);
        for f in followers {
            assert!(matches!(f.await, Ok(None)));
        }
        assert_eq!(c.fallthrough.get(), 5);
        assert_eq!(flights.len(), 0);
        // The key is free again.
        assert!(matches!(flights.begin([1; 32], &c), Flight::Leader(_)));
    }

    #[tokio::test]
    async fn follower_times_out_and_complete_none_falls_through() {
        let flights = Arc::new(Flights::default());
        let c = counters();
        let leader = flights.begin([2; 32], &c);
        let Flight::Follower(w) = flights.begin([2; 32], &c) else {
            panic!("expected follower");
        };
        let Flight::Follower(w2) = flights.begin([2; 32], &c) else {
            panic!("expected follower");
        };
        assert!(matches!(
            w.wait(Duration::from_millis(10)).await,
            Waited::TimedOut
        ));
        // Once one follower waited in vain, newcomers do not wait for this fetch at all.
        assert!(matches!(flights.begin([2; 32], &c), Flight::Pass));
        let Flight::Leader(g) = leader else {
            panic!("expected leader");
        };
        g.complete(None);
        assert!(matches!(
            w2.wait(Duration::from_secs(5)).await,
            Waited::Fallthrough
        ));
        assert_eq!(c.fallthrough.get(), 1);
        assert_eq!(c.timeout.get(), 2);
        assert_eq!(flights.len(), 0);
        // The next fetch of the key starts afresh.
        assert!(matches!(flights.begin([2; 32], &c), Flight::Leader(_)));
    }

    #[test]
    fn one_revalidation_per_key() {
        let r = Arc::new(Revalidations::default());
        let g = r.try_begin([3; 32]);
        assert!(g.is_some());
        assert!(r.try_begin([3; 32]).is_none());
        assert!(r.try_begin([4; 32]).is_some());
        drop(g);
        assert!(r.try_begin([3; 32]).is_some());
        assert_eq!(r.len(), 0);
    }
}
