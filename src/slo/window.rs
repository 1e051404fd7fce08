//! Good/total event counts in time buckets, and what SRE practice reads from them: the SLI over
//! a window, the error budget left, burn rates and the multi-window alert state.
//!
//! Memory is fixed per objective: one-minute buckets for the burn-rate windows (up to 3 days)
//! and one-hour buckets for the SLO window. Recording takes a short lock and never allocates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

/// The burn-rate windows of the SRE workbook's multi-window alerts, in seconds.
pub const WINDOWS: [(&str, u64); 7] = [
    ("5m", 300),
    ("30m", 1800),
    ("1h", 3600),
    ("2h", 7200),
    ("6h", 21_600),
    ("1d", 86_400),
    ("3d", 259_200),
];

/// `(long window, short window, burn rate, state)`: both windows over the rate means the state.
pub const ALERTS: [(&str, &str, f64, AlertState); 4] = [
    ("1h", "5m", 14.4, AlertState::Page),
    ("6h", "30m", 6.0, AlertState::Page),
    ("1d", "2h", 3.0, AlertState::Ticket),
    ("3d", "6h", 1.0, AlertState::Ticket),
];

const FINE_WIDTH: u64 = 60;
const FINE_SLOTS: usize = 3 * 24 * 60;
const COARSE_WIDTH: u64 = 3600;

/// Where time comes from: the system clock, or a hand-set one in tests.
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock tests move by hand.
#[derive(Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start: u64) -> Self {
        ManualClock(AtomicU64::new(start))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_secs(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    good: u64,
    total: u64,
}

/// A ring of equal-width buckets; a bucket is reused once its epoch is out of the ring.
struct Ring {
    width: u64,
    slots: Vec<Bucket>,
}

impl Ring {
    fn new(width: u64, slots: usize) -> Ring {
        Ring {
            width,
            slots: vec![
                Bucket {
                    epoch: u64::MAX,
                    good: 0,
                    total: 0
                };
                slots.max(1)
            ],
        }
    }

    fn record(&mut self, now: u64, good: u64, total: u64) {
        let epoch = now / self.width;
        let len = self.slots.len() as u64;
        if let Some(bucket) = self.slots.get_mut((epoch % len) as usize) {
            if bucket.epoch != epoch {
                *bucket = Bucket {
                    epoch,
                    good: 0,
                    total: 0,
                };
            }
            bucket.good += good;
            bucket.total += total;
        }
    }

    /// Counts of the buckets that overlap the last `span` seconds (the current one included).
    fn sum(&self, now: u64, span: u64) -> Counts {
        let current = now / self.width;
        let buckets = span.div_ceil(self.width).min(self.slots.len() as u64);
        let oldest = current.saturating_sub(buckets.saturating_sub(1));
        self.slots
            .iter()
            .filter(|b| b.epoch != u64::MAX && b.epoch >= oldest && b.epoch <= current)
            .fold(Counts::default(), |acc, b| Counts {
                good: acc.good + b.good,
                total: acc.total + b.total,
            })
    }
}

/// Events in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub good: u64,
    pub total: u64,
}

impl Counts {
    /// Share of good events; `None` with no events.
    pub fn sli(&self) -> Option<f64> {
        (self.total > 0).then(|| self.good as f64 / self.total as f64)
    }

    /// How fast the budget burns: the error rate over the allowed error rate (1.0 = exactly
    /// on budget over the SLO window). 0 with no events.
    pub fn burn_rate(&self, target: f64) -> f64 {
        let allowed = 1.0 - target;
        match self.sli() {
            Some(sli) if allowed > 0.0 => (1.0 - sli) / allowed,
            Some(sli) if sli < 1.0 => f64::INFINITY,
            _ => 0.0,
        }
    }
}

/// What an objective's burn rates call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Ok,
    Ticket,
    Page,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Ok => "ok",
            AlertState::Ticket => "ticket",
            AlertState::Page => "page",
        }
    }
}

/// An objective's event history.
pub struct Series {
    inner: Mutex<(Ring, Ring)>,
    window: u64,
}

impl Series {
    /// A history long enough for `window` (the SLO window) and every burn-rate window.
    pub fn new(window: Duration) -> Series {
        let window = window.as_secs().max(1);
        let coarse = window.div_ceil(COARSE_WIDTH) as usize + 1;
        Series {
            inner: Mutex::new((
                Ring::new(FINE_WIDTH, FINE_SLOTS),
                Ring::new(COARSE_WIDTH, coarse),
            )),
            window,
        }
    }

    pub fn record(&self, now: u64, good: bool) {
        let good = u64::from(good);
        let mut rings = self.inner.lock();
        rings.0.record(now, good, 1);
        rings.1.record(now, good, 1);
    }

    /// Counts over the last `span` seconds: minute resolution up to 3 days, hours beyond.
    pub fn counts(&self, now: u64, span: u64) -> Counts {
        let rings = self.inner.lock();
        if span <= FINE_WIDTH * FINE_SLOTS as u64 {
            rings.0.sum(now, span)
        } else {
            rings.1.sum(now, span)
        }
    }

    /// Counts over the whole SLO window.
    pub fn window_counts(&self, now: u64) -> Counts {
        self.counts(now, self.window)
    }

    /// Error budget left over the SLO window: 1 untouched, 0 spent, negative overspent.
    pub fn budget_remaining(&self, now: u64, target: f64) -> f64 {
        1.0 - self.window_counts(now).burn_rate(target)
    }

    /// Burn rate over each of [`WINDOWS`].
    pub fn burn_rates(&self, now: u64, target: f64) -> Vec<(&'static str, f64)> {
        WINDOWS
            .iter()
            .map(|(name, secs)| (*name, self.counts(now, *secs).burn_rate(target)))
            .collect()
    }

    /// The most severe state whose long and short windows both burn faster than its rate.
    pub fn state(&self, now: u64, target: f64) -> AlertState {
        let rates = self.burn_rates(now, target);
        let rate = |name: &str| {
            rates
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, r)| *r)
                .unwrap_or(0.0)
        };
        ALERTS
            .iter()
            .filter(|(long, short, threshold, _)| {
                rate(long) > *threshold && rate(short) > *threshold
            })
            .map(|(_, _, _, state)| *state)
            .max()
            .unwrap_or(AlertState::Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    #[test]
    fn windows_count_only_their_own_span() {
        let series = Series::new(Duration::from_secs(30 * DAY));
        let start = 1_000 * DAY;
        // 10 bad events two hours ago, 90 good ones now.
        for _ in 0..10 {
            series.record(start, false);
        }
        let now = start + 2 * 3600;
        for _ in 0..90 {
            series.record(now, true);
        }
        assert_eq!(
            series.counts(now, 300),
            Counts {
                good: 90,
                total: 90
            }
        );
        assert_eq!(
            series.counts(now, 3600),
            Counts {
                good: 90,
                total: 90
            }
        );
        assert_eq!(
            series.counts(now, 6 * 3600),
            Counts {
                good: 90,
                total: 100
            }
        );
        assert_eq!(
            series.window_counts(now),
            Counts {
                good: 90,
                total: 100
            }
        );
        // 10 % errors against a 99.9 % target: burning 100x, budget overspent 99 times.
        let target = 0.999;
        assert!((series.counts(now, 6 * 3600).burn_rate(target) - 100.0).abs() < 1e-6);
        assert!((series.budget_remaining(now, target) + 99.0).abs() < 1e-6);
    }

    #[test]
    fn old_buckets_are_reused_not_double_counted() {
        let series = Series::new(Duration::from_secs(DAY));
        let t0 = 50 * DAY;
        series.record(t0, false);
        // Three days and a minute later the same fine slot comes round again.
        let later = t0 + 3 * DAY + 60;
        series.record(later, true);
        assert_eq!(series.counts(later, 3 * DAY), Counts { good: 1, total: 1 });
        assert_eq!(series.window_counts(later), Counts { good: 1, total: 1 });
    }

    #[test]
    fn states_follow_the_multiwindow_rules() {
        let target = 0.999;
        // 2 % errors for the last hour: burn 20x in 1h and 5m → page.
        let series = Series::new(Duration::from_secs(30 * DAY));
        let now = 2_000 * DAY;
        for minute in 0..60 {
            for i in 0..50 {
                series.record(now - minute * 60, i != 0);
            }
        }
        assert_eq!(series.state(now, target), AlertState::Page);
        // An hour of clean traffic since: the short windows clear the page, but 1 % errors
        // over the last day and two hours still burn 10x: a ticket.
        let later = now + 3600;
        for minute in 0..60 {
            for _ in 0..50 {
                series.record(later - minute * 60, true);
            }
        }
        assert_eq!(series.state(later, target), AlertState::Ticket);
        // 0.15 % errors everywhere: 1.5x burn in 3d and 6h → ticket only.
        let steady = Series::new(Duration::from_secs(30 * DAY));
        for hour in 0..72 {
            for i in 0..2000 {
                steady.record(now - hour * 3600, i >= 3);
            }
        }
        assert_eq!(steady.state(now, target), AlertState::Ticket);
        // No traffic: nothing burns.
        let idle = Series::new(Duration::from_secs(DAY));
        assert_eq!(idle.state(now, target), AlertState::Ok);
        assert_eq!(idle.budget_remaining(now, target), 1.0);
    }
}
