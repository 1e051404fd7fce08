//! Circuit breaker for Redis: stops a dead or hanging Redis from costing every request a
//! timeout, and lets a single probe through to find out when it is back.
//!
//! Pure state machine over an explicit `now`, so transitions are tested without sleeping.

use std::time::{Duration, Instant};

/// Tuning for the breaker.
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    /// Consecutive failures (errors or timeouts) that open the breaker.
    pub failure_threshold: u32,
    /// First open period; doubles after each failed probe.
    pub base_backoff: Duration,
    /// Upper bound for the open period.
    pub max_backoff: Duration,
    /// A probe that has not reported back after this long (its caller was cancelled) no longer
    /// blocks the next probe.
    pub probe_timeout: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_threshold: 5,
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// The value of the `outrider_cache_redis_breaker_state` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: BreakerState,
    consecutive_failures: u32,
    open_until: Instant,
    backoff: Duration,
    probe_started: Option<Instant>,
}

/// What the caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Normal traffic.
    Allowed,
    /// The single half-open probe: report its result.
    Probe,
    /// Skip Redis.
    Rejected,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Breaker {
            settings,
            state: BreakerState::Closed,
            consecutive_failures: 0,
            open_until: Instant::now(),
            backoff: settings.base_backoff,
            probe_started: None,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            BreakerState::Closed => Admission::Allowed,
            BreakerState::Open if now >= self.open_until => {
                self.state = BreakerState::HalfOpen;
                self.probe_started = Some(now);
                Admission::Probe
            }
            BreakerState::Open => Admission::Rejected,
            BreakerState::HalfOpen => match self.probe_started {
                Some(t) if now.saturating_duration_since(t) < self.settings.probe_timeout => {
                    Admission::Rejected
                }
                _ => {
                    self.probe_started = Some(now);
                    Admission::Probe
                }
            },
        }
    }

    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed;
        self.consecutive_failures = 0;
        self.backoff = self.settings.base_backoff;
        self.probe_started = None;
    }

    pub fn on_failure(&mut self, now: Instant) {
        match self.state {
            BreakerState::Closed => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if self.consecutive_failures >= self.settings.failure_threshold {
                    self.open(now, self.settings.base_backoff);
                }
            }
            BreakerState::HalfOpen => {
                let next = self
                    .backoff
                    .saturating_mul(2)
                    .min(self.settings.max_backoff);
                self.open(now, next);
            }
            // Late results of requests admitted before opening change nothing.
            BreakerState::Open => {}
        }
    }

    fn open(&mut self, now: Instant, backoff: Duration) {
        self.state = BreakerState::Open;
        self.backoff = backoff;
        self.open_until = now + backoff;
        self.probe_started = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_threshold: 3,
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(4),
            probe_timeout: Duration::from_millis(500),
        }
    }

    #[test]
    fn opens_after_threshold_and_success_resets_count() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        b.on_failure(t);
        b.on_failure(t);
        b.on_success();
        b.on_failure(t);
        b.on_failure(t);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(t), Admission::Allowed);
        b.on_failure(t);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(t + Duration::from_millis(999)), Admission::Rejected);
    }

    #[test]
    fn half_open_single_probe_then_close() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        for _ in 0..3 {
            b.on_failure(t);
        }
        let t1 = t + Duration::from_secs(1);
        assert_eq!(b.admit(t1), Admission::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(t1), Admission::Rejected, "only one probe at a time");
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(t1), Admission::Allowed);
    }

    #[test]
    fn failed_probes_double_backoff_up_to_cap() {
        let mut t = Instant::now();
        let mut b = Breaker::new(settings());
        for _ in 0..3 {
            b.on_failure(t);
        }
        let mut expected = [2u64, 4, 4, 4].into_iter();
        t += Duration::from_secs(1);
        for _ in 0..4 {
            assert_eq!(b.admit(t), Admission::Probe);
            b.on_failure(t);
            let backoff = Duration::from_secs(expected.next().unwrap_or(4));
            assert_eq!(
                b.admit(t + backoff - Duration::from_millis(1)),
                Admission::Rejected
            );
            t += backoff;
        }
        assert_eq!(b.admit(t), Admission::Probe);
        b.on_success();
        // After closing, the next opening starts from the base backoff again.
        for _ in 0..3 {
            b.on_failure(t);
        }
        assert_eq!(b.admit(t + Duration::from_secs(1)), Admission::Probe);
    }

    #[test]
    fn lost_probe_does_not_wedge_half_open() {
        let t = Instant::now();
        let mut b = Breaker::new(settings());
        for _ in 0..3 {
            b.on_failure(t);
        }
        let t1 = t + Duration::from_secs(1);
        assert_eq!(b.admit(t1), Admission::Probe);
        // The probe's caller vanished; after probe_timeout another probe is allowed.
        assert_eq!(
            b.admit(t1 + Duration::from_millis(499)),
            Admission::Rejected
        );
        assert_eq!(b.admit(t1 + Duration::from_millis(500)), Admission::Probe);
    }

    #[test]
    fn gauge_values() {
        assert_eq!(BreakerState::Closed.gauge(), 0);
        assert_eq!(BreakerState::HalfOpen.gauge(), 1);
        assert_eq!(BreakerState::Open.gauge(), 2);
    }
}
