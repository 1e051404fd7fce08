//! Token-bucket rate limits per client: local by default, optionally shared by every replica
//! through Redis (GCRA in one Lua call), falling back to the local bucket while Redis cannot
//! answer within its timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::store::Store;

/// Keys tracked at once per route; an idle bucket is full again, so evicting it loses nothing.
const MAX_KEYS: u64 = 100_000;

/// What a request's token costs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateDecision {
    Allowed { remaining: u32 },
    Limited { retry_after: Duration },
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// One route's buckets.
pub struct RateLimiter {
    /// Tokens per second.
    pub rate: f64,
    pub burst: u32,
    buckets: moka::sync::Cache<String, Arc<Mutex<Bucket>>>,
    shared: Option<Arc<Store>>,
    /// Key namespace in Redis (the route's name).
    namespace: String,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("shared", &self.shared.is_some())
            .finish()
    }
}

/// GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): KEYS[1] holds
/// the theoretical arrival time in microseconds; ARGV: now, emission interval, burst tolerance.
/// Returns {allowed (1/0), remaining tokens, retry after µs}. Redis's own clock is not used, so
/// replicas must keep reasonably synchronised clocks (NTP).
const GCRA: &str = r#"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then
  return {0, 0, allow_at - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
local remaining = math.floor((now - (new_tat - tolerance - interval)) / interval)
return {1, remaining, 0}
"#;

impl RateLimiter {
    pub fn new(rate: f64, burst: u32, shared: Option<Arc<Store>>, namespace: &str) -> RateLimiter {
        // A bucket idle this long has refilled completely.
        let refill =
            Duration::from_secs_f64((f64::from(burst) / rate.max(1e-9)).clamp(1.0, 86_400.0));
        RateLimiter {
            rate,
            burst: burst.max(1),
            buckets: moka::sync::Cache::builder()
                .max_capacity(MAX_KEYS)
                .time_to_idle(refill)
                .build(),
            shared,
            namespace: namespace.to_string(),
        }
    }

    /// Takes one token for `key`: from Redis when shared and reachable, else locally.
    pub async fn take(&self, key: &str) -> RateDecision {
        if let Some(store) = &self.shared {
            if let Some(decision) = self.take_shared(store, key).await {
                return decision;
            }
        }
        self.take_local(key, Instant::now())
    }

    async fn take_shared(&self, store: &Store, key: &str) -> Option<RateDecision> {
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| redis::Script::new(GCRA));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_micros() as i64;
        let interval = (1e6 / self.rate.max(1e-9)) as i64;
        let tolerance = interval * i64::from(self.burst.saturating_sub(1));
        let redis_key = format!(
            "ratelimit:{}:{}",
            self.namespace,
            blake3::hash(key.as_bytes()).to_hex()
        );
        let reply = store
            .shared_script(script, &redis_key, &[now, interval.max(1), tolerance])
            .await?;
        match reply.as_slice() {
            [1, remaining, _] => Some(RateDecision::Allowed {
                remaining: u32::try_from(*remaining).unwrap_or(0),
            }),
            [0, _, wait] => Some(RateDecision::Limited {
                retry_after: Duration::from_micros(u64::try_from(*wait).unwrap_or(0)),
            }),
            _ => None,
        }
    }

    /// The local token bucket.
    pub fn take_local(&self, key: &str, now: Instant) -> RateDecision {
        let burst = f64::from(self.burst);
        let bucket = self.buckets.get_with_by_ref(key, || {
            Arc::new(Mutex::new(Bucket {
                tokens: burst,
                updated: now,
            }))
        });
        let mut b = bucket.lock();
        let refill = now.saturating_duration_since(b.updated).as_secs_f64() * self.rate;
        b.tokens = (b.tokens + refill).min(burst);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            RateDecision::Allowed {
                remaining: b.tokens.floor() as u32,
            }
        } else {
            let wait = (1.0 - b.tokens) / self.rate.max(1e-9);
            RateDecision::Limited {
                retry_after: Duration::from_secs_f64(wait),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let limiter = RateLimiter::new(10.0, 3, None, "r");
        let t0 = Instant::now();
        for expected in [2, 1, 0] {
            assert_eq!(
                limiter.take_local("a", t0),
                RateDecision::Allowed {
                    remaining: expected
                }
            );
        }
        match limiter.take_local("a", t0) {
            RateDecision::Limited { retry_after } => {
                assert!((retry_after.as_secs_f64() - 0.1).abs() < 1e-6)
            }
            other => panic!("{other:?}"),
        }
        // Another key has its own bucket.
        assert!(matches!(
            limiter.take_local("b", t0),
            RateDecision::Allowed { .. }
        ));
        // 100 ms later one token is back.
        let later = t0 + Duration::from_millis(100);
        assert!(matches!(
            limiter.take_local("a", later),
            RateDecision::Allowed { .. }
        ));
        assert!(matches!(
            limiter.take_local("a", later),
            RateDecision::Limited { .. }
        ));
    }
}
