//! In-process L1: a byte-bounded moka cache (W-TinyLFU admission, so one-off scans do not
//! evict the hot set). Entries leave on their own at `stored_at + ttl + max(stale windows)`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::sync::Cache as Moka;
use moka::Expiry;

use super::StoredResponse;

pub(crate) type Entry = Arc<StoredResponse>;

struct RetentionExpiry;

impl Expiry<[u8; 32], Entry> for RetentionExpiry {
    fn expire_after_create(&self, _: &[u8; 32], v: &Entry, _: Instant) -> Option<Duration> {
        Some(v.remaining_retention(SystemTime::now()))
    }

    fn expire_after_update(
        &self,
        _: &[u8; 32],
        v: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.remaining_retention(SystemTime::now()))
    }
}

/// Cheap to clone: the handles share one cache.
#[derive(Clone)]
pub(crate) struct L1 {
    cache: Moka<[u8; 32], Entry>,
}

impl L1 {
    pub(crate) fn new(max_bytes: u64) -> Self {
        let cache = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(|_, v: &Entry| u32::try_from(v.approx_size()).unwrap_or(u32::MAX))
            .expire_after(RetentionExpiry)
            .build();
        L1 { cache }
    }

    #[inline]
    pub(crate) fn get(&self, hash: &[u8; 32]) -> Option<Entry> {
        self.cache.get(hash)
    }

    pub(crate) fn insert(&self, hash: [u8; 32], entry: Entry) {
        self.cache.insert(hash, entry);
    }

    pub(crate) fn remove(&self, hash: &[u8; 32]) {
        self.cache.invalidate(hash);
    }

    /// Removes one entry; true when it was there.
    pub(crate) fn take(&self, hash: &[u8; 32]) -> bool {
        self.cache.remove(hash).is_some()
    }

    /// Removes matching entries and counts them. Walks the whole cache: purges are rare admin
    /// calls, and an exact count is worth more than moka's lazy predicate invalidation.
    pub(crate) fn purge(&self, mut pred: impl FnMut(&[u8; 32], &StoredResponse) -> bool) -> u64 {
        let victims: Vec<Arc<[u8; 32]>> = self
            .cache
            .iter()
            .filter(|(k, v)| pred(k, v))
            .map(|(k, _)| k)
            .collect();
        let mut n = 0;
        for k in victims {
            if self.cache.remove(&*k).is_some() {
                n += 1;
            }
        }
        n
    }

    pub(crate) fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Applies pending evictions so sizes are exact; moka otherwise settles them lazily.
    pub(crate) fn sync(&self) {
        self.cache.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::entry::sample_entry;

    fn fresh(body: usize) -> Entry {
        let mut e = sample_entry(body);
        e.stored_at = SystemTime::now();
        Arc::new(e)
    }

    #[test]
    fn bounded_by_bytes() {
        let l1 = L1::new(64 * 1024);
        for i in 0..200u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            l1.insert(k, fresh(1024));
        }
        l1.sync();
        assert!(l1.weighted_size() <= 64 * 1024, "{}", l1.weighted_size());
        assert!(l1.entry_count() < 200);
        assert!(l1.entry_count() > 0);
    }

    #[test]
    fn oversize_entry_is_not_kept() {
        let l1 = L1::new(4 * 1024);
        l1.insert([1; 32], fresh(8 * 1024));
        l1.sync();
        assert!(l1.get(&[1; 32]).is_none());
    }

    #[test]
    fn expires_at_retention_end() {
        let l1 = L1::new(1 << 20);
        let mut e = sample_entry(1);
        e.stored_at = SystemTime::now();
        e.ttl = Duration::from_millis(30);
        e.retention = Duration::from_millis(50);
        l1.insert([2; 32], Arc::new(e));
        assert!(l1.get(&[2; 32]).is_some());
        std::thread::sleep(Duration::from_millis(120));
        assert!(l1.get(&[2; 32]).is_none());
        // Already past retention when inserted (an old L2 entry): never served.
        let mut old = sample_entry(1);
        old.stored_at = SystemTime::now() - Duration::from_secs(3600);
        l1.insert([3; 32], Arc::new(old));
        assert!(l1.get(&[3; 32]).is_none());
    }

    #[test]
    fn purge_counts_matches() {
        let l1 = L1::new(1 << 20);
        for i in 0..10u8 {
            l1.insert([i; 32], fresh(10));
        }
        assert_eq!(l1.purge(|k, _| k[0] < 4), 4);
        assert!(l1.get(&[0; 32]).is_none());
        assert!(l1.get(&[5; 32]).is_some());
    }
}
