//! One bound on the bytes held for entries not yet stored: response bodies being captured and
//! values queued for Redis. Past it, responses stream through uncached and writes are dropped,
//! so a burst of large concurrent misses cannot grow memory without limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Shared by the store, its Redis tier and every capture; a separate instance bounds the
/// request bodies the proxy buffers for stages (`limits.max_buffered_bodies`).
#[derive(Debug)]
pub struct InflightBudget {
    used: AtomicUsize,
    /// 0 means unbounded.
    max: usize,
}

impl InflightBudget {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(InflightBudget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Takes `bytes` from the budget, or nothing and `None` when it would go over.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let mut reservation = Reservation {
            budget: Arc::clone(self),
            bytes: 0,
        };
        reservation.grow(bytes).then_some(reservation)
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether `bytes` more would fit now (without taking them): to refuse early what cannot.
    pub fn has_room_for(&self, bytes: usize) -> bool {
        self.max == 0 || self.used().saturating_add(bytes) <= self.max
    }
}

/// Bytes held from the budget; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<InflightBudget>,
    bytes: usize,
}

impl Reservation {
    /// Takes `more` bytes; `false` (and nothing taken) when the budget is exhausted.
    pub fn grow(&mut self, more: usize) -> bool {
        let previous = self.budget.used.fetch_add(more, Ordering::Relaxed);
        if self.budget.max > 0 && previous.saturating_add(more) > self.budget.max {
            self.budget.used.fetch_sub(more, Ordering::Relaxed);
            return false;
        }
        self.bytes += more;
        true
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_given_back() {
        let budget = InflightBudget::new(100);
        let mut a = budget.reserve(60).unwrap_or_else(|| panic!("fits"));
        assert!(budget.reserve(50).is_none(), "over the bound");
        assert!(!a.grow(50));
        assert!(a.grow(40));
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 0);
        assert!(budget.has_room_for(100) && !budget.has_room_for(101));
        let unbounded = InflightBudget::new(0);
        assert!(unbounded.has_room_for(usize::MAX));
        assert!(unbounded.reserve(usize::MAX / 2).is_some());
    }
}
