//! Circuit breakers per Redis Cluster master: a dead node opens only its own breaker, so keys
//! in its slots go straight to the upstream while keys on the other masters keep hitting.
//!
//! The slot map is our own copy of `CLUSTER SLOTS` (the client's is private), refreshed in the
//! background; until it is known, and for a single server, one breaker covers everything.

use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::breaker::{Breaker, BreakerSettings, BreakerState};

/// Redis Cluster's fixed number of hash slots.
pub(crate) const SLOTS: usize = 16_384;

pub(crate) type SharedBreaker = Arc<Mutex<Breaker>>;

/// The hash slot of `key`, as Redis computes it: CRC16 (XMODEM) of the key, or of the part
/// inside the first non-empty `{…}` (hash tag), modulo 16384.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS as u16
}

/// One range of `CLUSTER SLOTS`: first and last slot, and the master's `host:port`.
pub(crate) type SlotRange = (u16, u16, String);

#[derive(Default)]
struct SlotMap {
    /// Index into `nodes` per slot, `u16::MAX` for a slot no master serves; empty while unknown.
    slots: Vec<u16>,
    nodes: Vec<(String, SharedBreaker)>,
}

pub(crate) struct Breakers {
    settings: BreakerSettings,
    /// A single server's breaker; on a cluster, the one for slots not (yet) mapped.
    whole: SharedBreaker,
    map: ArcSwap<SlotMap>,
}

impl Breakers {
    pub(crate) fn new(settings: BreakerSettings) -> Self {
        Breakers {
            settings,
            whole: Arc::new(Mutex::new(Breaker::new(settings))),
            map: ArcSwap::from_pointee(SlotMap::default()),
        }
    }

    pub(crate) fn whole(&self) -> &SharedBreaker {
        &self.whole
    }

    /// The breaker that guards `key`'s master.
    pub(crate) fn for_key(&self, key: &str) -> SharedBreaker {
        let map = self.map.load();
        if map.slots.is_empty() {
            return Arc::clone(&self.whole);
        }
        let node = map.slots[usize::from(key_slot(key.as_bytes()))];
        map.nodes
            .get(usize::from(node))
            .map_or_else(|| Arc::clone(&self.whole), |(_, b)| Arc::clone(b))
    }

    /// Installs a new slot map; a master that stays keeps its breaker (and its state).
    pub(crate) fn set_topology(&self, ranges: &[SlotRange]) {
        let old = self.map.load();
        let mut nodes: Vec<(String, SharedBreaker)> = Vec::new();
        let mut slots = vec![u16::MAX; SLOTS];
        for (first, last, addr) in ranges {
            let idx = match nodes.iter().position(|(a, _)| a == addr) {
                Some(i) => i,
                None => {
                    let breaker = old
                        .nodes
                        .iter()
                        .find(|(a, _)| a == addr)
                        .map(|(_, b)| Arc::clone(b))
                        .unwrap_or_else(|| Arc::new(Mutex::new(Breaker::new(self.settings))));
                    nodes.push((addr.clone(), breaker));
                    nodes.len() - 1
                }
            };
            let idx = u16::try_from(idx).unwrap_or(u16::MAX);
            let (first, last) = (usize::from(*first), usize::from(*last));
            if first <= last && last < SLOTS {
                slots[first..=last].fill(idx);
            }
        }
        self.map.store(Arc::new(SlotMap { slots, nodes }));
    }

    /// Every master of the last slot map, as `host:port` (empty until one is known).
    pub(crate) fn known_nodes(&self) -> Vec<String> {
        self.map
            .load()
            .nodes
            .iter()
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// The master that owns `key`'s slot in the last slot map, as `host:port`.
    pub(crate) fn node_of(&self, key: &str) -> Option<String> {
        let map = self.map.load();
        let node = *map.slots.get(usize::from(key_slot(key.as_bytes())))?;
        map.nodes.get(usize::from(node)).map(|(a, _)| a.clone())
    }

    /// The worst state of any breaker: what the single gauge and `/cache/stats` report.
    pub(crate) fn worst(&self) -> BreakerState {
        let mut worst = self.whole.lock().state();
        for (_, b) in &self.map.load().nodes {
            worst = worse(worst, b.lock().state());
        }
        worst
    }

    /// Masters whose breaker is not closed, as `host:port`.
    pub(crate) fn troubled_nodes(&self) -> Vec<String> {
        self.map
            .load()
            .nodes
            .iter()
            .filter(|(_, b)| b.lock().state() != BreakerState::Closed)
            .map(|(a, _)| a.clone())
            .collect()
    }
}

fn worse(a: BreakerState, b: BreakerState) -> BreakerState {
    let rank = |s| match s {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"hello"), 866);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag does not count: the whole key is hashed.
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
    }

    #[test]
    fn a_dead_master_opens_only_its_own_breaker() {
        let settings = BreakerSettings {
            failure_threshold: 1,
            ..BreakerSettings::default()
        };
        let b = Breakers::new(settings);
        assert!(
            Arc::ptr_eq(&b.for_key("foo"), b.whole()),
            "unmapped: one breaker"
        );
        b.set_topology(&[(0, 8191, "a:1".into()), (8192, 16383, "b:2".into())]);
        // foo (12182) is on b, hello (866) on a.
        b.for_key("foo").lock().on_failure(Instant::now());
        assert_eq!(b.for_key("foo").lock().state(), BreakerState::Open);
        assert_eq!(b.for_key("hello").lock().state(), BreakerState::Closed);
        assert_eq!(b.worst(), BreakerState::Open);
        assert_eq!(b.troubled_nodes(), ["b:2"]);
        assert_eq!(b.known_nodes(), ["a:1", "b:2"]);
        assert_eq!(b.node_of("foo").as_deref(), Some("b:2"));
        // A refresh keeps the state of masters that stay.
        b.set_topology(&[(0, 16383, "b:2".into())]);
        assert_eq!(b.for_key("hello").lock().state(), BreakerState::Open);
    }
}
