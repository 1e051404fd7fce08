//! The HTTP response cache (a route's `cache:` block) as a pipeline stage: RFC 9111 policy
//! (what may be stored, freshness, validators, stale windows) in one place, over the shared
//! [`store`](crate::store).

pub mod config;
pub mod policy;
pub mod stage;

pub use config::RouteCacheConfig;
pub use stage::HttpCache;
