//! The shared two-tier store every feature caches in: BLAKE3 keys, one versioned entry format,
//! a byte-bounded in-process L1, Redis as shared L2 behind timeouts and a circuit breaker,
//! single-flight, purge, stats and metrics.
//!
//! It owns *where* entries live and for how long they are kept (their retention); it must not
//! know Pingora, the config module or HTTP freshness rules. Features (the HTTP cache, and next
//! APQ, LLM, inference) derive their own [`CacheKey`] (`CacheKey::http`, `CacheKey::from_parts`)
//! under their own namespace and decide freshness themselves.
//!
//! A purge reaches every replica: Redis is purged, the local L1 too, and the scope is published
//! on an invalidation channel other replicas apply to their L1 ([`Store::publish_invalidation`]).

mod breaker;
mod budget;
mod core;
mod entry;
mod error;
mod flight;
mod invalidate;
mod key;
mod l1;
mod l2;
pub mod metrics;
mod nodes;

#[cfg(test)]
mod redis_tests;
#[cfg(test)]
mod testsupport;

pub use self::breaker::{BreakerSettings, BreakerState};
pub use self::budget::{InflightBudget, Reservation};
pub use self::core::{
    CacheOptions, CacheSettings, Lookup, Outcome, PurgeReport, PurgeTarget, Store, Tier,
};
pub use self::entry::StoredResponse;
pub use self::error::CacheError;
pub use self::flight::{Flight, FollowerWait, LeaderGuard, RevalidationGuard, Waited};
pub use self::key::CacheKey;
pub use self::l2::{RedisEndpoint, RedisState, RedisTls};
pub use self::metrics::CacheMetrics;

/// A realistic stored entry for tests of features built on the store.
#[cfg(test)]
pub(crate) fn entry_for_tests(body_len: usize) -> StoredResponse {
    entry::sample_entry(body_len)
}
