//! The cache core: BLAKE3 keys, the versioned stored-response format, a byte-bounded in-process
//! L1, Redis as shared L2 behind timeouts and a circuit breaker, single-flight, stale windows,
//! purge, stats and metrics, and the pure RFC 9111 policy helpers.
//!
//! It owns *what* is cached and *where*; it must not know Pingora or the config module. The
//! proxy decides per request (with [`policy`]) and calls [`Cache`]; features such as APQ, LLM
//! and inference derive their own [`CacheKey`] with [`CacheKey::from_parts`].

mod breaker;
mod core;
mod entry;
mod error;
mod flight;
mod key;
mod l1;
mod l2;
pub mod metrics;
pub mod policy;

#[cfg(test)]
mod redis_tests;
#[cfg(test)]
mod testsupport;

pub use self::breaker::{BreakerSettings, BreakerState};
pub use self::core::{
    Cache, CacheOptions, CacheSettings, Lookup, Outcome, PurgeReport, PurgeTarget, Tier,
};
pub use self::entry::{Freshness, StoredResponse};
pub use self::error::CacheError;
pub use self::flight::{Flight, FollowerWait, LeaderGuard, RevalidationGuard};
pub use self::key::CacheKey;
pub use self::l2::RedisState;
pub use self::metrics::CacheMetrics;
